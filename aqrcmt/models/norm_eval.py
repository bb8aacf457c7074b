"""Frozen batch-norm statistics for the image backbones (mmdet's ``norm_eval=True``).

The released CMT configs fine-tune VoVNet / ResNet with every BatchNorm kept in eval mode: the running
statistics of the pretrained backbone are used and never updated, while the BN affine weights still train.
"""
from __future__ import annotations

from torch import nn


class NormEvalMixin(nn.Module):
    """`train(True)` leaves every BatchNorm of the module in eval mode when ``self.frozen_bn`` is set."""

    frozen_bn: bool = False

    def train(self, mode: bool = True) -> "NormEvalMixin":
        super().train(mode)
        if mode and self.frozen_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self
