"""Tensor files: safetensors and ``torch.save`` files written through the atomic writer (:mod:`aqrcmt.atomic`),
safetensors files read back with errors naming the file, a file's sha256 and a checkpoint directory's
``checksums.json`` check.

Writes go through Python file objects, so a full disk is an ``OSError`` (ENOSPC) naming the file, and the
temporary file is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from aqrcmt.atomic import PathLike, atomic_write
from aqrcmt.errors import AqrcmtError


CHECKSUMS = "checksums.json"     # in a checkpoint directory: {"format", "num_processes", "sha256": {file: hex}}


class CheckpointError(AqrcmtError, ValueError):
    """A checkpoint file is unreadable, corrupt, or does not match the expected model."""


def verify_checksums(ckpt_dir: Path) -> dict:
    """Check every file listed in `ckpt_dir`'s ``checksums.json`` against its sha256; returns the manifest.
    CheckpointError names the unreadable manifest or the missing or modified file."""
    manifest_file = ckpt_dir / CHECKSUMS
    try:
        manifest = json.loads(manifest_file.read_text())
        recorded = dict(manifest["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_file}: not a readable checksum manifest ({e})") from None
    for name, expected in recorded.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {CHECKSUMS} but missing; the checkpoint is incomplete")
        if sha256_of(path) != expected:
            raise CheckpointError(f"{path}: sha256 differs from {manifest_file}; the file is corrupted or was "
                                  f"modified after it was written")
    return manifest


def _write_through_file(path: PathLike, write: Any) -> None:
    """``atomic_write`` with ``write(file_object)``; an OSError (e.g. disk full) names `path`."""
    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    try:
        atomic_write(path, to_file)
    except OSError as e:
        if e.filename is not None or e.strerror is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


def sha256_of(path: PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    _write_through_file(path, lambda f: torch.save(obj, f))


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
    data = save(cpu, metadata=dict(metadata or {}))
    _write_through_file(path, lambda f: f.write(data))


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

