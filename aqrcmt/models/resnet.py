"""ResNet image backbones: mmdet's ResNet-50 (style 'pytorch') and a small BasicBlock ResNet for the `tiny` preset.

Both return the outputs of layer3 (stride 16) and layer4 (stride 32), the two levels CP-FPN consumes.
'pytorch' style puts the stride of a bottleneck in its 3x3 conv; the first block of a layer projects its
input with a strided 1x1 conv + BN (``downsample``). BN eps 1e-5, momentum 0.1. Module names follow
torchvision / mmdet (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``...).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from aqrcmt.models.freezing import FreezableModule


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN with an identity (or projected) shortcut; output channels = width."""
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, width, stride)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 conv-BN with a shortcut; output channels = 4 * width."""
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, out_channels, stride)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """Shortcut conv1x1-BN when the block changes shape, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class ResNet(FreezableModule):
    """ResNet with a 7x7/2 conv + 3x3/2 max-pool stem and four layers of strides 1, 2, 2, 2.

    forward: images (N, 3, H, W) -> (layer3 (N, C3, H/16, W/16), layer4 (N, C4, H/32, W/32)) for H, W
    multiples of 32, with C_k = widths[k-1] * block.expansion.

    Args:
        block: BasicBlock or Bottleneck.
        depths: number of blocks in layer1..layer4.
        widths: inner width of the blocks of layer1..layer4.
        stem_channels: output channels of the 7x7 stem conv.
        frozen_bn: keep every BN in eval mode while training (mmdet norm_eval=True).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: Sequence[int], widths: Sequence[int],
                 stem_channels: int = 64, frozen_bn: bool = True) -> None:
        super().__init__()
        if len(depths) != 4 or len(widths) != 4:
            raise ValueError(f"ResNet needs 4 depths and 4 widths, got depths={depths}, widths={widths}")
        self.batchnorm_eval_prefixes = ("",) if frozen_bn else ()   # mmdet norm_eval
        self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem_channels
        for index, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for i in range(depth):
                blocks.append(block(in_channels, width, stride=2 if (i == 0 and index > 0) else 1))
                in_channels = width * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.out_channels = (widths[2] * block.expansion, widths[3] * block.expansion)
        self._init_weights()

    def _init_weights(self) -> None:
        """mmdet's init: Kaiming-normal (fan_out) convs, unit BN, zero last BN of each residual branch."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                nn.init.zeros_(module.last_norm().weight)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer2(self.layer1(x))
        stride16 = self.layer3(x)
        return stride16, self.layer4(stride16)


def resnet50(frozen_bn: bool = True) -> ResNet:
    """ResNet-50 as mmdet builds it: layer3 -> 1024 ch, layer4 -> 2048 ch, 23,508,032 parameters."""
    return ResNet(Bottleneck, depths=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_channels=64,
                  frozen_bn=frozen_bn)


def tiny_resnet(out_channels: tuple[int, int], frozen_bn: bool = False) -> ResNet:
    """One BasicBlock per layer, widths (c/4, c/2, c, c') for out_channels (c, c') at strides 16 and 32.

    Meant for CPU demos and tests: a (12, 3, 128, 352) batch runs forward + backward in well under a second.
    """
    c16, c32 = out_channels
    if c16 % 4 != 0:
        raise ValueError(f"camera.backbone_out_channels[0] must be divisible by 4 for the tiny backbone, got {c16}")
    return ResNet(BasicBlock, depths=(1, 1, 1, 1), widths=(c16 // 4, c16 // 2, c16, c32), stem_channels=c16 // 4,
                  frozen_bn=frozen_bn)
