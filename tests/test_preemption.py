"""Preemption and requeueing: signals stop a run with a checkpoint (1 and 2 processes), a second signal aborts,
time-based checkpoints, ``--resume`` / ``--resume auto`` of a run killed before its first checkpoint, one job per
run directory, resumes with another process count refused with nothing written.

The runs use the `tiny` config with key-frame points only, small images and few queries (6 steps per epoch).
"""
from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from aqrcmt.presets import load_config
from aqrcmt.training import checkpointing as ckpt
from aqrcmt.training import run_dir as run_dirs
from aqrcmt.training.interrupt import EXIT_INTERRUPTED, REPEAT_GRACE_S, TrainingInterrupted
from aqrcmt.training.loop import TrainOptions, train
from aqrcmt.training.run_dir import RunDirectoryError, RunLock

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.sweeps=1", "model.camera.image_size=(64,160)", "model.head.num_query=32", "train.tracker=none",
         "train.eval_every_epochs=0", "train.keep_last=0"]
TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"train.output_dir={out}", *SMALL, *extra]


def _start(launcher: list[str], args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, str(REPO / "train" / "main.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.1)


def _tree(root: Path) -> dict[str, str]:
    """Every file (relative path -> sha256) and directory under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def test_a_repeated_signal_within_the_grace_counts_once_and_a_later_one_aborts():
    script = f"""
import os, signal, time
from aqrcmt.training.interrupt import stop_requests
with stop_requests() as requests:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)      # a launcher forwarding the signal: the same request
    assert requests.signum == signal.SIGINT
    print("still running", flush=True)
    time.sleep({REPEAT_GRACE_S} + 0.2)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
print("not aborted")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout.splitlines() == ["still running"]
    assert len(_lines(proc.stderr, "SIGINT received")) == 1
    assert _lines(proc.stderr, "second signal (SIGTERM): aborting without a checkpoint")


def test_sigusr1_in_process_stops_after_the_step_with_a_checkpoint_and_resume_continues(synthetic_root, tmp_path):
    run = tmp_path / "run"
    overrides = _overrides(synthetic_root, run, "data.batch_size=2", "train.max_steps=5",
                           "train.checkpoint_every_steps=1")

    def signal_after_the_first_checkpoint() -> None:
        while not (run / "checkpoints" / ckpt.checkpoint_name(1)).exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=signal_after_the_first_checkpoint, daemon=True).start()
    with pytest.raises(TrainingInterrupted, match="interrupted by SIGUSR1 after step") as stopped:
        train(load_config("tiny", overrides), TrainOptions())
    assert stopped.value.checkpoint == ckpt.resolve_resume(run, "latest")
    assert stopped.value.exit_code == EXIT_INTERRUPTED
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL       # the handlers are restored
    assert train(load_config("tiny", overrides), TrainOptions(resume="auto")).progress.step == 5


@pytest.mark.slow
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_printed_command_resumes(synthetic_root, tmp_path):
    """One process: exit status 75, one line naming the checkpoint and the command, which continues the run."""
    run = tmp_path / "run"
    args = ["--config", "tiny", "--no-compile", "--set",
            *_overrides(synthetic_root, run, "data.batch_size=2", "train.max_steps=5",
                        "train.checkpoint_every_steps=1")]
    proc = _start([sys.executable], args)
    _wait_for(run / "checkpoints" / ckpt.checkpoint_name(1), proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    [line] = _lines(stderr, "interrupted by SIGTERM")
    saved = ckpt.resolve_resume(run, "latest")
    assert f"after step {int(saved.name[5:])}: checkpoint {saved}; continue with: python " in line
    assert line.endswith(f"--resume {saved}") and int(saved.name[5:]) < 5
    ckpt.verify_checkpoint(saved)

    before = _tree(run)     # 1 -> 2 processes: refused on every process before anything is written
    refused = _start(TWO_PROCESSES, [*args, "--resume", "auto"])
    stderr = refused.communicate(timeout=600)[1]
    assert refused.returncode != 0 and _tree(run) == before
    errors = set(_lines(stderr, "error: "))
    assert len(errors) == 1 and "written by 1 process(es) (effective batch 2); this run has 2 (effective batch 4)" \
        in errors.pop()

    command = shlex.split(line.split("continue with: ")[1])
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved}" in resumed.stdout
    assert ckpt.resolve_resume(run, "latest").name == ckpt.checkpoint_name(5)


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_and_resume_auto_continues(synthetic_root, tmp_path):
    """SIGUSR1 to rank 1 only: both processes stop at the same step, one checkpoint, one line; the launcher and
    its workers end (no hang), and ``--resume auto`` continues the run with 2 processes."""
    run = tmp_path / "run"
    args = ["--config", "tiny", "--no-compile", "--set",
            *_overrides(synthetic_root, run, "data.batch_size=1", "train.max_steps=5",
                        "train.checkpoint_every_steps=1")]
    proc = _start(TWO_PROCESSES, args)
    _wait_for(run / "checkpoints" / ckpt.checkpoint_name(1), proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "main.py" in " ".join(p.cmdline())]
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0
    [line] = _lines(stderr, "interrupted by SIGUSR1")
    saved = ckpt.resolve_resume(run, "latest")
    assert str(saved) in line and "accelerate launch <the same launch options>" in line
    assert ckpt.verify_checkpoint(saved)["num_processes"] == 2
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)

    before = _tree(run)     # 2 -> 1 process: refused before anything is written
    with pytest.raises(RunDirectoryError, match=r"written by 2 process\(es\) \(effective batch 2\); this run has 1 "
                                                r"\(effective batch 1\).*--load-from"):
        train(load_config("tiny", args[args.index("--set") + 1:]), TrainOptions(resume="auto"))
    assert _tree(run) == before

    resumed = _start(TWO_PROCESSES, [*args, "--resume", "auto"])
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resumed from {saved}" in stdout
    assert ckpt.resolve_resume(run, "latest").name == ckpt.checkpoint_name(5)


