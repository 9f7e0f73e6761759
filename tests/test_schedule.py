"""lr_at: linear warmup, cosine, SGDR restarts and constant, checked against exact values and torch's schedulers."""

from __future__ import annotations

import pytest
import torch

from dist_train.config import OptimConfig
from dist_train.schedule import lr_at, warmup_steps

LR, WARMUP_LR, ETA_MIN = 1e-3, 1e-5, 2e-5
SPE = 5  # steps per epoch


def optim(**kw) -> OptimConfig:
    base = dict(lr=LR, warmup_lr=WARMUP_LR, cosine_eta_min=ETA_MIN, warmup_epochs=2.0)
    return OptimConfig(**(base | kw))


def torch_lrs(make_scheduler, n: int) -> list[float]:
    """What a torch scheduler yields for steps 0..n-1, one scheduler.step() per optimizer step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = make_scheduler(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", ["cosine", "cosine_restarts", "constant"])
def test_warmup_is_linear_and_reaches_lr(kind):
    cfg = optim(scheduler_type=kind)
    assert warmup_steps(cfg, SPE) == 10
    for step in range(10):
        assert lr_at(step, cfg, SPE, 100) == pytest.approx(WARMUP_LR + (LR - WARMUP_LR) * step / 10, rel=1e-12)
    assert lr_at(10, cfg, SPE, 100) == pytest.approx(LR, rel=1e-12)


def test_fractional_and_zero_warmup():
    assert warmup_steps(optim(warmup_epochs=0.5), 7) == 4  # 3.5 steps, rounded half up
    assert warmup_steps(optim(warmup_epochs=0.4), 7) == 3  # 2.8 steps
    assert lr_at(0, optim(warmup_epochs=0.0), SPE, 100) == pytest.approx(LR)
    # a run shorter than its warmup stays in warmup
    assert lr_at(5, optim(), SPE, 3) == pytest.approx(WARMUP_LR + (LR - WARMUP_LR) * 0.5)


def test_cosine_decays_monotonically_to_eta_min_like_torch():
    cfg, total = optim(scheduler_type="cosine"), 100
    lrs = [lr_at(s, cfg, SPE, total) for s in range(total + 20)]
    after = lrs[10 : total + 1]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lrs[total] == pytest.approx(ETA_MIN, rel=1e-12)
    assert lrs[total:] == [ETA_MIN] * 20  # stays there if the run goes on
    want = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total - 10, eta_min=ETA_MIN), 91)
    assert lrs[10 : total + 1] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("period_epochs,mult", [(2.0, 2.0), (3.0, 1.0)])
def test_restarts_jump_back_to_lr_like_torch(period_epochs, mult):
    cfg = optim(scheduler_type="cosine_restarts", restart_period_epochs=period_epochs, restart_mult=mult)
    first = int(period_epochs * SPE)
    lrs = [lr_at(s, cfg, SPE, 100) for s in range(10, 200)]  # after the 10 warmup steps
    restarts = [0, first, first + first * int(mult), first + first * int(mult) + first * int(mult) ** 2]
    for r in restarts:
        assert lrs[r] == pytest.approx(LR, rel=1e-12)
        if r:
            assert lrs[r - 1] < ETA_MIN + 0.03 * (LR - ETA_MIN)  # just before: near the bottom
    want = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=first, T_mult=int(mult), eta_min=ETA_MIN),
        len(lrs),
    )
    assert lrs == pytest.approx(want, rel=1e-9)


def test_restarts_with_a_fractional_multiplier():
    cfg = optim(scheduler_type="cosine_restarts", warmup_epochs=0.0, restart_period_epochs=2.0, restart_mult=1.5)
    lrs = [lr_at(s, cfg, SPE, 100) for s in range(60)]
    # periods of 10, 15, 22.5 steps: restarts at steps 0, 10, 25, and 47.5 -> the first step after it, 48
    jumps = [s for s in range(1, 60) if lrs[s] > lrs[s - 1]]
    assert jumps == [10, 25, 48]
    assert lrs[25] == pytest.approx(LR, rel=1e-12)
    assert lrs[10 + 7] == pytest.approx(
        ETA_MIN + (LR - ETA_MIN) * (1 + torch.cos(torch.tensor(torch.pi * 7 / 15)).item()) / 2
    )


def test_constant_stays_at_lr():
    cfg = optim(scheduler_type="constant")
    assert {lr_at(s, cfg, SPE, 50) for s in range(10, 80)} == {LR}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="step -1 is negative"):
        lr_at(-1, optim(), SPE, 100)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_at(0, optim(), 0, 100)
    with pytest.raises(ValueError, match="scheduler_type: 'linear' is not valid"):
        lr_at(20, optim(scheduler_type="linear"), SPE, 100)
