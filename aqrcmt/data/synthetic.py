"""A small synthetic nuScenes in the devkit's on-disk format, for tests, demos and CPU training.

``make_synthetic_nuscenes(out)`` writes ``out/<version>/*.json`` (the 13 tables), ``out/maps/*.png``,
LIDAR_TOP key frames (``samples/``) and sweeps (``sweeps/``) as ``.pcd.bin`` (float32 x, y, z, intensity,
ring in the sensor frame) and six camera JPEGs per sample. ``NuScenes(version, out)`` loads the result and
``DetectionEval`` scores it; the tables follow the devkit's schema (nutonomy/nuscenes-devkit,
``docs/schema_nuscenes.md``).

The world:
- global frame z-up with the ground at z = 0; the ego drives on the ground along a gentle arc;
- LIDAR_TOP at (0.94, 0, 1.84) m in the ego frame, rotated -90 deg about z like the real sensor;
  key frames every 0.5 s, 9 sweeps between them (20 Hz), also before the first key frame;
- cameras are level, looking along yaws 0, -55, +55, 180, +110, -110 deg; frame x right, y down, z forward;
  intrinsics f = 1266.4 px, c = (816.3, 491.5) at 1600x900, scaled to the image size;
- scenes differ: the ego's speed (0-8 m/s, some scenes parked) and turn rate; 0-3 instances of each of the
  10 detection classes per scene (the first scene of each split holds every class at least once, so every
  split can score every class), plus 0-2 distractors of categories the detection task ignores (animal,
  pushable_pullable, debris); sizes drawn within each class's real range, headings and positions uniform;
  objects move straight at constant speed or stand still, stay apart, and stay within 0.75 of their class's
  evaluation range from the ego at every time stamp;
- LiDAR points lie just inside the object surfaces that face the sensor and on rings on the ground; a point
  whose ray from the sensor passes through another object is occluded and dropped, so objects behind others
  get few or no points; ``num_lidar_pts`` is the real count of key-frame points inside each annotated box and
  ``visibility_token`` its visible fraction of the unoccluded points (levels 1-4);
- images are flat-shaded boxes (one colour per class, one brightness per face) over sky and ground.

Everything derives from ``seed``: two runs with the same arguments write the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pyquaternion import Quaternion

from aqrcmt.structures import CAMERA_NAMES
from aqrcmt.atomic import staged_directory
from aqrcmt.data.splits import TRAIN_VAL_SPLITS

FULL_IMAGE_SIZE: tuple[int, int] = (1600, 900)   # (W, H) of the real cameras
DEFAULT_IMAGE_SIZE: tuple[int, int] = (400, 225)
KEYFRAME_INTERVAL_US = 500_000
SWEEPS_PER_INTERVAL = 9                            # LiDAR sweeps between two key frames (20 Hz)

_FOCAL, _CX, _CY = 1266.4, 816.3, 491.5            # at 1600x900
_LIDAR_TRANSLATION = (0.94, 0.0, 1.84)
_LIDAR_YAW = -math.pi / 2
# channel -> (translation in the ego frame (m), viewing yaw (rad), time offset after the LiDAR key frame (us))
_CAMERA_RIG: dict[str, tuple[tuple[float, float, float], float, int]] = {
    "CAM_FRONT": ((1.70, 0.00, 1.51), 0.0, 12_000),
    "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.49), math.radians(-55), 20_000),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), math.radians(55), 4_000),
    "CAM_BACK": ((0.03, 0.00, 1.57), math.pi, 37_000),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), math.radians(110), 45_000),
    "CAM_BACK_RIGHT": ((1.03, -0.48, 1.57), math.radians(-110), 29_000),
}

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


@dataclass(frozen=True)
class _ObjectClass:
    """How objects of one class look and move. Size ranges ((w), (l), (h)) in metres, speeds in m/s."""
    name: str
    categories: tuple[str, ...]        # nuScenes categories to draw from
    size_range: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    eval_range: float                  # DetectionEval class range (m); objects stay within 0.75 of it
    moving_prob: float
    speed: tuple[float, float]
    attributes: tuple[str, str]        # (moving, static); "" = no attribute
    colour: tuple[int, int, int]       # RGB in the images
    intensity: float                   # mean LiDAR intensity


# Size ranges span the bulk of each class's boxes in the nuScenes training annotations.
_CLASSES: tuple[_ObjectClass, ...] = (
    _ObjectClass("car", ("vehicle.car",), ((1.7, 2.1), (3.9, 5.2), (1.4, 1.9)), 50, 0.5, (2.0, 8.0),
                 ("vehicle.moving", "vehicle.parked"), (220, 40, 40), 40),
    _ObjectClass("truck", ("vehicle.truck",), ((2.2, 2.9), (5.5, 9.5), (2.5, 3.6)), 50, 0.5, (2.0, 6.0),
                 ("vehicle.moving", "vehicle.parked"), (40, 150, 40), 30),
    _ObjectClass("construction_vehicle", ("vehicle.construction",), ((2.4, 3.2), (5.0, 7.5), (2.6, 3.6)), 50,
                 0.3, (1.0, 3.0), ("vehicle.moving", "vehicle.parked"), (240, 200, 0), 25),
    _ObjectClass("bus", ("vehicle.bus.rigid", "vehicle.bus.bendy"), ((2.8, 3.1), (10.0, 12.5), (3.1, 3.8)), 50,
                 0.5, (2.0, 6.0), ("vehicle.moving", "vehicle.stopped"), (30, 60, 220), 35),
    _ObjectClass("trailer", ("vehicle.trailer",), ((2.4, 3.0), (8.0, 13.0), (3.2, 4.2)), 50, 0.3, (2.0, 5.0),
                 ("vehicle.moving", "vehicle.parked"), (140, 70, 20), 20),
    _ObjectClass("barrier", ("movable_object.barrier",), ((1.8, 3.0), (0.4, 0.6), (0.9, 1.2)), 30, 0.0,
                 (0.0, 0.0), ("", ""), (250, 250, 250), 60),
    _ObjectClass("motorcycle", ("vehicle.motorcycle",), ((0.6, 1.0), (1.8, 2.4), (1.2, 1.6)), 40, 0.5,
                 (2.0, 7.0), ("cycle.with_rider", "cycle.without_rider"), (200, 0, 200), 45),
    _ObjectClass("bicycle", ("vehicle.bicycle",), ((0.5, 0.8), (1.5, 1.9), (1.0, 1.4)), 40, 0.5, (1.5, 4.0),
                 ("cycle.with_rider", "cycle.without_rider"), (0, 200, 200), 50),
    _ObjectClass("pedestrian", ("human.pedestrian.adult", "human.pedestrian.child",
                                "human.pedestrian.construction_worker", "human.pedestrian.police_officer"),
                 ((0.5, 0.9), (0.5, 0.9), (1.5, 1.9)), 40, 0.6, (0.8, 1.6),
                 ("pedestrian.moving", "pedestrian.standing"), (255, 140, 0), 15),
    _ObjectClass("traffic_cone", ("movable_object.trafficcone",), ((0.3, 0.5), (0.3, 0.5), (0.6, 1.1)), 30, 0.0,
                 (0.0, 0.0), ("", ""), (255, 90, 150), 70),
)
# Objects of categories the detection task ignores: they are annotated, drawn and scanned like the others.
_DISTRACTORS: tuple[_ObjectClass, ...] = (
    _ObjectClass("animal", ("animal",), ((0.3, 0.5), (0.6, 1.1), (0.4, 0.8)), 40, 0.5, (0.5, 1.5),
                 ("", ""), (110, 110, 60), 10),
    _ObjectClass("pushable_pullable", ("movable_object.pushable_pullable",), ((0.5, 0.9), (0.6, 1.2), (1.0, 1.3)),
                 30, 0.0, (0.0, 0.0), ("", ""), (90, 160, 110), 55),
    _ObjectClass("debris", ("movable_object.debris",), ((0.4, 1.2), (0.4, 1.5), (0.2, 0.5)), 30, 0.0, (0.0, 0.0),
                 ("", ""), (80, 70, 60), 12),
)
MAX_PER_CLASS = 3          # instances of one detection class in a scene: 0 .. MAX_PER_CLASS
MAX_DISTRACTORS = 2
_SKY, _GROUND = (150, 185, 215), (95, 95, 95)
# Box faces as corner indices (corners ordered by local (x, y, z) signs, see _box_corners) and brightness.
_FACES: tuple[tuple[tuple[int, int, int, int], float], ...] = (
    ((4, 5, 7, 6), 0.95),   # front (+x)
    ((0, 2, 3, 1), 0.55),   # back (-x)
    ((2, 6, 7, 3), 0.75),   # left (+y)
    ((0, 1, 5, 4), 0.75),   # right (-y)
    ((1, 3, 7, 5), 1.00),   # top (+z)
    ((0, 4, 6, 2), 0.40),   # bottom (-z)
)
_MIN_EGO_DISTANCE = 4.5    # m: no object closer to the ego origin
_GAP = 0.5                 # m: minimum free space between two objects' bounding circles


# --------------------------------------------------------------------------------------------------
# Small geometry helpers
# --------------------------------------------------------------------------------------------------
def _rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _quat_z(yaw: float) -> list[float]:
    """(w, x, y, z) quaternion of a rotation by `yaw` about +z."""
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def _camera_to_ego_rotation(yaw: float) -> np.ndarray:
    """Rotation camera frame (x right, y down, z forward) -> ego frame for a level camera looking along `yaw`."""
    forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    return np.stack([right, down, forward], axis=1)


def _box_corners(center: np.ndarray, wlh: np.ndarray, yaw: float) -> np.ndarray:
    """(8, 3) corners; corner i has local signs (x, y, z) = bits (4, 2, 1) of i, x along the length."""
    w, l, h = wlh
    signs = np.array([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=np.float64) * 2 - 1
    local = signs * np.array([l / 2, w / 2, h / 2])
    return local @ _rot_z(yaw).T + center


def _token(*parts: object) -> str:
    """A deterministic 32-hex-digit token for a record named by `parts`."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def _transform(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3], t[:3, 3] = rotation, translation
    return t


