"""The devkit's tables and the sensor files: one synthetic nuScenes root from the world, LiDAR and cameras.

``make_synthetic_nuscenes(out)`` writes ``out/<version>/*.json`` (the 13 tables of the devkit's schema,
nutonomy/nuscenes-devkit ``docs/schema_nuscenes.md``), ``out/maps/*.png``, LIDAR_TOP key frames (``samples/``)
and sweeps (``sweeps/``) as ``.pcd.bin`` (float32 x, y, z, intensity, ring in the sensor frame) and six camera
JPEGs per sample. Key frames every 0.5 s, 9 sweeps between them (20 Hz), also before the first key frame.
``num_lidar_pts`` is the real count of key-frame points in each annotated box, ``visibility_token`` the share of
the rays reaching the object that it is the first to return (levels 1-4), and ``scene.description`` names the
scene's conditions the way nuScenes does ("night", "rain", "fog").
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from pyquaternion import Quaternion

from aqrcmt.atomic import staged_directory
from aqrcmt.data.box_geometry import points_in_boxes
from aqrcmt.data.splits import TRAIN_VAL_SPLITS
from aqrcmt.data.synthetic.camera import render_image
from aqrcmt.data.synthetic.lidar import scan
from aqrcmt.data.synthetic.world import (CAMERA_RIG, CENTRE_PX, FOCAL_PX, FULL_IMAGE_SIZE, LIDAR_TRANSLATION,
                                         LIDAR_YAW, ConditionShares, SceneObject, draw_ego,
                                         instance_counts, place_objects, rot_z, transform)
from aqrcmt.structures import CAMERA_NAMES

DEFAULT_IMAGE_SIZE: tuple[int, int] = (400, 225)
KEYFRAME_INTERVAL_US = 500_000
SWEEPS_PER_INTERVAL = 9                            # LiDAR sweeps between two key frames (20 Hz)

# The 23 nuScenes object categories (names must be the real ones: the devkit maps them to detection classes).
_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("human.pedestrian.adult", "Adult walking, standing or sitting."),
    ("human.pedestrian.child", "Child below about 1.5 m."),
    ("human.pedestrian.wheelchair", "Person in a wheelchair."),
    ("human.pedestrian.stroller", "Stroller, with or without a child."),
    ("human.pedestrian.personal_mobility", "Scooter, skateboard, segway and similar."),
    ("human.pedestrian.police_officer", "Police officer."),
    ("human.pedestrian.construction_worker", "Person working at a construction site."),
    ("animal", "Any animal."),
    ("vehicle.car", "Passenger car, van, pick-up."),
    ("vehicle.motorcycle", "Motorcycle or scooter with engine."),
    ("vehicle.bicycle", "Human-powered bicycle."),
    ("vehicle.bus.bendy", "Articulated bus."),
    ("vehicle.bus.rigid", "Rigid bus."),
    ("vehicle.truck", "Vehicle for transporting goods."),
    ("vehicle.construction", "Construction machinery."),
    ("vehicle.emergency.ambulance", "Ambulance."),
    ("vehicle.emergency.police", "Police vehicle."),
    ("vehicle.trailer", "Trailer, towed or parked."),
    ("movable_object.barrier", "Temporary road barrier."),
    ("movable_object.trafficcone", "Traffic cone."),
    ("movable_object.pushable_pullable", "Cart, bin or dolly moved by hand."),
    ("movable_object.debris", "Debris on the road."),
    ("static_object.bicycle_rack", "Rack for parking bicycles."),
)
_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.stopped", "Vehicle with a driver, not moving."),
    ("vehicle.parked", "Vehicle without a driver, not moving."),
    ("cycle.with_rider", "Bicycle or motorcycle with a rider."),
    ("cycle.without_rider", "Bicycle or motorcycle without a rider."),
    ("pedestrian.moving", "Pedestrian walking or running."),
    ("pedestrian.standing", "Pedestrian standing."),
    ("pedestrian.sitting_lying_down", "Pedestrian sitting or lying down."),
)
_VISIBILITY: tuple[tuple[str, str], ...] = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))


def _quat_z(yaw: float) -> list[float]:
    """(w, x, y, z) quaternion of a rotation by `yaw` about +z."""
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def _camera_to_ego_rotation(yaw: float) -> np.ndarray:
    """Rotation camera frame (x right, y down, z forward) -> ego frame for a level camera looking along `yaw`."""
    forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    return np.stack([right, down, forward], axis=1)


def _token(*parts: object) -> str:
    """A deterministic 32-hex-digit token for a record named by `parts`."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def _visibility_level(fraction: float) -> str:
    """nuScenes visibility token ('1' = 0-40 %, '2' = 40-60 %, '3' = 60-80 %, '4' = 80-100 %) of a fraction."""
    return "1" if fraction < 0.4 else "2" if fraction < 0.6 else "3" if fraction < 0.8 else "4"


