"""The run directory's layout, named in one place.

Trainer, checkpointer, evaluator, stop request, logger and report all read or
write the same folder; each asks `RunDir` for its path instead of spelling the
name, so the layout below is the whole contract (job scripts and users read it)::

    config.yaml                 the resolved configuration of the run
    checkpoints/step-NNNNNNNN/  resumable checkpoints (`dist_train.checkpoint`)
    best/model.safetensors      the best model so far (fp32 weights, config and step in metadata)
    metrics/                    eval-stepNNNNNNNN.json per evaluation, test.json at the end
    tb/                         TensorBoard events (what `dist-train report` reads)
    trace/                      row traces (--trace_rows)
    abandoned/                  branches moved aside by a resume from an older checkpoint
    DONE / PREEMPTED            the run ended (step inside) / stopped on request and will resume
    STOP                        created by a job script or a person: stop at the next agreed step
    .dist-train.lock            flock'ed by the running run's main process; host, pid and start time inside
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
BEST = "best"
CONSOLIDATED = "model.safetensors"  # consolidated fp32 weights: best/, each checkpoint, exports
METRICS = "metrics"
TB = "tb"
TRACE = "trace"
ABANDONED = "abandoned"
DONE = "DONE"
PREEMPTED = "PREEMPTED"
STOP = "STOP"
TEST_METRICS = "test.json"
LOCK = ".dist-train.lock"

# what `--overwrite` deletes: the previous run's outputs (config.yaml is rewritten by the new run)
OUTPUTS = (CHECKPOINTS, BEST, TB, METRICS, ABANDONED, DONE, PREEMPTED)
# what a run writes at the top of its directory: a directory that is not a run's and holds any of these is
# refused (the run would write into them, --overwrite would delete them)
WRITTEN = (CONFIG, *OUTPUTS, TRACE)


_EVAL_METRICS = re.compile(r"^eval-step(\d+)\.json$")


def eval_metrics_name(step: int) -> str:
    return f"eval-step{step:08d}.json"


def eval_metrics_step(name: str) -> int | None:
    """The step of an ``eval-stepNNNNNNNN.json`` file name; None for any other name."""
    m = _EVAL_METRICS.match(name)
    return int(m[1]) if m else None


class _Under:
    """A path below the run directory, read as an attribute: ``RunDir(root).best_model``."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __get__(self, run: RunDir | None, owner=None):
        return self if run is None else run.root.joinpath(*self.parts)


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    config = _Under(CONFIG)
    checkpoints = _Under(CHECKPOINTS)
    best = _Under(BEST)
    best_model = _Under(BEST, CONSOLIDATED)
    metrics = _Under(METRICS)
    test_metrics = _Under(METRICS, TEST_METRICS)
    tb = _Under(TB)
    trace = _Under(TRACE)
    abandoned = _Under(ABANDONED)
    done = _Under(DONE)
    preempted = _Under(PREEMPTED)
    stop = _Under(STOP)
    lock = _Under(LOCK)

    def eval_metrics(self, step: int) -> Path:
        return self.root / METRICS / eval_metrics_name(step)
