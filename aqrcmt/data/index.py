"""The nuScenes sample index ("infos"): built with the devkit, read from and written to info pkls, cached, validated.

The index is a list of info dicts with the fields of the mmdet3d / CMT converter (junjie18/CMT
``tools/data_converter/nuscenes_converter.py``), so existing ``nuscenes_infos_{train,val}.pkl`` files load
unchanged, and :func:`write_info_pkl` writes such files from a nuScenes root (``aqrcmt create-infos``). Without a
pkl, the index is built with the devkit from the split's scenes (:mod:`aqrcmt.data.splits`: official or custom)
and cached under ``<root>/.aqrcmt_cache`` (or ``cfg.data.index_cache_dir``), keyed by root, version, split,
sweeps and the tables' modification times.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pyquaternion import Quaternion

from aqrcmt.atomic import pickle_atomic
from aqrcmt.structures import CAMERA_NAMES
from aqrcmt.data.files import DatasetError, read_pickle
from aqrcmt.data.splits import TEST_VERSION, check_root, open_nuscenes, scenes_of_split, table_stamp

INDEX_FORMAT = 3            # bump when the info fields written by build_infos change
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
def pose_matrix(translation: Sequence[float], rotation: Sequence[float]) -> np.ndarray:
    """(4, 4) float64 from a translation (m) and a (w, x, y, z) quaternion."""
    matrix = np.eye(4)
    matrix[:3, :3] = Quaternion(rotation).rotation_matrix
    matrix[:3, 3] = translation
    return matrix


def check_numbers(value: Any, shape: tuple[int, ...], where: str, field: str, positive: bool = False) -> np.ndarray:
    """`value` as float64 of `shape`, finite (and > 0 with `positive`), else DatasetError naming `where` and `field`.
    A rotation quaternion (shape (4,)) must not be zero; a (3, 3) camera intrinsic matrix must be invertible."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.full(shape, np.nan)
    problem = None
    if array.shape != shape:
        problem = f"has shape {array.shape}, expected {shape}"
    elif not np.isfinite(array).all():
        problem = "is not finite"
    elif positive and not (array > 0).all():
        problem = "must be > 0"
    elif shape == (4,) and not np.linalg.norm(array) > 0:
        problem = "is a zero quaternion"
    elif shape == (3, 3) and abs(np.linalg.det(array)) < 1e-12:
        problem = "is singular"
    if problem is not None:
        raise DatasetError(f"{where}: field '{field}' = {np.asarray(value).tolist()} {problem}")
    return array


def _check_pose(record: dict, where: str) -> None:
    check_numbers(record["translation"], (3,), where, "translation")
    check_numbers(record["rotation"], (4,), where, "rotation")


def _checked_calibration_and_pose(nusc, sample_data: dict, where: str) -> tuple[dict, dict]:
    """The calibrated_sensor and ego_pose records of a sample_data record, checked (``where`` names it)."""
    calib = nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sample_data["ego_pose_token"])
    _check_pose(calib, f"{where}: calibrated_sensor {calib['token']}")
    _check_pose(pose, f"{where}: ego_pose {pose['token']}")
    return calib, pose


def _sensor_info(nusc, sample_data_token: str, global2lidar: np.ndarray, kind: str) -> dict[str, Any]:
    """One sweep/camera entry: path, poses, timestamp, sensor2lidar (column vectors: p_l = R p_s + t), K (cameras)."""
    record = nusc.get("sample_data", sample_data_token)
    where = f"sample_data {sample_data_token} ({kind})"
    calib, pose = _checked_calibration_and_pose(nusc, record, where)
    if kind != "lidar":
        check_numbers(calib["camera_intrinsic"], (3, 3), f"{where}: calibrated_sensor {calib['token']}",
                      "camera_intrinsic")
    sensor2ego = pose_matrix(calib["translation"], calib["rotation"])
    sensor2global = pose_matrix(pose["translation"], pose["rotation"]) @ sensor2ego
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
    """mmdet3d-style info dicts of every sample of the named scenes present in `nusc`, sorted by timestamp
    (each one :func:`sample_info`)."""
    wanted = set(scene_names)
    scene_of = {s["token"]: s["name"] for s in nusc.scene if s["name"] in wanted}
    infos = [sample_info(nusc, sample, max_sweeps, with_annotations, scene_of[sample["scene_token"]])
             for sample in nusc.sample if sample["scene_token"] in scene_of]
    return sorted(infos, key=lambda i: i["timestamp"])


