"""Stop requests (SLURM preemption, time limits, operators): agreed on by every rank at one step.

A rank learns of a stop from SIGUSR1/SIGTERM or from a stop file (default
``RUN_DIR/STOP``, or ``$DIST_TRAIN_STOP_FILE``), which job scripts create
instead of signalling the launcher (torchrun dies on SIGUSR1). `agreed()` is a
max all-reduce, so all ranks stop after the same optimizer step.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

STOP_FILE_ENV = "DIST_TRAIN_STOP_FILE"
PREEMPTED = "PREEMPTED"


class StopRequest:
    def __init__(self, run_dir: Path, accelerator):
        self.acc = accelerator
        self.stop_file = Path(os.environ.get(STOP_FILE_ENV) or Path(run_dir) / "STOP")
        self.marker = Path(run_dir) / PREEMPTED
        self.reason: str | None = None
        if accelerator.is_main_process:  # stale requests of a previous job must not stop this one
            self.stop_file.unlink(missing_ok=True)
            self.marker.unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank was asked to stop."""
        if self.reason is None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        local = 1.0 if self.reason else 0.0
        if self.acc.num_processes == 1:
            return bool(local)
        flag = torch.tensor([local], device=self.acc.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.reason is None:
            self.reason = "another rank was asked to stop"
        return bool(flag.item())

    def mark(self, step: int) -> None:
        if self.acc.is_main_process:
            self.marker.write_text(f"{step}\n")
            self.stop_file.unlink(missing_ok=True)
