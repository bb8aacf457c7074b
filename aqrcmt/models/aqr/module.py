"""AQRModulation: the AQR step of the CMT head (after shared_conv and the DN preparation, before the transformer).

    reference points --projection--> BEV pixel, (view, y, x) pixels
    query_pos + local windows of (x, x_img) --AQRWeightGenerator--> LiDAR weight, camera weight per query
    weights --render (splat kernel)--> BEV weight map (B, H, W), camera weight maps (B, 6, h, w)
    x, x_img --modulate (fused kernel)--> x * (alpha * W + beta)
    weights, query positions --> QueryRouting (router supervision, routing.py)

Denoising queries (the first ``num_dn``) carry noised ground-truth positions during training; rendering their
weights would paint the GT layout into the features the matching queries see, so by default
(``render_dn_queries=False``) only the matching queries are rendered.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional

import torch
from torch import nn

from aqrcmt.config import AQRConfig, HeadConfig
from aqrcmt.models.aqr.generator import AQRWeightGenerator
from aqrcmt.models.aqr.modulate import modulate_features
from aqrcmt.models.aqr.monitor import (HealthMonitor, camera_map_signals, map_signals, modulation_signals,
                                       weight_signals)
from aqrcmt.models.aqr.projection import Projection, project_to_bev, project_to_cameras
from aqrcmt.models.aqr.render import render_weight_maps
from aqrcmt.models.aqr.routing import QueryRouting


class Modulated(NamedTuple):
    """AQRModulation's output: the modulated BEV (B, C, H, W) and camera (B*V, C, h, w) features, and the weights."""
    bev: torch.Tensor
    camera: torch.Tensor
    routing: QueryRouting


