"""Train (and evaluate) AQR-CMT.

    accelerate launch train/main.py --config cmt_aqr_voxel0075_vov_1600x640_cbgs \
        --load-from cmt_vov.safetensors --set data.root=/data/nuscenes optim.lr=1e-4
    python train/main.py --config tiny          # one process, plain Python
    accelerate launch --multi_gpu --num_processes 2 train/main.py --config tiny   # 2 CPU processes without a GPU

Any config field can be overridden with ``--set key.path=value``; the resolved config is saved as
``<output_dir>/config.json``. docs/training.md describes the checkpoint layout and the monitored signals.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from aqrcmt.presets import list_presets, load_config
from aqrcmt.tools.errors import CommandError, add_debug_flag, run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help=f"a preset ({', '.join(list_presets())}) or a config .json")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    p.add_argument("--output-dir", help="run directory (= --set train.output_dir=...)")
    p.add_argument("--resume", nargs="?", const="latest",
                   help="continue a run: 'latest' (default), a checkpoint dir, or 'auto' (continue the latest "
                        "checkpoint if there is one, else start; what a requeued job uses)")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew in an output dir that holds a run; the old directory is renamed to "
                        "<output-dir>.replaced-<time> (never deleted) once the new run's checks passed")
    p.add_argument("--load-from", help="initialise from converted pretrained weights (.safetensors)")
    p.add_argument("--allow-missing", nargs="*", default=[], metavar="PATTERN",
                   help="--load-from: accept missing keys matching these fnmatch patterns")
    p.add_argument("--allow-unexpected", nargs="*", default=[], metavar="PATTERN",
                   help="--load-from: accept unexpected keys matching these fnmatch patterns")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="torch.compile the model (default: on for CUDA)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--eval-only", action="store_true", help="evaluate the (loaded/resumed) model and exit")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_command(lambda: run(args, argv), debug=args.debug)


def resume_command(argv: list[str], checkpoint: str) -> str:
    """The command line that continues this run from `checkpoint` (argv without --resume / --overwrite)."""
    kept, rest = [], list(argv)
    while rest:
        token = rest.pop(0)
        if token == "--resume" and rest and not rest[0].startswith("-"):
            rest.pop(0)
        if token not in ("--resume", "--overwrite") and not token.startswith("--resume="):
            kept.append(token)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = "accelerate launch <the same launch options>" if processes > 1 else "python"
    return f"{launcher} {shlex.join([sys.argv[0], *kept, '--resume', checkpoint])}"


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Train (or evaluate) as `args` say; expected errors propagate to :func:`main`'s one-line report."""
    if args.eval_only and not (args.resume or args.load_from):
        raise CommandError("--eval-only needs weights: --resume [DIR] or --load-from FILE")
    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.compile is not None:
        overrides.append(f"train.compile={args.compile}")
    cfg = load_config(args.config, overrides)
    from aqrcmt.training.alarms import TrainingStopped  # heavy imports after argument checking
    from aqrcmt.training.interrupt import TrainingInterrupted
    from aqrcmt.training.loop import TrainOptions, train

    try:
        result = train(cfg, TrainOptions(resume=args.resume, load_from=args.load_from,
                                         allow_missing=args.allow_missing, allow_unexpected=args.allow_unexpected,
                                         eval_only=args.eval_only, overwrite=args.overwrite))
    except TrainingInterrupted as stop:     # a signal: checkpoint written, exit status 75 (docs/training.md)
        if stop.main_process:
            print(f"{stop}; continue with: {resume_command(argv, str(stop.checkpoint))}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
