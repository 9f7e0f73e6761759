"""Diagnoses of verification: different identities pulled together, judged by TAR at FAR 1e-3 where it is logged."""

from __future__ import annotations

import numpy as np

from dist_train.report.finding import Finding
from dist_train.report.run import Run, tar_tag, val_tag
from dist_train.report.spell import ep, num
from dist_train.report.thresholds import IMPOSTOR_RISE, TAR_DROP, VERIFY_FAR, Thresholds


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
