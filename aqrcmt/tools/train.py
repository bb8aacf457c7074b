"""``aqrcmt train``: train (and evaluate) AQR-CMT; ``python train/main.py`` is the same command.

    aqrcmt train --config tiny --root data/synthetic_nuscenes --out runs/tiny      # one process
    accelerate launch -m aqrcmt.cli train --config cmt_aqr_recommended_voxel0075_vov_1600x640_cbgs \\
        --load-from cmt_vov.safetensors --root /data/nuscenes --set optim.lr=1e-4  # one process per GPU
    accelerate launch --multi_gpu --num_processes 2 -m aqrcmt.cli train --config tiny   # 2 CPU processes

Any config field can be overridden with ``--set key.path=value``; the resolved config is saved as
``<out>/config.json``. docs/training.md describes the checkpoint layout and the monitored signals.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from aqrcmt.presets import load_config
from aqrcmt.tools.errors import CommandError
from aqrcmt.tools.options import (add_key_pattern_options, add_out_option, add_root_option, add_set_option,
                                  config_overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a preset (list them with `aqrcmt configs`) or a config .json")
    add_set_option(parser)
    add_root_option(parser)
    add_out_option(parser, "run directory (default: the config's train.output_dir)", aliases=("--output-dir",))
    parser.add_argument("--resume", nargs="?", const="latest",
                        help="continue a run: 'latest' (when given without a value), a checkpoint directory, or "
                             "'auto' (continue the latest checkpoint if there is one, else start: what a requeued "
                             "job uses)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start anew in a run directory that holds a run; the old directory is renamed to "
                             "<out>.replaced-<time> (never deleted) once the new run's checks passed")
    parser.add_argument("--load-from", help="initialise from converted pretrained weights (.safetensors)")
    add_key_pattern_options(parser, "--load-from")
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="torch.compile the model (default: on for CUDA)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false", help="do not torch.compile")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the (loaded/resumed) model and exit")


def resume_command(checkpoint: str, command: list[str] | None = None) -> str:
    """The command line that continues this run from `checkpoint`: `command` (default ``sys.argv``: the program
    and its arguments) without --resume / --overwrite, plus ``--resume CHECKPOINT``."""
    program, *rest = sys.argv if command is None else command
    kept = []
    while rest:
        token = rest.pop(0)
        if token == "--resume" and rest and not rest[0].startswith("-"):
            rest.pop(0)
        if token not in ("--resume", "--overwrite") and not token.startswith("--resume="):
            kept.append(token)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = "accelerate launch <the same launch options> "
    else:
        launcher = "python " if program.endswith(".py") else ""
    return launcher + shlex.join([program, *kept, "--resume", checkpoint])


def run(args: argparse.Namespace) -> int:
    """Train (or evaluate) as `args` say; expected errors propagate to the command's one-line report."""
    if args.eval_only and not (args.resume or args.load_from):
        raise CommandError("--eval-only needs weights: --resume [DIR] or --load-from FILE")
    overrides = config_overrides(args)
    overrides += [f"train.output_dir={args.out}"] if args.out else []
    overrides += [f"train.compile={args.compile}"] if args.compile is not None else []
    cfg = load_config(args.config, overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from aqrcmt.training.alarms import TrainingStopped  # heavy imports after argument checking
    from aqrcmt.training.interrupt import TrainingInterrupted
    from aqrcmt.training.loop import TrainOptions, train

    try:
        result = train(cfg, TrainOptions(resume=args.resume, load_from=args.load_from,
                                         allow_missing=args.allow_missing, allow_unexpected=args.allow_unexpected,
                                         eval_only=args.eval_only, overwrite=args.overwrite))
    except TrainingInterrupted as stop:     # a signal: checkpoint written, exit status 75 (docs/training.md)
        if stop.main_process:
            print(f"{stop}; continue with: {resume_command(str(stop.checkpoint))}", file=sys.stderr)
        return stop.exit_code
    except TrainingStopped as stop:     # train.health.on_alarm=stop: exit status 3
        if stop.main_process:
            print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code
    print(f"run directory: {result.run_dir}")
    if result.last_checkpoint:
        print(f"last checkpoint: {result.last_checkpoint / 'model.safetensors'}")
    if result.metrics:
        print(f"mAP {result.metrics['mAP']:.4f}  NDS {result.metrics['NDS']:.4f}")
    return 0
