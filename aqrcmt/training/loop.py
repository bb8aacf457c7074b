"""The Accelerate training loop: data -> model.loss -> backward -> clip -> step, checkpoints, evaluation.

`train/main.py` parses the command line and calls :func:`train`, which reads top to bottom in the order a run
goes. One optimizer step reads ``optim.grad_accumulation`` batches per process; its effective batch is that
times ``data.batch_size`` times the number of processes. The loop's state that a resumed run continues from is
:class:`~aqrcmt.training.checkpointing.TrainingProgress` plus the weights, optimizer, schedule, loss scaler and
every process's RNG states; with ``data.num_workers = 0`` a resumed run repeats the uninterrupted one exactly.

The phases of :func:`train`:

0. :func:`build_accelerator` (process group and its timeout), :func:`lock_run_dir` (one job per directory);
1. :func:`setup`: run-directory checks (:mod:`aqrcmt.training.run_dir`), the resumed checkpoint's checksums
   and config (process count too), model (``--load-from``, frozen modules), optimizer, data (and
   :func:`check_val_split`), schedule, resumed state; only then config.json; ``accelerator.prepare`` -> a
   :class:`Run`;
2. per batch forward and backward; per accumulation group the optimizer step (:func:`optimizer_step`: clip,
   non-finite guard), the schedule, :func:`log_step`, the health checks, then what every process agrees on in
   :func:`step_end_requests`: a stop signal (:func:`stop_for_signal`: checkpoint, TrainingInterrupted), a
   mid-epoch checkpoint when due (steps or minutes), too many skipped bad samples;
3. at the end of an epoch (or of the run) :func:`save_checkpoint`, then - every ``train.eval_every_epochs``,
   after the epochs of ``train.eval_at_epochs`` and at the end - :func:`evaluate_checkpoint` (metrics.json
   beside the checkpoint, best/ by NDS, metrics_history.json): the epoch is on disk before the evaluation runs.

The run's length is ``train.epochs`` epochs, cut at ``train.max_steps`` when that is set; the learning-rate
schedule spans that length. A resumed run may change both: it continues to the new length, on the schedule
re-planned for it (the steps already taken keep the rates they had).

Health checks (:mod:`aqrcmt.training.alarms`) run on monitored steps (AQR signals, ``model.aqr.monitor``), logged
steps (loss) and after each evaluation (``train.health``); :func:`act_on_alarms` delivers them and applies
``train.health.on_alarm``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import time
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple, Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from aqrcmt.checkpoint.io import CheckpointError
from aqrcmt.checkpoint.weights import apply_required_settings, load_weights
from aqrcmt.config import Config, ConfigError
from aqrcmt.data import build_dataloader
from aqrcmt.data.files import BadSampleError, DatasetError
from aqrcmt.data.loader import EpochDataLoader, build_dataset
from aqrcmt.errors import AqrcmtError
from aqrcmt.eval.predict import predict_dataset
from aqrcmt.models import build_model
from aqrcmt.models.detector import CmtDetector, LossOutput
from aqrcmt.structures import Batch
from aqrcmt.training import checkpointing as ckpt
from aqrcmt.training import run_dir as run_dirs
from aqrcmt.training.alarms import (Alarm, AlarmDelivery, LossTrend, TrainingStopped, check_aqr_signals,
                                    check_evaluations)
from aqrcmt.training.interrupt import StopRequests, TrainingInterrupted, stop_requests
from aqrcmt.training.optim import freeze_and_build_optimizer
from aqrcmt.training.schedule import Schedule


@dataclass
class TrainOptions:
    """Command-line options that are not part of the experiment's config."""
    resume: Optional[str] = None               # "latest" or a checkpoint directory
    load_from: Optional[str] = None            # converted pretrained weights (.safetensors)
    allow_missing: list[str] = field(default_factory=list)      # fnmatch patterns
    allow_unexpected: list[str] = field(default_factory=list)
    eval_only: bool = False
    overwrite: bool = False                    # replace a run in output_dir (renamed aside, not deleted)


@dataclass
class TrainResult:
    run_dir: Path
    progress: ckpt.TrainingProgress
    last_checkpoint: Optional[Path]
    metrics: Optional[dict]                    # of the last evaluation, None when there was none


class LossModel(nn.Module):
    """Wraps the detector so that ``forward(batch, monitor)`` returns its :class:`LossOutput` (what DDP wraps)."""

    def __init__(self, detector: CmtDetector):
        super().__init__()
        self.detector = detector

    def forward(self, batch: Batch, monitor: bool = False) -> LossOutput:
        return self.detector.loss(batch, monitor=monitor)


