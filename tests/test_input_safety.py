"""Inputs refused where they enter, naming the file/sample/field, and offline tools that leave nothing half-written:
strict image decoding and recorded sizes, info fields checked at index load, non-pickle files, results files
validated before the devkit, synthetic roots and GT databases written beside their destination."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aqrcmt.config import Config
from aqrcmt.data import dataset as dataset_module
from aqrcmt.data.dataset import NuScenesDataset, resolve_path
from aqrcmt.data.files import BadSampleError, DatasetError, read_image
from aqrcmt.data.gt_database import build_gt_database
from aqrcmt.data.index import load_info_pkl, load_or_build_infos
from aqrcmt.data.loader import build_dataset
from aqrcmt.data.synthetic import make_synthetic_nuscenes
from aqrcmt.errors import AqrcmtError
from aqrcmt.eval.nuscenes_eval import EvaluationError, read_results_file
from aqrcmt.presets import get_preset


@pytest.fixture()
def cfg(synthetic_root: Path) -> Config:
    cfg = get_preset("tiny")
    cfg.data.root = str(synthetic_root)
    cfg.data.index_cache_dir = str(synthetic_root / ".test_index_cache")
    return cfg


def _hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha1 of every file under `root` (and the names of every folder)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_package_errors_keep_their_builtin_bases() -> None:
    from aqrcmt.checkpoint.io import CheckpointError
    from aqrcmt.config import ConfigError

    for error, base in ((ConfigError, ValueError), (CheckpointError, ValueError), (BadSampleError, RuntimeError),
                        (DatasetError, ValueError), (EvaluationError, ValueError)):
        assert issubclass(error, AqrcmtError) and issubclass(error, base)
    assert dataset_module.BadSampleError is BadSampleError


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def _dataset_with_image(cfg: Config, camera: str, data: bytes, tmp_path: Path) -> NuScenesDataset:
    cfg.data.load_images = True
    dataset = build_dataset(cfg, cfg.data.val_split, train=False)
    info = dict(dataset.infos[0])
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    info["cams"] = {**info["cams"], camera: {**info["cams"][camera], "data_path": str(path)}}
    dataset.infos = [info] + dataset.infos[1:]
    return dataset


def _camera_jpeg(dataset: NuScenesDataset, camera: str) -> bytes:
    return resolve_path(dataset.infos[0]["cams"][camera]["data_path"], dataset.root).read_bytes()


def test_truncated_jpeg_is_a_bad_sample_naming_the_file(cfg: Config, tmp_path: Path) -> None:
    good = _camera_jpeg(build_dataset(cfg, cfg.data.val_split, train=False), "CAM_BACK")
    dataset = _dataset_with_image(cfg, "CAM_BACK", good[: len(good) // 2], tmp_path)
    with pytest.raises(BadSampleError, match=r"CAM_BACK image .*bad\.jpg is a truncated JPEG") as error:
        dataset.load_sample(0)
    assert dataset.infos[0]["token"] in str(error.value)
    # Data cut short (or scrambled) inside an intact file: libjpeg only warns and pads with grey; that is an error.
    spliced = good[: len(good) // 2] + b"\xff\xd9"
    scrambled = bytearray(good)
    scrambled[len(good) // 3: len(good) // 3 + 100] = bytes(b ^ 0x55 for b in scrambled[len(good) // 3:][:100])
    for data in (spliced, bytes(scrambled)):
        with pytest.raises(BadSampleError, match=r"CAM_BACK image .*bad\.jpg is corrupt: the decoder reports "
                                                 r"'Corrupt JPEG data"):
            read_image(_write(tmp_path / "bad.jpg", data), "CAM_BACK image")
    with pytest.raises(BadSampleError, match=r"text\.jpg is truncated or not a readable image"):
        read_image(_write(tmp_path / "text.jpg", b"this is not an image"), "CAM_BACK image")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_decoding_matches_opencv_and_leaves_stderr_working(tmp_path: Path, capfd) -> None:
    import cv2

    image = tmp_path / "ok.png"
    Image.new("RGB", (32, 16), (10, 20, 30)).save(image)
    pixels = read_image(image, "image")
    assert pixels.shape == (16, 32, 3) and pixels[0, 0].tolist() == [30, 20, 10]   # BGR
    assert np.array_equal(pixels, cv2.imread(str(image), cv2.IMREAD_COLOR))
    os.write(2, b"still on stderr\n")
    assert "still on stderr" in capfd.readouterr().err


def _resized_jpeg(data: bytes, tmp_path: Path) -> bytes:
    path = tmp_path / "source.jpg"
    path.write_bytes(data)
    with Image.open(path) as image:
        image.resize((image.width // 2, image.height // 2)).save(tmp_path / "small.jpg")
    return (tmp_path / "small.jpg").read_bytes()


def test_image_of_another_size_than_recorded_names_that_camera(cfg: Config, tmp_path: Path) -> None:
    dataset = build_dataset(cfg, cfg.data.val_split, train=False)
    recorded = dataset.infos[0]["cams"]["CAM_BACK_LEFT"]
    small = _resized_jpeg(_camera_jpeg(dataset, "CAM_BACK_LEFT"), tmp_path)
    dataset = _dataset_with_image(cfg, "CAM_BACK_LEFT", small, tmp_path)
    w, h = recorded["width"], recorded["height"]
    with pytest.raises(BadSampleError, match=rf"CAM_BACK_LEFT image .*bad\.jpg is {w // 2}x{h // 2} px, the index "
                                             rf"records {w}x{h}"):
        dataset.load_sample(0)
    # An mmdet3d pkl records no sizes: the camera that differs from the others is named, not its neighbour.
    info = dataset.infos[0]
    info["cams"] = {name: {k: v for k, v in cam.items() if k not in ("width", "height")}
                    for name, cam in info["cams"].items()}
    with pytest.raises(BadSampleError, match=rf"CAM_BACK_LEFT image .*bad\.jpg is {w // 2}x{h // 2} px, the other "
                                             rf"cameras' are {w}x{h} px") as error:
        dataset.load_sample(0)
    assert "CAM_FRONT" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# Index files
# --------------------------------------------------------------------------------------------------
def _without(info: dict, field: str) -> dict:
    """A deep-enough copy of `info` without the dotted `field` ('cams.CAM_FRONT.data_path', 'sweeps.0.timestamp')."""
    info = {**info, "cams": {k: dict(v) for k, v in info["cams"].items()}, "sweeps": [dict(s) for s in info["sweeps"]]}
    *parents, last = field.split(".")
    record = info
    for part in parents:
        record = record[int(part)] if part.isdigit() else record[part]
    del record[last]
    return info


@pytest.mark.parametrize("field, shown", [
    ("cams", "'cams'"), ("lidar2ego_translation", "'lidar2ego_translation'"), ("token", "'token'"),
    ("cams.CAM_FRONT_RIGHT", "'cams.CAM_FRONT_RIGHT'"), ("cams.CAM_BACK.cam_intrinsic", "'cams.CAM_BACK.cam_intrinsic'"),
    ("sweeps.0.timestamp", "'sweeps[0].timestamp'"), ("gt_velocity", "'gt_velocity'"),
])
def test_info_with_a_missing_field_is_refused_at_load(cfg: Config, tmp_path: Path, field: str, shown: str) -> None:
    infos = build_dataset(cfg, cfg.data.val_split, train=False).infos
    infos = [*infos[:2], _without(infos[2], field), *infos[3:]]
    path = tmp_path / "infos.pkl"
    path.write_bytes(pickle.dumps({"infos": infos}))
    with pytest.raises(DatasetError, match=re.escape(f"info pkl {path}: info 2 (sample ")
                       + f".* lacks the field {re.escape(shown)}") as error:
        load_info_pkl(path)
    if field != "token":
        assert f"sample {infos[2]['token']}" in str(error.value)


def test_gt_fields_of_different_lengths_are_refused(cfg: Config, tmp_path: Path) -> None:
    infos = list(build_dataset(cfg, cfg.data.val_split, train=False).infos)
    infos[1] = {**infos[1], "gt_names": infos[1]["gt_names"][:-1]}
    path = tmp_path / "infos.pkl"
    path.write_bytes(pickle.dumps({"infos": infos}))
    with pytest.raises(DatasetError, match="info 1 .*different lengths"):
        load_info_pkl(path)


def test_non_pickle_and_foreign_pickles_are_refused_naming_the_file(tmp_path: Path) -> None:
    text = _write(tmp_path / "infos.pkl", b"version: 1\ninfos: []\n")
    with pytest.raises(DatasetError, match=f"info pkl {text} is not a readable pickle"):
        load_info_pkl(text)
    with pytest.raises(DatasetError, match="expected a dict with an 'infos' list"):
        load_info_pkl(_write(tmp_path / "list.pkl", pickle.dumps([1, 2])))
    marker = tmp_path / "executed"
    payload = pickle.dumps(_Exploit(str(marker)))   # unpickling would call os.mkdir(marker)
    with pytest.raises(DatasetError, match="refusing to load the global"):
        load_info_pkl(_write(tmp_path / "exploit.pkl", payload))
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_info_pkl(tmp_path / "missing.pkl")


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_unreadable_index_cache_is_rebuilt(cfg: Config, tmp_path: Path) -> None:
    infos, cache = load_or_build_infos(cfg.data.root, "v1.0-mini", "mini_val", 2, tmp_path)
    cache.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding the nuScenes index: .*not a readable pickle"):
        again, _ = load_or_build_infos(cfg.data.root, "v1.0-mini", "mini_val", 2, tmp_path)
    assert [i["token"] for i in again] == [i["token"] for i in infos]


# --------------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------------
def _box(**changes) -> dict:
    box = {"sample_token": "tok1", "translation": [1.0, 2.0, 0.5], "size": [1.8, 4.5, 1.6],
           "rotation": [1.0, 0.0, 0.0, 0.0], "velocity": [0.0, 0.0], "detection_name": "car",
           "detection_score": 0.9, "attribute_name": "vehicle.parked"}
    box.update(changes)
    return {k: v for k, v in box.items() if v is not _DROP}


_DROP = object()
_META = {"use_camera": True, "use_lidar": True, "use_radar": False, "use_map": False, "use_external": False}
BAD_RESULTS = {
    "nan translation": ({"meta": _META, "results": {"tok1": [_box(translation=[1.0, float("nan"), 0.0])]}},
                        "sample tok1 box 0: field 'translation'"),
    "negative size": ({"meta": _META, "results": {"tok1": [_box(size=[1.8, -4.5, 1.6])]}},
                      "sample tok1 box 0: field 'size' must be 3 finite numbers > 0"),
    "zero size": ({"meta": _META, "results": {"tok1": [_box(), _box(size=[0, 1, 1])]}}, "sample tok1 box 1: field 'size'"),
    "unknown class": ({"meta": _META, "results": {"tok1": [_box(detection_name="tram")]}},
                      "sample tok1 box 0: field 'detection_name' 'tram' is not one of"),
    "unknown attribute": ({"meta": _META, "results": {"tok1": [_box(attribute_name="parked")]}},
                          "sample tok1 box 0: field 'attribute_name' 'parked'"),
    "missing key": ({"meta": _META, "results": {"tok1": [_box(detection_score=_DROP)]}},
                    r"sample tok1 box 0 lacks the field\(s\) \['detection_score'\]"),
    "nan score": ({"meta": _META, "results": {"tok1": [_box(detection_score=float("nan"))]}},
                  "sample tok1 box 0: field 'detection_score' must be a finite number"),
    "wrong token": ({"meta": _META, "results": {"tok1": [_box(sample_token="tok2")]}},
                    "sample tok1 box 0: field 'sample_token' is 'tok2'"),
    "short rotation": ({"meta": _META, "results": {"tok1": [_box(rotation=[1.0, 0.0])]}},
                       "sample tok1 box 0: field 'rotation' must be 4"),
    "boxes not a list": ({"meta": _META, "results": {"tok1": {"a": 1}}}, "sample tok1: the boxes must be a list"),
    "no meta": ({"results": {}}, "needs a 'meta' object and a 'results' object"),
    "malformed JSON": ('{"meta": {}, "results": {"tok1": [', "is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
def test_bad_results_files_are_refused_naming_sample_and_field(tmp_path: Path, case: str) -> None:
    content, message = BAD_RESULTS[case]
    path = _write(tmp_path / "results.json", (content if isinstance(content, str) else json.dumps(content)).encode())
    with pytest.raises(EvaluationError, match=message) as error:
        read_results_file(path)
    assert str(path) in str(error.value)


def test_a_valid_results_file_passes() -> None:
    from aqrcmt.eval.nuscenes_eval import validate_results

    validate_results({"meta": _META, "results": {"tok1": [_box(), _box(attribute_name="")], "tok2": []}}, "x")


# --------------------------------------------------------------------------------------------------
# Offline tools: nothing half-written
# --------------------------------------------------------------------------------------------------
SMALL = dict(version="v1.0-mini", scenes=2, samples_per_scene=2, image_size=(32, 18))


def test_synthetic_over_an_existing_root_is_refused_and_overwrite_replaces_it(tmp_path: Path) -> None:
    root = make_synthetic_nuscenes(tmp_path / "root", seed=0, **SMALL)
    before = _hashes(root)
    with pytest.raises(FileExistsError, match=f"{root} exists and is not empty"):
        make_synthetic_nuscenes(root, seed=1, **SMALL)
    assert _hashes(root) == before
    make_synthetic_nuscenes(root, seed=1, overwrite=True, **SMALL)
    after = _hashes(root)
    assert after != before and set(after) != set() and (root / "v1.0-mini" / "sample.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]   # no staging or replaced folder left


def test_a_failed_synthetic_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    from aqrcmt.data.synthetic import writer

    def disk_full(self, version: str) -> None:
        raise OSError(28, "No space left on device", str(self.root / version / "sample.json"))

    monkeypatch.setattr(writer._Writer, "write_tables", disk_full)
    with pytest.raises(OSError, match="No space left"):
        make_synthetic_nuscenes(tmp_path / "root", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_keeps_the_old_root(tmp_path: Path, monkeypatch) -> None:
    from aqrcmt.data.synthetic import writer

    root = make_synthetic_nuscenes(tmp_path / "root", **SMALL)
    before = _hashes(root)
    monkeypatch.setattr(writer._Writer, "write_tables", lambda self, version: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        make_synthetic_nuscenes(root, overwrite=True, seed=5, **SMALL)
    assert _hashes(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def _failing_dataset(cfg: Config) -> NuScenesDataset:
    cfg.data.load_images = False
    dataset = build_dataset(cfg, cfg.data.val_split, train=False)
    dataset.infos = [*dataset.infos[:2], {**dataset.infos[2], "lidar_path": "samples/LIDAR_TOP/missing.pcd.bin"}]
    return dataset


def test_a_failed_gt_database_build_leaves_nothing_or_the_old_database(cfg: Config, tmp_path: Path) -> None:
    out = tmp_path / "db"
    with pytest.raises(BadSampleError, match="missing.pcd.bin"):
        build_gt_database(_failing_dataset(cfg), out)
    assert list(tmp_path.iterdir()) == []
    cfg.data.load_images = False
    build_gt_database(build_dataset(cfg, cfg.data.val_split, train=False), out)
    before = _hashes(out)
    assert "dbinfos.pkl" in before and any(k.startswith("objects/") for k in before)
    with pytest.raises(BadSampleError):
        build_gt_database(_failing_dataset(cfg), out)
    assert _hashes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_gt_database_refuses_a_folder_that_is_not_a_database(cfg: Config, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    cfg.data.load_images = False
    with pytest.raises(FileExistsError, match=r"not part of a GT database \(\['notes.txt'\]\)"):
        build_gt_database(build_dataset(cfg, cfg.data.val_split, train=False), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
