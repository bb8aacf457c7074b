"""Data pipeline throughput per worker: one sample = 6 full-size 1600x900 JPEG decodes + 10 LiDAR sweeps + transforms.

A synthetic nuScenes with full-size cameras is generated in a temporary folder; the dataset uses the released
vov config (640x1600 images, voxel range +-54 m) with every training augmentation on, GT paste included
(database built from the same split). Samples/s of one worker = 1 / median time per sample.
Results: bench/results/data_cpu.md.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from aqrcmt.data.collate import collate
from aqrcmt.data.gt_database import build_gt_database
from aqrcmt.data.loader import build_dataset
from aqrcmt.data.synthetic import FULL_IMAGE_SIZE, make_synthetic_nuscenes
from aqrcmt.presets import get_preset


@pytest.fixture(scope="module")
def full_size_cfg(tmp_path_factory: pytest.TempPathFactory):
    root = make_synthetic_nuscenes(tmp_path_factory.mktemp("nuscenes_full"), version="v1.0-mini", scenes=3,
                                   image_size=FULL_IMAGE_SIZE)
    cfg = get_preset("cmt_voxel0075_vov_1600x640_cbgs")
    cfg.data.root, cfg.data.version = str(root), "v1.0-mini"
    cfg.data.train_split, cfg.data.val_split = "mini_train", "mini_val"
    database = build_gt_database(build_dataset(cfg, "mini_train", train=False), root / "gt_database")
    cfg.data.augment.gt_paste, cfg.data.augment.gt_paste_database = True, str(database)
    return cfg


def _cycle(dataset):
    indices = itertools.cycle(range(len(dataset)))
    return lambda: dataset[next(indices)]


def test_training_sample(benchmark, full_size_cfg) -> None:
    """Full training pipeline: load (6 JPEGs, 10 sweeps), GT paste, modality drop, global aug, flips, image aug."""
    dataset = build_dataset(full_size_cfg, "mini_train", train=True)
    sample = benchmark.pedantic(_cycle(dataset), rounds=24, warmup_rounds=2)
    assert sample.images.shape == (6, 3, 640, 1600)


def test_eval_sample(benchmark, full_size_cfg) -> None:
    """Test pipeline: load (6 JPEGs, 10 sweeps), range filter, test resize/crop, normalise."""
    dataset = build_dataset(full_size_cfg, "mini_val", train=False)
    sample = benchmark.pedantic(_cycle(dataset), rounds=12, warmup_rounds=1)
    assert sample.images.shape == (6, 3, 640, 1600)


def test_load_points_ten_sweeps(benchmark, full_size_cfg) -> None:
    dataset = build_dataset(full_size_cfg, "mini_train", train=True)
    indices = itertools.cycle(range(len(dataset)))
    points = benchmark.pedantic(lambda: dataset.load_points(dataset.infos[next(indices)]), rounds=24)
    assert len(np.unique(points[:, 4])) >= 2


def test_collate_batch_of_two(benchmark, full_size_cfg) -> None:
    dataset = build_dataset(full_size_cfg, "mini_val", train=False)
    samples = [dataset[0], dataset[1]]
    batch = benchmark.pedantic(lambda: collate(samples), rounds=20)
    assert batch.images.shape == (2, 6, 3, 640, 1600)
