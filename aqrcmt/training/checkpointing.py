"""Training checkpoints: safetensors weights + optimizer/schedule/scaler/RNG state, crash-safe.

Layout of a run directory::

    run_dir/config.json                      resolved config of the run
    run_dir/metrics_history.json             every evaluation of the run (step, epoch, mAP, NDS)
    run_dir/checkpoints/step_00000120/       one checkpoint
        model.safetensors                    weights (metadata: config JSON, step, epoch)
        training_state.pt                    optimizer, schedule, scaler, counters (tensors and plain values)
        rng_rank{K}.pt                       RNG states of process K (torch, numpy, python; tensors and ints)
        checksums.json                       sha256 of each file above, written last
        metrics.json                         written after this checkpoint was evaluated
    run_dir/checkpoints/latest               name of the newest complete checkpoint
    run_dir/best/                            copy of the checkpoint with the best NDS

A checkpoint is assembled in a staged directory (:func:`aqrcmt.atomic.staged_directory`) and renamed into
place; only then is ``latest`` rewritten (atomically). A crash at any point leaves ``latest`` naming a complete
checkpoint.

Reading is checked: every file listed in ``checksums.json`` must have its recorded sha256 (a corrupted or
modified file is refused, naming it), and the ``.pt`` files are loaded with ``torch.load(weights_only=True)``,
which builds tensors and plain containers only and never runs code from the file.
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from aqrcmt.atomic import atomic_write_bytes, prune_dead_leftovers, staged_directory
from aqrcmt.checkpoint.io import (CHECKSUMS, CheckpointError, load_safetensors, save_safetensors_atomic, sha256_of,
                                  torch_save_atomic, verify_checksums)

LATEST = "latest"
CHECKPOINT_FORMAT = 2          # 1: no checksums.json, pickled RNG/training state (refused on resume)


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
    """This process's RNG states (torch CPU, and CUDA when available; numpy; python) as tensors and plain values,
    so that they load with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(int(v) for v in python_state["state"].tolist()),
                     python_state["gauss_next"]))
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
    final = ckpt_root / checkpoint_name(progress.step)
    metadata = {"config": config_json, "step": str(progress.step), "epoch": str(progress.epoch), "format": "aqrcmt"}
    with staged_directory(final, replace=True) as staging:   # the same step written again replaces the old copy
        save_safetensors_atomic(model_state, staging / "model.safetensors", metadata)
        torch_save_atomic({**training_state, "progress": dataclasses.asdict(progress)}, staging / "training_state.pt")
        for rank, state in enumerate(rng_states):
            torch_save_atomic(state, staging / rng_file_name(rank))
        _write_checksums(staging, num_processes=len(rng_states))   # last: its presence marks a complete checkpoint
    atomic_write_bytes(ckpt_root / LATEST, final.name.encode())
    _prune(ckpt_root, keep_last, protect=final.name)
    return final


def _prune(ckpt_root: Path, keep_last: int, protect: str) -> None:
    if keep_last > 0:
        complete = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
        for old in complete[:-keep_last]:
            if old.name != protect:
                shutil.rmtree(old, ignore_errors=True)
    prune_stale_temporaries(ckpt_root.parent)


def prune_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporaries that dead writers left in `run_dir` and its checkpoints/ (staged folders and
    temporary files: :func:`aqrcmt.atomic.prune_dead_leftovers`); returns them. Only while this job holds the
    run directory's lock: no other job writes there, so leftovers of writers on other hosts are dead too."""
    return [leftover.path for folder in (run_dir, run_dir / "checkpoints")
            for leftover in prune_dead_leftovers(folder, exclusive=True)[0]]


