"""The `aqrcmt` command: one sub-command per task, each a module of :mod:`aqrcmt.tools`.

Each module listed in COMMANDS exposes ``add_arguments(parser)`` and ``run(args) -> int``; expected errors of
every sub-command end as one ``error: ...`` line and exit status 2 (:mod:`aqrcmt.tools.errors`). Several
processes: ``accelerate launch [...] -m aqrcmt.cli train ...``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from aqrcmt.tools.errors import add_debug_flag, run_command
from aqrcmt.tools.options import HelpFormatter

DESCRIPTION = ("AQR-CMT camera+LiDAR 3D detection on nuScenes: train, evaluate, predict, convert and inspect "
               "checkpoints. `aqrcmt COMMAND --help` lists a command's options.")
COMMANDS: dict[str, tuple[str, str]] = {
    "configs": ("aqrcmt.tools.configs", "list the presets, one line each, or print one preset's whole config"),
    "train": ("aqrcmt.tools.train", "train (and evaluate) a config; resume a run; fine-tune converted weights"),
    "evaluate": ("aqrcmt.tools.evaluate", "official nuScenes detection metrics for a results file or a checkpoint"),
    "predict": ("aqrcmt.tools.predict", "detections (results JSON) and BEV/camera/AQR pictures of a checkpoint"),
    "make-synthetic-nuscenes": ("aqrcmt.tools.make_synthetic_nuscenes",
                                "write a small synthetic nuScenes in the devkit's format"),
    "create-infos": ("aqrcmt.tools.create_infos",
                     "write mmdet3d/CMT-style nuscenes_infos_*.pkl from a nuScenes root"),
    "build-gt-database": ("aqrcmt.tools.build_gt_database", "build the GT-paste object database from a nuScenes root"),
    "convert": ("aqrcmt.tools.convert_checkpoint",
                "convert an official CMT .pth checkpoint to safetensors (and back)"),
    "inspect": ("aqrcmt.tools.inspect_checkpoint",
                "a checkpoint's config, step and metrics, and its keys, shapes and dtypes by module"),
    "diagnose": ("aqrcmt.tools.diagnose", "AQR rendering/modulation health table, sweeps and map images"),
    "export": ("aqrcmt.tools.export", "the dense part of a checkpoint's detector as torch.export and ONNX graphs"),
    "study": ("aqrcmt.tools.study", "the AQR fine-tuning study: a pretrained CMT fine-tuned with each AQR setting"),
    "check-data": ("aqrcmt.tools.check_data", "load every sample of a split once and list the bad ones (file, reason)"),
}


def version_line() -> str:
    """``aqrcmt X (torch Y, Python Z)`` from the installed distributions (nothing heavy imported)."""
    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"aqrcmt {installed('aqrcmt')} (torch {installed('torch')}, Python {sys.version.split()[0]})"


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    """The dispatcher; only the `chosen` sub-command's module is imported (torch/devkit imports are slow)."""
    parser = argparse.ArgumentParser(prog="aqrcmt", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print the versions of aqrcmt, torch and Python and exit")
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                           formatter_class=HelpFormatter)
        add_debug_flag(p, default=argparse.SUPPRESS)   # `aqrcmt evaluate --debug` as `aqrcmt --debug evaluate`
        if name == chosen:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(next((a for a in argv if a in COMMANDS), None)).parse_args(argv)
    return run_command(lambda: importlib.import_module(COMMANDS[args.command][0]).run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
