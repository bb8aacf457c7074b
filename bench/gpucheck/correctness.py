"""Part 1: the Triton kernels vs their specifications (splat_ref, modulate_ref), forward and backward, by dtype."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from aqrcmt import kernels

from .inputs import MODULATE_OPTIONS, SPLAT_OPTIONS, feature_inputs, splat_inputs
from .part import Part
from .plan import DTYPES, KernelSizes, Plan

# Max |triton - reference| / max |reference| allowed, by the dtype of the compared tensor.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1e-6), in fp64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-6)) if e.numel() else 0.0


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
    part.protocol = [f"{impl} vs the specification (splat_ref / modulate_ref) on the same inputs and device, "
                     f"forward and backward (loss = sum(out * g), g ~ N(0, 1)); sizes {sizes.describe()}",
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
