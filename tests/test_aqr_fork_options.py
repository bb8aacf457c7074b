"""The AQR fork's renderer behaviours as options (model.aqr.render.normalize / invisible_queries), each equal to a
loop written from the fork's semantics: unit-mass Gaussian kernel of size int(6 sigma + 1) made odd, placed at
the floor of the projected pixel, weights < 0.01 skipped, pixels < 0.01 zeroed, then divided by a maximum;
queries no camera sees splatted at pixel (0, 0) of view 0."""
from __future__ import annotations

import math

import pytest
import torch

from aqrcmt.config import AQRRenderConfig
from aqrcmt.models.aqr.projection import Projection
from aqrcmt.models.aqr.render import render_weight_maps


def fork_kernel(sigma: float) -> torch.Tensor:
    size = int(6 * sigma + 1)
    size += size % 2 == 0
    half = size // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma ** 2))
    return kernel / kernel.sum()


def fork_splat(weights: list[float], pixels: list[tuple[float, float]], height: int, width: int,
               sigma: float) -> torch.Tensor:
    kernel = fork_kernel(sigma)
    half = kernel.shape[0] // 2
    out = torch.zeros(height, width, dtype=torch.float64)
    for w, (y, x) in zip(weights, pixels):
        if w < 0.01:
            continue
        yi, xi = int(math.floor(y)), int(math.floor(x))
        if not (0 <= yi < height and 0 <= xi < width):
            continue
        for dy in range(-half, half + 1):
            for dx in range(-half, half + 1):
                if 0 <= yi + dy < height and 0 <= xi + dx < width:
                    out[yi + dy, xi + dx] += w * kernel[dy + half, dx + half]
    out[out < 0.01] = 0
    return out


@pytest.fixture()
def scene():
    """B=2, Q=40 queries; BEV 12x12; 3 camera views of 8x10; each visible query seen by exactly one view."""
    gen = torch.Generator().manual_seed(0)
    b, q, views = 2, 40, 3
    weights = torch.rand(b, q, generator=gen) * 0.9 + 0.1
    bev_coords = torch.rand(b, q, 1, 2, generator=gen) * 12
    cam_coords = torch.rand(b, q, views, 2, generator=gen) * torch.tensor([8.0, 10.0])
    view = torch.randint(0, views + 1, (b, q), generator=gen)                    # == views: no camera sees it
    cam_valid = torch.nn.functional.one_hot(view, views + 1)[..., :views].bool()
    return (weights, Projection(bev_coords, torch.ones(b, q, 1, dtype=torch.bool), (12, 12)),
            Projection(cam_coords, cam_valid, (8, 10)), view)


def fork_maps(weights, bev, cameras, view, sigma, normalize, pile):
    b, q, views = cameras.valid.shape
    bev_maps, cam_maps = [], []
    for s in range(b):
        bev_maps.append(fork_splat(weights[s].tolist(), bev.coords[s, :, 0].tolist(), 12, 12, sigma))
        per_view = []
        for v in range(views):
            chosen = [(float(weights[s, i]), tuple(cameras.coords[s, i, v].tolist())) for i in range(q) if view[s, i] == v]
            if pile and v == 0:
                chosen += [(float(weights[s, i]), (0.0, 0.0)) for i in range(q) if view[s, i] == views]
            per_view.append(fork_splat([w for w, _ in chosen], [p for _, p in chosen], 8, 10, sigma))
        cam_maps.append(torch.stack(per_view))
    bev_maps, cam_maps = torch.stack(bev_maps), torch.stack(cam_maps)
    if normalize != "none":
        bev_maps = bev_maps / bev_maps.amax(dim=(1, 2), keepdim=True)
        dims = (2, 3) if normalize == "max_per_map" else (1, 2, 3)
        cam_maps = cam_maps / cam_maps.amax(dim=dims, keepdim=True).clamp(min=1e-300)
    return bev_maps, cam_maps


@pytest.mark.parametrize("normalize", ["none", "max_per_map", "max_over_views"])
@pytest.mark.parametrize("invisible", ["skip", "pile_at_origin"])
@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_fork_options_equal_the_fork_loop(scene, normalize, invisible, sigma):
    weights, bev, cameras, view = scene
    cfg = AQRRenderConfig(kernel_norm="sum", sigma_bev=sigma, sigma_camera=sigma, threshold=0.01, clamp_max=None,
                          normalize=normalize, invisible_queries=invisible)
    bev_map, camera_maps = render_weight_maps(weights, weights, bev, cameras, cfg)
    want_bev, want_cam = fork_maps(weights, bev, cameras, view, sigma, normalize, invisible == "pile_at_origin")
    torch.testing.assert_close(bev_map.double(), want_bev, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(camera_maps.double(), want_cam, atol=1e-6, rtol=1e-5)


def test_pile_at_origin_raises_pixel_zero_of_view_zero_only(scene):
    weights, bev, cameras, view = scene
    skip = AQRRenderConfig(kernel_norm="sum", sigma_bev=2.0, sigma_camera=2.0, threshold=0.0, clamp_max=None)
    pile = AQRRenderConfig(kernel_norm="sum", sigma_bev=2.0, sigma_camera=2.0, threshold=0.0, clamp_max=None,
                           invisible_queries="pile_at_origin")
    _, a = render_weight_maps(weights, weights, bev, cameras, skip)
    _, b = render_weight_maps(weights, weights, bev, cameras, pile)
    invisible_mass = (weights * (view == cameras.valid.shape[-1])).sum(1)              # (B,)
    peak = fork_kernel(2.0)[6, 6].item()
    torch.testing.assert_close(b[:, 0, 0, 0] - a[:, 0, 0, 0], (invisible_mass * peak).float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[:, 1:], b[:, 1:])
