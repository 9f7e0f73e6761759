"""Shard sets on disk: block-structured WebDataset tars plus an ``index.json``.

Layout of a shard set directory::

    index.json                 schema version, fields, splits, provenance, skipped rows
    train-000000.tar ...       WebDataset tars; one tar "sample" = one block
    val-000000.tar ...

Each tar sample has key ``bNNNNNN`` and one ``<field>.npy`` member per field
holding that field for up to ``block_size`` samples. Shards are data, never
code: members decode with ``allow_pickle=False`` and anything that is not a
known ``.npy`` field makes the block bad.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import reprlib
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_train.data.schema import (
    DEFAULT_BLOCK_SIZE,
    EMB_DIM,
    FIELDS,
    N_LANDMARKS,
    REQUIRED,
    SCHEMA_VERSION,
    check_arrays,
)

INDEX_NAME = "index.json"
DEFAULT_SHARD_SAMPLES = 16 * DEFAULT_BLOCK_SIZE


class BadBlock(ValueError):
    """A tar sample that is not a valid block (wrong members, shapes or dtypes)."""


class ShardSetError(ValueError):
    """A directory that is not a usable shard set; the message says how to fix it."""


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Streams one split, given as row chunks of any size, into ``{split}-NNNNNN.tar`` files.

    Shards are cut every ``shard_samples`` rows and blocks every ``block_size``
    rows (only the split's last block and shard are shorter), so the same rows
    give the same bytes however they are chunked; ``write_split`` is one chunk.
    Fields are cast to their storage dtype block by block, and at most one
    block's worth of rows is kept between calls. Each tar is written under a
    temporary name and renamed when complete, so a crash never leaves a tar
    that looks whole. ``close`` returns the split's index entry (also in
    ``entry``); as a context manager it closes, or removes the unfinished tar
    on an error.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        split: str,
        *,
        shard_samples: int = DEFAULT_SHARD_SAMPLES,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        if shard_samples % block_size:
            raise ValueError(f"shard_samples ({shard_samples}) must be a multiple of block_size ({block_size})")
        self.out, self.split = Path(out_dir), split
        self.shard_samples, self.block_size = shard_samples, block_size
        self.out.mkdir(parents=True, exist_ok=True)
        self.fields: list[str] | None = None  # member order in every block: the first chunk's key order
        self.n_samples = 0  # rows written into blocks so far
        self.shards: list[dict] = []
        self.entry: dict | None = None
        self._pending: list[dict[str, np.ndarray]] = []
        self._n_pending = 0
        self._identities = np.zeros(0, np.int64)  # sorted unique identities written
        self._sink = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, arrays: dict[str, np.ndarray]) -> None:
        """Append rows (schema field names, all chunks with the same fields); full blocks are written now."""
        if self.entry is not None:
            raise ValueError(f"split {self.split!r} is closed")
        n = check_arrays(arrays)
        if self.fields is None:
            self.fields = list(arrays)
        elif set(arrays) != set(self.fields):
            raise ValueError(f"chunk has fields {sorted(arrays)}; earlier chunks of {self.split!r} had {self.fields}")
        if n == 0:
            return
        self._identities = np.union1d(self._identities, arrays["identity"])
        self._pending.append(arrays)
        self._n_pending += n
        while self._n_pending >= self.block_size:
            self._write_block(self._take(self.block_size))
        # keep a private copy of the rest (less than a block): the caller may reuse its arrays
        self._pending = [{k: np.array(v) for k, v in p.items()} for p in self._pending]

    def close(self) -> dict:
        """Write the last (short) block, finish the last tar; returns the split's index entry."""
        if self.entry is None:
            if self._n_pending:
                self._write_block(self._take(self._n_pending))
            self._finish_shard()
            self.entry = {
                "shards": self.shards,
                "n_samples": int(self.n_samples),
                "n_identities": int(len(self._identities)) if self.n_samples else 0,
            }
        return self.entry

    def abort(self) -> None:
        """Drop the unfinished tar (finished ones stay; no index lists them)."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None
            self._tmp.unlink(missing_ok=True)

    def _take(self, n: int) -> dict[str, np.ndarray]:
        """The first n pending rows (a view when one chunk holds them all)."""
        first = self._pending[0]
        m = len(first["identity"])
        if m >= n:
            rows = {k: v[:n] for k, v in first.items()}
            if m > n:
                self._pending[0] = {k: v[n:] for k, v in first.items()}
            else:
                self._pending.pop(0)
        else:
            parts, got = [], 0
            while got < n:
                p = self._pending.pop(0)
                k = min(n - got, len(p["identity"]))
                parts.append({f: v[:k] for f, v in p.items()})
                if k < len(p["identity"]):
                    self._pending.insert(0, {f: v[k:] for f, v in p.items()})
                got += k
            rows = {f: np.concatenate([p[f] for p in parts]) for f in self.fields}
        self._n_pending -= n
        return rows

    def _write_block(self, rows: dict[str, np.ndarray]) -> None:
        import webdataset as wds

        if self._sink is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._tmp = self.out / (name + ".tmp")
            self._sink = wds.TarWriter(str(self._tmp), encoder=False, mtime=0)  # fixed mtime: same rows, same bytes
        sample = {"__key__": f"b{self.n_samples // self.block_size:06d}"}
        for k in self.fields:
            sample[f"{k}.npy"] = _npy_bytes(np.ascontiguousarray(rows[k], dtype=FIELDS[k].storage))
        self._sink.write(sample)
        n = len(rows["identity"])
        self.n_samples += n
        self._in_shard += n
        if self._in_shard >= self.shard_samples:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._sink is None:
            return
        self._sink.close()
        self._sink = None
        name = self._tmp.name[: -len(".tmp")]
        os.replace(self._tmp, self.out / name)
        self.shards.append({"file": name, "n_samples": int(self._in_shard)})
        self._in_shard = 0


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    arrays: dict[str, np.ndarray],
    *,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict:
    """Write one split's arrays as ``{split}-NNNNNN.tar`` files (one ``ShardWriter`` chunk); returns its index entry."""
    check_arrays(arrays)
    with ShardWriter(out_dir, split, shard_samples=shard_samples, block_size=block_size) as writer:
        writer.write(arrays)
    return writer.entry