class AQRModulation(nn.Module):
    """Re-weights the BEV and camera feature maps by rendered per-query modality weights.

    pc_range: (x_min, y_min, z_min, x_max, y_max, z_max) metres; bev_size: (H, W) of the BEV map.
    Health signals (monitor.py) are measured only in forwards with ``monitor_this_step`` True (set for one
    forward by :meth:`monitoring`, which ``CmtDetector.loss(batch, monitor=True)`` uses); ``last_stats`` then
    holds them as floats and ``monitor.last_view`` the last maps (drawn by ``aqrcmt.eval.visualize.render_aqr``).
    """

    def __init__(self, cfg: AQRConfig, *, head_cfg: HeadConfig, pc_range: tuple[float, ...],
                 bev_size: tuple[int, int]):
        super().__init__()
        self.cfg = cfg
        self.pc_range = tuple(float(v) for v in pc_range)
        self.bev_size = tuple(bev_size)
        x_min, y_min, _, x_max, y_max, _ = self.pc_range
        sensor = torch.tensor([[[-x_min / (x_max - x_min), -y_min / (y_max - y_min), 0.0]]])    # LiDAR origin
        sensor_pixel = tuple(project_to_bev(sensor, self.bev_size).coords[0, 0, 0].tolist())
        self.weight_generator = AQRWeightGenerator(cfg.generator, head_cfg.hidden_dim, cfg.identity_start,
                                                   self.bev_size, sensor_pixel)
        self.monitor = HealthMonitor()
        self.monitor_this_step = False
        self.last_routing: Optional[QueryRouting] = None       # detached, of the last forward (evaluations read it)

    @property
    def last_stats(self) -> dict[str, float]:
        return self.monitor.last_stats

    @contextmanager
    def monitoring(self, enabled: bool = True) -> Iterator[HealthMonitor]:
        """Measure the health signals in the forwards run inside this block (when `enabled`); the flag is
        reset on exit, so later forwards (e.g. an evaluation) are not monitored."""
        self.monitor_this_step = enabled
        try:
            yield self.monitor
        finally:
            self.monitor_this_step = False

    def query_weights(self, x: torch.Tensor, x_img: torch.Tensor, *, query_pos: torch.Tensor,
                      bev_pos: torch.Tensor, rv_pos: torch.Tensor, reference_points: torch.Tensor,
                      lidar2img: torch.Tensor, img_shape: tuple[int, int],
                      num_dn: int = 0) -> tuple[QueryRouting, Projection, Projection]:
        """The weights (B, Q) and positions of the queries to render, and their BEV / camera projections.

        Arguments as for forward; Q = Nq, or Nq - num_dn when denoising queries are not rendered.
        """
        b, _, bev_h, bev_w = x.shape
        if (bev_h, bev_w) != self.bev_size:
            raise ValueError(f"BEV features are {(bev_h, bev_w)}, AQR was built for bev_size {self.bev_size}")
        if x_img.shape[0] % b or x_img.shape[0] // b != lidar2img.shape[1]:
            raise ValueError(f"x_img has {x_img.shape[0]} maps, expected B * V = {b} * {lidar2img.shape[1]}")
        if not 0 <= num_dn < reference_points.shape[1]:
            raise ValueError(f"num_dn = {num_dn} must be in [0, Nq = {reference_points.shape[1]})")
        first = 0 if self.cfg.render_dn_queries else num_dn
        query_pos, reference_points = query_pos[:, first:], reference_points[:, first:]
        bev = project_to_bev(reference_points, self.bev_size)
        cameras = project_to_cameras(reference_points, self.pc_range, lidar2img, img_shape, tuple(x_img.shape[-2:]))
        lidar_w, camera_w = self.weight_generator(query_pos, x, bev_pos, x_img, rv_pos, bev, cameras)
        low = reference_points.new_tensor(self.pc_range[:2])
        xy = reference_points[..., :2].detach() * (reference_points.new_tensor(self.pc_range[3:5]) - low) + low
        return QueryRouting(lidar_w, camera_w, xy, cameras.valid), bev, cameras

    def forward(self, x: torch.Tensor, x_img: torch.Tensor, *, query_pos: torch.Tensor, bev_pos: torch.Tensor,
                rv_pos: torch.Tensor, reference_points: torch.Tensor, lidar2img: torch.Tensor,
                img_shape: tuple[int, int], num_dn: int = 0) -> Modulated:
        """Modulated (x, x_img) and the rendered queries' :class:`QueryRouting` (for router supervision).

        x: (B, C, H, W) BEV features; x_img: (B*V, C, h, w) camera features; query_pos: (B, Nq, C);
        bev_pos: (H*W, C); rv_pos: (B*V, h, w, C); reference_points: (B, Nq, 3) in [0, 1];
        lidar2img: (B, V, 4, 4); img_shape: (H_img, W_img); num_dn: denoising queries at the front of Nq.
        """
        routing, bev, cameras = self.query_weights(
            x, x_img, query_pos=query_pos, bev_pos=bev_pos, rv_pos=rv_pos, reference_points=reference_points,
            lidar2img=lidar2img, img_shape=img_shape, num_dn=num_dn)
        lidar_w, camera_w = routing.lidar_weight, routing.camera_weight
        bev_map, camera_maps = render_weight_maps(lidar_w, camera_w, bev, cameras, self.cfg.render)
        self.last_routing = QueryRouting(*(t.detach() for t in routing))

        monitored = self.monitor_this_step
        bev_out = modulate_features(x, bev_map, self.cfg.modulate, return_stats=monitored)
        cam_out = modulate_features(x_img, camera_maps.flatten(0, 1), self.cfg.modulate, return_stats=monitored)
        if not monitored:
            return Modulated(bev_out, cam_out, routing)
        (bev_out, bev_stats), (cam_out, cam_stats) = bev_out, cam_out
        signals = {**weight_signals("lidar", lidar_w), **weight_signals("camera", camera_w),
                   **map_signals("bev", bev_map), **camera_map_signals(camera_maps),
                   **modulation_signals("bev", x, bev_stats, bev_out),
                   **modulation_signals("camera", x_img, cam_stats, cam_out)}
        self.monitor.record(signals, bev_map, camera_maps, features=(x, x_img),
                            queries=(bev.coords, cameras.coords, cameras.valid))
        return Modulated(bev_out, cam_out, routing)
