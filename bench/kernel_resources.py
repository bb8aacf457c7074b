"""Kernel resources for GPUs that are not there: every launch compiled ahead of time for sm_80 / sm_90 / sm_100.

    python bench/kernel_resources.py --out bench/results/kernel_resources.md          # released sizes, all options
    python bench/kernel_resources.py --quick --dtypes fp32 --json FILE                # the default test's run

Per launch (kernels/aot.py: each kernel x constexpr combination the presets and the renderer options launch x
input dtype) and architecture: registers against the budget of the occupancy the launch assumes, shared memory,
spills (local memory), warps, theoretical occupancy, programs and waves, and at the real sizes the (pixel, query)
pairs visited, the bytes moved, the instructions issued and the roofline time (datasheet bandwidth and FP32 rate).
Exit status 1 when a launch fails to compile, spills or exceeds its register budget; 2 on bad arguments.
Run it with TRITON_INTERPRET unset (the interpreter replaces the kernels' JIT functions).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import triton

from aqrcmt.atomic import atomic_write_bytes
from aqrcmt.kernels import aot
from gpucheck.inputs import splat_inputs
from gpucheck.plan import REAL_SIZES

OLD_BLOCK_P, OLD_BLOCK_Q = 128, 32      # the gather kernel before binning: every 128-pixel tile x every query


def cpu_inputs(sizes: aot.KernelSizes, kind: str, dtype: torch.dtype) -> tuple:
    """The device check's kernel inputs (gpucheck/inputs.py) on the CPU: the pairs counted are the pairs timed."""
    return splat_inputs(sizes, kind, dtype, torch.device("cpu"))


def unbinned_pairs(launch: aot.Launch) -> int:
    """(pixel, query) pairs the previous forward kernel evaluated for the same maps and queries."""
    args = dict(zip(launch.kernel.arg_names, launch.args))
    batch, queries = args["weight_ptr"].shape
    views, height, width = args["out_ptr"].shape[1:]
    return (batch * views * math.ceil(height * width / OLD_BLOCK_P) * OLD_BLOCK_P
            * math.ceil(queries / OLD_BLOCK_Q) * OLD_BLOCK_Q)


