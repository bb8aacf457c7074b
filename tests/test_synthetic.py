"""The synthetic nuScenes: the devkit loads it, its geometry is consistent, its sensors behave like real ones
(heading visible, points falling with range, 32 rings, conditions), and it is deterministic."""
from __future__ import annotations

import filecmp
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aqrcmt.structures import CAMERA_NAMES, CLASS_NAMES
from nuscenes import NuScenes
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.geometry_utils import points_in_box, view_points
from nuscenes.utils.splits import create_splits_scenes
from pyquaternion import Quaternion

from aqrcmt.data.synthetic import make_synthetic_nuscenes

CLASS_RANGE = {"car": 50, "truck": 50, "bus": 50, "trailer": 50, "construction_vehicle": 50, "pedestrian": 40,
               "motorcycle": 40, "bicycle": 40, "traffic_cone": 30, "barrier": 30}


@pytest.fixture(scope="module")
def nusc(synthetic_root: Path) -> NuScenes:
    return NuScenes("v1.0-mini", str(synthetic_root), verbose=False)


def _pose(record: dict) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3], t[:3, 3] = Quaternion(record["rotation"]).rotation_matrix, record["translation"]
    return t


def _sensor2global(nusc: NuScenes, sample_data_token: str) -> np.ndarray:
    sd = nusc.get("sample_data", sample_data_token)
    return _pose(nusc.get("ego_pose", sd["ego_pose_token"])) @ _pose(nusc.get("calibrated_sensor",
                                                                               sd["calibrated_sensor_token"]))


def test_devkit_loads_default_set(nusc: NuScenes) -> None:
    splits = create_splits_scenes()
    names = [s["name"] for s in nusc.scene]
    assert sum(n in splits["mini_train"] for n in names) == 2 and sum(n in splits["mini_val"] for n in names) == 1
    assert len(nusc.sample) == 18
    for sample in nusc.sample:
        assert set(sample["data"]) == {"LIDAR_TOP", *CAMERA_NAMES}
    lidar_calib = nusc.get("calibrated_sensor", nusc.get("sample_data", nusc.sample[0]["data"]["LIDAR_TOP"])
                           ["calibrated_sensor_token"])
    assert math.isclose(Quaternion(lidar_calib["rotation"]).yaw_pitch_roll[0], -math.pi / 2, abs_tol=1e-9)


def _detection_classes_by_scene(nusc: NuScenes) -> dict[str, list[str]]:
    scene_of = {s["token"]: nusc.get("scene", s["scene_token"])["name"] for s in nusc.sample}
    classes: dict[str, list[str]] = {}
    for a in nusc.sample_annotation:
        classes.setdefault(scene_of[a["sample_token"]], []).append(category_to_detection_name(a["category_name"]))
    return classes


def test_every_class_in_every_split_and_linked(nusc: NuScenes) -> None:
    splits = create_splits_scenes()
    by_scene = _detection_classes_by_scene(nusc)
    for split in ("mini_train", "mini_val"):
        present = {c for name, classes in by_scene.items() if name in splits[split] for c in classes}
        assert present >= set(CLASS_NAMES), split
    assert all(a["prev"] or a["next"] for a in nusc.sample_annotation)
    assert all(min(a["size"]) > 0 for a in nusc.sample_annotation)
    assert np.mean([a["num_lidar_pts"] > 0 for a in nusc.sample_annotation]) > 0.8
    velocity = np.stack([nusc.box_velocity(a["token"]) for a in nusc.sample_annotation])
    assert np.isfinite(velocity).all() and (np.linalg.norm(velocity, axis=1) > 0.5).any()


def test_scenes_vary(tmp_path: Path) -> None:
    """Per-scene variety: class counts from 0 up, sizes within each class's range, distractors, ego speeds."""
    from aqrcmt.data.synthetic.world import CLASSES, MAX_PER_CLASS

    root = make_synthetic_nuscenes(tmp_path, version="v1.0-trainval", scenes=12, samples_per_scene=2, seed=3,
                                   image_size=(64, 36))
    nusc = NuScenes("v1.0-trainval", str(root), verbose=False)
    splits = create_splits_scenes()
    names = [s["name"] for s in nusc.scene]
    train, val = set(names) & set(splits["train"]), set(names) & set(splits["val"])
    assert len(train) == 8 and len(val) == 4 and not train & val          # disjoint scenes (and so samples)
    first = {s["scene_token"]: s for s in nusc.sample if not s["prev"]}
    counts = []
    for scene_token, sample in first.items():
        names = [category_to_detection_name(nusc.get("sample_annotation", t)["category_name"]) for t in sample["anns"]]
        counts.append([names.count(c) for c in CLASS_NAMES])
    counts = np.array(counts)
    assert counts.min() == 0 and counts.max() == MAX_PER_CLASS and len({tuple(c) for c in counts}) == len(counts)
    assert any(category_to_detection_name(a["category_name"]) is None for a in nusc.sample_annotation)
    size_range = {c.name: np.array(c.size_range) for c in CLASSES}
    for a in nusc.sample_annotation:
        name = category_to_detection_name(a["category_name"])
        if name is not None:
            assert ((size_range[name][:, 0] <= a["size"]) & (a["size"] <= size_range[name][:, 1])).all()
    speeds = []
    for scene in nusc.scene:
        sample = nusc.get("sample", scene["first_sample_token"])
        a, b = (np.array(nusc.get("ego_pose", nusc.get("sample", t)["data"]["LIDAR_TOP"])["translation"])
                for t in (sample["token"], sample["next"]))
        speeds.append(np.linalg.norm(b - a) / 0.5)
    assert max(speeds) > 2.0 and max(speeds) - min(speeds) > 1.0


