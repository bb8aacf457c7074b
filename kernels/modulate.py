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

The file reads top to bottom: `_modulate_fwd_kernel` / `_modulate_bwd_kernel` (Triton; one program per (map, pixel
tile) looping over channels; statistics as per-program partial sums, so the result is deterministic) and their
launchers; the PyTorch path CPU tensors run (the statistics factored into per-pixel channel reductions); the custom
ops `torch.ops.aqrcmt.modulate` / `modulate_backward` and their autograd; the public `modulate`; and `modulate_ref`,
the specification (the formula and the statistics as direct sums) the tests compare the other paths with.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .dispatch import use_triton

MODES = ("element_wise", "channel_wise", "adaptive")
_MIX = {"element_wise": (1.0, 0.0), "channel_wise": (0.0, 1.0), "adaptive": (0.7, 0.3)}   # (element, map mean)


class ModulationStats(NamedTuple):
    """Sums over every element of a modulate call (0-d fp32 tensors); divide by x.numel() for means."""
    abs_change: torch.Tensor     # sum |out - x|
    abs_input: torch.Tensor      # sum |x|
    total: torch.Tensor          # sum out
    total_sq: torch.Tensor       # sum out^2


# ------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _channel_block(n, c0, p, p_mask, C, HW, BLOCK_C: tl.constexpr):
    """(offsets, mask) of the [BLOCK_C, BLOCK_P] block of map n at channels c0.. and pixels p in [N, C, HW]."""
    c = c0 + tl.arange(0, BLOCK_C)
    return (n * C + c)[:, None] * HW + p[None, :], (c < C)[:, None] & p_mask[None, :]