def sample_info(nusc, sample: dict, max_sweeps: int, with_annotations: bool = True, scene_name: str = "") -> dict:
    """The mmdet3d-style info of one devkit `sample` record: its LiDAR file, up to `max_sweeps` previous sweeps
    and the six cameras, each with the calibrated_sensor and ego_pose records composed into sensor -> key-frame
    LiDAR (``sensor2lidar_rotation`` / ``_translation``), the key frame's poses and (with annotations) its GT.

    The records read are checked first (:func:`check_numbers`): poses and calibrations finite, camera
    intrinsics invertible, annotations with finite poses and sizes > 0; DatasetError names sample, record, field.
    """
    lidar_token = sample["data"]["LIDAR_TOP"]
    lidar_record = nusc.get("sample_data", lidar_token)
    where = f"sample {sample['token']}: sample_data {lidar_token} (LIDAR_TOP)"
    calib, pose = _checked_calibration_and_pose(nusc, lidar_record, where)
    lidar2ego = pose_matrix(calib["translation"], calib["rotation"])
    ego2global = pose_matrix(pose["translation"], pose["rotation"])
    global2lidar = np.linalg.inv(ego2global @ lidar2ego)
    info: dict[str, Any] = {
        "lidar_path": str(nusc.get_sample_data_path(lidar_token)),
        "token": sample["token"],
        "prev": sample["prev"],
        "scene_name": scene_name,
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
    return info


def _annotation_fields(nusc, sample: dict, lidar_token: str, global2lidar: np.ndarray) -> dict[str, np.ndarray]:
    """gt_boxes (n, 7) centre/(l, w, h)/yaw in the LiDAR frame, gt_names, gt_velocity (n, 2), point counts."""
    annotations = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    for annotation in annotations:
        where = f"sample {sample['token']}: sample_annotation {annotation['token']}"
        _check_pose(annotation, where)
        check_numbers(annotation["size"], (3,), where, "size", positive=True)
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
    infos = build_infos(nusc, scenes_of_split(root, version, split), max_sweeps,
                        with_annotations=version != TEST_VERSION)
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
            cam = info["cams"][camera]
            _require(cam, CAMERA_FIELDS, where, f"cams.{camera}.")
            check_numbers(cam["cam_intrinsic"], (3, 3), where, f"cams.{camera}.cam_intrinsic")
            check_numbers(cam["sensor2lidar_rotation"], (3, 3), where, f"cams.{camera}.sensor2lidar_rotation")
            check_numbers(cam["sensor2lidar_translation"], (3,), where, f"cams.{camera}.sensor2lidar_translation")
        for name in ("lidar2ego", "ego2global"):
            check_numbers(info[f"{name}_translation"], (3,), where, f"{name}_translation")
            check_numbers(info[f"{name}_rotation"], (4,), where, f"{name}_rotation")
        if any(name in info for name in GT_FIELDS):
            _require(info, GT_FIELDS, where, "")
            lengths = {name: len(np.atleast_1d(info[name])) for name in GT_FIELDS}
            if len(set(lengths.values())) > 1:
                raise DatasetError(f"{where}: the GT fields have different lengths {lengths}")
            boxes = np.asarray(info["gt_boxes"], dtype=np.float64).reshape(-1, 7)
            bad = ~np.isfinite(boxes).all(axis=1) | ~(boxes[:, 3:6] > 0).all(axis=1)
            if bad.any():
                i = int(np.argmax(bad))
                raise DatasetError(f"{where}: field 'gt_boxes[{i}]' = {boxes[i].tolist()} needs finite values and a "
                                   f"size (l, w, h) > 0")


def _require(record: Any, fields: Sequence[str], where: str, prefix: str) -> None:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: '{prefix.rstrip('.')}' is a {type(record).__name__}, not a dict")
    for name in fields:
        if name not in record:
            raise DatasetError(f"{where} lacks the field '{prefix}{name}'")


def index_cache_path(cache_dir: Path, root: Path, version: str, split: str, sweeps: int) -> Path:
    """The cache file of (root, version, split, sweeps); the tables' mtimes/sizes invalidate it."""
    key = json.dumps([INDEX_FORMAT, str(root.resolve()), version, split, sweeps, table_stamp(root, version)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"infos_{version}_{split}_sweeps{sweeps}_{digest}.pkl"


def load_or_build_infos(root: str | Path, version: str, split: str, sweeps: int,
                        cache_dir: Optional[str | Path] = None) -> tuple[list[dict], Path]:
    """Infos of `split` from the cache, or built with the devkit and cached (atomic write). Returns (infos, cache path).

    An unwritable cache folder only costs the speed-up (a warning says so).
    """
    root = Path(root)
    check_root(root, version)
    scene_names = scenes_of_split(root, version, split)
    cache = index_cache_path(Path(cache_dir) if cache_dir else root / ".aqrcmt_cache", root, version, split, sweeps)
    if cache.is_file():
        try:
            infos = read_pickle(cache, "nuScenes index cache")
            validate_infos(infos if isinstance(infos, list) else [None], f"nuScenes index cache {cache}")
            return infos, cache
        except DatasetError as e:
            warnings.warn(f"rebuilding the nuScenes index: {e}")
    infos = build_infos(open_nuscenes(root, version), scene_names, max(sweeps - 1, 0),
                        with_annotations=version != TEST_VERSION)
    try:
        _write_pickle(infos, cache)
    except OSError as e:
        warnings.warn(f"could not write the nuScenes index cache {cache}: {e}")
    return infos, cache
