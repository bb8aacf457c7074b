"""The Accelerate training loop: data -> model.loss -> backward -> clip -> step, checkpoints, evaluation.

`train/main.py` parses the command line and calls :func:`train`. One optimizer step reads
``optim.grad_accumulation`` batches per process; its effective batch is that times ``data.batch_size`` times
the number of processes. The loop's state that a resumed run continues from is
:class:`~aqrcmt.training.checkpointing.TrainingProgress` plus the weights, optimizer, schedule, loss scaler and
every process's RNG states; with ``data.num_workers = 0`` a resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from aqrcmt.checkpoint.io import CheckpointError, load_safetensors
from aqrcmt.config import Config
from aqrcmt.data import build_dataloader
from aqrcmt.models import build_model
from aqrcmt.structures import Batch, Detections
from aqrcmt.training import checkpointing as ckpt
from aqrcmt.training.optim import apply_frozen_bn_eval, freeze_and_build_optimizer, frozen_module_prefixes
from aqrcmt.training.schedule import Schedule

AQR_PREFIX = "pts_bbox_head.aqr."


@dataclass
class TrainOptions:
    """Command-line options that are not part of the experiment's config."""
    resume: Optional[str] = None               # "latest" or a checkpoint directory
    load_from: Optional[str] = None            # converted pretrained weights (.safetensors)
    allow_missing: list[str] = field(default_factory=list)      # fnmatch patterns
    allow_unexpected: list[str] = field(default_factory=list)
    eval_only: bool = False
    stop_after_steps: int = 0                  # simulate an interruption (tests): stop, keep checkpoints


@dataclass
class TrainResult:
    run_dir: Path
    progress: ckpt.TrainingProgress
    last_checkpoint: Optional[Path]
    metrics: Optional[dict]                    # of the last evaluation, None when there was none


class LossModel(nn.Module):
    """Wraps the detector so that ``forward(batch)`` returns its loss dict (what DDP wraps)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.detector.loss(batch)


class NonFiniteTrainingError(RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` non-finite steps in a row."""


def load_pretrained(detector: nn.Module, path: str, allow_missing: list[str], allow_unexpected: list[str]) -> list[str]:
    """Load converted weights into `detector`; returns the AQR keys the file lacks (they keep their init).

    Any other missing or unexpected key, or a shape mismatch, raises CheckpointError unless the key matches
    one of the fnmatch patterns of `allow_missing` / `allow_unexpected`.
    """
    tensors, _ = load_safetensors(path)
    own = detector.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    wrong_shape = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own if k in tensors and tensors[k].shape != own[k].shape]
    aqr_missing = [k for k in missing if k.startswith(AQR_PREFIX)]
    bad_missing = [k for k in missing if k not in aqr_missing and not any(fnmatch.fnmatch(k, p) for p in allow_missing)]
    bad_unexpected = [k for k in unexpected if not any(fnmatch.fnmatch(k, p) for p in allow_unexpected)]
    if bad_missing or bad_unexpected or wrong_shape:
        raise CheckpointError(
            f"--load-from {path}: does not fit the model: {len(bad_missing)} missing {bad_missing[:10]}, "
            f"{len(bad_unexpected)} unexpected {bad_unexpected[:10]}, {len(wrong_shape)} wrong shapes "
            f"{wrong_shape[:10]} (use --allow-missing / --allow-unexpected PATTERN to accept)")
    detector.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    return aqr_missing


