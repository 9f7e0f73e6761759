"""Random access to the blocks of a split: a header scan, then reads straight to the members' bytes.

A shard is a WebDataset tar whose samples are blocks (``shards.py``): member
``bNNNNNN.<field>.npy`` holds one field for up to ``block_size`` rows. Scanning
the tar headers once (tens of microseconds a member, no data read) tells where
every block's members lie, so a reader can take blocks in any order and read
only the fields it needs. That is what lets the training stream draw blocks
uniformly from the whole split (every row equally likely, whatever the shard
sizes) and split an epoch's rows exactly between ranks and workers.

Shards are opened as local regular files by their path (``open_regular``: a FIFO
or device is refused, never waited on); nothing here interprets a URL
or runs a command. Members decode as ``.npy`` without pickle; a block with an
unknown member, a missing field, or a header with the wrong shape or dtype is
bad: reading it raises ``BadBlock`` and the caller counts it. A shard whose
``index.json`` entry disagrees with what its whole tar holds is refused
(``ShardSetError``): a lying index, not damage.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from dist_train.data.schema import FIELDS, REQUIRED, dtype_problem
from dist_train.data.shards import (
    BadBlock,
    ShardSet,
    ShardSetError,
    _load_npy,
    _npy_layout,
    compute_dtype,
    open_regular,
    widen,
)

_NPY_HEADER_BYTES = 256  # enough for any header write_split produces (numpy pads headers to 64/128 bytes)
_OPEN_FILES = 32  # file handles a reader keeps open
PART_IDENTITY_STRIDE = 1 << 40  # identity offset per combined shard set (ids are unique within one set only)
_SHOWN = 5  # problems named in an error message


@dataclass(frozen=True)
class Block:
    """Where one block lies: its shard, its rows in the split and its members' (offset, size)."""

    shard: int  # index into BlockTable.paths
    first_row: int  # row number of its first row in the split (index order)
    n_rows: int
    members: dict[str, tuple[int, int]]  # field -> (byte offset, size) in the shard file
    problem: str | None = None  # why it cannot be read (counted as a bad block when a reader meets it)
    part: int = 0  # which shard set it belongs to, when several are read together (`combine`)


@dataclass
class BlockTable:
    """Every block of a split, in index order; ``n_rows`` is the split's row count (bad blocks included)."""

    paths: tuple[str, ...]
    blocks: list[Block]
    shard_errors: dict[str, str] = field(default_factory=dict)  # shard path -> what the scan could not read
    parts: int = 1  # shard sets combined (identities of set p are offset by p * PART_IDENTITY_STRIDE)

    @property
    def n_rows(self) -> int:
        return sum(b.n_rows for b in self.blocks)

    def first_rows(self) -> np.ndarray:
        return np.array([b.first_row for b in self.blocks], dtype=np.int64)

    def shard(self, s: int) -> BlockTable:
        """The table of shard ``s`` alone (rows numbered from its first), for reading a split shard by shard."""
        mine = [b for b in self.blocks if b.shard == s]
        start = mine[0].first_row if mine else 0
        blocks = [dataclasses.replace(b, shard=0, first_row=b.first_row - start) for b in mine]
        path = self.paths[s]
        return BlockTable((path,), blocks, {p: e for p, e in self.shard_errors.items() if p == path})


@dataclass
class _TarScan:
    """What a header scan found in one tar: per block its members, row count and member-header problem."""

    members: list[dict] = field(default_factory=list)  # field (or ?name) -> (offset, size); (-1, 0) when cut short
    rows: list[int | None] = field(default_factory=list)  # rows identity.npy's header gives (None: no such header)
    problems: list[str | None] = field(default_factory=list)  # a member header of the block that is wrong
    lengths: list[dict[str, int | None]] = field(default_factory=list)  # field -> rows its header gives
    error: str | None = None  # why the scan did not reach the tar's end-of-archive marker

    def add(self, name: str, offset: int, size: int, head: bytes | None) -> None:
        self.members[-1][name] = (offset, size) if head is not None else (-1, 0)
        if name.startswith("?") or head is None:
            return
        try:
            shape, _, dtype = _npy_layout(_header(head))
        except Exception as e:  # a garbled header: the block is bad
            self._problem(f"{name}.npy does not decode ({type(e).__name__})")
            return
        if name == "identity":
            self.rows[-1] = int(shape[0]) if len(shape) == 1 else None
        self._problem(dtype_problem(name, dtype))
        if shape[1:] != FIELDS[name].shape:
            self._problem(f"{name}.npy has rows of shape {shape[1:]}, expected {FIELDS[name].shape}")
        self.lengths[-1][name] = shape[0] if shape else None  # checked against the identity's rows in _problem

    def _problem(self, problem: str | None) -> None:
        if problem and self.problems[-1] is None:
            self.problems[-1] = problem


