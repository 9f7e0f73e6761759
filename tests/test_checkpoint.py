"""The checkpointer: its policy on small fakes (milliseconds), its safety and failure handling, and real runs.

- Policy, with a fake accelerator (`FakeAccelerator`): when to save, keep-last pruning within the run's
  lineage with the best step exempt, `*.tmp` handling, where a run starts (`resolve_start`).
- Loading refuses symlinks and escaping paths before anything is unpickled.
- A failed write: one clear line, the partial `*.tmp` removed, every rank told (two real gloo processes).
- Real runs: best/model.safetensors of the shared ZeRO-2/3 runs holds exactly the fp32 masters of its
  step; single-process `dist-train train` runs for the lineage rules and a real disk-full on a tmpfs.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import queue
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN_FLAGS, REPO, RUN_ENV, RUN_TIMEOUT_S
from safetensors.torch import load_file, save_file

from dist_train import config as config_mod
from dist_train.checkpoint import (
    COMPLETE,
    CONSOLIDATED,
    STATE_FILE,
    Checkpointer,
    CheckpointWriteError,
    TrainState,
    UnsafeCheckpointError,
    assert_data_only,
    checkpoint_step,
    complete_checkpoints,
    consolidate_checkpoint,
    load_consolidated,
    load_consolidated_meta,
    new_run_id,
    read_state,
    save_consolidated,
    step_dir_name,
)
from dist_train.checkpoint import checkpointer as checkpointer_mod
from dist_train.config import CheckpointConfig, ConfigError
from dist_train.rundir import ABANDONED, BEST, CHECKPOINTS, LOCK

# ---- fakes -----------------------------------------------------------------------------------------------


class FakeAccelerator:
    """What Checkpointer uses of an Accelerator: ranks, barriers, save_state / load_state.

    ``save_state`` writes a small model.safetensors, a pickled optimizer.bin and an RNG-state .pkl, as
    Accelerate does; ``fail_at`` makes it raise ENOSPC part-way through (after the first file) at that
    save's directory name; ``payload`` adds that many bytes to optimizer.bin (for the tmpfs test).
    """

    distributed_type = "NO"

    def __init__(self, process_index: int = 0, num_processes: int = 1, barrier=None):
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = process_index == 0
        self.barrier = barrier
        self.saved: list[str] = []
        self.loaded: list[str] = []
        self.fail_at: set[str] = set()
        self.payload = 0
        self._models: list = []

    def wait_for_everyone(self) -> None:
        if self.barrier is not None:
            self.barrier()

    def save_state(self, output_dir: str) -> None:
        d = Path(output_dir)
        d.mkdir(parents=True, exist_ok=True)
        for engine in self._models:  # like Accelerate under DeepSpeed
            engine.save_checkpoint(output_dir, "pytorch_model")
        if self.is_main_process:
            save_file({"w": torch.ones(4)}, str(d / "model.safetensors"))
        if Path(output_dir).name.removesuffix(".tmp") in self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device", str(d / "optimizer.bin"))
        if self.is_main_process:
            torch.save({"state": {0: torch.zeros(max(1, self.payload // 4))}}, d / "optimizer.bin")
        torch.save({"rng": torch.get_rng_state()}, d / f"random_states_{self.process_index}.pkl")
        self.saved.append(output_dir)

    def load_state(self, input_dir: str) -> None:
        self.loaded.append(input_dir)

    def get_state_dict(self, model):
        return model.state_dict()

    def unwrap_model(self, model, **kwargs):
        return model


def make(tmp_path: Path, keep_last: int = 3, every: int = 2, acc=None) -> tuple[Checkpointer, FakeAccelerator]:
    acc = acc or FakeAccelerator()
    cfg = config_mod.Config()
    cfg.checkpoint = CheckpointConfig(save_every_steps=every, keep_last=keep_last)
    return Checkpointer(cfg.checkpoint, tmp_path / "run", acc, cfg), acc


def steps(run_dir: Path) -> list[int]:
    return [checkpoint_step(p) for p in complete_checkpoints(run_dir)]


def save_steps(ck: Checkpointer, run_id: str, upto: int, best: int = -1, start: int = 1) -> TrainState:
    state = TrainState(run_id=run_id, best_step=best)
    for s in range(start, upto + 1):
        state.step = s
        ck.maybe_save(state)
    return state


# ---- when to save, what to keep --------------------------------------------------------------------------


def test_due_by_time_every_n_steps_and_every_n_epochs(tmp_path):
    ck, _ = make(tmp_path, every=5)
    assert [s for s in range(1, 16) if ck.due(s)] == [5, 10, 15]
    assert not ck.due(7, completed_epoch=3), "epoch ends are not checkpoints unless asked for"
    assert ck.due(7, time_due=True)
    ck.cfg.save_every_epochs = 2
    assert [e for e in range(1, 7) if ck.due(1, completed_epoch=e)] == [2, 4, 6]
    ck0, _ = make(tmp_path, every=0)
    assert not any(ck0.due(s) for s in range(1, 50))
    # the clock: save_every_minutes after the start, then after each save
    now = [1000.0]
    ck, _ = make(tmp_path / "clock", every=0)
    ck.clock, ck.last_save_time = (lambda: now[0]), now[0]
    ck.cfg.save_every_minutes = 30
    now[0] += 29 * 60
    assert not ck.time_due()
    now[0] += 60
    assert ck.time_due()
    ck.save(TrainState(step=1, run_id="r"))
    assert not ck.time_due()
    ck.cfg.save_every_minutes = 0
    now[0] += 10**6
    assert not ck.time_due(), "0 turns it off"


def test_the_best_model_is_written_in_the_background_at_most_every_interval(tmp_path, monkeypatch):
    """A newer best replaces a snapshot still waiting; close() writes the last one; the step never waits."""
    ck, acc = make(tmp_path)
    ck._best.min_interval_s = 3600  # only the first write may start now; the rest wait for close()
    written = []
    monkeypatch.setattr(checkpointer_mod, "save_consolidated", lambda path, sd, cfg, meta: written.append(meta["step"]))
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        ck.save_best(model, TrainState(step=step, run_id="r"), {"mean_cos": 0.5})
    deadline = time.monotonic() + 10
    while written != [1] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert written == [1], "step 1 written at once, 2 replaced by 3 while waiting"
    ck.close(TrainState(step=3, run_id="r"))
    assert written == [1, 3]


def test_maybe_save_when_due_or_forced_and_never_twice_at_one_step(tmp_path):
    ck, acc = make(tmp_path, every=4)
    state = TrainState(run_id="r")
    state.step = 3
    assert ck.maybe_save(state) is None and not acc.saved
    assert ck.maybe_save(state, force=True) == ck.root / step_dir_name(3)
    assert ck.maybe_save(state, force=True) is None, "the final save after an epoch-end save is not repeated"
    state.step = 4
    assert ck.maybe_save(state) == ck.root / step_dir_name(4) and ck.last_saved_step == 4
    assert len(acc.saved) == 2


def test_save_is_atomic_and_complete_with_its_trainer_state(tmp_path):
    ck, acc = make(tmp_path)
    stale = ck.root / (step_dir_name(2) + ".tmp")
    stale.mkdir(parents=True)
    (stale / "junk").write_text("from a crashed write")
    state = TrainState(step=2, run_id="run-a", best_cos=0.5, loader={"unreadable_rows": 3})
    path = ck.save(state)
    assert acc.saved == [str(stale)], "written under .tmp, then renamed"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [COMPLETE, STATE_FILE, "config.yaml", "model.safetensors", "optimizer.bin", "random_states_0.pkl"]
    )
    assert not stale.exists() and not list(ck.root.glob("*.tmp"))
    assert read_state(path) == state
    assert config_mod.load_run_config(path) == ck.run_config


def test_keep_last_prunes_within_the_lineage_and_keeps_the_best_step(tmp_path):
    ck, _ = make(tmp_path, keep_last=2, every=1)
    save_steps(ck, "mine", upto=6, best=2)
    assert steps(ck.run_dir) == [2, 5, 6]


def test_pruning_never_touches_another_lineage_nor_the_new_checkpoint(tmp_path):
    """The bug it replaces: pruning by step number alone deleted a fresh run's new checkpoints at once."""
    old, _ = make(tmp_path, keep_last=2, every=10)
    save_steps(old, "old-run", upto=30)
    assert steps(old.run_dir) == [20, 30]
    ck, _ = make(tmp_path, keep_last=2, every=1)
    save_steps(ck, "new-run", upto=4)
    assert steps(ck.run_dir) == [3, 4, 20, 30]
    assert {read_state(p).run_id for p in complete_checkpoints(ck.run_dir)} == {"new-run", "old-run"}


