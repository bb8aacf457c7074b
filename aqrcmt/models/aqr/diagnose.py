"""What the AQR renderer and modulator do to the features: scenes, render/modulate settings and their signals.

The measurements behind ``aqrcmt diagnose`` (:mod:`aqrcmt.tools.diagnose`) and docs/aqr.md: a :class:`Scene`
(query weights, their BEV/camera projections and the features), :func:`measure` of one render/modulate setting,
the reference settings (the AQR fork's renderer with max-normalisation and with the clamp, the fork training
report's fix, the config) and a sweep over sigma x kernel normalisation x residual form.

:func:`random_scene` draws uniform queries (weights ~ N(0.45, 0.1), the means the report logs) seen by a ring of
six pinhole cameras; the tool can instead capture a scene from a model on a real sample.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from aqrcmt.config import AQRModulateConfig, AQRRenderConfig, Config
from aqrcmt.models.aqr.modulate import modulate_features
from aqrcmt.models.aqr.monitor import camera_map_signals, map_signals, modulation_signals, weight_signals
from aqrcmt.models.aqr.projection import Projection, project_to_bev, project_to_cameras
from aqrcmt.models.aqr.render import render_weight_maps

# nuScenes-like camera yaws (degrees, counter-clockwise from +x) in CAMERA_NAMES order.
RING_YAWS_DEG = (0.0, -55.0, 55.0, 180.0, 110.0, -110.0)
RING_HFOV_DEG = 70.0


@dataclass
class Scene:
    """Everything the renderer and modulator see for B samples."""
    lidar_weights: torch.Tensor      # (B, Q)
    camera_weights: torch.Tensor     # (B, Q)
    bev: Projection                  # V = 1
    cameras: Projection              # V = 6
    bev_features: torch.Tensor       # (B, C, H, W)
    camera_features: torch.Tensor    # (B*V, C, h, w)
    source: str


def ring_lidar2img(image_size: tuple[int, int], batch: int, height_m: float = 0.0) -> torch.Tensor:
    """(batch, 6, 4, 4) float64 LiDAR -> pixel matrices of six pinhole cameras at the origin looking outwards."""
    img_h, img_w = image_size
    focal = (img_w / 2) / math.tan(math.radians(RING_HFOV_DEG / 2))
    intrinsics = torch.tensor([[focal, 0, img_w / 2, 0], [0, focal, img_h / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                              dtype=torch.float64)
    mats = []
    for yaw_deg in RING_YAWS_DEG:
        yaw = math.radians(yaw_deg)
        forward, right, down = (math.cos(yaw), math.sin(yaw), 0.0), (math.sin(yaw), -math.cos(yaw), 0.0), (0, 0, -1.0)
        lidar2cam = torch.eye(4, dtype=torch.float64)
        lidar2cam[:3, :3] = torch.tensor([right, down, forward], dtype=torch.float64)
        lidar2cam[:3, 3] = -lidar2cam[:3, :3] @ torch.tensor([0.0, 0.0, height_m], dtype=torch.float64)
        mats.append(intrinsics @ lidar2cam)
    return torch.stack(mats).expand(batch, -1, -1, -1).clone()


def random_scene(cfg: Config, *, num_queries: int, batch: int, weight_mean: float, weight_std: float,
                 seed: int, device: torch.device) -> Scene:
    """Uniform queries with N(mean, std) weights clipped to [0, 1]; BEV features ReLU(N(0, 1)) (post shared
    conv), camera features N(0, 1) (FPN outputs)."""
    gen = torch.Generator().manual_seed(seed)
    reference = torch.rand(batch, num_queries, 3, generator=gen)
    weights = (weight_mean + weight_std * torch.randn(2, batch, num_queries, generator=gen)).clamp(0, 1)
    img_h, img_w = cfg.model.camera.image_size
    cam_size = (img_h // 16, img_w // 16)
    bev_size = cfg.model.bev_size
    channels = cfg.model.head.hidden_dim
    bev_features = torch.randn(batch, channels, *bev_size, generator=gen).relu()
    camera_features = torch.randn(batch * 6, channels, *cam_size, generator=gen)
    lidar2img = ring_lidar2img((img_h, img_w), batch)
    scene = Scene(weights[0], weights[1], project_to_bev(reference, bev_size),
                  project_to_cameras(reference, cfg.model.lidar.voxel.point_cloud_range, lidar2img, (img_h, img_w),
                                     cam_size),
                  bev_features, camera_features,
                  source=f"random: {num_queries} queries/sample, weights ~ N({weight_mean}, {weight_std})")
    return _scene_to(scene, device)


def _scene_to(scene: Scene, device: torch.device) -> Scene:
    def move(p: Projection) -> Projection:
        return Projection(p.coords.to(device), p.valid.to(device), p.size)
    return Scene(scene.lidar_weights.to(device), scene.camera_weights.to(device), move(scene.bev),
                 move(scene.cameras), scene.bev_features.to(device), scene.camera_features.to(device), scene.source)


def measure(scene: Scene, render: AQRRenderConfig,
            modulate: AQRModulateConfig) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Signals (monitor names) of one render/modulate setting, and the (B, H, W), (B, V, h, w) maps."""
    with torch.no_grad():
        bev_map, camera_maps = render_weight_maps(scene.lidar_weights, scene.camera_weights, scene.bev,
                                                  scene.cameras, render)
        bev_out, bev_stats = modulate_features(scene.bev_features, bev_map, modulate, return_stats=True)
        cam_out, cam_stats = modulate_features(scene.camera_features, camera_maps.flatten(0, 1), modulate,
                                         return_stats=True)
        signals = {**weight_signals("lidar", scene.lidar_weights), **weight_signals("camera", scene.camera_weights),
                   **map_signals("bev", bev_map), **camera_map_signals(camera_maps),
                   **modulation_signals("bev", scene.bev_features, bev_stats, bev_out),
                   **modulation_signals("camera", scene.camera_features, cam_stats, cam_out)}
    return {k: float(v) for k, v in signals.items()}, bev_map, camera_maps


