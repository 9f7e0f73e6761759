"""SLURM job scripts, on a real local SLURM cluster (launch/slurm/local-cluster.sh, two emulated nodes).

The jobs are submitted together at the start of the module and train concurrently (the time budget
is minutes on two cores); each test then waits for its own job. The command-construction tests run
the scripts with stubbed ``srun``/``scontrol`` and need no SLURM at all.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dist_train.checkpoint import COMPLETE, complete_checkpoints, step_dir_name
from dist_train.metrics import TRAIN_TAGS
from dist_train.rundir import CHECKPOINTS, DONE, PREEMPTED

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = REPO / "launch" / "slurm"
CLUSTER = SLURM_DIR / "local-cluster.sh"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
JOB_TIMEOUT_S = 240
PREEMPT_STEPS = 150  # long enough that the signal lands mid-run, short enough to finish after the requeue
PREEMPT_AT = 20  # the signal is sent once the progress bar shows this step

missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
needs_slurm = pytest.mark.skipif(
    bool(missing) or os.geteuid() != 0,
    reason=f"needs the slurm-wlm and munge packages and root (missing: {missing or 'none'}; "
    f"uid {os.geteuid()}); install with `launch/slurm/local-cluster.sh install`",
)


def trainer_args(data_dir: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--config", "debug-cpu", "--data_dir", str(data_dir), "--output_dir", str(run_dir),
        "--max_steps", str(steps), "--batch_size", "16", *extra,
    ]  # fmt: skip


# ---- the local cluster and its jobs -----------------------------------------------------------------


def free_port_block(n: int) -> int:
    """First of n consecutive free TCP ports (slurmctld + one slurmd per node)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no block of free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Cluster:
    """A private local cluster for this module (own state dir and ports), stopped at the end."""

    def __init__(self, state_dir: Path):
        self.env = os.environ | {
            "DIST_TRAIN_SLURM_DIR": str(state_dir),
            "DIST_TRAIN_SLURM_PORT": str(free_port_block(3)),
            "SLURM_CONF": str(state_dir / "slurm.conf"),
        }

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, until, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} did not reach the expected state in {timeout} s: {self.job(job_id)}")

    def wait_done(self, job_id: str) -> dict[str, str]:
        return self.wait(job_id, lambda j: j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))

    def diagnose(self, job_id: str) -> str:
        """What SLURM itself says about a job, for failure messages: its record and its daemon log lines."""
        state_dir = Path(self.env["DIST_TRAIN_SLURM_DIR"])
        lines = [self.run("scontrol", "show", "job", job_id, check=False).stdout]
        for f in sorted(state_dir.glob("slurm*.log")):
            mentions = re.compile(rf"(JobId=|[Jj]ob |StepId=){job_id}\b|\[{job_id}\.(batch|\d)")
            hits = [ln for ln in f.read_text(errors="replace").splitlines() if mentions.search(ln)]
            lines += [f"--- {f.name}", *hits[-30:]]
        return "\n".join(lines)


class Job:
    def __init__(self, cluster: Cluster, script: str, log: Path, sbatch_opts: list[str], env: dict, args: list[str]):
        self.cluster, self.log = cluster, log
        cmd = ["sbatch", "--parsable", f"--output={log}", *sbatch_opts, str(SLURM_DIR / script), *args]
        env = cluster.env | {"DIST_TRAIN_PYTHON": sys.executable} | env
        self.id = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def finish(self) -> dict[str, str]:
        info = self.cluster.wait_done(self.id)
        return info | {"log": self.text()}

    def explain(self, info: dict[str, str]) -> str:
        """The job log's tail and SLURM's own view: a job that fails before its script runs leaves no log."""
        return f"{info['log'][-3000:]}\n--- SLURM on job {self.id}:\n{self.cluster.diagnose(self.id)}"


