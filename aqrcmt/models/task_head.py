"""Grouped prediction heads: one small MLP per output and per decoder layer, run as grouped 1-D convs.

For output k the module is ``Conv1d(L C -> L c, groups L) -> GroupLayerNorm1d -> ReLU -> Conv1d(L c -> L k,
groups L)`` over the query axis, with L = number of decoder layers and c = ``head_conv``: group n is an
independent MLP applied to decoder layer n. With ``final_kernel = 3`` (LiDAR-only release) the convs also
mix each query with its two neighbours in query order, as in the official code.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GroupLayerNorm1d(nn.Module):
    """LayerNorm over each group of channels of a (N, C, L) tensor, per position; biased variance."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"channels {channels} is not divisible by groups {groups}")
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, L) -> (N, C, L)."""
        grouped = x.unflatten(1, (self.groups, -1))
        var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
        normed = ((grouped - mean) / torch.sqrt(var + self.eps)).flatten(1, 2)
        return normed * self.weight[:, None] + self.bias[:, None]


class SeparateTaskHead(nn.Module):
    """Predicts every output of `heads` ({name: channels}) for all decoder layers at once.

    Input (L, B, Q, C) decoder features; output {name: (L, B, Q, channels)}. Sub-modules are named after
    the outputs (``center.0.weight`` ...) to match the official checkpoint keys.
    """

    def __init__(self, in_channels: int, heads: dict[str, int], groups: int, head_conv: int,
                 final_kernel: int, cls_bias: float = -2.19) -> None:
        super().__init__()
        self.groups = groups
        self.heads = dict(heads)
        pad = final_kernel // 2
        for name, channels in self.heads.items():
            branch = nn.Sequential(
                nn.Conv1d(in_channels * groups, head_conv * groups, final_kernel, padding=pad, groups=groups,
                          bias=False),
                GroupLayerNorm1d(head_conv * groups, groups),
                nn.ReLU(inplace=True),
                nn.Conv1d(head_conv * groups, channels * groups, final_kernel, padding=pad, groups=groups),
            )
            for conv in (branch[0], branch[3]):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(branch[3].bias, cls_bias if name == "cls_logits" else 0.0)
            self.add_module(name, branch)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        layers, batch, queries, channels = x.shape
        if layers != self.groups:
            raise ValueError(f"expected features of {self.groups} decoder layers, got {layers}")
        x = x.permute(1, 0, 3, 2).reshape(batch, layers * channels, queries)   # (B, L C, Q)
        return {name: getattr(self, name)(x).unflatten(1, (layers, -1)).permute(1, 0, 3, 2)
                for name in self.heads}
