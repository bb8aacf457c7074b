"""GT paste, the LiDAR + image part of CMT's UnifiedObjectSample: training samples topped up with database objects.

:class:`GTPaster` reads a database written by :mod:`aqrcmt.data.gt_database` (``aqrcmt build-gt-database``) and
tops every class of a training sample up to its sample group (car 2, truck 3, construction_vehicle 7, ...) with
database objects at their recorded positions: a candidate is kept when its BEV footprint (rotated rectangle)
overlaps neither a scene box nor an earlier pasted one; scene points inside kept boxes are removed and the
objects' points added.

With cameras, the paste blends each object's stored image crop 50/50 into the projected 2-D box of every camera
that sees the object; all boxes of the sample, scene boxes included, are drawn far to near so a nearer scene
object stays on top of a pasted one (UnifiedObjectSample with sample_2d, mixup 0.5, depth order). Points hidden
behind pasted crops are kept (as its modify_points=False).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from aqrcmt.structures import CLASS_NAMES
from aqrcmt.data.box_geometry import boxes_overlap_bev, image_boxes, points_in_boxes
from aqrcmt.data.files import DatasetError, read_pickle
from aqrcmt.data.transforms import Sample

DATABASE_FORMAT = 1
# UnifiedDataBaseSampler sample_groups of the released configs: target count per class in a training sample.
SAMPLE_GROUPS: dict[str, int] = {
    "car": 2, "truck": 3, "construction_vehicle": 7, "bus": 4, "trailer": 6,
    "barrier": 2, "motorcycle": 6, "bicycle": 6, "pedestrian": 2, "traffic_cone": 2,
}
MIN_POINTS = 5   # filter_by_min_points of the released configs (all classes)
MIXUP_RATE = 0.5    # weight of a pasted image crop


class GTPaster:
    """Tops a training sample's classes up to `sample_groups` with non-colliding objects of the database.

    database: path of a dbinfos.pkl written by :func:`aqrcmt.data.gt_database.build_gt_database`; objects
    with fewer than `min_points` points are never pasted.
    """

    def __init__(self, database: str | Path, sample_groups: Optional[dict[str, int]] = None,
                 min_points: int = MIN_POINTS) -> None:
        path = Path(database)
        if not path.is_file():
            raise FileNotFoundError(f"GT database {path} does not exist (build it with `aqrcmt build-gt-database`)")
        data = read_pickle(path, "GT database")
        if not isinstance(data, dict) or data.get("format") != DATABASE_FORMAT:
            raise DatasetError(f"GT database {path}: not a dbinfos.pkl of format {DATABASE_FORMAT} "
                             "(written by `aqrcmt build-gt-database`)")
        self.root = path.parent
        self.sample_groups = dict(SAMPLE_GROUPS if sample_groups is None else sample_groups)
        self.objects = {name: [o for o in data["objects"].get(name, []) if o["num_points"] >= min_points]
                        for name in CLASS_NAMES}

    def __call__(self, sample: Sample, rng: np.random.Generator) -> None:
        boxes, labels, chosen = self._choose(sample, rng)
        if not chosen:
            return
        keep = ~points_in_boxes(sample.points[:, :3], boxes).any(axis=1)
        pasted = [self._load_points(o["path"], box) for o, box in zip(chosen, boxes)]
        sample.points = np.concatenate([*pasted, sample.points[keep]])
        if sample.images is not None:
            self._paste_crops(sample, boxes, [o.get("image_path", "") for o in chosen])
        sample.gt_boxes = np.concatenate([sample.gt_boxes, boxes])
        sample.gt_labels = np.concatenate([sample.gt_labels, labels])

    def _paste_crops(self, sample: Sample, pasted: np.ndarray, crop_paths: list[str]) -> None:
        """Blend the crops of the pasted boxes into every camera, all boxes far to near (scene boxes too)."""
        crops = [self._load_crop(p) if p else None for p in crop_paths]
        boxes = np.concatenate([sample.gt_boxes, pasted])
        num_scene = len(sample.gt_boxes)
        for image, lidar2img in zip(sample.images, sample.lidar2img):
            xy, depth, visible = image_boxes(boxes, lidar2img, image.shape[:2])
            if not visible[num_scene:].any():
                continue
            original = image.copy()
            for i in sorted(np.flatnonzero(visible), key=lambda i: -depth[i]):
                x0, y0, x1, y1 = xy[i]
                if i < num_scene:
                    source = original[y0:y1, x0:x1]
                elif crops[i - num_scene] is not None:
                    source = cv2.resize(crops[i - num_scene], (x1 - x0, y1 - y0))
                else:
                    continue
                region = image[y0:y1, x0:x1]
                region[:] = cv2.addWeighted(region, 1 - MIXUP_RATE, source, MIXUP_RATE, 0.0)

    def _choose(self, sample: Sample, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Boxes (k, 9), labels (k,) and database entries of the objects to paste."""
        occupied = sample.gt_boxes
        boxes, labels, chosen = [], [], []
        for label, name in enumerate(CLASS_NAMES):
            candidates = self.objects[name]
            wanted = min(self.sample_groups.get(name, 0) - int((sample.gt_labels == label).sum()), len(candidates))
            if wanted <= 0:
                continue
            for pick in rng.choice(len(candidates), wanted, replace=False):
                box = np.asarray(candidates[pick]["box"], dtype=np.float64)[None]
                if boxes_overlap_bev(box, occupied).any():
                    continue
                occupied = np.concatenate([occupied, box])
                boxes.append(box[0])
                labels.append(label)
                chosen.append(candidates[pick])
        return np.array(boxes).reshape(-1, 9), np.array(labels, dtype=np.int64), chosen

    def _load_crop(self, relative_path: str) -> np.ndarray:
        crop = cv2.imread(str(self.root / relative_path), cv2.IMREAD_COLOR)
        if crop is None:
            raise FileNotFoundError(f"GT database crop {self.root / relative_path} is missing or unreadable "
                                    "(rebuild the database)")
        return crop

    def _load_points(self, relative_path: str, box: np.ndarray) -> np.ndarray:
        path = self.root / relative_path
        if not path.is_file():
            raise FileNotFoundError(f"GT database object {path} is missing (rebuild the database)")
        points = np.fromfile(path, dtype=np.float32).reshape(-1, 5)
        points[:, :3] += box[:3].astype(np.float32)
        return points
