"""Bad data costs nothing: a bad training sample is skipped and logged (the run stops past a fraction), training
samples without GT are left out when the dataset is built, broken annotations and calibrations are refused when
the index is built (naming sample, record and field), and ``aqrcmt check-data`` lists the bad samples.

Each test works on a copy of the synthetic root's tables and LiDAR key frames (images and sweeps linked).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aqrcmt.data.files import BadSampleError, DatasetError
from aqrcmt.data.index import load_or_build_infos
from aqrcmt.data.loader import build_dataset
from aqrcmt.presets import load_config
from aqrcmt.training import checkpointing as ckpt
from aqrcmt.training.loop import TrainOptions, train

VERSION = "v1.0-mini"
SMALL = ["data.sweeps=1", "model.camera.image_size=(64,160)", "model.head.num_query=32", "train.tracker=none",
         "train.eval_every_epochs=0", "train.keep_last=0", "data.batch_size=2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def root(synthetic_root: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic root whose tables and LIDAR_TOP key frames may be changed."""
    copy = tmp_path / "nuscenes"
    copy.mkdir()
    shutil.copytree(synthetic_root / VERSION, copy / VERSION)
    for name in ("maps", "sweeps"):
        (copy / name).symlink_to(synthetic_root / name)
    (copy / "samples").mkdir()
    for sensor in (synthetic_root / "samples").iterdir():
        if sensor.name == "LIDAR_TOP":
            shutil.copytree(sensor, copy / "samples" / sensor.name)
        else:
            (copy / "samples" / sensor.name).symlink_to(sensor)
    return copy


def _table(root: Path, name: str) -> list[dict]:
    return json.loads((root / VERSION / f"{name}.json").read_text())


def _write_table(root: Path, name: str, records: list[dict]) -> None:
    (root / VERSION / f"{name}.json").write_text(json.dumps(records))


def _config(root: Path, out: Path, *extra: str):
    return load_config("tiny", [f"data.root={root}", f"train.output_dir={out}", *SMALL, *extra])


def _train_lidar_file(root: Path, position: int) -> tuple[str, Path]:
    """(token, LiDAR file) of the training sample at `position` of the index."""
    info = build_dataset(_config(root, root / "unused"), "mini_train", train=True).infos[position]
    return info["token"], root / "samples" / "LIDAR_TOP" / Path(info["lidar_path"]).name


def test_a_bad_sample_mid_epoch_is_skipped_and_logged_and_too_many_stop_the_run(root, tmp_path):
    token, lidar = _train_lidar_file(root, 7)
    lidar.write_bytes(lidar.read_bytes()[:-6])          # truncated
    result = train(_config(root, tmp_path / "run", "train.max_steps=6", "data.max_skipped_fraction=0.1"),
                   TrainOptions())     # 1 of 12 samples
    assert result.progress.step == 6
    [entry] = [json.loads(line) for line in (tmp_path / "run" / "skipped_samples_rank0.jsonl").read_text().splitlines()]
    assert entry["token"] == token and "truncated" in entry["reason"] and str(lidar) in entry["reason"]

    with pytest.raises(BadSampleError, match=r"1 training samples failed to load, more than "
                                             r"data.max_skipped_fraction = 0 .*skipped_samples_rank\*.jsonl"):
        train(_config(root, tmp_path / "strict", "train.max_steps=6", "data.max_skipped_fraction=0"), TrainOptions())
    assert ckpt.resolve_resume(tmp_path / "strict", "latest") is not None   # the trained steps are kept


def test_training_samples_without_gt_are_left_out_when_the_dataset_is_built(root, tmp_path, capsys):
    token, _ = _train_lidar_file(root, 2)
    annotations = _table(root, "sample_annotation")
    for annotation in annotations:
        if annotation["sample_token"] == token:
            annotation["num_lidar_pts"] = 0     # boxes without LiDAR points are not training targets
    _write_table(root, "sample_annotation", annotations)
    dataset = build_dataset(_config(root, tmp_path / "run"), "mini_train", train=True)
    assert dataset.num_empty_gt == 1 and token not in {i["token"] for i in dataset.infos}
    evaluated = build_dataset(_config(root, tmp_path / "run"), "mini_train", train=False)
    assert token in {i["token"] for i in evaluated.infos}
    train(_config(root, tmp_path / "run", "train.max_steps=1"), TrainOptions())
    assert "1 samples without a GT box with LiDAR points of the detection classes are left out of training" \
        in capsys.readouterr().out


@pytest.mark.parametrize("table, field, value, message", [
    ("sample_annotation", "translation", [float("nan"), 0.0, 0.0], "translation' = \\[nan, 0.0, 0.0\\] is not finite"),
    ("sample_annotation", "size", [1.0, 0.0, 1.5], "size' = \\[1.0, 0.0, 1.5\\] must be > 0"),
    ("calibrated_sensor", "camera_intrinsic", [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0]], "camera_intrinsic' .* singular"),
    ("calibrated_sensor", "rotation", [float("nan"), 0.0, 0.0, 1.0], "rotation' = \\[nan, .* is not finite"),
])
def test_broken_annotations_and_calibrations_are_refused_naming_sample_record_and_field(root, table, field, value,
                                                                                          message):
    records = _table(root, table)
    cameras = {s["token"] for s in _table(root, "sensor") if s["modality"] == "camera"}
    target = next(r for r in records if table != "calibrated_sensor" or r["sensor_token"] in cameras)
    target[field] = value
    _write_table(root, table, records)
    with pytest.raises(DatasetError, match=message) as refused:
        load_or_build_infos(root, VERSION, "mini_train", 1)
    text = str(refused.value)
    assert f"{table} {target['token']}" in text and text.startswith(("sample ", "sample_data "))


def test_check_data_lists_every_bad_sample_with_its_file_and_reason(root, capsys):
    from aqrcmt.cli import main

    token, lidar = _train_lidar_file(root, 3)
    points = np.fromfile(lidar, dtype=np.float32)
    points[11] = np.nan
    points.tofile(lidar)
    assert main(["check-data", "--root", str(root), "--version", VERSION, "--split", "mini_train", "mini_val",
                 "--sweeps", "1", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("bad: ")] == \
        [f"bad: sample {token}: LiDAR file {lidar} holds NaN or infinite values"]
    assert "mini_train: 12 samples checked in" in out and ", 1 bad" in out and "mini_val: 6 samples" in out
