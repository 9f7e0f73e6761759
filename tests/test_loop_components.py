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
from dist_train.plan import Plan, check_resume
from dist_train.preemption import StopRequest
from dist_train.progress import EXIT_DIVERGED, Outcome, RunPolicy, count_interval, record_eval
from dist_train.rundir import RunDir, eval_metrics_name, eval_metrics_step
from dist_train.runtime import Runtime, deepspeed_config
from dist_train.schedule import lr_at
from dist_train.stepstats import Interval, StepStats
from dist_train.tracking import TrainLogger, data_summary

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
    return {"n": 100, "mean_cos": cos, "loss": loss, "tar_at_far": {"0.001": {"pred": tar}, "0.01": {"pred": tar}}}


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


def policy(max_bad_steps: int = 20, **evaluation) -> tuple[RunPolicy, TrainState, list[str]]:
    said: list[str] = []
    state = TrainState()
    return RunPolicy(state, EvalConfig(**evaluation), max_bad_steps, say=said.append), state, said


def test_policy_stops_early_after_patience_evaluations_without_a_better_value():
    run, state, _ = policy(early_stopping_patience=2, early_stopping_min_delta=0.01)
    for step, cos in ((10, 0.70), (20, 0.75), (30, 0.755), (40, 0.80)):  # 0.755: not better by min_delta
        state.step = step
        assert run.judge(m(cos)) == (cos != 0.755) and run.outcome is None
    state.step = 50
    assert not run.judge(m(0.79)) and run.outcome is None
    state.step = 60
    assert not run.judge(m(0.80)) and run.outcome is Outcome.EARLY_STOPPED
    assert (state.best_step, state.best_value) == (40, 0.80)
    said, best = run.summary(run.outcome)[:-1], run.summary(run.outcome)[-1]
    assert said == ["dist-train: early stop at step 60: val mean_cos gained no more than 0.01 for 2 evaluations"]
    assert best == "dist-train: best val mean_cos 0.8000 (val cos 0.8000) at step 40"


def test_policy_patience_zero_never_stops_and_a_non_finite_value_is_said_not_compared():
    run, state, said = policy(early_stopping_patience=0)
    state.step = 5
    assert run.judge(m(0.5))
    for step in range(6, 40):
        state.step = step
        assert not run.judge(m(NAN)) and run.outcome is None
    assert len(said) == 34 and said[0].startswith("dist-train: warning: val mean_cos is nan at step 6")
    assert "not compared with the best (0.5 at step 5)" in said[0]


def test_policy_a_stop_request_outranks_early_stopping_which_outranks_divergence():
    run, state, _ = policy(early_stopping_patience=1, max_bad_steps=2)
    state.step = 4
    run.count(interval([False, False, True, True]))  # diverged at step 4
    assert run.outcome is Outcome.DIVERGED and run.diverged_at == 4
    run.judge(m(0.5))
    state.step = 8
    run.count(interval([True, True, True, True]))
    assert run.diverged_at == 4, "the first step of divergence is the one reported"
    run.judge(m(0.4))
    assert run.outcome is Outcome.EARLY_STOPPED
    run.preempt()
    assert run.outcome is Outcome.PREEMPTED
    assert run.summary(Outcome.DIVERGED)[0].startswith(
        "dist-train: error: 2 consecutive non-finite losses at step 4; checkpoint saved at step 8."
    )


def test_outcomes_say_what_the_run_directory_and_the_exit_code_get():
    assert [o for o in Outcome if o.complete] == [Outcome.FINISHED, Outcome.EARLY_STOPPED]  # DONE + test split
    assert {o: o.exit_code for o in Outcome} == {
        Outcome.FINISHED: 0,
        Outcome.EARLY_STOPPED: 0,
        Outcome.PREEMPTED: 0,  # the job script requeues on PREEMPTED, not on the exit code
        Outcome.DIVERGED: EXIT_DIVERGED,
    }


# ---- plan arithmetic and a resume's geometry -----------------------------------------------------------


def test_plan_counts_steps_from_the_global_batch_and_caps_at_max_steps():
    plan = Plan(micro_batch=32, accumulation=4, world_size=16, samples_per_epoch=100_000)
    assert (plan.global_batch, plan.steps_per_epoch, plan.batches_per_epoch) == (2048, 48, 192)
    assert plan.total_steps(epochs=10, max_steps=None) == 480 and plan.total_steps(epochs=10, max_steps=100) == 100
    assert Plan(32, 4, 16, samples_per_epoch=1000).steps_per_epoch == 1, "an epoch smaller than a batch is one step"
    assert plan.describe() == "micro batch 32 x accumulation 4 x world 16 = global batch 2048"


class FakeAccelerator:
    """What the loop's components use of an Accelerator, on one process."""

    is_main_process = True
    process_index, num_processes = 0, 1

    def __init__(self):
        self.printed: list[str] = []

    def print(self, msg: str) -> None:
        self.printed.append(msg)

    def wait_for_everyone(self) -> None:
        pass


def saved_state(step: int, world: int, micro: int, accumulation: int, offset: int = 0) -> TrainState:
    return TrainState(
        step=step, world_size=world, micro_batch=micro, accumulation=accumulation, schedule_offset=offset,
        data_fingerprint="abc",
    )  # fmt: skip


