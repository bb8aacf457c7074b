"""The main job on the embedded default: synthetic benchmark -> tiny AQR-CMT on CPU -> official metric on held-out scenes.

    python train/demo.py [--out runs/demo] [--root data/synthetic_benchmark] [--steps 1100] [--processes P]
                         [--threads N] [--set key=value ...]

1. writes the synthetic benchmark (``presets.MAIN_JOB_BENCHMARK``) in the devkit's format (skipped when it is
   already there): 30 scenes of 8 key frames, 20 train scenes and 10 val scenes that training never sees,
2. trains the `tiny_aqr_recommended` config (recommended AQR settings) on the train scenes for
   ``presets.MAIN_JOB_STEPS`` steps (`--steps 3600` is the longer run of docs/training.md); with two idle cores
   in two processes of one thread each (``accelerate launch train/main.py``, batch 1 per process, the same global
   batch of 2), since one process with two intra-op threads steps much slower on 2 cores (docs/benchmark.md);
   in one process with ModalMask3D (``--set data.augment.modality_drop=true``), which needs two samples per process,
3. evaluates it with the official nuScenes DetectionEval on the val scenes,
4. prints val mAP/NDS and where the safetensors checkpoint, the metrics and the TensorBoard logs are (the result
   measured on a 2-core CPU machine is in docs/benchmark.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil

from aqrcmt.atomic import atomic_write_bytes
from aqrcmt.data.synthetic import make_synthetic_nuscenes
from aqrcmt.presets import MAIN_JOB_BENCHMARK, MAIN_JOB_STEPS, load_config
from aqrcmt.training.checkpointing import resolve_resume, stored_metrics
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
    p.add_argument("--processes", type=int, default=0, choices=(0, 1, 2),
                   help="training processes sharing the global batch of 2 (0: two when two cores are idle, else one)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads per process (0: the idle cores divided among the processes, measured "
                        "at start; more threads than free cores make a step several times slower)")
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
    cores = idle_cores()
    overrides = [f"data.root={root}", f"data.version={MAIN_JOB_BENCHMARK.version}", "data.train_split=train",
                 "data.val_split=val", f"train.max_steps={args.steps}", "train.epochs=1000",
                 "train.eval_every_epochs=0", f"train.output_dir={args.out}"]
    cfg = load_config(args.config, overrides + args.set)   # a bad override is refused before anything is written
    needed = cfg.min_batch_per_process()
    processes = args.processes or max(1, min(2, cores, cfg.data.batch_size // needed))
    threads = args.threads or max(1, cores // processes)
    if cfg.data.batch_size % processes:
        raise CommandError(f"--processes {processes}: data.batch_size={cfg.data.batch_size} does not split evenly "
                           "among the processes")
    if cfg.data.batch_size // processes < needed:
        raise CommandError(f"--processes {processes}: data.batch_size={cfg.data.batch_size} leaves "
                           f"{cfg.data.batch_size // processes} sample per process; ModalMask3D "
                           f"(data.augment.modality_drop) needs {needed} (a LiDAR-dropped sample is one voxel)")
    if processes > 1:                  # losses normalised over the global batch, as in one process
        overrides.append("model.head.sync_loss_normalizers=true")
        cfg = load_config(args.config, overrides + args.set)
    if not (root / MAIN_JOB_BENCHMARK.version / "sample.json").is_file():
        print(f"[1/3] writing the synthetic benchmark to {root}")
        make_synthetic_nuscenes(root, **asdict(MAIN_JOB_BENCHMARK))
    else:
        print(f"[1/3] using the synthetic benchmark in {root}")

    from aqrcmt.eval.nuscenes_eval import format_metrics
    print(f"[2/3] training config '{cfg.name}' for {cfg.train.max_steps} steps on the train scenes, {processes} "
          f"process(es) x {threads} intra-op thread(s) ({os.cpu_count()} cores, {cores} idle; --processes, --threads)")
    if processes == 1:
        import torch
        from aqrcmt.training.loop import TrainOptions, train
        torch.set_num_threads(threads)
        result = train(cfg, TrainOptions(overwrite=True))   # a rerun of the demo replaces (moves aside) the last one
        run_dir, last_checkpoint, metrics = result.run_dir, result.last_checkpoint, result.metrics
    else:
        run_dir = Path(args.out)
        last_checkpoint = launch_training(args.config, overrides + args.set, run_dir, processes, threads,
                                          batch_per_process=cfg.data.batch_size // processes)
        metrics = stored_metrics(last_checkpoint)
    print("[3/3] official nuScenes evaluation on the held-out val scenes:")
    print(format_metrics(metrics))
    print("the result of this job measured on a 2-core CPU machine, for comparison: docs/benchmark.md")

    summary = {"data": str(root), "run_dir": str(run_dir),
               "checkpoint": str(last_checkpoint / "model.safetensors"),
               "metrics": str(last_checkpoint / "metrics.json"),
               "val": {k: metrics[k] for k in ("mAP", "NDS")},
               "minutes": round((time.perf_counter() - start) / 60, 1)}
    atomic_write_bytes(run_dir / "demo_summary.json", json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))
    print(f"TensorBoard: tensorboard --logdir {run_dir}")
    return 0


def launch_training(config: str, overrides: list[str], run_dir: Path, processes: int, threads: int,
                    batch_per_process: int) -> Path:
    """``accelerate launch`` of train/main.py in `processes` CPU processes (gloo) of `threads` threads each;
    returns the run's last checkpoint directory. A failed run raises a CommandError (its output is above)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(Path(__file__).with_name("main.py")), "--config", config,
               "--out", str(run_dir), "--overwrite", "--set", *overrides, f"data.batch_size={batch_per_process}"]
    code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode
    if code != 0:
        raise CommandError(f"training in {processes} processes failed (exit code {code}); its output is above")
    last = resolve_resume(run_dir, "latest")
    if last is None or stored_metrics(last) is None:
        raise CommandError(f"{run_dir}: the training run left no evaluated checkpoint")
    return last


def free_port() -> int:
    """A TCP port free on this machine now (for the processes' rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def idle_cores() -> int:
    """Cores not busy with other work now (at least 1): the core count minus the cores' use over one second
    (not the load average, which still counts a job that ended a minute ago)."""
    cores = os.cpu_count() or 1
    return max(1, cores - round(psutil.cpu_percent(interval=1.0) / 100 * cores))


if __name__ == "__main__":
    sys.exit(main())
