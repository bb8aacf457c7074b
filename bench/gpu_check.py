"""GPU readiness check: one prepared run that answers "does it work, and how fast" on a device in a few minutes.

    python bench/gpu_check.py --out bench/results            # `make gpu-check`; <= 8 min on one GPU
    TRITON_INTERPRET=1 python bench/gpu_check.py --smoke --out DIR   # same code paths, tiny shapes, CPU, < 1 min

Parts (each time-boxed; an exception in one is recorded and the others still run):
1. correctness: the Triton kernels (compiled on CUDA; the interpreter on CPU) vs their PyTorch references,
   forward and backward, fp32 / bf16 / fp16 inputs;
2. kernels: Triton vs the eager PyTorch path vs torch.compile of it; modulation bandwidth vs a device copy
   of the same bytes (buffers >= 4x the L2 cache);
3. inference of the released configs (random weights, synthetic inputs at the real sizes): per stage, eager vs
   compiled, fp16 vs bf16 autocast, peak memory, FPS at batch 1;
4. training step eager vs compiled, AQR off vs recommended AQR, and the recompile count over steps with varying
   voxel and GT counts.
Writes `<out>/<device>.md` and `.json` (device: `gpu_<name>` or `cpu_<arch>`). The protocol: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_batch import synthetic_batch  # noqa: E402  (synthetic inputs shared with the detector tests)

from aqrcmt import kernels  # noqa: E402
from aqrcmt.config import Config  # noqa: E402
from aqrcmt.presets import load_config  # noqa: E402
from aqrcmt.structures import Batch  # noqa: E402
from aqrcmt.models import build_model  # noqa: E402
from aqrcmt.training.optim import freeze_and_build_optimizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max |triton - reference| / max |reference| allowed, by the dtype of the compared tensor.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
ASSUMED_L2_BYTES = 50 * 2 ** 20            # where the device does not report its L2 size (CPU)
BANDWIDTH_TARGET = 0.85                    # modulation GB/s / copy GB/s
AQR_SHARE_TARGET = 0.03                    # (step with AQR - step without) / step without
PAPER_FPS_A100 = {"cmt_voxel0075_vov_1600x640_cbgs": 6.4, "cmt_voxel0100_r50_800x320_cbgs": 14.2}
RECOMMENDED_AQR = "cmt_aqr_recommended_voxel0075_vov_1600x640_cbgs"


# ----------------------------------------------------------------------------------------------------------------
# What to run where
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelSizes:
    """Kernel problem sizes: B samples, Q queries, the BEV map and V camera maps, C feature channels."""
    batch: int
    queries: int
    bev_hw: tuple[int, int]
    views: int
    camera_hw: tuple[int, int]
    channels: int

    def describe(self) -> str:
        return (f"B={self.batch}, Q={self.queries}, BEV {self.bev_hw[0]}x{self.bev_hw[1]}, "
                f"{self.views}x{self.camera_hw[0]}x{self.camera_hw[1]} camera maps, C={self.channels}")


# The released vov head: 900 queries + 300 denoising queries (10 groups x 30 GT), 180x180 BEV, 6 x 40x100 maps.
REAL_SIZES = KernelSizes(batch=2, queries=900 + 300, bev_hw=(180, 180), views=6, camera_hw=(40, 100), channels=256)
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
    budgets = {"correctness": 90, "kernels": 75, "inference": 180, "training": 120} if cuda else \
        {"correctness": 60, "kernels": 90, "inference": 120, "training": 150}
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
        # CPU: inductor's C++ build of the tiny detector takes > 10 min on 2 cores; smoke: dynamo capture only.
        compile_backend=compile_backend or ("inductor" if cuda else "eager" if smoke else "aot_eager"),
        budgets_s={part: seconds * budget_scale for part, seconds in budgets.items()},
    )


# ----------------------------------------------------------------------------------------------------------------
# Timing, budgets and part results
# ----------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Milliseconds per call: warm-up calls untimed, then `iters` timed calls, each ended by a device sync."""
    median_ms: float
    min_ms: float
    warmup: int
    iters: int


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int,
            deadline: Optional[float] = None) -> Timing:
    """CUDA: events around each call + event sync; CPU: perf_counter. Stops early (>= 1 timed call) past deadline."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if deadline is not None and time.monotonic() > deadline:
            break
    return Timing(statistics.median(times), min(times), warmup, len(times))


class BudgetExhausted(Exception):
    """Raised by Part.check_budget when the part's wall-clock budget is spent."""


