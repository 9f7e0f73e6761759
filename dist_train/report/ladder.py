"""The preset ladder the design notes climb when a run stalls, and which rung a run's config is on.

A rung is a configs/ preset; it is named so (not a "plan") to keep it apart from the trainer's
batch `Plan`. The report still labels it "plan" in its output, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dist_train import config as config_mod
from dist_train.report.spell import data_dir, num

if TYPE_CHECKING:
    from dist_train.report.run import Run


LADDER = ("base", "plan1-loss", "plan2-capacity", "plan3-batch", "xl")
"""configs/ presets in the order the design notes climb them when a run stalls."""
RUNG_KEYS = (
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
"""Config fields that define a rung (data paths, seeds and output folders do not)."""
CAPACITY_KEYS = ("d_model", "nhead", "num_layers", "dim_feedforward", "dropout")
"""Fields never stepped down when moving to the next rung (plan3-batch has less capacity than plan2)."""


def rung_values(cfg: config_mod.Config) -> dict:
    return {k: getattr(getattr(cfg, config_mod.FLAT[k][0]), k) for k in RUNG_KEYS}


def preset_values(name: str) -> dict:
    return rung_values(config_mod.build({**config_mod.load_yaml(name), "data_dir": None}))


def match_rung(cfg: config_mod.Config) -> tuple[str, dict]:
    """The preset whose rung fields differ least from the run's (ladder presets win ties)."""
    names = list(LADDER) + sorted(p.stem for p in config_mod.CONFIG_DIR.glob("*.yaml") if p.stem not in LADDER)
    run_vals = rung_values(cfg)
    best = None
    for name in names:
        pv = preset_values(name)
        diff = {k: (run_vals[k], pv[k]) for k in RUNG_KEYS if run_vals[k] != pv[k]}
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    return best


def rung_label(run: Run) -> str:
    if run.config is None:
        return "unknown (no config.yaml)"
    if not run.rung_diff:
        return run.rung
    diff = ", ".join(f"{k} {num(a)} (preset {num(b)})" for k, (a, b) in run.rung_diff.items())
    return f"custom, closest {run.rung}: {diff}"


def next_rung(run: Run) -> str:
    """The next preset up the ladder, keeping any capacity the run already has."""
    if run.config is None:
        return f"--config {LADDER[1]} (the run has no config.yaml, so its plan is unknown)"
    pos = LADDER.index(run.rung) if run.rung in LADDER else 0
    if pos + 1 == len(LADDER):
        return (
            f"the preset ladder ends at {LADDER[-1]}: look at the data — `dist-train inspect {data_dir(run)}` "
            "(pairing, yaw coverage, abnormal samples) —, train against identity centroids (--target centroid) "
            "and add data"
        )
    nxt = LADDER[pos + 1]
    have, preset = rung_values(run.config), preset_values(nxt)
    bigger = [k for k in CAPACITY_KEYS if have[k] > preset[k]]
    keep = [f"--{k} {num(have[k])}" for k in bigger]
    changes = [f"{k} {num(have[k])}->{num(preset[k])}" for k in RUNG_KEYS if have[k] != preset[k] and k not in bigger]
    return " ".join([f"--config {nxt}", *keep]) + (f" ({', '.join(changes)})" if changes else "")
