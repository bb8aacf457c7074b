"""Rendering per-query weights into dense weight maps (BEV and the six camera maps) with the splat kernel.

The maps are differentiable in the query weights (the fork turned each weight into a Python float, so its
generator never received a gradient). Post-processing (threshold, clamp) is per pixel, i.e. per view as in
the fork. Which kernel normalisation keeps the map's magnitude is discussed in docs/aqr.md.
"""
from __future__ import annotations

import torch

from aqrcmt.config import AQRRenderConfig
from aqrcmt.kernels import splat
from aqrcmt.models.aqr.projection import Projection


def render_map(weights: torch.Tensor, projection: Projection, cfg: AQRRenderConfig, sigma: float) -> torch.Tensor:
    """Splat (B, Q) query weights at their projected pixels: returns (B, V, H, W) with (H, W) = projection.size.

    Weights below 0 (tanh generator) are clamped to 0, as the fork did; invalid projections are skipped.
    """
    if weights.shape != projection.valid.shape[:2]:
        raise ValueError(f"weights {tuple(weights.shape)} do not match the projection's (B, Q) = "
                         f"{tuple(projection.valid.shape[:2])}")
    height, width = projection.size
    return splat(weights.clamp(min=0.0), projection.coords, projection.valid, height, width,
                 sigma=sigma, kernel_norm=cfg.kernel_norm, position=cfg.position, threshold=cfg.threshold,
                 clamp_max=cfg.clamp_max, method=cfg.method, fill=cfg.fill)


def pile_invisible_at_origin(cameras: Projection) -> Projection:
    """The fork's placement of queries that no camera sees: pixel (0, 0) of view 0 (``invisible_queries``)."""
    invisible = ~cameras.valid.any(dim=-1)                                         # (B, Q)
    valid = cameras.valid.clone()
    valid[..., 0] |= invisible
    coords = cameras.coords.clone()
    coords[..., 0, :] = torch.where(invisible[..., None], torch.zeros_like(coords[..., 0, :]), coords[..., 0, :])
    return Projection(coords, valid, cameras.size)


def divide_by_max(maps: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """maps / their maximum over `dims` (an all-zero map stays 0): the fork's max normalisation."""
    peak = maps.amax(dim=dims, keepdim=True)
    return maps / peak.clamp(min=torch.finfo(maps.dtype).tiny)


def render_weight_maps(lidar_weights: torch.Tensor, camera_weights: torch.Tensor, bev: Projection,
                       cameras: Projection, cfg: AQRRenderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(BEV map (B, H, W), camera maps (B, V, h, w)) from the (B, Q) LiDAR and camera weights.

    ``cfg.invisible_queries`` and ``cfg.normalize`` switch on the fork's behaviours (see AQRRenderConfig).
    """
    if cfg.invisible_queries == "pile_at_origin":
        cameras = pile_invisible_at_origin(cameras)
    bev_map = render_map(lidar_weights, bev, cfg, cfg.sigma_bev)[:, 0]
    camera_maps = render_map(camera_weights, cameras, cfg, cfg.sigma_camera)
    if cfg.normalize != "none":
        bev_map = divide_by_max(bev_map, (1, 2))
        camera_maps = divide_by_max(camera_maps, (2, 3) if cfg.normalize == "max_per_map" else (1, 2, 3))
    return bev_map, camera_maps
