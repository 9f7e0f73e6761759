"""Training and validation batches streamed from block-structured WebDataset shards.

``TrainStream`` yields exactly ``batches_per_epoch`` batches per epoch on every
rank, whatever the shard count, so no rank can wait forever in a collective
for a batch another rank never gets. Shards are read as blocks (one tar member
per field per block, ``shards.decode_block``); rows of several blocks are
shuffled together and batches are cut by array indexing, never per-sample
dicts. Bad tars and blocks, and rows with a non-finite value, are skipped and
counted in ``LoaderStats``. A batch leaves a DataLoader worker as one flat
buffer (the fields plus the worker's counters), because torch hands each
tensor between processes through its own socket and file descriptor: one
buffer instead of seven cut the trainer's loader overhead (BENCHMARKS.md §2).

``eval_batches`` splits a split's rows between ranks by arithmetic on
``index.json``: every rank yields the same number of batches and the rows
marked valid cover the split exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import numbers
import os
import random
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds

from dist_train.data.schema import FIELDS, REQUIRED, finite_rows
from dist_train.data.shards import INDEX_NAME, BadBlock, ShardSet, compute_dtype, decode_block, widen

_ALIGN = 64  # byte alignment of each field inside a packed batch
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}  # compute_dtype's
_PASS = "__pass__"  # pass number of a block (an int) or of each leftover row (an array); >0: a repeat
_PASS_END = object()  # marker between exact-epoch passes: the mixer flushes so every row of a pass leaves first
_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")
_SHOWN_SHARDS = 5  # shards named in an error message


@dataclass
class LoaderStats:
    """Cumulative loader counters of one rank (all its workers, all epochs so far)."""

    bad_blocks: int = 0  # tar samples that did not decode as a block (incl. the partial block of a cut tar)
    bad_samples: int = 0  # rows with a non-finite value, plus samples lost to bad blocks and unreadable tar
    # tails (those known where index.json lists the shard); an exact-epoch repeat pass does not count them again
    shard_errors: int = 0  # shard reads that failed: missing file, truncated or corrupt tar, failing pipe:
    blocks_read: int = 0
    samples_read: int = 0
    repeats: int = 0  # exact-epoch mode: samples yielded from a second pass over the rank's shards
    dropped_tail: int = 0  # exact-epoch mode: samples of the rank's shards not reached before the epoch ended

    def add(self, other: LoaderStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# Counters a worker reports with each batch, then its exact-epoch "pending" rows (dropped if the epoch ends there).
_REPORTED = ("bad_blocks", "bad_samples", "shard_errors", "blocks_read", "samples_read", "repeats")
_REPORT_LEN = 2 + len(_REPORTED)  # worker id, the counters, pending rows


def _exact_epoch_problem(shard_count: int, world_size: int, num_workers: int) -> str | None:
    readers = world_size * max(1, num_workers)
    if shard_count >= readers:
        return None
    return (
        f"exact-epoch mode (resampled: false) gives each rank x worker its own shards, but there are "
        f"{shard_count} shard(s) for {world_size} rank(s) x {max(1, num_workers)} worker(s) = {readers} readers, "
        f"so some would get none and the ranks would run different batch counts. Set `resampled: true` "
        f"(flag --resampled true), lower num_workers, or write at least {readers} smaller shards."
    )


def check_exact_epoch(shard_count: int, world_size: int, num_workers: int) -> None:
    """Raise ValueError unless every rank and worker gets at least one shard in exact-epoch mode."""
    problem = _exact_epoch_problem(shard_count, world_size, num_workers)
    if problem:
        raise ValueError(problem)


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Local paths, globs, brace ranges, ``pipe:`` and ``http(s)://`` URLs -> a flat URL list.

    Local files are checked here, before any reader starts.
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in map(str, items):
        for url in braceexpand.braceexpand(item):
            if _REMOTE.match(url):
                out.append(url)
            elif glob.has_magic(url):
                found = sorted(glob.glob(url))
                if not found:
                    raise ValueError(f"shard pattern {url!r} matches no file; check the directory and pattern")
                out.extend(found)
            elif os.path.isfile(url):
                out.append(url)
            else:
                raise ValueError(f"shard {url!r} does not exist; give existing .tar files, a glob or a brace range")
    if not out:
        raise ValueError("no shard URLs given")
    return out


def shard_sizes(urls: Iterable[str]) -> dict[str, int]:
    """Sample count per URL, for local shards listed in an ``index.json`` next to them.

    Bad-sample and dropped-tail counts need these; URLs without an index (pipe:,
    http, loose tars) report only what was read.
    """
    by_dir: dict[Path, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    for url in urls:
        if _REMOTE.match(url):
            continue
        path = Path(url).resolve()
        if path.parent not in by_dir:
            listed: dict[str, int] = {}
            if (path.parent / INDEX_NAME).is_file():
                for split in ShardSet.open(path.parent).index["splits"].values():
                    listed.update({s["file"]: int(s["n_samples"]) for s in split["shards"]})
            by_dir[path.parent] = listed
        if path.name in by_dir[path.parent]:
            sizes[url] = by_dir[path.parent][path.name]
    return sizes


def _seed(*parts: int) -> int:
    """One 32-bit seed from (seed, epoch, rank, worker, purpose, ...): same inputs, same stream."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _worker_id() -> int:
    return _worker_info()[0]


