"""The synthetic world: sensor rig, object classes and their shapes, the ego's drive, scene conditions, placement.

Frames: global z-up with the ground at z = 0; an object's local frame has x along its heading (its front at
x = +l/2), y to its left, z up from the ground. Boxes are (n, 7) rows (gravity centre x, y, z, length, width,
height, yaw) as in :mod:`aqrcmt.data.box_geometry`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FULL_IMAGE_SIZE: tuple[int, int] = (1600, 900)    # (W, H) of the real cameras
FOCAL_PX, CENTRE_PX = 1266.4, (816.3, 491.5)       # intrinsics at 1600x900
LIDAR_TRANSLATION = (0.94, 0.0, 1.84)               # m, ego frame
LIDAR_YAW = -math.pi / 2                            # the real LIDAR_TOP is rotated -90 deg about z
# channel -> (translation in the ego frame (m), viewing yaw (rad), time offset after the LiDAR key frame (us))
CAMERA_RIG: dict[str, tuple[tuple[float, float, float], float, int]] = {
    "CAM_FRONT": ((1.70, 0.00, 1.51), 0.0, 12_000),
    "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.49), math.radians(-55), 20_000),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), math.radians(55), 4_000),
    "CAM_BACK": ((0.03, 0.00, 1.57), math.pi, 37_000),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), math.radians(110), 45_000),
    "CAM_BACK_RIGHT": ((1.03, -0.48, 1.57), math.radians(-110), 29_000),
}
CONDITIONS: tuple[str, ...] = ("night", "rain", "fog")   # words of nuScenes' scene.description


# --------------------------------------------------------------------------------------------------
# Object classes: what they look like
# --------------------------------------------------------------------------------------------------
Part = tuple[float, float, float, float, float, float]
"""A solid block of an object in fractions of its box: (x0, x1) of the length from -0.5 (rear) to +0.5 (front),
(y0, y1) of the width from -0.5 to +0.5, (z0, z1) of the height from 0 (ground) to 1."""
Lamp = tuple[float, float, float, float]
"""A lamp on the front (x = +0.5) or rear (x = -0.5) face: (y0, y1, z0, z1) in fractions of width and height."""

_BOX: tuple[Part, ...] = ((-0.5, 0.5, -0.5, 0.5, 0.0, 1.0),)


@dataclass(frozen=True)
class ObjectClass:
    """How the objects of one class look and move. Size ranges ((w), (l), (h)) in metres, speeds in m/s.

    The parts fill the annotated box's extent on every side (the box stays tight) but differ front to back, so
    both sensors see the heading: a car's cabin sits mid-rear, a truck's cab at the front, a pedestrian's feet
    point forward. Lamps are white at the front and red at the rear."""
    name: str
    categories: tuple[str, ...]        # nuScenes categories to draw from
    size_range: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    eval_range: float                  # DetectionEval class range (m); objects stay within 0.75 of it
    moving_prob: float
    speed: tuple[float, float]
    attributes: tuple[str, str]        # (moving, static); "" = no attribute
    colour: tuple[int, int, int]       # RGB in daylight
    intensity: float                   # mean LiDAR intensity
    parts: tuple[Part, ...] = _BOX
    front_lamps: tuple[Lamp, ...] = ()
    rear_lamps: tuple[Lamp, ...] = ()


_CAR_LAMPS: tuple[Lamp, ...] = ((-0.45, -0.28, 0.30, 0.42), (0.28, 0.45, 0.30, 0.42))
_TALL_LAMPS: tuple[Lamp, ...] = ((-0.45, -0.30, 0.10, 0.20), (0.30, 0.45, 0.10, 0.20))
_CYCLE_LAMP: tuple[Lamp, ...] = ((-0.3, 0.3, 0.45, 0.6),)

# Size ranges span the bulk of each class's boxes in the nuScenes training annotations.
CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("car", ("vehicle.car",), ((1.7, 2.1), (3.9, 5.2), (1.4, 1.9)), 50, 0.5, (2.0, 8.0),
                ("vehicle.moving", "vehicle.parked"), (220, 40, 40), 40,
                parts=((-0.5, 0.5, -0.5, 0.5, 0.0, 0.55),            # body
                       (-0.38, 0.12, -0.45, 0.45, 0.55, 1.0)),       # cabin, mid-rear
                front_lamps=_CAR_LAMPS, rear_lamps=_CAR_LAMPS),
    ObjectClass("truck", ("vehicle.truck",), ((2.2, 2.9), (5.5, 9.5), (2.5, 3.6)), 50, 0.5, (2.0, 6.0),
                ("vehicle.moving", "vehicle.parked"), (40, 150, 40), 30,
                parts=((0.22, 0.5, -0.5, 0.5, 0.0, 0.8),              # cab at the front, lower than the box
                       (-0.5, 0.18, -0.5, 0.5, 0.12, 1.0),            # cargo box
                       (-0.5, 0.5, -0.35, 0.35, 0.0, 0.12)),          # chassis
                front_lamps=_TALL_LAMPS, rear_lamps=_TALL_LAMPS),
    ObjectClass("construction_vehicle", ("vehicle.construction",), ((2.4, 3.2), (5.0, 7.5), (2.6, 3.6)), 50,
                0.3, (1.0, 3.0), ("vehicle.moving", "vehicle.parked"), (240, 200, 0), 25,
                parts=((-0.5, 0.3, -0.5, 0.5, 0.0, 0.45),             # chassis
                       (-0.45, 0.0, -0.5, 0.05, 0.45, 1.0),           # cab, rear left
                       (0.3, 0.5, -0.45, 0.45, 0.0, 0.3)),            # bucket at the front
                front_lamps=((-0.45, -0.3, 0.2, 0.28), (0.3, 0.45, 0.2, 0.28)), rear_lamps=_TALL_LAMPS),
    ObjectClass("bus", ("vehicle.bus.rigid", "vehicle.bus.bendy"), ((2.8, 3.1), (10.0, 12.5), (3.1, 3.8)), 50,
                0.5, (2.0, 6.0), ("vehicle.moving", "vehicle.stopped"), (30, 60, 220), 35,
                parts=((-0.5, 0.45, -0.5, 0.5, 0.0, 1.0),             # body
                       (0.45, 0.5, -0.5, 0.5, 0.0, 0.7)),             # low, flat nose
                front_lamps=_TALL_LAMPS, rear_lamps=((-0.45, -0.3, 0.1, 0.25), (0.3, 0.45, 0.1, 0.25))),
    ObjectClass("trailer", ("vehicle.trailer",), ((2.4, 3.0), (8.0, 13.0), (3.2, 4.2)), 50, 0.3, (2.0, 5.0),
                ("vehicle.moving", "vehicle.parked"), (140, 70, 20), 20,
                parts=((-0.5, 0.35, -0.5, 0.5, 0.15, 1.0),            # box
                       (0.35, 0.5, -0.08, 0.08, 0.15, 0.25),          # tow bar at the front
                       (-0.45, -0.15, -0.5, 0.5, 0.0, 0.15)),         # rear axles
                rear_lamps=((-0.45, -0.3, 0.2, 0.3), (0.3, 0.45, 0.2, 0.3))),
    ObjectClass("barrier", ("movable_object.barrier",), ((1.8, 3.0), (0.4, 0.6), (0.9, 1.2)), 30, 0.0,
                (0.0, 0.0), ("", ""), (250, 250, 250), 60),
    ObjectClass("motorcycle", ("vehicle.motorcycle",), ((0.6, 1.0), (1.8, 2.4), (1.2, 1.6)), 40, 0.5,
                (2.0, 7.0), ("cycle.with_rider", "cycle.without_rider"), (200, 0, 200), 45,
                parts=((-0.5, 0.5, -0.2, 0.2, 0.0, 0.5),              # wheels and frame
                       (-0.3, 0.05, -0.5, 0.5, 0.5, 1.0),             # rider, rear half
                       (0.2, 0.35, -0.5, 0.5, 0.5, 0.65)),            # handlebar
                front_lamps=_CYCLE_LAMP, rear_lamps=_CYCLE_LAMP),
    ObjectClass("bicycle", ("vehicle.bicycle",), ((0.5, 0.8), (1.5, 1.9), (1.0, 1.4)), 40, 0.5, (1.5, 4.0),
                ("cycle.with_rider", "cycle.without_rider"), (0, 200, 200), 50,
                parts=((-0.5, 0.5, -0.15, 0.15, 0.0, 0.55),
                       (-0.25, 0.05, -0.5, 0.5, 0.55, 1.0),
                       (0.25, 0.4, -0.5, 0.5, 0.55, 0.7)),
                front_lamps=_CYCLE_LAMP, rear_lamps=_CYCLE_LAMP),
    ObjectClass("pedestrian", ("human.pedestrian.adult", "human.pedestrian.child",
                               "human.pedestrian.construction_worker", "human.pedestrian.police_officer"),
                ((0.5, 0.9), (0.5, 0.9), (1.5, 1.9)), 40, 0.6, (0.8, 1.6),
                ("pedestrian.moving", "pedestrian.standing"), (255, 140, 0), 15,
                parts=((-0.35, 0.1, -0.5, 0.5, 0.08, 0.85),           # legs and torso, set back
                       (-0.2, 0.1, -0.2, 0.2, 0.85, 1.0),             # head
                       (-0.35, 0.5, -0.35, 0.35, 0.0, 0.08))),        # feet, pointing forward
    ObjectClass("traffic_cone", ("movable_object.trafficcone",), ((0.3, 0.5), (0.3, 0.5), (0.6, 1.1)), 30, 0.0,
                (0.0, 0.0), ("", ""), (255, 90, 150), 70,
                parts=((-0.5, 0.5, -0.5, 0.5, 0.0, 0.1), (-0.2, 0.2, -0.2, 0.2, 0.1, 1.0))),
)
# Objects of categories the detection task ignores: they are annotated, drawn and scanned like the others.
DISTRACTORS: tuple[ObjectClass, ...] = (
    ObjectClass("animal", ("animal",), ((0.3, 0.5), (0.6, 1.1), (0.4, 0.8)), 40, 0.5, (0.5, 1.5),
                ("", ""), (110, 110, 60), 10),
    ObjectClass("pushable_pullable", ("movable_object.pushable_pullable",), ((0.5, 0.9), (0.6, 1.2), (1.0, 1.3)),
                30, 0.0, (0.0, 0.0), ("", ""), (90, 160, 110), 55),
    ObjectClass("debris", ("movable_object.debris",), ((0.4, 1.2), (0.4, 1.5), (0.2, 0.5)), 30, 0.0, (0.0, 0.0),
                ("", ""), (80, 70, 60), 12),
)
MAX_PER_CLASS = 3          # instances of one detection class in a scene: 0 .. MAX_PER_CLASS
MAX_DISTRACTORS = 2
_MIN_EGO_DISTANCE = 4.5    # m: no object closer to the ego origin
_GAP = 0.5                 # m: minimum free space between two objects' bounding circles


def rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def transform(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """(4, 4) homogeneous transform."""
    t = np.eye(4)
    t[:3, :3], t[:3, 3] = rotation, translation
    return t


# --------------------------------------------------------------------------------------------------
# Scene content: conditions, the ego's drive, the objects
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneConditions:
    """Weather and light of one scene; `words` is what scene.description says (nuScenes writes e.g. "Night, rain")."""
    night: bool = False
    rain: bool = False
    fog: bool = False
    sun_azimuth: float = 0.0           # rad, global frame; the light comes from there
    sun_elevation: float = math.radians(45)

    @property
    def words(self) -> list[str]:
        return [name for name in CONDITIONS if getattr(self, name)]


@dataclass(frozen=True)
class ConditionShares:
    """Probability of each condition per scene (independent draws; defaults near nuScenes: ~12 % night, ~20 % rain).
    The first scene of each split stays clear."""
    night: float = 0.12
    rain: float = 0.2
    fog: float = 0.05

    def validate(self) -> None:
        for name in CONDITIONS:
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"the {name} share must lie in [0, 1], got {share}")

    def draw(self, rng: np.random.Generator, clear: bool) -> SceneConditions:
        draws = rng.random(3)
        azimuth, elevation = rng.uniform(-math.pi, math.pi), rng.uniform(math.radians(25), math.radians(70))
        if clear:
            return SceneConditions(sun_azimuth=azimuth, sun_elevation=elevation)
        return SceneConditions(night=bool(draws[0] < self.night), rain=bool(draws[1] < self.rain),
                               fog=bool(draws[2] < self.fog), sun_azimuth=azimuth, sun_elevation=elevation)


@dataclass(frozen=True)
class EgoTrajectory:
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
        return transform(rot_z(yaw), translation)


def draw_ego(rng: np.random.Generator, duration: float) -> EgoTrajectory:
    """Some scenes parked, the others driving up to 8 m/s but at most 16 m in all (objects must stay in range),
    on a gentle arc; any duration (s) works."""
    top_speed = min(8.0, 16.0 / max(duration, 1e-9))
    speed = 0.0 if rng.random() < 0.15 else float(rng.uniform(0.5 * top_speed, top_speed))
    return EgoTrajectory(origin=(float(rng.uniform(300, 1500)), float(rng.uniform(300, 1500))),
                         yaw0=float(rng.uniform(-math.pi, math.pi)), speed=speed,
                         yaw_rate=float(rng.uniform(-0.12, 0.12)))


@dataclass(frozen=True)
class SceneObject:
    """One instance: a shaped object on the ground moving straight along its heading."""
    cls: ObjectClass
    category: str
    attribute: str
    wlh: tuple[float, float, float]
    start: tuple[float, float]       # global xy of the centre at t = 0
    yaw: float
    speed: float

    def center(self, t: float) -> np.ndarray:
        """(3,) gravity centre of the annotated box at time t (s)."""
        return np.array([self.start[0] + self.speed * t * math.cos(self.yaw),
                         self.start[1] + self.speed * t * math.sin(self.yaw), self.wlh[2] / 2])

    def box(self, t: float) -> np.ndarray:
        """(7,) annotated box: centre, length, width, height, yaw."""
        w, l, h = self.wlh
        return np.array([*self.center(t), l, w, h, self.yaw])

    def part_boxes(self, t: float) -> np.ndarray:
        """(P, 7) the parts as boxes in the global frame at time t."""
        w, l, h = self.wlh
        parts = np.array(self.cls.parts)
        local = np.stack([(parts[:, 0] + parts[:, 1]) / 2 * l, (parts[:, 2] + parts[:, 3]) / 2 * w,
                          (parts[:, 4] + parts[:, 5]) / 2 * h], axis=1)
        centre = self.center(t)
        centre[2] = 0.0
        xyz = local @ rot_z(self.yaw).T + centre
        size = np.stack([(parts[:, 1] - parts[:, 0]) * l, (parts[:, 3] - parts[:, 2]) * w,
                         (parts[:, 5] - parts[:, 4]) * h], axis=1)
        return np.concatenate([xyz, size, np.full((len(parts), 1), self.yaw)], axis=1)

    @property
    def radius(self) -> float:
        return 0.5 * math.hypot(self.wlh[0], self.wlh[1])


def instance_counts(rng: np.random.Generator, every_class: bool) -> list[tuple[ObjectClass, int, bool]]:
    """(class, count, required) per class for one scene: 0..MAX_PER_CLASS of each detection class (at least one
    when `every_class`; those are required, i.e. placement must succeed) and 0..MAX_DISTRACTORS distractors."""
    counts = []
    for cls in CLASSES:
        count = int(rng.integers(0, MAX_PER_CLASS + 1))
        counts.append((cls, max(count, 1) if every_class else count, every_class))
    distractors = rng.choice(len(DISTRACTORS), size=int(rng.integers(0, MAX_DISTRACTORS + 1)))
    counts += [(DISTRACTORS[int(i)], 1, False) for i in distractors]
    return counts


def place_objects(rng: np.random.Generator, ego: EgoTrajectory, times: np.ndarray,
                  counts: list[tuple[ObjectClass, int, bool]]) -> list[SceneObject]:
    """Place `counts` instances, each within 0.75 of its class range from the ego and clear of the ego and of
    each other at every time in `times` (s). An optional instance that finds no free place is left out; a
    required one that finds none stands still (always possible: the ego moves at most 16 m)."""
    ego_xy = np.stack([ego.pose(t)[0][:2] for t in times])                    # (T, 2)
    mid = ego_xy[len(times) // 2]
    placed: list[SceneObject] = []
    tracks: list[np.ndarray] = []                                              # (T, 2) per placed object
    for cls, count, required in counts:
        for _ in range(count):
            for attempt in range(1000):
                moving = rng.random() < cls.moving_prob and attempt < 500
                angle, radius = rng.uniform(-math.pi, math.pi), rng.uniform(6.0, 0.7 * cls.eval_range)
                wlh = tuple(float(rng.uniform(low, high)) for low, high in cls.size_range)
                obj = SceneObject(
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
                                       f"for the whole scene")
    return placed
