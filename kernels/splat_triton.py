"""The Triton kernels of `splat` and their launchers (what CUDA tensors run; the interpreter runs them on CPU).

`_splat_fwd_kernel`: one program per (map, pixel tile) gathers every query's contribution, then thresholds and
clamps in the same launch. `_splat_bwd_kernel`: one program per (sample, query block) gathers the gradient over each
query's footprint. No atomics, so both are deterministic. The semantics: kernels/splat.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .splat_params import METHODS, SplatParams


# ------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_active_queries(coord_ptr, valid_ptr, qv, q_mask, w, threshold, H, W, METHOD: tl.constexpr):
    """(y, x, active) of the (query, view) slots `qv`: a query renders when it is valid on the view, its weight
    reaches `threshold` and its pixel lies inside the map (bilinear: its 2x2 block). Inactive slots get (0, 0)."""
    y = tl.load(coord_ptr + qv * 2, mask=q_mask, other=-1.0).to(tl.float32)
    x = tl.load(coord_ptr + qv * 2 + 1, mask=q_mask, other=-1.0).to(tl.float32)
    ok = tl.load(valid_ptr + qv, mask=q_mask, other=0) != 0
    if METHOD == 1:
        inside = (y >= 0) & (y < H - 1) & (x >= 0) & (x < W - 1)
    else:
        inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    active = q_mask & ok & (w >= threshold) & inside
    return tl.where(active, y, 0.0), tl.where(active, x, 0.0), active


@triton.jit
def _splat_fwd_kernel(
    weight_ptr,      # [B, Q] query weights (fp16/bf16/fp32)
    coord_ptr,       # [B, Q, V, 2] (y, x) pixel coordinates
    valid_ptr,       # [B, Q, V] uint8: 1 = the query lands on map v
    out_ptr,         # [B, V, H, W] fp32 out: thresholded and clamped map
    raw_ptr,         # [B, V, H, W] fp32 out: map before post-processing (saved for backward)
    den_ptr,         # [B, V, H, W] fp32 out: sum of kernel values (NORMALIZED only; else empty, never read)
    Q, V, H, W,
    threshold, clamp_max, inv_two_sigma_sq, inv_norm, fill, eps,
    METHOD: tl.constexpr,       # 0 gaussian, 1 bilinear, 2 direct
    NORMALIZED: tl.constexpr,
    EXACT: tl.constexpr,
    CLAMP: tl.constexpr,
    RADIUS: tl.constexpr,
    BLOCK_P: tl.constexpr,      # pixels per program
    BLOCK_Q: tl.constexpr,      # queries per loop step
):
    """One program = one tile of BLOCK_P pixels of map (b, v); it gathers every query's contribution."""
    bv = tl.program_id(1)
    b = bv // V
    v = bv % V
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H * W
    py = (p // W)[:, None]
    px = (p % W)[:, None]
    num = tl.zeros([BLOCK_P], dtype=tl.float32)
    den = tl.zeros([BLOCK_P], dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        q_mask = q < Q
        qv = (b * Q + q) * V + v
        w = tl.load(weight_ptr + b * Q + q, mask=q_mask, other=0.0).to(tl.float32)
        y, x, active = _load_active_queries(coord_ptr, valid_ptr, qv, q_mask, w, threshold, H, W, METHOD)
        w = tl.where(active, w, 0.0)                         # NaN weights are inactive: keep them out of sums
        dy = py - tl.floor(y).to(tl.int32)[None, :]        # [BLOCK_P, BLOCK_Q] integer offsets
        dx = px - tl.floor(x).to(tl.int32)[None, :]
        act = active[None, :]
        if METHOD == 0:
            hit = act & (tl.abs(dy) <= RADIUS) & (tl.abs(dx) <= RADIUS)
            if EXACT:
                ry = py.to(tl.float32) + 0.5 - y[None, :]
                rx = px.to(tl.float32) + 0.5 - x[None, :]
            else:
                ry = dy.to(tl.float32)
                rx = dx.to(tl.float32)
            k = tl.where(hit, tl.exp(-(ry * ry + rx * rx) * inv_two_sigma_sq) * inv_norm, 0.0)
            num += tl.sum(k * w[None, :], axis=1)
            if NORMALIZED:
                den += tl.sum(k, axis=1)
        elif METHOD == 1:
            fy = (y - tl.floor(y))[None, :]
            fx = (x - tl.floor(x))[None, :]
            ky = tl.where(dy == 0, 1.0 - fy, tl.where(dy == 1, fy, 0.0))
            kx = tl.where(dx == 0, 1.0 - fx, tl.where(dx == 1, fx, 0.0))
            num += tl.sum(tl.where(act, ky * kx, 0.0) * w[None, :], axis=1)
        else:
            hit = act & (dy == 0) & (dx == 0)
            num = tl.maximum(num, tl.max(tl.where(hit, w[None, :], 0.0), axis=1))
    if NORMALIZED:
        raw = (num + fill * eps) / (den + eps)
    else:
        raw = num
    out = tl.where(raw < threshold, 0.0, raw)
    if CLAMP:
        out = tl.minimum(out, clamp_max)
    offs = bv * H * W + p
    tl.store(out_ptr + offs, out, mask=p_mask)
    tl.store(raw_ptr + offs, raw, mask=p_mask)
    if NORMALIZED:
        tl.store(den_ptr + offs, den, mask=p_mask)


@triton.jit
def _splat_bwd_kernel(
    weight_ptr,      # [B, Q] query weights
    coord_ptr,       # [B, Q, V, 2] (y, x) pixel coordinates
    valid_ptr,       # [B, Q, V] uint8
    grad_out_ptr,    # [B, V, H, W] gradient w.r.t. the post-processed map
    raw_ptr,         # [B, V, H, W] fp32 map before post-processing
    den_ptr,         # [B, V, H, W] fp32 kernel sums (NORMALIZED only; else empty, never read)
    grad_weight_ptr,  # [B, Q] fp32 out
    grad_coord_ptr,  # [B, Q, V, 2] fp32 out (COORD_GRAD only)
    Q, V, H, W,
    threshold, clamp_max, inv_two_sigma_sq, inv_norm, eps,
    METHOD: tl.constexpr,
    NORMALIZED: tl.constexpr,
    EXACT: tl.constexpr,
    CLAMP: tl.constexpr,
    COORD_GRAD: tl.constexpr,
    WIN: tl.constexpr,          # footprint width
    FIRST: tl.constexpr,        # footprint offset of the first row/column
    WIN_PAD: tl.constexpr,      # next power of two >= WIN * WIN
    BLOCK_Q: tl.constexpr,      # queries per program
):
    """One program = BLOCK_Q queries of sample b; it gathers the gradient over each query's footprint."""
    b = tl.program_id(1)
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Q
    w = tl.load(weight_ptr + b * Q + q, mask=q_mask, other=0.0).to(tl.float32)
    j = tl.arange(0, WIN_PAD)
    oy = (j // WIN + FIRST)[None, :]
    ox = (j % WIN + FIRST)[None, :]
    j_mask = (j < WIN * WIN)[None, :]
    grad_w = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for v in range(0, V):
        qv = (b * Q + q) * V + v
        y, x, active = _load_active_queries(coord_ptr, valid_ptr, qv, q_mask, w, threshold, H, W, METHOD)
        w_v = tl.where(active, w, 0.0)
        y = y[:, None]
        x = x[:, None]
        py = tl.floor(y).to(tl.int32) + oy                   # [BLOCK_Q, WIN_PAD] footprint pixels
        px = tl.floor(x).to(tl.int32) + ox
        m = active[:, None] & j_mask & (py >= 0) & (py < H) & (px >= 0) & (px < W)
        pix = (b * V + v) * H * W + py * W + px
        g = tl.load(grad_out_ptr + pix, mask=m, other=0.0).to(tl.float32)
        raw = tl.load(raw_ptr + pix, mask=m, other=0.0)
        keep = raw >= threshold
        if CLAMP:
            keep = keep & (raw <= clamp_max)
        g = tl.where(m & keep, g, 0.0)
        if METHOD == 2:
            grad_w += tl.sum(tl.where(raw == w_v[:, None], g, 0.0), axis=1)
        else:
            if METHOD == 0:
                if EXACT:
                    ry = py.to(tl.float32) + 0.5 - y
                    rx = px.to(tl.float32) + 0.5 - x
                else:
                    ry = (py - tl.floor(y).to(tl.int32)).to(tl.float32)
                    rx = (px - tl.floor(x).to(tl.int32)).to(tl.float32)
                ky = tl.exp(-ry * ry * inv_two_sigma_sq)
                kx = tl.exp(-rx * rx * inv_two_sigma_sq)
                dky = 2.0 * inv_two_sigma_sq * ry * ky         # d ky / d y
                dkx = 2.0 * inv_two_sigma_sq * rx * kx
            else:
                fy = y - tl.floor(y)
                fx = x - tl.floor(x)
                ky = tl.where(oy == 0, 1.0 - fy, fy)
                kx = tl.where(ox == 0, 1.0 - fx, fx)
                dky = tl.where(oy == 0, -1.0, 1.0)
                dkx = tl.where(ox == 0, -1.0, 1.0)
            if NORMALIZED:
                g = g / (tl.load(den_ptr + pix, mask=m, other=0.0) + eps)
                coef = w_v[:, None] - raw
            else:
                coef = w_v[:, None]
            grad_w += tl.sum(g * ky * kx, axis=1) * inv_norm
            if COORD_GRAD:
                tl.store(grad_coord_ptr + qv * 2, tl.sum(g * coef * dky * kx, axis=1) * inv_norm, mask=q_mask)
                tl.store(grad_coord_ptr + qv * 2 + 1, tl.sum(g * coef * ky * dkx, axis=1) * inv_norm, mask=q_mask)
    tl.store(grad_weight_ptr + b * Q + q, grad_w, mask=q_mask)


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------
def _kernel_flags(p: SplatParams) -> dict:
    """The compile-time switches both kernels share (METHOD: the index in METHODS)."""
    return dict(METHOD=METHODS.index(p.method), NORMALIZED=p.normalized, EXACT=p.exact, CLAMP=p.clamp_max is not None)


def splat_forward_triton(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                         p: SplatParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, raw, den) [B, V, H, W] fp32 from one launch of `_splat_fwd_kernel` (den empty unless normalized)."""
    batch, num_queries, views, _ = coords.shape
    shape = (batch, views, p.height, p.width)
    out = weights.new_empty(shape, dtype=torch.float32)
    raw = torch.empty_like(out)
    den = torch.empty_like(out) if p.normalized else out.new_empty(0)
    if out.numel() == 0:
        return out, raw, den
    block_p, block_q = 128, 32
    grid = (triton.cdiv(p.height * p.width, block_p), batch * views)
    wrap_triton(_splat_fwd_kernel)[grid](
        weights.contiguous(), coords.contiguous(), valid.contiguous().view(torch.uint8), out, raw, den,
        num_queries, views, p.height, p.width,
        p.threshold, p.clamp_max if p.clamp_max is not None else 0.0, p.inv_two_sigma_sq, p.inv_norm, p.fill, p.eps,
        RADIUS=p.radius, BLOCK_P=block_p, BLOCK_Q=block_q, **_kernel_flags(p))
    return out, raw, den


def splat_backward_triton(grad_out: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                          raw: torch.Tensor, den: torch.Tensor, p: SplatParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weights [B, Q], grad_coords [B, Q, V, 2]), fp32, from one launch of `_splat_bwd_kernel`."""
    batch, num_queries, views, _ = coords.shape
    grad_w = weights.new_zeros(weights.shape, dtype=torch.float32)
    grad_c = coords.new_zeros(coords.shape, dtype=torch.float32)
    if grad_w.numel() == 0 or views == 0:
        return grad_w, grad_c
    block_q = 16
    grid = (triton.cdiv(num_queries, block_q), batch)
    wrap_triton(_splat_bwd_kernel)[grid](
        weights.contiguous(), coords.contiguous(), valid.contiguous().view(torch.uint8), grad_out.contiguous(),
        raw, den, grad_w, grad_c,
        num_queries, views, p.height, p.width,
        p.threshold, p.clamp_max if p.clamp_max is not None else 0.0, p.inv_two_sigma_sq, p.inv_norm, p.eps,
        COORD_GRAD=p.coords_differentiable, WIN=p.window, FIRST=p.first,
        WIN_PAD=triton.next_power_of_2(p.window * p.window), BLOCK_Q=block_q, **_kernel_flags(p))
    return grad_w, grad_c
