"""SIGTERM to a run's whole process group (scancel, preemption without --signal, `kill -TERM -PGID`), for real.

The group holds the trainer (or the launcher, which passes the signal on to each rank's own session) and the
DataLoader workers: the workers must not die of it, the ranks stop with a checkpoint and PREEMPTED, and a
resume continues. A run that cannot reach its stop checkpoint (its workers hang) still ends within seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAST_TRAIN_FLAGS, RUN_TIMEOUT_S, TrainRun

from dist_train import config
from dist_train.checkpoint import COMPLETE, step_dir_name
from dist_train.preemption import EXIT_STOP_TIMEOUT
from dist_train.rundir import CHECKPOINTS, DONE, PREEMPTED

SIGNAL_AT = 10  # the group is signalled once the progress bar shows this step
GRACE_S = 3  # --stop_grace_seconds of the run whose workers hang


class GroupRun(TrainRun):
    new_session = True


def flags(demo_shards: Path, *extra: str) -> list[str]:
    return [*FAST_TRAIN_FLAGS, "--num_workers", "2", "--data_dir", str(demo_shards), "--epochs", "50", *extra]


def wait_for_step(run: TrainRun, step: int) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while max(map(int, re.findall(r"(\d+)/\d+ \[", run.log_path.read_text(errors="replace"))), default=0) < step:
        assert run.proc.poll() is None, f"the run ended before step {step}: {run.log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.1)


def signal_group(run: TrainRun) -> tuple[list[psutil.Process], float]:
    """SIGTERM to the run's process group; the processes it had then (launcher, ranks, workers) and the time."""
    procs = psutil.Process(run.proc.pid).children(recursive=True)
    assert any(p.name() == "pt_data_worker" for p in procs), [p.name() for p in procs]
    os.killpg(run.proc.pid, signal.SIGTERM)
    return procs, time.monotonic()


def ended(run: TrainRun, procs: list[psutil.Process], sent: float) -> dict:
    rc, log = run.finish()
    took = time.monotonic() - sent
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()
    marker = run.run_dir / PREEMPTED  # read now: a resume removes it
    preempted = marker.read_text().strip() if marker.exists() else None
    complete = sorted(p.parent.name for p in (run.run_dir / CHECKPOINTS).glob(f"*/{COMPLETE}"))
    return {
        "rc": rc,
        "log": log,
        "took": took,
        "left": [p.pid for p in alive],
        "preempted": preempted,
        "complete": complete,
    }


def stopped_at(log: str) -> int:
    found = re.findall(r"preempted at step (\d+) \(SIGTERM\), checkpoint \1", log)
    assert found, f"the signalled run did not stop with a checkpoint: {log[-3000:]}"
    return int(found[-1])


def one_process_flow(demo_shards: Path, tmp: Path) -> dict:
    """A 1-process run with 2 loader workers signalled as a group; then its resume, whose workers hang, signalled."""
    run = GroupRun(tmp, "run", flags(demo_shards, "--stop_grace_seconds", str(GRACE_S)))
    try:
        wait_for_step(run, SIGNAL_AT)
        first = ended(run, *signal_group(run))
        step = stopped_at(first["log"])
        run.start([*run.flags, "--resume", "latest"])
        wait_for_step(run, step + 5)  # the resumed run trains on
        workers = psutil.Process(run.proc.pid).children(recursive=True)
        for w in workers:  # hung workers: the trainer waits for a batch that never comes
            w.suspend()
        time.sleep(1.5)  # the batches already fetched are used up
        blocked = ended(run, *signal_group(run))
    finally:
        run.kill()
    return {"run": run, "first": first, "step": step, "blocked": blocked}


def ddp_flow(demo_shards: Path, tmp: Path) -> dict:
    """A 2-process DDP run (2 loader workers each) signalled as a group under `accelerate launch`, then resumed."""
    run = GroupRun(tmp, "ddp", flags(demo_shards), ["--config_file", "launch/accelerate/cpu/ddp.yaml"])
    try:
        wait_for_step(run, SIGNAL_AT)
        first = ended(run, *signal_group(run))
        step = stopped_at(first["log"])
        run.start([*run.flags, "--resume", "latest", "--max_steps", str(step + 4)])
        rc, log = run.finish()
    finally:
        run.kill()
    return {"run": run, "first": first, "step": step, "resumed": (rc, log[len(first["log"]) :])}