def rng_file_name(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _write_checksums(ckpt_dir: Path, num_processes: int) -> None:
    files = {p.name: sha256_of(p) for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    manifest = {"format": CHECKPOINT_FORMAT, "num_processes": num_processes, "sha256": files}
    atomic_write_bytes(ckpt_dir / CHECKSUMS, json.dumps(manifest, indent=2).encode())


def verify_checkpoint(ckpt_dir: Path) -> dict:
    """Check every file of `ckpt_dir` against its ``checksums.json``; returns the manifest.

    Raises CheckpointError naming the missing or corrupted file, or the missing manifest (a checkpoint of
    an older aqrcmt version, or not a checkpoint).
    """
    if not (ckpt_dir / CHECKSUMS).is_file():
        raise CheckpointError(f"{ckpt_dir}: no {CHECKSUMS}; not a checkpoint of this aqrcmt version (format "
                              f"{CHECKPOINT_FORMAT}) or not a complete one, so it cannot be resumed with checks; "
                              f"its weights still load with --load-from {ckpt_dir / 'model.safetensors'}")
    try:
        return verify_checksums(ckpt_dir)
    except CheckpointError as error:
        raise CheckpointError(f"{error}. Resume from another checkpoint (--resume {ckpt_dir.parent}/step_...)") \
            from None


def resolve_resume(run_dir: Path, resume: str) -> Optional[Path]:
    """The checkpoint that ``--resume`` names: "latest" (the run directory's newest complete checkpoint), "auto"
    (the same, when there is one) or a checkpoint directory.

    None when the run has no checkpoint yet: "auto" always, "latest" when ``config.json`` is there (the run
    stopped before its first checkpoint); the run then starts from step 0.
    """
    if resume not in ("latest", "auto"):
        path = Path(resume)
        if not (path / "training_state.pt").is_file():
            raise CheckpointError(f"--resume {path}: not a checkpoint directory (no training_state.pt)")
        return path
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        if resume == "auto" or (run_dir / "config.json").is_file():
            return None
        raise CheckpointError(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'} (missing '{LATEST}') "
                              f"and no config.json in {run_dir}; --resume auto starts a run that is not there")
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"--resume {resume}: {pointer} names {path.name}, which is incomplete or deleted")
    return path


def _load_plain(path: Path) -> Any:
    """A ``.pt`` file of tensors and plain containers (no code runs: ``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's refusal or a damaged archive: one message naming the file
        raise CheckpointError(f"{path}: not a loadable training state ({type(e).__name__}: {e})") from None


def read_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, training state) of a checkpoint verified by :func:`verify_checkpoint`."""
    verify_checkpoint(ckpt_dir)
    tensors, _ = load_safetensors(ckpt_dir / "model.safetensors")
    return tensors, _load_plain(ckpt_dir / "training_state.pt")


def read_rng_state(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    """The RNG state that process `rank` saved in a (verified) checkpoint; CheckpointError when it has none
    (the checkpoint was written by fewer processes)."""
    path = ckpt_dir / rng_file_name(rank)
    if not path.is_file():
        written = json.loads((ckpt_dir / CHECKSUMS).read_text()).get("num_processes", "?")
        raise CheckpointError(f"{path} is missing: the checkpoint holds the RNG states of {written} process(es), "
                              f"so process {rank} cannot continue its random streams exactly; resume with "
                              f"{written} process(es)")
    return _load_plain(path)


def stored_metrics(ckpt_dir: Path) -> Optional[dict]:
    """The metrics.json written after `ckpt_dir` was evaluated, or None."""
    path = ckpt_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_metrics(ckpt_dir: Path, metrics: dict) -> None:
    atomic_write_bytes(ckpt_dir / "metrics.json", json.dumps(metrics, indent=2).encode())


def write_metrics_history(run_dir: Path, history: list[dict]) -> None:
    """run_dir/metrics_history.json: every evaluation of the run (step, epoch, mAP, NDS; oldest first)."""
    atomic_write_bytes(run_dir / "metrics_history.json", json.dumps(history, indent=2).encode())


def update_best(run_dir: Path, ckpt_dir: Path) -> None:
    """Copy `ckpt_dir` to run_dir/best (assembled beside it, then swapped in)."""
    with staged_directory(run_dir / "best", replace=True) as staging:
        shutil.copytree(ckpt_dir, staging, dirs_exist_ok=True)
