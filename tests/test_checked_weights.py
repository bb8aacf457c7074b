"""Checked weights on every read path and a full disk: a relabelled dtype, unreadable config metadata and a
checkpoint directory whose checksums.json does not match are refused naming file and key; a disk that fills
during a checkpoint ends in one error naming the path, with no temporaries left and the last checkpoint intact;
temporaries of a killed writer are pruned when a run starts."""
from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest
import torch

from aqrcmt.checkpoint import io
from aqrcmt.checkpoint.io import CheckpointError, save_safetensors_atomic, sha256_of
from aqrcmt.checkpoint.weights import load_weights, required_settings, stored_config
from aqrcmt.config import ConfigError
from aqrcmt.data.files import DatasetError
from aqrcmt.presets import load_config
from aqrcmt.training.loop import TrainOptions, train

SMALL = ["data.sweeps=1", "model.camera.image_size=(64,160)", "model.head.num_query=32", "train.tracker=none",
         "train.eval_every_epochs=0", "train.keep_last=0", "data.batch_size=2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)


def _relabel(path: Path, key: str, dtype: str) -> None:
    """Rewrite the safetensors header so that tensor `key` claims `dtype` (same byte size), keeping its length."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    header[key]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    path.write_bytes(data[:8] + text.ljust(length) + data[8 + length:])


def test_a_tensor_relabelled_to_another_dtype_kind_is_refused_naming_it(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_safetensors_atomic(_Net().state_dict(), file)
    _relabel(file, "norm.weight", "I32")
    model = _Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"1 wrong dtypes \['norm.weight: file torch.int32 vs model "
                                              r"torch.float32'\]"):
        load_weights(model, file)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    half = tmp_path / "half.safetensors"          # a cast within a kind (fp16 -> fp32) still loads
    save_safetensors_atomic({k: v.half() if v.is_floating_point() else v for k, v in _Net().state_dict().items()},
                            half)
    assert load_weights(_Net(), half).ok


def test_unreadable_config_metadata_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_safetensors_atomic(_Net().state_dict(), file, {"config": "{not json", "aqrcmt_required_settings": "[1]"})
    with pytest.raises(CheckpointError, match=rf"{file}: metadata 'config' is not readable JSON"):
        stored_config(file)
    with pytest.raises(CheckpointError, match="metadata 'aqrcmt_required_settings' is not a JSON object"):
        required_settings(file)


def test_a_checkpoint_directory_is_verified_against_its_checksums_wherever_it_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    save_safetensors_atomic(_Net().state_dict(), folder / "model.safetensors")
    (folder / io.CHECKSUMS).write_text(json.dumps({"sha256": {"model.safetensors":
                                                              sha256_of(folder / "model.safetensors")}}))
    assert load_weights(_Net(), folder).ok
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: sha256 differs from .*checksums.json"):
        load_weights(_Net(), folder)
    with pytest.raises(CheckpointError, match="sha256 differs"):
        stored_config(folder)


def test_a_full_disk_during_a_checkpoint_is_one_error_and_leaves_no_temporaries(synthetic_root, tmp_path,
                                                                                 monkeypatch, capsys):
    """ENOSPC injected into the file writes of the second checkpoint; the next start prunes a killed writer's
    temporaries and continues from the first checkpoint."""
    run = tmp_path / "run"
    overrides = [f"data.root={synthetic_root}", f"train.output_dir={run}", *SMALL, "train.max_steps=2",
                 "train.checkpoint_every_steps=1"]
    real_save = torch.save
    calls = []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:                      # step 1: training_state.pt and rng_rank0.pt
            return real_save(obj, f, *args, **kwargs)
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.torch, "save", save_until_full)
    with pytest.raises(CheckpointError, match=rf"disk full writing the checkpoint of step 2 to {run / 'checkpoints'} "
                                              rf"\(.*training_state.pt; \d+ MiB free\); .*step_00000001 is the last"):
        train(load_config("tiny", overrides), TrainOptions())
    monkeypatch.setattr(io.torch, "save", real_save)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert not list(run.glob(".*"))

    (run / "checkpoints" / ".step_00000002.k1ll3d.partial").mkdir()     # what a SIGKILL mid-write leaves
    (run / ".config.json.k1ll3d.tmp").write_text("{")
    capsys.readouterr()
    assert train(load_config("tiny", overrides), TrainOptions(resume="latest")).progress.step == 2
    assert "removed 2 temporary file(s)/folder(s) left by an interrupted write" in capsys.readouterr().out
    assert not list(run.glob(".*")) and not list((run / "checkpoints").glob(".*"))


def test_fp16_on_the_cpu_a_batch_larger_than_the_split_and_modality_drop_at_batch_1_are_one_line_each(
        synthetic_root, tmp_path):
    common = [f"data.root={synthetic_root}", f"train.output_dir={tmp_path / 'run'}", *SMALL[:-1]]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.mixed_precision 'fp16' needs a CUDA GPU"):
            train(load_config("tiny", [*common, "train.mixed_precision=fp16"]), TrainOptions())
    with pytest.raises(ConfigError, match=r"data.batch_size=1 with data.augment.modality_drop=true: a LiDAR-dropped "
                                          r"sample is one voxel"):
        train(load_config("tiny", [*common, "data.batch_size=1", "data.augment.modality_drop=true"]), TrainOptions())
    with pytest.raises(DatasetError, match=r"12 samples, 12 per process, make 0 whole batches of data.batch_size = "
                                           r"13 per process"):
        train(load_config("tiny", [*common, "data.batch_size=13"]), TrainOptions())
    assert not (tmp_path / "run").exists()