class NonFiniteTrainingError(AqrcmtError, RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` non-finite steps in a row (the message names the last healthy
    step and checkpoint)."""


class ValidationSplitError(AqrcmtError, ValueError):
    """``data.val_split`` cannot be evaluated (found before the first training step)."""


@dataclass
class Run:
    """The objects of one training run, built by :func:`setup`, and the loop's running state."""
    cfg: Config
    accelerator: Accelerator
    detector: CmtDetector                      # unwrapped (what is saved, evaluated and monitored)
    model: Optional[nn.Module]                 # LossModel(detector) as prepared by Accelerate (DDP when multi-process);
                                               # None after close_run
    optimizer: torch.optim.Optimizer
    schedule: Schedule                         # spans the run's length: total_steps
    loader: EpochDataLoader
    batches_per_epoch: int                     # batches of an epoch that are used (whole accumulation groups only)
    progress: ckpt.TrainingProgress
    loss_trend: LossTrend
    alarms: AlarmDelivery
    resumed_from: Optional[Path]               # the checkpoint this run was resumed from
    resumed_rng: Optional[dict[str, Any]]      # this process's RNG state to continue from (resume), used once
    evaluation_wait: Optional[dist.ProcessGroup]   # evaluation_wait_group(): None with one process, after close_run
    stop: StopRequests = field(default_factory=StopRequests)   # the signals this process received
    last_checkpoint: Optional[Path] = None
    last_save_time: float = field(default_factory=time.monotonic)   # for train.checkpoint_every_minutes
    metrics: Optional[dict] = None             # of the last evaluation

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def done(self) -> bool:
        return self.progress.step >= self.total_steps or self.progress.epoch >= self.cfg.train.epochs

    def result(self) -> TrainResult:
        return TrainResult(self.run_dir, self.progress, self.last_checkpoint, self.metrics)


# ------------------------------------------------------------------------------------------------------
# Setup
# ------------------------------------------------------------------------------------------------------
def check_val_split(cfg: Config) -> int:
    """Fail before training when ``data.val_split`` cannot be evaluated: it must exist, hold samples and its first
    sample must load (the RNG streams are left as they were). Returns its sample count."""
    split = cfg.data.val_split
    try:
        with ckpt.preserved_rng():
            dataset = build_dataset(cfg, split, train=False)
            if len(dataset) == 0:
                raise ValueError("it has no samples")
            dataset[0]
            return len(dataset)
    except (ValueError, LookupError, OSError, RuntimeError) as error:
        raise ValidationSplitError(f"data.val_split {split!r} cannot be evaluated: {error} (checked before "
                                   f"training, so that no trained epoch is lost to it)") from error


def _with_evaluation(progress: ckpt.TrainingProgress, metrics: dict) -> None:
    """Count an evaluation in the progress: history entry and best NDS."""
    progress.history.append({k: metrics[k] for k in ("step", "epoch", "mAP", "NDS")})
    progress.best_nds = max(progress.best_nds, metrics["NDS"])


def _resumed_progress(ckpt_dir: Path, state: dict) -> ckpt.TrainingProgress:
    """The checkpoint's progress, with the evaluation of that checkpoint (its metrics.json, written after the
    checkpoint) counted."""
    progress = ckpt.TrainingProgress(**state["progress"])
    metrics = ckpt.stored_metrics(ckpt_dir)
    if metrics is not None and all(entry["step"] != metrics["step"] for entry in progress.history):
        _with_evaluation(progress, metrics)
    return progress


def build_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator; it starts the process group (with ``train.collective_timeout_minutes``), so it is
    built before anything else asks for the distributed state."""
    # An `accelerate launch --mixed_precision` / `accelerate config` setting wins over the config's. cpu=True without
    # CUDA: processes started by torchrun (`accelerate launch --multi_gpu`) then join a gloo group.
    mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or cfg.train.mixed_precision
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision 'fp16' needs a CUDA GPU: on the CPU Accelerate would run in fp32 "
                          "and say fp16; use 'no' (fp32) or 'bf16' (CPU autocast)")
    timeout = InitProcessGroupKwargs(backend=None,     # None: Accelerate's choice (NCCL with CUDA, else gloo)
                                     timeout=timedelta(minutes=cfg.train.collective_timeout_minutes))
    return Accelerator(mixed_precision=mixed_precision, log_with=cfg.train.tracker,
                       project_dir=cfg.train.output_dir, cpu=not torch.cuda.is_available(), kwargs_handlers=[timeout])


EVALUATION_WAIT_TIMEOUT = timedelta(days=7)   # longer than any evaluation: in effect no timer


def evaluation_wait_group(accelerator: Accelerator) -> Optional[dist.ProcessGroup]:
    """A gloo group of all processes in which the others wait for the main process's evaluation (one barrier,
    :func:`evaluate`), under :data:`EVALUATION_WAIT_TIMEOUT` instead of ``train.collective_timeout_minutes``:
    the devkit's time grows with the val split and is no hang. None with one process. Every process calls it
    (creating a group is collective)."""
    if accelerator.num_processes == 1:
        return None
    return dist.new_group(backend="gloo", timeout=EVALUATION_WAIT_TIMEOUT)


def lock_run_dir(accelerator: Accelerator, run_dir: Path) -> Optional[run_dirs.RunLock]:
    """The run directory's exclusive lock, held by the main process (the one that writes); every process raises
    the same RunDirectoryError when another job holds it."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = run_dirs.RunLock.acquire(run_dir)
        except run_dirs.RunDirectoryError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise run_dirs.RunDirectoryError(refusal)
    if lock is not None:
        if lock.took_over():
            accelerator.print(lock.took_over())
        stale = ckpt.prune_stale_temporaries(Path(run_dir))
        if stale:
            accelerator.print(f"removed {len(stale)} temporary file(s)/folder(s) left by an interrupted write: "
                              f"{', '.join(p.name for p in stale[:5])}")
    return lock


def check_resume_compatible(accelerator: Accelerator, cfg: Config, ckpt_dir: Path, manifest: dict) -> None:
    """Refuse to resume a checkpoint written by another number of processes (every process checks, before
    anything is written): the effective batch and the data order would change."""
    written = manifest.get("num_processes")
    now = accelerator.num_processes
    if written == now:
        return
    per_process = cfg.data.batch_size * cfg.optim.grad_accumulation
    written_batch = f"effective batch {per_process * written}" if isinstance(written, int) else "effective batch ?"
    raise run_dirs.RunDirectoryError(
        f"--resume {ckpt_dir}: the checkpoint was written by {written} process(es) ({written_batch}); this run has "
        f"{now} (effective batch {per_process * now}), which changes the effective batch and the data order. Resume "
        f"with {written} process(es), or start a new run from its weights: --load-from {ckpt_dir / 'model.safetensors'}"
        f" --output-dir NEW_DIR")


def adopt_required_settings(accelerator: Accelerator, cfg: Config, options: TrainOptions) -> None:
    """Set in `cfg` what the ``--load-from`` weights record that they need (a converted AQR-fork checkpoint:
    its tanh generator without type embeddings), before the model is built and config.json written."""
    if not options.load_from:
        return
    try:
        notes = apply_required_settings(cfg, options.load_from)
    except CheckpointError as error:
        raise CheckpointError(f"--load-from {error}") from None
    for note in notes:
        accelerator.print(f"--load-from {options.load_from} needs {note}")


def check_batch_per_process(cfg: Config) -> None:
    """ConfigError unless ``data.batch_size`` (per process) is at least ``cfg.min_batch_per_process()``."""
    if cfg.data.batch_size < cfg.min_batch_per_process():
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} with data.augment.modality_drop=true: a "
                          "LiDAR-dropped sample is one voxel, too few for the sparse encoder's BatchNorm in training; "
                          f"use data.batch_size >= {cfg.min_batch_per_process()} per process (or modality_drop=false)")


def setup(accelerator: Accelerator, cfg: Config, options: TrainOptions) -> Run:
    """Everything a run needs, with the resumed state loaded (see the module doc, phase 1)."""
    # ---- run directory and resumed checkpoint: checked before anything is written ----
    run_dir = Path(cfg.train.output_dir)
    run_dirs.check_run_dir(run_dir, resume=options.resume, overwrite=options.overwrite, eval_only=options.eval_only)
    resume_dir = ckpt.resolve_resume(run_dir, options.resume) if options.resume else None
    if resume_dir is not None:
        manifest = ckpt.verify_checkpoint(resume_dir)
        if not options.eval_only:
            run_dirs.check_resume_config(resume_dir, cfg)
            check_resume_compatible(accelerator, cfg, resume_dir, manifest)
    elif options.resume and options.eval_only:
        raise CheckpointError(f"--eval-only --resume {options.resume}: {run_dir} holds no checkpoint")
    elif options.resume and (run_dir / "config.json").is_file():   # stopped before its first checkpoint
        stored = run_dir / "config.json"
        run_dirs.check_stored_config(stored, stored.read_text(), cfg, f"--resume {options.resume}")
        accelerator.print(f"--resume {options.resume}: {run_dir} holds no checkpoint yet (the run stopped before "
                          f"its first); starting it from step 0 with the config of {stored}")
    set_seed(cfg.train.seed, device_specific=False)
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device.type}, mixed precision "
                      f"'{accelerator.mixed_precision}', run directory {run_dir}")
    # ---- model: pretrained weights, frozen modules (their BatchNorm stays in eval mode) ----
    detector = build_model(cfg.model)
    if options.load_from:
        try:
            report = load_weights(detector, options.load_from, allow_missing=options.allow_missing,
                                  allow_unexpected=options.allow_unexpected)
        except CheckpointError as error:
            raise CheckpointError(f"--load-from {error}; --allow-missing / --allow-unexpected PATTERN accept "
                                  f"keys") from None
        if report.kept_init:
            accelerator.print(f"--load-from: {len(report.kept_init)} tensors (e.g. {report.kept_init[0]}) are not "
                              f"in {options.load_from}; they keep their initialisation")
    optimizer = freeze_and_build_optimizer(detector, cfg.optim)

    # ---- data and schedule ----
    loader = build_dataloader(cfg, cfg.data.train_split, train=True, num_processes=accelerator.num_processes,
                              process_index=accelerator.process_index, seed=cfg.train.seed)
    if loader.dataset.num_empty_gt:
        accelerator.print(f"data.train_split {cfg.data.train_split!r}: {loader.dataset.num_empty_gt} samples without a "
                          f"GT box with LiDAR points of the detection classes are left out of training "
                          f"({len(loader.dataset)} remain)")
    loader.dataset.skip_log = run_dir / f"skipped_samples_rank{accelerator.process_index}.jsonl"
    accumulation = cfg.optim.grad_accumulation
    steps_per_epoch = len(loader) // accumulation
    if steps_per_epoch == 0:
        raise DatasetError(f"data.train_split {cfg.data.train_split!r}: {len(loader.dataset)} samples, "
                           f"{len(loader.sampler)} per process, make {len(loader)} whole batches of data.batch_size = "
                           f"{cfg.data.batch_size} per process, fewer than optim.grad_accumulation = {accumulation}; "
                           f"nothing to train on (lower data.batch_size or the number of processes)")
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    schedule = Schedule(optimizer, cfg.optim, total_steps)
    val_samples = check_val_split(cfg)
    epochs = -(-total_steps // steps_per_epoch)
    accelerator.print(f"data: {len(loader.dataset)} train samples ({cfg.data.train_split}), {val_samples} val samples "
                      f"({cfg.data.val_split}); batch {cfg.data.batch_size} per process x {accelerator.num_processes} "
                      f"process(es) x {accumulation} accumulated; {total_steps} steps = {epochs} epoch(s) of "
                      f"{steps_per_epoch}")

    # ---- resumed state (eval_only: the weights only) ----
    progress, resumed_rng, resumed_scaler = ckpt.TrainingProgress(), None, None
    if resume_dir is not None:
        model_state, state = ckpt.read_checkpoint(resume_dir)
        detector.load_state_dict(model_state, strict=True)
        if not options.eval_only:
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            if state["schedule"]["total_steps"] != total_steps:
                accelerator.print(f"the run's length changed from {state['schedule']['total_steps']} to "
                                  f"{total_steps} steps: the learning-rate schedule is re-planned for it")
            progress = _resumed_progress(resume_dir, state)
            resumed_scaler = state.get("scaler")
            resumed_rng = ckpt.read_rng_state(resume_dir, accelerator.process_index)
        accelerator.print(f"resumed from {resume_dir} (step {state['progress']['step']})")

    # ---- every check passed: config.json, trackers ----
    if accelerator.is_main_process:
        moved = run_dirs.claim_run_dir(run_dir, cfg, overwrite=options.overwrite, eval_only=options.eval_only)
        if moved is not None:
            accelerator.print(f"--overwrite: the previous run in {run_dir} was moved to {moved}")
    accelerator.wait_for_everyone()
    if cfg.train.tracker:  # TensorBoard writes to <run_dir>/tensorboard
        # a resumed run replaces what the interrupted one logged after its checkpoint (replayed steps once)
        init_kwargs = {"tensorboard": {"purge_step": progress.step + 1}} if resume_dir is not None else {}
        accelerator.init_trackers(cfg.train.tracker, config={"config": cfg.to_json()}, init_kwargs=init_kwargs)

    # ---- compile (default: on for CUDA) and prepare (DDP, mixed precision) ----
    if cfg.train.compile if cfg.train.compile is not None else accelerator.device.type == "cuda":
        # Dense submodules compiled in place: state_dict keys unchanged, the sparse LiDAR part stays eager.
        detector.compile_dense()
    model, optimizer = accelerator.prepare(LossModel(detector), optimizer)
    if resumed_scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resumed_scaler)
    return Run(cfg, accelerator, accelerator.unwrap_model(model).detector, model, optimizer, schedule, loader,
               steps_per_epoch * accumulation, progress, LossTrend(cfg.train.health),
               alarm_delivery(accelerator, cfg.train.tracker, run_dir), resumed_from=resume_dir,
               resumed_rng=resumed_rng, evaluation_wait=evaluation_wait_group(accelerator))


# ------------------------------------------------------------------------------------------------------
# Checkpoints and evaluation
# ------------------------------------------------------------------------------------------------------
def save_checkpoint(run: Run) -> Path:
    """A checkpoint of the current state (collective: every process contributes its RNG state)."""
    accelerator = run.accelerator
    rng_states = gather_object([ckpt.rng_state()]) if accelerator.num_processes > 1 else [ckpt.rng_state()]
    path = None
    if accelerator.is_main_process:
        training_state = {"optimizer": run.optimizer.state_dict(), "schedule": run.schedule.state_dict(),
                          "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None}
        try:
            path = ckpt.write_checkpoint(run.run_dir, model_state=run.detector.state_dict(),
                                         training_state=training_state, config_json=run.cfg.to_json(),
                                         progress=run.progress, keep_last=run.cfg.train.keep_last,
                                         rng_states=rng_states)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            free = shutil.disk_usage(run.run_dir).free / 2**20
            raise CheckpointError(f"disk full writing the checkpoint of step {run.progress.step} to "
                                  f"{run.run_dir / 'checkpoints'} ({error.filename}; {free:.0f} MiB free); its "
                                  f"temporary files were removed and {run.last_checkpoint or 'no checkpoint'} is "
                                  f"the last one. Free space, then --resume") from None
    accelerator.wait_for_everyone()
    path = Path(gather_object([str(path)])[0]) if accelerator.num_processes > 1 else path
    run.last_checkpoint, run.last_save_time = path, time.monotonic()
    accelerator.print(f"checkpoint saved: {path} (step {run.progress.step}, epoch {run.progress.epoch})")
    return path


def ensure_checkpoint(run: Run) -> Path:
    """The checkpoint of the current step: the one already written at this step, else a new one (collective)."""
    saved = run.last_checkpoint
    if saved is not None and saved.name == ckpt.checkpoint_name(run.progress.step):
        return saved
    return save_checkpoint(run)


def evaluate(accelerator: Accelerator, detector: nn.Module, cfg: Config, out_dir: Path,
             wait_group: Optional[dist.ProcessGroup]) -> dict:
    """Official nuScenes metrics of `detector` on cfg.data.val_split (every process takes part, all get them).

    Each process predicts its shard; the main process evaluates the gathered detections and writes the
    results file and the devkit's outputs to `out_dir`, while the others wait in a barrier of `wait_group`
    (:func:`evaluation_wait_group`), not under the collective timeout. The training RNG streams are left as
    they were (the data pipeline draws from them).
    """
    from aqrcmt.eval.nuscenes_eval import evaluate_detections

    loader = build_dataloader(cfg, cfg.data.val_split, train=False, num_processes=accelerator.num_processes,
                              process_index=accelerator.process_index, seed=cfg.train.seed)
    with ckpt.preserved_rng():
        local = predict_dataset(detector, loader, accelerator.device, autocast=accelerator.autocast,
                                progress=f"evaluate {cfg.data.val_split} ({out_dir.name})"
                                if accelerator.is_main_process else None)
    everything = gather_object(local) if accelerator.num_processes > 1 else local
    metrics: dict = {}
    if accelerator.is_main_process:
        unique = {meta.sample_token: (meta, det) for meta, det in everything}
        metrics = evaluate_detections([d for _, d in unique.values()], [m for m, _ in unique.values()],
                                      root=cfg.data.root, version=cfg.data.version, eval_set=cfg.data.val_split,
                                      output_dir=out_dir)
    if wait_group is None:
        return metrics
    dist.barrier(group=wait_group)
    return gather_object([metrics])[0]


def log_validation_pictures(run: Run, score_threshold: float = 0.3) -> None:
    """The BEV, camera and AQR pictures of the first validation sample to TensorBoard (main process, TensorBoard
    tracker only), tagged ``val_sample/<picture>`` at the current step."""
    from aqrcmt.data.collate import collate
    from aqrcmt.data.loader import build_dataset
    from aqrcmt.eval.visualize import predict_with_pictures

    if not run.accelerator.is_main_process or run.cfg.train.tracker != "tensorboard":
        return
    writer = run.accelerator.get_tracker("tensorboard", unwrap=True)

    def add_pictures(_meta, _detections, pictures: dict) -> None:
        for name, picture in pictures.items():
            writer.add_image(f"val_sample/{name}", picture, run.progress.step, dataformats="HWC")

    with ckpt.preserved_rng():
        batch = collate([build_dataset(run.cfg, run.cfg.data.val_split, train=False)[0]])
        predict_with_pictures(run.detector, [batch], run.accelerator.device, on_sample=add_pictures,
                              score_threshold=score_threshold)


def validation_scalars(metrics: dict) -> dict[str, float]:
    """The TensorBoard scalars of an evaluation: val/mAP, val/NDS, the five TP errors (val/mATE ...) and each
    class's AP and TP errors (val_class/AP/car, ...; undefined ones left out)."""
    from aqrcmt.eval.nuscenes_eval import TP_METRICS

    scalars = {f"val/{k}": float(metrics[k]) for k in ("mAP", "NDS", *TP_METRICS.values())}
    scalars.update({f"val_class/{k}": float(v) for k, v in metrics.items() if "/" in k and v is not None})
    return scalars


def evaluate_checkpoint(run: Run, path: Path) -> None:
    """Evaluate the current model, saved as checkpoint `path`: metrics.json beside it (a resume counts it from
    there), metrics_history.json, best/ by NDS. The devkit's files go to run_dir/eval/step_N."""
    accelerator, progress = run.accelerator, run.progress
    metrics = evaluate(accelerator, run.detector, run.cfg, run.run_dir / "eval" / ckpt.checkpoint_name(progress.step),
                       run.evaluation_wait)
    metrics = {**metrics, "step": progress.step, "epoch": progress.epoch}
    is_best = metrics["NDS"] > progress.best_nds
    _with_evaluation(progress, metrics)
    if accelerator.is_main_process:
        ckpt.write_metrics(path, {**metrics, "checkpoint": path.name})
        ckpt.write_metrics_history(run.run_dir, progress.history)
        if is_best:
            ckpt.update_best(run.run_dir, path)
    accelerator.wait_for_everyone()
    accelerator.log(validation_scalars(metrics), step=progress.step)
    log_validation_pictures(run)
    accelerator.print(f"eval at step {progress.step} (epoch {progress.epoch}): "
                      f"mAP {metrics['mAP']:.4f}  NDS {metrics['NDS']:.4f}")
    run.metrics = metrics


def evaluation_due(run: Run) -> bool:
    """Whether the state just reached (an epoch end, or the end of training) is evaluated."""
    return run.done or (run.progress.batches_in_epoch == 0 and run.cfg.train.evaluates_after(run.progress.epoch))


def finish_interrupted_evaluation(run: Run) -> None:
    """After a resume from a checkpoint that was due for evaluation but has no metrics.json (the evaluation
    failed or was interrupted after the checkpoint was saved), evaluate it now."""
    resumed = run.resumed_from
    if resumed is not None and run.progress.step > 0 and ckpt.stored_metrics(resumed) is None and evaluation_due(run):
        run.accelerator.print(f"{resumed} was saved but not evaluated; evaluating it first")
        evaluate_checkpoint(run, resumed)


# ------------------------------------------------------------------------------------------------------
# Parts of a step: the optimizer step, the non-finite count, logging
# ------------------------------------------------------------------------------------------------------
StepOutcome = Literal["stepped", "overflow", "nonfinite"]


def optimizer_step(run: Run, losses_finite: bool, last_loss: torch.Tensor) -> tuple[StepOutcome, torch.Tensor]:
    """Clip the accumulated gradients and step, unless some process saw a non-finite loss or gradient.

    Returns the outcome and the gradient norm: "stepped"; "overflow" (fp16: the loss scaler skipped the step
    itself and lowered its scale; not counted as non-finite); "nonfinite" (update skipped, counted by
    :func:`count_nonfinite_step`). The gradients are zeroed in every case.
    """
    accelerator, cfg = run.accelerator, run.cfg
    trainable = [p for p in run.detector.parameters() if p.requires_grad]
    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0
                                            else float("inf"))
    unhealthy = torch.tensor(float(not (losses_finite and bool(torch.isfinite(grad_norm)))),
                             device=accelerator.device)
    healthy = bool(accelerator.reduce(unhealthy, "max").item() == 0)   # every process healthy
    overflow = False
    if healthy or (accelerator.scaler is not None and bool(torch.isfinite(last_loss.detach()))):
        run.optimizer.step()  # fp16: the loss scaler skips an overflowing step itself and lowers the scale
        overflow = accelerator.optimizer_step_was_skipped
    run.optimizer.zero_grad(set_to_none=True)
    if overflow:
        return "overflow", grad_norm
    return ("stepped" if healthy else "nonfinite"), grad_norm


def count_nonfinite_step(run: Run) -> None:
    """Count a skipped non-finite step; raise NonFiniteTrainingError after ``train.max_nonfinite_steps`` in a row."""
    progress = run.progress
    progress.nonfinite_in_a_row += 1
    progress.nonfinite_total += 1
    run.accelerator.print(f"step {progress.step + 1}: non-finite loss or gradient, update skipped "
                          f"({progress.nonfinite_in_a_row} in a row, {progress.nonfinite_total} in total)")
    if progress.nonfinite_in_a_row >= run.cfg.train.max_nonfinite_steps:
        raise NonFiniteTrainingError(
            f"{progress.nonfinite_in_a_row} non-finite steps in a row; training stopped. Last healthy "
            f"step: {progress.last_healthy_step}; last checkpoint: {run.last_checkpoint or 'none written yet'}"
            + (f"; this run resumed from {run.resumed_from}" if run.resumed_from else ""))


AQR_SECTION = "aqr"   # the TensorBoard tag prefix of the AQR health signals and maps


@dataclass
class ThroughputWindow:
    """Samples (all processes) since the last logged step, for samples_per_s."""
    start: float = field(default_factory=time.perf_counter)
    samples: int = 0


def log_step(run: Run, output: LossOutput, grad_norm: torch.Tensor, window: ThroughputWindow,
             bar: tqdm) -> Optional[dict[str, float]]:
    """Losses by term, lr, grad norm, speed every ``train.log_every_steps``; the AQR health signals (and every
    ``monitor.image_interval`` steps their maps) when this step was monitored. Returns the logged scalars (the
    same on every process), None on steps that log none."""
    accelerator, cfg, step = run.accelerator, run.cfg, run.progress.step
    scalars = None
    if step % cfg.train.log_every_steps == 0 or step == run.total_steps:
        elapsed = time.perf_counter() - window.start
        scalars = {f"loss/{k}": accelerator.reduce(v.detach().float(), "mean").item()
                   for k, v in output.losses.items()}
        scalars.update({"loss/total": sum(scalars.values()), "lr": cfg.optim.lr * run.schedule.lr_factor(),
                        "grad_norm": float(grad_norm), "samples_per_s": window.samples / max(elapsed, 1e-9)})
        if torch.cuda.is_available():
            scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        accelerator.log(scalars, step=step)
        bar.set_postfix(loss=f"{scalars['loss/total']:.3f}", lr=f"{scalars['lr']:.2e}",
                        gnorm=f"{scalars['grad_norm']:.2f}")
        window.start, window.samples = time.perf_counter(), 0
    if output.monitor is not None:       # TensorBoard's "aqr" section: every AQR signal and the maps' picture
        accelerator.log({f"{AQR_SECTION}/{k}": v for k, v in output.monitor.items()}, step=step)
        if accelerator.is_main_process and (step - 1) % cfg.model.aqr.monitor.image_interval == 0:
            from aqrcmt.eval.visualize import render_aqr, save_png
            picture = render_aqr(run.detector.pts_bbox_head.aqr.monitor.last_view,
                                 point_cloud_range=cfg.model.lidar.voxel.point_cloud_range)
            save_png(picture, run.run_dir / "aqr_maps" / f"step_{step:08d}.png")
            if cfg.train.tracker == "tensorboard":
                accelerator.get_tracker("tensorboard", unwrap=True).add_image(f"{AQR_SECTION}/maps", picture, step,
                                                                               dataformats="HWC")
    return scalars


# ------------------------------------------------------------------------------------------------------
# Health checks: alarms and what they do
# ------------------------------------------------------------------------------------------------------
def alarm_delivery(accelerator: Accelerator, tracker: Optional[str], run_dir: Path) -> AlarmDelivery:
    """The delivery of the run's alarms (active on the main process: printed line, alarms.jsonl in the run
    directory, TensorBoard counts and text)."""
    def log_text(tag: str, text: str, step: int) -> None:
        if tracker == "tensorboard":
            accelerator.get_tracker("tensorboard", unwrap=True).add_text(tag, text, global_step=step)

    return AlarmDelivery(run_dir / "alarms.jsonl", active=accelerator.is_main_process, print_line=tqdm.write,
                         log_scalars=lambda values, step: accelerator.log(values, step=step), log_text=log_text)


def step_alarms(run: Run, output: LossOutput, logged: Optional[dict[str, float]]) -> list[Alarm]:
    """The checks of this step: AQR signals when it was monitored, the loss when it was logged."""
    step = run.progress.step
    alarms = check_aqr_signals(output.monitor, run.cfg.model.aqr.monitor, step) if output.monitor is not None else []
    if logged is not None:
        alarms += run.loss_trend.check(step, logged["loss/total"])
    return alarms


def act_on_alarms(run: Run, alarms: list[Alarm]) -> None:
    """Deliver `alarms` and act on those of level "alarm" per ``train.health.on_alarm`` ("checkpoint": save
    and go on; "stop": save, then raise TrainingStopped naming the alarm, its step and the checkpoint).

    Collective (every process calls it at the same steps): the main process's alarms decide (the AQR signals
    differ between processes), so every process saves and stops together.
    """
    accelerator, mode = run.accelerator, run.cfg.train.health.on_alarm
    run.alarms.deliver(alarms, run.progress.epoch)
    if mode == "warn":
        return
    first = next((a.line() for a in alarms if a.level == "alarm"), None)
    if accelerator.num_processes > 1:
        first = broadcast_object_list([first if accelerator.is_main_process else None])[0]
    if first is None:
        return
    saved = ensure_checkpoint(run)
    if mode == "stop":
        raise TrainingStopped(f"training stopped by the health monitor (train.health.on_alarm=stop): {first}. "
                              f"Checkpoint: {saved}; continue with --resume {saved}",
                              main_process=accelerator.is_main_process)
    accelerator.print(f"checkpoint {saved} saved for the alarm (train.health.on_alarm=checkpoint)")


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------
def epoch_batches(run: Run) -> Iterable[Batch]:
    """The rest of the current epoch's batches: the sampler set to the epoch (its order, the GT paste fade-out, the
    workers' seeds); on a mid-epoch resume the batches already trained on skipped without loading them, and the
    interrupted run's RNG streams restored right before the first batch."""
    run.loader.set_epoch(run.progress.epoch)
    skip = run.progress.batches_in_epoch
    batches = skip_first_batches(run.loader, skip) if skip else run.loader
    if run.resumed_rng is not None:
        ckpt.set_rng_state(run.resumed_rng)
        run.resumed_rng = None
    return batches


class StepEndRequests(NamedTuple):
    stop: Optional[signal.Signals]     # the signal that stops the run
    checkpoint_due: bool               # train.checkpoint_every_minutes passed since the last checkpoint
    skipped: int                       # bad training samples skipped so far, most of any process


def skipped_samples(run: Run) -> int:
    """Distinct training samples this process skipped as bad in the whole run (its skipped_samples file)."""
    path = run.loader.dataset.skip_log
    if path is None or not path.is_file():
        return 0
    return len({json.loads(line)["token"] for line in path.read_text().splitlines() if line.strip()})


def step_end_requests(run: Run) -> StepEndRequests:
    """What the loop must do after an optimizer step, the same on every process (one collective): a signal to
    any process stops all, the slowest clock decides a time-based checkpoint, the most skipped samples count."""
    minutes = run.cfg.train.checkpoint_every_minutes
    due = bool(minutes) and time.monotonic() - run.last_save_time >= minutes * 60
    flags = torch.tensor([run.stop.signum or 0, int(due), skipped_samples(run)], device=run.accelerator.device)
    signum, due, skipped = (int(v) for v in run.accelerator.reduce(flags, "max").tolist())
    return StepEndRequests(signal.Signals(signum) if signum else None, bool(due), skipped)


def check_skipped_samples(run: Run, skipped: int) -> None:
    """Stop (after a checkpoint) when a process skipped more than ``data.max_skipped_fraction`` of its share
    of the training samples."""
    share = len(run.loader.dataset) / run.accelerator.num_processes
    if skipped <= run.cfg.data.max_skipped_fraction * share:
        return
    saved = ensure_checkpoint(run)
    raise BadSampleError(f"{skipped} training samples failed to load, more than data.max_skipped_fraction = "
                         f"{run.cfg.data.max_skipped_fraction:g} of the {share:.0f} of a process; each is named with "
                         f"its reason in {run.run_dir}/skipped_samples_rank*.jsonl. Checkpoint {saved}: fix or "
                         f"remove the files (aqrcmt check-data lists them), then --resume")


def stop_for_signal(run: Run, signum: signal.Signals) -> None:
    """Write the checkpoint of the current step (unless written already) and raise TrainingInterrupted."""
    saved = ensure_checkpoint(run)
    raise TrainingInterrupted(f"interrupted by {signum.name} after step {run.progress.step}: checkpoint {saved}",
                              checkpoint=saved, main_process=run.accelerator.is_main_process)


def close_run(run: Run) -> None:
    """The ordered end of a run that every process reached together (finished, or stopped by an alarm or a
    signal): all processes meet, the prepared model and the evaluation's wait group are released, the trackers
    flush, then the process groups are destroyed.

    Released first because DDP's reducer holds the process group: a group whose last reference went only with
    the interpreter's shutdown was destroyed there, where the gloo group's destructor could wait forever for
    its worker threads (seen on the process of the second node of a 2-node run, which then never exited).
    """
    run.accelerator.wait_for_everyone()
    run.model = run.evaluation_wait = None
    run.accelerator.free_memory()       # Accelerate's own references to the prepared model, then gc
    run.accelerator.end_training()


def train(cfg: Config, options: TrainOptions) -> TrainResult:
    """Train (or, with ``options.eval_only``, evaluate) `cfg` in ``cfg.train.output_dir``; see the module doc.

    SIGTERM / SIGUSR1 / SIGINT stop the run after the current step with a checkpoint
    (:mod:`aqrcmt.training.interrupt`); raises TrainingStopped (alarm) or TrainingInterrupted (signal) after the
    run was closed on every process."""
    if not options.eval_only:
        check_batch_per_process(cfg)
    with stop_requests() as requests:
        accelerator = build_accelerator(cfg)
        lock = lock_run_dir(accelerator, Path(cfg.train.output_dir))
        try:
            adopt_required_settings(accelerator, cfg, options)
            run = setup(accelerator, cfg, options)
            run.stop = requests
            try:
                if options.eval_only:
                    run.metrics = evaluate(accelerator, run.detector, cfg, run.run_dir / "eval", run.evaluation_wait)
                    if accelerator.is_main_process:
                        ckpt.write_metrics(run.run_dir / "eval", run.metrics)
                else:
                    train_epochs(run)
            except TrainingStopped:     # every process raised it at the same step
                close_run(run)
                raise
            close_run(run)
        finally:
            if lock is not None:
                lock.release()
    return run.result()


def train_epochs(run: Run) -> None:
    """The epochs of the run from its current progress (see the module doc, phases 2 and 3)."""
    accelerator, cfg, progress, accumulation = run.accelerator, run.cfg, run.progress, run.cfg.optim.grad_accumulation
    bar = tqdm(total=run.total_steps, initial=progress.step, disable=not accelerator.is_main_process,
               desc="train", dynamic_ncols=True)
    window = ThroughputWindow()
    finish_interrupted_evaluation(run)
    with contextlib.closing(bar):
        while not run.done:
            batches = epoch_batches(run)
            run.model.train()            # the detector keeps its frozen modules' BatchNorm in eval mode
            losses_finite = True
            stop = None
            for batch in batches:
                if progress.batches_in_epoch >= run.batches_per_epoch:
                    break                # a tail of batches too short for a whole accumulation group

                # ---- forward and backward (gradients are synchronised on the group's last batch only) ----
                batch = batch.to(accelerator.device, non_blocking=True)
                sync = (progress.batches_in_epoch + 1) % accumulation == 0
                monitored = sync and progress.step % cfg.model.aqr.monitor.interval == 0
                with contextlib.nullcontext() if sync else accelerator.no_sync(run.model):
                    output = run.model(batch, monitor=monitored)
                    loss = sum(output.losses.values())
                    accelerator.backward(loss / accumulation)
                losses_finite = losses_finite and bool(torch.isfinite(loss.detach()))
                progress.batches_in_epoch += 1
                window.samples += batch.batch_size * accelerator.num_processes
                if not sync:
                    continue

                # ---- the optimizer step: clip, then step unless a process saw a non-finite loss or gradient ----
                outcome, grad_norm = optimizer_step(run, losses_finite, loss)
                losses_finite = True
                if outcome == "overflow":    # fp16: the loss scaler skipped the step and lowered its scale
                    continue
                if outcome == "nonfinite":   # skipped and counted; raises after train.max_nonfinite_steps in a row
                    count_nonfinite_step(run)
                    continue
                progress.nonfinite_in_a_row = 0
                progress.step += 1
                progress.last_healthy_step = progress.step
                run.schedule.step()
                bar.update(1)

                # ---- logging and health checks: the AQR signals on monitored steps, the loss on logged ones ----
                logged = log_step(run, output, grad_norm, window, bar)
                if output.monitor is not None or logged is not None:
                    act_on_alarms(run, step_alarms(run, output, logged))

                # ---- mid-epoch checkpoints: every N steps, every M minutes, on a signal (then stop) ----
                # (the epoch's last step is saved below, with the epoch counted)
                stop, minutes_due, skipped = step_end_requests(run)
                check_skipped_samples(run, skipped)
                epoch_ends = progress.batches_in_epoch >= run.batches_per_epoch
                if epoch_ends or progress.step >= run.total_steps:
                    break
                if stop is not None:
                    stop_for_signal(run, stop)
                every = cfg.train.checkpoint_every_steps
                if minutes_due or (every and progress.step % every == 0):
                    save_checkpoint(run)

            # ---- the end of an epoch (or of the run): checkpoint, then evaluation when due ----
            if progress.batches_in_epoch >= run.batches_per_epoch:
                progress.epoch += 1
                progress.batches_in_epoch = 0
            path = save_checkpoint(run)      # the epoch is on disk before anything can fail in evaluation
            if stop is not None:             # the resumed run evaluates it (finish_interrupted_evaluation)
                stop_for_signal(run, stop)
            if evaluation_due(run):
                evaluate_checkpoint(run, path)
                act_on_alarms(run, check_evaluations(progress.history, cfg.train.health))
            stop = step_end_requests(run).stop     # a signal during the evaluation
            if stop is not None and not run.done:
                stop_for_signal(run, stop)
