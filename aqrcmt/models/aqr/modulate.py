"""Feature modulation by a rendered weight map with the fused kernel: ``out = x * (alpha * w + beta)``.

Residual forms (r = residual_weight):
- ``additive`` (the fork's code): ``out = x * w + r * x``, i.e. alpha = 1, beta = r. With w ~ 0.01 (a
  sum-normalised kernel) this scales every feature by ~r: a global attenuation, not a re-weighting.
- ``convex``: ``out = (1 - r) * x * w + r * x``, i.e. alpha = 1 - r, beta = r: out = x exactly where w = 1.
Modes (in the kernel): element_wise uses w per pixel, channel_wise the map's mean, adaptive 0.7 / 0.3 of both.
"""
from __future__ import annotations

import torch

from aqrcmt.config import AQRModulateConfig
from aqrcmt.kernels import modulate


def residual_coefficients(cfg: AQRModulateConfig) -> tuple[float, float]:
    """(alpha, beta) of out = x * (alpha * w + beta) for the configured residual form."""
    r = cfg.residual_weight
    if cfg.residual_form == "additive":
        return 1.0, r
    if cfg.residual_form == "convex":
        return 1.0 - r, r
    raise ValueError(f"unknown residual_form {cfg.residual_form!r}; expected 'additive' or 'convex'")


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1] of (N, H, W) maps; a constant map becomes 0.5 (the fork's convention)."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    normalized = torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(maps.dtype).tiny),
                             torch.full_like(flat, 0.5))
    return normalized.view_as(maps)


def modulate_features(features: torch.Tensor, maps: torch.Tensor, cfg: AQRModulateConfig,
                      return_stats: bool = False):
    """Modulate (N, C, H, W) features by (N, H, W) weight maps.

    Returns the modulated features, plus, with return_stats, the kernel's ModulationStats
    (sum |out - x|, sum |x|, sum out, sum out^2 as 0-d device tensors; no host synchronisation).
    """
    if features.dim() != 4 or maps.shape != (features.shape[0], *features.shape[2:]):
        raise ValueError(f"weight maps {tuple(maps.shape)} do not match features {tuple(features.shape)} "
                         f"(expected (N, H, W) = {(features.shape[0], *features.shape[2:])})")
    if cfg.prenormalize:
        maps = minmax_normalize(maps)
    alpha, beta = residual_coefficients(cfg)
    return modulate(features, maps.to(features.dtype), alpha=alpha, beta=beta, mode=cfg.mode,
                    return_stats=return_stats)
