"""Diagnoses that place a run between its shard set's linear probe and data ceiling.

At the ceiling the data is the limit; below the probe the model setup is; flat between them
capacity, regularisation or data quantity is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dist_train.data.shards import INDEX_NAME
from dist_train.report.diagnoses.loss import ratio_tail, regularise_flags
from dist_train.report.finding import Finding
from dist_train.report.ladder import next_rung
from dist_train.report.run import Run
from dist_train.report.spell import data_dir, ep, num
from dist_train.report.thresholds import CEILING_MARGIN, FLAT_EVALS, FLAT_SHARE, PROBE_MARGIN, Thresholds


def ceiling_note(c: dict) -> str:
    ci = f" [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]" if c.get("ci95") else ""
    return f"data ceiling {c['cos']:.4f}{ci} ({c['n_identities']} identities with >= 2 distinct frontal embeddings)"


def recent_progress(run: Run, window: float) -> float | None:
    """Gain of the best val cos over the last `window` epochs (None for a run shorter than that)."""
    epochs, cos = run.val("mean_cos")
    before = epochs <= epochs[-1] - window
    return float(cos.max() - cos[before].max()) if before.any() else None


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
        fields = json.loads((Path(run.config.data.data_dir[0]) / INDEX_NAME).read_text()).get("fields", [])
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
