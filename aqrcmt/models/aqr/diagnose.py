"""`aqrcmt diagnose`: what the AQR renderer and modulator do to the features, for a config.

Prints the user's debug table (query-weight mean -> rendered map mean -> "loss ratio", map max, feature
change) for the config's settings and for the fork's settings before and after the user's fix, then a sweep
over sigma x kernel normalisation x residual form, and writes PNGs of the BEV map and the six camera maps.

Queries are random by default (900 per sample, uniform in the point-cloud range, weights ~ N(0.45, 0.1) as in
the user's logs, a ring of six pinhole cameras); with ``--checkpoint`` and ``--data`` they come from the model:
the AQR step's inputs are captured on one real sample and its generator's weights are used.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from aqrcmt.config import AQRModulateConfig, AQRRenderConfig, Config, load_config
from aqrcmt.models.aqr.modulate import modulate_features
from aqrcmt.models.aqr.monitor import map_signals, modulation_signals, save_weight_maps, weight_signals
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


def model_scene(cfg: Config, checkpoint: str, data_root: str, device: torch.device) -> Scene:
    """Capture the AQR step's inputs on the first validation sample of `data_root` with the checkpoint's model."""
    from aqrcmt.checkpoint.weights import AQR_PREFIX, load_detector_from_checkpoint
    from aqrcmt.data import build_dataloader

    cfg.model.aqr.enabled = True
    cfg.data.root = data_root
    model, report = load_detector_from_checkpoint(checkpoint, device, cfg, missing_ok_prefixes=(AQR_PREFIX,))
    if report.kept_init:
        print(f"note: {len(report.kept_init)} AQR tensors are not in {checkpoint}: the generator is freshly "
              f"initialised")
    aqr = model.pts_bbox_head.aqr
    captured: dict[str, Scene] = {}

    def capture(module, args, kwargs):
        x, x_img = args
        lidar_w, camera_w, bev, cameras = module.query_weights(x, x_img, **kwargs)
        captured["scene"] = Scene(lidar_w, camera_w, bev, cameras, x, x_img, source=f"model: {checkpoint}")

    handle = aqr.register_forward_pre_hook(capture, with_kwargs=True)
    loader = build_dataloader(cfg, cfg.data.val_split, train=False)
    with torch.no_grad():
        model(next(iter(loader)).to(device))
    handle.remove()
    return captured["scene"]


def measure(scene: Scene, render: AQRRenderConfig, modulate: AQRModulateConfig,
            max_normalize: bool = False) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Signals (monitor names) of one render/modulate setting, and the (B, H, W), (B, V, h, w) maps.

    max_normalize: divide each sample's map by its maximum (the fork's renderer before the user's fix).
    """
    with torch.no_grad():
        bev_map, camera_maps = render_weight_maps(scene.lidar_weights, scene.camera_weights, scene.bev,
                                                  scene.cameras, render)
        if max_normalize:
            bev_map = bev_map / bev_map.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
            camera_maps = camera_maps / camera_maps.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
        _, bev_stats = modulate_features(scene.bev_features, bev_map, modulate, return_stats=True)
        _, cam_stats = modulate_features(scene.camera_features, camera_maps.flatten(0, 1), modulate,
                                         return_stats=True)
        signals = {**weight_signals("lidar", scene.lidar_weights), **weight_signals("camera", scene.camera_weights),
                   **map_signals("bev", bev_map), **map_signals("camera", camera_maps),
                   **modulation_signals("bev", scene.bev_features, bev_stats),
                   **modulation_signals("camera", scene.camera_features, cam_stats)}
    return {k: float(v) for k, v in signals.items()}, bev_map, camera_maps


