"""Transforms keep points, boxes, images and lidar2img consistent (synthetic nuScenes, the released pipelines)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from aqrcmt.config import AugmentConfig
from aqrcmt.data.box_geometry import points_in_boxes
from aqrcmt.data.dataset import NuScenesDataset
from aqrcmt.data.loader import build_dataset
from aqrcmt.data.transforms import (
    IMAGE_MEAN_BGR, IMAGE_STD_BGR, ImageAug, Pipeline, Sample, apply_image_aug, bev_flip_matrix,
    filter_boxes_in_range, random_image_aug, random_modality_drop, rot_scale_trans_matrix, eval_image_aug,
    transform_3d,
)
from aqrcmt.presets import get_preset


@pytest.fixture(scope="module")
def dataset(synthetic_root: Path) -> NuScenesDataset:
    cfg = get_preset("tiny")
    cfg.data.root = str(synthetic_root)
    return build_dataset(cfg, cfg.data.val_split, train=False)


@pytest.fixture()
def raw(dataset: NuScenesDataset) -> Sample:
    """A loaded sample before any transform; its intensity column holds each point's index (to follow it)."""
    sample = dataset.load_sample(2)
    sample.points[:, 3] = np.arange(len(sample.points))
    return sample


def _project(xyz: np.ndarray, lidar2img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, depth), each (6, N), of points (N, 3) in the six cameras."""
    p = np.einsum("vij,nj->vni", lidar2img, np.c_[xyz, np.ones(len(xyz))])
    depth = p[..., 2]
    return p[..., 0] / np.maximum(depth, 1e-6), p[..., 1] / np.maximum(depth, 1e-6), depth


def _global_centres(sample: Sample) -> np.ndarray:
    return sample.gt_boxes[:, :3] @ sample.lidar2global[:3, :3].T + sample.lidar2global[:3, 3]


def _bgr(sample: Sample) -> np.ndarray:
    """(6, H, W, 3) float BGR pixel values, undoing the normalisation if it was applied."""
    if sample.images.dtype == np.uint8:
        return sample.images.astype(np.float32)
    return sample.images.transpose(0, 2, 3, 1) * IMAGE_STD_BGR + IMAGE_MEAN_BGR


def _colour_agreement(before: Sample, after: Sample) -> tuple[int, float]:
    """Follow the points on objects from `before` to `after` (by index): how many project into both images, and
    the fraction of those whose pixel colours agree. A lidar2img that disagrees with the pixels gives ~0.1."""
    ids = after.points[:, 3].astype(np.int64)
    on_object = points_in_boxes(before.points[ids, :3], before.gt_boxes).any(1)
    colours, valid = [], []
    for sample, xyz in ((before, before.points[ids[on_object], :3]), (after, after.points[on_object, :3])):
        u, v, depth = _project(xyz, sample.lidar2img)
        image = _bgr(sample)
        h, w = image.shape[1:3]
        valid.append((depth > 0.5) & (u >= 1) & (u < w - 1) & (v >= 1) & (v < h - 1))
        colours.append(image[np.arange(6)[:, None], np.clip(v.astype(int), 0, h - 1), np.clip(u.astype(int), 0, w - 1)])
    both = valid[0] & valid[1]
    agree = np.abs(colours[0] - colours[1]).max(-1)[both] < 30
    return int(both.sum()), float(agree.mean())


# --------------------------------------------------------------------------------------------------
# 3-D augmentations
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("matrix", [
    rot_scale_trans_matrix(0.6, 1.08, np.array([0.4, -0.3, 0.2])),
    rot_scale_trans_matrix(-0.785, 0.9, np.zeros(3)),
    bev_flip_matrix(horizontal=True, vertical=False),
    bev_flip_matrix(horizontal=False, vertical=True),
    bev_flip_matrix(horizontal=True, vertical=True),
], ids=["rot_scale_trans", "rot_scale", "flip_h", "flip_v", "flip_hv"])
def test_3d_augmentations_keep_every_pixel_and_box_membership(raw: Sample, matrix: np.ndarray) -> None:
    moved = copy.deepcopy(raw)
    transform_3d(moved, matrix)
    for xyz_before, xyz_after in ((raw.points[:, :3], moved.points[:, :3]),
                                  (raw.gt_boxes[:, :3], moved.gt_boxes[:, :3])):
        before, after = _project(xyz_before, raw.lidar2img), _project(xyz_after, moved.lidar2img)
        height, width = raw.images.shape[1:3]
        seen = (before[2] > 0.5) & (before[0] >= 0) & (before[0] < width) & (before[1] >= 0) & (before[1] < height)
        assert seen.sum() > 10
        for a, b in zip(before[:2], after[:2]):
            np.testing.assert_allclose(b[seen], a[seen], atol=0.02)   # pixels (float32 points)
    np.testing.assert_array_equal(points_in_boxes(moved.points[:, :3], moved.gt_boxes),
                                  points_in_boxes(raw.points[:, :3], raw.gt_boxes))
    # the global frame does not move: lidar2global absorbs the augmentation
    np.testing.assert_allclose(_global_centres(moved), _global_centres(raw), atol=1e-6)


def test_yaw_and_velocity_rules() -> None:
    box = np.array([[10.0, 5.0, -1.0, 4.0, 2.0, 1.5, 0.3, 2.0, -1.0]])
    sample = Sample("t", np.zeros((1, 5), np.float32), box.copy(), np.zeros(1, np.int64), np.eye(4))
    transform_3d(sample, bev_flip_matrix(horizontal=True, vertical=False))
    np.testing.assert_allclose(sample.gt_boxes[0, [1, 6, 7, 8]], [-5.0, -0.3, 2.0, 1.0])
    sample.gt_boxes = box.copy()
    transform_3d(sample, bev_flip_matrix(horizontal=False, vertical=True))
    np.testing.assert_allclose(sample.gt_boxes[0, [0, 7, 8]], [-10.0, -2.0, -1.0])
    np.testing.assert_allclose(np.cos(sample.gt_boxes[0, 6] - (np.pi - 0.3)), 1.0)
    sample.gt_boxes = box.copy()
    transform_3d(sample, rot_scale_trans_matrix(0.5, 1.1, np.array([1.0, 2.0, 3.0])))
    np.testing.assert_allclose(sample.gt_boxes[0, 3:6], box[0, 3:6] * 1.1)
    np.testing.assert_allclose(sample.gt_boxes[0, 6], 0.8)
    np.testing.assert_allclose(np.linalg.norm(sample.gt_boxes[0, 7:9]), 1.1 * np.hypot(2.0, -1.0))
    np.testing.assert_allclose(sample.gt_boxes[0, 2], -1.0 * 1.1 + 3.0)


def test_box_range_filter_and_yaw_wrap() -> None:
    boxes = np.zeros((4, 9))
    boxes[:, 0] = [0.0, 53.9, 54.0, -60.0]
    boxes[:, 3:6] = 1.0
    boxes[:, 6] = [3.5, -3.5, 0.0, 0.0]
    sample = Sample("t", np.zeros((1, 5), np.float32), boxes, np.arange(4), np.eye(4))
    filter_boxes_in_range(sample, (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0))
    assert sample.gt_labels.tolist() == [0, 1]
    np.testing.assert_allclose(sample.gt_boxes[:, 6], [3.5 - 2 * np.pi, -3.5 + 2 * np.pi])


def test_modality_drop_rates() -> None:
    rng = np.random.default_rng(0)
    outcomes = []
    for _ in range(2000):
        sample = Sample("t", np.ones((3, 5), np.float32), np.zeros((0, 9)), np.zeros(0, np.int64), np.eye(4),
                        images=np.ones((6, 4, 4, 3), np.uint8))
        random_modality_drop(sample, rng)
        outcomes.append((sample.images.any(), sample.points.any()))
    camera_drop = np.mean([not i and p for i, p in outcomes])
    lidar_drop = np.mean([i and not p for i, p in outcomes])
    assert abs(camera_drop - 0.25) < 0.04 and abs(lidar_drop - 0.25) < 0.04
    assert not any(not i and not p for i, p in outcomes)


# --------------------------------------------------------------------------------------------------
# Image augmentations
# --------------------------------------------------------------------------------------------------
def test_test_resize_rule() -> None:
    vov = eval_image_aug((900, 1600), (640, 1600))
    assert (vov.resize, vov.crop, vov.flip) == (1.0, (0, 260), False)
    r50 = eval_image_aug((900, 1600), (320, 800))
    assert (r50.resize, r50.crop) == (0.5, (0, 130))
    small = eval_image_aug((225, 400), (128, 352))
    assert small.resize == pytest.approx(0.88) and small.crop == (0, 198 - 128)


def test_training_resize_range_is_relative_to_the_test_resize() -> None:
    rng = np.random.default_rng(0)
    full = [random_image_aug((900, 1600), (640, 1600), (0.94, 1.25), True, rng) for _ in range(300)]
    assert 0.94 <= min(a.resize for a in full) and max(a.resize for a in full) <= 1.25
    assert 0.3 < np.mean([a.flip for a in full]) < 0.7
    assert all(a.crop[1] == int(900 * a.resize) - 640 and 0 <= a.crop[0] <= max(0, int(1600 * a.resize) - 1600)
               for a in full)
    # the tiny preset's range (0.22, 0.26) is for 1600x900 -> 352x128, whose test resize is 0.22; for 400x225
    # cameras the test resize is 0.88, so the training resize is drawn from 0.88 * (1, 0.26 / 0.22)
    small = [random_image_aug((225, 400), (128, 352), (0.22, 0.26), False, rng) for _ in range(300)]
    assert 0.88 - 1e-9 <= min(a.resize for a in small) and max(a.resize for a in small) <= 0.88 * 0.26 / 0.22 + 1e-9
    assert not any(a.flip for a in small)


@pytest.mark.parametrize("aug", [ImageAug(0.88, (0, 70), False), ImageAug(1.0, (20, 90), True),
                                 ImageAug(0.95, (6, 83), True)], ids=["test", "crop_flip", "resize_crop_flip"])
def test_image_augmentation_moves_pixels_and_intrinsics_together(raw: Sample, aug: ImageAug) -> None:
    out_hw = (128, 352)
    moved = copy.deepcopy(raw)
    apply_image_aug(moved, aug, out_hw)
    assert moved.images.shape == (6, *out_hw, 3)
    count, agreement = _colour_agreement(raw, moved)
    assert count > 1000 and agreement > 0.9
    # box centres: the new pixel is the old one under u' = r u - x0 (mirrored when flipped), v' = r v - y0
    u0, v0, depth = _project(raw.gt_boxes[:, :3], raw.lidar2img)
    u1, v1, _ = _project(moved.gt_boxes[:, :3], moved.lidar2img)
    front = depth > 0.5
    expected_u = aug.resize * u0 - aug.crop[0]
    np.testing.assert_allclose(u1[front], (out_hw[1] - expected_u if aug.flip else expected_u)[front], atol=1e-6)
    np.testing.assert_allclose(v1[front], (aug.resize * v0 - aug.crop[1])[front], atol=1e-6)
    seen = front & (u1 >= 0) & (u1 < out_hw[1]) & (v1 >= 0) & (v1 < out_hw[0])
    assert seen.any(axis=0).sum() >= len(raw.gt_boxes) // 2


def test_full_training_pipeline_keeps_points_boxes_and_images_consistent(raw: Sample) -> None:
    augment = AugmentConfig(modality_drop=False, image_resize_range=(0.22, 0.26))   # the tiny preset's range
    pipeline = Pipeline(augment, (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0), (128, 352), train=True)
    for seed in range(3):
        result = pipeline(copy.deepcopy(raw), np.random.default_rng(seed))
        assert result.images.shape == (6, 3, 128, 352) and result.images.dtype == np.float32
        assert not np.array_equal(result.points[:50, 3], raw.points[:50, 3])   # shuffled
        count, agreement = _colour_agreement(raw, result)
        assert count > 500 and agreement > 0.85, (seed, count, agreement)
        # the same boxes (matched through the unmoved global frame) hold the same points
        match = np.argmin(np.linalg.norm(_global_centres(result)[:, None] - _global_centres(raw)[None], axis=2), 1)
        np.testing.assert_allclose(_global_centres(result), _global_centres(raw)[match], atol=1e-4)
        ids = result.points[:, 3].astype(np.int64)
        np.testing.assert_array_equal(points_in_boxes(result.points[:, :3], result.gt_boxes),
                                      points_in_boxes(raw.points[ids, :3], raw.gt_boxes[match]))


def test_test_pipeline_is_deterministic(raw: Sample) -> None:
    pipeline = Pipeline(AugmentConfig(), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0), (128, 352), train=False)
    a = pipeline(copy.deepcopy(raw), np.random.default_rng(0))
    b = pipeline(copy.deepcopy(raw), np.random.default_rng(1))
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.lidar2img, b.lidar2img)
