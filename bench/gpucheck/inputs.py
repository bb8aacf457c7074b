"""Synthetic inputs of the device check and the kernel benchmarks: kernel operands at given sizes, scene batches."""
from __future__ import annotations

from typing import Optional

import torch

from aqrcmt.config import Config
from aqrcmt.data.synthetic_batch import synthetic_batch
from aqrcmt.structures import Batch

from .plan import InputSizes, KernelSizes

SPLAT_OPTIONS = {           # name -> splat keyword arguments
    "user": dict(sigma=1.0, kernel_norm="sum", threshold=0.01, clamp_max=1.5),       # the AQR fork's renderer
    "recommended": dict(sigma=2.0, kernel_norm="normalized", threshold=0.0, clamp_max=None, fill=1.0),
    "exact": dict(sigma=2.0, position="exact"),
    "bilinear": dict(method="bilinear", sigma=2.0),        # sigma is required, and unused by these two methods
    "direct": dict(method="direct", sigma=2.0),
}
MODULATE_OPTIONS = {        # name -> (modulate keyword arguments)
    "element_wise_stats": dict(alpha=1.0, beta=0.7, mode="element_wise", return_stats=True),
    "adaptive_convex": dict(alpha=0.5, beta=0.5, mode="adaptive"),
}


def splat_inputs(sizes: KernelSizes, kind: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """weights [B, Q] ~ N(0.45, 0.1) clamped to [0, 1]; coords [B, Q, V, 2] uniform over the map; valid: BEV all,
    camera 70 % of the queries in one random view. Returns (weights, coords, valid, H, W)."""
    views, height, width = sizes.map_shape(kind)
    gen = torch.Generator().manual_seed(seed)
    b, q = sizes.batch, sizes.queries
    weights = (0.45 + 0.1 * torch.randn(b, q, generator=gen)).clamp(0, 1)
    coords = torch.rand(b, q, views, 2, generator=gen) * torch.tensor([height, width], dtype=torch.float32)
    valid = torch.nn.functional.one_hot(torch.randint(views, (b, q), generator=gen), views).bool()
    valid &= torch.rand(b, q, 1, generator=gen) < 0.7
    if views == 1:
        valid[:] = True
    return weights.to(device, dtype), coords.to(device, dtype), valid.to(device), height, width


def feature_inputs(sizes: KernelSizes, kind: str, dtype: torch.dtype, device: torch.device, maps: int = 0,
                   seed: int = 0):
    """x [N, C, H, W] ~ N(0, 1) in dtype and w [N, H, W] ~ U(0, 1) fp32; N = B (BEV) or B*V (camera) or `maps`."""
    views, height, width = sizes.map_shape(kind)
    n = maps or sizes.batch * views
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, sizes.channels, height, width, generator=gen, device=device).to(dtype)
    w = torch.rand(n, height, width, generator=gen, device=device)
    return x, w


def scene_batch(cfg: Config, batch_size: int, scene: InputSizes, seed: int, boxes: Optional[int] = None,
                ground: Optional[int] = None) -> Batch:
    """synthetic_batch at the config's image size with `scene`'s point and box counts (optionally varied)."""
    count = scene.boxes if boxes is None else boxes
    return synthetic_batch(cfg.model, batch_size=batch_size, num_boxes=(count,) * batch_size,
                           points_per_box=scene.points_per_box,
                           num_ground_points=scene.ground_points if ground is None else ground, seed=seed)
