"""Launch configurations (launch/accelerate/*.yaml, configs/deepspeed/*.json), launched for real.

GPU files cannot run here, so each has a CPU twin that may differ only in precision and process count
(checked below), and the twins train: cpu/single.yaml and cpu/zero3-bf16.yaml (elastic restart) here;
cpu/ddp.yaml, cpu/zero2-bf16.yaml and cpu/multi-node.yaml through the SLURM job scripts in
test_slurm.py. zero2-fp16.yaml itself is launched here to show that CPU refuses it with a clear message.
The launches run concurrently (module fixture); each test waits for its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from dist_train.checkpoint import COMPLETE, step_dir_name
from dist_train.config import Config
from dist_train.rundir import CHECKPOINTS, DONE

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_DIR = REPO / "launch" / "accelerate"
DEEPSPEED_DIR = REPO / "configs" / "deepspeed"
TIMEOUT_S = 300
# GPU launch file -> the CPU twin the suite runs in its place.
TWINS = {
    "single-gpu.yaml": "cpu/single.yaml",
    "multi-gpu.yaml": "cpu/ddp.yaml",
    "zero2-fp16.yaml": "cpu/zero2-bf16.yaml",
    "zero3-fp16.yaml": "cpu/zero3-bf16.yaml",
    "multi-node.yaml": "cpu/multi-node.yaml",
}
TWIN_MAY_DIFFER = {"mixed_precision", "num_processes", "gpu_ids", "use_cpu"}
FILLED_BY_TRAINER = {
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "train_batch_size",
}
ELASTIC_STEPS, ELASTIC_SAVE_EVERY = 60, 10


def load_yaml(rel: str) -> dict:
    return yaml.safe_load((ACCELERATE_DIR / rel).read_text())


# ---- the README's first command ---------------------------------------------------------------------------


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "dist-train").exists(), reason="needs the repository's .venv")
def test_readme_first_command_runs_the_main_job_into_a_fresh_run_folder(tmp_path):
    """`bash launch/demo.sh`, as on a fresh clone: no `runs/` folder yet.

    It runs in a copy of the repository layout (the suite's .venv and shards linked in) whose set-up step
    is a no-op: re-installing the package under the running suite would race its background runs. CI runs
    the real set-up through `launch/test.sh`.
    """
    assert "bash launch/demo.sh" in (REPO / "README.md").read_text()
    clone = tmp_path / "clone"
    (clone / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "demo.sh", clone / "launch" / "demo.sh")
    (clone / "launch" / "setup.sh").write_text('echo "setup: skipped by the test"\n')
    (clone / ".venv").symlink_to(REPO / ".venv")
    (clone / "shards").symlink_to(REPO / "shards")
    r = subprocess.run(
        ["bash", "launch/demo.sh", "--epochs", "1", "--warmup_epochs", "0.2"],
        cwd=clone,
        env=os.environ | {"OMP_NUM_THREADS": "1"},  # the demo's data; one epoch of its three
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = clone / "runs" / "demo"
    for name in ("shards/index.json", "inspect.json", "inspect.png", "best/model.safetensors", "eval.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report" / "report.md").is_file()
    m = json.loads((out / "eval.json").read_text())
    assert m["n"] == json.loads((out / "inspect.json").read_text())["splits"]["val"]["n_samples"]
    # the point of the demo: the model beats the do-nothing baseline on identities it never saw (the whole demo
    # closes 97% of the baseline-to-oracle gap in about a minute on 2 cores; its first epoch about 75%)
    assert 0.7 < m["identity_baseline_cos"] < 0.8 and m["gain"] > 0.05 and m["fraction_of_oracle_gap"] > 0.5, m
    assert "overfitting" not in (out / "report" / "report.md").read_text().lower()
    assert "baseline" in (out / "report" / "report.md").read_text()


# ---- the files themselves ------------------------------------------------------------------------------


def test_every_launch_file_has_a_cpu_twin_that_differs_only_in_precision_and_size():
    on_disk = {str(p.relative_to(ACCELERATE_DIR)) for p in ACCELERATE_DIR.rglob("*.yaml")}
    assert on_disk == set(TWINS) | set(TWINS.values()), "every accelerate file needs a twin in TWINS"
    for gpu_name, cpu_name in TWINS.items():
        gpu, cpu = load_yaml(gpu_name), load_yaml(cpu_name)
        differ = {k for k in gpu.keys() | cpu.keys() if gpu.get(k) != cpu.get(k)} - {"deepspeed_config"}
        assert differ <= TWIN_MAY_DIFFER, f"{cpu_name} differs from {gpu_name} in {differ - TWIN_MAY_DIFFER}"
        gpu_ds, cpu_ds = gpu.get("deepspeed_config", {}), cpu.get("deepspeed_config", {})
        assert gpu_ds.keys() == cpu_ds.keys()
        if gpu_ds:
            assert gpu_ds["deepspeed_config_file"].endswith("-fp16.json")
            assert cpu_ds["deepspeed_config_file"] == gpu_ds["deepspeed_config_file"].replace("-fp16", "-bf16")
            assert {k: v for k, v in gpu_ds.items() if k != "deepspeed_config_file"} == {
                k: v for k, v in cpu_ds.items() if k != "deepspeed_config_file"
            }
            # Accelerate refuses these next to a JSON file; precision and stage live in the JSON.
            assert "mixed_precision" not in gpu and "zero_stage" not in gpu_ds
            assert (REPO / gpu_ds["deepspeed_config_file"]).is_file()
        if cpu.get("distributed_type") != "DEEPSPEED":
            assert cpu["mixed_precision"] == "no"


def without_precision(ds: dict) -> dict:
    return {k: v for k, v in ds.items() if k not in ("fp16", "bf16")}


def _strings(tree) -> list[str]:
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in _strings(v)]
    return [tree] if isinstance(tree, str) else []


@pytest.mark.parametrize("path", sorted(DEEPSPEED_DIR.glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_json_resolves_to_a_config_deepspeed_accepts(path, monkeypatch):
    """The trainer fills the "auto" keys from the run config; DeepSpeed's own parser then accepts the result."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from dist_train.runtime import deepspeed_config

    stage, precision = re.fullmatch(r"zero(\d)-(fp16|bf16|fp32)\.json", path.name).groups()
    raw = json.loads(path.read_text())
    assert {k for k, v in raw.items() if v == "auto"} == FILLED_BY_TRAINER
    assert raw["zero_optimization"]["stage"] == int(stage)
    for other in DEEPSPEED_DIR.glob(f"zero{stage}-*.json"):
        assert without_precision(json.loads(other.read_text())) == without_precision(raw), (
            f"{other.name} and {path.name} must differ only in precision"
        )

    cfg = Config()
    cfg.train.batch_size, cfg.train.gradient_accumulation_steps, cfg.optim.grad_clip = 24, 3, 0.5
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    resolved, resolved_precision = deepspeed_config(cfg, world_size=1, on_gpu=True)
    assert resolved_precision == precision
    assert "auto" not in _strings(resolved), "Accelerate cannot resolve 'auto' for a streaming loader"
    ds = DeepSpeedConfig(resolved)
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (24, 3, 72)
    assert ds.gradient_clipping == 0.5 and ds.zero_optimization_stage == int(stage)
    assert (ds.float16_config.enabled, ds.bfloat16_config.enabled) == (precision == "fp16", precision == "bf16")
    if precision == "fp16":
        assert resolved["fp16"]["loss_scale"] == 0, "dynamic loss scaling"


# ---- launched for real -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """`accelerate launch --config_file FILE [launch flags] -m dist_train train [trainer flags]`, in the background.

    Each launch gets its own ports, so several can run at once; c10d rendezvous and the unshared store
    are what launch/slurm/train.sbatch uses (elastic restarts need both).
    """

    def __init__(self, tmp: Path, name: str, config: str, launch_flags: list[str], trainer_flags: list[str]):
        self.run_dir, self.log = tmp / name, tmp / f"{name}.log"
        rdzv = free_port()
        env = os.environ | {"PET_RDZV_ENDPOINT": f"localhost:{rdzv}", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{config}",
            "--main_process_port", str(free_port()), *launch_flags,
            "-m", "dist_train", "train", "--config", "debug-cpu", "--batch_size", "16",
            "--output_dir", str(self.run_dir), *trainer_flags,
        ]  # fmt: skip
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def finish(self) -> tuple[int, str]:
        try:
            rc = self.proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return rc, self.log.read_text(errors="replace")


def kill_one_rank_after_first_checkpoint(launch: Launch, result: dict) -> None:
    """SIGKILL one worker once a complete checkpoint exists, as a crashing GPU or OOM kill would."""
    try:
        marker = launch.run_dir / CHECKPOINTS / step_dir_name(ELASTIC_SAVE_EVERY) / COMPLETE
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists():
            assert launch.proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
            time.sleep(0.1)
        workers = psutil.Process(launch.proc.pid).children()  # torchrun runs inside the launcher process
        assert len(workers) == 2, workers
        result["killed"] = workers[-1].pid
        workers[-1].send_signal(signal.SIGKILL)
    except BaseException as e:  # reported by the test
        result["error"] = e


@pytest.fixture(scope="module")
def launches(small_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launches")
    data = ["--data_dir", str(small_shards)]
    started = {
        "single": Launch(tmp, "single", "cpu/single.yaml", [], data + ["--max_steps", "5"]),
        "elastic": Launch(
            tmp, "elastic", "cpu/zero3-bf16.yaml", ["--max_restarts", "1", "--rdzv_backend", "c10d"],
            data + ["--max_steps", str(ELASTIC_STEPS), "--save_every_steps", str(ELASTIC_SAVE_EVERY), "--resume", "latest"],
        ),
        "fp16_on_cpu": Launch(tmp, "fp16_on_cpu", "zero2-fp16.yaml", ["--num_processes", "1"], data + ["--max_steps", "5"]),
        "precision_clash": Launch(
            tmp, "precision_clash", "cpu/zero2-bf16.yaml", ["--num_processes", "1"],
            data + ["--max_steps", "5", "--precision", "fp32"],
        ),
        "exact_epoch": Launch(
            tmp, "exact_epoch", "cpu/ddp.yaml", [], data + ["--max_steps", "5", "--resampled", "false", "--num_workers", "4"]
        ),
    }  # fmt: skip
    kill: dict = {}
    killer = threading.Thread(target=kill_one_rank_after_first_checkpoint, args=(started["elastic"], kill), daemon=True)
    killer.start()
    started["elastic"].killer, started["elastic"].kill = killer, kill
    yield started
    for launch in started.values():
        if launch.proc.poll() is None:
            launch.proc.kill()


def test_single_process_twin_trains_and_checkpoints(launches):
    rc, log = launches["single"].finish()
    run = launches["single"].run_dir
    assert rc == 0, log[-3000:]
    assert "[rank 0/1] finished at step 5" in log
    assert (run / DONE).read_text().strip() == "5"
    assert (run / CHECKPOINTS / step_dir_name(5) / COMPLETE).is_file()


def test_killed_rank_is_restarted_and_the_run_resumes_from_the_latest_checkpoint(launches):
    launch = launches["elastic"]
    launch.killer.join(TIMEOUT_S)
    if "error" in launch.kill:
        raise launch.kill["error"]
    rc, log = launch.finish()
    assert rc == 0, log[-4000:]
    assert f"(pid: {launch.kill['killed']})" in log  # torchrun saw the killed rank fail...
    resumed = re.search(
        rf"dist-train: resumed from {re.escape(str(launch.run_dir / CHECKPOINTS))}/step-(\d+) at step (\d+)", log
    )
    assert resumed, log[-4000:]  # ...and the restarted ranks loaded the newest complete checkpoint
    step = int(resumed[2])
    assert int(resumed[1]) == step and step >= ELASTIC_SAVE_EVERY and step % ELASTIC_SAVE_EVERY == 0
    assert (
        f"[rank 0/2] finished at step {ELASTIC_STEPS}" in log and f"[rank 1/2] finished at step {ELASTIC_STEPS}" in log
    )
    assert "DeepSpeed ZeRO-3" in log
    assert (launch.run_dir / DONE).read_text().strip() == str(ELASTIC_STEPS)


def test_exact_epochs_with_more_readers_than_shards_train(launches):
    """7 train shards, 2 ranks x 4 workers: exact epochs deal rows, not shards, so every reader gets its share."""
    rc, log = launches["exact_epoch"].finish()
    assert rc == 0, log[-3000:]
    assert "[rank 0/2] finished at step 5" in log and "[rank 1/2] finished at step 5" in log
    assert (launches["exact_epoch"].run_dir / DONE).read_text().strip() == "5"


@pytest.mark.parametrize(
    "name, message",
    [
        ("fp16_on_cpu", "the DeepSpeed config enables fp16, which DeepSpeed cannot run on CPU"),
        ("precision_clash", "precision: the run asks for 'fp32' but the DeepSpeed config enables bf16"),
    ],
)
def test_misuse_is_refused_at_start_with_the_fix_in_the_message(launches, name, message):
    rc, log = launches[name].finish()
    assert rc != 0
    assert f"dist-train train: error: {message}" in log or f"dist-train train: error: resampled: {message}" in log, log[
        -3000:
    ]
    assert not (launches[name].run_dir / CHECKPOINTS).exists(), "nothing may be trained"
