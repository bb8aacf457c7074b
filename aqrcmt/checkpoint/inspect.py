"""``aqrcmt inspect FILE``: a checkpoint's keys, shapes and dtypes, grouped by module, with totals.

Reads aqrcmt safetensors files and official / mmcv ``.pth`` checkpoints alike (tensors only, unless
``--unsafe-load``).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from aqrcmt.checkpoint.convert import SourceCheckpoint, read_checkpoint
from aqrcmt.checkpoint.io import CheckpointError, is_safetensors

_METADATA_WIDTH = 100


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


def format_metadata(checkpoint: SourceCheckpoint) -> str:
    lines = []
    for name, value in checkpoint.meta.items():
        text = " ".join(str(value).split())
        if len(text) > _METADATA_WIDTH:
            text = text[:_METADATA_WIDTH] + f"... ({len(text)} chars)"
        lines.append(f"  {name}: {text}")
    if checkpoint.module_versions is not None:
        versions = sorted(set(checkpoint.module_versions.values()))
        lines.append(f"  state_dict _metadata: {len(checkpoint.module_versions)} modules, versions {versions}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="checkpoint: .safetensors or .pth (mmcv dict or plain state dict)")
    parser.add_argument("--depth", type=int, default=1, help="group keys by their first DEPTH name components")
    parser.add_argument("--summary", action="store_true", help="per-module totals only, no per-key lines")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle arbitrary objects (old checkpoints' metadata); only for trusted files")


def run(args: argparse.Namespace) -> int:
    if args.depth < 1:
        print(f"aqrcmt inspect: error: --depth must be >= 1, got {args.depth}", file=sys.stderr)
        return 2
    try:
        checkpoint = read_checkpoint(args.file, args.unsafe_load)
    except CheckpointError as e:
        print(f"aqrcmt inspect: error: {e}", file=sys.stderr)
        return 1
    kind = "safetensors" if is_safetensors(args.file) else "torch pickle"
    print(f"{args.file} ({kind})")
    metadata = format_metadata(checkpoint)
    if metadata:
        print("metadata:\n" + metadata)
    print(format_listing(checkpoint, args.depth, keys=not args.summary))
    return 0
