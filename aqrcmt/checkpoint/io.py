"""Crash-safe files: the package's one atomic writer, and the safetensors reader.

:func:`atomic_write` (used by every writer of the package: checkpoints, index and GT-database pickles)
puts the bytes in a temporary file in the destination's directory, fsyncs it, renames it over the
destination with ``os.replace`` (atomic on POSIX and Windows) and fsyncs the directory. A reader therefore
sees either the old file or the complete new one, never a partial write, and a failed write leaves an
existing destination untouched.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from aqrcmt.errors import AqrcmtError

PathLike = str | os.PathLike


class CheckpointError(AqrcmtError, ValueError):
    """A checkpoint file is unreadable, corrupt, or does not match the expected model."""


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
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else _default_file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _default_file_mode() -> int:
    """Mode of a newly created file under the current umask (mkstemp alone would give 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (no-op where directories cannot be opened, e.g. Windows)."""
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


def sha256_of(path: PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def pickle_atomic(obj: Any, path: PathLike) -> None:
    """``pickle.dump(obj)`` (highest protocol) to `path`, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write(path, write)


def torch_save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> tensor, any device/dtype) as a safetensors file with string `metadata`, atomically.

    Tensors are moved to the CPU and made contiguous; a tensor sharing storage with an earlier one (tied
    weights) is written as a copy, since safetensors stores no aliasing.
    """
    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata values must be str; got {bad}")
    cpu: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        cpu[name] = tensor.clone() if pointer in storages else tensor
        storages.add(pointer)
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=dict(metadata or {})))


def load_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: ``(tensors on the CPU, metadata)``. Raises :class:`CheckpointError` when corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, metadata


def load_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors."""
    try:
        with safe_open(Path(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def is_safetensors(path: PathLike) -> bool:
    """True when `path` starts like a safetensors file (a plausible header length followed by ``{``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_len < os.path.getsize(path)

