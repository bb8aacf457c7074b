"""``aqrcmt check-data``: read every sample of a split once, before training, and list the bad ones.

Each sample is loaded as training would load it (LiDAR key frame and sweeps, the six images decoded strictly),
in parallel worker processes; a bad sample is listed with its file and reason. Exit status 0 when every sample
loads, 1 when some do not, 2 when the index itself is refused (one ``error:`` line naming sample, record, field).
"""
from __future__ import annotations

import argparse
import os
import time

from tqdm.auto import tqdm

from aqrcmt.config import Config
from aqrcmt.data.dataset import check_samples
from aqrcmt.data.loader import build_dataset
from aqrcmt.data.splits import VERSIONS
from aqrcmt.tools.errors import CommandError
from aqrcmt.tools.options import add_root_option

EXIT_BAD_SAMPLES = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_root_option(parser, help="nuScenes root (holds v1.0-*/, samples/, sweeps/)", required=True)
    parser.add_argument("--version", default="v1.0-trainval", choices=VERSIONS, help="nuScenes version")
    parser.add_argument("--split", nargs="+", required=True, help="splits to check (official or of splits.json)")
    parser.add_argument("--info-pkl", help="read the split's samples from this mmdet3d info .pkl (one --split)")
    parser.add_argument("--sweeps", type=int, default=Config().data.sweeps,
                        help="LiDAR frames per sample, key frame included (default: %(default)s, as training)")
    parser.add_argument("--no-images", action="store_true", help="check the LiDAR files only")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="loader processes (default: %(default)s; 0 loads in this process)")


def run(args: argparse.Namespace) -> int:
    if args.workers < 0 or args.sweeps < 1:
        raise CommandError(f"--workers must be >= 0 and --sweeps >= 1, got {args.workers} and {args.sweeps}")
    if args.info_pkl and len(args.split) > 1:
        raise CommandError("--info-pkl holds one split: give one --split")
    bad_total = 0
    for split in args.split:
        cfg = Config()
        cfg.data.root, cfg.data.version, cfg.data.sweeps = args.root, args.version, args.sweeps
        cfg.data.load_images = not args.no_images
        cfg.data.val_split, cfg.data.info_pkl_val = split, args.info_pkl
        dataset = build_dataset(cfg.validate(), split, train=False)
        start, bad = time.perf_counter(), []
        for token, reason in tqdm(check_samples(dataset, args.workers), total=len(dataset), desc=split,
                                  unit="sample", dynamic_ncols=True):
            if reason is not None:
                bad.append(reason)
                tqdm.write(f"bad: {reason}")
        print(f"{split}: {len(dataset)} samples checked in {time.perf_counter() - start:.1f} s, {len(bad)} bad")
        bad_total += len(bad)
    return EXIT_BAD_SAMPLES if bad_total else 0
