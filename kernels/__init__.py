"""Triton kernels for AQR: splatting query weights onto maps and fused feature modulation.

Each op is a `torch.library` custom op (`torch.ops.aqrcmt.*`): CUDA tensors run the Triton kernels, CPU tensors run
the PyTorch references, and `torch.compile(fullgraph=True)` traces through both without a graph break.
"""
from .dispatch import force_triton, use_triton
from .modulate import ModulationStats, modulate, modulate_reference, modulation_scale
from .splat import gaussian_kernel_size, splat, splat_reference

__all__ = [
    "ModulationStats",
    "force_triton",
    "gaussian_kernel_size",
    "modulate",
    "modulate_reference",
    "modulation_scale",
    "splat",
    "splat_reference",
    "use_triton",
]
