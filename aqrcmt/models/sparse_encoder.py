"""SparseEncoder: the 3-D sparse convolution backbone of the LiDAR branch (spconv 2.x).

Voxel features (M, C_in) at (b, z, y, x) indices -> 4 resolution levels of submanifold residual blocks with
stride-2 sparse convs between them -> a (3, 1, 1) z-stride-2 conv -> dense BEV map (B, C_out * D, H, W)
with channel index c * D + d. Module and parameter names equal the official mmdet3d ones
(`conv_input.0.weight`, `encoder_layers.encoder_layer1.0.conv1.weight`, `conv_out.1.running_mean`, ...);
sparse conv weights are in the spconv-2 layout [out, kD, kH, kW, in] with kernel order (z, y, x).

The encoder always computes in float32: spconv casts to float16 under autocast, so `forward` disables autocast
and casts its input (the official model also keeps this module in fp32).
"""
from __future__ import annotations

import logging
from typing import Sequence

import spconv.pytorch as spconv
import torch
from spconv.core import ConvAlgo
from spconv.pytorch.conv import SparseConvolution
from torch import Tensor, nn

from aqrcmt.config import LidarConfig

BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# spconv's SparseConvTensor is built through torch.fx's ProxyableClassMeta, which asks torch.fx.is_fx_tracing();
# torch then warns (once per process) that this function is ambiguous for export. The notice is about spconv's use
# of a torch API, not about this model, and nothing here traces with fx: it is dropped.
logging.getLogger("torch.fx._symbolic_trace").addFilter(
    lambda record: not record.getMessage().startswith("is_fx_tracing will return true"))


