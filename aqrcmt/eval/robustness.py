"""Robustness to missing sensors: the official metrics with the LiDAR, all cameras, or one camera blanked.

A :class:`ModalityDrop` is a batch transform applied after collation and before the model. It blanks inputs the
way the training-time ModalMask3D does, so the model sees the "sensor missing" input it was trained with:
dropped points are multiplied by 0 (they stay, as points at the origin), dropped images become black (raw
pixel value 0, i.e. ``-mean / std`` after normalisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from aqrcmt.config import CAMERA_NAMES
from aqrcmt.data.transforms import IMAGE_MEAN_BGR, IMAGE_STD_BGR
from aqrcmt.eval.nuscenes_eval import evaluate_detections
from aqrcmt.eval.predict import predict_dataset
from aqrcmt.structures import Batch


@dataclass(frozen=True)
class ModalityDrop:
    """Blank the LiDAR (`lidar`) and/or the images of the named cameras (`cameras`) of every sample."""
    name: str
    lidar: bool = False
    cameras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [c for c in self.cameras if c not in CAMERA_NAMES]
        if unknown:
            raise ValueError(f"ModalityDrop {self.name!r}: unknown camera(s) {unknown}; known: {list(CAMERA_NAMES)}")

    def __call__(self, batch: Batch) -> Batch:
        points = [torch.zeros_like(p) for p in batch.points] if self.lidar else batch.points
        images = batch.images
        if self.cameras:
            if images is None:
                raise ValueError(f"ModalityDrop {self.name!r} blanks cameras but the batch has no images")
            black = torch.as_tensor(-IMAGE_MEAN_BGR / IMAGE_STD_BGR, dtype=images.dtype, device=images.device)
            images = images.clone()
            for camera in self.cameras:
                images[:, CAMERA_NAMES.index(camera)] = black.view(3, 1, 1)
        return Batch(points=points, images=images, lidar2img=batch.lidar2img, img_shape=batch.img_shape,
                     gt_boxes=batch.gt_boxes, gt_labels=batch.gt_labels, metas=batch.metas)


CLEAN = ModalityDrop("clean")


def standard_drops(with_lidar: bool, with_camera: bool) -> list[ModalityDrop]:
    """Clean, then for a fusion model: no LiDAR, no cameras, and each camera missing on its own."""
    drops = [CLEAN]
    if with_lidar and with_camera:
        drops += [ModalityDrop("no LiDAR", lidar=True), ModalityDrop("no cameras", cameras=CAMERA_NAMES)]
    if with_camera:
        drops += [ModalityDrop(f"no {camera}", cameras=(camera,)) for camera in CAMERA_NAMES]
    return drops


def evaluate_robustness(model: torch.nn.Module, loader: Iterable[Batch], root: str | Path, version: str,
                        eval_set: str, output_dir: str | Path, drops: Optional[Sequence[ModalityDrop]] = None,
                        device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """Official metrics per drop (default :func:`standard_drops` of the model's modalities), each evaluation
    written to ``output_dir/<drop name>/``. Returns {drop name: metrics dict}."""
    with_lidar, with_camera = _modalities(model)
    if drops is None:
        if with_lidar is None or with_camera is None:
            raise ValueError(f"cannot tell which inputs {type(model).__name__} uses (no `cfg`); pass `drops`")
        drops = standard_drops(with_lidar, with_camera)
    table: dict[str, dict[str, Any]] = {}
    for drop in drops:
        predicted = predict_dataset(model, loader, device, transform=drop)
        table[drop.name] = evaluate_detections(
            [det for _, det in predicted], [meta for meta, _ in predicted], root, version, eval_set, Path(output_dir) / drop.name.replace(" ", "_"),
            use_camera=with_camera is not False and len(drop.cameras) < len(CAMERA_NAMES),
            use_lidar=with_lidar is not False and not drop.lidar)
    return table


def _modalities(model: torch.nn.Module) -> tuple[Optional[bool], Optional[bool]]:
    """(uses LiDAR, uses cameras) from the model's ModelConfig (``model.cfg``); None where unknown."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "lidar") or not hasattr(cfg, "camera"):
        return None, None
    return bool(cfg.lidar.enabled), bool(cfg.camera.enabled)


def format_robustness(table: dict[str, dict[str, Any]]) -> str:
    """One row per drop: mAP, NDS and their change from the first row (normally "clean")."""
    rows = list(table.items())
    base_map, base_nds = rows[0][1]["mAP"], rows[0][1]["NDS"]
    lines = [f"{'input':<22}{'mAP':>8}{'NDS':>8}{'dmAP':>8}{'dNDS':>8}"]
    for name, m in rows:
        lines.append(f"{name:<22}{m['mAP']:>8.4f}{m['NDS']:>8.4f}{m['mAP'] - base_map:>+8.4f}"
                     f"{m['NDS'] - base_nds:>+8.4f}")
    return "\n".join(lines)
