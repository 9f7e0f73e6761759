"""One training run as the report sees it: its TensorBoard scalars on an epoch axis and its resolved config.

Reading is strict: a folder that is not a `dist-train train` output_dir
raises `ReportError` naming the fix, rather than producing an empty report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_train import config as config_mod
from dist_train.data.schema import YAW_BUCKETS
from dist_train.metrics import TRAIN_TAGS, VAL_EPOCH_TAG, tar_tag, val_tag, yaw_tag
from dist_train.report.ladder import match_rung
from dist_train.rundir import RunDir


class ReportError(ValueError):
    """A run that cannot be read; the message names the directory and the fix."""


@dataclass
class Run:
    name: str
    path: Path
    scalars: dict[str, tuple[np.ndarray, np.ndarray]]  # tag -> (steps, values), sorted by step
    config: config_mod.Config | None
    rung: str | None = None  # the preset the config matches, or is closest to
    rung_diff: dict = field(default_factory=dict)  # key -> (run value, preset value) where they differ
    data: dict = field(default_factory=dict)  # "ceiling", "probe" of the run's shard set (when known), "notes"

    def epochs(self, steps: np.ndarray) -> np.ndarray:
        """Optimizer steps -> epochs, from the train/epoch and val/epoch points the trainer logs."""
        pts = {0: 0.0}
        for tag in (TRAIN_TAGS["epoch"], VAL_EPOCH_TAG):
            if tag in self.scalars:
                pts.update(zip(self.scalars[tag][0].tolist(), self.scalars[tag][1].tolist()))
        known = np.array(sorted(pts))
        return np.interp(steps, known, [pts[s] for s in known])

    def curve(self, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(epochs, values) of a tag, or None when the run did not log it."""
        if tag not in self.scalars:
            return None
        steps, values = self.scalars[tag]
        return self.epochs(steps), values

    def train(self, key: str):
        return self.curve(TRAIN_TAGS[key])

    def val(self, key: str):
        return self.curve(val_tag(key))

    def at(self, tag: str, step: float) -> float | None:
        """The tag's value at the logged step nearest `step`, or None when not logged."""
        if tag not in self.scalars:
            return None
        steps, values = self.scalars[tag]
        return float(values[np.argmin(np.abs(steps - step))])

    def last_epoch(self) -> float:
        return float(max(self.epochs(s[-1:])[0] for s, _ in self.scalars.values()))

    def best(self) -> dict | None:
        """The evaluation with the highest val cos and the baseline, oracle and gain logged with it."""
        tag = val_tag("mean_cos")
        if tag not in self.scalars:
            return None
        steps, cos = self.scalars[tag]
        i = int(np.argmax(cos))
        step = int(steps[i])
        out = {"step": step, "epoch": float(self.epochs(steps[i : i + 1])[0]), "cos": float(cos[i])}
        for key, name in (
            ("identity_baseline_cos", "baseline"),
            ("gain", "gain"),
            ("oracle_cos", "oracle"),
            ("fraction_of_oracle_gap", "fraction"),
        ):
            out[name] = self.at(val_tag(key), step)
        for key, name in (("pred", "frr"), ("baseline", "baseline_frr")):
            tar = self.at(tar_tag(key), step)
            out[name] = None if tar is None else 1.0 - tar
        return out

    def ceiling(self) -> dict | None:
        """The data ceiling of the run's val split, when it could be estimated."""
        c = self.data.get("ceiling")
        return c if c and c.get("estimable") else None

    def probe(self) -> dict | None:
        """The linear probe's val figures (metrics.quality's keys), when known."""
        p = self.data.get("probe")
        return p["val"] if p else None

    def yaw_at(self, step: int) -> dict[str, dict[str, float]]:
        """Per-|yaw|-bucket cos, baseline and (synthetic data) oracle at an evaluation."""
        out = {}
        for bucket in YAW_BUCKETS:
            entry = {k: self.at(yaw_tag(bucket, k), step) for k in ("cos", "baseline", "oracle")}
            if entry["cos"] is not None:
                out[bucket] = {k: v for k, v in entry.items() if v is not None}
        return out


def find_event_dir(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory; give a run's output_dir (it holds tb/ and config.yaml)")
    dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
    if not dirs:
        raise ReportError(
            f"{run_dir}: no TensorBoard event files (events.out.tfevents.*) in it or below it; "
            "give the output_dir of a `dist-train train` run (its tb/ folder holds them)"
        )
    if len(dirs) > 1:
        raise ReportError(f"{run_dir}: event files in several folders {[str(d) for d in dirs]}; give one of them")
    return dirs[0]


def read_scalars(event_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar point (size_guidance 0 keeps all, not a 10k reservoir sample)."""
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = np.array([e.step for e in events], np.int64)
        values = np.array([e.value for e in events], np.float64)
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        latest = np.r_[steps[1:] != steps[:-1], True]  # a step logged twice keeps its latest value
        out[tag] = (steps[latest], values[latest])
    return out


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    event_dir = find_event_dir(run_dir)
    tags = read_scalars(event_dir)
    if not tags:
        raise ReportError(
            f"{event_dir}: the event files hold no scalars yet; the run logs its first after log_every_steps"
        )
    if TRAIN_TAGS["epoch"] not in tags and VAL_EPOCH_TAG not in tags:
        raise ReportError(
            f"{event_dir}: no {TRAIN_TAGS['epoch']} or {VAL_EPOCH_TAG} scalars, so steps cannot be placed on an "
            "epoch axis; report reads runs written by `dist-train train`"
        )
    cfg = None
    if RunDir(run_dir).config.is_file():
        try:
            cfg = config_mod.load_run_config(run_dir)
        except config_mod.ConfigError as e:
            raise ReportError(f"{RunDir(run_dir).config}: {e}") from e
    run = Run(run_dir.resolve().name, run_dir, tags, cfg)
    if cfg is not None:
        run.rung, run.rung_diff = match_rung(cfg)
    return run


def unique_names(runs: list[Run]) -> None:
    """Two runs with the same folder name (runs/a/x, runs/b/x) are told apart by their parent."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
