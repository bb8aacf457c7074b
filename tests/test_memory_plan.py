"""The memory accounting of a training step (aqrcmt/training/memory.py) on the tiny preset."""
from __future__ import annotations

import pytest
import torch

from aqrcmt.data.synthetic_batch import synthetic_batch
from aqrcmt.models import build_model
from aqrcmt.presets import load_config
from aqrcmt.training.loop import LossModel
from aqrcmt.training.memory import LOSSES, SavedTensorLedger, module_group, state_bytes_by_group


def saved_bytes(overrides: tuple[str, ...] = (), batch_size: int = 1, keep: bool = True,
                preset: str = "tiny") -> dict[str, int]:
    """Saved bytes by group of one training forward (with the losses); a backward follows when `keep`."""
    cfg = load_config(preset, list(overrides))
    torch.manual_seed(0)
    detector = build_model(cfg.model).train()
    batch = synthetic_batch(cfg.model, batch_size, num_boxes=(5,) * batch_size, seed=0)
    with SavedTensorLedger(detector, [*batch.points, batch.images], keep=keep) as ledger:
        losses = LossModel(detector)(batch).losses
    totals = ledger.bytes_by_group()
    if keep:
        sum(losses.values()).backward()           # the graph the ledger saw is complete and usable
    return totals


@pytest.fixture(scope="module")
def plain() -> dict[str, int]:
    return saved_bytes()


def test_every_trained_part_saves_and_voxelization_does_not(plain) -> None:
    for group in ("sparse encoder", "SECOND", "SECOND-FPN", "image backbone", "image neck", "head: decoder",
                  "head: embeddings, task heads", LOSSES):
        assert plain.get(group, 0) > 0, group
    assert "voxelization" not in plain             # the points need no gradient: nothing is saved for them


def test_module_groups_by_state_dict_name() -> None:
    assert module_group("pts_bbox_head.aqr.generator") == "AQR"
    assert module_group("pts_bbox_head.transformer.decoder.layers.0") == "head: decoder"
    assert module_group("pts_bbox_head.task_heads.0") == "head: embeddings, task heads"
    assert module_group("img_backbone.stem") == "image backbone"
    assert module_group("") == "detector"


@pytest.mark.parametrize("override, group", [("model.camera.checkpointing=true", "image backbone"),
                                             ("model.head.checkpointing=true", "head: decoder")])
def test_checkpointing_saves_less_in_its_module_only(plain, override: str, group: str) -> None:
    checkpointed = saved_bytes((override,))
    assert checkpointed.get(group, 0) < 0.7 * plain[group]
    for other in ("sparse encoder", "SECOND", "SECOND-FPN"):
        assert checkpointed[other] == plain[other]


def test_batch_of_two_saves_about_twice(plain) -> None:
    ratio = sum(saved_bytes(batch_size=2).values()) / sum(plain.values())
    assert 1.8 < ratio < 2.1


def test_dropping_the_saved_tensors_counts_about_the_same(plain) -> None:
    dropped = saved_bytes(keep=False)
    assert dropped["SECOND"] == plain["SECOND"] and dropped["image backbone"] == plain["image backbone"]
    assert abs(sum(dropped.values()) - sum(plain.values())) < 0.02 * sum(plain.values())


def test_aqr_is_charged_to_its_own_group() -> None:
    assert saved_bytes(preset="tiny_aqr_recommended")["AQR"] > 0


def test_state_bytes_follow_the_frozen_parameters() -> None:
    detector = build_model(load_config("tiny").model)
    before = state_bytes_by_group(detector)["image backbone"]
    assert before["trainable"] == before["params"] > 0
    detector.freeze(["img_backbone"])
    after = state_bytes_by_group(detector)["image backbone"]
    assert after == {"params": before["params"], "trainable": 0}
