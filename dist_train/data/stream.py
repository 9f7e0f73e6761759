"""Training batches from block-structured shards, read block by block (``blocks.py``).

Readers are the ranks x DataLoader workers. What each reader reads in an epoch is
arithmetic on the split's block table, the same on every rank:

- **resampled** (default): each reader walks its own seeded permutation of all
  blocks, so over E epochs R readers see about 1 - e^-E of the rows whatever
  the shard sizes, and no reader sees a row twice within its epoch (as long as
  its epoch is at most one pass over the split).
- **exact** (``resampled=False``): one permutation of the blocks per epoch (seed,
  epoch) is laid out as a row sequence and cut into equal row ranges, one per
  reader, whole batches each: every row once per epoch, minus a tail smaller
  than one global batch (``dropped_tail``). A reader that loses rows to bad data
  makes up its batches by re-reading its own range (``repeats``).

Every rank yields exactly ``batches_per_epoch`` batches, so no rank waits in a
collective for a batch another rank never gets. ``set_epoch(e, start_batch=c)``
yields the epoch's batches after the first ``c``: the readers produce the same
batches as the uninterrupted epoch and skip the first ones, which is how a
resumed run reads each row once per epoch. Rows of up to ``shuffle_blocks``
blocks are shuffled together before batches are cut. Bad blocks and rows with a
non-finite value are skipped and counted in ``LoaderStats``.
A batch leaves a DataLoader worker as one buffer (``transport.py``); evaluation
reads through ``eval_reader.py``.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import numbers
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import braceexpand
import numpy as np
import torch

from dist_train.data.blocks import _SHOWN, BlockReader, BlockTable, check_readable, combine, scan, split_table
from dist_train.data.schema import FIELDS, REQUIRED, finite_rows
from dist_train.data.shards import BadBlock, ShardSet, file_kind
from dist_train.data.transport import REPORTED, ROW, SHAPES, pack_batch, unpack_batch

_STORAGE = {**{name: np.dtype(f.storage) for name, f in FIELDS.items()}, ROW: np.dtype(np.int64)}
_PASS = "__pass__"  # per row: 0 the first read of the row this epoch, > 0 a repeat
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass
class LoaderStats:
    """Cumulative loader counters of one rank (all its workers, all epochs so far)."""

    bad_blocks: int = 0  # blocks that could not be read (missing, cut short, unknown members, garbled)
    unreadable_rows: int = 0  # rows lost with bad blocks
    nonfinite_rows: int = 0  # rows dropped for a NaN or infinite value
    shard_errors: int = 0  # shards whose tar could not be read to the end (at the scan) or failed a read
    blocks_read: int = 0
    samples_read: int = 0
    repeats: int = 0  # rows yielded a second time within an epoch (exact mode: making up for lost rows)
    dropped_tail: int = 0  # exact mode: rows left out of an epoch because they do not fill a global batch

    @property
    def bad_samples(self) -> int:
        """Rows skipped for bad data: unreadable plus non-finite."""
        return self.unreadable_rows + self.nonfinite_rows

    def add(self, other: LoaderStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Local shard files from paths, globs and brace ranges, checked before any reader starts.

    URLs (``pipe:``, ``http://`` ...) are refused: a shard is data, never a command.
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in map(str, items):
        for url in braceexpand.braceexpand(item):
            if _SCHEME.match(url) and not os.path.exists(url):
                raise ValueError(
                    f"shard {url!r} is a URL; dist-train reads local shard files only (no pipe:, http: ...): "
                    "copy the shards to a local or mounted directory"
                )
            if glob.has_magic(url):
                found = sorted(glob.glob(url))
                if not found:
                    raise ValueError(f"shard pattern {url!r} matches no file; check the directory and pattern")
                out.extend(found)
            elif os.path.isfile(url):
                out.append(url)
            elif os.path.exists(url):
                raise ValueError(
                    f"shard {url!r} is {file_kind(os.stat(url).st_mode)}, not a regular file; give .tar files"
                )
            else:
                raise ValueError(f"shard {url!r} does not exist; give existing .tar files, a glob or a brace range")
    if not out:
        raise ValueError("no shard files given")
    return out


def _seed(*parts: int) -> int:
    """One 32-bit seed from (seed, epoch, rank, worker, purpose, ...): same inputs, same stream."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def worker_batches(batches: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` delivers of the first ``batches`` of its rank (DataLoader's round robin)."""
    return len(range(worker, batches, max(1, num_workers)))


