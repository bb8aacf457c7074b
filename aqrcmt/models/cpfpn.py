"""CP-FPN: CMT's feature pyramid neck without the unused output convs.

For backbone levels x_0 (finest) .. x_{L-1}: laterals lat_i = conv1x1(x_i) (with bias); top-down
lat_{i-1} += nearest_upsample(lat_i, size of lat_{i-1}); outputs = (conv3x3(lat_0), lat_1, ..., lat_{L-1}).
Only level 0 gets a 3x3 "fpn" conv. No norm, no activation. The CMT head uses only output 0 (stride 16).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """A conv with bias, registered as ``.conv`` (mmcv ConvModule naming of the official checkpoints)."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(in_channels, out_channels, kernel_size,
                                                    padding=kernel_size // 2)))


class CPFPN(nn.Module):
    """forward: list of L maps (N, in_channels[i], H_i, W_i) -> list of L maps (N, out_channels, H_i, W_i)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        if len(in_channels) < 1:
            raise ValueError("CPFPN needs at least one input level")
        self.in_channels = tuple(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(_conv(c, out_channels, 1) for c in self.in_channels)
        self.fpn_convs = nn.ModuleList([_conv(out_channels, out_channels, 3)])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.in_channels):
            raise ValueError(f"CPFPN expects {len(self.in_channels)} feature levels, got {len(features)}")
        for i, (x, c) in enumerate(zip(features, self.in_channels)):
            if x.dim() != 4 or x.shape[1] != c:
                raise ValueError(f"CPFPN level {i}: expected (N, {c}, H, W), got {tuple(x.shape)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        return [self.fpn_convs[0](laterals[0])] + laterals[1:]
