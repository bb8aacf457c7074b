"""Sensor corruptions of a loaded sample for the robustness benchmark (``aqrcmt evaluate --corruptions``).

A :class:`SensorCorruption` (name, severity 1-3, seed) changes a sample as it comes off the disk, before any
transform of the pipeline: points in the key frame's LiDAR frame (all sweeps, (N, 5) x, y, z, intensity, time
lag), the full-size BGR uint8 images and the calibration (intrinsics K4, lidar2cam). The GT is never touched.
The dataset applies it (:class:`aqrcmt.data.dataset.NuScenesDataset` ``corruption=``), so the test
pipeline and the model see a corrupted sensor exactly as they would see a clean one.

Randomness: one generator per (seed, sample token, corruption name), independent of the severity; the
severity only scales what is drawn, so the corruption is deterministic per (seed, sample, severity) and nested
across severities (the points dropped at severity 1 are also dropped at 2, the perturbation axis is the same,
only larger). Each severity's parameter, in physical units, is in :data:`CORRUPTIONS` and docs/robustness.md.
The sensor failures of nuScenes-R (:data:`FAILURES`: a sensor, some cameras, beams, field of view or objects
missing) are corruptions too.

The functions below are pure functions of arrays; :data:`CORRUPTIONS` binds each to a sample. A temporal
misalignment is a choice of frame instead: the dataset loads the delayed sensor from an earlier key frame
(:meth:`SensorCorruption.delay`), so it costs no extra loading.
"""
from __future__ import annotations

import math
import statistics
import zlib
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Protocol

import cv2
import numpy as np

from aqrcmt.data.box_geometry import points_in_boxes
from aqrcmt.data.transforms import Sample
from aqrcmt.structures import FAILURES, SENSOR_DEGRADED, SENSOR_DROPPED

SEVERITIES: tuple[int, ...] = (1, 2, 3)
KEY_FRAME_INTERVAL_S = 0.5          # nuScenes key frames (samples) are 2 Hz
REFERENCE_IMAGE_WIDTH = 1600        # px: pixel lengths below are given at the nuScenes camera width
LIDAR_HEIGHT = 1.84                 # m above the ground of nuScenes' LIDAR_TOP (the camera-fog ground plane)
FAR_DEPTH = 1000.0                  # m: depth of pixels whose ray does not meet the ground (sky, horizon)
AIRLIGHT = 0.85                     # fog colour, fraction of white
DISPLAY_GAMMA = 2.2                 # sRGB-like encoding of the 8-bit images: linear light = (v / 255) ** 2.2
FULL_SCALE_ELECTRONS = 2000.0       # photo-electrons of a white pixel at the clean exposure (shot noise)
READ_NOISE_ELECTRONS = 3.0
FOG_SCATTER_PROBABILITY = 0.5       # a LiDAR point lost to fog comes back as a back-scatter return with this p
FOG_SCATTER_INTENSITY = 2.0         # back-scatter and snow-flake returns: intensity U(0, this) (raw 0-255)
MIN_RETURN_RANGE = 1.0              # m: the nearest range of a fog or snow return


def extinction(visibility_m: float) -> float:
    """Extinction coefficient (1/m) of a medium of meteorological visibility `visibility_m` (Koschmieder)."""
    return 3.912 / visibility_m


# --------------------------------------------------------------------------------------------------
# LiDAR: pure functions of (N, 5) points
# --------------------------------------------------------------------------------------------------
def drop_beams(points: np.ndarray, rings: np.ndarray, keep_every: int) -> np.ndarray:
    """Points of every `keep_every`-th ring (ring index % keep_every == 0): a sensor with 1/keep_every the beams."""
    return points[rings.astype(np.int64) % keep_every == 0]


def drop_points(points: np.ndarray, fraction: float, draws: np.ndarray) -> np.ndarray:
    """Points whose uniform draw in `draws` (N,) is >= `fraction`: about `fraction` of them removed at random."""
    return points[draws >= fraction]


def _along_ray(points: np.ndarray, new_range: np.ndarray, intensity: np.ndarray) -> np.ndarray:
    """Copies of `points` moved along their ray from the origin to `new_range` (m), with a new intensity."""
    out = points.copy()
    distance = np.linalg.norm(points[:, :3], axis=1, keepdims=True)
    out[:, :3] = points[:, :3] * (new_range[:, None] / np.maximum(distance, 1e-6))
    out[:, 3] = intensity
    return out


