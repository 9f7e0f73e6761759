"""`dist-train extract`: face images and videos -> InsightFace features -> a shard set.

Stage 1 (slow, parallel, resumable): each input file goes through the model
pack's detector, ``1k3d68`` landmark model (which gives ``face.pose``) and
recognition model, using insightface's own ``model_zoo`` classes. Every face
found is stored in ``OUT/.cache`` (one ``.npz`` chunk per batch of inputs), so a restarted run
skips the inputs already done. Stage 2 (fast): filters, frontal/profile
pairing (``pairing.py``), the identity split (``splits.py``, shared with pack
and synth; rows shuffled within each split) and the shard writer, re-run in
full every time, so changing a filter or threshold needs no re-extraction.
Stage 2 keeps only light metadata per face in memory; the paired faces'
embeddings and landmarks go through a temporary on-disk store (see below).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dist_train import cli
from dist_train.data import pairing, splits
from dist_train.data.schema import EMB_DIM, FIELDS, N_LANDMARKS
from dist_train.data.shards import INDEX_NAME, ShardWriter, write_index

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
# The three models extraction needs and their file names in insightface's buffalo_l pack.
BUFFALO_L = {"detection": "det_10g.onnx", "recognition": "w600k_r50.onnx", "landmark_3d_68": "1k3d68.onnx"}
ALIGNED_SIZE = 112  # ArcFace crops
CACHE_DIR = ".cache"
SETTINGS_NAME = "settings.json"
REPORT_NAME = "extract-report.json"
# What each drop count counts; written to the report and index.json.
DROP_UNITS = {
    "unsupported_file": "files that are neither images nor videos",
    "outside_identity": "files directly under ROOT, not in an identity folder",
    "unreadable": "images or videos that could not be decoded",
    "wrong_size": "--aligned inputs that are not 112x112",
    "failed": "inputs whose processing raised an error (see the report)",
    "bad_frame": "sampled video frames that did not decode (the rest of the video is used)",
    "no_face": "images or sampled video frames without a detection >= --det-thresh",
    "low_score": "faces scoring < --min-score",
    "too_small": "faces whose box is smaller than --min-size on its shorter side",
    "extra_face": "faces that passed the filters but were not their image's largest (--keep largest)",
    "mid_yaw": "faces between --frontal-yaw and --profile-yaw",
    "no_frontal": "profile faces of identities without any frontal face",
    "identity_limit": "profile faces over --max-pairs-per-identity",
}


class ExtractError(ValueError):
    """Bad input or model pack; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Settings:
    """Everything that changes what stage 1 computes; a cache is only valid for the same settings."""

    pack: str
    aligned: bool = False
    det_size: int = 640
    det_thresh: float = 0.3
    every: int | None = None  # video: every k-th frame, or ...
    fps: float | None = 2.0  # ... frames per second of video time

    def fingerprint(self) -> dict:
        files = {p.name: p.stat().st_size for p in sorted(Path(self.pack).glob("*.onnx"))}
        return {**asdict(self), "pack": str(Path(self.pack).resolve()), "pack_files": files}


@dataclass(frozen=True)
class Input:
    rel: str  # path relative to ROOT, "/"-separated
    identity: str
    kind: str  # "image" or "video"


# ---------------------------------------------------------------- model pack


