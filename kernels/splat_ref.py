"""`splat_ref`, the specification of `splat`: its definition (kernels/splat.py, docs/kernels.md) written out.

Every pixel against every query on [B, Q, V, H, W] tensors, in plain PyTorch, naive on purpose. It shares nothing
with the fast paths but the argument checks: the active rule, the window, the Gaussian and its normaliser Z, the
bilinear and direct rules, the normalized convolution, the threshold and the clamp are all derived here from the
definition, so the tests that compare `splat` and `splat_separable` with it check those rules too.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .splat_params import check_splat_inputs


def splat_ref(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, height: int, width: int, *,
              sigma: float, kernel_norm: str = "sum", position: str = "floor", threshold: float = 0.01,
              clamp_max: Optional[float] = 1.5, method: str = "gaussian", kernel_size: Optional[int] = None,
              fill: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """The definition of `splat`, evaluated for every pixel and every query; same arguments and result as `splat`.

    weights [B, Q], coords [B, Q, V, 2] pixel coordinates (y, x), valid [B, Q, V] -> [B, V, H, W] (fp32; float64
    for float64 weights). Differentiable by autograd. Memory O(B Q V H W): for tests and small inputs.
    """
    check_splat_inputs(weights, coords, valid)
    dtype = torch.promote_types(weights.dtype, torch.float32)
    y, x = coords.to(dtype).unbind(-1)                                          # [B, Q, V]
    row, col = y.floor(), x.floor()                                             # the query's pixel c
    # Active: valid, w >= threshold (False for NaN), c inside the map (bilinear: the whole 2 x 2 block inside).
    rows, cols = (height - 1, width - 1) if method == "bilinear" else (height, width)
    active = valid & (weights[:, :, None] >= threshold) & (row >= 0) & (row < rows) & (col >= 0) & (col < cols)
    y, x = torch.where(active, y, 0.0), torch.where(active, x, 0.0)             # keep NaN/inf out of the sums
    row, col = torch.where(active, row, 0.0), torch.where(active, col, 0.0)

    def per_pixel(t: torch.Tensor) -> torch.Tensor:
        """[B, Q, V] -> [B, Q, V, 1, 1], against the [H, 1] rows and [1, W] columns of the map."""
        return t[..., None, None]

    i = torch.arange(height, dtype=dtype, device=weights.device)[:, None]         # pixel row index
    j = torch.arange(width, dtype=dtype, device=weights.device)[None, :]          # pixel column index
    on = per_pixel(active)
    w = torch.where(on, per_pixel(weights.to(dtype)[:, :, None]), 0.0)           # [B, Q, V, 1, 1]
    di, dj = i - per_pixel(row), j - per_pixel(col)                               # [B, Q, V, H, W] p - c

    if method == "gaussian":
        k = kernel_size if kernel_size is not None else int(6 * sigma + 1) // 2 * 2 + 1
        radius = k // 2
        if position == "floor":
            ry, rx = di, dj
        elif position == "exact":
            ry, rx = i + 0.5 - per_pixel(y), j + 0.5 - per_pixel(x)
        else:
            raise ValueError(f"position must be 'floor' or 'exact', got {position!r}")
        g = torch.exp(-(ry ** 2 + rx ** 2) / (2 * sigma ** 2))
        in_window = (di.abs() <= radius) & (dj.abs() <= radius)
        kernel = torch.where(on & in_window, g, 0.0)                              # G_q(p), 0 off the window
        if kernel_norm == "sum":
            offsets = range(-radius, radius + 1)
            z = sum(math.exp(-(a * a + b * b) / (2 * sigma ** 2)) for a in offsets for b in offsets)
            raw = (w * kernel).sum(1) / z
        elif kernel_norm == "peak":
            raw = (w * kernel).sum(1)
        elif kernel_norm == "normalized":
            raw = ((w * kernel).sum(1) + fill * eps) / (kernel.sum(1) + eps)
        else:
            raise ValueError(f"kernel_norm must be 'sum', 'peak' or 'normalized', got {kernel_norm!r}")
    elif method == "bilinear":
        fy, fx = per_pixel(y - row), per_pixel(x - col)
        share_y = torch.where(di == 0, 1 - fy, torch.where(di == 1, fy, 0.0))
        share_x = torch.where(dj == 0, 1 - fx, torch.where(dj == 1, fx, 0.0))
        raw = (w * share_y * share_x).sum(1)
    elif method == "direct":
        landed = torch.where(on & (di == 0) & (dj == 0), w, 0.0)                  # [B, Q, V, H, W]
        no_query = landed.new_zeros(landed[:, :1].shape)                          # max(0, ...), also for Q = 0
        raw = torch.cat([no_query, landed], dim=1).amax(1)
    else:
        raise ValueError(f"method must be 'gaussian', 'bilinear' or 'direct', got {method!r}")

    out = torch.where(raw < threshold, 0.0, raw)
    return out if clamp_max is None else out.clamp(max=clamp_max)
