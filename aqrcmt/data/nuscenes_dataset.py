"""nuScenes as a PyTorch Dataset: the sample index ("infos"), its on-disk cache, and per-sample loading.

The index is a list of info dicts with the fields of the mmdet3d / CMT converter (junjie18/CMT
``tools/data_converter/nuscenes_converter.py``), so existing ``nuscenes_infos_{train,val}.pkl`` files load unchanged, and :func:`write_info_pkl`
writes such files from a nuScenes root (``aqrcmt create-infos``). Without a pkl, the index is built with the
devkit from the official split (``nuscenes.utils.splits``) and cached under ``<root>/.aqrcmt_cache`` (or
``cfg.data.index_cache_dir``), keyed by root, version, split, sweeps and the tables' modification times.

A loaded sample (:class:`aqrcmt.data.transforms.Sample`) holds, in the key frame's LiDAR frame:
- points of the key frame and ``sweeps - 1`` previous LiDAR sweeps, (N, 5): x, y, z, intensity, time lag (s);
- the six camera images (BGR uint8), the intrinsics K4 and lidar2cam (float64);
- GT boxes (n, 9) (gravity centre, (dx, dy, dz) = (l, w, h), yaw, vx, vy) and labels, keeping boxes with
  ``num_lidar_pts > 0`` whose name maps to one of the 10 detection classes.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from pyquaternion import Quaternion
from torch.utils.data import DataLoader, Dataset

from aqrcmt.atomic import pickle_atomic
from aqrcmt.config import CAMERA_NAMES, CLASS_NAMES, Config, ConfigError, DataConfig
from aqrcmt.data.collate import collate
from aqrcmt.data.files import BadSampleError, DatasetError, read_image, read_pickle
from aqrcmt.data.corruptions import SensorCorruption
from aqrcmt.data.gt_paste import GTPaster
from aqrcmt.data.sampler import ShardedSampler
from aqrcmt.data.transforms import Pipeline, Sample

VERSIONS: tuple[str, ...] = ("v1.0-trainval", "v1.0-test", "v1.0-mini")
INDEX_FORMAT = 3            # bump when the info fields written by build_infos change
POINT_DIM = 5               # float32 values per point in a .pcd.bin: x, y, z, intensity, ring
CONVERTER_MAX_SWEEPS = 10   # sweeps per info written by `create-infos`, as the mmdet3d converter

# mmdet3d NuScenesDataset.NameMapping: nuScenes category -> detection class.
NAME_MAPPING: dict[str, str] = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}
# Fields of an info that the dataset reads: validate_infos refuses an index lacking one (not a KeyError mid-epoch).
INFO_FIELDS = ("token", "lidar_path", "sweeps", "cams", "timestamp", "lidar2ego_translation", "lidar2ego_rotation",
               "ego2global_translation", "ego2global_rotation")
SWEEP_FIELDS = ("data_path", "sensor2lidar_rotation", "sensor2lidar_translation", "timestamp")
CAMERA_FIELDS = ("data_path", "cam_intrinsic", "sensor2lidar_rotation", "sensor2lidar_translation")
GT_FIELDS = ("gt_boxes", "gt_names", "gt_velocity", "num_lidar_pts")   # all or none (test-split infos have none)


# --------------------------------------------------------------------------------------------------
# Index: devkit -> infos
# --------------------------------------------------------------------------------------------------
def open_nuscenes(root: str | Path, version: str):
    """`NuScenes(version, root)` after checking both, with errors that name what is wrong."""
    from nuscenes.nuscenes import NuScenes

    check_root(root, version)
    return NuScenes(version=version, dataroot=str(root), verbose=False)


def check_root(root: str | Path, version: str) -> None:
    """Raise a clear error when `root` or its `version` table folder is missing."""
    root = Path(root)
    if version not in VERSIONS:
        raise DatasetError(f"nuScenes version {version!r} is not one of {VERSIONS}")
    if not root.is_dir():
        raise FileNotFoundError(f"nuScenes root {root} does not exist (config field data.root)")
    if not (root / version).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.name.startswith("v1.0"))
        raise FileNotFoundError(f"nuScenes root {root} has no {version}/ table folder (found: {found})")


def scenes_of_split(version: str, split: str) -> list[str]:
    """Scene names of an official split; the split must fit the version (mini_* -> v1.0-mini, ...)."""
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    if split not in splits:
        raise DatasetError(f"unknown nuScenes split {split!r}; official splits: {sorted(splits)}")
    needed = "mini" if split.startswith("mini") else "test" if split == "test" else "trainval"
    if not version.endswith(needed):
        raise DatasetError(f"split {split!r} needs a {needed} version, got {version!r}")
    return splits[split]


def _pose(translation: Sequence[float], rotation: Sequence[float]) -> np.ndarray:
    """(4, 4) float64 from a translation (m) and a (w, x, y, z) quaternion."""
    matrix = np.eye(4)
    matrix[:3, :3] = Quaternion(rotation).rotation_matrix
    matrix[:3, 3] = translation
    return matrix


def _sensor_info(nusc, sample_data_token: str, global2lidar: np.ndarray, kind: str) -> dict[str, Any]:
    """One sweep/camera entry: path, poses, timestamp, sensor2lidar (column vectors: p_l = R p_s + t), K (cameras)."""
    record = nusc.get("sample_data", sample_data_token)
    calib = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", record["ego_pose_token"])
    sensor2global = _pose(pose["translation"], pose["rotation"]) @ _pose(calib["translation"], calib["rotation"])
    sensor2lidar = global2lidar @ sensor2global
    entry = {
        "data_path": str(nusc.get_sample_data_path(sample_data_token)),
        "type": kind,
        "sample_data_token": sample_data_token,
        "sensor2ego_translation": calib["translation"],
        "sensor2ego_rotation": calib["rotation"],
        "ego2global_translation": pose["translation"],
        "ego2global_rotation": pose["rotation"],
        "timestamp": record["timestamp"],
        "sensor2lidar_rotation": sensor2lidar[:3, :3],
        "sensor2lidar_translation": sensor2lidar[:3, 3],
    }
    if kind != "lidar":
        entry["cam_intrinsic"] = np.array(calib["camera_intrinsic"])
        entry["width"], entry["height"] = record["width"], record["height"]   # px, what the intrinsics are for
    return entry


def build_infos(nusc, scene_names: Sequence[str], max_sweeps: int, with_annotations: bool = True) -> list[dict]:
    """mmdet3d-style info dicts of every sample of the named scenes present in `nusc`, sorted by timestamp."""
    wanted = set(scene_names)
    scene_of = {s["token"]: s["name"] for s in nusc.scene if s["name"] in wanted}
    infos = []
    for sample in nusc.sample:
        if sample["scene_token"] not in scene_of:
            continue
        lidar_token = sample["data"]["LIDAR_TOP"]
        lidar_record = nusc.get("sample_data", lidar_token)
        calib = nusc.get("calibrated_sensor", lidar_record["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", lidar_record["ego_pose_token"])
        lidar2ego = _pose(calib["translation"], calib["rotation"])
        ego2global = _pose(pose["translation"], pose["rotation"])
        global2lidar = np.linalg.inv(ego2global @ lidar2ego)
        info: dict[str, Any] = {
            "lidar_path": str(nusc.get_sample_data_path(lidar_token)),
            "token": sample["token"],
            "prev": sample["prev"],
            "scene_name": scene_of[sample["scene_token"]],
            "sweeps": [],
            "cams": {cam: _sensor_info(nusc, sample["data"][cam], global2lidar, cam) for cam in CAMERA_NAMES},
            "lidar2ego_translation": calib["translation"],
            "lidar2ego_rotation": calib["rotation"],
            "ego2global_translation": pose["translation"],
            "ego2global_rotation": pose["rotation"],
            "timestamp": sample["timestamp"],
        }
        previous = lidar_record["prev"]
        while previous and len(info["sweeps"]) < max_sweeps:
            info["sweeps"].append(_sensor_info(nusc, previous, global2lidar, "lidar"))
            previous = nusc.get("sample_data", previous)["prev"]
        if with_annotations:
            info.update(_annotation_fields(nusc, sample, lidar_token, global2lidar))
        infos.append(info)
    return sorted(infos, key=lambda i: i["timestamp"])


def _annotation_fields(nusc, sample: dict, lidar_token: str, global2lidar: np.ndarray) -> dict[str, np.ndarray]:
    """gt_boxes (n, 7) centre/(l, w, h)/yaw in the LiDAR frame, gt_names, gt_velocity (n, 2), point counts."""
    annotations = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    _, boxes, _ = nusc.get_sample_data(lidar_token, selected_anntokens=sample["anns"])
    n = len(boxes)
    gt_boxes = np.zeros((n, 7))
    for i, box in enumerate(boxes):
        w, l, h = box.wlh
        gt_boxes[i] = [*box.center, l, w, h, box.orientation.yaw_pitch_roll[0]]
    velocity = np.array([nusc.box_velocity(t)[:2] for t in sample["anns"]]).reshape(n, 2)
    velocity = velocity @ global2lidar[:2, :2].T   # (vx, vy, 0) rotated into the LiDAR frame, xy kept
    return {
        "gt_boxes": gt_boxes,
        "gt_names": np.array([NAME_MAPPING.get(b.name, b.name) for b in boxes]),
        "gt_velocity": velocity,
        "num_lidar_pts": np.array([a["num_lidar_pts"] for a in annotations], dtype=np.int64),
        "num_radar_pts": np.array([a["num_radar_pts"] for a in annotations], dtype=np.int64),
        "valid_flag": np.array([a["num_lidar_pts"] + a["num_radar_pts"] > 0 for a in annotations], dtype=bool),
    }


# --------------------------------------------------------------------------------------------------
# Index files: info pkl (mmdet3d format) and the cache
# --------------------------------------------------------------------------------------------------
def _write_pickle(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pickle_atomic(obj, path)


def write_info_pkl(root: str | Path, version: str, split: str, path: str | Path,
                   max_sweeps: int = CONVERTER_MAX_SWEEPS) -> Path:
    """Write ``{'infos': [...], 'metadata': {'version': ...}}`` for `split`, as mmdet3d's create_data.py does."""
    nusc = open_nuscenes(root, version)
    infos = build_infos(nusc, scenes_of_split(version, split), max_sweeps, with_annotations=split != "test")
    path = Path(path)
    _write_pickle({"infos": infos, "metadata": {"version": version}}, path)
    return path


