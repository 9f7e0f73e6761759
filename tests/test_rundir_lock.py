"""One run per run directory, and --overwrite only where dist-train wrote: real `dist-train train` processes.

- Two runs started together into one --output_dir: one is refused at once (exit 2, one line naming the
  holder's host and pid), the other runs on undisturbed and ends with its own outputs.
- A run killed with SIGKILL leaves no stale lock, even while its loader worker outlives it: a start while it
  lives is refused, a resume after its death continues its checkpoint.
- --overwrite into another tool's directory is refused naming what is there, nothing deleted; an output_dir
  that is a file is refused in one line. In process: the lock conflicts between holders and is not held by
  forked children; dist-train's own config.yaml marks a run directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from conftest import FAST_TRAIN_FLAGS, REPO, RUN_ENV, RUN_TIMEOUT_S

from dist_train.checkpoint import (
    COMPLETE,
    Checkpointer,
    RunLock,
    checkpoint_step,
    complete_checkpoints,
    read_state,
)
from dist_train.config import Config, ConfigError, load_run_config
from dist_train.rundir import LOCK, PREEMPTED, STOP, RunDir

# runs that last until the test ends them (a STOP file or SIGKILL); a checkpoint every 5 steps
LONG = ["--epochs", "10000", "--max_steps", "100000", "--save_every_steps", "5", "--eval_every_steps", "0"]


class Train:
    """`dist-train train` in the background; stdout and stderr to files of their own."""

    def __init__(self, tmp: Path, name: str, run_dir: Path, data: Path, *flags: str):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        cmd = [sys.executable, "-m", "dist_train", "train", *FAST_TRAIN_FLAGS, "--data_dir", str(data), *flags]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [*cmd, "--output_dir", str(run_dir)], cwd=REPO, env=os.environ | RUN_ENV, stdout=out, stderr=err
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def result(self) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return rc, self.out.read_text(errors="replace"), self.err.read_text(errors="replace")


def wait_for(condition, what: str, runs: list[Train]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        ended = [r for r in runs if r.proc.poll() is not None]
        assert not ended, f"{what}: a run ended first: " + "".join(r.result()[2][-2000:] for r in ended)
        assert time.monotonic() < deadline, f"no {what} before the timeout"
        time.sleep(0.05)


def has_checkpoint(run_dir: Path):
    return lambda: bool(complete_checkpoints(run_dir))


def assert_refused_by(err: str, run_dir: Path, holder: Train) -> None:
    """One line, no traceback, naming the holder's host and pid."""
    assert err.count("\n") == 1 and "Traceback" not in err, err[-3000:]
    assert err.startswith(
        f"dist-train train: error: output_dir {run_dir} is in use by another run "
        f"(host {socket.gethostname()}, pid {holder.pid}, started "
    ), err


@pytest.fixture
def stop_all():
    runs: list[Train] = []
    yield runs
    for r in runs:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def test_two_runs_started_together_one_is_refused_naming_the_holder_the_other_ends_intact(
    demo_shards, tmp_path, stop_all
):
    run = tmp_path / "run"
    lrs = {"a": 1e-3, "b": 2e-3}  # the config.yaml left behind tells whose run it is
    runs = {n: Train(tmp_path, n, run, demo_shards, *LONG, "--lr", str(lr)) for n, lr in lrs.items()}
    stop_all.extend(runs.values())
    wait_for(lambda: any(r.proc.poll() is not None for r in runs.values()), "refusal", [])
    (loser,) = [n for n, r in runs.items() if r.proc.poll() is not None]
    (winner,) = set(runs) - {loser}
    rc, out, err = runs[loser].result()
    assert rc == 2, out[-2000:] + err[-2000:]
    assert_refused_by(err, run, runs[winner])
    assert err.endswith("); wait for it to end or stop it, or choose another --output_dir\n"), err

    # the winner trains on undisturbed; a stop request ends it with a checkpoint
    wait_for(has_checkpoint(run), "first checkpoint", [runs[winner]])
    (run / STOP).touch()
    rc, out, err = runs[winner].result()
    assert rc == 0, out[-2000:] + err[-2000:]
    states = [read_state(p) for p in complete_checkpoints(run)]
    assert len({s.run_id for s in states}) == 1 and all(s.resumed_from == -1 for s in states)
    assert (run / PREEMPTED).read_text() == f"{states[-1].step}\n"
    assert load_run_config(run).optim.lr == lrs[winner]
    assert json.loads((run / LOCK).read_text())["pid"] == runs[winner].pid


