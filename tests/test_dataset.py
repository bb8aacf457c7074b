"""The nuScenes dataset on the synthetic set: index, cache, pkl path, frames, loader, sampling, bad input."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from nuscenes.utils.splits import create_splits_scenes
from pyquaternion import Quaternion

from aqrcmt.config import Config
from aqrcmt.structures import CAMERA_NAMES, CLASS_NAMES
from aqrcmt.data.box_geometry import bev_corners, boxes_overlap_bev, image_boxes, points_in_boxes
from aqrcmt.data.dataset import NuScenesDataset, resolve_path
from aqrcmt.data.files import BadSampleError
from aqrcmt.data.gt_database import build_gt_database
from aqrcmt.data.gt_paste import GTPaster
from aqrcmt.data.index import (
    CONVERTER_MAX_SWEEPS, NAME_MAPPING, index_cache_path, load_info_pkl, load_or_build_infos, write_info_pkl,
)
from aqrcmt.data.loader import build_dataloader, build_dataset
from aqrcmt.data.sampler import ShardedSampler, cbgs_indices, cbgs_length
from aqrcmt.data.splits import open_nuscenes, sample_tokens_of_split
from aqrcmt.presets import get_preset
from aqrcmt.structures import Batch


@pytest.fixture()
def cfg(synthetic_root: Path, tmp_path: Path) -> Config:
    cfg = get_preset("tiny")
    cfg.data.root = str(synthetic_root)
    cfg.data.index_cache_dir = str(synthetic_root / ".test_index_cache")
    return cfg


@pytest.fixture(scope="module")
def nusc(synthetic_root: Path):
    return open_nuscenes(synthetic_root, "v1.0-mini")


def test_collated_training_batch_shapes_and_dtypes(cfg: Config) -> None:
    cfg.data.augment.modality_drop = True
    loader = build_dataloader(cfg, cfg.data.train_split, train=True)
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and batch.batch_size == cfg.data.batch_size
    h, w = cfg.model.camera.image_size
    assert batch.images.shape == (2, 6, 3, h, w) and batch.images.dtype == torch.float32
    assert batch.lidar2img.shape == (2, 6, 4, 4) and batch.lidar2img.dtype == torch.float64
    assert batch.img_shape == (h, w)
    pcr = torch.tensor(cfg.model.lidar.voxel.point_cloud_range)
    for points, boxes, labels in zip(batch.points, batch.gt_boxes, batch.gt_labels):
        assert points.ndim == 2 and points.shape[1] == 5 and points.dtype == torch.float32 and len(points) > 0
        assert ((points[:, :3] > pcr[:3]) & (points[:, :3] < pcr[3:])).all()
        assert boxes.shape == (len(labels), 9) and boxes.dtype == torch.float32 and len(boxes) > 0
        assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < len(CLASS_NAMES))).all()
        assert (boxes[:, 3:6] > 0).all() and (boxes[:, 6].abs() <= np.pi).all()
    assert all(m.lidar2global.shape == (4, 4) and m.sample_token for m in batch.metas)


def test_lidar_only_config_gives_no_images(cfg: Config) -> None:
    cfg.data.load_images = False
    batch = next(iter(build_dataloader(cfg, cfg.data.val_split, train=False)))
    assert batch.images is None and batch.lidar2img is None and len(batch.points) == 2


def test_gt_boxes_hold_their_points_and_map_back_to_the_annotations(cfg: Config, nusc) -> None:
    dataset = build_dataset(cfg, cfg.data.val_split, train=False)
    counts = []
    for i in range(len(dataset)):
        sample = dataset[i]
        key_frame = sample.points[sample.points[:, 4] == 0]
        counts.append(points_in_boxes(key_frame[:, :3], sample.gt_boxes).sum(0))
        # boxes back in the global frame = the annotations (centre, size, yaw, velocity), in annotation order
        anns = [nusc.get("sample_annotation", t) for t in nusc.get("sample", sample.token)["anns"]]
        kept = [a for a in anns if a["num_lidar_pts"] > 0 and NAME_MAPPING.get(a["category_name"]) in CLASS_NAMES]
        assert len(kept) == len(sample.gt_boxes)
        centres = (sample.lidar2global[:3, :3] @ sample.gt_boxes[:, :3].T).T + sample.lidar2global[:3, 3]
        np.testing.assert_allclose(centres, [a["translation"] for a in kept], atol=1e-6)
        np.testing.assert_allclose(sample.gt_boxes[:, 3:6], [np.array(a["size"])[[1, 0, 2]] for a in kept])
        rotation = sample.lidar2global[:3, :3]
        headings = rotation[:2, :2] @ np.stack([np.cos(sample.gt_boxes[:, 6]), np.sin(sample.gt_boxes[:, 6])])
        expected_yaw = [Quaternion(a["rotation"]).yaw_pitch_roll[0] for a in kept]
        np.testing.assert_allclose(np.cos(np.arctan2(headings[1], headings[0]) - expected_yaw), 1.0, atol=1e-9)
        velocity = (rotation[:2, :2] @ sample.gt_boxes[:, 7:9].T).T
        np.testing.assert_allclose(velocity, [nusc.box_velocity(a["token"])[:2] for a in kept], atol=1e-6)
    counts = np.concatenate(counts)
    assert (counts > 0).mean() > 0.9, f"boxes without their own LiDAR points: {(counts == 0).sum()} of {len(counts)}"


def test_lidar2img_matches_the_devkit_camera_projection(cfg: Config, nusc) -> None:
    from nuscenes.utils.geometry_utils import BoxVisibility, view_points

    dataset = build_dataset(cfg, cfg.data.val_split, train=False)
    sample = dataset.load_sample(1)
    record = nusc.get("sample", sample.token)
    kept = [t for t in record["anns"] if nusc.get("sample_annotation", t)["num_lidar_pts"] > 0 and
            NAME_MAPPING.get(nusc.get("sample_annotation", t)["category_name"]) in CLASS_NAMES]
    height, width = sample.images.shape[1:3]
    centres = np.c_[sample.gt_boxes[:, :3], np.ones(len(kept))]
    seen = np.zeros(len(kept), dtype=bool)
    for camera, lidar2img in zip(CAMERA_NAMES, sample.lidar2img):
        _, boxes, intrinsic = nusc.get_sample_data(record["data"][camera], BoxVisibility.NONE, selected_anntokens=kept)
        in_camera = np.array([b.center for b in boxes]).T                      # (3, n) camera frame
        expected = view_points(in_camera, intrinsic, normalize=True)[:2]
        projected = lidar2img @ centres.T
        front = in_camera[2] > 0.5
        np.testing.assert_allclose(projected[2, front], in_camera[2, front], atol=1e-6)   # depth
        np.testing.assert_allclose(projected[:2, front] / projected[2, front], expected[:, front], atol=1e-5)
        seen |= front & (expected[0] >= 0) & (expected[0] < width) & (expected[1] >= 0) & (expected[1] < height)
    assert seen.mean() > 0.8   # most box centres are inside some image


def test_multisweep_cloud_matches_the_devkit(cfg: Config, nusc) -> None:
    from nuscenes.utils.data_classes import LidarPointCloud

    dataset = build_dataset(cfg, cfg.data.val_split, train=False)
    sample = dataset.load_sample(len(dataset) - 1)
    lags = np.unique(sample.points[:, 4])
    frames = cfg.data.sweeps            # key frame + 10 sweeps, as CMT loads them
    assert frames == 11 and len(lags) == frames
    np.testing.assert_allclose(lags, np.arange(frames) * 0.05, atol=2e-3)
    # the devkit moves every sweep into the key frame's LiDAR frame through the ego poses (same order of points)
    cloud, times = LidarPointCloud.from_file_multisweep(nusc, nusc.get("sample", sample.token), "LIDAR_TOP",
                                                       "LIDAR_TOP", nsweeps=frames, min_distance=0.0)
    np.testing.assert_allclose(sample.points[:, :4], cloud.points.T, atol=2e-4)
    np.testing.assert_allclose(sample.points[:, 4], times[0], atol=1e-6)


def test_info_pkl_path_gives_the_same_samples_as_the_devkit(cfg: Config, tmp_path: Path) -> None:
    pkl = write_info_pkl(cfg.data.root, cfg.data.version, cfg.data.val_split, tmp_path / "infos_val.pkl")
    from_devkit = build_dataset(cfg, cfg.data.val_split, train=False)
    cfg.data.info_pkl_val = str(pkl)
    from_pkl = build_dataset(cfg, cfg.data.val_split, train=False)
    assert len(from_pkl) == len(from_devkit)
    for i in (0, len(from_pkl) - 1):
        a, b = from_devkit[i], from_pkl[i]
        assert a.token == b.token
        for name in ("points", "gt_boxes", "gt_labels", "images", "lidar2img", "lidar2global"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_index_cache_is_hit_on_the_second_start(cfg: Config, tmp_path: Path, monkeypatch) -> None:
    first, path = load_or_build_infos(cfg.data.root, cfg.data.version, "mini_val", 10, tmp_path / "cache")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]   # no temp file left
    monkeypatch.setattr("aqrcmt.data.index.open_nuscenes",
                        lambda *a: pytest.fail("the devkit was opened on a cache hit"))
    second, path2 = load_or_build_infos(cfg.data.root, cfg.data.version, "mini_val", 10, tmp_path / "cache")
    assert path2 == path and [i["token"] for i in second] == [i["token"] for i in first]
    other = index_cache_path(tmp_path / "cache", Path(cfg.data.root), cfg.data.version, "mini_val", 5)
    assert other != path   # the sweep count is part of the key


def test_custom_split_of_splits_json_is_loaded_for_training(cfg: Config, nusc, tmp_path: Path) -> None:
    """A split of ROOT/<version>/splits.json trains as it is scored: the dataset serves exactly its scenes'
    samples, the ones evaluation expects (a copy of the tables; the sensor files are linked, not copied)."""
    import json
    import shutil

    root = tmp_path / "root"
    shutil.copytree(Path(cfg.data.root) / cfg.data.version, root / cfg.data.version)
    for folder in ("samples", "sweeps", "maps"):
        (root / folder).symlink_to(Path(cfg.data.root) / folder)
    scene = next(s["name"] for s in nusc.scene if s["name"] in create_splits_scenes()["mini_train"])
    (root / cfg.data.version / "splits.json").write_text(json.dumps({"one_scene": [scene]}))
    cfg.data.root, cfg.data.index_cache_dir, cfg.data.train_split = str(root), str(tmp_path / "cache"), "one_scene"
    dataset = build_dataset(cfg, "one_scene", train=True)
    assert {info["scene_name"] for info in dataset.infos} == {scene}
    expected = sample_tokens_of_split(open_nuscenes(root, cfg.data.version), "one_scene")
    assert sorted(info["token"] for info in dataset.infos) == sorted(expected) and len(expected) > 1
    assert dataset.load_sample(0).scene_name == scene
    with pytest.raises(ValueError, match="unknown nuScenes split 'two_scenes'.*splits.json"):
        build_dataset(cfg, "two_scenes", train=True)


def test_multi_worker_loader_covers_the_split_once(cfg: Config) -> None:
    cfg.data.num_workers, cfg.data.pin_memory, cfg.data.load_images = 2, True, False
    loader = build_dataloader(cfg, cfg.data.val_split, train=False)
    batches = list(loader)
    tokens = [m.sample_token for b in batches for m in b.metas]
    assert sorted(tokens) == sorted(i["token"] for i in loader.dataset.infos)
    assert loader.pin_memory == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert all(p.is_pinned() for b in batches for p in b.points)


def test_evaluation_shards_are_disjoint_and_training_shards_equal(cfg: Config) -> None:
    dataset = build_dataset(cfg, cfg.data.train_split, train=False)
    shards = [list(ShardedSampler(len(dataset), shuffle=False, num_processes=3, process_index=p)) for p in range(3)]
    assert sorted(sum(shards, [])) == list(range(len(dataset)))
    train = [ShardedSampler(len(dataset), shuffle=True, class_sets=dataset.class_sets(), num_processes=3,
                            process_index=p, seed=4, pad=True) for p in range(3)]
    lists = [list(s) for s in train]
    assert len({len(x) for x in lists}) == 1 and len(lists[0]) == len(train[0])
    assert lists != [list(s) for s in train]   # the next epoch is drawn anew


def test_training_loader_uses_cbgs_when_configured(cfg: Config) -> None:
    cfg.data.cbgs, cfg.data.load_images = True, False
    loader = build_dataloader(cfg, cfg.data.train_split, train=True, num_processes=2, process_index=1)
    class_sets = loader.dataset.class_sets()
    assert len(loader.sampler) == -(-cbgs_length(class_sets) // 2)
    assert len(loader) == len(loader.sampler) // cfg.data.batch_size


def test_cbgs_counts_follow_the_formula() -> None:
    # class 0 in 80 samples, class 1 in 15, class 2 in 5 (sample i < 5 holds all three)
    class_sets = [{0, 1, 2} if i < 5 else {0, 1} if i < 15 else {0} for i in range(80)]
    indices = cbgs_indices(class_sets, np.random.default_rng(0))
    total = 80 + 15 + 5
    expected = [int(n * (1 / 3) / (n / total)) for n in (80, 15, 5)]   # 33 draws per class
    assert len(indices) == sum(expected) == cbgs_length(class_sets)
    drawn_from_rare = (indices < 5).sum()
    assert drawn_from_rare >= expected[2]   # class 2's draws all land in samples 0..4
    assert np.isin(indices, np.arange(80)).all()


@pytest.fixture(scope="module")
def database(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = get_preset("tiny")
    cfg.data.root = str(synthetic_root)
    return build_gt_database(build_dataset(cfg, cfg.data.train_split, train=False),
                             tmp_path_factory.mktemp("gt_database"))


def test_gt_paste_adds_non_colliding_objects_with_their_points(cfg: Config, database: Path) -> None:
    cfg.data.load_images = False
    paster = GTPaster(database)
    assert sum(len(v) for v in paster.objects.values()) > 20
    sample = build_dataset(cfg, cfg.data.train_split, train=False).load_sample(0)
    n_boxes, n_points = len(sample.gt_boxes), len(sample.points)
    paster(sample, np.random.default_rng(0))
    pasted = sample.gt_boxes[n_boxes:]
    assert len(pasted) > 0 and len(sample.gt_labels) == len(sample.gt_boxes)
    overlap = boxes_overlap_bev(sample.gt_boxes, sample.gt_boxes)
    assert not (overlap & ~np.eye(len(overlap), dtype=bool))[n_boxes:].any()
    inside = points_in_boxes(sample.points[:, :3], pasted)
    assert (inside.sum(0) >= 5).all() and len(sample.points) != n_points


def test_released_presets_paste_gt_and_a_missing_database_names_the_command(tmp_path: Path) -> None:
    """The released recipes paste GT (for 15 epochs); without a database the train loader refuses in one line."""
    from aqrcmt.config import ConfigError
    from aqrcmt.data.gt_database import default_database
    from aqrcmt.overrides import apply_overrides

    for name in ("cmt_voxel0075_vov_1600x640_cbgs", "cmt_voxel0100_r50_800x320_cbgs", "cmt_lidar_voxel0075_cbgs",
                 "cmt_aqr_recommended_voxel0075_vov_1600x640_cbgs"):
        augment = get_preset(name).data.augment
        assert augment.gt_paste and augment.gt_paste_database is None and augment.gt_paste_until_epoch == 15
    cfg = apply_overrides(get_preset("cmt_lidar_voxel0075_cbgs"), [f"data.root={tmp_path}"])
    with pytest.raises(ConfigError) as refused:
        build_dataloader(cfg, "train", train=True)
    assert str(refused.value) == (f"data.augment.gt_paste: no GT database at {default_database(tmp_path)}; build it "
                                  f"with `aqrcmt build-gt-database --config cmt_lidar_voxel0075_cbgs --root {tmp_path} "
                                  f"--version v1.0-trainval` (or pass --set data.augment.gt_paste=false)")


def test_gt_paste_switches_off_at_its_last_epoch(cfg: Config, database: Path, monkeypatch) -> None:
    """The released "15e+5e" recipe: ``loader.set_epoch`` tells the dataset, which stops pasting."""
    assert get_preset("cmt_voxel0075_vov_1600x640_cbgs").data.augment.gt_paste_until_epoch == 15
    calls = []
    real_paste = GTPaster.__call__
    monkeypatch.setattr(GTPaster, "__call__", lambda self, sample, rng: calls.append(1) or real_paste(self, sample, rng))
    cfg.data.load_images = False
    cfg.data.augment.gt_paste, cfg.data.augment.gt_paste_database = True, str(database)
    cfg.data.augment.gt_paste_until_epoch = 2
    loader = build_dataloader(cfg, cfg.data.train_split, train=True)
    dataset = loader.dataset
    for epoch, pastes in ((0, True), (1, True), (2, False), (5, False), (1, True)):
        loader.set_epoch(epoch)
        assert loader.sampler.epoch == epoch and dataset.epoch == epoch
        before = len(calls)
        dataset[0]
        assert len(calls) - before == int(pastes), epoch
    cfg.data.augment.gt_paste_until_epoch = 0                  # 0: paste in every epoch
    forever = build_dataset(cfg, cfg.data.train_split, train=True)
    forever.set_epoch(100)
    before = len(calls)
    forever[0]
    assert len(calls) == before + 1


def test_loader_set_epoch_pins_the_batches_of_an_epoch(cfg: Config) -> None:
    """Same (seed, epoch, process): same samples and augmentation draws in the workers, whatever ran before."""
    cfg.data.load_images, cfg.data.num_workers = False, 1
    loader = build_dataloader(cfg, cfg.data.train_split, train=True, seed=3)

    def epoch_points(epoch: int) -> list[torch.Tensor]:
        loader.set_epoch(epoch)
        return [p for batch in loader for p in batch.points]
    first = epoch_points(1)
    epoch_points(0)
    again = epoch_points(1)
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, epoch_points(2)))


def test_gt_paste_blends_crops_only_inside_the_projected_boxes(cfg: Config, database: Path) -> None:
    paster = GTPaster(database)
    assert sum(bool(o["image_path"]) for v in paster.objects.values() for o in v) > 20
    sample = build_dataset(cfg, cfg.data.train_split, train=False).load_sample(0)
    before, n_boxes = sample.images.copy(), len(sample.gt_boxes)
    paster(sample, np.random.default_rng(0))
    changed = np.abs(sample.images.astype(int) - before).max(-1) > 0            # (6, H, W)
    covered = np.zeros_like(changed)
    for view, lidar2img in enumerate(sample.lidar2img):
        xy, _, visible = image_boxes(sample.gt_boxes[n_boxes:], lidar2img, before.shape[1:3])
        for x0, y0, x1, y1 in xy[visible]:
            covered[view, y0:y1, x0:x1] = True
    assert covered.sum() > 1000 and changed.sum() > 0.3 * covered.sum()
    assert not (changed & ~covered).any()


def test_bev_overlap_matches_shapely() -> None:
    from shapely.geometry import Polygon

    rng = np.random.default_rng(0)
    boxes = np.zeros((60, 7))
    boxes[:, :2] = rng.uniform(-6, 6, (60, 2))
    boxes[:, 3:5] = rng.uniform(0.5, 5, (60, 2))
    boxes[:, 6] = rng.uniform(-np.pi, np.pi, 60)
    corners = bev_corners(boxes)
    polygons = [Polygon(c) for c in corners]
    expected = np.array([[p.intersects(q) and p.intersection(q).area > 1e-9 for q in polygons] for p in polygons])
    assert expected.sum() > 80 and (~expected).sum() > 80
    np.testing.assert_array_equal(boxes_overlap_bev(boxes, boxes), expected | np.eye(60, dtype=bool))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_missing_root_and_wrong_version(cfg: Config, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_or_build_infos(tmp_path / "nowhere", "v1.0-mini", "mini_val", 10)
    with pytest.raises(ValueError, match="v1.0-mni"):
        open_nuscenes(cfg.data.root, "v1.0-mni")
    with pytest.raises(ValueError, match="needs a trainval version"):
        load_or_build_infos(cfg.data.root, "v1.0-mini", "val", 10)
    with pytest.raises(FileNotFoundError, match="no v1.0-trainval"):
        open_nuscenes(cfg.data.root, "v1.0-trainval")


def _dataset_with_bad_file(cfg: Config, tmp_path: Path, kind: str, on_bad_sample: str) -> NuScenesDataset:
    dataset = build_dataset(cfg, cfg.data.val_split, train=True)
    dataset.on_bad_sample = on_bad_sample
    info = dict(dataset.infos[0])
    bad = tmp_path / ("bad.jpg" if kind == "missing image" else "bad.pcd.bin")
    points = np.fromfile(resolve_path(info["lidar_path"], dataset.root), dtype=np.float32)
    if kind == "truncated":
        points[:-3].tofile(bad)
    elif kind == "zero points":
        bad.write_bytes(b"")
    elif kind == "nan":
        points[7] = np.nan
        points.tofile(bad)
    if kind == "missing image":
        info["cams"] = {**info["cams"], "CAM_BACK": {**info["cams"]["CAM_BACK"], "data_path": str(bad)}}
    elif kind == "no boxes":
        info["num_lidar_pts"] = np.zeros_like(info["num_lidar_pts"])
    else:
        info["lidar_path"] = str(bad)
    dataset.infos = [info] + dataset.infos[1:]
    return dataset


@pytest.mark.parametrize("kind, message", [
    ("missing pcd", "does not exist"), ("truncated", "truncated"), ("zero points", "no points"),
    ("nan", "NaN"), ("missing image", "image .*bad.jpg"), ("no boxes", "no GT box"),
])
def test_bad_sample_errors_name_the_file_and_sample(cfg: Config, tmp_path: Path, kind: str, message: str) -> None:
    cfg.data.load_images = kind == "missing image"
    dataset = _dataset_with_bad_file(cfg, tmp_path, kind, "error")
    with pytest.raises(BadSampleError, match=message) as error:
        dataset[0]
    assert dataset.infos[0]["token"] in str(error.value)
    if kind not in ("no boxes", "missing image"):
        assert "bad.pcd.bin" in str(error.value)


def test_bad_sample_skip_warns_counts_and_serves_the_next(cfg: Config, tmp_path: Path) -> None:
    cfg.data.load_images = False
    dataset = _dataset_with_bad_file(cfg, tmp_path, "truncated", "skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample = dataset[0]
    assert dataset.num_skipped == 1 and sample.token == dataset.infos[1]["token"]
    assert any("truncated" in str(w.message) for w in caught)


def test_command_line_hooks_write_infos_and_database(cfg: Config, tmp_path: Path) -> None:
    from aqrcmt.cli import main

    assert main(["create-infos", "--root", cfg.data.root, "--version", "v1.0-mini", "--out-dir", str(tmp_path)]) == 0
    infos = load_info_pkl(tmp_path / "nuscenes_infos_val.pkl")
    assert [i["token"] for i in infos] == [i["token"] for i in build_dataset(cfg, "mini_val", False).infos]
    assert len(infos[-1]["sweeps"]) == CONVERTER_MAX_SWEEPS
    assert main(["build-gt-database", "--config", "tiny", "--root", cfg.data.root, "--out", str(tmp_path / "db"),
                 "--split", "mini_val"]) == 0
    assert sum(len(v) for v in GTPaster(tmp_path / "db" / "dbinfos.pkl", min_points=0).objects.values()) > 0
