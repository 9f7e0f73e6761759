"""The streaming loader: equal batch counts per rank, exact coverage, bad data skipped and counted."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from dist_train.data import blocks, shards
from dist_train.data.eval_reader import eval_batch_count, eval_batches
from dist_train.data.schema import EMB_DIM, N_LANDMARKS, finite_rows
from dist_train.data.stream import LoaderStats, TrainStream, expand_urls

BLOCK = 32
BATCH = 16
REPO = Path(__file__).resolve().parents[1]


def sample_arrays(n: int, first_id: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random unit embeddings; identity = a unique running number, so rows can be traced."""
    rng = np.random.default_rng(seed)

    def unit(k):
        x = rng.normal(size=(k, EMB_DIM))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return {
        "src_emb": unit(n),
        "src_kps": rng.normal(size=(n, N_LANDMARKS, 3)) * 100,
        "src_pose": rng.uniform(-90, 90, size=(n, 3)),
        "tgt_emb": unit(n),
        "identity": np.arange(first_id, first_id + n),
    }


def uneven_set(root: Path, sizes=(256, 160, 96)) -> shards.ShardSet:
    """A shard set whose train split has one shard per entry of ``sizes`` (identities 0..sum-1)."""
    entries, start = [], 0
    for i, n in enumerate(sizes):
        part = root / f"part{i}"
        shards.write_split(
            part, "train", sample_arrays(n, start, seed=i), shard_samples=n + (-n) % BLOCK, block_size=BLOCK
        )
        (part / "train-000000.tar").rename(root / f"train-{i:06d}.tar")
        part.rmdir()
        entries.append({"file": f"train-{i:06d}.tar", "n_samples": n})
        start += n
    split = {"shards": entries, "n_samples": start, "n_identities": start}
    shards.write_index(root, {"train": split}, fields=list(shards.REQUIRED), provenance={}, block_size=BLOCK)
    return shards.ShardSet.open(root)


def truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def run_epochs(stream: TrainStream, epochs: int = 1) -> list[list[dict]]:
    out = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        out.append(list(stream))
    return out


def ids(batches: list[dict]) -> np.ndarray:
    return np.concatenate([b["identity"].numpy() for b in batches])


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> shards.ShardSet:
    return uneven_set(tmp_path_factory.mktemp("uneven"))


@pytest.fixture(scope="module")
def with_val(tmp_path_factory) -> shards.ShardSet:
    """Train 0..299, val 1000..1299 in shards of 128 (128, 128, 44) and blocks of 32."""
    root = tmp_path_factory.mktemp("withval")
    splits = {"train": sample_arrays(300, 0), "val": sample_arrays(300, 1000, seed=1)}
    shards.write_shard_set(root, splits, provenance={}, shard_samples=128, block_size=BLOCK)
    return shards.ShardSet.open(root)


def stream(source, **kw) -> TrainStream:
    args = dict(batch_size=BATCH, batches_per_epoch=20, num_workers=0, shuffle_blocks=4, seed=7)
    args.update(kw)
    return TrainStream(source, **args)


# --- batch counts and coverage ---------------------------------------------------------------------


def test_batches_have_the_promised_shapes_and_dtypes(uneven):
    batch = next(iter(stream(uneven, fields=("src_emb", "src_kps", "src_pose", "tgt_emb", "identity"))))
    assert set(batch) == {"src_emb", "src_kps", "src_pose", "tgt_emb", "identity"}
    assert batch["src_emb"].shape == (BATCH, EMB_DIM) and batch["src_emb"].dtype == torch.float32
    assert batch["src_kps"].shape == (BATCH, N_LANDMARKS, 3) and batch["src_kps"].dtype == torch.float32
    assert batch["src_pose"].shape == (BATCH, 3) and batch["tgt_emb"].shape == (BATCH, EMB_DIM)
    assert batch["identity"].dtype == torch.int64
    torch.testing.assert_close(batch["src_emb"].norm(dim=1), torch.ones(BATCH), atol=2e-3, rtol=0)


@pytest.mark.parametrize("resampled", [True, False])
def test_two_ranks_yield_equal_counts_on_uneven_shards(uneven, resampled):
    for rank in (0, 1):
        s = stream(uneven, rank=rank, world_size=2, resampled=resampled)
        assert [len(e) for e in run_epochs(s, 2)] == [20, 20]


