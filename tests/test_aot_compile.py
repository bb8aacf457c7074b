"""Every kernel launch the presets make, compiled ahead of time for sm_80 / sm_90 / sm_100 on this GPU-less machine:
no compile error, no spill, registers within the budget of the occupancy each launch assumes (kernels/aot.py,
bench/kernel_resources.py). And the occupancy arithmetic and the binned splat's work, checked by hand.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aqrcmt.kernels import aot
from aqrcmt.kernels.splat_params import SplatParams
from aqrcmt.kernels.splat_triton import splat_forward_launch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
MISSING = aot.nvidia_backend_missing()


def run_report(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """bench/kernel_resources.py in a process without TRITON_INTERPRET (the compiler needs the JIT functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    return proc, json.loads(out.read_text()) if out.exists() else []


def check_rows(rows: list[dict], dtypes: tuple[str, ...]) -> None:
    bad = [(r["launch"], r["arch"], r.get("error"), r.get("registers"), r.get("local")) for r in rows if not r["ok"]]
    assert not bad
    # each kernel on each architecture and dtype; the presets' renderers both on the BEV and on the camera maps
    assert {(r["kernel"], r["arch"], r["dtype"]) for r in rows} == {
        (k, f"sm_{a}", d) for k in ("splat forward", "splat backward", "modulate forward", "modulate backward")
        for a in (80, 90, 100) for d in dtypes}
    assert any("recommended" in r["launch"] and "camera" in r["launch"] for r in rows)
    for r in rows:
        assert r["local"] == 0 and r["stack"] == 0 and 0 < r["registers"] <= r["register_budget"]
        assert r["occupancy"] >= r["assumed_occupancy"]


@pytest.mark.skipif(bool(MISSING), reason=f"no ahead-of-time compile: {MISSING}")
def test_presets_launches_compile_for_three_architectures(tmp_path):
    """fp32: the presets' launches (about 45 builds; bf16 and fp16 in the slow test)."""
    proc, rows = run_report(tmp_path, "--quick", "--dtypes", "fp32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_rows(rows, ("fp32",))


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"no ahead-of-time compile: {MISSING}")
def test_every_launch_option_and_dtype_compiles_at_released_sizes(tmp_path):
    proc, rows = run_report(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_rows(rows, ("fp32", "bf16", "fp16"))
    assert {r["launch"].split(", ")[1] for r in rows} >= set(aot.OPTION_RENDERS)


def test_bad_arguments_exit_2(tmp_path):
    proc, rows = run_report(tmp_path, "--archs", "75")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --archs") and not rows
    assert not (tmp_path / "rows.json").exists()


def test_occupancy_arithmetic():
    """H100: 65536 registers and 64 warps per SM; registers are allocated per warp in units of 256."""
    h100 = aot.ARCHS[90]
    assert aot.register_budget(4, 0.5, h100) == 64 and aot.register_budget(8, 0.5, h100) == 64
    assert aot.register_budget(4, 0.25, h100) == 128
    res = lambda regs, shared=0: aot.Resources(regs, shared, 0, 0)  # noqa: E731
    assert aot.occupancy(res(64), 4, h100) == 0.5                  # 8 blocks of 4 warps
    assert aot.occupancy(res(128), 4, h100) == 0.25
    assert aot.occupancy(res(65), 4, h100) == 7 * 4 / 64          # 65 x 32 rounds up to 2304 per warp: 7 blocks
    assert aot.occupancy(res(32), 4, h100) == 1.0
    assert aot.occupancy(res(32, shared=100 * 1024), 4, h100) == 2 * 4 / 64   # shared memory limits to 2 blocks
    assert aot.occupancy(res(32, shared=100 * 1024), 4, aot.ARCHS[80]) == 1 * 4 / 64


def test_binned_forward_visits_few_pairs_at_released_sizes():
    """900 + 300 queries on two 180x180 BEV maps: the binned forward evaluates under 10 % of the pairs that
    every pixel x every query would be, and its work grows with the footprint, not the map."""
    sizes = aot.RELEASED
    weights, coords, valid, h, w = aot.uniform_inputs(sizes, "bev", torch.float32)
    every_pair = sizes.batch * h * w * sizes.queries
    pairs = {}
    for sigma in (1.0, 2.0):
        p = SplatParams.build(h, w, method="gaussian", kernel_norm="sum", position="floor", sigma=sigma,
                              kernel_size=None, threshold=0.0, clamp_max=None, fill=1.0, eps=1e-6)
        launch, _ = splat_forward_launch(weights, coords, valid, p)
        pairs[sigma] = aot.launch_work(launch).pairs
        assert pairs[sigma] < 0.1 * every_pair
    assert pairs[1.0] < pairs[2.0]
