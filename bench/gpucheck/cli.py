"""GPU readiness check: one prepared run that answers "does it work, and how fast" on a device in a few minutes.

The command line of bench/gpu_check.py: run the selected parts in order, each in its time box, and write
`<out>/<device>.md` and `.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .correctness import part_correctness
from .export import export_skip_reason, part_export
from .inference import part_inference
from .kernel_speed import part_kernels
from .part import Part, run_part, skip_part
from .plan import Plan, make_plan
from .report import environment, markdown
from .training import part_training

PARTS: dict[str, Callable[[Part, Plan], None]] = {
    "correctness": part_correctness, "kernels": part_kernels, "inference": part_inference, "training": part_training,
    "export": part_export}


def run(plan: Plan, out: Path, parts: list[str]) -> dict:
    report = {"environment": environment(plan), "parts": {}}
    for name in PARTS:
        if name not in parts:
            report["parts"][name] = skip_part(name, "not selected (--parts)")
        elif name == "correctness" and plan.triton_sizes is None:
            report["parts"][name] = skip_part(name, plan.triton_skip_reason)
        elif name == "export" and export_skip_reason(plan.device):
            report["parts"][name] = skip_part(name, export_skip_reason(plan.device))
        else:
            print(f"[gpu_check] {name} (budget {plan.budgets_s[name]:.0f} s) ...", flush=True)
            report["parts"][name] = run_part(name, plan.budgets_s[name], lambda part: PARTS[name](part, plan))
            print(f"[gpu_check] {name}: {report['parts'][name]['status']} "
                  f"in {report['parts'][name]['seconds']:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{plan.label}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{plan.label}.md").write_text(markdown(report))
    print(f"[gpu_check] wrote {out / plan.label}.md and .json", flush=True)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for <device>.md and <device>.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one timed iteration (CPU test)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU, eager with --smoke)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: --parts: unknown part(s) {unknown}; known: {list(PARTS)}", file=sys.stderr)
        return 2
    if not args.budget_scale > 0:
        print(f"error: --budget-scale must be > 0, got {args.budget_scale}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 with CUDA would run and time Triton's interpreter; unset it", file=sys.stderr)
        return 2
    run(make_plan(args.smoke, device, args.compile_backend, args.budget_scale), args.out, parts)
    return 0
