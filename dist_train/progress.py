"""How a run is doing: step counts from each log interval, the best evaluation, divergence.

Functions of the ``TrainState`` and what the loop learned since the last read,
so the loop asks one question each and the rules live in one place.
"""

from __future__ import annotations

import math

from dist_train.checkpoint import TrainState
from dist_train.metrics import monitored
from dist_train.stepstats import Interval


def count_interval(state: TrainState, interval: Interval, max_bad_steps: int) -> int | None:
    """Add an interval's skipped and non-finite steps to ``state``; the step at which the run diverged, if it did.

    ``interval`` ends at ``state.step``. A run diverges at ``max_bad_steps`` windows in a row with a
    non-finite loss (on any rank).
    """
    state.skipped_steps += interval.overflow_steps
    state.nonfinite_steps += interval.nonfinite_steps
    first = state.step - interval.steps + 1
    diverged = None
    for i, bad in enumerate(interval.nonfinite):
        state.consecutive_nonfinite = state.consecutive_nonfinite + 1 if bad else 0
        if diverged is None and state.consecutive_nonfinite >= max_bad_steps:
            diverged = first + i
    return diverged


def record_eval(state: TrainState, metrics: dict, step: int, monitor: str, min_delta: float) -> bool:
    """Count an evaluation; True when it is the new best by ``monitor`` (a non-finite value never is)."""
    value, higher = monitored(metrics, monitor)
    state.last_eval_step = step
    if math.isfinite(value):
        first = state.best_value is None
        if first or (value > state.best_value + min_delta if higher else value < state.best_value - min_delta):
            state.best_value, state.best_step, state.evals_since_best = value, step, 0
            state.best_cos = metrics["mean_cos"]
            return True
    state.evals_since_best += 1
    return False