def choose_providers(device: str) -> list[str]:
    """onnxruntime providers: CUDA when present (or demanded), CPU otherwise."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise ExtractError(
            f"--device cuda, but onnxruntime offers only {available}; install onnxruntime-gpu "
            "(pip uninstall onnxruntime && pip install onnxruntime-gpu) or use --device cpu"
        )
    if device in ("cuda", "auto") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass
class Pack:
    """The three insightface model objects extraction uses, routed by their ONNX signatures."""

    detector: object  # model_zoo SCRFD
    landmark: object  # model_zoo Landmark, taskname landmark_3d_68
    recognition: object  # model_zoo ArcFaceONNX
    files: dict[str, str]  # task -> file name


def _layout_hint(pack: Path) -> str:
    names = ", ".join(BUFFALO_L.values())
    return (
        f"expected a model pack directory in the buffalo_l layout: {pack}/{{{names}}} "
        "(unzip insightface's buffalo_l.zip there; any pack with an SCRFD detector, a 1k3d68 landmark model "
        "and a 112x112 ArcFace model works). dist-train never downloads models."
    )


def load_pack(pack_dir: str | os.PathLike, providers: list[str], threads: int = 0) -> Pack:
    """Load the detector, 3D landmark and recognition models of a pack directory, or say what is missing."""
    import onnxruntime
    from insightface.model_zoo import model_zoo

    pack = Path(pack_dir)
    if not pack.is_dir():
        raise ExtractError(f"model pack {str(pack)!r} is not a directory; {_layout_hint(pack)}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    onnxruntime.set_default_logger_severity(3)
    models, files = {}, {}
    for path in sorted(pack.glob("*.onnx")):
        try:
            model = model_zoo.get_model(str(path), providers=providers, sess_options=options)
        except Exception as e:  # a truncated download, a non-ONNX file
            raise ExtractError(f"model file {path} does not load ({type(e).__name__}: {e}); replace it") from e
        task = getattr(model, "taskname", None)
        if task in BUFFALO_L and task not in models:
            models[task], files[task] = model, path.name
    missing = [t for t in BUFFALO_L if t not in models]
    if missing:
        found = sorted(p.name for p in pack.glob("*.onnx")) or "no .onnx files"
        wanted = ", ".join(f"{t} (buffalo_l: {BUFFALO_L[t]})" for t in missing)
        raise ExtractError(f"model pack {str(pack)!r} has no {wanted}; it holds {found}. {_layout_hint(pack)}")
    if not models["detection"].use_kps:
        raise ExtractError(
            f"detector {files['detection']} gives no 5-point keypoints, which ArcFace alignment needs; "
            f"use an SCRFD model with keypoints such as {BUFFALO_L['detection']}"
        )
    rec = models["recognition"]
    out_dim = rec.output_shape[-1]
    if out_dim != EMB_DIM or tuple(rec.input_size) != (ALIGNED_SIZE, ALIGNED_SIZE):
        raise ExtractError(
            f"recognition model {files['recognition']} maps {rec.input_size} -> {out_dim}; "
            f"dist_train needs a {ALIGNED_SIZE}x{ALIGNED_SIZE} -> {EMB_DIM} ArcFace model such as {BUFFALO_L['recognition']}"
        )
    return Pack(models["detection"], models["landmark_3d_68"], rec, files)


# ---------------------------------------------------------------- inputs


def discover(root: Path, aligned: bool) -> tuple[list[Input], list[str], list[dict]]:
    """Inputs under ``ROOT/<identity>/**``, identity names, and the files that are not inputs."""
    inputs, names, problems = [], [], []
    for entry in sorted(root.iterdir()):
        if entry.is_file():
            problems.append({"input": entry.name, "reason": "outside_identity", "detail": "not in ROOT/<identity>/"})
            continue
        if not entry.is_dir():
            continue
        names.append(entry.name)
        for path in sorted(p for p in entry.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            ext = path.suffix.lower()
            if ext in IMAGE_EXTS:
                inputs.append(Input(rel, entry.name, "image"))
            elif ext in VIDEO_EXTS and not aligned:
                inputs.append(Input(rel, entry.name, "video"))
            else:
                why = "a video, but --aligned takes 112x112 crops" if ext in VIDEO_EXTS else f"extension {ext!r}"
                problems.append({"input": rel, "reason": "unsupported_file", "detail": why})
    if not inputs:
        raise ExtractError(
            f"{str(root)!r} holds no images or videos in identity folders; expected ROOT/<identity>/**/*.jpg|png|... "
            f"and ROOT/<identity>/*.mp4|avi|... (images: {sorted(IMAGE_EXTS)}; videos: {sorted(VIDEO_EXTS)})"
        )
    return inputs, names, problems


