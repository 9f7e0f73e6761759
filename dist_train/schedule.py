"""Learning rate as a pure function of the optimizer step, so a resumed run needs only the step count.

Linear warmup from ``warmup_lr`` to ``lr`` over ``warmup_epochs`` epochs, then
one of:

- ``cosine``: cosine from ``lr`` to ``cosine_eta_min`` at ``total_steps``
  (torch's CosineAnnealingLR), ``cosine_eta_min`` after it;
- ``cosine_restarts``: SGDR (torch's CosineAnnealingWarmRestarts): cosine
  periods of ``restart_period_epochs`` epochs, each ``restart_mult`` times
  longer than the one before, jumping back to ``lr`` at each restart, for the
  design notes' "cosine annealing with warm restarts" plateau remedy;
- ``constant``: ``lr``.

Steps count optimizer updates from 0; epochs may be fractional.

`every` is the other schedule of a run: the cadence of periodic work (logging,
evaluation, checkpoints), one rule for all of it.
"""

from __future__ import annotations

import math

from dist_train.config import OptimConfig


def every(count: int, period: int) -> bool:
    """Whether periodic work is due at ``count`` (a step or an epoch); a period of 0 switches it off."""
    return period > 0 and count % period == 0


SCHEDULERS = ("cosine", "cosine_restarts", "constant")


def warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """Whole optimizer steps of warmup (``warmup_epochs * steps_per_epoch``, rounded half up)."""
    return int(cfg.warmup_epochs * steps_per_epoch + 0.5)


def _cosine(lr: float, eta_min: float, position: float, length: float) -> float:
    return eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * position / length)) / 2.0


def _restart_period(t: float, first: float, mult: float) -> tuple[float, float]:
    """(steps into the current period, its length) for SGDR periods first, first*mult, ..."""

    def start(i: int) -> float:
        return first * i if mult == 1 else first * (mult**i - 1) / (mult - 1)

    i = int(t / first) if mult == 1 else int(math.log1p(t * (mult - 1) / first) / math.log(mult))
    while i > 0 and start(i) > t:  # float error at a period boundary
        i -= 1
    while start(i + 1) <= t:
        i += 1
    return t - start(i), first * mult**i


def lr_at(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of a run of ``total_steps`` steps."""
    if step < 0:
        raise ValueError(f"step {step} is negative")
    if steps_per_epoch < 1 or total_steps < 1:
        raise ValueError(f"steps_per_epoch ({steps_per_epoch}) and total_steps ({total_steps}) must be >= 1")
    if cfg.scheduler_type not in SCHEDULERS:
        raise ValueError(f"scheduler_type: {cfg.scheduler_type!r} is not valid; expected one of {list(SCHEDULERS)}")
    warmup = warmup_steps(cfg, steps_per_epoch)
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    if cfg.scheduler_type == "constant":
        return cfg.lr
    if cfg.scheduler_type == "cosine":
        if step >= total_steps:
            return cfg.cosine_eta_min
        return _cosine(cfg.lr, cfg.cosine_eta_min, step - warmup, total_steps - warmup)
    position, length = _restart_period(step - warmup, cfg.restart_period_epochs * steps_per_epoch, cfg.restart_mult)
    return _cosine(cfg.lr, cfg.cosine_eta_min, position, length)
