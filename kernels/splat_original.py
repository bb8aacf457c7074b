"""The original AQR renderer (the fork's WeightRenderer), rewritten as a plain loop over queries.

Written apart from the specification and the fast paths: tests/test_kernels_splat.py checks `splat_ref` and
`splat_separable` against it, and bench/bench_kernels.py times it as the baseline the kernels replace.
"""
from __future__ import annotations

from typing import Optional

import torch


def original_loop_splat(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, height: int, width: int, *,
                        sigma: float, method: str = "gaussian", peak: bool = False, threshold: float = 0.01,
                        clamp_max: Optional[float] = 1.5) -> torch.Tensor:
    """The original WeightRenderer, one query at a time (python floats, int() pixels, the kernel added to the
    cropped window slice, per-map post-processing). [B, V, H, W] float64.

    weights [B, Q], coords [B, Q, V, 2] pixel coordinates (y, x), valid [B, Q, V]; peak=True skips the kernel's
    normalisation to unit sum.
    """
    batch, num_queries, views, _ = coords.shape
    size = int(6 * sigma + 1)
    size += 1 - size % 2                                                   # made odd, as the original does
    half = size // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma ** 2))
    kernel = kernel if peak else kernel / kernel.sum()
    maps = torch.zeros(batch, views, height, width, dtype=torch.float64)
    for b in range(batch):
        for v in range(views):
            m = maps[b, v]
            for q in range(num_queries):
                w = float(weights[b, q])
                if not valid[b, q, v] or w < threshold:
                    continue
                fy, fx = float(coords[b, q, v, 0]), float(coords[b, q, v, 1])
                y, x = int(fy), int(fx)
                if method == "bilinear":
                    if not (0 <= y < height - 1 and 0 <= x < width - 1):
                        continue
                    ty, tx = fy - y, fx - x
                    m[y, x] += w * (1 - ty) * (1 - tx)
                    m[y, x + 1] += w * (1 - ty) * tx
                    m[y + 1, x] += w * ty * (1 - tx)
                    m[y + 1, x + 1] += w * ty * tx
                    continue
                if not (0 <= y < height and 0 <= x < width):
                    continue
                if method == "direct":
                    m[y, x] = max(float(m[y, x]), w)
                    continue
                y0, y1, x0, x1 = max(0, y - half), min(height, y + half + 1), max(0, x - half), min(width, x + half + 1)
                m[y0:y1, x0:x1] += w * kernel[y0 - y + half:y1 - y + half, x0 - x + half:x1 - x + half]
    maps[maps < threshold] = 0
    return maps if clamp_max is None else maps.clamp(0, clamp_max)
