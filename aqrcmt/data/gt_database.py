"""GT-object database and the GT-paste augmentation (the LiDAR part of CMT's UnifiedObjectSample).

``aqrcmt build-gt-database`` stores, for every kept GT box of the training split, the points inside it (key
frame + sweeps, 5 columns, xyz relative to the box's gravity centre) in ``<out>/objects/*.bin`` and the
boxes in ``<out>/dbinfos.pkl``. In training, :class:`GTPaster` tops every class up to its sample group
(car 2, truck 3, construction_vehicle 7, ...) with database objects at their recorded positions: a candidate
is kept when its BEV footprint (rotated rectangle) overlaps neither a scene box nor an earlier pasted one;
scene points inside kept boxes are removed and the objects' points added.

With cameras, the database also keeps each object's image crop (from the camera where its projected box is
largest) and the paste blends it 50/50 into the projected 2-D box of every camera that sees the object; all
boxes of the sample, scene boxes included, are drawn far to near so a nearer scene object stays on top of a
pasted one (UnifiedObjectSample with sample_2d, mixup 0.5, depth order). Differences from the released code:
the crop comes from the largest view rather than the last valid one, and points hidden behind pasted crops
are kept (as its modify_points=False).
"""
from __future__ import annotations

import argparse
import pickle
import warnings
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from aqrcmt.checkpoint.io import pickle_atomic
from aqrcmt.config import CLASS_NAMES
from aqrcmt.data.transforms import Sample

DATABASE_FORMAT = 1
# UnifiedDataBaseSampler sample_groups of the released configs: target count per class in a training sample.
SAMPLE_GROUPS: dict[str, int] = {
    "car": 2, "truck": 3, "construction_vehicle": 7, "bus": 4, "trailer": 6,
    "barrier": 2, "motorcycle": 6, "bicycle": 6, "pedestrian": 2, "traffic_cone": 2,
}
MIN_POINTS = 5   # filter_by_min_points of the released configs (all classes)
MIXUP_RATE = 0.5    # weight of a pasted image crop
MIN_CROP_SIDE = 10  # px: smaller projected boxes are not stored as crops


# --------------------------------------------------------------------------------------------------
# Box geometry
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Paste
# --------------------------------------------------------------------------------------------------
class GTPaster:
    """Tops a training sample's classes up to `sample_groups` with non-colliding objects of the database.

    database: path of a dbinfos.pkl written by :func:`build_gt_database`; objects with fewer than
    `min_points` points are never pasted.
    """

    def __init__(self, database: str | Path, sample_groups: Optional[dict[str, int]] = None,
                 min_points: int = MIN_POINTS) -> None:
        path = Path(database)
        if not path.is_file():
            raise FileNotFoundError(f"GT database {path} does not exist (build it with `aqrcmt build-gt-database`)")
        with path.open("rb") as f:
            data = pickle.load(f)
        if not isinstance(data, dict) or data.get("format") != DATABASE_FORMAT:
            raise ValueError(f"GT database {path}: not a dbinfos.pkl of format {DATABASE_FORMAT} "
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


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------
def build_gt_database(dataset, out_dir: str | Path) -> Path:
    """Write `out_dir`/objects/*.bin (+ *.png crops when the dataset loads images) and `out_dir`/dbinfos.pkl
    from every sample of `dataset` (no transforms).

    dataset: an :class:`aqrcmt.data.nuscenes_dataset.NuScenesDataset`; its on_bad_sample setting decides
    whether a bad sample stops the build or is skipped with a warning.
    """
    from aqrcmt.data.nuscenes_dataset import BadSampleError

    out_dir = Path(out_dir)
    (out_dir / "objects").mkdir(parents=True, exist_ok=True)
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
    path = out_dir / "dbinfos.pkl"
    pickle_atomic({"format": DATABASE_FORMAT, "objects": objects}, path)
    return path


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="cmt_voxel0075_vov_1600x640_cbgs",
                        help="preset name or config .json (its data.* settings: root, version, sweeps)")
    parser.add_argument("--root", default=None, help="nuScenes root (default: the config's data.root)")
    parser.add_argument("--version", default=None, help="nuScenes version (default: the config's data.version)")
    parser.add_argument("--split", default=None, help="split to read (default: the config's data.train_split)")
    parser.add_argument("--out", default=None, help="output folder (default: <root>/aqrcmt_gt_database)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from aqrcmt.config import load_config
    from aqrcmt.data.nuscenes_dataset import build_dataset

    overrides = list(args.set)
    overrides += [f"data.root={args.root}"] if args.root else []
    overrides += [f"data.version={args.version}"] if args.version else []
    cfg = load_config(args.config, overrides)   # data.load_images=false: points only, no image crops
    split = args.split or cfg.data.train_split
    out = Path(args.out or Path(cfg.data.root) / "aqrcmt_gt_database")
    path = build_gt_database(build_dataset(cfg, split, train=False), out)
    with path.open("rb") as f:
        counts = {k: len(v) for k, v in pickle.load(f)["objects"].items()}
    print(f"wrote {path}: {sum(counts.values())} objects {counts}")
    print(f"use it with: data.augment.gt_paste=true data.augment.gt_paste_database={path}")
    return 0
