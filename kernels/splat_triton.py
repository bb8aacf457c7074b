"""The tile-binned Triton kernels of `splat` and their launchers (what CUDA tensors run; the interpreter runs them
on CPU). The semantics: kernels/splat.py; the specification the tests hold them to: kernels/splat_ref.py.

Each map is cut into TILE_H x TILE_W pixel tiles. `bin_queries`, a cheap PyTorch pass, lists for every tile the
(query, view) slots whose footprint touches it (each footprint spans at most SPAN_Y x SPAN_X tiles: one candidate
per tile it may touch, a stable sort by tile, then the list offsets by binary search). Then
`_splat_fwd_kernel`: one program per (map, tile) sums its own list's contributions over its pixels, then thresholds
and clamps in the same launch;
`_splat_bwd_kernel`: one program per (map, tile) loads its pixels' gradient once and writes, per listed candidate,
that tile's share of d/dw and d/d(y, x); the launcher sums the shares of each query.
No atomics and a fixed summation order, so both are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launch
from .splat_params import METHODS, SplatParams

TILE_H, TILE_W = 16, 16         # pixels of a tile (one program)
BLOCK_Q_FWD = 8                 # listed queries per loop step, forward
BLOCK_Q_BWD = 8                 # listed queries per loop step, backward (4 with coordinate gradients)
WARPS_FWD, WARPS_BWD = 4, 8     # the backward holds more [pixels, queries] values: more threads share them


# ------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_pixels(tile, tiles_x, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """(row, column, inside) of the TILE_H * TILE_W pixels of tile `tile` (row-major over tiles_x tile columns)."""
    i = tl.arange(0, TILE_H * TILE_W)
    py = (tile // tiles_x) * TILE_H + i // TILE_W
    px = (tile % tiles_x) * TILE_W + i % TILE_W
    return py, px, (py < H) & (px < W)


@triton.jit
def _listed_queries(entry_ptr, e, e_mask, weight_ptr, coord_ptr, V, SPAN: tl.constexpr):
    """(candidate, (query, view) slot, weight, y, x) of list entries e; entries past the list get weight 0."""
    cand = tl.load(entry_ptr + e, mask=e_mask, other=0)
    qv = cand // SPAN
    w = tl.load(weight_ptr + qv // V, mask=e_mask, other=0.0).to(tl.float32)
    y = tl.load(coord_ptr + qv * 2, mask=e_mask, other=0.0).to(tl.float32)
    x = tl.load(coord_ptr + qv * 2 + 1, mask=e_mask, other=0.0).to(tl.float32)
    return cand, w, y, x


@triton.jit
def _pair_offsets(py, px, y, x, e_mask, METHOD: tl.constexpr, EXACT: tl.constexpr, RADIUS: tl.constexpr):
    """[pixels, queries] offsets of each pixel from each query: (dy, dx) integers from the query's pixel, (ry, rx)
    where the Gaussian is evaluated (floor: dy, dx; exact: pixel centre - (y, x)), and `hit`: inside the footprint."""
    dy = py[:, None] - tl.floor(y).to(tl.int32)[None, :]
    dx = px[:, None] - tl.floor(x).to(tl.int32)[None, :]
    on = e_mask[None, :]
    if METHOD == 0:
        hit = on & (tl.abs(dy) <= RADIUS) & (tl.abs(dx) <= RADIUS)
    elif METHOD == 1:
        hit = on & (dy >= 0) & (dy <= 1) & (dx >= 0) & (dx <= 1)
    else:
        hit = on & (dy == 0) & (dx == 0)
    if EXACT:
        ry = py[:, None].to(tl.float32) + 0.5 - y[None, :]
        rx = px[:, None].to(tl.float32) + 0.5 - x[None, :]
    else:
        ry = dy.to(tl.float32)
        rx = dx.to(tl.float32)
    return dy, dx, ry, rx, hit


@triton.jit
def _splat_fwd_kernel(
    weight_ptr,      # [B, Q] query weights (fp16/bf16/fp32)
    coord_ptr,       # [B, Q, V, 2] (y, x) pixel coordinates
    entry_ptr,       # [B * Q * V * SPAN] int32 candidates ((b * Q + q) * V + v) * SPAN + s, sorted by tile
    offset_ptr,      # [B * V * tiles + 1] int32: tile t's list is entry[offset[t]:offset[t + 1]]
    out_ptr,         # [B, V, H, W] fp32 out: thresholded and clamped map
    raw_ptr,         # [B, V, H, W] fp32 out: map before post-processing (saved for backward)
    den_ptr,         # [B, V, H, W] fp32 out: sum of kernel values (NORMALIZED only; else empty, never read)
    V, H, W, tiles_x,
    threshold, clamp_max, inv_two_sigma_sq, inv_norm, fill, eps,
    METHOD: tl.constexpr,       # 0 gaussian, 1 bilinear, 2 direct
    NORMALIZED: tl.constexpr,
    EXACT: tl.constexpr,
    CLAMP: tl.constexpr,
    RADIUS: tl.constexpr,
    SPAN: tl.constexpr,         # candidates per (query, view): the tiles one footprint can touch
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_Q: tl.constexpr,      # listed queries per loop step
):
    """One program = one tile of map bv = b * V + v; it visits only the queries listed for that tile."""
    tile = tl.program_id(0)
    bv = tl.program_id(1)
    py, px, p_mask = _tile_pixels(tile, tiles_x, H, W, TILE_H, TILE_W)
    start = tl.load(offset_ptr + bv * tl.num_programs(0) + tile)
    end = tl.load(offset_ptr + bv * tl.num_programs(0) + tile + 1)
    num = tl.zeros([TILE_H * TILE_W], dtype=tl.float32)
    den = tl.zeros([TILE_H * TILE_W], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_Q):
        e = e0 + tl.arange(0, BLOCK_Q)
        e_mask = e < end
        _, w, y, x = _listed_queries(entry_ptr, e, e_mask, weight_ptr, coord_ptr, V, SPAN)
        dy, dx, ry, rx, hit = _pair_offsets(py, px, y, x, e_mask, METHOD, EXACT, RADIUS)
        if METHOD == 0:
            k = tl.where(hit, tl.exp(-(ry * ry + rx * rx) * inv_two_sigma_sq) * inv_norm, 0.0)
            num += tl.sum(k * w[None, :], axis=1)
            if NORMALIZED:
                den += tl.sum(k, axis=1)
        elif METHOD == 1:
            fy = (y - tl.floor(y))[None, :]
            fx = (x - tl.floor(x))[None, :]
            k = tl.where(hit, tl.where(dy == 0, 1.0 - fy, fy) * tl.where(dx == 0, 1.0 - fx, fx), 0.0)
            num += tl.sum(k * w[None, :], axis=1)
        else:
            num = tl.maximum(num, tl.max(tl.where(hit, w[None, :], 0.0), axis=1))
    if NORMALIZED:
        raw = (num + fill * eps) / (den + eps)
    else:
        raw = num
    out = tl.where(raw < threshold, 0.0, raw)
    if CLAMP:
        out = tl.minimum(out, clamp_max)
    offs = bv * H * W + py * W + px
    tl.store(out_ptr + offs, out, mask=p_mask)
    tl.store(raw_ptr + offs, raw, mask=p_mask)
    if NORMALIZED:
        tl.store(den_ptr + offs, den, mask=p_mask)


@triton.jit
def _splat_bwd_kernel(
    weight_ptr,      # [B, Q] query weights
    coord_ptr,       # [B, Q, V, 2] (y, x) pixel coordinates
    entry_ptr,       # [B * Q * V * SPAN] int32 candidates sorted by tile (as in the forward)
    offset_ptr,      # [B * V * tiles + 1] int32 list offsets
    grad_out_ptr,    # [B, V, H, W] gradient w.r.t. the post-processed map
    raw_ptr,         # [B, V, H, W] fp32 map before post-processing
    den_ptr,         # [B, V, H, W] fp32 kernel sums (NORMALIZED only; else empty, never read)
    share_w_ptr,     # [B * Q * V * SPAN] fp32 out: this tile's share of d/dw, per candidate
    share_c_ptr,     # [B * Q * V * SPAN, 2] fp32 out: its share of d/d(y, x) (COORD_GRAD only)
    V, H, W, tiles_x,
    threshold, clamp_max, inv_two_sigma_sq, inv_norm, eps,
    METHOD: tl.constexpr,
    NORMALIZED: tl.constexpr,
    EXACT: tl.constexpr,
    CLAMP: tl.constexpr,
    COORD_GRAD: tl.constexpr,
    RADIUS: tl.constexpr,
    SPAN: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """One program = one tile of map bv; the tile's gradient is read once, then each listed query's share of it."""
    tile = tl.program_id(0)
    bv = tl.program_id(1)
    py, px, p_mask = _tile_pixels(tile, tiles_x, H, W, TILE_H, TILE_W)
    pix = bv * H * W + py * W + px
    g = tl.load(grad_out_ptr + pix, mask=p_mask, other=0.0).to(tl.float32)
    raw = tl.load(raw_ptr + pix, mask=p_mask, other=0.0)
    keep = p_mask & (raw >= threshold)
    if CLAMP:
        keep = keep & (raw <= clamp_max)
    g = tl.where(keep, g, 0.0)                 # threshold and clamp pass no gradient
    if NORMALIZED:
        g = g / (tl.load(den_ptr + pix, mask=p_mask, other=0.0) + eps)
    g = g[:, None]
    raw = raw[:, None]
    start = tl.load(offset_ptr + bv * tl.num_programs(0) + tile)
    end = tl.load(offset_ptr + bv * tl.num_programs(0) + tile + 1)
    for e0 in range(start, end, BLOCK_Q):
        e = e0 + tl.arange(0, BLOCK_Q)
        e_mask = e < end
        cand, w, y, x = _listed_queries(entry_ptr, e, e_mask, weight_ptr, coord_ptr, V, SPAN)
        dy, dx, ry, rx, hit = _pair_offsets(py, px, y, x, e_mask, METHOD, EXACT, RADIUS)
        if METHOD == 2:
            share_w = tl.sum(tl.where(hit & (raw == w[None, :]), g, 0.0), axis=0)
        else:
            if METHOD == 0:
                k = tl.where(hit, tl.exp(-(ry * ry + rx * rx) * inv_two_sigma_sq) * inv_norm, 0.0)
                dk_dy = 2.0 * inv_two_sigma_sq * ry * k           # d k / d y (ry = pixel centre - y)
                dk_dx = 2.0 * inv_two_sigma_sq * rx * k
            else:
                fy = (y - tl.floor(y))[None, :]
                fx = (x - tl.floor(x))[None, :]
                ky = tl.where(dy == 0, 1.0 - fy, fy)
                kx = tl.where(dx == 0, 1.0 - fx, fx)
                k = tl.where(hit, ky * kx, 0.0)
                dk_dy = tl.where(hit, tl.where(dy == 0, -1.0, 1.0) * kx, 0.0)
                dk_dx = tl.where(hit, ky * tl.where(dx == 0, -1.0, 1.0), 0.0)
            share_w = tl.sum(g * k, axis=0)
            if COORD_GRAD:
                if NORMALIZED:
                    coef = g * (w[None, :] - raw)                 # d raw / d k_q = (w_q - raw) / (den + eps)
                else:
                    coef = g * w[None, :]
                tl.store(share_c_ptr + cand * 2, tl.sum(coef * dk_dy, axis=0), mask=e_mask)
                tl.store(share_c_ptr + cand * 2 + 1, tl.sum(coef * dk_dx, axis=0), mask=e_mask)
        tl.store(share_w_ptr + cand, share_w, mask=e_mask)


# ------------------------------------------------------------------------------------------------------------------
# Binning and launchers
# ------------------------------------------------------------------------------------------------------------------
def tile_grid(p: SplatParams) -> tuple[int, int, int, int]:
    """(tiles_y, tiles_x, span_y, span_x): the tiles of one map and the most tiles a footprint spans per axis."""
    tiles_y, tiles_x = triton.cdiv(p.height, TILE_H), triton.cdiv(p.width, TILE_W)
    span_y = min((p.window - 1) // TILE_H + 2, tiles_y)
    span_x = min((p.window - 1) // TILE_W + 2, tiles_x)
    return tiles_y, tiles_x, span_y, span_x


def bin_queries(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                p: SplatParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(entries [B*Q*V*SPAN] int32, offsets [B*V*tiles + 1] int32): the candidates of each tile, tile by tile.

    Candidate ((b * Q + q) * V + v) * SPAN + s is the s-th tile of the SPAN = span_y * span_x tiles that the
    footprint of active query q on map (b, v) may touch (the active rule of kernels/splat.py); a candidate whose tile
    the footprint misses, or of an inactive query, sorts past the last tile. The sort is stable, so each list keeps
    the query order and the kernels sum in a fixed order.
    """
    batch, num_queries, views, _ = coords.shape
    tiles_y, tiles_x, span_y, span_x = tile_grid(p)
    y, x = coords.float().unbind(-1)                                               # [B, Q, V]
    row, col = y.floor(), x.floor()
    rows, cols = (p.height - 1, p.width - 1) if p.method == "bilinear" else (p.height, p.width)
    active = (valid & (weights.float()[:, :, None] >= p.threshold)
              & (row >= 0) & (row < rows) & (col >= 0) & (col < cols))
    first_row = torch.where(active, row, 0.0).long() + p.first                    # the footprint's pixel rows
    first_col = torch.where(active, col, 0.0).long() + p.first
    tile_y0, tile_y1 = first_row.clamp(min=0) // TILE_H, (first_row + p.window - 1).clamp(max=p.height - 1) // TILE_H
    tile_x0, tile_x1 = first_col.clamp(min=0) // TILE_W, (first_col + p.window - 1).clamp(max=p.width - 1) // TILE_W
    ty = tile_y0[..., None, None] + torch.arange(span_y, device=coords.device)[:, None]   # [B, Q, V, span_y, 1]
    tx = tile_x0[..., None, None] + torch.arange(span_x, device=coords.device)[None, :]   # [B, Q, V, 1, span_x]
    hit = active[..., None, None] & (ty <= tile_y1[..., None, None]) & (tx <= tile_x1[..., None, None])
    maps = (torch.arange(batch, device=coords.device)[:, None] * views
            + torch.arange(views, device=coords.device)[None, :])[:, None, :, None, None]  # [B, 1, V, 1, 1]
    num_tiles = batch * views * tiles_y * tiles_x
    key = torch.where(hit, (maps * tiles_y + ty) * tiles_x + tx, num_tiles).reshape(-1)
    sorted_key, entries = torch.sort(key, stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(num_tiles + 1, device=coords.device))
    return entries.to(torch.int32), offsets.to(torch.int32)


