"""Sensor corruptions (aqrcmt.data.corruptions): each changes what it should and nothing else, severities are
monotone, draws are deterministic, bad names/severities are rejected; the dataset hook and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aqrcmt.data.corruptions import (
    AIRLIGHT, CORRUPTIONS, FAILURES, SEVERITIES, SensorCorruption, line_kernel, parse_corruptions,
)
from aqrcmt.data.transforms import Sample

SPLIT = "mini_val"
LIDAR = [name for name, kind in CORRUPTIONS.items() if kind.sensor == "lidar"]
CAMERA = [name for name, kind in CORRUPTIONS.items() if kind.sensor == "camera"]
INDEX = 3      # a sample with three earlier key frames in its scene
GRADED = [name for name, kind in CORRUPTIONS.items() if len(set(kind.levels)) == len(SEVERITIES)]


@pytest.fixture(scope="module")
def dataset(synthetic_root: Path):
    from aqrcmt.data import build_dataset
    from aqrcmt.presets import load_config

    return build_dataset(load_config("tiny", [f"data.root={synthetic_root}"]), SPLIT, train=False)


def _corrupt(dataset, name: str, severity: int, seed: int = 0, index: int = INDEX) -> Sample:
    return dataset.load_sample(index, SensorCorruption(name, severity, seed))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_changes_its_sensor_only(dataset, name: str) -> None:
    clean = dataset.load_sample(INDEX)
    for severity in SEVERITIES:
        corrupted = _corrupt(dataset, name, severity)
        assert _same(corrupted.gt_boxes, clean.gt_boxes) and _same(corrupted.gt_labels, clean.gt_labels)
        assert _same(corrupted.intrinsics, clean.intrinsics)
        if CORRUPTIONS[name].sensor == "lidar":
            assert not _same(corrupted.points, clean.points)
            assert _same(corrupted.images, clean.images) and _same(corrupted.lidar2cam, clean.lidar2cam)
        else:
            assert _same(corrupted.points, clean.points)
            if name == "spatial_misalignment":
                assert _same(corrupted.images, clean.images) and not _same(corrupted.lidar2cam, clean.lidar2cam)
            else:       # brightness, blur, ...: the calibration is untouched
                assert not _same(corrupted.images, clean.images) and _same(corrupted.lidar2cam, clean.lidar2cam)
                assert corrupted.images.dtype == np.uint8


def _measure(sample: Sample, name: str, clean: Sample) -> float:
    """A number each corruption moves in one direction as its severity grows (sign: larger = more corrupted)."""
    points, images = sample.points, sample.images.astype(np.float64)
    if name in ("beam_reduction", "points_reduction", "lidar_fog", "limited_fov", "object_failure"):
        return -len(points)
    if name == "snow":
        return -points[:, 3].sum()
    if name == "missing_lidar":
        return float((~points.any(axis=1)).sum())
    if name == "spatial_misalignment":
        return float(np.abs(sample.lidar2cam - clean.lidar2cam).max())
    if name == "temporal_misalignment_lidar":     # the objects' returns (0.44 m above the ground) drift with the delay
        above, clean_above = points[points[:, 2] > -1.4], clean.points[clean.points[:, 2] > -1.4]
        return float(np.abs(above[:, :2].mean(0) - clean_above[:, :2].mean(0)).sum())
    if name == "temporal_misalignment_camera":
        return float(np.abs(images - clean.images).mean())
    if name == "motion_blur":
        return -float(np.abs(np.diff(images, axis=2)).mean() + np.abs(np.diff(images, axis=1)).mean())
    if name == "brightness":
        return float(images.mean())
    if name in ("darkness", "missing_cameras", "view_drop"):
        return -float(images.mean())
    if name == "camera_fog":      # every pixel moves towards the airlight: |I - A| = |J - A| t
        return -float(np.abs(images - 255 * AIRLIGHT).mean())
    raise AssertionError(f"no measure for {name}")


@pytest.mark.parametrize("name", GRADED)
def test_severity_is_monotone(dataset, name: str) -> None:
    clean = dataset.load_sample(INDEX)
    values = [_measure(clean, name, clean)] + [_measure(_corrupt(dataset, name, s), name, clean) for s in SEVERITIES]
    assert all(a < b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_deterministic_per_seed_sample_and_severity(dataset, name: str) -> None:
    first, again = _corrupt(dataset, name, 2), _corrupt(dataset, name, 2)
    assert _same(first.points, again.points) and _same(first.images, again.images)
    assert _same(first.lidar2cam, again.lidar2cam)
    other = _corrupt(dataset, name, 2, seed=1)
    deterministic = ("beam_reduction", "brightness", "camera_fog", "temporal_misalignment_lidar",
                     "temporal_misalignment_camera", "lidar_drop", "camera_drop", "limited_fov")  # nothing drawn
    if name not in deterministic:
        assert not (_same(first.points, other.points) and _same(first.images, other.images)
                    and _same(first.lidar2cam, other.lidar2cam))


def test_beam_reduction_keeps_every_kth_ring(dataset) -> None:
    rings = dataset.load_rings(dataset.infos[INDEX])
    points = dataset.load_points(dataset.infos[INDEX])
    assert len(rings) == len(points) and len(np.unique(rings)) > 8
    for severity, keep_every in zip(SEVERITIES, (2, 4, 8)):
        corrupted = _corrupt(dataset, "beam_reduction", severity).points
        assert _same(corrupted, points[rings % keep_every == 0])


def test_points_reduction_drops_the_stated_fraction_nested(dataset) -> None:
    clean = dataset.load_sample(INDEX).points
    kept = [_corrupt(dataset, "points_reduction", s).points for s in SEVERITIES]
    for points, fraction in zip(kept, (0.5, 0.7, 0.9)):
        assert abs(1 - len(points) / len(clean) - fraction) < 0.02
    rows = [set(map(bytes, p)) for p in kept]
    assert rows[2] <= rows[1] <= rows[0]                  # one draw per point: severities are nested


def test_spatial_misalignment_is_the_stated_rotation_and_shift(dataset) -> None:
    clean = dataset.load_sample(INDEX).lidar2cam
    for severity, (angle_deg, shift_m) in zip(SEVERITIES, ((0.5, 0.05), (1.0, 0.10), (2.0, 0.20))):
        delta = _corrupt(dataset, "spatial_misalignment", severity).lidar2cam @ np.linalg.inv(clean)
        angles = np.degrees(np.arccos(np.clip((np.trace(delta[:, :3, :3], axis1=1, axis2=2) - 1) / 2, -1, 1)))
        assert np.allclose(angles, angle_deg, atol=1e-6)
        assert np.allclose(np.linalg.norm(delta[:, :3, 3], axis=1), shift_m, atol=1e-9)


def test_temporal_misalignment_takes_earlier_key_frames(dataset) -> None:
    infos = dataset.infos
    assert dataset.earlier_index(INDEX, 2) == INDEX - 2 and infos[INDEX - 2]["token"] == infos[INDEX - 1]["prev"]
    assert dataset.earlier_index(INDEX, 10) == 0 and infos[0]["prev"] == ""     # clamped at the scene start
    lidar = _corrupt(dataset, "temporal_misalignment_lidar", 2).points
    assert _same(lidar, dataset.load_points(infos[INDEX - 2]))
    images = _corrupt(dataset, "temporal_misalignment_camera", 3).images
    assert _same(images, dataset.load_cameras(infos[INDEX - 3])[0])


def test_missing_sensors_blank_the_stated_amount(dataset) -> None:
    for severity, count in zip(SEVERITIES, (1, 3, 6)):
        images = _corrupt(dataset, "missing_cameras", severity).images
        assert sum(not view.any() for view in images) == count
    points = dataset.load_sample(INDEX).points
    all_gone = _corrupt(dataset, "missing_lidar", 3).points
    assert all_gone.shape == points.shape and not all_gone.any()          # 360 deg: the ModalityDrop input
    half = _corrupt(dataset, "missing_lidar", 2).points
    assert 0.2 < (~half.any(axis=1)).mean() < 0.8


def test_failure_scenarios_drop_their_sensor(dataset) -> None:
    assert set(FAILURES) <= set(CORRUPTIONS) and "beam_reduction" in FAILURES
    assert [c.name for c in parse_corruptions(["failures"], [1])] == list(FAILURES)
    for severity in SEVERITIES:
        assert _corrupt(dataset, "lidar_drop", severity).points.shape == (0, 5)
        assert not _corrupt(dataset, "camera_drop", severity).images.any()          # all six black
    blank = [[not view.any() for view in _corrupt(dataset, "view_drop", s).images] for s in (1, 3)]
    assert [sum(b) for b in blank] == [1, 3]
    assert all(b3 for b1, b3 in zip(*blank) if b1)                                    # nested: the 1 is among the 3


def test_beam_reduction_keeps_16_8_4_of_32_rings() -> None:
    rings = np.repeat(np.arange(32), 10)
    points = np.concatenate([np.random.default_rng(0).normal(size=(len(rings), 4)), rings[:, None]], axis=1)

    class Frames:
        def rings(self) -> np.ndarray:
            return rings

    for severity, beams in zip(SEVERITIES, (16, 8, 4)):
        sample = Sample(token="t", points=points.copy(), gt_boxes=np.zeros((0, 9)), gt_labels=np.zeros(0, np.int64),
                        lidar2global=np.eye(4))
        kept = SensorCorruption("beam_reduction", severity)(sample, Frames()).points
        assert len(np.unique(kept[:, 4])) == beams and len(kept) == 10 * beams


def test_limited_fov_keeps_the_front_60_degrees(dataset) -> None:
    clean = dataset.load_sample(INDEX).points
    kept = _corrupt(dataset, "limited_fov", 2).points                     # the field's +-60 deg
    off_heading = np.degrees(np.arctan2(kept[:, 0], kept[:, 1]))        # LIDAR_TOP: x right, y forward
    assert len(kept) and np.abs(off_heading).max() <= 60.0
    outside = np.abs(np.degrees(np.arctan2(clean[:, 0], clean[:, 1]))) > 60.0
    assert outside.any() and len(kept) == (~outside).sum()
    from pyquaternion import Quaternion

    heading = Quaternion(dataset.infos[INDEX]["lidar2ego_rotation"]).rotation_matrix[0, :2]   # ego x in LiDAR
    assert np.allclose(heading, [0.0, 1.0], atol=1e-6)
    cosine = kept[:, :2] @ heading / np.linalg.norm(kept[:, :2], axis=1)
    assert cosine.min() >= np.cos(np.radians(60.0)) - 1e-6                    # the ego's front, not its side


def test_object_failure_removes_the_points_of_half_the_boxes(dataset) -> None:
    from aqrcmt.data.box_geometry import points_in_boxes

    clean = dataset.load_sample(INDEX)
    corrupted = _corrupt(dataset, "object_failure", 2)
    assert _same(corrupted.gt_boxes, clean.gt_boxes)
    before = points_in_boxes(clean.points[:, :3], clean.gt_boxes).sum(axis=0)
    after = points_in_boxes(corrupted.points[:, :3], clean.gt_boxes).sum(axis=0)
    assert len(before) >= 4 and (before > 0).all()
    emptied = after == 0
    assert emptied.sum() == round(len(before) / 2)
    assert _same(after[~emptied], before[~emptied])                        # the other boxes keep their points
    outside = ~points_in_boxes(clean.points[:, :3], clean.gt_boxes).any(axis=1)
    assert _same(corrupted.points[~points_in_boxes(corrupted.points[:, :3], clean.gt_boxes).any(axis=1)],
                 clean.points[outside])                                   # points outside the boxes untouched


def test_motion_blur_kernel() -> None:
    kernel = line_kernel(5.0, 0.0)
    assert kernel.sum() == pytest.approx(1.0) and np.allclose(kernel, kernel[::-1, ::-1], atol=1e-6)
    assert (kernel > 0).any(axis=1).sum() == 1 and (kernel > 1e-6).sum() >= 5     # a horizontal segment


def test_unknown_names_and_severities_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown corruption 'fog'; known: beam_reduction, points_reduction"):
        SensorCorruption("fog", 1)
    with pytest.raises(ValueError, match="unknown severity 4 .*known: 1, 2, 3"):
        SensorCorruption("snow", 4)
    assert len(parse_corruptions(["all"], [1, 3])) == 2 * len(CORRUPTIONS)
    assert [c.severity for c in parse_corruptions(["snow", "darkness"], [2])] == [2, 2]


def test_camera_corruption_without_images_says_so(synthetic_root: Path) -> None:
    from aqrcmt.data import build_dataset
    from aqrcmt.presets import load_config

    lidar_only = build_dataset(load_config("tiny", [f"data.root={synthetic_root}", "data.load_images=false"]),
                               SPLIT, train=False)
    with pytest.raises(ValueError, match="'brightness' changes the cameras.*load_images"):
        _corrupt(lidar_only, "brightness", 1)


def test_the_dataset_hook_corrupts_before_the_pipeline(dataset) -> None:
    clean = dataset[INDEX]
    dataset.set_corruption(SensorCorruption("points_reduction", 3))
    try:
        corrupted = dataset[INDEX]
    finally:
        dataset.set_corruption(None)
    assert len(corrupted.points) < 0.2 * len(clean.points)
    assert np.array_equal(corrupted.images, clean.images) and np.array_equal(corrupted.gt_boxes, clean.gt_boxes)
    assert np.array_equal(dataset[INDEX].points, clean.points)


def test_corruption_table_ra_and_mra() -> None:
    from aqrcmt.eval.robustness import corruption_table, format_corruptions

    table = corruption_table({"mAP": 0.5, "NDS": 0.6},
                             {"snow": {1: {"mAP": 0.4, "NDS": 0.54}, 2: {"mAP": 0.3, "NDS": 0.42}},
                              "darkness": {1: {"mAP": 0.5, "NDS": 0.6}, 2: {"mAP": 0.45, "NDS": 0.48}}})
    assert table["corruptions"]["snow"]["severities"]["2"]["RA"] == pytest.approx(0.7)
    assert table["corruptions"]["snow"]["RA"] == pytest.approx(0.8)
    assert table["mRA"] == pytest.approx((0.8 + 0.9) / 2)
    markdown = format_corruptions({"cmt": table, "aqr": table})
    assert "| snow | 2 | 0.3000 | 0.4200 | 0.7000 | 0.3000 |" in markdown and "**0.8500**" in markdown
    zero = corruption_table({"mAP": 0.0, "NDS": 0.0}, {"snow": {1: {"mAP": 0.0, "NDS": 0.0}}})
    assert zero["mRA"] is None and zero["corruptions"]["snow"]["severities"]["1"]["RA"] is None


def test_cli_rejects_unknown_corruptions_and_severities(tmp_path: Path, capsys) -> None:
    from aqrcmt.cli import main

    assert main(["evaluate", "--checkpoint", str(tmp_path), "--corruptions", "haze"]) == 2
    assert "unknown corruption 'haze'; known: beam_reduction" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--corruptions", "all", "--severities", "0"]) == 2
    assert "known: 1, 2, 3" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_cli_corruptions_compare(tmp_path: Path) -> None:
    """Two random-weight tiny checkpoints, two corruptions at two severities: json, md and png written."""
    import torch

    from aqrcmt.checkpoint.io import save_safetensors_atomic
    from aqrcmt.cli import main
    from aqrcmt.data.synthetic import make_synthetic_nuscenes
    from aqrcmt.models import build_model
    from aqrcmt.presets import load_config

    root = make_synthetic_nuscenes(tmp_path / "data", scenes=2, samples_per_scene=3)
    cfg = load_config("tiny", [f"data.root={root}"])
    for name, seed in (("cmt", 0), ("aqr", 1)):
        torch.manual_seed(seed)
        (tmp_path / name).mkdir()
        save_safetensors_atomic(build_model(cfg.model).state_dict(), tmp_path / name / "model.safetensors",
                                {"config": cfg.to_json()})
    out = tmp_path / "bench"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "cmt"), "--compare", str(tmp_path / "aqr"),
                 "--corruptions", "points_reduction", "darkness", "--severities", "1", "3", "--out", str(out),
                 "--condition", "clear"]) == 0        # the synthetic descriptions name no condition: the whole split
    report = json.loads((out / "robustness.json").read_text())
    assert list(report["models"]) == ["cmt", "aqr"] and report["severities"] == [1, 3]
    assert report["condition"] == "clear" and report["models"]["cmt"]["clean"]["mAP"] >= 0.0
    table = report["models"]["cmt"]
    assert list(table["corruptions"]) == ["points_reduction", "darkness"]
    assert list(table["corruptions"]["darkness"]["severities"]) == ["1", "3"]
    assert (out / "cmt" / "darkness_s3" / "metrics.json").is_file()
    assert "| points_reduction | 3 |" in (out / "robustness.md").read_text()
    assert (out / "robustness.md").read_text().startswith("# Robustness (mini_val, clear scenes")
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_labels_tell_checkpoints_of_the_same_step_apart() -> None:
    from aqrcmt.tools.evaluate import _labels

    same_step = ["/r/cmt/checkpoints/step_00000200/model.safetensors", "/r/aqr/checkpoints/step_00000200"]
    assert _labels(same_step) == ["cmt-step_00000200", "aqr-step_00000200"]
    assert _labels(["/r/a/step_1", "/r/a/step_2"]) == ["step_1", "step_2"]
    assert _labels(["/r/a/step_1", "/r/a/step_1"]) == ["step_1#1", "step_1#2"]
