"""Per-sample transforms of the CMT training and test pipelines, on numpy arrays.

The pipelines are those of the released configs (junjie18/CMT ``projects/configs/fusion/*.py``, transforms in
``projects/mmdet3d_plugin/datasets/pipelines/transform_3d.py``).

One rule keeps points, boxes and cameras consistent: every 3-D augmentation is a 4x4 matrix ``M`` (column
vectors, ``p' = M p``) applied to the points and the boxes, and every camera's ``lidar2cam`` is right-multiplied
by ``inv(M)``, so ``lidar2img = K4 @ lidar2cam`` still sends a moved point to the pixel it came from. Image
augmentations (resize, crop, flip: one transform shared by the six views) change only the intrinsics ``K4``.

Training order, as in the released configs: [GT paste] -> modality drop -> global rotation/scale/translation
-> BEV flips -> point/box range filters -> point shuffle -> image resize/crop/flip -> normalisation.
Test order: range filters -> test resize/crop (keep the bottom rows, full width) -> normalisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from PIL import Image

from aqrcmt.config import AugmentConfig
from aqrcmt.structures import SENSOR_DROPPED, SensorState

IMAGE_MEAN_BGR = np.array([103.530, 116.280, 123.675], dtype=np.float32)
IMAGE_STD_BGR = np.array([57.375, 57.120, 58.395], dtype=np.float32)
NUSCENES_IMAGE_HW = (900, 1600)   # the camera resolution the configs' image_resize_range refers to


@dataclass
class Sample:
    """One sample on its way through the pipeline (the unit every transform takes and changes in place).

    points:       (N, 5) float32 x, y, z (m, key-frame LiDAR frame), intensity, time lag (s).
    gt_boxes:     (n, 9) float64 (x, y, z gravity centre, dx, dy, dz, yaw, vx, vy); see aqrcmt.structures.
    gt_labels:    (n,) int64 indices into CLASS_NAMES.
    lidar2global: (4, 4) float64, from the (augmented) LiDAR frame to the nuScenes global frame.
    images:       (6, H, W, 3) uint8 BGR, (6, 3, H, W) float32 after :func:`normalize_images`, or None.
    intrinsics:   (6, 4, 4) float64 K4 (3x3 K in the top-left corner), or None.
    lidar2cam:    (6, 4, 4) float64, or None.
    sensors:      what the sensors went through (failure augmentations, corruptions): the router's targets.
    """
    token: str
    points: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    lidar2global: np.ndarray
    images: Optional[np.ndarray] = None
    intrinsics: Optional[np.ndarray] = None
    lidar2cam: Optional[np.ndarray] = None
    timestamp: float = 0.0
    scene_name: str = ""
    sensors: SensorState = field(default_factory=SensorState)

    @property
    def lidar2img(self) -> Optional[np.ndarray]:
        """(6, 4, 4) float64 K4 @ lidar2cam, or None without cameras."""
        if self.intrinsics is None or self.lidar2cam is None:
            return None
        return self.intrinsics @ self.lidar2cam

    @property
    def image_hw(self) -> tuple[int, int]:
        if self.images is None:
            raise ValueError(f"sample {self.token}: has no images")
        return (self.images.shape[1], self.images.shape[2]) if self.images.dtype == np.uint8 \
            else (self.images.shape[2], self.images.shape[3])


# --------------------------------------------------------------------------------------------------
# 3-D transforms
# --------------------------------------------------------------------------------------------------
def transform_3d(sample: Sample, matrix: np.ndarray) -> None:
    """Apply ``matrix`` (4, 4) = [[s * Q, t], [0, 1]], Q a rotation about z or a reflection of x / y, to the sample.

    Points and box centres move by the matrix, headings and velocities turn with its linear part, box sizes
    and velocities scale by s; lidar2cam and lidar2global are right-multiplied by the inverse.
    """
    linear, translation = matrix[:3, :3], matrix[:3, 3]
    scale = abs(np.linalg.det(linear)) ** (1.0 / 3.0)
    xyz = sample.points[:, :3].astype(np.float64) @ linear.T + translation
    sample.points[:, :3] = xyz.astype(np.float32)
    boxes = sample.gt_boxes
    if len(boxes):
        boxes[:, :3] = boxes[:, :3] @ linear.T + translation
        boxes[:, 3:6] *= scale
        heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], axis=1) @ linear[:2, :2].T
        boxes[:, 6] = np.arctan2(heading[:, 1], heading[:, 0])
        boxes[:, 7:9] = boxes[:, 7:9] @ linear[:2, :2].T
    front = linear[:2, :2] @ sample.sensors.lidar_front
    sample.sensors.lidar_front = front / np.linalg.norm(front)
    inverse = np.linalg.inv(matrix)
    if sample.lidar2cam is not None:
        sample.lidar2cam = sample.lidar2cam @ inverse
    sample.lidar2global = sample.lidar2global @ inverse


def rot_scale_trans_matrix(angle: float, scale: float, translation: np.ndarray) -> np.ndarray:
    """(4, 4) float64 T @ S @ R: rotate by `angle` (rad, counter-clockwise about +z), scale, then translate (m)."""
    c, s = math.cos(angle), math.sin(angle)
    matrix = np.eye(4)
    matrix[:3, :3] = scale * np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    matrix[:3, 3] = translation
    return matrix


def draw_global_rot_scale_trans(rng: np.random.Generator, rot_range: tuple[float, float],
                                scale_range: tuple[float, float], translation_std: float) -> np.ndarray:
    """GlobalRotScaleTransAll's (4, 4) matrix: angle ~ U(rot_range), scale ~ U(scale_range), translation ~ N(0,
    std) per axis."""
    angle = rng.uniform(*rot_range)
    scale = rng.uniform(*scale_range)
    translation = rng.normal(0.0, translation_std, size=3)
    return rot_scale_trans_matrix(angle, scale, translation)


def bev_flip_matrix(horizontal: bool, vertical: bool) -> np.ndarray:
    """(4, 4): horizontal flip y -> -y (yaw -> -yaw), vertical flip x -> -x (yaw -> pi - yaw)."""
    return np.diag([-1.0 if vertical else 1.0, -1.0 if horizontal else 1.0, 1.0, 1.0])


def draw_bev_flip(rng: np.random.Generator) -> np.ndarray:
    """CustomRandomFlip3D's (4, 4) matrix: horizontal and vertical flips, each with probability 0.5."""
    horizontal, vertical = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    return bev_flip_matrix(horizontal, vertical)


