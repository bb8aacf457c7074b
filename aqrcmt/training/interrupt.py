"""Graceful interruption: SIGTERM / SIGUSR1 / SIGINT ask the run to stop after the current optimizer step.

What a scheduler sends before it preempts a job (SLURM: SIGTERM, or SIGUSR1 with ``--signal``; Kubernetes:
SIGTERM) and what Ctrl-C sends only set a flag here (:class:`StopRequests`). The loop reads the flags of all
processes after every optimizer step in one collective (a signal that reached one process stops them all at
the same step), writes one checkpoint and raises :class:`TrainingInterrupted` (exit status
:data:`EXIT_INTERRUPTED`).

A second signal, :data:`REPEAT_GRACE_S` seconds or more after the first, aborts the process at once with the
signal's default action (no checkpoint; the staged checkpoint folder a kill leaves is pruned by the next run).
Repeats within the grace period count as the first: ``accelerate launch`` (torchrun) forwards the signal it
received to its workers, which the terminal (Ctrl-C) or the scheduler (``scancel``) signalled already.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from aqrcmt.training.alarms import TrainingStopped

HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_INTERRUPTED = 75     # sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry"
REPEAT_GRACE_S = 2.0


class TrainingInterrupted(TrainingStopped):
    """A run stopped by a signal after writing `checkpoint`; the message names both."""
    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, checkpoint: Path, main_process: bool = True):
        super().__init__(message, main_process=main_process)
        self.checkpoint = checkpoint


class StopRequests:
    """The signal this process received (first one wins) and when; see the module doc."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.received_at = 0.0

    def handle(self, signum: int, _frame: object) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.received_at = signum, now
            print(f"{signal.Signals(signum).name} received: finishing the current step, then writing a "
                  f"checkpoint (a second signal aborts at once)", file=sys.stderr, flush=True)
            return
        if now - self.received_at < REPEAT_GRACE_S:
            return
        print(f"second signal ({signal.Signals(signum).name}): aborting without a checkpoint", file=sys.stderr,
              flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Install the handlers of :data:`HANDLED` for the block (main thread only) and restore the previous ones."""
    requests = StopRequests()
    previous = {signum: signal.signal(signum, requests.handle) for signum in HANDLED}
    try:
        yield requests
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
