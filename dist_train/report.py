"""`dist-train report`: read training curves, plot them and say what to change next.

The design notes (docs/design.md) are a person reading curves and
prescribing the next run. This module does that reading: every diagnosis is a
small function of one run's scalars and config that returns a `Finding` (what
was seen, with epochs and values, and the concrete flags to try) or None. A
stalled run is sent one rung up the preset ladder base -> plan1-loss ->
plan2-capacity -> plan3-batch -> xl; the most important question is whether
the model beats the do-nothing identity baseline at all.

Two figures of the run's shard set tell a limit from a plateau: the data's
ceiling (how well the frontal references agree with their own identity,
`inspect.data_ceiling`: no prediction's mean cos to a frontal exceeds it) and
a linear probe (closed-form ridge on [src_emb, pose], `dist-train probe`,
cached beside the set). A run near the ceiling is at the data's limit; a run
below the probe has a model-setup problem; a flat run between them needs
capacity, regularisation or data. Verification is judged by the false-reject
rate at FAR 1e-3, not by the impostor cos alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dist_train import augment, cli
from dist_train import config as config_mod
from dist_train.data.schema import YAW_BUCKETS
from dist_train.metrics import TRAIN_TAGS, VAL_EPOCH_TAG, scalars
from dist_train.plots import write_plots

# ---- thresholds ---------------------------------------------------------------------------------

PLATEAU_EPOCHS = 20.0
"""W: epochs without progress that make a plateau (design notes: "if still stuck after 20 epochs, try plan 2")."""
PLATEAU_DELTA = 0.005
"""delta: val cos gain that counts as progress; well above the ~0.001 evaluation noise of a few-thousand-sample split."""
MIN_GAIN = 0.01
"""Best val cos gain over the identity baseline below which the model has learned nothing worth having."""
OVERFIT_RATIO = 1.5
"""val/train loss ratio above which to regularise more (design notes: 1.4 is acceptable, above 1.5 add dropout/wd)."""
LOW_RATIO = 1.2
"""val/train loss ratio below which regularisation has room to be lowered (design notes)."""
RATIO_TAIL = 3
"""Evaluations whose median val/train ratio is judged, so one noisy evaluation neither raises nor hides it."""
ORACLE_FRACTION_LOW = 0.5
"""Fraction of the baseline-to-oracle gap a run should close; below it the model/optimisation leaves most on the table."""
ORACLE_FRACTION_CEILING = 0.9
"""A plateau this close to the oracle is the data's ceiling, not a problem to fix."""
LR_FLOOR = 1e-5
"""Learning rates below this learn too little to be worth epochs (design notes: "min lr 1e-6 may be too low")."""
LR_FLOOR_EPOCHS = 5.0
"""Epochs at an lr below LR_FLOOR, without val progress, that count as wasted."""
LR_DECAYED_FRACTION = 0.3
"""lr below this share of its peak when a plateau began: the schedule, not the model, may have stopped progress."""
LR_COLLAPSE_FRACTION = 0.1
"""An lr below this share of its peak has collapsed; a cosine over the whole run spends ~20% of it there."""
LR_COLLAPSED_SHARE_MAX = 0.35
"""Share of the post-warmup run allowed at a collapsed lr before the cosine counts as decaying too early."""
WARMUP_LINEARITY_TOL = 0.05
"""Largest deviation of the warmup lr from a straight line, as a share of the peak lr."""
LOSS_SHARE_MIN = 0.01
"""A weighted loss term carrying less than this share of the gradient is in effect switched off."""
IMPOSTOR_RISE = 0.02
"""Rise of the mean impostor cos (different identities) from its minimum that means identities are being merged."""
TAR_DROP = 0.01
"""Fall of TAR at FAR 1e-3 (from its best, or below the baseline's) that means verification got worse."""
CEILING_MARGIN = 0.03
"""A best val cos this close to the data's ceiling is at the data's limit: the targets themselves disagree that much."""
PROBE_MARGIN = 0.005
"""A best val cos this far below the linear probe's is worse than ridge regression (above the evaluation noise)."""
FLAT_SHARE = 0.5
"""A run flat for this share of its epochs (or PLATEAU_EPOCHS, if fewer) counts as flat between probe and ceiling."""
FLAT_EVALS = 3
"""Evaluations at the flat level needed to call a short run flat."""
VERIFY_FAR = "0.001"
"""The FAR whose false-reject rate (1 - TAR) is shown beside cos."""
SKIP_CALIBRATION_STEPS = 100
"""fp16 loss scalers skip a handful of steps while calibrating; the skip rate is judged after these steps."""
SKIP_RATE_MAX = 0.01
"""Share of optimizer steps skipped on fp16 overflow above which the batches lost matter."""
BAD_SAMPLE_RATE_MAX = 1e-3
"""Share of corrupt samples above which the data, not luck, is the problem."""
TRAIN_LEARNS_DROP = 0.2
"""Relative fall of the train loss that shows the model is learning something (for a run with no val gain)."""

LADDER = ("base", "plan1-loss", "plan2-capacity", "plan3-batch", "xl")
"""configs/ presets in the order the design notes climb them when a run stalls."""
PLAN_KEYS = (
    "d_model",
    "nhead",
    "num_layers",
    "dim_feedforward",
    "dropout",
    "mse_weight",
    "cosine_weight",
    "contrastive_weight",
    "lr",
    "weight_decay",
    "scheduler_type",
    "warmup_epochs",
    "warmup_lr",
    "cosine_eta_min",
    "batch_size",
    "epochs",
)
"""Config fields that define a plan (data paths, seeds and output folders do not)."""
CAPACITY_KEYS = ("d_model", "nhead", "num_layers", "dim_feedforward", "dropout")
"""Fields never stepped down when moving to the next rung (plan3-batch has less capacity than plan2)."""
SEVERITIES = ("critical", "warning", "info")


class ReportError(ValueError):
    """A run that cannot be read; the message names the directory and the fix."""


@dataclass
class Thresholds:
    plateau_epochs: float = PLATEAU_EPOCHS
    plateau_delta: float = PLATEAU_DELTA
    min_gain: float = MIN_GAIN
    overfit_ratio: float = OVERFIT_RATIO
    low_ratio: float = LOW_RATIO


