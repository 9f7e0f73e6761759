"""Stage 2's temporary face store: the paired faces' arrays on disk, so the shuffled splits are written in bounded memory."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from dist_train.data.schema import EMB_DIM, N_LANDMARKS
from dist_train.data.shards import ShardWriter
from dist_train.extract import pairing
from dist_train.extract.cache import CACHE_DIR, CacheRows
from dist_train.extract.job import ExtractError

GATHER_ROWS = 4096  # pairs gathered from the store at a time while writing (~28 MB of float32)
STORE_PREFIX = "stage2-"  # OUT/.cache/stage2-*/: the store, removed when stage 2 ends


@dataclass
class FaceStore:
    """The paired faces' arrays, copied once from the cache into float32 .npy memmaps for random access.

    ``emb`` rows: the frontal groups' faces (``pairs.frontal`` order, so each
    identity's frontal faces are contiguous), then each pair's source face;
    ``kps`` rows: each pair's source face; ``centroid`` rows: one per frontal group.
    """

    emb: np.ndarray
    kps: np.ndarray
    centroid: np.ndarray
    tgt_row: np.ndarray  # (P,) emb row of each pair's target

    @classmethod
    def build(cls, cache: CacheRows, kept: pairing.Faces, pairs: pairing.Pairs, where: Path) -> FaceStore:
        n_frontal, n_pairs = len(pairs.frontal), len(pairs)
        emb = open_memmap(where / "emb.npy", "w+", np.float32, (n_frontal + n_pairs, EMB_DIM))
        kps = open_memmap(where / "kps.npy", "w+", np.float32, (n_pairs, N_LANDMARKS, 3))
        centroid = open_memmap(where / "centroid.npy", "w+", np.float32, (len(pairs.group_identity), EMB_DIM))
        refs = np.concatenate([kept.ref[pairs.frontal], kept.ref[pairs.src]])
        kps_row = np.concatenate([np.full(n_frontal, -1, np.int64), np.arange(n_pairs)])
        order = np.argsort(refs, kind="stable")
        refs, emb_row, kps_row = refs[order], order, kps_row[order]
        bounds = np.searchsorted(refs, cache.starts)
        for c, path in enumerate(cache.chunks):
            lo, hi = bounds[c], bounds[c + 1]
            if lo == hi:
                continue
            try:
                with np.load(path, allow_pickle=False) as z:
                    chunk_emb, chunk_kps = z["emb"], z["kps"]
            except Exception as e:  # disk trouble since the first pass read it
                raise ExtractError(f"cache chunk {path} became unreadable ({e}); rerun the command") from e
            if len(chunk_emb) != cache.starts[c + 1] - cache.starts[c]:
                raise ExtractError(f"cache chunk {path} changed during extraction; rerun the command")
            local = refs[lo:hi] - cache.starts[c]
            emb[emb_row[lo:hi]] = chunk_emb[local]
            has_kps = kps_row[lo:hi] >= 0
            kps[kps_row[lo:hi][has_kps]] = chunk_kps[local[has_kps]]
        pairing.group_centroids(emb, pairs.starts, centroid, batch_rows=GATHER_ROWS)
        position = np.full(len(kept), -1, np.int64)
        position[pairs.frontal] = np.arange(n_frontal)
        return cls(emb, kps, centroid, position[pairs.tgt])

    def columns(self, pairs: pairing.Pairs, kept: pairing.Faces, index: np.ndarray) -> dict[str, np.ndarray]:
        """Sample columns of pairs ``index`` (schema field names), gathered from the store."""
        n_frontal = len(self.emb) - len(pairs)
        return {
            "src_emb": _gather(self.emb, n_frontal + index),
            "src_kps": _gather(self.kps, index),
            "src_pose": kept.pose[pairs.src[index]],
            "tgt_emb": _gather(self.emb, self.tgt_row[index]),
            "identity": pairs.identity[index],
            "tgt_centroid": _gather(self.centroid, pairs.centroid[index]),
        }


def _gather(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` as an in-memory array (one copy: memmap pages are read as the rows are taken)."""
    return np.take(array, rows, axis=0)


def write_pairs(
    out: Path, cache: CacheRows, kept: pairing.Faces, pairs: pairing.Pairs, split_rows: dict[str, np.ndarray]
) -> dict[str, dict]:
    """Write each split's pairs in the given (shuffled) order through a face store; returns the index entries."""
    cache_dir = out / CACHE_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(STORE_PREFIX + "*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    where = Path(tempfile.mkdtemp(prefix=STORE_PREFIX, dir=cache_dir))
    try:
        store = FaceStore.build(cache, kept, pairs, where)
        entries = {}
        for name, rows in split_rows.items():
            with ShardWriter(out, name) as writer:
                for i in range(0, len(rows), GATHER_ROWS):
                    writer.write(store.columns(pairs, kept, rows[i : i + GATHER_ROWS]))
            entries[name] = writer.entry
        return entries
    finally:
        shutil.rmtree(where, ignore_errors=True)
