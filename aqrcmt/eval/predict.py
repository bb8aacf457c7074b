"""The one prediction loop: a detector over a loader, detections back on the CPU (evaluation, robustness)."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Optional

import torch

from aqrcmt.structures import Batch, Detections, SampleMeta

BatchTransform = Callable[[Batch], Batch]
BatchVisitor = Callable[[Batch, list[Detections]], None]


def predict_dataset(detector: torch.nn.Module, loader: Iterable[Batch], device: torch.device | str = "cpu", *,
                    transform: Optional[BatchTransform] = None,
                    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                    on_batch: Optional[BatchVisitor] = None) -> list[tuple[SampleMeta, Detections]]:
    """``(meta, detections)`` per sample of `loader`, in loader order; boxes and scores as float32 on the CPU.

    transform: applied to each collated batch before it moves to `device` (e.g. a sensor drop);
    autocast: a factory of the mixed-precision context the forward runs in (e.g. ``accelerator.autocast``);
    on_batch: called after each forward with the (transformed, CPU) batch and its CPU detections (pictures).
    The detector runs in eval mode under ``torch.no_grad`` (not inference_mode: the training loop evaluates
    mid-run and trains on) and is put back in its previous mode.
    """
    was_training = detector.training
    detector.eval()
    out: list[tuple[SampleMeta, Detections]] = []
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
    finally:
        detector.train(was_training)
    return out
