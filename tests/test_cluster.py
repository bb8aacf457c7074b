"""Runs shaped like a cluster's, on this machine: a 2-process run whose main process evaluates for longer than
``train.collective_timeout_minutes``, and a 2-node launch (``accelerate launch --num_machines 2``, one CPU process
per "node", both on one run directory) that trains, checkpoints, takes a SIGTERM and resumes.

The runs use the `tiny` config with key-frame points only, small images and few queries.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from aqrcmt.training import checkpointing as ckpt
from aqrcmt.training.run_dir import RunLock

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "train" / "main.py"
SMALL = ["data.sweeps=1", "model.camera.image_size=(64,160)", "model.head.num_query=32", "train.tracker=none",
         "train.eval_every_epochs=0", "train.keep_last=0", "data.batch_size=1"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--mixed_precision", "no", "--dynamo_backend", "no"]

# train/main.py with the devkit evaluation made slow on the main process (the only one that runs it)
SLOW_EVALUATION = """
import runpy, sys, time
import aqrcmt.eval.nuscenes_eval as nuscenes_eval

evaluate_detections = nuscenes_eval.evaluate_detections

def slow_evaluate_detections(*args, **kwargs):
    print("slow evaluation: sleeping", flush=True)
    time.sleep({seconds})
    return evaluate_detections(*args, **kwargs)

nuscenes_eval.evaluate_detections = slow_evaluate_detections
sys.argv[0] = {main!r}
runpy.run_path({main!r}, run_name="__main__")
"""


def _args(root: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", "tiny", "--no-compile", "--set", f"data.root={root}", f"train.output_dir={run}", *SMALL,
            *extra]


def _start(launcher: list[str], script: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*launcher, str(script), *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(rank: int, port: int) -> list[str]:
    """The launcher of "node" `rank` of 2, one process each (what every node of a real job runs, with its rank)."""
    return [*LAUNCH, "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port)]


@pytest.fixture
def launches():
    """The launchers a test started; after it, any still running is killed with its workers (a failed test
    leaves no training process behind)."""
    started: list[subprocess.Popen] = []
    yield started
    for launcher in started:
        if launcher.poll() is None:
            for process in [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]:
                process.kill()
            launcher.communicate()


def _workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "main.py" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_the_other_process_waits_for_an_evaluation_longer_than_the_collective_timeout(synthetic_root, tmp_path,
                                                                                     launches):
    """A 15 s process-group timeout, a 40 s evaluation on the main process: the run finishes with its metrics."""
    script = tmp_path / "slow_evaluation_main.py"
    script.write_text(SLOW_EVALUATION.format(seconds=40, main=str(MAIN)))
    run = tmp_path / "run"
    proc = _start([*LAUNCH, "--num_machines", "1"], script,
                  _args(synthetic_root, run, "train.max_steps=2", "train.collective_timeout_minutes=0.25"))
    launches.append(proc)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "slow evaluation: sleeping" in stdout and re.search(r"^mAP \d\.\d{4}  NDS \d\.\d{4}$", stdout, re.M)
    assert (run / "checkpoints" / ckpt.checkpoint_name(2) / "metrics.json").is_file()


@pytest.mark.slow
def test_two_nodes_on_one_run_directory_train_checkpoint_stop_on_sigterm_and_resume(synthetic_root, tmp_path,
                                                                                    launches):
    """Two launchers (machine rank 0 and 1, one process each) on the same run directory, as on a shared file
    system: the lock is held on the node of the main process only; SIGTERM to both launchers (what scancel
    does) stops the run with one checkpoint of both processes; the same two launches with --resume auto finish it."""
    run = tmp_path / "run"
    args = _args(synthetic_root, run, "train.max_steps=5", "train.checkpoint_every_steps=1")
    port = _free_port()
    nodes = [_start(_node(rank, port), MAIN, args) for rank in (0, 1)]
    launches += nodes
    first = run / "checkpoints" / ckpt.checkpoint_name(1)
    end = time.monotonic() + 600
    while not first.exists():
        assert all(node.poll() is None for node in nodes), [node.communicate()[1][-3000:] for node in nodes]
        assert time.monotonic() < end, f"{first} did not appear"
        time.sleep(0.1)
    workers = [w for node in nodes for w in _workers(node)]
    assert sorted(w.environ()["RANK"] for w in workers) == ["0", "1"]
    main = next(w for w in workers if w.environ()["RANK"] == "0")
    assert json.loads(RunLock.path_for(run).read_text())["pid"] == main.pid    # held by the main process only
    for node in nodes:
        node.send_signal(signal.SIGTERM)
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [128 + signal.SIGTERM] * 2     # each launcher: its signal
    stderr = "\n".join(err for _, err in outputs)
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("interrupted by SIGTERM")]
    saved = ckpt.resolve_resume(run, "latest")
    assert str(saved) in line and int(saved.name[5:]) < 5
    assert ckpt.verify_checkpoint(saved)["num_processes"] == 2
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert not RunLock.path_for(run).exists()      # released by the main process

    port = _free_port()
    resumed = [_start(_node(rank, port), MAIN, [*args, "--resume", "auto"]) for rank in (0, 1)]
    launches += resumed
    outputs = [node.communicate(timeout=300) for node in resumed]
    assert [node.returncode for node in resumed] == [0, 0], [err[-3000:] for _, err in outputs]
    assert f"resumed from {saved}" in outputs[0][0]
    assert ckpt.resolve_resume(run, "latest").name == ckpt.checkpoint_name(5)