def _mixed_precision(cfg: Config) -> str:
    """An `accelerate launch --mixed_precision` / `accelerate config` setting wins over the config's."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or cfg.train.mixed_precision


def _should_compile(cfg: Config, device: torch.device) -> bool:
    return cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"


def _epoch_batches(loader: DataLoader, epoch: int, skip: int, seed: int, process_index: int) -> Iterable[Batch]:
    """The batches of `epoch` after the first `skip` (a mid-epoch resume), without loading the skipped ones.

    The sampler's order and the loader's worker seeds depend only on (seed, epoch, process), so a resumed
    run sees the same batches as the uninterrupted one.
    """
    loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(int(np.random.SeedSequence([seed, process_index, epoch]).generate_state(1)[0]))
    return skip_first_batches(loader, skip) if skip else loader


def data_config_for_epoch(cfg: Config, epoch: int) -> Config:
    """`cfg`, or a copy with GT paste switched off from ``data.augment.gt_paste_until_epoch`` on (the released
    recipe's "15e+5e": the last 5 of 20 epochs without GT paste)."""
    augment = cfg.data.augment
    if not (augment.gt_paste and augment.gt_paste_until_epoch and epoch >= augment.gt_paste_until_epoch):
        return cfg
    faded = copy.deepcopy(cfg)
    faded.data.augment.gt_paste = False
    return faded


def evaluate(accelerator: Accelerator, detector: nn.Module, cfg: Config, out_dir: Path) -> dict:
    """Official nuScenes metrics of `detector` on cfg.data.val_split (every process takes part, all get them).

    Writes the results file and the devkit's outputs to `out_dir`. The training RNG streams are left as
    they were (the data pipeline draws from them).
    """
    from aqrcmt.eval.nuscenes_eval import evaluate_detections

    loader = build_dataloader(cfg, cfg.data.val_split, train=False, num_processes=accelerator.num_processes,
                              process_index=accelerator.process_index, seed=cfg.train.seed)
    was_training = detector.training
    detector.eval()
    local: list[tuple] = []
    with ckpt.preserved_rng(), torch.no_grad():
        for batch in loader:
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                detections = detector.predict(batch)
            local += [(meta, Detections(d.boxes.float().cpu(), d.scores.float().cpu(), d.labels.cpu()))
                      for meta, d in zip(batch.metas, detections)]
    detector.train(was_training)
    everything = gather_object(local) if accelerator.num_processes > 1 else local
    metrics: dict = {}
    if accelerator.is_main_process:
        unique = {meta.sample_token: (meta, det) for meta, det in everything}
        metrics = evaluate_detections([d for _, d in unique.values()], [m for m, _ in unique.values()],
                                      root=cfg.data.root, version=cfg.data.version, eval_set=cfg.data.val_split,
                                      output_dir=out_dir)
    return gather_object([metrics])[0] if accelerator.num_processes > 1 else metrics


def train(cfg: Config, options: TrainOptions) -> TrainResult:
    """Train (or, with ``options.eval_only``, evaluate) `cfg` in ``cfg.train.output_dir``; see the module doc."""
    run_dir = Path(cfg.train.output_dir)
    # cpu=True without CUDA: processes started by torchrun (`accelerate launch --multi_gpu`) then join a gloo group
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), log_with=cfg.train.tracker,
                              project_dir=str(run_dir), cpu=not torch.cuda.is_available())
    set_seed(cfg.train.seed, device_specific=False)
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device.type}, mixed precision "
                      f"'{accelerator.mixed_precision}', run directory {run_dir}")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())
    if cfg.train.tracker:  # TensorBoard writes to <run_dir>/tensorboard
        accelerator.init_trackers(cfg.train.tracker, config={"config": cfg.to_json()})

    # ---- model, optimizer, data, schedule, resumed state -------------------------------------------------
    detector = build_model(cfg.model)
    if options.load_from:
        aqr_missing = load_pretrained(detector, options.load_from, options.allow_missing, options.allow_unexpected)
        if aqr_missing:
            accelerator.print(f"--load-from: {len(aqr_missing)} AQR tensors are not in {options.load_from}; "
                              f"they keep their initialisation")
    optimizer = freeze_and_build_optimizer(detector, cfg.optim)
    frozen = frozen_module_prefixes(cfg.optim)
    def train_loader(epoch: int) -> DataLoader:
        return build_dataloader(data_config_for_epoch(cfg, epoch), cfg.data.train_split, train=True,
                                num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                                seed=cfg.train.seed)

    loader = train_loader(0)
    accumulation = cfg.optim.grad_accumulation
    steps_per_epoch = len(loader) // accumulation
    if steps_per_epoch == 0:
        raise ValueError(f"data.train_split {cfg.data.train_split!r}: {len(loader)} batches per process, fewer than "
                         f"optim.grad_accumulation = {accumulation}; nothing to train on")
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    schedule = Schedule(optimizer, cfg.optim, total_steps)

    progress, resumed_rng, resumed_scaler = ckpt.TrainingProgress(), None, None
    if options.resume:
        ckpt_dir = ckpt.resolve_resume(run_dir, options.resume)
        model_state, state, resumed_rng = ckpt.read_checkpoint(ckpt_dir, accelerator.process_index)
        detector.load_state_dict(model_state, strict=True)
        if not options.eval_only:
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            progress = ckpt.TrainingProgress(**state["progress"])
            resumed_scaler = state.get("scaler")
        accelerator.print(f"resumed from {ckpt_dir} (step {state['progress']['step']})")

    if _should_compile(cfg, accelerator.device):
        # Dense submodules compiled in place: state_dict keys unchanged, the sparse LiDAR part stays eager.
        detector.compile_dense()
    model, optimizer = accelerator.prepare(LossModel(detector), optimizer)
    if resumed_scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resumed_scaler)
    unwrapped = accelerator.unwrap_model(model).detector
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]

    if options.eval_only:
        metrics = evaluate(accelerator, unwrapped, cfg, run_dir / "eval")
        if accelerator.is_main_process:
            ckpt.write_metrics(run_dir / "eval", metrics)
        accelerator.end_training()
        return TrainResult(run_dir, progress, None, metrics)

    # ---- checkpointing and evaluation ----------------------------------------------------------------------
    def save() -> Path:
        """A checkpoint of the current state (collective: every process contributes its RNG state)."""
        rng_states = gather_object([ckpt.rng_state()]) if accelerator.num_processes > 1 else [ckpt.rng_state()]
        path = None
        if accelerator.is_main_process:
            training_state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                              "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None}
            path = ckpt.write_checkpoint(run_dir, model_state=unwrapped.state_dict(), training_state=training_state,
                                         config_json=cfg.to_json(), progress=progress, keep_last=cfg.train.keep_last,
                                         rng_states=rng_states)
        accelerator.wait_for_everyone()
        return Path(gather_object([str(path)])[0]) if accelerator.num_processes > 1 else path

    def evaluate_and_save() -> tuple[Path, dict]:
        """Evaluate, then checkpoint (its progress holds this evaluation) with metrics.json beside it; the
        best checkpoint by NDS is copied to run_dir/best. The devkit's files go to run_dir/eval/step_N."""
        metrics = evaluate(accelerator, unwrapped, cfg, run_dir / "eval" / ckpt.checkpoint_name(progress.step))
        metrics = {**metrics, "step": progress.step, "epoch": progress.epoch}
        progress.history.append({k: metrics[k] for k in ("step", "epoch", "mAP", "NDS")})
        is_best = metrics["NDS"] > progress.best_nds
        progress.best_nds = max(progress.best_nds, metrics["NDS"])
        path = save()
        if accelerator.is_main_process:
            ckpt.write_metrics(path, {**metrics, "checkpoint": path.name})
            (run_dir / "metrics_history.json").write_text(json.dumps(progress.history, indent=2))
            if is_best:
                ckpt.update_best(run_dir, path)
        accelerator.wait_for_everyone()
        accelerator.log({"val/mAP": metrics["mAP"], "val/NDS": metrics["NDS"]}, step=progress.step)
        accelerator.print(f"eval at step {progress.step} (epoch {progress.epoch}): "
                          f"mAP {metrics['mAP']:.4f}  NDS {metrics['NDS']:.4f}")
        return path, metrics

    # ---- the loop ------------------------------------------------------------------------------------------
    aqr = getattr(unwrapped.pts_bbox_head, "aqr", None)
    monitor = cfg.model.aqr.monitor
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_main_process, desc="train",
               dynamic_ncols=True)
    last_ckpt, metrics = None, None
    done = progress.step >= total_steps or progress.epoch >= cfg.train.epochs
    window_start, window_samples = time.perf_counter(), 0
    loader_paste_faded = False
    while not done:
        paste_faded = data_config_for_epoch(cfg, progress.epoch) is not cfg
        if paste_faded != loader_paste_faded:  # GT paste switches off (the epoch length stays the same)
            loader, loader_paste_faded = train_loader(progress.epoch), paste_faded
        batches = _epoch_batches(loader, progress.epoch, progress.batches_in_epoch, cfg.train.seed,
                                 accelerator.process_index)
        if resumed_rng is not None:  # continue the random streams where the interrupted run saved them
            ckpt.set_rng_state(resumed_rng)
            resumed_rng = None
        model.train()
        apply_frozen_bn_eval(unwrapped, frozen)
        loss_finite = True
        for batch in batches:
            if progress.batches_in_epoch >= steps_per_epoch * accumulation:
                break  # a tail of batches too short for a whole accumulation group
            batch = batch.to(accelerator.device, non_blocking=True)
            sync = (progress.batches_in_epoch + 1) % accumulation == 0
            monitored = aqr is not None and sync and progress.step % monitor.interval == 0
            if aqr is not None:
                aqr.monitor_this_step = monitored
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                losses = model(batch)
                loss = sum(losses.values())
                accelerator.backward(loss / accumulation)
            loss_finite = loss_finite and bool(torch.isfinite(loss.detach()))
            progress.batches_in_epoch += 1
            window_samples += batch.batch_size * accelerator.num_processes
            if not sync:
                continue

            # ---- one optimizer step: clip, skip non-finite updates, step the schedule ----
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0
                                                    else float("inf"))
            healthy = torch.tensor(float(loss_finite and bool(torch.isfinite(grad_norm))), device=accelerator.device)
            healthy = bool(accelerator.reduce(healthy, "min").item() > 0)
            loss_finite = True
            scaler_overflow = False
            if healthy or (accelerator.scaler is not None and bool(torch.isfinite(loss.detach()))):
                optimizer.step()  # fp16: the loss scaler skips an overflowing step itself and lowers the scale
                scaler_overflow = accelerator.optimizer_step_was_skipped
            optimizer.zero_grad(set_to_none=True)
            if scaler_overflow:
                continue
            if not healthy:
                progress.nonfinite_in_a_row += 1
                progress.nonfinite_total += 1
                accelerator.print(f"step {progress.step + 1}: non-finite loss or gradient, update skipped "
                                  f"({progress.nonfinite_in_a_row} in a row, {progress.nonfinite_total} in total)")
                if progress.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    bar.close()
                    raise NonFiniteTrainingError(
                        f"{progress.nonfinite_in_a_row} non-finite steps in a row; training stopped. Last healthy "
                        f"step: {progress.last_healthy_step}; last checkpoint: {last_ckpt or 'none written yet'}")
                continue
            progress.nonfinite_in_a_row = 0
            progress.step += 1
            progress.last_healthy_step = progress.step
            schedule.step()
            bar.update(1)

            # ---- monitoring ----
            if progress.step % cfg.train.log_every_steps == 0 or progress.step == total_steps:
                elapsed = time.perf_counter() - window_start
                scalars = {f"loss/{k}": accelerator.reduce(v.detach().float(), "mean").item() for k, v in losses.items()}
                scalars.update({"loss/total": sum(scalars.values()), "lr": cfg.optim.lr * schedule.lr_factor(),
                                "grad_norm": float(grad_norm), "samples_per_s": window_samples / max(elapsed, 1e-9)})
                if torch.cuda.is_available():
                    scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                accelerator.log(scalars, step=progress.step)
                bar.set_postfix(loss=f"{scalars['loss/total']:.3f}", lr=f"{scalars['lr']:.2e}",
                                gnorm=f"{scalars['grad_norm']:.2f}")
                window_start, window_samples = time.perf_counter(), 0
            if monitored:
                accelerator.log({f"aqr/{k}": v for k, v in aqr.last_stats.items()}, step=progress.step)
                if accelerator.is_main_process and (progress.step - 1) % monitor.image_interval == 0:
                    aqr.save_images(run_dir / "aqr_maps" / f"step_{progress.step:08d}.png")

            # ---- checkpoints (the epoch's last step is saved below, with the epoch counted) ----
            epoch_ends = progress.batches_in_epoch >= steps_per_epoch * accumulation
            if cfg.train.checkpoint_every_steps and progress.step % cfg.train.checkpoint_every_steps == 0 \
                    and not epoch_ends and progress.step < total_steps:
                last_ckpt = save()
            if options.stop_after_steps and progress.step >= options.stop_after_steps:
                bar.close()
                accelerator.end_training()
                return TrainResult(run_dir, progress, last_ckpt, None)
            if progress.step >= total_steps:
                done = True
                break

        if progress.batches_in_epoch >= steps_per_epoch * accumulation:
            progress.epoch += 1
            progress.batches_in_epoch = 0
        done = done or progress.epoch >= cfg.train.epochs
        every = cfg.train.eval_every_epochs
        if done or (every and progress.batches_in_epoch == 0 and progress.epoch % every == 0):
            last_ckpt, metrics = evaluate_and_save()
        else:
            last_ckpt = save()
    bar.close()
    accelerator.end_training()
    return TrainResult(run_dir, progress, last_ckpt, metrics)
