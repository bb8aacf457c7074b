"""Batching: a list of transformed samples -> :class:`aqrcmt.structures.Batch`.

Point clouds and GT sets keep their own lengths (lists of tensors); images and projection matrices are
stacked. Runs inside the DataLoader workers, so the batch crosses processes as shared-memory tensors.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from aqrcmt.data.transforms import Sample
from aqrcmt.structures import Batch, SampleMeta, SensorStates


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack B samples (all with images at one size, or all without) into a Batch."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    with_images = [s.images is not None for s in samples]
    if any(with_images) != all(with_images):
        raise ValueError("collate: some samples have images and some do not "
                         f"({[s.token for s, w in zip(samples, with_images) if not w]} lack them)")
    images = lidar2img = None
    img_shape = (0, 0)
    if all(with_images):
        shapes = {s.images.shape for s in samples}
        if len(shapes) != 1 or samples[0].images.ndim != 4 or samples[0].images.shape[1] != 3:
            raise ValueError(f"collate: images must be normalised (6, 3, H, W) arrays of one shape, got {shapes}")
        images = torch.from_numpy(np.stack([s.images for s in samples]))
        lidar2img = torch.from_numpy(np.stack([s.lidar2img for s in samples]))
        img_shape = tuple(samples[0].images.shape[2:])
    return Batch(
        points=[torch.from_numpy(np.ascontiguousarray(s.points, dtype=np.float32)) for s in samples],
        images=images,
        lidar2img=lidar2img,
        img_shape=img_shape,
        gt_boxes=[torch.from_numpy(s.gt_boxes.astype(np.float32).reshape(-1, 9)) for s in samples],
        gt_labels=[torch.from_numpy(s.gt_labels.astype(np.int64)) for s in samples],
        metas=[SampleMeta(sample_token=s.token, lidar2global=torch.from_numpy(s.lidar2global.astype(np.float64)),
                          timestamp=s.timestamp, scene_name=s.scene_name) for s in samples],
        sensors=SensorStates.stack([s.sensors for s in samples]),
    )
