"""Hungarian matching of queries to ground truth (HungarianAssigner3D of the official code).

cost = cls_weight * focal cost of the GT class + reg_weight * L1 between code-weighted box codes, first 8
dims only (velocity excluded). Costs are computed on the device for all decoder layers at once; the
assignment itself runs on the CPU with scipy, one call per (sample, layer).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

MATCH_EPS = 1e-12
REG_COST_DIMS = 8


def focal_match_cost(logits: Tensor, gt_labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """(..., Q, C) logits, (n,) labels -> (..., Q, n) focal classification cost (mmdet FocalLossCost)."""
    prob = logits.sigmoid()
    neg = -(1 - prob + MATCH_EPS).log() * (1 - alpha) * prob.pow(gamma)
    pos = -(prob + MATCH_EPS).log() * alpha * (1 - prob).pow(gamma)
    return (pos - neg)[..., gt_labels]


def match_cost(logits: Tensor, codes: Tensor, gt_labels: Tensor, gt_codes: Tensor, code_weights: Tensor, *,
               cls_weight: float, reg_weight: float, alpha: float, gamma: float) -> Tensor:
    """Matching cost (..., Q, n) of predictions (logits (..., Q, C), codes (..., Q, 10)) against n GT."""
    cls_cost = focal_match_cost(logits, gt_labels, alpha, gamma)
    pred = (codes * code_weights)[..., :REG_COST_DIMS]
    target = (gt_codes * code_weights)[..., :REG_COST_DIMS]
    reg_cost = (pred.unsqueeze(-2) - target).abs().sum(-1)
    return cls_weight * cls_cost + reg_weight * reg_cost


def hungarian_assign(cost: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Optimal one-to-one assignment for each matrix of a (L, Q, n) cost stack.

    Returns L pairs (query indices, gt indices), each (min(Q, n),) int64 on the cost's device. Non-finite
    costs (degenerate GT boxes) are treated as very expensive instead of failing the solver.
    """
    device = cost.device
    matrices = torch.nan_to_num(cost.detach().float(), nan=1e8, posinf=1e8, neginf=-1e8).cpu().numpy()
    pairs = []
    for matrix in matrices:
        rows, cols = linear_sum_assignment(matrix)
        pairs.append((torch.from_numpy(rows.astype(np.int64)).to(device),
                      torch.from_numpy(cols.astype(np.int64)).to(device)))
    return pairs
