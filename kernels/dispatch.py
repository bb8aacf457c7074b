"""Which implementation runs: the Triton kernels or their PyTorch paths.

CUDA tensors run the Triton kernels. CPU tensors run the PyTorch paths, unless the Triton path is forced
(``force_triton()`` or the environment variable ``AQRCMT_FORCE_TRITON=1``), which only works under Triton's CPU
interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported). The tests use this to run every kernel on CPU.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

FORCE_ENV = "AQRCMT_FORCE_TRITON"
_forced: bool = False


def triton_forced() -> bool:
    """True when the Triton path is forced on CPU tensors (context manager or environment variable)."""
    return _forced or os.environ.get(FORCE_ENV, "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Decide the implementation for a call whose inputs live on `tensor`'s device and have its dtype.

    float64 always runs the PyTorch path (the kernels compute in fp32; float64 is for gradcheck).
    """
    if tensor.dtype == torch.float64:
        return False
    if tensor.device.type == "cuda":
        return True
    if tensor.device.type == "cpu" and triton_forced():
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"the Triton path was forced on a CPU tensor ({FORCE_ENV}=1 or force_triton()), which needs "
                "TRITON_INTERPRET=1 in the environment before triton is imported"
            )
        return True
    return False


@contextlib.contextmanager
def force_triton(enabled: bool = True) -> Iterator[None]:
    """Within the block, CPU tensors run the Triton kernels through the interpreter (tests only)."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous
