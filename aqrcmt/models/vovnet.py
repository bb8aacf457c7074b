"""VoVNet-99 with effective squeeze-excitation ("V-99-eSE"), the image backbone of the released vov configs.

Layout (Lee & Park, CenterMask; the DD3D/DETR3D variant used by CMT):

* stem: three 3x3 conv-BN-ReLU, strides 2, 1, 2 (channels 64, 64, 128) -> stride 4;
* stages 2..5, each a sequence of One-Shot-Aggregation (OSA) blocks; stages 3..5 start with
  MaxPool(3, stride 2, ceil_mode=True), so the stage outputs have strides 4, 8, 16, 32;
* OSA block: 5 chained 3x3 conv-BN-ReLU, concat(block input, the 5 outputs) -> 1x1 conv-BN-ReLU ->
  eSE (global average pool -> 1x1 conv with bias -> hard sigmoid relu6(x + 3) / 6 -> channel scale);
  every block but the first of a stage adds its input back (identity residual).

Module names keep the original '/'-separated spelling (``stem.stem_1/conv``,
``stage2.OSA2_1.layers.0.OSA2_1_0/norm``...) so that official checkpoints load without renaming.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqrcmt.models.freezing import FreezableModule


@dataclass(frozen=True)
class VoVNetSpec:
    """Channel/depth layout of a VoVNet; stage lists are for stages 2..5."""
    stem_channels: tuple[int, int, int]
    stage_conv_channels: tuple[int, int, int, int]
    stage_out_channels: tuple[int, int, int, int]
    layers_per_block: int
    blocks_per_stage: tuple[int, int, int, int]


V99_ESE = VoVNetSpec(
    stem_channels=(64, 64, 128),
    stage_conv_channels=(128, 160, 192, 224),
    stage_out_channels=(256, 512, 768, 1024),
    layers_per_block=5,
    blocks_per_stage=(1, 3, 9, 3),
)


def _conv_bn_relu(name: str, in_channels: int, out_channels: int, kernel_size: int,
                  stride: int = 1) -> list[tuple[str, nn.Module]]:
    """Named (conv without bias, BN, ReLU) triple: ``{name}/conv``, ``{name}/norm``, ``{name}/relu``."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    return [(f"{name}/conv", conv), (f"{name}/norm", nn.BatchNorm2d(out_channels)),
            (f"{name}/relu", nn.ReLU(inplace=True))]


class EffectiveSE(nn.Module):
    """eSE: x * hsigmoid(fc(mean_hw(x))), one full-rank 1x1 conv (no channel reduction)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc(x.mean(dim=(2, 3), keepdim=True))
        return x * (F.relu6(scale + 3.0) / 6.0)


class OSABlock(nn.Module):
    """One-Shot Aggregation block, (N, in_channels, H, W) -> (N, out_channels, H, W)."""

    def __init__(self, name: str, in_channels: int, conv_channels: int, out_channels: int, num_layers: int,
                 residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList(
            nn.Sequential(OrderedDict(_conv_bn_relu(f"{name}_{i}", in_channels if i == 0 else conv_channels,
                                                    conv_channels, 3)))
            for i in range(num_layers))
        self.concat = nn.Sequential(OrderedDict(
            _conv_bn_relu(f"{name}_concat", in_channels + num_layers * conv_channels, out_channels, 1)))
        self.ese = EffectiveSE(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features[-1]))
        out = self.ese(self.concat(torch.cat(features, dim=1)))
        return out + x if self.residual else out


class VoVNet(FreezableModule):
    """VoVNet backbone returning the stride-16 (stage4) and stride-32 (stage5) maps.

    forward: images (N, 3, H, W), BGR-normalised -> ((N, 768, H/16, W/16), (N, 1024, H/32, W/32)) for
    V-99-eSE and H, W multiples of 32 (other sizes: each max-pool maps n to ceil((n - 3) / 2) + 1).
    """

    def __init__(self, spec: VoVNetSpec = V99_ESE, frozen_bn: bool = True) -> None:
        super().__init__()
        self.batchnorm_eval_prefixes = ("",) if frozen_bn else ()   # mmdet norm_eval
        s1, s2, s3 = spec.stem_channels
        self.stem = nn.Sequential(OrderedDict(
            _conv_bn_relu("stem_1", 3, s1, 3, stride=2)
            + _conv_bn_relu("stem_2", s1, s2, 3)
            + _conv_bn_relu("stem_3", s2, s3, 3, stride=2)))
        in_channels = s3
        for stage in range(2, 6):
            i = stage - 2
            modules: list[tuple[str, nn.Module]] = []
            if stage > 2:
                modules.append(("Pooling", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)))
            for block in range(1, spec.blocks_per_stage[i] + 1):
                name = f"OSA{stage}_{block}"
                modules.append((name, OSABlock(name, in_channels, spec.stage_conv_channels[i],
                                               spec.stage_out_channels[i], spec.layers_per_block,
                                               residual=block > 1)))
                in_channels = spec.stage_out_channels[i]
            self.add_module(f"stage{stage}", nn.Sequential(OrderedDict(modules)))
        self.out_channels = (spec.stage_out_channels[2], spec.stage_out_channels[3])

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stem(images)
        x = self.stage3(self.stage2(x))
        stride16 = self.stage4(x)
        return stride16, self.stage5(stride16)