def lidar_fog(points: np.ndarray, visibility_m: float, rng: np.random.Generator) -> np.ndarray:
    """Fog of meteorological visibility `visibility_m`: two-way attenuation exp(-2 beta r) of every return.

    A point at range r survives with probability exp(-2 beta r), its intensity scaled by the same factor; a lost
    point comes back, with probability FOG_SCATTER_PROBABILITY, as a weak back-scatter return on its ray at a
    range drawn from the fog's mean free path (1 m + Exp(1 / (2 beta)), if nearer than the target).
    Ranges are from the key frame's LiDAR origin (sweeps from the few metres the ego moved are not corrected).
    """
    beta = extinction(visibility_m)
    distance = np.linalg.norm(points[:, :3], axis=1)
    transmission = np.exp(-2.0 * beta * distance)
    survive, scatter = rng.random(len(points)), rng.random(len(points))
    scatter_range = MIN_RETURN_RANGE + rng.exponential(1.0 / (2.0 * beta), len(points))
    scatter_intensity = rng.uniform(0.0, FOG_SCATTER_INTENSITY, len(points))
    kept = survive < transmission
    attenuated = points[kept].copy()
    attenuated[:, 3] *= transmission[kept]
    back = ~kept & (scatter < FOG_SCATTER_PROBABILITY) & (scatter_range < distance)
    return np.concatenate([attenuated, _along_ray(points[back], scatter_range[back], scatter_intensity[back])])


def lidar_snow(points: np.ndarray, flake_fraction: float, intensity_loss: float,
               rng: np.random.Generator) -> np.ndarray:
    """Snowfall: a fraction `flake_fraction` of the beams hit a flake before their target (the point moves along
    its ray to a range U(1 m, r), intensity U(0, FOG_SCATTER_INTENSITY)); the others lose `intensity_loss` of
    their intensity (wet, attenuating air). The point count is unchanged."""
    hit, flake_range = rng.random(len(points)), rng.random(len(points))
    flake_intensity = rng.uniform(0.0, FOG_SCATTER_INTENSITY, len(points))
    out = points.copy()
    out[:, 3] *= 1.0 - intensity_loss
    flakes = hit < flake_fraction
    distance = np.linalg.norm(points[flakes, :3], axis=1)
    near = MIN_RETURN_RANGE + flake_range[flakes] * np.maximum(distance - MIN_RETURN_RANGE, 0.0)
    out[flakes] = _along_ray(points[flakes], np.minimum(near, distance), flake_intensity[flakes])
    return out


def limit_fov(points: np.ndarray, half_width_deg: float) -> np.ndarray:
    """Points within +-`half_width_deg` of the ego's heading, the rest removed. The points are in nuScenes'
    LIDAR_TOP frame (x to the ego's right, y forward, z up), so the angle from the heading is atan2(x, y)."""
    return points[np.abs(np.degrees(np.arctan2(points[:, 0], points[:, 1]))) <= half_width_deg]


def drop_objects(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Points outside every box of `boxes` (n, >= 7): the LiDAR returns of those objects removed."""
    return points[~points_in_boxes(points[:, :3], boxes).any(axis=1)]


def blank_sector(points: np.ndarray, start_deg: float, width_deg: float) -> np.ndarray:
    """Points whose azimuth lies in [start, start + width) degrees zeroed (every column, as ModalMask3D does)."""
    azimuth = np.degrees(np.arctan2(points[:, 1], points[:, 0]))
    inside = np.mod(azimuth - start_deg, 360.0) < width_deg
    out = points.copy()
    out[inside] = 0.0
    return out


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
def rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    """(3, 3) rotation by `angle` (rad) about the unit vector `axis` (Rodrigues)."""
    x, y, z = axis
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * k @ k


def perturb_extrinsics(lidar2cam: np.ndarray, axes: np.ndarray, directions: np.ndarray, rotation_deg: float,
                       translation_m: float) -> np.ndarray:
    """(6, 4, 4) lidar2cam, each camera's frame moved by a rotation of `rotation_deg` about `axes[i]` and a shift of
    `translation_m` along `directions[i]` (unit vectors in the camera frame): lidar2cam' = dT @ lidar2cam."""
    out = lidar2cam.copy()
    for i, (axis, direction) in enumerate(zip(axes, directions)):
        delta = np.eye(4)
        delta[:3, :3] = rotation_about(axis, math.radians(rotation_deg))
        delta[:3, 3] = translation_m * direction
        out[i] = delta @ lidar2cam[i]
    return out


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Cameras: pure functions of (6, H, W, 3) uint8 BGR images
# --------------------------------------------------------------------------------------------------
_VALUES = np.arange(256, dtype=np.float64)
_LINEAR = (_VALUES / 255.0) ** DISPLAY_GAMMA                                   # 8-bit value -> linear light
# Standard-normal quantiles at (k + 0.5) / 256: noise drawn as one random byte per pixel (|z| <= 2.9).
_NORMAL_QUANTILES = np.array([statistics.NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)])