def load_info_pkl(path: str | Path) -> list[dict]:
    """Infos of an mmdet3d/CMT ``nuscenes_infos_*.pkl`` (or one written by write_info_pkl), sorted by timestamp.

    Every info is checked by :func:`validate_infos`; an unreadable file or a missing field raises DatasetError.
    """
    path = Path(path)
    data = read_pickle(path, "info pkl")
    if not isinstance(data, dict) or not isinstance(data.get("infos"), list):
        raise DatasetError(f"info pkl {path}: expected a dict with an 'infos' list (mmdet3d format)")
    validate_infos(data["infos"], f"info pkl {path}")
    return sorted(data["infos"], key=lambda i: i["timestamp"])


def validate_infos(infos: list, source: str) -> None:
    """Raise DatasetError naming `source`, the info's index and sample token and the field when an info lacks a
    field the dataset reads (INFO_FIELDS, each sweep's SWEEP_FIELDS, each camera's CAMERA_FIELDS) or its GT
    arrays (GT_FIELDS) are incomplete or of different lengths."""
    for index, info in enumerate(infos):
        if not isinstance(info, dict):
            raise DatasetError(f"{source}: info {index} is a {type(info).__name__}, not a dict")
        where = f"{source}: info {index} (sample {info.get('token', '?')})"
        _require(info, INFO_FIELDS, where, "")
        if not isinstance(info["sweeps"], list) or not isinstance(info["cams"], dict):
            raise DatasetError(f"{where}: 'sweeps' must be a list and 'cams' a dict")
        for i, sweep in enumerate(info["sweeps"]):
            _require(sweep, SWEEP_FIELDS, where, f"sweeps[{i}].")
        for camera in CAMERA_NAMES:
            if camera not in info["cams"]:
                raise DatasetError(f"{where} lacks the field 'cams.{camera}'")
            _require(info["cams"][camera], CAMERA_FIELDS, where, f"cams.{camera}.")
        if any(name in info for name in GT_FIELDS):
            _require(info, GT_FIELDS, where, "")
            lengths = {name: len(np.atleast_1d(info[name])) for name in GT_FIELDS}
            if len(set(lengths.values())) > 1:
                raise DatasetError(f"{where}: the GT fields have different lengths {lengths}")