def random_modality_drop(sample: Sample, rng: np.random.Generator) -> None:
    """ModalMask3D: u ~ U(0, 1); u > 0.75 zeroes all images, 0.5 < u <= 0.75 zeroes all points (every column).

    As in the original the dropped points are multiplied by 0, not removed: they stay as one point at the origin
    (moved by the later global augmentations) so the LiDAR branch still sees a valid, empty-looking scene.
    """
    u = rng.random()
    if u > 0.75 and sample.images is not None:
        sample.images = np.zeros_like(sample.images)
        sample.sensors.views[:] = SENSOR_DROPPED
    elif 0.5 < u <= 0.75:
        sample.points = np.zeros_like(sample.points)
        sample.sensors.lidar = SENSOR_DROPPED


def filter_points_in_range(sample: Sample, point_cloud_range: tuple[float, ...]) -> None:
    """PointsRangeFilter: keep points strictly inside (x_min, y_min, z_min, x_max, y_max, z_max)."""
    points = sample.points
    inside = np.ones(len(points), dtype=bool)
    for axis in range(3):                        # column by column: no (N, 3) temporaries
        column = points[:, axis]
        inside &= (column > np.float32(point_cloud_range[axis])) & (column < np.float32(point_cloud_range[axis + 3]))
    sample.points = points[inside]


def filter_boxes_in_range(sample: Sample, point_cloud_range: tuple[float, ...]) -> None:
    """ObjectRangeFilter: keep boxes whose BEV centre is strictly inside the range; wrap yaw to [-pi, pi)."""
    boxes = sample.gt_boxes
    x_min, y_min, _, x_max, y_max, _ = point_cloud_range
    keep = (boxes[:, 0] > x_min) & (boxes[:, 1] > y_min) & (boxes[:, 0] < x_max) & (boxes[:, 1] < y_max)
    sample.gt_boxes, sample.gt_labels = boxes[keep], sample.gt_labels[keep]
    sample.gt_boxes[:, 6] = wrap_angle(sample.gt_boxes[:, 6])


def wrap_angle(angle: np.ndarray) -> np.ndarray:
    """Angles (rad) wrapped to [-pi, pi)."""
    return angle - np.floor(angle / (2 * np.pi) + 0.5) * 2 * np.pi


def shuffle_points(sample: Sample, rng: np.random.Generator) -> None:
    sample.points = np.take(sample.points, rng.permutation(len(sample.points)), axis=0)


# --------------------------------------------------------------------------------------------------
# Image transforms
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageAug:
    """One resize -> crop -> horizontal-flip transform shared by the six views.

    resize: scale factor r; the image becomes (int(W0 r), int(H0 r)) pixels (W, H).
    crop:   (x0, y0) top-left corner of the output window in the resized image (may leave it: zero fill).
    flip:   mirror the output horizontally.
    """
    resize: float
    crop: tuple[int, int]
    flip: bool

    def matrix(self, out_width: int) -> np.ndarray:
        """(4, 4) float64 pixel transform P with K4' = P @ K4: u' = r u - x0 (then u'' = W_out - u'), v' = r v - y0."""
        p = np.eye(4)
        p[0, 0] = p[1, 1] = self.resize
        p[0, 2], p[1, 2] = -self.crop[0], -self.crop[1]
        if self.flip:
            p[0, :] = -p[0, :]
            p[0, 2] += out_width
        return p