def test_some_scenes_are_parked_the_others_drive_up_to_8_m_per_s() -> None:
    from aqrcmt.data.synthetic.world import draw_ego

    rng = np.random.default_rng(0)
    speeds = np.array([draw_ego(rng, duration=2.0).speed for _ in range(400)])
    assert 0.08 < (speeds == 0).mean() < 0.25 and speeds.max() <= 8.0 and (speeds > 4.0).mean() > 0.5


def _scan_alone(objects: list, conditions=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One sweep of a level sensor 1.84 m above the global origin among `objects` (SceneObjects at t = 0)."""
    from aqrcmt.data.synthetic.lidar import scan
    from aqrcmt.data.synthetic.world import SceneConditions
    from aqrcmt.data.synthetic.writer import scene_parts

    sensor2global = np.eye(4)
    sensor2global[2, 3] = 1.84
    parts, owners = scene_parts(objects, 0.0)
    intensities = np.array([o.cls.intensity for o in objects])
    return scan(np.random.default_rng(seed), parts, owners, intensities, sensor2global,
                conditions or SceneConditions())


def _object(name: str, x: float, y: float = 0.0, yaw: float = 0.0, wlh=None):
    from aqrcmt.data.synthetic.world import CLASSES, SceneObject

    cls = next(c for c in CLASSES if c.name == name)
    size = wlh or tuple(float(np.mean(r)) for r in cls.size_range)
    return SceneObject(cls, cls.categories[0], cls.attributes[1], size, (x, y), yaw, 0.0)


def _points_in(points: np.ndarray, obj) -> np.ndarray:
    """The points (sensor frame = global frame shifted up by 1.84 m) inside the object's annotated box."""
    from aqrcmt.data.box_geometry import points_in_boxes

    world = points[:, :3].astype(np.float64) + [0.0, 0.0, 1.84]
    return world[points_in_boxes(world, obj.box(0.0)[None])[:, 0]]


def test_occluded_objects_get_no_points_and_the_lowest_visibility() -> None:
    from aqrcmt.data.synthetic.writer import _visibility_level

    wall = _object("bus", 8.0, yaw=math.pi / 2)                  # 11 m long, broadside to the sensor
    behind = _object("car", 16.0)
    points, fraction = _scan_alone([wall, behind])
    assert fraction[0] == 1.0 and fraction[1] == 0.0 and _visibility_level(fraction[1]) == "1"
    assert len(_points_in(points, behind)) == 0 and len(_points_in(points, wall)) > 100
    alone, alone_fraction = _scan_alone([behind])
    assert alone_fraction[0] == 1.0 and len(_points_in(alone, behind)) > 20


def test_heading_is_visible_to_the_lidar_and_the_cameras() -> None:
    """A car and its 180-degree-turned copy give different clouds (the cabin sits mid-rear) and different lamps."""
    from aqrcmt.data.synthetic.camera import render_image
    from aqrcmt.data.synthetic.world import SceneConditions, transform

    facing, turned = _object("car", 10.0, 3.0, yaw=0.3), _object("car", 10.0, 3.0, yaw=0.3 + math.pi)
    centroids = []
    for car in (facing, turned):                                     # the same annotated box
        inside = _points_in(_scan_alone([car])[0], car)
        high = inside[inside[:, 2] > 0.7 * car.wlh[2]]                # cabin returns
        assert len(high) > 10
        centroids.append(high[:, :2].mean(axis=0))
    assert np.linalg.norm(centroids[0] - centroids[1]) > 0.5
    # a camera at the origin looking along +x sees the front (white lamps) of a car facing it, else the rear (red)
    cam2global = transform(np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]]), np.array([0.0, 0.0, 1.5]))
    intrinsic = np.array([[200.0, 0, 160], [0, 200.0, 90], [0, 0, 1]])
    lamp_colours = []
    for yaw in (math.pi, 0.0):                                       # towards the camera, away from it
        image = np.asarray(render_image([_object("car", 8.0, yaw=yaw)], 0.0, cam2global, intrinsic, (320, 180),
                                        SceneConditions(), np.random.default_rng(0))).astype(int)
        white = ((image > 215).all(axis=-1)).sum()
        red = ((image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)).sum()
        lamp_colours.append((white, red))
    assert lamp_colours[0][0] > 10 and lamp_colours[0][1] == 0
    assert lamp_colours[1][1] > 10 and lamp_colours[1][0] == 0