def test_read_state_ignores_unknown_keys_and_refuses_incomplete_checkpoints(tmp_path):
    ck, _ = make(tmp_path)
    path = ck.save(TrainState(step=2, run_id="r"))
    raw = json.loads((path / STATE_FILE).read_text()) | {"from_a_newer_version": 1}
    (path / STATE_FILE).write_text(json.dumps(raw))
    assert read_state(path).run_id == "r"
    (path / COMPLETE).unlink()
    with pytest.raises(ConfigError, match="not a complete dist-train checkpoint"):
        read_state(path)


def test_new_run_ids_differ():
    assert len({new_run_id() for _ in range(100)}) == 100


# ---- where a run starts ------------------------------------------------------------------------------------


def test_fresh_start_into_an_empty_or_new_directory(tmp_path):
    ck, _ = make(tmp_path)
    assert ck.resolve_start(None, overwrite=False) is None
    ck.run_config.save(ck.run_dir)  # a run that ended before its first checkpoint
    assert ck.resolve_start(None, overwrite=False) is None


@pytest.mark.parametrize("partial_only", [False, True], ids=["complete", "partial"])
def test_fresh_start_into_a_directory_with_checkpoints_is_refused(tmp_path, partial_only):
    ck, _ = make(tmp_path)
    save_steps(ck, "old", upto=4)
    if partial_only:
        for p in complete_checkpoints(ck.run_dir):
            p.rename(p.with_name(p.name + ".tmp"))
    with pytest.raises(ConfigError) as e:
        ck.resolve_start(None, overwrite=False)
    msg = str(e.value)
    assert str(ck.run_dir) in msg and "step 4" in msg and "--resume latest" in msg and "--overwrite" in msg
    assert len(list(ck.root.iterdir())) == 2, "nothing was touched"