def read_frames(path: Path, kind: str, settings: Settings):
    """Yield (frame_index, BGR image or None if that frame does not decode); OSError when none decodes."""
    import cv2

    if kind == "image":
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise OSError("OpenCV cannot decode this image")
        yield 0, img
        return
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise OSError("OpenCV cannot open this video")
        fps = cap.get(cv2.CAP_PROP_FPS)
        step = settings.every or (max(1, round(fps / settings.fps)) if fps > 0 else 1)
        index, decoded = 0, 0
        while cap.grab():
            if index % step == 0:
                ok, frame = cap.retrieve()
                decoded += ok and frame is not None
                yield index, frame if ok else None
            index += 1
        if decoded == 0:
            raise OSError("no decodable frames in this video")
    finally:
        cap.release()


# ---------------------------------------------------------------- cache


# One chunk file per stage-1 task (up to --batch-size images, or one video): few files to
# scan on restart and to read in stage 2, even for millions of inputs.
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
    status: str = "ok"  # or unreadable / wrong_size / failed
    detail: str = ""
    frames: int = 0  # images: 1; videos: frames sampled
    no_face: int = 0  # frames without a detection
    bad_frames: int = 0  # sampled video frames that did not decode
    faces: list[dict] = field(default_factory=list)  # FACE_ARRAYS fields but "owner"


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
    import shutil

    cache = out / CACHE_DIR
    marker = cache / SETTINGS_NAME
    now = settings.fingerprint()
    if fresh and cache.exists():
        shutil.rmtree(cache)
    if marker.is_file():
        before = json.loads(marker.read_text())
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ExtractError(
                f"{cache} holds faces extracted with other settings (changed: {changed}); "
                "rerun with --fresh to extract everything again, or use another --out"
            )
        return
    cache.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(now, indent=2) + "\n")


# ---------------------------------------------------------------- stage 1 worker


class Extractor:
    """One process's models; turns input files into cached face records."""

    def __init__(self, settings: Settings, providers: list[str], threads: int, batch_size: int, pack: Pack | None):
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"insightface\.")
        self.settings = settings
        self.pack = pack or load_pack(settings.pack, providers, threads)
        ctx = 0 if providers[0] == "CUDAExecutionProvider" else -1
        self.pack.detector.prepare(
            ctx, input_size=(settings.det_size, settings.det_size), det_thresh=settings.det_thresh
        )
        self.pack.landmark.prepare(ctx)
        self.pack.recognition.prepare(ctx)
        fixed = self.pack.recognition.input_shape[0]
        self.batch_size = 1 if fixed == 1 else batch_size

    def _faces_in(self, img: np.ndarray):
        """insightface Face objects with bbox, kps, det_score, landmark_3d_68 and pose."""
        from insightface.app.common import Face
        from insightface.utils.face_align import arcface_dst

        if self.settings.aligned:
            faces = [
                Face(bbox=np.array([0, 0, ALIGNED_SIZE, ALIGNED_SIZE], np.float32), kps=arcface_dst, det_score=1.0)
            ]
        else:
            boxes, kpss = self.pack.detector.detect(img)
            faces = [Face(bbox=b[:4], kps=k, det_score=b[4]) for b, k in zip(boxes, kpss)]
        for face in faces:
            self.pack.landmark.get(img, face)  # sets landmark_3d_68 and pose, insightface's own code
        return faces

    def _embed(self, crops: list[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(crops), self.batch_size):
            out.append(self.pack.recognition.get_feat(crops[i : i + self.batch_size]))
        emb = np.concatenate(out).astype(np.float64)
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)  # face.normed_embedding

    def _extract_one(self, root: Path, inp: Input, crops: list[np.ndarray]) -> Result:
        """Detect and landmark every face of one input; appends their aligned crops to ``crops``."""
        from insightface.utils.face_align import norm_crop

        path = root / inp.rel
        result = Result(inp, _stamp(path))  # stamped before reading: a file changed meanwhile is redone
        n_crops = len(crops)
        try:
            for index, img in read_frames(path, inp.kind, self.settings):
                result.frames += 1
                if img is None:
                    result.bad_frames += 1
                    continue
                if self.settings.aligned and img.shape[:2] != (ALIGNED_SIZE, ALIGNED_SIZE):
                    result.status = "wrong_size"
                    result.detail = f"--aligned needs 112x112 crops, this is {img.shape[1]}x{img.shape[0]}"
                    break
                found = self._faces_in(img)
                result.no_face += not found
                for face in found:
                    crops.append(norm_crop(img, face.kps, image_size=ALIGNED_SIZE))
                    result.faces.append(
                        {
                            "kps": face.landmark_3d_68,
                            "pose": face.pose,
                            "bbox": face.bbox,
                            "score": face.det_score,
                            "frame": index,
                        }
                    )
        except OSError as e:
            result.status, result.detail = "unreadable", str(e)
        except Exception as e:  # one bad input must not stop a run of millions
            result.status, result.detail = "failed", f"{type(e).__name__}: {e}"
        if result.status != "ok":
            del crops[n_crops:]
            result.faces = []
        return result

    def extract(self, root: Path, inputs: list[Input]) -> list[Result]:
        """Every face of a batch of inputs (``ROOT/input.rel``), recognition batched across them.

        Each face dict holds FACE_ARRAYS' fields but "owner": ``emb`` (face.normed_embedding),
        ``kps`` (landmark_3d_68), ``pose``, ``bbox``, ``score``, ``frame``. Shared with ``dist-train frontalize``.
        """
        crops: list[np.ndarray] = []
        results = [self._extract_one(root, inp, crops) for inp in inputs]
        if crops:
            emb = iter(self._embed(crops))
            for result in results:
                for face in result.faces:
                    face["emb"] = next(emb)
        return results

    def run(self, root: Path, out: Path, inputs: list[Input]) -> None:
        """Extract a batch of inputs into one cache chunk."""
        write_chunk(out, self.extract(root, inputs))