def test_points_per_object_fall_with_range_and_every_ring_is_used() -> None:
    counts = [len(_points_in(_scan_alone([car])[0], car)) for car in
              (_object("car", d, d / 4, yaw=0.5) for d in (6.0, 12.0, 24.0, 36.0, 48.0))]
    assert counts == sorted(counts, reverse=True) and counts[0] > 8 * counts[-1] > 0
    points, _ = _scan_alone([_object("bus", 4.0, yaw=math.pi / 2)])     # tall enough for the upward beams
    ground_only, visibility = _scan_alone([])
    assert len(ground_only) > 1000 and len(visibility) == 0 and np.abs(ground_only[:, 2] + 1.84).max() < 0.2
    assert set(np.unique(points[:, 4]).astype(int)) == set(range(32))


def test_rain_and_fog_drop_returns_and_add_near_ones() -> None:
    from aqrcmt.data.synthetic.world import SceneConditions

    objects = [_object("car", 10.0), _object("truck", -20.0, 5.0)]
    clear, rain, fog = (_scan_alone(objects, conditions)[0] for conditions in
                        (SceneConditions(), SceneConditions(rain=True), SceneConditions(fog=True)))
    def near_in_the_air(points: np.ndarray) -> int:     # no object within 6 m: only droplets return there
        return int(((np.linalg.norm(points[:, :3], axis=1) < 6.0) & (points[:, 2] > -1.5)).sum())
    assert len(fog) < len(rain) < len(clear)
    assert near_in_the_air(clear) == 0 < near_in_the_air(rain) < near_in_the_air(fog)


def test_long_scenes_place_every_class(tmp_path: Path) -> None:
    """nuScenes-length scenes (40 key frames, 19.5 s): the ego stays within 16 m, every class is placed."""
    from aqrcmt.data.synthetic.world import CLASSES, draw_ego, instance_counts, place_objects

    times = np.arange(0.0, 19.51, 0.05)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        ego = draw_ego(rng, duration=19.5)
        assert np.linalg.norm(ego.pose(19.5)[0] - ego.pose(0.0)[0]) <= 16.0 + 1e-9
        objects = place_objects(rng, ego, times, instance_counts(rng, every_class=True))
        assert {o.cls.name for o in objects} >= {c.name for c in CLASSES}


def test_conditions_are_recorded_and_change_both_sensors(tmp_path: Path) -> None:
    from aqrcmt.data.synthetic import ConditionShares

    root = make_synthetic_nuscenes(tmp_path / "dark", scenes=3, samples_per_scene=2, image_size=(96, 54), seed=2,
                                   conditions=ConditionShares(night=1.0, rain=1.0, fog=0.0))
    nusc = NuScenes("v1.0-mini", str(root), verbose=False)
    descriptions = [s["description"] for s in nusc.scene]                       # train, train, val
    assert descriptions[0].endswith("seed 2") and descriptions[1].endswith("night, rain")
    assert descriptions[2].endswith("seed 2")                                    # the first of each split: clear

    def brightness(scene: dict) -> float:
        sample = nusc.get("sample", scene["first_sample_token"])
        return float(np.mean([np.asarray(Image.open(root / nusc.get("sample_data", sample["data"][c])["filename"]))
                              for c in CAMERA_NAMES]))
    assert brightness(nusc.scene[1]) < 0.3 * brightness(nusc.scene[0])
    with pytest.raises(ValueError, match=r"night share must lie in \[0, 1\], got 1.5"):
        make_synthetic_nuscenes(tmp_path / "bad", conditions=ConditionShares(night=1.5))
    assert not (tmp_path / "bad").exists()


def test_timestamps_and_ego_motion(nusc: NuScenes) -> None:
    scene = nusc.scene[0]
    sample = nusc.get("sample", scene["first_sample_token"])
    key_times, positions = [], []
    while sample:
        key_times.append(sample["timestamp"])
        positions.append(nusc.get("ego_pose", sample["data"]["LIDAR_TOP"])["translation"])
        sample = nusc.get("sample", sample["next"]) if sample["next"] else None
    assert set(np.diff(key_times)) == {500_000}
    assert np.linalg.norm(np.subtract(positions[-1], positions[0])) > 1.0
    sweep = nusc.get("sample_data", nusc.get("sample", scene["last_sample_token"])["data"]["LIDAR_TOP"])
    gaps = []
    for _ in range(9):
        previous = nusc.get("sample_data", sweep["prev"])
        assert not previous["is_key_frame"]
        gaps.append(sweep["timestamp"] - previous["timestamp"])
        sweep = previous
    assert set(gaps) == {50_000}


