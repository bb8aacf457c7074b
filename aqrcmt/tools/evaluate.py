"""``aqrcmt evaluate``: official nuScenes detection metrics for a results file or for a checkpoint.

    aqrcmt evaluate --results results_nusc.json --root data/nuscenes --version v1.0-trainval --eval-set val
    aqrcmt evaluate --checkpoint runs/tiny/best [--config tiny] [--split mini_val] [--robustness]

A checkpoint is a ``.safetensors`` file of aqrcmt weights (``aqrcmt convert`` makes one from an official
``.pth``) or a training checkpoint directory holding ``model.safetensors``. Its config comes from ``--config``
or, when omitted, from the config the training run stored in the weights' metadata.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from aqrcmt.checkpoint.io import CheckpointError
from aqrcmt.checkpoint.weights import stored_config, weights_file
from aqrcmt.config import apply_overrides
from aqrcmt.data import build_dataloader
from aqrcmt.eval.nuscenes_eval import EvaluationError, evaluate_results_file, format_metrics
from aqrcmt.eval.robustness import CLEAN, evaluate_robustness, format_robustness
from aqrcmt.presets import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", help="a results JSON in the official submission format")
    source.add_argument("--checkpoint", help="aqrcmt weights: a .safetensors file or a checkpoint directory")
    parser.add_argument("--config", help="preset name or config .json (default: the checkpoint's stored config)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--root", help="nuScenes root (default: the config's data.root)")
    parser.add_argument("--version", help="nuScenes version, e.g. v1.0-trainval (default: the config's)")
    parser.add_argument("--eval-set", "--split", dest="eval_set",
                        help="split to evaluate (default: the config's data.val_split)")
    parser.add_argument("--out", default=None, help="output folder (default: next to the results/checkpoint)")
    parser.add_argument("--robustness", action="store_true",
                        help="with --checkpoint: also evaluate with the LiDAR, all cameras and each camera dropped")
    parser.add_argument("--device", default="cpu", help="torch device for --checkpoint (e.g. cuda)")


def run(args: argparse.Namespace) -> int:
    return _evaluate_results(args) if args.results else _evaluate_checkpoint(args)


def _evaluate_results(args: argparse.Namespace) -> int:
    missing = [flag for flag, value in (("--root", args.root), ("--version", args.version),
                                        ("--eval-set", args.eval_set)) if not value]
    if missing:
        raise EvaluationError(f"--results needs {', '.join(missing)}")
    out = Path(args.out) if args.out else Path(args.results).parent / f"{Path(args.results).stem}_eval"
    metrics = evaluate_results_file(args.results, args.root, args.version, args.eval_set, out)
    print(format_metrics(metrics))
    print(f"metrics written to {out}")
    return 0


def _evaluate_checkpoint(args: argparse.Namespace) -> int:
    from aqrcmt.models.detector import load_detector_from_checkpoint   # the model code only for --checkpoint

    try:
        weights_path = weights_file(args.checkpoint)
        cfg = load_config(args.config, args.override) if args.config else \
            apply_overrides(stored_config(weights_path), args.override)
        if args.root:
            cfg.data.root = args.root
        if args.version:
            cfg.data.version = args.version
        model, _ = load_detector_from_checkpoint(weights_path, args.device, cfg)
    except CheckpointError as error:
        raise EvaluationError(str(error)) from None
    split = args.eval_set or cfg.data.val_split
    out = Path(args.out) if args.out else weights_path.parent / f"eval_{split}"

    loader = build_dataloader(cfg, split, train=False)
    drops = None if args.robustness else [CLEAN]
    table = evaluate_robustness(model, loader, cfg.data.root, cfg.data.version, split, out, drops=drops,
                                device=args.device)
    print(format_metrics(table[CLEAN.name]))
    if args.robustness:
        print(format_robustness(table))
        (out / "robustness.json").write_text(json.dumps(table, indent=2))
    print(f"metrics written to {out}")
    return 0
