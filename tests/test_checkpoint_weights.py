"""The one weights loader: key matching after wrapper stripping, the "does not fit" report, checkpoint folders,
and a detector built from the config stored in its weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aqrcmt.checkpoint.io import CheckpointError, save_safetensors_atomic
from aqrcmt.checkpoint.weights import load_weights, stored_config
from aqrcmt.inference import load_detector_from_checkpoint
from aqrcmt.presets import get_preset


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)


def _state(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {**_Net().state_dict(), **changes}


def test_wrapper_prefixes_are_stripped_and_a_checkpoint_folder_is_read(tmp_path: Path) -> None:
    state = _state()
    wrapped = {("module." if i % 2 else "_orig_mod.") + k: v for i, (k, v) in enumerate(state.items())}
    (tmp_path / "step_1").mkdir()
    save_safetensors_atomic(wrapped, tmp_path / "step_1" / "model.safetensors", {"step": "1"})
    model = _Net()
    report = load_weights(model, tmp_path / "step_1")
    assert report.ok and report.metadata == {"step": "1"} and report.path.name == "model.safetensors"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_missing_unexpected_and_wrong_shape_keys_are_reported_and_nothing_is_loaded(tmp_path: Path) -> None:
    state = _state(**{"encoder.weight": torch.zeros(5, 3), "head.bias": torch.zeros(2)})
    del state["norm.running_var"]
    save_safetensors_atomic(state, tmp_path / "w.safetensors", {})
    model = _Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_weights(model, tmp_path / "w.safetensors")
    message = str(error.value)
    assert str(tmp_path / "w.safetensors") in message and "does not fit" in message
    assert "1 missing ['norm.running_var']" in message and "1 unexpected ['head.bias']" in message
    assert "1 wrong shapes ['encoder.weight: file (5, 3) vs model (4, 3)']" in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    del state["encoder.weight"]
    save_safetensors_atomic(state, tmp_path / "w.safetensors", {})
    report = load_weights(model, tmp_path / "w.safetensors", allow_missing=["norm.running_*", "encoder.*"],
                          allow_unexpected=["head.*"])
    assert report.kept_init == ["encoder.weight", "norm.running_var"] and report.ignored == ["head.bias"]
    assert torch.equal(model.encoder.bias, state["encoder.bias"])
    assert not torch.equal(model.encoder.weight, torch.zeros(4, 3))   # kept its initialisation
    report = load_weights(model, tmp_path / "w.safetensors", allow_unexpected=["head.*"],
                          missing_ok_prefixes=("encoder.", "norm."))
    assert report.kept_init == ["encoder.weight", "norm.running_var"]


def test_keys_that_collide_after_stripping_and_files_that_are_not_safetensors(tmp_path: Path) -> None:
    save_safetensors_atomic({"encoder.bias": torch.zeros(4), "module.encoder.bias": torch.ones(4)},
                            tmp_path / "twice.safetensors", {})
    with pytest.raises(CheckpointError, match="appears twice"):
        load_weights(_Net(), tmp_path / "twice.safetensors")
    torch.save(_state(), tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match="aqrcmt convert"):
        load_weights(_Net(), tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(_Net(), tmp_path / "absent")


def test_detector_is_built_from_the_stored_config(tmp_path: Path) -> None:
    from aqrcmt.models import build_model

    cfg = get_preset("tiny")
    cfg.model.head.num_query = 16
    torch.manual_seed(3)
    saved = build_model(cfg.model)
    save_safetensors_atomic(saved.state_dict(), tmp_path / "model.safetensors", {"config": cfg.to_json()})
    assert json.loads(stored_config(tmp_path).to_json()) == json.loads(cfg.to_json())
    detector, report = load_detector_from_checkpoint(tmp_path, "cpu")
    assert report.ok and not detector.training and detector.cfg.head.num_query == 16
    assert all(torch.equal(detector.state_dict()[k], v) for k, v in saved.state_dict().items())
    aqr_cfg = get_preset("tiny_aqr")
    aqr_cfg.model.head.num_query = 16
    with pytest.raises(CheckpointError, match=r"missing \['pts_bbox_head.aqr."):   # strict unless asked
        load_detector_from_checkpoint(tmp_path, "cpu", aqr_cfg)
    _, report = load_detector_from_checkpoint(tmp_path, "cpu", aqr_cfg, missing_ok_prefixes=("pts_bbox_head.aqr.",))
    assert report.kept_init and all(k.startswith("pts_bbox_head.aqr.") for k in report.kept_init)
    save_safetensors_atomic(saved.state_dict(), tmp_path / "bare.safetensors", {})
    with pytest.raises(CheckpointError, match="stores no config"):
        stored_config(tmp_path / "bare.safetensors")
