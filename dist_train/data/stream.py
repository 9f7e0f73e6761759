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
blocks are shuffled together before batches are cut, in an order that depends on
(seed, epoch, geometry) only; each batch reports its reader's cursor in that
order. A resume under another geometry (exact mode) passes the layouts that read
the epoch so far (``Layout``: geometry and cursors): ``continue_sequence``
recomputes what they consumed, and the new readers are dealt the rest. Bad blocks
and rows with a non-finite value are skipped and counted in ``LoaderStats``.
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
import signal
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
_SLOT = "__slot__"  # per row of a part: its place among the rows the part was asked for
_KEY = "__key__"  # per carried row: its place in the reader's order
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


# Signals a DataLoader worker ignores: a job's SIGTERM (scancel, preemption, torchrun's shutdown) reaches every
# process of the job, and a worker that died of it would crash the trainer before its stop checkpoint. The trainer
# decides (preemption.py) and ends its workers itself.
_WORKER_IGNORES = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_KILL_WAIT_S = 5  # for a killed worker to be gone (one in uninterruptible I/O goes when the I/O ends)


def _worker_ignores_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore the job's signals, then let through those that came since the fork."""
    for sig in _WORKER_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_IGNORES)


def _start_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)`` with the job's signals held while the workers fork: none dies of one before it ignores it.

    A signal that arrives meanwhile reaches this process when the workers are up.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_IGNORES)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _end_workers(batches) -> None:
    """Shut the DataLoader's workers down; kill any that did not end (one blocked in a read ignores SIGTERM)."""
    close = getattr(batches, "close", None) or getattr(batches, "_shutdown_workers", None)
    if close is not None:
        close()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(_KILL_WAIT_S)


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
    sequence: np.ndarray | None = None  # exact mode, a layout continuing an epoch: this rank's share of positions


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


def _reader_positions(plan: _ReadPlan, worker: int, num_workers: int) -> np.ndarray:
    """This reader's positions of the epoch's row sequence (increasing): its range of the layout's sequence."""
    start, stop = _exact_range(plan, worker, num_workers)
    if plan.sequence is None:
        return np.arange(start, stop, dtype=np.int64)
    first = plan.rank * plan.batches_per_epoch * plan.batch_size  # plan.sequence holds this rank's share
    return plan.sequence[start - first : stop - first]


def _slots(sel: slice | np.ndarray) -> int:
    return sel.stop - sel.start if isinstance(sel, slice) else len(sel)


def _parts(plan: _ReadPlan, positions: np.ndarray) -> list[tuple[int, slice | np.ndarray, int]]:
    """(block, its rows, pass) covering ``positions`` (increasing) of the epoch's row sequence, in order.

    The sequence is the blocks in the epoch's permuted order, pass after pass (a
    second pass only when an epoch asks for more rows than the split holds).
    """
    total = plan.table.n_rows
    out: list[tuple[int, slice | np.ndarray, int]] = []
    if total == 0 or not len(positions):
        return out
    passes = positions // total
    for p in np.unique(passes):
        pos = positions[passes == p] - p * total
        order = _block_order(plan, _EXACT, int(p))
        sizes = np.array([plan.table.blocks[b].n_rows for b in order], dtype=np.int64)
        ends = np.cumsum(sizes)
        at = np.searchsorted(ends, pos, side="right")
        cuts = np.flatnonzero(np.diff(at)) + 1
        for rows, i in zip(np.split(pos, cuts), at[np.r_[0, cuts]]):
            rows = rows - (ends[i] - sizes[i])
            whole = rows[-1] - rows[0] + 1 == len(rows)
            out.append((int(order[i]), slice(int(rows[0]), int(rows[-1]) + 1) if whole else rows, int(p)))
    return out


