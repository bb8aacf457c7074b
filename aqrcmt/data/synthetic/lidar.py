"""The LiDAR: a 32-beam spinning sensor whose rays return from the nearest surface (ground or object part).

Beams at vertical angles from -30.67 to +10.67 deg (a Velodyne HDL-32E, nuScenes' LIDAR_TOP), one column of 32
rays every `azimuth_step_deg`; a ray returns at its first hit within `MAX_RANGE_M`, with range noise. Points per
object then fall with range as on the real sensor (fewer rays cross a farther object), objects hide what is
behind them, and the `ring` column is the beam index (0 = lowest), so beam reduction by ring behaves as on a
real sensor. Rain drops returns and adds spurious near returns (droplets); fog drops more with range and adds
more near returns.
"""
from __future__ import annotations

import math
from functools import cache

import numpy as np

from aqrcmt.data.synthetic.world import SceneConditions, rot_z

BEAM_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
AZIMUTH_STEP_DEG = 0.4
MAX_RANGE_M = 70.0
RANGE_NOISE_M = 0.02
_GROUND_INTENSITY = (2.0, 12.0)


@cache
def beam_directions(azimuth_step_deg: float) -> np.ndarray:
    """(32, A, 3) unit ray directions in the sensor frame (x forward, z up), columns at azimuths 0, step, ..."""
    azimuth = np.radians(np.arange(0.0, 360.0, azimuth_step_deg))
    elevation = np.radians(BEAM_ELEVATIONS_DEG)[:, None]
    return np.stack(np.broadcast_arrays(np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                                        np.sin(elevation)), axis=-1)


def _ray_box_distance(origin: np.ndarray, directions: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(R,) distance along unit rays (R, 3) from `origin` (3,) to their entry into a box (7,) (global frame);
    inf where a ray misses it. The sensor is never inside a box."""
    rot = rot_z(float(box[6]))
    start = (origin - box[:3]) @ rot                                        # box frame
    delta = directions @ rot
    half = box[3:6] / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - start) / delta, (half - start) / delta
    t_near = np.where(delta != 0, np.minimum(t1, t2), -np.inf).max(axis=1)
    t_far = np.where(delta != 0, np.maximum(t1, t2), np.inf).min(axis=1)
    parallel_outside = ((delta == 0) & (np.abs(start) > half)).any(axis=1)
    hit = ~parallel_outside & (t_near <= t_far) & (t_near > 0)
    return np.where(hit, t_near, np.inf)


def _columns_towards(box: np.ndarray, origin: np.ndarray, sensor_rotation: np.ndarray,
                     azimuth_step_deg: float, num_columns: int) -> np.ndarray:
    """Indices of the azimuth columns whose rays may cross `box` (its bounding circle seen from the sensor)."""
    centre = (box[:3] - origin) @ sensor_rotation                           # sensor frame
    distance = math.hypot(centre[0], centre[1])
    radius = 0.5 * math.hypot(box[3], box[4])
    if distance <= radius:
        return np.arange(num_columns)
    half_width = math.degrees(math.asin(radius / distance)) + azimuth_step_deg
    middle = math.degrees(math.atan2(centre[1], centre[0]))
    first = math.floor((middle - half_width) / azimuth_step_deg)
    last = math.ceil((middle + half_width) / azimuth_step_deg)
    return np.unique(np.arange(first, last + 1) % num_columns)


def scan(rng: np.random.Generator, parts: np.ndarray, owners: np.ndarray, intensities: np.ndarray,
         sensor2global: np.ndarray, conditions: SceneConditions, with_visibility: bool = True,
         azimuth_step_deg: float = AZIMUTH_STEP_DEG) -> tuple[np.ndarray, np.ndarray]:
    """One sweep. parts: (P, 7) boxes of the objects' parts (global frame); owners: (P,) index of each part's
    object; intensities: (K,) mean return intensity per object.

    Returns (N, 5) float32 points (x, y, z, intensity, ring) in the sensor frame and (K,) per object the fraction
    of the rays reaching it that it is the first to return (1 = unoccluded; 0 when no ray reaches it; all 0
    without `with_visibility`).
    """
    directions = beam_directions(azimuth_step_deg)
    beams, columns, _ = directions.shape
    rotation, origin = sensor2global[:3, :3], sensor2global[:3, 3]
    global_directions = directions @ rotation.T
    with np.errstate(divide="ignore"):
        distance = np.where(global_directions[..., 2] < -1e-9, -origin[2] / global_directions[..., 2], np.inf)
    first_hit = np.full((beams, columns), -1)                              # -1 = ground (or nothing)
    reaching: list[list[np.ndarray]] = [[] for _ in range(len(intensities))]
    for box, owner in zip(parts, owners):
        cols = _columns_towards(box, origin, rotation, azimuth_step_deg, columns)
        candidate = global_directions[:, cols].reshape(-1, 3)
        t = _ray_box_distance(origin, candidate, box).reshape(beams, len(cols))
        before_ground = t < distance[:, cols]
        if with_visibility:
            rows, hit_cols = np.nonzero(t <= MAX_RANGE_M)
            reaching[owner].append(rows * columns + cols[hit_cols])
        nearer = np.nonzero(before_ground)
        distance[nearer[0], cols[nearer[1]]] = t[nearer]
        first_hit[nearer[0], cols[nearer[1]]] = owner

    flat_owner = first_hit.reshape(-1)
    visible_fraction = np.zeros(len(intensities))
    for k, rays in enumerate(reaching):
        rays = np.unique(np.concatenate(rays)) if rays else np.zeros(0, dtype=np.int64)
        if len(rays):
            visible_fraction[k] = float((flat_owner[rays] == k).mean())

    keep = distance.reshape(-1) <= MAX_RANGE_M
    rng_draws = rng.random((2, beams * columns))
    if conditions.rain:
        keep &= rng_draws[0] >= 0.15                                       # returns lost in the rain
    if conditions.fog:
        keep &= rng_draws[0] < np.exp(-np.minimum(distance.reshape(-1), MAX_RANGE_M) / 40.0)
    near_share = (0.015 if conditions.rain else 0.0) + (0.03 if conditions.fog else 0.0)
    spurious = rng_draws[1] < near_share                                   # droplets: a return a few metres out
    ray_distance = distance.reshape(-1).copy()
    ray_distance[spurious] = rng.uniform(1.0, 6.0, size=int(spurious.sum()))
    returned = np.nonzero(keep | spurious)[0]
    ranges = ray_distance[returned] + rng.normal(0.0, RANGE_NOISE_M, size=len(returned))
    xyz = directions.reshape(-1, 3)[returned] * ranges[:, None]
    owner = np.where(spurious[returned], -2, flat_owner[returned])
    object_intensity = np.append(intensities, 0.0)[np.where(owner >= 0, owner, len(intensities))]   # no objects: ok
    intensity = object_intensity + rng.normal(0, 5.0, len(returned))
    intensity = np.where(owner == -1, rng.uniform(*_GROUND_INTENSITY, size=len(returned)), intensity)
    intensity = np.where(owner == -2, rng.uniform(0.0, 3.0, size=len(returned)), intensity)
    if conditions.rain:
        intensity *= 0.7                                                    # wet surfaces reflect less back
    ring = returned // columns
    points = np.concatenate([xyz, np.clip(intensity, 0, 255)[:, None], ring[:, None]], axis=1)
    return points.astype(np.float32), visible_fraction
