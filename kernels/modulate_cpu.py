"""The PyTorch path of `modulate` (what CPU tensors run): x * s, with the statistics factored into per-pixel
channel reductions. The semantics: kernels/modulate.py.
"""
from __future__ import annotations

import torch


def modulate_forward_torch(x: torch.Tensor, scale: torch.Tensor,
                           with_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in x's dtype, stats [4] or empty): x * s computed in fp32 (float64 for float64 inputs)."""
    acc = torch.promote_types(x.dtype, scale.dtype)
    xf = x.to(acc)
    out = xf * scale[:, None]
    if not with_stats:
        return out.to(x.dtype), out.new_empty(0)
    # out - x = x (s - 1) per pixel, so each sum factors into per-pixel channel reductions of x: three read-only
    # passes over x instead of temporaries the size of out.
    abs_x = torch.linalg.vector_norm(xf, ord=1, dim=1)                     # [N, H, W] sum_c |x|
    sq_x = torch.linalg.vector_norm(xf, ord=2, dim=1).square()             # sum_c x^2
    stats = torch.stack([((scale - 1).abs() * abs_x).sum(), abs_x.sum(), (scale * xf.sum(1)).sum(),
                         (scale.square() * sq_x).sum()])
    return out.to(x.dtype), stats


def modulate_backward_torch(grad_out: torch.Tensor, x: torch.Tensor,
                            scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x = g * s in x's dtype, grad_scale = sum_c g * x)."""
    acc = torch.promote_types(x.dtype, scale.dtype)
    g = grad_out.to(acc)
    return (g * scale[:, None]).to(x.dtype), (g * x.to(acc)).sum(1)