def test_overwrite_deletes_the_previous_runs_outputs_and_says_so(tmp_path, capsys):
    ck, _ = make(tmp_path)
    save_steps(ck, "old", upto=4)
    run = ck.run_dir
    for d in (BEST, "tb", "metrics", ABANDONED):
        (run / d).mkdir()
        (run / d / "f").write_text("old")
    for f in ("DONE", "PREEMPTED", "config.yaml", "notes.txt"):
        (run / f).write_text("old")
    assert ck.resolve_start(None, overwrite=True) is None
    out = capsys.readouterr().out
    assert "deleted the previous run's checkpoints, best, tb, metrics, abandoned, DONE, PREEMPTED" in out
    assert sorted(p.name for p in run.iterdir()) == [LOCK, "config.yaml", "notes.txt"]


def test_resume_latest_picks_the_newest_checkpoint_and_drops_partial_writes(tmp_path, capsys):
    ck, _ = make(tmp_path)
    save_steps(ck, "r", upto=6)
    (ck.root / (step_dir_name(8) + ".tmp")).mkdir()
    assert ck.resolve_start("latest", overwrite=False) == ck.root / step_dir_name(6)
    assert not list(ck.root.glob("*.tmp"))
    assert "deleted 1 incomplete checkpoint write" in capsys.readouterr().out


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path, capsys):
    ck, _ = make(tmp_path)
    assert ck.resolve_start("latest", overwrite=False) is None
    assert "no complete checkpoint" in capsys.readouterr().out


def test_resume_latest_with_overwrite_is_refused(tmp_path):
    ck, _ = make(tmp_path)
    save_steps(ck, "r", upto=2)
    with pytest.raises(ConfigError, match="requeued job would delete its own progress"):
        ck.resolve_start("latest", overwrite=True)
    assert steps(ck.run_dir) == [2]


def test_resume_latest_stays_within_the_lineage_that_wrote_last(tmp_path, capsys):
    """A directory holding two runs (written before lineage existed): continue the one that wrote last."""
    ck, _ = make(tmp_path, every=1)
    save_steps(ck, "old", upto=12, start=10)
    save_steps(ck, "new", upto=3)
    assert ck.resolve_start("latest", overwrite=False) == ck.root / step_dir_name(3)
    assert "holds checkpoints of several runs; continuing run new" in capsys.readouterr().out


