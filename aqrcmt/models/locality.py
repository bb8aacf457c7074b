"""A Gaussian locality prior for the decoder's cross-attention (off in the released CMT configs).

The released CMT finds each query's neighbourhood only through learned position embeddings: at initialisation
(and, for the tiny CPU config, for hundreds of steps) every query attends almost uniformly to the whole BEV and
camera memory, so it cannot tell where its object is and the predictions collapse towards the scene average
(docs/training.md, "Why the tiny CMT learned slowly"). Adding a fixed log-Gaussian of the distance between a
query's reference point and each memory token to the attention logits starts every query local, as
spatially-modulated co-attention does for DETR (Gao et al., "Fast Convergence of DETR with Spatially Modulated
Co-Attention", ICCV 2021). It has no parameters (checkpoints stay interchangeable) and passes no gradient.

    BEV token (row i, column j):      -d^2 / (2 sigma_bev^2), d = metres between the reference (x, y) and the cell
    camera token (view v, row r, c):  -e^2 / (2 sigma_camera^2), e = feature pixels between the reference's
                                      projection on view v and the cell centre; NOT_VISIBLE where v does not see it
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from aqrcmt.models.camera_geometry import feature_map_pixels, project_to_images

NOT_VISIBLE = -30.0   # logit offset of camera tokens on a view that does not see the query (exp(-30) ~ 1e-13)


def cross_attention_locality_bias(reference: Tensor, *, pc_range: tuple[float, ...], sigma_bev: float,
                                  sigma_camera: float, bev_coords: Optional[Tensor] = None,
                                  lidar2img: Optional[Tensor] = None, img_shape: Optional[tuple[int, int]] = None,
                                  camera_feature_size: Optional[tuple[int, int]] = None) -> Tensor:
    """Additive cross-attention bias (B, 1, Q, M) for the memory order of CmtTransformer (BEV cells, then cameras).

    reference: (B, Q, 3) query reference points normalised by `pc_range`; bev_coords: (H * W, 2) normalised cell
    centres (None without the LiDAR branch); lidar2img (B, V, 4, 4), img_shape (H_img, W_img) and
    camera_feature_size (h, w) describe the camera memory (None without cameras). Sigmas: metres / feature pixels.
    """
    reference = reference.detach()                     # a fixed prior: no gradient into the reference points
    parts = []
    if bev_coords is not None:
        span = reference.new_tensor(pc_range[3:5]) - reference.new_tensor(pc_range[:2])
        offset = (reference[:, :, None, :2] - bev_coords[None, None].to(reference)) * span      # (B, Q, HW, 2) m
        parts.append(-(offset ** 2).sum(-1) / (2 * sigma_bev ** 2))
    if lidar2img is not None:
        height, width = camera_feature_size
        pixels, visible = project_to_images(reference, pc_range, lidar2img, img_shape)
        rows = torch.arange(height, device=reference.device, dtype=reference.dtype) + 0.5
        cols = torch.arange(width, device=reference.device, dtype=reference.dtype) + 0.5
        coords = feature_map_pixels(pixels, img_shape, (height, width)).to(reference)           # (B, Q, V, 2) (y, x)
        dy2 = (rows.view(1, 1, 1, -1, 1) - coords[..., 0, None, None]) ** 2                     # (B, Q, V, h, 1)
        dx2 = (cols.view(1, 1, 1, 1, -1) - coords[..., 1, None, None]) ** 2                     # (B, Q, V, 1, w)
        camera = -(dy2 + dx2) / (2 * sigma_camera ** 2)
        camera = torch.where(visible[..., None, None], camera, camera.new_tensor(NOT_VISIBLE))
        parts.append(camera.flatten(2))
    if not parts:
        raise ValueError("cross_attention_locality_bias needs bev_coords or the camera geometry")
    return torch.cat(parts, dim=-1).clamp(min=NOT_VISIBLE).unsqueeze(1)
