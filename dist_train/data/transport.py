"""How a batch crosses from a DataLoader worker to the trainer: one flat buffer, reused in shared memory.

torch hands each tensor between processes through its own socket and file
descriptor, in a fresh shared-memory segment; one buffer per batch (fields plus
the worker's counters), taken round robin from a few kept in shared memory, cut
the loader's overhead (BENCHMARKS.md §2).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from dist_train.data.schema import FIELDS
from dist_train.data.shards import compute_dtype, widen

ROW = "row"  # pseudo-field: a row's number in the split (index order), for tracing what a run read
SHAPES = {**{name: f.shape for name, f in FIELDS.items()}, ROW: ()}
_COMPUTE = {**{name: np.dtype(compute_dtype(name)) for name in FIELDS}, ROW: np.dtype(np.int64)}
_ALIGN = 64  # byte alignment of each field inside a packed batch
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}  # compute_dtype's

# the worker's counters (LoaderStats fields) that travel with each batch, after the worker's id and its cursor
REPORTED = (
    "bad_blocks",
    "unreadable_rows",
    "nonfinite_rows",
    "shard_errors",
    "blocks_read",
    "samples_read",
    "repeats",
)
_REPORT_LEN = 2 + len(REPORTED)  # worker id, cursor (stream._Batcher), then the counters


@functools.lru_cache(maxsize=64)
def _batch_layout(fields: tuple[str, ...], rows: int) -> tuple[list[tuple], int]:
    """Where each part of a packed batch lies, (name, dtype, shape, byte offset, bytes), and the total bytes.

    Part "" is the worker's report (``_Reader.report`` in stream.py); the fields follow in compute dtypes.
    """
    parts = [("", np.dtype(np.int64), (_REPORT_LEN,))]
    parts += [(f, _COMPUTE[f], (rows, *SHAPES[f])) for f in fields]
    out, offset = [], 0
    for name, dtype, shape in parts:
        size = int(np.prod(shape)) * dtype.itemsize
        out.append((name, dtype, shape, offset, size))
        offset += -(-size // _ALIGN) * _ALIGN
    return out, offset


_RING_SLOTS = 8  # > the batches a worker may have in flight (the DataLoader asks 2 ahead) + those the trainer holds


class _Ring:
    """Batch buffers in shared memory that one DataLoader worker reuses round robin.

    torch puts every tensor a worker returns into a fresh shared-memory segment (creating and faulting in its
    pages: most of a worker's time per batch, BENCHMARKS.md §2); a tensor already in shared memory goes by
    handle, and the receiving process maps each segment once (torch caches it). A slot is written again only
    after the DataLoader has asked for _RING_SLOTS more batches; by then the receiving side has copied it out
    (pinning copies it anyway; otherwise `TrainStream` copies: a memcpy, far cheaper than a new segment).
    """

    def __init__(self):
        self.slots: dict[int, torch.Tensor] = {}
        self.turn = 0

    def buffer(self, nbytes: int) -> torch.Tensor:
        slot, self.turn = self.turn % _RING_SLOTS, self.turn + 1
        buf = self.slots.get(slot)
        if buf is None or buf.numel() != nbytes:
            buf = self.slots[slot] = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        return buf


_ring = _Ring()  # per process: each DataLoader worker has its own (workers are fresh processes per epoch)


def pack_batch(rows: dict[str, np.ndarray], report: np.ndarray, fields: tuple[str, ...]) -> tuple[torch.Tensor, int]:
    """A batch in compute dtypes plus the worker's counters, in one uint8 tensor (one hand-off between processes)."""
    n = len(rows[fields[0]])
    layout, nbytes = _batch_layout(fields, n)
    in_worker = torch.utils.data.get_worker_info() is not None
    packed = _ring.buffer(nbytes) if in_worker else torch.empty(nbytes, dtype=torch.uint8)
    buf = packed.numpy()
    for name, dtype, shape, offset, size in layout:
        view = buf[offset : offset + size].view(dtype).reshape(shape)
        if name:
            widen(name, rows[name], out=view)
        else:
            view[:] = report
    return packed, n


def unpack_batch(
    packed: tuple[torch.Tensor, int], fields: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Views into the packed buffer (no copy): the batch and the worker's counters."""
    buf, n = packed
    layout, _ = _batch_layout(fields, int(n))
    views = {
        name: buf[offset : offset + size].view(_TORCH_DTYPES[dtype]).view(shape)
        for name, dtype, shape, offset, size in layout
    }
    report = views.pop("")
    return views, report.tolist()