def measure(variants: list[aot.Variant], archs: list[int]) -> list[dict]:
    """One row per (variant, architecture); each distinct build compiled once."""
    rows, builds = [], {}
    for variant in variants:
        launch = variant.build()
        work = aot.launch_work(launch)
        programs = math.prod(launch.grid)
        for capability in archs:
            arch = aot.ARCHS[capability]
            key = (aot.build_key(launch), capability)
            row = {"launch": variant.name, "kernel": variant.kernel, "dtype": variant.dtype, "arch": f"sm_{capability}",
                   "warps": launch.num_warps, "programs": programs, "pairs": work.pairs, "bytes": work.bytes,
                   "ops": work.ops, "assumed_occupancy": launch.occupancy,
                   "register_budget": aot.register_budget(launch.num_warps, launch.occupancy, arch)}
            if variant.kernel == "splat forward":
                row["unbinned_pairs"] = unbinned_pairs(launch)
            if key not in builds:
                try:
                    compiled = aot.compile_launch(launch, capability)
                    builds[key] = aot.resource_usage(compiled.asm["cubin"], compiled.metadata.name)
                except Exception as exc:  # noqa: BLE001  (a failed build is a row of the report, not its end)
                    builds[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            res = builds[key]
            if isinstance(res, str):
                rows.append({**row, "error": res, "ok": False})
                continue
            seconds, bound = aot.roofline_seconds(work, arch)
            resident = aot.blocks_per_sm(res, launch.num_warps, arch)
            rows.append({**row, "registers": res.registers, "shared": res.shared, "local": res.local,
                         "stack": res.stack, "occupancy": aot.occupancy(res, launch.num_warps, arch),
                         "waves": programs / (arch.sms * resident) if resident else math.inf,
                         "predicted_us": seconds * 1e6, "bound": bound,
                         "ok": not res.spills and res.registers <= row["register_budget"]})
    return rows


def markdown(rows: list[dict], sizes: aot.KernelSizes, command: str, seconds: float) -> str:
    """The report: the fp32 launches in full, the bf16/fp16 builds summarised, the pairs before/after binning."""
    failed = [r for r in rows if not r["ok"]]
    lines = ["# Kernel resources for sm_80 / sm_90 / sm_100 (bench/kernel_resources.py)", "",
             f"Compiled ahead of time on a machine without a GPU (Triton {triton.__version__}, its NVIDIA backend's "
             f"ptxas, `cuobjdump --dump-resource-usage`), {platform.machine()} CPU, in {seconds:.0f} s. Command: "
             f"`{command}`.", "",
             f"Sizes: {sizes.describe()}; splat inputs as in the device check (weights ~ N(0.45, 0.1), coordinates "
             "uniform over the map, camera queries in one random view with probability 0.7). Launches: every AQR "
             "preset's renderer (BEV and camera) and each renderer mode no preset uses, modulation with and without "
             "statistics; fp32, bf16, fp16 inputs.", "",
             f"**{len(rows) - len(failed)} of {len(rows)} (launch, architecture) builds pass**: compiled, no spill, "
             "registers within the budget of the occupancy the launch assumes (50 %: 64 registers per thread).", ""]
    for row in failed:
        why = row.get("error") or (f"registers {row['registers']} > {row['register_budget']}, "
                                   f"local {row['local']} B")
        lines.append(f"- FAILED {row['launch']} on {row['arch']}: {why}")
    lines += ["", "Occupancy is theoretical (resident warps / 64 per SM: registers, shared memory, warps, blocks). "
              "Predicted: the roofline time, max(bytes / bandwidth, instructions / FP32 issue rate) with the "
              "datasheet numbers in kernels/aot.py (A100 2039 GB/s, 19.5 TFLOP/s; H100 SXM 3350 GB/s, 66.9; B200 "
              "8000 GB/s, 75), launch latency excluded; instructions per pair are estimates (aot.OPS_PER_PAIR). "
              "Waves: programs / (SMs x resident blocks).", "",
              "## fp32 launches", "",
              "| launch | arch | regs (budget) | smem B | spill B | warps | occupancy | programs | waves | "
              "pairs visited (M) | MB moved | predicted us (bound) |", "|---" * 12 + "|"]
    for r in rows:
        if r["dtype"] != "fp32" or "error" in r:
            continue
        lines.append(f"| {r['launch'].removesuffix(', fp32')} | {r['arch']} | {r['registers']} "
                     f"({r['register_budget']}) | {r['shared']} | {r['local']} | {r['warps']} | {r['occupancy']:.0%} | {r['programs']} | "
                     f"{r['waves']:.2f} | {r['pairs'] / 1e6:.2f} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['predicted_us']:.1f} ({r['bound']}) |")
    lines += ["", "## bf16 / fp16 inputs", "", "| dtype | arch | builds | max regs | min occupancy | spills |",
              "|---|---|---|---|---|---|"]
    for dtype in ("bf16", "fp16"):
        for arch in sorted({r["arch"] for r in rows}):
            sel = [r for r in rows if r["dtype"] == dtype and r["arch"] == arch and "error" not in r]
            if sel:
                lines.append(f"| {dtype} | {arch} | {len(sel)} | {max(r['registers'] for r in sel)} | "
                             f"{min(r['occupancy'] for r in sel):.0%} | {sum(r['local'] > 0 for r in sel)} |")
    lines += ["", "## Pixel-query pairs of the splat forward, before and after binning", "",
              "Before: the gather kernel every 128-pixel block of every map ran against every query (in blocks of "
              "32). After: each 16x16 tile against the queries listed for it (in blocks of 8).", "",
              "| launch | before (M) | after (M) | after / before |", "|---|---|---|---|"]
    for r in rows:
        if "unbinned_pairs" in r and r["dtype"] == "fp32" and r["arch"] == "sm_90":
            lines.append(f"| {r['launch'].removesuffix(', fp32')} | {r['unbinned_pairs'] / 1e6:.1f} | "
                         f"{r['pairs'] / 1e6:.2f} | {r['pairs'] / r['unbinned_pairs']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="the presets' launches only, released map sizes with 16 queries (the default test)")
    parser.add_argument("--archs", default="80,90,100", help="compute capabilities, comma-separated")
    parser.add_argument("--dtypes", default=",".join(aot.DTYPES), help="input dtypes, comma-separated")
    args = parser.parse_args(argv)
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    if not dtypes or any(d not in aot.DTYPES for d in dtypes):
        print(f"error: --dtypes: {args.dtypes!r}: expected a comma-separated subset of {list(aot.DTYPES)}",
              file=sys.stderr)
        return 2
    try:
        archs = [int(a) for a in args.archs.split(",")]
    except ValueError:
        archs = []
    if not archs or any(a not in aot.ARCHS for a in archs):
        print(f"error: --archs: {args.archs!r}: expected a comma-separated subset of {sorted(aot.ARCHS)}",
              file=sys.stderr)
        return 2
    missing = aot.nvidia_backend_missing() or (
        "TRITON_INTERPRET=1 replaces the kernels' JIT functions: unset it" if os.environ.get("TRITON_INTERPRET") == "1"
        else "")
    if missing:
        print(f"error: cannot compile for NVIDIA GPUs here: {missing}", file=sys.stderr)
        return 2
    start = time.monotonic()
    sizes = aot.RELEASED_MAPS_FEW_QUERIES if args.quick else REAL_SIZES
    variants = aot.launch_variants(sizes, options=not args.quick, dtypes=dtypes, splat_inputs=cpu_inputs)
    rows = measure(variants, archs)
    seconds = time.monotonic() - start
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(rows, indent=1) + "\n").encode())
    if args.out:
        command = " ".join(["python bench/kernel_resources.py", *(argv if argv is not None else sys.argv[1:])])
        atomic_write_bytes(args.out, markdown(rows, sizes, command, seconds).encode())
    failed = [r["launch"] + " " + r["arch"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} builds pass ({seconds:.0f} s)" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
