"""AQR health monitor: the signals of the fork training report's "health checklist", their alarm levels, and map images.

Signals are gathered as device tensors only on monitored forwards (``CmtDetector.loss(batch, monitor=True)``,
which the trainer asks for every ``interval`` steps) and read back with a single host synchronisation. Names (all floats):

- ``{lidar,camera}_weight_{mean,std}``: weights of the rendered queries (visible or not);
- ``{bev,camera}_map_{mean,max}``: rendered weight maps (camera: all views together);
- ``{bev,camera}_relative_change``: sum|out - x| / sum|x| (= mean|out - x| / mean|x|);
- ``{bev,camera}_energy_retention``: sum out^2 / sum x^2;
- ``{bev,camera}_modulated_{mean,std}``: the modulated features.

Alarm levels (the fork's training report, docs/aqr.md): map mean < 0.2, map max > 2.0, relative change > 50 %, modulated mean < 0.01,
query-weight mean < 0.2.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from aqrcmt.config import CAMERA_LAYOUT, CAMERA_NAMES, AQRMonitorConfig
from aqrcmt.kernels import ModulationStats

log = logging.getLogger(__name__)


def weight_signals(prefix: str, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and std of a modality's (B, Q) query weights."""
    w = weights.detach().float()
    return {f"{prefix}_weight_mean": w.mean(), f"{prefix}_weight_std": w.std(unbiased=False)}


def map_signals(prefix: str, maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and max of rendered maps of any shape."""
    m = maps.detach().float()
    return {f"{prefix}_map_mean": m.mean(), f"{prefix}_map_max": m.max()}


def modulation_signals(prefix: str, features: torch.Tensor, stats: ModulationStats) -> dict[str, torch.Tensor]:
    """Feature signals from the modulate kernel's sums over its pass (sum|out-x|, sum|x|, sum out, sum out^2).

    features: the (N, C, H, W) input x; only its squared sum is computed here (for the energy retention).
    """
    abs_change, abs_input, out_sum, out_sq_sum = (t.detach().double() for t in stats)
    count = features.numel()
    in_sq_sum = features.detach().float().square().sum(dtype=torch.float64)
    mean = out_sum / count
    tiny = torch.finfo(torch.float64).tiny
    return {
        f"{prefix}_relative_change": abs_change / abs_input.clamp(min=tiny),
        f"{prefix}_energy_retention": out_sq_sum / in_sq_sum.clamp(min=tiny),
        f"{prefix}_modulated_mean": mean,
        f"{prefix}_modulated_std": (out_sq_sum / count - mean.square()).clamp(min=0).sqrt(),
    }


def find_alarms(stats: dict[str, float], cfg: AQRMonitorConfig) -> list[str]:
    """One message per signal outside the alarm levels, naming signal, value and level."""
    rules = []  # (signal, value, comparison, level, meaning)
    for modality in ("bev", "camera"):
        rules += [
            (f"{modality}_map_mean", "<", cfg.map_mean_min, "weight map too weak: features mostly scaled by the residual"),
            (f"{modality}_map_max", ">", cfg.map_max_max, "weight map too peaked: overlapping splats pile up"),
            (f"{modality}_relative_change", ">", cfg.relative_change_max, "modulation changes features too much"),
            (f"{modality}_modulated_mean", "<", cfg.modulated_mean_min, "modulated features vanish"),
        ]
    for modality in ("lidar", "camera"):
        rules.append((f"{modality}_weight_mean", "<", cfg.query_weight_min, "query weights collapse"))
    alarms = []
    for name, op, level, meaning in rules:
        if name not in stats:
            continue
        value = stats[name]
        if (op == "<" and value < level) or (op == ">" and value > level):
            alarms.append(f"AQR health: {name} = {value:.4g} {op} {level:g} ({meaning})")
    return alarms


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
    """Keeps the last measurement: `last_stats` (floats), `last_alarms` (messages) and `last_view` (sample 0)."""

    def __init__(self, cfg: AQRMonitorConfig):
        self.cfg = cfg
        self.last_stats: dict[str, float] = {}
        self.last_alarms: list[str] = []
        self.last_view: Optional[AQRView] = None

    @property
    def last_maps(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(BEV map (H, W), camera maps (V, h, w)) of the last monitored forward's sample 0, or None."""
        return None if self.last_view is None else (self.last_view.bev_map, self.last_view.camera_maps)

    def record(self, signals: dict[str, torch.Tensor], bev_map: torch.Tensor, camera_maps: torch.Tensor, *,
               features: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
               queries: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> dict[str, float]:
        """Read the signals back (one sync), check alarm levels and log them; keep sample 0's view for images.

        bev_map: (B, H, W); camera_maps: (B, V, h, w); features: the modulated inputs (x (B, C, H, W),
        x_img (B * V, C, h, w)); queries: (BEV coords (B, Q, 1, 2), camera coords (B, Q, V, 2), camera valid
        (B, Q, V)) of the rendered queries.
        """
        values = torch.stack([v.reshape(()).double() for v in signals.values()]).tolist()
        self.last_stats = dict(zip(signals, values))
        self.last_alarms = find_alarms(self.last_stats, self.cfg)
        for message in self.last_alarms:
            log.warning(message)
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

    def save_images(self, path: str | Path, title: str = "") -> Path:
        """Write the last recorded maps (sample 0) as a PNG; see save_weight_maps."""
        if self.last_maps is None:
            raise RuntimeError("no weight maps recorded yet: run a monitored forward first (loss(batch, monitor=True))")
        path = Path(path)
        return save_weight_maps(path if path.suffix else path.with_suffix(".png"), *self.last_maps, title=title)


def save_weight_maps(path: str | Path, bev_map: torch.Tensor, camera_maps: torch.Tensor, title: str = "") -> Path:
    """PNG of one sample's BEV weight map (x right, y up) and its camera maps (nuScenes layout for six views).

    bev_map: (H, W); camera_maps: (V, h, w). One shared colour scale, so maps are comparable.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bev = bev_map.detach().float().cpu().numpy()
    cams = camera_maps.detach().float().cpu().numpy()
    vmax = max(float(bev.max()), float(cams.max()), 1e-6)
    fig = plt.figure(figsize=(16, 5.5))
    grid = fig.add_gridspec(2, 5)
    ax = fig.add_subplot(grid[:, :2])
    image = ax.imshow(bev, origin="lower", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_title(f"BEV (mean {bev.mean():.3g}, max {bev.max():.3g})")
    ax.set_xlabel("x bin")
    ax.set_ylabel("y bin")
    for v in range(cams.shape[0]):
        name = CAMERA_NAMES[v] if cams.shape[0] == len(CAMERA_NAMES) else f"view {v}"
        row, col = CAMERA_LAYOUT.get(name, divmod(v, 3))
        cam_ax = fig.add_subplot(grid[row, 2 + col])
        cam_ax.imshow(cams[v], cmap="viridis", vmin=0, vmax=vmax)
        cam_ax.set_title(f"{name} (mean {cams[v].mean():.3g})", fontsize=8)
        cam_ax.axis("off")
    fig.colorbar(image, ax=fig.axes, shrink=0.8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
