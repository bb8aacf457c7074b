"""What the device check runs where: problem sizes, and the plan of a GPU, CPU or smoke run."""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from typing import Optional

import torch

from aqrcmt.kernels.aot import DTYPES, RELEASED, KernelSizes  # noqa: F401  (DTYPES: the parts' dtype names)

RECOMMENDED_AQR = "cmt_aqr_recommended_voxel0075_vov_1600x640_cbgs"

REAL_SIZES = RELEASED          # the released vov head: 900 + 300 denoising queries, 180x180 BEV, 6 x 40x100 maps
SMALL_SIZES = KernelSizes(batch=1, queries=24, bev_hw=(12, 12), views=6, camera_hw=(4, 10), channels=8)


@dataclass(frozen=True)
class InputSizes:
    """Synthetic LiDAR scene per sample: boxes, points on each box surface, ground points (synthetic_batch)."""
    boxes: int
    points_per_box: int
    ground_points: int


# ~30 GT and ~260k points per sample (a 10-sweep nuScenes cloud has 250-300k points).
REAL_INPUT = InputSizes(boxes=30, points_per_box=400, ground_points=250_000)
TINY_INPUT = InputSizes(boxes=5, points_per_box=100, ground_points=600)


@dataclass(frozen=True)
class Plan:
    """Everything that differs between a GPU run, a CPU run of the tiny config and the smoke run."""
    device: torch.device
    label: str                                   # "gpu_<name>" / "cpu_<arch>" (file names)
    smoke: bool
    kernel_sizes: KernelSizes                    # sizes of the part-2 timings and of part 1 on CUDA
    triton_sizes: Optional[KernelSizes]          # where part 1 runs Triton (None: not at all)
    triton_skip_reason: str
    inference_configs: tuple[str, ...]
    train_pair: tuple[str, str]                  # (AQR off, AQR config that gets the recommended render/modulate)
    scene: InputSizes
    warmup: int
    iters: int
    recompile_steps: int
    compile_backend: str
    budgets_s: dict[str, float]


def device_label(device: torch.device) -> str:
    """'gpu_nvidia_h100_80gb_hbm3' / 'cpu_x86_64': lower case, [a-z0-9_] only, no host name."""
    name = f"gpu_{torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"cpu_{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def make_plan(smoke: bool, device: torch.device, compile_backend: Optional[str], budget_scale: float) -> Plan:
    """CUDA: the released configs at real sizes. CPU: the tiny presets (the released ones take minutes a step);
    --smoke: tiny presets, small kernel shapes, one timed iteration."""
    cuda = device.type == "cuda"
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    if cuda:
        triton_sizes, reason = (SMALL_SIZES if smoke else REAL_SIZES), ""
    elif interpreter:
        triton_sizes, reason = SMALL_SIZES, "no CUDA: compiled Triton not run (checked in the interpreter)"
    else:
        triton_sizes, reason = None, "no CUDA and TRITON_INTERPRET!=1: Triton not run"
    full = cuda and not smoke
    budgets = {"correctness": 90, "kernels": 75, "inference": 180, "training": 120, "export": 60} if cuda else \
        {"correctness": 60, "kernels": 90, "inference": 120, "training": 150, "export": 60}
    if smoke:          # the smoke work is small; generous budgets keep a loaded test machine from cutting it
        budgets = dict.fromkeys(budgets, 600)
    return Plan(
        device=device, label=device_label(device), smoke=smoke,
        kernel_sizes=SMALL_SIZES if smoke else REAL_SIZES, triton_sizes=triton_sizes, triton_skip_reason=reason,
        inference_configs=("cmt_voxel0075_vov_1600x640_cbgs", "cmt_voxel0100_r50_800x320_cbgs", RECOMMENDED_AQR,
                           "cmt_aqr_voxel0075_vov_1600x640_cbgs", "cmt_aqr_voxel0100_r50_800x320_cbgs")
        if full else ("tiny_aqr",) if smoke else ("tiny", "tiny_aqr"),
        train_pair=("cmt_voxel0075_vov_1600x640_cbgs", RECOMMENDED_AQR) if full else ("tiny", "tiny_aqr"),
        scene=REAL_INPUT if full else TINY_INPUT,
        warmup=1 if smoke else 3, iters=1 if smoke else (10 if cuda else 5),
        recompile_steps=3 if smoke else 20,
        # CPU: aot_eager (inductor's C++ build of the tiny detector is slow on a CPU, docs/benchmarks.md); smoke:
        # dynamo capture only.
        compile_backend=compile_backend or ("inductor" if cuda else "eager" if smoke else "aot_eager"),
        budgets_s={part: seconds * budget_scale for part, seconds in budgets.items()},
    )
