"""The batch that flows from the data pipeline into the model, the loss and the evaluation.

Conventions (one for the whole package):
- Frame: the key frame's LiDAR frame (x, y, z in metres; mmdet3d-1.0 LiDAR convention).
- Boxes: ``(x, y, z, dx, dy, dz, yaw, vx, vy)`` with (x, y, z) the **gravity centre**, dx the length along
  the heading, dy the width, dz the height, yaw in radians about +z (0 = heading along +x), velocities in
  m/s in the LiDAR frame.
- Labels: index into :data:`CLASS_NAMES`.
- Cameras: the six views in :data:`CAMERA_NAMES` order; images BGR, normalised with the
  released configs' means/stds; ``lidar2img`` = K4 @ lidar2cam with every image and 3-D augmentation
  applied.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import NamedTuple, Optional

import numpy as np
import torch

CLASS_NAMES: tuple[str, ...] = (
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
)
CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT",
)
# (row, column) of each camera in pictures of the rig: the front cameras above the back ones, the left cameras in
# the left column.
CAMERA_LAYOUT: dict[str, tuple[int, int]] = {
    "CAM_FRONT_LEFT": (0, 0), "CAM_FRONT": (0, 1), "CAM_FRONT_RIGHT": (0, 2),
    "CAM_BACK_LEFT": (1, 0), "CAM_BACK": (1, 1), "CAM_BACK_RIGHT": (1, 2),
}


@dataclass
class SampleMeta:
    """Per-sample facts the model does not need but evaluation and logging do."""
    sample_token: str
    lidar2global: torch.Tensor          # (4, 4) float64: key-frame LiDAR frame -> nuScenes global frame
    timestamp: float = 0.0              # seconds
    scene_name: str = ""


# The sensor-failure scenarios of nuScenes-R as the field names them (MoME, MetaBEV): evaluation corruptions
# (aqrcmt.data.corruptions) and training augmentations (``data.augment.failures``) alike.
FAILURES: tuple[str, ...] = ("lidar_drop", "camera_drop", "view_drop", "beam_reduction", "limited_fov",
                             "object_failure")

# What a sample's sensors went through, per sensor (LiDAR) or camera view: the router's supervision targets.
SENSOR_INTACT, SENSOR_DROPPED, SENSOR_DEGRADED = 0, 1, 2     # degraded: changed in a way with no 0/1 target


@dataclass
class SensorState:
    """The known state of one sample's sensors, set where a failure or corruption is applied.

    lidar:         SENSOR_INTACT / SENSOR_DROPPED / SENSOR_DEGRADED.
    lidar_front:   (2,) unit vector (x, y) of the LiDAR's forward direction in the sample's current frame (moved by
                   the 3-D augmentations; nuScenes' LIDAR_TOP looks along +y).
    lidar_fov:     half-width (rad) of the azimuth sector about `lidar_front` that still returns points (pi: all).
    views:         (V,) int8 state of each camera view.
    """
    lidar: int = SENSOR_INTACT
    lidar_front: np.ndarray = field(default_factory=lambda: np.array([0.0, 1.0]))
    lidar_fov: float = float(np.pi)
    views: np.ndarray = field(default_factory=lambda: np.zeros(len(CAMERA_NAMES), dtype=np.int8))


@dataclass
class SensorStates:
    """The SensorState of each sample of a batch, as tensors.

    lidar: (B,) int8; lidar_fov: (B, 3) float32 (front x, front y, half-width in rad); views: (B, V) int8.
    """
    lidar: torch.Tensor
    lidar_fov: torch.Tensor
    views: torch.Tensor

    @classmethod
    def intact(cls, batch_size: int, views: int = len(CAMERA_NAMES)) -> "SensorStates":
        return cls.stack([SensorState(views=np.zeros(views, dtype=np.int8)) for _ in range(batch_size)])

    @classmethod
    def stack(cls, states: list[SensorState]) -> "SensorStates":
        return cls(torch.tensor([s.lidar for s in states], dtype=torch.int8),
                   torch.tensor(np.array([[*s.lidar_front, s.lidar_fov] for s in states]), dtype=torch.float32),
                   torch.from_numpy(np.stack([s.views.astype(np.int8) for s in states])))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SensorStates":
        return SensorStates(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    def pin_memory(self) -> "SensorStates":
        return SensorStates(*(getattr(self, f.name).pin_memory() for f in fields(self)))


@dataclass
class Batch:
    """A collated batch of B samples.

    points:     list of B tensors (N_i, 5) float32: x, y, z, intensity, time lag (s) of the sweep.
    images:     (B, 6, 3, H, W) float32 normalised images, or None (LiDAR-only model / no cameras).
    lidar2img:  (B, 6, 4, 4) float64 projection matrices (augmentations included), or None.
    img_shape:  (H, W) of the images after augmentation (also the padded shape: sizes are multiples of 32).
    gt_boxes:   list of B tensors (n_i, 9) float32 (see module docstring); empty (0, 9) allowed.
    gt_labels:  list of B tensors (n_i,) int64.
    metas:      list of B SampleMeta.
    sensors:    what each sample's sensors went through (failure augmentations, corruptions), or None (intact).
    """
    points: list[torch.Tensor]
    images: Optional[torch.Tensor]
    lidar2img: Optional[torch.Tensor]
    img_shape: tuple[int, int]
    gt_boxes: list[torch.Tensor]
    gt_labels: list[torch.Tensor]
    metas: list[SampleMeta] = field(default_factory=list)
    sensors: Optional[SensorStates] = None

    @property
    def batch_size(self) -> int:
        return len(self.points)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Move every tensor to `device` (metas stay on the CPU)."""
        def move(x):
            if isinstance(x, (torch.Tensor, SensorStates)):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, list):
                return [move(v) for v in x]
            return x
        return Batch(**{f.name: (getattr(self, f.name) if f.name == "metas" else move(getattr(self, f.name)))
                        for f in fields(self)})

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        def pin(x):
            if isinstance(x, (torch.Tensor, SensorStates)):
                return x.pin_memory()
            if isinstance(x, list):
                return [pin(v) for v in x]
            return x
        return Batch(**{f.name: (getattr(self, f.name) if f.name == "metas" else pin(getattr(self, f.name)))
                        for f in fields(self)})


