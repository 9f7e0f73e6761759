"""The loop's components on their own, with small real objects: step statistics, the optimizer step, progress rules.

The end-to-end runs (test_train.py, test_step.py, test_resume.py) show the components together under real
launchers; these pin each rule down in milliseconds, including the cases a run rarely meets.
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from dist_train.checkpoint import TrainState
from dist_train.config import Config, ConfigError, EvalConfig
from dist_train.data.stream import LoaderStats
from dist_train.evaluate import Evaluator
from dist_train.model import model_inputs
from dist_train.optim import Stepper, build_optimizer, lr_table
from dist_train.progress import count_interval, record_eval
from dist_train.runtime import Runtime, deepspeed_config
from dist_train.schedule import lr_at
from dist_train.stepstats import Interval, StepStats
from dist_train.tracking import data_summary

NAN = float("nan")


# ---- step statistics: means over the values that exist ----------------------------------------------


def test_step_stats_average_finite_losses_only_and_norms_of_applied_steps_only():
    stats = StepStats(("mse", "cos"), "cpu", world_size=1)
    t = torch.tensor
    stats.micro(t(0.5), {"mse": t(0.1), "cos": t(0.4)})
    stats.micro(t(NAN), {"mse": t(NAN), "cos": t(0.2)})  # a bad micro batch: its window is skipped
    stats.boundary(t(True), t(NAN))
    stats.micro(t(0.3), {"mse": t(0.2), "cos": t(0.1)})
    stats.micro(t(0.1), {"mse": t(0.0), "cos": t(0.1)})
    stats.boundary(t(False), t(2.0))
    stats.micro(t(0.7), {"mse": t(0.3), "cos": t(0.4)})
    stats.boundary(False, 4.0)  # DeepSpeed hands host values
    interval = stats.read()
    assert (
        interval.steps == 3 and interval.nonfinite == [True, False, False] and interval.skipped == [True, False, False]
    )
    means = interval.means
    assert means["loss"] == pytest.approx((0.5 + 0.3 + 0.1 + 0.7) / 4)  # not / 5: the NaN had no value
    assert means["loss_mse"] == pytest.approx((0.1 + 0.2 + 0.0 + 0.3) / 4)
    assert means["grad_norm"] == pytest.approx(3.0)  # the skipped step's norm is not averaged in
    assert (interval.nonfinite_steps, interval.overflow_steps) == (1, 0)
    assert stats.read().steps == 0, "a read starts a new interval"


def test_intervals_merge_into_the_means_of_all_their_values():
    a = Interval(steps=2, sums={"loss": 1.0}, count=4, norm_sum=2.0, norm_count=1, nonfinite=[0, 0], skipped=[1, 0])
    b = Interval(steps=1, sums={"loss": 2.0}, count=1, norm_sum=4.0, norm_count=1, nonfinite=[1], skipped=[1])
    a.merge(b)
    assert a.means == {"loss": 3.0 / 5, "grad_norm": 3.0}
    assert (a.steps, a.nonfinite_steps, a.overflow_steps) == (3, 1, 1)
    assert Interval().means == {}, "no value: no mean (nothing written), never 0"


# ---- progress: divergence, best model, early stopping ------------------------------------------------


def interval(flags: list[bool], skipped: list[bool] | None = None) -> Interval:
    return Interval(steps=len(flags), nonfinite=flags, skipped=skipped if skipped is not None else flags)


def test_divergence_is_max_bad_steps_non_finite_windows_in_a_row_across_reads():
    state = TrainState(step=10)
    assert count_interval(state, interval([False, True, True, False, True] + [False] * 5), max_bad_steps=3) is None
    assert (state.nonfinite_steps, state.consecutive_nonfinite) == (3, 0)
    state.step = 14
    assert count_interval(state, interval([False, False, True, True]), max_bad_steps=3) is None
    state.step = 16
    assert count_interval(state, interval([True, True]), max_bad_steps=3) == 15, "the run continues across reads"
    assert state.nonfinite_steps == 7 and state.skipped_steps == 0


def test_overflow_skips_are_counted_apart_from_non_finite_losses():
    state = TrainState(step=4)
    count_interval(state, interval([False, True, False, False], skipped=[True, True, False, True]), max_bad_steps=2)
    assert (state.skipped_steps, state.nonfinite_steps, state.applied_steps) == (2, 1, 1)


def m(cos: float, loss: float = 0.5, tar: float = 0.9) -> dict:
    return {"mean_cos": cos, "loss": loss, "tar_at_far": {"0.001": {"pred": tar}, "0.01": {"pred": tar}}}


def test_best_and_patience_follow_min_delta_and_never_a_non_finite_value():
    state = TrainState()
    assert record_eval(state, m(0.70), 10, "mean_cos", min_delta=0.01)
    assert not record_eval(state, m(0.705), 20, "mean_cos", min_delta=0.01)  # within min_delta: not better
    assert not record_eval(state, m(NAN), 30, "mean_cos", min_delta=0.01)  # NaN > best is never asked
    assert not record_eval(state, m(math.inf), 40, "mean_cos", min_delta=0.01)
    assert (state.best_value, state.best_step, state.evals_since_best, state.last_eval_step) == (0.70, 10, 3, 40)
    assert record_eval(state, m(0.72), 50, "mean_cos", min_delta=0.01)
    assert (state.best_step, state.evals_since_best, state.best_cos) == (50, 0, 0.72)


def test_monitor_follows_its_metric_in_its_direction():
    state = TrainState()
    assert record_eval(state, m(0.5, loss=0.30), 1, "loss", min_delta=0.01)  # the first finite value is the best
    assert not record_eval(state, m(0.9, loss=0.295), 2, "loss", min_delta=0.01), "lower by less than min_delta"
    assert record_eval(state, m(0.4, loss=0.20), 3, "loss", min_delta=0.01), "lower loss wins, whatever the cos"
    assert (state.best_value, state.best_cos) == (0.20, 0.4)
    tar = TrainState()
    assert record_eval(tar, m(0.5, tar=0.60), 1, "tar@0.001", min_delta=0.0)
    assert not record_eval(tar, m(0.9, tar=0.55), 2, "tar@0.001", min_delta=0.0)
    assert record_eval(tar, m(0.1, tar=0.61), 3, "tar@0.001", min_delta=0.0) and tar.best_step == 3


@pytest.mark.parametrize("every,steps", [(0, [6, 12]), (4, [4, 6, 8, 12])])
def test_evaluation_is_due_at_epoch_ends_and_every_n_steps(every, steps):
    evaluator = Evaluator(EvalConfig(eval_every_steps=every), None, [], "val", 8, "sample", ".")
    assert [s for s in range(1, 13) if evaluator.due(s, epoch_end=s % 6 == 0)] == steps


def test_the_end_of_run_summary_names_every_row_skipped_repeated_or_left_out():
    state = TrainState(samples_seen=400, nonfinite_steps=2)
    clean = data_summary(LoaderStats(), TrainState(samples_seen=400))
    assert clean == "dist-train: data: 400 samples trained on; no row skipped, repeated or left out"
    line = data_summary(
        LoaderStats(nonfinite_rows=3, unreadable_rows=128, bad_blocks=1, repeats=131, dropped_tail=16), state
    )
    for part in (
        "128 unreadable rows",
        "3 nonfinite rows",
        "1 bad blocks",
        "131 repeats",
        "16 dropped tail",
        "2 non-finite",
    ):
        assert part in line, (part, line)


# ---- the optimizer step ------------------------------------------------------------------------------


def one_process_stepper(grad_clip: float, total_steps: int = 8):
    cfg = Config()
    cfg.optim.grad_clip, cfg.optim.warmup_epochs, cfg.optim.lr, cfg.optim.warmup_lr = grad_clip, 1.0, 1e-2, 1e-3
    cfg.optim.weight_decay = 0.0  # so that only a gradient moves a weight
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    model, optimizer = acc.prepare(model, build_optimizer(model, cfg, fused=True))
    stepper = Stepper(
        model, optimizer, Runtime(acc, "fp32", None), cfg, steps_per_epoch=4, total_steps=total_steps, position=0
    )
    return cfg, acc, model, stepper


def step(acc, model, stepper, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with acc.accumulate(model):
        stepper.set_lr()
        acc.backward(model(x).pow(2).sum())
        return stepper.boundary()


def test_grad_clip_zero_means_no_clipping():
    """Before, clip_grad_norm_(max_norm=0) scaled every gradient to 0: the model never left the baseline."""
    x = torch.full((2, 4), 100.0)
    for clip in (0.0, 1e-3):
        _, acc, model, stepper = one_process_stepper(clip)
        before = model.weight.detach().clone()
        skipped, norm = step(acc, model, stepper, x)
        assert not bool(skipped) and float(norm) > 100, "the norm is the unclipped one"
        # Adam's first step moves every weight with a gradient by the lr (1e-3), clipped or not; a zeroed gradient by 0
        assert float((model.weight - before).abs().min()) == pytest.approx(1e-3, rel=1e-3)


def test_a_non_finite_gradient_changes_nothing_and_holds_the_schedule():
    cfg, acc, model, stepper = one_process_stepper(1.0)
    table = lr_table(cfg, 4, 8)
    assert table[0] == pytest.approx(lr_at(0, cfg.optim, 4, 8)) and table[3] == pytest.approx(lr_at(3, cfg.optim, 4, 8))
    step(acc, model, stepper, torch.ones(2, 4))
    weights = model.weight.detach().clone()
    moments = {k: v.clone() for k, v in stepper.inner.state[model.weight].items()}
    skipped, norm = step(acc, model, stepper, torch.full((2, 4), math.nan))
    assert bool(skipped) and not math.isfinite(float(norm))
    assert torch.equal(model.weight, weights) and all(
        torch.equal(v, moments[k]) for k, v in stepper.inner.state[model.weight].items()
    )
    assert model.weight.grad is None, "nothing of the bad window is left for the next one"
    assert stepper.applied_position() == 1 and stepper.current_lr() == pytest.approx(float(table[1]))
    step(acc, model, stepper, torch.ones(2, 4))
    assert stepper.applied_position() == 2 and not torch.equal(model.weight, weights)


# ---- inputs and precision ----------------------------------------------------------------------------


def test_only_the_embedding_is_cast_to_the_compute_dtype():
    batch = {"src_emb": torch.ones(2, 512), "src_kps": torch.full((2, 68, 3), 3001.0), "src_pose": torch.ones(2, 3)}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        emb, kps, pose = model_inputs(batch, dtype)
        assert emb.dtype == dtype and kps.dtype == pose.dtype == torch.float32
        assert float(kps[0, 0, 0]) == 3001.0, "fp16 would make it 3000, bf16 3008"


def test_deepspeed_fp16_auto_cast_is_off_and_a_json_turning_it_on_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text('{"fp16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    ds, precision = deepspeed_config(Config(), world_size=1, on_gpu=True)
    assert precision == "fp16" and ds["fp16"]["auto_cast"] is False
    path.write_text('{"fp16": {"enabled": true, "auto_cast": true}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match="fp16.auto_cast true, which casts landmarks and pose to fp16"):
        deepspeed_config(Config(), world_size=1, on_gpu=True)
