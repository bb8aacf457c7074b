"""Timing one call on a device, and the device measurements around it (peak memory, autocast, dynamo graphs)."""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .plan import DTYPES


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Milliseconds per call: warm-up calls untimed, then `iters` timed calls, each ended by a device sync."""
    median_ms: float
    min_ms: float
    warmup: int
    iters: int


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int,
            deadline: Optional[float] = None) -> Timing:
    """CUDA: events around each call + event sync; CPU: perf_counter. Stops early (>= 1 timed call) past deadline."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if deadline is not None and time.monotonic() > deadline:
            break
    return Timing(statistics.median(times), min(times), warmup, len(times))


def autocast(device: torch.device, precision: str):
    return nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=DTYPES[precision])


def peak_memory_mib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])
