"""Diagnoses of the learning-rate schedule: a warmup off its straight line, a cosine that decays too early, a floor too low."""

from __future__ import annotations

import numpy as np

from dist_train.report.finding import Finding
from dist_train.report.run import Run
from dist_train.report.spell import ep, num
from dist_train.report.thresholds import (
    LR_COLLAPSE_FRACTION,
    LR_COLLAPSED_SHARE_MAX,
    LR_FLOOR,
    LR_FLOOR_EPOCHS,
    WARMUP_LINEARITY_TOL,
    Thresholds,
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
