"""``aqrcmt study``: the AQR study under sensor failures (see :mod:`aqrcmt.study`).

    aqrcmt study --out study/            # the full study (docs/aqr_study.md)
    aqrcmt study --out study/ --quick    # every arm for a few steps on one seed (the end-to-end check)
    aqrcmt study --out study/ --arms control supervised_frozen --seeds 0 1
    aqrcmt study --out probe/ --arms supervised_e2e --seeds 0 --router-loss-weight 5 --aqr-lr-mult 25 --no-corruptions
    aqrcmt study --out probe/ --arms supervised_e2e --seeds 0 --set model.aqr.generator.attention=per_modality
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

from aqrcmt.config import ConfigError
from aqrcmt.presets import load_config
from aqrcmt.study import ARMS, ARM_NAMES, StudyPlan, run_study
from aqrcmt.tools.errors import CommandError
from aqrcmt.tools.options import add_set_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="study folder (created; a partly done one is resumed)")
    parser.add_argument("--quick", action="store_true", help="every arm for a few steps on a small benchmark")
    parser.add_argument("--arms", nargs="+", default=list(ARM_NAMES), metavar="ARM",
                        help=f"arms to run (default: all of {', '.join(ARM_NAMES)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="training seeds of every arm (default: 0 1 2; --quick: 0)")
    parser.add_argument("--finetune-steps", type=int, default=None, metavar="N",
                        help="fine-tuning steps of every arm and seed (default: 100; --quick: 4)")
    parser.add_argument("--camera-pretrain-steps", type=int, default=None, metavar="N",
                        help="camera-only steps the pretraining starts from (default: 1100; --quick: 4; 0: none, "
                             "the ModalMask3D pretraining starts from scratch)")
    parser.add_argument("--router-loss-weight", type=float, default=None, metavar="W",
                        help="router supervision weight of the supervised arms (default: 20)")
    parser.add_argument("--aqr-lr-mult", type=float, default=None, metavar="M",
                        help="learning-rate multiplier of the AQR module in every AQR arm (default: 50)")
    parser.add_argument("--no-corruptions", action="store_true",
                        help="leave out the corruption table (mRA of the control and the best arm)")
    add_set_option(parser)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    unknown = [a for a in args.arms if a not in ARM_NAMES]
    if unknown:
        raise CommandError(f"unknown study arm(s) {unknown}; known arms: {', '.join(ARM_NAMES)}")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise CommandError(f"--out {out}: cannot write there ({existing} is not a writable folder)")
    if args.seeds is not None and (not args.seeds or len(set(args.seeds)) != len(args.seeds)):
        raise CommandError(f"--seeds must name distinct seeds, got {args.seeds}")
    if args.finetune_steps is not None and args.finetune_steps < 1:
        raise CommandError(f"--finetune-steps must be >= 1, got {args.finetune_steps}")
    if args.camera_pretrain_steps is not None and args.camera_pretrain_steps < 0:
        raise CommandError(f"--camera-pretrain-steps must be >= 0, got {args.camera_pretrain_steps}")
    for option, value in (("--router-loss-weight", args.router_loss_weight), ("--aqr-lr-mult", args.aqr_lr_mult)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise CommandError(f"{option} must be a finite number > 0, got {value}")
    for arm in ARMS:    # a bad --set is refused before anything is written
        try:
            load_config(arm.preset, args.set)
        except ConfigError as err:
            raise CommandError(f"--set: {err}") from None
    plan = StudyPlan.quick(out, tuple(args.arms)) if args.quick else StudyPlan(out=out, arms=tuple(args.arms))
    changes = {"seeds": None if args.seeds is None else tuple(args.seeds), "finetune_steps": args.finetune_steps,
               "camera_pretrain_steps": args.camera_pretrain_steps,
               "router_loss_weight": args.router_loss_weight, "aqr_lr_mult": args.aqr_lr_mult,
               "robustness_corruptions": () if args.no_corruptions else None, "overrides": tuple(args.set) or None}
    plan = dataclasses.replace(plan, **{key: value for key, value in changes.items() if value is not None})
    report = run_study(plan)
    print(f"report: {report}")
    return 0
