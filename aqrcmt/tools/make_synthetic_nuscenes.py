"""``aqrcmt make-synthetic-nuscenes``: write a small synthetic nuScenes (see :mod:`aqrcmt.data.synthetic`)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from aqrcmt.atomic import Leftover, prune_dead_leftovers
from aqrcmt.data.splits import TRAIN_VAL_SPLITS
from aqrcmt.data.synthetic import DEFAULT_IMAGE_SIZE, ConditionShares, make_synthetic_nuscenes
from aqrcmt.data.synthetic.world import CONDITIONS
from aqrcmt.tools.errors import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True,
                        help="root directory to write (created if missing; an existing non-empty one is refused)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder (the new root is written beside it, then swapped in)")
    parser.add_argument("--version", default="v1.0-mini", choices=sorted(TRAIN_VAL_SPLITS),
                        help="nuScenes version to imitate (its official split names)")
    parser.add_argument("--scenes", type=int, default=3,
                        help="total scenes; a third (>= 1) go to val (at most 10 for v1.0-mini)")
    parser.add_argument("--samples-per-scene", type=int, default=6, help="key frames per scene (>= 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes' random draws")
    parser.add_argument("--image-size", type=int, nargs=2, default=list(DEFAULT_IMAGE_SIZE), metavar=("W", "H"),
                        help="camera image size; 1600 900 is the real one")
    defaults = ConditionShares()
    for name in CONDITIONS:
        parser.add_argument(f"--{name}-share", type=float, default=getattr(defaults, name), metavar="P",
                            help=f"share of {name} scenes, in [0, 1] (drawn per scene, independently of the other "
                                 "conditions; the first scene of each split stays clear)")


def _names(leftovers: list[Leftover]) -> str:
    return ", ".join(f"{leftover.path.name} ({leftover.writer()})" for leftover in leftovers)


def run(args: argparse.Namespace) -> int:
    out = Path(os.path.abspath(args.out))
    removed, kept = prune_dead_leftovers(out.parent, out.name)   # what killed runs left beside --out
    if removed:
        print(f"removed {len(removed)} leftover(s) beside {out} of killed runs: {_names(removed)}")
    if kept:
        print(f"kept {len(kept)} leftover(s) beside {out} of runs that still run or whose writer cannot be "
              f"checked from here: {_names(kept)}")
    try:
        root = make_synthetic_nuscenes(args.out, version=args.version, scenes=args.scenes,
                                       samples_per_scene=args.samples_per_scene, seed=args.seed,
                                       image_size=tuple(args.image_size), overwrite=args.overwrite,
                                       conditions=ConditionShares(args.night_share, args.rain_share, args.fog_share))
    except ValueError as error:   # the generator's checks of --version, --scenes, ... (raised before writing)
        raise CommandError(str(error)) from error
    print(f"wrote a synthetic nuScenes ({args.version}, {args.scenes} scenes x {args.samples_per_scene} samples) "
          f"to {root}")
    return 0
