"""Kernel benchmarks at the real sizes: B=2, Q=900, BEV 180x180, six views of 40x100, C=256, sigma 2.

CPU: the PyTorch paths inside the ops (what CPU training runs) vs the original renderer's loop and vs eager three-op
modulation.
GPU (skipped without CUDA): the Triton kernels. Results: bench/results/kernels_cpu.md, docs/kernels.md.
Inputs: gpucheck.inputs (bench/gpucheck/inputs.py), the builders the device check uses.
"""
from __future__ import annotations

import pytest
import torch

from aqrcmt.kernels import modulate, splat
from aqrcmt.kernels.splat_original import original_loop_splat
from gpucheck.inputs import feature_inputs, splat_inputs
from gpucheck.plan import KernelSizes

SIGMA = 2.0
SIZES = KernelSizes(batch=2, queries=900, bev_hw=(180, 180), views=6, camera_hw=(40, 100), channels=256)
KINDS = ("bev", "camera")


def timed(fn, device: str):
    """fn, with a device sync after it on CUDA so the timing covers the kernels."""
    if device != "cuda":
        return fn

    def synced():
        result = fn()
        torch.cuda.synchronize()
        return result
    return synced


@pytest.mark.parametrize("kind", KINDS)
def test_splat_original_loop_cpu(benchmark, kind):
    weights, coords, valid, height, width = splat_inputs(SIZES, kind, torch.float32, torch.device("cpu"))
    benchmark.pedantic(original_loop_splat, args=(weights, coords, valid, height, width), kwargs=dict(sigma=SIGMA),
                       rounds=5, iterations=1)


@pytest.mark.parametrize("options", [dict(), dict(position="exact"), dict(kernel_norm="normalized")],
                         ids=["floor-sum", "exact-sum", "floor-normalized"])
@pytest.mark.parametrize("kind", KINDS)
def test_splat_forward(benchmark, kind, options, device):
    weights, coords, valid, height, width = splat_inputs(SIZES, kind, torch.float32, torch.device(device))
    benchmark(timed(lambda: splat(weights, coords, valid, height, width, sigma=SIGMA, **options), device))


@pytest.mark.parametrize("position", ["floor", "exact"])
@pytest.mark.parametrize("kind", KINDS)
def test_splat_forward_backward(benchmark, kind, position, device):
    weights, coords, valid, height, width = splat_inputs(SIZES, kind, torch.float32, torch.device(device))
    weights.requires_grad_()
    coords.requires_grad_(position == "exact")

    def step():
        out = splat(weights, coords, valid, height, width, sigma=SIGMA, position=position)
        out.sum().backward()
    benchmark(timed(step, device))


@pytest.mark.parametrize("kind", KINDS)
def test_modulate_eager_three_ops(benchmark, kind, device):
    """The original modulator's x * w + r * x."""
    x, w = feature_inputs(SIZES, kind, torch.float32, torch.device(device))
    benchmark(timed(lambda: x * w[:, None] + 0.7 * x, device))


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("kind", KINDS)
def test_modulate(benchmark, kind, stats, device):
    x, w = feature_inputs(SIZES, kind, torch.float32, torch.device(device))
    benchmark(timed(lambda: modulate(x, w, beta=0.7, return_stats=stats), device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_modulate_low_precision_cuda(benchmark, kind, dtype, cuda_device):
    x, w = feature_inputs(SIZES, kind, dtype, torch.device(cuda_device))
    benchmark(timed(lambda: modulate(x, w, beta=0.7, return_stats=True), cuda_device))


@pytest.mark.parametrize("kind", KINDS)
def test_modulate_forward_backward(benchmark, kind, device):
    x, w = feature_inputs(SIZES, kind, torch.float32, torch.device(device))
    x.requires_grad_()
    w.requires_grad_()

    def step():
        modulate(x, w, beta=0.7).sum().backward()
    benchmark(timed(step, device))
