"""What the report's diagnoses call a problem, named once with the reason for each number.

The module-level values are the defaults; `Thresholds` holds the five that
`dist-train report` lets a user change on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_train.metrics import VERIFY_FAR  # noqa: F401  (diagnoses and summary read it here with the other numbers)

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
SKIP_CALIBRATION_STEPS = 100
"""fp16 loss scalers skip a handful of steps while calibrating; the skip rate is judged after these steps."""
SKIP_RATE_MAX = 0.01
"""Share of optimizer steps skipped on fp16 overflow above which the batches lost matter."""
BAD_SAMPLE_RATE_MAX = 1e-3
"""Share of corrupt samples above which the data, not luck, is the problem."""
TRAIN_LEARNS_DROP = 0.2
"""Relative fall of the train loss that shows the model is learning something (for a run with no val gain)."""


@dataclass
class Thresholds:
    plateau_epochs: float = PLATEAU_EPOCHS
    plateau_delta: float = PLATEAU_DELTA
    min_gain: float = MIN_GAIN
    overfit_ratio: float = OVERFIT_RATIO
    low_ratio: float = LOW_RATIO
