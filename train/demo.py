"""The main job on the embedded default: synthetic benchmark -> tiny AQR-CMT on CPU -> official metric on held-out scenes.

    python train/demo.py [--out runs/demo] [--root data/synthetic_benchmark] [--steps 1100] [--threads N]
                         [--set key=value ...]

1. writes the synthetic benchmark (``presets.MAIN_JOB_BENCHMARK``) in the devkit's format (skipped when it is
   already there): 30 scenes of 8 key frames, 20 train scenes and 10 val scenes that training never sees,
2. trains the `tiny_aqr_recommended` config (recommended AQR settings) on the train scenes for
   ``presets.MAIN_JOB_STEPS`` steps (`--steps 3600` is the longer run of docs/training.md),
3. evaluates it with the official nuScenes DetectionEval on the val scenes,
4. prints val mAP/NDS and where the safetensors checkpoint, the metrics and the TensorBoard logs are (the result
   measured on a 2-core CPU machine is in docs/benchmark.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from aqrcmt.atomic import atomic_write_bytes
from aqrcmt.data.synthetic import make_synthetic_nuscenes
from aqrcmt.presets import MAIN_JOB_BENCHMARK, MAIN_JOB_STEPS, load_config
from aqrcmt.tools.errors import CommandError, add_debug_flag, run_command
from aqrcmt.tools.options import HelpFormatter, add_option, add_set_option


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/demo",
                   help="run directory (an earlier demo run there is renamed to <out>.replaced-<time>)")
    add_option(p, "--root", aliases=("--data",), default="data/synthetic_benchmark",
               help="where the synthetic benchmark is (written there when absent)")
    p.add_argument("--config", default="tiny_aqr_recommended", help="preset to train (see `aqrcmt configs`)")
    p.add_argument("--steps", type=int, default=MAIN_JOB_STEPS,
                   help="training steps, the length of the learning-rate schedule")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads (0: one per core left idle by other work, from the load average at "
                        "start; more threads than free cores make a step several times slower)")
    add_set_option(p)
    add_debug_flag(p)
    args = p.parse_args(argv)
    return run_command(lambda: demo(args), debug=args.debug)


def demo(args: argparse.Namespace) -> int:
    """Steps 1-4 of the module docstring for the parsed `args`."""
    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 0:
        raise CommandError(f"--threads must be >= 0, got {args.threads}")
    start = time.perf_counter()
    root = Path(args.root)
    cfg = load_config(args.config, [f"data.root={root}", f"data.version={MAIN_JOB_BENCHMARK.version}",
                                    "data.train_split=train", "data.val_split=val", f"train.max_steps={args.steps}",
                                    "train.epochs=1000", "train.eval_every_epochs=0", f"train.output_dir={args.out}",
                                    *args.set])      # a bad override is refused before anything is written
    if not (root / MAIN_JOB_BENCHMARK.version / "sample.json").is_file():
        print(f"[1/3] writing the synthetic benchmark to {root}")
        make_synthetic_nuscenes(root, **asdict(MAIN_JOB_BENCHMARK))
    else:
        print(f"[1/3] using the synthetic benchmark in {root}")

    from aqrcmt.eval.nuscenes_eval import format_metrics
    from aqrcmt.training.loop import TrainOptions, train

    import torch

    threads = args.threads or idle_cores()
    torch.set_num_threads(threads)
    print(f"[2/3] training config '{cfg.name}' for {cfg.train.max_steps} steps on the train scenes, "
          f"{threads} intra-op thread(s) ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; --threads)")
    result = train(cfg, TrainOptions(overwrite=True))   # a rerun of the demo replaces (moves aside) the last one
    print("[3/3] official nuScenes evaluation on the held-out val scenes:")
    print(format_metrics(result.metrics))
    print("the result of this job measured on a 2-core CPU machine, for comparison: docs/benchmark.md")

    summary = {"data": str(root), "run_dir": str(result.run_dir),
               "checkpoint": str(result.last_checkpoint / "model.safetensors"),
               "metrics": str(result.last_checkpoint / "metrics.json"),
               "val": {k: result.metrics[k] for k in ("mAP", "NDS")},
               "minutes": round((time.perf_counter() - start) / 60, 1)}
    atomic_write_bytes(result.run_dir / "demo_summary.json", json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))
    print(f"TensorBoard: tensorboard --logdir {result.run_dir}")
    return 0


def idle_cores() -> int:
    """Cores not busy with other work now (at least 1): the core count minus the 1-minute load average."""
    return max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0]))


if __name__ == "__main__":
    sys.exit(main())