@dataclass
class Part:
    """One part's record: rows of measurements, checks against targets, notes, and how it ended."""
    name: str
    budget_s: float
    protocol: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    status: str = "ok"
    reason: str = ""
    error: str = ""
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.started + self.budget_s

    def check_budget(self, next_item: str) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExhausted(next_item)

    def item(self, what: str, fn: Callable[[], Optional[dict]]) -> Optional[dict]:
        """Run one item: out of budget -> listed as skipped; an exception -> an error row; else its row."""
        try:
            self.check_budget(what)
            row = fn()
        except BudgetExhausted:
            self.skipped.append(what)
            return None
        except Exception as exc:  # noqa: BLE001  (one failing item must not stop the check)
            row = {"item": what, "error": f"{type(exc).__name__}: {exc}"}
        if row is not None:
            self.rows.append(row)
            if "error" in row:
                self.status = "failed"
        return row

    def check(self, name: str, value: Optional[float], target: str, met: Optional[bool]) -> None:
        self.checks.append({"check": name, "value": value, "target": target, "met": met})

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "started"}
        if self.skipped:
            data["status"] = "partial" if self.status == "ok" else self.status
            data["reason"] = f"budget of {self.budget_s:.0f} s spent; not run: {', '.join(self.skipped)}"
        return data


def run_part(name: str, budget_s: float, body: Callable[[Part], None]) -> dict:
    """Run one part; an exception escaping `body` is recorded as its error (type and message)."""
    part = Part(name, budget_s)
    try:
        body(part)
    except Exception as exc:  # noqa: BLE001
        part.status, part.error = "failed", f"{type(exc).__name__}: {exc}"
    part.seconds = time.monotonic() - part.started
    if part.status == "failed" and not part.error:
        part.error = "; ".join(row["error"] for row in part.rows if "error" in row)
    return part.to_dict()


def skip_part(name: str, reason: str) -> dict:
    return {"name": name, "status": "skipped", "reason": reason, "rows": [], "checks": [], "notes": [],
            "protocol": [], "skipped": [], "error": "", "seconds": 0.0, "budget_s": 0.0}


# ----------------------------------------------------------------------------------------------------------------
# Kernel inputs
# ----------------------------------------------------------------------------------------------------------------
SPLAT_OPTIONS = {           # name -> splat keyword arguments
    "user": dict(sigma=1.0, kernel_norm="sum", threshold=0.01, clamp_max=1.5),       # the AQR fork's renderer
    "recommended": dict(sigma=2.0, kernel_norm="normalized", threshold=0.0, clamp_max=None, fill=1.0),
    "exact": dict(sigma=2.0, position="exact"),
    "bilinear": dict(method="bilinear", sigma=2.0),        # sigma is required, and unused by these two methods
    "direct": dict(method="direct", sigma=2.0),
}
MODULATE_OPTIONS = {        # name -> (modulate keyword arguments)
    "element_wise_stats": dict(alpha=1.0, beta=0.7, mode="element_wise", return_stats=True),
    "adaptive_convex": dict(alpha=0.5, beta=0.5, mode="adaptive"),
}


def map_shape(sizes: KernelSizes, kind: str) -> tuple[int, int, int]:
    """(V, H, W) of the BEV ('bev') or the camera ('camera') maps."""
    return (1, *sizes.bev_hw) if kind == "bev" else (sizes.views, *sizes.camera_hw)