@dataclass
class Detections:
    """Decoded detections of one sample, in the same frame and box convention as the ground truth.

    boxes:  (n, 9) float32 (x, y, z gravity centre, dx, dy, dz, yaw, vx, vy), LiDAR frame.
    scores: (n,) float32 in [0, 1], sorted descending.
    labels: (n,) int64 class indices into CLASS_NAMES (their names: :attr:`names`).
    """
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    @property
    def names(self) -> list[str]:
        """(n,) the class name of each detection, e.g. 'car'."""
        return [CLASS_NAMES[label] for label in self.labels.tolist()]

    def transformed(self, transform: torch.Tensor) -> "Detections":
        """The detections moved by a rigid 4x4 `transform` (e.g. lidar2global), see :func:`transform_boxes`."""
        boxes = transform_boxes(self.boxes, transform)
        return Detections(boxes.to(self.boxes.dtype), self.scores.detach().cpu(), self.labels.detach().cpu())


def transform_boxes(boxes: torch.Tensor, transform: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(n, 9) boxes moved by a rigid 4x4 `transform` (e.g. lidar2global, m): (n, 9) float64 on the CPU.

    Centres are moved; the heading (cos yaw, sin yaw, 0) is rotated and its yaw about +z read back, so a transform
    that also pitches or rolls gives the heading the devkit reads from a rotated box; velocities (vx, vy, 0) are
    rotated and their z part dropped. Boxes stay upright. The rotation is made orthonormal first (SVD): the
    transform may have passed through float32.
    """
    matrix = torch.as_tensor(transform).detach().to("cpu", torch.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"transform must be 4x4, got shape {tuple(matrix.shape)}")
    u, _, vt = torch.linalg.svd(matrix[:3, :3])
    rotation, translation = u @ vt, matrix[:3, 3]
    boxes = boxes.detach().to("cpu", torch.float64)
    yaw = boxes[:, 6]
    heading = torch.stack([torch.cos(yaw), torch.sin(yaw), torch.zeros_like(yaw)], dim=1) @ rotation.T
    velocity = torch.cat([boxes[:, 7:9], boxes.new_zeros(len(boxes), 1)], dim=1) @ rotation.T
    moved = boxes.clone()
    moved[:, :3] = boxes[:, :3] @ rotation.T + translation
    moved[:, 6] = torch.atan2(heading[:, 1], heading[:, 0])
    moved[:, 7:9] = velocity[:, :2]
    return moved


@dataclass
class CameraCalibration:
    """The six cameras of one sample (:data:`CAMERA_NAMES` order) and, optionally, its pose.

    intrinsics:   (6, 3, 3) pinhole matrices K of the images as given (pixels).
    lidar2cam:    (6, 4, 4) LiDAR frame -> camera frame (x right, y down, z forward; metres).
    lidar2global: (4, 4) LiDAR frame -> a world frame, or None (detections then stay in the LiDAR frame only).
    """
    intrinsics: torch.Tensor
    lidar2cam: torch.Tensor
    lidar2global: Optional[torch.Tensor] = None


class SamplePrediction(NamedTuple):
    """What :meth:`aqrcmt.inference.Predictor.predict_sample` returns."""
    lidar: Detections                    # in the sample's LiDAR frame
    global_frame: Optional[Detections]   # moved by calibration.lidar2global, None without a pose
