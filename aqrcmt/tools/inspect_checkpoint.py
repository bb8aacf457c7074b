"""``aqrcmt inspect FILE``: a checkpoint's keys, shapes and dtypes, grouped by module, with totals.

Reads aqrcmt safetensors files and official / mmcv ``.pth`` checkpoints alike (tensors only, unless
``--unsafe-load``); the listing is :func:`aqrcmt.checkpoint.inspect.format_listing`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aqrcmt.checkpoint.convert import read_checkpoint
from aqrcmt.checkpoint.inspect import format_listing, format_metadata
from aqrcmt.checkpoint.io import is_safetensors
from aqrcmt.tools.errors import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="checkpoint: .safetensors or .pth (mmcv dict or plain state dict)")
    parser.add_argument("--depth", type=int, default=1, help="group keys by their first DEPTH name components")
    parser.add_argument("--summary", action="store_true", help="per-module totals only, no per-key lines")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle arbitrary objects (old checkpoints' metadata); only for trusted files")


def run(args: argparse.Namespace) -> int:
    if args.depth < 1:
        raise CommandError(f"--depth must be >= 1, got {args.depth}")
    checkpoint = read_checkpoint(args.file, args.unsafe_load)
    kind = "safetensors" if is_safetensors(args.file) else "torch pickle"
    print(f"{args.file} ({kind})")
    metadata = format_metadata(checkpoint)
    if metadata:
        print("metadata:\n" + metadata)
    print(format_listing(checkpoint, args.depth, keys=not args.summary))
    return 0
