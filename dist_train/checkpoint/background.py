"""The best model is written by a thread, so that a training step never waits for the disk.

One writer thread with a one-slot queue (`BackgroundWriter`): a newer best replaces a snapshot still
waiting, writes start at most every ``best_every_minutes``, and a failed write is kept until the next
collective point (`Checkpointer.save_best` or `close`) reports it on every rank.
"""

from __future__ import annotations

import math
import threading
import time


class BackgroundWriter:
    """One writer thread with a one-slot queue: the newest job replaces one not yet started.

    Jobs start at most every ``min_interval_s`` seconds; an error is kept (with the job's tag) until taken.
    """

    def __init__(self, min_interval_s: float):
        self.min_interval_s = min_interval_s
        self.cond = threading.Condition()
        self.job = None  # (fn, tag) waiting
        self.busy = False
        self.error: tuple[Exception, object] | None = None
        self.next_start = -math.inf  # earliest start of the next job
        self.flushing = False
        self.thread: threading.Thread | None = None

    def submit(self, fn, tag) -> None:
        with self.cond:
            self.job = (fn, tag)
            self.cond.notify_all()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="dist-train best model", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.job is None or (not self.flushing and time.monotonic() < self.next_start):
                    self.cond.wait(timeout=None if self.job is None else self.next_start - time.monotonic())
                fn, tag = self.job
                self.job, self.busy, self.next_start = None, True, time.monotonic() + self.min_interval_s
            try:
                fn()
            except Exception as e:  # reported on every rank by the next save_best or close
                with self.cond:
                    self.error = (e, tag)
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def flush(self) -> None:
        with self.cond:
            self.flushing = True
            self.cond.notify_all()
            while self.job is not None or self.busy:
                self.cond.wait()
            self.flushing = False

    def take_error(self) -> tuple[Exception | None, object]:
        with self.cond:
            error, self.error = self.error, None
        return (error[0], error[1]) if error else (None, (None, None))
