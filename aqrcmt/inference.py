"""The user-facing inference API: a detector from its checkpoint, and detections of one sample of raw arrays.

It sits one floor above the model code and joins it with the weights loader (``checkpoint/weights.py``), the raw
array -> Batch conversion (``data/raw_sample.py``) and the one prediction loop (``eval/predict.py``)::

    predictor = Predictor.from_checkpoint("runs/x/best", device="cuda")
    prediction = predictor.predict_sample(points, images, calibration)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from aqrcmt.checkpoint.io import PathLike
from aqrcmt.checkpoint.weights import LoadReport, load_weights, stored_config
from aqrcmt.data.raw_sample import RawImages, batch_from_arrays
from aqrcmt.eval.predict import predict_dataset
from aqrcmt.models.detector import CmtDetector, build_model
from aqrcmt.structures import CameraCalibration, SamplePrediction

if TYPE_CHECKING:
    from aqrcmt.config import Config


def load_detector_from_checkpoint(path: PathLike, device: torch.device | str = "cpu", cfg: "Config | None" = None,
                                  *, missing_ok_prefixes: Sequence[str] = ()) -> tuple[CmtDetector, LoadReport]:
    """The detector of `cfg` (default: the checkpoint's stored config) with the weights at `path` loaded, on
    `device`, in eval mode. Every model key must be in the file unless it starts with `missing_ok_prefixes`."""
    detector = build_model((cfg if cfg is not None else stored_config(path)).model)
    report = load_weights(detector, path, missing_ok_prefixes=missing_ok_prefixes)
    return detector.to(device).eval(), report


class Predictor:
    """A trained CmtDetector in eval mode, fed raw sensor arrays through the evaluation's test-time preprocessing."""

    def __init__(self, detector: CmtDetector) -> None:
        self.detector = detector.eval()

    @classmethod
    def from_checkpoint(cls, path: PathLike, device: torch.device | str = "cpu") -> "Predictor":
        """The detector of the config stored with the weights at `path` (a ``.safetensors`` file or a checkpoint
        directory), weights loaded, on `device`; CheckpointError names what does not fit."""
        return cls(load_detector_from_checkpoint(path, device)[0])

    def predict_sample(self, points: np.ndarray, images: Optional[RawImages], calibration: CameraCalibration
                       ) -> SamplePrediction:
        """Detections of one sample given as raw arrays, through the evaluation's test-time preprocessing.

        points: (N, 5) x, y, z (m, LiDAR frame), intensity, time lag (s); images: six (H, W, 3) uint8 RGB views
        in CAMERA_NAMES order or a (6, 3, H, W) RGB tensor (ignored, may be None, without a camera branch);
        calibration: intrinsics (6, 3, 3), lidar2cam (6, 4, 4), optional lidar2global (4, 4).
        Returns the detections in the LiDAR frame and, with a pose, in the global frame.
        """
        detector = self.detector
        batch = batch_from_arrays(points, images if detector.with_camera else None, calibration,
                                  point_cloud_range=detector.cfg.lidar.voxel.point_cloud_range,
                                  image_size=detector.cfg.camera.image_size)
        device = next(detector.parameters()).device
        (_, detections), = predict_dataset(detector, [batch], device)
        world = None if calibration.lidar2global is None else detections.transformed(calibration.lidar2global)
        return SamplePrediction(detections, world)
