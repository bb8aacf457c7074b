"""Detection losses: sigmoid focal loss and weighted L1, both element-wise (no reduction).

The caller sums, divides by its own normaliser (the official avg_factors of ``CmtHead.loss_single`` /
``dn_loss_single`` in junjie18/CMT ``projects/mmdet3d_plugin/models/dense_heads/cmt_head.py``) and applies
the loss weight, so each normalisation stays visible where it is decided.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss (..., C).

    logits: (..., C); labels: (...) in [0, C], where C means "no object" (an all-zero target row).
    Per element: BCE(p, t) * (alpha t + (1 - alpha)(1 - t)) * |t - p|^gamma.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    num_classes = logits.shape[-1]
    target = F.one_hot(labels.long(), num_classes + 1)[..., :num_classes].to(logits.dtype)
    prob = logits.sigmoid()
    modulator = (target - prob).abs().pow(gamma)
    balance = alpha * target + (1 - alpha) * (1 - target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce * balance * modulator


def weighted_l1_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """|pred - target| * weight element-wise; zero-weight elements give exactly 0 (even if non-finite)."""
    diff = (pred - target).abs() * weight
    return torch.where(weight != 0, diff, torch.zeros_like(diff))


def heading_axis_l1(pred_rot: Tensor, target_rot: Tensor, weight: Tensor) -> Tensor:
    """Front/back-blind L1 on (sin yaw, cos yaw): min(|p - t|, |p + t|) summed over the pair, times weight.

    pred_rot / target_rot: (..., 2); weight: (...) -> (...). Where front and back cannot be told apart yet, the
    expected plain L1 is flat between -t and t (no pull towards the box axis); this term is zero at either end,
    so the axis is learned first, and the plain L1 keeps the pull towards the true front.
    """
    error = torch.minimum((pred_rot - target_rot).abs().sum(-1), (pred_rot + target_rot).abs().sum(-1)) * weight
    return torch.where(weight != 0, error, torch.zeros_like(error))
