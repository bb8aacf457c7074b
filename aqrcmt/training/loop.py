"""The Accelerate training loop: data -> model.loss -> backward -> clip -> step, checkpoints, evaluation.

`train/main.py` parses the command line and calls :func:`train`. Everything that runs per step is in
:func:`train` itself so the loop reads top to bottom; the helpers below do one thing each.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from aqrcmt.checkpoint.io import CheckpointError, load_safetensors
from aqrcmt.config import Config
from aqrcmt.data import build_dataloader
from aqrcmt.data.batch import Batch
from aqrcmt.models import build_model
from aqrcmt.training import checkpointing as ckpt
from aqrcmt.training.optim import apply_frozen_bn_eval, freeze_and_build_optimizer, frozen_module_prefixes
from aqrcmt.training.schedule import Schedule

log = logging.getLogger("aqrcmt.train")

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
    metrics: Optional[dict]


class LossModel(nn.Module):
    """Wraps the detector so that ``forward(batch)`` returns its loss dict (what DDP/compile need)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.detector.loss(batch)


class NonFiniteTrainingError(RuntimeError):
    """Raised after `train.max_nonfinite_steps` non-finite steps in a row."""


def load_pretrained(detector: nn.Module, path: str, allow_missing: list[str], allow_unexpected: list[str]) -> list[str]:
    """Load converted weights (non-strict). AQR weights may be missing (reported, kept at their init);
    any other missing or unexpected key is an error unless it matches an allow pattern. Returns the
    missing AQR keys."""
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
    """An `accelerate launch`/`accelerate config` setting wins over the config's."""
    import os
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or cfg.train.mixed_precision


def _should_compile(cfg: Config, device: torch.device) -> bool:
    return cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"


def evaluate(accelerator: Accelerator, detector: nn.Module, cfg: Config, out_dir: Path) -> dict:
    """Official nuScenes metrics of `detector` on cfg.data.val_split (all processes take part)."""
    from aqrcmt.eval.nuscenes_eval import evaluate_detections

    loader = build_dataloader(cfg, cfg.data.val_split, train=False, num_processes=accelerator.num_processes,
                              process_index=accelerator.process_index, seed=cfg.train.seed)
    detector.eval()
    local = []
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                dets = detector.predict(batch)
            local += [(meta, det) for meta, det in zip(batch.metas, dets)]
    everything = gather_object([(m, type(d)(*(t.float().cpu() for t in (d.boxes, d.scores, d.labels))))
                                for m, d in local])
    metrics: dict = {}
    if accelerator.is_main_process:
        unique = {m.sample_token: (m, d) for m, d in everything}  # distributed padding repeats samples
        metas = [m for m, _ in unique.values()]
        dets = [d for _, d in unique.values()]
        metrics = evaluate_detections(dets, metas, root=cfg.data.root, version=cfg.data.version,
                                      eval_set=cfg.data.val_split, output_dir=out_dir)
    return gather_object([metrics])[0] if accelerator.num_processes > 1 else metrics


