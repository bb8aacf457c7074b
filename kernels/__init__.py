"""Triton kernels for AQR: splatting query weights onto maps and fused feature modulation.

Each op is a `torch.library` custom op (`torch.ops.aqrcmt.*`): CUDA tensors run the Triton kernels, CPU tensors run
the fast PyTorch paths (`splat_separable`, the factored modulation), and `torch.compile(fullgraph=True)` traces
through both without a graph break. `splat_ref` / `modulate_ref` are the specifications, written out apart from the
fast paths.
"""
from .dispatch import force_triton, use_triton
from .modulate import ModulationStats, modulate, modulation_scale
from .modulate_ref import modulate_ref
from .splat import splat
from .splat_cpu import splat_separable
from .splat_params import SplatParams, gaussian_kernel_size
from .splat_ref import splat_ref

__all__ = [
    "ModulationStats",
    "SplatParams",
    "force_triton",
    "gaussian_kernel_size",
    "modulate",
    "modulate_ref",
    "modulation_scale",
    "splat",
    "splat_ref",
    "splat_separable",
    "use_triton",
]
