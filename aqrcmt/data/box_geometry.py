"""Box geometry on numpy arrays: points in boxes, BEV/3-D corners, projected 2-D boxes, BEV overlap.

Boxes are (n, >= 7) rows (gravity centre x, y, z, dx, dy, dz, yaw, ...) in metres and radians, as in
:mod:`aqrcmt.structures`.
"""
from __future__ import annotations

import numpy as np


def points_in_boxes(xyz: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, n) bool: point i lies in box j (closed). xyz: (N, 3); boxes: (n, >= 7) gravity centre, dx, dy, dz, yaw."""
    offset = xyz[:, None, :3].astype(np.float64) - boxes[None, :, :3]
    cos, sin = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    along = offset[..., 0] * cos + offset[..., 1] * sin          # coordinates in the box frame
    across = -offset[..., 0] * sin + offset[..., 1] * cos
    return (np.abs(along) <= boxes[:, 3] / 2) & (np.abs(across) <= boxes[:, 4] / 2) & \
        (np.abs(offset[..., 2]) <= boxes[:, 5] / 2)


def bev_corners(boxes: np.ndarray) -> np.ndarray:
    """(n, 4, 2) BEV corners (m) of boxes (n, >= 7), counter-clockwise."""
    half = boxes[:, None, 3:5] / 2 * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    cos, sin = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = half[..., 0] * cos - half[..., 1] * sin
    y = half[..., 0] * sin + half[..., 1] * cos
    return np.stack([x, y], axis=-1) + boxes[:, None, :2]


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(n, 8, 3) corners (m) of boxes (n, >= 7): the BEV corners at the bottom, then at the top."""
    bev = np.repeat(bev_corners(boxes), 2, axis=1)                       # (n, 8, 2)
    z = boxes[:, None, 2] + boxes[:, None, 5] / 2 * np.tile([-1.0, 1.0], 4)[None]
    return np.concatenate([bev, z[..., None]], axis=-1)


def image_boxes(boxes: np.ndarray, lidar2img: np.ndarray, image_hw: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projected 2-D boxes of 3-D boxes (n, >= 7) in one camera (lidar2img (4, 4)).

    Returns (n, 4) int64 (x0, y0, x1, y1) clipped to the image, (n,) mean corner depth (m), and (n,) bool
    visible: every corner in front of the camera and the clipped box wider and taller than 1 px.
    """
    corners = box_corners(boxes)
    projected = np.concatenate([corners, np.ones_like(corners[..., :1])], -1) @ lidar2img.T   # (n, 8, 4)
    depth = projected[..., 2]
    in_front = (depth > 0).all(axis=1)
    uv = projected[..., :2] / np.where(depth > 0, depth, 1.0)[..., None]
    height, width = image_hw
    xy = np.concatenate([uv.min(axis=1), uv.max(axis=1)], axis=1)
    xy[:, 0::2] = np.clip(xy[:, 0::2], 0, width - 1)
    xy[:, 1::2] = np.clip(xy[:, 1::2], 0, height - 1)
    xy = xy.astype(np.int64)
    visible = in_front & (xy[:, 2] - xy[:, 0] > 1) & (xy[:, 3] - xy[:, 1] > 1)
    return xy, depth.mean(axis=1), visible


def boxes_overlap_bev(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) bool: the BEV rectangles of boxes a (n, >= 7) and b (m, >= 7) intersect (separating-axis test)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=bool)

    def axes(boxes: np.ndarray) -> np.ndarray:   # (k, 2, 2): each box's heading and its normal
        cos, sin = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
        return np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], axis=1)

    corners_a, corners_b = bev_corners(a), bev_corners(b)
    all_axes = np.concatenate(np.broadcast_arrays(axes(a)[:, None], axes(b)[None, :]), axis=2)   # (n, m, 4, 2)
    proj_a = np.einsum("nmad,ncd->nmac", all_axes, corners_a)                                   # (n, m, 4, 4)
    proj_b = np.einsum("nmad,mcd->nmac", all_axes, corners_b)
    separated = (proj_a.max(-1) < proj_b.min(-1)) | (proj_b.max(-1) < proj_a.min(-1))
    return ~separated.any(-1)