# --------------------------------------------------------------------------------------------------
# Scene content: the ego trajectory and the objects
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _EgoTrajectory:
    """Constant speed (m/s) and yaw rate (rad/s) from `origin` (global xy) with heading `yaw0`; t in seconds."""
    origin: tuple[float, float]
    yaw0: float
    speed: float
    yaw_rate: float

    def pose(self, t: float) -> tuple[np.ndarray, float]:
        """(translation (3,) with z = 0, yaw) of the ego frame in the global frame at time t."""
        yaw = self.yaw0 + self.yaw_rate * t
        if abs(self.yaw_rate) < 1e-9:
            dx, dy = self.speed * t * math.cos(self.yaw0), self.speed * t * math.sin(self.yaw0)
        else:
            r = self.speed / self.yaw_rate
            dx, dy = r * (math.sin(yaw) - math.sin(self.yaw0)), -r * (math.cos(yaw) - math.cos(self.yaw0))
        return np.array([self.origin[0] + dx, self.origin[1] + dy, 0.0]), yaw

    def ego2global(self, t: float) -> np.ndarray:
        translation, yaw = self.pose(t)
        return _transform(_rot_z(yaw), translation)


@dataclass(frozen=True)
class _Object:
    """One instance: a box on the ground moving straight along its heading."""
    cls: _ObjectClass
    category: str
    attribute: str
    wlh: tuple[float, float, float]
    start: tuple[float, float]       # global xy of the centre at t = 0
    yaw: float
    speed: float

    def center(self, t: float) -> np.ndarray:
        return np.array([self.start[0] + self.speed * t * math.cos(self.yaw),
                         self.start[1] + self.speed * t * math.sin(self.yaw), self.wlh[2] / 2])

    @property
    def radius(self) -> float:
        return 0.5 * math.hypot(self.wlh[0], self.wlh[1])