# --- what each reader reads ------------------------------------------------------------------------


@dataclass(frozen=True)
class _ReadPlan:
    """One rank's epoch; picklable for DataLoader workers (each derives its own share)."""

    table: BlockTable
    fields: tuple[str, ...]  # what batches carry (ROW included when traced)
    batch_size: int
    rank: int
    world_size: int
    resampled: bool
    seed: int
    epoch: int
    shuffle_blocks: int
    batches_per_epoch: int
    start_batch: int
    weights: tuple[float, ...] | None = None  # resampled mode: probability of drawing from each combined set


_EXACT, _RESAMPLED, _MIXER, _WEIGHTED = 1, 2, 3, 4  # seed purposes


def _block_order(plan: _ReadPlan, *key: int) -> np.ndarray:
    return np.random.default_rng(_seed(plan.seed, plan.epoch, *key)).permutation(len(plan.table.blocks))


def _resampled_passes(plan: _ReadPlan, worker: int) -> Iterator[list[tuple[int, int, int, int]]]:
    """This reader's passes for ever: each a seeded permutation of all blocks as (block, first row, end row, 0).

    With ``weights`` (several shard sets) a pass is as many blocks, each drawn from one set, in the order of that
    set's own permutation (renewed when used up), set s chosen with probability proportional to weights[s] over
    its mean block size: the weights are the sets' shares of the rows drawn.
    """
    sizes = [b.n_rows for b in plan.table.blocks]
    if plan.weights is None:
        for p in itertools.count():
            yield [(int(b), 0, sizes[b], 0) for b in _block_order(plan, plan.rank, worker, _RESAMPLED, p)]
    rng = np.random.default_rng(_seed(plan.seed, plan.epoch, plan.rank, worker, _WEIGHTED))
    members = [np.array([i for i, b in enumerate(plan.table.blocks) if b.part == p]) for p in range(plan.table.parts)]
    queues: list[list[int]] = [[] for _ in members]
    rows_per_block = np.array([np.mean([sizes[b] for b in m]) for m in members])  # sets may differ in block size
    share = np.asarray(plan.weights, np.float64) / rows_per_block
    share /= share.sum()
    while True:
        drawn = []
        for part in rng.choice(len(members), size=len(sizes), p=share):
            if not queues[part]:
                queues[part] = rng.permutation(members[part]).tolist()
            b = queues[part].pop()
            drawn.append((b, 0, sizes[b], 0))
        yield drawn


def _exact_range(plan: _ReadPlan, worker: int, num_workers: int) -> tuple[int, int]:
    """This reader's rows [start, stop) of the epoch's row sequence: whole batches, none shared."""
    per_rank = plan.batches_per_epoch * plan.batch_size
    before = sum(worker_batches(plan.batches_per_epoch, w, num_workers) for w in range(worker))
    start = plan.rank * per_rank + before * plan.batch_size
    return start, start + worker_batches(plan.batches_per_epoch, worker, num_workers) * plan.batch_size


