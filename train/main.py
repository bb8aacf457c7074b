"""Train (and evaluate) AQR-CMT: ``aqrcmt train`` as a script, for ``accelerate launch train/main.py ...``.

    accelerate launch train/main.py --config cmt_aqr_recommended_voxel0075_vov_1600x640_cbgs \
        --load-from cmt_vov.safetensors --root /data/nuscenes --set optim.lr=1e-4
    python train/main.py --config tiny          # one process, plain Python

The options are those of ``aqrcmt train --help`` (:mod:`aqrcmt.tools.train`).
"""
from __future__ import annotations

import argparse
import sys

from aqrcmt.tools import train as train_command
from aqrcmt.tools.errors import add_debug_flag, run_command
from aqrcmt.tools.options import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=train_command.__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    train_command.add_arguments(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: train_command.run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