def preempt_when_training(job: Job, result: dict) -> None:
    """What SLURM does before a time limit; SLURM then holds the requeued job for the local cluster's
    credential lifetime (15 s) and starts it again by itself.

    The test does not release it early with StartTime=now: a relaunch stamped in the same second as the
    old credential's revocation is refused by slurmd and the job ends FAILED (it happened in CI).
    """
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while max(map(int, re.findall(rf"(\d+)/{PREEMPT_STEPS} \[", job.text())), default=0) < PREEMPT_AT:
            assert time.monotonic() < deadline, f"training never reached step {PREEMPT_AT}"
            time.sleep(0.2)
        job.cluster.run("scancel", "--signal=USR1", "--batch", job.id)
        result["pending"] = job.cluster.wait(job.id, lambda j: j["JobState"] == "PENDING" and j["Restarts"] == "1")
    except BaseException as e:  # reported by the test that joins the thread
        result["error"] = e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm-state")
    c = Cluster(state)
    started = c.run(str(CLUSTER), "start", check=False)
    assert started.returncode == 0, f"local cluster did not start:\n{started.stdout}\n{started.stderr}"
    yield c
    c.run(str(CLUSTER), "stop", check=False)


@pytest.fixture(scope="module")
def jobs(cluster, small_shards, tmp_path_factory):
    """All jobs at once: one-node ZeRO-2, DDP preempted and requeued, two-node, and a misconfigured one."""
    tmp = tmp_path_factory.mktemp("slurm-jobs")
    one_node = {"DIST_TRAIN_PROCS_PER_NODE": "2"}
    submitted = {
        "zero2": Job(
            cluster, "train.sbatch", tmp / "zero2.out", [],
            one_node | {"DIST_TRAIN_ACCELERATE_CONFIG": "launch/accelerate/cpu/zero2-bf16.yaml"},
            trainer_args(small_shards, tmp / "zero2", 8, "--log_every_steps", "1"),
        ),
        "preempt": Job(
            cluster, "train.sbatch", tmp / "preempt.out", [],
            one_node | {"DIST_TRAIN_ACCELERATE_CONFIG": "launch/accelerate/cpu/ddp.yaml"},
            trainer_args(small_shards, tmp / "preempt", PREEMPT_STEPS, "--log_every_steps", "1"),
        ),
        "multinode": Job(
            cluster, "train-multinode.sbatch", tmp / "multinode.out", ["--nodes=2"],
            {"DIST_TRAIN_PROCS_PER_NODE": "1", "DIST_TRAIN_ACCELERATE_CONFIG": "launch/accelerate/cpu/multi-node.yaml"},
            trainer_args(small_shards, tmp / "multinode", 8),
        ),
        "bad_config": Job(
            cluster, "train.sbatch", tmp / "bad_config.out", [], one_node,
            trainer_args(small_shards, tmp / "bad_config", 8) + ["--config", str(tmp / "no-such-config.yaml")],
        ),
    }  # fmt: skip
    preempt_result: dict = {}
    watcher = threading.Thread(target=preempt_when_training, args=(submitted["preempt"], preempt_result), daemon=True)
    watcher.start()
    submitted["preempt"].watcher, submitted["preempt"].result = watcher, preempt_result
    yield submitted | {"dir": tmp}
    for job in submitted.values():
        cluster.run("scancel", job.id, check=False)


