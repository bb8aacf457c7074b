"""Whole-detector speed for the `tiny` preset: forward (eval) and train step (forward + loss + backward +
AdamW step), eager vs `compile_dense()` (dense submodules compiled, sparse part eager).

Run: `TRITON_INTERPRET=1 python -m pytest bench/test_bench_model.py --benchmark-only -m ''`; the medians are
also written to bench/results/model_<device>.md. Compiled timings exclude compilation (warm-up rounds).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from aqrcmt.data.synthetic_batch import synthetic_batch
from aqrcmt.models import build_model
from aqrcmt.presets import get_preset

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RESULTS = Path(__file__).resolve().parent / "results" / f"model_{DEVICE.type}.md"
_MEDIANS: dict[tuple[str, str], float] = {}


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if not _MEDIANS:
        return
    lines = [f"# Tiny detector speed ({DEVICE.type}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads)", "",
             "Batch: 2 samples, 5 + 3 boxes, ~1,100 points each, 6 x 128x352 images. Median seconds per call;",
             "compiled = `CmtDetector.compile_dense()` after warm-up (compilation excluded).",
             f"1-minute load average at the end: {os.getloadavg()[0]:.1f} (a shared machine adds noise).", "",
             "| measurement | eager (s) | compiled (s) | speed-up |", "|---|---|---|---|"]
    for what in ("forward", "train_step"):
        eager, compiled = _MEDIANS.get((what, "eager")), _MEDIANS.get((what, "compiled"))
        ratio = f"{eager / compiled:.2f}x" if eager and compiled else "-"
        fmt = lambda v: f"{v:.3f}" if v else "-"
        lines.append(f"| {what} | {fmt(eager)} | {fmt(compiled)} | {ratio} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


def _model_and_batch(compiled: bool):
    cfg = get_preset("tiny").model
    torch.manual_seed(0)
    model = build_model(cfg).to(DEVICE)
    if compiled:
        model.compile_dense()
    return model, synthetic_batch(cfg, num_boxes=(5, 3), seed=0).to(DEVICE)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_tiny_forward(benchmark, mode):
    model, batch = _model_and_batch(mode == "compiled")
    model.eval()

    @torch.no_grad()
    def forward() -> None:
        model(batch)
        _synchronize()

    benchmark.pedantic(forward, rounds=5, warmup_rounds=2)
    _MEDIANS[("forward", mode)] = benchmark.stats.stats.median


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_tiny_train_step(benchmark, mode):
    model, batch = _model_and_batch(mode == "compiled")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        losses = model.loss(batch).losses
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        _synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=2)
    _MEDIANS[("train_step", mode)] = benchmark.stats.stats.median
