"""The GT-object database for GT paste (:mod:`aqrcmt.data.gt_paste`), built offline from a dataset.

:func:`build_gt_database` (``aqrcmt build-gt-database``) stores, for every GT box of the split, the points inside
it (key frame + sweeps, 5 columns, xyz relative to the box's gravity centre) in ``<out>/objects/*.bin``, the
object's image crop (from the camera where its projected box is largest; the released code takes the last valid
view) in ``<out>/objects/*.png`` when the dataset loads images, and the boxes in ``<out>/dbinfos.pkl``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from aqrcmt.atomic import pickle_atomic, staged_directory
from aqrcmt.structures import CLASS_NAMES
from aqrcmt.data.box_geometry import image_boxes, points_in_boxes
from aqrcmt.data.files import BadSampleError
from aqrcmt.data.gt_paste import DATABASE_FORMAT
from aqrcmt.data.dataset import NuScenesDataset
from aqrcmt.data.transforms import Sample

MIN_CROP_SIDE = 10  # px: smaller projected boxes are not stored as crops
_DATABASE_ENTRIES = ("objects", "dbinfos.pkl")
DEFAULT_FOLDER = "aqrcmt_gt_database"   # under the nuScenes root, where `aqrcmt build-gt-database` writes


def default_database(root: str | Path) -> Path:
    """The dbinfos.pkl that `aqrcmt build-gt-database` writes by default for the nuScenes at `root`."""
    return Path(root) / DEFAULT_FOLDER / "dbinfos.pkl"


def build_gt_database(dataset: NuScenesDataset, out_dir: str | Path) -> Path:
    """Write `out_dir`/objects/*.bin (+ *.png crops when the dataset loads images) and `out_dir`/dbinfos.pkl
    from every sample of `dataset` (no transforms); returns the path of dbinfos.pkl.

    The database is built in a folder beside `out_dir` that replaces it at the end: a failure leaves no
    half-written database and an existing one intact. An existing `out_dir` that is not a GT database (it holds
    anything besides objects/ and dbinfos.pkl) is refused (FileExistsError).
    dataset: its on_bad_sample setting decides whether a bad sample stops the build or is skipped with a warning.
    """
    out_dir = Path(out_dir)
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _DATABASE_ENTRIES) if out_dir.is_dir() else []
    if foreign:
        raise FileExistsError(f"{out_dir} holds files that are not part of a GT database ({foreign[:5]}); "
                              f"refusing to replace it")
    with staged_directory(out_dir, replace=True) as staging:
        _write_database(dataset, staging)
    return out_dir / "dbinfos.pkl"


def _write_database(dataset: NuScenesDataset, out_dir: Path) -> None:
    (out_dir / "objects").mkdir()
    objects: dict[str, list[dict]] = {name: [] for name in CLASS_NAMES}
    for index in range(len(dataset)):
        try:
            sample = dataset.load_sample(index)
        except BadSampleError as e:
            if dataset.on_bad_sample == "error":
                raise
            warnings.warn(f"GT database: skipping a bad sample: {e}")
            continue
        inside = points_in_boxes(sample.points[:, :3], sample.gt_boxes)
        crops = _largest_crops(sample)
        for j, (box, label) in enumerate(zip(sample.gt_boxes, sample.gt_labels)):
            name = CLASS_NAMES[label]
            points = sample.points[inside[:, j]].copy()
            points[:, :3] -= box[:3].astype(np.float32)
            stem = f"objects/{sample.token}_{name}_{j}"
            points.tofile(out_dir / f"{stem}.bin")
            image_path = ""
            if crops[j] is not None:
                image_path = f"{stem}.png"
                cv2.imwrite(str(out_dir / image_path), crops[j])
            objects[name].append({"path": f"{stem}.bin", "image_path": image_path, "box": box.tolist(),
                                  "num_points": len(points), "sample_token": sample.token})
    pickle_atomic({"format": DATABASE_FORMAT, "objects": objects}, out_dir / "dbinfos.pkl")


def _largest_crops(sample: Sample) -> list[Optional[np.ndarray]]:
    """Per GT box, the BGR crop of its projected 2-D box in the camera where that box is largest (or None)."""
    crops: list[Optional[np.ndarray]] = [None] * len(sample.gt_boxes)
    if sample.images is None or not len(sample.gt_boxes):
        return crops
    best_area = np.zeros(len(sample.gt_boxes))
    for image, lidar2img in zip(sample.images, sample.lidar2img):
        xy, _, visible = image_boxes(sample.gt_boxes, lidar2img, image.shape[:2])
        sides = xy[:, 2:] - xy[:, :2]
        area = sides.prod(axis=1)
        for j in np.flatnonzero(visible & (sides > MIN_CROP_SIDE).all(axis=1) & (area > best_area)):
            best_area[j] = area[j]
            crops[j] = image[xy[j, 1]:xy[j, 3], xy[j, 0]:xy[j, 2]].copy()
    return crops