def rank_lines(log: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    # not anchored at a line start: another rank's progress bar may end without a newline just before a rank line
    for m in re.finditer(r"\[rank (\d+)/(\d+)\] ([^\r\n]*)", log):
        out.setdefault(int(m[1]), []).append(m[3])
    return out


def logged_steps(tb_dir: Path, tag: str = TRAIN_TAGS["loss"]) -> list[int]:
    """Every step written for `tag` in every event file, duplicates kept (TensorBoard's reader would hide them)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


# ---- end to end on the cluster ----------------------------------------------------------------------


@needs_slurm
def test_one_node_zero2_job_trains_to_the_end_and_logs_both_ranks(jobs):
    job = jobs["zero2"].finish()
    run = jobs["dir"] / "zero2"
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", jobs["zero2"].explain(job)
    ranks = rank_lines(job["log"])
    assert sorted(ranks) == [0, 1], job["log"][-3000:]
    for r in (0, 1):
        assert any("DeepSpeed ZeRO-2" in line and "bf16" in line for line in ranks[r]), ranks[r]
        assert ranks[r][-1] == "finished at step 8"
    assert (run / DONE).read_text().strip() == "8"
    assert (run / CHECKPOINTS / step_dir_name(8) / COMPLETE).is_file()
    assert logged_steps(run / "tb") == list(range(1, 9)), "TensorBoard should have the loss of each of the 8 steps"
    assert "dist-train job: finished: step 8" in job["log"]


@needs_slurm
def test_preempted_job_checkpoints_requeues_resumes_and_loses_no_step(jobs):
    job = jobs["preempt"]
    job.watcher.join(JOB_TIMEOUT_S)
    if "error" in job.result:
        raise job.result["error"]
    info = job.finish()
    log, run = info["log"], jobs["dir"] / "preempt"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", job.explain(info)

    stopped = re.search(r"dist-train: preempted at step (\d+)", log)
    assert stopped, log[-3000:]
    n = int(stopped[1])
    assert PREEMPT_AT <= n < PREEMPT_STEPS
    assert f"dist-train job: stopped at step {n} with a complete checkpoint; requeueing job {job.id}" in log
    assert f"resumed from {run / CHECKPOINTS / step_dir_name(n)} at step {n}" in log
    assert "(restart 1)" in log
    # Both ranks stopped at the same step, and both finished at the end.
    ranks = rank_lines(log)
    for r in (0, 1):
        assert f"preempted at step {n}" in ranks[r] and ranks[r][-1] == f"finished at step {PREEMPT_STEPS}"
    assert (run / DONE).read_text().strip() == str(PREEMPT_STEPS)
    assert [p.name for p in complete_checkpoints(run)][-1] == step_dir_name(PREEMPT_STEPS)
    assert not (run / PREEMPTED).exists()
    # Every optimizer step ran exactly once across the two runs of the job.
    assert logged_steps(run / "tb") == list(range(1, PREEMPT_STEPS + 1))


@needs_slurm
def test_ddp_twin_runs_distributed_data_parallel(jobs):
    """cpu/ddp.yaml must give DDP (gradients averaged across ranks), not two independent single-process runs."""
    log = jobs["preempt"].finish()["log"]
    devices = [line for lines in rank_lines(log).values() for line in lines if line.startswith("device")]
    assert devices and all("MULTI_CPU" in line for line in devices), devices


@needs_slurm
def test_two_node_job_trains_as_one_group(jobs):
    job = jobs["multinode"].finish()
    run = jobs["dir"] / "multinode"
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", jobs["multinode"].explain(job)
    assert "2 node(s) x 1 process(es)" in job["log"]
    ranks = rank_lines(job["log"])
    assert sorted(ranks) == [0, 1], job["log"][-3000:]
    assert [ranks[r][-1] for r in (0, 1)] == ["finished at step 8"] * 2
    assert all(any("DeepSpeed ZeRO-2" in line for line in ranks[r]) for r in (0, 1))
    assert (run / DONE).read_text().strip() == "8"


@needs_slurm
def test_job_with_a_missing_config_fails_before_starting_anything(jobs):
    job = jobs["bad_config"].finish()
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", job
    assert "dist-train job: error: config" in job["log"] and "no-such-config.yaml' not found" in job["log"]
    assert "[rank" not in job["log"] and "accelerate" not in job["log"].lower()
    assert not (jobs["dir"] / "bad_config").exists()


# ---- command construction, with stubbed srun and scontrol (no SLURM needed) ----------------------------

STUB_SRUN = r"""#!/usr/bin/env bash
# Runs each node's task with the interpreter replaced by `printargs`, so the output is the command line
# every node would run (shell-quoted). The head's rendezvous port is a socket the test listens on.
echo "srun $*" >> "$STUB_LOG"
while [[ "$1" == --* ]]; do shift; done
[ "$1" = bash ] && [ "$2" = -c ] || { echo "unexpected srun command: $*" >&2; exit 1; }
for ((node = 0; node < SLURM_NNODES; node++)); do
    MASTER_ADDR=127.0.0.1 MASTER_PORT=$STUB_LISTEN_PORT SLURM_NODEID=$node bash -c "$3" "$STUB_BIN/printargs" "${@:5}"
done
"""
STUB_SCONTROL = r"""#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") echo gpu-a; echo gpu-b ;;
    "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.0.0.7 NodeHostName=$3" ;;
    *) echo "scontrol $*" >> "$STUB_LOG" ;;