def splat_inputs(sizes: KernelSizes, kind: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """weights [B, Q] ~ N(0.45, 0.1) clamped to [0, 1]; coords [B, Q, V, 2] uniform over the map; valid: BEV all,
    camera 70 % of the queries in one random view. Returns (weights, coords, valid, H, W)."""
    views, height, width = map_shape(sizes, kind)
    gen = torch.Generator().manual_seed(seed)
    b, q = sizes.batch, sizes.queries
    weights = (0.45 + 0.1 * torch.randn(b, q, generator=gen)).clamp(0, 1)
    coords = torch.rand(b, q, views, 2, generator=gen) * torch.tensor([height, width], dtype=torch.float32)
    valid = torch.nn.functional.one_hot(torch.randint(views, (b, q), generator=gen), views).bool()
    valid &= torch.rand(b, q, 1, generator=gen) < 0.7
    if views == 1:
        valid[:] = True
    return weights.to(device, dtype), coords.to(device, dtype), valid.to(device), height, width


def feature_inputs(sizes: KernelSizes, kind: str, dtype: torch.dtype, device: torch.device, maps: int = 0,
                   seed: int = 0):
    """x [N, C, H, W] ~ N(0, 1) in dtype and w [N, H, W] ~ U(0, 1) fp32; N = B (BEV) or B*V (camera) or `maps`."""
    views, height, width = map_shape(sizes, kind)
    n = maps or sizes.batch * views
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, sizes.channels, height, width, generator=gen, device=device).to(dtype)
    w = torch.rand(n, height, width, generator=gen, device=device)
    return x, w


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1e-6), in fp64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-6)) if e.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Part 1: correctness
# ----------------------------------------------------------------------------------------------------------------
def triton_context(device: torch.device):
    """CUDA tensors run Triton anyway; CPU tensors need the forced path (interpreter)."""
    return nullcontext() if device.type == "cuda" else kernels.force_triton()


def compare_splat(sizes: KernelSizes, kind: str, option: str, dtype: torch.dtype, device: torch.device) -> dict:
    """Triton splat vs splat_ref (the specification): output, d/d weights and (where differentiable) d/d coords."""
    weights, coords, valid, height, width = splat_inputs(sizes, kind, dtype, device)
    options = SPLAT_OPTIONS[option]
    coords_grad = options.get("position") == "exact" or options.get("method") == "bilinear"
    grad_out = torch.randn(weights.shape[0], coords.shape[2], height, width,
                           generator=torch.Generator().manual_seed(1)).to(device)
    results = {}
    for impl, fn in (("triton", kernels.splat), ("reference", kernels.splat_ref)):
        w, c = weights.clone().requires_grad_(), coords.clone().requires_grad_(coords_grad)
        with triton_context(device) if impl == "triton" else nullcontext():
            out = fn(w, c, valid, height, width, **options)
            (out * grad_out).sum().backward()
        results[impl] = (out, w.grad, c.grad)
    (out_t, gw_t, gc_t), (out_r, gw_r, gc_r) = results["triton"], results["reference"]
    errors = {"out": relative_error(out_t, out_r), "grad_weights": relative_error(gw_t, gw_r),
              "grad_coords": relative_error(gc_t, gc_r) if coords_grad else None}
    tolerance = {"out": TOLERANCE[out_r.dtype], "grad_weights": TOLERANCE[gw_r.dtype],
                 "grad_coords": TOLERANCE[dtype]}
    return correctness_row(f"splat {kind} {option}", dtype, errors, tolerance)


