"""Kernel benchmarks at the real sizes: B=2, Q=900, BEV 180x180, six views of 40x100, C=256, sigma 2.

CPU: the PyTorch paths inside the ops (what CPU training runs) vs the original renderer's loop and vs eager three-op
modulation.
GPU (skipped without CUDA): the Triton kernels. Results: bench/results/kernels_cpu.md, docs/kernels.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from aqrcmt.kernels import modulate, splat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kernels_splat import original_loop_splat  # noqa: E402  (the loop lives with the tests that check it)

BATCH, QUERIES, CHANNELS, SIGMA = 2, 900, 256, 2.0
MAPS = {"bev": (1, 180, 180), "pers": (6, 40, 100)}


def timed(fn, device: str):
    """fn, with a device sync after it on CUDA so the timing covers the kernels."""
    if device != "cuda":
        return fn

    def synced():
        result = fn()
        torch.cuda.synchronize()
        return result
    return synced


def splat_inputs(kind: str, device: str):
    """Weights ~ N(0.45, 0.1); BEV: every query on the map; perspective: 70 % of queries in one random view."""
    views, height, width = MAPS[kind]
    gen = torch.Generator().manual_seed(0)
    weights = (0.45 + 0.1 * torch.randn(BATCH, QUERIES, generator=gen)).clamp(0, 1)
    coords = torch.rand(BATCH, QUERIES, views, 2, generator=gen) * torch.tensor([height, width])
    view = torch.randint(views, (BATCH, QUERIES), generator=gen)
    valid = torch.nn.functional.one_hot(view, views).bool() & (torch.rand(BATCH, QUERIES, 1, generator=gen) < 0.7)
    if views == 1:
        valid[:] = True
    return weights.to(device), coords.to(device), valid.to(device), height, width


@pytest.mark.parametrize("kind", MAPS)
def test_splat_original_loop_cpu(benchmark, kind):
    weights, coords, valid, height, width = splat_inputs(kind, "cpu")
    benchmark.pedantic(original_loop_splat, args=(weights, coords, valid, height, width), kwargs=dict(sigma=SIGMA),
                       rounds=5, iterations=1)


@pytest.mark.parametrize("options", [dict(), dict(position="exact"), dict(kernel_norm="normalized")],
                         ids=["floor-sum", "exact-sum", "floor-normalized"])
@pytest.mark.parametrize("kind", MAPS)
def test_splat_forward(benchmark, kind, options, device):
    weights, coords, valid, height, width = splat_inputs(kind, device)
    benchmark(timed(lambda: splat(weights, coords, valid, height, width, sigma=SIGMA, **options), device))


@pytest.mark.parametrize("position", ["floor", "exact"])
@pytest.mark.parametrize("kind", MAPS)
def test_splat_forward_backward(benchmark, kind, position, device):
    weights, coords, valid, height, width = splat_inputs(kind, device)
    weights.requires_grad_()
    coords.requires_grad_(position == "exact")

    def step():
        out = splat(weights, coords, valid, height, width, sigma=SIGMA, position=position)
        out.sum().backward()
    benchmark(timed(step, device))


def feature_inputs(kind: str, device: str, dtype: torch.dtype = torch.float32):
    views, height, width = MAPS[kind]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * views, CHANNELS, height, width, generator=gen).to(device, dtype)
    w = torch.rand(BATCH * views, height, width, generator=gen).to(device)
    return x, w


@pytest.mark.parametrize("kind", MAPS)
def test_modulate_eager_three_ops(benchmark, kind, device):
    """The original modulator's x * w + r * x."""
    x, w = feature_inputs(kind, device)
    benchmark(timed(lambda: x * w[:, None] + 0.7 * x, device))


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("kind", MAPS)
def test_modulate(benchmark, kind, stats, device):
    x, w = feature_inputs(kind, device)
    benchmark(timed(lambda: modulate(x, w, beta=0.7, return_stats=stats), device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", MAPS)
def test_modulate_low_precision_cuda(benchmark, kind, dtype, cuda_device):
    x, w = feature_inputs(kind, cuda_device, dtype)
    benchmark(timed(lambda: modulate(x, w, beta=0.7, return_stats=True), cuda_device))


@pytest.mark.parametrize("kind", MAPS)
def test_modulate_forward_backward(benchmark, kind, device):
    x, w = feature_inputs(kind, device)
    x.requires_grad_()
    w.requires_grad_()

    def step():
        modulate(x, w, beta=0.7).sum().backward()
    benchmark(timed(step, device))
