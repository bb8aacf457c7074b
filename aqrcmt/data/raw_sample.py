"""One sample given as raw arrays (a user's own data: no dataset, no nuScenes root) -> a test-time Batch.

The arrays go through the same test pipeline as a dataset sample (:class:`aqrcmt.data.transforms.Pipeline`
with ``train=False``: range filter, test resize/crop, normalisation) and the same :func:`collate`, so a model
sees the same tensors whichever way the sample came in.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from aqrcmt.config import AugmentConfig
from aqrcmt.structures import CAMERA_NAMES
from aqrcmt.data.collate import collate
from aqrcmt.data.transforms import Pipeline, Sample
from aqrcmt.structures import Batch, CameraCalibration

POINT_COLUMNS = 5          # x, y, z, intensity, time lag (s)
RawImages = Union[np.ndarray, torch.Tensor, Sequence[np.ndarray]]


def _as_numpy(value, name: str) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype == object:
        raise ValueError(f"{name}: expected a numeric array, got {type(value).__name__}")
    return array


def images_to_bgr(images: RawImages) -> np.ndarray:
    """Six RGB images -> (6, H, W, 3) uint8 BGR (the dataset's layout, as cv2 reads files).

    images: six (H, W, 3) uint8 RGB arrays (a sequence or a (6, H, W, 3) array), or a (6, 3, H, W) tensor/array
    of RGB values in [0, 255] (uint8, or float rounded to uint8).
    """
    if isinstance(images, (list, tuple)):
        shapes = {np.shape(view) for view in images}
        if len(shapes) != 1:
            raise ValueError(f"images: the six views must share one size, got shapes {sorted(shapes)}")
        array = np.stack([_as_numpy(view, "images") for view in images])
    else:
        array = _as_numpy(images, "images")
    if array.ndim == 4 and array.shape[1] == 3 and array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)                         # (6, 3, H, W) -> (6, H, W, 3)
    if array.ndim != 4 or array.shape[0] != len(CAMERA_NAMES) or array.shape[-1] != 3:
        raise ValueError(f"images: expected {len(CAMERA_NAMES)} views (H, W, 3) or a ({len(CAMERA_NAMES)}, 3, H, W) "
                         f"tensor, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
            raise ValueError("images: values must be RGB in [0, 255]")
        array = np.rint(array).astype(np.uint8)
    return np.ascontiguousarray(array[..., ::-1])


def sample_from_arrays(points, images: Optional[RawImages], calibration: CameraCalibration,
                       token: str = "sample") -> Sample:
    """A :class:`Sample` (no GT) of raw arrays, before any transform; bad shapes raise ValueError naming the input.

    points: (N, 5) x, y, z (m, LiDAR frame), intensity, time lag (s); images: see :func:`images_to_bgr`, or None
    for a LiDAR-only model; calibration: the cameras' K (6, 3, 3) and lidar2cam (6, 4, 4), an optional pose.
    """
    cloud = _as_numpy(points, "points").astype(np.float32)
    if cloud.ndim != 2 or cloud.shape[1] != POINT_COLUMNS:
        raise ValueError(f"points: expected (N, {POINT_COLUMNS}) (x, y, z, intensity, time lag), got shape "
                         f"{tuple(cloud.shape)}")
    if not np.isfinite(cloud).all():
        raise ValueError("points: hold NaN or infinite values")
    pose = np.eye(4) if calibration.lidar2global is None else _as_numpy(calibration.lidar2global, "lidar2global")
    if pose.shape != (4, 4):
        raise ValueError(f"calibration.lidar2global: expected (4, 4), got shape {tuple(pose.shape)}")
    sample = Sample(token=token, points=np.ascontiguousarray(cloud), gt_boxes=np.zeros((0, 9)),
                    gt_labels=np.zeros(0, dtype=np.int64), lidar2global=pose.astype(np.float64))
    if images is None:
        return sample
    views = len(CAMERA_NAMES)
    intrinsics = _as_numpy(calibration.intrinsics, "intrinsics").astype(np.float64)
    lidar2cam = _as_numpy(calibration.lidar2cam, "lidar2cam").astype(np.float64)
    if intrinsics.shape != (views, 3, 3):
        raise ValueError(f"calibration.intrinsics: expected ({views}, 3, 3), got shape {tuple(intrinsics.shape)}")
    if lidar2cam.shape != (views, 4, 4):
        raise ValueError(f"calibration.lidar2cam: expected ({views}, 4, 4), got shape {tuple(lidar2cam.shape)}")
    sample.images = images_to_bgr(images)
    sample.intrinsics = np.tile(np.eye(4), (views, 1, 1))
    sample.intrinsics[:, :3, :3] = intrinsics
    sample.lidar2cam = lidar2cam
    return sample


def batch_from_arrays(points, images: Optional[RawImages], calibration: CameraCalibration, *,
                      point_cloud_range: Sequence[float], image_size: tuple[int, int],
                      token: str = "sample") -> Batch:
    """A one-sample test-time Batch of raw arrays (see :func:`sample_from_arrays`): points cut to
    `point_cloud_range`, images resized/cropped to `image_size` (H, W) and normalised as in evaluation."""
    sample = sample_from_arrays(points, images, calibration, token)
    pipeline = Pipeline(AugmentConfig(), tuple(point_cloud_range), tuple(image_size), train=False)
    return collate([pipeline(sample, np.random.default_rng(0))])