def _tar_samples(url: str, on_read_error) -> Iterator[dict]:
    """One shard's tar samples (``tarfile_to_samples`` on a single URL).

    One shard at a time, so the partial block at a cut never merges with the
    next shard's first block; ``on_read_error`` counts, never sleeps.
    """

    def handler(exc: Exception) -> bool:
        on_read_error(exc)
        return True

    return wds.tarfile_samples(iter([{"url": url}]), handler=handler)


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs for one epoch; picklable for DataLoader workers."""

    urls: tuple[str, ...]
    sizes: dict[str, int]
    fields: tuple[str, ...]
    batch_size: int
    rank: int
    world_size: int
    resampled: bool
    seed: int
    epoch: int
    shuffle_blocks: int


@dataclass
class _WorkerState:
    """Counters of one worker for one epoch, plus the pass bookkeeping of exact-epoch mode."""

    plan: _Plan
    worker: int
    stats: LoaderStats = field(default_factory=LoaderStats)
    pass_rows: int | None = None  # rows in this worker's shards (exact mode, when index.json knows them all)
    fresh_decoded: int = 0  # rows decoded in the first pass
    fresh_bad: int = 0  # rows lost to bad data in the first pass
    fresh_yielded: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # shards without a valid block since the last valid block

    def report(self) -> np.ndarray:
        if self.plan.resampled:
            pending = 0
        else:
            total = self.fresh_decoded if self.pass_rows is None else self.pass_rows - self.fresh_bad
            pending = max(0, total - self.fresh_yielded)
        return np.array([self.worker, *(getattr(self.stats, k) for k in _REPORTED), pending], dtype=np.int64)

    def shard_done(self, url: str, got: int, pass_no: int, reason: str | None, shards: Sequence[str]) -> None:
        expected = self.plan.sizes.get(url)
        if expected is not None and got < expected and pass_no == 0:
            self.stats.bad_samples += expected - got
            self.fresh_bad += expected - got
        if got:
            self.failed.clear()
            return
        self.failed[url] = reason or "no block in the tar"
        if set(self.failed) >= set(shards):
            named = "; ".join(f"{u}: {r}" for u, r in list(self.failed.items())[:_SHOWN_SHARDS])
            more = f" (and {len(self.failed) - _SHOWN_SHARDS} more)" if len(self.failed) > _SHOWN_SHARDS else ""
            raise ValueError(
                f"rank {self.plan.rank} worker {self.worker}: no valid block in any of its {len(set(shards))} "
                f"shard(s): {named}{more}. Check or re-create the shard set (`dist-train inspect DIR`)."
            )


def _split_by_rank(src: Iterable[dict], rank: int, world_size: int) -> Iterator[dict]:
    """``wds.split_by_node`` with the caller's rank and world size instead of guessed ones."""
    return itertools.islice(src, rank, None, world_size)


