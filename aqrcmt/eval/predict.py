"""The one prediction loop: a detector over a loader, detections back on the CPU (evaluation, robustness)."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Iterable, Optional

import torch
from tqdm.auto import tqdm

from aqrcmt.structures import Batch, Detections, SampleMeta

BatchTransform = Callable[[Batch], Batch]
BatchVisitor = Callable[[Batch, list[Detections]], None]


def predict_dataset(detector: torch.nn.Module, loader: Iterable[Batch], device: torch.device | str = "cpu", *,
                    transform: Optional[BatchTransform] = None,
                    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                    on_batch: Optional[BatchVisitor] = None,
                    progress: Optional[str] = None) -> list[tuple[SampleMeta, Detections]]:
    """``(meta, detections)`` per sample of `loader`, in loader order; boxes and scores as float32 on the CPU.

    transform: applied to each collated batch before it moves to `device` (e.g. a sensor drop);
    autocast: a factory of the mixed-precision context the forward runs in (e.g. ``accelerator.autocast``);
    on_batch: called after each forward with the (transformed, CPU) batch and its CPU detections (pictures);
    progress: what is predicted (e.g. "evaluate val: clean"): a bar of samples done out of the loader's on a
    terminal, and one line at the end (the only one in a log file).
    The detector runs in eval mode under ``torch.no_grad`` (not inference_mode: the training loop evaluates
    mid-run and trains on) and is put back in its previous mode.
    """
    was_training = detector.training
    detector.eval()
    out: list[tuple[SampleMeta, Detections]] = []
    total = _sample_count(loader)
    bar = None if progress is None else tqdm(total=total, desc=progress, unit="sample", dynamic_ncols=True,
                                             leave=False, disable=None)   # disable=None: off without a TTY
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for batch in loader:
                if transform is not None:
                    batch = transform(batch)
                with autocast():
                    detections = detector.predict(batch.to(device))
                found = [Detections(d.boxes.float().cpu(), d.scores.float().cpu(), d.labels.cpu()) for d in detections]
                if on_batch is not None:
                    on_batch(batch, found)
                out += list(zip(batch.metas, found))
                if bar is not None:
                    bar.update(len(found))
    finally:
        detector.train(was_training)
        if bar is not None:
            bar.close()
    if progress is not None:
        tqdm.write(f"{progress}: {len(out)}{'' if total is None else f'/{total}'} samples predicted in "
                   f"{time.perf_counter() - start:.1f} s")
    return out


def _sample_count(loader: Iterable[Batch]) -> Optional[int]:
    """The samples `loader` serves (its sampler's length: this process's shard), None when it cannot tell."""
    sampler = getattr(loader, "sampler", None)
    return len(sampler) if sampler is not None and hasattr(sampler, "__len__") else None