def readers_rows(source, world_size: int, epoch: int, batches: int, **kw) -> list[np.ndarray]:
    """Per rank, the identities (= row numbers in these sets) it yields in one epoch."""
    out = []
    for rank in range(world_size):
        s = stream(source, rank=rank, world_size=world_size, batches_per_epoch=batches, **kw)
        s.set_epoch(epoch)
        out.append(ids(list(s)))
    return out


@pytest.mark.parametrize("readers", [4, 16])
def test_resampled_mode_covers_the_rows_like_sampling_with_replacement(tmp_path, readers):
    """R readers x E epochs see ~1 - e^-E of the rows (>= 95% after 5), whatever the shard and block sizes.

    Before, each epoch re-opened every shard at its first block: 4 readers saw ~35% of a 19k-row set in 5 epochs.
    """
    source = uneven_set(tmp_path, sizes=(4096, 64 * 7 + 5, 9000, 1200, 3500, 800))  # blocks of 32, some partial
    total = 4096 + 64 * 7 + 5 + 9000 + 1200 + 3500 + 800
    batches = total // (readers * BATCH)
    seen: set[int] = set()
    for epoch in range(5):
        for rows in readers_rows(source, readers, epoch, batches, num_workers=0):
            assert len(rows) == len(np.unique(rows)), "a reader saw a row twice within its epoch"
            seen |= set(rows.tolist())
        if epoch == 0:  # each reader takes 1/R of the blocks: a row is missed by all R with (1 - 1/R)^R ~ e^-1
            assert len(seen) / total == pytest.approx(1 - (1 - 1 / readers) ** readers, abs=0.05)
    assert len(seen) / total >= 0.95


def test_exact_epoch_reads_every_row_once_across_ranks_and_workers(uneven):
    """2 ranks x 2 workers on shards of 256/160/96 rows: balance rows, not shards."""
    world, workers = 2, 2
    batches = 512 // (world * BATCH)  # 16 per rank: 512 rows, no tail
    for epoch in range(2):
        rows = np.concatenate(readers_rows(uneven, world, epoch, batches, num_workers=workers, resampled=False))
        assert sorted(rows.tolist()) == list(range(512))
    # 15 batches per rank: 480 rows; the 32-row tail (< one global batch) is left out, counted, and another each epoch
    tails, stats = [], None
    for epoch in range(3):
        s = stream(uneven, rank=0, world_size=1, batches_per_epoch=30, num_workers=workers, resampled=False)
        s.set_epoch(epoch)
        rows = ids(list(s))
        assert len(rows) == 480 == len(np.unique(rows))
        tails.append(frozenset(range(512)) - set(rows.tolist()))
        stats = s.stats
        assert (stats.dropped_tail, stats.repeats) == (32, 0)
    assert len(set(tails)) == 3, "the rows left out change from epoch to epoch"


def test_exact_epoch_makes_up_for_bad_rows_with_counted_repeats(tmp_path):
    arrays = sample_arrays(128, 0)
    bad = [3, 40, 77, 100]
    arrays["src_emb"][3, 5] = np.nan
    arrays["src_kps"][40, 0, 0] = np.inf
    arrays["src_pose"][77, 1] = -np.inf
    arrays["tgt_emb"][100, 0] = np.nan
    shards.write_shard_set(tmp_path, {"train": arrays}, provenance={}, shard_samples=64, block_size=BLOCK)
    for workers in (0, 2):
        s = stream(shards.ShardSet.open(tmp_path), batches_per_epoch=8, resampled=False, num_workers=workers)
        rows = ids(list(s))
        assert len(rows) == 128 and set(rows.tolist()) == set(range(128)) - set(bad)
        assert (s.stats.nonfinite_rows, s.stats.repeats, s.stats.dropped_tail) == (4, 4, 0)


@pytest.mark.parametrize("resampled", [False, True])
def test_a_resumed_epoch_yields_exactly_the_batches_not_yet_consumed(uneven, resampled):
    """Kill after ``done`` batches, resume with start_batch=done: the epoch reads each row exactly as if uninterrupted."""
    world, workers, batches, done = 2, 2, 16, 7
    for rank in range(world):
        whole = stream(uneven, rank=rank, world_size=world, batches_per_epoch=batches, num_workers=workers,
                       resampled=resampled)  # fmt: skip
        whole.set_epoch(3)
        full = [b["identity"].numpy() for b in whole]
        resumed = stream(uneven, rank=rank, world_size=world, batches_per_epoch=batches, num_workers=workers,
                         resampled=resampled)  # fmt: skip
        resumed.set_epoch(3, start_batch=done)
        rest = [b["identity"].numpy() for b in resumed]
        assert len(rest) == batches - done
        assert sorted(np.concatenate(full[done:]).tolist()) == sorted(np.concatenate(rest).tolist())


