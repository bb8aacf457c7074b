"""`modulate_ref`, the specification of `modulate`: its definition (kernels/modulate.py, docs/kernels.md) written out.

The mixed map m, the scale and the statistics are derived here from the definition, sharing nothing with the op's
paths (not even `modulation_scale`) but the argument checks and the result type, so the tests that compare
`modulate` with it check the mixing rule and the statistics too.
"""
from __future__ import annotations

from typing import Union

import torch

from .modulate import ModulationStats, check_modulate_inputs


def modulate_ref(x: torch.Tensor, w: torch.Tensor, *, alpha: float = 1.0, beta: float = 0.0,
                 mode: str = "element_wise", return_stats: bool = False
                 ) -> Union[torch.Tensor, tuple[torch.Tensor, ModulationStats]]:
    """out = x * (alpha * m + beta), m from `mode`; the statistics as direct sums over out and x.

    x [N, C, H, W], w [N, H, W]. Same arguments and result as `modulate` (statistics in the computing dtype: fp32,
    float64 for float64 inputs); differentiable by autograd.
    """
    check_modulate_inputs(x, w, mode)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    wf = w.to(torch.promote_types(w.dtype, torch.float32))
    map_mean = wf.mean(dim=(1, 2), keepdim=True)                   # [N, 1, 1] mean_hw(w[n])
    if mode == "element_wise":
        m = wf
    elif mode == "channel_wise":
        m = map_mean.expand_as(wf)
    else:                                                          # "adaptive"
        m = 0.7 * wf + 0.3 * map_mean
    out = xf * (alpha * m + beta)[:, None]                         # broadcast over the channels
    if not return_stats:
        return out.to(x.dtype)
    stats = ModulationStats((out - xf).abs().sum(), xf.abs().sum(), out.sum(), (out * out).sum())
    return out.to(x.dtype), ModulationStats(*(s.detach() for s in stats))