def _passes(src: Iterable[dict], plan: _Plan) -> Iterator[dict]:
    """Exact-epoch mode: this worker's shards, pass after pass (later passes are repeats, reshuffled)."""
    mine = tuple(s["url"] for s in src)
    worker, num_workers = _worker_info()
    if not mine:
        raise ValueError(
            _exact_epoch_problem(len(plan.urls), plan.world_size, num_workers)
            or f"rank {plan.rank} worker {worker} got no shard of {len(plan.urls)}"
        )
    rng = random.Random(_seed(plan.seed, plan.epoch, plan.rank, worker, 3))
    for pass_no in itertools.count():
        order = mine if pass_no == 0 else rng.sample(mine, len(mine))
        for url in order:
            yield {"url": url, "pass_no": pass_no, "worker_shards": mine}


def _as_storage(name: str, a: np.ndarray) -> np.ndarray:
    """The schema's storage dtype (what ``write_split`` writes; other tars are cast to it)."""
    return a if a.dtype == FIELDS[name].storage else a.astype(FIELDS[name].storage)


def _shard_blocks(shard: dict, state: _WorkerState) -> Iterator[dict[str, np.ndarray]]:
    """Decoded blocks of one shard (requested fields plus a pass column); counts what is bad."""
    plan = state.plan
    url, pass_no = shard["url"], shard.get("pass_no", 0)
    shards = shard.get("worker_shards", plan.urls)
    if state.pass_rows is None and not plan.resampled and all(u in plan.sizes for u in shards):
        state.pass_rows = sum(plan.sizes[u] for u in shards)
    read_errors: list[Exception] = []
    last_bad: Exception | None = None
    got = 0
    for sample in _tar_samples(url, read_errors.append):
        try:
            arrays = decode_block(sample, storage=True)  # float16 moves through the shuffle, widened per batch
        except BadBlock as e:
            state.stats.bad_blocks += 1
            last_bad = e
            continue
        missing = [f for f in plan.fields if f not in arrays]
        if missing:
            raise ValueError(
                f"shard {url} has no field(s) {missing}; drop them from `fields` or use a shard set with them"
            )
        n = len(arrays["identity"])
        got += n
        state.stats.blocks_read += 1
        state.stats.samples_read += n
        block = {f: _as_storage(f, arrays[f]) for f in plan.fields}
        ok = finite_rows(block)  # one bad row must not poison a step; here, off the training process
        n_bad = n - int(ok.sum())
        if n_bad:
            block = {f: a[ok] for f, a in block.items()}
        if pass_no == 0:
            state.stats.bad_samples += n_bad
            state.fresh_decoded += n - n_bad
            state.fresh_bad += n_bad
        if n > n_bad:
            yield {**block, _PASS: pass_no}
    if read_errors:
        state.stats.shard_errors += 1
    reason = read_errors[-1] if read_errors else last_bad
    state.shard_done(url, got, pass_no, f"{type(reason).__name__}: {reason}" if reason else None, shards)


def _interleave(shards: Iterator[dict], width: int, read) -> Iterator:
    """Blocks round-robin from up to ``width`` open shards, so one buffer mixes several shards.

    A new pass opens only when the previous one is fully read; ``_PASS_END`` marks the boundary.
    """
    readers: deque = deque()
    waiting: dict | None = None
    current = None
    while True:
        while len(readers) < width:
            shard = waiting if waiting is not None else next(shards, None)
            waiting = None
            if shard is None:
                break
            pass_no = shard.get("pass_no", 0)
            if current is not None and pass_no != current:
                if readers:
                    waiting = shard
                    break
                yield _PASS_END
            current = pass_no
            readers.append(read(shard))
        if not readers:
            return
        reader = readers.popleft()
        block = next(reader, None)
        if block is not None:
            readers.append(reader)
            yield block


