"""``aqrcmt inspect FILE|DIR``: what a training run stored with a checkpoint (config, step, metrics), then its
keys, shapes and dtypes, grouped by module, with totals.

Reads aqrcmt safetensors files, checkpoint directories (their ``model.safetensors`` and ``metrics.json``) and
official / mmcv ``.pth`` checkpoints (tensors only, unless ``--unsafe-load``); the listing is
:func:`aqrcmt.checkpoint.inspect.format_listing`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aqrcmt.checkpoint.convert import read_checkpoint
from aqrcmt.checkpoint.inspect import SUMMARY_KEYS, format_listing, format_metadata, format_summary
from aqrcmt.checkpoint.io import is_safetensors
from aqrcmt.checkpoint.weights import weights_file
from aqrcmt.training.checkpointing import stored_metrics
from aqrcmt.tools.errors import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="checkpoint: a checkpoint directory (holding model.safetensors), "
                        "a .safetensors file or a .pth (mmcv dict or plain state dict)")
    parser.add_argument("--depth", type=int, default=1, help="group keys by their first DEPTH name components")
    parser.add_argument("--summary", action="store_true", help="per-module totals only, no per-key lines")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle arbitrary objects (old checkpoints' metadata); only for trusted files")


def run(args: argparse.Namespace) -> int:
    if args.depth < 1:
        raise CommandError(f"--depth must be >= 1, got {args.depth}")
    path = weights_file(args.file) if args.file.is_dir() else args.file
    checkpoint = read_checkpoint(path, args.unsafe_load)
    kind = "safetensors" if is_safetensors(path) else "torch pickle"
    print(f"{path} ({kind})")
    summary = format_summary(checkpoint.meta, stored_metrics(path.parent) if kind == "safetensors" else None)
    if summary:
        print(summary)
    metadata = format_metadata(checkpoint, skip=SUMMARY_KEYS if summary else ())
    if metadata:
        print("metadata:\n" + metadata)
    print(format_listing(checkpoint, args.depth, keys=not args.summary))
    return 0