def eval_image_aug(source_hw: tuple[int, int], out_hw: tuple[int, int]) -> ImageAug:
    """The test rule: r = max(H/H0, W/W0), keep the bottom rows, full width (no randomness)."""
    resize = max(out_hw[0] / source_hw[0], out_hw[1] / source_hw[1])
    new_w, new_h = int(source_hw[1] * resize), int(source_hw[0] * resize)
    return ImageAug(resize, (int(max(0, new_w - out_hw[1]) / 2), new_h - out_hw[0]), False)


def random_image_aug(source_hw: tuple[int, int], out_hw: tuple[int, int], resize_range: tuple[float, float],
                     flip: bool, rng: np.random.Generator) -> ImageAug:
    """The training rule: r ~ U(resize_range), bottom crop, random horizontal crop offset, flip with p = 0.5.

    `resize_range` is given for 1600x900 cameras (the configs' values); it is scaled by the ratio of the test
    resize of this source size to that of 1600x900, so the same config works on smaller (synthetic) images.
    """
    relative = max(out_hw[0] / source_hw[0], out_hw[1] / source_hw[1]) / \
        max(out_hw[0] / NUSCENES_IMAGE_HW[0], out_hw[1] / NUSCENES_IMAGE_HW[1])
    resize = rng.uniform(*resize_range) * relative
    new_w, new_h = int(source_hw[1] * resize), int(source_hw[0] * resize)
    crop_x = int(rng.uniform(0, max(0, new_w - out_hw[1])))
    return ImageAug(resize, (crop_x, new_h - out_hw[0]), flip and bool(rng.random() < 0.5))


def apply_image_aug(sample: Sample, aug: ImageAug, out_hw: tuple[int, int]) -> None:
    """Resize (bicubic, PIL's default as in the original), crop, flip every view; update the intrinsics."""
    if sample.images is None:
        return
    height, width = sample.images.shape[1:3]
    new_size = (int(width * aug.resize), int(height * aug.resize))
    box = (aug.crop[0], aug.crop[1], aug.crop[0] + out_hw[1], aug.crop[1] + out_hw[0])
    views = []
    for view in sample.images:
        image = Image.fromarray(view).resize(new_size, Image.Resampling.BICUBIC).crop(box)
        if aug.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(np.asarray(image))
    sample.images = np.stack(views)
    sample.intrinsics = aug.matrix(out_hw[1]) @ sample.intrinsics


def normalize_images(sample: Sample) -> None:
    """(6, H, W, 3) uint8 BGR -> (6, 3, H, W) float32 (x - mean) / std with the configs' BGR statistics."""
    if sample.images is None:
        return
    images = np.ascontiguousarray(sample.images.transpose(0, 3, 1, 2)).astype(np.float32)   # channels first on uint8
    images -= IMAGE_MEAN_BGR[:, None, None]                                                   # in place: 5x faster
    images /= IMAGE_STD_BGR[:, None, None]
    sample.images = images


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------
class Pipeline:
    """The training or test transform chain of one dataset (see the module docstring for the order).

    point_cloud_range: the model's voxel range (m); image_size: (H, W) the images come out at.
    paste: an optional GT-object paster (see aqrcmt.data.gt_paste.GTPaster), used in training only.
    """

    def __init__(self, augment: AugmentConfig, point_cloud_range: tuple[float, ...], image_size: tuple[int, int],
                 train: bool, paste: Optional[Callable[[Sample, np.random.Generator], None]] = None) -> None:
        self.augment = augment
        self.point_cloud_range = tuple(point_cloud_range)
        self.image_size = tuple(image_size)
        self.train = train
        self.random = train and augment.enabled
        self.paste = paste if self.random else None

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        aug = self.augment
        if self.random:
            if self.paste is not None:
                self.paste(sample, rng)
            if aug.modality_drop:
                random_modality_drop(sample, rng)
            matrix = draw_global_rot_scale_trans(rng, aug.global_rot_range, aug.global_scale_range,
                                                 aug.global_translation_std)
            if aug.bev_flip:
                matrix = draw_bev_flip(rng) @ matrix
            transform_3d(sample, matrix)                 # the global transform, then the flips, in one pass
        filter_points_in_range(sample, self.point_cloud_range)
        filter_boxes_in_range(sample, self.point_cloud_range)
        if self.random and aug.shuffle_points:
            shuffle_points(sample, rng)
        if sample.images is not None:
            source_hw = sample.images.shape[1:3]
            image_aug = random_image_aug(source_hw, self.image_size, aug.image_resize_range, aug.image_flip, rng) \
                if self.random else eval_image_aug(source_hw, self.image_size)
            apply_image_aug(sample, image_aug, self.image_size)
            normalize_images(sample)
        return sample
