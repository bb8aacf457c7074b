"""AQR health monitor: the signals of the fork training report's "health checklist", and the last maps seen.

Signals are gathered as device tensors only on monitored forwards (``CmtDetector.loss(batch, monitor=True)``,
which the trainer asks for every ``interval`` steps) and read back with a single host synchronisation. Names (all floats):

- ``{lidar,camera}_weight_{mean,std,min,max}``: weights of the rendered queries (visible or not);
- ``{bev,camera}_map_{mean,max}``: rendered weight maps (camera: all views together), and per camera view
  ``cam_front_map_{mean,max}`` ... (the view's name in lower case; ``view{v}_...`` for other rigs than six views);
- ``{bev,camera}_relative_change``: sum|out - x| / sum|x| (= mean|out - x| / mean|x|);
- ``{bev,camera}_energy_retention``: sum out^2 / sum x^2;
- ``{bev,camera}_modulated_{mean,std,rms,min,max}``: the modulated features; ``{bev,camera}_mean_change``:
  mean(out) - mean(x).

The checks of these signals (their levels, the alarms and notices) are :mod:`aqrcmt.training.alarms`; the
picture of a recorded :class:`AQRView` is :func:`aqrcmt.eval.visualize.render_aqr`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from aqrcmt.structures import CAMERA_NAMES
from aqrcmt.kernels import ModulationStats


def weight_signals(prefix: str, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, std, min and max of a modality's (B, Q) query weights."""
    w = weights.detach().float()
    return {f"{prefix}_weight_mean": w.mean(), f"{prefix}_weight_std": w.std(unbiased=False),
            f"{prefix}_weight_min": w.min(), f"{prefix}_weight_max": w.max()}


def map_signals(prefix: str, maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and max of rendered maps of any shape."""
    m = maps.detach().float()
    return {f"{prefix}_map_mean": m.mean(), f"{prefix}_map_max": m.max()}


def view_name(view: int, num_views: int) -> str:
    """Signal prefix of camera view `view`: its nuScenes name in lower case for six views, else ``view{v}``."""
    return CAMERA_NAMES[view].lower() if num_views == len(CAMERA_NAMES) else f"view{view}"


def camera_map_signals(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and max of (B, V, h, w) camera maps over all views (``camera_map_*``) and per view, so that one
    dark view is not hidden by the other five."""
    out = map_signals("camera", maps)
    for v in range(maps.shape[1]):
        out.update(map_signals(view_name(v, maps.shape[1]), maps[:, v]))
    return out


def modulation_signals(prefix: str, features: torch.Tensor, stats: ModulationStats,
                       output: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Feature signals from the modulate kernel's sums over its pass (sum|out-x|, sum|x|, sum out, sum out^2).

    features: the (N, C, H, W) input x (its sum and squared sum are computed here); output: the modulated
    features, for their min and max (left out without it).
    """
    abs_change, abs_input, out_sum, out_sq_sum = (t.detach().double() for t in stats)
    count = features.numel()
    x = features.detach().float()
    in_sq_sum = x.square().sum(dtype=torch.float64)
    mean = out_sum / count
    tiny = torch.finfo(torch.float64).tiny
    signals = {
        f"{prefix}_relative_change": abs_change / abs_input.clamp(min=tiny),
        f"{prefix}_energy_retention": out_sq_sum / in_sq_sum.clamp(min=tiny),
        f"{prefix}_modulated_mean": mean,
        f"{prefix}_modulated_std": (out_sq_sum / count - mean.square()).clamp(min=0).sqrt(),
        f"{prefix}_modulated_rms": (out_sq_sum / count).sqrt(),
        f"{prefix}_mean_change": mean - x.sum(dtype=torch.float64) / count,
    }
    if output is not None:
        out = output.detach()
        signals.update({f"{prefix}_modulated_min": out.min(), f"{prefix}_modulated_max": out.max()})
    return signals


@dataclass
class AQRView:
    """What the AQR step saw and rendered for one sample (sample 0 of a monitored forward), for pictures.

    bev_map: (H, W) and camera_maps: (V, h, w) the rendered weight maps; bev_features: (H, W) and
    camera_features: (V, h, w) the mean |x| over channels of the features they modulate (None when not recorded);
    bev_queries: (Q, 2) (y, x) BEV pixels of the rendered queries; camera_queries: (Q, V, 2) (y, x) feature-map
    pixels, camera_valid: (Q, V) True where query q lies in view v.
    """
    bev_map: torch.Tensor
    camera_maps: torch.Tensor
    bev_features: Optional[torch.Tensor] = None
    camera_features: Optional[torch.Tensor] = None
    bev_queries: Optional[torch.Tensor] = None
    camera_queries: Optional[torch.Tensor] = None
    camera_valid: Optional[torch.Tensor] = None


class HealthMonitor:
    """Keeps the last measurement: `last_stats` (floats) and `last_view` (sample 0: maps, features, queries)."""

    def __init__(self) -> None:
        self.last_stats: dict[str, float] = {}
        self.last_view: Optional[AQRView] = None

    def record(self, signals: dict[str, torch.Tensor], bev_map: torch.Tensor, camera_maps: torch.Tensor, *,
               features: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
               queries: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> dict[str, float]:
        """Read the signals back (one sync); keep sample 0's view for images.

        bev_map: (B, H, W); camera_maps: (B, V, h, w); features: the modulated inputs (x (B, C, H, W),
        x_img (B * V, C, h, w)); queries: (BEV coords (B, Q, 1, 2), camera coords (B, Q, V, 2), camera valid
        (B, Q, V)) of the rendered queries.
        """
        values = torch.stack([v.reshape(()).double() for v in signals.values()]).tolist()
        self.last_stats = dict(zip(signals, values))
        view = AQRView(bev_map[0].detach(), camera_maps[0].detach())
        if features is not None:
            x, x_img = features
            view.bev_features = x[0].detach().float().abs().mean(0)
            view.camera_features = x_img[: camera_maps.shape[1]].detach().float().abs().mean(1)
        if queries is not None:
            bev, cameras, valid = (q[0].detach() for q in queries)
            view.bev_queries, view.camera_queries, view.camera_valid = bev[:, 0], cameras, valid
        self.last_view = view
        return self.last_stats
