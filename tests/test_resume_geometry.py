"""A resume under another geometry keeps "each row once per epoch" in exact epochs.

The deal (who reads which row) is a pure function of (seed, epoch, geometry), and each reader's batches
report how far into its order they are, so a resume under another world size, micro batch, accumulation or
number of loader workers knows which rows of the interrupted epoch were consumed, reads none of them again
and deals the rest over its own readers. Checked on the deal itself at 16 ranks x 4 workers, on streams with
bad rows, and on real runs: one process stopped mid-epoch, resumed under 2 DDP processes and, separately,
with 2 loader workers and then another micro batch; their row traces show each train row at most once.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_TRAIN_FLAGS, TrainRun
from test_resume import traced_rows

from dist_train.checkpoint import STATE_FILE, TrainState, step_dir_name
from dist_train.config import Config, ConfigError
from dist_train.data import shards
from dist_train.data.blocks import Block, BlockTable
from dist_train.data.stream import Layout, TrainStream, continue_sequence, layout_orders, worker_batches
from dist_train.plan import EpochStart, Plan, check_resume, epoch_start
from dist_train.rundir import CHECKPOINTS
from dist_train.runtime import Runtime
from dist_train.synth import SynthParams, generate

SEED, SHUFFLE = 11, 8


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def table_of(sizes) -> BlockTable:
    firsts = np.cumsum([0, *sizes[:-1]])
    return BlockTable(("none.tar",), [Block(0, int(f), int(n), {}) for f, n in zip(firsts, sizes)])


def test_the_deal_continues_an_epoch_exactly_through_geometry_changes_at_scale():
    """16 ranks x 4 workers -> 8 x 3 -> 5 x 2 -> 3 x 1, micro batches 8, 12, 16, 7, uneven blocks: no row twice."""
    rng = np.random.default_rng(3)
    table = table_of(rng.integers(1, 129, size=500))
    total = table.n_rows
    geometries = [(16, 4, 8), (8, 3, 12), (5, 2, 16), (3, 1, 7)]  # world, workers, micro batch
    layouts: list[Layout] = []
    seen: list[np.ndarray] = []
    for i, (world, workers, micro) in enumerate(geometries):
        bpe = total // (micro * world)
        read = sum(lay.rows for lay in layouts)
        first = ceil_div(read, micro * world)  # the rule check_resume applies: no step short of new rows
        last = i == len(geometries) - 1
        stop = bpe if last else int(rng.integers(first + 1, bpe))
        # readers without bad rows report whole batches; the DataLoader takes the workers' batches round robin
        cursors = [worker_batches(stop - first, w, workers) * micro for _ in range(world) for w in range(workers)]
        lay = Layout(0, world, micro, workers, bpe, first, stop, tuple(cursors), SEED, SHUFFLE)
        dealt = continue_sequence(table, layouts, (bpe - first) * micro * world)
        assert np.all(np.diff(dealt) > 0)
        orders = layout_orders(table, lay, dealt)
        assert sorted(np.concatenate(orders).tolist()) == dealt.tolist(), "the readers split what was dealt"
        assert orders[0].tolist() != sorted(orders[0].tolist()), "rows of several blocks are shuffled together"
        seen += [order[:cursor] for order, cursor in zip(orders, cursors)]
        layouts.append(lay)
    rows = np.concatenate(seen)
    assert len(rows) == sum(lay.rows for lay in layouts) == len(np.unique(rows)), "a row read twice in the epoch"
    assert rows.max() < total, "the epoch never wrapped into a second pass"
    assert total - len(rows) < 2 * 7 * 3, "what is left out is less than two global batches of the last layout"


@pytest.fixture(scope="module")
def bad_rows_set(tmp_path_factory) -> tuple[shards.ShardSet, set[int]]:
    """Train 640 rows in shards of 160 and blocks of 32, 12 of them non-finite."""
    root = tmp_path_factory.mktemp("bad_rows")
    arrays = {k: v[:640].copy() for k, v in generate(SynthParams(n_identities=40, samples_per_identity=16)).items()}
    bad = set(range(5, 640, 53))
    for row in bad:
        arrays["src_emb"][row, 0] = np.nan
    shards.write_shard_set(root, {"train": arrays}, provenance={}, shard_samples=160, block_size=32)
    return shards.ShardSet.open(root), bad


def streams(source, world: int, micro: int, workers: int) -> list[TrainStream]:
    return [
        TrainStream(source, batch_size=micro, rank=r, world_size=world, batches_per_epoch=640 // (micro * world),
                    resampled=False, seed=SEED, shuffle_blocks=4, num_workers=workers, trace_rows=True)
        for r in range(world)
    ]  # fmt: skip


@pytest.mark.parametrize("old_workers, new_workers", [(0, 0), (2, 0)])
def test_streams_with_bad_rows_continue_an_epoch_from_the_cursors_their_batches_reported(
    bad_rows_set, old_workers, new_workers
):
    """2 ranks x micro 16 stopped after 7 batches, continued by 3 ranks x micro 8: no row of the first read again."""
    source, bad = bad_rows_set
    old = streams(source, 2, 16, old_workers)
    first_rows, cursors = [], []
    for s in old:
        s.set_epoch(2)
        batches = iter(s)
        first_rows += [next(batches)["row"].numpy() for _ in range(7)]
        batches.close()
        cursors += s.cursors()
    assert sum(cursors) > 7 * 2 * 16, "some bad rows were passed over (the cursors count them)"
    lay = old[0].layouts(cursors, stop=7)
    assert [(x.world_size, x.readers, x.first, x.stop) for x in lay] == [(2, max(1, old_workers), 0, 7)]
    first = ceil_div(7 * 2 * 16, 3 * 8)
    later, repeats = [], 0
    for s in streams(source, 3, 8, new_workers):
        s.set_epoch(2, first, earlier=lay, first=first)
        later += [b["row"].numpy() for b in s]
        repeats += s.stats.repeats
    before, after = np.concatenate(first_rows), np.concatenate(later)
    assert len(after) == (640 // 24 - first) * 24
    assert not set(before.tolist()) & set(after.tolist()), "a row consumed before the resume was read again"
    assert not (set(before.tolist()) | set(after.tolist())) & bad, "non-finite rows never reach a batch"
    assert len(before) == len(np.unique(before))
    assert len(after) - len(np.unique(after)) == repeats, "rows read twice after the resume are counted repeats"


class Printer:
    def __init__(self):
        self.printed: list[str] = []

    def print(self, msg: str) -> None:
        self.printed.append(msg)


def resume_at(stop: int, world: int, workers: int, deepspeed: int | None = None, micro: int = 64, accumulation=1):
    """A 1-process, 1-worker checkpoint after ``stop`` of 26 steps (1680 rows, micro 64) resumed by ``world``."""
    lay = Layout(0, 1, 64, 1, 26, 0, stop, (stop * 64,), 42, 8)
    saved = TrainState(step=stop, world_size=1, micro_batch=64, accumulation=1, num_workers=1,
                       epoch_layouts=[lay.as_dict()])  # fmt: skip
    cfg, plan, printer = Config(), Plan(micro, accumulation, world, 1680), Printer()
    cfg.data.resampled, cfg.data.num_workers = False, workers
    offset = check_resume(saved, plan, "", Runtime(printer, "fp32", deepspeed), cfg)
    return lay, offset, epoch_start(saved, plan, cfg, stop + offset), printer.printed


def test_a_resume_continues_ends_or_keeps_the_checkpoint_epoch_and_says_which():
    lay, offset, start, said = resume_at(5, world=2, workers=1)  # 320 rows read: 3 steps of 128 cover them
    assert (offset, start) == (3 - 5, EpochStart(0, (lay,), first=3, relaid=True))
    assert "epoch 0 continues exactly: its 320 rows read so far are not read again" in said[0]
    lay, offset, start, said = resume_at(25, world=2, workers=1)  # 1600 rows read: 80 left, less than 128
    assert (offset, start) == (13 - 25, EpochStart(0, unread=(lay,), relaid=True))
    assert "epoch 0 ends here: its 1600 rows read so far leave less than a global batch" in said[0]
    lay, offset, start, said = resume_at(5, world=1, workers=0)  # 0 workers read as one: the same layout
    assert (offset, start, said) == (0, EpochStart(0, (), first=0, cursors=(320,)), [])
    lay, offset, start, said = resume_at(5, world=1, workers=3, deepspeed=2)  # ZeRO takes a change of workers
    assert (offset, start) == (0, EpochStart(0, (lay,), first=5, relaid=True))
    assert "loader workers 1 -> 3; epoch 0 continues exactly" in said[0]
    lay, offset, start, said = resume_at(5, world=1, workers=1, micro=16, accumulation=3)  # steps of 48 rows
    assert (offset, start) == (7 - 5, EpochStart(0, (lay,), first=7 * 3, relaid=True)), "micro batches of its step 7"
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO checkpoints are bound"):
        resume_at(5, world=2, workers=1, deepspeed=2)


# ---- real runs -------------------------------------------------------------------------------------------

STOP_AT, CHAIN_AT, MICRO = 5, 12, 64


@pytest.fixture(scope="module")
def stopped_run(small_shards, tmp_path_factory) -> tuple[Path, list[str], int]:
    """One process, one loader worker, exact epochs, stopped by --max_steps after STOP_AT of 26 steps."""
    tmp = tmp_path_factory.mktemp("geometry")
    flags = [*FAST_TRAIN_FLAGS, "--data_dir", str(small_shards), "--resampled", "false", "--trace_rows", "true"]
    flags += ["--epochs", "1", "--eval_max_samples", "64", "--batch_size", str(MICRO)]
    run = TrainRun(tmp, "first", [*flags, "--num_workers", "1", "--max_steps", str(STOP_AT)])
    rc, log = run.finish()
    assert rc == 0, log[-3000:]
    return run.run_dir, flags, shards.ShardSet.open(small_shards).n_samples("train")


def resume_copy(stopped_run, name: str, flags: list[str], launch=None) -> TrainRun:
    run_dir, common, _ = stopped_run
    shutil.copytree(run_dir, run_dir.parent / name)
    return TrainRun(run_dir.parent, name, [*common, *flags, "--resume", "latest"], launch)


@pytest.fixture(scope="module")
def resumed_runs(stopped_run) -> dict[str, tuple[TrainRun, str]]:
    """The stopped run resumed under 2 DDP processes, and with 2 workers to CHAIN_AT then micro batch 32."""
    ddp = resume_copy(stopped_run, "ddp", ["--num_workers", "1"], ["--config_file", "launch/accelerate/cpu/ddp.yaml"])
    workers = resume_copy(stopped_run, "workers", ["--num_workers", "2", "--max_steps", str(CHAIN_AT)])
    rc, log = workers.finish()
    assert rc == 0, log[-3000:]
    out = {}
    workers.start([*stopped_run[1], "--num_workers", "0", "--batch_size", "32", "--resume", "latest"])
    for name, run in (("ddp", ddp), ("chain", workers)):
        rc, log = run.finish()
        assert rc == 0, log[-3000:]
        out[name] = (run, log)
    return out


def epoch_rows(run_dir: Path) -> list[int]:
    epochs = traced_rows(run_dir)
    assert sorted(epochs) == [0]
    return epochs[0]


def assert_once(rows: list[int], total: int, log: str) -> None:
    twice = {r: n for r, n in Counter(rows).items() if n > 1}
    assert not twice, f"{len(twice)} rows read twice in the resumed epoch"
    assert set(rows) <= set(range(total))
    assert f"{total - len(rows)} dropped tail" in log, "the rows left out are counted"


def test_resume_under_two_ddp_processes_reads_each_row_of_the_epoch_once(stopped_run, resumed_runs):
    _, _, total = stopped_run
    run, log = resumed_runs["ddp"]
    assert (
        "now 2 x 64 x 1; epoch 0 continues exactly: its 320 rows read so far are not read again, the others are "
        "dealt over 2 x 1 readers (step 5 is schedule position 3)"
    ) in log
    rows = epoch_rows(run.run_dir)
    assert len(rows) == STOP_AT * MICRO + (total // 128 - 3) * 128
    assert_once(rows, total, log)
    assert "1 resume(s) under another geometry continued an exact epoch, reading none of its rows again" in log


def test_resume_with_other_loader_workers_then_another_micro_batch_reads_each_row_once(stopped_run, resumed_runs):
    _, _, total = stopped_run
    run, log = resumed_runs["chain"]
    assert "loader workers 1 -> 2; epoch 0 continues exactly: its 320 rows read so far" in log
    assert "now 1 x 32 x 1, loader workers 2 -> 0; epoch 0 continues exactly: its 768 rows read so far" in log
    state = json.loads((run.run_dir / CHECKPOINTS / step_dir_name(CHAIN_AT) / STATE_FILE).read_text())
    assert state["num_workers"] == 2
    assert [(x["readers"], x["first"], x["stop"]) for x in state["epoch_layouts"]] == [(1, 0, 5), (2, 5, 12)]
    rows = epoch_rows(run.run_dir)
    assert len(rows) == CHAIN_AT * MICRO + (total // 32 - CHAIN_AT * 2) * 32
    assert_once(rows, total, log)
    assert "2 resume(s) under another geometry continued an exact epoch" in log.rsplit("dist-train: data:", 1)[1]


def test_a_second_stop_inside_the_continued_epoch_resumes_at_its_own_layout(bad_rows_set):
    """2 ranks read 7 batches, 3 ranks read 4 more and stop, the same 3 ranks resume: the batches it had left."""
    source, _ = bad_rows_set
    old, cursors = streams(source, 2, 16, 0), []
    for s in old:
        s.set_epoch(1)
        batches = iter(s)
        [next(batches) for _ in range(7)]
        batches.close()
        cursors += s.cursors()
    lay = old[0].layouts(cursors, stop=7)
    first = ceil_div(7 * 2 * 16, 3 * 8)
    whole, stopped = [], []
    for s in streams(source, 3, 8, 0):
        s.set_epoch(1, first, earlier=lay, first=first)
        whole.append([b["row"].tolist() for b in s])
        s.set_epoch(1, first, earlier=lay, first=first)
        batches = iter(s)
        [next(batches) for _ in range(4)]
        stopped.append((s, batches))
    cursors = [c for s, _ in stopped for c in s.cursors()]
    saved = stopped[0][0].layouts(cursors, stop=first + 4)  # what a checkpoint here records
    assert saved[:-1] == lay
    assert (saved[-1].world_size, saved[-1].first, saved[-1].stop, list(saved[-1].cursors)) == (
        3, first, first + 4, cursors
    )  # fmt: skip
    for _, batches in stopped:
        batches.close()
    for rank, s in enumerate(streams(source, 3, 8, 0)):
        last = saved[-1]
        s.set_epoch(1, last.stop, earlier=saved[:-1], first=last.first, cursors=last.cursors[rank : rank + 1])
        assert s.cursors() == [last.cursors[rank]], "a reader that has yielded nothing yet keeps its saved cursor"
        assert [b["row"].tolist() for b in s] == whole[rank][4:], "the batches the stopped layout had not yet read"
