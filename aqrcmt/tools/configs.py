"""``aqrcmt configs``: the named presets, one line each (what the model has, how it trains), or one preset's
whole config as JSON (``aqrcmt configs NAME``, with ``--set`` applied)."""
from __future__ import annotations

import argparse

from aqrcmt.config import Config
from aqrcmt.presets import get_preset, list_presets, load_config
from aqrcmt.tools.errors import CommandError
from aqrcmt.tools.options import add_set_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="a preset or config .json: print its resolved config as JSON")
    add_set_option(parser)


def describe(cfg: Config) -> str:
    """One line: the branches (voxel size in m, backbone, network input H x W), AQR settings, training length."""
    model, parts = cfg.model, []
    if model.lidar.enabled:
        parts.append(f"LiDAR {model.lidar.voxel.voxel_size[0]:g} m voxels")
    if model.camera.enabled:
        parts.append(f"camera {model.camera.backbone} {model.camera.image_size[0]}x{model.camera.image_size[1]}")
    aqr = model.aqr
    if aqr.enabled:
        clamp = f" clamp {aqr.render.clamp_max:g}" if aqr.render.clamp_max is not None else ""
        parts.append(f"AQR ({aqr.render.kernel_norm} kernel sigma {aqr.render.sigma_bev:g}{clamp}, "
                     f"{aqr.modulate.residual_form} residual {aqr.modulate.residual_weight:g})")
    paste = f", GT paste to epoch {cfg.data.augment.gt_paste_until_epoch}" if cfg.data.augment.gt_paste else ""
    return (" + ".join(parts) + f"; {cfg.train.epochs} epochs, batch {cfg.data.batch_size} per process, "
            f"lr {cfg.optim.lr:g}{paste}")


def run(args: argparse.Namespace) -> int:
    if args.name:
        print(load_config(args.name, args.set).to_json())
        return 0
    if args.set:
        raise CommandError("--set needs a config NAME to apply to")
    names = list_presets()
    width = max(map(len, names))
    for name in names:
        print(f"{name:{width}s}  {describe(get_preset(name))}")
    print("\nuse one with --config NAME; `aqrcmt configs NAME` prints all its fields (override any with --set)")
    return 0