def _window_place(rng: np.random.Generator, n: int, shuffle: int) -> np.ndarray:
    """Each of a window's ``n`` slots' place in the reader's order (shuffled together unless ``shuffle`` is 0)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    place = np.empty(n, np.int64)
    place[rng.permutation(n)] = np.arange(n)
    return place


def _reader_order(plan: _ReadPlan, worker: int, num_workers: int) -> np.ndarray:
    """The positions of this reader's range in the order its batches take them on the first read (`_Batcher`).

    A pure function of (seed, epoch, geometry): rows it could not use keep their places, so the first
    ``cursor`` entries are exactly what the reader had consumed when its batch reported ``cursor``.
    """
    positions = _reader_positions(plan, worker, num_workers)
    parts = _parts(plan, positions)
    rng, width = _mixer(plan, worker), max(1, plan.shuffle_blocks)
    out, first = np.empty(len(positions), np.int64), 0
    for w in range(0, len(parts), width):
        n = sum(_slots(sel) for _, sel, _ in parts[w : w + width])
        out[first + _window_place(rng, n, plan.shuffle_blocks)] = positions[first : first + n]
        first += n
    return out


@dataclass
class _Reader:
    """One reader's counters for one epoch, and how it turns segments into rows."""

    plan: _ReadPlan
    worker: int
    source: BlockReader
    stats: LoaderStats = dataclasses.field(default_factory=LoaderStats)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # block -> problem, since the last good block

    def report(self, cursor: int) -> np.ndarray:
        return np.array([self.worker, cursor, *(getattr(self.stats, k) for k in REPORTED)], dtype=np.int64)

    def rows(self, block: int, sel: slice | np.ndarray, pass_no: int, count_losses: bool) -> dict[str, np.ndarray]:
        """The finite rows ``sel`` of a block (storage dtypes), with each one's slot in ``sel`` and its pass.

        A block that cannot be read gives a part without rows: its slots still take their places in the
        reader's order (``_reader_order``), so what a reader consumed never depends on what it could read.
        """
        data_fields = tuple(f for f in self.plan.fields if f != ROW)
        n_slots = _slots(sel)
        try:
            arrays = self.source.read(block)
        except (BadBlock, OSError) as e:
            if isinstance(e, OSError):
                self.stats.shard_errors += 1
            if count_losses:
                self.stats.bad_blocks += 1
                self.stats.unreadable_rows += n_slots
            self._failed(block, f"{type(e).__name__}: {e}")
            part = {f: np.empty((0, *SHAPES[f]), _STORAGE[f]) for f in self.plan.fields}
            return {**part, _SLOT: np.empty(0, np.int64), _PASS: np.empty(0, np.int32)}
        self.failed.clear()
        self.stats.blocks_read += 1
        self.stats.samples_read += n_slots
        part = {f: arrays[f][sel] for f in data_fields}
        if ROW in self.plan.fields:
            part[ROW] = self.plan.table.blocks[block].first_row + np.arange(self.plan.table.blocks[block].n_rows)[sel]
        part[_SLOT] = np.arange(n_slots, dtype=np.int64)
        ok = finite_rows({f: part[f] for f in data_fields})  # one bad row must not poison a step; off the trainer
        n_bad = len(ok) - int(ok.sum())
        if n_bad:
            if count_losses:
                self.stats.nonfinite_rows += n_bad
            part = {f: a[ok] for f, a in part.items()}
        part[_PASS] = np.full(len(part[_SLOT]), pass_no, np.int32)
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
    """Cuts batches from the reader's order and the usable rows in it; rows that do not fill a batch go first next time.

    The order: the slots of up to ``width`` parts shuffled together (`_window_place`), window after window,
    whether their rows could be read or not. Each batch reports its cursor, the slots of the order it has
    passed, so the main process knows exactly what a reader consumed (`continue_sequence`).
    """

    def __init__(self, reader: _Reader, skip: int, rng: np.random.Generator):
        self.reader, self.skip, self.rng = reader, skip, rng
        self.width = max(1, reader.plan.shuffle_blocks)
        self.buffer: list[tuple[dict, int]] = []  # (part, its slots)
        self.carry: dict | None = None
        self.emitted = 0  # batches cut so far, skipped ones included
        self.slots = 0  # slots of the order in the windows flushed so far

    def add(self, part: dict, n_slots: int) -> Iterator:
        self.buffer.append((part, n_slots))
        if len(self.buffer) >= self.width:
            yield from self.flush()

    def flush(self) -> Iterator:
        if not self.buffer:
            return
        plan, size = self.reader.plan, self.reader.plan.batch_size
        sizes = [n for _, n in self.buffer]
        place = _window_place(self.rng, sum(sizes), plan.shuffle_blocks)
        new = [p for p, _ in self.buffer]
        firsts = np.cumsum([0, *sizes[:-1]])
        keys = np.concatenate([self.slots + place[f + p[_SLOT]] for p, f in zip(new, firsts)])  # place in the order
        self.slots += sum(sizes)
        carry = [self.carry] if self.carry is not None else []
        parts = carry + new
        offsets = np.cumsum([0] + [len(p[_PASS]) for p in parts])
        kept = len(carry[0][_PASS]) if carry else 0
        index = np.concatenate([np.arange(kept), kept + np.argsort(keys, kind="stable")])
        keys = np.concatenate([carry[0][_KEY] if carry else np.empty(0, np.int64), keys])
        n_batches = len(index) // size
        for i in range(n_batches):
            taken = index[i * size : (i + 1) * size]
            self.emitted += 1
            if self.emitted <= self.skip:  # a resumed epoch: consumed (and counted) before the restart
                continue
            batch, passes = _gather(parts, offsets, np.sort(taken), plan.fields)  # block order saves a copy
            self.reader.stats.repeats += int(np.count_nonzero(passes))
            yield pack_batch(batch, self.reader.report(int(keys[taken].max()) + 1), plan.fields)
        left = np.sort(index[n_batches * size :])
        rest, passes = _gather(parts, offsets, left, plan.fields)
        back = np.argsort(keys[left], kind="stable")  # the carry keeps the order's order
        self.carry = {**{f: a[back] for f, a in rest.items()}, _PASS: passes[back], _KEY: keys[left][back]}
        self.buffer = []