def _require(record: Any, fields: Sequence[str], where: str, prefix: str) -> None:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: '{prefix.rstrip('.')}' is a {type(record).__name__}, not a dict")
    for name in fields:
        if name not in record:
            raise DatasetError(f"{where} lacks the field '{prefix}{name}'")


def index_cache_path(cache_dir: Path, root: Path, version: str, split: str, sweeps: int) -> Path:
    """The cache file of (root, version, split, sweeps); the tables' mtimes/sizes invalidate it."""
    tables = sorted((root / version).glob("*.json"))
    stamp = [(t.name, t.stat().st_mtime_ns, t.stat().st_size) for t in tables]
    key = json.dumps([INDEX_FORMAT, str(root.resolve()), version, split, sweeps, stamp])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"infos_{version}_{split}_sweeps{sweeps}_{digest}.pkl"


def load_or_build_infos(root: str | Path, version: str, split: str, sweeps: int,
                        cache_dir: Optional[str | Path] = None) -> tuple[list[dict], Path]:
    """Infos of `split` from the cache, or built with the devkit and cached (atomic write). Returns (infos, cache path).

    An unwritable cache folder only costs the speed-up (a warning says so).
    """
    root = Path(root)
    scene_names = scenes_of_split(version, split)
    check_root(root, version)
    cache = index_cache_path(Path(cache_dir) if cache_dir else root / ".aqrcmt_cache", root, version, split, sweeps)
    if cache.is_file():
        try:
            infos = read_pickle(cache, "nuScenes index cache")
            validate_infos(infos if isinstance(infos, list) else [None], f"nuScenes index cache {cache}")
            return infos, cache
        except DatasetError as e:
            warnings.warn(f"rebuilding the nuScenes index: {e}")
    infos = build_infos(open_nuscenes(root, version), scene_names, max(sweeps - 1, 0),
                        with_annotations=split != "test")
    try:
        _write_pickle(infos, cache)
    except OSError as e:
        warnings.warn(f"could not write the nuScenes index cache {cache}: {e}")
    return infos, cache


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------
def resolve_path(path: str, root: Path) -> Path:
    """A file named in an info, under `root`: the part from 'samples/' or 'sweeps/' on is kept (portable pkls)."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("samples", "sweeps"):
            return root.joinpath(*parts[i:])
    return Path(path) if Path(path).is_absolute() else root / path


class NuScenesDataset(Dataset):
    """Samples of one split: ``dataset[i]`` is the i-th info loaded and passed through `pipeline`.

    infos: index entries (see the module docstring); root: the nuScenes root that holds samples/ and sweeps/;
    sweeps: LiDAR frames per sample including the key frame; load_images: False gives images=None;
    train: training checks (a sample needs boxes); on_bad_sample: "error" raises BadSampleError naming the
    file and sample, "skip" warns, counts the sample in `num_skipped` (per worker process) and serves the
    next usable index instead (so an evaluation run would then miss the skipped sample's token);
    gt_paste_until_epoch: > 0 switches the pipeline's GT paste off from that epoch on (see :meth:`set_epoch`);
    corruption: a sensor corruption applied to every loaded sample before the pipeline (see
    :meth:`set_corruption` and :mod:`aqrcmt.data.corruptions`).
    """

    def __init__(self, infos: list[dict], root: str | Path, pipeline: Pipeline, *, sweeps: int = 10,
                 load_images: bool = True, train: bool = False, on_bad_sample: str = "error",
                 gt_paste_until_epoch: int = 0, corruption: Optional[SensorCorruption] = None) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if not infos:
            raise DatasetError(f"no samples in the index of nuScenes root {root}")
        self.infos = infos
        self.root = Path(root)
        self.pipeline = pipeline
        self.sweeps = sweeps
        self.load_images = load_images
        self.train = train
        self.on_bad_sample = on_bad_sample
        self.num_skipped = 0
        self.gt_paste_until_epoch = gt_paste_until_epoch
        self._paste = pipeline.paste
        self.epoch = 0
        self.corruption = corruption
        self._index_of_token = {info["token"]: i for i, info in enumerate(infos)}

    def set_epoch(self, epoch: int) -> None:
        """Samples served from now on belong to `epoch` (0-based): GT paste is off from
        ``gt_paste_until_epoch`` on (the released "15e+5e" recipe: the last 5 of 20 epochs without it).

        Call before iterating: DataLoader workers copy the dataset when an epoch's iteration starts.
        """
        self.epoch = epoch
        fade = self.gt_paste_until_epoch > 0 and epoch >= self.gt_paste_until_epoch
        self.pipeline.paste = None if fade else self._paste

    def set_corruption(self, corruption: Optional[SensorCorruption]) -> None:
        """Serve samples with `corruption` applied from now on (None: clean). Call before iterating, as set_epoch."""
        self.corruption = corruption

    def __len__(self) -> int:
        return len(self.infos)

    def class_sets(self) -> list[set[int]]:
        """Per sample, the class indices among its kept GT boxes (for class-balanced sampling)."""
        return [set(self._gt(info)[1].tolist()) for info in self.infos]

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))   # per-worker torch seed -> numpy
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            try:
                sample = self.load_sample(current, self.corruption)
            except BadSampleError as e:
                if self.on_bad_sample == "error":
                    raise
                self.num_skipped += 1
                warnings.warn(f"skipping a bad sample ({self.num_skipped} so far in this process): {e}")
                continue
            sample = self.pipeline(sample, rng)
            if self.train and len(sample.gt_boxes) == 0:
                continue   # the augmentations moved every box out of range: next sample (mmdet3d filter_empty_gt)
            return sample
        raise BadSampleError(f"no usable sample in the whole dataset (nuScenes root {self.root})")

    # ------------------------------------------------------------------------------------------------
    def load_sample(self, index: int, corruption: Optional[SensorCorruption] = None) -> Sample:
        """The index-th sample before any transform (points of all sweeps, images, GT), or BadSampleError.

        corruption: applied to the loaded sample; a temporal misalignment loads its sensor from the key frame
        ``corruption.delay(sensor)`` frames earlier in the scene (GT, poses and calibration stay this sample's).
        """
        info = self.infos[index]
        token = info["token"]
        lidar2ego = _pose(info["lidar2ego_translation"], info["lidar2ego_rotation"])
        ego2global = _pose(info["ego2global_translation"], info["ego2global_rotation"])
        boxes, labels = self._gt(info)
        if self.train and len(boxes) == 0:
            raise BadSampleError(f"sample {token}: no GT box with LiDAR points of the {len(CLASS_NAMES)} classes "
                                 f"(lidar file {info['lidar_path']})")
        lidar_info, camera_info = info, info
        if corruption is not None:
            lidar_info = self.infos[self.earlier_index(index, corruption.delay("lidar"))]
            camera_info = self.infos[self.earlier_index(index, corruption.delay("camera"))]
        sample = Sample(token=token, points=self.load_points(lidar_info), gt_boxes=boxes, gt_labels=labels,
                        lidar2global=ego2global @ lidar2ego, timestamp=info["timestamp"] / 1e6,
                        scene_name=info.get("scene_name", ""))
        if self.load_images:
            sample.images, sample.intrinsics, sample.lidar2cam = self.load_cameras(info, camera_info)
        if corruption is not None:
            sample = corruption(sample, _DatasetFrames(self, lidar_info))
        return sample

    def _gt(self, info: dict) -> tuple[np.ndarray, np.ndarray]:
        """Kept GT: (n, 9) float64 boxes and (n,) int64 labels; NaN velocities become 0 (as mmdet3d)."""
        if "gt_boxes" not in info:
            return np.zeros((0, 9)), np.zeros(0, dtype=np.int64)
        names = np.asarray(info["gt_names"])
        keep = (np.asarray(info["num_lidar_pts"]) > 0) & np.isin(names, CLASS_NAMES)
        velocity = np.nan_to_num(np.asarray(info["gt_velocity"], dtype=np.float64).reshape(-1, 2), nan=0.0)
        boxes = np.concatenate([np.asarray(info["gt_boxes"], dtype=np.float64).reshape(-1, 7), velocity], axis=1)
        labels = np.array([CLASS_NAMES.index(n) for n in names[keep]], dtype=np.int64)
        return boxes[keep], labels

    def _read_points(self, path: Path, token: str) -> np.ndarray:
        """(N, 5) float32 of a .pcd.bin as stored: x, y, z, intensity, ring."""
        if not path.is_file():
            raise BadSampleError(f"sample {token}: LiDAR file {path} does not exist")
        size = path.stat().st_size
        if size % (4 * POINT_DIM):
            raise BadSampleError(f"sample {token}: LiDAR file {path} is truncated ({size} bytes is not a multiple "
                                 f"of {4 * POINT_DIM}, i.e. {POINT_DIM} float32 per point)")
        points = np.fromfile(path, dtype=np.float32).reshape(-1, POINT_DIM)
        if len(points) == 0:
            raise BadSampleError(f"sample {token}: LiDAR file {path} holds no points")
        if not np.isfinite(points).all():
            raise BadSampleError(f"sample {token}: LiDAR file {path} holds NaN or infinite values")
        return points

    def _raw_frames(self, info: dict) -> list[tuple[np.ndarray, Optional[dict]]]:
        """The key frame's and up to `sweeps - 1` sweeps' raw points, each with its sweep entry (None: key frame)."""
        frames = [(self._read_points(resolve_path(info["lidar_path"], self.root), info["token"]), None)]
        for sweep in info["sweeps"][: self.sweeps - 1]:
            frames.append((self._read_points(resolve_path(sweep["data_path"], self.root), info["token"]), sweep))
        return frames

    def load_points(self, info: dict) -> np.ndarray:
        """Key frame (time lag 0) + up to `sweeps - 1` previous sweeps moved into the key frame's LiDAR frame."""
        frames = []
        for points, sweep in self._raw_frames(info):
            if sweep is None:
                points[:, 4] = 0.0
            else:
                rotation = np.asarray(sweep["sensor2lidar_rotation"])
                points[:, :3] = points[:, :3] @ rotation.T.astype(np.float32) + \
                    np.asarray(sweep["sensor2lidar_translation"], dtype=np.float32)
                points[:, 4] = (info["timestamp"] - sweep["timestamp"]) / 1e6
            frames.append(points)
        return np.concatenate(frames)

    def load_rings(self, info: dict) -> np.ndarray:
        """(N,) int64 ring (beam) index of every point :meth:`load_points` returns, in the same order (column 4 of
        the raw files, which load_points replaces by the time lag)."""
        return np.concatenate([points[:, 4] for points, _ in self._raw_frames(info)]).astype(np.int64)

    def earlier_index(self, index: int, key_frames: int) -> int:
        """The index of the sample `key_frames` key frames before sample `index` in its scene (following the
        infos' 'prev' tokens), or of the scene's first sample if it starts later."""
        for _ in range(key_frames):
            info = self.infos[index]
            if "prev" not in info:
                raise BadSampleError(f"sample {info['token']}: the index has no 'prev' token (an mmdet3d info pkl?); "
                                     "earlier frames need an index written by aqrcmt (create-infos or the devkit "
                                     "index cache)")
            if not info["prev"]:
                break
            if info["prev"] not in self._index_of_token:
                raise BadSampleError(f"sample {info['token']}: its previous sample {info['prev']} is not in this "
                                     "split's index")
            index = self._index_of_token[info["prev"]]
        return index

    def load_cameras(self, info: dict,
                     image_info: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The six views (6, H, W, 3) uint8 BGR (decoded strictly, each checked against the width/height its info
        records), intrinsics K4 (6, 4, 4) and lidar2cam (6, 4, 4) of an info; the images from `image_info` instead
        when given (a delayed camera: an earlier frame's images)."""
        image_info = info if image_info is None else image_info
        images, intrinsics, lidar2cam = [], np.tile(np.eye(4), (6, 1, 1)), np.zeros((6, 4, 4))
        paths = []
        for i, name in enumerate(CAMERA_NAMES):
            if name not in info["cams"]:
                raise BadSampleError(f"sample {info['token']}: the index has no camera {name}")
            cam = info["cams"][name]
            path = resolve_path(image_info["cams"][name]["data_path"], self.root)
            image = read_image(path, f"sample {info['token']}: {name} image")
            recorded = (image_info["cams"][name].get("width"), image_info["cams"][name].get("height"))
            if None not in recorded and (image.shape[1], image.shape[0]) != recorded:
                raise BadSampleError(f"sample {info['token']}: {name} image {path} is {image.shape[1]}x"
                                     f"{image.shape[0]} px, the index records {recorded[0]}x{recorded[1]} (the "
                                     f"size its intrinsics are for)")
            images.append(image)
            paths.append(path)
            intrinsics[i, :3, :3] = cam["cam_intrinsic"]
            rotation = np.asarray(cam["sensor2lidar_rotation"])   # lidar2cam = [[R^T, -R^T t], [0, 1]]
            lidar2cam[i, :3, :3] = rotation.T
            lidar2cam[i, :3, 3] = -rotation.T @ np.asarray(cam["sensor2lidar_translation"])
            lidar2cam[i, 3, 3] = 1.0
        _check_same_size(images, paths, info["token"])
        return np.stack(images), intrinsics, lidar2cam


class _DatasetFrames:
    """The :class:`aqrcmt.data.corruptions.FrameSource` of the LiDAR frames of `info` (read on demand)."""

    def __init__(self, dataset: NuScenesDataset, info: dict) -> None:
        self.dataset, self.info = dataset, info

    def rings(self) -> np.ndarray:
        return self.dataset.load_rings(self.info)




def _check_same_size(images: list[np.ndarray], paths: list[Path], token: str) -> None:
    """BadSampleError naming the cameras whose image size differs from the size most of the six share."""
    sizes = [image.shape[:2] for image in images]
    common = max(set(sizes), key=sizes.count)
    odd = [f"{name} image {path} is {size[1]}x{size[0]} px" for name, path, size in zip(CAMERA_NAMES, paths, sizes)
           if size != common]
    if odd:
        raise BadSampleError(f"sample {token}: {'; '.join(odd)}, the other cameras' are {common[1]}x{common[0]} px; "
                             f"the six views must share one size")


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------
def _split_infos(data: DataConfig, split: str) -> list[dict]:
    pkl = data.info_pkl_train if split == data.train_split else data.info_pkl_val if split == data.val_split \
        else None
    if pkl:
        return load_info_pkl(pkl)
    return load_or_build_infos(data.root, data.version, split, data.sweeps, data.index_cache_dir)[0]


def build_dataset(cfg: Config, split: str, train: bool) -> NuScenesDataset:
    """The dataset of `split` (an official split name, or cfg.data.train_split/val_split with an info pkl).

    Training applies cfg.data.augment (GT paste when augment.gt_paste, from augment.gt_paste_database).
    Images are produced at cfg.model.camera.image_size; points are cut to the model's voxel range.
    """
    data = cfg.data
    paste = None
    if train and data.augment.enabled and data.augment.gt_paste:
        if not data.augment.gt_paste_database:
            raise ConfigError("data.augment.gt_paste needs data.augment.gt_paste_database (a dbinfos.pkl written "
                             "by `aqrcmt build-gt-database`)")
        paste = GTPaster(data.augment.gt_paste_database)
    pipeline = Pipeline(data.augment, cfg.model.lidar.voxel.point_cloud_range, cfg.model.camera.image_size,
                        train=train, paste=paste)
    return NuScenesDataset(_split_infos(data, split), data.root, pipeline, sweeps=data.sweeps,
                           load_images=data.load_images, train=train, on_bad_sample=data.on_bad_sample,
                           gt_paste_until_epoch=data.augment.gt_paste_until_epoch)


class EpochDataLoader(DataLoader):
    """A DataLoader whose :meth:`set_epoch` pins everything an epoch's batches depend on.

    seed, process_index: of the run and of this process (they seed the worker generator per epoch).
    """

    def __init__(self, *args: Any, seed: int, process_index: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.process_index = process_index

    def set_epoch(self, epoch: int) -> None:
        """The sampler's order, the dataset's epoch (GT paste fade-out) and the worker seeds of `epoch`.

        They depend only on (seed, epoch, process), so a resumed run sees the same batches as an
        uninterrupted one.
        """
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        self.generator.manual_seed(int(np.random.SeedSequence([self.seed, self.process_index, epoch])
                                       .generate_state(1)[0]))


def build_dataloader(cfg: Config, split: str, train: bool, *, num_processes: int = 1, process_index: int = 0,
                     seed: int = 0) -> EpochDataLoader:
    """A DataLoader of Batches for this process's shard of `split`.

    Training: shuffled every epoch (CBGS resampling when cfg.data.cbgs), shards padded to equal length.
    Evaluation: in index order, process p gets samples p, p + P, ... (shards may differ by one sample).
    The sampler advances its epoch on every pass; ``loader.set_epoch(e)`` pins it (and the dataset's epoch
    and the worker seeds).
    """
    dataset = build_dataset(cfg, split, train)
    sampler = ShardedSampler(len(dataset), shuffle=train, class_sets=dataset.class_sets() if train and cfg.data.cbgs
                             else None, num_processes=num_processes, process_index=process_index, seed=seed,
                             pad=train)
    generator = torch.Generator().manual_seed(seed * 1000 + process_index)   # worker seeds -> augmentation draws
    return EpochDataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate,
                           num_workers=cfg.data.num_workers, drop_last=train, persistent_workers=False,
                           pin_memory=cfg.data.pin_memory and torch.cuda.is_available(), generator=generator,
                           seed=seed, process_index=process_index)