@dataclass
class Finding:
    code: str
    severity: str  # one of SEVERITIES
    evidence: str
    recommendation: str


# ---- reading runs -------------------------------------------------------------------------------


def val_tag(key: str) -> str:
    """TensorBoard tag of a validation metric, exactly as `metrics.scalars` names it."""
    (tag,) = scalars({key: 0.0})
    return tag


def yaw_tag(bucket: str, key: str) -> str:
    (tag,) = scalars({"per_yaw": {bucket: {key: 0.0}}})
    return tag


def tar_tag(key: str, far: str = VERIFY_FAR) -> str:
    """TensorBoard tag of TAR at a FAR (``key`` pred or baseline)."""
    (tag,) = scalars({"tar_at_far": {far: {key: 0.0}}})
    return tag


@dataclass
class Run:
    name: str
    path: Path
    scalars: dict[str, tuple[np.ndarray, np.ndarray]]  # tag -> (steps, values), sorted by step
    config: config_mod.Config | None
    plan: str | None = None  # the preset the config matches, or is closest to
    plan_diff: dict = field(default_factory=dict)  # key -> (run value, preset value) where they differ
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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
    if (run_dir / config_mod.RESOLVED_NAME).is_file():
        try:
            cfg = config_mod.load_run_config(run_dir)
        except config_mod.ConfigError as e:
            raise ReportError(f"{run_dir / config_mod.RESOLVED_NAME}: {e}") from e
    run = Run(run_dir.resolve().name, run_dir, tags, cfg)
    if cfg is not None:
        run.plan, run.plan_diff = match_plan(cfg)
    return run


# ---- the shard set's own figures: data ceiling and linear probe -----------------------------------

_DATA_CACHE: dict[tuple, tuple[dict | None, dict | None, list[str]]] = {}


def attach_data(run: Run, mode: str = "run") -> None:
    """Fill ``run.data`` with the data ceiling and linear probe of the run's shard set (val split).

    ``mode``: "run" computes what is not cached (the probe is cached beside the set, or under
    the run directory when the set is read-only), "cached" only reads the probe's cache, "off"
    skips both. Runs on the same set share one computation.
    """
    if mode == "off":
        return
    if run.config is None or not run.config.data.data_dir:
        run.data = {"notes": ["no data ceiling or linear probe: the run's shard set is unknown (no data_dir)"]}
        return
    d = run.config.data
    root = Path(d.data_dir[0])
    if len(d.data_dir) > 1:
        run.data = {"notes": [f"data ceiling and linear probe of the first of {len(d.data_dir)} shard sets, {root}"]}
    if not (root / "index.json").is_file():
        run.data = {"notes": [f"no data ceiling or linear probe: {root} holds no shard set here"]}
        return
    from dist_train.probe import probe_for, read_cached, set_key

    key = (str(root.resolve()), set_key(root), d.train_split, d.val_split, mode)
    if key not in _DATA_CACHE:
        from dist_train.data.inspect import data_ceiling

        notes = []
        if mode == "run" and read_cached(root, run.path, train_split=d.train_split, split=d.val_split) is None:
            print(
                f"dist-train report: fitting the linear probe of {root} (one pass over {d.train_split}, cached for "
                "next time; --data cached skips it)",
                file=sys.stderr,
            )
        try:
            ceiling = data_ceiling(root, d.val_split)
        except (ValueError, OSError) as e:
            ceiling, notes = None, [f"no data ceiling: {e}"]
        if ceiling is not None and not ceiling["estimable"]:
            notes.append(f"data ceiling of {root} ({d.val_split}): {ceiling['reason']}")
        probe, note = probe_for(
            root, run=mode == "run", fallback=run.path, train_split=d.train_split, split=d.val_split
        )
        _DATA_CACHE[key] = (ceiling, probe, [*notes, note])
    ceiling, probe, notes = _DATA_CACHE[key]
    run.data = {"ceiling": ceiling, "probe": probe, "notes": notes}


def ceiling_note(c: dict) -> str:
    ci = f" [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]" if c.get("ci95") else ""
    return f"data ceiling {c['cos']:.4f}{ci} ({c['n_identities']} identities with >= 2 distinct frontal embeddings)"


# ---- the preset ladder --------------------------------------------------------------------------


def plan_values(cfg: config_mod.Config) -> dict:
    return {k: getattr(getattr(cfg, config_mod.FLAT[k][0]), k) for k in PLAN_KEYS}


def preset_values(name: str) -> dict:
    return plan_values(config_mod.build({**config_mod.load_yaml(name), "data_dir": None}))


def match_plan(cfg: config_mod.Config) -> tuple[str, dict]:
    """The preset whose plan fields differ least from the run's (ladder presets win ties)."""
    names = list(LADDER) + sorted(p.stem for p in config_mod.CONFIG_DIR.glob("*.yaml") if p.stem not in LADDER)
    run_vals = plan_values(cfg)
    best = None
    for name in names:
        pv = preset_values(name)
        diff = {k: (run_vals[k], pv[k]) for k in PLAN_KEYS if run_vals[k] != pv[k]}
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    return best


def num(v) -> str:
    """A number as a flag value, the way the design notes write them (2e-4, 0.2, 768)."""
    if isinstance(v, float) and 0 < abs(v) < 1e-3:
        mantissa, exp = f"{v:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plan_label(run: Run) -> str:
    if run.config is None:
        return "unknown (no config.yaml)"
    if not run.plan_diff:
        return run.plan
    diff = ", ".join(f"{k} {num(a)} (preset {num(b)})" for k, (a, b) in run.plan_diff.items())
    return f"custom, closest {run.plan}: {diff}"


def next_rung(run: Run) -> str:
    """The next preset up the ladder, keeping any capacity the run already has."""
    if run.config is None:
        return f"--config {LADDER[1]} (the run has no config.yaml, so its plan is unknown)"
    pos = LADDER.index(run.plan) if run.plan in LADDER else 0
    if pos + 1 == len(LADDER):
        return (
            f"the preset ladder ends at {LADDER[-1]}: look at the data — `dist-train inspect {data_dir(run)}` "
            "(pairing, yaw coverage, abnormal samples) —, train against identity centroids (--target centroid) "
            "and add data"
        )
    nxt = LADDER[pos + 1]
    have, preset = plan_values(run.config), preset_values(nxt)
    bigger = [k for k in CAPACITY_KEYS if have[k] > preset[k]]
    keep = [f"--{k} {num(have[k])}" for k in bigger]
    changes = [f"{k} {num(have[k])}->{num(preset[k])}" for k in PLAN_KEYS if have[k] != preset[k] and k not in bigger]
    return " ".join([f"--config {nxt}", *keep]) + (f" ({', '.join(changes)})" if changes else "")


