"""The `aqrcmt` command: one sub-command per task, each a module of :mod:`aqrcmt.tools`.

Each module listed in COMMANDS exposes ``add_arguments(parser)`` and ``run(args) -> int``; expected errors of
every sub-command end as one ``error: ...`` line and exit status 2 (:mod:`aqrcmt.tools.errors`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from aqrcmt.tools.errors import add_debug_flag, run_command

COMMANDS: dict[str, tuple[str, str]] = {
    "make-synthetic-nuscenes": ("aqrcmt.tools.make_synthetic_nuscenes",
                                "write a small synthetic nuScenes in the devkit's format"),
    "build-gt-database": ("aqrcmt.tools.build_gt_database", "build the GT-paste object database from a nuScenes root"),
    "create-infos": ("aqrcmt.tools.create_infos",
                     "write mmdet3d/CMT-style nuscenes_infos_*.pkl from a nuScenes root"),
    "evaluate": ("aqrcmt.tools.evaluate", "official nuScenes detection metrics for a results file or a checkpoint"),
    "convert": ("aqrcmt.tools.convert_checkpoint",
                "convert an official CMT .pth checkpoint to safetensors (and back)"),
    "inspect": ("aqrcmt.tools.inspect_checkpoint", "list a checkpoint's keys, shapes and dtypes by module"),
    "predict": ("aqrcmt.tools.predict", "detections (results JSON) and BEV/camera/AQR pictures of a checkpoint"),
    "diagnose": ("aqrcmt.tools.diagnose", "AQR rendering/modulation health table, sweeps and map images"),
    "export": ("aqrcmt.tools.export", "the dense part of a checkpoint's detector as torch.export and ONNX graphs"),
    "study": ("aqrcmt.tools.study", "the AQR fine-tuning study: a pretrained CMT fine-tuned with each AQR setting"),
    "check-data": ("aqrcmt.tools.check_data", "load every sample of a split once and list the bad ones (file, reason)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="aqrcmt", description=__doc__.splitlines()[0])
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen sub-command's module is imported (torch/devkit imports are slow).
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_debug_flag(p, default=argparse.SUPPRESS)   # `aqrcmt evaluate --debug` as `aqrcmt --debug evaluate`
        if name == chosen:
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    return run_command(lambda: importlib.import_module(COMMANDS[args.command][0]).run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