def test_explicit_resume_from_an_older_step_moves_the_abandoned_branch_aside(tmp_path, capsys):
    ck, _ = make(tmp_path, keep_last=5)
    save_steps(ck, "r", upto=8)
    run = ck.run_dir
    save_consolidated(run / BEST / CONSOLIDATED, {"w": torch.ones(2)}, ck.run_config, {"step": 6})
    (run / "DONE").write_text("8\n")
    (run / "metrics").mkdir()
    for s in (2, 4, 6, 8):
        (run / "metrics" / f"eval-step{s:08d}.json").write_text("{}")
    (ck.root / (step_dir_name(10) + ".tmp")).mkdir()

    older = ck.root / step_dir_name(4)
    assert ck.resolve_start(str(older), overwrite=False) == older
    assert steps(run) == [2, 4] and not list(ck.root.glob("*.tmp"))
    (aside,) = (run / ABANDONED).iterdir()
    assert re.fullmatch(r"00000004-\d{8}T\d{6}", aside.name)
    assert steps(aside) == [6, 8] and read_state(aside / CHECKPOINTS / step_dir_name(8)).step == 8
    assert (aside / BEST / CONSOLIDATED).is_file() and not (run / BEST).exists()
    assert (aside / "DONE").is_file() and not (run / "DONE").exists()
    assert sorted(p.name for p in (aside / "metrics").iterdir()) == ["eval-step00000006.json", "eval-step00000008.json"]
    out = capsys.readouterr().out
    assert "step-00000006" in out and "step-00000008" in out and str(aside) in out

    # the new branch continues; --resume latest now follows it, and its pruning cannot reach the old branch
    state = read_state(older)
    save_steps(ck, state.run_id, upto=6, start=5)
    assert ck.resolve_start("latest", overwrite=False) == ck.root / step_dir_name(6)
    assert steps(aside) == [6, 8]


@pytest.mark.parametrize("env", ["SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"])
def test_a_restarted_job_with_an_explicit_resume_continues_its_own_progress(tmp_path, monkeypatch, capsys, env):
    """A job submitted with --resume step-4 rewinds once; its requeue or elastic restart must not rewind again."""
    ck, _ = make(tmp_path, keep_last=5)
    save_steps(ck, "r", upto=4)
    older = ck.root / step_dir_name(2)
    monkeypatch.setenv(env, "0")  # torchrun sets 0 on the first start
    assert ck.resolve_start(str(older), overwrite=False) == older  # the first start rewinds: 4 is set aside
    assert steps(ck.run_dir) == [2] and (ck.run_dir / ABANDONED).is_dir()
    save_steps(ck, "r", upto=8, start=5)  # the job's own progress since
    monkeypatch.setenv(env, "1")
    assert ck.resolve_start(str(older), overwrite=False) == ck.root / step_dir_name(8)
    assert steps(ck.run_dir) == [2, 6, 8] and len(list((ck.run_dir / ABANDONED).iterdir())) == 1
    assert "restart 1 of this job, which already continued from it" in capsys.readouterr().out


def test_explicit_resume_of_the_newest_checkpoint_moves_nothing(tmp_path):
    ck, _ = make(tmp_path)
    save_steps(ck, "r", upto=4)
    newest = ck.root / step_dir_name(4)
    assert ck.resolve_start(str(newest), overwrite=False) == newest
    assert steps(ck.run_dir) == [2, 4] and not (ck.run_dir / ABANDONED).exists()


def test_explicit_resume_of_an_incomplete_checkpoint_is_refused(tmp_path):
    ck, _ = make(tmp_path)
    save_steps(ck, "r", upto=2)
    (ck.root / step_dir_name(2) / COMPLETE).unlink()
    with pytest.raises(ConfigError, match="not a complete dist-train checkpoint"):
        ck.resolve_start(str(ck.root / step_dir_name(2)), overwrite=False)
    with pytest.raises(ConfigError, match="not a complete dist-train checkpoint"):
        ck.resolve_start(str(tmp_path / "nowhere"), overwrite=False)


def test_resume_from_another_runs_checkpoint_into_a_used_directory_needs_overwrite(tmp_path):
    other, _ = make(tmp_path / "a")
    save_steps(other, "other", upto=2)
    source = other.root / step_dir_name(2)
    ck, _ = make(tmp_path / "b")
    save_steps(ck, "mine", upto=4)
    with pytest.raises(ConfigError, match="holds checkpoints of another run") as e:
        ck.resolve_start(str(source), overwrite=False)
    assert "--overwrite" in str(e.value) and steps(ck.run_dir) == [2, 4]
    assert ck.resolve_start(str(source), overwrite=True) == source
    assert steps(ck.run_dir) == [] and steps(other.run_dir) == [2]