def _encode(linear: np.ndarray) -> np.ndarray:
    """Linear light (1 = white) -> 8-bit values, clipped."""
    return (np.clip(linear, 0.0, 1.0) ** (1.0 / DISPLAY_GAMMA) * 255.0 + 0.5).astype(np.uint8)


def _lookup(images: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[images]`` for a (256,) uint8 table (cv2.LUT: one pass, no temporary)."""
    return cv2.LUT(images.reshape(-1, images.shape[-2] * images.shape[-1]), table).reshape(images.shape)


def _pair_lookup(first: np.ndarray, images: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[first, images]`` for a (256, 256) uint8 table and a uint8 `first` broadcastable to `images`."""
    index = np.empty(images.shape, dtype=np.uint16)
    np.left_shift(first, 8, out=index, dtype=np.uint16, casting="unsafe")
    np.bitwise_or(index, images, out=index)
    return np.take(table.reshape(-1), index)


def exposure(images: np.ndarray, stops: float) -> np.ndarray:
    """Linear light times 2**stops (over-exposure for stops > 0), clipped at white."""
    return _lookup(images, _encode(_LINEAR * 2.0 ** stops))


def darken(images: np.ndarray, stops: float, rng: np.random.Generator) -> np.ndarray:
    """Linear light times 2**-stops with the sensor noise of the fewer photo-electrons: shot noise of a
    FULL_SCALE_ELECTRONS white pixel plus READ_NOISE_ELECTRONS read noise (Gaussian, per pixel and channel).

    Exact per (value, noise quantile) through a 256 x 256 table; the noise is one random byte per pixel.
    """
    electrons = _LINEAR * FULL_SCALE_ELECTRONS * 2.0 ** -stops                          # (256,) mean signal
    noisy = electrons[None, :] + _NORMAL_QUANTILES[:, None] * np.sqrt(electrons + READ_NOISE_ELECTRONS ** 2)
    table = _encode(noisy / FULL_SCALE_ELECTRONS)                                      # [quantile, value]
    quantiles = np.frombuffer(rng.bytes(images.size), dtype=np.uint8).reshape(images.shape)
    return _pair_lookup(quantiles, images, table)


def motion_blur(images: np.ndarray, length_px: float, angles_rad: np.ndarray) -> np.ndarray:
    """Each view convolved with a line kernel `length_px` long (at REFERENCE_IMAGE_WIDTH, scaled to the image
    width) along its angle `angles_rad[i]`: the smear of the image moving during the exposure."""
    length = max(length_px * images.shape[2] / REFERENCE_IMAGE_WIDTH, 1.0)
    out = np.empty_like(images)
    for i, (view, angle) in enumerate(zip(images, angles_rad)):
        out[i] = cv2.filter2D(view, -1, line_kernel(length, angle), borderType=cv2.BORDER_REFLECT)
    return out


def line_kernel(length: float, angle: float) -> np.ndarray:
    """(k, k) float32 kernel summing to 1: a centred segment `length` px long at `angle` (rad), drawn by bilinear
    splats of 4 samples per pixel (sub-pixel lengths blur too)."""
    size = int(math.ceil(length)) // 2 * 2 + 3
    kernel = np.zeros((size, size), dtype=np.float32)
    centre = size // 2
    for t in np.linspace(-(length - 1.0) / 2.0, (length - 1.0) / 2.0, max(int(4 * length), 2)):
        x, y = centre + t * math.cos(angle), centre + t * math.sin(angle)
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        kernel[y0, x0] += (1 - fx) * (1 - fy)
        kernel[y0, x0 + 1] += fx * (1 - fy)
        kernel[y0 + 1, x0] += (1 - fx) * fy
        kernel[y0 + 1, x0 + 1] += fx * fy
    return kernel / kernel.sum()


def ground_depth(intrinsics: np.ndarray, lidar2cam: np.ndarray, hw: tuple[int, int], step: int) -> np.ndarray:
    """(6, H', W') float64 distance (m) from each camera to the flat ground LIDAR_HEIGHT below the LiDAR along the
    rays of the pixels (0, step, 2 step, ...) x (0, step, ...) covering (H, W); FAR_DEPTH where a ray misses it."""
    height, width = hw
    us, vs = np.meshgrid(np.arange(0, width + step, step, dtype=np.float64),
                         np.arange(0, height + step, step, dtype=np.float64))
    pixels = np.stack([us, vs, np.ones_like(us)], axis=-1).reshape(-1, 3)
    depth = np.empty((len(intrinsics), *us.shape))
    for i, (k4, extrinsic) in enumerate(zip(intrinsics, lidar2cam)):
        cam2lidar = np.linalg.inv(extrinsic)
        rays = pixels @ np.linalg.inv(k4[:3, :3]).T @ cam2lidar[:3, :3].T          # LiDAR-frame directions
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        drop = cam2lidar[2, 3] + LIDAR_HEIGHT                                        # camera height over ground
        with np.errstate(divide="ignore", invalid="ignore"):
            distance = np.where(rays[:, 2] < 0, drop / -rays[:, 2], FAR_DEPTH)
        depth[i] = np.minimum(distance, FAR_DEPTH).reshape(us.shape)
    return depth


def camera_fog(images: np.ndarray, intrinsics: np.ndarray, lidar2cam: np.ndarray, visibility_m: float,
               step: int = 8) -> np.ndarray:
    """Koschmieder's haze: I = J t + A (1 - t), t = exp(-beta d), A = AIRLIGHT white (rounded to 8 bits), d the
    flat-ground depth (:func:`ground_depth`, every `step` px, t interpolated bilinearly between)."""
    height, width = images.shape[1:3]
    transmission = np.exp(-extinction(visibility_m) * ground_depth(intrinsics, lidar2cam, (height, width), step))
    airlight = np.full(images.shape[1:], round(255.0 * AIRLIGHT), dtype=np.uint8)
    out = np.empty_like(images)
    for i, coarse in enumerate(transmission.astype(np.float32)):
        t = cv2.resize(coarse, (coarse.shape[1] * step, coarse.shape[0] * step),
                       interpolation=cv2.INTER_LINEAR)[:height, :width]
        out[i] = cv2.blendLinear(images[i], airlight, np.ascontiguousarray(t), 1.0 - t)
    return out


# --------------------------------------------------------------------------------------------------
# Binding to a sample
# --------------------------------------------------------------------------------------------------
class FrameSource(Protocol):
    """What beam reduction needs beyond the loaded sample; the dataset provides it."""

    def rings(self) -> np.ndarray:
        """(N,) ring (beam) index of every point of the loaded sample, from column 4 of the raw files."""


Apply = Callable[..., None]   # (sample, rng, frames, *parameters) -> None, changes the sample in place


def _beams(sample: Sample, rng: np.random.Generator, frames: FrameSource, keep_every: float) -> None:
    sample.points = drop_beams(sample.points, frames.rings(), int(keep_every))


def _points(sample: Sample, rng: np.random.Generator, frames: FrameSource, fraction: float) -> None:
    sample.points = drop_points(sample.points, fraction, rng.random(len(sample.points)))


def _fog(sample: Sample, rng: np.random.Generator, frames: FrameSource, visibility: float) -> None:
    sample.points = lidar_fog(sample.points, visibility, rng)


def _snow(sample: Sample, rng: np.random.Generator, frames: FrameSource, flake_fraction: float,
          intensity_loss: float) -> None:
    sample.points = lidar_snow(sample.points, flake_fraction, intensity_loss, rng)


def _drop_lidar(sample: Sample, rng: np.random.Generator, frames: FrameSource) -> None:
    sample.points = sample.points[:0]
    sample.sensors.lidar = SENSOR_DROPPED


def _limited_fov(sample: Sample, rng: np.random.Generator, frames: FrameSource, half_width_deg: float) -> None:
    sample.points = limit_fov(sample.points, half_width_deg)
    sample.sensors.lidar_fov = min(sample.sensors.lidar_fov, math.radians(half_width_deg))


def _object_failure(sample: Sample, rng: np.random.Generator, frames: FrameSource, fraction: float) -> None:
    failed = rng.permutation(len(sample.gt_boxes))[: round(fraction * len(sample.gt_boxes))]
    sample.points = drop_objects(sample.points, sample.gt_boxes[failed])


def _lidar_sector(sample: Sample, rng: np.random.Generator, frames: FrameSource, width_deg: float) -> None:
    sample.points = blank_sector(sample.points, rng.uniform(0.0, 360.0), width_deg)


def _spatial(sample: Sample, rng: np.random.Generator, frames: FrameSource, rotation_deg: float,
             translation_m: float) -> None:
    axes, directions = _unit_vectors(rng, len(sample.lidar2cam)), _unit_vectors(rng, len(sample.lidar2cam))
    sample.lidar2cam = perturb_extrinsics(sample.lidar2cam, axes, directions, rotation_deg, translation_m)


def _blur(sample: Sample, rng: np.random.Generator, frames: FrameSource, length_px: float) -> None:
    sample.images = motion_blur(sample.images, length_px, rng.uniform(0.0, math.pi, len(sample.images)))


def _brightness(sample: Sample, rng: np.random.Generator, frames: FrameSource, stops: float) -> None:
    sample.images = exposure(sample.images, stops)


def _darkness(sample: Sample, rng: np.random.Generator, frames: FrameSource, stops: float) -> None:
    sample.images = darken(sample.images, stops, rng)


def _camera_fog(sample: Sample, rng: np.random.Generator, frames: FrameSource, visibility: float) -> None:
    sample.images = camera_fog(sample.images, sample.intrinsics, sample.lidar2cam, visibility)


def _blank_cameras(sample: Sample, rng: np.random.Generator, frames: FrameSource, count: float) -> None:
    images = sample.images.copy()
    blanked = rng.permutation(len(images))[: int(count)]
    images[blanked] = 0                                              # black, as ModalMask3D / ModalityDrop
    sample.images = images
    sample.sensors.views[blanked] = SENSOR_DROPPED


@dataclass(frozen=True)
class CorruptionKind:
    """One corruption: the sensor it hits, its parameters per severity 1-3 (`units` names them) and its function,
    called as ``apply(sample, rng, frames, *levels[severity - 1])``; None for a temporal misalignment, whose
    one parameter is the sensor's delay (s): the dataset loads that sensor from an earlier key frame."""
    sensor: Literal["lidar", "camera"]
    levels: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]
    units: str
    apply: Optional[Apply]
    # True: `apply` records in ``sample.sensors`` what failed (a dropped sensor or view, a narrowed field of
    # view); False: the sensor is marked degraded (no router target).
    records_state: bool = False