def train(cfg: Config, options: TrainOptions) -> TrainResult:
    run_dir = Path(cfg.train.output_dir)
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), gradient_accumulation_steps=cfg.optim.grad_accumulation,
                              log_with=cfg.train.tracker, project_dir=str(run_dir))
    set_seed(cfg.train.seed, device_specific=False)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())
        if cfg.train.tracker:
            accelerator.init_trackers("aqrcmt", config={"config": cfg.to_json()})

    detector = build_model(cfg.model)
    if options.load_from:
        aqr_missing = load_pretrained(detector, options.load_from, options.allow_missing, options.allow_unexpected)
        if aqr_missing:
            accelerator.print(f"--load-from: {len(aqr_missing)} AQR tensors not in the file, initialised fresh")
    optimizer = freeze_and_build_optimizer(detector, cfg.optim)
    frozen = frozen_module_prefixes(cfg.optim)
    loader = build_dataloader(cfg, cfg.data.train_split, train=True, num_processes=accelerator.num_processes,
                              process_index=accelerator.process_index, seed=cfg.train.seed)
    steps_per_epoch = max(len(loader) // cfg.optim.grad_accumulation, 1)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    schedule = Schedule(optimizer, cfg.optim, total_steps)

    progress = ckpt.TrainingProgress()
    if options.resume:
        ckpt_dir = ckpt.resolve_resume(run_dir, options.resume)
        model_state, state, rng = ckpt.read_checkpoint(ckpt_dir, accelerator.process_index)
        detector.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        progress = ckpt.TrainingProgress(**state["progress"])
        accelerator.print(f"resumed from {ckpt_dir} at step {progress.step}")

    model = LossModel(detector)
    model, optimizer = accelerator.prepare(model, optimizer)
    if options.resume and state.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if _should_compile(cfg, accelerator.device):
        model = torch.compile(model)
    unwrapped = accelerator.unwrap_model(model).detector

    def save(final_of_epoch: bool = False) -> Path:
        path = None
        if accelerator.is_main_process:
            training_state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                              "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None}
            path = ckpt.write_checkpoint(run_dir, model_state=unwrapped.state_dict(), training_state=training_state,
                                         config_json=cfg.to_json(), progress=progress, keep_last=cfg.train.keep_last)
        path = Path(gather_object([str(path)])[0]) if accelerator.num_processes > 1 else path
        ckpt.write_rng_state(path, accelerator.process_index)
        accelerator.wait_for_everyone()
        return path

    def run_evaluation(ckpt_dir: Path) -> dict:
        metrics = evaluate(accelerator, unwrapped, cfg, ckpt_dir / "eval")
        if accelerator.is_main_process:
            metrics = {**metrics, "step": progress.step, "epoch": progress.epoch, "checkpoint": ckpt_dir.name}
            ckpt.write_metrics(ckpt_dir, metrics)
            progress.history.append({k: metrics[k] for k in ("step", "epoch", "mAP", "NDS")})
            (run_dir / "metrics_history.json").write_text(json.dumps(progress.history, indent=2))
            accelerator.log({"val/mAP": metrics["mAP"], "val/NDS": metrics["NDS"]}, step=progress.step)
            accelerator.print(f"eval step {progress.step}: mAP {metrics['mAP']:.4f} NDS {metrics['NDS']:.4f}")
            if metrics["NDS"] > progress.best_nds:
                progress.best_nds = metrics["NDS"]
                ckpt.update_best(run_dir, ckpt_dir)
        return metrics

    if options.eval_only:  # metrics.json and the results file go to <run_dir>/eval
        return TrainResult(run_dir, progress, None, evaluate(accelerator, unwrapped, cfg, run_dir / "eval"))

    aqr = getattr(unwrapped.pts_bbox_head, "aqr", None) if hasattr(unwrapped, "pts_bbox_head") else None
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_main_process, desc="train")
    last_ckpt, metrics, done = None, None, progress.step >= total_steps
    pending_rng = rng if options.resume else None
    while not done:
        loader = build_dataloader(cfg, cfg.data.train_split, train=True, num_processes=accelerator.num_processes,
                                  process_index=accelerator.process_index, seed=cfg.train.seed, epoch=progress.epoch)
        # Restore the RNG where the uninterrupted run stood: before the epoch's iterator is created for a
        # checkpoint at an epoch boundary, after it for a mid-epoch one (creating it draws a seed).
        mid_epoch = progress.batches_in_epoch > 0
        if pending_rng is not None and not mid_epoch:
            ckpt.set_rng_state(pending_rng)
        if mid_epoch:
            from accelerate import skip_first_batches
            batches = iter(skip_first_batches(loader, progress.batches_in_epoch))
        else:
            batches = iter(loader)
        if pending_rng is not None and mid_epoch:
            ckpt.set_rng_state(pending_rng)
        pending_rng = None
        model.train()
        apply_frozen_bn_eval(unwrapped, frozen)
        t_window, samples_window = time.perf_counter(), 0
        for batch in batches:
            batch = batch.to(accelerator.device, non_blocking=True)
            if aqr is not None:
                aqr.monitor_this_step = progress.step % cfg.model.aqr.monitor.interval == 0
            with accelerator.accumulate(model):
                losses = model(batch)
                loss = sum(losses.values())
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_([p for p in unwrapped.parameters() if p.requires_grad],
                                                            cfg.optim.grad_clip)
                    finite = torch.isfinite(loss.detach()) & torch.isfinite(torch.as_tensor(grad_norm))
                    finite = bool(accelerator.reduce(finite.float().to(accelerator.device), "min").item() > 0)
                    if finite or accelerator.mixed_precision == "fp16":  # fp16: the scaler skips overflows
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            progress.batches_in_epoch += 1
            samples_window += batch.batch_size * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if not finite:
                progress.nonfinite_in_a_row += 1
                progress.nonfinite_total += 1
                accelerator.print(f"step {progress.step}: non-finite loss/gradient, step skipped "
                                  f"({progress.nonfinite_in_a_row} in a row)")
                if progress.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteTrainingError(
                        f"{progress.nonfinite_in_a_row} non-finite steps in a row; last healthy step "
                        f"{progress.last_healthy_step}, last checkpoint {last_ckpt or 'none'}")
                continue
            progress.nonfinite_in_a_row = 0
            progress.step += 1
            progress.last_healthy_step = progress.step
            schedule.step()
            bar.update(1)
            if progress.step % cfg.train.log_every_steps == 0 or progress.step == total_steps:
                elapsed = time.perf_counter() - t_window
                scalars = {f"loss/{k}": accelerator.reduce(v.detach(), "mean").item() for k, v in losses.items()}
                scalars.update({"loss/total": sum(scalars.values()), "lr": schedule.get_last_lr()[0],
                                "grad_norm": float(grad_norm), "samples_per_s": samples_window / max(elapsed, 1e-9)})
                if torch.cuda.is_available():
                    scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                if aqr is not None and getattr(aqr, "last_stats", None):
                    scalars.update({f"aqr/{k}": v for k, v in aqr.last_stats.items()})
                accelerator.log(scalars, step=progress.step)
                bar.set_postfix(loss=f"{scalars['loss/total']:.3f}", lr=f"{scalars['lr']:.2e}")
                t_window, samples_window = time.perf_counter(), 0
            if aqr is not None and accelerator.is_main_process and hasattr(aqr, "save_images") \
                    and progress.step % cfg.model.aqr.monitor.image_interval == 0:
                aqr.save_images(run_dir / "aqr_maps" / f"step_{progress.step:08d}")
            if cfg.train.checkpoint_every_steps and progress.step % cfg.train.checkpoint_every_steps == 0:
                last_ckpt = save()
            if options.stop_after_steps and progress.step >= options.stop_after_steps:
                bar.close()
                return TrainResult(run_dir, progress, last_ckpt, None)
            if progress.step >= total_steps:
                done = True
                break
        if progress.batches_in_epoch >= len(loader) or done:
            epoch_finished = progress.batches_in_epoch >= len(loader)
            if epoch_finished:
                progress.epoch += 1
                progress.batches_in_epoch = 0
            last_ckpt = save()
            if done or (epoch_finished and cfg.train.eval_every_epochs
                        and progress.epoch % cfg.train.eval_every_epochs == 0):
                metrics = run_evaluation(last_ckpt)
                model.train()
                apply_frozen_bn_eval(unwrapped, frozen)
            if progress.epoch >= cfg.train.epochs:
                done = True
    bar.close()
    accelerator.end_training()
    return TrainResult(run_dir, progress, last_ckpt, metrics)
