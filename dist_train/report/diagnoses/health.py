"""Diagnoses of lost work: optimizer steps skipped on fp16 overflow or non-finite loss, and corrupt samples."""

from __future__ import annotations

import numpy as np

from dist_train.metrics import TRAIN_TAGS
from dist_train.report.finding import Finding
from dist_train.report.run import Run
from dist_train.report.spell import data_dir, num
from dist_train.report.thresholds import BAD_SAMPLE_RATE_MAX, SKIP_CALIBRATION_STEPS, SKIP_RATE_MAX, Thresholds


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