@triton.jit
def _modulate_fwd_kernel(
    x_ptr,          # [N, C, HW] features (fp16/bf16/fp32)
    scale_ptr,      # [N, HW] fp32 per-pixel scale s
    out_ptr,        # [N, C, HW] out, x's dtype
    stats_ptr,      # [N * tiles, 4] fp32 out: partial sums per program (STATS only)
    C, HW,
    STATS: tl.constexpr,
    BLOCK_C: tl.constexpr,      # channels per loop step
    BLOCK_P: tl.constexpr,      # pixels per program
):
    """One program = one tile of BLOCK_P pixels of map n, all channels."""
    n = tl.program_id(1)
    tile = tl.program_id(0)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < HW
    s = tl.load(scale_ptr + n * HW + p, mask=p_mask, other=0.0)[None, :]
    abs_change = tl.zeros([BLOCK_P], dtype=tl.float32)
    abs_input = tl.zeros([BLOCK_P], dtype=tl.float32)
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    total_sq = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _channel_block(n, c0, p, p_mask, C, HW, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = x * s
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        if STATS:
            abs_change += tl.sum(tl.abs(out - x), axis=0)
            abs_input += tl.sum(tl.abs(x), axis=0)
            total += tl.sum(out, axis=0)
            total_sq += tl.sum(out * out, axis=0)
    if STATS:
        base = stats_ptr + (n * tl.num_programs(0) + tile) * 4
        tl.store(base, tl.sum(abs_change, axis=0))
        tl.store(base + 1, tl.sum(abs_input, axis=0))
        tl.store(base + 2, tl.sum(total, axis=0))
        tl.store(base + 3, tl.sum(total_sq, axis=0))


@triton.jit
def _modulate_bwd_kernel(
    grad_out_ptr,   # [N, C, HW] gradient w.r.t. out
    x_ptr,          # [N, C, HW] features
    scale_ptr,      # [N, HW] fp32 scale s
    grad_x_ptr,     # [N, C, HW] out: grad_out * s, x's dtype
    grad_scale_ptr,  # [N, HW] fp32 out: sum_c grad_out * x
    C, HW,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program = one tile of BLOCK_P pixels of map n; the channel sum stays in registers."""
    n = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < HW
    s = tl.load(scale_ptr + n * HW + p, mask=p_mask, other=0.0)[None, :]
    grad_s = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _channel_block(n, c0, p, p_mask, C, HW, BLOCK_C)
        g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_x_ptr + offs, (g * s).to(grad_x_ptr.dtype.element_ty), mask=mask)
        grad_s += tl.sum(g * x, axis=0)
    tl.store(grad_scale_ptr + n * HW + p, grad_s, mask=p_mask)


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------
_BLOCK_C, _BLOCK_P = 16, 128


def _modulate_forward_triton(x: torch.Tensor, scale: torch.Tensor,
                             with_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    grid = (triton.cdiv(h * w, _BLOCK_P), n)
    partial = x.new_zeros((grid[0] * n, 4) if with_stats else (0,), dtype=torch.float32)
    if out.numel() > 0:
        wrap_triton(_modulate_fwd_kernel)[grid](x.contiguous(), scale.contiguous(), out, partial, c, h * w,
                                                STATS=with_stats, BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P)
    return out, partial.sum(0) if with_stats else partial


def _modulate_backward_triton(grad_out: torch.Tensor, x: torch.Tensor,
                              scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_scale = torch.zeros_like(scale, dtype=torch.float32, memory_format=torch.contiguous_format)
    if grad_x.numel() > 0:
        wrap_triton(_modulate_bwd_kernel)[(triton.cdiv(h * w, _BLOCK_P), n)](
            grad_out.contiguous(), x.contiguous(), scale.contiguous(), grad_x, grad_scale, c, h * w,
            BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P)
    return grad_x, grad_scale


# ------------------------------------------------------------------------------------------------------------------
# The PyTorch path (what CPU tensors run)
# ------------------------------------------------------------------------------------------------------------------
def _modulate_forward_torch(x: torch.Tensor, scale: torch.Tensor,
                            with_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.promote_types(x.dtype, scale.dtype)
    xf = x.to(acc)
    out = xf * scale[:, None]
    if not with_stats:
        return out.to(x.dtype), out.new_empty(0)
    # out - x = x (s - 1) per pixel, so each sum factors into per-pixel channel reductions of x: three read-only
    # passes over x instead of temporaries the size of out.
    abs_x = torch.linalg.vector_norm(xf, ord=1, dim=1)                     # [N, H, W] sum_c |x|
    sq_x = torch.linalg.vector_norm(xf, ord=2, dim=1).square()             # sum_c x^2
    stats = torch.stack([((scale - 1).abs() * abs_x).sum(), abs_x.sum(), (scale * xf.sum(1)).sum(),
                         (scale.square() * sq_x).sum()])
    return out.to(x.dtype), stats


def _modulate_backward_torch(grad_out: torch.Tensor, x: torch.Tensor,
                             scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.promote_types(x.dtype, scale.dtype)
    g = grad_out.to(acc)
    return (g * scale[:, None]).to(x.dtype), (g * x.to(acc)).sum(1)


# ------------------------------------------------------------------------------------------------------------------
# Custom ops and autograd
# ------------------------------------------------------------------------------------------------------------------
@triton_op("aqrcmt::modulate", mutates_args=())
def _modulate_op(x: torch.Tensor, scale: torch.Tensor, with_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return _modulate_forward_triton(x, scale, with_stats)
    return _modulate_forward_torch(x, scale, with_stats)


@triton_op("aqrcmt::modulate_backward", mutates_args=())
def _modulate_backward_op(grad_out: torch.Tensor, x: torch.Tensor,
                          scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return _modulate_backward_triton(grad_out, x, scale)
    return _modulate_backward_torch(grad_out, x, scale)


def _setup_modulate_context(ctx, inputs, output) -> None:
    x, scale, _ = inputs
    ctx.save_for_backward(x, scale)


def _modulate_autograd(ctx, grad_out, _grad_stats):
    x, scale = ctx.saved_tensors
    grad_x, grad_scale = torch.ops.aqrcmt.modulate_backward(grad_out, x, scale)
    return grad_x, grad_scale.to(scale.dtype), None


_modulate_op.register_autograd(_modulate_autograd, setup_context=_setup_modulate_context)


# ------------------------------------------------------------------------------------------------------------------
# Public functions: modulate and its specification
# ------------------------------------------------------------------------------------------------------------------
def modulation_scale(w: torch.Tensor, alpha: float, beta: float, mode: str) -> torch.Tensor:
    """s = alpha * m(w) + beta, [N, H, W] in fp32 (float64 for float64 w); differentiable."""
    element, mean = _MIX[mode]
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    m = w if mean == 0.0 else element * w + mean * w.mean(dim=(1, 2), keepdim=True)
    return alpha * m + beta


def _check_inputs(x: torch.Tensor, w: torch.Tensor, mode: str) -> None:
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
    _check_inputs(x, w, mode)
    out, stats = torch.ops.aqrcmt.modulate(x, modulation_scale(w, alpha, beta, mode), return_stats)
    return (out, ModulationStats(*stats.detach().unbind(0))) if return_stats else out


def modulate_ref(x: torch.Tensor, w: torch.Tensor, *, alpha: float = 1.0, beta: float = 0.0,
                 mode: str = "element_wise", return_stats: bool = False
                 ) -> Union[torch.Tensor, tuple[torch.Tensor, ModulationStats]]:
    """The specification of `modulate`: the module docstring's formula and the statistics as direct sums.

    Same arguments and result as `modulate` (statistics in the computing dtype); differentiable by autograd.
    """
    _check_inputs(x, w, mode)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    out = xf * modulation_scale(w, alpha, beta, mode)[:, None]
    if not return_stats:
        return out.to(x.dtype)
    stats = ModulationStats((out - xf).abs().sum(), xf.abs().sum(), out.sum(), out.square().sum())
    return out.to(x.dtype), ModulationStats(*(s.detach() for s in stats))
