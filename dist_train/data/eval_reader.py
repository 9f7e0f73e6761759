"""Evaluation batches: a split's rows shared between ranks by arithmetic, the same batch count on every rank.

Equal counts keep every rank in step through the collectives after each batch;
the rows marked valid cover the readable, finite rows of the split exactly once,
so metrics gathered over ranks are over the split itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dist_train.data.blocks import BlockReader, BlockTable, split_table
from dist_train.data.schema import FIELDS, REQUIRED, finite_rows
from dist_train.data.shards import BadBlock, ShardSet, widen
from dist_train.data.stream import LoaderStats, check_fields, check_positive, check_rank


def _rank_rows(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous rows [lo, hi) of a rank; rank sizes differ by at most one row."""
    return rank * total // world_size, (rank + 1) * total // world_size


def eval_batch_count(shard_set: ShardSet, split: str, batch_size: int, world_size: int) -> int:
    """Batches every rank yields from ``eval_batches`` (the same number on all ranks)."""
    total = shard_set.n_samples(split)
    most = -(-total // world_size)
    return -(-most // batch_size)


def _eval_parts(table: BlockTable, lo: int, hi: int, fields, stats: LoaderStats):
    """(arrays or None, valid mask) for this rank's rows [lo, hi), in order; bad blocks and non-finite rows invalid."""
    reader = BlockReader(table, fields)
    try:
        for index, block in enumerate(table.blocks):
            a, b = max(lo, block.first_row), min(hi, block.first_row + block.n_rows)
            if a >= b:
                continue
            try:
                arrays = reader.read(index)
            except (BadBlock, OSError) as e:
                stats.bad_blocks += 1
                stats.unreadable_rows += b - a
                stats.shard_errors += isinstance(e, OSError)
                yield None, np.zeros(b - a, bool)
                continue
            stats.blocks_read += 1
            stats.samples_read += b - a
            part = {f: arrays[f][a - block.first_row : b - block.first_row] for f in fields}
            ok = finite_rows(part)
            stats.nonfinite_rows += len(ok) - int(ok.sum())
            yield part, ok
    finally:
        reader.close()


def _padded_batch(parts: list, fields, template: dict | None) -> tuple[dict, torch.Tensor]:
    """One batch from (arrays|None, valid) parts; invalid rows repeat valid rows so inputs stay finite."""
    valid = np.concatenate([ok for _, ok in parts])
    size = len(valid)
    real = [(arrays, ok) for arrays, ok in parts if arrays is not None and ok.any()]
    if real:
        source = {f: np.concatenate([arrays[f][ok] for arrays, ok in real]) for f in fields}
        n_real = int(valid.sum())
        index = np.empty(size, np.int64)
        index[valid] = np.arange(n_real)
        index[~valid] = np.arange(size - n_real) % n_real
    elif template is not None:  # nothing valid in this batch: repeat a row of the last valid batch
        source, index = template, np.zeros(size, np.int64)
    else:  # no valid row yet (fewer samples than ranks, or bad data first): zeros are finite
        source = {f: np.zeros((1, *FIELDS[f].shape), FIELDS[f].storage) for f in fields}
        index = np.zeros(size, np.int64)
    batch = {f: torch.from_numpy(widen(f, np.ascontiguousarray(source[f][index]))) for f in fields}
    return batch, torch.from_numpy(valid)


def _eval_iter(parts_iter, n_batches: int, batch_size: int, fields):
    parts: list = []
    have, done = 0, 0
    template = None
    pad = [(None, np.zeros(n_batches * batch_size, bool))]  # padding up to the common batch count
    for arrays, ok in itertools.chain(parts_iter, pad):
        while len(ok) and done < n_batches:
            take = min(len(ok), batch_size - have)
            parts.append(((None if arrays is None else {f: v[:take] for f, v in arrays.items()}), ok[:take]))
            if arrays is not None:
                arrays = {f: v[take:] for f, v in arrays.items()}
            ok = ok[take:]
            have += take
            if have == batch_size:
                batch, valid = _padded_batch(parts, fields, template)
                if valid.any():
                    template = {f: batch[f].numpy()[:1] for f in fields}
                yield batch, valid
                parts, have, done = [], 0, done + 1


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
    True are, over all ranks, each readable finite sample of the split exactly
    once; bad blocks and rows with a non-finite value become invalid rows
    (counted in ``stats``) so the counts stay equal and no rank waits for another.
    """
    check_positive(batch_size=batch_size)
    check_rank(rank, world_size)
    fields = check_fields(fields, shard_set)
    table = split_table(shard_set, split)
    lo, hi = _rank_rows(table.n_rows, rank, world_size)
    n_batches = eval_batch_count(shard_set, split, batch_size, world_size)
    return _eval_iter(_eval_parts(table, lo, hi, fields, stats or LoaderStats()), n_batches, batch_size, fields)