def scene_parts(objects: list[SceneObject], t: float) -> tuple[np.ndarray, np.ndarray]:
    """(P, 7) part boxes of all objects at time t (s) and (P,) the index of each part's object."""
    boxes = [obj.part_boxes(t) for obj in objects]
    if not boxes:
        return np.zeros((0, 7)), np.zeros(0, dtype=np.int64)
    return np.concatenate(boxes), np.concatenate([np.full(len(b), k) for k, b in enumerate(boxes)])


def _scene_names(version: str, scenes: int) -> list[tuple[str, str]]:
    """(scene name, split) pairs borrowed from the devkit's split lists so the predefined splits accept them:
    a third of the scenes (at least one, at most the val split's size) for val, the rest for train."""
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    train_split, val_split = TRAIN_VAL_SPLITS[version]   # whose scene names we borrow
    num_val = min(max(1, scenes // 3), len(splits[val_split]))
    num_train = scenes - num_val
    names = []
    for split, count in ((train_split, num_train), (val_split, num_val)):
        available = splits[split]
        if count > len(available):
            raise ValueError(f"{version} has only {len(splits[train_split]) + len(splits[val_split])} scene names "
                             f"in {train_split} + {val_split}; asked for {scenes} scenes")
        names += [(name, split) for name in available[:count]]
    return names


def make_synthetic_nuscenes(out: str | Path, version: str = "v1.0-mini", scenes: int = 3,
                            samples_per_scene: int = 6, seed: int = 0,
                            image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, overwrite: bool = False,
                            conditions: ConditionShares = ConditionShares()) -> Path:
    """Write a synthetic nuScenes to `out` and return its root.

    The root is written in a folder beside `out` and renamed to `out` at the end, so a failure leaves nothing
    half-written. An existing non-empty `out` is refused (FileExistsError) unless `overwrite`: then it is replaced
    once the new root is complete.

    version: "v1.0-mini" (scenes from mini_train / mini_val) or "v1.0-trainval" (train / val).
    scenes: total number of scenes; a third of them (at least one) go to the validation split (v1.0-mini
        has 8 + 2 scene names, so at most 10 scenes there).
    samples_per_scene: key frames per scene (>= 2 so that every instance has linked annotations).
    image_size: (W, H) of the camera images; intrinsics are scaled from 1600x900.
    conditions: the share of night, rain and fog scenes (drawn per scene; the first scene of each split is clear).
    """
    if version not in TRAIN_VAL_SPLITS:
        raise ValueError(f"version {version!r} is not supported; choose one of {sorted(TRAIN_VAL_SPLITS)}")
    if scenes < 2:
        raise ValueError(f"scenes must be >= 2 (one train and one val scene), got {scenes}")
    if samples_per_scene < 2:
        raise ValueError(f"samples_per_scene must be >= 2 (instances need linked annotations), got {samples_per_scene}")
    width, height = (int(v) for v in image_size)
    if width < 16 or height < 16:
        raise ValueError(f"image_size must be at least 16x16 pixels, got {image_size}")
    conditions.validate()
    scene_names = _scene_names(version, scenes)

    with staged_directory(out, replace=overwrite) as staging:
        _write_dataset(staging, version, scene_names, samples_per_scene, seed, (width, height), conditions)
    return Path(out)


def _write_dataset(root: Path, version: str, scene_names: list[tuple[str, str]], samples_per_scene: int, seed: int,
                   image_size: tuple[int, int], conditions: ConditionShares) -> None:
    """The tables and sensor files of the synthetic nuScenes, under `root`."""
    writer = _Writer(root, seed, image_size, conditions)
    rng = np.random.default_rng(seed)
    locations = ("singapore-onenorth", "boston-seaport")
    logs_by_location: dict[str, list[str]] = {loc: [] for loc in locations}
    for scene_index, (scene_name, split) in enumerate(scene_names):
        first_of_split = scene_index == 0 or scene_names[scene_index - 1][1] != split
        log_token = writer.write_scene(rng, scene_index, scene_name, split, samples_per_scene,
                                       location=locations[scene_index % len(locations)],
                                       first_of_split=first_of_split)
        logs_by_location[locations[scene_index % len(locations)]].append(log_token)
    for location, log_tokens in logs_by_location.items():
        if log_tokens:
            writer.write_map(location, log_tokens)
    writer.write_tables(version)


class _Writer:
    """Collects the 13 tables and writes the sensor files of one synthetic nuScenes under `root`."""

    def __init__(self, root: Path, seed: int, image_size: tuple[int, int], shares: ConditionShares) -> None:
        self.root, self.seed, self.image_size, self.shares = root, seed, image_size, shares
        self.tables: dict[str, list[dict]] = {name: [] for name in (
            "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
            "scene", "sample", "sample_data", "sample_annotation", "map")}
        self.category_token = {name: self.token("category", name) for name, _ in _CATEGORIES}
        self.attribute_token = {name: self.token("attribute", name) for name, _ in _ATTRIBUTES}
        self.tables["category"] = [{"token": self.category_token[n], "name": n, "description": d}
                                   for n, d in _CATEGORIES]
        self.tables["attribute"] = [{"token": self.attribute_token[n], "name": n, "description": d}
                                    for n, d in _ATTRIBUTES]
        self.tables["visibility"] = [{"token": t, "level": level, "description": f"visibility of {level} %"}
                                     for t, level in _VISIBILITY]
        self.channels = ("LIDAR_TOP",) + CAMERA_NAMES
        self.sensor_token = {ch: self.token("sensor", ch) for ch in self.channels}
        self.tables["sensor"] = [{"token": self.sensor_token[ch], "channel": ch,
                                  "modality": "lidar" if ch == "LIDAR_TOP" else "camera"} for ch in self.channels]
        width, height = image_size
        sx, sy = width / FULL_IMAGE_SIZE[0], height / FULL_IMAGE_SIZE[1]
        self.intrinsic = np.array([[FOCAL_PX * sx, 0.0, CENTRE_PX[0] * sx], [0.0, FOCAL_PX * sy, CENTRE_PX[1] * sy],
                                   [0.0, 0.0, 1.0]])
        self.sensor2ego = {"LIDAR_TOP": transform(rot_z(LIDAR_YAW), np.array(LIDAR_TRANSLATION))}
        for ch, (translation, yaw, _) in CAMERA_RIG.items():
            self.sensor2ego[ch] = transform(_camera_to_ego_rotation(yaw), np.array(translation))

    def token(self, *parts: object) -> str:
        return _token(self.seed, *parts)

    def write_scene(self, rng: np.random.Generator, scene_index: int, scene_name: str, split: str,
                    samples_per_scene: int, location: str, first_of_split: bool) -> str:
        """Write one scene (log, calibration, samples, sensor data, annotations); return its log token.
        The first scene of a split holds every detection class and is clear."""
        base_us = 1_532_402_927_000_000 + scene_index * 3_600_000_000
        logfile = f"n015-2018-07-{24 + scene_index % 5:02d}-11-{scene_index % 60:02d}-00+0800"
        log_token = self.token("log", scene_name)
        self.tables["log"].append({"token": log_token, "logfile": logfile, "vehicle": "n015",
                                   "date_captured": logfile[5:15], "location": location})
        calib_token = {ch: self.token("calibrated_sensor", scene_name, ch) for ch in self.channels}
        for ch in self.channels:
            self.tables["calibrated_sensor"].append({
                "token": calib_token[ch], "sensor_token": self.sensor_token[ch],
                "translation": [float(v) for v in self.sensor2ego[ch][:3, 3]],
                "rotation": [float(v) for v in Quaternion(matrix=self.sensor2ego[ch][:3, :3]).elements],
                "camera_intrinsic": [] if ch == "LIDAR_TOP" else self.intrinsic.tolist()})

        # Time line (us, relative to the scene start): LiDAR sweeps from one interval before the first key frame.
        key_us = [k * KEYFRAME_INTERVAL_US for k in range(samples_per_scene)]
        sweep_step = KEYFRAME_INTERVAL_US // (SWEEPS_PER_INTERVAL + 1)
        lidar_us = sorted({k - j * sweep_step for k in key_us for j in range(SWEEPS_PER_INTERVAL + 1)})
        camera_offsets = [offset for _, _, offset in CAMERA_RIG.values()]
        check_times = np.array(sorted(set(lidar_us) | {k + o for k in key_us for o in camera_offsets})) / 1e6
        conditions = self.shares.draw(rng, clear=first_of_split)
        ego = draw_ego(rng, duration=key_us[-1] / 1e6)
        objects = place_objects(rng, ego, check_times, instance_counts(rng, every_class=first_of_split))
        intensities = np.array([obj.cls.intensity for obj in objects])

        sample_tokens = [self.token("sample", scene_name, k) for k in range(samples_per_scene)]
        scene_token = self.token("scene", scene_name)
        for k, token in enumerate(sample_tokens):
            self.tables["sample"].append({
                "token": token, "timestamp": base_us + key_us[k], "scene_token": scene_token,
                "prev": sample_tokens[k - 1] if k > 0 else "",
                "next": sample_tokens[k + 1] if k + 1 < samples_per_scene else ""})
        self.tables["scene"].append({
            "token": scene_token, "log_token": log_token, "nbr_samples": samples_per_scene,
            "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1], "name": scene_name,
            "description": ", ".join([f"synthetic ({split}), seed {self.seed}", *conditions.words])})

        def record(channel: str, t_us: int, sample_index: int, is_key: bool, filename: str) -> dict:
            token = self.token("sample_data", scene_name, channel, t_us)
            width, height = (0, 0) if channel == "LIDAR_TOP" else self.image_size
            return {"token": token, "sample_token": sample_tokens[sample_index], "ego_pose_token": token,
                    "calibrated_sensor_token": calib_token[channel], "timestamp": base_us + t_us,
                    "fileformat": "pcd" if channel == "LIDAR_TOP" else "jpg", "is_key_frame": is_key,
                    "height": height, "width": width, "filename": filename, "prev": "", "next": ""}

        # LiDAR key frames and sweeps; a sweep belongs to the next key frame's sample.
        key_points: dict[int, np.ndarray] = {}                         # key index -> points in the global frame
        key_visibility: dict[int, np.ndarray] = {}                     # key index -> visible fraction per object
        records: dict[str, list[dict]] = {ch: [] for ch in self.channels}
        for t_us in lidar_us:
            is_key = t_us in key_us
            next_key = next(k for k, kt in enumerate(key_us) if kt >= t_us)
            sensor2global = ego.ego2global(t_us / 1e6) @ self.sensor2ego["LIDAR_TOP"]
            parts, owners = scene_parts(objects, t_us / 1e6)
            points, visible_fraction = scan(rng, parts, owners, intensities, sensor2global, conditions,
                                            with_visibility=is_key)
            if is_key:
                key_visibility[next_key] = visible_fraction
                key_points[next_key] = points[:, :3].astype(np.float64) @ sensor2global[:3, :3].T + sensor2global[:3, 3]
            folder = "samples" if is_key else "sweeps"
            filename = f"{folder}/LIDAR_TOP/{logfile}__LIDAR_TOP__{base_us + t_us}.pcd.bin"
            self._write_file(filename, points.astype("<f4").tobytes())
            records["LIDAR_TOP"].append(record("LIDAR_TOP", t_us, next_key, is_key, filename))
        # Camera key frames, a few ms after the LiDAR's.
        for ch in CAMERA_NAMES:
            for k, kt in enumerate(key_us):
                t_us = kt + CAMERA_RIG[ch][2]
                cam2global = ego.ego2global(t_us / 1e6) @ self.sensor2ego[ch]
                filename = f"samples/{ch}/{logfile}__{ch}__{base_us + t_us}.jpg"
                image = render_image(objects, t_us / 1e6, cam2global, self.intrinsic, self.image_size, conditions,
                                     rng)
                self._write_file(filename, _encode(image, "JPEG"))
                records[ch].append(record(ch, t_us, k, True, filename))
        # Per-channel prev/next chains; one ego pose per sample_data, sharing its token.
        for ch in self.channels:
            chain = records[ch]
            for i, rec in enumerate(chain):
                rec["prev"] = chain[i - 1]["token"] if i > 0 else ""
                rec["next"] = chain[i + 1]["token"] if i + 1 < len(chain) else ""
                translation, yaw = ego.pose((rec["timestamp"] - base_us) / 1e6)
                self.tables["ego_pose"].append({"token": rec["token"], "timestamp": rec["timestamp"],
                                                "rotation": _quat_z(yaw),
                                                "translation": [float(v) for v in translation]})
            self.tables["sample_data"] += chain

        # Instances and their annotations (global frame, at the LiDAR key frame time).
        counts = {k: points_in_boxes(key_points[k], np.stack([o.box(kt / 1e6) for o in objects])).sum(axis=0)
                  for k, kt in enumerate(key_us)} if objects else {}
        for j, obj in enumerate(objects):
            instance_token = self.token("instance", scene_name, j)
            ann_tokens = [self.token("sample_annotation", scene_name, j, k) for k in range(samples_per_scene)]
            for k, kt in enumerate(key_us):
                center = obj.center(kt / 1e6)
                self.tables["sample_annotation"].append({
                    "token": ann_tokens[k], "sample_token": sample_tokens[k], "instance_token": instance_token,
                    "visibility_token": _visibility_level(float(key_visibility[k][j])),
                    "attribute_tokens": [self.attribute_token[obj.attribute]] if obj.attribute else [],
                    "translation": [float(v) for v in center], "size": list(obj.wlh),
                    "rotation": _quat_z(obj.yaw),
                    "prev": ann_tokens[k - 1] if k > 0 else "",
                    "next": ann_tokens[k + 1] if k + 1 < samples_per_scene else "",
                    "num_lidar_pts": int(counts[k][j]),
                    "num_radar_pts": 0})
            self.tables["instance"].append({
                "token": instance_token, "category_token": self.category_token[obj.category],
                "nbr_annotations": samples_per_scene, "first_annotation_token": ann_tokens[0],
                "last_annotation_token": ann_tokens[-1]})
        return log_token

    def write_map(self, location: str, log_tokens: list[str]) -> None:
        """A blank 64x64 semantic prior: the devkit only checks that the file exists."""
        map_token = self.token("map", location)
        filename = f"maps/{map_token}.png"
        self._write_file(filename, _encode(Image.new("L", (64, 64), 0), "PNG"))
        self.tables["map"].append({"token": map_token, "log_tokens": log_tokens, "filename": filename,
                                   "category": "semantic_prior"})

    def write_tables(self, version: str) -> None:
        (self.root / version).mkdir(parents=True, exist_ok=True)
        for name, records in self.tables.items():
            (self.root / version / f"{name}.json").write_text(json.dumps(records, indent=0))

    def _write_file(self, filename: str, data: bytes) -> None:
        path = self.root / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, quality=90)
    return buffer.getvalue()
