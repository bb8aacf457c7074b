"""Box encoding for the regression targets and NMS-free top-k decoding of the head's outputs.

Code layout (10 values, by position, official CMT): (cx, cy, log dx, log dy, cz, log dz, sin yaw, cos yaw,
vx, vy), centres in metres (gravity centre z). The head's outputs are concatenated as
(center 2, height 1, dim 3, rot 2, vel 2) and read by position, so the output named "height" carries
log dx and dim[1] carries cz (``normalize_bbox`` in junjie18/CMT ``projects/mmdet3d_plugin/core/bbox/util.py`` vs the
head's output order); encoder and decoder agree with that layout.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from aqrcmt.structures import Detections

OUTPUT_KEYS: tuple[str, ...] = ("center", "height", "dim", "rot", "vel")
ROT_CODES = slice(6, 8)          # (sin yaw, cos yaw) in the code layout


def encode_boxes(boxes: Tensor) -> Tensor:
    """(..., 9) gravity-centre boxes (x, y, z, dx, dy, dz, yaw, vx, vy) -> (..., 10) codes."""
    x, y, z, dx, dy, dz, yaw, vx, vy = boxes.unbind(-1)
    return torch.stack((x, y, dx.log(), dy.log(), z, dz.log(), yaw.sin(), yaw.cos(), vx, vy), dim=-1)


def decode_codes(codes: Tensor) -> Tensor:
    """(..., 10) codes -> (..., 9) gravity-centre boxes; yaw = atan2(sin, cos)."""
    x, y, log_dx, log_dy, z, log_dz, sin, cos, vx, vy = codes.unbind(-1)
    return torch.stack((x, y, z, log_dx.exp(), log_dy.exp(), log_dz.exp(), torch.atan2(sin, cos), vx, vy), dim=-1)


def box_codes(outputs: dict[str, Tensor], prefix: str = "") -> Tensor:
    """Concatenate the head outputs (``prefix`` + center/height/dim/rot/vel) into (..., 10) codes."""
    return torch.cat([outputs[prefix + key] for key in OUTPUT_KEYS], dim=-1)


def oriented_box_codes(outputs: dict[str, Tensor], prefix: str = "") -> Tensor:
    """:func:`box_codes`, with (sin, cos) negated where the optional ``heading_flip`` output (> 0) says the
    regressed heading points backwards (see CmtHead's ``bev_heading_weight``): the codes decoded into boxes."""
    codes = box_codes(outputs, prefix)
    flip = outputs.get(prefix + "heading_flip")
    if flip is None:
        return codes
    sign = torch.where(flip > 0, -1.0, 1.0).to(codes.dtype)
    return torch.cat((codes[..., :ROT_CODES.start], codes[..., ROT_CODES] * sign, codes[..., ROT_CODES.stop:]), -1)


def select_topk(logits: Tensor, max_num: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k over all (query, class) pairs of one sample: logits (Q, C) -> scores, labels, query indices (k,)."""
    num_classes = logits.shape[-1]
    scores, flat = logits.sigmoid().flatten().topk(min(max_num, logits.numel()))
    return scores, flat % num_classes, torch.div(flat, num_classes, rounding_mode="floor")


def decode_detections(logits: Tensor, codes: Tensor, *, max_num: int, post_center_range: tuple[float, ...],
                      score_threshold: Optional[float] = None) -> list[Detections]:
    """NMS-free decoding: per sample the `max_num` best (query, class) pairs, centre inside the range.

    logits: (B, Q, C) raw class logits; codes: (B, Q, 10) box codes (last decoder layer).
    """
    detections = []
    limits = codes.new_tensor(post_center_range)
    for sample_logits, sample_codes in zip(logits.float(), codes.float()):
        scores, labels, query = select_topk(sample_logits, max_num)
        boxes = decode_codes(sample_codes[query])
        keep = ((boxes[:, :3] >= limits[:3]) & (boxes[:, :3] <= limits[3:])).all(dim=1)
        if score_threshold is not None:
            keep &= scores > score_threshold
        detections.append(Detections(boxes=boxes[keep], scores=scores[keep], labels=labels[keep]))
    return detections
