"""Fused residual feature modulation: out = x * (alpha * m(w) + beta), broadcast over channels.

x [N, C, H, W] features (N = B for BEV, B*6 for perspective), w [N, H, W] rendered weight map. The mixed map m is
    element_wise: m = w                                   (the original's default)
    channel_wise: m = mean_hw(w[n])                       (one scalar per map)
    adaptive:     m = 0.7 w + 0.3 mean_hw(w[n])
The original FeatureModulator's `x*w + r*x` is alpha=1, beta=r; the convex form `(1-r)*x*w + r*x` is alpha=1-r,
beta=r. The per-pixel scale s = alpha*m + beta [N, H, W] is computed in fp32 by plain PyTorch ops (tiny, and
autograd carries the gradient to w through them); the op `torch.ops.aqrcmt.modulate` does the pass over x:
out = x * s, in fp32 with the result cast to x's dtype, optionally with the monitor's statistics from the same pass
(sum |out - x|, sum |x|, sum out, sum out^2, all fp32).

The op and its paths, one module each: modulate_triton.py (the Triton kernels and their launchers, CUDA tensors),
modulate_cpu.py (the PyTorch path, CPU tensors), this module (the custom ops `torch.ops.aqrcmt.modulate` /
`modulate_backward` and their autograd, `modulation_scale` and the public `modulate`), and modulate_ref.py
(`modulate_ref`, the specification: the formula and the statistics as direct sums, written out on their own; the
tests compare the other paths with it).
"""
from __future__ import annotations

from typing import NamedTuple, Union

import torch
from torch.library import triton_op

from .dispatch import use_triton
from .modulate_cpu import modulate_backward_torch, modulate_forward_torch
from .modulate_triton import modulate_backward_triton, modulate_forward_triton

MODES = ("element_wise", "channel_wise", "adaptive")
_MIX = {"element_wise": (1.0, 0.0), "channel_wise": (0.0, 1.0), "adaptive": (0.7, 0.3)}   # (element, map mean)


class ModulationStats(NamedTuple):
    """Sums over every element of a modulate call (0-d fp32 tensors); divide by x.numel() for means."""
    abs_change: torch.Tensor     # sum |out - x|
    abs_input: torch.Tensor      # sum |x|
    total: torch.Tensor          # sum out
    total_sq: torch.Tensor       # sum out^2


# ------------------------------------------------------------------------------------------------------------------
# Custom ops and autograd
# ------------------------------------------------------------------------------------------------------------------
@triton_op("aqrcmt::modulate", mutates_args=())
def _modulate_op(x: torch.Tensor, scale: torch.Tensor, with_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return modulate_forward_triton(x, scale, with_stats)
    return modulate_forward_torch(x, scale, with_stats)


@triton_op("aqrcmt::modulate_backward", mutates_args=())
def _modulate_backward_op(grad_out: torch.Tensor, x: torch.Tensor,
                          scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return modulate_backward_triton(grad_out, x, scale)
    return modulate_backward_torch(grad_out, x, scale)


def _setup_modulate_context(ctx, inputs, output) -> None:
    x, scale, _ = inputs
    ctx.save_for_backward(x, scale)


def _modulate_autograd(ctx, grad_out, _grad_stats):
    x, scale = ctx.saved_tensors
    grad_x, grad_scale = torch.ops.aqrcmt.modulate_backward(grad_out, x, scale)
    return grad_x, grad_scale.to(scale.dtype), None


_modulate_op.register_autograd(_modulate_autograd, setup_context=_setup_modulate_context)


# ------------------------------------------------------------------------------------------------------------------
# The public function and its scale
# ------------------------------------------------------------------------------------------------------------------
def modulation_scale(w: torch.Tensor, alpha: float, beta: float, mode: str) -> torch.Tensor:
    """s = alpha * m(w) + beta, [N, H, W] in fp32 (float64 for float64 w); differentiable."""
    element, mean = _MIX[mode]
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    m = w if mean == 0.0 else element * w + mean * w.mean(dim=(1, 2), keepdim=True)
    return alpha * m + beta


def check_modulate_inputs(x: torch.Tensor, w: torch.Tensor, mode: str) -> None:
    """Shapes, dtypes, devices and mode; raises ValueError naming the argument."""
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if w.dim() != 3 or (w.shape[0], w.shape[1], w.shape[2]) != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"w must be [N, H, W] = [{x.shape[0]}, {x.shape[2]}, {x.shape[3]}], got {tuple(w.shape)}")
    if x.device != w.device:
        raise ValueError(f"x and w must share a device, got {x.device} and {w.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def modulate(x: torch.Tensor, w: torch.Tensor, *, alpha: float = 1.0, beta: float = 0.0, mode: str = "element_wise",
             return_stats: bool = False) -> Union[torch.Tensor, tuple[torch.Tensor, ModulationStats]]:
    """out = x * (alpha * m(w) + beta) with m from `mode` (module docstring); out has x's dtype.

    x [N, C, H, W] (fp32/fp16/bf16), w [N, H, W]. Differentiable w.r.t. x and w. With return_stats, also returns
    ModulationStats computed in the same pass over x (not differentiable).
    """
    check_modulate_inputs(x, w, mode)
    out, stats = torch.ops.aqrcmt.modulate(x, modulation_scale(w, alpha, beta, mode), return_stats)
    return (out, ModulationStats(*stats.detach().unbind(0))) if return_stats else out