def debug_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """The user's table: per setting and modality, weight mean -> map mean, loss ratio, map max, feature change."""
    width = max(len(label) for label, _ in rows)
    header = (f"{'setting':{width}s} {'map':6s} {'w mean':>7s} {'map mean':>9s} {'loss':>7s} {'map max':>8s} "
              f"{'rel chg':>8s} {'energy':>7s} {'out mean':>9s}")
    lines = [header, "-" * len(header)]
    for label, s in rows:
        for modality, weight in (("bev", "lidar"), ("camera", "camera")):
            w_mean, m_mean = s[f"{weight}_weight_mean"], s[f"{modality}_map_mean"]
            loss = (m_mean - w_mean) / w_mean if w_mean else float("nan")
            lines.append(f"{label:{width}s} {modality:6s} {w_mean:7.3f} {m_mean:9.4f} {loss:+7.1%} "
                         f"{s[f'{modality}_map_max']:8.3f} {s[f'{modality}_relative_change']:8.1%} "
                         f"{s[f'{modality}_energy_retention']:7.1%} {s[f'{modality}_modulated_mean']:9.4f}")
            label = ""
    return "\n".join(lines)


def reference_settings(cfg: Config) -> list[tuple[str, str, AQRRenderConfig, AQRModulateConfig, bool]]:
    """(label, file stem, render, modulate, max_normalize): the fork before/after the user's fix, the config."""
    fork_modulate = AQRModulateConfig(mode="element_wise", residual_form="additive", residual_weight=0.7)
    before = AQRRenderConfig(kernel_norm="sum", sigma_bev=2.0, sigma_camera=2.0, threshold=0.01, clamp_max=None)
    after = dataclasses.replace(before, sigma_bev=1.0, sigma_camera=1.0, clamp_max=1.5)
    user = dataclasses.replace(before, clamp_max=1.5)
    return [
        ("fork before fix: sum, s2, thr .01, /max", "fork_before_fix", before, fork_modulate, True),
        ("user's settings: sum, s2, thr .01, clamp 1.5", "user_settings", user, fork_modulate, False),
        ("user's fix: sum, s1, thr .01, clamp 1.5", "user_fix", after, fork_modulate, False),
        (f"config {cfg.name}", "config", cfg.model.aqr.render, cfg.model.aqr.modulate, False),
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name or config .json")
    parser.add_argument("--checkpoint", help="model weights (.safetensors); with --data: real queries and features")
    parser.add_argument("--data", help="nuScenes (or synthetic nuScenes) root for --checkpoint")
    parser.add_argument("--out", default="aqr_diagnose", help="folder for the PNGs (default: %(default)s)")
    parser.add_argument("--num-queries", type=int, default=900, help="random queries per sample")
    parser.add_argument("--batch", type=int, default=2, help="random samples")
    parser.add_argument("--weight-mean", type=float, default=0.45, help="random query weight mean")
    parser.add_argument("--weight-std", type=float, default=0.1, help="random query weight std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sweep", action="store_true", help="only the reference settings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    device = torch.device(args.device)
    if bool(args.checkpoint) != bool(args.data):
        raise SystemExit("diagnose: --checkpoint and --data go together (real queries need both)")
    if args.checkpoint:
        scene = model_scene(cfg, args.checkpoint, args.data, device)
    else:
        scene = random_scene(cfg, num_queries=args.num_queries, batch=args.batch, weight_mean=args.weight_mean,
                             weight_std=args.weight_std, seed=args.seed, device=device)
    out_dir = Path(args.out)
    print(f"AQR diagnose: config {cfg.name}; {scene.source}")
    print(f"BEV map {scene.bev.size}, camera maps 6 x {scene.cameras.size}; "
          f"queries seen by a camera: {scene.cameras.valid.any(-1).float().mean().item():.1%}\n")
    rows = []
    for label, stem, render, modulate, max_normalize in reference_settings(cfg):
        stats, bev_map, camera_maps = measure(scene, render, modulate, max_normalize)
        rows.append((label, stats))
        save_weight_maps(out_dir / f"maps_{stem}.png", bev_map[0], camera_maps[0], title=label)
    print(debug_table(rows))
    if not args.no_sweep:
        print("\nSweep (loss = map mean vs query-weight mean; rel chg = mean|out-x|/mean|x|; energy = sum out^2 / "
              "sum x^2):")
        print(debug_table([(label, measure(scene, render, modulate)[0])
                           for label, render, modulate in sweep_settings(cfg)]))
    print(f"\nmaps written to {out_dir}/maps_*.png")
    return 0