def data_dir(run: Run) -> str:
    """The run's shard set directories, as they go on a command line."""
    return " ".join((run.config and run.config.data.data_dir) or ["DATA_DIR"])


def regularise_flags(run: Run) -> str:
    """The design notes' step (dropout 0.15 -> 0.2, weight decay 1e-4 -> 2e-4), from wherever the run is."""
    dropout = run.config.model.dropout if run.config else 0.15
    wd = run.config.optim.weight_decay if run.config else 1e-4
    return f"--dropout {num(round(max(0.2, dropout + 0.05), 2))} --weight_decay {num(max(2e-4, 2 * wd))}"


# ---- diagnoses ----------------------------------------------------------------------------------


def ep(e: float) -> str:
    return f"{e:.0f}" if abs(e - round(e)) < 0.05 else f"{e:.1f}"


def baseline_note(b: dict) -> str:
    return "" if b["baseline"] is None else f" (identity baseline {b['baseline']:.4f}, gain {b['gain']:+.4f})"


def diagnose_no_gain(run: Run, th: Thresholds) -> Finding | None:
    """The most important check: a val cos equal to the baseline means the model learned nothing."""
    b = run.best()
    if b is None or b["gain"] is None or b["gain"] >= th.min_gain:
        return None
    evidence = (
        f"best val cos {b['cos']:.4f} at epoch {ep(b['epoch'])} vs identity baseline {b['baseline']:.4f}: "
        f"gain {b['gain']:+.4f}, under {num(th.min_gain)} after {ep(run.last_epoch())} epochs — the model "
        "returns (close to) its input and has learned nothing"
    )
    loss = run.train("loss")
    drop = None
    if loss is not None and loss[1][0] > 0:
        drop = 1.0 - loss[1][-1] / loss[1][0]
        evidence += f"; train loss {loss[1][0]:.4f} -> {loss[1][-1]:.4f} ({-drop:+.0%})"
    lr = run.train("lr")
    if lr is not None:
        evidence += f"; lr peaked at {num(float(lr[1].max()))}"
    p = run.probe()
    if p is not None and p["gain"] >= th.min_gain:
        evidence += (
            f"; a linear probe reaches {p['mean_cos']:.4f} on the same split (gain {p['gain']:+.4f}): "
            "there is something to learn"
        )
    if drop is not None and drop >= TRAIN_LEARNS_DROP:
        rec = (
            "the model fits the train split but nothing carries over to val: check that val pairs look like "
            f"train pairs (`dist-train inspect {data_dir(run)}`: per-yaw baselines of both splits), then "
            f"regularise ({regularise_flags(run)}) or add data"
        )
    else:
        base_lr = run.config.optim.lr if run.config else 1e-4
        rec = (
            "training itself is stuck: check that the lr reached the configured --lr, try --lr "
            f"{num(3 * base_lr)}, force the correction on profiles with --gate yaw, and check src/tgt pairing with "
            f"`dist-train inspect {data_dir(run)}`; a bigger preset will not help until the model beats the baseline"
        )
    return Finding("no_gain", "critical", evidence, rec)


def diagnose_plateau(run: Run, th: Thresholds) -> Finding | None:
    """val cos not improved by more than delta over W epochs; the start is the first evaluation within delta of the best.

    Where the shard set's ceiling and probe place the run (at the data's limit, below the probe,
    flat between them), that finding says what to do instead.
    """
    b, c = run.best(), run.val("mean_cos")
    if b is None or (b["gain"] is not None and b["gain"] < th.min_gain):  # a flat curve at the baseline is no_gain's
        return None
    if any(d(run, th) is not None for d in (diagnose_data_limit, diagnose_below_probe, diagnose_probe_to_ceiling)):
        return None
    epochs, cos = c
    i = int(np.argmax(cos >= cos.max() - th.plateau_delta))
    stalled = epochs[-1] - epochs[i]
    if stalled < th.plateau_epochs:
        return None
    evidence = (
        f"val cos has stayed within {num(th.plateau_delta)} of its best {b['cos']:.4f} since epoch {ep(epochs[i])} "
        f"({ep(stalled)} epochs, to epoch {ep(epochs[-1])}){baseline_note(b)}"
    )
    if b["fraction"] is not None and b["fraction"] >= ORACLE_FRACTION_CEILING:
        return Finding(
            "plateau",
            "info",
            evidence + f"; {b['fraction']:.0%} of the gap to the oracle {b['oracle']:.4f} is closed",
            f"this is the data's ceiling, not a problem: export the best checkpoint (epoch {ep(b['epoch'])})",
        )
    rec = f"next rung: {next_rung(run)}"
    lr = run.train("lr")
    if lr is not None:
        step = run.scalars[val_tag("mean_cos")][0][i]
        at_start, peak = run.at(TRAIN_TAGS["lr"], step), float(lr[1].max())
        evidence += f"; lr at the plateau's start {num(at_start)} ({at_start / peak:.0%} of its peak {num(peak)})"
        if at_start < LR_DECAYED_FRACTION * peak:
            rec = (
                "the lr had already decayed when progress stopped: first keep it up longer "
                "(--cosine_eta_min 1e-5, a longer cosine via --epochs, or --scheduler_type cosine_restarts); " + rec
            )
    return Finding("plateau", "warning", evidence, rec)


def recent_progress(run: Run, window: float) -> float | None:
    """Gain of the best val cos over the last `window` epochs (None for a run shorter than that)."""
    epochs, cos = run.val("mean_cos")
    before = epochs <= epochs[-1] - window
    return float(cos.max() - cos[before].max()) if before.any() else None