def compare_modulate(sizes: KernelSizes, kind: str, option: str, dtype: torch.dtype, device: torch.device) -> dict:
    """Triton modulate vs modulate_ref (the specification): output, statistics, d/d x and d/d w."""
    x, w = feature_inputs(sizes, kind, dtype, device)
    options = MODULATE_OPTIONS[option]
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    results = {}
    for impl, fn in (("triton", kernels.modulate), ("reference", kernels.modulate_ref)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        with triton_context(device) if impl == "triton" else nullcontext():
            result = fn(xi, wi, **options)
            out, stats = result if options.get("return_stats") else (result, None)
            (out.float() * grad_out.float()).sum().backward()
        results[impl] = (out, stats, xi.grad, wi.grad)
    (out_t, st_t, gx_t, gw_t), (out_r, st_r, gx_r, gw_r) = results["triton"], results["reference"]
    errors = {"out": relative_error(out_t, out_r), "grad_x": relative_error(gx_t, gx_r),
              "grad_w": relative_error(gw_t, gw_r), "stats": None}
    tolerance = {"out": TOLERANCE[dtype], "grad_x": TOLERANCE[dtype], "grad_w": TOLERANCE[dtype],
                 "stats": TOLERANCE[dtype]}
    if st_r is not None:          # each sum relative to max(|itself|, sum |x|): sum(out) may be near zero
        scale = st_r.abs_input.double().abs()
        errors["stats"] = max(float((a.double() - b.double()).abs() / torch.maximum(b.double().abs(), scale))
                              for a, b in zip(st_t, st_r))
    return correctness_row(f"modulate {kind} {option}", dtype, errors, tolerance)


def correctness_row(case: str, dtype: torch.dtype, errors: dict, tolerance: dict) -> dict:
    """A row of errors (None: not applicable) with passed = every error within its tolerance."""
    failed = [name for name, err in errors.items() if err is not None and not err <= tolerance[name]]
    row = {"item": case, "dtype": str(dtype).removeprefix("torch."),
           **{f"err_{name}": err for name, err in errors.items()}, "passed": not failed}
    if failed:
        row["error"] = "above tolerance: " + ", ".join(f"{n} {errors[n]:.2e} > {tolerance[n]:.0e}" for n in failed)
    return row


def part_correctness(part: Part, plan: Plan) -> None:
    sizes = plan.triton_sizes
    impl = "compiled Triton (CUDA)" if plan.device.type == "cuda" else "Triton interpreter (TRITON_INTERPRET=1)"
    part.protocol = [f"{impl} vs the specification (splat_ref / modulate_ref) on the same inputs and device, forward and backward "
                     f"(loss = sum(out * g), g ~ N(0, 1)); sizes {sizes.describe()}",
                     "err = max |triton - reference| / max |reference|; tolerance by dtype of the compared tensor: "
                     + ", ".join(f"{str(d).removeprefix('torch.')} {t:.0e}" for d, t in TOLERANCE.items()),
                     "splat outputs are fp32 for every input dtype (accumulation in fp32); method 'direct' in fp32 "
                     "only (equal low-precision weights in one pixel: the kernel gives each the gradient, the "
                     "reference splits it)"]
    if plan.triton_skip_reason:
        part.notes.append(plan.triton_skip_reason)
    for dname, dtype in DTYPES.items():      # fp32 first: a budget cut drops the low-precision repeats
        for kind in ("bev", "camera"):
            for option in SPLAT_OPTIONS:
                if option == "direct" and dtype != torch.float32:
                    continue              # equal low-precision weights in one pixel: gradients split differently
                part.item(f"splat {kind} {option} {dname}",
                          lambda: compare_splat(sizes, kind, option, dtype, plan.device))
            for option in MODULATE_OPTIONS:
                part.item(f"modulate {kind} {option} {dname}",
                          lambda: compare_modulate(sizes, kind, option, dtype, plan.device))
    passed = sum(1 for row in part.rows if row.get("passed"))
    part.check("cases passing", passed, f"all {len(part.rows)} run", passed == len(part.rows))


# ----------------------------------------------------------------------------------------------------------------
# Part 2: kernel timings and bandwidth
# ----------------------------------------------------------------------------------------------------------------
def l2_cache_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, source): the device's reported L2 size, else ASSUMED_L2_BYTES."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size), "reported by torch.cuda.get_device_properties"
    return ASSUMED_L2_BYTES, "assumed (not reported for this device)"


def kernel_workloads(sizes: KernelSizes, device: torch.device) -> dict[str, Callable[[Callable, Callable], Callable]]:
    """name -> factory(splat_fn, modulate_fn) -> a no-argument call doing that workload once (fp32)."""
    workloads = {}
    for kind in ("bev", "camera"):
        weights, coords, valid, h, w = splat_inputs(sizes, kind, torch.float32, device)
        x, wmap = feature_inputs(sizes, kind, torch.float32, device)
        options = SPLAT_OPTIONS["user"]
        workloads[f"splat {kind} forward"] = (
            lambda s, m, a=(weights, coords, valid, h, w): lambda: s(*a, **options))
        wg = weights.clone().requires_grad_()
        workloads[f"splat {kind} forward+backward"] = (
            lambda s, m, a=(wg, coords, valid, h, w): lambda: s(*a, **options).sum().backward())
        workloads[f"modulate {kind} forward"] = lambda s, m, a=(x, wmap): lambda: m(*a, beta=0.7)
        xg, wg2 = x.clone().requires_grad_(), wmap.clone().requires_grad_()
        workloads[f"modulate {kind} forward+backward"] = (
            lambda s, m, a=(xg, wg2): lambda: m(*a, beta=0.7).sum().backward())
    return workloads


