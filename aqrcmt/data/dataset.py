"""nuScenes as a PyTorch Dataset: the samples of an index (:mod:`aqrcmt.data.index`) loaded from disk.

A loaded sample (:class:`aqrcmt.data.transforms.Sample`) holds, in the key frame's LiDAR frame:
- points of the key frame and ``sweeps - 1`` previous LiDAR sweeps, (N, 5): x, y, z, intensity, time lag (s);
- the six camera images (BGR uint8), the intrinsics K4 and lidar2cam (float64);
- GT boxes (n, 9) (gravity centre, (dx, dy, dz) = (l, w, h), yaw, vx, vy) and labels, keeping boxes with
  ``num_lidar_pts > 0`` whose name maps to one of the 10 detection classes.

A training dataset leaves out the samples without such a box when it is built (mmdet3d's ``filter_empty_gt``;
nuScenes has such samples) and counts them in ``num_empty_gt``.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from aqrcmt.structures import CAMERA_NAMES, CLASS_NAMES
from aqrcmt.data.corruptions import SensorCorruption, draw_failure
from aqrcmt.data.files import BadSampleError, DatasetError, read_image
from aqrcmt.data.index import pose_matrix
from aqrcmt.data.transforms import Pipeline, Sample

POINT_DIM = 5               # float32 values per point in a .pcd.bin: x, y, z, intensity, ring


def resolve_path(path: str, root: Path) -> Path:
    """A file named in an info, under `root`: the part from 'samples/' or 'sweeps/' on is kept (portable pkls)."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("samples", "sweeps"):
            return root.joinpath(*parts[i:])
    return Path(path) if Path(path).is_absolute() else root / path


def lidar2global(info: dict) -> np.ndarray:
    """(4, 4) float64 key-frame LiDAR -> global (m) of an info: ego2global @ lidar2ego."""
    return pose_matrix(info["ego2global_translation"], info["ego2global_rotation"]) @ \
        pose_matrix(info["lidar2ego_translation"], info["lidar2ego_rotation"])


def camera_matrices(info: dict) -> tuple[np.ndarray, np.ndarray]:
    """Intrinsics K4 (6, 4, 4) and lidar2cam (6, 4, 4), float64, of an info's cameras in CAMERA_NAMES order;
    lidar2cam = [[R^T, -R^T t], [0, 1]] of the camera's sensor2lidar rotation R and translation t (m)."""
    intrinsics, lidar2cam = np.tile(np.eye(4), (6, 1, 1)), np.zeros((6, 4, 4))
    for i, name in enumerate(CAMERA_NAMES):
        cam = info["cams"][name]
        intrinsics[i, :3, :3] = cam["cam_intrinsic"]
        rotation = np.asarray(cam["sensor2lidar_rotation"])
        lidar2cam[i, :3, :3] = rotation.T
        lidar2cam[i, :3, 3] = -rotation.T @ np.asarray(cam["sensor2lidar_translation"])
        lidar2cam[i, 3, 3] = 1.0
    return intrinsics, lidar2cam


def lidar_points(info: dict, root: str | Path, sweeps: int) -> np.ndarray:
    """(N, 5) float32 x, y, z (m), intensity, time lag (s) of an info's key frame (lag 0) and up to `sweeps - 1`
    previous sweeps moved into the key frame's LiDAR frame; the files resolved under `root`
    (:func:`resolve_path`). BadSampleError names a missing, truncated or non-finite file."""
    frames = []
    for points, sweep in _raw_frames(info, Path(root), sweeps):
        if sweep is None:
            points[:, 4] = 0.0
        else:
            rotation = np.asarray(sweep["sensor2lidar_rotation"])
            points[:, :3] = points[:, :3] @ rotation.T.astype(np.float32) + \
                np.asarray(sweep["sensor2lidar_translation"], dtype=np.float32)
            points[:, 4] = (info["timestamp"] - sweep["timestamp"]) / 1e6
        frames.append(points)
    return np.concatenate(frames)


def _raw_frames(info: dict, root: Path, sweeps: int) -> list[tuple[np.ndarray, Optional[dict]]]:
    """The key frame's and up to `sweeps - 1` sweeps' raw points, each with its sweep entry (None: key frame)."""
    frames = [(_read_points(resolve_path(info["lidar_path"], root), info["token"]), None)]
    for sweep in info["sweeps"][: sweeps - 1]:
        frames.append((_read_points(resolve_path(sweep["data_path"], root), info["token"]), sweep))
    return frames


def _read_points(path: Path, token: str) -> np.ndarray:
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


