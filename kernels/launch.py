"""`Launch`: one kernel launch as its launcher prepares it, so that the same record runs the kernel on a device and
compiles it ahead of time for a GPU that is not there (kernels/aot.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.library import wrap_triton

# The launch configurations are chosen for at least this share of an SM's warp slots (theoretical occupancy); the
# ahead-of-time check turns it into each architecture's register budget and fails a kernel above it.
TARGET_OCCUPANCY = 0.5


@dataclass(frozen=True)
class Launch:
    """A Triton kernel, its grid, its runtime arguments (tensors and scalars, in order), its constexprs, its warps
    and the occupancy its configuration assumes (a fraction of the SM's warp slots)."""
    kernel: Any                                      # triton JITFunction (InterpretedFunction under the interpreter)
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    occupancy: float = TARGET_OCCUPANCY

    def __call__(self) -> None:
        """Run the kernel (through torch.library.wrap_triton, so torch.compile traces it)."""
        wrap_triton(self.kernel)[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)
