"""Random access to the blocks of a split: a header scan, then reads straight to the members' bytes.

A shard is a WebDataset tar whose samples are blocks (``shards.py``): member
``bNNNNNN.<field>.npy`` holds one field for up to ``block_size`` rows. Scanning
the tar headers once (tens of microseconds a member, no data read) tells where
every block's members lie, so a reader can take blocks in any order and read
only the fields it needs. That is what lets the training stream draw blocks
uniformly from the whole split (every row equally likely, whatever the shard
sizes) and split an epoch's rows exactly between ranks and workers.

Shards are opened as local files by their path: nothing here interprets a URL
or runs a command. Members decode as ``.npy`` without pickle; a block with an
unknown member, a missing field or a row count that disagrees with
``index.json`` is bad: reading it raises ``BadBlock`` and the caller counts it.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from dist_train.data.schema import FIELDS, REQUIRED
from dist_train.data.shards import BadBlock, ShardSet, _load_npy, _npy_layout, compute_dtype, widen

_NPY_HEADER_BYTES = 256  # enough for any header write_split produces (numpy pads headers to 64/128 bytes)
_OPEN_FILES = 32  # file handles a reader keeps open
PART_IDENTITY_STRIDE = 1 << 40  # identity offset per combined shard set (ids are unique within one set only)


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


def _scan_tar(path: str) -> tuple[list[dict], str | None]:
    """Each block's {field: (offset, size)}, in tar order, plus the error that stopped the scan, if any.

    A block is the run of consecutive members sharing a key (WebDataset's
    grouping). Members that are not ``<key>.<field>.npy`` for a schema field are
    kept under ``?<name>`` so the block is known to be bad.
    """
    found: list[dict] = []
    last_key = None
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, rest = info.name.partition(".")
                if key != last_key:
                    found.append({})
                    last_key = key
                name = rest[:-4] if rest.endswith(".npy") and rest[:-4] in FIELDS else f"?{rest}"
                end = info.offset_data + info.size
                found[-1][name] = (info.offset_data, info.size) if end <= size else (-1, 0)
    except (tarfile.TarError, OSError, EOFError) as e:
        return found, f"{type(e).__name__}: {e}"
    return found, None


def _rows_in(f, member: tuple[int, int]) -> int | None:
    """Row count from an .npy member's header (one small read), or None when it does not parse."""
    offset, size = member
    if offset < 0:
        return None
    try:
        f.seek(offset)
        head = f.read(min(size, _NPY_HEADER_BYTES))
        long = head[6:7] != b"\x01"
        end = 12 + int.from_bytes(head[8:12], "little") if long else 10 + int.from_bytes(head[8:10], "little")
        shape, _, _ = _npy_layout(bytes(head[:end]))
        return int(shape[0]) if shape else None
    except Exception:  # a short or garbled header: the block is bad, found again at read time
        return None


def _row_counts(path: str, found: list[dict]) -> list[int | None]:
    if not found:
        return []
    with open(path, "rb") as f:
        return [_rows_in(f, m["identity"]) if "identity" in m else None for m in found]


def _problem(members: dict, declared: int | None, actual: int | None) -> str | None:
    unknown = sorted(k[1:] for k in members if k.startswith("?"))
    if unknown:
        return f"unexpected member(s) {unknown}"
    missing = [f for f in REQUIRED if f not in members]
    if missing:
        return f"lacks {missing}"
    if any(off < 0 for off, _ in members.values()):
        return "a member is cut short (truncated tar)"
    if actual is None:
        return "identity.npy does not decode"
    if declared is not None and actual != declared:
        return f"holds {actual} rows, index.json says {declared}"
    return None


def scan(paths: list[str], declared: list[tuple[int, int]] | None = None) -> BlockTable:
    """The block table of shard files, in the given order.

    ``declared``: per shard (rows, block_size) from index.json;
    then every declared block is in the table (absent ones marked bad, so their
    rows are counted as lost rather than silently missing). Without it, the
    blocks found are used with the row counts their headers give.
    """
    blocks: list[Block] = []
    errors: dict[str, str] = {}
    row = 0
    for s, path in enumerate(paths):
        found, error = _scan_tar(path)
        if error:
            errors[path] = error
        rows = _row_counts(path, found)
        if declared is None:
            layout = [r or 0 for r in rows]
        else:
            n, block_size = declared[s]
            layout = [min(block_size, n - j * block_size) for j in range(-(-n // block_size))]
        for j, n_rows in enumerate(layout):
            if j < len(found):
                problem = _problem(found[j], None if declared is None else n_rows, rows[j])
                members = found[j]
            else:
                problem = "block missing from the tar" + (f" ({error})" if error else "")
                members = {}
            blocks.append(Block(s, row, n_rows, members, problem))
            row += n_rows
    return BlockTable(tuple(paths), blocks, errors)


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
    """The block table of a split of a shard set (declared layout from index.json); cached on the set."""
    cache = shard_set.__dict__.setdefault("_block_tables", {})
    if split not in cache:
        block_size = int(shard_set.index["block_size"])
        entries = shard_set.split(split)["shards"]
        declared = [(int(entry["n_samples"]), block_size) for entry in entries]
        cache[split] = scan(shard_set.shard_paths(split), declared)
    return cache[split]


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
            f = open(self.table.paths[shard], "rb")  # noqa: SIM115 - kept open across reads, closed in close()
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
            if a.shape != want or a.dtype.kind not in "fiu":
                raise BadBlock(
                    f"{name}.npy of block {index} of {self.table.paths[block.shard]} has shape {a.shape} "
                    f"dtype {a.dtype}, expected {want}"
                )
            out[name] = a if a.dtype == FIELDS[name].storage else a.astype(FIELDS[name].storage)
        if block.part and "identity" in out:  # identities are unique within a set: keep the sets' apart
            out["identity"] = out["identity"] + block.part * PART_IDENTITY_STRIDE
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def iter_blocks(paths: list[str], on_error=None) -> Iterator[dict[str, np.ndarray]]:
    """The blocks of shard files in order, as float32/int64 arrays of the fields each block holds.

    ``on_error(exc)`` decides about a bad block, or a shard whose scan stopped
    early (reported after the blocks before the damage): return True to skip it
    (count it there), anything else re-raises. For streaming whole shards
    (inspect, ``read_split``); the training stream reads its own way.
    """
    table = scan(list(paths))
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
    for block in iter_blocks(shard_set.shard_paths(split), on_error=on_error):
        for k, v in block.items():
            cols.setdefault(k, []).append(v)
    if not cols:
        return {k: np.zeros((0, *FIELDS[k].shape), compute_dtype(k)) for k in REQUIRED}
    return {k: np.concatenate(v) for k, v in cols.items()}
