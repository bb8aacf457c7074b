"""The one camera-geometry rule (models/camera_geometry.py): the head's query rays, the AQR projection and the
locality prior agree on which views see a query, and the rule itself (depth, borders, gradient)."""
from __future__ import annotations

import torch

from aqrcmt.models.aqr.diagnose import ring_lidar2img
from aqrcmt.models.aqr.projection import project_to_cameras
from aqrcmt.models.camera_geometry import DEPTH_EPS, project_to_images, projection_matrices
from aqrcmt.models.locality import NOT_VISIBLE, cross_attention_locality_bias
from aqrcmt.models.position_encoding import query_ray_points, ray_depths

PC_RANGE = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)
IMG_SHAPE = (128, 352)
FEATURE = (8, 22)


def test_head_aqr_and_locality_see_a_query_on_the_same_views():
    reference = torch.rand(2, 200, 3, generator=torch.Generator().manual_seed(0))
    lidar2img = ring_lidar2img(IMG_SHAPE, 2, height_m=1.0)
    l2i, i2l = projection_matrices(lidar2img)
    _, head_visible = query_ray_points(reference, l2i, i2l, IMG_SHAPE, ray_depths(4, PC_RANGE[3]), PC_RANGE)
    aqr_valid = project_to_cameras(reference, PC_RANGE, lidar2img, IMG_SHAPE, FEATURE).valid
    bias = cross_attention_locality_bias(reference, pc_range=PC_RANGE, sigma_bev=1.0, sigma_camera=1e3,
                                         lidar2img=lidar2img, img_shape=IMG_SHAPE, camera_feature_size=FEATURE)
    locality_visible = bias[:, 0].unflatten(-1, (6, -1)).amax(-1) > NOT_VISIBLE     # (B, Q, V)
    assert head_visible.shape == aqr_valid.shape == (2, 200, 6)                     # one layout: (B, Q, V)
    assert 0 < aqr_valid.sum() < aqr_valid.numel()
    assert torch.equal(head_visible, aqr_valid) and torch.equal(locality_visible, aqr_valid)


def test_depth_epsilon_borders_and_gradient():
    pc_range = (-64.0, -64.0, -16.0, 64.0, 64.0, 16.0)                     # the test points normalise exactly
    lidar2img = torch.tensor([[64.0, 0, 64, 0], [0, 64, 32, 0], [0, 0, 1, 0], [0, 0, 0, 1]]).view(1, 1, 4, 4)
    low, span = torch.tensor(pc_range[:3]), torch.tensor(pc_range[3:]) - torch.tensor(pc_range[:3])
    metres = torch.tensor([[[0.0, 0.0, 8.0], [0.0, 0.0, DEPTH_EPS / 10], [-8.0, 0.0, 8.0], [8.0, 0.0, 8.0]]])
    reference = ((metres - low) / span).requires_grad_()
    pixels, visible = project_to_images(reference, pc_range, lidar2img, (64, 128))
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    torch.testing.assert_close(pixels[0, 0, 0], torch.tensor([64.0, 32.0, 1.0]))
    assert visible[0, :, 0].tolist() == [True, False, True, False]          # too close; u = 0 in, u = 128 out
    pixels[0, 0, 0, 0].backward()                       # u = (64 x + 64 z) / z with z detached in the denominator
    assert reference.grad[0, 0].tolist() == [64 / 8 * 128, 0.0, 64 / 8 * 32]   # the true du/dz at x = 0 is 0