def _exact_segments(plan: _ReadPlan, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
    """(block, first row, end row, pass) covering rows [start, stop) of the epoch's row sequence.

    The sequence is the blocks in the epoch's permuted order, pass after pass (a
    second pass only when an epoch asks for more rows than the split holds).
    """
    total = plan.table.n_rows
    if total == 0 or start >= stop:
        return
    for p in range(start // total, -(-stop // total)):
        order = _block_order(plan, _EXACT, p)
        sizes = np.array([plan.table.blocks[b].n_rows for b in order], dtype=np.int64)
        ends = p * total + np.cumsum(sizes)
        first = int(np.searchsorted(ends, start, side="right"))
        for i in range(first, len(order)):
            lo = int(ends[i] - sizes[i])
            if lo >= stop:
                break
            yield int(order[i]), max(start, lo) - lo, min(stop, int(ends[i])) - lo, p


@dataclass
class _Reader:
    """One reader's counters for one epoch, and how it turns segments into rows."""

    plan: _ReadPlan
    worker: int
    source: BlockReader
    stats: LoaderStats = dataclasses.field(default_factory=LoaderStats)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # block -> problem, since the last good block

    def report(self) -> np.ndarray:
        return np.array([self.worker, *(getattr(self.stats, k) for k in REPORTED)], dtype=np.int64)

    def rows(self, block: int, lo: int, hi: int, pass_no: int, count_losses: bool) -> dict[str, np.ndarray] | None:
        """Finite rows [lo, hi) of a block (storage dtypes, a pass column), or None when none is usable."""
        data_fields = tuple(f for f in self.plan.fields if f != ROW)
        try:
            arrays = self.source.read(block)
        except (BadBlock, OSError) as e:
            if isinstance(e, OSError):
                self.stats.shard_errors += 1
            if count_losses:
                self.stats.bad_blocks += 1
                self.stats.unreadable_rows += hi - lo
            self._failed(block, f"{type(e).__name__}: {e}")
            return None
        self.failed.clear()
        self.stats.blocks_read += 1
        self.stats.samples_read += hi - lo
        part = {f: arrays[f][lo:hi] for f in data_fields}
        if ROW in self.plan.fields:
            first = self.plan.table.blocks[block].first_row
            part[ROW] = np.arange(first + lo, first + hi, dtype=np.int64)
        ok = finite_rows(part)  # one bad row must not poison a step; here, off the training process
        n_bad = len(ok) - int(ok.sum())
        if n_bad:
            if count_losses:
                self.stats.nonfinite_rows += n_bad
            part = {f: a[ok] for f, a in part.items()}
        if not len(part[data_fields[0]]):
            return None
        part[_PASS] = np.full(len(part[data_fields[0]]), pass_no, np.int32)
        return part

    def _failed(self, block: int, problem: str) -> None:
        self.failed[block] = problem
        if len(self.failed) >= len(self.source.table.blocks):  # every block tried without one good one
            named = "; ".join(f"block {b}: {p}" for b, p in list(self.failed.items())[:_SHOWN])
            raise ValueError(
                f"rank {self.plan.rank} worker {self.worker}: no readable block in {len(self.failed)} tried: {named}. "
                "Check or re-create the shard set (`dist-train inspect DIR`)."
            )


def _gather(parts: list[dict], offsets: np.ndarray, rows: np.ndarray, fields) -> tuple[dict, np.ndarray]:
    """Rows (sorted positions in the parts laid end to end), copied once, still in storage dtypes.

    Returns the field arrays and each row's pass number.
    """
    cuts = np.searchsorted(rows, offsets)
    out = {f: np.empty((len(rows), *SHAPES[f]), _STORAGE[f]) for f in fields}
    passes = np.empty(len(rows), np.int32)
    for part, start, a, b in zip(parts, offsets, cuts[:-1], cuts[1:]):
        if a == b:
            continue
        sel = rows[a:b] - start
        for f in fields:
            np.take(part[f], sel, axis=0, out=out[f][a:b], mode="clip")  # clip: no hidden buffer copy
        passes[a:b] = part[_PASS][sel]
    return out, passes


class _Batcher:
    """Shuffles the rows of up to ``width`` buffered parts together and cuts batches; leftovers go first next time."""

    def __init__(self, reader: _Reader, skip: int, rng: np.random.Generator):
        self.reader, self.skip, self.rng = reader, skip, rng
        self.width = max(1, reader.plan.shuffle_blocks)
        self.buffer: list[dict] = []
        self.carry: dict | None = None
        self.emitted = 0  # batches cut so far, skipped ones included

    def add(self, part: dict) -> Iterator:
        self.buffer.append(part)
        if len(self.buffer) >= self.width:
            yield from self.flush()

    def flush(self) -> Iterator:
        if not self.buffer:
            return
        plan, size = self.reader.plan, self.reader.plan.batch_size
        parts = ([self.carry] if self.carry is not None else []) + self.buffer
        offsets = np.cumsum([0] + [len(p[_PASS]) for p in parts])
        kept = 0 if self.carry is None else len(self.carry[_PASS])
        new = int(offsets[-1]) - kept
        order = self.rng.permutation(new) if plan.shuffle_blocks else np.arange(new)
        index = np.concatenate([np.arange(kept), kept + order])
        n_batches = len(index) // size
        for i in range(n_batches):
            rows = np.sort(index[i * size : (i + 1) * size])  # within a batch, block order saves a copy
            self.emitted += 1
            if self.emitted <= self.skip:  # a resumed epoch: consumed (and counted) before the restart
                continue
            batch, passes = _gather(parts, offsets, rows, plan.fields)
            self.reader.stats.repeats += int(np.count_nonzero(passes))
            yield pack_batch(batch, self.reader.report(), plan.fields)
        rest, passes = _gather(parts, offsets, np.sort(index[n_batches * size :]), plan.fields)
        self.carry, self.buffer = {**rest, _PASS: passes}, []


def _until(batches: Iterator, batcher: _Batcher, owed: int) -> Iterator:
    """Pass batches on until the reader has cut ``owed`` (skipped ones included)."""
    for packed in batches:
        yield packed
        if batcher.emitted >= owed:
            return


def _reader_batches(plan: _ReadPlan) -> Iterator[tuple[torch.Tensor, int]]:
    """One reader's packed batches for one epoch: its share of the rank's batches (DataLoader deals round robin)."""
    worker, num_workers = _worker_info()
    reader = _Reader(plan, worker, BlockReader(plan.table, tuple(f for f in plan.fields if f != ROW)))
    batcher = _Batcher(
        reader,
        skip=worker_batches(plan.start_batch, worker, num_workers),
        rng=np.random.default_rng(_seed(plan.seed, plan.epoch, plan.rank, worker, _MIXER)),
    )
    owed = worker_batches(plan.batches_per_epoch, worker, num_workers)  # the DataLoader takes them round robin
    if owed <= batcher.skip:  # a resume past all of this reader's batches
        return
    try:
        if plan.resampled:
            for segments in _resampled_passes(plan, worker):
                for block, lo, hi, p in segments:
                    part = reader.rows(block, lo, hi, p, count_losses=batcher.emitted >= batcher.skip)
                    if part is not None:
                        yield from _until(batcher.add(part), batcher, owed)
                        if batcher.emitted >= owed:
                            return
                yield from _until(batcher.flush(), batcher, owed)  # a pass's rows leave before the next pass's
                if batcher.emitted >= owed:
                    return
        start, stop = _exact_range(plan, worker, num_workers)
        segments = list(_exact_segments(plan, start, stop))
        for again in itertools.count():  # again > 0: re-reading its range to make up for lost rows
            if again and not segments:
                break
            got_any = False
            for block, lo, hi, p in segments:
                first_read = again == 0 and p == 0 and batcher.emitted >= batcher.skip
                part = reader.rows(block, lo, hi, p + again, count_losses=first_read)
                if part is None:
                    continue
                got_any = True
                yield from _until(batcher.add(part), batcher, owed)
                if batcher.emitted >= owed:
                    return
            yield from _until(batcher.flush(), batcher, owed)
            if batcher.emitted >= owed:
                return
            if not got_any:
                raise ValueError(
                    f"rank {plan.rank} worker {worker}: none of the {len(segments)} blocks of its share of the epoch "
                    "has a usable row; check or re-create the shard set (`dist-train inspect DIR`)"
                )
    finally:
        reader.source.close()


class _Epoch(torch.utils.data.IterableDataset):
    def __init__(self, plan: _ReadPlan):
        self.plan = plan

    def __iter__(self):
        return _reader_batches(self.plan)


def check_fields(fields: Sequence[str], shard_set: ShardSet | None) -> tuple[str, ...]:
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


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_rank(rank: int, world_size: int) -> None:
    check_positive(world_size=world_size)
    if not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) for world_size {world_size}, got {rank!r}")


def _shard_sets(source) -> list[ShardSet]:
    """The shard sets of a source: one, several (read together), or none (loose shard files)."""
    if isinstance(source, ShardSet):
        return [source]
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, ShardSet) for s in source):
        return list(source)
    return []


