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

Both are separable (a row term plus a column term), which is how they are computed: one write per token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from aqrcmt.models.camera_geometry import feature_map_pixels, project_to_images

NOT_VISIBLE = -30.0   # logit offset of camera tokens on a view that does not see the query (exp(-30) ~ 1e-13)


def bev_cell_centres(size: int, device: torch.device) -> Tensor:
    """Normalised centres (i + 0.5) / size of `size` BEV rows or columns (the grid of ``bev_grid_coords``)."""
    return (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size


def bev_offsets(reference_xy: Tensor, rows: Tensor, cols: Tensor, span: Tensor, sigma: float) -> Tensor:
    """BEV prior (..., nr, nc) of reference points (..., 2) (normalised x, y) for the cells at normalised rows
    (nr,) (y) x columns (nc,) (x); span: (2,) metres of the normalised range in x and y; sigma in metres."""
    dx2 = ((reference_xy[..., 0, None] - cols) * span[0]) ** 2                   # (..., nc) m^2
    dy2 = ((reference_xy[..., 1, None] - rows) * span[1]) ** 2                   # (..., nr) m^2
    return (dy2[..., :, None] + dx2[..., None, :]).div_(-2 * sigma ** 2)


def camera_offsets(coords: Tensor, visible: Tensor, feature_size: tuple[int, int], sigma: float) -> Tensor:
    """Camera prior (..., V, h, w) of reference points projected to continuous feature pixels coords (..., V, 2)
    (y, x) with visibility (..., V) on (h, w) feature maps; sigma in feature pixels."""
    height, width = feature_size
    rows = torch.arange(height, device=coords.device, dtype=coords.dtype) + 0.5
    cols = torch.arange(width, device=coords.device, dtype=coords.dtype) + 0.5
    dy2 = (rows - coords[..., 0, None]) ** 2                                     # (..., V, h)
    dx2 = (cols - coords[..., 1, None]) ** 2                                     # (..., V, w)
    camera = (dy2[..., :, None] + dx2[..., None, :]).div_(-2 * sigma ** 2)
    return camera.masked_fill_(~visible[..., None, None], NOT_VISIBLE)


def project_to_feature_maps(reference: Tensor, pc_range: tuple[float, ...], lidar2img: Tensor,
                            img_shape: tuple[int, int], feature_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(B, Q, 3) normalised reference points -> feature pixels (B, Q, V, 2) (y, x) and visibility (B, Q, V)."""
    pixels, visible = project_to_images(reference, pc_range, lidar2img, img_shape)
    return feature_map_pixels(pixels, img_shape, feature_size).to(reference), visible


def join_offsets(parts: list[Tensor]) -> Tensor:
    """Concatenate BEV and camera offsets (..., n_i) in memory order (BEV cells, then cameras), floored at
    NOT_VISIBLE."""
    return torch.cat(parts, dim=-1).clamp_(min=NOT_VISIBLE)


def cross_attention_locality_bias(reference: Tensor, *, pc_range: tuple[float, ...], sigma_bev: float,
                                  sigma_camera: float, bev_size: Optional[tuple[int, int]] = None,
                                  lidar2img: Optional[Tensor] = None, img_shape: Optional[tuple[int, int]] = None,
                                  camera_feature_size: Optional[tuple[int, int]] = None) -> Tensor:
    """Additive cross-attention bias (B, 1, Q, M) for the memory order of CmtTransformer (BEV cells, then cameras).

    reference: (B, Q, 3) query reference points normalised by `pc_range`; bev_size: (H, W) of the BEV map that
    covers `pc_range` (None without the LiDAR branch); lidar2img (B, V, 4, 4), img_shape (H_img, W_img) and
    camera_feature_size (h, w) describe the camera memory (None without cameras). Sigmas: metres / feature pixels.
    """
    reference = reference.detach()                     # a fixed prior: no gradient into the reference points
    parts = []
    if bev_size is not None:
        span = reference.new_tensor(pc_range[3:5]) - reference.new_tensor(pc_range[:2])
        rows, cols = (bev_cell_centres(n, reference.device) for n in bev_size)
        parts.append(bev_offsets(reference[..., :2], rows, cols, span, sigma_bev).flatten(2))
    if lidar2img is not None:
        coords, visible = project_to_feature_maps(reference, pc_range, lidar2img, img_shape, camera_feature_size)
        parts.append(camera_offsets(coords, visible, camera_feature_size, sigma_camera).flatten(2))
    if not parts:
        raise ValueError("cross_attention_locality_bias needs bev_size or the camera geometry")
    return join_offsets(parts).unsqueeze(1)
