"""The device check's report: the environment, and the markdown beside the JSON."""
from __future__ import annotations

import math
import os
import platform
import time
from typing import Any

import torch

from .plan import Plan


def environment(plan: Plan) -> dict:
    env = {"device": plan.label, "torch": torch.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
           "smoke": plan.smoke, "compile_backend": plan.compile_backend, "date_utc": time.strftime(
               "%Y-%m-%d %H:%M", time.gmtime())}
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2 ** 30, cuda=torch.version.cuda)
    else:
        env["load_average_1min"] = os.getloadavg()[0]
    return env


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1e-2 and value else f"{value:,.3f}".rstrip("0").rstrip(".")
    if value is None:
        return "-"
    return str(value)


def row_tables(rows: list[dict]) -> list[tuple[list[str], list[dict]]]:
    """Rows grouped into one table per key set, in order of first appearance."""
    tables: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        tables.setdefault(tuple(row), []).append(row)
    return [(list(columns), group) for columns, group in tables.items()]


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Device check: {env['device']}", "",
             "Written by `bench/gpu_check.py` (protocol: docs/benchmarks.md). "
             + ", ".join(f"{k} {fmt(v)}" for k, v in env.items()) + ".", ""]
    for part in report["parts"].values():
        lines += [f"## {part['name']}: {part['status']} ({part['seconds']:.0f} s of {part['budget_s']:.0f} s)", ""]
        for key in ("reason", "error"):
            if part[key]:
                lines += [f"**{key}**: {part[key]}", ""]
        lines += [f"- {text}" for text in part["protocol"] + part["notes"]]
        if part["checks"]:
            lines += ["", "| check | value | target | met |", "|---|---|---|---|"]
            lines += [f"| {c['check']} | {fmt(c['value'])} | {c['target']} | {fmt(c['met'])} |"
                      for c in part["checks"]]
        for columns, rows in row_tables(part["rows"]):
            lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)