def test_exact_epoch_covers_every_sample_each_epoch(with_val):
    s = stream(with_val, resampled=False, batches_per_epoch=-(-300 // BATCH), shuffle_blocks=2)
    for batches in run_epochs(s, 2):
        assert set(ids(batches).tolist()) == set(range(300))
    assert s.stats.samples_read >= 600 and s.stats.dropped_tail == 0


def test_resampled_works_with_fewer_shards_than_ranks_times_workers(uneven):
    for rank in range(4):  # 3 shards, 4 ranks
        assert [len(e) for e in run_epochs(stream(uneven, rank=rank, world_size=4), 2)] == [20, 20]
    for rank in range(2):  # 3 shards, 2 ranks x 2 DataLoader workers
        s = stream(uneven, rank=rank, world_size=2, num_workers=2, batches_per_epoch=6)
        assert [len(e) for e in run_epochs(s, 1)] == [6]


def test_exact_mode_works_with_fewer_shards_than_readers(uneven):
    # 3 shards, 2 ranks x 2 workers: rows are dealt, not shards
    rows = np.concatenate(readers_rows(uneven, 2, 0, 512 // (2 * BATCH), num_workers=2, resampled=False))
    assert sorted(rows.tolist()) == list(range(512))


def test_same_seed_epoch_rank_same_batches_and_one_worker_matches_in_process(uneven):
    def first(**kw):
        return ids(list(stream(uneven, world_size=2, batches_per_epoch=6, **kw)))

    for resampled in (True, False):
        a = first(rank=0, resampled=resampled)
        assert np.array_equal(a, first(rank=0, resampled=resampled))
        assert np.array_equal(a, first(rank=0, resampled=resampled, num_workers=1))
        assert not np.array_equal(a, first(rank=1, resampled=resampled))
        s = stream(uneven, world_size=2, batches_per_epoch=6, resampled=resampled)
        e0, e1 = (ids(b) for b in run_epochs(s, 2))
        assert not np.array_equal(e0, e1)


# --- bad data ---------------------------------------------------------------------------------------


@pytest.fixture()
def cut_set(tmp_path, uneven) -> shards.ShardSet:
    root = tmp_path / "cut"
    shutil.copytree(uneven.root, root)
    truncate(str(root / "train-000000.tar"))
    return shards.ShardSet.open(root)


def readable_ids(path: str) -> set[int]:
    read = blocks.iter_blocks([path], on_error=lambda e: True)
    return {int(i) for b in read for i in b["identity"]}


def test_truncated_shard_is_skipped_and_counted_in_both_modes(cut_set):
    good = readable_ids(cut_set.shard_paths("train")[0])
    lost = set(range(256)) - good
    assert 0 < len(lost) < 256
    # exact mode, one rank, 40 batches of 16 (> the 512 rows): the cut's rows are lost once, made up by repeats
    s = stream(cut_set, resampled=False, batches_per_epoch=40)
    seen = set(ids(list(s)).tolist())
    st = s.stats
    assert seen == set(range(512)) - lost
    assert st.bad_blocks >= 1 and st.unreadable_rows == len(lost) and st.repeats == 640 - len(seen)
    # resampled mode, two ranks: equal counts, the cut shard drawn and counted
    bad_blocks = 0
    for rank in (0, 1):
        r = stream(cut_set, rank=rank, world_size=2, batches_per_epoch=40)
        batches = list(r)
        assert len(batches) == 40 and not set(ids(batches).tolist()) & lost
        bad_blocks += r.stats.bad_blocks
        assert r.stats.unreadable_rows > 0
    assert bad_blocks > 0


def test_finite_rows_agrees_with_isfinite_for_float16_storage_and_float32():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(64, 512)).astype(np.float16)
    emb[0, 0], emb[1, 1] = 65504, -65504  # the largest finite float16 values stay finite
    kps = rng.normal(size=(64, N_LANDMARKS, 3)).astype(np.float32)
    for row, value in zip(range(2, 14), [np.nan, np.inf, -np.inf] * 4):
        (emb if row % 2 else kps.reshape(64, -1))[row, row * 7] = value
    arrays = {"src_emb": emb, "src_kps": kps, "identity": np.arange(64)}
    expected = np.isfinite(emb).all(axis=1) & np.isfinite(kps).reshape(64, -1).all(axis=1)
    assert expected.sum() == 64 - 12
    assert np.array_equal(finite_rows(arrays), expected)
    assert np.array_equal(finite_rows({"src_emb": emb[:, ::3]}), np.isfinite(emb[:, ::3]).all(axis=1))


def test_worker_counts_reach_the_main_process(cut_set):
    s = stream(cut_set, resampled=False, batches_per_epoch=40, num_workers=1)
    assert len(list(s)) == 40
    assert s.stats.bad_blocks + s.stats.shard_errors >= 1
    assert s.stats.bad_samples > 0 and s.stats.samples_read >= 640


class _Payload:
    """Unpickling this creates a file: proof that a member was (or was not) unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_member_makes_a_bad_block_never_unpickled(tmp_path):
    good = sample_arrays(2 * BLOCK, 0)
    marker = tmp_path / "unpickled"
    url = str(tmp_path / "evil.tar")
    with wds.TarWriter(url, encoder=False) as sink:
        for b in range(2):
            block = {"__key__": f"b{b:06d}"}
            for k, v in good.items():
                block[f"{k}.npy"] = shards._npy_bytes(
                    np.asarray(v[b * BLOCK : (b + 1) * BLOCK], shards.FIELDS[k].storage)
                )
            if b == 1:
                block["extra.pyd"] = pickle.dumps(_Payload(str(marker)))
            sink.write(block)
    s = TrainStream([url], batch_size=BATCH, batches_per_epoch=4, resampled=False, num_workers=0)
    seen = set(ids(list(s)).tolist())
    assert seen == set(range(BLOCK))  # only the clean block
    assert s.stats.bad_blocks >= 1 and s.stats.blocks_read >= 1
    assert not marker.exists()


def test_shards_without_any_valid_block_raise_naming_them(tmp_path):
    bad = [tmp_path / "x-0.tar", tmp_path / "x-1.tar"]
    for p in bad:
        p.write_bytes(b"this is not a tar file" * 100)
    for resampled in (True, False):
        with pytest.raises(ValueError, match=r"hold no readable block \(2 shard\(s\): .*x-0.tar"):
            TrainStream([str(p) for p in bad], batch_size=4, batches_per_epoch=2, resampled=resampled, num_workers=0)


# --- URLs and arguments -----------------------------------------------------------------------------


def test_glob_and_brace_give_the_same_stream_and_urls_are_refused(with_val, tmp_path):
    root = str(with_val.root)
    listed = with_val.shard_paths("train")
    assert expand_urls(f"{root}/train-*.tar") == listed
    assert expand_urls([f"{root}/train-{{000000..000002}}.tar"]) == listed
    expected = ids(list(stream(with_val, batches_per_epoch=8)))
    for form in (f"{root}/train-*.tar", f"{root}/train-{{000000..000002}}.tar"):
        assert np.array_equal(ids(list(stream(form, batches_per_epoch=8))), expected), form
    ran = tmp_path / "ran"
    for url in (f"pipe:touch {ran}", "http://example.com/train-000000.tar"):
        with pytest.raises(ValueError, match="is a URL; dist-train reads local shard files only"):
            stream(url, batches_per_epoch=8)
    assert not ran.exists()


@pytest.mark.parametrize(
    "entry", ["pipe:touch {ran}", "/etc/passwd.tar", "../outside.tar", "sub/train-000000.tar", "http://x/y.tar", ""]
)
def test_index_entries_that_are_not_plain_file_names_are_refused_before_reading(with_val, tmp_path, entry):
    """Shard sets are shared data: an index.json entry must never run a command or point out of its folder."""
    root = tmp_path / "evil"
    shutil.copytree(with_val.root, root)
    ran = tmp_path / "ran"
    index = json.loads((root / "index.json").read_text())
    index["splits"]["train"]["shards"][1]["file"] = entry.format(ran=ran)
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(shards.ShardSetError, match=r"not a plain file name ending in .tar"):
        shards.ShardSet.open(root)
    for command in (["inspect", str(root)], ["train", "--data_dir", str(root), "--output_dir", str(tmp_path / "r")]):
        out = subprocess.run([sys.executable, "-m", "dist_train", *command], capture_output=True, text=True, cwd=root)
        assert out.returncode == 2 and "not a plain file name" in out.stderr, out.stderr[-2000:]
    assert not ran.exists(), "a command from index.json ran"


def test_a_shard_that_is_a_symlink_is_refused(with_val, tmp_path):
    root = tmp_path / "linked"
    shutil.copytree(with_val.root, root)
    target = root / "train-000001.tar"
    moved = tmp_path / "elsewhere.tar"
    target.rename(moved)
    target.symlink_to(moved)
    with pytest.raises(shards.ShardSetError, match="is a symbolic link"):
        shards.ShardSet.open(root)


def test_bad_urls_and_arguments_fail_before_reading(with_val, tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="does not exist"):
        expand_urls([str(tmp_path / "missing.tar")])
    with pytest.raises(ValueError, match=r"no field\(s\) \['oracle_emb'\]"):
        stream(with_val, fields=(*shards.REQUIRED, "oracle_emb"))
    with pytest.raises(ValueError, match="rank must be in"):
        stream(with_val, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batches_per_epoch must be a positive integer"):
        stream(with_val, batches_per_epoch=0)


# --- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,batch_size", [(2, 16), (3, 16), (3, 7), (4, 100)])
def test_eval_batches_cover_the_split_exactly_once(with_val, world_size, batch_size):
    counts, valid_ids = [], []
    for rank in range(world_size):
        n = 0
        for batch, valid in eval_batches(with_val, "val", batch_size, rank, world_size):
            assert valid.dtype == torch.bool and len(valid) == batch_size
            assert all(torch.isfinite(v.float()).all() for v in batch.values())
            real = set(batch["identity"][valid].tolist())
            assert set(batch["identity"][~valid].tolist()) <= (real or set(batch["identity"].tolist()))
            valid_ids.extend(batch["identity"][valid].tolist())
            n += 1
        counts.append(n)
    assert counts == [eval_batch_count(with_val, "val", batch_size, world_size)] * world_size
    assert sorted(valid_ids) == list(range(1000, 1300))


def test_eval_drops_and_counts_rows_with_non_finite_values(tmp_path):
    """One NaN row must not make every validation metric NaN: it becomes an invalid row, counted."""
    arrays = sample_arrays(100, 0)
    arrays["src_emb"][5, 0] = np.nan
    arrays["src_kps"][50, 1, 2] = np.inf
    arrays["tgt_emb"][99, 7] = -np.inf
    shards.write_shard_set(tmp_path, {"val": arrays}, provenance={}, shard_samples=64, block_size=BLOCK)
    ss = shards.ShardSet.open(tmp_path)
    stats = LoaderStats()
    valid_ids = []
    for rank in range(2):
        for batch, valid in eval_batches(ss, "val", 16, rank, 2, stats=stats):
            assert all(bool(torch.isfinite(v.float()).all()) for v in batch.values())
            valid_ids += batch["identity"][valid].tolist()
    assert sorted(valid_ids) == sorted(set(range(100)) - {5, 50, 99})
    assert (stats.nonfinite_rows, stats.unreadable_rows, stats.bad_samples) == (3, 0, 3)


def test_eval_with_fewer_samples_than_ranks(tmp_path):
    shards.write_shard_set(tmp_path, {"val": sample_arrays(2, 0)}, provenance={}, shard_samples=BLOCK, block_size=BLOCK)
    ss = shards.ShardSet.open(tmp_path)
    got = [list(eval_batches(ss, "val", 4, rank, 3)) for rank in range(3)]
    assert [len(g) for g in got] == [1, 1, 1]
    assert sorted(i for g in got for b, v in g for i in b["identity"][v].tolist()) == [0, 1]
    empty = next(g for g in got if not g[0][1].any())[0][0]
    assert all(torch.isfinite(t.float()).all() for t in empty.values())


def test_eval_marks_rows_of_a_cut_shard_invalid_and_keeps_counts(tmp_path, with_val):
    root = tmp_path / "cutval"
    shutil.copytree(with_val.root, root)
    ss = shards.ShardSet.open(root)
    truncate(ss.shard_paths("val")[1])
    readable = set().union(*(readable_ids(p) for p in ss.shard_paths("val")))
    stats = LoaderStats()
    counts, valid_ids = [], []
    for rank in range(2):
        batches = list(eval_batches(ss, "val", 16, rank, 2, stats=stats))
        counts.append(len(batches))
        valid_ids += [i for b, v in batches for i in b["identity"][v].tolist()]
    assert counts == [eval_batch_count(ss, "val", 16, 2)] * 2
    assert sorted(valid_ids) == sorted(readable) and len(readable) < 300
    assert stats.bad_samples == 300 - len(readable) and stats.bad_blocks + stats.shard_errors >= 1


# --- two real processes -----------------------------------------------------------------------------

_DIST_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from dist_train.data.shards import ShardSet
    from dist_train.data.eval_reader import eval_batches
    from dist_train.data.stream import TrainStream
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ss = ShardSet.open(sys.argv[1])
    counts = []
    for resampled in (False, True):
        s = TrainStream(ss, batch_size=16, rank=rank, world_size=world, batches_per_epoch=12,
                        resampled=resampled, num_workers=0, shuffle_blocks=2)
        for epoch in range(2):
            s.set_epoch(epoch)
            n = 0
            for batch in s:  # a collective per batch, as DDP/ZeRO do: unequal counts would hang here
                dist.all_reduce(batch["src_emb"].sum().reshape(1))
                n += 1
            counts.append(n)
    n_eval = 0
    for batch, valid in eval_batches(ss, "train", 16, rank, world):
        dist.all_reduce(valid.sum().reshape(1))
        n_eval += 1
    t = torch.tensor(counts + [n_eval])
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if rank == 0:
        print("COUNTS", lo.tolist(), hi.tolist(), flush=True)
    dist.destroy_process_group()
    """
)


def test_two_processes_yield_equal_counts_without_hanging(with_val, tmp_path):
    script = tmp_path / "iterate.py"
    script.write_text(_DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = subprocess.run([*cmd, str(script), str(with_val.root)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("COUNTS"))
    n_eval = eval_batch_count(with_val, "train", 16, 2)
    assert line == f"COUNTS {[12, 12, 12, 12, n_eval]} {[12, 12, 12, 12, n_eval]}"


def test_loader_benchmark_runs_and_reports_all_three_layouts():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_loader.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for label in (
        "a: TrainStream",
        "b: in-memory",
        "c: one sample per tar member",
        "ratio a/b",
        "ratio a/c",
        "usable cores",
    ):
        assert label in out.stdout


# --- decoding (shards.decode_block's zero-copy .npy path and widening, used by the stream) -----------


def _block_members(arrays: dict[str, np.ndarray]) -> dict:
    block = {"__key__": "b000000"}
    for k, v in arrays.items():
        block[f"{k}.npy"] = shards._npy_bytes(np.asarray(v, shards.FIELDS[k].storage))
    return block


def test_decode_block_matches_np_load_and_rejects_object_and_short_members():
    arrays = sample_arrays(8, 0)
    block = _block_members(arrays)
    block["src_kps.npy"] = shards._npy_bytes(np.asfortranarray(arrays["src_kps"].astype(np.float32)))
    decoded = shards.decode_block(block)
    for k, v in arrays.items():
        want = np.asarray(v, shards.FIELDS[k].storage).astype(shards.compute_dtype(k))
        assert decoded[k].dtype == want.dtype and np.array_equal(decoded[k], want), k
    stored = shards.decode_block(block, storage=True)
    assert stored["src_emb"].dtype == np.float16 and stored["identity"].dtype == np.int64
    objects = dict(block)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}] * 8, dtype=object), allow_pickle=True)
    objects["identity.npy"] = buf.getvalue()
    with pytest.raises(shards.BadBlock, match="identity.npy.*pickle"):
        shards.decode_block(objects)
    short = dict(block)
    short["src_emb.npy"] = block["src_emb.npy"][:-100]
    with pytest.raises(shards.BadBlock, match="src_emb.npy"):
        shards.decode_block(short)


def test_widen_is_exact_for_every_float16_value():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 256)
    assert np.array_equal(shards.widen("src_emb", every), every.astype(np.float32), equal_nan=True)
    out = np.empty((256, 256), np.float32)
    assert shards.widen("src_emb", every[:, ::-1], out=out) is out
    assert np.array_equal(out, every[:, ::-1].astype(np.float32), equal_nan=True)
