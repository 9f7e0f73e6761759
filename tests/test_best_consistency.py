"""The best model on disk is the one the run's state names, also after a hard kill (issue 19.1).

- A real run killed with SIGKILL as soon as a checkpoint is complete: best/model.safetensors holds the step
  and the weights of the best step that checkpoint records; resumed to the end, best/ is the final state's best.
- `Checkpointer.save` with a best write held back by ``best_every_minutes`` writes it first; a resume restores
  best/ from the checkpoint's copy when best/ holds another step, or is missing, and says so.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import RUN_TIMEOUT_S, TrainRun
from safetensors.torch import load_file
from test_checkpoint import FakeAccelerator

from dist_train import config as config_mod
from dist_train.checkpoint import (
    BEST_COPY,
    COMPLETE,
    CONSOLIDATED,
    STATE_FILE,
    Checkpointer,
    TrainState,
    complete_checkpoints,
    load_consolidated_meta,
    step_dir_name,
)
from dist_train.config import CheckpointConfig
from dist_train.rundir import ABANDONED, BEST, CHECKPOINTS

# the run (debug-cpu, 18 steps an epoch, 2 epochs, eval every 5 steps, the default best_every_minutes
# of 2: every best after the first waits), with a small model; a checkpoint at every evaluation (every 5 steps
# and each epoch's end), so that the best step's own checkpoint (never pruned) holds its weights to compare
FLAGS = [
    "--config", "debug-cpu", "--epochs", "2", "--eval_every_steps", "5", "--save_every_steps", "5",
    "--save_every_epochs", "1", "--num_workers", "0", "--eval_max_samples", "256",
    "--d_model", "32", "--nhead", "2", "--num_layers", "1", "--dim_feedforward", "64",
]  # fmt: skip
KILL_AT = 25


def best_on_disk(run_dir: Path) -> tuple[int, dict]:
    """(step in best/model.safetensors's metadata, its tensors), read raw: the unit tests' stand-in model is no
    FrontalNet, which `load_consolidated` would refuse against the stored config."""
    path = run_dir / BEST / CONSOLIDATED
    return int(load_consolidated_meta(path)["step"]), load_file(path)


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def weights_at(run_dir: Path, step: int) -> dict:
    """The model of ``step`` as its own checkpoint saved it (Accelerate's model.safetensors)."""
    return load_file(str(run_dir / CHECKPOINTS / step_dir_name(step) / CONSOLIDATED))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def killed_then_resumed(demo_shards, tmp_path_factory) -> dict:
    """The run SIGKILLed once checkpoint KILL_AT is complete (what is on disk then), then resumed to its end."""
    run = TrainRun(tmp_path_factory.mktemp("best"), "run", [*FLAGS, "--data_dir", str(demo_shards)])
    marker = run.run_dir / CHECKPOINTS / step_dir_name(KILL_AT) / COMPLETE
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not marker.exists():
            assert run.proc.poll() is None, "the run ended before the checkpoint"
            assert time.monotonic() < deadline, "no checkpoint before the timeout"
            time.sleep(0.02)
        run.kill()
        newest = complete_checkpoints(run.run_dir)[-1]
        best_step, best_sd = best_on_disk(run.run_dir)
        killed = {"newest": newest, "state": state_of(newest), "best_step": best_step, "best": best_sd}
        killed["recorded"] = weights_at(run.run_dir, killed["state"]["best_step"])
        run.start([*run.flags, "--resume", "latest"])
        rc, log = run.finish()
    finally:
        run.kill()
    return {"killed": killed, "rc": rc, "log": log, "run_dir": run.run_dir}


def test_after_a_kill_best_holds_the_step_and_weights_the_checkpoint_records(killed_then_resumed):
    killed = killed_then_resumed["killed"]
    assert killed["state"]["step"] >= KILL_AT
    recorded = killed["state"]["best_step"]
    assert recorded > 5, "an improvement after the first evaluation, whose write waits for best_every_minutes"
    assert killed["best_step"] == recorded, f"best/ holds step {killed['best_step']}, the checkpoint says {recorded}"
    assert same(killed["best"], killed["recorded"]), f"best/ holds other weights than step {recorded}'s"


def test_resumed_to_the_end_best_is_the_final_states_best(killed_then_resumed):
    run_dir, log = killed_then_resumed["run_dir"], killed_then_resumed["log"]
    assert killed_then_resumed["rc"] == 0, log[-3000:]
    assert "best model: checkpoint" not in log, "best/ was consistent on resume: nothing to restore"
    final = state_of(complete_checkpoints(run_dir)[-1])
    assert final["step"] == 36
    best_step, best_sd = best_on_disk(run_dir)
    said = re.findall(r"best val mean_cos [\d.]+ \(val cos [\d.]+\) at step (\d+)", log)
    assert int(said[-1]) == final["best_step"] == best_step
    assert same(best_sd, weights_at(run_dir, best_step))
    for checkpoint in complete_checkpoints(run_dir):  # each checkpoint holds the best model it records
        assert load_consolidated_meta(checkpoint / BEST_COPY)["step"] == state_of(checkpoint)["best_step"]


# ---- the checkpointer on real files ------------------------------------------------------------------------


def checkpointer(run_dir: Path) -> Checkpointer:
    """A Checkpointer as a new process would make it, with best writes at most every hour."""
    cfg = config_mod.Config()
    cfg.checkpoint = CheckpointConfig(best_every_minutes=60)
    return Checkpointer(cfg.checkpoint, run_dir, FakeAccelerator(), cfg)


def judged_best(ck: Checkpointer, model, state: TrainState, step: int) -> dict:
    """The loop's new best at ``step``: the state records it, save_best snapshots it; its weights."""
    with torch.no_grad():
        model.weight.fill_(step)
    state.step = state.best_step = step
    ck.save_best(model, state, {"mean_cos": step / 100})
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_save_writes_the_best_model_still_waiting_first_and_keeps_it(tmp_path):
    ck, model, state = checkpointer(tmp_path / "run"), torch.nn.Linear(2, 2), TrainState(run_id="r")
    judged_best(ck, model, state, 5)
    ck.close(state)  # step 5 written: the next write may start an hour later
    w10 = judged_best(ck, model, state, 10)
    time.sleep(0.2)
    assert best_on_disk(ck.run_dir)[0] == 5, "step 10's write waits for best_every_minutes"
    path = ck.save(state)
    step, sd = best_on_disk(ck.run_dir)
    assert step == 10 and same(sd, w10), "the checkpoint records best step 10: best/ holds it"
    copy = path / BEST_COPY
    assert load_consolidated_meta(copy)["step"] == 10 and same(load_file(str(copy)), w10)
    assert os.stat(copy).st_ino == os.stat(ck.run_dir / BEST / CONSOLIDATED).st_ino, "a link, not a copy"


def test_a_resume_restores_best_from_the_checkpoint_and_moves_the_newer_one_aside(tmp_path, capsys):
    run_dir = tmp_path / "run"
    ck, model, state = checkpointer(run_dir), torch.nn.Linear(2, 2), TrainState(run_id="r")
    w10 = judged_best(ck, model, state, 10)
    checkpoint = ck.save(state)
    judged_best(ck, model, state, 12)
    ck.close(state)  # best/ holds step 12, written after the checkpoint; then the process is killed
    capsys.readouterr()

    assert checkpointer(run_dir).load(checkpoint).best_step == 10
    step, sd = best_on_disk(run_dir)
    assert step == 10 and same(sd, w10)
    aside = list((run_dir / ABANDONED).glob(f"{10:08d}-*/{BEST}/{CONSOLIDATED}"))
    assert [load_consolidated_meta(p)["step"] for p in aside] == [12]
    out = capsys.readouterr().out
    assert f"{run_dir / BEST / CONSOLIDATED} held step 12 of run r; moved that to {run_dir / ABANDONED}" in out
    assert f"restored step 10's from {checkpoint / BEST_COPY}" in out

    checkpointer(run_dir).load(checkpoint)
    assert "best model" not in capsys.readouterr().out, "consistent: nothing done, nothing said"
    (run_dir / BEST / CONSOLIDATED).unlink()
    checkpointer(run_dir).load(checkpoint)
    assert best_on_disk(run_dir)[0] == 10, "a missing best/ is restored too"
    assert "restored" in capsys.readouterr().out


def test_a_checkpoint_without_a_copy_says_best_is_not_what_it_records(tmp_path, capsys):
    run_dir = tmp_path / "run"
    ck, model, state = checkpointer(run_dir), torch.nn.Linear(2, 2), TrainState(run_id="r")
    judged_best(ck, model, state, 10)
    checkpoint = ck.save(state)
    (checkpoint / BEST_COPY).unlink()  # as a checkpoint written before checkpoints held their best model
    judged_best(ck, model, state, 12)
    ck.close(state)
    capsys.readouterr()
    checkpointer(run_dir).load(checkpoint)
    assert best_on_disk(run_dir)[0] == 12, "nothing to restore from: left as it is"
    out = capsys.readouterr().out
    held = f"holds no copy of it, and {run_dir / BEST / CONSOLIDATED} holds step 12 of run r: left as it is"
    assert "records the best model at step 10" in out and held in out


def test_a_checkpoint_before_any_best_moves_a_later_best_aside(tmp_path, capsys):
    run_dir = tmp_path / "run"
    ck, model, state = checkpointer(run_dir), torch.nn.Linear(2, 2), TrainState(run_id="r", step=4)
    checkpoint = ck.save(state)
    judged_best(ck, model, state, 5)
    ck.close(state)
    capsys.readouterr()
    assert checkpointer(run_dir).load(checkpoint).best_step == -1
    assert not (run_dir / BEST / CONSOLIDATED).exists(), "the state records no best model yet"
    assert len(list((run_dir / ABANDONED).glob(f"*/{BEST}/{CONSOLIDATED}"))) == 1
    assert "records none yet" in capsys.readouterr().out
