"""Every step counted is a step taken: a window with a non-finite loss is discarded whole, in every mode.

The shard set has finite rows only, but a few rows carry landmarks at float32's largest value: the loader keeps
them (they are finite), and the model's landmark normalisation overflows on them to NaN, so the loss of exactly
the micro batch holding such a row is NaN, as a corrupt extraction would make it. Which micro batch holds which
row is arithmetic of the exact-epoch stream (no shuffling), so the test plants them at a window's first micro
batch on one rank and at another window's last micro batch on the other rank. Every mode must then skip those
two windows whole, count each once, not advance the learning rate, carry nothing into the next window, and
otherwise take the very same steps as DDP on the same data.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_TRAIN_FLAGS, TrainRun, full_block_shard_set, scalars
from safetensors.torch import load_file

from dist_train.checkpoint import STATE_FILE, consolidate_checkpoint, step_dir_name
from dist_train.data.shards import ShardSet, write_index, write_split
from dist_train.data.stream import TrainStream
from dist_train.evaluate import train_fields
from dist_train.metrics import TRAIN_TAGS
from dist_train.rundir import CHECKPOINTS
from dist_train.synth import SynthParams, generate

MICRO, WORLD, STEPS = 16, 2, 6
POISONED = {1: (0, "first"), 3: (1, "last")}  # 0-based window -> (rank, its micro batch) holding a huge landmark
HUGE = 3.0e38  # finite in float32; the landmark centroid overflows to inf, the normalised landmarks to NaN


def micro_batch_rows(data: Path, rank: int, accumulation: int, world: int) -> list[np.ndarray]:
    """Rows of each micro batch a rank reads in epoch 0, as the trainer's stream deals them."""
    steps_per_epoch = ShardSet.open(data).n_samples("train") // (MICRO * accumulation * world)
    stream = TrainStream(
        ShardSet.open(data),
        batch_size=MICRO,
        rank=rank,
        world_size=world,
        batches_per_epoch=steps_per_epoch * accumulation,
        resampled=False,
        seed=42,
        shuffle_blocks=0,
        num_workers=0,
        fields=train_fields(),
        trace_rows=True,
    )
    return [b["row"].numpy() for b in stream]


def poisoned_set(out: Path, accumulation: int, world: int) -> Path:
    clean = full_block_shard_set(out.with_name(out.name + "-clean"))
    arrays = generate(SynthParams(n_identities=64, samples_per_identity=16, seed=7))  # full_block_shard_set's rows
    train = {k: v[:768].copy() for k, v in arrays.items()}
    for window, (rank, which) in POISONED.items():
        micro = window * accumulation + (0 if which == "first" else accumulation - 1)
        rank = min(rank, world - 1)
        train["src_kps"][micro_batch_rows(clean, rank, accumulation, world)[micro][0]] = HUGE
    val = {k: v[768:] for k, v in arrays.items()}
    splits = {s: write_split(out, s, a, shard_samples=256, block_size=128) for s, a in (("train", train), ("val", val))}
    write_index(out, splits, fields=list(train), provenance={"source": "tests/test_step.py"}, block_size=128)
    shutil.rmtree(clean)
    return out


def flags(data: Path, accumulation: int, precision: str) -> list[str]:
    return [
        *FAST_TRAIN_FLAGS,
        *("--data_dir", str(data), "--precision", precision, "--dropout", "0", "--batch_size", str(MICRO)),
        *("--gradient_accumulation_steps", str(accumulation), "--resampled", "false", "--shuffle_blocks", "0"),
        *("--max_steps", str(STEPS), "--log_every_steps", "1", "--save_every_steps", "1", "--keep_last", "10"),
        *("--eval_max_samples", "32", "--eval_every_steps", str(STEPS), "--warmup_epochs", "1"),
        *("--scheduler_type", "cosine", "--max_bad_steps", "3"),
    ]


