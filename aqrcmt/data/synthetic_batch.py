"""Synthetic model inputs for the detector tests, the benchmarks and the device check (no dataset on disk).

`synthetic_batch(cfg, ...)` builds a :class:`Batch`: random boxes standing on a flat ground, LiDAR points on
the box surfaces plus a ground ring, six level pinhole cameras in a ring around the LiDAR origin, and
random (or zero) images. Boxes follow the package convention (gravity centre, dx along the heading).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from aqrcmt.config import ModelConfig
from aqrcmt.structures import Batch

GROUND_Z = -1.8                                   # ground height in the LiDAR frame (m)
NUM_VIEWS = 6


def camera_ring(image_hw: tuple[int, int], horizontal_fov_deg: float = 70.0) -> torch.Tensor:
    """(6, 4, 4) float64 lidar2img of level cameras at the origin looking along yaw 0, 60, ..., 300 degrees."""
    height, width = image_hw
    focal = width / 2 / math.tan(math.radians(horizontal_fov_deg) / 2)
    intrinsic = torch.eye(4, dtype=torch.float64)
    intrinsic[0, 0] = intrinsic[1, 1] = focal
    intrinsic[0, 2], intrinsic[1, 2] = width / 2, height / 2
    matrices = []
    for view in range(NUM_VIEWS):
        yaw = math.radians(60.0 * view)
        lidar2cam = torch.eye(4, dtype=torch.float64)
        lidar2cam[0, :3] = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])   # camera x: right
        lidar2cam[1, :3] = torch.tensor([0.0, 0.0, -1.0])                        # camera y: down
        lidar2cam[2, :3] = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])     # camera z: forward
        matrices.append(intrinsic @ lidar2cam)
    return torch.stack(matrices)


def random_boxes(num_boxes: int, generator: torch.Generator, extent: float = 40.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 9) boxes standing on the ground within |x|, |y| < extent, and (n,) labels in 0..9."""
    centre_xy = (torch.rand(num_boxes, 2, generator=generator) * 2 - 1) * extent
    dims = torch.rand(num_boxes, 3, generator=generator) * torch.tensor([3.5, 1.2, 1.0]) + torch.tensor([1.0, 0.8, 1.0])
    yaw = (torch.rand(num_boxes, 1, generator=generator) * 2 - 1) * math.pi
    velocity = torch.randn(num_boxes, 2, generator=generator)
    centre_z = GROUND_Z + dims[:, 2:3] / 2
    boxes = torch.cat([centre_xy, centre_z, dims, yaw, velocity], dim=1)
    labels = torch.randint(0, 10, (num_boxes,), generator=generator)
    return boxes, labels


def surface_points(boxes: torch.Tensor, points_per_box: int, generator: torch.Generator) -> torch.Tensor:
    """(n * points_per_box, 5) points uniformly on the faces of each box (intensity random, time lag 0)."""
    n = boxes.shape[0]
    local = torch.rand(n, points_per_box, 3, generator=generator) - 0.5
    face_axis = torch.randint(0, 3, (n, points_per_box, 1), generator=generator)
    face_side = torch.randint(0, 2, (n, points_per_box, 1), generator=generator).float() - 0.5
    local = torch.where(torch.arange(3) == face_axis, face_side, local) * boxes[:, None, 3:6]
    cos, sin = boxes[:, 6].cos()[:, None], boxes[:, 6].sin()[:, None]
    x = local[..., 0] * cos - local[..., 1] * sin + boxes[:, None, 0]
    y = local[..., 0] * sin + local[..., 1] * cos + boxes[:, None, 1]
    z = local[..., 2] + boxes[:, None, 2]
    intensity = torch.rand(n, points_per_box, generator=generator)
    return torch.stack([x, y, z, intensity, torch.zeros_like(x)], dim=-1).reshape(-1, 5)


def ground_points(num_points: int, generator: torch.Generator, radius: float = 50.0) -> torch.Tensor:
    """(num_points, 5) points on the ground plane within `radius` metres."""
    xy = (torch.rand(num_points, 2, generator=generator) * 2 - 1) * radius
    z = torch.full((num_points, 1), GROUND_Z)
    return torch.cat([xy, z, torch.rand(num_points, 1, generator=generator), torch.zeros(num_points, 1)], dim=1)


def synthetic_batch(cfg: ModelConfig, batch_size: int = 2, num_boxes: tuple[int, ...] = (5, 3),
                    points_per_box: int = 100, num_ground_points: int = 600, seed: int = 0,
                    zero_images: bool = False, image_hw: Optional[tuple[int, int]] = None) -> Batch:
    """A batch of `batch_size` samples; sample b has num_boxes[b] boxes (0 allowed -> ground points only)."""
    if len(num_boxes) != batch_size:
        raise ValueError(f"num_boxes needs one count per sample ({batch_size}), got {num_boxes}")
    generator = torch.Generator().manual_seed(seed)
    image_hw = tuple(image_hw or cfg.camera.image_size)
    points, gt_boxes, gt_labels = [], [], []
    for count in num_boxes:
        boxes, labels = random_boxes(count, generator)
        cloud = torch.cat([surface_points(boxes, points_per_box, generator),
                           ground_points(num_ground_points, generator)])
        points.append(cloud[torch.randperm(cloud.shape[0], generator=generator)])
        gt_boxes.append(boxes)
        gt_labels.append(labels)
    images = None
    lidar2img = None
    if cfg.camera.enabled:
        shape = (batch_size, NUM_VIEWS, 3, *image_hw)
        images = torch.zeros(shape) if zero_images else torch.randn(shape, generator=generator)
        lidar2img = camera_ring(image_hw).expand(batch_size, -1, -1, -1).clone()
    return Batch(points=points, images=images, lidar2img=lidar2img, img_shape=image_hw, gt_boxes=gt_boxes,
                 gt_labels=gt_labels, metas=[])