_WORKER: Extractor | None = None


def _init_worker(*args) -> None:
    global _WORKER
    _WORKER = Extractor(*args, pack=None)


def _run_task(root: Path, out: Path, inputs: list[Input]) -> None:
    _WORKER.run(root, out, inputs)


@dataclass(frozen=True)
class Job:
    """One extract command: where, with which models, and the stage 2 rules."""

    root: Path
    out: Path
    settings: Settings
    face_filter: pairing.FaceFilter
    rules: pairing.PairingRules
    providers: tuple[str, ...]
    workers: int = 1
    batch_size: int = 32


def run_stage1(job: Job, todo: list[Input], pack: Pack, progress) -> None:
    """Extract every input in ``todo`` into the cache, in a process pool when workers > 1."""
    global _WORKER
    images = [i for i in todo if i.kind == "image"]
    tasks = [images[i : i + job.batch_size] for i in range(0, len(images), job.batch_size)]
    tasks += [[i] for i in todo if i.kind == "video"]
    providers = list(job.providers)
    if job.workers == 1:
        _WORKER = Extractor(job.settings, providers, 0, job.batch_size, pack)
        for task in tasks:
            _run_task(job.root, job.out, task)
            progress.update(len(task))
        return
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // job.workers)
    spawn = multiprocessing.get_context("spawn")  # fresh onnxruntime/CUDA state per worker
    init = (job.settings, providers, threads, job.batch_size)
    with ProcessPoolExecutor(job.workers, mp_context=spawn, initializer=_init_worker, initargs=init) as pool:
        futures = {pool.submit(_run_task, job.root, job.out, task): len(task) for task in tasks}
        try:
            for future in as_completed(futures):
                future.result()
                progress.update(futures[future])
        except BaseException:  # Ctrl-C or a dead worker: stop now, finished inputs stay cached
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ---------------------------------------------------------------- stage 2
#
# Stage 2 holds only light metadata per face (pose, box, score, identity, image/frame,
# input, cache row: ~64 bytes) and never the faces' embeddings and landmarks (~2.9 kB)
# all at once: the first pass reads the cache's small members to filter and pair, the
# second copies the paired faces' arrays into an on-disk store, the third writes each
# split's pairs in their shuffled order, gathering GATHER_ROWS rows from the store at a time.