def test_resume_from_a_copy_of_the_same_lineage_moves_newer_checkpoints_aside(tmp_path):
    ck, _ = make(tmp_path)
    save_steps(ck, "r", upto=6)
    copy = tmp_path / "elsewhere" / step_dir_name(2)
    shutil.copytree(ck.root / step_dir_name(2), copy)
    assert ck.resolve_start(str(copy), overwrite=False) == copy
    assert steps(ck.run_dir) == [2] and steps(next((ck.run_dir / ABANDONED).iterdir())) == [4, 6]


def test_load_restores_the_state_and_refuses_an_unsafe_checkpoint_first(tmp_path):
    ck, acc = make(tmp_path)
    path = ck.save(TrainState(step=2, run_id="r", best_step=2))
    ck2, acc2 = make(tmp_path)
    assert ck2.load(path).run_id == "r" and acc2.loaded == [str(path)] and ck2.last_saved_step == 2
    outside = tmp_path / "outside"
    outside.mkdir()
    (path / "extra").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeCheckpointError, match="symlink"):
        ck2.load(path)
    assert acc2.loaded == [str(path)], "load_state was not reached"


# ---- loading never runs code -------------------------------------------------------------------------------


class _Evil:
    """Unpickling it runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _checkpoint_with_evil_pickle(tmp_path: Path, symlinked: bool) -> tuple[Path, Path]:
    """A complete single-process checkpoint, and an evil pickle inside it (plainly or through a symlinked dir)."""
    ck, _ = make(tmp_path)
    path = ck.save(TrainState(step=2, run_id="r"))
    marker = tmp_path / "pwned"
    evil_dir = tmp_path / "attacker" if symlinked else path / "pytorch_model"
    evil_dir.mkdir()
    torch.save({"x": _Evil(marker)}, evil_dir / "mp_rank_00_model_states.pt")
    if symlinked:
        (path / "pytorch_model").symlink_to(evil_dir, target_is_directory=True)
    return path, marker


@pytest.mark.parametrize("symlinked", [True, False], ids=["symlinked-dir", "plain"])
def test_a_checkpoint_with_code_in_a_pickle_is_refused_before_unpickling(tmp_path, symlinked):
    path, marker = _checkpoint_with_evil_pickle(tmp_path, symlinked)
    if symlinked:
        assert_data_only(path)  # the scan alone does not follow the symlink: the reported hole
    for load in (lambda: make(tmp_path)[0].load(path), lambda: consolidate_checkpoint(path)):
        with pytest.raises(UnsafeCheckpointError, match="symlink" if symlinked else "references code objects"):
            load()
    assert not marker.exists()
    evil = next((tmp_path / "attacker").glob("*.pt")) if symlinked else next(path.rglob("*.pt"))
    assert "builtins.exec" in torch.serialization.get_unsafe_globals_in_checkpoint(str(evil)), "it would run code"


def test_symlinked_file_escaping_the_checkpoint_is_refused(tmp_path):
    ck, acc = make(tmp_path)
    path = ck.save(TrainState(step=2, run_id="r"))
    secret = tmp_path / "secret.pkl"
    (path / "random_states_0.pkl").rename(secret)
    (path / "random_states_0.pkl").symlink_to(secret)
    with pytest.raises(UnsafeCheckpointError, match="symlink"):
        ck.load(path)
    assert acc.loaded == []


def test_eval_refuses_the_symlinked_checkpoint_with_exit_2(tmp_path, demo_shards, capsys):
    from dist_train import cli

    path, marker = _checkpoint_with_evil_pickle(tmp_path, symlinked=True)
    assert cli.main(["eval", "--checkpoint", str(path), "--shards", str(demo_shards)]) == 2
    assert "holds a symlink" in capsys.readouterr().err
    assert not marker.exists()


# ---- failed writes ------------------------------------------------------------------------------------------


def test_a_failed_write_raises_one_clear_line_and_removes_the_partial_checkpoint(tmp_path):
    ck, acc = make(tmp_path)
    save_steps(ck, "r", upto=2)
    acc.fail_at = {step_dir_name(4)}
    state = TrainState(step=4, run_id="r")
    with pytest.raises(CheckpointWriteError) as e:
        ck.maybe_save(state)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"checkpoint step-00000004 could not be written to {ck.root}" in msg
    assert "No space left on device" in msg and "free there" in msg and "needs about" in msg
    assert f"the last complete checkpoint is {ck.root / step_dir_name(2)} (step 2)" in msg
    assert "--resume latest" in msg
    assert not list(ck.root.glob("*.tmp")) and steps(ck.run_dir) == [2]
    assert ck.last_saved_step == 2
    acc.fail_at = set()
    assert ck.maybe_save(state) is not None and steps(ck.run_dir) == [2, 4]


def test_a_failed_first_write_says_there_is_nothing_to_resume_from(tmp_path):
    ck, acc = make(tmp_path)
    acc.fail_at = {step_dir_name(2)}
    with pytest.raises(CheckpointWriteError, match="no complete checkpoint of this run to resume from"):
        ck.save(TrainState(step=2, run_id="r"))
    assert not list(ck.root.glob("*"))


def test_a_failed_best_model_write_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    ck, _ = make(tmp_path)
    model = torch.nn.Linear(3, 2)

    def full_disk(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    ck.save_best(model, TrainState(step=5, run_id="r"), {"mean_cos": 0.9})  # written in the background
    with pytest.raises(CheckpointWriteError, match=r"best model \(step 5\) could not be written"):
        ck.close(TrainState(step=6, run_id="r"))  # (or the next save_best): the failure reaches every rank
    assert not list((ck.run_dir / BEST).iterdir())


def test_save_best_outside_deepspeed_writes_the_models_fp32_weights(tmp_path):
    ck, _ = make(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    path = ck.save_best(model, TrainState(step=5, run_id="r"), {"mean_cos": 0.9})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight += 1  # training goes on while the file is written: the snapshot is what gets written
    ck.close(TrainState(step=6, run_id="r"))
    # read as plain safetensors: the file's config (a FrontalNet) is not this stand-in model's
    sd, meta = load_file(str(path)), load_consolidated_meta(path)
    assert meta == {"step": 5, "val_mean_cos": 0.9, "run_id": "r"}
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) and sd[k].dtype == torch.float32 for k, v in expected.items())


# ---- two real ranks (gloo): a failure on one rank reaches every rank ------------------------------------------


class FakeCheckpointEngine:
    def __init__(self, fail: bool):
        self.fail = fail

    def save(self, state_dict, path):
        torch.save(state_dict, path)
        if self.fail:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 275648 vs 275536")


class FakeDeepSpeedEngine:
    """DeepSpeed's save_checkpoint shape: a collective, per-rank writes, rank 0's extras, a final barrier."""

    def __init__(self, rank: int, fail: bool):
        self.rank = rank
        self.checkpoint_engine = FakeCheckpointEngine(fail)

    def _copy_recovery_script(self, save_path):
        Path(save_path, "zero_to_fp32.py").write_text("# recovery\n")

    def save_checkpoint(self, save_dir, tag):
        import torch.distributed as dist

        t = torch.ones(1)
        dist.all_reduce(t)  # the tag check
        d = Path(save_dir, tag)
        d.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"w": torch.ones(3)}, d / f"zero_pp_rank_{self.rank}_optim_states.pt")
        if self.rank == 0:
            self._copy_recovery_script(d)
            Path(save_dir, "latest").write_text(tag)
        dist.barrier()
        return True


def _two_rank_worker(rank: int, port: int, tmp: str, results) -> None:
    """Both cases on one pair of processes: rank 1's Accelerate write fails, then its DeepSpeed shard write."""
    import torch.distributed as dist

    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        for mode in TWO_RANK_MODES:
            acc = FakeAccelerator(rank, 2, barrier=dist.barrier)
            if mode == "deepspeed":
                acc._models = [FakeDeepSpeedEngine(rank, fail=False)]
            ck, _ = make(Path(tmp) / mode, acc=acc)
            state = TrainState(run_id="r")
            state.step = 2
            ck.save(state)
            if mode == "save_state":
                acc.fail_at = {step_dir_name(4)} if rank == 1 else set()
            else:
                acc._models[0].checkpoint_engine.fail = rank == 1
            state.step = 4
            try:
                ck.save(state)
                results.put((mode, rank, "saved", ""))
            except CheckpointWriteError as e:
                results.put((mode, rank, "error", str(e)))
            t = torch.ones(1)
            dist.all_reduce(t)  # the ranks are still in step afterwards
            results.put((mode, rank, "in step", str(float(t))))
        dist.destroy_process_group()
    except BaseException:
        results.put(("?", rank, "crash", traceback.format_exc()))


