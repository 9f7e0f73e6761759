"""Diagnoses of val cos progress: against the identity baseline, over the last epochs, and toward the oracle."""

from __future__ import annotations

import numpy as np

from dist_train.metrics import TRAIN_TAGS
from dist_train.report.diagnoses.limits import (
    diagnose_below_probe,
    diagnose_data_limit,
    diagnose_probe_to_ceiling,
    recent_progress,
)
from dist_train.report.diagnoses.loss import regularise_flags
from dist_train.report.finding import Finding
from dist_train.report.ladder import next_rung
from dist_train.report.run import Run, val_tag
from dist_train.report.spell import data_dir, ep, num
from dist_train.report.thresholds import (
    LR_DECAYED_FRACTION,
    ORACLE_FRACTION_CEILING,
    ORACLE_FRACTION_LOW,
    TRAIN_LEARNS_DROP,
    Thresholds,
)


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
