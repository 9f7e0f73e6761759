"""Stop requests (SLURM preemption, time limits, operators): agreed on by every rank at one step.

A rank learns of a stop from SIGUSR1/SIGTERM or from a stop file (default
``RUN_DIR/STOP``, or ``$DIST_TRAIN_STOP_FILE``), which job scripts create
instead of signalling the launcher (torchrun dies on SIGUSR1). Each rank's answer
goes into the loop's step-statistics read (a max all-reduce at log intervals), so
all ranks stop after the same optimizer step.

SIGTERM also starts a deadline: a run that has not ended ``grace_s`` seconds later (blocked
waiting for data or for another rank) says so and exits 143 without a stop checkpoint, so a
SIGTERM always ends the run. DataLoader workers ignore these signals (``data/stream.py``):
the trainer ends them.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

from dist_train.rundir import RunDir

STOP_FILE_ENV = "DIST_TRAIN_STOP_FILE"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_STOP_TIMEOUT = 128 + signal.SIGTERM  # 143, what a shell or SLURM shows for a process ended by SIGTERM
_STACKS_AFTER_S = 10  # past the deadline: stacks and exit 1 from faulthandler's thread, when Python's cannot run


class StopRequest:
    def __init__(self, run_dir: Path, accelerator, grace_s: float = 0.0):
        self.acc = accelerator
        self.stop_file = Path(os.environ.get(STOP_FILE_ENV) or RunDir(run_dir).stop)
        self.marker = RunDir(run_dir).preempted
        self.reason: str | None = None
        self.grace_s = grace_s  # after SIGTERM; 0: no deadline
        self._deadline: threading.Timer | None = None
        if accelerator.is_main_process:  # stale requests of a previous job must not stop this one
            self.stop_file.unlink(missing_ok=True)
            self.marker.unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name
        if signum == signal.SIGTERM and self.grace_s > 0 and self._deadline is None:
            self._deadline = threading.Timer(self.grace_s, self._expire)
            self._deadline.daemon = True
            self._deadline.start()
            faulthandler.dump_traceback_later(self.grace_s + _STACKS_AFTER_S, exit=True)

    def _expire(self) -> None:
        print(
            f"dist-train: rank {self.acc.process_index}: the run did not end within {self.grace_s:g} s of SIGTERM "
            f"(blocked, waiting for data or for another rank); exiting {EXIT_STOP_TIMEOUT} without a stop "
            "checkpoint: resume from the last complete one (--resume latest); "
            "to give a slow stop more time, raise --stop_grace_seconds",
            file=sys.stderr,
            flush=True,
        )
        for child in multiprocessing.active_children():  # the DataLoader workers: they ignore SIGTERM
            child.kill()
        os._exit(EXIT_STOP_TIMEOUT)

    def close(self) -> None:
        """The run ended: no deadline any more, and the signals go back to their previous handlers."""
        if self._deadline is not None:
            self._deadline.cancel()
            faulthandler.cancel_dump_traceback_later()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """Whether this rank was asked to stop (a signal or the stop file); the ranks agree in the loop's read."""
        if self.reason is None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        return self.reason is not None

    def agreed(self, any_rank: bool) -> bool:
        """The ranks' common answer (any rank asked); notes why on the ranks that were not asked themselves."""
        if any_rank and self.reason is None:
            self.reason = "another rank was asked to stop"
        return any_rank

    def mark(self, step: int) -> None:
        if self.acc.is_main_process:
            self.marker.write_text(f"{step}\n")
            self.stop_file.unlink(missing_ok=True)