LIGHT_ARRAYS = ("owner", "frame", "pose", "bbox", "score")  # of FACE_ARRAYS: all the first pass reads
GATHER_ROWS = 4096  # pairs gathered from the store at a time while writing (~28 MB of float32)
STORE_PREFIX = "stage2-"  # OUT/.cache/stage2-*/: the store, removed when stage 2 ends
PAIR_FIELDS = ("src_emb", "src_kps", "src_pose", "tgt_emb", "identity", "tgt_centroid")  # what extract writes


@dataclass
class CacheRows:
    """Where stage 2's faces are: face ``ref`` r is row ``r - starts[c]`` of chunk ``c``'s face arrays."""

    chunks: list[Path]
    starts: np.ndarray  # (len(chunks) + 1,) first ref of each chunk


class _Columns:
    """Column arrays appended in pieces, concatenated now and then (millions of tiny arrays cost more than their data)."""

    def __init__(self):
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, part: dict[str, np.ndarray]) -> None:
        self.parts.append(part)
        if len(self.parts) >= 256:
            self.parts = [self.result()]

    def result(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}


def scan_faces(
    out: Path, root: Path, inputs: list[Input], names: list[str]
) -> tuple[pairing.Faces, CacheRows, dict[str, int], list[dict]]:
    """Stage 2's first pass: the per-input members and light face members of every chunk with a current result.

    Returns every face detected as metadata (in input order, each input's faces
    in cache order), where their arrays are, per-input drop counts and problem entries.
    """
    where = scan_cache(out, root, inputs)
    source_of = {inp.rel: s for s, inp in enumerate(inputs)}
    ident = {n: i for i, n in enumerate(names)}
    identity_of = np.array([ident[inp.identity] for inp in inputs], np.int64)
    counts = {"unreadable": 0, "wrong_size": 0, "failed": 0, "no_face": 0, "bad_frame": 0}
    problems: list[tuple[int, dict]] = []
    seen = np.zeros(len(inputs), bool)
    chunks, starts = sorted(set(where.values())), [0]
    columns = _Columns()
    empty = {k: np.zeros((0, *shape), dtype) for k, (shape, dtype) in FACE_ARRAYS.items() if k in LIGHT_ARRAYS}
    columns.add(empty | {"source": np.zeros(0, np.int64), "ref": np.zeros(0, np.int64)})
    for path in chunks:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = {k: z[k] for k in CHUNK_META if k != "stamp"}
                light = {k: z[k] for k in LIGHT_ARRAYS}
        except Exception:  # unreadable since scan_cache read it: its inputs count as missing below
            starts.append(starts[-1])
            continue
        source = np.array([source_of[r] if where.get(r) == path else -1 for r in meta["rel"].tolist()], np.int64)
        valid = np.flatnonzero(source >= 0)
        seen[source[valid]] = True
        ok = (source >= 0) & (meta["status"] == "ok")
        counts["no_face"] += int(meta["no_face"][ok].sum())
        counts["bad_frame"] += int(meta["bad_frames"][ok].sum())
        for i in valid[~ok[valid]].tolist():  # unreadable, wrong_size, failed
            status, s = str(meta["status"][i]), int(source[i])
            counts[status] += 1
            problems.append((s, {"input": inputs[s].rel, "reason": status, "detail": str(meta["detail"][i])}))
        for i in np.flatnonzero(ok & (np.bincount(light["owner"], minlength=len(source)) == 0)).tolist():
            bad, s = int(meta["bad_frames"][i]), int(source[i])
            detail = f"no face in {int(meta['frames'][i]) - bad} frame(s)"
            if bad:
                detail += f", {bad} more did not decode"
            problems.append((s, {"input": inputs[s].rel, "reason": "no_face", "detail": detail}))
        mine = np.flatnonzero(ok[light["owner"]])
        part = {k: v[mine] for k, v in light.items()}
        columns.add(part | {"source": source[part["owner"]], "ref": starts[-1] + mine})
        starts.append(starts[-1] + len(light["owner"]))
    if not seen.all():  # changed while this run was going: extract them next time
        missing = [inputs[s].rel for s in np.flatnonzero(~seen)]
        raise ExtractError(f"{len(missing)} inputs changed during extraction (e.g. {missing[0]}); rerun the command")
    cols = columns.result()
    order = np.argsort(cols["source"], kind="stable")  # input order, each input's faces in cache order
    cols = {k: v[order] for k, v in cols.items()}
    by_frame = np.lexsort((cols["frame"], cols["source"]))  # one group per (input, frame), numbered in that order
    new = np.ones(len(by_frame), bool)
    new[1:] = (np.diff(cols["source"][by_frame]) != 0) | (np.diff(cols["frame"][by_frame]) != 0)
    group = np.empty(len(by_frame), np.int64)
    group[by_frame] = np.cumsum(new) - 1
    faces = pairing.Faces(
        pose=cols["pose"],
        bbox=cols["bbox"],
        score=cols["score"],
        identity=identity_of[cols["source"]],
        group=group,
        source=cols["source"],
        ref=cols["ref"],
    )
    problems.sort(key=lambda p: p[0])
    return faces, CacheRows(chunks, np.array(starts, np.int64)), counts, [p for _, p in problems]


