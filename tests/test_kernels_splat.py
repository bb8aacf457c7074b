"""aqrcmt.kernels.splat: the specification splat_ref vs the original renderer's plain loop, and the separable
PyTorch path and the Triton kernel vs the specification.

Run with TRITON_INTERPRET=1 so the Triton kernels execute on CPU tensors (force_triton()).
"""
from __future__ import annotations

import os

import pytest
import torch

from aqrcmt.kernels import SplatParams, force_triton, gaussian_kernel_size, splat, splat_ref, splat_separable
from aqrcmt.kernels.splat_original import original_loop_splat

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the Triton kernels run on CPU only with TRITON_INTERPRET=1")


def random_inputs(batch: int, num_queries: int, views: int, height: int, width: int, seed: int = 0,
                  margin: float = 3.0, p_valid: float = 0.8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights in [0, 1), coordinates in [-margin, size + margin) (some outside), random validity.

    Coordinates in (-1, 0) are moved below -1: the original's int() and our floor() differ only there.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(batch, num_queries, generator=gen)
    size = torch.tensor([height, width], dtype=torch.float32)
    coords = torch.rand(batch, num_queries, views, 2, generator=gen) * (size + 2 * margin) - margin
    coords = torch.where((coords > -1) & (coords < 0), coords - 1, coords)
    valid = torch.rand(batch, num_queries, views, generator=gen) < p_valid
    return weights, coords, valid


def splat_with_grads(weights, coords, valid, height, width, triton: bool, **options):
    """(map, grad_weights, grad_coords) of sum(map * fixed random cotangent) through aqrcmt.kernels.splat."""
    w = weights.clone().requires_grad_()
    c = coords.clone().requires_grad_()
    with force_triton(triton):
        out = splat(w, c, valid, height, width, **options)
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grad_w, grad_c = torch.autograd.grad(out, (w, c), cotangent, allow_unused=True)
    return out.detach(), grad_w, grad_c


# ------------------------------------------------------------------------------------------------------------------
# The specification and the separable path vs the original loop; the separable path vs the specification
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("splat_fn", [splat_ref, splat_separable])
@pytest.mark.parametrize("method,peak", [("gaussian", False), ("gaussian", True), ("bilinear", False),
                                         ("direct", False)])
@pytest.mark.parametrize("sigma", [1.0, 2.0])
@pytest.mark.parametrize("batch,views", [(1, 1), (3, 6)])
def test_matches_original_loop(method, peak, sigma, batch, views, splat_fn):
    weights, coords, valid = random_inputs(batch, 40, views, 17, 23, seed=batch + views)
    weights[0, :3] = 0.005                                         # below the threshold: skipped
    coords[0, 3:8] = torch.tensor([0.2, 0.7])                      # a pile-up in a corner (cropped kernels)
    expected = original_loop_splat(weights, coords, valid, 17, 23, sigma=sigma, method=method, peak=peak)
    got = splat_fn(weights, coords, valid, 17, 23, sigma=sigma, method=method, kernel_norm="peak" if peak else "sum")
    assert got.shape == (batch, views, 17, 23)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel_norm", ["sum", "peak", "normalized"])
@pytest.mark.parametrize("position", ["floor", "exact"])
@pytest.mark.parametrize("sigma,kernel_size", [(0.8, None), (1.5, None), (2.0, 5)])
def test_separable_matches_spec_gaussian(kernel_norm, position, sigma, kernel_size):
    weights, coords, valid = random_inputs(2, 30, 2, 14, 19, seed=7)
    options = dict(sigma=sigma, kernel_norm=kernel_norm, position=position, threshold=0.02, clamp_max=0.9,
                   kernel_size=kernel_size)
    got = splat_separable(weights.double(), coords.double(), valid, 14, 19, **options)
    expected = splat_ref(weights.double(), coords.double(), valid, 14, 19, **options)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("method", ["bilinear", "direct"])
def test_separable_matches_spec_bilinear_direct(method):
    weights, coords, valid = random_inputs(2, 30, 2, 14, 19, seed=8)
    coords[:, :6] = coords[:, 6:7]                                 # a pile-up (several queries on one pixel)
    options = dict(sigma=1.0, method=method, threshold=0.02, clamp_max=0.9)
    got = splat_separable(weights.double(), coords.double(), valid, 14, 19, **options)
    expected = splat_ref(weights.double(), coords.double(), valid, 14, 19, **options)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)


def test_default_kernel_size_rule():
    assert [gaussian_kernel_size(s) for s in (0.5, 1.0, 1.2, 2.0, 2.5)] == [5, 7, 9, 13, 17]


