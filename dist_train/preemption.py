"""Stop requests (SLURM preemption, time limits, operators): agreed on by every rank at one step.

A rank learns of a stop from SIGUSR1/SIGTERM or from a stop file (default
``RUN_DIR/STOP``, or ``$DIST_TRAIN_STOP_FILE``), which job scripts create
instead of signalling the launcher (torchrun dies on SIGUSR1). Each rank's answer
goes into the loop's step-statistics read (a max all-reduce at log intervals), so
all ranks stop after the same optimizer step.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from dist_train.rundir import RunDir

STOP_FILE_ENV = "DIST_TRAIN_STOP_FILE"


class StopRequest:
    def __init__(self, run_dir: Path, accelerator):
        self.acc = accelerator
        self.stop_file = Path(os.environ.get(STOP_FILE_ENV) or RunDir(run_dir).stop)
        self.marker = RunDir(run_dir).preempted
        self.reason: str | None = None
        if accelerator.is_main_process:  # stale requests of a previous job must not stop this one
            self.stop_file.unlink(missing_ok=True)
            self.marker.unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

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
