"""Stage 1's on-disk results in OUT/.cache: what makes a run resumable, and what stage 2 reads instead of the models.

One chunk file per stage-1 task (up to --batch-size images, or one video): few files to
scan on restart and to read in stage 2, even for millions of inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dist_train.data.schema import EMB_DIM, N_LANDMARKS
from dist_train.extract.job import ExtractError, Settings
from dist_train.extract.sources import Input

CACHE_DIR = ".cache"
SETTINGS_NAME = "settings.json"
CHUNK_META = ("rel", "stamp", "status", "detail", "frames", "no_face", "bad_frames")  # one entry per input
FACE_ARRAYS = {  # one row per face; "owner" indexes the chunk's inputs
    "owner": ((), np.int64),
    "frame": ((), np.int64),
    "emb": ((EMB_DIM,), np.float32),
    "kps": ((N_LANDMARKS, 3), np.float32),
    "pose": ((3,), np.float32),
    "bbox": ((4,), np.float32),
    "score": ((), np.float32),
}


def _stamp(path: Path) -> tuple[int, int]:
    """Size and modification time: a cached result is valid while both are unchanged; (-1, -1) if gone."""
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


@dataclass
class Result:
    """What stage 1 found in one input."""

    inp: Input
    stamp: tuple[int, int]  # file size and mtime when it was read
    status: str = "ok"  # or too_large / unreadable / wrong_size / failed
    detail: str = ""
    frames: int = 0  # images: 1; videos: frames sampled
    no_face: int = 0  # frames without a detection
    bad_frames: int = 0  # sampled video frames that did not decode
    faces: list[dict] = field(default_factory=list)  # FACE_ARRAYS fields but "owner"


@dataclass
class CacheRows:
    """Where stage 2's faces are: face ``ref`` r is row ``r - starts[c]`` of chunk ``c``'s face arrays."""

    chunks: list[Path]
    starts: np.ndarray  # (len(chunks) + 1,) first ref of each chunk


def write_chunk(out: Path, results: list[Result]) -> Path:
    """Store one task's results in one file, atomically."""
    chunks = out / CACHE_DIR / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    faces = [dict(f, owner=i) for i, r in enumerate(results) for f in r.faces]
    arrays = {
        k: np.array([f[k] for f in faces], dtype).reshape(-1, *shape) for k, (shape, dtype) in FACE_ARRAYS.items()
    }
    meta = {
        "rel": np.array([r.inp.rel for r in results]),
        "stamp": np.array([r.stamp for r in results], np.int64).reshape(-1, 2),
        "status": np.array([r.status for r in results]),
        "detail": np.array([r.detail for r in results]),
        "frames": np.array([r.frames for r in results], np.int64),
        "no_face": np.array([r.no_face for r in results], np.int64),
        "bad_frames": np.array([r.bad_frames for r in results], np.int64),
    }
    path = chunks / f"{uuid.uuid4().hex}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **meta, **arrays)
    os.replace(tmp, path)
    return path


def scan_cache(out: Path, root: Path, inputs: list[Input]) -> dict[str, Path]:
    """{input: chunk holding its result} for inputs whose file has not changed since extraction.

    Reads only the small per-input members. An unreadable chunk (a disk problem)
    is skipped, so its inputs are extracted again.
    """
    stamps = {i.rel: _stamp(root / i.rel) for i in inputs}
    done = {}
    for path in sorted((out / CACHE_DIR / "chunks").glob("*[0-9a-f].npz")):
        try:
            with np.load(path, allow_pickle=False) as z:
                rels, chunk_stamps = z["rel"], z["stamp"]
        except Exception:
            continue
        for rel, stamp in zip(rels.tolist(), chunk_stamps.tolist()):
            if stamps.get(rel) == tuple(stamp):
                done[rel] = path
    return done


def load_records(out: Path, root: Path, inputs: list[Input]) -> dict[str, dict]:
    """{input: its result} for every input with a current result: the CHUNK_META fields plus face arrays.

    Holds the whole cache in memory: for tests and inspection. Stage 2 reads the cache in bounded memory instead.
    """
    where = scan_cache(out, root, inputs)
    records = {}
    for path in sorted(set(where.values())):
        with np.load(path, allow_pickle=False) as z:
            chunk = {k: z[k] for k in z.files}
        for i, rel in enumerate(chunk["rel"].tolist()):
            if where.get(rel) != path:
                continue
            mine = chunk["owner"] == i
            records[rel] = {k: chunk[k][i] for k in CHUNK_META} | {k: chunk[k][mine] for k in FACE_ARRAYS}
    return records


def check_cache_settings(out: Path, settings: Settings, fresh: bool) -> None:
    """Refuse to mix cached results made with other settings; --fresh starts over."""
    cache = out / CACHE_DIR
    marker = cache / SETTINGS_NAME
    now = settings.fingerprint()
    if fresh and cache.exists():
        shutil.rmtree(cache)
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        # a setting newer than the cache (max_pixels) counts as unchanged: what the cache holds was extracted in full
        before = now | recorded
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ExtractError(
                f"{cache} holds faces extracted with other settings (changed: {changed}); "
                "rerun with --fresh to extract everything again, or use another --out"
            )
        if recorded == now:
            return  # else the marker is rewritten with the newer settings, so that a later change is seen
    cache.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(now, indent=2) + "\n")
