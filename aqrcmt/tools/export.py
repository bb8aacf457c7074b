"""``aqrcmt export``: the dense part of a checkpoint's detector as a torch.export program and/or an ONNX model.

    aqrcmt export --checkpoint runs/tiny/best --out exported/tiny --format both
    aqrcmt predict --engine onnx --model exported/tiny --root data/synthetic_nuscenes --out preds

writes OUT/model.pt2 and/or OUT/model.onnx, OUT/lidar_front_end.safetensors (the LiDAR front end stays outside
the graph) and OUT/manifest.json; the folder is assembled beside OUT and renamed at the end (docs/deployment.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aqrcmt.tools.checkpoint_options import add_config_arguments, load_checkpoint
from aqrcmt.tools.errors import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from aqrcmt.export.bundle import FORMATS

    parser.add_argument("--checkpoint", required=True, help="aqrcmt weights: a .safetensors file or a checkpoint dir")
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--format", choices=FORMATS, default="both", help="torch (ExportedProgram), onnx or both")
    parser.set_defaults(device="cpu")


def run(args: argparse.Namespace) -> int:
    from aqrcmt.export.bundle import require_export_extra, write_export

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandError(f"--out {out} exists and is not an empty folder; choose another or remove it")
    if args.format != "torch":
        require_export_extra()
    detector, cfg, weights = load_checkpoint(args.checkpoint, args)
    manifest = write_export(cfg, detector, weights, out, fmt=args.format)
    files = ", ".join(manifest["files"].values())
    print(f"exported {weights} ({args.format}, fp32) to {out}: {files}, manifest.json")
    return 0
