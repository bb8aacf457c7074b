"""Position encodings of the CMT head: BEV grid, camera rays of image tokens, camera rays of queries.

All encodings work on coordinates normalised by the point-cloud range, ``(p - pc_min) / (pc_max - pc_min)``.
They are pure geometry (no learned weights) and always run in fp32, also under autocast (pixel
coordinates times depth exceed the fp16 range); the head feeds their output through its ``bev_embedding`` and
``rv_embedding`` MLPs. The formulas reproduce the official CMT code exactly, quirks included (``pos2embed``,
``CmtHead._rv_pe`` and ``CmtHead._rv_query_embed`` in junjie18/CMT
``projects/mmdet3d_plugin/models/dense_heads/cmt_head.py``): :func:`pos2embed` has no temperature, ray depths
are linear in [1, pc_max_x).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from aqrcmt.models.camera_geometry import project_to_images

INVERSE_SIGMOID_EPS = 1e-5


def inverse_sigmoid(x: Tensor, eps: float = INVERSE_SIGMOID_EPS) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x clamped below at `eps` (mmdet's definition)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def pos2embed(pos: Tensor, num_feats: int) -> Tensor:
    """Sine/cosine embedding of normalised (x, y): (..., >=2) -> (..., 2 * num_feats), ordered (emb_y, emb_x).

    Frequency i is ``2 pi / (1 + 2 floor(i / 2) / num_feats)`` (no temperature: the official code accepts one
    but never uses it). Even channels take the sine, odd channels the cosine of the same angle pair.
    """
    index = torch.arange(num_feats, dtype=torch.float32, device=pos.device)
    dim_t = 2 * torch.div(index, 2, rounding_mode="floor") / num_feats + 1
    angles = (pos[..., :2] * (2 * math.pi)).unsqueeze(-1) / dim_t          # (..., 2, num_feats)
    emb = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((emb[..., 1, :], emb[..., 0, :]), dim=-1)


def bev_grid_coords(bev_size: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """Normalised (x, y) centre of every BEV cell, row-major over (H, W): (H * W, 2).

    Cell (row i, column j) is at ((j + 0.5) / W, (i + 0.5) / H); rows follow +y, columns +x.
    """
    height, width = bev_size
    rows = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    cols = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack((x, y), dim=-1).reshape(-1, 2)


def ray_depths(depth_num: int, max_depth: float, device: torch.device | str | None = None) -> Tensor:
    """Sample depths along each camera ray in metres: ``1 + k (max_depth - 1) / depth_num``, k < depth_num."""
    return 1 + torch.arange(depth_num, dtype=torch.float32, device=device) * (max_depth - 1) / depth_num


def read_bev_map(bev_map: Tensor, xy: Tensor, pc_range: tuple[float, ...]) -> Tensor:
    """A BEV map (B, C, H, W) over `pc_range` (rows +y, columns +x) read bilinearly at xy (B, N, 2) metres:
    (B, N, C); 0 outside the map."""
    low, high = xy.new_tensor(pc_range[:2]), xy.new_tensor(pc_range[3:5])
    grid = ((xy - low) / (high - low) * 2.0 - 1.0).unsqueeze(1)                       # (B, 1, N, 2) in [-1, 1]
    return F.grid_sample(bev_map.to(grid.dtype), grid, align_corners=False)[:, :, 0].transpose(1, 2)


def _normalise(points: Tensor, pc_range: tuple[float, ...]) -> Tensor:
    low = points.new_tensor(pc_range[:3])
    return (points - low) / (points.new_tensor(pc_range[3:6]) - low)


def image_ray_points(img2lidar: Tensor, feat_size: tuple[int, int], img_shape: tuple[int, int], depths: Tensor,
                     pc_range: tuple[float, ...]) -> Tensor:
    """3-D points along the ray of every image-feature cell, normalised: (N, h, w, D * 3), ordered (depth, xyz).

    img2lidar: (N, 4, 4) inverse projection of each image (N = B * 6).
    Cell (r, c) of an (h, w) feature map looks through pixel (c * W / w, r * H / h) of the (H, W) image
    (its top-left corner); the point at depth d is img2lidar @ (u d, v d, d, 1).
    """
    h, w = feat_size
    img_h, img_w = img_shape
    device = img2lidar.device
    with torch.autocast(device_type=device.type, enabled=False):
        v = torch.arange(h, dtype=torch.float32, device=device) * img_h / h
        u = torch.arange(w, dtype=torch.float32, device=device) * img_w / w
        v, u, d = torch.meshgrid(v, u, depths.float(), indexing="ij")      # (h, w, D) each
        pixels = torch.stack((u * d, v * d, d, torch.ones_like(d)), dim=-1)   # (h, w, D, 4)
        points = torch.einsum("hwdo,nco->nhwdc", pixels, img2lidar.float())[..., :3]
        return _normalise(points, pc_range).flatten(-2)


def query_ray_points(reference: Tensor, lidar2img: Tensor, img2lidar: Tensor, img_shape: tuple[int, int],
                     depths: Tensor, pc_range: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Points along the camera ray through each query, per view: ((B, Nq, V, D * 3), visible (B, Nq, V) bool).

    reference: (B, Nq, 3) normalised query positions; lidar2img / img2lidar: (B, V, 4, 4).
    The query is projected into each view (:func:`~aqrcmt.models.camera_geometry.project_to_images`: pixel
    (u, v, 1), gradient through the numerator only, the visibility rule), then re-lifted at the `depths` like
    an image token.
    """
    with torch.autocast(device_type=reference.device.type, enabled=False):
        pixels, visible = project_to_images(reference, pc_range, lidar2img, img_shape)   # (B, Nq, V, 3)
        lifted = pixels.unsqueeze(-2) * depths.float()[:, None]                        # (B, Nq, V, D, 3)
        lifted = torch.cat((lifted, torch.ones_like(lifted[..., :1])), dim=-1)
        points = torch.einsum("bnvdo,bvco->bnvdc", lifted, img2lidar.float())[..., :3]
        return _normalise(points, pc_range).flatten(-2), visible
