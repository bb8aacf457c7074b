"""Crash-safe writing: the package's one atomic writer for files and its one for directories.

- :func:`atomic_write` (and its shorthands :func:`atomic_write_bytes`, :func:`pickle_atomic`): the bytes go to a
  temporary file beside the destination, are fsynced, and the file is renamed over the destination with
  ``os.replace`` (atomic on POSIX and Windows). A reader sees the old file or the complete new one, never a
  partial write; a failed write leaves an existing destination untouched.
- :func:`staged_directory`: a folder is assembled beside its destination and renamed into place at the end, so
  that a failure leaves nothing half-written (and an existing folder intact).

Leftovers of a killed process are dot-named siblings: ``.<name>.*.tmp`` files and ``.<name>.*.partial`` /
``.<name>.*.replaced`` folders.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside `path`, fsync it, and rename it to `path`.

    When `write` raises, the temporary file is removed and an existing `path` is left as it was.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def pickle_atomic(obj: Any, path: PathLike) -> None:
    """``pickle.dump(obj)`` (highest protocol) to `path`, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write(path, write)


@contextlib.contextmanager
def staged_directory(destination: PathLike, replace: bool) -> Iterator[Path]:
    """Yield a fresh folder beside `destination`; on success it becomes `destination`, on an error it is removed.

    An empty or missing destination is simply taken over. A non-empty one is refused (FileExistsError, before
    anything is written) unless `replace`: then it is swapped out after the new folder is complete and deleted.
    """
    destination = Path(os.path.abspath(destination))   # "out/.." or "." name their real parent and name
    occupied = destination.exists() and (not destination.is_dir() or any(destination.iterdir()))
    if occupied and not replace:
        raise FileExistsError(f"{destination} exists and is not empty; refusing to write over it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        if occupied:
            retired = staging.with_suffix(".replaced")
            os.replace(destination, retired)
            try:
                os.replace(staging, destination)
            except BaseException:
                os.replace(retired, destination)
                raise
            shutil.rmtree(retired) if retired.is_dir() else retired.unlink()
        else:
            os.replace(staging, destination)   # an empty destination folder is replaced in one rename
        _fsync_directory(destination.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_directory(directory: Path) -> None:
    """Make a rename itself durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
