"""Activation checkpointing (`model.camera.checkpointing`, `model.head.checkpointing`): the same parameters and
state-dict keys, the same outputs and gradients in training, and no recomputation outside training."""
from __future__ import annotations

import copy

import pytest
import torch

from aqrcmt.config import CameraConfig
from aqrcmt.models import camera
from aqrcmt.models.camera import build_image_backbone, recompute_blocks_in_training
from aqrcmt.models.resnet import BasicBlock
from aqrcmt.models.transformer import Decoder
from aqrcmt.models.vovnet import VoVNet, VoVNetSpec


def outputs_and_grads(module: torch.nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    out = module(*inputs)
    out = torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out.flatten()
    weights = torch.linspace(-1.0, 1.0, out.numel())
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), params + [i for i in inputs if i.requires_grad])
    return [out.detach(), *grads]


def checkpointed_copy(plain: torch.nn.Module) -> torch.nn.Module:
    recomputed = copy.deepcopy(plain)
    recompute_blocks_in_training(recomputed)
    return recomputed


SMALL_VOVNET = VoVNetSpec(stem_channels=(8, 8, 16), stage_conv_channels=(8, 8, 8, 8),
                          stage_out_channels=(16, 24, 32, 40), layers_per_block=2, blocks_per_stage=(1, 2, 1, 1))


@pytest.mark.parametrize("make_plain, segments", [
    (lambda: build_image_backbone(CameraConfig(backbone="tiny", backbone_out_channels=(32, 48), image_size=(64, 96),
                                               frozen_bn=False)), 4),               # four BasicBlocks
    (lambda: VoVNet(SMALL_VOVNET, frozen_bn=False), 1 + 5),                         # the stem and five OSA blocks
], ids=["resnet", "vovnet"])
def test_checkpointed_backbone_recomputes_each_block_with_the_same_gradients(make_plain, segments, monkeypatch):
    torch.manual_seed(0)
    plain = make_plain().train()
    recomputed = checkpointed_copy(plain)
    assert list(recomputed.state_dict()) == list(plain.state_dict())
    calls = []
    original = camera.checkpoint
    monkeypatch.setattr(camera, "checkpoint", lambda fn, *args, **kw: calls.append(fn) or original(fn, *args, **kw))
    images = torch.randn(2, 3, 64, 96)
    for a, b in zip(outputs_and_grads(plain, images), outputs_and_grads(recomputed, images)):
        torch.testing.assert_close(a, b)
    assert len(calls) == segments                                   # one checkpoint per block, none around it
    with torch.no_grad():
        recomputed(images)
    recomputed.eval()(images)
    assert len(calls) == segments                                   # no recomputation outside a training step


def test_the_config_option_checkpoints_the_blocks():
    cfg = CameraConfig(backbone="tiny", backbone_out_channels=(32, 48), image_size=(64, 96), checkpointing=True)
    kinds = {type(m) for m in build_image_backbone(cfg).modules()}
    assert camera.CheckpointedBasicBlock in kinds and BasicBlock not in kinds


def test_checkpointed_decoder_replays_dropout_and_matches():
    torch.manual_seed(0)
    plain = Decoder(num_layers=2, embed_dim=32, num_heads=4, ffn_dim=64, dropout=0.2).train()
    recomputed = Decoder(num_layers=2, embed_dim=32, num_heads=4, ffn_dim=64, dropout=0.2, checkpointing=True).train()
    recomputed.load_state_dict(plain.state_dict())
    query_pos, key_pos = torch.randn(2, 5, 32), torch.randn(2, 40, 32)
    memory = torch.randn(2, 40, 32, requires_grad=True)
    results = []
    for module in (plain, recomputed):
        torch.manual_seed(1)                                      # the same dropout masks in both forwards
        results.append(outputs_and_grads(module, query_pos, memory, key_pos))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_no_recomputation_without_gradients_or_in_eval(monkeypatch):
    calls = []
    import aqrcmt.models.transformer as transformer
    monkeypatch.setattr(transformer, "checkpoint", lambda fn, *args, **kw: calls.append(fn) or fn(*args))
    decoder = Decoder(num_layers=2, embed_dim=16, num_heads=2, ffn_dim=32, dropout=0.0, checkpointing=True)
    inputs = (torch.randn(1, 3, 16), torch.randn(1, 7, 16), torch.randn(1, 7, 16))
    decoder.eval()(*inputs)
    with torch.no_grad():
        decoder.train()(*inputs)
    assert not calls
    decoder.train()(*inputs)
    assert len(calls) == 2