def diagnose_oracle_gap(run: Run, th: Thresholds) -> Finding | None:
    """Distance to the synthetic data's oracle ceiling, when the shard set has one."""
    b = run.best()
    if b is None or b["fraction"] is None or b["fraction"] >= ORACLE_FRACTION_LOW:
        return None
    if b["gain"] is not None and b["gain"] < th.min_gain:
        return None
    if diagnose_below_probe(run, th) is not None:  # worse than ridge: the setup, not the ladder, comes first
        return None
    evidence = (
        f"best val cos {b['cos']:.4f} (epoch {ep(b['epoch'])}) closes {b['fraction']:.0%} of the gap from the "
        f"identity baseline {b['baseline']:.4f} to the oracle {b['oracle']:.4f}; {b['oracle'] - b['cos']:.4f} left"
    )
    per_yaw = {
        k: (v["cos"] - v["baseline"]) / (v["oracle"] - v["baseline"])
        for k, v in run.yaw_at(b["step"]).items()
        if "oracle" in v and abs(v["oracle"] - v["baseline"]) > 1e-6
    }
    if per_yaw:
        worst = min(per_yaw, key=per_yaw.get)
        evidence += f"; worst |yaw| bucket {worst} closes {per_yaw[worst]:.0%}"
    progress = recent_progress(run, th.plateau_epochs)
    if progress is not None and progress <= th.plateau_delta:
        rec = f"the model has stopped short of what the data allows: next rung: {next_rung(run)}"
    else:
        rec = "val cos is still rising: train longer (a larger --epochs, or resume) before changing the plan"
    return Finding("oracle_gap", "warning", evidence, rec)


def flat_since(run: Run, th: Thresholds) -> tuple[float, float, int] | None:
    """(start epoch, epochs, evaluations) of the run's last stretch within delta of its best val cos, when it is
    long enough to call flat: PLATEAU_EPOCHS, or FLAT_SHARE of a shorter run with FLAT_EVALS evaluations."""
    c = run.val("mean_cos")
    if c is None:
        return None
    epochs, cos = c
    i = int(np.argmax(cos >= cos.max() - th.plateau_delta))
    stalled, evals = float(epochs[-1] - epochs[i]), len(cos) - i
    if stalled >= th.plateau_epochs or (stalled >= FLAT_SHARE * float(epochs[-1]) and evals >= FLAT_EVALS):
        return float(epochs[i]), stalled, evals
    return None


def set_name(run: Run) -> str:
    return f"{data_dir(run)} ({run.config.data.val_split if run.config else 'val'})"


def diagnose_data_limit(run: Run, th: Thresholds) -> Finding | None:
    """A best val cos within CEILING_MARGIN of the data's ceiling: the frontal references, not the model, set the limit."""
    b, c = run.best(), run.ceiling()
    if b is None or c is None or b["cos"] < c["cos"] - CEILING_MARGIN:
        return None
    evidence = (
        f"best val cos {b['cos']:.4f} (epoch {ep(b['epoch'])}) is within {num(CEILING_MARGIN)} of the "
        f"{ceiling_note(c)} of {set_name(run)}: same-identity frontal embeddings agree only to cos "
        f"{c['pair_cos']:.4f}, so no model's mean cos to a frontal can exceed about {c['cos']:.4f}"
    )
    flat = flat_since(run, th)
    if flat is not None:
        evidence += f"; val cos has been flat since epoch {ep(flat[0])}"
    rec = (
        "this is the data's limit: more capacity or epochs will not help. What will: better or more frontal "
        "references per identity (sharper, more frontal, better-lit images), more identities, or "
    )
    if run.config is not None and run.config.data.target == "centroid":
        rec += "a cleaner centroid (the run already trains against --target centroid)"
    else:
        rec += "training against the identity's frontal centroid (--target centroid"
        if run.config is not None and not shard_set_has(run, "tgt_centroid"):
            rec += "; this shard set has no tgt_centroid: `dist-train extract` writes it"
        rec += ")"
    return Finding("data_limit", "info", evidence, rec)


def shard_set_has(run: Run, name: str) -> bool:
    try:
        fields = json.loads((Path(run.config.data.data_dir[0]) / "index.json").read_text()).get("fields", [])
    except (OSError, ValueError, AttributeError, TypeError):  # no config or no data_dir
        return False
    return name in fields


def setup_flags(run: Run) -> list[str]:
    """Model-setup changes to try, from wherever the run is: tokens, learning rate, warm-up, residual head."""
    if run.config is None:
        return ["--emb_tokens chunked", "--lr 3e-4", "--warmup_epochs 1", "--residual_mlp true"]
    m, o, t = run.config.model, run.config.optim, run.config.train
    flags = []
    if m.emb_tokens == "whole":
        flags.append("--emb_tokens chunked --emb_chunks 16 (the embedding as 16 tokens, not one)")
    if o.lr < 1e-3:
        flags.append(f"--lr {num(min(3 * o.lr, 1e-3))} (the lr was {num(o.lr)})")
    if o.warmup_epochs > max(1.0, 0.05 * t.epochs):
        flags.append(f"--warmup_epochs {num(max(1.0, round(0.05 * t.epochs)))} (warm-up was {num(o.warmup_epochs)})")
    if not m.residual_mlp:
        flags.append("--residual_mlp true (a head that starts from the identity map, as the probe does)")
    if m.gate == "none":
        flags.append("--gate learned")
    return flags or [f"--lr {num(o.lr / 3)} (the setup flags are already the recommended ones: try a lower lr)"]


def diagnose_below_probe(run: Run, th: Thresholds) -> Finding | None:
    """The Transformer does worse than closed-form ridge on the same split: the model setup is the bottleneck."""
    b, p = run.best(), run.probe()
    if b is None or p is None or b["cos"] >= p["mean_cos"] - PROBE_MARGIN:
        return None
    evidence = (
        f"best val cos {b['cos']:.4f} (epoch {ep(b['epoch'])}) is below a linear probe's {p['mean_cos']:.4f} on "
        f"{set_name(run)} (ridge on [src_emb, pose], fitted in closed form): a linear map does better than the model"
    )
    worse = [
        k
        for k, v in run.yaw_at(b["step"]).items()
        if k in p["per_yaw"] and v["cos"] < p["per_yaw"][k]["cos"] - PROBE_MARGIN
    ]
    if worse:
        evidence += f"; below the probe in |yaw| buckets {', '.join(worse)}"
    c = run.ceiling()
    if c is not None:
        evidence += f"; {ceiling_note(c)}"
    rec = "the model setup is the bottleneck, not capacity or data: try " + "; ".join(setup_flags(run))
    progress = recent_progress(run, th.plateau_epochs)
    if progress is not None and progress > th.plateau_delta:
        rec = "val cos is still rising, but slowly for a model that starts below ridge; " + rec
    return Finding("below_probe", "warning", evidence, rec)


