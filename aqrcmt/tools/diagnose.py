"""``aqrcmt diagnose``: what the AQR renderer and modulator do to the features, for a config.

Prints a table (query-weight mean -> rendered map mean -> "loss ratio", map max, feature change) for the
reference settings of :func:`aqrcmt.models.aqr.diagnose.reference_settings` (the fork's renderer, its training
report's fix, the config), then a sweep over sigma x kernel normalisation x residual form, and writes PNGs of
the BEV map and the six camera maps, and the alarms and notices (aqrcmt.training.alarms) the config's own
settings would raise in training. ``--set key=value ...`` overrides any config field first.

Queries are random by default (:func:`aqrcmt.models.aqr.diagnose.random_scene`); with ``--checkpoint`` and
``--root`` they come from the model: the AQR step's inputs are captured on one real sample and its generator's
weights are used.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from aqrcmt.checkpoint.weights import AQR_PREFIX
from aqrcmt.config import Config
from aqrcmt.data import build_dataloader
from aqrcmt.eval.visualize import render_aqr, save_png
from aqrcmt.inference import load_detector_from_checkpoint
from aqrcmt.models.aqr.diagnose import Scene, measure, random_scene, reference_settings, sweep_settings
from aqrcmt.models.aqr.monitor import AQRView
from aqrcmt.presets import load_config
from aqrcmt.tools.errors import CommandError
from aqrcmt.tools.options import add_out_option, add_root_option, add_set_option
from aqrcmt.training.alarms import check_aqr_signals


def model_scene(cfg: Config, checkpoint: str, data_root: str, device: torch.device) -> Scene:
    """Capture the AQR step's inputs on the first validation sample of `data_root` with the checkpoint's model."""
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
        routing, bev, cameras = module.query_weights(x, x_img, **kwargs)
        captured["scene"] = Scene(routing.lidar_weight, routing.camera_weight, bev, cameras, x, x_img,
                                  source=f"model: {checkpoint}")

    handle = aqr.register_forward_pre_hook(capture, with_kwargs=True)
    loader = build_dataloader(cfg, cfg.data.val_split, train=False)
    with torch.no_grad():
        model(next(iter(loader)).to(device))
    handle.remove()
    return captured["scene"]


def debug_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Per setting and modality: weight mean -> map mean, "loss" ratio, map max, feature change (as the fork's
    debug log)."""
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name or config .json")
    add_set_option(parser)
    parser.add_argument("--checkpoint", help="model weights (.safetensors); with --root: real queries and features")
    add_root_option(parser, help="nuScenes (or synthetic nuScenes) root for --checkpoint")
    add_out_option(parser, "folder for the PNGs", default="aqr_diagnose")
    parser.add_argument("--num-queries", type=int, default=900, help="random queries per sample")
    parser.add_argument("--batch", type=int, default=2, help="random samples")
    parser.add_argument("--weight-mean", type=float, default=0.45, help="random query weight mean")
    parser.add_argument("--weight-std", type=float, default=0.1, help="random query weight std")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random queries")
    parser.add_argument("--no-sweep", action="store_true", help="only the reference settings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    device = torch.device(args.device)
    if bool(args.checkpoint) != bool(args.root):
        raise CommandError("--checkpoint and --root go together (real queries need both)")
    if args.num_queries < 1 or args.batch < 1 or args.weight_std < 0:
        raise CommandError(f"--num-queries and --batch must be >= 1 and --weight-std >= 0, got {args.num_queries}, "
                           f"{args.batch}, {args.weight_std}")
    if args.checkpoint:
        scene = model_scene(cfg, args.checkpoint, args.root, device)
    else:
        scene = random_scene(cfg, num_queries=args.num_queries, batch=args.batch, weight_mean=args.weight_mean,
                             weight_std=args.weight_std, seed=args.seed, device=device)
    out_dir = Path(args.out)
    print(f"AQR diagnose: config {cfg.name}; {scene.source}")
    print(f"BEV map {scene.bev.size}, camera maps 6 x {scene.cameras.size}; "
          f"queries seen by a camera: {scene.cameras.valid.any(-1).float().mean().item():.1%}\n")
    rows = []
    for label, stem, render, modulate in reference_settings(cfg):
        stats, bev_map, camera_maps = measure(scene, render, modulate)
        rows.append((label, stats))
        save_png(render_aqr(AQRView(bev_map[0], camera_maps[0]), title=label,
                            point_cloud_range=cfg.model.lidar.voxel.point_cloud_range), out_dir / f"maps_{stem}.png")
    print(debug_table(rows))
    alarms = check_aqr_signals(rows[-1][1], cfg.model.aqr.monitor, step=0)   # the last row: the config itself
    print(f"\nhealth checks of config {cfg.name} (model.aqr.monitor levels): "
          f"{sum(a.level == 'alarm' for a in alarms)} alarm(s), {sum(a.level == 'notice' for a in alarms)} notice(s)")
    for alarm in alarms:
        print(f"  {alarm.level}: {alarm.signal} = {alarm.value:.4g} {alarm.bound} ({alarm.meaning})")
    if not args.no_sweep:
        print("\nSweep (loss = map mean vs query-weight mean; rel chg = mean|out-x|/mean|x|; energy = sum out^2 / "
              "sum x^2):")
        print(debug_table([(label, measure(scene, render, modulate)[0])
                           for label, render, modulate in sweep_settings(cfg)]))
    print(f"\nmaps written to {out_dir}/maps_*.png")
    return 0
