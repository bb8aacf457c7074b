"""Modulation formulas (residual forms, modes, pre-normalisation) and the kernel's statistics."""
import pytest
import torch

from aqrcmt.config import AQRModulateConfig
from aqrcmt.models.aqr.modulate import minmax_normalize, modulate_features, residual_coefficients


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 5, 6, generator=g), torch.rand(3, 5, 6, generator=g)


@pytest.mark.parametrize("form", ["additive", "convex"])
@pytest.mark.parametrize("mode", ["element_wise", "channel_wise", "adaptive"])
def test_formulas(inputs, form, mode):
    x, w = inputs
    r = 0.3
    out = modulate_features(x, w, AQRModulateConfig(mode=mode, residual_form=form, residual_weight=r))
    w_elem, w_chan = w[:, None], w.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    w_used = {"element_wise": w_elem, "channel_wise": w_chan, "adaptive": 0.7 * w_elem + 0.3 * w_chan}[mode]
    modulated = x * w_used
    expected = modulated + r * x if form == "additive" else (1 - r) * modulated + r * x
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_convex_is_identity_at_weight_one(inputs):
    x, _ = inputs
    out = modulate_features(x, torch.ones(3, 5, 6), AQRModulateConfig(residual_form="convex", residual_weight=0.4))
    torch.testing.assert_close(out, x)
    assert residual_coefficients(AQRModulateConfig(residual_form="additive", residual_weight=0.7)) == (1.0, 0.7)


def test_prenormalize_min_max_per_map(inputs):
    x, w = inputs
    w = w.clone()
    w[1] = 0.3                                            # constant map -> 0.5
    normed = minmax_normalize(w)
    assert normed[0].min() == 0 and normed[0].max() == 1 and torch.all(normed[1] == 0.5)
    cfg = AQRModulateConfig(residual_weight=0.7, prenormalize=True)
    torch.testing.assert_close(modulate_features(x, w, cfg), x * normed[:, None] + 0.7 * x)


def test_stats_and_gradients(inputs):
    x, w = inputs
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, stats = modulate_features(x, w, AQRModulateConfig(residual_weight=0.7), return_stats=True)
    ref = x * w[:, None] + 0.7 * x
    expected = torch.stack([(ref - x).abs().sum(), x.abs().sum(), ref.sum(), ref.square().sum()])
    torch.testing.assert_close(torch.stack(list(stats)).double(), expected.detach().double(), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    torch.testing.assert_close(w.grad, x.detach().sum(1), rtol=1e-5, atol=1e-5)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="weight maps"):
        modulate_features(torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 4), AQRModulateConfig())