def diagnose_probe_to_ceiling(run: Run, th: Thresholds) -> Finding | None:
    """Flat between the linear probe and the data ceiling: capacity, regularisation or data quantity."""
    b, p, c = run.best(), run.probe(), run.ceiling()
    if b is None or p is None or c is None or (b["gain"] is not None and b["gain"] < th.min_gain):
        return None
    if b["oracle"] is not None:  # synthetic data: the oracle is the sharper ceiling (oracle_gap, plateau)
        return None
    if b["cos"] < p["mean_cos"] - PROBE_MARGIN or b["cos"] >= c["cos"] - CEILING_MARGIN:
        return None
    flat = flat_since(run, th)
    if flat is None:
        return None
    start, stalled, evals = flat
    evidence = (
        f"val cos has stayed within {num(th.plateau_delta)} of its best {b['cos']:.4f} since epoch {ep(start)} "
        f"({ep(stalled)} epochs, {evals} evaluations), between the linear probe {p['mean_cos']:.4f} and the "
        f"{ceiling_note(c)}: the model beats a linear map but leaves {c['cos'] - b['cos']:.4f} of what the "
        "frontal references allow"
    )
    rec = f"capacity, regularisation or data quantity: next rung: {next_rung(run)}"
    r = ratio_tail(run)
    if r is not None and r[2] > th.overfit_ratio:
        rec += (
            f"; the val/train loss ratio {r[2]:.2f} says regularise first ({regularise_flags(run)}) or add identities"
        )
    else:
        rec += "; with more data (identities) the same model may also climb"
    return Finding("probe_to_ceiling", "warning", evidence, rec)


def ratio_tail(run: Run) -> tuple[np.ndarray, np.ndarray, float] | None:
    c = run.val("val_train_loss_ratio")
    if c is None:
        return None
    return c[0], c[1], float(np.median(c[1][-RATIO_TAIL:]))


def diagnose_overfitting(run: Run, th: Thresholds) -> Finding | None:
    r = ratio_tail(run)
    if r is None or r[2] <= th.overfit_ratio:
        return None
    epochs, ratio, tail = r
    evidence = (
        f"val/train loss ratio {tail:.2f} (median of the last {min(RATIO_TAIL, len(ratio))} evaluations, to epoch "
        f"{ep(epochs[-1])}), above {num(th.overfit_ratio)} first at epoch {ep(epochs[np.argmax(ratio > th.overfit_ratio)])}"
    )
    rec = (
        f"regularise: {regularise_flags(run)}; more identities or samples per identity help most (measured: "
        "augmentation buys robustness to landmark error and missing parts, not val cos; BENCHMARKS.md §4, family B)"
    )
    b = run.best()
    if b is not None and b["epoch"] < epochs[-1]:
        rec += f"; the best val cos was at epoch {ep(b['epoch'])}: export that checkpoint"
    return Finding("overfitting", "warning", evidence, rec)


def diagnose_low_ratio(run: Run, th: Thresholds) -> Finding | None:
    r = ratio_tail(run)
    if r is None or r[2] >= th.low_ratio or (run.config and not run.config.model.dropout):
        return None
    dropout = run.config.model.dropout if run.config else 0.15
    return Finding(
        "low_loss_ratio",
        "info",
        f"val/train loss ratio {r[2]:.2f} (to epoch {ep(r[0][-1])}), under {num(th.low_ratio)}: little overfitting",
        f"if val cos stalls, regularisation can be lowered: --dropout {num(round(max(0.0, dropout - 0.05), 2))}",
    )


def lr_after_peak(run: Run):
    """(epochs, lr, index of the peak, peak) of the logged lr, or None."""
    c = run.train("lr")
    if c is None or len(c[1]) < 3:
        return None
    k = int(np.argmax(c[1]))
    return c[0], c[1], k, float(c[1][k])


def diagnose_warmup(run: Run, th: Thresholds) -> Finding | None:
    """The warmup must be a straight line from warmup_lr to lr (design notes: "confirm warmup is linear")."""
    p = lr_after_peak(run)
    if p is None:
        return None
    epochs, lr, k, peak = p
    ramp = (np.arange(len(lr)) < k) & (lr < 0.95 * peak)  # the interval holding the warmup's end mixes in the cosine
    if ramp.sum() < 3:
        return None
    x, y = epochs[ramp], lr[ramp]
    dev = float(np.abs(np.polyval(np.polyfit(x, y, 1), x) - y).max() / peak)
    if dev <= WARMUP_LINEARITY_TOL:
        return None
    return Finding(
        "lr_warmup_not_linear",
        "warning",
        f"the lr rose from {num(float(y[0]))} to its peak {num(peak)} by epoch {ep(epochs[k])} but up to {dev:.0%} "
        "of the peak off a straight line",
        "the schedule warms up linearly from --warmup_lr to --lr over --warmup_epochs: look for a resume that "
        "changed warmup_epochs, batch size or process count during the warmup",
    )


def diagnose_lr_decays_early(run: Run, th: Thresholds) -> Finding | None:
    p = lr_after_peak(run)
    if p is None:
        return None
    epochs, lr, k, peak = p
    low = lr[k:] < LR_COLLAPSE_FRACTION * peak
    if low.mean() <= LR_COLLAPSED_SHARE_MAX:
        return None
    return Finding(
        "lr_decays_early",
        "warning",
        f"the lr fell below {LR_COLLAPSE_FRACTION:.0%} of its peak {num(peak)} at epoch {ep(epochs[k:][np.argmax(low)])} "
        f"and spent {low.mean():.0%} of the run after the warmup there (to epoch {ep(epochs[-1])})",
        "keep the lr useful for longer: let the cosine span the whole run (--epochs, no smaller --max_steps), or "
        "--scheduler_type cosine_restarts; and --cosine_eta_min 1e-5",
    )