def reference_settings(cfg: Config) -> list[tuple[str, str, AQRRenderConfig, AQRModulateConfig]]:
    """(label, file stem, render, modulate): the fork's renderer max-normalised and clamped (queries no camera
    sees skipped; or, as the fork's runs without camera post-processing did, piled at pixel (0, 0) of view 0), the
    fix its training report proposes
    (sigma 1 + clamp), and the config's settings."""
    fork_modulate = AQRModulateConfig(mode="element_wise", residual_form="additive", residual_weight=0.7)
    max_normalized = AQRRenderConfig(kernel_norm="sum", sigma_bev=2.0, sigma_camera=2.0, threshold=0.01,
                                     clamp_max=None, normalize="max_over_views")
    clamped = dataclasses.replace(max_normalized, clamp_max=1.5, normalize="none")
    piled = dataclasses.replace(clamped, clamp_max=None, invisible_queries="pile_at_origin")
    report_fix = dataclasses.replace(clamped, sigma_bev=1.0, sigma_camera=1.0)
    return [
        ("fork max-normalised: sum, s2, thr .01, /max", "fork_max_normalized", max_normalized, fork_modulate),
        ("fork clamped: sum, s2, thr .01, clamp 1.5", "fork_clamp", clamped, fork_modulate),
        ("fork unclamped, invisible at (0, 0)", "fork_piled_at_origin", piled, fork_modulate),
        ("report's fix: sum, s1, thr .01, clamp 1.5", "report_clamp_fix", report_fix, fork_modulate),
        (f"config {cfg.name}", "config", cfg.model.aqr.render, cfg.model.aqr.modulate),
    ]


def sweep_settings(cfg: Config) -> list[tuple[str, AQRRenderConfig, AQRModulateConfig]]:
    """sigma x kernel normalisation x residual form, other fields from the config."""
    out = []
    for norm in ("sum", "peak", "normalized"):
        for sigma in (1.0, 2.0):
            render = dataclasses.replace(cfg.model.aqr.render, kernel_norm=norm, sigma_bev=sigma, sigma_camera=sigma)
            for form in ("additive", "convex"):
                modulate = dataclasses.replace(cfg.model.aqr.modulate, residual_form=form)
                out.append((f"{norm:10s} s{sigma:g} {form:8s} r={modulate.residual_weight:g}", render, modulate))
    return out
