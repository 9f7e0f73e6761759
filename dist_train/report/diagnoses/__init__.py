"""Every diagnosis of a run, in one list: each is a small function of the run and the thresholds that
returns a `Finding` or None.
"""

from __future__ import annotations

from dist_train.report.diagnoses.health import diagnose_bad_samples, diagnose_nonfinite, diagnose_skipped_steps
from dist_train.report.diagnoses.limits import diagnose_below_probe, diagnose_data_limit, diagnose_probe_to_ceiling
from dist_train.report.diagnoses.loss import diagnose_loss_balance, diagnose_low_ratio, diagnose_overfitting
from dist_train.report.diagnoses.progress import diagnose_no_gain, diagnose_oracle_gap, diagnose_plateau
from dist_train.report.diagnoses.schedule import diagnose_lr_decays_early, diagnose_lr_floor, diagnose_warmup
from dist_train.report.diagnoses.verification import diagnose_verification
from dist_train.report.finding import SEVERITIES, Finding
from dist_train.report.run import Run
from dist_train.report.thresholds import Thresholds

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