def part_kernels(part: Part, plan: Plan) -> None:
    device, cuda = plan.device, plan.device.type == "cuda"
    part.protocol = [f"sizes {plan.kernel_sizes.describe()}, fp32, splat options 'user' (sigma 1, sum, floor), "
                     f"modulation beta 0.7; warm-up {plan.warmup}, then median/min of {plan.iters} calls, each "
                     "ended by a device sync (CUDA events on GPU, perf_counter on CPU)",
                     "eager pytorch = splat_separable (the fast PyTorch path, what CPU tensors run) and modulate_ref; "
                     f"compiled pytorch = torch.compile of both (backend={plan.compile_backend!r}), compilation in "
                     "the warm-up",
                     "bandwidth: modulate itself (Triton on CUDA, its PyTorch path on CPU)",
                     "bandwidth: bytes read + written by one modulation pass (x in, out, fp32 scale) / median time; "
                     "copy: dst.copy_(src) of the same x bytes (read + write)"]
    pytorch = (kernels.splat_separable, kernels.modulate_ref)
    impls = {"eager pytorch": pytorch}
    if cuda:
        impls = {"triton": (kernels.splat, kernels.modulate), **impls}
    else:
        part.notes.append("triton timings: " + (plan.triton_skip_reason or "no CUDA") +
                          "; interpreter timings would be meaningless")
    impls["compiled pytorch"] = tuple(torch.compile(fn, backend=plan.compile_backend) for fn in pytorch)
    workloads = kernel_workloads(plan.kernel_sizes, device)
    for impl_name, (splat_fn, modulate_fn) in impls.items():
        for name, factory in workloads.items():
            def timed(impl_name=impl_name, name=name, fn=factory(splat_fn, modulate_fn)) -> dict:
                t = measure(fn, device, plan.warmup, plan.iters, part.deadline)
                return {"item": name, "impl": impl_name, "median_ms": t.median_ms, "min_ms": t.min_ms,
                        "warmup": t.warmup, "iters": t.iters}
            part.item(f"{name} [{impl_name}]", timed)
    part.item("modulation bandwidth", lambda: bandwidth_rows(part, plan))


def bandwidth_rows(part: Part, plan: Plan) -> None:
    """Modulation GB/s vs copy GB/s, fp32 and bf16, on a stack of BEV maps >= 4x L2 (smoke: one small batch)."""
    device = plan.device
    l2, source = l2_cache_bytes(device)
    part.notes.append(f"L2 cache {l2 / 2 ** 20:.0f} MiB ({source})")
    for dtype in (torch.float32, torch.bfloat16):
        per_map = plan.kernel_sizes.channels * math.prod(plan.kernel_sizes.bev_hw) * dtype.itemsize
        maps = 1 if plan.smoke else math.ceil(4 * l2 / per_map)
        x, w = feature_inputs(plan.kernel_sizes, "bev", dtype, device, maps=maps)
        scale = kernels.modulation_scale(w, 1.0, 0.7, "element_wise")
        dst = torch.empty_like(x)
        moved = 2 * x.numel() * dtype.itemsize + scale.numel() * 4
        t_mod = measure(lambda: kernels.modulate(x, w, beta=0.7), device, plan.warmup, plan.iters, part.deadline)
        t_copy = measure(lambda: dst.copy_(x), device, plan.warmup, plan.iters, part.deadline)
        gbs_mod, gbs_copy = moved / t_mod.median_ms / 1e6, 2 * x.numel() * dtype.itemsize / t_copy.median_ms / 1e6
        ratio = gbs_mod / gbs_copy
        dname = str(dtype).removeprefix("torch.")
        part.rows.append({"item": f"bandwidth {dname}", "impl": "triton" if device.type == "cuda" else "pytorch",
                          "buffer_mib": x.numel() * dtype.itemsize / 2 ** 20, "modulate_gbs": gbs_mod,
                          "copy_gbs": gbs_copy, "ratio": ratio, "warmup": t_mod.warmup, "iters": t_mod.iters})
        part.check(f"modulation / copy bandwidth, {dname}", ratio, f">= {BANDWIDTH_TARGET}",
                   ratio >= BANDWIDTH_TARGET if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs (parts 3 and 4)
# ----------------------------------------------------------------------------------------------------------------
def with_recommended_aqr(cfg: Config) -> Config:
    """cfg with the recommended AQR renderer and modulation (normalized kernel, convex residual)."""
    recommended = load_config(RECOMMENDED_AQR).model.aqr
    cfg.model.aqr.render, cfg.model.aqr.modulate = recommended.render, recommended.modulate
    return cfg.validate()


def scene_batch(cfg: Config, batch_size: int, scene: InputSizes, seed: int, boxes: Optional[int] = None,
                ground: Optional[int] = None) -> Batch:
    """synthetic_batch at the config's image size with `scene`'s point and box counts (optionally varied)."""
    count = scene.boxes if boxes is None else boxes
    return synthetic_batch(cfg.model, batch_size=batch_size, num_boxes=(count,) * batch_size,
                           points_per_box=scene.points_per_box,
                           num_ground_points=scene.ground_points if ground is None else ground, seed=seed)


def autocast(device: torch.device, precision: str):
    return nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=DTYPES[precision])


