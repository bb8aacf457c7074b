"""Part 4: the training step eager vs compiled, AQR off vs the recommended AQR, and recompiles over varied batches."""
from __future__ import annotations

import time
from typing import Callable

import torch

from aqrcmt.config import Config
from aqrcmt.models import build_model
from aqrcmt.presets import load_config
from aqrcmt.structures import Batch
from aqrcmt.training.optim import freeze_and_build_optimizer

from .inputs import scene_batch
from .part import Part
from .plan import RECOMMENDED_AQR, Plan
from .timing import autocast, dynamo_graphs, measure, peak_memory_mib, reset_peak_memory

AQR_SHARE_TARGET = 0.03                    # (step with AQR - step without) / step without


def with_recommended_aqr(cfg: Config) -> Config:
    """cfg with the recommended AQR renderer and modulation (normalized kernel, convex residual)."""
    recommended = load_config(RECOMMENDED_AQR).model.aqr
    cfg.model.aqr.render, cfg.model.aqr.modulate = recommended.render, recommended.modulate
    return cfg.validate()


def make_trainer(cfg: Config, optim_cfg, device: torch.device, compiled: bool, backend: str):
    """(step(batch), precision): loss forward + backward (+ GradScaler for fp16) + grad clip + AdamW step."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    optimizer = freeze_and_build_optimizer(model, optim_cfg)
    precision = cfg.train.mixed_precision if cfg.train.mixed_precision != "no" else "fp32"
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if compiled:
        model.compile_dense(backend=backend)

    def step(batch: Batch) -> None:
        with autocast(device, precision):
            loss = sum(model.loss(batch).losses.values())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step, precision


def varied_batches(cfg: Config, plan: Plan, count: int) -> list[Batch]:
    """`count` batches whose GT counts (within one DN bucket) and point / voxel counts differ."""
    bucket = cfg.model.head.dn_max_gt or plan.scene.boxes
    batches = []
    for i in range(count):
        boxes = 1 + (plan.scene.boxes + 7 * i) % bucket
        ground = int(plan.scene.ground_points * (0.6 + 0.8 * ((i * 0.37) % 1)))
        batches.append(scene_batch(cfg, cfg.data.batch_size, plan.scene, seed=100 + i, boxes=boxes,
                                   ground=ground).to(plan.device))
    return batches


def part_training(part: Part, plan: Plan) -> None:
    device = plan.device
    off_name, aqr_name = plan.train_pair
    configs = {"aqr_off": load_config(off_name), "aqr_recommended": with_recommended_aqr(load_config(aqr_name))}
    optim_cfg = configs["aqr_off"].optim          # same optimizer (no frozen modules) for both
    batch_size = configs["aqr_off"].data.batch_size
    for cfg in configs.values():
        if cfg.model.head.dn_max_gt == 0:
            cfg.model.head.dn_max_gt = 32         # a GT bucket: without one every new GT maximum is a new shape
    part.protocol = [
        f"{off_name} vs {aqr_name} with the recommended AQR renderer/modulation; random weights; batch "
        f"{batch_size} (the config's per-device batch); autocast at the config's train.mixed_precision "
        "(fp16 with a GradScaler; 'no' = fp32)",
        "one step = loss forward + backward + grad clip + AdamW step (optimizer of the AQR-off config for both, "
        "no frozen modules); synthetic batch already on the device (data loading excluded)",
        f"warm-up {plan.warmup} (compilation included for compiled), median/min of {plan.iters} steps on one "
        f"batch; compiled = compile_dense(backend={plan.compile_backend!r})",
        "aqr share = (median with AQR - median without) / median without, same mode",
        f"recompiles: the compiled AQR model right after its timed steps (warm), then {plan.recompile_steps} "
        f"steps on batches with varying GT counts (inside one DN bucket, head.dn_max_gt="
        f"{configs['aqr_off'].model.head.dn_max_gt}) and varying point/voxel counts; new graphs = torch._dynamo "
        "counters['stats']['unique_graphs'] after the last of them minus before the first",
        "order: eager off, eager AQR, compiled AQR, recompiles, compiled off (a budget cut drops the last first)"]
    batch = scene_batch(configs["aqr_off"], batch_size, plan.scene, seed=0).to(device)
    medians: dict[tuple[str, str], float] = {}
    steps: dict[tuple[str, str], Callable[[Batch], None]] = {}

    def timed(mode: str, variant: str) -> dict:
        step, precision = make_trainer(configs[variant], optim_cfg, device, mode == "compiled", plan.compile_backend)
        reset_peak_memory(device)
        t = measure(lambda: step(batch), device, plan.warmup, plan.iters, part.deadline)
        medians[(mode, variant)], steps[(mode, variant)] = t.median_ms, step
        return {"item": variant, "mode": mode, "precision": precision, "batch": batch_size, "median_ms": t.median_ms,
                "min_ms": t.min_ms, "peak_mib": peak_memory_mib(device), "warmup": t.warmup, "iters": t.iters}

    for mode, variant in (("eager", "aqr_off"), ("eager", "aqr_recommended"), ("compiled", "aqr_recommended")):
        part.item(f"train step {variant} {mode}", lambda: timed(mode, variant))
    warm = steps.pop(("compiled", "aqr_recommended"), None)
    steps.clear()                                 # free the eager models
    if warm is not None:
        part.item("recompiles", lambda: recompile_row(part, plan, configs["aqr_recommended"], warm))
    warm = None                                   # free the compiled model before the next one
    part.item("train step aqr_off compiled", lambda: timed("compiled", "aqr_off"))
    for mode in ("eager", "compiled"):
        if (mode, "aqr_off") in medians and (mode, "aqr_recommended") in medians:
            share = medians[(mode, "aqr_recommended")] / medians[(mode, "aqr_off")] - 1
            part.check(f"AQR share of the step, {mode}", share, f"<= {AQR_SHARE_TARGET:.0%}",
                       share <= AQR_SHARE_TARGET)


def recompile_row(part: Part, plan: Plan, cfg: Config, step: Callable[[Batch], None]) -> dict:
    """Train the warm compiled model on varied batches; new dynamo graphs during them should be 0."""
    batches = varied_batches(cfg, plan, plan.recompile_steps)
    before = dynamo_graphs()
    done = 0
    for batch in batches:
        step(batch)
        done += 1
        if time.monotonic() > part.deadline:
            break
    new_graphs = dynamo_graphs() - before
    part.check("recompiles after warm-up", new_graphs, "0", new_graphs == 0)
    used = batches[:done]
    return {"item": "recompiles", "steps": done, "graphs_before": before, "new_graphs": new_graphs,
            "gt_counts": f"{min(int(b.gt_boxes[0].shape[0]) for b in used)}-"
                         f"{max(int(b.gt_boxes[0].shape[0]) for b in used)}",
            "points": f"{min(int(b.points[0].shape[0]) for b in used)}-{max(int(b.points[0].shape[0]) for b in used)}"}
