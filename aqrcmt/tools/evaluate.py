"""``aqrcmt evaluate``: official nuScenes detection metrics for a results file or for a checkpoint.

    aqrcmt evaluate --results results_nusc.json --root data/nuscenes --version v1.0-trainval --eval-set val
    aqrcmt evaluate --checkpoint runs/tiny/best [--config tiny] [--split mini_val] [--robustness]
    aqrcmt evaluate --checkpoint CKPT --corruptions all|NAME... [--severities 1 2 3] [--compare CKPT2] [--out DIR]

A checkpoint is a ``.safetensors`` file of aqrcmt weights (``aqrcmt convert`` makes one from an official
``.pth``) or a training checkpoint directory holding ``model.safetensors``. Its config comes from ``--config``
or, when omitted, from the config the training run stored in the weights' metadata.

``--corruptions`` evaluates clean and under each sensor corruption at each severity (docs/robustness.md) and
writes DIR/robustness.json, DIR/robustness.md (mAP, NDS, RA = NDS / NDS clean, mRA) and DIR/robustness.png;
``--compare`` evaluates a second checkpoint the same way, side by side.
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
from aqrcmt.data.corruptions import CORRUPTIONS, SEVERITIES, parse_corruptions
from aqrcmt.eval.robustness import (
    CLEAN, evaluate_corruptions, evaluate_robustness, format_corruptions, format_robustness, plot_corruptions,
)
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
    benchmark = parser.add_mutually_exclusive_group()
    benchmark.add_argument("--robustness", action="store_true",
                           help="with --checkpoint: also evaluate with the LiDAR, all cameras and each camera dropped")
    benchmark.add_argument("--corruptions", nargs="+", metavar="NAME",
                           help=f"with --checkpoint: sensor corruptions, 'all' or some of: {', '.join(CORRUPTIONS)}")
    parser.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES),
                        help="corruption severities (default: 1 2 3)")
    parser.add_argument("--corruption-seed", type=int, default=0, help="seed of the corruptions' random draws")
    parser.add_argument("--compare", metavar="CKPT2", help="with --corruptions: a second checkpoint, side by side")
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


def _load_checkpoint(checkpoint: str, args: argparse.Namespace):
    """(model, cfg, weights path) of `checkpoint` with --config / --override / --root / --version applied."""
    from aqrcmt.inference import load_detector_from_checkpoint   # the model code only for --checkpoint

    try:
        weights_path = weights_file(checkpoint)
        cfg = load_config(args.config, args.override) if args.config else \
            apply_overrides(stored_config(weights_path), args.override)
        if args.root:
            cfg.data.root = args.root
        if args.version:
            cfg.data.version = args.version
        model, _ = load_detector_from_checkpoint(weights_path, args.device, cfg)
    except CheckpointError as error:
        raise EvaluationError(str(error)) from None
    return model, cfg, weights_path


def _evaluate_checkpoint(args: argparse.Namespace) -> int:
    if args.corruptions:
        return _evaluate_corruptions(args)
    if args.compare:
        raise EvaluationError("--compare needs --corruptions")
    model, cfg, weights_path = _load_checkpoint(args.checkpoint, args)
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


def _evaluate_corruptions(args: argparse.Namespace) -> int:
    try:
        corruptions = parse_corruptions(args.corruptions, args.severities, args.corruption_seed)
    except ValueError as error:
        raise EvaluationError(str(error)) from None
    checkpoints = [args.checkpoint] + ([args.compare] if args.compare else [])
    labels = _labels(checkpoints)
    tables, out = {}, None
    for label, checkpoint in zip(labels, checkpoints):
        model, cfg, weights_path = _load_checkpoint(checkpoint, args)
        split = args.eval_set or cfg.data.val_split
        out = out or (Path(args.out) if args.out else weights_path.parent / f"robustness_{split}")
        loader = build_dataloader(cfg, split, train=False)
        tables[label] = evaluate_corruptions(model, loader, cfg.data.root, cfg.data.version, split, out / label,
                                             corruptions, device=args.device)
        tables[label]["checkpoint"] = str(checkpoint)
    report = {"split": split, "seed": args.corruption_seed, "severities": args.severities, "models": tables}
    (out / "robustness.json").write_text(json.dumps(report, indent=2))
    markdown = format_corruptions(tables)
    (out / "robustness.md").write_text(f"# Robustness ({split}, corruption seed {args.corruption_seed})\n\n"
                                       f"{markdown}\n")
    plot_corruptions(tables, out / "robustness.png")
    print(markdown)
    print(f"robustness written to {out}")
    return 0


def _labels(checkpoints: list[str]) -> list[str]:
    """Short distinct names of the checkpoints: the file or folder name (model.safetensors: its folder's), with as
    many parent folders as it takes to tell them apart (``runA-step_00000200`` vs ``runB-step_00000200``; a
    run's ``checkpoints`` folder is left out)."""
    paths = [Path(c).resolve() for c in checkpoints]
    parts = [[q for q in (p.parent if p.name == "model.safetensors" else p).parts[1:] if q != "checkpoints"]
             for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["-".join(q[-k:]) for q in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{q[-1]}#{i + 1}" for i, q in enumerate(parts)]     # the same checkpoint given twice