def _gather(parts: list[dict], offsets: np.ndarray, rows: np.ndarray, fields) -> tuple[dict, np.ndarray]:
    """Rows (sorted positions in the parts laid end to end), copied once, still in storage dtypes.

    Returns the field arrays and each row's pass number.
    """
    cuts = np.searchsorted(rows, offsets)
    out = {f: np.empty((len(rows), *FIELDS[f].shape), FIELDS[f].storage) for f in fields}
    passes = np.empty(len(rows), np.int32)
    for part, start, a, b in zip(parts, offsets, cuts[:-1], cuts[1:]):
        if a == b:
            continue
        sel = rows[a:b] - start
        for f in fields:
            np.take(part[f], sel, axis=0, out=out[f][a:b], mode="clip")  # clip: no hidden buffer copy
        passes[a:b] = part[_PASS][sel] if isinstance(part[_PASS], np.ndarray) else part[_PASS]
    return out, passes


@functools.lru_cache(maxsize=64)
def _batch_layout(fields: tuple[str, ...], rows: int) -> tuple[list[tuple], int]:
    """Where each part of a packed batch lies, (name, dtype, shape, byte offset, bytes), and the total bytes.

    Part "" is the worker's report (``_WorkerState.report``); the fields follow in compute dtypes.
    """
    parts = [("", np.dtype(np.int64), (_REPORT_LEN,))]
    parts += [(f, np.dtype(compute_dtype(f)), (rows, *FIELDS[f].shape)) for f in fields]
    out, offset = [], 0
    for name, dtype, shape in parts:
        size = int(np.prod(shape)) * dtype.itemsize
        out.append((name, dtype, shape, offset, size))
        offset += -(-size // _ALIGN) * _ALIGN
    return out, offset


def _pack(rows: dict[str, np.ndarray], report: np.ndarray, fields: tuple[str, ...]) -> tuple[torch.Tensor, int]:
    """A batch in compute dtypes plus the worker's counters, in one uint8 tensor (one hand-off between processes)."""
    n = len(rows[fields[0]])
    layout, nbytes = _batch_layout(fields, n)
    buf = np.empty(nbytes, np.uint8)
    for name, dtype, shape, offset, size in layout:
        view = buf[offset : offset + size].view(dtype).reshape(shape)
        if name:
            widen(name, rows[name], out=view)
        else:
            view[:] = report
    return torch.from_numpy(buf), n


def _unpack(packed: tuple[torch.Tensor, int], fields: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Views into the packed buffer (no copy): the batch and the worker's counters."""
    buf, n = packed
    layout, _ = _batch_layout(fields, int(n))
    views = {
        name: buf[offset : offset + size].view(_TORCH_DTYPES[dtype]).view(shape)
        for name, dtype, shape, offset, size in layout
    }
    report = views.pop("")
    return views, report.tolist()


def _emit(buffer: list[dict], carry: dict | None, state: _WorkerState, rng: np.random.Generator):
    """Shuffle the rows of the buffered blocks, yield full batches; returns the leftover rows.

    Leftover rows go first in the next buffer, so no row waits more than one buffer.
    A batch is a random set of rows; within it they are ordered by block, which
    saves a copy and changes nothing for a loss that averages over rows.
    """
    plan, size = state.plan, state.plan.batch_size
    parts = ([carry] if carry is not None else []) + buffer
    offsets = np.cumsum([0] + [len(p[plan.fields[0]]) for p in parts])
    kept = 0 if carry is None else len(carry[plan.fields[0]])
    new = int(offsets[-1]) - kept
    order = rng.permutation(new) if plan.shuffle_blocks else np.arange(new)
    index = np.concatenate([np.arange(kept), kept + order])
    n_batches = len(index) // size
    for i in range(n_batches):
        rows, passes = _gather(parts, offsets, np.sort(index[i * size : (i + 1) * size]), plan.fields)
        repeated = int(np.count_nonzero(passes))
        state.stats.repeats += repeated
        state.fresh_yielded += size - repeated
        yield _pack(rows, state.report(), plan.fields)
    rest, passes = _gather(parts, offsets, np.sort(index[n_batches * size :]), plan.fields)
    return {**rest, _PASS: passes}


def _train_batches(shards: Iterator[dict], plan: _Plan) -> Iterator[dict]:
    """Pipeline stage after the shard list: read, interleave, shuffle rows, slice batches (endless)."""
    worker, _ = _worker_info()
    state = _WorkerState(plan, worker)
    rng = np.random.default_rng(_seed(plan.seed, plan.epoch, plan.rank, worker, 2))
    width = max(1, plan.shuffle_blocks)
    buffer: list[dict] = []
    carry = None
    for item in _interleave(shards, width, partial(_shard_blocks, state=state)):
        if item is not _PASS_END:
            buffer.append(item)
            if len(buffer) < width:
                continue
        if buffer:
            carry = yield from _emit(buffer, carry, state, rng)
            buffer = []


def _dataset(plan: _Plan) -> wds.DataPipeline:
    if plan.resampled:  # every rank and worker draws from all shards: works for any shard count
        shards = [
            wds.ResampledShards(
                list(plan.urls),
                seed=_seed(plan.seed, plan.epoch, plan.rank, 1),
                worker_seed=_worker_id,
                deterministic=True,
            )
        ]
    else:  # same shard order on all ranks (seed, epoch), then each rank and worker takes its share
        shards = [
            wds.SimpleShardList(list(plan.urls), seed=_seed(plan.seed, plan.epoch)),
            partial(_split_by_rank, rank=plan.rank, world_size=plan.world_size),
            wds.split_by_worker,
            partial(_passes, plan=plan),
        ]
    return wds.DataPipeline(*shards, partial(_train_batches, plan=plan))


def _check_fields(fields: Sequence[str], shard_set: ShardSet | None) -> tuple[str, ...]:
    fields = tuple(fields)
    unknown = [f for f in fields if f not in FIELDS]
    if unknown or not fields or len(set(fields)) != len(fields):
        raise ValueError(f"fields {list(fields)}: give distinct names from {list(FIELDS)}")
    if shard_set is not None:
        absent = [f for f in fields if not shard_set.has(f)]
        if absent:
            raise ValueError(
                f"shard set {str(shard_set.root)!r} has no field(s) {absent} (it has {shard_set.fields}); "
                "drop them from `fields` or use a shard set that has them"
            )
    return fields


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_rank(rank: int, world_size: int) -> None:
    _check_positive(world_size=world_size)
    if not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) for world_size {world_size}, got {rank!r}")


class TrainStream:
    """Training batches: exactly ``batches_per_epoch`` per epoch on every rank.

    ``resampled=True`` draws shards with replacement, seeded per (seed, epoch,
    rank, worker): any shard count works. ``resampled=False`` reads each rank's
    own shards (every rank sees the same shard order, then takes every
    world_size-th shard); a rank that runs out starts another pass (``repeats``),
    one with rows left drops them for this epoch (``dropped_tail``).
    ``shuffle_blocks`` blocks, taken round-robin from as many open shards, have
    their rows shuffled together before batches are cut; 0 keeps stored order.
    """

    def __init__(
        self,
        source: ShardSet | str | Sequence[str],
        split: str = "train",
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int,
        resampled: bool = True,
        seed: int = 42,
        shuffle_blocks: int = 8,
        num_workers: int = 1,
        fields: Sequence[str] = REQUIRED,
    ):
        _check_positive(batch_size=batch_size, batches_per_epoch=batches_per_epoch)
        _check_rank(rank, world_size)
        for name, value in (("shuffle_blocks", shuffle_blocks), ("num_workers", num_workers)):
            if not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be zero or a positive integer, got {value!r}")
        shard_set = source if isinstance(source, ShardSet) else None
        urls = shard_set.shard_paths(split) if shard_set is not None else expand_urls(source)
        if not urls:
            raise ValueError(f"split {split!r} of {str(shard_set.root)!r} has no shards")
        if not resampled:
            check_exact_epoch(len(urls), world_size, num_workers)
        self.batches_per_epoch = batches_per_epoch
        self.num_workers = num_workers
        self.epoch = 0
        self._plan = _Plan(
            urls=tuple(urls),
            sizes=shard_sizes(urls),
            fields=_check_fields(fields, shard_set),
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            resampled=resampled,
            seed=seed,
            epoch=0,
            shuffle_blocks=shuffle_blocks,
        )
        self._done = LoaderStats()  # finished epochs
        self._live: dict[int, list[int]] = {}  # latest report per worker in the running epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def stats(self) -> LoaderStats:
        """Counters so far, including the batches of the running epoch (a snapshot)."""
        total = dataclasses.replace(self._done)
        total.add(self._live_stats())
        return total

    def _live_stats(self) -> LoaderStats:
        live = LoaderStats()
        for report in self._live.values():
            for name, value in zip(_REPORTED, report):
                setattr(live, name, getattr(live, name) + value)
        return live

    def _close_epoch(self, completed: bool) -> None:
        self._done.add(self._live_stats())
        if completed:
            self._done.dropped_tail += sum(report[-1] for report in self._live.values())
        self._live = {}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = _dataset(dataclasses.replace(self._plan, epoch=self.epoch))
        if self.num_workers == 0:
            batches = iter(dataset)
        else:
            loader = wds.WebLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False)
            batches = iter(loader)
        completed = False
        try:
            for _ in range(self.batches_per_epoch):
                batch, report = _unpack(next(batches), self._plan.fields)
                self._live[report[0]] = report[1:]
                yield batch
            completed = True
        finally:
            self._close_epoch(completed)
            close = getattr(batches, "close", None)
            if close is not None:
                close()