def diagnose_lr_floor(run: Run, th: Thresholds) -> Finding | None:
    """Epochs spent below LR_FLOOR without val progress were wasted (design notes: "min lr 1e-6 may be too low")."""
    p, c = lr_after_peak(run), run.val("mean_cos")
    if p is None or c is None:
        return None
    epochs, lr, k, _ = p
    low = (np.arange(len(lr)) > k) & (lr < LR_FLOOR)
    if not low.any():
        return None
    start = float(epochs[np.argmax(low)])
    span = epochs[-1] - start
    before = c[0] <= start
    gained = float(c[1].max() - (c[1][before].max() if before.any() else c[1][0]))
    if span < LR_FLOOR_EPOCHS or gained > th.plateau_delta:
        return None
    return Finding(
        "lr_floor_too_low",
        "warning",
        f"lr below {num(LR_FLOOR)} from epoch {ep(start)} to {ep(epochs[-1])} (down to {num(float(lr[k:].min()))}); "
        f"val cos gained {gained:+.4f} in those {ep(span)} epochs",
        f"raise the floor: --cosine_eta_min {num(LR_FLOOR)}, or stop the run at epoch {ep(start)}",
    )


def mse_to_cos_ratio() -> float:
    """Gradient scale of the MSE term relative to the cosine term, unit vectors, equal weights (~1/256)."""
    from dist_train.losses import mse_to_cos_gradient_ratio  # here: losses pulls in torch, nothing else here needs it

    return float(mse_to_cos_gradient_ratio())


def diagnose_loss_balance(run: Run, th: Thresholds) -> Finding | None:
    """At equal weight the MSE term's gradient is ~1/256 of the cosine term's, so most MSE weights are a no-op."""
    if run.config is None:
        return None
    m, c = run.config.loss.mse_weight, run.config.loss.cosine_weight
    if m == 0 or c == 0:
        return None
    r = mse_to_cos_ratio()
    share = m * r / (m * r + c)
    if LOSS_SHARE_MIN <= share <= 1 - LOSS_SHARE_MIN:
        return None
    weights = f"--mse_weight {num(m)} --cosine_weight {num(c)}"
    if share < LOSS_SHARE_MIN:
        evidence = (
            f"{weights}: for unit embeddings the MSE gradient is 1/{1 / r:.0f} of the cosine term's at equal "
            f"weight, so MSE carries {share:.2%} of the gradient and the run is in effect cosine-only"
        )
        rec = f"drop MSE (--mse_weight 0 --cosine_weight 1) or rescale it to matter (--mse_weight {c / r:.0f} gives it half the gradient)"
        if run.config.loss.contrastive_weight == 0:
            rec += ", or add the identity-separating term (--contrastive_weight 0.1)"
    else:
        evidence = f"{weights}: the cosine term carries {1 - share:.2%} of the gradient; the run is in effect MSE-only"
        rec = f"rebalance: --mse_weight {num(c / r)} gives both terms half the gradient"
    return Finding("loss_balance", "info", evidence, rec)


def diagnose_verification(run: Run, th: Thresholds) -> Finding | None:
    """Judged by TAR at FAR 1e-3: a fall from its best, or below the do-nothing baseline, is identities being merged.

    A regression toward the population mean raises the mean impostor cos without hurting
    verification, so a rising impostor cos alone is not a finding when TAR is logged.
    """
    tar = run.curve(tar_tag("pred"))
    if tar is None:
        return diagnose_impostor_rising(run, th)
    if len(tar[1]) < 2:
        return None
    epochs, t = tar
    j = int(np.argmax(t))
    last_step = run.scalars[tar_tag("pred")][0][-1]
    base = run.at(tar_tag("baseline"), last_step)
    dropped = t[j] - t[-1] >= TAR_DROP
    below = base is not None and t[-1] < base - TAR_DROP
    if not (dropped or below):
        return None
    evidence = (
        f"TAR at FAR 1e-3 {t[-1]:.4f} at epoch {ep(epochs[-1])} (false-reject rate {1 - t[-1]:.4f}), "
        f"best {t[j]:.4f} at epoch {ep(epochs[j])}"
    )
    if base is not None:
        evidence += f", identity baseline {base:.4f} (false-reject rate {1 - base:.4f})"
    imp = run.val("impostor_cos")
    if imp is not None:
        evidence += f"; mean impostor cos {imp[1][int(np.argmin(imp[1]))]:.4f} -> {imp[1][-1]:.4f}"
    p = run.probe()
    if p is not None and p.get("tar_at_far", {}).get(VERIFY_FAR):
        evidence += f"; linear probe {p['tar_at_far'][VERIFY_FAR]['pred']:.4f}"
    cw = run.config.loss.contrastive_weight if run.config else 0.0
    rec = f"--contrastive_weight {num(2 * cw) if cw else '0.1'} (identity-masked InfoNCE keeps identities apart)"
    if dropped:
        rec += f"; the best verification was at epoch {ep(epochs[j])}: --monitor tar@0.001 keeps that model"
    return Finding("verification_drop", "warning", evidence + ": different people are being pulled together", rec)


def diagnose_impostor_rising(run: Run, th: Thresholds) -> Finding | None:
    """Without TAR@FAR logged: judged by the mean impostor cos alone (regression can pull identities together)."""
    c = run.val("impostor_cos")
    if c is None or len(c[1]) < 2:
        return None
    epochs, imp = c
    j = int(np.argmin(imp))
    if imp[-1] - imp[j] < IMPOSTOR_RISE:
        return None
    base = run.at(val_tag("baseline_impostor_cos"), run.scalars[val_tag("impostor_cos")][0][-1])
    evidence = (
        f"mean impostor cos rose from {imp[j]:.4f} (epoch {ep(epochs[j])}) to {imp[-1]:.4f} (epoch {ep(epochs[-1])})"
    )
    if base is not None:
        evidence += f", identity baseline {base:.4f}"
    cw = run.config.loss.contrastive_weight if run.config else 0.0
    rec = f"--contrastive_weight {num(2 * cw) if cw else '0.1'} (identity-masked InfoNCE keeps identities apart)"
    evidence += ": different people may be pulled together (no TAR@FAR logged: judged by impostor cos alone)"
    return Finding("impostor_rising", "warning", evidence, rec)