def test_unit_mass_and_peak_one():
    """An isolated interior query: "sum" puts mass w on the map, "peak" puts w at its pixel."""
    weights = torch.tensor([[0.6]])
    coords = torch.tensor([[[[20.3, 21.9]]]])
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    common = dict(threshold=0.0, clamp_max=None, sigma=2.0)
    mass = splat_ref(weights, coords, valid, 40, 40, kernel_norm="sum", **common)
    peak = splat_ref(weights, coords, valid, 40, 40, kernel_norm="peak", **common)
    assert mass.sum().item() == pytest.approx(0.6, rel=1e-5)
    assert peak[0, 0, 20, 21].item() == pytest.approx(0.6, rel=1e-6) and peak.max().item() == peak[0, 0, 20, 21]
    exact = splat_ref(weights, coords, valid, 40, 40, kernel_norm="sum", position="exact", **common)
    assert exact.sum().item() == pytest.approx(0.6, rel=2e-3)       # constant 1/Z: unit mass up to sub-pixel shift
    normalized = splat_ref(weights, coords, valid, 40, 40, kernel_norm="normalized", fill=1.0, **common)
    assert normalized[0, 0, 20, 21].item() == pytest.approx(0.6, abs=1e-5)
    assert normalized[0, 0, 0, 0].item() == pytest.approx(1.0)      # far from every query: the fill value


@pytest.mark.parametrize("kernel_norm,sigma,raw_mean,post_mean", [
    ("sum", 2.0, 0.0122, 0.0101), ("sum", 1.0, 0.0124, 0.0112), ("peak", 2.0, 0.308, 0.308),
    ("peak", 1.0, 0.078, 0.077)])
def test_reproduces_analysis_numbers(kernel_norm, sigma, raw_mean, post_mean):
    """The AQR analysis' map statistics: 900 uniform queries on 180x180, w ~ N(0.45, 0.1) (docs/kernels.md)."""
    gen = torch.Generator().manual_seed(0)
    batch = 4
    weights = (0.45 + 0.1 * torch.randn(batch, 900, generator=gen)).clamp(0, 1)
    coords = torch.rand(batch, 900, 1, 2, generator=gen) * 180
    valid = torch.ones(batch, 900, 1, dtype=torch.bool)
    common = dict(sigma=sigma, kernel_norm=kernel_norm)
    raw = splat_separable(weights, coords, valid, 180, 180, threshold=0.0, clamp_max=None, **common)
    post = splat_separable(weights, coords, valid, 180, 180, threshold=0.01, clamp_max=1.5, **common)
    assert raw.mean().item() == pytest.approx(raw_mean, rel=0.04)
    assert post.mean().item() == pytest.approx(post_mean, rel=0.04)


# ------------------------------------------------------------------------------------------------------------------
# Gradients of the PyTorch functions and of the op's written-out backward
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("splat_fn", [splat_ref, splat_separable])
@pytest.mark.parametrize("method,kernel_norm,position", [
    ("gaussian", "sum", "floor"), ("gaussian", "peak", "exact"), ("gaussian", "normalized", "exact"),
    ("gaussian", "normalized", "floor"), ("bilinear", "sum", "floor"), ("direct", "sum", "floor")])
def test_gradcheck(method, kernel_norm, position, splat_fn):
    weights, coords, valid = random_inputs(2, 6, 2, 9, 11, seed=3)
    weights = weights.double().requires_grad_()
    wants_coords = position == "exact" or method == "bilinear"
    coords = coords.double().requires_grad_(wants_coords)
    fn = lambda w, c: splat_fn(w, c, valid, 9, 11, sigma=1.0, method=method,  # noqa: E731
                               kernel_norm=kernel_norm, position=position, threshold=0.0, clamp_max=None)
    assert torch.autograd.gradcheck(fn, (weights, coords), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("method,kernel_norm,position", [
    ("gaussian", "sum", "floor"), ("gaussian", "sum", "exact"), ("gaussian", "peak", "exact"),
    ("gaussian", "normalized", "floor"), ("gaussian", "normalized", "exact"), ("bilinear", "sum", "floor"),
    ("direct", "sum", "floor")])
def test_op_backward_matches_spec_autograd(method, kernel_norm, position):
    """The written-out CPU backward of the custom op equals autograd through the specification (with
    post-processing)."""
    weights, coords, valid = random_inputs(3, 25, 2, 13, 16, seed=5)
    options = dict(sigma=1.3, method=method, kernel_norm=kernel_norm, position=position, threshold=0.05,
                   clamp_max=0.8 if kernel_norm != "sum" else 0.12)
    out, grad_w, grad_c = splat_with_grads(weights, coords, valid, 13, 16, triton=False, **options)
    w = weights.clone().requires_grad_()
    c = coords.clone().requires_grad_()
    ref = splat_ref(w, c, valid, 13, 16, **options)
    cotangent = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    ref_w, ref_c = torch.autograd.grad(ref, (w, c), cotangent, allow_unused=True)
    assert ((ref > 0) & (ref < options["clamp_max"])).any() and (ref == options["clamp_max"]).any()
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-4)
    if position == "exact" or method == "bilinear":
        torch.testing.assert_close(grad_c, ref_c, atol=1e-5, rtol=1e-4)
    else:
        assert grad_c is None


