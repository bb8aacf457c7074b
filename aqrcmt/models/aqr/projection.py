"""Where each query's reference point lands: its BEV pixel and its pixel on every camera feature map.

Pixel coordinates are continuous and (y, x) ordered: pixel ``i`` covers ``[i, i + 1)``, so ``floor`` gives
the integer index. No gradient flows through the positions (the rendered maps are differentiable in the
query *weights* only), so inputs are detached.

Unlike the AQR fork, a query seen by no camera, or lying outside the BEV grid, is marked invalid here; the fork
moved such queries to pixel (0, 0) of view 0, where hundreds of them piled up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aqrcmt.models.camera_geometry import feature_map_pixels, project_to_images


@dataclass
class Projection:
    """Projected positions of B x Q queries on V maps of size (H, W).

    coords: (B, Q, V, 2) float32 (y, x) in feature-map pixels.
    valid:  (B, Q, V) bool, True where the query lies inside map v (and in front of the camera).
    """
    coords: torch.Tensor
    valid: torch.Tensor
    size: tuple[int, int]

    def first_valid_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(view index (B, Q) int64, any-valid (B, Q) bool): the first map, in camera order, that sees each query.

        Queries seen by no map get view 0 with any-valid False.
        """
        any_valid = self.valid.any(dim=-1)
        view = self.valid.to(torch.int8).argmax(dim=-1)  # first True (0 if none)
        return view, any_valid


def _check_reference(reference_points: torch.Tensor) -> None:
    if reference_points.dim() != 3 or reference_points.shape[-1] != 3:
        raise ValueError(f"reference_points must be (B, Q, 3) normalised by pc_range, got {tuple(reference_points.shape)}")


def project_to_bev(reference_points: torch.Tensor, bev_size: tuple[int, int]) -> Projection:
    """BEV pixel of each query.

    reference_points: (B, Q, 3) in [0, 1] (x, y, z normalised by the point-cloud range).
    bev_size: (H, W) of the BEV map; row = y bin, column = x bin (the map spans the point-cloud range).
    Returns a Projection with V = 1.
    """
    _check_reference(reference_points)
    height, width = bev_size
    ref = reference_points.detach().float()
    coords = torch.stack([ref[..., 1] * height, ref[..., 0] * width], dim=-1)
    valid = (coords[..., 0] >= 0) & (coords[..., 0] < height) & (coords[..., 1] >= 0) & (coords[..., 1] < width)
    return Projection(coords.unsqueeze(2), valid.unsqueeze(2), (height, width))


def project_to_cameras(reference_points: torch.Tensor, pc_range: tuple[float, ...], lidar2img: torch.Tensor,
                       img_shape: tuple[int, int], feature_size: tuple[int, int]) -> Projection:
    """Pixel of each query on every camera feature map.

    reference_points: (B, Q, 3) in [0, 1]; pc_range: (x_min, y_min, z_min, x_max, y_max, z_max) in metres.
    lidar2img: (B, V, 4, 4) LiDAR -> image pixels, every image augmentation (resize, crop, flip) included.
    img_shape: (H_img, W_img) of the (padded) input images; feature_size: (h, w) of the camera feature maps.
    A query is valid on view v when camera v sees it (:mod:`aqrcmt.models.camera_geometry`: in front and inside
    the image); it may be valid on several views (overlaps) or on none.
    """
    pixels, valid = project_to_images(reference_points.detach(), pc_range, lidar2img, img_shape)
    coords = feature_map_pixels(pixels, img_shape, feature_size)
    coords = torch.where(valid.unsqueeze(-1), coords, torch.zeros_like(coords))          # no inf/nan downstream
    return Projection(coords, valid, tuple(feature_size))
