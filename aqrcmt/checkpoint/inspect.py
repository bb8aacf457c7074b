"""A checkpoint's training summary (config, step, metrics) and its keys, shapes and dtypes, grouped by module,
with totals (``aqrcmt inspect FILE|DIR``).

Works on any :class:`~aqrcmt.checkpoint.convert.SourceCheckpoint`: aqrcmt safetensors files and official / mmcv
``.pth`` checkpoints alike.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Optional

import torch

from aqrcmt.checkpoint.convert import SourceCheckpoint

_METADATA_WIDTH = 100
SUMMARY_KEYS = ("config", "step", "epoch")   # the metadata a training run stores, shown by format_summary
_SUMMARY_METRICS = ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE")


def group_name(key: str, depth: int) -> str:
    """The first `depth` dotted components of `key` (its module at that depth)."""
    return ".".join(key.split(".")[:depth])


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def format_listing(checkpoint: SourceCheckpoint, depth: int = 1, keys: bool = True) -> str:
    """Per-module blocks (``module: keys, elements, bytes`` then one line per key), then the totals."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in checkpoint.tensors:
        groups[group_name(key, depth)].append(key)
    lines = []
    for module, members in groups.items():
        numel = sum(checkpoint.tensors[k].numel() for k in members)
        size = sum(_nbytes(checkpoint.tensors[k]) for k in members)
        lines.append(f"{module}: {len(members)} keys, {numel:,} elements, {size:,} bytes")
        if keys:
            for key in members:
                tensor = checkpoint.tensors[key]
                dtype = str(tensor.dtype).removeprefix("torch.")
                lines.append(f"  {key:<90} {str(list(tensor.shape)):<22} {dtype}")
    dtypes: dict[str, int] = defaultdict(int)
    for tensor in checkpoint.tensors.values():
        dtypes[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
    total_numel = sum(dtypes.values())
    total_bytes = sum(_nbytes(t) for t in checkpoint.tensors.values())
    by_dtype = ", ".join(f"{name} {count:,}" for name, count in sorted(dtypes.items()))
    lines.append(f"total: {len(checkpoint.tensors)} keys in {len(groups)} modules, {total_numel:,} elements "
                 f"({by_dtype}), {total_bytes:,} bytes")
    return "\n".join(lines)


def format_summary(meta: dict[str, Any], metrics: Optional[dict[str, Any]]) -> str:
    """What a training run stored: the config's name, step and epoch, and the checkpoint's metrics.json (the
    official mAP, NDS and the five TP errors). Empty for a checkpoint that stores none of them."""
    lines = []
    if "config" in meta:
        name = json.loads(meta["config"]).get("name") or "a config .json"
        lines.append(f"config: {name} (stored in full: evaluate / predict need no --config)")
    if "step" in meta:
        lines.append(f"step {meta['step']}" + (f", epoch {meta['epoch']}" if "epoch" in meta else ""))
    if metrics is not None:
        lines.append("metrics.json: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in _SUMMARY_METRICS if k in metrics))
    return "\n".join(lines)


def format_metadata(checkpoint: SourceCheckpoint, skip: tuple[str, ...] = ()) -> str:
    """The other metadata entries, one line each, long values cut at 100 characters."""
    lines = []
    for name, value in checkpoint.meta.items():
        if name in skip:
            continue
        text = " ".join(str(value).split())
        if len(text) > _METADATA_WIDTH:
            text = text[:_METADATA_WIDTH] + f"... ({len(text)} chars)"
        lines.append(f"  {name}: {text}")
    if checkpoint.module_versions is not None:
        versions = sorted(set(checkpoint.module_versions.values()))
        lines.append(f"  state_dict _metadata: {len(checkpoint.module_versions)} modules, versions {versions}")
    return "\n".join(lines)
