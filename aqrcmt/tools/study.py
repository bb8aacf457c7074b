"""``aqrcmt study``: the AQR fine-tuning study (see :mod:`aqrcmt.study`).

    aqrcmt study --out study/            # the full study (docs/aqr_study.md)
    aqrcmt study --out study/ --quick    # every arm for a few steps (the end-to-end check)
    aqrcmt study --out study/ --arms control recommended
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from aqrcmt.study import ARM_NAMES, StudyPlan, run_study
from aqrcmt.tools.errors import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="study folder (created; a partly done one is resumed)")
    parser.add_argument("--quick", action="store_true", help="every arm for a few steps on a small benchmark")
    parser.add_argument("--arms", nargs="+", default=list(ARM_NAMES), metavar="ARM",
                        help=f"arms to run (default: all of {', '.join(ARM_NAMES)})")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    unknown = [a for a in args.arms if a not in ARM_NAMES]
    if unknown:
        raise CommandError(f"unknown study arm(s) {unknown}; known arms: {', '.join(ARM_NAMES)}")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise CommandError(f"--out {out}: cannot write there ({existing} is not a writable folder)")
    plan = StudyPlan.quick(out, tuple(args.arms)) if args.quick else StudyPlan(out=out, arms=tuple(args.arms))
    report = run_study(plan)
    print(f"report: {report}")
    print(f"plot:   {out / 'map_vs_step.png'}")
    return 0