def _header(head: bytes) -> bytes:
    """The .npy header at the start of a member's bytes (version 1 or 2)."""
    if head[:6] != b"\x93NUMPY" or head[6:7] not in (b"\x01", b"\x02"):
        raise ValueError("not an .npy member")
    long = head[6:7] == b"\x02"
    end = 12 + int.from_bytes(head[8:12], "little") if long else 10 + int.from_bytes(head[8:10], "little")
    if end > len(head):
        raise ValueError("header longer than read")
    return bytes(head[:end])


def _scan_tar(path: str) -> _TarScan:
    """Each block's members and .npy headers, in tar order, in one pass over the tar's headers.

    A block is the run of consecutive members sharing a key (WebDataset's
    grouping). Members that are not ``<key>.<field>.npy`` for a schema field are
    kept under ``?<name>`` so the block is known to be bad. Each member's .npy
    header is read where it lies, right after its tar header (in the buffer that
    read brought in). A tar is whole only when its end-of-archive marker follows
    the last member: a tar cut at a member boundary reads as ended, so that is checked.
    """
    out = _TarScan()
    last_key = None
    try:
        with open_regular(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            size = os.fstat(f.fileno()).st_size
            for info in tar:
                if not info.isfile():
                    continue
                key, _, rest = info.name.partition(".")
                if key != last_key:
                    out.members.append({})
                    out.rows.append(None)
                    out.problems.append(None)
                    out.lengths.append({})
                    last_key = key
                name = rest[:-4] if rest.endswith(".npy") and rest[:-4] in FIELDS else f"?{rest}"
                head = None
                if info.offset_data + info.size <= size:
                    f.seek(info.offset_data)
                    head = f.read(min(info.size, _NPY_HEADER_BYTES))
                out.add(name, info.offset_data, info.size, head)
            f.seek(tar.offset)
            if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                out.error = (
                    f"the tar ends at byte {tar.offset} without its end-of-archive marker (cut short or garbled)"
                )
    except (tarfile.TarError, OSError, EOFError) as e:
        out.error = f"{type(e).__name__}: {e}"
    return out


def _problem(found: _TarScan, j: int, required, declared: int | None) -> str | None:
    """Why block j of a scanned tar cannot be read, or None."""
    members, rows = found.members[j], found.rows[j]
    unknown = sorted(k[1:] for k in members if k.startswith("?"))
    if unknown:
        return f"unexpected member(s) {unknown}"
    missing = [f for f in required if f not in members]
    if missing:
        return f"lacks {missing}"
    if any(off < 0 for off, _ in members.values()):
        return "a member is cut short (truncated tar)"
    if found.problems[j]:
        return found.problems[j]
    if rows is None:
        return "identity.npy does not decode"
    uneven = sorted(k for k, n in found.lengths[j].items() if n != rows)
    if uneven:
        return f"member(s) {uneven} do not hold the {rows} rows identity.npy holds"
    if declared is not None and rows != declared:
        return f"holds {rows} rows, index.json says {declared}"
    return None


def _check_declared(path: str, n: int, block_size: int, layout: list[int], found: _TarScan) -> None:
    """Refuse a shard whose index.json entry does not describe it (ShardSetError naming both counts).

    Rows beyond the declared blocks are a lie whatever else is wrong; a whole tar (its scan reached the
    end-of-archive marker) must hold exactly the declared blocks. Fewer blocks in a cut tar are damage:
    their rows are counted as unreadable, not refused.
    """
    rows = found.rows
    lies = len(rows) > len(layout)
    if found.error is None:
        lies = lies or len(rows) != len(layout) or any(r is not None and r != w for r, w in zip(rows, layout))
    if lies:
        raise ShardSetError(
            f"{path}: index.json says this shard holds {n} rows ({len(layout)} block(s) of up to {block_size}); "
            f"the tar holds {sum(r or 0 for r in rows)} rows in {len(rows)} block(s). The index does not describe its "
            "shards: re-create the set with `dist-train pack`, or fix its counts in index.json"
        )


def scan(
    paths: list[str], declared: list[tuple[int, int]] | None = None, fields: tuple[str, ...] = REQUIRED
) -> BlockTable:
    """The block table of shard files, in the given order.

    ``declared``: per shard (rows, block_size) from index.json, whose ``fields`` every
    block must hold; a shard that disagrees with it is refused (``ShardSetError``), and
    every declared block is in the table (those a cut tar lacks marked bad, so their
    rows are counted as lost rather than silently missing). Without it, the blocks
    found are used with the row counts their headers give.
    """
    blocks: list[Block] = []
    errors: dict[str, str] = {}
    row = 0
    for s, path in enumerate(paths):
        found = _scan_tar(path)
        if found.error:
            errors[path] = found.error
        if declared is None:
            layout = [r or 0 for r in found.rows]
        else:
            n, block_size = declared[s]
            layout = [min(block_size, n - j * block_size) for j in range(-(-n // block_size))]
            _check_declared(path, n, block_size, layout, found)
        for j, n_rows in enumerate(layout):
            if j < len(found.members):
                members = found.members[j]
                problem = _problem(found, j, fields, None if declared is None else n_rows)
            else:
                problem = "block missing from the tar" + (f" ({found.error})" if found.error else "")
                members = {}
            blocks.append(Block(s, row, n_rows, members, problem))
            row += n_rows
    return BlockTable(tuple(paths), blocks, errors)


def check_readable(table: BlockTable, where: str) -> BlockTable:
    """The table, or ShardSetError when it has no block at all or none that can be read (named, with why)."""
    if not any(b.problem is None for b in table.blocks):
        why = "; ".join(f"{p}: {e}" for p, e in list(table.shard_errors.items())[:_SHOWN]) or "; ".join(
            sorted({b.problem for b in table.blocks})[:_SHOWN]
        )
        raise ShardSetError(
            f"{where} hold no readable block ({len(table.paths)} shard(s): {why or 'no rows'}); "
            "check or re-create the shard set (`dist-train inspect DIR`)"
        )
    return table


def combine(tables: list[BlockTable]) -> BlockTable:
    """Several shard sets' splits read as one table: blocks in order, each tagged with its set (``part``)."""
    if len(tables) == 1:
        return tables[0]
    paths: list[str] = []
    blocks, errors, row = [], {}, 0
    for part, table in enumerate(tables):
        for b in table.blocks:
            blocks.append(dataclasses.replace(b, shard=b.shard + len(paths), first_row=row, part=part))
            row += b.n_rows
        paths += table.paths
        errors |= table.shard_errors
    return BlockTable(tuple(paths), blocks, errors, parts=len(tables))


def split_table(shard_set: ShardSet, split: str) -> BlockTable:
    """The block table of a split of a shard set (declared layout from index.json); cached on the set.

    The one header scan of a split: a shard whose index.json entry disagrees with what it holds is
    refused here (``ShardSetError``), for every command that reads the split.
    """
    cache = shard_set.__dict__.setdefault("_block_tables", {})
    if split not in cache:
        block_size = int(shard_set.index["block_size"])
        entries = shard_set.split(split)["shards"]
        declared = [(int(entry["n_samples"]), block_size) for entry in entries]
        cache[split] = scan(shard_set.shard_paths(split), declared, tuple(shard_set.fields))
    return cache[split]


def readable_split(shard_set: ShardSet, split: str) -> BlockTable:
    """A split's block table, refused (``ShardSetError``) when the split is empty or no block of it can be read.

    The check every command runs on the splits it needs before it reads them (`plan.open_shard_sets`, eval, probe).
    """
    table = split_table(shard_set, split)
    if not table.blocks:
        raise ShardSetError(
            f"split {split!r} of {shard_set.root} is empty (index.json lists {len(table.paths)} shard(s), 0 rows); "
            f"a run needs rows in every split it reads: re-create the set with rows in {split!r}"
        )
    return check_readable(table, f"split {split!r} of {shard_set.root}")


class BlockReader:
    """Reads blocks of one table, keeping a few shard files open (one reader per process).

    ``fields``: the fields to read from every block; None reads the fields each block holds.
    """

    def __init__(self, table: BlockTable, fields: tuple[str, ...] | None = None):
        self.table = table
        self.fields = fields
        self._files: OrderedDict[int, object] = OrderedDict()

    def _file(self, shard: int):
        f = self._files.pop(shard, None)
        if f is None:
            f = open_regular(self.table.paths[shard])  # kept open across reads, closed in close()
            if len(self._files) >= _OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        self._files[shard] = f
        return f

    def read(self, index: int) -> dict[str, np.ndarray]:
        """The block's fields in their storage dtypes (read-only arrays); raises BadBlock."""
        block = self.table.blocks[index]
        if block.problem:
            raise BadBlock(f"block {index} of {self.table.paths[block.shard]}: {block.problem}")
        f = self._file(block.shard)
        out = {}
        for name in block.members if self.fields is None else self.fields:
            offset, size = block.members[name]
            f.seek(offset)
            data = f.read(size)
            try:
                a = _load_npy(data)
            except Exception as e:
                raise BadBlock(f"{name}.npy of block {index} of {self.table.paths[block.shard]}: {e}") from e
            want = (block.n_rows, *FIELDS[name].shape)
            if a.shape != want or dtype_problem(name, a.dtype):
                raise BadBlock(
                    f"{name}.npy of block {index} of {self.table.paths[block.shard]} has shape {a.shape} "
                    f"dtype {a.dtype}, expected {want} ({FIELDS[name].storage})"
                )
            out[name] = a if a.dtype == FIELDS[name].storage else a.astype(FIELDS[name].storage)
        if block.part and "identity" in out:  # identities are unique within a set: keep the sets' apart
            out["identity"] = out["identity"] + block.part * PART_IDENTITY_STRIDE
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def iter_blocks(paths: list[str] | BlockTable, on_error=None) -> Iterator[dict[str, np.ndarray]]:
    """The blocks of shard files (or of a table already scanned) in order, as float32/int64 arrays.

    ``on_error(exc)`` decides about a bad block, or a shard whose scan stopped
    early (reported after the blocks before the damage): return True to skip it
    (count it there), anything else re-raises. For streaming whole shards
    (inspect, ``read_split``); the training stream reads its own way.
    """
    table = paths if isinstance(paths, BlockTable) else scan(list(paths))
    reader = BlockReader(table)

    def skip(exc: Exception) -> None:
        if not (on_error and on_error(exc)):
            raise exc

    per_shard: list[list[int]] = [[] for _ in table.paths]
    for i, block in enumerate(table.blocks):
        per_shard[block.shard].append(i)
    try:
        for path, indices in zip(table.paths, per_shard):
            for i in indices:
                try:
                    raw = reader.read(i)
                except (BadBlock, OSError) as e:
                    skip(e)
                    continue
                yield {k: widen(k, v) for k, v in raw.items()}
            if path in table.shard_errors:
                skip(BadBlock(f"{path}: {table.shard_errors[path]}"))
    finally:
        reader.close()


def read_split(shard_set: ShardSet, split: str, on_error=None) -> dict[str, np.ndarray]:
    """Load a whole split into memory as float32/int64 column arrays (``iter_blocks`` over its shards)."""
    cols: dict[str, list[np.ndarray]] = {}
    for block in iter_blocks(split_table(shard_set, split), on_error=on_error):
        for k, v in block.items():
            cols.setdefault(k, []).append(v)
    if not cols:
        return {k: np.zeros((0, *FIELDS[k].shape), compute_dtype(k)) for k in REQUIRED}
    return {k: np.concatenate(v) for k, v in cols.items()}
