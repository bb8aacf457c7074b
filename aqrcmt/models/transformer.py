"""The CMT decoder: queries attend to each other, then to the joint BEV + camera token memory.

Each of the ``num_layers`` layers runs (``CmtTransformer`` in junjie18/CMT
``projects/mmdet3d_plugin/models/utils/cmt_transformer.py``)::

    tgt = LN0(tgt + drop(SelfAttn(q = k = tgt + query_pos, v = tgt, mask = DN mask)))
    tgt = LN1(tgt + drop(CrossAttn(q = tgt + query_pos, k = memory + key_pos, v = memory)))
    tgt = LN2(tgt + FFN(tgt))

and emits ``post_norm(tgt)`` (one LayerNorm shared by all layers); the un-normalised ``tgt`` feeds the next
layer. Self-attention has attention-probability dropout, cross-attention has none (the official FlashMHA
call passes its dropout into the ``bias`` argument). All tensors are batch-first, (B, N, C). Parameter
names follow the official checkpoint (``layers.{i}.attentions.{0,1}.attn.in_proj_weight`` ...).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from aqrcmt.models.local_attention import LocalAttention


class PackedAttention(nn.Module):
    """Multi-head attention with packed q/k/v input projections (the layout of ``nn.MultiheadAttention``)."""

    def __init__(self, embed_dim: int, num_heads: int, attn_dropout: float) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attn_mask: Optional[Tensor | LocalAttention] = None) -> Tensor:
        """query (B, Nq, C), key / value (B, Nk, C) -> (B, Nq, C). attn_mask: (Nq, Nk) bool (True = may attend),
        a float bias broadcastable to (B, heads, Nq, Nk) added to the logits, or the key sets of local attention."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = (self._split_heads(F.linear(x, w, b)) for x, w, b in
                   ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        dropout = self.attn_dropout if self.training else 0.0
        if isinstance(attn_mask, LocalAttention):
            out = attn_mask.attend(q, k, v, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)      # (B, heads, N, C / heads)


class AttentionBlock(nn.Module):
    """Attention followed by output dropout (the residual is added by the layer)."""

    def __init__(self, embed_dim: int, num_heads: int, attn_dropout: float, out_dropout: float) -> None:
        super().__init__()
        self.attn = PackedAttention(embed_dim, num_heads, attn_dropout)
        self.dropout = nn.Dropout(out_dropout)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attn_mask: Optional[Tensor | LocalAttention] = None) -> Tensor:
        return self.dropout(self.attn(query, key, value, attn_mask))


class FeedForward(nn.Module):
    """Linear -> ReLU -> Linear (no dropout in the released configs); keys ``layers.0.0`` and ``layers.1``."""

    def __init__(self, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(inplace=True)),
                                    nn.Linear(hidden_dim, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class DecoderLayer(nn.Module):
    """self-attention, norm, cross-attention, norm, FFN, norm (post-norm residual blocks)."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([
            AttentionBlock(embed_dim, num_heads, attn_dropout=dropout, out_dropout=dropout),
            AttentionBlock(embed_dim, num_heads, attn_dropout=0.0, out_dropout=dropout),
        ])
        self.ffns = nn.ModuleList([FeedForward(embed_dim, ffn_dim)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(3)])

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, key: Tensor,
                self_attn_mask: Optional[Tensor], cross_attn_bias: Optional[Tensor | LocalAttention] = None) -> Tensor:
        """tgt / query_pos (B, Nq, C); memory (B, M, C) values; key = memory + key_pos (B, M, C);
        cross_attn_bias: optional (B, 1, Nq, M) float added to the cross-attention logits, or local attention's
        key sets (aqrcmt/models/local_attention.py)."""
        q = tgt + query_pos
        tgt = self.norms[0](tgt + self.attentions[0](q, q, tgt, self_attn_mask))
        tgt = self.norms[1](tgt + self.attentions[1](tgt + query_pos, key, memory, cross_attn_bias))
        return self.norms[2](tgt + self.ffns[0](tgt))


class Decoder(nn.Module):
    """`num_layers` decoder layers; returns the post-normed output of every layer. With `checkpointing`, each
    layer's activations are recomputed in the backward of a training step instead of kept."""

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, ffn_dim: int, dropout: float,
                 checkpointing: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(embed_dim, num_heads, ffn_dim, dropout)
                                     for _ in range(num_layers)])
        self.post_norm = nn.LayerNorm(embed_dim)
        self.checkpointing = checkpointing

    def forward(self, query_pos: Tensor, memory: Tensor, key_pos: Tensor,
                self_attn_mask: Optional[Tensor] = None,
                cross_attn_bias: Optional[Tensor | LocalAttention] = None) -> Tensor:
        """query_pos (B, Nq, C), memory / key_pos (B, M, C) -> (num_layers, B, Nq, C); queries start at zero."""
        tgt = torch.zeros_like(query_pos)
        key = memory + key_pos
        outputs = []
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                tgt = checkpoint(layer, tgt, query_pos, memory, key, self_attn_mask, cross_attn_bias,
                                 use_reentrant=False)
            else:
                tgt = layer(tgt, query_pos, memory, key, self_attn_mask, cross_attn_bias)
            outputs.append(self.post_norm(tgt))
        return torch.stack(outputs)


class CmtTransformer(nn.Module):
    """Flattens the BEV and camera feature maps into one token memory and runs the decoder.

    Token order: BEV cells row-major ``(h w)``, then camera cells ``(view h w)`` (official order).
    """

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, ffn_dim: int, dropout: float,
                 checkpointing: bool = False) -> None:
        super().__init__()
        self.decoder = Decoder(num_layers, embed_dim, num_heads, ffn_dim, dropout, checkpointing)
        for module in self.modules():  # DETR init: xavier-uniform projections, zero biases
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, query_pos: Tensor, bev_feat: Optional[Tensor], bev_pos: Optional[Tensor],
                img_feat: Optional[Tensor], img_pos: Optional[Tensor],
                self_attn_mask: Optional[Tensor] = None,
                cross_attn_bias: Optional[Tensor | LocalAttention] = None) -> Tensor:
        """Decode queries against the memory.

        query_pos: (B, Nq, C). bev_feat: (B, C, H, W) with bev_pos (H * W, C). img_feat: (B * V, C, h, w) with
        img_pos (B * V, h, w, C). Either modality may be None. Returns (num_layers, B, Nq, C).
        """
        batch = query_pos.shape[0]
        memories, positions = [], []
        if bev_feat is not None:
            memories.append(bev_feat.flatten(2).transpose(1, 2))
            positions.append(bev_pos.unsqueeze(0).expand(batch, -1, -1))
        if img_feat is not None:
            channels = img_feat.shape[1]
            memories.append(img_feat.unflatten(0, (batch, -1)).permute(0, 1, 3, 4, 2).reshape(batch, -1, channels))
            positions.append(img_pos.reshape(batch, -1, channels))
        if not memories:
            raise ValueError("CmtTransformer needs bev_feat or img_feat")
        memory, key_pos = torch.cat(memories, dim=1), torch.cat(positions, dim=1)
        return self.decoder(query_pos, memory, key_pos, self_attn_mask, cross_attn_bias)