def _instance_counts(rng: np.random.Generator, every_class: bool) -> list[tuple[_ObjectClass, int, bool]]:
    """(class, count, required) per class for one scene: 0..MAX_PER_CLASS of each detection class (at least one
    when `every_class`; those are required, i.e. placement must succeed) and 0..MAX_DISTRACTORS distractors."""
    counts = []
    for cls in _CLASSES:
        count = int(rng.integers(0, MAX_PER_CLASS + 1))
        counts.append((cls, max(count, 1) if every_class else count, every_class))
    distractors = rng.choice(len(_DISTRACTORS), size=int(rng.integers(0, MAX_DISTRACTORS + 1)))
    counts += [(_DISTRACTORS[int(i)], 1, False) for i in distractors]
    return counts


def _place_objects(rng: np.random.Generator, ego: _EgoTrajectory, times: np.ndarray,
                   counts: list[tuple[_ObjectClass, int, bool]]) -> list[_Object]:
    """Place `counts` instances, each within 0.75 of its class range from the ego and clear of the ego and of
    each other at every time in `times` (s). An optional instance that finds no free place is left out."""
    ego_xy = np.stack([ego.pose(t)[0][:2] for t in times])                    # (T, 2)
    mid = ego_xy[len(times) // 2]
    placed: list[_Object] = []
    tracks: list[np.ndarray] = []                                              # (T, 2) per placed object
    for cls, count, required in counts:
        for _ in range(count):
            for _attempt in range(500):
                moving = rng.random() < cls.moving_prob
                angle, radius = rng.uniform(-math.pi, math.pi), rng.uniform(6.0, 0.7 * cls.eval_range)
                wlh = tuple(float(rng.uniform(low, high)) for low, high in cls.size_range)
                obj = _Object(
                    cls=cls, category=str(rng.choice(cls.categories)),
                    attribute=cls.attributes[0] if moving else cls.attributes[1], wlh=wlh,
                    start=(float(mid[0] + radius * math.cos(angle)), float(mid[1] + radius * math.sin(angle))),
                    yaw=float(rng.uniform(-math.pi, math.pi)),
                    speed=float(rng.uniform(*cls.speed)) if moving else 0.0)
                track = np.stack([obj.center(t)[:2] for t in times])
                ego_dist = np.linalg.norm(track - ego_xy, axis=1)
                if ego_dist.max() > 0.75 * cls.eval_range or ego_dist.min() < _MIN_EGO_DISTANCE + obj.radius:
                    continue
                if any((np.linalg.norm(track - other, axis=1) < obj.radius + o.radius + _GAP).any()
                       for o, other in zip(placed, tracks)):
                    continue
                placed.append(obj)
                tracks.append(track)
                break
            else:
                if required:
                    raise RuntimeError(f"could not place a {cls.name} within 0.75 x {cls.eval_range} m of the ego "
                                       f"for the whole scene; use fewer samples per scene")
    return placed


# --------------------------------------------------------------------------------------------------
# Sensors: LiDAR points and camera images
# --------------------------------------------------------------------------------------------------
def _segment_hits_box(origin: np.ndarray, points: np.ndarray, center: np.ndarray, wlh: np.ndarray,
                      yaw: float) -> np.ndarray:
    """(N,) bool: the open segment origin -> point passes through the box (slab test in the box frame)."""
    rot = _rot_z(yaw)
    start = (origin - center) @ rot                                            # (3,) in box coordinates
    delta = (points - center) @ rot - start                                    # (N, 3)
    half = np.array([wlh[1] / 2, wlh[0] / 2, wlh[2] / 2])
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - start) / delta, (half - start) / delta
    t_near = np.nanmax(np.where(delta != 0, np.minimum(t1, t2), -np.inf), axis=1)
    t_far = np.nanmin(np.where(delta != 0, np.maximum(t1, t2), np.inf), axis=1)
    outside_slab = ((delta == 0) & (np.abs(start) > half)).any(axis=1)         # parallel to a slab and outside it
    return ~outside_slab & (t_near < t_far) & (t_far > 0.0) & (t_near < 1.0 - 1e-6)


