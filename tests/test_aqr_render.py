"""Rendering query weights into maps: the fork's numbers, every kernel variant, views, gradients."""
import pytest
import torch

from aqrcmt.config import AQRRenderConfig
from aqrcmt.kernels import force_triton, splat_ref
from aqrcmt.models.aqr.projection import Projection
from aqrcmt.models.aqr.render import render_map, render_weight_maps


def lone_query(y: float, x: float, size=(24, 30), views: int = 1) -> Projection:
    coords = torch.tensor([y, x]).expand(1, 1, views, 2).clone()
    return Projection(coords, torch.ones(1, 1, views, dtype=torch.bool), size)


def unit_mass_peak(sigma: float, radius: int) -> float:
    """Centre value of a Gaussian sampled on the (2r+1)^2 integer grid and divided by its sum (0.03987 for sigma 2)."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    return 1.0 / float(torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma ** 2)).sum())


def test_sum_kernel_matches_the_fork():
    """Unit-mass Gaussian at floor(y, x): centre unit_mass_peak w (docs/aqr.md), mass w, 13x13 support for sigma 2."""
    cfg = AQRRenderConfig(kernel_norm="sum", position="floor", threshold=0.0, clamp_max=None)
    m = render_map(torch.tensor([[0.5]]), lone_query(10.7, 20.3), cfg, sigma=2.0)[0, 0]
    assert m.argmax().item() == 10 * 30 + 20
    assert abs(m[10, 20].item() - 0.5 * unit_mass_peak(2.0, 6)) < 1e-5
    assert abs(m.sum().item() - 0.5) < 1e-5
    assert (m > 0).sum().item() == 13 * 13


def test_fork_threshold_and_clamp():
    """Threshold 0.01 deletes the splat's tails (40 % of a 0.45 query's mass survives, docs/aqr.md); clamp caps."""
    cfg = AQRRenderConfig(kernel_norm="sum", threshold=0.01, clamp_max=1.5)
    m = render_map(torch.tensor([[0.45]]), lone_query(10.0, 15.0), cfg, sigma=2.0)[0, 0]
    assert (m > 0).sum().item() == 13 and abs(m.sum().item() / 0.45 - 0.40) < 0.01
    pile = Projection(torch.full((1, 60, 1, 2), 5.0), torch.ones(1, 60, 1, dtype=torch.bool), (12, 12))
    assert render_map(torch.ones(1, 60), pile, cfg, sigma=2.0).max().item() == 1.5


def test_peak_and_normalized_kernels_keep_the_weight():
    proj = lone_query(10.0, 15.0)
    peak = render_map(torch.tensor([[0.45]]), proj, AQRRenderConfig(kernel_norm="peak", threshold=0.0,
                                                                     clamp_max=None), sigma=2.0)[0, 0]
    assert abs(peak[10, 15].item() - 0.45) < 1e-6
    cfg = AQRRenderConfig(kernel_norm="normalized", threshold=0.0, clamp_max=None, fill=1.0)
    norm = render_map(torch.tensor([[0.45]]), proj, cfg, sigma=2.0)[0, 0]
    assert abs(norm[10, 15].item() - 0.45) < 1e-4                     # local weighted mean of w
    assert norm[0, 0].item() == pytest.approx(1.0) and norm.min() >= 0.45 - 1e-4 and norm.max() <= 1.0 + 1e-6


def test_mass_conservation_gives_the_reported_map_mean():
    """900 queries with w ~ 0.45 on 180 x 180: mean = N w / (H W) ~ 0.0125, whatever sigma (docs/aqr.md)."""
    g = torch.Generator().manual_seed(0)
    coords = torch.rand(1, 900, 1, 2, generator=g) * 180
    proj = Projection(coords, torch.ones(1, 900, 1, dtype=torch.bool), (180, 180))
    w = (0.45 + 0.1 * torch.randn(1, 900, generator=g)).clamp(0, 1)
    for sigma in (1.0, 2.0):
        raw = render_map(w, proj, AQRRenderConfig(threshold=0.0, clamp_max=None), sigma=sigma)
        assert abs(raw.mean().item() - w.sum().item() / 180 ** 2) < 0.0006      # only border crops lose mass
    clamped = render_map(w, proj, AQRRenderConfig(threshold=0.01, clamp_max=1.5), sigma=2.0)
    assert 0.008 < clamped.mean().item() < 0.0115


@pytest.mark.parametrize("method,kernel_norm,position", [
    ("gaussian", "sum", "floor"), ("gaussian", "peak", "exact"), ("gaussian", "normalized", "exact"),
    ("bilinear", "sum", "floor"), ("direct", "sum", "floor")])
def test_variants_on_the_triton_path_match_the_reference(method, kernel_norm, position):
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(2, 7, 3, 2, generator=g) * torch.tensor([9.0, 11.0])
    valid = torch.rand(2, 7, 3, generator=g) > 0.3
    w = torch.rand(2, 7, generator=g)
    cfg = AQRRenderConfig(method=method, kernel_norm=kernel_norm, position=position, threshold=0.05, clamp_max=0.8)
    with force_triton():
        out = render_map(w, Projection(coords, valid, (9, 11)), cfg, sigma=1.0)
    expected = splat_ref(w, coords, valid, 9, 11, sigma=1.0, kernel_norm=kernel_norm, position=position,
                         threshold=0.05, clamp_max=0.8, method=method, fill=cfg.fill)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_two_views_negative_weights_and_gradient():
    cfg = AQRRenderConfig(kernel_norm="sum", threshold=0.0, clamp_max=None)
    coords = torch.tensor([[[[4.0, 5.0], [6.0, 5.0]], [[3.0, 3.0], [0.0, 0.0]]]])         # (1, 2, 2 views, 2)
    valid = torch.tensor([[[True, True], [True, False]]])
    cameras = Projection(coords, valid, (10, 10))
    bev = Projection(coords[:, :, :1], valid[:, :, :1], (10, 10))
    w = torch.tensor([[0.8, -0.3]], requires_grad=True)                                 # tanh can go negative
    bev_map, cam_maps = render_weight_maps(w, w, bev, cameras, cfg)
    assert bev_map.shape == (1, 10, 10) and cam_maps.shape == (1, 2, 10, 10)
    assert abs(cam_maps[0, 0].sum().item() - 0.8) < 1e-5 and abs(cam_maps[0, 1].sum().item() - 0.8) < 1e-5
    (cam_maps.sum() + bev_map.sum()).backward()
    assert abs(w.grad[0, 0].item() - 3.0) < 1e-4 and w.grad[0, 1].item() == 0.0
    with pytest.raises(ValueError, match="weights"):
        render_map(torch.ones(1, 3), bev, cfg, 1.0)