def _bn1d(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv_bn_relu(conv: SparseConvolution, out_channels: int) -> spconv.SparseSequential:
    """Sparse conv -> BN1d -> ReLU; state_dict names `0.weight`, `1.*` as in mmdet3d's make_sparse_convmodule."""
    return spconv.SparseSequential(conv, _bn1d(out_channels), nn.ReLU(inplace=True))


class SparseBasicBlock(spconv.SparseModule):
    """Submanifold residual block: SubM3x3x3 -> BN -> ReLU -> SubM3x3x3 -> BN -> + input -> ReLU (channels kept)."""

    def __init__(self, channels: int, indice_key: str) -> None:
        super().__init__()
        self.conv1 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn1 = _bn1d(channels)
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn2 = _bn1d(channels)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        identity = x.features
        out = self.conv1(x)
        out = out.replace_feature(torch.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(torch.relu(self.bn2(out.features) + identity))


class SparseEncoder(nn.Module):
    """Sparse 3-D encoder.

    Args:
        in_channels: voxel feature channels (5: x, y, z, intensity, time lag).
        sparse_shape: (D, H, W) = (z, y, x) size of the voxel grid the indices live in.
        base_channels: channels after `conv_input`.
        output_channels: channels of `conv_out`; the BEV map has output_channels * D_out channels.
        encoder_channels: per level, the channels of its blocks; every entry but the last of a level except the
            last level is a SparseBasicBlock, the last entry of levels 1..L-1 is the stride-2 downsampling conv.
        encoder_paddings: per level, the padding of each entry (only the downsampling conv's is used).
    """

    def __init__(self, in_channels: int, sparse_shape: Sequence[int], base_channels: int = 16,
                 output_channels: int = 128,
                 encoder_channels: Sequence[Sequence[int]] = ((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)),
                 encoder_paddings: Sequence[Sequence] = ((0, 0, 1), (0, 0, 1), (0, 0, (0, 1, 1)), (0, 0))) -> None:
        super().__init__()
        if len(sparse_shape) != 3:
            raise ValueError(f"sparse_shape must be (z, y, x), got {sparse_shape}")
        if len(encoder_channels) != len(encoder_paddings):
            raise ValueError(f"encoder_channels ({len(encoder_channels)} levels) and encoder_paddings "
                             f"({len(encoder_paddings)} levels) must have the same length")
        self.sparse_shape = [int(s) for s in sparse_shape]
        self.in_channels = in_channels
        self.conv_input = _conv_bn_relu(
            spconv.SubMConv3d(in_channels, base_channels, 3, padding=1, bias=False, indice_key="subm1"),
            base_channels)

        self.encoder_layers = spconv.SparseSequential()
        channels, shape = base_channels, list(self.sparse_shape)       # shape: (z, y, x) after each conv
        num_levels = len(encoder_channels)
        for level, (level_channels, level_paddings) in enumerate(zip(encoder_channels, encoder_paddings), start=1):
            blocks = []
            for j, (out_channels, padding) in enumerate(zip(level_channels, level_paddings)):
                is_downsample = j == len(level_channels) - 1 and level != num_levels
                if is_downsample:
                    conv = spconv.SparseConv3d(channels, out_channels, 3, stride=2, padding=padding, bias=False,
                                               indice_key=f"spconv{level}")
                    blocks.append(_conv_bn_relu(conv, out_channels))
                    pads = padding if isinstance(padding, (tuple, list)) else (padding,) * 3
                    shape = [(n + 2 * p - 3) // 2 + 1 for n, p in zip(shape, pads)]
                else:
                    if out_channels != channels:
                        raise ValueError(f"encoder level {level} block {j}: a residual block needs equal in/out "
                                         f"channels, got {channels} -> {out_channels}")
                    blocks.append(SparseBasicBlock(out_channels, indice_key=f"subm{level}"))
                channels = out_channels
            self.encoder_layers.add_module(f"encoder_layer{level}", spconv.SparseSequential(*blocks))

        self.conv_out = _conv_bn_relu(
            spconv.SparseConv3d(channels, output_channels, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False,
                                indice_key="spconv_down2"),
            output_channels)
        depth = (shape[0] - 3) // 2 + 1
        if depth < 1:
            raise ValueError(f"sparse_shape {self.sparse_shape}: z size {self.sparse_shape[0]} is too small")
        self.bev_channels = output_channels * depth              # channels of the dense BEV map (c * D + d)
        self.bev_shape = (shape[1], shape[2])                    # (H, W) of the dense BEV map
        self._sparse_convs = [m for m in self.modules() if isinstance(m, SparseConvolution)]
        self._gpu_algo = self._sparse_convs[0].algo   # spconv's choice for this build (Native on CPU-only builds)

    @classmethod
    def from_config(cls, cfg: LidarConfig) -> "SparseEncoder":
        return cls(cfg.in_channels, cfg.sparse_shape, cfg.base_channels, cfg.output_channels,
                   cfg.encoder_channels, cfg.encoder_paddings)

    def _select_algo(self, device: torch.device) -> None:
        """spconv on the CPU only has the Native algorithm; weights are KRSC for every algorithm (spconv >= 2.2)."""
        algo = ConvAlgo.Native if device.type == "cpu" else self._gpu_algo
        for conv in self._sparse_convs:
            conv.algo = algo

    def forward(self, voxel_features: Tensor, coors: Tensor, batch_size: int) -> Tensor:
        """(M, C_in) features, (M, 4) int (b, z, y, x) indices -> dense BEV (B, C_out * D_out, H_out, W_out) fp32."""
        if voxel_features.dim() != 2 or voxel_features.shape[1] != self.in_channels:
            raise ValueError(f"voxel_features must be (M, {self.in_channels}), got {tuple(voxel_features.shape)}")
        if coors.shape != (voxel_features.shape[0], 4):
            raise ValueError(f"coors must be (M, 4) = (batch, z, y, x) with M={voxel_features.shape[0]}, "
                             f"got {tuple(coors.shape)}")
        if voxel_features.shape[0] == 0:   # no point in range in the whole batch; spconv rejects empty tensors
            return voxel_features.new_zeros((batch_size, self.bev_channels, *self.bev_shape), dtype=torch.float32)
        self._select_algo(voxel_features.device)
        with torch.autocast(device_type=voxel_features.device.type, enabled=False):
            x = spconv.SparseConvTensor(voxel_features.float().contiguous(), coors.int().contiguous(),
                                        self.sparse_shape, batch_size)
            x = self.conv_input(x)
            x = self.encoder_layers(x)
            x = self.conv_out(x)
        return _to_dense_bev(x)


def _to_dense_bev(x: spconv.SparseConvTensor) -> Tensor:
    """Scatter active sites into a dense grid and fold z into channels: (B, C * D, H, W), channel = c * D + d."""
    depth, height, width = x.spatial_shape
    channels = x.features.shape[1]
    grid = x.features.new_zeros((x.batch_size, depth, height, width, channels))
    b, z, y, xx = x.indices.long().unbind(dim=1)
    grid[b, z, y, xx] = x.features
    return grid.permute(0, 4, 1, 2, 3).reshape(x.batch_size, channels * depth, height, width)
