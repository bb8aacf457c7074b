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
from torch.utils.checkpoint import checkpoint

from aqrcmt.config import CameraConfig, ConfigError
from aqrcmt.models.cpfpn import CPFPN
from aqrcmt.models.resnet import ResNet, resnet50, tiny_resnet
from aqrcmt.models.vovnet import VoVNet

# Output channels (stride 16, stride 32) each pretrained architecture fixes.
FIXED_OUT_CHANNELS: dict[str, tuple[int, int]] = {"vovnet99": (768, 1024), "resnet50": (1024, 2048)}


class _RecomputedInTraining:
    """Backbone mixin (``model.camera.checkpointing``): in a training step with gradients the forward keeps no
    activations and runs again in the backward (torch.utils.checkpoint); parameters and state-dict keys unchanged."""

    def forward(self, images: torch.Tensor):
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, images, use_reentrant=False)
        return super().forward(images)


class CheckpointedVoVNet(_RecomputedInTraining, VoVNet):
    pass


class CheckpointedResNet(_RecomputedInTraining, ResNet):
    pass


CHECKPOINTED = {VoVNet: CheckpointedVoVNet, ResNet: CheckpointedResNet}


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
        backbone.__class__ = CHECKPOINTED[type(backbone)]      # the same module, its forward recomputed
    return backbone


def build_image_neck(cfg: CameraConfig) -> CPFPN:
    """CP-FPN over the two backbone levels, forward -> list of 2 maps with `neck_out_channels` channels."""
    return CPFPN(in_channels=tuple(cfg.backbone_out_channels), out_channels=cfg.neck_out_channels)

