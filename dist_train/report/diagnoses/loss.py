"""Diagnoses of the loss: the val/train ratio (over- and under-regularised) and the balance of its weighted terms."""

from __future__ import annotations

import numpy as np

from dist_train.losses import mse_to_cos_gradient_ratio
from dist_train.report.finding import Finding
from dist_train.report.run import Run
from dist_train.report.spell import ep, num
from dist_train.report.thresholds import LOSS_SHARE_MIN, RATIO_TAIL, Thresholds


def regularise_flags(run: Run) -> str:
    """The design notes' step (dropout 0.15 -> 0.2, weight decay 1e-4 -> 2e-4), from wherever the run is."""
    dropout = run.config.model.dropout if run.config else 0.15
    wd = run.config.optim.weight_decay if run.config else 1e-4
    return f"--dropout {num(round(max(0.2, dropout + 0.05), 2))} --weight_decay {num(max(2e-4, 2 * wd))}"


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


def diagnose_loss_balance(run: Run, th: Thresholds) -> Finding | None:
    """At equal weight the MSE term's gradient is ~1/256 of the cosine term's, so most MSE weights are a no-op."""
    if run.config is None:
        return None
    m, c = run.config.loss.mse_weight, run.config.loss.cosine_weight
    if m == 0 or c == 0:
        return None
    r = float(mse_to_cos_gradient_ratio())  # MSE gradient / cosine gradient at equal weights (~1/256)
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
