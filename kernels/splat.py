"""Splat per-query weights onto BEV / perspective maps (AQR weight rendering).

One op covers the BEV map (V = 1) and the six camera maps (V = 6): query q of sample b puts its weight w[b, q] on
map v at pixel coordinates coords[b, q, v] = (y, x) when valid[b, q, v]. Output [B, V, H, W].

Pixel convention: pixel (i, j) covers coordinates [i, i+1) x [j, j+1); its centre is (i + 0.5, j + 0.5).
A query is *active* on map v when valid, w >= threshold (a NaN weight is never active) and its pixel
(floor(y), floor(x)) lies inside the map (bilinear: inside [0, H-1) x [0, W-1), the original's rule).

Methods (raw value at pixel p = (i, j), before post-processing; sums run over the active queries of the map):
- gaussian, window k x k (k = kernel_size, default int(6 sigma + 1) made odd; R = k // 2: offsets -R..R) around
  the query pixel c = (floor(y), floor(x)), cropped at the borders;
  r = p - c (position "floor", the original) or r = p + 0.5 - (y, x) (position "exact", sub-pixel centre);
  G(r) = exp(-|r|^2 / (2 sigma^2)), Z = sum of G over the integer window offsets.
    kernel_norm "sum":        raw = sum_q w_q G_q / Z            (unit mass, the original)
    kernel_norm "peak":       raw = sum_q w_q G_q                (a lone query keeps its weight at its centre)
    kernel_norm "normalized": raw = (sum_q w_q G_q + fill eps) / (sum_q G_q + eps)
                              (normalized convolution: a local weighted mean of w, `fill` far from every query)
- bilinear (original): w split over (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1), y0 = floor(y), with
  weights (1-fy)(1-fx), (1-fy)fx, fy(1-fx), fy fx, fy = y - y0 (this method puts pixel centres at integers).
- direct (original): raw = max(0, max_q w_q) over the queries whose pixel is p.
`kernel_norm`, `position`, `sigma` and `kernel_size` only apply to "gaussian".

Post-processing, fused into the same launch: out = 0 where raw < threshold, then out = min(out, clamp_max).
Gradients: w.r.t. weights everywhere (zero at thresholded and clamped pixels; "direct" sends each pixel's gradient
to every query equal to its maximum, autograd through the PyTorch functions splits it evenly among ties); w.r.t.
coords for gaussian + "exact" and for "bilinear" (elsewhere the map is piecewise constant in the coordinates).

NaN/inf (validate=False): NaN weights and NaN/inf coordinates make the query inactive (skipped); +inf weights are
not guarded (they give inf/NaN pixels). validate=True checks finiteness with a device sync and raises.

The op and its paths, one module each:
- splat_params.py: `SplatParams`, the options of one call, validated and turned into the kernel constants once.
- splat_triton.py: the Triton kernels and their launchers (CUDA tensors).
- splat_cpu.py: the separable PyTorch path (CPU tensors) and `splat_separable`, that path called directly.
- this module: the custom ops `torch.ops.aqrcmt.splat` / `splat_backward` (Triton or the separable path, see
  dispatch.use_triton), their autograd registration, and `splat`, the public function.
- splat_ref.py: `splat_ref`, the specification: the formulas above written out on their own for every pixel and
  every query; the tests compare the other paths with it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from .dispatch import use_triton
from .splat_cpu import splat_backward_separable, splat_forward_separable
from .splat_params import SplatParams, check_splat_inputs
from .splat_triton import splat_backward_triton, splat_forward_triton


# ------------------------------------------------------------------------------------------------------------------
# Custom ops and autograd
# ------------------------------------------------------------------------------------------------------------------
@triton_op("aqrcmt::splat", mutates_args=())
def _splat_op(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, height: int, width: int,
              method: str, kernel_norm: str, exact: bool, sigma: float, window: int, inv_norm: float,
              threshold: float, clamp_max: Optional[float], fill: float,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, raw, den); the scalars are SplatParams.op_args()."""
    p = SplatParams(height, width, method, kernel_norm, exact, sigma, window, inv_norm, threshold, clamp_max, fill,
                    eps)
    if use_triton(weights):
        return splat_forward_triton(weights, coords, valid, p)
    return splat_forward_separable(weights, coords, valid, p)


@triton_op("aqrcmt::splat_backward", mutates_args=())
def _splat_backward_op(grad_out: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                       raw: torch.Tensor, den: torch.Tensor, height: int, width: int, method: str, kernel_norm: str,
                       exact: bool, sigma: float, window: int, inv_norm: float, threshold: float,
                       clamp_max: Optional[float], fill: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weights, grad_coords) in fp32; the scalars are SplatParams.op_args()."""
    p = SplatParams(height, width, method, kernel_norm, exact, sigma, window, inv_norm, threshold, clamp_max, fill,
                    eps)
    if use_triton(weights):
        return splat_backward_triton(grad_out, weights, coords, valid, raw, den, p)
    return splat_backward_separable(grad_out, weights, coords, valid, raw, den, p)


def _setup_splat_context(ctx, inputs, output) -> None:
    weights, coords, valid, *params = inputs
    _, raw, den = output
    ctx.save_for_backward(weights, coords, valid, raw, den)
    ctx.params = SplatParams(*params)


def _splat_autograd(ctx, grad_out, _grad_raw, _grad_den):
    weights, coords, valid, raw, den = ctx.saved_tensors
    p: SplatParams = ctx.params
    grad_w, grad_c = torch.ops.aqrcmt.splat_backward(grad_out, weights, coords, valid, raw, den, *p.op_args())
    grad_coords = grad_c.to(coords.dtype) if p.coords_differentiable else None
    return (grad_w.to(weights.dtype), grad_coords) + (None,) * (1 + len(p.op_args()))


_splat_op.register_autograd(_splat_autograd, setup_context=_setup_splat_context)


# ------------------------------------------------------------------------------------------------------------------
# The public function
# ------------------------------------------------------------------------------------------------------------------
def splat(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, height: int, width: int, *,
          sigma: float, kernel_norm: str = "sum", position: str = "floor", threshold: float = 0.01,
          clamp_max: Optional[float] = 1.5, method: str = "gaussian", kernel_size: Optional[int] = None,
          fill: float = 1.0, eps: float = 1e-6, validate: bool = False) -> torch.Tensor:
    """Render query weights onto V maps of H x W pixels (see the module docstring for the exact semantics).

    weights [B, Q] float, coords [B, Q, V, 2] float pixel coordinates (y, x), valid [B, Q, V] bool.
    sigma: Gaussian std in pixels (required: the caller's config owns it; unused unless method is "gaussian");
    kernel_size: window width override (odd; default int(6 sigma + 1) made odd).
    Returns [B, V, H, W], fp32 (float64 for float64 weights). validate=True checks weights/coords for NaN/inf
    (a device sync) and raises ValueError naming the argument.
    """
    check_splat_inputs(weights, coords, valid)
    p = SplatParams.build(height, width, method=method, kernel_norm=kernel_norm, position=position, sigma=sigma,
                          kernel_size=kernel_size, threshold=threshold, clamp_max=clamp_max, fill=fill, eps=eps)
    if validate:
        for name, t in (("weights", weights), ("coords", coords)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or inf")
    return torch.ops.aqrcmt.splat(weights, coords, valid, *p.op_args())[0]
