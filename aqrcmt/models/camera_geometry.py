"""Camera geometry of the model: query reference points -> image pixels on every view, and which views see them.

One rule for every user (the CMT head's query rays, the AQR projection, the locality prior):

- layout: per-query, per-view results are (B, Q, V, ...), query-major like every other per-query tensor;
- depth: a point is in front of camera v when its depth (the projected z, metres) exceeds ``DEPTH_EPS``;
- visible: in front and its pixel (u, v) inside the half-open image ``[0, W_img) x [0, H_img)``;
- dtype: the projection runs in float64 and returns float32. ``lidar2img`` holds translations of ~1e3 pixels and
  the division by depth amplifies the rounding of near points, so in float32 a point on the image border could be
  visible or not depending on the caller's precision; in float64 the B x Q x V 4 x 4 products cost nothing.
  Autocast is off inside, so mixed precision never reaches the geometry.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

DEPTH_EPS = 1e-5   # metres; points closer to (or behind) the image plane are not visible


class ImageProjection(NamedTuple):
    """Where B x Q points land on V images.

    pixels:  (B, Q, V, 3) float32 homogeneous pixels (u, v, 1): the projection divided by its detached depth, so
             a gradient flows into the points through the numerator only (the official CMT rule); finite
             everywhere, meaningful only where visible.
    visible: (B, Q, V) bool.
    """
    pixels: Tensor
    visible: Tensor


def projection_matrices(lidar2img: Tensor) -> tuple[Tensor, Tensor]:
    """(lidar2img, img2lidar), both (..., 4, 4) float32; the inverse is taken in float64 first."""
    if lidar2img.shape[-2:] != (4, 4):
        raise ValueError(f"lidar2img must have shape (..., 4, 4), got {tuple(lidar2img.shape)}")
    return lidar2img.float(), torch.linalg.inv(lidar2img.double()).float()


def project_to_images(reference: Tensor, pc_range: tuple[float, ...], lidar2img: Tensor,
                      img_shape: tuple[int, int]) -> ImageProjection:
    """Project (B, Q, 3) reference points normalised by `pc_range` onto the V images of lidar2img (B, V, 4, 4).

    pc_range: (x_min, y_min, z_min, x_max, y_max, z_max) in metres; lidar2img maps LiDAR metres to image pixels,
    every image augmentation (resize, crop, flip) included; img_shape: (H_img, W_img) of the (padded) images.
    """
    if reference.dim() != 3 or reference.shape[-1] != 3:
        raise ValueError(f"reference_points must be (B, Q, 3) normalised by pc_range, got {tuple(reference.shape)}")
    if lidar2img.dim() != 4 or lidar2img.shape[-2:] != (4, 4) or lidar2img.shape[0] != reference.shape[0]:
        raise ValueError(f"lidar2img must be (B, V, 4, 4) with B = {reference.shape[0]}, got {tuple(lidar2img.shape)}")
    if len(pc_range) != 6:
        raise ValueError(f"pc_range needs 6 values (x_min, y_min, z_min, x_max, y_max, z_max), got {pc_range}")
    img_h, img_w = img_shape
    with torch.autocast(device_type=reference.device.type, enabled=False):
        low = torch.tensor(pc_range[:3], dtype=torch.float64, device=reference.device)
        high = torch.tensor(pc_range[3:], dtype=torch.float64, device=reference.device)
        metres = reference.double() * (high - low) + low                                     # (B, Q, 3)
        homogeneous = torch.cat((metres, torch.ones_like(metres[..., :1])), dim=-1)          # (B, Q, 4)
        projected = torch.einsum("bvij,bqj->bqvi", lidar2img.double(), homogeneous)[..., :3]  # (B, Q, V, 3)
        depth = projected[..., 2:].detach()
        in_front = depth > DEPTH_EPS
        pixels = projected / torch.where(in_front, depth, torch.ones_like(depth))
        u, v = pixels[..., 0], pixels[..., 1]
        visible = in_front.squeeze(-1) & (u >= 0) & (u < img_w) & (v >= 0) & (v < img_h)
        return ImageProjection(pixels.float(), visible)


def feature_map_pixels(pixels: Tensor, img_shape: tuple[int, int], feature_size: tuple[int, int]) -> Tensor:
    """(..., >=2) image pixels (u, v) -> (..., 2) continuous feature-map pixels (y, x) of an (h, w) map that covers
    the (H_img, W_img) image; pixel i covers [i, i + 1)."""
    (img_h, img_w), (feat_h, feat_w) = img_shape, feature_size
    return torch.stack((pixels[..., 1] * (feat_h / img_h), pixels[..., 0] * (feat_w / img_w)), dim=-1)
