"""Part 3: inference of the released configs per stage, eager vs compiled, fp16 vs bf16, peak memory, FPS."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from aqrcmt.models import build_model
from aqrcmt.presets import load_config
from aqrcmt.structures import Batch

from .inputs import scene_batch
from .part import Part
from .plan import Plan
from .timing import autocast, measure, peak_memory_mib, reset_peak_memory, synchronize

PAPER_FPS_A100 = {"cmt_voxel0075_vov_1600x640_cbgs": 6.4, "cmt_voxel0100_r50_800x320_cbgs": 14.2}


def inference_stages(model, batch: Batch) -> dict[str, Callable[[dict], Any]]:
    """The forward pass cut into stages; each reads its inputs from / writes its output to `state`."""
    def voxelization(state):
        voxels = model.pts_voxel_layer(batch.points)
        state["voxels"] = voxels
        state["vfe"] = model.pts_voxel_encoder(voxels.voxels, voxels.num_points)

    def lidar_backbone(state):
        voxels = state["voxels"]
        bev = model.pts_middle_encoder(state["vfe"], voxels.coors, voxels.batch_size)
        state["bev"] = model.pts_neck(model.pts_backbone(bev))

    def camera_backbone_neck(state):
        state["img"] = model.extract_img_feat(batch.images)

    def head(state):
        state["outputs"] = model.pts_bbox_head(state["bev"], state["img"], batch.lidar2img, batch.img_shape)

    def decode(state):
        state["detections"] = model.pts_bbox_head.decode(state["outputs"])

    return {"voxelization": voxelization, "lidar_backbone": lidar_backbone,
            "camera_backbone_neck": camera_backbone_neck, "head": head, "decode": decode}


def inference_row(part: Part, plan: Plan, name: str, model, batch: Batch, mode: str, precision: str) -> dict:
    """Per-stage medians (sync after every stage) and the end-to-end predict (one sync) at batch 1."""
    device = plan.device
    reset_peak_memory(device)
    stages = inference_stages(model, batch)
    stage_times: dict[str, list[float]] = {stage: [] for stage in stages}
    with torch.inference_mode(), autocast(device, precision):
        for i in range(plan.warmup + plan.iters):
            state: dict = {}
            for stage, fn in stages.items():
                t = measure(lambda: fn(state), device, 0, 1)
                if i >= plan.warmup:
                    stage_times[stage].append(t.median_ms)
            if i >= plan.warmup and time.monotonic() > part.deadline:
                break
        total = measure(lambda: model.predict(batch), device, plan.warmup, plan.iters, part.deadline)
    row = {"item": name, "mode": mode, "precision": precision,
           **{f"{stage}_ms": statistics.median(values) for stage, values in stage_times.items()},
           "total_ms": total.median_ms, "total_min_ms": total.min_ms, "fps": 1e3 / total.median_ms,
           "peak_mib": peak_memory_mib(device), "warmup": total.warmup, "iters": total.iters}
    row["paper_fps_a100"] = PAPER_FPS_A100.get(name)
    return row


def part_inference(part: Part, plan: Plan) -> None:
    device = plan.device
    part.protocol = [
        "batch 1, random weights, eval mode, torch.inference_mode, autocast at the stated precision "
        "(the sparse encoder runs fp32); synthetic scene: "
        f"{plan.scene.boxes} boxes x {plan.scene.points_per_box} surface points + {plan.scene.ground_points} "
        "ground points, six cameras at the config's image size",
        "stages (device sync after each): voxelization = hard voxelizer + mean VFE; lidar_backbone = sparse "
        "encoder + densify + SECOND + SECONDFPN; camera_backbone_neck = image backbone + CP-FPN (6 views); "
        "head = CMT head forward (AQR included where enabled); decode = box decoding + top-k",
        f"total / fps = CmtDetector.predict end to end (voxelization included, one sync at the end); warm-up "
        f"{plan.warmup}, median of {plan.iters}; compiled = compile_dense(backend={plan.compile_backend!r}) "
        "with compilation in the warm-up",
        "data loading excluded from every stage and from fps; the input row times building the synthetic "
        "batch on the CPU and the host-to-device copy (the real pipeline: bench/results/data_cpu.md)",
        "peak_mib = torch.cuda.max_memory_allocated over the variant (CPU: not measured)"]
    models: dict[str, Any] = {}
    batches: dict[str, Batch] = {}

    def prepare(name: str) -> dict:
        cfg = load_config(name)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        host = scene_batch(cfg, 1, plan.scene, seed=0)
        built = time.perf_counter()
        batches[name] = host.to(device)
        synchronize(device)
        copied = time.perf_counter()
        models[name] = build_model(cfg.model).to(device).eval()
        voxels = int(models[name].pts_voxel_layer(batches[name].points).voxels.shape[0])
        return {"item": name, "mode": "input", "points": int(host.points[0].shape[0]), "voxels": voxels,
                "build_batch_ms": (built - t0) * 1e3, "host_to_device_ms": (copied - built) * 1e3}

    precisions = ("fp16", "bf16")
    for name in plan.inference_configs:          # eager pass over every config first: cheap, always useful
        if part.item(f"{name} input", lambda: prepare(name)) is None or name not in models:
            continue
        for precision in precisions:
            part.item(f"{name} eager {precision}",
                      lambda: inference_row(part, plan, name, models[name], batches[name], "eager", precision))
    for name in list(models):                    # then compiled, in the same order, while the budget lasts
        def compile_model(name=name) -> None:
            models[name].compile_dense(backend=plan.compile_backend)
        part.item(f"{name} compile", compile_model)
        for precision in precisions:
            part.item(f"{name} compiled {precision}",
                      lambda: inference_row(part, plan, name, models[name], batches[name], "compiled", precision))
        del models[name]
    for row in part.rows:
        if row.get("paper_fps_a100") and row["mode"] == "eager" and row["precision"] == "fp16":
            part.check(f"{row['item']} fps (eager fp16, batch 1)", row["fps"],
                       f"paper: {row['paper_fps_a100']} on A100", None)