def write_index(
    out_dir: str | os.PathLike,
    splits: dict[str, dict],
    *,
    fields: list[str],
    provenance: dict,
    skipped: dict[str, int] | None = None,
    extra: dict | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Path:
    """Write ``index.json`` last (atomically): its presence marks the set complete."""
    index = {
        "schema_version": SCHEMA_VERSION,
        "emb_dim": EMB_DIM,
        "n_landmarks": N_LANDMARKS,
        "block_size": block_size,
        "fields": list(fields),
        "storage": {k: FIELDS[k].storage for k in fields},
        "splits": splits,
        "provenance": provenance,
        "skipped": dict(skipped or {}),
    }
    if extra:
        index.update(extra)
    path = Path(out_dir) / INDEX_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def write_shard_set(
    out_dir: str | os.PathLike,
    splits: dict[str, dict[str, np.ndarray]],
    *,
    provenance: dict,
    skipped: dict[str, int] | None = None,
    extra: dict | None = None,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Path:
    """Write every split, then ``index.json``. Splits must not share identities."""
    seen: dict[int, str] = {}
    for split, arrays in splits.items():
        for ident in np.unique(arrays["identity"]):
            other = seen.setdefault(int(ident), split)
            if other != split:
                raise ValueError(
                    f"identity {int(ident)} appears in splits {other!r} and {split!r}; splits are by identity"
                )
    fields = [k for k in FIELDS if all(k in a for a in splits.values())]
    entries = {
        s: write_split(out_dir, s, a, shard_samples=shard_samples, block_size=block_size) for s, a in splits.items()
    }
    return write_index(
        out_dir, entries, fields=fields, provenance=provenance, skipped=skipped, extra=extra, block_size=block_size
    )


# torch casts float16 -> float32 ~8x faster than numpy's element-wise astype (exactly);
# chunks below torch's parallel grain (32768 elements) run on the calling thread, since
# intra-op threads cost more than they save on a busy CPU (measured ~10x slower there).
_CAST_CHUNK = 32768


def compute_dtype(name: str) -> type:
    """The dtype batches and models use for a field: int64 identities, float32 for the rest."""
    return np.int64 if name == "identity" else np.float32


def widen(name: str, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Storage dtype -> ``compute_dtype(name)``, into ``out`` (C-contiguous) when given."""
    if a.dtype == np.float16:
        import torch

        out = np.empty(a.shape, np.float32) if out is None else out
        src = torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else a.copy()).view(-1)
        dst = torch.from_numpy(out).view(-1)
        for i in range(0, src.numel(), _CAST_CHUNK):
            dst[i : i + _CAST_CHUNK].copy_(src[i : i + _CAST_CHUNK])
        return out
    if out is None:
        return a.astype(compute_dtype(name), copy=False)
    out[...] = a
    return out


@functools.lru_cache(maxsize=256)
def _npy_layout(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of an .npy header (numpy's safe parser; cached: blocks repeat it)."""
    f = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise ValueError("object arrays need pickle, which shards never use")
    return shape, fortran, dtype


def _load_npy(value: bytes) -> np.ndarray:
    """``np.load(allow_pickle=False)`` without its copies: a read-only view of the member's bytes."""
    if value[:6] != b"\x93NUMPY" or value[6] not in (1, 2):
        raise ValueError("not an .npy (version 1 or 2) member")
    end = 10 + int.from_bytes(value[8:10], "little") if value[6] == 1 else 12 + int.from_bytes(value[8:12], "little")
    shape, fortran, dtype = _npy_layout(bytes(value[:end]))
    count = int(np.prod(shape, dtype=np.int64))
    a = np.frombuffer(value, dtype=dtype, count=count, offset=end)  # raises when the member is short
    return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)


def add_layout_arguments(parser) -> None:
    """The shard-set layout options shared by the commands that write one (synth, pack)."""
    parser.add_argument("--out", required=True, help="new shard set directory")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of identities held out for val")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="share of identities held out for test")
    parser.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES, help="samples per tar file")
    parser.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="samples per tar member (divides --shard-samples)"
    )


