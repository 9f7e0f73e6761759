"""`dist-train report`: read training curves, plot them and say what to change next.

The design notes (docs/design.md) are a person reading curves and
prescribing the next run. This package does that reading: every diagnosis is a
small function of one run's scalars and config that returns a `Finding` (what
was seen, with epochs and values, and the concrete flags to try) or None. A
stalled run is sent one rung up the preset ladder base -> plan1-loss ->
plan2-capacity -> plan3-batch -> xl; the most important question is whether
the model beats the do-nothing identity baseline at all.

Two figures of the run's shard set tell a limit from a plateau: the data's
ceiling (how well the frontal references agree with their own identity,
`ceiling.data_ceiling`: no prediction's mean cos to a frontal exceeds it) and
a linear probe (closed-form ridge on [src_emb, pose], `dist-train probe`,
cached beside the set). A run near the ceiling is at the data's limit; a run
below the probe has a model-setup problem; a flat run between them needs
capacity, regularisation or data. Verification is judged by the false-reject
rate at FAR 1e-3, not by the impostor cos alone.

One module a job: `thresholds` (the numbers), `run` (reading a run directory),
`shardset` (its ceiling and probe), `ladder` (the presets' rungs), `diagnoses`
(by theme), `summary`, `render` (markdown and text) and `cli` (the command);
this file re-exports what callers import.
"""

from dist_train.report.cli import main, parse_args
from dist_train.report.diagnoses import DIAGNOSES, diagnose
from dist_train.report.finding import SEVERITIES, Finding
from dist_train.report.ladder import LADDER, match_rung, next_rung
from dist_train.report.run import ReportError, Run, load_run
from dist_train.report.shardset import attach_data
from dist_train.report.summary import summarize
from dist_train.report.thresholds import Thresholds

__all__ = [
    "DIAGNOSES",
    "LADDER",
    "SEVERITIES",
    "Finding",
    "ReportError",
    "Run",
    "Thresholds",
    "attach_data",
    "diagnose",
    "load_run",
    "main",
    "match_rung",
    "next_rung",
    "parse_args",
    "summarize",
]
