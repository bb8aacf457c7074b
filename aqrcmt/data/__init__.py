"""Data: the nuScenes splits, index, dataset and loaders, transforms, GT paste, sampling, collation into a
:class:`aqrcmt.structures.Batch`.

Names are imported on first use, so ``import aqrcmt.data.synthetic`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "collate": "aqrcmt.data.collate",
    "BadSampleError": "aqrcmt.data.files",
    "DatasetError": "aqrcmt.data.files",
    "NuScenesDataset": "aqrcmt.data.dataset",
    "load_info_pkl": "aqrcmt.data.index",
    "load_or_build_infos": "aqrcmt.data.index",
    "write_info_pkl": "aqrcmt.data.index",
    "EpochDataLoader": "aqrcmt.data.loader",
    "build_dataloader": "aqrcmt.data.loader",
    "build_dataset": "aqrcmt.data.loader",
    "ShardedSampler": "aqrcmt.data.sampler",
    "cbgs_indices": "aqrcmt.data.sampler",
    "Pipeline": "aqrcmt.data.transforms",
    "Sample": "aqrcmt.data.transforms",
    "GTPaster": "aqrcmt.data.gt_paste",
    "build_gt_database": "aqrcmt.data.gt_database",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aqrcmt.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