def test_a_run_killed_with_sigkill_leaves_no_stale_lock_and_is_resumed(demo_shards, tmp_path, stop_all):
    """The main process is killed alone: its loader worker lives on for a while, and must not hold the lock."""
    run = tmp_path / "run"
    first = Train(tmp_path, "first", run, demo_shards, *LONG, "--num_workers", "1")
    stop_all.append(first)
    wait_for(has_checkpoint(run), "first checkpoint", [first])

    # a requeued job started while the old one still lives is refused, naming it
    early = Train(tmp_path, "early", run, demo_shards, "--resume", "latest", "--max_steps", "100000")
    stop_all.append(early)
    rc, out, err = early.result()
    assert rc == 2, out[-2000:] + err[-2000:]
    assert_refused_by(err, run, first)

    main = psutil.Process(first.pid)
    wait_for(lambda: bool(main.children()), "loader worker", [first])
    workers = main.children()
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait()
    with open(run / LOCK) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free at once, though the worker may still run
        alive = [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert alive, "the worker was still alive while the lock was taken (else this proves nothing)"

    newest = complete_checkpoints(run)[-1]
    step = checkpoint_step(newest)
    resumed = Train(tmp_path, "resumed", run, demo_shards, "--resume", "latest", "--max_steps", str(step + 2))
    stop_all.append(resumed)
    rc, out, err = resumed.result()
    assert rc == 0, out[-2000:] + err[-2000:]
    assert f"resumed from {newest} at step {step}" in out
    assert read_state(complete_checkpoints(run)[-1]).run_id == read_state(newest).run_id


def test_overwrite_of_another_tools_directory_and_an_output_dir_that_is_a_file_are_refused(demo_shards, tmp_path):
    foreign = tmp_path / "foreign"
    for d in ("checkpoints", "best", "tb", "metrics"):
        (foreign / d).mkdir(parents=True)
        (foreign / d / "theirs.txt").write_text("not dist-train's")
    (foreign / "config.yaml").write_text("lr: 0.1\nmodel: resnet\n")
    before = sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cmd = [sys.executable, "-m", "dist_train", "train", "--config", "debug-cpu", "--data_dir", str(demo_shards)]
    procs = {
        "foreign": subprocess.Popen([*cmd, "--output_dir", str(foreign), "--overwrite"], **_pipes()),
        "file": subprocess.Popen([*cmd, "--output_dir", str(a_file)], **_pipes()),
        "below a file": subprocess.Popen([*cmd, "--output_dir", str(a_file / "run")], **_pipes()),
    }
    errs = {}
    for name, p in procs.items():
        _, errs[name] = p.communicate(timeout=RUN_TIMEOUT_S)
        assert p.returncode == 2, f"{name}: {errs[name][-2000:]}"
        assert errs[name].count("\n") == 1 and "Traceback" not in errs[name], errs[name]
    assert (
        f"output_dir {foreign} is not a dist-train run directory (no dist-train config.yaml, no checkpoint) but "
        "holds config.yaml, checkpoints/, best/, tb/, metrics/: a run would write into them and --overwrite would "
        "delete them; choose another --output_dir" in errs["foreign"]
    )
    assert sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*")) == before, "nothing deleted or added"
    assert f"output_dir {a_file} is a file; pass a directory path to --output_dir" in errs["file"]
    assert f"output_dir {a_file / 'run'}: {a_file} is a file; pass a directory path" in errs["below a file"]
    assert a_file.read_text() == "x"


def _pipes() -> dict:
    return dict(cwd=REPO, env=os.environ | RUN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- in process: the lock and the marker --------------------------------------------------------------------


def checkpointer(run_dir: Path) -> Checkpointer:
    cfg = Config()
    return Checkpointer(cfg.checkpoint, run_dir, SimpleNamespace(is_main_process=True), cfg)


def test_a_second_holder_is_refused_until_the_first_releases_and_a_forked_child_never_holds_it(tmp_path):
    run = tmp_path / "run"
    first = checkpointer(run)
    assert first.resolve_start(None, overwrite=False) is None
    assert first.resolve_start(None, overwrite=False) is None, "the holder may ask again"
    with pytest.raises(ConfigError, match=rf"in use by another run \(host .*, pid {os.getpid()}, started "):
        checkpointer(run).resolve_start(None, overwrite=False)
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # a loader worker: alive, while the parent lets go
        os.write(ready_w, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"  # the child runs (its fork hooks are done)
        first._lock.release()
        lock = RunLock.acquire(run)
        assert lock is not None and json.loads(RunDir(run).lock.read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_a_directory_is_dist_trains_by_its_config_yaml_or_a_checkpoint(tmp_path):
    """--overwrite deletes what a run wrote where its config.yaml marks the directory; a foreign one is refused."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for d in (ours, theirs):
        (d / "tb").mkdir(parents=True)
        (d / "tb" / "events").write_text("x")
    Config().save(ours)
    (theirs / "checkpoints" / "step-00000005").mkdir(parents=True)  # named like ours, but no trainer state
    (theirs / "checkpoints" / "step-00000005" / COMPLETE).write_text("")
    assert checkpointer(ours).resolve_start(None, overwrite=True) is None
    assert sorted(p.name for p in ours.iterdir()) == [LOCK, "config.yaml"]
    with pytest.raises(ConfigError, match=r"is not a dist-train run directory .* holds checkpoints/, tb/"):
        checkpointer(theirs).resolve_start(None, overwrite=True)
    assert (theirs / "tb" / "events").is_file() and not (theirs / LOCK).exists()