def _lidar_points(rng: np.random.Generator, boxes: list[tuple[np.ndarray, np.ndarray, float, _ObjectClass]],
                  sensor2global: np.ndarray, density: float = 1200.0) -> tuple[np.ndarray, np.ndarray]:
    """One LiDAR sweep: (N, 5) float32 points (x, y, z, intensity, ring) in the sensor frame, and per box the
    fraction (K,) of its points that no other box occludes.

    boxes: (centre (3,), wlh (3,), yaw, class) in the global frame. Object points lie up to 5 cm inside the
    faces that face the sensor, about density * area / distance^2 per face (at least 8 per object); ground
    points lie on 20 rings around the sensor, minus those under an object. A point whose ray from the sensor
    crosses another box is dropped (ground points: any box).
    """
    origin = sensor2global[:3, 3]
    clouds: list[np.ndarray] = []
    owners: list[np.ndarray] = []                                             # index of the box a point lies on
    for index, (center, wlh, yaw, cls) in enumerate(boxes):
        w, l, h = wlh
        rot = _rot_z(yaw)
        dist = max(float(np.linalg.norm(center - origin)), 1.0)
        face_points = []
        # local axis, sign, the two spanning local axes and their half extents
        for axis, sign in ((0, 1), (0, -1), (1, 1), (1, -1), (2, 1)):
            half = np.array([l / 2, w / 2, h / 2])
            normal_local = np.zeros(3)
            normal_local[axis] = sign
            face_center = center + rot @ (normal_local * half)
            if np.dot(rot @ normal_local, face_center - origin) >= 0:          # faces away from the sensor
                continue
            span = [a for a in range(3) if a != axis]
            area = 4 * half[span[0]] * half[span[1]]
            n = int(min(400, density * area / dist ** 2))
            local = rng.uniform(-1, 1, size=(n, 3)) * half
            local[:, axis] = sign * (half[axis] - rng.uniform(0.0, 0.05, size=n))
            face_points.append(local)
        local = np.concatenate(face_points) if face_points else np.zeros((0, 3))
        if len(local) < 8:                                                    # far or tiny: a few points anyway
            extra = rng.uniform(-1, 1, size=(8 - len(local), 3)) * np.array([l / 2, w / 2, h / 2]) * 0.95
            local = np.concatenate([local, extra])
        xyz = local @ rot.T + center
        intensity = np.clip(rng.normal(cls.intensity, 5.0, size=(len(xyz), 1)), 0, 255)
        clouds.append(np.concatenate([xyz, intensity], axis=1))
        owners.append(np.full(len(xyz), index))

    radii = 3.0 * (55.0 / 3.0) ** (np.arange(20) / 19)                          # 3 m .. 55 m
    azimuth = rng.uniform(-math.pi, math.pi, size=(20, 120))
    ground = np.stack([origin[0] + radii[:, None] * np.cos(azimuth), origin[1] + radii[:, None] * np.sin(azimuth),
                       rng.normal(0.0, 0.02, size=azimuth.shape)], axis=-1).reshape(-1, 3)
    keep = np.ones(len(ground), dtype=bool)
    for center, wlh, yaw, _ in boxes:
        local = (ground - center) @ _rot_z(yaw)
        keep &= ~((np.abs(local[:, 0]) <= wlh[1] / 2) & (np.abs(local[:, 1]) <= wlh[0] / 2))
    ground = ground[keep]
    clouds.append(np.concatenate([ground, rng.uniform(2, 12, size=(len(ground), 1))], axis=1))
    owners.append(np.full(len(ground), -1))

    world, owner = np.concatenate(clouds), np.concatenate(owners)
    visible = np.ones(len(world), dtype=bool)
    for index, (center, wlh, yaw, _) in enumerate(boxes):
        others = owner != index
        visible[others] &= ~_segment_hits_box(origin, world[others, :3], center, np.asarray(wlh), yaw)
    visible_fraction = np.array([visible[owner == k].mean() for k in range(len(boxes))])
    world = world[visible]
    global2sensor = np.linalg.inv(sensor2global)
    xyz = world[:, :3] @ global2sensor[:3, :3].T + global2sensor[:3, 3]
    elevation = np.degrees(np.arctan2(xyz[:, 2], np.linalg.norm(xyz[:, :2], axis=1)))
    ring = np.clip(np.round((elevation + 30.0) / 40.0 * 31), 0, 31)             # 32 beams, -30 .. +10 deg
    points = np.concatenate([xyz, world[:, 3:4], ring[:, None]], axis=1).astype(np.float32)
    return points, visible_fraction


