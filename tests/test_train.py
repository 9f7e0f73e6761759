"""The trainer, run for real: ZeRO-2/3 on 2 CPU processes, accumulation, resume, early stopping, the design
notes' schemes, non-finite rows and refused misuse.

Every run starts at module set-up and runs in the background, each test waiting for its own: on 2 cores
the runs cost about their summed CPU time, without each one's idle start-up and collectives in series.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import (
    FAST_TRAIN_FLAGS,
    RUN_TIMEOUT_S,
    ZERO_RUN_EVERY,
    ZERO_RUN_STEPS,
    TrainRun,
    full_block_shard_set,
    kill_at_checkpoint_then_resume,
    scalars,
)
from safetensors.torch import load_file

from dist_train import cli
from dist_train import config as config_mod
from dist_train.checkpoint import COMPLETE, CONSOLIDATED, STATE_FILE, save_consolidated, step_dir_name
from dist_train.data.schema import YAW_BUCKETS
from dist_train.data.shards import ShardSet
from dist_train.metrics import TRAIN_TAGS
from dist_train.model import build_model
from dist_train.rundir import CHECKPOINTS, DONE

# The design notes' schemes, flags verbatim (docs/design.md, "Prescriptions").
SCHEME_1 = (
    "--mse_weight 0.1 --cosine_weight 0.9 --warmup_epochs 10 --epochs 150 --cosine_eta_min 1e-5 --batch_size 32 "
    "--lr 1e-4 --warmup_lr 1e-6 --weight_decay 1e-4 --dropout 0.15 --use_mixed_precision "
    "--early_stopping_patience 20 --early_stopping_min_delta 1e-4"
)
SCHEMES = {
    1: SCHEME_1,
    2: SCHEME_1 + " --d_model 768 --dim_feedforward 3072 --num_layers 6 --dropout 0.2",
    3: SCHEME_1 + " --batch_size 64 --epochs 200 --early_stopping_patience 25",
}
SCHEME_STEPS = 2
SCHEME_2_BATCH = 8  # the 768-dim 6-layer model on CPU: a few samples per step are enough to show it runs

ACCUMULATION_STEPS = 8
EARLY_STOP_EVERY, EARLY_STOP_PATIENCE = 5, 2
RESUME_REL_TOL = 0.15  # resumed vs uninterrupted mean train/loss after the resume
NAN_ROWS = (3, 100, 101, 300, 517, 700, 767)  # train rows given a non-finite value in some input field
VAL_NAN_ROWS = (0, 50, 255)
DS_JSON_MICRO_BATCH = 16  # disagrees with the run's --batch_size 32


def finished_steps(log: str, outcome: str = "finished") -> dict[str, int]:
    """Rank -> the step its `[rank R/W] <outcome> at step N` line reports."""
    return {rank: int(step) for rank, step in re.findall(rf"\[rank (\d+/\d+)\] {outcome} at step (\d+)", log)}


def flag_values(flags: str) -> dict[str, str]:
    """`--key value` / bare `--key` (true) pairs; a later flag wins, as in argparse."""
    words, out = shlex.split(flags), {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            nxt = words[i + 1] if i + 1 < len(words) else "--"
            out[word[2:]] = "true" if nxt.startswith("--") else nxt
    return out


@pytest.fixture(scope="module")
def runs(demo_shards, zero_runs, tmp_path_factory) -> dict[str, TrainRun]:
    tmp = tmp_path_factory.mktemp("train_runs")
    full = full_block_shard_set(tmp / "full_blocks")
    nan = full_block_shard_set(tmp / "nan_rows", NAN_ROWS, VAL_NAN_ROWS)
    ds_json = tmp / "micro16.json"
    ds_json.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": DS_JSON_MICRO_BATCH, "zero_optimization": {"stage": 2}})
    )
    data = ["--data_dir", str(demo_shards)]
    fast = [*FAST_TRAIN_FLAGS, *data]
    # fp32, dropout 0 and the same seed: one optimizer step must see the same 32 rows either way (see test)
    accumulate = [*FAST_TRAIN_FLAGS, "--data_dir", str(full), "--precision", "fp32", "--dropout", "0"]
    accumulate += ["--max_steps", str(ACCUMULATION_STEPS), "--log_every_steps", "1", "--eval_max_samples", "64"]
    started = {
        # same flags as the uninterrupted ZeRO-2 run it is compared with
        "resumed": TrainRun(tmp, "resumed", zero_runs[2].flags, zero_runs[2].launch),
        "early_stop": TrainRun(
            tmp, "early_stop",
            [*fast, "--lr", "1e-9", "--warmup_lr", "1e-9", "--cosine_eta_min", "0", "--max_steps", "100",
             "--eval_every_steps", str(EARLY_STOP_EVERY), "--early_stopping_patience", str(EARLY_STOP_PATIENCE)],
            ["--config_file", "launch/accelerate/cpu/ddp.yaml"],
        ),
        "micro32": TrainRun(tmp, "micro32", [*accumulate, "--batch_size", "32"]),
        "micro8x4": TrainRun(tmp, "micro8x4", [*accumulate, "--batch_size", "8", "--gradient_accumulation_steps", "4"]),
        "nan_rows": TrainRun(
            tmp, "nan_rows",
            [*FAST_TRAIN_FLAGS, "--data_dir", str(nan), "--resampled", "false", "--batch_size", "32"]
            + ["--max_steps", "24", "--log_every_steps", "8", "--eval_every_steps", "12", "--eval_max_samples", "256"],
        ),
        "fp16_on_cpu": TrainRun(tmp, "fp16_on_cpu", [*fast, "--precision", "fp16", "--max_steps", "2"]),
        "ds_json_micro_batch": TrainRun(
            tmp, "ds_json_micro_batch", [*fast, "--batch_size", "32", "--max_steps", "2"],
            ["--use_deepspeed", "--deepspeed_config_file", str(ds_json), "--num_processes", "1"],
        ),
    }  # fmt: skip
    for n, flags in SCHEMES.items():
        extra = ["--batch_size", str(SCHEME_2_BATCH)] if n == 2 else []
        started[f"scheme{n}"] = TrainRun(
            tmp,
            f"scheme{n}",
            [*shlex.split(flags), *extra, *data, "--max_steps", str(SCHEME_STEPS), "--log_every_steps", "1"],
        )
    kill: dict = {}
    killer = threading.Thread(
        target=kill_at_checkpoint_then_resume, args=(started["resumed"], ZERO_RUN_EVERY, kill), daemon=True
    )
    killer.start()
    started["resumed"].killer, started["resumed"].kill_result = killer, kill
    yield started
    for run in started.values():
        run.kill()


# ---- ZeRO-2 / ZeRO-3 on 2 processes ---------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_on_two_processes_learns_in_step_on_both_ranks_and_checkpoints(zero_runs, stage):
    run = zero_runs[stage]
    rc, log = run.finish()
    assert rc == 0, log[-4000:]
    assert f"DeepSpeed ZeRO-{stage}" in log and "bf16" in log
    assert finished_steps(log) == {"0/2": ZERO_RUN_STEPS, "1/2": ZERO_RUN_STEPS}, log[-2000:]
    assert (run.run_dir / DONE).read_text().strip() == str(ZERO_RUN_STEPS)
    loss = scalars(run.run_dir, TRAIN_TAGS["loss"])
    assert sorted(loss) == list(range(10, ZERO_RUN_STEPS + 1, 10))
    first, last = loss[min(loss)], loss[max(loss)]
    assert last < 0.8 * first, f"train/loss did not fall: {loss}"
    for step in range(ZERO_RUN_EVERY, ZERO_RUN_STEPS + 1, ZERO_RUN_EVERY):
        ckpt = run.run_dir / CHECKPOINTS / step_dir_name(step)
        assert (ckpt / COMPLETE).is_file(), f"no complete checkpoint at step {step}"
        assert json.loads((ckpt / STATE_FILE).read_text())["step"] == step
        assert (ckpt / "pytorch_model" / "latest").is_file() or (ckpt / "latest").is_file(), "no DeepSpeed engine state"
    assert (run.run_dir / "best" / CONSOLIDATED).is_file()


# ---- gradient accumulation --------------------------------------------------------------------------------


def test_micro_8_times_accumulation_4_matches_micro_32(runs):
    """Why the comparison is valid: every block of this shard set is full (128 rows) and the stream shuffles
    the rows of 8 buffered blocks (1024 rows) with a generator seeded by (seed, epoch, rank, worker), then
    cuts consecutive batches. 1024 is a multiple of 8 and 32, so with the same seed the 32 rows of a step
    are exactly the four micro batches of 8: same data, same order, fp32, no dropout. Accumulation must then
    give the same losses, gradient norms and weights up to float rounding.
    """
    results = {}
    for name in ("micro32", "micro8x4"):
        rc, log = runs[name].finish()
        assert rc == 0, log[-3000:]
        results[name] = log
    assert "micro batch 8 x accumulation 4 x world 1 = global batch 32" in results["micro8x4"]
    assert "micro batch 32 x accumulation 1 x world 1 = global batch 32" in results["micro32"]
    a, b = runs["micro32"].run_dir, runs["micro8x4"].run_dir
    loss_a, loss_b = scalars(a, TRAIN_TAGS["loss"]), scalars(b, TRAIN_TAGS["loss"])
    assert sorted(loss_a) == sorted(loss_b) == list(range(1, ACCUMULATION_STEPS + 1))
    np.testing.assert_allclose([loss_b[s] for s in loss_a], list(loss_a.values()), atol=1e-5)
    assert loss_a[ACCUMULATION_STEPS] < loss_a[1], "the model must move for the comparison to mean anything"
    norm_a, norm_b = scalars(a, TRAIN_TAGS["grad_norm"]), scalars(b, TRAIN_TAGS["grad_norm"])
    np.testing.assert_allclose([norm_b[s] for s in norm_a], list(norm_a.values()), rtol=1e-4)
    last = step_dir_name(ACCUMULATION_STEPS)
    wa, wb = (load_file(str(d / CHECKPOINTS / last / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    # Float rounding of the summed gradients, which Adam amplifies where a gradient is near zero (m / sqrt(v)):
    # a handful of the 280k elements differ by ~1e-4 (fused AdamW), the rest by < 2e-5.
    diff = np.concatenate([(wa[k] - wb[k]).abs().flatten().numpy() for k in wa])
    assert diff.max() < 1e-3 and (diff > 2e-5).mean() < 1e-4, f"weights differ by up to {diff.max()}"


# ---- resume -------------------------------------------------------------------------------------------------


def test_killed_run_resumes_from_latest_checkpoint_with_the_uninterrupted_loss_curve(runs, zero_runs):
    run = runs["resumed"]
    run.killer.join(RUN_TIMEOUT_S)
    if "error" in run.kill_result:
        raise run.kill_result["error"]
    assert run.kill_result["killed_rc"] == -9
    rc, log = run.finish()
    assert rc == 0, log[-4000:]
    found = re.search(rf"resumed from {re.escape(str(run.run_dir / CHECKPOINTS))}/step-(\d+) at step (\d+)", log)
    assert found, log[-4000:]
    at = int(found[2])
    assert int(found[1]) == at and at % ZERO_RUN_EVERY == 0 and at < ZERO_RUN_STEPS
    assert finished_steps(log) == {"0/2": ZERO_RUN_STEPS, "1/2": ZERO_RUN_STEPS}
    assert (run.run_dir / DONE).read_text().strip() == str(ZERO_RUN_STEPS)

    rc, ref_log = zero_runs[2].finish()
    assert rc == 0, ref_log[-3000:]
    ref = scalars(zero_runs[2].run_dir, TRAIN_TAGS["loss"])
    got = scalars(run.run_dir, TRAIN_TAGS["loss"])
    assert sorted(got) == sorted(ref), "after TensorBoard's purge the resumed run has each step exactly once"
    before, after = [s for s in sorted(ref) if s <= at], [s for s in sorted(ref) if s > at]
    # before the kill: same seed, same data, same steps
    np.testing.assert_allclose([got[s] for s in before], [ref[s] for s in before], atol=1e-4)
    # After it the resumed run draws fresh data (seeded by the step), so the curves agree only
    # statistically: single 10-step means differed by up to 18% here (which rows were seen twice
    # matters on this small set), their mean over the resumed stretch by 4%. A run that lost its
    # state at `at` would log the reference's start again, far outside the tolerance.
    resumed, uninterrupted = np.mean([got[s] for s in after]), np.mean([ref[s] for s in after])
    restarted = np.mean([ref[s - at] for s in after])
    assert restarted > (1 + 2 * RESUME_REL_TOL) * uninterrupted, "the check below could not tell a restart"
    assert resumed == pytest.approx(uninterrupted, rel=RESUME_REL_TOL), (got, ref)


# ---- early stopping -----------------------------------------------------------------------------------------


def test_early_stopping_fires_on_a_plateau_at_the_same_step_on_every_rank(runs):
    run = runs["early_stop"]
    rc, log = run.finish()
    assert rc == 0, log[-4000:]
    # lr 1e-9 cannot move val cos by min_delta: the first evaluation sets the best, PATIENCE more end the run
    stop = EARLY_STOP_EVERY * (1 + EARLY_STOP_PATIENCE)
    assert finished_steps(log, "early-stopped") == {"0/2": stop, "1/2": stop}, log[-3000:]
    assert f"dist-train: early stop at step {stop}" in log
    assert (run.run_dir / DONE).read_text().strip() == str(stop)
    evals = sorted((run.run_dir / "metrics").glob("eval-step*.json"))
    assert [int(p.stem.removeprefix("eval-step")) for p in evals] == list(
        range(EARLY_STOP_EVERY, stop + 1, EARLY_STOP_EVERY)
    )
    cos = [json.loads(p.read_text())["mean_cos"] for p in evals]
    assert max(cos) - min(cos) < 1e-4, cos
    assert (run.run_dir / CHECKPOINTS / step_dir_name(stop) / COMPLETE).is_file()


# ---- the design notes' schemes ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_design_notes_scheme_runs_with_its_flags_verbatim(runs, scheme):
    run = runs[f"scheme{scheme}"]
    rc, log = run.finish()
    assert rc == 0, log[-4000:]
    assert "[rank 0/1] device cpu, fp32" in log, "--use_mixed_precision means fp32 on CPU"
    assert finished_steps(log) == {"0/1": SCHEME_STEPS}
    assert (run.run_dir / DONE).read_text().strip() == str(SCHEME_STEPS)
    cfg = config_mod.load_run_config(run.run_dir)
    expected = flag_values(SCHEMES[scheme]) | ({"batch_size": str(SCHEME_2_BATCH)} if scheme == 2 else {})
    for key, value in expected.items():
        section = config_mod.FLAT[key][0]
        assert getattr(getattr(cfg, section), key) == config_mod.coerce(key, value), key
    lr = scalars(run.run_dir, TRAIN_TAGS["lr"])
    assert lr[1] == pytest.approx(cfg.optim.warmup_lr), "the first step runs at the warmup start lr"
    assert cfg.optim.warmup_lr < lr[2] < cfg.optim.lr, "then warmup climbs toward lr"
    assert (run.run_dir / CHECKPOINTS / step_dir_name(SCHEME_STEPS) / COMPLETE).is_file()


# ---- untrained model, non-finite rows ------------------------------------------------------------------------


def test_untrained_model_scores_exactly_the_identity_baseline(demo_shards, tmp_path):
    """The zero-initialised residual makes a fresh model return normalise(src_emb): `dist-train eval` of it
    must report val cos equal to the do-nothing baseline, overall and per yaw bucket."""
    cfg = config_mod.build(config_mod.load_yaml("debug-cpu") | {"data_dir": str(demo_shards)})
    path = save_consolidated(tmp_path / "fresh.safetensors", build_model(cfg.model).state_dict(), cfg)
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(path), "--shards", str(demo_shards), "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["n"] == ShardSet.open(demo_shards).n_samples("val")
    assert m["mean_cos"] == pytest.approx(m["identity_baseline_cos"], abs=1e-6)
    assert m["gain"] == pytest.approx(0.0, abs=1e-6)
    assert m["oracle_cos"] > m["mean_cos"] + 0.05, "the oracle shows there is something to learn"
    assert len(m["per_yaw"]) == len(YAW_BUCKETS)
    for bucket, v in m["per_yaw"].items():
        assert v["cos"] == pytest.approx(v["baseline"], abs=1e-6), bucket
    assert m["impostor_cos"] == pytest.approx(m["baseline_impostor_cos"], abs=1e-6)
    for far, v in m["tar_at_far"].items():
        assert v["pred"] == pytest.approx(v["baseline"], abs=0.01), (
            far
        )  # thresholds are quantiles: rounding may flip a pair


def test_non_finite_rows_are_dropped_counted_and_training_finishes(runs):
    run = runs["nan_rows"]
    rc, log = run.finish()
    assert rc == 0, log[-3000:]
    assert finished_steps(log) == {"0/1": 24}
    assert (run.run_dir / DONE).is_file()
    # exact-epoch mode, one rank: 24 steps x 32 rows = the 768 train rows; the 7 dropped are made up by repeats
    bad = scalars(run.run_dir, TRAIN_TAGS["nonfinite_rows"])
    assert bad[24] == len(NAN_ROWS) == scalars(run.run_dir, TRAIN_TAGS["bad_samples"])[24], bad
    assert scalars(run.run_dir, TRAIN_TAGS["repeats"])[24] == len(NAN_ROWS)
    assert list(bad.values()) == sorted(bad.values())
    assert all(v == 0 for v in scalars(run.run_dir, TRAIN_TAGS["nonfinite_steps"]).values())
    assert all(math.isfinite(v) for v in scalars(run.run_dir, TRAIN_TAGS["loss"]).values())
    assert f"dist-train: data: 768 samples trained on, {len(NAN_ROWS)} nonfinite rows, {len(NAN_ROWS)} repeats" in log
    # validation drops its non-finite rows too: finite metrics, a best model, the rows counted in each evaluation
    for path in sorted((run.run_dir / "metrics").glob("eval-step*.json")):
        m = json.loads(path.read_text())
        assert math.isfinite(m["mean_cos"]) and m["n"] == 256 - len(VAL_NAN_ROWS)
        assert m["dropped_rows"] == {"nonfinite": len(VAL_NAN_ROWS), "unreadable": 0}
    assert f"{len(VAL_NAN_ROWS)} val rows dropped ({len(VAL_NAN_ROWS)} nonfinite)" in log
    assert (run.run_dir / "best" / CONSOLIDATED).is_file()


# ---- misuse --------------------------------------------------------------------------------------------------


def test_fp16_on_cpu_is_refused_before_any_work(runs):
    run = runs["fp16_on_cpu"]
    rc, log = run.finish()
    assert rc == 2, log[-3000:]
    assert "dist-train train: error: precision: 'fp16' is not allowed on CPU" in log
    assert not (run.run_dir / "config.yaml").exists()


def test_deepspeed_json_micro_batch_that_disagrees_with_batch_size_is_refused(runs):
    run = runs["ds_json_micro_batch"]
    rc, log = run.finish()
    assert rc != 0
    assert (
        f"DeepSpeed config sets train_micro_batch_size_per_gpu={DS_JSON_MICRO_BATCH} "
        "but the run config gives 32 (--batch_size)" in log
    ), log[-3000:]
    assert 'set "train_micro_batch_size_per_gpu": "auto"' in log
    assert not (run.run_dir / "config.yaml").exists()


def test_diverging_run_stops_after_max_bad_steps_with_a_checkpoint(demo_shards, tmp_path):
    """Non-finite losses skip steps; `max_bad_steps` of them in a row stop the run, exit 3, checkpoint kept."""
    out = tmp_path / "div"
    flags = "--lr 1e12 --warmup_epochs 0 --cosine_eta_min 0 --grad_clip 0 --max_bad_steps 3 --max_steps 60"
    r = subprocess.run(
        [sys.executable, "-m", "dist_train", "train", "--config", "debug-cpu", "--data_dir", str(demo_shards)]
        + ["--output_dir", str(out), "--num_workers", "0", *flags.split()],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 3, r.stderr[-2000:]
    msg = re.search(r"error: 3 consecutive non-finite losses at step (\d+); checkpoint saved at step (\d+)", r.stdout)
    assert msg, r.stdout[-2000:]
    diverged, step = int(msg.group(1)), int(msg.group(2))
    # judged when the interval's values reach the host (every --log_every_steps steps): skipped steps change nothing
    assert diverged <= step < diverged + 10 and step < 60
    assert (out / CHECKPOINTS / step_dir_name(step) / COMPLETE).is_file()
    assert not (out / DONE).exists()
    assert json.loads((out / CHECKPOINTS / step_dir_name(step) / STATE_FILE).read_text())["nonfinite_steps"] >= 3
