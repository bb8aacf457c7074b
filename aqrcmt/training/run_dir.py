"""Run-directory safety: a run directory that holds a run is never replaced or changed by accident.

- A directory *holds a run* when it has ``config.json`` or ``checkpoints/``. Training there needs ``--resume``
  (continue it) or ``--overwrite`` (start anew: the old directory is renamed to
  ``<output_dir>.replaced-<UTC time>``, never deleted, and only after the new run's config, data and weights
  were checked). ``--eval-only`` may read a used directory; it writes its results under ``eval/`` only.
- ``--resume`` compares the checkpoint's stored config with the current one (config + overrides) before
  anything is written: a difference outside :data:`CHANGEABLE_ON_RESUME` is refused, naming every field.
- ``config.json`` is written by :func:`claim_run_dir`, which the loop calls only after every check passed, so
  a refused or failed start leaves the directory as it was.
- One job per run directory: :class:`RunLock` holds an exclusive lock (``flock``) on ``.<name>.lock`` beside
  the directory for the life of the run; a second job is refused naming the holder (host, pid, start, command).
  A lock file left by a job that died is taken over (the kernel released its lock), with a line saying so.
"""
from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from aqrcmt.atomic import atomic_write_bytes
from aqrcmt.checkpoint.io import load_safetensors_metadata
from aqrcmt.config import Config, ConfigError
from aqrcmt.errors import AqrcmtError
from aqrcmt.overrides import config_from_dict

# Fields a resumed run may change (fnmatch patterns over dotted keys): the run's length, where it lives and what
# it logs, how often it checkpoints/evaluates and on which data it evaluates, how it loads data, and the
# health checks' measurement, levels and actions. Everything else (model, optimizer, schedule, training data,
# augmentation, batch size, seed, precision) shapes the trained state and must stay as the run began.
CHANGEABLE_ON_RESUME: tuple[str, ...] = (
    "train.epochs", "train.max_steps", "train.output_dir", "train.tracker", "train.log_every_steps",
    "train.checkpoint_every_steps", "train.checkpoint_every_minutes", "train.collective_timeout_minutes",
    "train.keep_last", "train.eval_*", "train.compile", "train.max_nonfinite_steps",
    "data.root", "data.index_cache_dir", "data.val_split", "data.info_pkl_val", "data.num_workers", "data.pin_memory",
    "train.health.*", "model.aqr.monitor.*",
)


class RunDirectoryError(AqrcmtError, ValueError):
    """A start that would replace or change an existing run, or a resume whose config does not match."""


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists()