CORRUPTIONS: dict[str, CorruptionKind] = {
    "beam_reduction": CorruptionKind("lidar", ((2,), (4,), (8,)), "keep every k-th ring (32 -> 16, 8, 4 beams)",
                                     _beams),
    "points_reduction": CorruptionKind("lidar", ((0.5,), (0.7,), (0.9,)), "fraction of points dropped", _points),
    "lidar_fog": CorruptionKind("lidar", ((600.0,), (300.0,), (150.0,)), "visibility (m)", _fog),
    "snow": CorruptionKind("lidar", ((0.02, 0.2), (0.05, 0.4), (0.10, 0.6)),
                           "fraction of beams hitting a flake, fraction of intensity lost", _snow),
    "missing_lidar": CorruptionKind("lidar", ((90.0,), (180.0,), (360.0,)), "azimuth sector blanked (deg)",
                                    _lidar_sector),
    "temporal_misalignment_lidar": CorruptionKind("lidar", ((0.5,), (1.0,), (1.5,)), "LiDAR delay (s)",
                                                  None),
    "spatial_misalignment": CorruptionKind("camera", ((0.5, 0.05), (1.0, 0.10), (2.0, 0.20)),
                                           "extrinsic rotation (deg), translation (m)", _spatial),
    "temporal_misalignment_camera": CorruptionKind("camera", ((0.5,), (1.0,), (1.5,)), "camera delay (s)",
                                                   None),
    "motion_blur": CorruptionKind("camera", ((8.0,), (16.0,), (32.0,)), "blur length (px at 1600 px width)", _blur),
    "brightness": CorruptionKind("camera", ((0.5,), (1.0,), (1.5,)), "over-exposure (stops)", _brightness),
    "darkness": CorruptionKind("camera", ((2.0,), (3.0,), (4.0,)), "under-exposure (stops), with sensor noise",
                               _darkness),
    "camera_fog": CorruptionKind("camera", ((600.0,), (300.0,), (150.0,)), "visibility (m)", _camera_fog),
    "missing_cameras": CorruptionKind("camera", ((1,), (3,), (6,)), "cameras blanked", _blank_cameras, True),
    # The sensor failures of nuScenes-R (see FAILURES).
    "lidar_drop": CorruptionKind("lidar", ((), (), ()), "every point removed (the same at every severity)",
                                 _drop_lidar, True),
    "camera_drop": CorruptionKind("camera", ((6,), (6,), (6,)), "cameras blanked: all six at every severity",
                                  _blank_cameras, True),
    "view_drop": CorruptionKind("camera", ((1,), (2,), (3,)), "cameras blanked (the field's 1 and 3: severities "
                                "1 and 3)", _blank_cameras, True),
    "limited_fov": CorruptionKind("lidar", ((90.0,), (60.0,), (30.0,)), "points kept within +-deg of the ego's "
                                  "heading (the field's +-60: severity 2)", _limited_fov, True),
    "object_failure": CorruptionKind("lidar", ((0.25,), (0.5,), (0.75,)), "fraction of the GT boxes whose points "
                                     "are removed (the field's half: severity 2)", _object_failure),
}


