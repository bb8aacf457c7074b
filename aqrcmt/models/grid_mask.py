"""GridMask augmentation of the camera images (training only), as configured in the released CMT models.

One mask per call, shared by every image and channel of the (N, C, H, W) batch. With probability `prob`:
period d ~ U{2, ..., H-1}, stripe width l = min(max(int(ratio * d + 0.5), 1), d - 1), offsets
(s_y, s_x) ~ U{0, ..., d-1}. On a (int(1.5 H), int(1.5 W)) canvas the rows s_y + k d + [0, l) and the
columns s_x + k d + [0, l) for k < canvas_size // d are stripes; the released mode 1 keeps the stripes and
zeroes the (d - l) x (d - l) blocks between them, so about ((d - l) / d)^2 of the pixels are zeroed. The
centre H x W crop of the canvas multiplies the images. (The released config's rotation is randint(1) = 0
degrees and offset=False, so neither appears here.)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def stripe_indicator(length: int, canvas: int, period: int, width: int, shift: int, device: torch.device) -> Tensor:
    """(length,) bool: which positions of the centre `length`-crop of a `canvas` line lie on a stripe."""
    start = (canvas - length) // 2
    position = torch.arange(start, start + length, device=device) - shift
    return (position >= 0) & (position % period < width) & (position // period < canvas // period)


def grid_mask_pattern(height: int, width: int, period: int, stripe_width: int, shift_y: int, shift_x: int,
                      device: torch.device = torch.device("cpu")) -> Tensor:
    """(height, width) float mask: 1 on the row/column stripes (kept), 0 in the blocks between them (zeroed)."""
    if not 0 < stripe_width < period:
        raise ValueError(f"grid mask needs 0 < stripe_width < period, got {stripe_width} and {period}")
    rows = stripe_indicator(height, int(1.5 * height), period, stripe_width, shift_y, device)
    cols = stripe_indicator(width, int(1.5 * width), period, stripe_width, shift_x, device)
    return (rows[:, None] | cols[None, :]).float()


class GridMask(nn.Module):
    """x (N, C, H, W) -> x * mask in training (with probability `prob`); identity in eval mode.

    Randomness comes from `generator` (a CPU torch.Generator) or the global torch RNG, so runs are
    reproducible under `torch.manual_seed`.
    """

    def __init__(self, prob: float = 0.7, ratio: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"GridMask prob must be in [0, 1], got {prob}")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"GridMask ratio must be in (0, 1), got {ratio}")
        self.prob = prob
        self.ratio = ratio

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"GridMask expects images (N, C, H, W), got shape {tuple(x.shape)}")
        if not self.training or torch.rand((), generator=generator).item() > self.prob:
            return x
        height, width = x.shape[2:]
        if height < 3:
            raise ValueError(f"GridMask needs image height >= 3, got {height}")
        period = int(torch.randint(2, height, (), generator=generator))
        stripe_width = min(max(int(period * self.ratio + 0.5), 1), period - 1)
        shift_y, shift_x = (int(v) for v in torch.randint(period, (2,), generator=generator))
        mask = grid_mask_pattern(height, width, period, stripe_width, shift_y, shift_x, x.device)
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, ratio={self.ratio}"