def decode_block(sample: dict, *, storage: bool = False) -> dict[str, np.ndarray]:
    """Decode one tar sample (``{"src_emb.npy": bytes, ...}``) into float32/int64 arrays.

    ``storage=True`` keeps the dtypes as stored (float16 embeddings), for callers
    that widen later with ``widen``. Arrays may be read-only views of the member
    bytes. Raises BadBlock for unknown or pickled members, missing fields, bad shapes.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in sample.items():
        if key.startswith("__"):
            continue
        name, _, ext = key.partition(".")
        if ext != "npy" or name not in FIELDS:
            raise BadBlock(f"unexpected member {key!r} in block {sample.get('__key__')!r}")
        try:
            a = _load_npy(value)
        except Exception as e:  # truncated or not an .npy: a bad block, never a crash
            raise BadBlock(f"member {key!r} of block {sample.get('__key__')!r} does not decode: {e}") from e
        out[name] = a if storage else widen(name, a)
    missing = [f for f in REQUIRED if f not in out]
    if missing:
        raise BadBlock(f"block {sample.get('__key__')!r} lacks {missing}")
    try:
        check_arrays(out)
    except ValueError as e:
        raise BadBlock(f"block {sample.get('__key__')!r}: {e}") from e
    return out


_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\.tar")
_FIX = "re-create the set with `dist-train pack` or fix index.json"


def _count(value) -> bool:
    """A row count as index.json must hold it: a JSON integer, not negative (a bool is no count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is (None for a regular file): shards are only ever regular files."""
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))
    kinds += ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike):
    """Open a shard for reading, refusing (OSError) anything but a regular file without ever blocking.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the type is then
    checked on the open descriptor, so a file swapped after a check is refused too.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind:
            raise OSError(f"{path} is {kind}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_shard_name(index_path: Path, split: str, name) -> None:
    """A shard entry must be a plain ``.tar`` file name in the set's own directory, naming a regular file.

    Shard sets are data people download and share: an entry must never be a
    command (``pipe:...``), a URL or a path out of the folder, and a FIFO or
    device among the shards must be refused here, not block a reader for ever.
    """
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or name in (".", ".."):
        raise ShardSetError(
            f"{index_path}: split {split!r} lists shard {name!r}, which is not a plain file name ending in .tar "
            "(letters, digits, '_', '-', '.'; no '/', ':' or scheme); a shard set only names tar files in its own "
            "directory. Re-create the set with `dist-train pack` or fix index.json"
        )
    path = index_path.parent / name
    if path.is_symlink():
        raise ShardSetError(
            f"{index_path}: shard {name!r} of split {split!r} is a symbolic link; copy the file into the set instead"
        )
    try:
        kind = file_kind(os.lstat(path).st_mode)
    except FileNotFoundError:
        return  # a missing shard is damage: its rows are counted as unreadable (blocks.scan)
    if kind:
        raise ShardSetError(
            f"{path}: shard {name!r} of split {split!r} is {kind}, not a regular file; shards are read only from "
            "regular files: copy the tar into the set"
        )


def _check_index(idx: Path, index) -> None:
    """index.json's structure and its own arithmetic, before anything reads a shard (no I/O but ``lstat``).

    What the shards themselves hold is checked against these counts by the header scan (``blocks.scan``).
    """
    if not isinstance(index, dict):
        raise ShardSetError(f"{idx} holds {type(index).__name__}, not a JSON object; {_FIX}")
    version = index.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardSetError(f"{idx} has schema_version {version!r}; this dist_train reads {SCHEMA_VERSION}")
    if index.get("emb_dim") != EMB_DIM or index.get("n_landmarks") != N_LANDMARKS:
        raise ShardSetError(
            f"{idx} declares emb_dim={index.get('emb_dim')} n_landmarks={index.get('n_landmarks')}; "
            f"dist_train expects {EMB_DIM} and {N_LANDMARKS}"
        )
    block_size = index.get("block_size")
    if not _count(block_size) or block_size == 0:
        raise ShardSetError(
            f"{idx}: block_size is {reprlib.repr(block_size)}; it must be a positive integer (rows per block)"
        )
    fields = index.get("fields")
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise ShardSetError(
            f"{idx}: 'fields' is {reprlib.repr(fields)}; it must list the fields every block holds; {_FIX}"
        )
    unknown, missing = [f for f in fields if f not in FIELDS], [f for f in REQUIRED if f not in fields]
    if unknown or missing or len(set(fields)) != len(fields):
        raise ShardSetError(
            f"{idx}: 'fields' {fields} must name each field once, include {list(REQUIRED)} and only fields from "
            f"{list(FIELDS)}; {_FIX}"
        )
    splits = index.get("splits")
    if not splits or not isinstance(splits, dict):
        raise ShardSetError(f"{idx} lists no splits")
    listed: dict[str, str] = {}  # shard file -> the split that lists it
    for split, entry in splits.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise ShardSetError(
                f"{idx}: split {split!r} is {reprlib.repr(entry)}, not an object with a 'shards' list; {_FIX}"
            )
        for shard in entry["shards"]:
            if not isinstance(shard, dict):
                raise ShardSetError(
                    f"{idx}: split {split!r} lists shard entry {reprlib.repr(shard)}, which is not an object "
                    f'{{"file": NAME, "n_samples": ROWS}}; {_FIX}'
                )
            name = shard.get("file")
            _check_shard_name(idx, split, name)
            if name in listed:
                raise ShardSetError(
                    f"{idx}: shard {name!r} is listed twice (splits {listed[name]!r} and {split!r}); each shard "
                    f"belongs to one split once; {_FIX}"
                )
            listed[name] = split
            if not _count(shard.get("n_samples")):
                raise ShardSetError(
                    f"{idx}: shard {name!r} of split {split!r} has n_samples {reprlib.repr(shard.get('n_samples'))}; it must be "
                    f"a non-negative integer (the rows the shard holds); {_FIX}"
                )
        total, declared = sum(s["n_samples"] for s in entry["shards"]), entry.get("n_samples")
        if not _count(declared) or declared != total:
            raise ShardSetError(
                f"{idx}: split {split!r} has n_samples {reprlib.repr(declared)}, but its shards' counts add up to {total}; {_FIX}"
            )


@dataclass
class ShardSet:
    """An opened shard set: validated ``index.json`` plus resolved shard paths."""

    root: Path
    index: dict

    @classmethod
    def open(cls, path: str | os.PathLike) -> ShardSet:
        root = Path(path)
        idx = root / INDEX_NAME
        if not root.is_dir():
            raise ShardSetError(f"shard set directory {str(root)!r} does not exist")
        if not idx.is_file():
            raise ShardSetError(
                f"{str(root)!r} holds no shard set (no {INDEX_NAME}); create one with "
                "`dist-train synth --out DIR` or `dist-train pack --npz FILE --out DIR`"
            )
        try:
            index = json.loads(idx.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardSetError(f"{idx} is not valid JSON ({e}); re-create the shard set") from e
        _check_index(idx, index)
        return cls(root, index)

    @property
    def splits(self) -> list[str]:
        return list(self.index["splits"])

    @property
    def fields(self) -> list[str]:
        return list(self.index["fields"])

    def has(self, field: str) -> bool:
        return field in self.index["fields"]

    def split(self, name: str) -> dict:
        try:
            return self.index["splits"][name]
        except KeyError:
            raise ShardSetError(f"shard set {str(self.root)!r} has no split {name!r}; it has {self.splits}") from None

    def n_samples(self, split: str) -> int:
        return int(self.split(split)["n_samples"])

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / s["file"]) for s in self.split(split)["shards"]]