def test_resume_with_another_world_size_continues_the_schedule_at_the_same_epoch_fraction():
    acc, cfg = FakeAccelerator(), Config()
    runtime = Runtime(acc, "fp32", None)
    plan = Plan(32, 1, 8, samples_per_epoch=25_600)  # 100 steps per epoch
    assert check_resume(saved_state(150, 8, 32, 1, offset=7), plan, "abc", runtime, cfg) == 7, "same geometry"
    assert acc.printed == []
    # saved with 4 processes: 200 steps per epoch; step 300 is 1.5 epochs, which is position 150 now
    assert check_resume(saved_state(300, 4, 32, 1), plan, "abc", runtime, cfg) == 150 - 300
    assert "steps per epoch 200 -> 100, continuing the schedule at epoch 1.500" in acc.printed[0]


def test_resume_refuses_a_changed_geometry_under_deepspeed_and_another_shard_set_unless_allowed():
    cfg = Config()
    plan = Plan(32, 1, 8, samples_per_epoch=25_600)
    with pytest.raises(
        ConfigError, match=r"saved world 4 x micro batch 32 x accumulation 1, now 8 x 32 x 1.*--init_from"
    ):
        check_resume(saved_state(300, 4, 32, 1), plan, "abc", Runtime(FakeAccelerator(), "fp32", 2), cfg)
    with pytest.raises(ConfigError, match="another shard set.*--allow_data_change true"):
        check_resume(saved_state(300, 8, 32, 1), plan, "xyz", Runtime(FakeAccelerator(), "fp32", None), cfg)
    cfg.checkpoint.allow_data_change = True
    assert check_resume(saved_state(300, 8, 32, 1), plan, "xyz", Runtime(FakeAccelerator(), "fp32", None), cfg) == 0


class FakeTrackers(FakeAccelerator):
    """Accelerate's tracker API as the logger uses it: init_trackers, log, get_tracker."""

    trackers: list = []

    def __init__(self, main: bool = True):
        super().__init__()
        self.is_main_process = main
        self.logged: list[tuple[dict, int]] = []
        self.init: tuple = ()
        self.flushes = 0

    def init_trackers(self, name, init_kwargs):
        self.init = (name, init_kwargs)

    def log(self, values: dict, step: int) -> None:
        self.logged.append((values, step))

    def get_tracker(self, name, unwrap=False):
        return self

    def flush(self) -> None:
        self.flushes += 1


def test_logger_writes_interval_means_and_run_counters_at_the_step_and_keeps_the_train_loss_for_val():
    cfg = Config()
    cfg.log.log_every_steps = 4
    acc = FakeTrackers(main=False)  # no progress bar; the values are the same on every rank
    logger = TrainLogger(cfg.log, acc, cfg, start_step=8, total_steps=100, global_batch=64)
    assert acc.init == ("tb", {"tensorboard": {"purge_step": 9, "flush_secs": 30}}), "a resume hides later points"
    assert [s for s in range(1, 13) if logger.due(s)] == [4, 8, 12]
    logger.add(
        Interval(steps=2, sums={"loss": 1.0}, count=4, norm_sum=3.0, norm_count=2, nonfinite=[0, 0], skipped=[0, 0])
    )
    logger.add(
        Interval(steps=2, sums={"loss": 2.0}, count=4, norm_sum=0.0, norm_count=0, nonfinite=[1, 0], skipped=[1, 0])
    )
    state = TrainState(step=12, samples_seen=768, nonfinite_steps=1, skipped_steps=0)
    logger.write(state, LoaderStats(repeats=5, unreadable_rows=3), lr=1e-3, epoch=1.5)
    ((values, step),) = acc.logged
    assert step == 12
    assert values["train/loss"] == pytest.approx(3.0 / 8) and values["train/grad_norm"] == pytest.approx(1.5)
    assert values["train/lr"] == 1e-3 and values["train/epoch"] == 1.5 and values["train/samples_seen"] == 768
    assert values["train/nonfinite_steps"] == 1 and values["train/repeats"] == 5
    assert values["train/bad_samples"] == 3 and values["train/unreadable_rows"] == 3
    assert logger.take_train_loss() == pytest.approx(3.0 / 8) and logger.take_train_loss() is None, "reset per eval"


# ---- the run directory and the stop request -------------------------------------------------------------


def test_run_directory_names_are_the_documented_layout(tmp_path):
    run = RunDir(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in (run.config, run.best_model, run.tb, run.done)] == [
        "config.yaml",
        "best/model.safetensors",
        "tb",
        "DONE",
    ]
    assert run.eval_metrics(120).name == eval_metrics_name(120) == "eval-step00000120.json"
    assert eval_metrics_step("eval-step00000120.json") == 120
    assert eval_metrics_step("test.json") is None and eval_metrics_step("eval-step12.json.tmp") is None


def test_stop_request_from_the_stop_file_is_agreed_and_marked(tmp_path, monkeypatch):
    monkeypatch.delenv("DIST_TRAIN_STOP_FILE", raising=False)
    run = RunDir(tmp_path)
    run.stop.write_text("")  # a stale request of an earlier job: cleared when the run starts
    stop = StopRequest(tmp_path, FakeAccelerator())
    assert not run.stop.exists() and not stop.requested()
    assert stop.agreed(any_rank=True) and stop.reason == "another rank was asked to stop"
    run.stop.write_text("")
    other = StopRequest.__new__(StopRequest)  # a second rank's view: the file appears after start-up
    other.acc, other.stop_file, other.marker, other.reason = FakeAccelerator(), run.stop, run.preempted, None
    assert other.requested() and other.reason == f"stop file {run.stop}"
    other.mark(step=42)
    assert run.preempted.read_text() == "42\n" and not run.stop.exists()


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
    torch.nn.init.constant_(model.weight, 0.1)  # every output far from 0: every gradient far above Adam's eps
    torch.nn.init.constant_(model.bias, 0.1)
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