def diagnose_skipped_steps(run: Run, th: Thresholds) -> Finding | None:
    if TRAIN_TAGS["skipped_steps"] not in run.scalars:
        return None
    steps, skipped = run.scalars[TRAIN_TAGS["skipped_steps"]]
    after = np.flatnonzero(steps >= SKIP_CALIBRATION_STEPS)
    if len(after) < 2:
        return None
    i = after[0]
    rate = (skipped[-1] - skipped[i]) / max(steps[-1] - steps[i], 1)
    if rate <= SKIP_RATE_MAX:
        return None
    evidence = (
        f"{skipped[-1]:.0f} of {steps[-1]} optimizer steps skipped on fp16 overflow, {rate:.1%} after the loss "
        f"scaler's first {SKIP_CALIBRATION_STEPS} steps"
    )
    scale = run.train("loss_scale")
    if scale is not None:
        evidence += f"; loss scale fell to {scale[1].min():g}"
    return Finding(
        "skipped_steps",
        "warning",
        evidence,
        "each skipped step is a lost batch: --precision bf16 where the GPU has it (no loss scaling), otherwise "
        "a lower --lr or --grad_clip 0.5",
    )


def diagnose_nonfinite(run: Run, th: Thresholds) -> Finding | None:
    if TRAIN_TAGS["nonfinite_steps"] not in run.scalars:
        return None
    steps, n = run.scalars[TRAIN_TAGS["nonfinite_steps"]]
    if n[-1] == 0:
        return None
    lr = run.config.optim.lr if run.config else 1e-4
    return Finding(
        "nonfinite_steps",
        "warning",
        f"{n[-1]:.0f} optimizer steps had a non-finite loss and were skipped (the last by step {steps[np.argmax(n == n[-1])]})",
        f"--lr {num(lr / 2)}, --grad_clip 1 or lower, --precision bf16 or fp32 instead of fp16; "
        f"`dist-train inspect {data_dir(run)}` for NaN or extreme values",
    )


def diagnose_bad_samples(run: Run, th: Thresholds) -> Finding | None:
    if TRAIN_TAGS["bad_samples"] not in run.scalars:
        return None
    steps, bad = run.scalars[TRAIN_TAGS["bad_samples"]]
    if bad[-1] == 0:
        return None
    seen = run.at(TRAIN_TAGS["samples_seen"], steps[-1])
    rate = bad[-1] / seen if seen else float("nan")
    return Finding(
        "bad_samples",
        "warning" if not rate <= BAD_SAMPLE_RATE_MAX else "info",
        f"{bad[-1]:.0f} corrupt or undecodable samples skipped by the loader ({rate:.2%} of {seen or 0:.0f} read)",
        f"`dist-train inspect {data_dir(run)}` names the damaged shards: re-pack or re-extract them",
    )


DIAGNOSES = (
    diagnose_no_gain,
    diagnose_plateau,
    diagnose_oracle_gap,
    diagnose_data_limit,
    diagnose_below_probe,
    diagnose_probe_to_ceiling,
    diagnose_overfitting,
    diagnose_low_ratio,
    diagnose_warmup,
    diagnose_lr_decays_early,
    diagnose_lr_floor,
    diagnose_loss_balance,
    diagnose_verification,
    diagnose_skipped_steps,
    diagnose_nonfinite,
    diagnose_bad_samples,
)


def diagnose(run: Run, th: Thresholds) -> list[Finding]:
    """All findings, most severe first."""
    found = [f for d in DIAGNOSES if (f := d(run, th)) is not None]
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))


def data_summary(run: Run, b: dict) -> dict:
    """The ceiling, the probe and the false-reject rates at FAR 1e-3 (model at its best, baseline, probe)."""
    c, p = run.ceiling(), run.probe()
    frr = {"model": b.get("frr"), "baseline": b.get("baseline_frr"), "probe": None}
    if p is not None and p.get("tar_at_far", {}).get(VERIFY_FAR):
        frr["probe"] = 1.0 - p["tar_at_far"][VERIFY_FAR]["pred"]
        if frr["baseline"] is None:
            frr["baseline"] = 1.0 - p["tar_at_far"][VERIFY_FAR]["baseline"]
    return {
        "data_ceiling": None if c is None else c["cos"],
        "data_ceiling_ci95": None if c is None else c.get("ci95"),
        "data_ceiling_identities": None if c is None else c["n_identities"],
        "linear_probe_cos": None if p is None else p["mean_cos"],
        "frr_at_far_1e-3": frr,
        "data_notes": run.data.get("notes", []),
    }


def last_value(run: Run, tag: str) -> float | None:
    return float(run.scalars[tag][1][-1]) if tag in run.scalars else None


def summarize(run: Run) -> dict:
    b = run.best() or {}
    ratio = ratio_tail(run)
    lr = run.train("lr")
    cos = run.val("mean_cos")
    return {
        "plan": plan_label(run),
        "steps": int(max(s[-1] for s, _ in run.scalars.values())),
        "epochs": round(run.last_epoch(), 3),
        "evaluations": 0 if cos is None else len(cos[1]),
        "best_val_cos": b.get("cos"),
        "best_epoch": b.get("epoch"),
        "best_step": b.get("step"),
        "identity_baseline_cos": b.get("baseline"),
        "gain": b.get("gain"),
        "oracle_cos": b.get("oracle"),
        "fraction_of_oracle_gap": b.get("fraction"),
        "last_val_cos": None if cos is None else float(cos[1][-1]),
        "val_train_loss_ratio": None if ratio is None else ratio[2],
        "lr_peak": None if lr is None else float(lr[1].max()),
        "lr_last": None if lr is None else float(lr[1][-1]),
        "impostor_cos": last_value(run, val_tag("impostor_cos")),
        "baseline_impostor_cos": last_value(run, val_tag("baseline_impostor_cos")),
        **data_summary(run, b),
        "skipped_steps": last_value(run, TRAIN_TAGS["skipped_steps"]),
        "nonfinite_steps": last_value(run, TRAIN_TAGS["nonfinite_steps"]),
        "bad_samples": last_value(run, TRAIN_TAGS["bad_samples"]),
        "augmentation": augment.describe(run.config.augment) if run.config else "unknown (no config.yaml)",
    }