def peak_memory_mib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


# ----------------------------------------------------------------------------------------------------------------
# Part 3: inference per stage
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Part 4: training step, AQR share, recompiles
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
PARTS: dict[str, Callable[[Part, Plan], None]] = {
    "correctness": part_correctness, "kernels": part_kernels, "inference": part_inference, "training": part_training}


def environment(plan: Plan) -> dict:
    env = {"device": plan.label, "torch": torch.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
           "smoke": plan.smoke, "compile_backend": plan.compile_backend, "date_utc": time.strftime(
               "%Y-%m-%d %H:%M", time.gmtime())}
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2 ** 30, cuda=torch.version.cuda)
    else:
        env["load_average_1min"] = os.getloadavg()[0]
    return env


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1e-2 and value else f"{value:,.3f}".rstrip("0").rstrip(".")
    if value is None:
        return "-"
    return str(value)


def row_tables(rows: list[dict]) -> list[tuple[list[str], list[dict]]]:
    """Rows grouped into one table per key set, in order of first appearance."""
    tables: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        tables.setdefault(tuple(row), []).append(row)
    return [(list(columns), group) for columns, group in tables.items()]


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Device check: {env['device']}", "",
             "Written by `bench/gpu_check.py` (protocol: docs/benchmarks.md). "
             + ", ".join(f"{k} {fmt(v)}" for k, v in env.items()) + ".", ""]
    for part in report["parts"].values():
        lines += [f"## {part['name']}: {part['status']} ({part['seconds']:.0f} s of {part['budget_s']:.0f} s)", ""]
        for key in ("reason", "error"):
            if part[key]:
                lines += [f"**{key}**: {part[key]}", ""]
        lines += [f"- {text}" for text in part["protocol"] + part["notes"]]
        if part["checks"]:
            lines += ["", "| check | value | target | met |", "|---|---|---|---|"]
            lines += [f"| {c['check']} | {fmt(c['value'])} | {c['target']} | {fmt(c['met'])} |"
                      for c in part["checks"]]
        for columns, rows in row_tables(part["rows"]):
            lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def run(plan: Plan, out: Path, parts: list[str]) -> dict:
    report = {"environment": environment(plan), "parts": {}}
    for name in PARTS:
        if name not in parts:
            report["parts"][name] = skip_part(name, "not selected (--parts)")
        elif name == "correctness" and plan.triton_sizes is None:
            report["parts"][name] = skip_part(name, plan.triton_skip_reason)
        else:
            print(f"[gpu_check] {name} (budget {plan.budgets_s[name]:.0f} s) ...", flush=True)
            report["parts"][name] = run_part(name, plan.budgets_s[name], lambda part: PARTS[name](part, plan))
            print(f"[gpu_check] {name}: {report['parts'][name]['status']} "
                  f"in {report['parts'][name]['seconds']:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{plan.label}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{plan.label}.md").write_text(markdown(report))
    print(f"[gpu_check] wrote {out / plan.label}.md and .json", flush=True)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for <device>.md and <device>.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one timed iteration (CPU test)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU, eager with --smoke)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: --parts: unknown part(s) {unknown}; known: {list(PARTS)}", file=sys.stderr)
        return 2
    if not args.budget_scale > 0:
        print(f"error: --budget-scale must be > 0, got {args.budget_scale}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 with CUDA would run and time Triton's interpreter; unset it", file=sys.stderr)
        return 2
    run(make_plan(args.smoke, device, args.compile_backend, args.budget_scale), args.out, parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