def _until(batches: Iterator, batcher: _Batcher, owed: int) -> Iterator:
    """Pass batches on until the reader has cut ``owed`` (skipped ones included)."""
    for packed in batches:
        yield packed
        if batcher.emitted >= owed:
            return


def _mixer(plan: _ReadPlan, worker: int) -> np.random.Generator:
    return np.random.default_rng(_seed(plan.seed, plan.epoch, plan.rank, worker, _MIXER))


def _reader_batches(plan: _ReadPlan) -> Iterator[tuple[torch.Tensor, int]]:
    """One reader's packed batches for one epoch: its share of the rank's batches (DataLoader deals round robin)."""
    worker, num_workers = _worker_info()
    reader = _Reader(plan, worker, BlockReader(plan.table, tuple(f for f in plan.fields if f != ROW)))
    batcher = _Batcher(reader, skip=worker_batches(plan.start_batch, worker, num_workers), rng=_mixer(plan, worker))
    owed = worker_batches(plan.batches_per_epoch, worker, num_workers)  # the DataLoader takes them round robin
    if owed <= batcher.skip:  # a resume past all of this reader's batches
        return
    try:
        if plan.resampled:
            for segments in _resampled_passes(plan, worker):
                for block, lo, hi, p in segments:
                    part = reader.rows(block, slice(lo, hi), p, count_losses=batcher.emitted >= batcher.skip)
                    yield from _until(batcher.add(part, hi - lo), batcher, owed)
                    if batcher.emitted >= owed:
                        return
                yield from _until(batcher.flush(), batcher, owed)  # a pass's rows leave before the next pass's
                if batcher.emitted >= owed:
                    return
        segments = _parts(plan, _reader_positions(plan, worker, num_workers))
        for again in itertools.count():  # again > 0: re-reading its range to make up for lost rows
            if again and not segments:
                break
            got_any = False
            for block, sel, p in segments:
                first_read = again == 0 and p == 0 and batcher.emitted >= batcher.skip
                part = reader.rows(block, sel, p + again, count_losses=first_read)
                got_any = got_any or len(part[_PASS]) > 0
                yield from _until(batcher.add(part, _slots(sel)), batcher, owed)
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


