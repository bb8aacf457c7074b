"""Camera branch builders: image backbone and CP-FPN neck from a :class:`CameraConfig`.

The detector attaches them as ``img_backbone`` and ``img_neck`` (the official checkpoint prefixes):

    images (N = 6 B, 3, H, W), BGR-normalised
      -> img_backbone -> (stride-16 map (N, C16, H/16, W/16), stride-32 map (N, C32, H/32, W/32))
      -> img_neck     -> [level 0 (N, neck_out_channels, H/16, W/16), level 1 (N, neck_out_channels, H/32, W/32)]

The head consumes level 0 only. In training the detector first applies
:class:`aqrcmt.models.grid_mask.GridMask` to the stacked images.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from aqrcmt.config import CameraConfig, ConfigError
from aqrcmt.models.cpfpn import CPFPN
from aqrcmt.models.resnet import BasicBlock, Bottleneck, ResNet, resnet50, tiny_resnet
from aqrcmt.models.vovnet import OSABlock, VoVNet

# Output channels (stride 16, stride 32) each pretrained architecture fixes.
FIXED_OUT_CHANNELS: dict[str, tuple[int, int]] = {"vovnet99": (768, 1024), "resnet50": (1024, 2048)}


class _RecomputedInTraining:
    """Module mixin (``model.camera.checkpointing``): in a training step with gradients the forward keeps only its
    input and runs again in the backward (torch.utils.checkpoint); parameters and state-dict keys unchanged."""

    def forward(self, x: torch.Tensor):
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


class CheckpointedSequential(_RecomputedInTraining, nn.Sequential):
    pass


class CheckpointedOSABlock(_RecomputedInTraining, OSABlock):
    pass


class CheckpointedBasicBlock(_RecomputedInTraining, BasicBlock):
    pass


class CheckpointedBottleneck(_RecomputedInTraining, Bottleneck):
    pass


# The segments: the VoVNet stem and every OSA block, every ResNet block. Between segments only the block inputs
# are kept, and the backward recomputes one block at a time (mmdet's `with_cp` cuts at the same blocks).
CHECKPOINTED = {OSABlock: CheckpointedOSABlock, BasicBlock: CheckpointedBasicBlock,
                Bottleneck: CheckpointedBottleneck}


def recompute_blocks_in_training(backbone: VoVNet | ResNet) -> None:
    """Make each segment of `backbone` (see CHECKPOINTED) recompute its activations in the backward, in place."""
    if isinstance(backbone, VoVNet):
        backbone.stem.__class__ = CheckpointedSequential
    for module in backbone.modules():
        if type(module) in CHECKPOINTED:
            module.__class__ = CHECKPOINTED[type(module)]


def build_image_backbone(cfg: CameraConfig) -> VoVNet | ResNet:
    """VoVNet-99-eSE, ResNet-50 or the tiny ResNet, forward (N, 3, H, W) -> (stride-16 map, stride-32 map)."""
    out_channels = tuple(cfg.backbone_out_channels)
    if len(out_channels) != 2:
        raise ConfigError(f"config field 'model.camera.backbone_out_channels': needs 2 values, got {out_channels}")
    expected = FIXED_OUT_CHANNELS.get(cfg.backbone)
    if expected is not None and out_channels != expected:
        raise ConfigError(f"config field 'model.camera.backbone_out_channels': {cfg.backbone} outputs {expected}, "
                          f"got {out_channels}")
    if cfg.backbone == "vovnet99":
        backbone = VoVNet(frozen_bn=cfg.frozen_bn)
    elif cfg.backbone == "resnet50":
        backbone = resnet50(frozen_bn=cfg.frozen_bn)
    elif cfg.backbone == "tiny":
        backbone = tiny_resnet(out_channels, frozen_bn=cfg.frozen_bn)
    else:
        raise ConfigError(f"config field 'model.camera.backbone': unknown backbone {cfg.backbone!r}")
    if cfg.checkpointing:
        recompute_blocks_in_training(backbone)
    return backbone


def build_image_neck(cfg: CameraConfig) -> CPFPN:
    """CP-FPN over the two backbone levels, forward -> list of 2 maps with `neck_out_channels` channels."""
    return CPFPN(in_channels=tuple(cfg.backbone_out_channels), out_channels=cfg.neck_out_channels)