TWO_RANK_MODES = ("save_state", "deepspeed")


def test_a_write_failing_on_one_rank_only_reaches_every_rank_without_a_hang(tmp_path):
    """Rank 1 fails alone, in Accelerate's part of save_state, then inside (a fake of) DeepSpeed's
    save_checkpoint, which has a barrier after its writes: both ranks raise the same line, none hangs."""
    from conftest import free_port

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, str(tmp_path), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    got: dict = {}
    while True:
        try:
            mode, rank, kind, text = results.get(timeout=1)
        except queue.Empty:
            break
        got.setdefault(mode, {}).setdefault(rank, {})[kind] = text
    assert not hung and "?" not in got, f"ranks hung or crashed: {got}"
    for mode in TWO_RANK_MODES:
        by_rank = got[mode]
        assert by_rank[0]["error"] == by_rank[1]["error"], f"{mode}: every rank raises the same line"
        msg = by_rank[0]["error"]
        assert "rank 1: " in msg and "checkpoint step-00000004 could not be written" in msg, msg
        if mode == "deepspeed":
            assert "unexpected pos 275648 vs 275536" in msg
        assert by_rank[0]["in step"] == by_rank[1]["in step"] == "2.0"
        root = tmp_path / mode / "run" / CHECKPOINTS
        assert sorted(p.name for p in root.iterdir()) == [step_dir_name(2)], "the partial .tmp is gone"


