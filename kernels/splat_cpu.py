"""The separable PyTorch path of `splat`: what CPU tensors run, and `splat_separable`, the same path called directly.

gaussian + position "floor": an impulse image (the active weights added at their pixels) blurred with the separable
k x k Gaussian (a k x 1 and a 1 x k convolution); the backward is the same blur of the gated gradient, read at the
query pixels. Every other option: the fixed-shape T x T window of every (b, q, v) with separable row/column kernel
factors, `index_add` forward (`scatter_reduce(amax)` for direct) and matrix-vector window sums backward. No
per-query Python loop and no data-dependent shapes. The semantics: kernels/splat.py.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .splat_params import SplatParams, accumulation_dtype, check_splat_inputs


def _postprocess(raw: torch.Tensor, p: SplatParams) -> torch.Tensor:
    """out = 0 where raw < threshold, then min(out, clamp_max)."""
    out = torch.where(raw < p.threshold, 0.0, raw)
    return out if p.clamp_max is None else out.clamp(max=p.clamp_max)


class _Queries(NamedTuple):
    """Per (b, q, v): which queries are active, their sanitized coordinates and integer pixel."""
    active: torch.Tensor        # [B, Q, V] bool
    y: torch.Tensor             # [B, Q, V] float (0 where inactive)
    x: torch.Tensor
    cy: torch.Tensor            # [B, Q, V] int64 floor(y)
    cx: torch.Tensor
    map_base: torch.Tensor      # [B, 1, V] int64: flat offset of map (b, v) in [B*V*H*W]


def _queries(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, p: SplatParams) -> _Queries:
    batch, _, views, _ = coords.shape
    y, x = coords[..., 0], coords[..., 1]
    hi_y, hi_x = (p.height - 1, p.width - 1) if p.method == "bilinear" else (p.height, p.width)
    active = valid & (weights[:, :, None] >= p.threshold) & (y >= 0) & (y < hi_y) & (x >= 0) & (x < hi_x)
    y = torch.where(active, y, 0.0)
    x = torch.where(active, x, 0.0)
    dev = coords.device
    map_base = (torch.arange(batch, device=dev)[:, None, None] * views
                + torch.arange(views, device=dev)[None, None, :]) * (p.height * p.width)
    return _Queries(active, y, x, y.floor().long(), x.floor().long(), map_base)


class _Footprint(NamedTuple):
    """The T x T window of pixels each (b, q, v) touches, with separable, masked kernel factors.

    The kernel value at window pixel (i, j) is ky[i] * kx[j] * inv_norm; ky is 0 on rows outside the map and for
    inactive queries, kx on columns outside the map, so the product needs no T x T mask.
    """
    index: torch.Tensor         # [B, Q, V, T, T] flat pixel index into [B*V*H*W] (clamped into the map)
    ky: torch.Tensor            # [B, Q, V, T] row factors
    kx: torch.Tensor            # [B, Q, V, T] column factors
    dky: torch.Tensor           # [B, Q, V, T] d ky / d y
    dkx: torch.Tensor           # [B, Q, V, T] d kx / d x


def _footprint(qs: _Queries, p: SplatParams, dtype: torch.dtype) -> _Footprint:
    offsets = torch.arange(p.first, p.first + p.window, device=qs.cy.device)
    py = qs.cy[..., None] + offsets                                     # [B, Q, V, T]
    px = qs.cx[..., None] + offsets
    index = (qs.map_base[..., None, None] + py.clamp(0, p.height - 1)[..., :, None] * p.width
             + px.clamp(0, p.width - 1)[..., None, :])
    row_ok = qs.active[..., None] & (py >= 0) & (py < p.height)
    col_ok = (px >= 0) & (px < p.width)
    if p.method == "gaussian":
        if p.exact:
            ry = py.to(dtype) + 0.5 - qs.y[..., None]
            rx = px.to(dtype) + 0.5 - qs.x[..., None]
        else:
            ry = rx = offsets.to(dtype).expand(py.shape)
        ky, kx = torch.exp(-ry * ry * p.inv_two_sigma_sq), torch.exp(-rx * rx * p.inv_two_sigma_sq)
        dky, dkx = 2 * p.inv_two_sigma_sq * ry * ky, 2 * p.inv_two_sigma_sq * rx * kx
    elif p.method == "bilinear":
        first = offsets == 0
        fy = (qs.y - qs.y.floor())[..., None]
        fx = (qs.x - qs.x.floor())[..., None]
        ky, kx = torch.where(first, 1 - fy, fy), torch.where(first, 1 - fx, fx)
        dky = dkx = torch.where(first, -1.0, 1.0).to(dtype).expand(ky.shape)
    else:
        ky = kx = torch.ones(py.shape, dtype=dtype, device=py.device)
        dky = dkx = torch.zeros_like(ky)
    zero = torch.zeros((), dtype=dtype, device=py.device)
    return _Footprint(index, torch.where(row_ok, ky, zero), torch.where(col_ok, kx, zero),
                      torch.where(row_ok, dky, zero), torch.where(col_ok, dkx, zero))


def _blur(images: torch.Tensor, p: SplatParams) -> torch.Tensor:
    """Zero-padded 'same' convolution of [N, 1, H, W] images with the k x k integer-offset Gaussian times 1/Z.

    The kernel is separable (G = g g^T), so it runs as a k x 1 and a 1 x k convolution.
    """
    offsets = torch.arange(p.first, p.first + p.window, device=images.device, dtype=images.dtype)
    g = torch.exp(-offsets * offsets * p.inv_two_sigma_sq)
    rows = F.conv2d(images, g.view(1, 1, -1, 1), padding=(p.radius, 0))
    return F.conv2d(rows, g.view(1, 1, 1, -1), padding=(0, p.radius)) * p.inv_norm


def _impulses(values: torch.Tensor, qs: _Queries, p: SplatParams, shape: tuple[int, ...]) -> torch.Tensor:
    """Sum of values[b, q, v] at each active query pixel: [B*V, 1, H, W]."""
    index = qs.map_base + qs.cy * p.width + qs.cx
    flat = values.new_zeros(math.prod(shape))
    flat = flat.index_add(0, index.reshape(-1), torch.where(qs.active, values, 0.0).reshape(-1))
    return flat.view(-1, 1, p.height, p.width)


def splat_forward_separable(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                            p: SplatParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, raw, den) as the Triton kernel computes them; differentiable by autograd."""
    acc = accumulation_dtype(weights)
    batch, _, views, _ = coords.shape
    shape = (batch, views, p.height, p.width)
    qs = _queries(weights, coords.to(acc), valid, p)
    w = torch.where(qs.active, weights.to(acc)[:, :, None], 0.0)          # [B, Q, V]; NaN weights are inactive
    den = w.new_empty(0)
    if p.method == "gaussian" and not p.exact:
        num = _blur(_impulses(w, qs, p, shape), p).view(shape)
        if p.normalized:
            den = _blur(_impulses(torch.ones_like(w), qs, p, shape), p).view(shape)
    else:
        fp = _footprint(qs, p, acc)
        index = fp.index.reshape(-1)
        flat = w.new_zeros(math.prod(shape))
        kernel = fp.ky[..., :, None] * fp.kx[..., None, :] * p.inv_norm            # [B, Q, V, T, T]
        values = (kernel * w[..., None, None]).reshape(-1)
        if p.method == "direct":
            num = flat.scatter_reduce(0, index, values, "amax").view(shape)
        else:
            num = flat.index_add(0, index, values).view(shape)
            if p.normalized:
                den = flat.index_add(0, index, kernel.reshape(-1)).view(shape)
    raw = (num + p.fill * p.eps) / (den + p.eps) if p.normalized else num
    return _postprocess(raw, p), raw, den


