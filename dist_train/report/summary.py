"""A run's headline figures (best val cos and where it stands), the rows of report.md and report.json."""

from __future__ import annotations

from dist_train import augment
from dist_train.metrics import TRAIN_TAGS
from dist_train.report.diagnoses.loss import ratio_tail
from dist_train.report.ladder import rung_label
from dist_train.report.run import Run, val_tag
from dist_train.report.thresholds import VERIFY_FAR


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
        "plan": rung_label(run),
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
