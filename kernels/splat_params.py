"""The options of one `splat` call, checked once and turned into the constants both fast paths use.

`SplatParams.build` validates the options (ValueError naming the argument) and derives the footprint width and the
Gaussian normaliser 1/Z; `check_splat_inputs` validates the tensors. The Triton path (splat_triton.py) and the
separable PyTorch path (splat_cpu.py) read their constants from here; the specification (splat_ref.py) does not.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

METHODS = ("gaussian", "bilinear", "direct")
KERNEL_NORMS = ("sum", "peak", "normalized")
POSITIONS = ("floor", "exact")


def gaussian_kernel_size(sigma: float) -> int:
    """The original renderer's window width: int(6 sigma + 1), made odd (sigma 2 -> 13, sigma 1 -> 7)."""
    size = int(6 * sigma + 1)
    return size + 1 if size % 2 == 0 else size


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


def check_splat_inputs(weights: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor) -> None:
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


def accumulation_dtype(weights: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 weights, float64 for float64 (gradcheck)."""
    return torch.promote_types(weights.dtype, torch.float32)