def test_num_lidar_pts_and_range_match_the_devkit(nusc: NuScenes) -> None:
    for sample in nusc.sample:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        points = LidarPointCloud.from_file(path).points[:3]
        ego = nusc.get("ego_pose", sample["data"]["LIDAR_TOP"])["translation"]
        for box in boxes:
            ann = nusc.get("sample_annotation", box.token)
            assert points_in_box(box, points).sum() == ann["num_lidar_pts"]
            name = category_to_detection_name(ann["category_name"])
            if name is not None:
                assert np.linalg.norm(np.subtract(ann["translation"][:2], ego[:2])) < 0.75 * CLASS_RANGE[name]


def test_lidar_points_of_objects_land_on_drawn_objects(nusc: NuScenes, synthetic_root: Path) -> None:
    """Points inside annotated boxes, projected into each camera, hit object pixels (not sky or ground)."""
    from aqrcmt.data.synthetic.camera import GROUND, SKY

    sky, ground = np.array(SKY), np.array(GROUND)
    clear = {s["token"] for s in nusc.scene if s["description"].endswith(f"seed {0}")}
    hits = on_background = 0
    for sample in [s for s in nusc.sample if s["scene_token"] in clear][:6]:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        points = LidarPointCloud.from_file(path).points[:3]
        inside = np.zeros(points.shape[1], dtype=bool)
        for box in boxes:
            inside |= points_in_box(box, points)
        lidar2global = _sensor2global(nusc, sample["data"]["LIDAR_TOP"])
        world = lidar2global[:3, :3] @ points[:, inside] + lidar2global[:3, 3:4]
        for camera in CAMERA_NAMES:
            sd = nusc.get("sample_data", sample["data"][camera])
            global2cam = np.linalg.inv(_sensor2global(nusc, sd["token"]))
            cam = global2cam[:3, :3] @ world + global2cam[:3, 3:4]
            intrinsic = np.array(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"])
            uv = view_points(cam, intrinsic, normalize=True)
            visible = ((cam[2] > 1) & (uv[0] >= 1) & (uv[0] < sd["width"] - 1)
                       & (uv[1] >= 1) & (uv[1] < sd["height"] - 1))
            pixels = np.asarray(Image.open(synthetic_root / sd["filename"])).astype(int)
            assert pixels.shape == (sd["height"], sd["width"], 3)
            colours = pixels[uv[1, visible].astype(int), uv[0, visible].astype(int)]
            background = (np.abs(colours - sky).sum(1) < 25) | (np.abs(colours - ground).sum(1) < 25)
            hits += int(visible.sum())
            on_background += int(background.sum())
    assert hits > 1000
    assert on_background / hits < 0.03


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    kwargs = dict(scenes=2, samples_per_scene=2, image_size=(96, 54))
    a = make_synthetic_nuscenes(tmp_path / "a", seed=5, **kwargs)
    b = make_synthetic_nuscenes(tmp_path / "b", seed=5, **kwargs)
    c = make_synthetic_nuscenes(tmp_path / "c", seed=6, **kwargs)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    assert (a / "v1.0-mini" / "sample_annotation.json").read_bytes() != \
        (c / "v1.0-mini" / "sample_annotation.json").read_bytes()


def test_trainval_version_and_cli(tmp_path: Path) -> None:
    from aqrcmt.cli import main

    assert main(["make-synthetic-nuscenes", "--out", str(tmp_path), "--version", "v1.0-trainval", "--scenes", "2",
                 "--samples-per-scene", "2", "--image-size", "64", "36"]) == 0
    nusc = NuScenes("v1.0-trainval", str(tmp_path), verbose=False)
    assert sorted(s["name"] for s in nusc.scene) == ["scene-0001", "scene-0003"]
    sd = nusc.get("sample_data", nusc.sample[0]["data"]["CAM_BACK"])
    assert Image.open(tmp_path / sd["filename"]).size == (64, 36) == (sd["width"], sd["height"])
    intrinsic = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"]
    assert math.isclose(intrinsic[0][0], 1266.4 * 64 / 1600) and math.isclose(intrinsic[1][2], 491.5 * 36 / 900)


@pytest.mark.parametrize("kwargs, message", [
    (dict(version="v1.0-test"), "version"),
    (dict(samples_per_scene=1), "samples_per_scene"),
    (dict(scenes=1), "scenes"),
    (dict(scenes=11), "asked for 11 scenes"),
    (dict(image_size=(8, 8)), "image_size"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_synthetic_nuscenes(tmp_path, **kwargs)