# ---- a real disk full (tmpfs) --------------------------------------------------------------------------------


class Tmpfs:
    def __init__(self, path: Path):
        self.path = path

    def mount(self, size: str, remount: bool = False) -> None:
        """Mount (or resize) it; skips the test where mounting is not permitted."""
        mnt = self.path
        opts = f"remount,size={size}" if remount else f"size={size}"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        if r.returncode:
            if remount:
                raise RuntimeError(f"remount failed: {r.stderr}")
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs to mount at tmp_path/fs with `.mount(size)`, unmounted afterwards."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    fs = Tmpfs(tmp_path / "fs")
    fs.path.mkdir()
    yield fs
    subprocess.run(["umount", "-l", str(fs.path)], capture_output=True)


def test_disk_full_on_a_real_filesystem_keeps_the_last_checkpoint_and_removes_the_partial(small_tmpfs):
    small_tmpfs.mount("1536k")
    ck, acc = make(small_tmpfs.path)
    acc.payload = 1 << 20  # optimizer.bin of 1 MiB: the first checkpoint fits, the second does not
    save_steps(ck, "r", upto=2)
    with pytest.raises(CheckpointWriteError) as e:
        save_steps(ck, "r", upto=4, start=3)
    msg = str(e.value)
    assert re.search(r"\(rank 0: \w*(Error|Exception): ", msg), msg
    assert f"the last complete checkpoint is {ck.root / step_dir_name(2)}" in msg
    assert re.search(r"[\d.]+ KiB free there, a checkpoint needs about 1\.\d MiB", msg), msg
    assert steps(ck.run_dir) == [2] and not list(ck.root.glob("*.tmp"))
    small_tmpfs.mount("8m", remount=True)
    assert ck.maybe_save(TrainState(step=4, run_id="r")) is not None and steps(ck.run_dir) == [2, 4]


# ---- best/model.safetensors holds the fp32 masters (the shared ZeRO runs) ------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_best_model_of_a_zero_run_is_exactly_the_fp32_masters_of_its_step(zero_runs, stage):
    """bf16 ZeRO: the module holds bf16 weights; best/ must hold the optimizer's fp32 masters, i.e. what
    DeepSpeed's zero_to_fp32 reconstructs from the checkpoint of the same step, bit for bit."""
    from dist_train.model import build_model

    run = zero_runs[stage]
    rc, log = run.finish()
    assert rc == 0, log[-3000:]
    best, cfg, meta = load_consolidated(run.run_dir / BEST / CONSOLIDATED)
    ckpt = run.run_dir / CHECKPOINTS / step_dir_name(meta["step"])
    assert (ckpt / COMPLETE).is_file(), f"the checkpoint of the best step {meta['step']} was pruned"
    masters, _ = consolidate_checkpoint(ckpt)
    assert best.keys() == masters.keys() == build_model(cfg.model).state_dict().keys()
    differ = [k for k in best if best[k].dtype != torch.float32 or not torch.equal(best[k], masters[k])]
    assert not differ, f"{len(differ)}/{len(best)} tensors differ from the masters, e.g. {differ[:3]}"
    bf16 = sum(int((v.bfloat16().float() != v).sum()) for v in best.values())
    assert bf16 > 0, "the masters must not be bf16 values upcast (else the check above could not tell)"


