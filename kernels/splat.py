"""Splat per-query weights onto BEV / perspective maps (AQR weight rendering).

One op covers the BEV map (V = 1) and the six camera maps (V = 6): query q of sample b puts its weight w[b, q] on
map v at pixel coordinates coords[b, q, v] = (y, x) when valid[b, q, v]. Output [B, V, H, W].

Pixel convention: pixel (i, j) covers coordinates [i, i+1) x [j, j+1); its centre is (i + 0.5, j + 0.5).
A query is *active* on map v when valid, w >= threshold (a NaN weight is never active) and its pixel
(floor(y), floor(x)) lies inside the map (bilinear: inside [0, H-1) x [0, W-1), the original's rule).

Methods (raw value at pixel p = (i, j), before post-processing; sums run over the active queries of the map):
- gaussian, window (2R+1)^2 around the query pixel c = (floor(y), floor(x)), cropped at the borders;
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

The file reads top to bottom:
1. `SplatParams`: the options of one call, validated and turned into the kernel constants once, by `splat`.
2. `_splat_fwd_kernel` / `_splat_bwd_kernel` (Triton; one program per pixel tile / per query block; no atomics,
   deterministic) and their launchers.
3. The separable PyTorch path `splat_separable` (what CPU tensors run: impulse image + separable blur for
   gaussian/floor, the fixed-shape window of every query with separable row/column factors otherwise).
4. The custom ops `torch.ops.aqrcmt.splat` / `splat_backward` (Triton or the separable path, see
   dispatch.use_triton) and their autograd registration.
5. `splat`, the public function: checks, builds the params, calls the op.
6. `splat_ref`, the specification: the formulas above evaluated for every pixel and every query, in plain PyTorch;
   the tests compare the other paths with it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .dispatch import use_triton

METHODS = ("gaussian", "bilinear", "direct")
KERNEL_NORMS = ("sum", "peak", "normalized")
POSITIONS = ("floor", "exact")
_METHOD_ID = {name: i for i, name in enumerate(METHODS)}


def gaussian_kernel_size(sigma: float) -> int:
    """The original renderer's window width: int(6 sigma + 1), made odd (sigma 2 -> 13, sigma 1 -> 7)."""
    size = int(6 * sigma + 1)
    return size + 1 if size % 2 == 0 else size


