"""Local cross-attention: each query attends only to the memory tokens near it (the tiny CPU config).

With the locality prior (locality.py) a BEV token d metres from a query's reference point enters the softmax with
the offset -d^2 / (2 sigma_bev^2): beyond `window` sigmas it weighs less than exp(-window^2 / 2) of the token under
the query (1.1 % at 3 sigmas), yet dense attention computes every such logit. Here the BEV grid is cut into square
tiles of TILE_CELLS x TILE_CELLS cells; a query belongs to the tile of the cell under its reference point, and the
queries of one tile attend together to

- the BEV cells of their tile grown by ceil(window * sigma_bev / cell size) cells on every side (so every cell
  within `window` sigmas of each of them, and some farther ones), and
- the camera tokens of the views that see at least one of them (on the other views the prior is NOT_VISIBLE for
  all of them: weights below 1e-13),

with the prior's offsets added as in dense attention. `attend` runs one attention call per (sample, tile) on the
gathered keys; `dense_bias` writes the same key sets as one dense bias (-inf outside them), for graphs whose shapes
may not depend on the data (torch.compile, export) and as the tests' reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from aqrcmt.models.locality import (bev_cell_centres, bev_offsets, camera_offsets, join_offsets,
                                    project_to_feature_maps)

TILE_CELLS = 32   # tile side in BEV cells: ~100 queries per attention call on the tiny config's 64 x 64 map (the
                  # CPU flash kernel is slow on a handful), a quarter of its cells plus the halo as keys


class LocalAttention:
    """Key sets and prior offsets of one decoder forward, shared by its layers.

    reference: (B, Q, 3) query reference points normalised by `pc_range`; bev_size: (H, W) of the BEV grid that
    covers `pc_range` (the tiles; its cells are memory tokens unless `bev_memory` is False: a camera-only head);
    window: kept radius in sigmas of the BEV prior; lidar2img (B, V, 4, 4), img_shape and camera_feature_size
    (h, w) describe the camera memory (None without cameras). Sigmas: metres / feature pixels.
    """

    def __init__(self, reference: Tensor, *, pc_range: tuple[float, ...], bev_size: tuple[int, int],
                 sigma_bev: float, sigma_camera: float, window: float, bev_memory: bool = True,
                 lidar2img: Optional[Tensor] = None,
                 img_shape: Optional[tuple[int, int]] = None,
                 camera_feature_size: Optional[tuple[int, int]] = None) -> None:
        reference = reference.detach()
        height, width = bev_size
        self.bev_size, self.bev_memory = bev_size, bev_memory
        self.sigma_bev, self.sigma_camera = sigma_bev, sigma_camera
        self.reference_xy = reference[..., :2]
        self.span = reference.new_tensor(pc_range[3:5]) - reference.new_tensor(pc_range[:2])        # (x, y) m
        cell_m = min((pc_range[3] - pc_range[0]) / width, (pc_range[4] - pc_range[1]) / height)
        self.halo = math.ceil(window * sigma_bev / cell_m) if bev_memory else 0                      # cells
        self.rows, self.cols = bev_cell_centres(height, reference.device), bev_cell_centres(width, reference.device)
        row = (reference[..., 1] * height).floor().long().clamp(0, height - 1)                      # (B, Q)
        col = (reference[..., 0] * width).floor().long().clamp(0, width - 1)
        self.tile_row, self.tile_col = row // TILE_CELLS, col // TILE_CELLS
        self.tiles_x = math.ceil(width / TILE_CELLS)
        self.num_tiles = math.ceil(height / TILE_CELLS) * self.tiles_x
        self.tile = self.tile_row * self.tiles_x + self.tile_col                                     # (B, Q)
        self.camera = None
        if lidar2img is not None:
            coords, visible = project_to_feature_maps(reference, pc_range, lidar2img, img_shape, camera_feature_size)
            batch, _, views = visible.shape
            seen = visible.new_zeros((batch, self.num_tiles, views), dtype=torch.float32).scatter_reduce_(
                1, self.tile[..., None].expand(-1, -1, views), visible.float(), reduce="amax")
            self.camera = (coords, visible, seen > 0, camera_feature_size)      # seen: (B, tiles, V) views per tile
        self._groups: Optional[list[TileGroups]] = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0) -> Tensor:
        """q (B, heads, Q, d), k / v (B, heads, M, d) in CmtTransformer's memory order -> (B, heads, Q, d)."""
        if self._groups is None:
            self._groups = [self._sample_groups(b) for b in range(q.shape[0])]
        # gathers on the token-major layout (B, N, heads, d) of the projections move whole rows; one per sample and
        # tensor (not per tile), so that the backward is one index_add each
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        outputs = []
        for b, group in enumerate(self._groups):
            queries = q[b:b + 1].index_select(1, group.queries).split(group.query_counts, dim=1)
            keys = k[b:b + 1].index_select(1, group.keys).split(group.key_counts, dim=1)
            values = v[b:b + 1].index_select(1, group.keys).split(group.key_counts, dim=1)
            parts = [F.scaled_dot_product_attention(tile_q.transpose(1, 2), tile_k.transpose(1, 2),
                                                    tile_v.transpose(1, 2), attn_mask=bias, dropout_p=dropout)
                     for tile_q, tile_k, tile_v, bias in zip(queries, keys, values, group.biases)]
            outputs.append(torch.cat([part.transpose(1, 2) for part in parts], dim=1).index_select(1, group.inverse))
        return torch.cat(outputs).transpose(1, 2)

    def dense_bias(self) -> Tensor:
        """The same attention as a dense additive bias (B, 1, Q, M): the prior on each query's keys, -inf elsewhere."""
        height, width = self.bev_size
        row0, col0 = self.tile_row * TILE_CELLS - self.halo, self.tile_col * TILE_CELLS - self.halo
        rows = torch.arange(height, device=row0.device)
        cols = torch.arange(width, device=col0.device)
        in_rows = (rows >= row0[..., None]) & (rows < row0[..., None] + TILE_CELLS + 2 * self.halo)    # (B, Q, H)
        in_cols = (cols >= col0[..., None]) & (cols < col0[..., None] + TILE_CELLS + 2 * self.halo)    # (B, Q, W)
        keep, parts = [], []
        if self.bev_memory:
            keep.append((in_rows[..., :, None] & in_cols[..., None, :]).flatten(2))
            parts.append(bev_offsets(self.reference_xy, self.rows, self.cols, self.span, self.sigma_bev).flatten(2))
        if self.camera is not None:
            coords, visible, seen, feature_size = self.camera
            views = seen.gather(1, self.tile[..., None].expand(-1, -1, seen.shape[-1]))                 # (B, Q, V)
            keep.append(views[..., None].expand(-1, -1, -1, feature_size[0] * feature_size[1]).flatten(2))
            parts.append(camera_offsets(coords, visible, feature_size, self.sigma_camera).flatten(2))
        bias = join_offsets(parts).masked_fill_(~torch.cat(keep, dim=-1), -math.inf)
        return bias.unsqueeze(1)

    def _sample_groups(self, b: int) -> "TileGroups":
        """The non-empty tiles of sample b, their queries and keys concatenated in tile order."""
        height, width = self.bev_size
        tile = self.tile[b]
        order = torch.argsort(tile, stable=True)
        query_counts = [n for n in torch.bincount(tile, minlength=self.num_tiles).tolist() if n]
        keys, key_counts, biases = [], [], []
        for t, queries in zip(tile[order].unique_consecutive().tolist(), order.split(query_counts)):
            tile_row, tile_col = divmod(t, self.tiles_x)
            rows = torch.arange(max(0, tile_row * TILE_CELLS - self.halo),
                                min(height, (tile_row + 1) * TILE_CELLS + self.halo), device=tile.device)
            cols = torch.arange(max(0, tile_col * TILE_CELLS - self.halo),
                                min(width, (tile_col + 1) * TILE_CELLS + self.halo), device=tile.device)
            tile_keys, parts = [], []
            if self.bev_memory:
                tile_keys.append((rows[:, None] * width + cols).flatten())
                parts.append(bev_offsets(self.reference_xy[b, queries], self.rows[rows], self.cols[cols], self.span,
                                         self.sigma_bev).flatten(1))
            if self.camera is not None:
                coords, visible, seen, feature_size = self.camera
                views = seen[b, t].nonzero().squeeze(1)
                cells = feature_size[0] * feature_size[1]
                first_camera_token = height * width if self.bev_memory else 0
                tile_keys.append(first_camera_token + (views[:, None] * cells
                                                       + torch.arange(cells, device=tile.device)).flatten())
                parts.append(camera_offsets(coords[b, queries][:, views], visible[b, queries][:, views],
                                            feature_size, self.sigma_camera).flatten(1))
            keys.append(torch.cat(tile_keys))
            key_counts.append(keys[-1].numel())
            biases.append(join_offsets(parts)[None, None])
        return TileGroups(order, torch.argsort(order), query_counts, torch.cat(keys), key_counts, biases)


@dataclass
class TileGroups:
    """One sample's tiles in tile order: `queries` (Q,) sorted by tile and its inverse permutation `inverse`,
    `query_counts` per tile, the concatenated `keys` (sum of key_counts,) memory-token indices, and each tile's
    prior `biases` (1, 1, n_t, k_t)."""
    queries: Tensor
    inverse: Tensor
    query_counts: list[int]
    keys: Tensor
    key_counts: list[int]
    biases: list[Tensor]
