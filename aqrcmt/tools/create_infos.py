"""``aqrcmt create-infos``: write mmdet3d/CMT-style ``nuscenes_infos_*.pkl`` files from a nuScenes root."""
from __future__ import annotations

import argparse
from pathlib import Path

from aqrcmt.data.index import CONVERTER_MAX_SWEEPS, write_info_pkl
from aqrcmt.data.splits import VERSIONS
from aqrcmt.tools.options import add_out_option, add_root_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_root_option(parser, help="nuScenes root (holds v1.0-*/, samples/, sweeps/)", required=True)
    parser.add_argument("--version", default="v1.0-trainval", choices=VERSIONS, help="nuScenes version")
    parser.add_argument("--splits", nargs="+", default=None,
                        help="official splits to write (default: train val, mini_train mini_val, or test)")
    add_out_option(parser, "folder of the pkl files (default: the root)", aliases=("--out-dir",))
    parser.add_argument("--max-sweeps", type=int, default=CONVERTER_MAX_SWEEPS,
                        help="LiDAR sweeps listed per sample (as mmdet3d's converter)")


def run(args: argparse.Namespace) -> int:
    splits = args.splits or {"v1.0-trainval": ["train", "val"], "v1.0-mini": ["mini_train", "mini_val"],
                             "v1.0-test": ["test"]}[args.version]
    out_dir = Path(args.out or args.root)
    for split in splits:
        name = split.removeprefix("mini_")   # mmdet3d names the mini infos nuscenes_infos_{train,val}.pkl too
        path = write_info_pkl(args.root, args.version, split, out_dir / f"nuscenes_infos_{name}.pkl", args.max_sweeps)
        print(f"wrote {path}")
    return 0