def test_checkpoint_every_minutes_saves_after_each_step_that_passes_it(synthetic_root, tmp_path):
    cfg = load_config("tiny", _overrides(synthetic_root, tmp_path / "run", "data.batch_size=2", "train.max_steps=3",
                                         "train.checkpoint_every_minutes=1e-6"))
    train(cfg, TrainOptions())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == \
        [ckpt.checkpoint_name(s) for s in (1, 2, 3)]


def test_resume_of_a_run_killed_before_its_first_checkpoint_and_resume_auto(synthetic_root, tmp_path, capsys):
    """config.json without checkpoints/: --resume starts from step 0 (saying so), unless the config differs;
    --resume auto starts a new directory and continues one with a checkpoint."""
    run = tmp_path / "run"
    overrides = _overrides(synthetic_root, run, "data.batch_size=2", "train.max_steps=1")
    run_dirs.claim_run_dir(run, load_config("tiny", overrides), overwrite=False, eval_only=False)
    with pytest.raises(RunDirectoryError, match=r"optim\.lr: "):
        train(load_config("tiny", [*overrides, "optim.lr=1.0"]), TrainOptions(resume="latest"))
    assert not (run / "checkpoints").exists()
    assert train(load_config("tiny", overrides), TrainOptions(resume="latest")).progress.step == 1
    assert "holds no checkpoint yet (the run stopped before its first); starting it from step 0" in \
        capsys.readouterr().out

    fresh = tmp_path / "fresh"
    result = train(load_config("tiny", _overrides(synthetic_root, fresh, "data.batch_size=2", "train.max_steps=1")),
                   TrainOptions(resume="auto"))
    assert result.progress.step == 1
    longer = load_config("tiny", _overrides(synthetic_root, fresh, "data.batch_size=2", "train.max_steps=2"))
    assert train(longer, TrainOptions(resume="auto")).progress.step == 2
    assert f"resumed from {fresh / 'checkpoints' / ckpt.checkpoint_name(1)}" in capsys.readouterr().out


def test_a_second_job_on_a_run_directory_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
        synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = lambda: load_config("tiny", _overrides(synthetic_root, run, "data.batch_size=2", "train.max_steps=1"))
    train(cfg(), TrainOptions())
    lock_file = RunLock.path_for(run)
    assert not lock_file.exists()          # released at the end
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from aqrcmt.training.run_dir import RunLock
RunLock.acquire({str(run)!r}); print("held", flush=True); time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(run)
        with pytest.raises(RunDirectoryError, match=rf"{run} is in use by another job \(host \S+, pid {holder.pid}, "):
            train(cfg(), TrainOptions(resume="latest"))
        with pytest.raises(RunDirectoryError, match="in use by another job"):
            train(cfg(), TrainOptions(overwrite=True))
        assert _tree(run) == before
    finally:
        holder.kill()                      # SIGKILL: the lock file stays, the kernel drops the lock
        holder.wait()
    assert lock_file.exists()
    capsys.readouterr()
    longer = load_config("tiny", _overrides(synthetic_root, run, "data.batch_size=2", "train.max_steps=2"))
    assert train(longer, TrainOptions(resume="latest")).progress.step == 2
    assert f"took over the lock {lock_file} left by a job that ended without releasing it (host " in \
        capsys.readouterr().out
    assert not lock_file.exists()


def test_a_resumed_run_logs_each_step_once_to_tensorboard(synthetic_root, tmp_path):
    """The interrupted run logged steps 1-3 after its checkpoint at step 2; the resumed run purges step 3."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = _overrides(synthetic_root, run, "data.batch_size=2", "train.tracker=tensorboard",
                        "train.log_every_steps=1", "train.checkpoint_every_steps=2")
    train(load_config("tiny", [*common, "train.max_steps=3"]), TrainOptions())
    train(load_config("tiny", [*common, "train.max_steps=4"]),
          TrainOptions(resume=str(run / "checkpoints" / ckpt.checkpoint_name(2))))
    events = EventAccumulator(str(next(run.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4]
