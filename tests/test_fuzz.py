"""Fuzz: random and mutated bytes fed to the index (info pkl), checkpoint (safetensors) and results (JSON) readers
raise only the package's own errors (a deterministic seed; a few hundred inputs; under a few seconds)."""
from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from aqrcmt.structures import CAMERA_NAMES
from aqrcmt.checkpoint.io import load_safetensors, save_safetensors_atomic
from aqrcmt.errors import AqrcmtError
from aqrcmt.data.index import load_info_pkl
from aqrcmt.eval.nuscenes_eval import read_results_file

CASES_PER_READER = 150


def _info_pkl(path: Path) -> None:
    info = {"token": "t0", "lidar_path": "samples/LIDAR_TOP/a.pcd.bin", "sweeps": [], "timestamp": 1,
            "cams": {name: {"data_path": f"samples/{name}/a.jpg", "cam_intrinsic": np.eye(3),
                            "sensor2lidar_rotation": np.eye(3), "sensor2lidar_translation": np.zeros(3)}
                     for name in CAMERA_NAMES},
            "lidar2ego_translation": [0.0, 0.0, 1.8], "lidar2ego_rotation": [1.0, 0.0, 0.0, 0.0],
            "ego2global_translation": [0.0, 0.0, 0.0], "ego2global_rotation": [1.0, 0.0, 0.0, 0.0],
            "gt_boxes": np.array([[0.0, 0.0, 0.0, 4.5, 1.8, 1.6, 0.0], [8.0, 0.0, 0.0, 11.0, 2.9, 3.5, 0.0]]), "gt_names": np.array(["car", "bus"]), "gt_velocity": np.zeros((2, 2)),
            "num_lidar_pts": np.array([3, 4])}
    path.write_bytes(pickle.dumps({"infos": [info], "metadata": {"version": "v1.0-mini"}}, protocol=4))


def _safetensors(path: Path) -> None:
    save_safetensors_atomic({"a.weight": torch.arange(12.0).reshape(3, 4), "b.bias": torch.ones(5, dtype=torch.int64)},
                            path, {"config": "{}"})


def _results(path: Path) -> None:
    box = {"sample_token": "tok", "translation": [1.0, 2.0, 0.5], "size": [1.8, 4.5, 1.6],
           "rotation": [1.0, 0.0, 0.0, 0.0], "velocity": [0.0, 0.0], "detection_name": "car",
           "detection_score": 0.5, "attribute_name": "vehicle.parked"}
    path.write_text(json.dumps({"meta": {"use_camera": True}, "results": {"tok": [box, box]}}))


def _mutations(valid: bytes, rng: random.Random, count: int):
    """Random bytes, truncations, byte flips, insertions and chunk swaps of `valid`."""
    for i in range(count):
        kind = i % 5
        data = bytearray(valid)
        if kind == 0:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
        elif kind == 1:
            yield bytes(data[: rng.randrange(0, len(data))])
        elif kind == 2:
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            yield bytes(data)
        elif kind == 3:
            at = rng.randrange(len(data))
            yield bytes(data[:at] + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 16))) + data[at:])
        else:
            a, b = sorted(rng.randrange(len(data)) for _ in range(2))
            yield bytes(data[:a] + data[b:] + data[a:b])


@pytest.mark.parametrize("write, read", [(_info_pkl, load_info_pkl), (_safetensors, load_safetensors),
                                         (_results, read_results_file)], ids=["info_pkl", "safetensors", "results"])
def test_random_bytes_raise_only_package_errors(tmp_path: Path, write: Callable[[Path], None],
                                                read: Callable[[Path], object]) -> None:
    valid_path = tmp_path / "valid"
    write(valid_path)
    read(valid_path)   # the unmutated file is accepted
    rng = random.Random(13)
    path = tmp_path / "fuzzed"
    refused = 0
    for data in _mutations(valid_path.read_bytes(), rng, CASES_PER_READER):
        path.write_bytes(data)
        try:
            read(path)
        except AqrcmtError as error:
            assert str(path) in str(error), error
            refused += 1
    assert refused > CASES_PER_READER // 2   # most mutations are caught (a few survive, e.g. flipped digits)
