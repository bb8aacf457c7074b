"""AQR weight generator: per query, a LiDAR weight and a camera weight from its local feature windows.

One decoder layer without self-attention (cross-attention -> norm -> FFN -> norm -> post-norm), as in the AQR
fork. Each query attends only to a ``bev_window`` x ``bev_window`` window of the BEV map around its BEV pixel
and a ``camera_window`` x ``camera_window`` window of the first camera map that sees it (15 x 15 and 5 x 5 in
the fork). Instead of a (Q x 56400) attention mask the windows are *gathered*: each query picks its
K = bev_window^2 + camera_window^2 keys by index (the key/value projections are folded into the query side,
see LocalCrossAttention), with window cells outside a map (or queries seen by no camera) masked out. A
Linear(C, 2) and a sigmoid (bias 2.0, weights start near 0.88) or tanh (the fork's later variant, bias 1.5)
give the two weights. With ``sensor_evidence`` (:class:`SensorEvidence`) each query also sees how
strongly each modality responds where it looks, measured over its whole BEV sector and camera view.

Parameter names follow the fork (``encoder.layers.0.attentions.0.attn.in_proj_weight``,
``encoder.layers.0.ffns.0.layers.0.0.weight``, ``encoder.post_norm``, ``weight_predictor``,
``bev_type_embed``, ``rv_type_embed``) so an AQR checkpoint converts by prefix only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aqrcmt.config import AQRGeneratorConfig
from aqrcmt.models.aqr.projection import Projection


def window_offsets(window: int, device: torch.device | None = None) -> torch.Tensor:
    """(window^2, 2) int64 (dy, dx) offsets of an odd square window, row-major."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    r = torch.arange(-(window // 2), window // 2 + 1, device=device)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dy.flatten(), dx.flatten()], dim=-1)


def gather_window_indices(center: torch.Tensor, map_index: torch.Tensor, query_valid: torch.Tensor,
                          size: tuple[int, int], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices of each query's window, and which of them are usable keys.

    center: (B, Q, 2) int64 (y, x) pixel of the window centre; map_index: (B, Q) int64 map (view) the
    window lies in; query_valid: (B, Q) bool, False masks the whole window.
    size: (H, W) of each map; tokens are numbered map * H * W + y * W + x (the "(v h w)" memory order).
    Returns index (B, Q, window^2) int64 (clamped into range) and keep (B, Q, window^2) bool: True for cells
    inside the map (no wrap-around to the next row or view).
    """
    height, width = size
    offsets = window_offsets(window, center.device)                        # (K, 2)
    cells = center.unsqueeze(2) + offsets                                   # (B, Q, K, 2)
    y, x = cells[..., 0], cells[..., 1]
    keep = (y >= 0) & (y < height) & (x >= 0) & (x < width) & query_valid.unsqueeze(-1)
    index = map_index.unsqueeze(-1) * (height * width) + y.clamp(0, height - 1) * width + x.clamp(0, width - 1)
    return index, keep


class PackedAttentionProjections(nn.Module):
    """The q/k/v input projection (packed, as torch's MultiheadAttention stores it) and the output projection."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """which = 0, 1, 2 for q, k, v; x (..., C) -> (..., C)."""
        dim = self.out_proj.in_features
        rows = slice(which * dim, (which + 1) * dim)
        return F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows])


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of `scores` restricted to `keep` (broadcast bool); all zeros where no key is kept."""
    kept_any = keep.any(-1, keepdim=True)
    probs = scores.masked_fill(~keep, float("-inf")).masked_fill(~kept_any, 0.0).softmax(-1)
    return probs * kept_any


class LocalCrossAttention(nn.Module):
    """Multi-head attention of each query over its own gathered key set.

    The key and value projections are folded into the query side, so they never run over all tokens:
    ``q_h . (W_k,h k + b_k,h) = (W_k,h^T q_h) . k + const`` (the constant cancels in the softmax) and
    ``sum_j p_j (W_v,h v_j + b_v,h) = W_v,h (sum_j p_j v_j) + b_v,h sum_j p_j``. Same parameters and result as
    packed multi-head attention restricted to the window; ~6x fewer FLOPs for 900 queries x 250 keys than
    projecting 56,400 tokens.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"generator dim {dim} is not divisible by num_heads {num_heads}")
        self.attn = PackedAttentionProjections(dim)
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                keep: torch.Tensor, split: Optional[int] = None) -> torch.Tensor:
        """query (B, Q, C) (content + position); keys/values (B, N, C) all tokens, un-projected;
        index/keep (B, Q, K) gathered window tokens; split: None for one softmax over the K keys, or S for a
        softmax over the first S keys and one over the rest, each weighted 1/2 (a group with no usable key adds
        nothing). Returns (B, Q, C)."""
        b, q, c = query.shape
        k_count, heads, head_dim = index.shape[-1], self.num_heads, c // self.num_heads
        tokens = keys.shape[1]
        flat_index = (index + torch.arange(b, device=index.device).view(b, 1, 1) * tokens).reshape(-1)
        k_win = keys.reshape(b * tokens, c).index_select(0, flat_index).view(b * q, k_count, c)
        v_win = values.reshape(b * tokens, c).index_select(0, flat_index).view(b * q, k_count, c)
        _, w_k, w_v = self.attn.in_proj_weight.view(3, heads, head_dim, c).unbind(0)
        b_v = self.attn.in_proj_bias.view(3, heads, head_dim)[2]
        q_proj = self.attn.project(query, 0).view(b * q, heads, head_dim) * head_dim ** -0.5
        q_in = torch.einsum("nhd,hdc->nhc", q_proj, w_k)                                    # (BQ, h, C)
        scores = torch.bmm(q_in, k_win.transpose(1, 2))                                      # (BQ, h, K)
        keep = keep.view(b * q, 1, k_count)
        if split is None:
            probs = masked_softmax(scores, keep)
        else:
            groups = zip(scores.split([split, k_count - split], -1), keep.split([split, k_count - split], -1))
            probs = torch.cat([0.5 * masked_softmax(part, part_keep) for part, part_keep in groups], -1)
        probs = F.dropout(probs, self.dropout, self.training)
        mixed = torch.bmm(probs, v_win)                                                      # (BQ, h, C)
        out = torch.einsum("nhc,hdc->nhd", mixed, w_v) + b_v * probs.sum(-1, keepdim=True)
        return self.attn.out_proj(out.reshape(b, q, c))