esac
"""


def run_with_stubs(tmp_path: Path, script: str, args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, str]:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    printargs = "#!/usr/bin/env bash\nprintf '%q ' \"$@\"; echo\n"
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("printargs", printargs)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "stub.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DIST_TRAIN_", "PET_", "MASTER_"))}
    env = (
        base
        | {
            "PATH": f"{stubs}:{os.environ['PATH']}",
            "STUB_LOG": str(log),
            "STUB_BIN": str(stubs),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu-[a-b]",
            "SLURM_SUBMIT_DIR": str(REPO),
            "DIST_TRAIN_PYTHON": sys.executable,
            "TMPDIR": str(tmp_path),
        }
        | env
    )
    with socket.socket() as head:  # stands in for the head node's rendezvous port
        head.bind(("127.0.0.1", 0))
        head.listen(8)
        env["STUB_LISTEN_PORT"] = str(head.getsockname()[1])
        cmd = ["bash", str(SLURM_DIR / script), *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    return proc, log.read_text(errors="replace") if log.exists() else ""


def test_multinode_script_gives_each_node_its_rank_and_the_head_address(tmp_path, small_shards):
    run_dir = tmp_path / "run dir with spaces"
    args = trainer_args(small_shards, run_dir, 8, "--lr", "3e-4")
    proc, stub_log = run_with_stubs(
        tmp_path, "train-multinode.sbatch", args, {"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4"}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("-m accelerate")]
    assert len(launches) == 2, proc.stdout
    for node, argv in enumerate(launches):
        opt = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
        assert opt["--machine_rank"] == str(node)  # expanded inside each node's task, not once in the batch shell
        assert opt["--num_machines"] == "2" and opt["--num_processes"] == "8"  # 2 nodes x 4 GPUs
        assert opt["--main_process_ip"] == "10.0.0.7"  # the head node's NodeAddr
        assert opt["--main_process_port"] == str(15000 + 4242 % 10000)
        assert opt["--rdzv_backend"] == "c10d" and opt["--deepspeed_multinode_launcher"] == "standard"
        assert opt["--config_file"] == "launch/accelerate/multi-node.yaml"
        assert argv[argv.index("-m", 1) :][:4] == ["-m", "dist_train", "train", "--resume"]
        assert argv[-len(args) :] == args  # user flags verbatim, spaces included
    assert "--ntasks-per-node=1" in stub_log
    assert "requeue" not in stub_log  # the stubbed step wrote no PREEMPTED marker
    assert f"run dir {run_dir}" in proc.stdout


@pytest.mark.parametrize(
    "env, extra, message",
    [
        (
            {"DIST_TRAIN_PROCS_PER_NODE": "2"},
            ["--config", "/no/such/preset.yaml"],
            "config '/no/such/preset.yaml' not found",
        ),
        (
            {"DIST_TRAIN_PROCS_PER_NODE": "2", "DIST_TRAIN_ACCELERATE_CONFIG": "launch/accelerate/nope.yaml"},
            [],
            "accelerate config 'launch/accelerate/nope.yaml' does not exist",
        ),
        ({}, [], "no GPUs in this allocation: submit with --gpus-per-node=N"),
    ],
    ids=["missing-trainer-config", "missing-accelerate-config", "no-gpu-count"],
)
def test_job_script_refuses_bad_settings_before_srun(tmp_path, small_shards, env, extra, message):
    proc, stub_log = run_with_stubs(
        tmp_path, "train.sbatch", trainer_args(small_shards, tmp_path / "run", 8) + extra, {"SLURM_NNODES": "1"} | env
    )
    assert proc.returncode == 2
    assert f"dist-train job: error: {message}" in proc.stderr
    assert "srun" not in stub_log