# ------------------------------------------------------------------------------------------------------------------
# Parameters of one call
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplatParams:
    """The validated options of one splat call and the constants derived from them.

    Built once per call by `SplatParams.build`. The custom ops' schemas take scalars only, so the params cross
    them as `op_args()` (the fields in order) and are re-wrapped, not re-validated, by `SplatParams(*args)`.
    """
    height: int                 # map size in pixels
    width: int
    method: str                 # one of METHODS
    kernel_norm: str            # one of KERNEL_NORMS; "sum" unless method is "gaussian"
    exact: bool                 # gaussian centred at the float coordinate (position "exact")
    sigma: float                # Gaussian std in pixels
    window: int                 # footprint width: k (gaussian), 2 (bilinear), 1 (direct)
    inv_norm: float             # 1/Z for gaussian "sum" (Z = sum of G over the k x k integer offsets), else 1
    threshold: float
    clamp_max: Optional[float]
    fill: float
    eps: float

    @staticmethod
    def build(height: int, width: int, *, method: str, kernel_norm: str, position: str, sigma: float,
              kernel_size: Optional[int], threshold: float, clamp_max: Optional[float], fill: float,
              eps: float) -> "SplatParams":
        """Check every option (raises ValueError naming the argument) and derive the kernel constants."""
        if not (isinstance(height, (int, torch.SymInt)) and isinstance(width, (int, torch.SymInt))
                and height > 0 and width > 0):
            raise ValueError(f"height/width must be positive ints, got {height!r}, {width!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if kernel_norm not in KERNEL_NORMS:
            raise ValueError(f"kernel_norm must be one of {KERNEL_NORMS}, got {kernel_norm!r}")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        if not 0 < sigma < math.inf:                       # comparisons only: NaN fails, SymFloat works
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if kernel_size is not None and not (isinstance(kernel_size, int) and kernel_size > 0 and kernel_size % 2):
            raise ValueError(f"kernel_size must be a positive odd int or None, got {kernel_size!r}")
        if not 0 <= threshold < math.inf:
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        if clamp_max is not None and not clamp_max > 0:
            raise ValueError(f"clamp_max must be > 0 or None, got {clamp_max!r}")
        if not (eps > 0 and -math.inf < fill < math.inf):
            raise ValueError(f"eps must be > 0 and fill finite, got eps={eps!r}, fill={fill!r}")
        gaussian = method == "gaussian"
        if gaussian:
            window = kernel_size if kernel_size is not None else gaussian_kernel_size(sigma)
        else:
            window = 2 if method == "bilinear" else 1
        kernel_norm = kernel_norm if gaussian else "sum"
        inv_norm = 1.0
        if gaussian and kernel_norm == "sum":
            inv_two_sigma_sq = 1.0 / (2.0 * sigma ** 2)
            z_1d = sum(math.exp(-(o * o) * inv_two_sigma_sq) for o in range(-(window // 2), window // 2 + 1))
            inv_norm = 1.0 / (z_1d * z_1d)
        return SplatParams(height, width, method, kernel_norm, gaussian and position == "exact", float(sigma), window,
                           inv_norm, float(threshold), None if clamp_max is None else float(clamp_max), float(fill),
                           float(eps))

    def op_args(self) -> tuple:
        """The fields in order: the scalar arguments of the custom ops."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @property
    def radius(self) -> int:
        return self.window // 2

    @property
    def first(self) -> int:
        """Offset of the footprint's first row/column from the query pixel (centred for gaussian)."""
        return -self.radius if self.method == "gaussian" else 0

    @property
    def normalized(self) -> bool:
        return self.kernel_norm == "normalized"

    @property
    def coords_differentiable(self) -> bool:
        return self.exact or self.method == "bilinear"

    @property
    def inv_two_sigma_sq(self) -> float:
        return 1.0 / (2.0 * self.sigma ** 2)


def _check_inputs(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor) -> None:
    """Shapes, dtypes and devices; raises ValueError naming the argument."""
    for name, t in (("weights", weights), ("coords", coords), ("valid", valid)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weights.dim() != 2:
        raise ValueError(f"weights must be [B, Q], got shape {tuple(weights.shape)}")
    batch, num_queries = weights.shape
    if coords.dim() != 4 or coords.shape[:2] != (batch, num_queries) or coords.shape[3] != 2:
        raise ValueError(f"coords must be [B, Q, V, 2] = [{batch}, {num_queries}, V, 2], got {tuple(coords.shape)}")
    if tuple(valid.shape) != tuple(coords.shape[:3]):
        raise ValueError(f"valid must be [B, Q, V] = {list(coords.shape[:3])}, got {tuple(valid.shape)}")
    for name, t in (("weights", weights), ("coords", coords)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
    if not (weights.device == coords.device == valid.device):
        raise ValueError(f"weights, coords and valid must share a device, got {weights.device}, {coords.device}, "
                         f"{valid.device}")


def _accumulation_dtype(weights: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weights.dtype, torch.float32)


def _postprocess(raw: torch.Tensor, p: SplatParams) -> torch.Tensor:
    """out = 0 where raw < threshold, then min(out, clamp_max)."""
    out = torch.where(raw < p.threshold, 0.0, raw)
    return out if p.clamp_max is None else out.clamp(max=p.clamp_max)


# ------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_active_queries(coord_ptr, valid_ptr, qv, q_mask, w, threshold, H, W, METHOD: tl.constexpr):
    """(y, x, active) of the (query, view) slots `qv`: a query renders when it is valid on the view, its weight
    reaches `threshold` and its pixel lies inside the map (bilinear: its 2x2 block). Inactive slots get (0, 0)."""
    y = tl.load(coord_ptr + qv * 2, mask=q_mask, other=-1.0).to(tl.float32)
    x = tl.load(coord_ptr + qv * 2 + 1, mask=q_mask, other=-1.0).to(tl.float32)
    ok = tl.load(valid_ptr + qv, mask=q_mask, other=0) != 0
    if METHOD == 1:
        inside = (y >= 0) & (y < H - 1) & (x >= 0) & (x < W - 1)
    else:
        inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    active = q_mask & ok & (w >= threshold) & inside
    return tl.where(active, y, 0.0), tl.where(active, x, 0.0), active


@triton.jit
def _splat_fwd_kernel(
    weight_ptr,      # [B, Q] query weights (fp16/bf16/fp32)
    coord_ptr,       # [B, Q, V, 2] (y, x) pixel coordinates
    valid_ptr,       # [B, Q, V] uint8: 1 = the query lands on map v
    out_ptr,         # [B, V, H, W] fp32 out: thresholded and clamped map
    raw_ptr,         # [B, V, H, W] fp32 out: map before post-processing (saved for backward)
    den_ptr,         # [B, V, H, W] fp32 out: sum of kernel values (NORMALIZED only; else empty, never read)
    Q, V, H, W,
    threshold, clamp_max, inv_two_sigma_sq, inv_norm, fill, eps,
    METHOD: tl.constexpr,       # 0 gaussian, 1 bilinear, 2 direct
    NORMALIZED: tl.constexpr,
    EXACT: tl.constexpr,
    CLAMP: tl.constexpr,
    RADIUS: tl.constexpr,
    BLOCK_P: tl.constexpr,      # pixels per program
    BLOCK_Q: tl.constexpr,      # queries per loop step
):
    """One program = one tile of BLOCK_P pixels of map (b, v); it gathers every query's contribution."""
    bv = tl.program_id(1)
    b = bv // V
    v = bv % V
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H * W
    py = (p // W)[:, None]
    px = (p % W)[:, None]
    num = tl.zeros([BLOCK_P], dtype=tl.float32)
    den = tl.zeros([BLOCK_P], dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        q_mask = q < Q
        qv = (b * Q + q) * V + v
        w = tl.load(weight_ptr + b * Q + q, mask=q_mask, other=0.0).to(tl.float32)
        y, x, active = _load_active_queries(coord_ptr, valid_ptr, qv, q_mask, w, threshold, H, W, METHOD)
        w = tl.where(active, w, 0.0)                         # NaN weights are inactive: keep them out of sums
        dy = py - tl.floor(y).to(tl.int32)[None, :]        # [BLOCK_P, BLOCK_Q] integer offsets
        dx = px - tl.floor(x).to(tl.int32)[None, :]
        act = active[None, :]
        if METHOD == 0:
            hit = act & (tl.abs(dy) <= RADIUS) & (tl.abs(dx) <= RADIUS)
            if EXACT:
                ry = py.to(tl.float32) + 0.5 - y[None, :]
                rx = px.to(tl.float32) + 0.5 - x[None, :]
            else:
                ry = dy.to(tl.float32)
                rx = dx.to(tl.float32)
            k = tl.where(hit, tl.exp(-(ry * ry + rx * rx) * inv_two_sigma_sq) * inv_norm, 0.0)
            num += tl.sum(k * w[None, :], axis=1)
            if NORMALIZED:
                den += tl.sum(k, axis=1)
        elif METHOD == 1:
            fy = (y - tl.floor(y))[None, :]
            fx = (x - tl.floor(x))[None, :]
            ky = tl.where(dy == 0, 1.0 - fy, tl.where(dy == 1, fy, 0.0))
            kx = tl.where(dx == 0, 1.0 - fx, tl.where(dx == 1, fx, 0.0))
            num += tl.sum(tl.where(act, ky * kx, 0.0) * w[None, :], axis=1)
        else:
            hit = act & (dy == 0) & (dx == 0)
            num = tl.maximum(num, tl.max(tl.where(hit, w[None, :], 0.0), axis=1))
    if NORMALIZED:
        raw = (num + fill * eps) / (den + eps)
    else:
        raw = num
    out = tl.where(raw < threshold, 0.0, raw)
    if CLAMP:
        out = tl.minimum(out, clamp_max)
    offs = bv * H * W + p
    tl.store(out_ptr + offs, out, mask=p_mask)
    tl.store(raw_ptr + offs, raw, mask=p_mask)
    if NORMALIZED:
        tl.store(den_ptr + offs, den, mask=p_mask)


@triton.jit
def _splat_bwd_kernel(
    weight_ptr,      # [B, Q] query weights
    coord_ptr,       # [B, Q, V, 2] (y, x) pixel coordinates
    valid_ptr,       # [B, Q, V] uint8
    grad_out_ptr,    # [B, V, H, W] gradient w.r.t. the post-processed map
    raw_ptr,         # [B, V, H, W] fp32 map before post-processing
    den_ptr,         # [B, V, H, W] fp32 kernel sums (NORMALIZED only; else empty, never read)
    grad_weight_ptr,  # [B, Q] fp32 out
    grad_coord_ptr,  # [B, Q, V, 2] fp32 out (COORD_GRAD only)
    Q, V, H, W,
    threshold, clamp_max, inv_two_sigma_sq, inv_norm, eps,
    METHOD: tl.constexpr,
    NORMALIZED: tl.constexpr,
    EXACT: tl.constexpr,
    CLAMP: tl.constexpr,
    COORD_GRAD: tl.constexpr,
    WIN: tl.constexpr,          # footprint width
    FIRST: tl.constexpr,        # footprint offset of the first row/column
    WIN_PAD: tl.constexpr,      # next power of two >= WIN * WIN
    BLOCK_Q: tl.constexpr,      # queries per program
):
    """One program = BLOCK_Q queries of sample b; it gathers the gradient over each query's footprint."""
    b = tl.program_id(1)
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Q
    w = tl.load(weight_ptr + b * Q + q, mask=q_mask, other=0.0).to(tl.float32)
    j = tl.arange(0, WIN_PAD)
    oy = (j // WIN + FIRST)[None, :]
    ox = (j % WIN + FIRST)[None, :]
    j_mask = (j < WIN * WIN)[None, :]
    grad_w = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for v in range(0, V):
        qv = (b * Q + q) * V + v
        y, x, active = _load_active_queries(coord_ptr, valid_ptr, qv, q_mask, w, threshold, H, W, METHOD)
        w_v = tl.where(active, w, 0.0)
        y = y[:, None]
        x = x[:, None]
        py = tl.floor(y).to(tl.int32) + oy                   # [BLOCK_Q, WIN_PAD] footprint pixels
        px = tl.floor(x).to(tl.int32) + ox
        m = active[:, None] & j_mask & (py >= 0) & (py < H) & (px >= 0) & (px < W)
        pix = (b * V + v) * H * W + py * W + px
        g = tl.load(grad_out_ptr + pix, mask=m, other=0.0).to(tl.float32)
        raw = tl.load(raw_ptr + pix, mask=m, other=0.0)
        keep = raw >= threshold
        if CLAMP:
            keep = keep & (raw <= clamp_max)
        g = tl.where(m & keep, g, 0.0)
        if METHOD == 2:
            grad_w += tl.sum(tl.where(raw == w_v[:, None], g, 0.0), axis=1)
        else:
            if METHOD == 0:
                if EXACT:
                    ry = py.to(tl.float32) + 0.5 - y
                    rx = px.to(tl.float32) + 0.5 - x
                else:
                    ry = (py - tl.floor(y).to(tl.int32)).to(tl.float32)
                    rx = (px - tl.floor(x).to(tl.int32)).to(tl.float32)
                ky = tl.exp(-ry * ry * inv_two_sigma_sq)
                kx = tl.exp(-rx * rx * inv_two_sigma_sq)
                dky = 2.0 * inv_two_sigma_sq * ry * ky         # d ky / d y
                dkx = 2.0 * inv_two_sigma_sq * rx * kx
            else:
                fy = y - tl.floor(y)
                fx = x - tl.floor(x)
                ky = tl.where(oy == 0, 1.0 - fy, fy)
                kx = tl.where(ox == 0, 1.0 - fx, fx)
                dky = tl.where(oy == 0, -1.0, 1.0)
                dkx = tl.where(ox == 0, -1.0, 1.0)
            if NORMALIZED:
                g = g / (tl.load(den_ptr + pix, mask=m, other=0.0) + eps)
                coef = w_v[:, None] - raw
            else:
                coef = w_v[:, None]
            grad_w += tl.sum(g * ky * kx, axis=1) * inv_norm
            if COORD_GRAD:
                tl.store(grad_coord_ptr + qv * 2, tl.sum(g * coef * dky * kx, axis=1) * inv_norm, mask=q_mask)
                tl.store(grad_coord_ptr + qv * 2 + 1, tl.sum(g * coef * ky * dkx, axis=1) * inv_norm, mask=q_mask)
    tl.store(grad_weight_ptr + b * Q + q, grad_w, mask=q_mask)


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------
def _kernel_flags(p: SplatParams) -> dict:
    return dict(METHOD=_METHOD_ID[p.method], NORMALIZED=p.normalized, EXACT=p.exact, CLAMP=p.clamp_max is not None)


def _splat_forward_triton(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                          p: SplatParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, num_queries, views, _ = coords.shape
    shape = (batch, views, p.height, p.width)
    out = weights.new_empty(shape, dtype=torch.float32)
    raw = torch.empty_like(out)
    den = torch.empty_like(out) if p.normalized else out.new_empty(0)
    if out.numel() == 0:
        return out, raw, den
    block_p, block_q = 128, 32
    grid = (triton.cdiv(p.height * p.width, block_p), batch * views)
    wrap_triton(_splat_fwd_kernel)[grid](
        weights.contiguous(), coords.contiguous(), valid.contiguous().view(torch.uint8), out, raw, den,
        num_queries, views, p.height, p.width,
        p.threshold, p.clamp_max if p.clamp_max is not None else 0.0, p.inv_two_sigma_sq, p.inv_norm, p.fill, p.eps,
        RADIUS=p.radius, BLOCK_P=block_p, BLOCK_Q=block_q, **_kernel_flags(p))
    return out, raw, den


def _splat_backward_triton(grad_out: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                           raw: torch.Tensor, den: torch.Tensor, p: SplatParams) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_queries, views, _ = coords.shape
    grad_w = weights.new_zeros(weights.shape, dtype=torch.float32)
    grad_c = coords.new_zeros(coords.shape, dtype=torch.float32)
    if grad_w.numel() == 0 or views == 0:
        return grad_w, grad_c
    block_q = 16
    grid = (triton.cdiv(num_queries, block_q), batch)
    wrap_triton(_splat_bwd_kernel)[grid](
        weights.contiguous(), coords.contiguous(), valid.contiguous().view(torch.uint8), grad_out.contiguous(),
        raw, den, grad_w, grad_c,
        num_queries, views, p.height, p.width,
        p.threshold, p.clamp_max if p.clamp_max is not None else 0.0, p.inv_two_sigma_sq, p.inv_norm, p.eps,
        COORD_GRAD=p.coords_differentiable, WIN=p.window, FIRST=p.first,
        WIN_PAD=triton.next_power_of_2(p.window * p.window), BLOCK_Q=block_q, **_kernel_flags(p))
    return grad_w, grad_c




# ------------------------------------------------------------------------------------------------------------------
# The separable PyTorch path (what CPU tensors run)
# ------------------------------------------------------------------------------------------------------------------
class _Queries(NamedTuple):
    """Per (b, q, v): which queries are active, their sanitized coordinates and integer pixel."""
    active: torch.Tensor        # [B, Q, V] bool
    y: torch.Tensor             # [B, Q, V] float (0 where inactive)
    x: torch.Tensor
    cy: torch.Tensor            # [B, Q, V] int64 floor(y)
    cx: torch.Tensor
    map_base: torch.Tensor      # [B, 1, V] int64: flat offset of map (b, v) in [B*V*H*W]


def _queries(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, p: SplatParams) -> _Queries:
    batch, _, views, _ = coords.shape
    y, x = coords[..., 0], coords[..., 1]
    hi_y, hi_x = (p.height - 1, p.width - 1) if p.method == "bilinear" else (p.height, p.width)
    active = valid & (weights[:, :, None] >= p.threshold) & (y >= 0) & (y < hi_y) & (x >= 0) & (x < hi_x)
    y = torch.where(active, y, 0.0)
    x = torch.where(active, x, 0.0)
    dev = coords.device
    map_base = (torch.arange(batch, device=dev)[:, None, None] * views
                + torch.arange(views, device=dev)[None, None, :]) * (p.height * p.width)
    return _Queries(active, y, x, y.floor().long(), x.floor().long(), map_base)


class _Footprint(NamedTuple):
    """The T x T window of pixels each (b, q, v) touches, with separable, masked kernel factors.

    The kernel value at window pixel (i, j) is ky[i] * kx[j] * inv_norm; ky is 0 on rows outside the map and for
    inactive queries, kx on columns outside the map, so the product needs no T x T mask.
    """
    index: torch.Tensor         # [B, Q, V, T, T] flat pixel index into [B*V*H*W] (clamped into the map)
    ky: torch.Tensor            # [B, Q, V, T] row factors
    kx: torch.Tensor            # [B, Q, V, T] column factors
    dky: torch.Tensor           # [B, Q, V, T] d ky / d y
    dkx: torch.Tensor           # [B, Q, V, T] d kx / d x


def _footprint(qs: _Queries, p: SplatParams, dtype: torch.dtype) -> _Footprint:
    offsets = torch.arange(p.first, p.first + p.window, device=qs.cy.device)
    py = qs.cy[..., None] + offsets                                     # [B, Q, V, T]
    px = qs.cx[..., None] + offsets
    index = (qs.map_base[..., None, None] + py.clamp(0, p.height - 1)[..., :, None] * p.width
             + px.clamp(0, p.width - 1)[..., None, :])
    row_ok = qs.active[..., None] & (py >= 0) & (py < p.height)
    col_ok = (px >= 0) & (px < p.width)
    if p.method == "gaussian":
        if p.exact:
            ry = py.to(dtype) + 0.5 - qs.y[..., None]
            rx = px.to(dtype) + 0.5 - qs.x[..., None]
        else:
            ry = rx = offsets.to(dtype).expand(py.shape)
        ky, kx = torch.exp(-ry * ry * p.inv_two_sigma_sq), torch.exp(-rx * rx * p.inv_two_sigma_sq)
        dky, dkx = 2 * p.inv_two_sigma_sq * ry * ky, 2 * p.inv_two_sigma_sq * rx * kx
    elif p.method == "bilinear":
        first = offsets == 0
        fy = (qs.y - qs.y.floor())[..., None]
        fx = (qs.x - qs.x.floor())[..., None]
        ky, kx = torch.where(first, 1 - fy, fy), torch.where(first, 1 - fx, fx)
        dky = dkx = torch.where(first, -1.0, 1.0).to(dtype).expand(ky.shape)
    else:
        ky = kx = torch.ones(py.shape, dtype=dtype, device=py.device)
        dky = dkx = torch.zeros_like(ky)
    zero = torch.zeros((), dtype=dtype, device=py.device)
    return _Footprint(index, torch.where(row_ok, ky, zero), torch.where(col_ok, kx, zero),
                      torch.where(row_ok, dky, zero), torch.where(col_ok, dkx, zero))


def _blur(images: torch.Tensor, p: SplatParams) -> torch.Tensor:
    """Zero-padded 'same' convolution of [N, 1, H, W] images with the k x k integer-offset Gaussian times 1/Z.

    The kernel is separable (G = g g^T), so it runs as a k x 1 and a 1 x k convolution.
    """
    offsets = torch.arange(p.first, p.first + p.window, device=images.device, dtype=images.dtype)
    g = torch.exp(-offsets * offsets * p.inv_two_sigma_sq)
    rows = F.conv2d(images, g.view(1, 1, -1, 1), padding=(p.radius, 0))
    return F.conv2d(rows, g.view(1, 1, 1, -1), padding=(0, p.radius)) * p.inv_norm


def _impulses(values: torch.Tensor, qs: _Queries, p: SplatParams, shape: tuple[int, ...]) -> torch.Tensor:
    """Sum of values[b, q, v] at each active query pixel: [B*V, 1, H, W]."""
    index = qs.map_base + qs.cy * p.width + qs.cx
    flat = values.new_zeros(math.prod(shape))
    flat = flat.index_add(0, index.reshape(-1), torch.where(qs.active, values, 0.0).reshape(-1))
    return flat.view(-1, 1, p.height, p.width)


def _splat_forward_separable(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                             p: SplatParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, raw, den) as the Triton kernel computes them; differentiable by autograd."""
    acc = _accumulation_dtype(weights)
    batch, _, views, _ = coords.shape
    shape = (batch, views, p.height, p.width)
    qs = _queries(weights, coords.to(acc), valid, p)
    w = torch.where(qs.active, weights.to(acc)[:, :, None], 0.0)          # [B, Q, V]; NaN weights are inactive
    den = w.new_empty(0)
    if p.method == "gaussian" and not p.exact:
        num = _blur(_impulses(w, qs, p, shape), p).view(shape)
        if p.normalized:
            den = _blur(_impulses(torch.ones_like(w), qs, p, shape), p).view(shape)
    else:
        fp = _footprint(qs, p, acc)
        index = fp.index.reshape(-1)
        flat = w.new_zeros(math.prod(shape))
        kernel = fp.ky[..., :, None] * fp.kx[..., None, :] * p.inv_norm            # [B, Q, V, T, T]
        values = (kernel * w[..., None, None]).reshape(-1)
        if p.method == "direct":
            num = flat.scatter_reduce(0, index, values, "amax").view(shape)
        else:
            num = flat.index_add(0, index, values).view(shape)
            if p.normalized:
                den = flat.index_add(0, index, kernel.reshape(-1)).view(shape)
    raw = (num + p.fill * p.eps) / (den + p.eps) if p.normalized else num
    return _postprocess(raw, p), raw, den


def _splat_backward_separable(grad_out: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor,
                              valid: torch.Tensor, raw: torch.Tensor, den: torch.Tensor,
                              p: SplatParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weights, grad_coords) of the post-processed map, written out (the backward CPU tensors run)."""
    acc = raw.dtype
    batch, _, views, _ = coords.shape
    qs = _queries(weights, coords.to(acc), valid, p)
    w = torch.where(qs.active, weights.to(acc)[:, :, None], 0.0)
    keep = raw >= p.threshold
    if p.clamp_max is not None:
        keep = keep & (raw <= p.clamp_max)
    g = torch.where(keep, grad_out.to(acc), 0.0)
    if p.normalized:
        g = g / (den + p.eps)
    grad_c = coords.new_zeros(coords.shape, dtype=acc)
    if p.method == "gaussian" and not p.exact:
        # The kernel is symmetric, so correlating g with it gives each pixel's d(loss)/d(weight of a query there).
        field = _blur(g.reshape(-1, 1, p.height, p.width), p)
        per_query = field.reshape(-1)[qs.map_base + qs.cy * p.width + qs.cx]
        return torch.where(qs.active, per_query, 0.0).sum(-1), grad_c
    fp = _footprint(qs, p, acc)
    g = g.reshape(-1)[fp.index]                                             # [B, Q, V, T, T]
    if p.method == "direct":
        hit = (raw.reshape(-1)[fp.index] == w[..., None, None]) & (fp.ky[..., :, None] * fp.kx[..., None, :] > 0)
        return torch.where(hit, g, 0.0).sum((-1, -2, -3)), grad_c
    # Window sums with the separable kernel as matrix-vector products: g_rows[i] = sum_j g[i, j] kx[j].
    g_rows = (g @ fp.kx[..., :, None])[..., 0]
    grad_w = (g_rows * fp.ky).sum((-1, -2)) * p.inv_norm
    if p.coords_differentiable:
        if p.normalized:       # d raw / d y_q = (w_q - raw) sum G'_q / (den + eps); g already carries 1 / (den + eps)
            g = g * (w[..., None, None] - raw.reshape(-1)[fp.index])
        else:                  # d raw / d y_q = w_q sum G'_q / Z
            g = g * w[..., None, None]
        g_rows = (g @ fp.kx[..., :, None])[..., 0]
        g_cols = (fp.ky[..., None, :] @ g)[..., 0, :]                   # sum_i ky[i] g[i, j]
        grad_c = torch.stack([(g_rows * fp.dky).sum(-1), (g_cols * fp.dkx).sum(-1)], dim=-1) * p.inv_norm
    return grad_w, grad_c




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
        return _splat_forward_triton(weights, coords, valid, p)
    return _splat_forward_separable(weights, coords, valid, p)


@triton_op("aqrcmt::splat_backward", mutates_args=())
def _splat_backward_op(grad_out: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor,
                       raw: torch.Tensor, den: torch.Tensor, height: int, width: int, method: str, kernel_norm: str,
                       exact: bool, sigma: float, window: int, inv_norm: float, threshold: float,
                       clamp_max: Optional[float], fill: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weights, grad_coords) in fp32; the scalars are SplatParams.op_args()."""
    p = SplatParams(height, width, method, kernel_norm, exact, sigma, window, inv_norm, threshold, clamp_max, fill,
                    eps)
    if use_triton(weights):
        return _splat_backward_triton(grad_out, weights, coords, valid, raw, den, p)
    return _splat_backward_separable(grad_out, weights, coords, valid, raw, den, p)


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
# Public functions: splat, its separable PyTorch path, its specification
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
    _check_inputs(weights, coords, valid)
    p = SplatParams.build(height, width, method=method, kernel_norm=kernel_norm, position=position, sigma=sigma,
                          kernel_size=kernel_size, threshold=threshold, clamp_max=clamp_max, fill=fill, eps=eps)
    if validate:
        for name, t in (("weights", weights), ("coords", coords)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or inf")
    return torch.ops.aqrcmt.splat(weights, coords, valid, *p.op_args())[0]


def splat_separable(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, height: int, width: int, *,
                    sigma: float, kernel_norm: str = "sum", position: str = "floor", threshold: float = 0.01,
                    clamp_max: Optional[float] = 1.5, method: str = "gaussian", kernel_size: Optional[int] = None,
                    fill: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """The fast PyTorch path of `splat` (what `splat` runs on CPU tensors), called directly: same arguments, same
    result as `splat_ref` (the tests check it), differentiable by plain autograd (the op uses the written-out
    backward instead). Cost O(B Q V k^2 + B V H W k), no [pixels x queries] intermediate."""
    _check_inputs(weights, coords, valid)
    p = SplatParams.build(height, width, method=method, kernel_norm=kernel_norm, position=position, sigma=sigma,
                          kernel_size=kernel_size, threshold=threshold, clamp_max=clamp_max, fill=fill, eps=eps)
    return _splat_forward_separable(weights, coords, valid, p)[0]


def splat_ref(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, height: int, width: int, *,
              sigma: float, kernel_norm: str = "sum", position: str = "floor", threshold: float = 0.01,
              clamp_max: Optional[float] = 1.5, method: str = "gaussian", kernel_size: Optional[int] = None,
              fill: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """The specification of `splat`: the module docstring's formulas for every pixel and every query.

    Same arguments and result as `splat`; differentiable by autograd. Builds [B, Q, V, H, W] intermediates, so it is
    for tests and small inputs; `splat` and `splat_separable` are checked against it.
    """
    _check_inputs(weights, coords, valid)
    p = SplatParams.build(height, width, method=method, kernel_norm=kernel_norm, position=position, sigma=sigma,
                          kernel_size=kernel_size, threshold=threshold, clamp_max=clamp_max, fill=fill, eps=eps)
    acc = _accumulation_dtype(weights)
    y, x = coords.to(acc).unbind(-1)                                              # [B, Q, V]
    last_y, last_x = (height - 1, width - 1) if method == "bilinear" else (height, width)
    active = valid & (weights[:, :, None] >= threshold) & (y >= 0) & (y < last_y) & (x >= 0) & (x < last_x)
    y, x = torch.where(active, y, 0.0), torch.where(active, x, 0.0)             # NaN/inf coordinates stay out
    on_map = lambda t: t[..., None, None]                                 # [B, Q, V] -> [B, Q, V, 1, 1]  # noqa: E731
    w = torch.where(on_map(active), weights.to(acc)[:, :, None, None, None], 0.0)  # [B, Q, V, 1, 1]
    py = torch.arange(height, dtype=acc, device=weights.device)[:, None]         # pixel row / column indices
    px = torch.arange(width, dtype=acc, device=weights.device)[None, :]
    dy, dx = py - on_map(y.floor()), px - on_map(x.floor())                       # [B, Q, V, H, W] integer offsets
    if method == "gaussian":
        r = p.radius
        ry, rx = (py + 0.5 - on_map(y), px + 0.5 - on_map(x)) if p.exact else (dy, dx)
        g = torch.exp(-(ry ** 2 + rx ** 2) / (2 * sigma ** 2))
        if p.kernel_norm == "sum":
            offsets = range(-r, r + 1)
            g = g / sum(math.exp(-(i * i + j * j) / (2 * sigma ** 2)) for i in offsets for j in offsets)   # Z
        k = torch.where(on_map(active) & (dy.abs() <= r) & (dx.abs() <= r), g, 0.0)
    elif method == "bilinear":
        fy, fx = on_map(y - y.floor()), on_map(x - x.floor())
        ky = torch.where(dy == 0, 1 - fy, torch.where(dy == 1, fy, 0.0))
        kx = torch.where(dx == 0, 1 - fx, torch.where(dx == 1, fx, 0.0))
        k = torch.where(on_map(active), ky * kx, 0.0)
    else:
        hit = on_map(active) & (dy == 0) & (dx == 0)
        hits = torch.where(hit, w, 0.0)                                           # [B, Q, V, H, W]
        raw = F.pad(hits, (0, 0, 0, 0, 0, 0, 1, 0)).amax(1)    # a zero query in front: max(0, max_q w_q), Q = 0 too
        return _postprocess(raw, p)
    num = (w * k).sum(1)                                                          # [B, V, H, W]
    raw = (num + fill * eps) / (k.sum(1) + eps) if p.normalized else num
    return _postprocess(raw, p)