DS_JSON = "configs/deepspeed/zero{stage}-{precision}.json"
MODES = {  # name -> (accumulation, accelerate launch flags; None: one plain process)
    "single-a4": (4, None),
    "ddp-a2": (2, ["--config_file", "launch/accelerate/cpu/ddp.yaml"]),
    "ddp-a4": (4, ["--config_file", "launch/accelerate/cpu/ddp.yaml"]),
    "zero1-a4": (4, ["--use_deepspeed", "--deepspeed_config_file", DS_JSON.format(stage=1, precision="fp32")]),
    "zero2-a4": (4, ["--use_deepspeed", "--deepspeed_config_file", DS_JSON.format(stage=2, precision="fp32")]),
    "zero3-a2": (2, ["--use_deepspeed", "--deepspeed_config_file", DS_JSON.format(stage=3, precision="fp32")]),
    "zero2-bf16-a2": (2, ["--use_deepspeed", "--deepspeed_config_file", DS_JSON.format(stage=2, precision="bf16")]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, TrainRun]:
    tmp = tmp_path_factory.mktemp("step")
    data = {(a, w): poisoned_set(tmp / f"poisoned-a{a}-w{w}", a, w) for a, w in ((2, WORLD), (4, WORLD), (4, 1))}
    started = {}
    for name, (accumulation, launch) in MODES.items():
        if launch and launch[0] == "--use_deepspeed":
            launch = [*launch, "--num_processes", str(WORLD)]
        precision = "bf16" if "bf16" in name else "fp32"
        world = 1 if launch is None else WORLD
        started[name] = TrainRun(tmp, name, flags(data[accumulation, world], accumulation, precision), launch)
    yield started
    for run in started.values():
        run.kill()


def finished(run: TrainRun) -> Path:
    rc, log = run.finish()
    assert rc == 0, log[-4000:]
    assert re.search(rf"\[rank 0/\d\] finished at step {STEPS}", log), log[-3000:]
    return run.run_dir


def weights(run_dir: Path, step: int) -> dict:
    ckpt = run_dir / CHECKPOINTS / step_dir_name(step)
    if (ckpt / "model.safetensors").is_file():
        return load_file(str(ckpt / "model.safetensors"))
    return consolidate_checkpoint(ckpt)[0]


@pytest.mark.parametrize("name", list(MODES))
def test_a_non_finite_window_is_skipped_whole_counted_once_and_does_not_advance_the_lr(runs, name):
    run_dir = finished(runs[name])
    skipped = [w + 1 for w in POISONED]  # 1-based optimizer steps
    state = (run_dir / CHECKPOINTS / step_dir_name(STEPS) / STATE_FILE).read_text()
    assert '"nonfinite_steps": 2' in state and '"skipped_steps": 0' in state, state
    assert sorted(scalars(run_dir, TRAIN_TAGS["nonfinite_steps"]).items())[-1] == (STEPS, 2)
    lr = scalars(run_dir, TRAIN_TAGS["lr"])
    for step in range(2, STEPS + 1):  # warmup: the lr rises with every applied step, and only with those
        if step - 1 in skipped:
            assert lr[step] == lr[step - 1], (step, lr)
        else:
            assert lr[step] > lr[step - 1], (step, lr)
    norms = scalars(run_dir, TRAIN_TAGS["grad_norm"])
    assert sorted(norms) == [s for s in range(1, STEPS + 1) if s not in skipped], "a norm only for applied steps"
    for step in skipped:  # nothing of the window was applied...
        before, after = weights(run_dir, step - 1), weights(run_dir, step)
        assert all(bool((before[k] == after[k]).all()) for k in before), f"step {step} changed the weights"
    later = weights(run_dir, STEPS)  # ...and the model kept learning around it
    assert any(bool((later[k] != weights(run_dir, 1)[k]).any()) for k in later)


@pytest.mark.parametrize("name, reference", [("zero1-a4", "ddp-a4"), ("zero2-a4", "ddp-a4"), ("zero3-a2", "ddp-a2")])
def test_deepspeed_takes_the_same_steps_as_ddp_around_non_finite_windows(runs, name, reference):
    """Before, ZeRO-2 with accumulation stepped on a window's finite micro batches (grad norm 0.0874 vs 0.0536)."""
    ds, ddp = finished(runs[name]), finished(runs[reference])
    norms, expected = scalars(ds, TRAIN_TAGS["grad_norm"]), scalars(ddp, TRAIN_TAGS["grad_norm"])
    assert sorted(norms) == sorted(expected)
    np.testing.assert_allclose([norms[s] for s in sorted(norms)], [expected[s] for s in sorted(norms)], rtol=1e-4)
    loss, expected_loss = scalars(ds, TRAIN_TAGS["loss"]), scalars(ddp, TRAIN_TAGS["loss"])
    np.testing.assert_allclose([loss[s] for s in sorted(loss)], [expected_loss[s] for s in sorted(loss)], rtol=1e-5)
    a, b = weights(ds, STEPS), weights(ddp, STEPS)
    worst = max(float((a[k].detach() - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, f"weights differ from DDP's by {worst}"