def test_gradient_is_zero_where_thresholded_or_clamped():
    valid = torch.ones(1, 2, 1, dtype=torch.bool)
    coords = torch.tensor([[[[5.5, 5.5]], [[25.5, 25.5]]]])
    weights = torch.tensor([[0.2, 1.0]], requires_grad=True)         # sigma 2 unit mass: peaks 0.008 and 0.040
    out = splat(weights, coords, valid, 32, 32, sigma=2.0, threshold=0.01, clamp_max=0.03)
    (grad,) = torch.autograd.grad(out.sum(), weights)
    assert out[0, 0, :16, :16].abs().sum() == 0 and grad[0, 0] == 0   # every pixel of query 0 is thresholded
    raw = splat(weights.detach(), coords, valid, 32, 32, sigma=2.0, threshold=0.0, clamp_max=None)
    kept = (raw >= 0.01) & (raw <= 0.03)                              # query 1: d out / d w = K on kept pixels
    assert kept.any() and (raw > 0.03).any()
    assert grad[0, 1].item() == pytest.approx((raw / 1.0)[kept].sum().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter) vs the separable path
# ------------------------------------------------------------------------------------------------------------------
TRITON_CASES = [
    dict(method="gaussian", kernel_norm="sum", position="floor", sigma=2.0),
    dict(method="gaussian", kernel_norm="sum", position="exact", sigma=1.0),
    dict(method="gaussian", kernel_norm="peak", position="floor", sigma=1.0, clamp_max=None),
    dict(method="gaussian", kernel_norm="peak", position="exact", sigma=1.5, threshold=0.0),
    dict(method="gaussian", kernel_norm="normalized", position="floor", sigma=1.0, fill=0.5),
    dict(method="gaussian", kernel_norm="normalized", position="exact", sigma=0.7, kernel_size=5),
    dict(method="bilinear", sigma=1.0),
    dict(method="direct", sigma=1.0, clamp_max=0.5),
]