def check_run_dir(run_dir: Path, *, resume: Optional[str], overwrite: bool, eval_only: bool) -> None:
    """Refuse to train in a directory that holds a run unless resuming it or told to overwrite it (reads only)."""
    if resume and overwrite:
        raise RunDirectoryError("--resume and --overwrite contradict each other: continue the run or replace it")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"train.output_dir {run_dir} is a file, not a directory")
    if holds_run(run_dir) and not (resume or overwrite or eval_only):
        raise RunDirectoryError(f"train.output_dir {run_dir} already holds a run (config.json or checkpoints/); "
                                f"continue it with --resume, replace it with --overwrite (the old directory is "
                                f"kept as {run_dir}.replaced-<time>), or choose another --output-dir")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()} \
            if tree else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_differences(stored: Config, current: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (``optim.lr_mults.img_neck`` for a table entry)."""
    before = _flatten(json.loads(stored.to_json()))
    after = _flatten(json.loads(current.to_json()))
    return sorted(k for k in before.keys() | after.keys() if before.get(k, "<absent>") != after.get(k, "<absent>"))


def check_resume_config(ckpt_dir: Path, cfg: Config) -> list[str]:
    """Compare the config stored in `ckpt_dir`'s weights with `cfg`; returns the changed fields that are
    allowed (:data:`CHANGEABLE_ON_RESUME`), raises RunDirectoryError naming the others."""
    weights = ckpt_dir / "model.safetensors"
    text = load_safetensors_metadata(weights).get("config")
    if text is None:
        raise RunDirectoryError(f"{weights}: no stored config; it was not written by the training loop")
    return check_stored_config(weights, text, cfg, f"--resume {ckpt_dir}")


def check_stored_config(source: Path, text: str, cfg: Config, action: str) -> list[str]:
    """Compare the config JSON `text` read from `source` with `cfg` (see :func:`check_resume_config`); `action`
    starts the refusal ("--resume DIR")."""
    try:
        stored = config_from_dict(json.loads(text))
    except (ValueError, ConfigError) as e:
        raise RunDirectoryError(f"{source}: its stored config does not load with this aqrcmt version ({e})") from None
    changed = config_differences(stored, cfg)
    refused = [k for k in changed if not any(fnmatch.fnmatchcase(k, p) for p in CHANGEABLE_ON_RESUME)]
    if refused:
        before, after = _flatten(stored.to_dict()), _flatten(cfg.to_dict())
        details = "; ".join(f"{k}: {before.get(k, '<absent>')!r} -> {after.get(k, '<absent>')!r}" for k in refused)
        raise RunDirectoryError(f"{action}: the config differs from the run's ({source}) in field(s) that may not "
                                f"change on resume: {details}. Fields that may change: "
                                f"{', '.join(CHANGEABLE_ON_RESUME)}")
    return changed


def claim_run_dir(run_dir: Path, cfg: Config, *, overwrite: bool, eval_only: bool) -> Optional[Path]:
    """Make `run_dir` this run's directory and write its config.json (main process, after every check passed).

    overwrite: a directory that holds a run is first renamed to ``<run_dir>.replaced-<UTC time>`` (returned).
    eval_only: config.json is written only into a directory that holds no run.
    """
    moved = None
    if overwrite and holds_run(run_dir):
        moved = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
        os.replace(run_dir, moved)
    if eval_only and holds_run(run_dir):
        return moved
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.json", cfg.to_json().encode())
    return moved


class RunLock:
    """The exclusive lock of one run directory (see the module doc); :meth:`acquire`, then :meth:`release`.

    `previous`: the holder recorded in a lock file that was left behind by a job that ended without releasing
    it (None when the file was new).
    """

    def __init__(self, path: Path, fd: int, previous: Optional[dict]):
        self.path, self.fd, self.previous = path, fd, previous

    @staticmethod
    def path_for(run_dir: Path) -> Path:
        run_dir = Path(os.path.abspath(run_dir))
        return run_dir.with_name(f".{run_dir.name}.lock")

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Lock `run_dir` (without waiting) and record this job in the lock file; RunDirectoryError naming the
        holder when another job has it."""
        path = cls.path_for(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirectoryError(f"train.output_dir {run_dir} is in use by another job ({_describe(holder)}, "
                                        f"lock {path}); wait for it to end or choose another --output-dir") from None
            try:
                same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)     # the holder released and removed the file between our open and lock: try again
        previous = _read_holder(fd)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return cls(path, fd, previous)

    def took_over(self) -> Optional[str]:
        """The line that says a stale lock was taken over, or None."""
        if self.previous is None:
            return None
        return f"took over the lock {self.path} left by a job that ended without releasing it " \
               f"({_describe(self.previous)})"

    def release(self) -> None:
        """Remove the lock file, then release the lock (a job waiting on the old file sees it gone and retries)."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _read_holder(fd: int) -> Optional[dict]:
    text = os.pread(fd, 65536, 0)
    if not text:
        return None
    try:
        return dict(json.loads(text))
    except (ValueError, TypeError):
        return {"unreadable lock file": text[:80].decode(errors="replace")}


def _describe(holder: Optional[dict]) -> str:
    if holder is None:
        return "holder not recorded"
    return ", ".join(f"{k} {v}" for k, v in holder.items())
