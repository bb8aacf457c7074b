"""The Triton kernels of `modulate` and their launchers (what CUDA tensors run; the interpreter runs them on CPU).

One program per (map, pixel tile) loops over the channels: out = x * s, and the backward grad_x = g * s,
grad_s = sum_c g * x. The statistics are per-program partial sums, summed after the launch, so the result is
deterministic. The semantics: kernels/modulate.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launch


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
_WARPS_FWD, _WARPS_BWD = 4, 8       # the backward holds two [BLOCK_C, BLOCK_P] blocks: more threads share them


def modulate_forward_launch(x: torch.Tensor, scale: torch.Tensor,
                            with_stats: bool) -> tuple[Launch, tuple[torch.Tensor, torch.Tensor]]:
    """The forward launch and its outputs: out [N, C, H, W] in x's dtype, per-program partial statistics."""
    n, c, h, w = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    grid = (triton.cdiv(h * w, _BLOCK_P), n)
    partial = x.new_zeros((grid[0] * n, 4) if with_stats else (0,), dtype=torch.float32)
    launch = Launch(_modulate_fwd_kernel, grid, (x.contiguous(), scale.contiguous(), out, partial, c, h * w),
                    dict(STATS=with_stats, BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P), num_warps=_WARPS_FWD)
    return launch, (out, partial)


def modulate_backward_launch(grad_out: torch.Tensor, x: torch.Tensor,
                             scale: torch.Tensor) -> tuple[Launch, tuple[torch.Tensor, torch.Tensor]]:
    """The backward launch and its outputs: grad_x in x's dtype, grad_scale [N, H, W] fp32."""
    n, c, h, w = x.shape
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_scale = torch.zeros_like(scale, dtype=torch.float32, memory_format=torch.contiguous_format)
    launch = Launch(_modulate_bwd_kernel, (triton.cdiv(h * w, _BLOCK_P), n),
                    (grad_out.contiguous(), x.contiguous(), scale.contiguous(), grad_x, grad_scale, c, h * w),
                    dict(BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P), num_warps=_WARPS_BWD)
    return launch, (grad_x, grad_scale)


def modulate_forward_triton(x: torch.Tensor, scale: torch.Tensor,
                            with_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [N, C, H, W] in x's dtype, stats [4] fp32 or empty) from one launch of `_modulate_fwd_kernel`."""
    launch, (out, partial) = modulate_forward_launch(x, scale, with_stats)
    if out.numel() > 0:
        launch()
    return out, partial.sum(0) if with_stats else partial


def modulate_backward_triton(grad_out: torch.Tensor, x: torch.Tensor,
                             scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x in x's dtype, grad_scale [N, H, W] fp32) from one launch of `_modulate_bwd_kernel`."""
    launch, (grad_x, grad_scale) = modulate_backward_launch(grad_out, x, scale)
    if grad_x.numel() > 0:
        launch()
    return grad_x, grad_scale
