"""Shared fixtures."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_train.checkpoint import COMPLETE, step_dir_name
from dist_train.data.schema import FIELDS
from dist_train.data.shards import write_index, write_shard_set, write_split
from dist_train.rundir import CHECKPOINTS
from dist_train.synth import SynthParams, generate, make_shard_set


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """A synthetic shard set shared by all tests; treat it as read-only (copy it to change it).

    200 identities x 12 samples: train 1680 (7 shards), val 480 (2 shards),
    test 240 (1 shard); 256 samples per shard in blocks of 128, with every
    field including tgt_centroid and oracle_emb. Takes about a second.
    """
    out = tmp_path_factory.mktemp("small_shards") / "synth"
    make_shard_set(
        out,
        SynthParams(n_identities=200, samples_per_identity=12, seed=1234),
        val_fraction=0.2,
        test_fraction=0.1,
        shard_samples=256,
        block_size=128,
    )
    return out


# ---- training runs shared by test_train.py and test_export.py ------------------------------------------

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 300
# One intra-op thread per process: test runs share 2 cores, and oversubscribed torch threads made an
# 8-step single-process run 2-3x slower here (torchrun sets the same for launched ranks).
RUN_ENV = {"OMP_NUM_THREADS": "1"}
# A tiny model that learns the synthetic distortion within tens of steps (constant lr, no warmup), so
# "the loss falls" holds with a wide margin; evaluations are capped to keep runs short.
FAST_TRAIN_FLAGS = [
    "--config", "debug-cpu", "--num_workers", "0", "--batch_size", "64", "--eval_max_samples", "256",
    "--d_model", "32", "--nhead", "2", "--num_layers", "1", "--dim_feedforward", "64",
    "--residual_mlp", "true", "--gate", "none",
    "--lr", "6e-3", "--warmup_epochs", "0", "--scheduler_type", "constant", "--log_every_steps", "10",
]  # fmt: skip
ZERO_RUN_STEPS, ZERO_RUN_EVERY = 60, 20  # steps of the shared ZeRO runs; checkpoint and evaluation interval


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainRun:
    """`dist-train train` in the background, plain or under `accelerate launch` (``launch``: its flags)."""

    new_session = False  # True: the run leads a process group of its own, for signals to the whole group

    def __init__(self, tmp: Path, name: str, flags: list[str], launch: list[str] | None = None):
        self.name, self.flags, self.launch = name, list(flags), launch
        self.run_dir, self.log_path = tmp / name, tmp / f"{name}.log"
        self.start(self.flags)

    def start(self, flags: list[str]) -> None:
        prefix = [sys.executable, "-m", "dist_train"]
        if self.launch is not None:
            prefix = [sys.executable, "-m", "accelerate.commands.launch", *self.launch]
            prefix += ["--main_process_port", str(free_port()), "-m", "dist_train"]
        cmd = [*prefix, "train", *flags, "--output_dir", str(self.run_dir)]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=os.environ | RUN_ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )

    def finish(self) -> tuple[int, str]:
        """Exit code and the log so far (of every start), waiting up to RUN_TIMEOUT_S."""
        try:
            rc = self.proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return rc, self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the launcher and every rank at once, as a node failure would.

        By process tree, not group: torchrun starts each rank in a session of its own.
        """
        if self.proc.poll() is not None:
            return
        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.wait()
        psutil.wait_procs(procs[1:], timeout=30)


@pytest.fixture(scope="session")
def demo_shards() -> Path:
    """The committed demo shard set (read-only), the data the design notes' commands are run on here."""
    path = REPO / "shards" / "demo"
    assert (path / "index.json").is_file(), f"{path} is missing; make it with the command in shards/README.md"
    return path


@pytest.fixture(scope="session")
def zero_runs(demo_shards, tmp_path_factory) -> dict[int, TrainRun]:
    """2-process DeepSpeed ZeRO-2 and ZeRO-3 (bf16) runs of ZERO_RUN_STEPS steps, running concurrently.

    Shared by the training tests (loss, ranks, checkpoints, resume reference) and the export tests;
    call ``finish()`` before using a run's files.
    """
    tmp = tmp_path_factory.mktemp("zero_runs")
    flags = [*FAST_TRAIN_FLAGS, "--data_dir", str(demo_shards), "--max_steps", str(ZERO_RUN_STEPS)]
    flags += ["--save_every_steps", str(ZERO_RUN_EVERY), "--eval_every_steps", str(ZERO_RUN_EVERY)]
    # epochs of ZERO_RUN_EVERY steps (global batch 2 x 64), so epoch ends add no checkpoints in between
    flags += ["--samples_per_epoch", str(ZERO_RUN_EVERY * 2 * 64)]
    runs = {
        stage: TrainRun(tmp, f"zero{stage}", flags, ["--config_file", f"launch/accelerate/cpu/zero{stage}-bf16.yaml"])
        for stage in (2, 3)
    }
    yield runs
    for run in runs.values():
        run.kill()


def full_block_shard_set(out: Path, nan_rows: tuple[int, ...] = (), val_nan_rows: tuple[int, ...] = ()) -> Path:
    """Train 768 rows (3 shards x 2 full blocks of 128), val 256 rows: every block full.

    Full blocks make the stream's batches independent of the micro batch size (see the accumulation
    test). ``nan_rows`` (train) and ``val_nan_rows`` get a non-finite value planted in one input field
    each, written block by block with `write_split` as a faulty extractor would.
    """
    arrays = generate(SynthParams(n_identities=64, samples_per_identity=16, seed=7))
    train = {k: v[:768].copy() for k, v in arrays.items()}
    val = {k: v[768:].copy() for k, v in arrays.items()}
    if not nan_rows and not val_nan_rows:
        write_shard_set(
            out, {"train": train, "val": val}, provenance={"source": "tests"}, shard_samples=256, block_size=128
        )
        return out
    planted = [("src_emb", np.nan), ("src_kps", np.inf), ("src_pose", np.nan), ("tgt_emb", -np.inf)]
    for split, rows in ((train, nan_rows), (val, val_nan_rows)):
        for i, row in enumerate(rows):
            name, value = planted[i % len(planted)]
            split[name].reshape(len(split[name]), -1)[row, 0] = value
    splits = {s: write_split(out, s, a, shard_samples=256, block_size=128) for s, a in (("train", train), ("val", val))}
    write_index(
        out, splits, fields=list(FIELDS), provenance={"source": "tests", "nan_rows": list(nan_rows)}, block_size=128
    )
    return out


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """Every point of a TensorBoard scalar (no reservoir sampling), after TensorBoard's own resume purge."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def kill_at_checkpoint_then_resume(run: TrainRun, step: int, result: dict) -> None:
    """SIGKILL the launcher and every rank once checkpoint ``step`` is complete, then `--resume latest`.

    Meant for a thread beside the test; ``result`` gets the killed run's exit code, or the error to re-raise.
    """
    try:
        marker = run.run_dir / CHECKPOINTS / step_dir_name(step) / COMPLETE
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not marker.exists():
            assert run.proc.poll() is None, "the run ended before the checkpoint"
            assert time.monotonic() < deadline, "no checkpoint before the timeout"
            time.sleep(0.05)
        run.kill()
        result["killed_rc"] = run.proc.returncode
        run.start([*run.flags, "--resume", "latest"])
    except BaseException as e:  # reported by the test
        result["error"] = e