@dataclass(frozen=True)
class SensorCorruption:
    """Corruption `name` (a key of :data:`CORRUPTIONS`) at `severity` (1-3), its draws seeded by `seed`."""
    name: str
    severity: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {self.name!r}; known: {', '.join(CORRUPTIONS)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r} of corruption {self.name!r}; known: "
                             f"{', '.join(map(str, SEVERITIES))}")

    @property
    def kind(self) -> CorruptionKind:
        return CORRUPTIONS[self.name]

    @property
    def parameters(self) -> tuple[float, ...]:
        """This severity's parameters, in the kind's `units`."""
        return self.kind.levels[self.severity - 1]

    def rng(self, token: str) -> np.random.Generator:
        """The generator of (seed, sample token, corruption name): the same at every severity."""
        return np.random.default_rng([self.seed, zlib.crc32(token.encode()), zlib.crc32(self.name.encode())])

    def delay(self, sensor: Literal["lidar", "camera"]) -> int:
        """Key frames (KEY_FRAME_INTERVAL_S each) by which `sensor` lags: the dataset loads it that much earlier."""
        if self.kind.apply is not None or self.kind.sensor != sensor:
            return 0
        return round(self.parameters[0] / KEY_FRAME_INTERVAL_S)

    def __call__(self, sample: Sample, frames: FrameSource) -> Sample:
        """Corrupt a sample loaded (with :meth:`delay` applied) and not yet transformed, in place; returns it."""
        if self.kind.apply is not None:
            if self.kind.sensor == "camera" and (sample.images is None or sample.lidar2cam is None):
                raise ValueError(f"corruption {self.name!r} changes the cameras but sample {sample.token} has no "
                                 "images (data.load_images=false?)")
            self.kind.apply(sample, self.rng(sample.token), frames, *self.parameters)
        if not self.kind.records_state:
            if self.kind.sensor == "lidar":
                sample.sensors.lidar = SENSOR_DEGRADED
            else:
                sample.sensors.views[:] = SENSOR_DEGRADED
        return sample


def draw_failure(probabilities: dict[str, float], rng: np.random.Generator) -> Optional[SensorCorruption]:
    """At most one failure scenario for a training sample (``data.augment.failures``): scenario `name` with
    probability ``probabilities[name]``, its severity uniform over SEVERITIES, its draws seeded from `rng`."""
    u, cumulative = rng.random(), 0.0
    for name, probability in probabilities.items():
        cumulative += probability
        if u < cumulative:
            return SensorCorruption(name, int(rng.choice(SEVERITIES)), int(rng.integers(2**31)))
    return None


def parse_corruptions(names: list[str], severities: list[int], seed: int = 0) -> list[SensorCorruption]:
    """SensorCorruptions of the named corruptions (``["all"]``: every one, ``["failures"]``: :data:`FAILURES`) at
    each severity, in that order."""
    chosen = list(CORRUPTIONS) if names == ["all"] else list(FAILURES) if names == ["failures"] else names
    return [SensorCorruption(name, severity, seed) for name in chosen for severity in severities]
