"""``aqrcmt convert``: an official CMT checkpoint (.pth) -> aqrcmt safetensors, and back with ``--reverse``.

The conversion and its checks are :func:`aqrcmt.checkpoint.convert.convert`; ``python -m aqrcmt.convert`` runs
:func:`main`, the same command without the ``aqrcmt`` dispatcher.

    aqrcmt convert voxel0075_vov_1600x640_epoch20.pth cmt_vov.safetensors --config cmt_voxel0075_vov_1600x640_cbgs
    aqrcmt convert cmt_vov.safetensors back.pth --config cmt_voxel0075_vov_1600x640_cbgs --reverse
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aqrcmt.checkpoint.convert import convert, summary
from aqrcmt.tools.errors import add_debug_flag, run_command
from aqrcmt.tools.options import (HelpFormatter, add_key_pattern_options, add_root_option, add_set_option,
                                  config_overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="official checkpoint (.pth), or with --reverse an aqrcmt .safetensors")
    parser.add_argument("dst", type=Path, help="output: .safetensors, or with --reverse an mmdet3d .pth")
    parser.add_argument("--config", required=True, help="aqrcmt preset name or config .json of the model")
    add_set_option(parser)
    add_root_option(parser, help="nuScenes root stored with the converted config, so that evaluate and predict "
                                 "need no --root (default: the config's data.root)")
    parser.add_argument("--reverse", action="store_true",
                        help="aqrcmt -> official: write {'meta', 'state_dict'} for the original code")
    add_key_pattern_options(parser, "the source")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle arbitrary objects (old checkpoints' metadata); only for trusted files")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")


def run(args: argparse.Namespace) -> int:
    result = convert(args.src, args.dst, args.config, overrides=config_overrides(args), reverse=args.reverse,
                     unsafe_load=args.unsafe_load, allow_missing=args.allow_missing,
                     allow_unexpected=args.allow_unexpected, overwrite=args.overwrite)
    print(summary(result))
    print(f"wrote {args.dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aqrcmt.convert", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: run(args), debug=args.debug)