class TrainStream:
    """Training batches: exactly ``batches_per_epoch`` per epoch on every rank (see the module docstring).

    ``source``: a ShardSet (with ``split``), several read as one (identities kept
    apart; ``weights``: each set's share of the rows drawn, resampled mode), or
    local shard files (paths, globs, brace ranges). ``trace_rows`` adds a ``row``
    column: each row's number in the (combined) split, for checking what a run read.
    ``transient``: the caller drops each batch before taking the next few (as the trainer does), so batches
    from workers may stay views of the workers' reused buffers instead of copies.
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
        trace_rows: bool = False,
        pin_memory: bool = False,
        weights: Sequence[float] | None = None,
        transient: bool = False,
    ):
        check_positive(batch_size=batch_size, batches_per_epoch=batches_per_epoch)
        check_rank(rank, world_size)
        for name, value in (("shuffle_blocks", shuffle_blocks), ("num_workers", num_workers)):
            if not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be zero or a positive integer, got {value!r}")
        sets = _shard_sets(source)
        for shard_set in sets or [None]:
            fields = check_fields(fields, shard_set)
        table = combine([split_table(s, split) for s in sets]) if sets else scan(expand_urls(source))
        if weights is not None:
            if len(weights) != table.parts or min(weights) <= 0 or not resampled:
                raise ValueError(
                    f"weights {list(weights)}: give one positive weight per shard set ({table.parts}), "
                    "with resampled=True (exact epochs read every row once)"
                )
            weights = tuple(float(w) for w in weights)
        check_readable(table, f"split {split!r} of {[str(s.root) for s in sets]}" if sets else "the shard files")
        self.batches_per_epoch = batches_per_epoch
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.transient = transient
        self.epoch = 0
        self.start_batch = 0
        self._plan = _ReadPlan(
            table=table,
            fields=fields + ((ROW,) if trace_rows else ()),
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            resampled=resampled,
            seed=seed,
            epoch=0,
            shuffle_blocks=shuffle_blocks,
            batches_per_epoch=batches_per_epoch,
            start_batch=0,
            weights=weights,
        )
        # shards the scan could not read to the end: counted once, by rank 0, for the whole run
        self._done = LoaderStats(shard_errors=len(table.shard_errors) if rank == 0 else 0)
        self._live: dict[int, list[int]] = {}  # latest report per worker in the running epoch

    @property
    def table(self) -> BlockTable:
        return self._plan.table

    @property
    def rows_per_epoch(self) -> int:
        """Rows every rank together takes in one epoch."""
        return self.batches_per_epoch * self._plan.batch_size * self._plan.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to read next; ``start_batch`` batches of it were consumed already (a resume)."""
        if not 0 <= start_batch < self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}), got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    @property
    def stats(self) -> LoaderStats:
        """Counters so far, including the batches of the running epoch (a snapshot)."""
        total = dataclasses.replace(self._done)
        total.add(self._live_stats())
        return total

    def _live_stats(self) -> LoaderStats:
        live = LoaderStats()
        for report in self._live.values():
            for name, value in zip(REPORTED, report):
                setattr(live, name, getattr(live, name) + value)
        return live

    def _close_epoch(self, completed: bool) -> None:
        self._done.add(self._live_stats())
        self._live = {}
        if completed and not self._plan.resampled and self._plan.rank == 0:
            self._done.dropped_tail += max(0, self.table.n_rows - self.rows_per_epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        plan = dataclasses.replace(self._plan, epoch=self.epoch, start_batch=self.start_batch)
        dataset = _Epoch(plan)
        if self.num_workers == 0:
            batches = iter(dataset)
        else:
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory
            )
            batches = iter(loader)
        closed = False
        try:
            # a worker's buffer is reused a few batches later (transport._Ring): take a copy unless pinning made one or the
            # consumer lets go of each batch before it takes the next few (the trainer)
            copy = self.num_workers > 0 and not self.pin_memory and not self.transient
            for left in range(len(self) - 1, -1, -1):
                buf, n = next(batches)
                batch, report = unpack_batch((buf.clone() if copy else buf, n), plan.fields)
                self._live[report[0]] = report[1:]
                if left == 0:  # counted before the last batch leaves: a loop may stop right after it
                    self._close_epoch(completed=True)
                    closed = True
                yield batch
        finally:
            if not closed:
                self._close_epoch(completed=False)
            self.start_batch = 0
            close = getattr(batches, "close", None) or getattr(batches, "_shutdown_workers", None)
            if close is not None:
                close()
