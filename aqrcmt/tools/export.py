"""``aqrcmt export``: the dense part of a checkpoint's detector as a torch.export program and/or an ONNX model.

    aqrcmt export --checkpoint runs/tiny/best --out exported/tiny --format both [--precision fp16]
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
    from aqrcmt.export.precision import PRECISIONS

    parser.add_argument("--checkpoint", required=True, help="aqrcmt weights: a .safetensors file or a checkpoint dir")
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--format", choices=FORMATS, default="both", help="torch (ExportedProgram), onnx or both")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp16: the convolutional backbones and necks in float16, the rest in float32")
    parser.set_defaults(device="cpu")


def cpu_fp16_note(out: Path, manifest: dict) -> str:
    """What an fp16 export means on a machine without CUDA (printed by :func:`run`)."""
    from aqrcmt.export.runtime import cpu_float16_fallbacks

    note = "note: no CUDA GPU here; fp16 pays off on a GPU (onnxruntime's CUDA provider, TensorRT)"
    if "onnx" in manifest["files"]:
        fallbacks = cpu_float16_fallbacks(out / manifest["files"]["onnx"])
        if fallbacks:
            note += (f"; onnxruntime's CPU provider has no float16 kernel for {', '.join(fallbacks)} and runs "
                     "them in float32 between casts")
    return note


def run(args: argparse.Namespace) -> int:
    import torch

    from aqrcmt.export.bundle import require_export_extra, write_export

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandError(f"--out {out} exists and is not an empty folder; choose another or remove it")
    if args.format != "torch":
        require_export_extra()
    detector, cfg, weights = load_checkpoint(args.checkpoint, args)
    manifest = write_export(cfg, detector, weights, out, fmt=args.format, precision=args.precision)
    files = ", ".join(manifest["files"].values())
    difference = manifest["precision"]["max_abs_difference_vs_eager_fp32"]
    print(f"exported {weights} ({args.format}, {args.precision}) to {out}: {files}, manifest.json; against eager "
          f"fp32 on a synthetic sample: scores {difference['scores']:.1e}, boxes {difference['boxes']:.1e}")
    if args.precision == "fp16" and not torch.cuda.is_available():
        print(cpu_fp16_note(out, manifest))
    return 0