def _shared_scalars(p: SplatParams) -> tuple:
    return p.threshold, p.clamp_max if p.clamp_max is not None else 0.0, p.inv_two_sigma_sq, p.inv_norm


def _shared_constexprs(p: SplatParams) -> dict:
    """The compile-time switches both kernels share (METHOD: the index in METHODS)."""
    _, _, span_y, span_x = tile_grid(p)
    return dict(METHOD=METHODS.index(p.method), NORMALIZED=p.normalized, EXACT=p.exact,
                CLAMP=p.clamp_max is not None, RADIUS=p.radius, SPAN=span_y * span_x, TILE_H=TILE_H, TILE_W=TILE_W)


def splat_forward_launch(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, p: SplatParams,
                         ) -> tuple[Launch, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The binned forward launch and its outputs (out, raw, den) [B, V, H, W] fp32 (den empty unless normalized)."""
    batch, _, views, _ = coords.shape
    shape = (batch, views, p.height, p.width)
    out = weights.new_empty(shape, dtype=torch.float32)
    raw = torch.empty_like(out)
    den = torch.empty_like(out) if p.normalized else out.new_empty(0)
    entries, offsets = bin_queries(weights, coords, valid, p)
    tiles_y, tiles_x, _, _ = tile_grid(p)
    launch = Launch(
        _splat_fwd_kernel, (tiles_y * tiles_x, batch * views),
        (weights.contiguous(), coords.contiguous(), entries, offsets, out, raw, den,
         views, p.height, p.width, tiles_x, *_shared_scalars(p), p.fill, p.eps),
        dict(BLOCK_Q=BLOCK_Q_FWD, **_shared_constexprs(p)), num_warps=WARPS_FWD)
    return launch, (out, raw, den)


def splat_backward_launch(grad_out: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                          raw: torch.Tensor, den: torch.Tensor, p: SplatParams,
                          ) -> tuple[Launch, tuple[torch.Tensor, torch.Tensor]]:
    """The binned backward launch and its outputs: per-candidate shares of d/dw [B*Q*V*SPAN] and d/d(y, x)
    [B*Q*V*SPAN, 2], fp32 (zero where no tile wrote)."""
    batch, num_queries, views, _ = coords.shape
    tiles_y, tiles_x, span_y, span_x = tile_grid(p)
    share_w = weights.new_zeros(batch * num_queries * views * span_y * span_x, dtype=torch.float32)
    share_c = weights.new_zeros((share_w.numel(), 2), dtype=torch.float32)
    entries, offsets = bin_queries(weights, coords, valid, p)
    launch = Launch(
        _splat_bwd_kernel, (tiles_y * tiles_x, batch * views),
        (weights.contiguous(), coords.contiguous(), entries, offsets, grad_out.contiguous(), raw, den,
         share_w, share_c, views, p.height, p.width, tiles_x, *_shared_scalars(p), p.eps),
        dict(COORD_GRAD=p.coords_differentiable, BLOCK_Q=BLOCK_Q_BWD // 2 if p.coords_differentiable else BLOCK_Q_BWD,
             **_shared_constexprs(p)), num_warps=WARPS_BWD)
    return launch, (share_w, share_c)


def splat_forward_triton(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                         p: SplatParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, raw, den) [B, V, H, W] fp32 from the binning pass and one launch of `_splat_fwd_kernel`."""
    launch, outputs = splat_forward_launch(weights, coords, valid, p)
    if outputs[0].numel() > 0:
        launch()
    return outputs


def splat_backward_triton(grad_out: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                          raw: torch.Tensor, den: torch.Tensor, p: SplatParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weights [B, Q], grad_coords [B, Q, V, 2]), fp32: one launch of `_splat_bwd_kernel`, then each query's
    shares summed over its views and tiles."""
    batch, num_queries, views, _ = coords.shape
    _, _, span_y, span_x = tile_grid(p)
    launch, (share_w, share_c) = splat_backward_launch(grad_out, weights, coords, valid, raw, den, p)
    if share_w.numel() > 0:
        launch()
    return (share_w.view(batch, num_queries, views * span_y * span_x).sum(-1),
            share_c.view(batch, num_queries, views, span_y * span_x, 2).sum(3))
