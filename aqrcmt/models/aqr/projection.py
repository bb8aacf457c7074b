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

DEPTH_EPS = 1e-5  # metres; points closer to (or behind) the image plane are not visible


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
    A query is valid on view v when its depth is > DEPTH_EPS and its image pixel lies in [0, W_img) x [0, H_img);
    it may be valid on several views (overlaps) or on none.
    """
    _check_reference(reference_points)
    if lidar2img.dim() != 4 or lidar2img.shape[-2:] != (4, 4) or lidar2img.shape[0] != reference_points.shape[0]:
        raise ValueError(f"lidar2img must be (B, V, 4, 4) with B = {reference_points.shape[0]}, "
                         f"got {tuple(lidar2img.shape)}")
    if len(pc_range) != 6:
        raise ValueError(f"pc_range needs 6 values (x_min, y_min, z_min, x_max, y_max, z_max), got {pc_range}")
    img_h, img_w = img_shape
    feat_h, feat_w = feature_size
    # float64: the matrices carry translations of ~1e3 pixels; float32 loses sub-pixel accuracy near the borders.
    lo = torch.tensor(pc_range[:3], dtype=torch.float64, device=reference_points.device)
    hi = torch.tensor(pc_range[3:], dtype=torch.float64, device=reference_points.device)
    points = reference_points.detach().double() * (hi - lo) + lo                        # (B, Q, 3) metres
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)        # (B, Q, 4)
    projected = torch.einsum("bvij,bqj->bqvi", lidar2img.double(), homogeneous)          # (B, Q, V, 4)
    depth = projected[..., 2]
    in_front = depth > DEPTH_EPS
    safe_depth = torch.where(in_front, depth, torch.ones_like(depth))
    u = projected[..., 0] / safe_depth
    v = projected[..., 1] / safe_depth
    valid = in_front & (u >= 0) & (u < img_w) & (v >= 0) & (v < img_h)
    coords = torch.stack([v * (feat_h / img_h), u * (feat_w / img_w)], dim=-1)
    coords = torch.where(valid.unsqueeze(-1), coords, torch.zeros_like(coords))          # no inf/nan downstream
    return Projection(coords.float(), valid, (feat_h, feat_w))
