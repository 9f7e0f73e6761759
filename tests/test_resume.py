"""Resume knows what it resumes: rows read once per epoch across a kill, geometry and data changes, fine-tuning.

Real `dist-train train` processes: a 2-rank DDP run with 2 loader workers per rank is killed with SIGKILL in the
middle of an epoch and resumed with `--resume latest`; its row traces (`--trace_rows`) must show every training row
exactly once per epoch, minus a tail smaller than one global batch. Resumes that change the batch geometry
continue the schedule (one process) or are refused before anything loads (DeepSpeed), a resume onto other data is
refused unless asked for, and `--init_from` starts from weights with a fresh optimizer and schedule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import FAST_TRAIN_FLAGS, RUN_ENV, RUN_TIMEOUT_S, TrainRun, kill_at_checkpoint_then_resume, scalars
from safetensors.torch import load_file

from dist_train import config as config_mod
from dist_train.checkpoint import COMPLETE, STATE_FILE, step_dir_name
from dist_train.data.shards import ShardSet
from dist_train.metrics import TRAIN_TAGS
from dist_train.rundir import CHECKPOINTS, DONE
from dist_train.schedule import lr_at

REPO = Path(__file__).resolve().parent.parent
MICRO, WORLD = 64, 2
KILL_AFTER = 5  # a checkpoint in the middle of the first epoch


def train(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dist_train", "train", *FAST_TRAIN_FLAGS, "--num_workers", "0", *flags],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=REPO,
        env={**os.environ, **RUN_ENV},
    )


@pytest.fixture(scope="module")
def exact_resume(small_shards, tmp_path_factory) -> TrainRun:
    """Exact epochs, 2 ranks x 2 workers, 7 unevenly filled shards; killed after step KILL_AFTER, resumed."""
    tmp = tmp_path_factory.mktemp("exact_resume")
    spe = ShardSet.open(small_shards).n_samples("train") // (MICRO * WORLD)
    flags = [*FAST_TRAIN_FLAGS, "--data_dir", str(small_shards), "--resampled", "false", "--num_workers", "2"]
    flags += ["--batch_size", str(MICRO), "--trace_rows", "true", "--max_steps", str(2 * spe)]
    flags += ["--save_every_steps", str(KILL_AFTER), "--eval_max_samples", "64"]
    run = TrainRun(tmp, "exact", flags, ["--config_file", "launch/accelerate/cpu/ddp.yaml"])
    run.kill_result = {}
    run.killer = threading.Thread(
        target=kill_at_checkpoint_then_resume, args=(run, KILL_AFTER, run.kill_result), daemon=True
    )
    run.killer.start()
    yield run
    run.kill()


def traced_rows(run_dir: Path) -> dict[int, list[int]]:
    """Epoch -> rows trained on, each micro batch taken from the last process that ran its step."""
    latest: dict[tuple[int, int], tuple[int, int, list[int]]] = {}  # (rank, step) -> (from, epoch, rows)
    for path in (run_dir / "trace").glob("rows-rank*-from*.txt"):
        rank, start = map(int, re.fullmatch(r"rows-rank(\d+)-from(\d+)\.txt", path.name).groups())
        by_step: dict[int, list] = defaultdict(list)
        for line in path.read_text().splitlines():
            step, epoch, *rows = map(int, line.split())
            by_step[step].append((epoch, rows))
        for step, micro in by_step.items():
            if (rank, step) not in latest or latest[rank, step][0] < start:
                latest[rank, step] = (start, micro[0][0], [r for _, rows in micro for r in rows])
    epochs: dict[int, list[int]] = defaultdict(list)
    for _, epoch, rows in latest.values():
        epochs[epoch] += rows
    return epochs


def test_killed_exact_epoch_run_resumes_and_reads_every_row_once_per_epoch(exact_resume, small_shards):
    run = exact_resume
    run.killer.join(RUN_TIMEOUT_S)
    if "error" in run.kill_result:
        raise run.kill_result["error"]
    rc, log = run.finish()
    assert rc == 0, log[-4000:]
    assert f"resumed from {run.run_dir / CHECKPOINTS / step_dir_name(KILL_AFTER)} at step {KILL_AFTER}" in log
    assert len(list((run.run_dir / "trace").glob("rows-rank0-from*.txt"))) == 2, "two processes traced rank 0"
    total = ShardSet.open(small_shards).n_samples("train")
    per_epoch = total // (MICRO * WORLD) * MICRO * WORLD
    epochs = traced_rows(run.run_dir)
    assert sorted(epochs) == [0, 1]
    for epoch, rows in epochs.items():
        assert len(rows) == per_epoch == len(set(rows)), f"epoch {epoch}: a row read twice or a step lost"
        assert set(rows) <= set(range(total)) and total - per_epoch < MICRO * WORLD
    assert set(epochs[0]) != set(epochs[1]), "each epoch leaves out another tail"
    # the tail is counted: 2 epochs x (total - per_epoch) rows, also across the kill
    assert f"{2 * (total - per_epoch)} dropped tail" in log
    assert scalars(run.run_dir, TRAIN_TAGS["dropped_tail"])[2 * (total // (MICRO * WORLD))] == 2 * (total - per_epoch)


def test_one_process_resume_with_another_batch_continues_the_schedule(demo_shards, tmp_path):
    """Batch 64 (16 steps an epoch) stopped mid-run, resumed at batch 128 (8 steps an epoch): same point of the cosine."""
    out = tmp_path / "geometry"
    common = ["--data_dir", str(demo_shards), "--scheduler_type", "cosine", "--warmup_epochs", "0", "--epochs", "4"]
    common += ["--samples_per_epoch", "1024", "--log_every_steps", "1"]
    plain = [*FAST_TRAIN_FLAGS, "--num_workers", "0", *common]
    first = TrainRun(tmp_path, "geometry", [*plain, "--batch_size", "64", "--save_every_steps", "4"])
    marker = out / CHECKPOINTS / step_dir_name(4) / COMPLETE
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not marker.exists() and first.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    (out / "STOP").touch()  # as SLURM's stop file: checkpoint at the next step and exit
    rc, log = first.finish()
    assert rc == 0 and "preempted at step" in log, log[-3000:]
    stopped = int(re.search(r"preempted at step (\d+)", log)[1])
    assert 4 <= stopped < 64
    second = train(*common, "--output_dir", str(out), "--batch_size", "128", "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    position = round(stopped / 16 * 8)
    assert (
        f"resume: saved world 1 x micro batch 64 x accumulation 1, now 1 x 128 x 1; steps per epoch 16 -> 8, "
        f"continuing the schedule at epoch {stopped / 16:.3f} (step {stopped} is schedule position {position})"
    ) in second.stdout
    cfg = config_mod.load_run_config(out)
    lr = scalars(out, TRAIN_TAGS["lr"])
    assert lr[stopped + 1] == pytest.approx(lr_at(position, cfg.optim, 8, 32), rel=1e-6), "no jump in the schedule"
    end = stopped + 32 - position  # the 4 epochs end at schedule position 32
    assert (out / DONE).read_text().strip() == str(end)
    state = json.loads((out / CHECKPOINTS / step_dir_name(end) / STATE_FILE).read_text())
    assert (state["micro_batch"], state["schedule_offset"]) == (128, position - stopped)


def test_deepspeed_resume_with_another_geometry_is_refused_before_loading(demo_shards, tmp_path):
    out = tmp_path / "ds"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file"]
    launch += ["configs/deepspeed/zero2-fp32.json", "--num_processes", "1", "-m", "dist_train", "train"]
    flags = [*FAST_TRAIN_FLAGS, "--num_workers", "0", "--data_dir", str(demo_shards), "--output_dir", str(out)]

    def run(*extra):
        return subprocess.run(
            [*launch, *flags, *extra], capture_output=True, text=True, cwd=REPO, timeout=RUN_TIMEOUT_S, env=None
        )

    first = run("--max_steps", "2", "--precision", "fp32")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run("--max_steps", "4", "--precision", "fp32", "--resume", "latest", "--batch_size", "32")
    assert second.returncode != 0 and "exitcode  : 2" in second.stderr, second.stderr[-3000:]  # the rank exits 2
    assert (
        "resume: saved world 1 x micro batch 64 x accumulation 1, now 1 x 32 x 1: DeepSpeed ZeRO checkpoints are "
        "bound to the geometry they were saved with" in second.stderr
    )
    assert "--init_from CHECKPOINT" in second.stderr
    assert "resumed from" not in second.stdout


def test_resume_onto_another_shard_set_is_refused_unless_asked_for(demo_shards, tmp_path):
    out, other = tmp_path / "data", tmp_path / "other"
    shutil.copytree(demo_shards, other)
    index = json.loads((other / "index.json").read_text())
    index["provenance"]["note"] = "another set"
    (other / "index.json").write_text(json.dumps(index))
    common = ["--output_dir", str(out)]
    assert train(*common, "--data_dir", str(demo_shards), "--max_steps", "2").returncode == 0
    refused = train(*common, "--data_dir", str(other), "--max_steps", "4", "--resume", "latest")
    assert refused.returncode == 2
    assert "resume: the checkpoint was trained on another shard set" in refused.stderr
    assert "--allow_data_change true" in refused.stderr
    allowed = train(*common, "--data_dir", str(other), "--max_steps", "4", "--resume", "latest", "--allow_data_change")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert (out / DONE).read_text().strip() == "4"


def test_init_from_loads_weights_with_a_fresh_schedule_and_refuses_another_shape(demo_shards, tmp_path):
    source, tuned, wrong = tmp_path / "source", tmp_path / "tuned", tmp_path / "wrong"
    data = ["--data_dir", str(demo_shards), "--log_every_steps", "1"]
    assert train(*data, "--output_dir", str(source), "--max_steps", "6").returncode == 0
    ckpt = source / CHECKPOINTS / step_dir_name(6)
    init = ["--init_from", str(ckpt), "--max_steps", "1", "--cosine_eta_min", "0"]
    init += ["--lr", "1e-12", "--warmup_lr", "1e-12"]
    done = train(*data, "--output_dir", str(tuned), *init)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"initialised {len(load_file(str(ckpt / 'model.safetensors')))} of" in done.stdout
    assert scalars(tuned, TRAIN_TAGS["lr"])[1] == pytest.approx(1e-12), "a fresh schedule"
    a = load_file(str(ckpt / "model.safetensors"))
    b = load_file(str(tuned / CHECKPOINTS / step_dir_name(1) / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6, "the weights came from the checkpoint"
    refused = train(*data, "--output_dir", str(wrong), *init, "--d_model", "64", "--nhead", "2")
    assert refused.returncode == 2 and "init_from:" in refused.stderr and "different shape" in refused.stderr
    assert "--init_from_strict false" in refused.stderr
