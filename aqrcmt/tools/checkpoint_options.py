"""The options shared by the commands that run a checkpoint (``evaluate --checkpoint``, ``predict``): which
config it runs with and on which nuScenes, and the one loader that applies them."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from aqrcmt.checkpoint.weights import stored_config, weights_file
from aqrcmt.config import Config
from aqrcmt.overrides import apply_overrides
from aqrcmt.presets import load_config
from aqrcmt.tools.options import add_root_option, add_set_option

if TYPE_CHECKING:
    from aqrcmt.models.detector import CmtDetector


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --set, --root, --version (read by :func:`load_checkpoint`)."""
    parser.add_argument("--config", help="preset name or config .json (default: the checkpoint's stored config)")
    add_set_option(parser)
    add_root_option(parser)
    parser.add_argument("--version", help="nuScenes version, e.g. v1.0-trainval (default: the config's data.version)")


def load_checkpoint(checkpoint: str, args: argparse.Namespace) -> tuple[CmtDetector, Config, Path]:
    """(detector on ``args.device`` in eval mode, config, weights file) of `checkpoint` (a .safetensors file or a
    checkpoint directory). The config is ``--config`` or else the one stored in the weights, with ``--set``,
    ``--root`` and ``--version`` applied; CheckpointError names the file when the weights do not fit it."""
    from aqrcmt.inference import load_detector_from_checkpoint   # the model code only once a checkpoint runs

    path = weights_file(checkpoint)
    cfg = load_config(args.config, args.set) if args.config else apply_overrides(stored_config(path), args.set)
    for field, value in (("root", args.root), ("version", args.version)):
        if value:
            setattr(cfg.data, field, value)
    detector, _ = load_detector_from_checkpoint(path, args.device, cfg)
    return detector, cfg, path
