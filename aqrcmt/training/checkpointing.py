"""Training checkpoints: safetensors weights + optimizer/schedule/scaler/RNG state, crash-safe.

Layout of a run directory::

    run_dir/config.json                      resolved config of the run
    run_dir/checkpoints/step_00000120/       one checkpoint
        model.safetensors                    weights (metadata: config JSON, step, epoch)
        training_state.pt                    optimizer, schedule, scaler, counters
        rng_rank{K}.pt                       RNG states of process K (torch, numpy, python)
        metrics.json                         written when this checkpoint was evaluated
    run_dir/checkpoints/latest               name of the newest complete checkpoint
    run_dir/best/                            copy of the checkpoint with the best NDS

A checkpoint is assembled in a temporary directory and renamed into place; only then is ``latest``
rewritten (atomically). A crash at any point leaves ``latest`` naming a complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from aqrcmt.checkpoint.io import (CheckpointError, atomic_write_bytes, load_safetensors, save_safetensors_atomic,
                                  torch_save_atomic)

LATEST = "latest"


@dataclass
class TrainingProgress:
    """Counters that a resumed run continues from."""
    step: int = 0                 # optimizer steps done
    epoch: int = 0                # current epoch (0-based)
    batches_in_epoch: int = 0     # batches of `epoch` already consumed (a mid-epoch checkpoint)
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    best_nds: float = -1.0
    last_healthy_step: int = 0
    history: list[dict] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (CPU, and CUDA when available), numpy, python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (e.g. an evaluation) without changing the RNG streams that training continues from."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def write_checkpoint(run_dir: Path, *, model_state: dict[str, torch.Tensor], training_state: dict[str, Any],
                     config_json: str, progress: TrainingProgress, keep_last: int,
                     rng_states: Sequence[dict[str, Any]] = ()) -> Path:
    """Write a complete checkpoint directory atomically and point ``latest`` at it (main process only).

    rng_states: one RNG state per process (index = process rank), written as ``rng_rank{K}.pt``.
    """
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(progress.step)
    tmp = ckpt_root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    metadata = {"config": config_json, "step": str(progress.step), "epoch": str(progress.epoch), "format": "aqrcmt"}
    save_safetensors_atomic(model_state, tmp / "model.safetensors", metadata)
    torch_save_atomic({**training_state, "progress": dataclasses.asdict(progress)}, tmp / "training_state.pt")
    for rank, state in enumerate(rng_states):
        torch_save_atomic(state, tmp / f"rng_rank{rank}.pt")
    if final.exists():  # the same step written again: move the old copy aside first, delete it after the swap
        os.replace(final, ckpt_root / f".{final.name}.old-{os.getpid()}")
    os.replace(tmp, final)
    atomic_write_bytes(ckpt_root / LATEST, final.name.encode())
    _prune(ckpt_root, keep_last, protect=final.name)
    return final


def _prune(ckpt_root: Path, keep_last: int, protect: str) -> None:
    if keep_last <= 0:
        return
    complete = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in complete[:-keep_last]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in [*ckpt_root.glob(".step_*.tmp-*"), *ckpt_root.glob(".step_*.old-*")]:  # left by a crash
        shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """``resume`` is "latest" (the run directory's newest complete checkpoint) or a checkpoint directory."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "training_state.pt").is_file():
            raise CheckpointError(f"--resume {path}: not a checkpoint directory (no training_state.pt)")
        return path
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'} (missing '{LATEST}')")
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"--resume latest: {pointer} names {path.name}, which is incomplete or deleted")
    return path


def read_checkpoint(ckpt_dir: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], Optional[dict]]:
    """(model state, training state, this process's RNG state or None)."""
    tensors, _ = load_safetensors(ckpt_dir / "model.safetensors")
    training_state = torch.load(ckpt_dir / "training_state.pt", map_location="cpu", weights_only=False)
    rng_file = ckpt_dir / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    return tensors, training_state, rng


def write_metrics(ckpt_dir: Path, metrics: dict) -> None:
    atomic_write_bytes(ckpt_dir / "metrics.json", json.dumps(metrics, indent=2).encode())


def update_best(run_dir: Path, ckpt_dir: Path) -> None:
    """Copy `ckpt_dir` to run_dir/best (assembled beside it, then swapped in)."""
    tmp = run_dir / f".best.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt_dir, tmp)
    old = run_dir / f".best.old-{os.getpid()}"
    best = run_dir / "best"
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