# ---- real single-process runs: lineage rules end to end (needs train.py to call resolve_start) ---------------

LINEAGE_FLAGS = ["--max_steps", "6", "--save_every_steps", "2", "--samples_per_epoch", "384"]


def train(demo_shards: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dist_train", "train", *FAST_TRAIN_FLAGS, "--data_dir", str(demo_shards)]
    cmd += [*LINEAGE_FLAGS, "--output_dir", str(run_dir), *extra]
    return subprocess.run(
        cmd, cwd=REPO, env=os.environ | RUN_ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


def ids_and_steps(run_dir: Path) -> list[tuple[int, str, int]]:
    """(step, run_id, resumed_from) of each complete checkpoint."""
    return [(checkpoint_step(p), (s := read_state(p)).run_id, s.resumed_from) for p in complete_checkpoints(run_dir)]


def test_lineage_end_to_end_refuse_resume_older_then_latest_then_overwrite(demo_shards, tmp_path):
    run = tmp_path / "run"
    r = train(demo_shards, run)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    first = ids_and_steps(run)
    assert [s for s, _, _ in first] == [2, 4, 6] and len({i for _, i, _ in first}) == 1 and first[0][1]
    run_id = first[0][1]
    config_before = (run / "config.yaml").read_text()

    # a fresh start into the used directory is refused before anything is touched
    r = train(demo_shards, run, "--lr", "1e-3")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(rf"error: output_dir {re.escape(str(run))} already holds checkpoints .*step 6", r.stderr)
    assert "--resume latest" in r.stderr and "--overwrite" in r.stderr
    assert ids_and_steps(run) == first and (run / "config.yaml").read_text() == config_before

    # an explicit resume from an older step moves the newer ones aside and continues from there
    older = run / CHECKPOINTS / step_dir_name(2)
    r = train(demo_shards, run, "--resume", str(older), "--max_steps", "4")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (aside,) = (run / ABANDONED).iterdir()
    assert f"to {aside}" in r.stdout and f"resumed from {older} at step 2" in r.stdout
    assert [s for s, _, _ in ids_and_steps(aside)] == [4, 6]
    assert ids_and_steps(run) == [(2, run_id, -1), (4, run_id, 2)]

    # --resume latest continues the new branch, not the abandoned one
    r = train(demo_shards, run, "--resume", "latest")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"resumed from {run / CHECKPOINTS / step_dir_name(4)} at step 4" in r.stdout
    assert ids_and_steps(run) == [(2, run_id, -1), (4, run_id, 2), (6, run_id, 4)]

    # --overwrite starts over: a new lineage, the old outputs gone
    r = train(demo_shards, run, "--overwrite")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "--overwrite: deleted the previous run's checkpoints" in r.stdout
    fresh = ids_and_steps(run)
    assert [s for s, _, _ in fresh] == [2, 4, 6] and {i for _, i, _ in fresh} != {run_id}
    assert all(f == -1 for _, _, f in fresh) and not (run / ABANDONED).exists()


def test_disk_full_during_a_real_run_exits_4_with_one_line_and_resumes(demo_shards, small_tmpfs):
    """10 MiB: the first checkpoint of the tiny model (6.6 MiB) fits, the second fails part-way."""
    small_tmpfs.mount("10m")
    run = small_tmpfs.path / "run"
    r = train(demo_shards, run)
    out = r.stdout + r.stderr
    assert r.returncode == 4, out[-3000:]
    lines = [ln for ln in out.splitlines() if "could not be written" in ln]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert "checkpoint step-00000004" in lines[0] and "free there" in lines[0]
    assert f"the last complete checkpoint is {run / CHECKPOINTS / step_dir_name(2)}" in lines[0]
    assert [p.name for p in (run / CHECKPOINTS).iterdir()] == [step_dir_name(2)], "no .tmp left behind"
    small_tmpfs.mount("64m", remount=True)
    r = train(demo_shards, run, "--resume", "latest")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"resumed from {run / CHECKPOINTS / step_dir_name(2)} at step 2" in r.stdout
    assert steps(run)[-1] == 6