def _visibility_level(fraction: float) -> str:
    """nuScenes visibility token ('1' = 0-40 %, '2' = 40-60 %, '3' = 60-80 %, '4' = 80-100 %) of a fraction."""
    return "1" if fraction < 0.4 else "2" if fraction < 0.6 else "3" if fraction < 0.8 else "4"


def _count_in_box(points_global: np.ndarray, center: np.ndarray, wlh: np.ndarray, yaw: float) -> int:
    local = (points_global - center) @ _rot_z(yaw)
    w, l, h = wlh
    return int(((np.abs(local[:, 0]) <= l / 2) & (np.abs(local[:, 1]) <= w / 2) & (np.abs(local[:, 2]) <= h / 2)).sum())


def _clip_near(poly: np.ndarray, near: float = 0.1) -> np.ndarray:
    """Clip a polygon (n, 3) in camera coordinates to z >= near (Sutherland-Hodgman against one plane)."""
    out = []
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        if a[2] >= near:
            out.append(a)
        if (a[2] >= near) != (b[2] >= near):
            out.append(a + (near - a[2]) / (b[2] - a[2]) * (b - a))
    return np.array(out).reshape(-1, 3)


def _render_image(boxes: list[tuple[np.ndarray, np.ndarray, float, _ObjectClass]], cam2global: np.ndarray,
                  intrinsic: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Flat-shaded boxes (global frame) seen by a level camera: sky above the horizon, ground below."""
    width, height = size
    image = Image.new("RGB", (width, height), _SKY)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, int(round(intrinsic[1, 2])), width, height], fill=_GROUND)
    global2cam = np.linalg.inv(cam2global)
    faces = []                                                   # (depth, polygon in camera frame, colour)
    for center, wlh, yaw, cls in boxes:
        corners = _box_corners(center, wlh, yaw) @ global2cam[:3, :3].T + global2cam[:3, 3]
        box_center = corners.mean(axis=0)
        for index, shade in _FACES:
            poly = corners[list(index)]
            face_center = poly.mean(axis=0)
            if np.dot(face_center - box_center, face_center) >= 0:          # back face
                continue
            colour = tuple(int(round(c * shade)) for c in cls.colour)
            faces.append((float(np.linalg.norm(face_center)), poly, colour))
    for _, poly, colour in sorted(faces, key=lambda f: -f[0]):              # painter's algorithm: far first
        poly = _clip_near(poly)
        if len(poly) < 3:
            continue
        uv = poly @ intrinsic.T
        uv = uv[:, :2] / uv[:, 2:3]
        draw.polygon([(float(u), float(v)) for u, v in uv], fill=colour)
    return image


# --------------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------------
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
                            image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, overwrite: bool = False) -> Path:
    """Write a synthetic nuScenes to `out` and return its root.

    The root is written in a folder beside `out` and renamed to `out` at the end, so a failure leaves nothing
    half-written. An existing non-empty `out` is refused (FileExistsError) unless `overwrite`: then it is replaced
    once the new root is complete.

    version: "v1.0-mini" (scenes from mini_train / mini_val) or "v1.0-trainval" (train / val).
    scenes: total number of scenes; a third of them (at least one) go to the validation split (v1.0-mini
        has 8 + 2 scene names, so at most 10 scenes there).
    samples_per_scene: key frames per scene (>= 2 so that every instance has linked annotations).
    image_size: (W, H) of the camera images; intrinsics are scaled from 1600x900.
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
    scene_names = _scene_names(version, scenes)

    with staged_directory(out, replace=overwrite) as staging:
        _write_dataset(staging, version, scene_names, samples_per_scene, seed, (width, height))
    return Path(out)


def _write_dataset(root: Path, version: str, scene_names: list[tuple[str, str]], samples_per_scene: int, seed: int,
                   image_size: tuple[int, int]) -> None:
    """The tables and sensor files of the synthetic nuScenes, under `root`."""
    writer = _Writer(root, seed, image_size)
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

    def __init__(self, root: Path, seed: int, image_size: tuple[int, int]) -> None:
        self.root, self.seed, self.image_size = root, seed, image_size
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
        self.intrinsic = np.array([[_FOCAL * width / FULL_IMAGE_SIZE[0], 0.0, _CX * width / FULL_IMAGE_SIZE[0]],
                                   [0.0, _FOCAL * height / FULL_IMAGE_SIZE[1], _CY * height / FULL_IMAGE_SIZE[1]],
                                   [0.0, 0.0, 1.0]])
        self.sensor2ego = {"LIDAR_TOP": _transform(_rot_z(_LIDAR_YAW), np.array(_LIDAR_TRANSLATION))}
        for ch, (translation, yaw, _) in _CAMERA_RIG.items():
            self.sensor2ego[ch] = _transform(_camera_to_ego_rotation(yaw), np.array(translation))

    def token(self, *parts: object) -> str:
        return _token(self.seed, *parts)

    def write_scene(self, rng: np.random.Generator, scene_index: int, scene_name: str, split: str,
                    samples_per_scene: int, location: str, first_of_split: bool) -> str:
        """Write one scene (log, calibration, samples, sensor data, annotations); return its log token.
        The first scene of a split holds every detection class."""
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
        camera_offsets = [offset for _, _, offset in _CAMERA_RIG.values()]
        check_times = np.array(sorted(set(lidar_us) | {k + o for k in key_us for o in camera_offsets})) / 1e6
        duration = key_us[-1] / 1e6
        # Some scenes parked, the others up to 8 m/s (at most 16 m travelled, so that objects fit in range).
        speed = 0.0 if rng.random() < 0.15 else float(rng.uniform(1.0, min(8.0, 16.0 / duration)))
        ego = _EgoTrajectory(origin=(float(rng.uniform(300, 1500)), float(rng.uniform(300, 1500))),
                             yaw0=float(rng.uniform(-math.pi, math.pi)), speed=speed,
                             yaw_rate=float(rng.uniform(-0.12, 0.12)))
        objects = _place_objects(rng, ego, check_times, _instance_counts(rng, every_class=first_of_split))

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
            "description": f"synthetic ({split}), seed {self.seed}"})

        def boxes_at(t_us: int) -> list[tuple[np.ndarray, np.ndarray, float, _ObjectClass]]:
            return [(o.center(t_us / 1e6), np.array(o.wlh), o.yaw, o.cls) for o in objects]

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
            points, visible_fraction = _lidar_points(rng, boxes_at(t_us), sensor2global)
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
                t_us = kt + _CAMERA_RIG[ch][2]
                cam2global = ego.ego2global(t_us / 1e6) @ self.sensor2ego[ch]
                filename = f"samples/{ch}/{logfile}__{ch}__{base_us + t_us}.jpg"
                image = _render_image(boxes_at(t_us), cam2global, self.intrinsic, self.image_size)
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
                    "num_lidar_pts": _count_in_box(key_points[k], center, np.array(obj.wlh), obj.yaw),
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