@needs_interpreter
@pytest.mark.parametrize("options", TRITON_CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("batch,views,height,width", [(1, 1, 16, 16), (3, 6, 5, 9), (2, 2, 21, 35)])
def test_triton_matches_separable(options, batch, views, height, width):
    """One tile per map (16x16, 5x9) and 2 x 3 tiles per map (21x35: footprints cross tile edges)."""
    weights, coords, valid = random_inputs(batch, 37, views, height, width, seed=batch * 10 + views)
    if options.get("kernel_norm") == "peak":
        coords[:, :12] = coords[:, 12:13]                            # a pile-up that hits the clamp
    ref = splat_with_grads(weights, coords, valid, height, width, triton=False, **options)
    tri = splat_with_grads(weights, coords, valid, height, width, triton=True, **options)
    torch.testing.assert_close(tri[0], ref[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tri[1], ref[1], atol=1e-5, rtol=1e-4)
    if ref[2] is None:
        assert tri[2] is None
    else:
        torch.testing.assert_close(tri[2], ref[2], atol=1e-5, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("case", ["no_queries", "all_invalid", "all_outside", "below_threshold"])
def test_empty_inputs(case, triton):
    weights, coords, valid = random_inputs(2, 0 if case == "no_queries" else 9, 6, 8, 10, seed=2)
    if case == "all_invalid":
        valid[:] = False
    if case == "all_outside":
        coords = coords.abs() + 10.0
    if case == "below_threshold":
        weights = weights * 0.001
    for kernel_norm, expected in (("sum", 0.0), ("normalized", 0.25)):
        out, grad_w, _ = splat_with_grads(weights, coords, valid, 8, 10, triton=triton, kernel_norm=kernel_norm,
                                          fill=0.25, position="exact", sigma=2.0)
        assert out.shape == (2, 6, 8, 10)
        assert torch.all(out == expected)
        spec = splat_ref(weights, coords, valid, 8, 10, kernel_norm=kernel_norm, fill=0.25, position="exact", sigma=2.0)
        assert torch.all(spec == expected)
        assert torch.all(grad_w == 0) and grad_w.shape == weights.shape


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_inputs(dtype):
    weights, coords, valid = random_inputs(2, 30, 2, 12, 14, seed=9)
    options = dict(sigma=1.0, position="exact", kernel_norm="peak", threshold=0.02)
    expected = splat_ref(weights.to(dtype).float(), coords.to(dtype).float(), valid, 12, 14, **options)
    with force_triton():
        got = splat(weights.to(dtype), coords.to(dtype), valid, 12, 14, **options)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)   # fp32 accumulation of the rounded inputs
    loose = splat_ref(weights, coords, valid, 12, 14, **options)
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01            # bf16 coordinates move by up to 1/16 pixel
    assert (got - loose).abs().max().item() < tolerance


# ------------------------------------------------------------------------------------------------------------------
# NaN handling and bad input
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("triton", [False, pytest.param(True, marks=needs_interpreter)])
def test_nan_queries_are_skipped_without_validation(triton):
    weights, coords, valid = random_inputs(1, 10, 2, 10, 12, seed=4)
    bad_w, bad_c = weights.clone(), coords.clone()
    bad_w[0, 2] = float("nan")
    bad_c[0, 5, 1, 0] = float("nan")
    bad_c[0, 6, 0, 1] = float("inf")
    clean_valid = valid.clone()
    clean_valid[0, 2] = False
    clean_valid[0, 5, 1] = False
    clean_valid[0, 6, 0] = False
    with force_triton(triton):
        got = splat(bad_w, bad_c, valid, 10, 12, sigma=2.0, position="exact")
        expected = splat(weights, coords, clean_valid, 10, 12, sigma=2.0, position="exact")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)


def test_validate_raises_naming_the_argument():
    weights, coords, valid = random_inputs(1, 4, 1, 8, 8)
    bad_w = weights.clone()
    bad_w[0, 1] = float("nan")
    with pytest.raises(ValueError, match="weights"):
        splat(bad_w, coords, valid, 8, 8, sigma=2.0, validate=True)
    bad_c = coords.clone()
    bad_c[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="coords"):
        splat(weights, bad_c, valid, 8, 8, sigma=2.0, validate=True)


@pytest.mark.parametrize("change,match", [
    (dict(weights=torch.rand(2, 4, 1)), "weights"),
    (dict(coords=torch.rand(2, 4, 1, 3)), "coords"),
    (dict(coords=torch.rand(2, 5, 1, 2)), "coords"),
    (dict(valid=torch.ones(2, 4, 2, dtype=torch.bool)), "valid"),
    (dict(valid=torch.ones(2, 4, 1)), "valid"),
    (dict(weights=torch.ones(2, 4, dtype=torch.int64)), "weights"),
    (dict(coords=torch.rand(2, 4, 1, 2, device="meta")), "device"),
    (dict(sigma=-1.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(kernel_norm="max"), "kernel_norm"),
    (dict(position="round"), "position"),
    (dict(method="distance_weighted"), "method"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(threshold=-0.1), "threshold"),
    (dict(clamp_max=0.0), "clamp_max"),
    (dict(height=0), "height"),
])
def test_bad_input_raises_naming_the_argument(change, match):
    args = dict(weights=torch.rand(2, 4), coords=torch.rand(2, 4, 1, 2), valid=torch.ones(2, 4, 1, dtype=torch.bool),
                height=8, width=8, sigma=2.0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        splat(**args)


def test_sigma_has_no_default():
    """The caller's config owns sigma (AQRRenderConfig: 1.0): splat has no default of its own to disagree with."""
    weights, coords, valid = random_inputs(1, 4, 1, 8, 8)
    for splat_fn in (splat, splat_separable, splat_ref):
        with pytest.raises(TypeError, match="sigma"):
            splat_fn(weights, coords, valid, 8, 8)


def test_params_built_once_per_call(monkeypatch):
    """Forward and backward of one splat call validate the options and derive the constants once."""
    builds = []
    build = SplatParams.build
    monkeypatch.setattr(SplatParams, "build", staticmethod(lambda *a, **k: builds.append(k) or build(*a, **k)))
    weights, coords, valid = random_inputs(1, 6, 2, 8, 9, seed=6)
    w = weights.clone().requires_grad_()
    c = coords.clone().requires_grad_()
    out = splat(w, c, valid, 8, 9, sigma=1.0, position="exact")
    torch.autograd.grad(out.sum(), (w, c))
    assert len(builds) == 1

