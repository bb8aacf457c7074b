"""Part 2: kernel timings (Triton, the eager PyTorch paths, torch.compile of them) and modulation bandwidth."""
from __future__ import annotations

import math
from typing import Callable

import torch

from aqrcmt import kernels
from aqrcmt.kernels.aot import ARCHS, SPLAT_DEFAULTS, Arch, launch_work, roofline_seconds
from aqrcmt.kernels.modulate_triton import modulate_backward_launch, modulate_forward_launch
from aqrcmt.kernels.splat_params import SplatParams
from aqrcmt.kernels.splat_triton import splat_backward_launch, splat_forward_launch

from .inputs import SPLAT_OPTIONS, feature_inputs, splat_inputs
from .part import Part
from .plan import KernelSizes, Plan
from .timing import measure

ASSUMED_L2_BYTES = 50 * 2 ** 20            # where the device does not report its L2 size (CPU)
BANDWIDTH_TARGET = 0.85                    # modulation GB/s / copy GB/s


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
    if cuda:
        capability = torch.cuda.get_device_capability(device)
        arch = ARCHS.get(capability[0] * 10 + capability[1])
        if arch is None:
            part.notes.append(f"roofline: no datasheet numbers for sm_{capability[0]}{capability[1]}")
        else:
            part.item("roofline predictions", lambda: predicted_rows(part, plan, arch))
    part.item("modulation bandwidth", lambda: bandwidth_rows(part, plan))


def predicted_rows(part: Part, plan: Plan, arch: Arch) -> None:
    """Beside each measured Triton workload: the roofline time of its launches on `arch`, this GPU's
    architecture (kernels/aot.py: bytes / bandwidth or instructions / FP32 issue rate, the datasheet's numbers)."""
    sizes, device = plan.kernel_sizes, plan.device
    for kind in ("bev", "camera"):
        weights, coords, valid, h, w = splat_inputs(sizes, kind, torch.float32, device)
        p = SplatParams.build(h, w, **{**SPLAT_DEFAULTS, **SPLAT_OPTIONS["user"]})
        forward, (out, raw, den) = splat_forward_launch(weights, coords, valid, p)
        backward, _ = splat_backward_launch(torch.ones_like(out), weights, coords, valid, raw, den, p)
        x, wmap = feature_inputs(sizes, kind, torch.float32, device)
        mod_forward, _ = modulate_forward_launch(x, wmap, False)
        mod_backward, _ = modulate_backward_launch(x, x, wmap)
        for name, launches in ((f"splat {kind} forward", [forward]), (f"splat {kind} forward+backward",
                                                                      [forward, backward]),
                               (f"modulate {kind} forward", [mod_forward]),
                               (f"modulate {kind} forward+backward", [mod_forward, mod_backward])):
            seconds = sum(roofline_seconds(launch_work(launch), arch)[0] for launch in launches)
            part.rows.append({"item": name, "impl": f"roofline {arch.name}", "predicted_ms": seconds * 1e3})


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
