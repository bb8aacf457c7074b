"""SECOND 2-D BEV backbone and SECONDFPN neck (dense part of the LiDAR branch).

SECOND: per stage a stride-s 3x3 conv followed by `layer_num` stride-1 3x3 convs, each conv -> BN -> ReLU, no
conv bias; returns every stage output. SECONDFPN: each stage output is brought to the stride of the first stage
(1x1 conv for stride 1, transposed conv with kernel = stride for up-sampling), BN, ReLU, then concatenated on
channels. Names match the official state_dict (`blocks.0.0.weight`, `deblocks.1.0.weight`). BN eps 1e-3,
momentum 0.01.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from aqrcmt.config import LidarConfig

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def _bn2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SECOND(nn.Module):
    """(B, in_channels, H, W) -> list of stage maps (B, out_channels[i], H / prod(strides[:i+1]), ...)."""

    def __init__(self, in_channels: int, out_channels: Sequence[int], layer_nums: Sequence[int],
                 layer_strides: Sequence[int]) -> None:
        super().__init__()
        if not len(out_channels) == len(layer_nums) == len(layer_strides):
            raise ValueError(f"out_channels {out_channels}, layer_nums {layer_nums} and layer_strides "
                             f"{layer_strides} must have the same length")
        self.blocks = nn.ModuleList()
        for stage_in, stage_out, num, stride in zip([in_channels, *out_channels[:-1]], out_channels, layer_nums,
                                                    layer_strides):
            layers: list[nn.Module] = [nn.Conv2d(stage_in, stage_out, 3, stride=stride, padding=1, bias=False),
                                       _bn2d(stage_out), nn.ReLU(inplace=True)]
            for _ in range(num):
                layers += [nn.Conv2d(stage_out, stage_out, 3, padding=1, bias=False), _bn2d(stage_out),
                           nn.ReLU(inplace=True)]
            self.blocks.append(nn.Sequential(*layers))

    @classmethod
    def from_config(cls, cfg: LidarConfig, in_channels: int) -> "SECOND":
        """`in_channels` = channels of the encoder's BEV map (`SparseEncoder.bev_channels`)."""
        return cls(in_channels, cfg.backbone_out_channels, cfg.backbone_layer_nums, cfg.backbone_strides)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs


class SECONDFPN(nn.Module):
    """List of stage maps -> (B, sum(out_channels), H0, W0) at the resolution of stage 0 (upsample_strides[0]=1)."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int],
                 upsample_strides: Sequence[int]) -> None:
        super().__init__()
        if not len(in_channels) == len(out_channels) == len(upsample_strides):
            raise ValueError(f"in_channels {in_channels}, out_channels {out_channels} and upsample_strides "
                             f"{upsample_strides} must have the same length")
        self.deblocks = nn.ModuleList()
        for c_in, c_out, stride in zip(in_channels, out_channels, upsample_strides):
            if stride < 1:
                raise ValueError(f"upsample_strides must be >= 1 (down-sampling necks are not used), got {stride}")
            up: nn.Module = (nn.Conv2d(c_in, c_out, 1, bias=False) if stride == 1 else
                             nn.ConvTranspose2d(c_in, c_out, stride, stride=stride, bias=False))
            self.deblocks.append(nn.Sequential(up, _bn2d(c_out), nn.ReLU(inplace=True)))

    @classmethod
    def from_config(cls, cfg: LidarConfig) -> "SECONDFPN":
        return cls(cfg.backbone_out_channels, cfg.neck_out_channels, cfg.neck_upsample_strides)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        if len(feats) != len(self.deblocks):
            raise ValueError(f"SECONDFPN expects {len(self.deblocks)} maps, got {len(feats)}")
        return torch.cat([deblock(x) for deblock, x in zip(self.deblocks, feats)], dim=1)