class FeedForward(nn.Module):
    """x + W2 Dropout(ReLU(W1 x)) with the fork's module nesting (``layers.0.0`` = W1, ``layers.1`` = W2)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)),
            nn.Linear(hidden, dim), nn.Dropout(dropout))
        for layer in (self.layers[0][0], self.layers[1]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class LocalDecoderLayer(nn.Module):
    """cross-attention -> LayerNorm -> FFN -> LayerNorm (no self-attention)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attentions = nn.ModuleList([LocalCrossAttention(dim, num_heads, dropout)])
        self.ffns = nn.ModuleList([FeedForward(dim, ffn_dim, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, target: torch.Tensor, query_pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                index: torch.Tensor, keep: torch.Tensor, split: Optional[int] = None) -> torch.Tensor:
        target = target + self.dropout(self.attentions[0](target + query_pos, keys, values, index, keep, split))
        target = self.norms[0](target)
        return self.norms[1](self.ffns[0](target))


class LocalDecoder(nn.Module):
    """One LocalDecoderLayer on a zero target, then the post-norm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList([LocalDecoderLayer(dim, num_heads, ffn_dim, dropout)])
        self.post_norm = nn.LayerNorm(dim)

    def forward(self, query_pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                keep: torch.Tensor, split: Optional[int] = None) -> torch.Tensor:
        """(B, Q, C) query features; arguments as for LocalCrossAttention."""
        target = torch.zeros_like(query_pos)
        for layer in self.layers:
            target = layer(target, query_pos, keys, values, index, keep, split)
        return self.post_norm(target)


class SensorEvidence(nn.Module):
    """How much signal each query's modalities carry where it looks, embedded beside the query's features.

    Per query: log(1 + mean feature norm) of the BEV cells in its azimuth sector (``sectors`` equal sectors around
    the sensor) and of the camera view that sees it first (0 when none does). A dropped LiDAR, or the sectors a
    narrowed field of view leaves empty, shrink the BEV norms (a dropped LiDAR to about a quarter on the tiny
    benchmark); a dropped view leaves black-image features. The local windows alone cannot tell a dropped LiDAR
    from an empty street: their camera tokens are several times larger than the BEV tokens, and the decoder's
    LayerNorms remove what is left of a difference in BEV magnitude. A Linear(2, C) embeds the two log norms;
    the generator adds the embedding to the decoded query features, so the weight head (C inputs, not 2) can
    move the weights within a short fine-tuning, and identity start (a zero weight head) stays exact. The norms
    are measurements of the sensors, not trained through (detached).

    bev_size: (H, W) of the BEV map; sensor_pixel: (y, x) continuous BEV pixel of the sensor (the LiDAR origin).
    """

    def __init__(self, dim: int, sectors: int, bev_size: tuple[int, int], sensor_pixel: tuple[float, float]):
        super().__init__()
        self.sectors = sectors
        self.sensor_pixel = sensor_pixel
        height, width = bev_size
        rows = torch.arange(height, dtype=torch.float32) + 0.5 - sensor_pixel[0]
        cols = torch.arange(width, dtype=torch.float32) + 0.5 - sensor_pixel[1]
        cell_sector = self.sector_of(rows[:, None].expand(height, width), cols[None, :].expand(height, width))
        members = F.one_hot(cell_sector.flatten(), sectors).float()                               # (HW, S)
        # (HW, S) weights that average a map's cells over each sector; fixed by the geometry, so not saved
        self.register_buffer("sector_mean", members / members.sum(0).clamp(min=1.0), persistent=False)
        self.embed = nn.Linear(2, dim)
        # the scale of the LayerNorm'ed features it joins (unit variance per channel and unit of log norm): a
        # drop's change of ~1 in log norm then moves every channel by ~1, which the weight head can use within
        # a short fine-tuning (with the default Linear init of fan-in 2 it would move them ~3x less)
        nn.init.normal_(self.embed.weight)
        nn.init.zeros_(self.embed.bias)

    def sector_of(self, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """Azimuth sector (int64, 0 .. sectors - 1) of BEV pixel offsets (dy, dx) from the sensor."""
        turn = (torch.atan2(dy, dx) + math.pi) / (2 * math.pi)
        return (turn * self.sectors).floor().long().clamp(0, self.sectors - 1)

    def measure(self, bev_features: torch.Tensor, camera_features: torch.Tensor, bev_coords: torch.Tensor,
                view: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """bev_features (B, C, H, W) on the map of `bev_size`; camera_features (B*V, C, h, w); bev_coords (B, Q, 2)
        (y, x) pixels; view / seen (B, Q) the first view that sees each query and whether any does.
        Returns (B, Q, 2) float32: log(1 + mean norm) of the query's BEV sector and camera view."""
        b = bev_features.shape[0]
        cell_norm = bev_features.detach().float().norm(dim=1).flatten(1)                     # (B, HW)
        sector_norm = cell_norm @ self.sector_mean.to(cell_norm)                             # (B, S)
        sensor_y, sensor_x = self.sensor_pixel
        query_sector = self.sector_of(bev_coords[..., 0] - sensor_y, bev_coords[..., 1] - sensor_x)
        lidar = sector_norm.gather(1, query_sector)                                          # (B, Q)
        view_norm = camera_features.detach().float().norm(dim=1).flatten(1).mean(1).view(b, -1)   # (B, V)
        camera = view_norm.gather(1, view) * seen
        return torch.stack([lidar, camera], dim=-1).log1p()

    def forward(self, bev_features: torch.Tensor, camera_features: torch.Tensor, bev_coords: torch.Tensor,
                view: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) embedding of :meth:`measure`'s evidence (same arguments)."""
        evidence = self.measure(bev_features, camera_features, bev_coords, view, seen)
        return self.embed(evidence.to(self.embed.weight.dtype))


class AQRWeightGenerator(nn.Module):
    """Per-query (LiDAR weight, camera weight) from local BEV and camera windows.

    dim: feature/embedding width C (the head's hidden_dim); bev_size (H, W) and sensor_pixel ((y, x) BEV pixel of
    the LiDAR origin): the BEV map's geometry, needed with ``cfg.sensor_evidence``.
    """

    def __init__(self, cfg: AQRGeneratorConfig, dim: int, identity_start: bool = False,
                 bev_size: Optional[tuple[int, int]] = None, sensor_pixel: Optional[tuple[float, float]] = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = LocalDecoder(dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
        self.weight_predictor = nn.Linear(dim, 2)
        if identity_start:
            # Zero output layer and weight = 2 * sigmoid(logit): every weight is exactly 1 at step 0, and the
            # output layer's gradient (features x dL/dlogit) is not zero, so the generator starts learning at once.
            nn.init.zeros_(self.weight_predictor.weight)
            nn.init.zeros_(self.weight_predictor.bias)
        else:
            # Small weights: every query starts at activation(bias_init) (sigmoid(2.0) = 0.88) yet gradients reach
            # the encoder from the first step. (The fork used xavier, which spreads the initial weights widely.)
            nn.init.normal_(self.weight_predictor.weight, std=0.01)
            nn.init.constant_(self.weight_predictor.bias, cfg.bias_init)
        self.scale = 2.0 if identity_start else 1.0
        self.bev_type_embed = nn.Parameter(torch.randn(dim) * 0.02)
        self.rv_type_embed = nn.Parameter(torch.randn(dim) * 0.02)
        if not cfg.use_type_embed:    # kept for the fork's checkpoint names; unused, so frozen (DDP needs grads)
            self.bev_type_embed.requires_grad_(False)
            self.rv_type_embed.requires_grad_(False)
        self.evidence = None
        if cfg.sensor_evidence:
            if bev_size is None or sensor_pixel is None:
                raise ValueError("sensor_evidence needs the BEV map's geometry (bev_size and sensor_pixel)")
            self.evidence = SensorEvidence(dim, cfg.evidence_sectors, bev_size, sensor_pixel)

    def forward(self, query_pos: torch.Tensor, bev_features: torch.Tensor, bev_pos: torch.Tensor,
                camera_features: torch.Tensor, camera_pos: torch.Tensor, bev: Projection,
                cameras: Projection) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of Q queries.

        query_pos: (B, Q, C) query positional embedding; bev_features: (B, C, H, W); bev_pos: (H*W, C) or
        (B, H*W, C); camera_features: (B*V, C, h, w); camera_pos: (B*V, h, w, C);
        bev / cameras: the queries' projections (V = 1 for the BEV).
        Returns (lidar_weight, camera_weight), each (B, Q), in (0, 1) for sigmoid ((0, 2) with identity start)
        or (-1, 1) for tanh.
        """
        b, q, c = query_pos.shape
        _, _, bev_h, bev_w = bev_features.shape
        bv, _, cam_h, cam_w = camera_features.shape
        views = bv // b
        bev_tokens = bev_features.flatten(2).transpose(1, 2)                                   # (B, HW, C)
        cam_tokens = camera_features.view(b, views, c, cam_h * cam_w).permute(0, 1, 3, 2).reshape(b, -1, c)
        bev_key_pos = bev_pos.expand(b, -1, -1) if bev_pos.dim() == 2 else bev_pos
        cam_key_pos = camera_pos.reshape(b, views * cam_h * cam_w, c)
        bev_keys, cam_keys = bev_tokens + bev_key_pos, cam_tokens + cam_key_pos
        if self.cfg.use_type_embed:   # the fork declared the embeddings but never added them (use_type_embed=False)
            bev_keys, cam_keys = bev_keys + self.bev_type_embed, cam_keys + self.rv_type_embed
        keys = torch.cat([bev_keys, cam_keys], dim=1)
        values = torch.cat([bev_tokens, cam_tokens], dim=1)

        # BEV window: around the query's pixel, moved inside the map for queries beyond its edge
        bev_center = bev.coords[:, :, 0].floor().long().clamp(min=0)
        bev_center = torch.minimum(bev_center, bev_center.new_tensor([bev_h - 1, bev_w - 1]))
        zeros = torch.zeros(b, q, dtype=torch.long, device=query_pos.device)
        bev_index, bev_keep = gather_window_indices(bev_center, zeros, torch.ones_like(zeros, dtype=torch.bool),
                                                    (bev_h, bev_w), self.cfg.bev_window)
        # camera window: on the first view that sees the query; masked entirely when no view does
        view, seen = cameras.first_valid_view()
        cam_center = cameras.coords.gather(2, view.view(b, q, 1, 1).expand(b, q, 1, 2))[:, :, 0].floor().long()
        cam_index, cam_keep = gather_window_indices(cam_center, view, seen, (cam_h, cam_w), self.cfg.camera_window)
        index = torch.cat([bev_index, cam_index + bev_h * bev_w], dim=-1)
        keep = torch.cat([bev_keep, cam_keep], dim=-1)

        split = self.cfg.bev_window ** 2 if self.cfg.attention == "per_modality" else None
        features = self.encoder(query_pos, keys, values, index, keep, split)
        if self.evidence is not None:
            features = features + self.evidence(bev_features, camera_features, bev.coords[:, :, 0], view, seen)
        logits = self.weight_predictor(features)
        weights = self.scale * torch.sigmoid(logits) if self.cfg.activation == "sigmoid" else torch.tanh(logits)
        return weights[..., 0], weights[..., 1]
