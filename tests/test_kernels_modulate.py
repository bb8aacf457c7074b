"""aqrcmt.kernels.modulate: the op (PyTorch path and Triton kernel) vs the specification modulate_ref vs the original
modulator's formulas.

Run with TRITON_INTERPRET=1 so the Triton kernels execute on CPU tensors (force_triton()).
"""
from __future__ import annotations

import os

import pytest
import torch

from aqrcmt.kernels import ModulationStats, force_triton, modulate, modulate_ref

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the Triton kernels run on CPU only with TRITON_INTERPRET=1")


def random_pair(n: int, c: int, h: int, w: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=gen).to(dtype), torch.rand(n, h, w, generator=gen)


def modulate_with_grads(x, w, triton: bool, cotangent_dtype=None, **options):
    """(out, stats, grad_x, grad_w) of sum(out * fixed random cotangent) (rounded to cotangent_dtype if given)."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    with force_triton(triton):
        out, stats = modulate(x, w, return_stats=True, **options)
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        cotangent = cotangent.to(cotangent_dtype or out.dtype).to(out.dtype)
        grad_x, grad_w = torch.autograd.grad(out, (x, w), cotangent)
    return out.detach(), stats, grad_x, grad_w


@pytest.mark.parametrize("r", [0.1, 0.7])
def test_original_formulas(r):
    """The original FeatureModulator (as coded), its convex variant, and the channel-wise / adaptive modes."""
    x, w = random_pair(2, 5, 6, 7)
    torch.testing.assert_close(modulate(x, w, alpha=1.0, beta=r), x * w[:, None] + r * x)
    torch.testing.assert_close(modulate(x, w, alpha=1 - r, beta=r), (1 - r) * x * w[:, None] + r * x)
    mean = w.mean((1, 2))[:, None, None, None]
    torch.testing.assert_close(modulate(x, w, beta=r, mode="channel_wise"), x * mean + r * x)
    adaptive = 0.7 * x * w[:, None] + 0.3 * x * mean + r * x
    torch.testing.assert_close(modulate(x, w, beta=r, mode="adaptive"), adaptive)


def test_statistics_match_direct_sums():
    x, w = random_pair(3, 4, 5, 6, seed=2)
    out, stats = modulate(x, w, alpha=0.3, beta=0.7, return_stats=True)
    assert isinstance(stats, ModulationStats) and all(s.dtype == torch.float32 and s.dim() == 0 for s in stats)
    expected = [(out - x).abs().sum(), x.abs().sum(), out.sum(), (out * out).sum()]
    for got, want in zip(stats, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    spec_out, spec_stats = modulate_ref(x, w, alpha=0.3, beta=0.7, return_stats=True)
    torch.testing.assert_close(out, spec_out)
    for got, want in zip(stats, spec_stats):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["element_wise", "channel_wise", "adaptive"])
def test_spec_gradcheck(mode):
    x, w = random_pair(2, 3, 4, 5, seed=3)
    x = x.double().requires_grad_()
    w = w.double().requires_grad_()
    fn = lambda x, w: modulate_ref(x, w, alpha=0.6, beta=0.4, mode=mode)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize("mode", ["element_wise", "channel_wise", "adaptive"])
def test_op_backward_matches_spec_autograd(mode):
    x, w = random_pair(2, 3, 4, 5, seed=4)
    out, _, grad_x, grad_w = modulate_with_grads(x, w, triton=False, alpha=0.6, beta=0.4, mode=mode)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = modulate_ref(xr, wr, alpha=0.6, beta=0.4, mode=mode)
    cotangent = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    ref_x, ref_w = torch.autograd.grad(ref, (xr, wr), cotangent)
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(grad_x, ref_x)
    torch.testing.assert_close(grad_w, ref_w)


@needs_interpreter
@pytest.mark.parametrize("mode", ["element_wise", "channel_wise", "adaptive"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 20, 12, 13)])   # C and H*W not multiples of the blocks
def test_triton_matches_reference(mode, shape):
    x, w = random_pair(*shape, seed=shape[0])
    ref = modulate_with_grads(x, w, triton=False, alpha=0.8, beta=0.7, mode=mode)
    tri = modulate_with_grads(x, w, triton=True, alpha=0.8, beta=0.7, mode=mode)
    torch.testing.assert_close(tri[0], ref[0])
    for got, want in zip(tri[1], ref[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(tri[2], ref[2])
    torch.testing.assert_close(tri[3], ref[3], rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype):
    x, w = random_pair(2, 18, 6, 9, seed=5, dtype=dtype)
    tri = modulate_with_grads(x, w, triton=True, beta=0.7, mode="adaptive")
    ref32 = modulate_with_grads(x.float(), w, triton=False, cotangent_dtype=dtype, beta=0.7, mode="adaptive")
    assert tri[0].dtype == dtype and tri[2].dtype == dtype and tri[3].dtype == torch.float32
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10      # one rounding of the fp32 result (the interpreter
    #                                                               may truncate instead of rounding to nearest)
    torch.testing.assert_close(tri[0].float(), ref32[0], rtol=ulp, atol=1e-6)
    torch.testing.assert_close(tri[2].float(), ref32[2], rtol=ulp, atol=1e-6)
    torch.testing.assert_close(tri[3], ref32[3], rtol=1e-4, atol=1e-4)   # fp32 accumulation over channels
    for got, want in zip(tri[1], ref32[1]):                              # statistics from the fp32 product
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    with force_triton(False):
        torch.testing.assert_close(modulate(x, w, beta=0.7, mode="adaptive"), tri[0])


@pytest.mark.parametrize("triton", [False, pytest.param(True, marks=needs_interpreter)])
def test_empty_maps(triton):
    x, w = random_pair(2, 0, 3, 4)
    with force_triton(triton):
        out, stats = modulate(x, w, beta=0.5, return_stats=True)
    assert out.shape == x.shape and all(s.item() == 0 for s in stats)


@pytest.mark.parametrize("x,w,match", [
    (torch.rand(2, 3, 4), torch.rand(2, 3, 4), "x must be"),
    (torch.rand(2, 3, 4, 5), torch.rand(2, 4, 6), "w must be"),
    (torch.rand(2, 3, 4, 5), torch.rand(3, 4, 5), "w must be"),
    (torch.ones(2, 3, 4, 5, dtype=torch.int32), torch.rand(2, 4, 5), "x must be a floating"),
    (torch.rand(2, 3, 4, 5), torch.rand(2, 4, 5, device="meta"), "device"),
])
def test_bad_input_raises_naming_the_argument(x, w, match):
    with pytest.raises(ValueError, match=match):
        modulate(x, w)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        modulate(*random_pair(1, 2, 3, 3), mode="spatial")
