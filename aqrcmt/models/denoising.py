"""Query denoising (DN) for training: noised copies of the ground truth prepended to the learned queries.

Layout (official CMT, ``CmtHead.prepare_for_dn`` in junjie18/CMT
``projects/mmdet3d_plugin/models/dense_heads/cmt_head.py``): every GT box of the batch is repeated in G groups. Group g, sample b
owns query slots ``[g S, g S + n_b)`` with S slots per group (S = the largest GT count of the batch, or that
count rounded up to a multiple of ``HeadConfig.dn_max_gt`` so that shapes stay fixed between batches).
Unused slots keep the reference (0, 0, 0). The P = G S denoising queries come first, the learned queries
after them. Each denoising query starts at its box centre moved by up to half the box size per axis; when
the noise vector is long (norm > ``dn_split``) its label becomes "no object" (= num_classes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from aqrcmt.config import HeadConfig


@dataclass
class Denoising:
    """Bookkeeping of one batch's denoising queries. N = G * (total GT count of the batch).

    pad_size:        P = groups * slots_per_group, the number of denoising queries per sample.
    groups:          G.
    slots_per_group: S.
    reference:       (B, P, 3) normalised start positions of the denoising queries (0 in unused slots).
    attn_mask:       (P + Nq, P + Nq) bool, True where a query may attend to a key (SDPA convention):
                     learned queries never see denoising queries, groups never see each other.
    batch_index:     (N,) sample of each noised copy.
    slot_index:      (N,) its query slot in [0, P).
    labels:          (N,) noised labels (num_classes = "no object").
    boxes:           (N, 9) clean gravity-centre GT boxes (the regression targets).
    """
    pad_size: int
    groups: int
    slots_per_group: int
    reference: Tensor
    attn_mask: Tensor
    batch_index: Tensor
    slot_index: Tensor
    labels: Tensor
    boxes: Tensor


def denoising_attn_mask(groups: int, slots_per_group: int, num_query: int, device: torch.device) -> Tensor:
    """(P + Nq, P + Nq) bool mask, True = allowed. Query i may see key j unless j is a DN slot of another group."""
    pad = groups * slots_per_group
    slot = torch.arange(pad + num_query, device=device)
    group = torch.where(slot < pad, torch.div(slot, slots_per_group, rounding_mode="floor"),
                        torch.full_like(slot, groups))
    blocked = (slot[None, :] < pad) & (group[:, None] != group[None, :])
    return ~blocked


def prepare_denoising(gt_boxes: list[Tensor], gt_labels: list[Tensor], *, cfg: HeadConfig,
                      pc_range: tuple[float, ...], noise: Optional[Tensor] = None) -> Optional[Denoising]:
    """Build the denoising queries of a batch, or None when the batch has no GT at all.

    gt_boxes: B tensors (n_b, 9) gravity-centre boxes; gt_labels: B tensors (n_b,).
    noise: optional (G * sum n_b, 3) uniform [0, 1) draws replacing ``torch.rand`` (group-major order).
    """
    if len(gt_boxes) != len(gt_labels):
        raise ValueError(f"gt_boxes has {len(gt_boxes)} samples but gt_labels has {len(gt_labels)}")
    counts = [int(b.shape[0]) for b in gt_boxes]
    max_count = max(counts, default=0)
    if max_count == 0:
        return None
    slots = max_count
    if cfg.dn_max_gt > 0:
        slots = -(-max_count // cfg.dn_max_gt) * cfg.dn_max_gt
    groups = max(1, min(cfg.dn_scalar, cfg.num_query // slots))
    pad = groups * slots

    boxes = torch.cat(gt_boxes).float()
    device = boxes.device
    labels = torch.cat(gt_labels).long().to(device)
    sample = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(counts)])
    within = torch.cat([torch.arange(n, device=device) for n in counts])
    group_offset = torch.arange(groups, device=device).repeat_interleave(boxes.shape[0]) * slots

    known_boxes = boxes.repeat(groups, 1)
    known_labels = labels.repeat(groups)
    centre = known_boxes[:, :3].clone()
    if cfg.dn_noise_scale > 0:
        if noise is None:
            noise = torch.rand_like(centre)
        elif noise.shape != centre.shape:
            raise ValueError(f"noise must have shape {tuple(centre.shape)} (groups * GT count, 3), "
                             f"got {tuple(noise.shape)}")
        signed = noise.to(centre) * 2 - 1
        centre = centre + signed * (known_boxes[:, 3:6] / 2 + cfg.dn_noise_trans) * cfg.dn_noise_scale
        flipped = torch.linalg.vector_norm(signed, dim=1) > cfg.dn_split
        known_labels = torch.where(flipped, torch.full_like(known_labels, cfg.num_classes), known_labels)
    low = centre.new_tensor(pc_range[:3])
    centre = ((centre - low) / (centre.new_tensor(pc_range[3:6]) - low)).clamp(0.0, 1.0)

    batch_index = sample.repeat(groups)
    slot_index = within.repeat(groups) + group_offset
    reference = centre.new_zeros(len(gt_boxes), pad, 3)
    reference[batch_index, slot_index] = centre
    return Denoising(
        pad_size=pad, groups=groups, slots_per_group=slots, reference=reference,
        attn_mask=denoising_attn_mask(groups, slots, cfg.num_query, device),
        batch_index=batch_index, slot_index=slot_index, labels=known_labels,
        boxes=known_boxes,
    )