# ---- output -------------------------------------------------------------------------------------


def fmt(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_line(name: str, s: dict) -> str:
    if s["best_val_cos"] is None:
        return f"{name} [{s['plan']}]: {ep(s['epochs'])} epochs, {s['steps']} steps, no evaluation yet"
    line = (
        f"{name} [{s['plan']}]: {ep(s['epochs'])} epochs, {s['steps']} steps; best val cos {s['best_val_cos']:.4f} "
        f"at epoch {ep(s['best_epoch'])}, identity baseline {fmt(s['identity_baseline_cos'])}, gain {fmt(s['gain'], '+.4f')}"
    )
    if s["oracle_cos"] is not None:
        line += f", oracle {s['oracle_cos']:.4f} ({fmt(s['fraction_of_oracle_gap'], '.0%')} of the gap closed)"
    if s.get("linear_probe_cos") is not None:
        line += f", linear probe {s['linear_probe_cos']:.4f}"
    if s.get("data_ceiling") is not None:
        ci = s["data_ceiling_ci95"]
        line += f", data ceiling {s['data_ceiling']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
    frr = s.get("frr_at_far_1e-3") or {}
    if any(v is not None for v in frr.values()):
        line += "; false-reject rate at FAR 1e-3: " + ", ".join(f"{k} {fmt(v)}" for k, v in frr.items())
    return line + f"; augmentation: {s['augmentation']}"


def render_markdown(results: list[dict], plots: list[Path], th: Thresholds) -> str:
    lines = ["# Training report", ""]
    lines += [
        "| run | plan | epochs | best val cos (epoch) | identity baseline | gain | oracle | gap closed | linear probe "
        "| data ceiling | FRR@1e-3 model / probe / baseline | val/train | findings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        best = "n/a" if s["best_val_cos"] is None else f"{s['best_val_cos']:.4f} ({ep(s['best_epoch'])})"
        codes = ", ".join(f["code"] for f in r["findings"]) or "none"
        ceiling = fmt(s["data_ceiling"])
        if s["data_ceiling_ci95"]:
            ceiling += f" [{s['data_ceiling_ci95'][0]:.3f}, {s['data_ceiling_ci95'][1]:.3f}]"
        frr = " / ".join(fmt(s["frr_at_far_1e-3"][k]) for k in ("model", "probe", "baseline"))
        lines.append(
            f"| {r['run']} | {s['plan']} | {ep(s['epochs'])} | {best} | {fmt(s['identity_baseline_cos'])} | "
            f"{fmt(s['gain'], '+.4f')} | {fmt(s['oracle_cos'])} | {fmt(s['fraction_of_oracle_gap'], '.0%')} | "
            f"{fmt(s['linear_probe_cos'])} | {ceiling} | {frr} | {fmt(s['val_train_loss_ratio'], '.2f')} | {codes} |"
        )
    lines += ["", "## Curves", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    for r in results:
        lines += ["", f"## {r['run']}", "", f"`{r['path']}` — plan: {r['summary']['plan']}", ""]
        lines += [f"- {note}" for note in r["summary"]["data_notes"]] + ([""] if r["summary"]["data_notes"] else [])
        if not r["findings"]:
            lines.append("No findings: nothing in the curves calls for a change.")
        for i, f in enumerate(r["findings"], 1):
            lines += [f"{i}. **{f['severity']}: {f['code']}** — {f['evidence']}", f"   - next: {f['recommendation']}"]
    lines += [
        "",
        f"Thresholds: plateau {num(th.plateau_delta)} over {num(th.plateau_epochs)} epochs, minimum gain "
        f"{num(th.min_gain)}, val/train ratio {num(th.low_ratio)}/{num(th.overfit_ratio)}.",
        "",
    ]
    return "\n".join(lines)


def unique_names(runs: list[Run]) -> None:
    """Two runs with the same folder name (runs/a/x, runs/b/x) are told apart by their parent."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dist-train report",
        description="Read the TensorBoard curves of one or more runs, plot them and diagnose what to change next.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output_dir of a `dist-train train` run")
    p.add_argument(
        "--out", default=None, help="folder for report.md and the plots (default RUN_DIR/report, or ./report)"
    )
    p.add_argument("--json", action="store_true", help="print the summaries and findings as JSON instead of text")
    p.add_argument("--plateau_epochs", type=float, default=PLATEAU_EPOCHS, help="W: epochs without progress")
    p.add_argument("--plateau_delta", type=float, default=PLATEAU_DELTA, help="val cos gain that counts as progress")
    p.add_argument("--min_gain", type=float, default=MIN_GAIN, help="least val cos gain over the identity baseline")
    p.add_argument(
        "--overfit_ratio", type=float, default=OVERFIT_RATIO, help="val/train loss ratio that is overfitting"
    )
    p.add_argument("--low_ratio", type=float, default=LOW_RATIO, help="val/train ratio below which to regularise less")
    p.add_argument(
        "--data",
        choices=("run", "cached", "off"),
        default="run",
        help="the shard set's data ceiling and linear probe: compute what is not cached (run, default), only read "
        "the probe's cache (cached; the ceiling is always computed), or neither (off)",
    )
    return cli.parse_args(p, argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    th = Thresholds(args.plateau_epochs, args.plateau_delta, args.min_gain, args.overfit_ratio, args.low_ratio)
    try:
        runs = [load_run(d) for d in args.runs]
    except ReportError as e:
        print(f"dist-train report: error: {e}", file=sys.stderr)
        return 2
    unique_names(runs)
    for r in runs:
        attach_data(r, args.data)
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "report" if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out, th)
    results = [
        {"run": r.name, "path": str(r.path), "summary": summarize(r), "findings": [asdict(f) for f in diagnose(r, th)]}
        for r in runs
    ]
    report = out / "report.md"
    report.write_text(render_markdown(results, plots, th))
    payload = {"runs": results, "report": str(report), "plots": [str(p) for p in plots]}
    (out / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    for r in results:
        print(summary_line(r["run"], r["summary"]))
        for f in r["findings"]:
            print(f"  [{f['severity']}] {f['code']}: {f['evidence']}\n      -> {f['recommendation']}")
        if not r["findings"]:
            print("  no findings")
    print(f"report: {report} ({len(plots)} plots)")
    return 0
