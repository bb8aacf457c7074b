"""Leftovers of killed writers: staged folders and temporary files name their writer (pid, host); a new run
removes those of dead writers, keeps those of running ones, and a failed run never touches the destination."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from aqrcmt.atomic import atomic_write_bytes, find_leftovers, prune_dead_leftovers, staged_directory

AQRCMT = str(Path(sys.executable).with_name("aqrcmt"))
SMALL = ["--scenes", "2", "--samples-per-scene", "2", "--image-size", "32", "32"]


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(folder: Path, name: str, pid: int, host: str = socket.gethostname()) -> Path:
    path = folder / f".{name}.pid{pid}@{host}.k1ll3d_0.partial"
    path.mkdir()
    (path / "half_written.bin").write_bytes(b"\0" * 10)
    return path


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_temporaries_name_their_writer_and_only_dead_writers_leftovers_are_removed(tmp_path):
    seen = []
    with staged_directory(tmp_path / "out", replace=False) as staging:
        atomic_write_bytes(staging / "a.bin", b"a")   # its temporary was renamed: nothing left
        seen = find_leftovers(tmp_path, "out")
    assert [(s.path, s.pid, s.host) for s in seen] == [(staging, os.getpid(), socket.gethostname())]
    assert find_leftovers(tmp_path) == []             # renamed into place

    dead = _leftover(tmp_path, "out", _dead_pid())
    live = _leftover(tmp_path, "out", os.getpid())
    remote = _leftover(tmp_path, "out", 1, host="another-node.cluster")
    unnamed = tmp_path / ".out.x1y2z3w4.partial"      # an older aqrcmt's: no writer in the name
    unnamed.mkdir()
    other_name = _leftover(tmp_path, "out.x", _dead_pid())
    removed, kept = prune_dead_leftovers(tmp_path, "out")
    assert [r.path for r in removed] == [dead] and not dead.exists()
    assert sorted(k.path for k in kept) == sorted([live, remote, unnamed]) and all(k.path.is_dir() for k in kept)
    assert other_name.is_dir()                        # beside another destination ("out.x"): not looked at
    removed, kept = prune_dead_leftovers(tmp_path, exclusive=True)   # a lock holder: the unknown ones are dead too
    assert sorted(r.path for r in removed) == sorted([remote, unnamed, other_name])
    assert [k.path for k in kept] == [live]


def test_a_killed_generator_leaves_the_root_untouched_and_the_next_run_prunes_its_leftover(tmp_path):
    root = tmp_path / "synth"
    made = subprocess.run([AQRCMT, "make-synthetic-nuscenes", "--out", str(root), *SMALL], capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    before = _tree(root)

    # an --overwrite run killed while it writes its staged root beside `root`
    killed = subprocess.Popen([AQRCMT, "make-synthetic-nuscenes", "--out", str(root), "--overwrite", "--scenes", "6",
                               "--samples-per-scene", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 300
    while not any(p.is_file() for left in find_leftovers(tmp_path, "synth") for p in left.path.rglob("*")):
        assert killed.poll() is None and time.monotonic() < end, killed.stderr.read()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    [left] = find_leftovers(tmp_path, "synth")
    assert left.pid == killed.pid and left.path.is_dir()
    assert _tree(root) == before

    live = _leftover(tmp_path, "synth", os.getpid())   # a generator that is still writing
    refused = subprocess.run([AQRCMT, "make-synthetic-nuscenes", "--out", str(root), *SMALL], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and _tree(root) == before
    assert [line for line in refused.stderr.splitlines() if line.startswith("error: ")] == \
        [line for line in refused.stderr.splitlines() if line.strip()]
    assert [line for line in refused.stdout.splitlines() if line.startswith("removed ")] == [
        f"removed 1 leftover(s) beside {root} of killed runs: {left.path.name} (pid {killed.pid} on "
        f"{socket.gethostname()})"]
    assert f"kept 1 leftover(s) beside {root}" in refused.stdout and live.name in refused.stdout
    assert not left.path.exists() and live.is_dir()
    assert [left.path for left in find_leftovers(tmp_path)] == [live]
