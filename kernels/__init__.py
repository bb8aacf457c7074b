"""Triton kernels for AQR: splatting query weights onto maps and fused feature modulation.

Each op is a `torch.library` custom op (`torch.ops.aqrcmt.*`): CUDA tensors run the Triton kernels, CPU tensors run
the fast PyTorch paths (`splat_separable`, the factored modulation), and `torch.compile(fullgraph=True)` traces
through both without a graph break. `splat_ref` / `modulate_ref` are the specifications, evaluated literally.
"""
from .dispatch import force_triton, use_triton
from .modulate import ModulationStats, modulate, modulate_ref, modulation_scale
from .splat import SplatParams, gaussian_kernel_size, splat, splat_ref, splat_separable

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