class NuScenesDataset(Dataset):
    """Samples of one split: ``dataset[i]`` is the i-th info loaded and passed through `pipeline`.

    infos: index entries (see the module docstring); root: the nuScenes root that holds samples/ and sweeps/;
    sweeps: LiDAR frames per sample including the key frame; load_images: False gives images=None;
    train: training (samples without a kept GT box are left out, see the module doc); on_bad_sample (training
    datasets only; the others, for evaluation and the tools, always raise): "error" raises BadSampleError
    naming the file and sample, "skip" warns, counts the sample in `num_skipped` (per worker process), appends
    ``{"token", "reason"}`` as a line of JSON to `skip_log` when that is set, and serves the next usable index;
    gt_paste_until_epoch: > 0 switches the pipeline's GT paste off from that epoch on (see :meth:`set_epoch`);
    corruption: a sensor corruption applied to every loaded sample before the pipeline (see
    :meth:`set_corruption` and :mod:`aqrcmt.data.corruptions`); without one, a training pipeline with
    ``augment.failures`` draws a failure scenario per sample (failure-aware training).
    """

    def __init__(self, infos: list[dict], root: str | Path, pipeline: Pipeline, *, sweeps: int = 10,
                 load_images: bool = True, train: bool = False, on_bad_sample: str = "error",
                 gt_paste_until_epoch: int = 0, corruption: Optional[SensorCorruption] = None) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if not infos:
            raise DatasetError(f"no samples in the index of nuScenes root {root}")
        self.num_empty_gt = 0
        if train:
            kept = [info for info in infos if len(self._gt(info)[1])]
            self.num_empty_gt = len(infos) - len(kept)
            if not kept:
                raise DatasetError(f"none of the {len(infos)} training samples of nuScenes root {root} has a GT box "
                                   f"with LiDAR points of the {len(CLASS_NAMES)} classes")
            infos = kept
        self.infos = infos
        self.root = Path(root)
        self.pipeline = pipeline
        self.sweeps = sweeps
        self.load_images = load_images
        self.train = train
        self.on_bad_sample = on_bad_sample if train else "error"   # evaluation and tools never skip silently
        self.num_skipped = 0
        self.skip_log: Optional[Path] = None
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
        corruption = self.corruption
        if corruption is None and self.pipeline.random and self.pipeline.augment.failures:
            corruption = draw_failure(self.pipeline.augment.failures, rng)    # failure-aware training
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            try:
                sample = self.load_sample(current, corruption)
            except BadSampleError as e:
                if self.on_bad_sample == "error":
                    raise
                self._skip(self.infos[current]["token"], str(e))
                continue
            sample = self.pipeline(sample, rng)
            if self.train and len(sample.gt_boxes) == 0:
                continue   # the augmentations moved every box out of range: next sample (mmdet3d filter_empty_gt)
            return sample
        raise BadSampleError(f"no usable sample in the whole dataset (nuScenes root {self.root})")

    def _skip(self, token: str, reason: str) -> None:
        self.num_skipped += 1
        warnings.warn(f"skipping a bad sample ({self.num_skipped} so far in this process): {reason}")
        if self.skip_log is not None:   # one short line per O_APPEND write: the loader's workers may share the file
            line = json.dumps({"token": token, "reason": reason}) + "\n"
            fd = os.open(self.skip_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    # ------------------------------------------------------------------------------------------------
    def load_sample(self, index: int, corruption: Optional[SensorCorruption] = None) -> Sample:
        """The index-th sample before any transform (points of all sweeps, images, GT), or BadSampleError.

        corruption: applied to the loaded sample; a temporal misalignment loads its sensor from the key frame
        ``corruption.delay(sensor)`` frames earlier in the scene (GT, poses and calibration stay this sample's).
        """
        info = self.infos[index]
        token = info["token"]
        boxes, labels = self._gt(info)
        if self.train and len(boxes) == 0:
            raise BadSampleError(f"sample {token}: no GT box with LiDAR points of the {len(CLASS_NAMES)} classes "
                                 f"(lidar file {info['lidar_path']})")
        lidar_info, camera_info = info, info
        if corruption is not None:
            lidar_info = self.infos[self.earlier_index(index, corruption.delay("lidar"))]
            camera_info = self.infos[self.earlier_index(index, corruption.delay("camera"))]
        sample = Sample(token=token, points=self.load_points(lidar_info), gt_boxes=boxes, gt_labels=labels,
                        lidar2global=lidar2global(info), timestamp=info["timestamp"] / 1e6,
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

    def load_points(self, info: dict) -> np.ndarray:
        """Key frame (time lag 0) + up to `sweeps - 1` previous sweeps moved into the key frame's LiDAR frame."""
        return lidar_points(info, self.root, self.sweeps)

    def load_rings(self, info: dict) -> np.ndarray:
        """(N,) int64 ring (beam) index of every point :meth:`load_points` returns, in the same order (column 4 of
        the raw files, which load_points replaces by the time lag)."""
        return np.concatenate([points[:, 4] for points, _ in _raw_frames(info, self.root, self.sweeps)]
                              ).astype(np.int64)

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
        images, paths = [], []
        for name in CAMERA_NAMES:
            if name not in info["cams"]:
                raise BadSampleError(f"sample {info['token']}: the index has no camera {name}")
            path = resolve_path(image_info["cams"][name]["data_path"], self.root)
            image = read_image(path, f"sample {info['token']}: {name} image")
            recorded = (image_info["cams"][name].get("width"), image_info["cams"][name].get("height"))
            if None not in recorded and (image.shape[1], image.shape[0]) != recorded:
                raise BadSampleError(f"sample {info['token']}: {name} image {path} is {image.shape[1]}x"
                                     f"{image.shape[0]} px, the index records {recorded[0]}x{recorded[1]} (the "
                                     f"size its intrinsics are for)")
            images.append(image)
            paths.append(path)
        _check_same_size(images, paths, info["token"])
        return (np.stack(images), *camera_matrices(info))


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


class _SampleCheck(Dataset):
    """``check[i]`` loads sample i of `dataset` (no transforms) and returns (token, None) or (token, the reason it
    is bad)."""

    def __init__(self, dataset: NuScenesDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, Optional[str]]:
        token = self.dataset.infos[index]["token"]
        try:
            self.dataset.load_sample(index)
        except BadSampleError as error:
            return token, str(error)
        return token, None


def check_samples(dataset: NuScenesDataset, workers: int) -> Iterator[tuple[str, Optional[str]]]:
    """Load every sample of `dataset` once (`workers` processes; 0: in this one) and yield (token, None) for a
    good one, (token, reason naming the file) for a bad one, in index order."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_SampleCheck(dataset), batch_size=None, num_workers=workers)
    yield from loader