@pytest.fixture(scope="module")
def flows(demo_shards, tmp_path_factory) -> dict:
    """Both flows at once, each in a thread (they wait on their processes); a test takes its own with `outcome`."""
    results: dict = {}

    def capture(name, flow):
        try:
            results[name] = flow(demo_shards, tmp_path_factory.mktemp(name))
        except BaseException as e:  # re-raised in the test that asks
            results[name] = e

    threads = {
        n: threading.Thread(target=capture, args=(n, f)) for n, f in (("one", one_process_flow), ("ddp", ddp_flow))
    }
    for t in threads.values():
        t.start()
    yield threads, results
    for t in threads.values():
        t.join()


def outcome(flows, name: str) -> dict:
    threads, results = flows
    threads[name].join()
    if isinstance(results[name], BaseException):
        raise results[name]
    return results[name]


@pytest.fixture
def one_process(flows) -> dict:
    return outcome(flows, "one")


@pytest.fixture
def ddp(flows) -> dict:
    return outcome(flows, "ddp")


def test_group_sigterm_stops_a_run_with_loader_workers_with_a_checkpoint(one_process):
    first, step = one_process["first"], one_process["step"]
    assert first["rc"] == 0, first["log"][-3000:]  # the documented code of a stop request
    assert step >= SIGNAL_AT and "Traceback" not in first["log"] and "DataLoader worker" not in first["log"]
    assert first["preempted"] == str(step) and first["complete"] == [step_dir_name(step)]
    assert first["left"] == [], "the trainer ends its loader workers"


def test_a_run_blocked_on_hung_workers_ends_within_the_grace_after_sigterm(one_process):
    blocked, run_dir, step = one_process["blocked"], one_process["run"].run_dir, one_process["step"]
    log = blocked["log"]
    assert f"resumed from {run_dir / CHECKPOINTS / step_dir_name(step)} at step {step}" in log
    assert blocked["rc"] == EXIT_STOP_TIMEOUT == 143, log[-3000:]
    assert GRACE_S <= blocked["took"] < GRACE_S + 10
    assert (
        f"dist-train: rank 0: the run did not end within {GRACE_S} s of SIGTERM (blocked, waiting for data or for "
        f"another rank); exiting 143 without a stop checkpoint: resume from the last complete one (--resume latest)"
    ) in log
    assert "Traceback" not in log and blocked["left"] == [], "the hung workers are killed with the trainer"
    assert blocked["preempted"] is None and blocked["complete"] == [step_dir_name(step)]  # no stop checkpoint


def test_group_sigterm_stops_a_ddp_run_with_a_checkpoint_and_a_resume_continues(ddp):
    first, run_dir, step = ddp["first"], ddp["run"].run_dir, ddp["step"]
    log = first["log"]
    # the launcher reports the signal it got (128 + SIGTERM); each rank stopped at the same step
    assert first["rc"] == 143, log[-3000:]
    assert f"[rank 0/2] preempted at step {step}" in log and f"[rank 1/2] preempted at step {step}" in log
    assert "Traceback" not in log and "DataLoader worker" not in log
    assert first["preempted"] == str(step) and first["complete"] == [step_dir_name(step)]
    assert first["left"] == [], "ranks and loader workers all ended"
    rc, resumed = ddp["resumed"]
    assert rc == 0, resumed[-3000:]
    assert f"resumed from {run_dir / CHECKPOINTS / step_dir_name(step)} at step {step}" in resumed
    assert (run_dir / DONE).read_text().strip() == str(step + 4) and not (run_dir / PREEMPTED).exists()


@pytest.mark.parametrize("value", ["-1.0", "inf", "nan"])
def test_stop_grace_is_zero_or_finite_seconds(value):
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    with pytest.raises(
        config.ConfigError,
        match=f"stop_grace_seconds: '?{value}'? is not (allowed; must be 0 .off. or finite|valid; expected a finite number)",
    ):
        config.from_args(p.parse_args(["--data_dir", "null", "--stop_grace_seconds", value]))