# --- validation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShardSpan:
    url: str
    start: int  # first row of the shard in the split
    n_samples: int


def _layout(shard_set: ShardSet, split: str) -> tuple[list[_ShardSpan], int]:
    spans, start = [], 0
    for url, entry in zip(shard_set.shard_paths(split), shard_set.split(split)["shards"]):
        spans.append(_ShardSpan(url, start, int(entry["n_samples"])))
        start += int(entry["n_samples"])
    return spans, start


def _rank_rows(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous rows [lo, hi) of a rank; rank sizes differ by at most one row."""
    return rank * total // world_size, (rank + 1) * total // world_size


def eval_batch_count(shard_set: ShardSet, split: str, batch_size: int, world_size: int) -> int:
    """Batches every rank yields from ``eval_batches`` (the same number on all ranks)."""
    _, total = _layout(shard_set, split)
    most = -(-total // world_size)
    return -(-most // batch_size)


def _block_number(key: str) -> int | None:
    """``write_split`` keys blocks ``bNNNNNN`` by their row offset in the split // block_size."""
    m = re.fullmatch(r"b(\d+)", key or "")
    return int(m.group(1)) if m else None


def _eval_segments(span: _ShardSpan, lo: int, hi: int, block_size: int, fields, stats: LoaderStats):
    """(arrays, n) for this rank's rows of one shard, in order; (None, n) where a block is bad or missing."""
    first, last = max(lo, span.start) - span.start, min(hi, span.start + span.n_samples) - span.start
    if first >= last:
        return
    base = span.start // block_size
    want, end = first // block_size, (last - 1) // block_size

    def rows(k: int) -> tuple[int, int, int]:  # block k: our row range inside it, and its full length
        a, b = max(first, k * block_size), min(last, (k + 1) * block_size)
        return a - k * block_size, b - k * block_size, min(block_size, span.n_samples - k * block_size)

    def lost(k0: int, k1: int):
        n = sum(rows(k)[1] - rows(k)[0] for k in range(k0, k1))
        stats.bad_samples += n
        return (None, n)

    read_errors: list[Exception] = []
    for sample in _tar_samples(span.url, read_errors.append):
        number = _block_number(sample.get("__key__"))
        k = None if number is None else number - base
        if k is None or k < want:
            if k is None:
                stats.bad_blocks += 1
            continue
        if k > end:
            break
        if k > want:
            yield lost(want, k)
        a, b, length = rows(k)
        try:
            arrays = decode_block(sample)
            if len(arrays["identity"]) != length:
                raise BadBlock(
                    f"block {sample['__key__']} has {len(arrays['identity'])} rows, index.json says {length}"
                )
        except BadBlock:
            stats.bad_blocks += 1
            yield lost(k, k + 1)
        else:
            stats.blocks_read += 1
            stats.samples_read += length
            yield ({f: arrays[f][a:b] for f in fields}, b - a)
        want = k + 1
    if want <= end:
        yield lost(want, end + 1)
    if read_errors:
        stats.shard_errors += 1


def _padded_batch(parts: list, fields, template: dict | None) -> tuple[dict, torch.Tensor]:
    """One batch from (arrays|None, n) parts; padded rows repeat real rows so inputs stay finite."""
    valid = np.concatenate([np.full(n, arrays is not None) for arrays, n in parts])
    size = len(valid)
    real = [arrays for arrays, _ in parts if arrays is not None]
    if real:
        source = {f: np.concatenate([r[f] for r in real]) for f in fields}
        n_real = int(valid.sum())
        index = np.empty(size, np.int64)
        index[valid] = np.arange(n_real)
        index[~valid] = np.arange(size - n_real) % n_real
    elif template is not None:  # nothing real in this batch: repeat a row of the last real batch
        source, index = template, np.zeros(size, np.int64)
    else:  # this rank has no real row at all (fewer samples than ranks): zeros are finite
        source = {f: np.zeros((1, *FIELDS[f].shape), compute_dtype(f)) for f in fields}
        index = np.zeros(size, np.int64)
    batch = {f: torch.from_numpy(np.ascontiguousarray(source[f][index])) for f in fields}
    return batch, torch.from_numpy(valid)


def _eval_iter(spans, lo, hi, total_rows, batch_size, block_size, fields, stats):
    segments = itertools.chain(
        itertools.chain.from_iterable(_eval_segments(s, lo, hi, block_size, fields, stats) for s in spans),
        [(None, total_rows - (hi - lo))],  # padding up to the common batch count
    )
    parts: list = []
    have = 0
    template = None
    for arrays, n in segments:
        while n:
            take = min(n, batch_size - have)
            parts.append(((None if arrays is None else {f: v[:take] for f, v in arrays.items()}), take))
            if arrays is not None:
                arrays = {f: v[take:] for f, v in arrays.items()}
            n -= take
            have += take
            if have == batch_size:
                batch, valid = _padded_batch(parts, fields, template)
                if valid.any():
                    template = {f: t.numpy()[:1] for f, t in batch.items()}
                yield batch, valid
                parts, have = [], 0


def eval_batches(
    shard_set: ShardSet,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    *,
    fields: Sequence[str] = REQUIRED,
    stats: LoaderStats | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(batch, valid)`` pairs covering this rank's contiguous share of the split, in order.

    Every rank yields ``eval_batch_count(...)`` batches. Rows with ``valid``
    True are, over all ranks, each sample of the split exactly once; bad or
    missing blocks become invalid rows (counted in ``stats``) so the counts
    stay equal and no rank waits for another.
    """
    _check_positive(batch_size=batch_size)
    _check_rank(rank, world_size)
    fields = _check_fields(fields, shard_set)
    spans, total = _layout(shard_set, split)
    block_size = int(shard_set.index["block_size"])
    lo, hi = _rank_rows(total, rank, world_size)
    total_rows = eval_batch_count(shard_set, split, batch_size, world_size) * batch_size
    return _eval_iter(spans, lo, hi, total_rows, batch_size, block_size, fields, stats or LoaderStats())
