"""How a run is doing and when it ends: step counts, the best evaluation, early stopping, divergence.

The rules are functions of the ``TrainState`` and what the loop learned since
the last read (`count_interval`, `record_eval`); `RunPolicy` applies them and
decides the run's `Outcome`, so the loop reports and asks, and never decides.
"""

from __future__ import annotations

import enum
import math

from dist_train.checkpoint import TrainState
from dist_train.config import EvalConfig
from dist_train.metrics import monitored
from dist_train.stepstats import Interval

EXIT_DIVERGED = 3


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


class Outcome(enum.Enum):
    """How a run ends, and what the end means for the run directory and the exit code."""

    FINISHED = "finished"
    EARLY_STOPPED = "early-stopped"
    PREEMPTED = "preempted"  # a stop request: a checkpoint and PREEMPTED, to be resumed
    DIVERGED = "diverged"

    @property
    def complete(self) -> bool:
        """The run is over for good: DONE is written and the best model is scored on the test split."""
        return self in (Outcome.FINISHED, Outcome.EARLY_STOPPED)

    @property
    def exit_code(self) -> int:
        return EXIT_DIVERGED if self is Outcome.DIVERGED else 0


class RunPolicy:
    """Owns the run's decisions between steps: best model, early stopping, divergence, stopping on request.

    The loop reports what it measured (`count`, `judge`, `preempt`) and asks `outcome` whether to stop;
    the state these rules keep lives in the ``TrainState`` so it is checkpointed with the run.
    """

    def __init__(self, state: TrainState, cfg: EvalConfig, max_bad_steps: int, say=print):
        self.state, self.cfg, self.max_bad_steps, self.say = state, cfg, max_bad_steps, say
        self.diverged_at: int | None = None
        self.preempted = self.early_stopped = False

    def count(self, interval: Interval) -> None:
        """A log interval's step flags (ending at ``state.step``): skipped and non-finite counts, divergence."""
        diverged = count_interval(self.state, interval, self.max_bad_steps)
        if self.diverged_at is None:
            self.diverged_at = diverged

    def preempt(self) -> None:
        self.preempted = True

    def judge(self, metrics: dict) -> bool:
        """An evaluation at ``state.step``; True when it is the new best model (save it)."""
        state, monitor = self.state, self.cfg.monitor
        best = record_eval(state, metrics, state.step, monitor, self.cfg.early_stopping_min_delta)
        value = monitored(metrics, monitor)[0]
        if not best and not math.isfinite(value):
            self.say(
                f"dist-train: warning: val {monitor} is {value} at step {state.step} ({metrics['n']} valid rows): "
                f"not compared with the best ({state.best_value} at step {state.best_step}); the model or the val "
                "data has non-finite values"
            )
        patience = self.cfg.early_stopping_patience
        self.early_stopped = self.early_stopped or bool(patience and state.evals_since_best >= patience)
        return best

    @property
    def outcome(self) -> Outcome | None:
        """Why to stop after this step, None to go on: a stop request first, then early stopping, then divergence."""
        if self.preempted:
            return Outcome.PREEMPTED
        if self.early_stopped:
            return Outcome.EARLY_STOPPED
        if self.diverged_at is not None:
            return Outcome.DIVERGED
        return None

    def summary(self, outcome: Outcome) -> list[str]:
        """What the run says about its end (beside the data summary), on the main process."""
        state, cfg = self.state, self.cfg
        lines = []
        if outcome is Outcome.DIVERGED:
            lines.append(
                f"dist-train: error: {self.max_bad_steps} consecutive non-finite losses at step {self.diverged_at}; "
                f"checkpoint saved at step {state.step}. Lower --lr, use --precision bf16/fp32, or check the data "
                "with `dist-train inspect`."
            )
        elif outcome is Outcome.EARLY_STOPPED:
            lines.append(
                f"dist-train: early stop at step {state.step}: val {cfg.monitor} gained no more than "
                f"{cfg.early_stopping_min_delta} for {state.evals_since_best} evaluations"
            )
        best = "none" if state.best_value is None else f"{state.best_value:.4f} (val cos {state.best_cos:.4f})"
        lines.append(f"dist-train: best val {cfg.monitor} {best} at step {state.best_step}")
        return lines