def splat_backward_separable(grad_out: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor,
                             valid: torch.Tensor, raw: torch.Tensor, den: torch.Tensor,
                             p: SplatParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weights, grad_coords) of the post-processed map, written out (the backward CPU tensors run)."""
    acc = raw.dtype
    batch, _, views, _ = coords.shape
    qs = _queries(weights, coords.to(acc), valid, p)
    w = torch.where(qs.active, weights.to(acc)[:, :, None], 0.0)
    keep = raw >= p.threshold
    if p.clamp_max is not None:
        keep = keep & (raw <= p.clamp_max)
    g = torch.where(keep, grad_out.to(acc), 0.0)
    if p.normalized:
        g = g / (den + p.eps)
    grad_c = coords.new_zeros(coords.shape, dtype=acc)
    if p.method == "gaussian" and not p.exact:
        # The kernel is symmetric, so correlating g with it gives each pixel's d(loss)/d(weight of a query there).
        field = _blur(g.reshape(-1, 1, p.height, p.width), p)
        per_query = field.reshape(-1)[qs.map_base + qs.cy * p.width + qs.cx]
        return torch.where(qs.active, per_query, 0.0).sum(-1), grad_c
    fp = _footprint(qs, p, acc)
    g = g.reshape(-1)[fp.index]                                             # [B, Q, V, T, T]
    if p.method == "direct":
        hit = (raw.reshape(-1)[fp.index] == w[..., None, None]) & (fp.ky[..., :, None] * fp.kx[..., None, :] > 0)
        return torch.where(hit, g, 0.0).sum((-1, -2, -3)), grad_c
    # Window sums with the separable kernel as matrix-vector products: g_rows[i] = sum_j g[i, j] kx[j].
    g_rows = (g @ fp.kx[..., :, None])[..., 0]
    grad_w = (g_rows * fp.ky).sum((-1, -2)) * p.inv_norm
    if p.coords_differentiable:
        if p.normalized:       # d raw / d y_q = (w_q - raw) sum G'_q / (den + eps); g already carries 1 / (den + eps)
            g = g * (w[..., None, None] - raw.reshape(-1)[fp.index])
        else:                  # d raw / d y_q = w_q sum G'_q / Z
            g = g * w[..., None, None]
        g_rows = (g @ fp.kx[..., :, None])[..., 0]
        g_cols = (fp.ky[..., None, :] @ g)[..., 0, :]                   # sum_i ky[i] g[i, j]
        grad_c = torch.stack([(g_rows * fp.dky).sum(-1), (g_cols * fp.dkx).sum(-1)], dim=-1) * p.inv_norm
    return grad_w, grad_c


def splat_separable(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, height: int, width: int, *,
                    sigma: float, kernel_norm: str = "sum", position: str = "floor", threshold: float = 0.01,
                    clamp_max: Optional[float] = 1.5, method: str = "gaussian", kernel_size: Optional[int] = None,
                    fill: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """The fast PyTorch path of `splat` (what `splat` runs on CPU tensors), called directly: same arguments, same
    result as `splat_ref` (the tests check it), differentiable by plain autograd (the op uses the written-out
    backward instead). Cost O(B Q V k^2 + B V H W k), no [pixels x queries] intermediate."""
    check_splat_inputs(weights, coords, valid)
    p = SplatParams.build(height, width, method=method, kernel_norm=kernel_norm, position=position, sigma=sigma,
                          kernel_size=kernel_size, threshold=threshold, clamp_max=clamp_max, fill=fill, eps=eps)
    return splat_forward_separable(weights, coords, valid, p)[0]
