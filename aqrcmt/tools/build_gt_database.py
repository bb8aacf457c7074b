"""``aqrcmt build-gt-database``: the GT-paste object database of a split (see :mod:`aqrcmt.data.gt_database`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from aqrcmt.data.files import read_pickle
from aqrcmt.data.gt_database import build_gt_database, default_database
from aqrcmt.data.loader import build_dataset
from aqrcmt.presets import load_config
from aqrcmt.tools.options import add_out_option, add_root_option, add_set_option, config_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="cmt_voxel0075_vov_1600x640_cbgs",
                        help="preset name or config .json (its data.* settings: root, version, sweeps)")
    add_root_option(parser)
    parser.add_argument("--version", default=None, help="nuScenes version (default: the config's data.version)")
    parser.add_argument("--split", default=None, help="split to read (default: the config's data.train_split)")
    add_out_option(parser, "output folder (default: <root>/aqrcmt_gt_database); an existing database there is "
                   "replaced once the new one is complete")
    add_set_option(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, config_overrides(args))   # data.load_images=false: points only, no image crops
    split = args.split or cfg.data.train_split
    out = Path(args.out) if args.out else default_database(cfg.data.root).parent
    path = build_gt_database(build_dataset(cfg, split, train=False), out)
    counts = {k: len(v) for k, v in read_pickle(path, "GT database")["objects"].items()}
    print(f"wrote {path}: {sum(counts.values())} objects {counts}")
    if path == default_database(cfg.data.root):
        print(f"the presets that paste GT (the released ones) find it there with --root {cfg.data.root}")
    else:
        print(f"use it with: --set data.augment.gt_paste=true data.augment.gt_paste_database={path}")
    return 0
