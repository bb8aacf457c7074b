"""The tiny training step of this tree against another revision's, in one run on one machine.

    python bench/step_speedup.py --base 9fe5196 --out bench/results/step_speedup_cpu.md [--config tiny_aqr_recommended]
                                 [--set model.head.local_attention_sigmas=3]

Checks `--base` out into a temporary git worktree and times the same training step (loss forward + backward + clip
+ AdamW on collated batches of the synthetic nuScenes, data loading excluded, one intra-op thread) with each tree's
`aqrcmt` in a fresh process, alternating base / this tree for `--rounds` rounds so that a change in the machine's
load reaches both; the ratio of the medians is the speed-up. The worker uses only the API both trees share
(load_config, build_dataloader, build_model, LossModel, freeze_and_build_optimizer).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def time_steps(root: str, config: str, steps: int, overrides: list[str]) -> list[float]:
    """Seconds per step of `steps` training steps (after one warm-up step) with the importable `aqrcmt`."""
    import torch

    from aqrcmt.data import build_dataloader
    from aqrcmt.models import build_model
    from aqrcmt.presets import load_config
    from aqrcmt.training.loop import LossModel
    from aqrcmt.training.optim import freeze_and_build_optimizer

    torch.set_num_threads(1)
    cfg = load_config(config, [f"data.root={root}", "data.version=v1.0-mini", *overrides])
    loader = iter(build_dataloader(cfg, cfg.data.train_split, train=True))
    batches = [next(loader) for _ in range(steps + 1)]
    torch.manual_seed(0)
    detector = build_model(cfg.model).train()
    optimizer = freeze_and_build_optimizer(detector, cfg.optim)
    model = LossModel(detector)
    times = []
    for batch in batches:
        start = time.perf_counter()
        sum(model(batch).losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(detector.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]


def run_worker(tree: Path, root: str, config: str, steps: int, overrides: list[str]) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--worker", "--root", root, "--config", config, "--steps", str(steps)]
    out = subprocess.run(command + [f"--set={item}" for item in overrides], env=env, cwd=tree, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"error: the step worker in {tree} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="git revision to compare against (required unless --worker)")
    p.add_argument("--config", default="tiny_aqr_recommended", help="preset to train (the main job's)")
    p.add_argument("--root", help="synthetic nuScenes (v1.0-mini); written to a temporary folder when absent")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--out", help="markdown file to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for this tree only (an option the base may not have)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(time_steps(args.root, args.config, args.steps, args.set)))
        return 0
    if not args.base:
        p.error("--base is required")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            from aqrcmt.data.synthetic import make_synthetic_nuscenes

            root = str(make_synthetic_nuscenes(Path(scratch) / "data", version="v1.0-mini"))
        base_tree = Path(scratch) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base],
                       check=True, capture_output=True)
        try:
            times: dict[str, list[float]] = {"base": [], "this tree": []}
            for _ in range(args.rounds):
                for name, tree, overrides in (("base", base_tree, []), ("this tree", REPO, args.set)):
                    times[name] += run_worker(tree, root, args.config, args.steps, overrides)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    unwritten = [f":!{Path(args.out).resolve().relative_to(REPO)}"] if args.out else []     # this file itself
    dirty = " (with uncommitted changes)" if subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--",
                                                            ".", *unwritten]).returncode else ""
    sets = "".join(f" --set {item}" for item in args.set)
    lines = [f"# Tiny training step: {head}{dirty}{sets} against {args.base}", "",
             f"`python bench/step_speedup.py --base {args.base} --config {args.config} --rounds {args.rounds} "
             f"--steps {args.steps}{sets}`; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"one intra-op thread, {time.strftime('%Y-%m-%d')}; load average at the end "
             f"{os.getloadavg()[0]:.2f}. Alternating fresh processes, {args.rounds} x {args.steps} timed steps each.",
             "", "| tree | median s/step | min | max |", "|---|---|---|---|"]
    lines += [f"| {name} | {median[name]:.3f} | {min(values):.3f} | {max(values):.3f} |"
              for name, values in times.items()]
    lines += ["", f"**Speed-up (base median / this tree's median): {median['base'] / median['this tree']:.2f}x**"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from aqrcmt.atomic import atomic_write_bytes

        atomic_write_bytes(Path(args.out), text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
