"""Crash-safe writing: the package's one atomic writer for files and its one for directories.

- :func:`atomic_write` (and its shorthands :func:`atomic_write_bytes`, :func:`pickle_atomic`): the bytes go to a
  temporary file beside the destination, are fsynced, and the file is renamed over the destination with
  ``os.replace`` (atomic on POSIX and Windows). A reader sees the old file or the complete new one, never a
  partial write; a failed write leaves an existing destination untouched.
- :func:`staged_directory`: a folder is assembled beside its destination and renamed into place at the end, so
  that a failure leaves nothing half-written (and an existing folder intact).

Temporaries are dot-named siblings that name their writer: ``.<name>.pid<PID>@<host>.<random>.tmp`` files
and ``.<name>.pid<PID>@<host>.<random>.partial`` / ``.replaced`` folders. A killed writer leaves them behind;
:func:`prune_dead_leftovers` removes those whose writer no longer runs and keeps those of a running one.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pickle
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike
# .<name>.pid<PID>@<host>.<random>.<suffix>; <random> is mkstemp's / mkdtemp's (letters, digits, "_": no dot)
_WRITER = re.compile(r"\.(?P<name>.+)\.pid(?P<pid>\d+)@(?P<host>.+)\.[a-z0-9_]+\.(?:partial|replaced|tmp)")
_UNNAMED_WRITER = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]+\.(?:partial|replaced|tmp)")   # older aqrcmt


def _temporary_prefix(destination: Path) -> str:
    """The start of a temporary's name beside `destination`: ``.<name>.pid<PID>@<host>.``."""
    return f".{destination.name}.pid{os.getpid()}@{socket.gethostname()}."


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside `path`, fsync it, and rename it to `path`.

    When `write` raises, the temporary file is removed and an existing `path` is left as it was.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
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
    staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix(destination), suffix=".partial",
                                    dir=destination.parent))
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


@dataclass(frozen=True)
class Leftover:
    """A temporary of :mod:`aqrcmt.atomic` found in a folder, and its writer (None: not in the name, an older
    aqrcmt wrote it)."""
    path: Path
    pid: int | None
    host: str | None

    def writer(self) -> str:
        return f"pid {self.pid} on {self.host}" if self.pid is not None else "writer not recorded"


def find_leftovers(folder: PathLike, name: str | None = None) -> list[Leftover]:
    """The temporaries in `folder` beside the destination called `name` (None: beside any)."""
    found = []
    for path in sorted(Path(folder).glob(f".{'*' if name is None else glob.escape(name)}.*")):
        match = _WRITER.fullmatch(path.name)
        if match is not None and name in (None, match["name"]):
            found.append(Leftover(path, int(match["pid"]), match["host"]))
            continue
        match = _UNNAMED_WRITER.fullmatch(path.name)
        if match is not None and name in (None, match["name"]):
            found.append(Leftover(path, None, None))
    return found


def writer_running(leftover: Leftover) -> bool | None:
    """True when the leftover's writer runs (a process of that pid on this host), False when it does not, None
    when this process cannot tell (another host, or no writer recorded). A pid reused by another process since
    the writer died counts as running: such a leftover is kept, never one of a running writer removed."""
    if leftover.pid is None or leftover.host != socket.gethostname():
        return None
    try:
        os.kill(leftover.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # a process of another user: running
        pass
    return True


def prune_dead_leftovers(folder: PathLike, name: str | None = None, *,
                         exclusive: bool = False) -> tuple[list[Leftover], list[Leftover]]:
    """Remove the temporaries in `folder` (see :func:`find_leftovers`) whose writer is dead; returns (removed,
    kept).

    exclusive: the caller holds a lock that keeps every other writer out of `folder` (a run directory's), so the
    leftovers of writers it cannot check (another host, none recorded) are dead too; without it they are kept.
    """
    removed, kept = [], []
    for leftover in find_leftovers(folder, name):
        running = writer_running(leftover)
        if running or (running is None and not exclusive):
            kept.append(leftover)
            continue
        path = leftover.path
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(leftover)
    return removed, kept


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
