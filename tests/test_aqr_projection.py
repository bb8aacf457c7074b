"""Projection of query reference points onto the BEV map and the camera feature maps."""
import math

import pytest
import torch

from aqrcmt.models.aqr.projection import project_to_bev, project_to_cameras

PC_RANGE = (-64.0, -64.0, -4.0, 64.0, 64.0, 4.0)   # test points normalise exactly in float32
IMG = (64, 128)      # (H_img, W_img)
FEAT = (8, 16)       # stride 8


def normalize(points_m: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:])
    return (points_m - lo) / (hi - lo)


def pinhole(yaw_deg: float, focal: float = 64.0, flip: bool = False) -> torch.Tensor:
    """Camera at the origin looking along yaw (x forward = 0 deg); principal point at the image centre."""
    yaw = math.radians(yaw_deg)
    rot = torch.tensor([[math.sin(yaw), -math.cos(yaw), 0.0], [0.0, 0.0, -1.0], [math.cos(yaw), math.sin(yaw), 0.0]],
                       dtype=torch.float64)
    lidar2cam = torch.eye(4, dtype=torch.float64)
    lidar2cam[:3, :3] = rot
    k = torch.tensor([[focal, 0, IMG[1] / 2, 0], [0, focal, IMG[0] / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                     dtype=torch.float64)
    mat = k @ lidar2cam
    if flip:  # horizontal image flip as an augmentation: u -> W_img - u
        flip_m = torch.eye(4, dtype=torch.float64)
        flip_m[0, 0], flip_m[0, 2] = -1.0, IMG[1]
        mat = flip_m @ mat
    return mat


def test_bev_pixel_and_out_of_range():
    ref = normalize(torch.tensor([[[0.0, 0.0, 0.0], [-64.0, 60.0, 0.0], [64.0, 0.0, 0.0], [-66.0, 0.0, 0.0]]]))
    proj = project_to_bev(ref, (16, 32))                          # 8 m rows, 4 m columns
    torch.testing.assert_close(proj.coords[0, :2, 0], torch.tensor([[8.0, 16.0], [15.5, 0.0]]))
    assert proj.valid[0, :, 0].tolist() == [True, True, False, False]   # x = +64 m is the excluded edge


def test_camera_front_behind_and_pixel():
    lidar2img = pinhole(0.0).expand(1, 1, 4, 4)
    # 10 m ahead, 2.5 m to the left, 1.25 m up -> u = 64 - 64 * 0.25 = 48, v = 32 - 64 * 0.125 = 24
    ref = normalize(torch.tensor([[[10.0, 2.5, 1.25], [-10.0, 0.0, 0.0]]]))
    proj = project_to_cameras(ref, PC_RANGE, lidar2img, IMG, FEAT)
    assert proj.valid[0, :, 0].tolist() == [True, False]
    torch.testing.assert_close(proj.coords[0, 0, 0], torch.tensor([24.0 / 8, 48.0 / 8]))
    assert proj.coords[0, 1, 0].tolist() == [0.0, 0.0]           # invalid: zeros, never inf / nan


def test_image_borders_are_half_open():
    lidar2img = pinhole(0.0).expand(1, 1, 4, 4)
    # u = 64 - 4 y for x = 16 m: y = 16 -> u = 0 (inside), y = -16 -> u = 128 (outside)
    ref = normalize(torch.tensor([[[16.0, 16.0, 0.0], [16.0, -16.0, 0.0], [16.0, -15.75, 0.0], [16.0, 16.25, 0.0]]]))
    proj = project_to_cameras(ref, PC_RANGE, lidar2img, IMG, FEAT)
    assert proj.valid[0, :, 0].tolist() == [True, False, True, False]
    assert 0 <= proj.coords[0, 2, 0, 1] < FEAT[1]


def test_flip_mirrors_the_column():
    ref = normalize(torch.tensor([[[10.0, 2.5, 0.0]]]))
    plain = project_to_cameras(ref, PC_RANGE, pinhole(0.0).expand(1, 1, 4, 4), IMG, FEAT)
    flipped = project_to_cameras(ref, PC_RANGE, pinhole(0.0, flip=True).expand(1, 1, 4, 4), IMG, FEAT)
    torch.testing.assert_close(flipped.coords[0, 0, 0, 1], FEAT[1] - plain.coords[0, 0, 0, 1])
    torch.testing.assert_close(flipped.coords[0, 0, 0, 0], plain.coords[0, 0, 0, 0])


def test_query_in_two_views_or_none():
    # 90 deg field of view (focal = W/2) at yaws 0 and 60 deg overlap between 15 and 45 deg
    lidar2img = torch.stack([pinhole(0.0), pinhole(60.0), pinhole(180.0)]).unsqueeze(0)
    at = lambda deg, r=20.0: [r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg)), 0.0]
    ref = normalize(torch.tensor([[at(30.0), at(-30.0), at(120.0), at(0.0, r=0.5)]]))
    proj = project_to_cameras(ref, PC_RANGE, lidar2img, IMG, FEAT)
    assert proj.valid[0].tolist() == [[True, True, False], [True, False, False], [False, False, False],
                                      [True, False, False]]
    view, seen = proj.first_valid_view()
    assert view[0].tolist() == [0, 0, 0, 0] and seen[0].tolist() == [True, True, False, True]
    only_second = proj.valid.clone()
    only_second[0, 0, 0] = False
    proj.valid = only_second
    assert proj.first_valid_view()[0][0, 0].item() == 1


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="lidar2img"):
        project_to_cameras(torch.rand(2, 5, 3), PC_RANGE, torch.eye(4).expand(1, 6, 4, 4), IMG, FEAT)
    with pytest.raises(ValueError, match="reference_points"):
        project_to_bev(torch.rand(2, 5), (4, 4))
