"""``aqrcmt evaluate``: official nuScenes detection metrics for a results file or for a checkpoint.

    aqrcmt evaluate --results results_nusc.json --root data/nuscenes --version v1.0-trainval --split val
    aqrcmt evaluate --checkpoint runs/tiny/best [--config tiny] [--split mini_val] [--robustness]
                    [--condition night|rain|fog|clear]
    aqrcmt evaluate --checkpoint CKPT --corruptions all|failures|NAME... [--severities 1 2 3] [--compare CKPT2]
                    [--out DIR]

A checkpoint is a ``.safetensors`` file of aqrcmt weights (``aqrcmt convert`` makes one from an official
``.pth``) or a training checkpoint directory holding ``model.safetensors``. Its config comes from ``--config``
or, when omitted, from the config the training run stored in the weights' metadata.

``--corruptions`` evaluates clean and under each sensor corruption at each severity (docs/robustness.md) and
writes DIR/robustness.json, DIR/robustness.md (mAP, NDS, RA = NDS / NDS clean, mRA) and DIR/robustness.png;
``--compare`` evaluates a second checkpoint the same way, side by side. ``--condition`` scores only the samples
of the split's scenes whose description names the condition (:func:`aqrcmt.data.splits.scenes_with_condition`),
with or without the robustness benchmarks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from aqrcmt.atomic import atomic_write_bytes
from aqrcmt.config import Config
from aqrcmt.data import build_dataloader
from aqrcmt.eval.nuscenes_eval import EvaluationError, evaluate_results_file, format_metrics
from aqrcmt.data.corruptions import CORRUPTIONS, FAILURES, SEVERITIES, parse_corruptions
from aqrcmt.data.splits import CONDITION_WORDS, CONDITIONS, open_nuscenes, sample_tokens_of_split
from aqrcmt.eval.robustness import (
    CLEAN, evaluate_corruptions, evaluate_robustness, format_corruptions, format_robustness, plot_corruptions,
)
from aqrcmt.tools.checkpoint_options import add_config_arguments, load_checkpoint
from aqrcmt.tools.errors import CommandError
from aqrcmt.tools.options import add_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", help="a results JSON in the official submission format")
    source.add_argument("--checkpoint", help="aqrcmt weights: a .safetensors file or a checkpoint directory")
    add_config_arguments(parser)
    add_option(parser, "--split", aliases=("--eval-set",),
               help="split to evaluate (default: the config's data.val_split; --results needs it)")
    parser.add_argument("--out", default=None, help="output folder (default: next to the results/checkpoint)")
    benchmark = parser.add_mutually_exclusive_group()
    benchmark.add_argument("--robustness", action="store_true",
                           help="with --checkpoint: also evaluate with the LiDAR, all cameras and each camera dropped")
    benchmark.add_argument("--corruptions", nargs="+", metavar="NAME",
                           help="with --checkpoint: sensor corruptions, 'all', 'failures' (the sensor failures: "
                                f"{', '.join(FAILURES)}) or some of: {', '.join(CORRUPTIONS)}")
    parser.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES),
                        help="corruption severities")
    parser.add_argument("--corruption-seed", type=int, default=0, help="seed of the corruptions' random draws")
    parser.add_argument("--compare", metavar="CKPT2", help="with --corruptions: a second checkpoint, side by side")
    parser.add_argument("--device", default="cpu", help="torch device for --checkpoint (e.g. cuda)")
    parser.add_argument("--condition", choices=CONDITIONS,
                        help=f"score only the scenes whose description names the condition ({', '.join(CONDITIONS)}; "
                             f"clear: none of {', '.join(CONDITION_WORDS)}, so the whole split on a dataset whose "
                             "descriptions name no condition, such as the synthetic benchmark)")


def run(args: argparse.Namespace) -> int:
    return _evaluate_results(args) if args.results else _evaluate_checkpoint(args)


def _evaluate_results(args: argparse.Namespace) -> int:
    missing = [flag for flag, value in (("--root", args.root), ("--version", args.version),
                                        ("--split", args.split)) if not value]
    if missing:
        raise EvaluationError(f"--results needs {', '.join(missing)}")
    out = Path(args.out) if args.out else Path(args.results).parent / f"{Path(args.results).stem}_eval{_suffix(args)}"
    metrics = evaluate_results_file(args.results, args.root, args.version, args.split, out,
                                    condition=args.condition)
    print(format_metrics(metrics))
    samples = len(json.loads(Path(args.results).read_text())["results"])
    print(f"{samples} samples of {_scored(args.split, args.condition)} scored; metrics: {out / 'metrics.json'}")
    return 0


def _evaluate_checkpoint(args: argparse.Namespace) -> int:
    if args.corruptions:
        return _evaluate_corruptions(args)
    if args.compare:
        raise EvaluationError("--compare needs --corruptions")
    model, cfg, weights_path = load_checkpoint(args.checkpoint, args)
    split = args.split or cfg.data.val_split
    out = Path(args.out) if args.out else weights_path.parent / f"eval_{split}{_suffix(args)}"

    loader = build_dataloader(cfg, split, train=False, samples=_condition_samples(cfg, split, args.condition))
    drops = None if args.robustness else [CLEAN]
    table = evaluate_robustness(model, loader, cfg.data.root, cfg.data.version, split, out, drops=drops,
                                device=args.device, condition=args.condition, progress=True)
    print(format_metrics(table[CLEAN.name]))
    if args.robustness:
        print(format_robustness(table))
        atomic_write_bytes(out / "robustness.json", json.dumps(table, indent=2).encode())
    print(f"{len(loader.dataset)} samples of {_scored(split, args.condition)} scored; metrics: "
          f"{out / CLEAN.name / 'metrics.json'}" + (f", the drops' in {out}/" if args.robustness else ""))
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
        model, cfg, weights_path = load_checkpoint(checkpoint, args)
        split = args.split or cfg.data.val_split
        out = out or (Path(args.out) if args.out else weights_path.parent / f"robustness_{split}{_suffix(args)}")
        loader = build_dataloader(cfg, split, train=False, samples=_condition_samples(cfg, split, args.condition))
        tables[label] = evaluate_corruptions(model, loader, cfg.data.root, cfg.data.version, split, out / label,
                                             corruptions, device=args.device, condition=args.condition,
                                             progress=True)
        tables[label]["checkpoint"] = str(checkpoint)
    report = {"split": split, "condition": args.condition, "seed": args.corruption_seed,
              "severities": args.severities, "models": tables}
    atomic_write_bytes(out / "robustness.json", json.dumps(report, indent=2).encode())
    markdown = format_corruptions(tables)
    atomic_write_bytes(out / "robustness.md",
                       f"# Robustness ({_scored(split, args.condition)}, corruption seed {args.corruption_seed})\n\n{markdown}\n".encode())
    plot_corruptions(tables, out / "robustness.png")
    print(markdown)
    print(f"robustness written to {out}")
    return 0


def _scored(split: str, condition: Optional[str]) -> str:
    """What was scored: the split, or its scenes of `condition`."""
    return split if condition is None else f"{split}, {condition} scenes"


def _suffix(args: argparse.Namespace) -> str:
    """The default output folder's suffix: ``_<condition>`` with --condition."""
    return f"_{args.condition}" if args.condition else ""


def _condition_samples(cfg: Config, split: str, condition: Optional[str]) -> Optional[list[str]]:
    """Sample tokens of `split`'s scenes with `condition` (None without one: every sample)."""
    if condition is None:
        return None
    samples = sample_tokens_of_split(open_nuscenes(cfg.data.root, cfg.data.version), split, condition)
    if not samples:
        raise CommandError(f"--condition {condition}: no scene of split {split!r} under {cfg.data.root} "
                           f"({cfg.data.version}) is {condition} by its description")
    return samples


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