@dataclass(frozen=True)
class Layout:
    """The readers of one geometry that read part of an epoch: its batches [first, stop) of each rank.

    ``cursors``, one per reader (rank-major): how much of its order (`_reader_order`) it had consumed.
    Rows it consumed are known from these numbers alone, so a resume under another geometry continues
    the epoch without reading any of them again (`continue_sequence`).
    """

    epoch: int
    world_size: int
    batch_size: int
    readers: int  # per rank: num_workers, at least 1 (0 workers read as one)
    batches_per_epoch: int  # per rank, a whole epoch at this geometry
    first: int
    stop: int
    cursors: tuple[int, ...]
    seed: int
    shuffle_blocks: int

    @property
    def rows(self) -> int:
        """Rows this layout trained on."""
        return (self.stop - self.first) * self.batch_size * self.world_size

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "cursors": list(self.cursors)}

    @classmethod
    def of(cls, raw: dict) -> Layout:
        return cls(**{**raw, "cursors": tuple(int(c) for c in raw["cursors"])})


def _take(head: np.ndarray, tail: int, n: int) -> np.ndarray:
    """The first ``n`` of the sequence ``head`` then ``tail``, ``tail + 1``, ..."""
    return np.concatenate([head[:n], np.arange(tail, tail + max(0, n - len(head)), dtype=np.int64)])


def layout_orders(table: BlockTable, lay: Layout, dealt: np.ndarray, fields=REQUIRED) -> list[np.ndarray]:
    """Each reader's order (`_reader_order`, rank-major) in a layout that was dealt the positions ``dealt``."""
    batches = lay.batches_per_epoch - lay.first
    per_rank = batches * lay.batch_size
    orders = []
    for rank in range(lay.world_size):
        plan = _ReadPlan(
            table, tuple(fields), lay.batch_size, rank, lay.world_size, False, lay.seed, lay.epoch,
            lay.shuffle_blocks, batches, 0, sequence=dealt[rank * per_rank : (rank + 1) * per_rank],
        )  # fmt: skip
        orders += [_reader_order(plan, worker, lay.readers) for worker in range(lay.readers)]
    return orders