def filtered_inputs(inputs: list[Input], faces: pairing.Faces, reason: np.ndarray) -> list[dict]:
    """Problem entries for inputs with faces of which the filters kept none."""
    n = len(inputs)
    kept = np.bincount(faces.source, weights=reason == "", minlength=n)
    found = np.bincount(faces.source, minlength=n)
    lost = np.flatnonzero((found > 0) & (kept == 0))
    if not len(lost):
        return []
    area = np.prod(faces.bbox[:, 2:] - faces.bbox[:, :2], axis=1)
    order = np.lexsort((-area, faces.source))
    first = order[np.unique(faces.source[order], return_index=True)[1]]  # each input's largest face
    largest = dict(zip(faces.source[first].tolist(), reason[first]))
    per_reason = {r: np.bincount(faces.source, weights=reason == r, minlength=n) for r in set(reason) - {""}}
    problems = []
    for source in lost.tolist():
        detail = ", ".join(f"{int(c[source])} {r}" for r, c in sorted(per_reason.items()) if c[source])
        problems.append({"input": inputs[source].rel, "reason": largest[source], "detail": f"faces: {detail}"})
    return problems


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
        from numpy.lib.format import open_memmap

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
    import shutil
    import tempfile

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


def run_stage2(
    job: Job, inputs: list[Input], names: list[str], problems: list[dict], pack_files: dict, reused: int
) -> dict:
    """Filter, pair, split, write the shard set and the report; returns the report."""
    faces, cache, counts, more = scan_faces(job.out, job.root, inputs, names)
    kept, reason = pairing.select_faces(faces, job.face_filter)
    counts.update(pairing.count_reasons(reason))
    problems = problems + more + filtered_inputs(inputs, faces, reason)
    del reason
    for p in problems:
        if p["reason"] in ("unsupported_file", "outside_identity"):
            counts[p["reason"]] = counts.get(p["reason"], 0) + 1
    pairs, pair_counts = pairing.make_pairs(kept, job.rules)
    counts.update(pair_counts)
    dropped = {k: int(counts.get(k, 0)) for k in DROP_UNITS}
    yaw = np.abs(kept.pose[:, 1])
    summary = {
        "inputs": len(inputs),
        "extracted_now": len(inputs) - reused,
        "reused_from_cache": reused,
        "faces_detected": len(faces),
        "faces_kept": len(kept),
        "frontal_faces": int((yaw <= job.rules.frontal_yaw).sum()),
        "profile_faces": int((yaw >= job.rules.profile_yaw).sum()),
        "pairs": len(pairs),
        "identities": len(names),
        "identities_with_pairs": len(pairs.group_identity),
    }
    report = {"summary": summary, "dropped": dropped, "units": DROP_UNITS, "problems": problems}
    (job.out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    if not len(pairs):
        raise ExtractError(
            f"no profile/frontal pairs: {summary['faces_kept']} faces kept, {summary['frontal_faces']} frontal "
            f"(|yaw| <= {job.rules.frontal_yaw}), {summary['profile_faces']} profile (|yaw| >= {job.rules.profile_yaw}), "
            f"dropped {dropped}; an identity needs both. See {job.out / REPORT_NAME}"
        )
    import insightface
    import onnxruntime

    del faces, yaw  # from here on: the kept faces' and the pairs' metadata, and the store
    split_rows = splits.split_rows(pairs.identity, job.rules.val_fraction, job.rules.test_fraction, job.rules.seed)
    extract_info = {
        "root": str(job.root.resolve()),
        "model_pack": {"dir": str(Path(job.settings.pack).resolve()), "files": pack_files},
        "providers": list(job.providers),
        "settings": {k: v for k, v in asdict(job.settings).items() if k != "pack"},
        "filters": asdict(job.face_filter),
        "pairing": asdict(job.rules),
        "summary": summary,
        "dropped": dropped,
        "report": REPORT_NAME,
    }
    provenance = {
        "tool": "dist-train extract",
        "insightface": insightface.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    entries = write_pairs(job.out, cache, kept, pairs, split_rows)
    write_index(
        job.out,
        entries,
        fields=[k for k in FIELDS if k in PAIR_FIELDS],
        provenance=provenance,
        skipped=dropped,
        extra={"identities": names, "extract": extract_info},
    )
    report["splits"] = {k: len(v) for k, v in split_rows.items()}
    return report


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-train extract",
        description="Run an InsightFace model pack over ROOT/<identity>/** images and videos and write a shard set "
        "of profile->frontal pairs. Resumable: rerun the same command after an interruption.",
    )
    p.add_argument("root", help="input tree: ROOT/<identity>/**/*.jpg|png|... and ROOT/<identity>/*.mp4|avi|...")
    p.add_argument(
        "--pack",
        required=True,
        help="model pack directory in the buffalo_l layout (det_10g.onnx, w600k_r50.onnx, 1k3d68.onnx)",
    )
    p.add_argument("--out", required=True, help="output shard set directory (holds the resumable cache in OUT/.cache)")
    g = p.add_argument_group("inputs")
    g.add_argument("--aligned", action="store_true", help="inputs are 112x112 ArcFace-aligned crops: no detection")
    sampling = g.add_mutually_exclusive_group()
    sampling.add_argument("--every", type=int, help="video: take every k-th frame")
    sampling.add_argument("--fps", type=float, help="video: take this many frames per second (default 2)")
    g = p.add_argument_group("detection and filters")
    g.add_argument("--det-size", type=int, default=640, help="detector input size in pixels (default 640)")
    g.add_argument(
        "--det-thresh", type=float, default=0.3, help="detector threshold; faces below are not seen (default 0.3)"
    )
    g.add_argument(
        "--min-score", type=float, default=0.5, help="drop faces scoring lower, counted as low_score (default 0.5)"
    )
    g.add_argument(
        "--min-size",
        type=float,
        default=40.0,
        help="drop faces whose box is smaller on its shorter side, pixels (default 40)",
    )
    g.add_argument(
        "--keep", choices=pairing.KEEP_POLICIES, default="largest", help="faces kept per image/frame (default largest)"
    )
    g = p.add_argument_group("pairing and splits")
    g.add_argument("--frontal-yaw", type=float, default=20.0, help="|yaw| <= this is frontal (default 20)")
    g.add_argument("--profile-yaw", type=float, default=45.0, help="|yaw| >= this is profile (default 45)")
    g.add_argument("--max-pairs-per-identity", type=int, help="cap on profile faces used per identity")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of identities in val (default 0.1)")
    g.add_argument("--test-fraction", type=float, default=0.0, help="share of identities in test (default 0)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("execution")
    g.add_argument(
        "--workers", type=int, default=1, help="processes, each with its own onnxruntime sessions (default 1)"
    )
    g.add_argument(
        "--batch-size", type=int, default=32, help="faces per recognition batch; images per task (default 32)"
    )
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when onnxruntime has it"
    )
    g.add_argument("--fresh", action="store_true", help="discard OUT/.cache and extract everything again")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args, root: Path, out: Path) -> None:
    if not root.is_dir():
        raise ExtractError(f"input root {str(root)!r} is not a directory")
    if out.resolve().is_relative_to(root.resolve()):
        raise ExtractError(f"--out {str(out)!r} is inside the input root {str(root)!r}; put it elsewhere")
    if args.min_score < args.det_thresh:
        raise ExtractError(
            f"--min-score {args.min_score} is below --det-thresh {args.det_thresh}; faces under it are never seen"
        )
    if args.every is not None and args.every < 1 or args.fps is not None and args.fps <= 0:
        raise ExtractError("--every needs an integer >= 1 and --fps a positive number")
    if args.workers < 1 or args.batch_size < 1 or args.det_size < 32:
        raise ExtractError("--workers and --batch-size must be >= 1 and --det-size >= 32")


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    args = cli.parse_args(build_parser(), argv)
    root, out = Path(args.root), Path(args.out)
    try:
        _check_args(args, root, out)
        job = Job(
            root=root,
            out=out,
            settings=Settings(
                pack=args.pack,
                aligned=args.aligned,
                det_size=args.det_size,
                det_thresh=args.det_thresh,
                every=args.every,
                fps=None if args.every else (args.fps or 2.0),
            ),
            face_filter=pairing.FaceFilter(min_size=args.min_size, min_score=args.min_score, keep=args.keep),
            rules=pairing.PairingRules(
                frontal_yaw=args.frontal_yaw,
                profile_yaw=args.profile_yaw,
                max_pairs_per_identity=args.max_pairs_per_identity,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                seed=args.seed,
            ),
            providers=tuple(choose_providers(args.device)),
            workers=args.workers,
            batch_size=args.batch_size,
        )
        job.rules.check()
        inputs, names, problems = discover(root, args.aligned)
        pack = load_pack(args.pack, list(job.providers))  # fails here, before any work, when the pack is incomplete
        out.mkdir(parents=True, exist_ok=True)
        check_cache_settings(out, job.settings, args.fresh)
        done = scan_cache(out, root, inputs)
        todo = [i for i in inputs if i.rel not in done]
        reused = len(inputs) - len(todo)
        print(
            f"dist-train extract: {len(inputs)} inputs in {len(names)} identity folders, {reused} already extracted; "
            f"models {pack.files} on {job.providers[0]}",
            file=sys.stderr,
        )
        (out / INDEX_NAME).unlink(missing_ok=True)  # the set is incomplete until stage 2 rewrites it
        with tqdm(total=len(inputs), initial=reused, unit="file", desc="extract", disable=args.no_progress) as bar:
            run_stage1(job, todo, pack, bar)
        report = run_stage2(job, inputs, names, problems, pack.files, reused)
    except ValueError as e:  # ExtractError, and the rule checks of pairing
        print(f"dist-train extract: error: {e}", file=sys.stderr)
        return 1
    s = report["summary"]
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items() if v) or "none"
    print(
        f"dist-train extract: {s['pairs']} pairs from {s['identities_with_pairs']} identities "
        f"({s['faces_kept']} of {s['faces_detected']} faces kept: {s['frontal_faces']} frontal, "
        f"{s['profile_faces']} profile); splits {report['splits']}\n"
        f"dropped: {dropped}\nwrote {out / INDEX_NAME}; per-input problems in {out / REPORT_NAME}"
    )
    return 0