def continue_sequence(table: BlockTable, layouts: Sequence[Layout], n: int, fields=REQUIRED) -> np.ndarray:
    """The first ``n`` positions of an epoch's row sequence that no layout of ``layouts`` consumed, in order.

    Each layout was dealt the positions its predecessors left; a pure function of (seed, epoch,
    geometries, cursors), so every rank computes it alike without reading a row.
    """
    head, tail = np.empty(0, np.int64), 0  # the sequence left: head, then tail, tail + 1, ...
    for lay in layouts:
        if len(lay.cursors) != lay.world_size * lay.readers:
            raise ValueError(f"layout {lay}: give one cursor per reader ({lay.world_size * lay.readers})")
        dealt = _take(head, tail, (lay.batches_per_epoch - lay.first) * lay.batch_size * lay.world_size)
        orders = layout_orders(table, lay, dealt, fields)
        consumed = np.concatenate([np.empty(0, np.int64)] + [o[:c] for o, c in zip(orders, lay.cursors)])
        left = np.setdiff1d(dealt, consumed, assume_unique=True)
        head, tail = np.concatenate([left, head[len(dealt) :]]), max(tail, tail + len(dealt) - len(head))
    return _take(head, tail, n)


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
        self.first = 0  # the epoch batch the current layout began at (0 unless a resume changed the geometry)
        self.earlier: tuple[Layout, ...] = ()  # layouts that read part of this epoch before this one
        self._cursors: dict[int, int] = {}  # per worker of this rank: the cursor its last consumed batch reported
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

    @property
    def readers(self) -> int:
        """Readers per rank: DataLoader workers (0 workers read as one)."""
        return max(1, self.num_workers)

    def set_epoch(
        self,
        epoch: int,
        start_batch: int = 0,
        *,
        earlier: Sequence[Layout] = (),
        first: int = 0,
        cursors: Sequence[int] = (),
    ) -> None:
        """The epoch to read next; ``start_batch`` batches of it were consumed already (a resume).

        ``earlier``: layouts of other geometries that read part of this epoch (exact mode); this layout
        deals the rows they left from its batch ``first`` on. ``cursors``: this rank's readers' cursors
        when ``start_batch`` > ``first`` (a resume at this layout).
        """
        if not 0 <= first <= start_batch < self.batches_per_epoch:
            raise ValueError(f"need 0 <= first {first} <= start_batch {start_batch} < {self.batches_per_epoch}")
        if earlier and self._plan.resampled:
            raise ValueError("earlier layouts: resampled readers have no exact epoch to continue")
        self.epoch, self.start_batch, self.first = int(epoch), int(start_batch), int(first)
        self.earlier = tuple(earlier)
        self._cursors = dict(enumerate(int(c) for c in cursors))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def cursors(self) -> list[int]:
        """This rank's readers' cursors in the running epoch's layout (what `Layout.cursors` records)."""
        return [self._cursors.get(w, 0) for w in range(self.readers)]

    def layouts(self, cursors: Sequence[int], stop: int) -> list[Layout]:
        """What read the running epoch up to its batch ``stop``: the earlier layouts, then this one with
        ``cursors`` (every rank's, rank-major); none at an epoch's end or in resampled mode."""
        if self._plan.resampled or stop in (0, self.batches_per_epoch):
            return []
        plan = self._plan
        now = Layout(
            self.epoch, plan.world_size, plan.batch_size, self.readers, self.batches_per_epoch, self.first, stop,
            tuple(int(c) for c in cursors), plan.seed, plan.shuffle_blocks,
        )  # fmt: skip
        return [*self.earlier, now]

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
            read = sum(lay.rows for lay in self.earlier) + (self.batches_per_epoch - self.first) * self.rows_per_batch
            self._done.dropped_tail += max(0, self.table.n_rows - read)

    def count_unread(self, layouts: Sequence[Layout]) -> None:
        """An epoch a resume ended early (its rows left did not fill a step): what no layout read is counted
        with the dropped tails."""
        if self._plan.rank == 0:
            self._done.dropped_tail += max(0, self.table.n_rows - sum(lay.rows for lay in layouts))

    @property
    def rows_per_batch(self) -> int:
        """Rows every rank together takes in one batch."""
        return self._plan.batch_size * self._plan.world_size

    def _epoch_plan(self) -> _ReadPlan:
        plan = dataclasses.replace(
            self._plan,
            epoch=self.epoch,
            start_batch=self.start_batch - self.first,
            batches_per_epoch=self.batches_per_epoch - self.first,
        )
        if not self.earlier:
            return plan
        per_rank = plan.batches_per_epoch * plan.batch_size
        dealt = continue_sequence(self.table, self.earlier, per_rank * (plan.rank + 1), plan.fields)
        return dataclasses.replace(plan, sequence=dealt[-per_rank:])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        plan = self._epoch_plan()
        dataset = _Epoch(plan)
        if self.num_workers == 0:
            batches = iter(dataset)
        else:
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                worker_init_fn=_worker_ignores_signals,
            )
            batches = _start_workers(loader)
        closed = False
        try:
            # a worker's buffer is reused a few batches later (transport._Ring): take a copy unless pinning made one or the
            # consumer lets go of each batch before it takes the next few (the trainer)
            copy = self.num_workers > 0 and not self.pin_memory and not self.transient
            for left in range(len(self) - 1, -1, -1):
                buf, n = next(batches)
                batch, report = unpack_batch((buf.clone() if copy else buf, n), plan.fields)
                worker, self._cursors[report[0]] = report[0], report[1]
                self._live[worker] = report[2:]
                if left == 0:  # counted before the last batch leaves: a loop may stop right after it
                    self._close_epoch(completed=True)
                    closed = True
                yield batch
        finally:
            if not closed:
                self._close_epoch(completed=False)
            self.start_batch = self.first = 0
            self.earlier = ()
            _end_workers(batches)
