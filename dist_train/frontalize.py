"""Inference API: ``Frontalizer.load(path).frontalize(src_emb, src_kps, src_pose)``.

Numpy in, L2-normalised numpy out, on PyTorch (any checkpoint or consolidated
file) or onnxruntime (an exported ``.onnx``). ``dist-train frontalize`` applies
it to the arrays of an ``.npz`` (``--npz``) or to the faces in photos
(``--images``): those are found, landmarked and embedded by ``extract``'s own
code (model pack loading, ``Extractor``, the face filters of ``pairing``).
With ``--gallery`` it also measures identification and verification against
per-person gallery centroids, before and after frontalization, per |yaw| bucket.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from tqdm import tqdm

from dist_train import cli
from dist_train.data.schema import EMB_DIM, MODEL_INPUTS, N_LANDMARKS, YAW_BUCKETS, dtype_problem, yaw_bucket_index
from dist_train.evaluate import inference_device
from dist_train.export import OUTPUT
from dist_train.extract import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    ExtractError,
    Extractor,
    Input,
    Settings,
    choose_providers,
    filtered_inputs,
    load_pack,
    pairing,
)
from dist_train.extract.cli import add_face_arguments, check_face_arguments
from dist_train.extract.pairing import group_centroids
from dist_train.extract.sources import files_below
from dist_train.metrics import FARS, identification
from dist_train.paths import output_file
from dist_train.weights import load_model


def _provider_device(device: str) -> str:
    """``Frontalizer.load``'s torch-style device as onnxruntime's choice: cpu stays on the CPU, cuda[:N] demands CUDA."""
    return "cuda" if str(device).startswith("cuda") else "auto" if device == "auto" else "cpu"


class Frontalizer:
    def __init__(self, run, backend: str):
        self._run = run
        self.backend = backend

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str = "cpu", precision: str = "fp32") -> Frontalizer:
        """``backend``: "onnx" for .onnx files, "torch" otherwise ("auto" picks by suffix).

        torch: ``device`` and ``precision`` (fp32, or bf16/fp16 autocast) of the forward; outputs are fp32.
        """
        path = Path(path)
        if backend == "auto":
            backend = "onnx" if path.suffix == ".onnx" else "torch"
        if backend == "onnx":
            sess = onnxruntime.InferenceSession(str(path), providers=choose_providers(_provider_device(device)))
            return cls(lambda x: sess.run([OUTPUT], x)[0], backend)

        model, _ = load_model(path)
        device, autocast = inference_device(device, precision)
        model.to(device)

        @torch.no_grad()
        def run(x):
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                out = model(*(torch.from_numpy(x[k]).to(device) for k in MODEL_INPUTS))
            return out.float().cpu().numpy()

        return cls(run, backend)

    def frontalize(self, src_emb, src_kps, src_pose, batch_size: int = 4096) -> np.ndarray:
        """(N,512) profile embeddings, (N,68,3) landmark_3d_68 pixels, (N,3) pose degrees -> (N,512) unit vectors."""
        given = dict(zip(MODEL_INPUTS, map(np.asarray, (src_emb, src_kps, src_pose))))
        problems = [p for p in (dtype_problem(k, a.dtype) for k, a in given.items()) if p]
        if problems:
            raise ValueError("; ".join(problems))
        arrays = {
            "src_emb": np.asarray(src_emb, np.float32).reshape(-1, EMB_DIM),
            "src_kps": np.asarray(src_kps, np.float32).reshape(-1, N_LANDMARKS, 3),
            "src_pose": np.asarray(src_pose, np.float32).reshape(-1, 3),
        }
        n = len(arrays["src_emb"])
        if any(len(a) != n for a in arrays.values()):
            raise ValueError(f"row counts differ: { {k: len(a) for k, a in arrays.items()} }")
        out = (
            np.concatenate(
                [self._run({k: a[i : i + batch_size] for k, a in arrays.items()}) for i in range(0, n, batch_size)]
            )
            if n
            else np.zeros((0, EMB_DIM), np.float32)
        )
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- photos


@dataclass
class FaceSet:
    """The faces kept in a tree of photos (one row each) and what was dropped, per reason, and why."""

    path: np.ndarray  # (N,) str, the photo relative to the tree's root, "/"-separated
    person: np.ndarray  # (N,) str, the photo's folder under the root ("" when the tree has no person folders)
    face: np.ndarray  # (N,) int64, the face's index among its photo's detections (detector order)
    emb: np.ndarray  # (N, 512) float32, face.normed_embedding
    landmarks: np.ndarray  # (N, 68, 3) float32, landmark_3d_68 in photo pixels
    pose: np.ndarray  # (N, 3) float32, face.pose: pitch, yaw, roll in degrees
    bbox: np.ndarray  # (N, 4) float32, x0 y0 x1 y1 pixels
    score: np.ndarray  # (N,) float32, detection score
    photos: int = 0  # image files looked at
    detected: int = 0  # faces found before the filters
    # per reason (extract's names): files (outside_identity, unsupported_file, too_large, unreadable, failed),
    # photos (no_face), faces (low_score, too_small, extra_face)
    dropped: dict[str, int] = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)  # {"input", "reason", "detail"}: photos that gave no face


def find_photos(root: Path, by_person: bool) -> tuple[list, list[dict]]:
    """Image files anywhere below ``root`` (sorted) as extract ``Input``s, and the files that are not used.

    ``by_person``: the tree is ``ROOT/<person>/**``; a photo's person (``Input.identity``) is its folder
    name and files directly in ROOT are listed as ``outside_identity``. Videos and other files are
    listed as ``unsupported_file``.
    """

    if not root.is_dir():
        raise ExtractError(f"{str(root)!r} is not a directory")
    inputs, problems = [], []
    for found in files_below(root, by_identity=by_person, folder="person"):
        if isinstance(found, dict):
            problems.append(found)
            continue
        rel, person, ext = found
        if ext in IMAGE_EXTS:
            inputs.append(Input(rel, person, "image"))
        else:
            why = "a video; frontalize takes photos" if ext in VIDEO_EXTS else f"extension {ext!r}"
            problems.append({"input": rel, "reason": "unsupported_file", "detail": why})
    if not inputs:
        layout = "ROOT/<person>/**/" if by_person else "ROOT/**/"
        raise ExtractError(f"{str(root)!r} holds no photos; expected {layout}*{{{','.join(sorted(IMAGE_EXTS))}}}")
    return inputs, problems


def analyse_photos(
    extractor, root: Path, found: tuple[list, list[dict]], face_filter, batch_size: int, progress=None
) -> FaceSet:
    """The photos ``found`` below ``root`` (`find_photos`) through ``extract``'s Extractor, then extract's
    filters and keep policy (``pairing.select_faces``)."""
    inputs, problems = found[0], list(found[1])
    results = []
    for i in range(0, len(inputs), batch_size):
        results += extractor.extract(root, inputs[i : i + batch_size])
        if progress is not None:
            progress.update(len(inputs[i : i + batch_size]))
    rows = [(s, k, f) for s, r in enumerate(results) for k, f in enumerate(r.faces)]
    source = np.array([s for s, _, _ in rows], np.int64)

    def column(key, shape, dtype=np.float32):
        return np.array([f[key] for _, _, f in rows], dtype).reshape(-1, *shape)

    faces = pairing.Faces(
        pose=column("pose", (3,)),
        bbox=column("bbox", (4,)),
        score=column("score", ()),
        identity=np.zeros(len(rows), np.int64),
        group=source,  # one photo, one group: the keep policy picks per photo
        source=source,
        ref=np.arange(len(rows)),
    )
    kept, reason = pairing.select_faces(faces, face_filter)
    for r in results:  # extract's reasons: unreadable / failed per file, no_face per photo
        if r.status != "ok":
            problems.append({"input": r.inp.rel, "reason": r.status, "detail": r.detail})
        elif not r.faces:
            problems.append({"input": r.inp.rel, "reason": "no_face", "detail": "no face detected"})
    dropped: dict[str, int] = {}
    for p in problems:  # files
        dropped[p["reason"]] = dropped.get(p["reason"], 0) + 1
    problems += filtered_inputs(inputs, faces, reason)  # photos whose faces the filters all dropped
    for name, count in pairing.count_reasons(reason).items():  # faces: low_score, too_small, extra_face
        dropped[name] = dropped.get(name, 0) + count
    problems.sort(key=lambda p: p["input"])
    ref = kept.ref
    return FaceSet(
        path=np.array([inputs[source[r]].rel for r in ref], dtype=str).reshape(-1),
        person=np.array([inputs[source[r]].identity for r in ref], dtype=str).reshape(-1),
        face=np.array([rows[r][1] for r in ref], np.int64),
        emb=column("emb", (EMB_DIM,))[ref],
        landmarks=column("kps", (N_LANDMARKS, 3))[ref],
        pose=faces.pose[ref],
        bbox=faces.bbox[ref],
        score=faces.score[ref],
        photos=len(inputs),
        detected=len(rows),
        dropped=dropped,
        problems=problems,
    )


def person_centroids(faces: FaceSet) -> tuple[np.ndarray, np.ndarray]:
    """(persons, centroids): each person's normalised mean embedding, as extract's ``tgt_centroid``."""

    order = np.argsort(faces.person, kind="stable")
    persons, starts = np.unique(faces.person[order], return_index=True)
    starts = np.append(starts, len(order)).astype(np.int64)
    return persons, group_centroids(faces.emb[order], starts, np.zeros((len(persons), EMB_DIM), np.float32))


def gallery_figures(queries: FaceSet, frontal: np.ndarray, persons: np.ndarray, centroids: np.ndarray) -> dict:
    """Identification and verification of the queries against the gallery centroids, before and after.

    Queries whose person has no centroid are left out (counted). Rows: "all" and
    every |yaw| bucket (``schema.YAW_BUCKETS``) that holds queries.
    """

    known = np.isin(queries.person, persons)
    bucket = yaw_bucket_index(queries.pose[:, 1])
    rows = {"all": known} | {name: known & (bucket == b) for b, name in enumerate(YAW_BUCKETS)}
    figures = {}
    for name, m in rows.items():
        if name != "all" and not m.any():
            continue
        figures[name] = {
            "n": int(m.sum()),
            "before": identification(queries.emb[m], queries.person[m], centroids, persons),
            "after": identification(frontal[m], queries.person[m], centroids, persons),
        }
    return {
        "persons": persons.tolist(),
        "queries": int(known.sum()),
        "queries_without_gallery_person": int((~known).sum()),
        "persons_without_gallery": sorted(set(queries.person[~known].tolist())),
        "figures": figures,
    }


def format_figures(g: dict, gallery_faces: int) -> str:
    """The gallery figures as a table: one row for all queries, one per |yaw| bucket."""

    lines = [
        f"gallery: {len(g['persons'])} persons ({gallery_faces} faces); {g['queries']} query faces of these persons; "
        f"left out: {g['queries_without_gallery_person']} query faces of persons without gallery faces "
        f"({', '.join(g['persons_without_gallery']) or 'none'})",
        f"{'|yaw|':<7}{'n':>6}  {'rank-1 before':>13} {'after':>6}"
        + "".join(f"  {f'TAR@FAR={far:g} before':>20} {'after':>6}" for far in FARS),
    ]
    for name, row in g["figures"].items():
        b, a = row["before"], row["after"]
        cells = f"{name:<7}{row['n']:>6}  {b['rank1']:>13.3f} {a['rank1']:>6.3f}"
        for far in FARS:
            cells += f"  {b['tar_at_far'][f'{far:g}']:>20.3f} {a['tar_at_far'][f'{far:g}']:>6.3f}"
        lines.append(cells)
    return "\n".join(lines)


def torch_device(device: str) -> str:
    """The torch device for ``--device``: as for onnxruntime, CUDA when present (auto) or demanded (cuda)."""

    if device == "cpu" or not torch.cuda.is_available():
        if device == "cuda":
            raise ExtractError("--device cuda, but this torch build sees no CUDA device; use --device cpu")
        return "cpu"
    return "cuda"


def run_photos(args) -> int:
    check_face_arguments(args)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    images, gallery = Path(args.images), Path(args.gallery) if args.gallery else None
    trees = {"images": (images, find_photos(images, by_person=gallery is not None))}  # before the models load
    if gallery is not None:
        trees["gallery"] = (gallery, find_photos(gallery, by_person=True))
    providers = choose_providers(args.device)
    settings = Settings(pack=args.pack, det_size=args.det_size, det_thresh=args.det_thresh, max_pixels=args.max_pixels)
    extractor = Extractor(settings, providers, 0, args.batch_size, load_pack(args.pack, providers))
    model = Frontalizer.load(args.model, args.backend, torch_device(args.device), args.precision)
    face_filter = pairing.FaceFilter(min_size=args.min_size, min_score=args.min_score, keep=args.keep)
    print(
        f"dist-train frontalize: models {extractor.pack.files} on {providers[0]}; frontalizer {args.model} "
        f"({model.backend})",
        file=sys.stderr,
    )

    def analyse(name: str) -> FaceSet:
        root, found = trees[name]
        with tqdm(total=len(found[0]), unit="photo", desc=name, disable=args.no_progress) as bar:
            return analyse_photos(extractor, root, found, face_filter, args.batch_size, bar)

    ref = analyse("gallery") if gallery is not None else None  # first: a gallery without faces stops early
    if ref is not None and not len(ref.path):
        raise ValueError(f"no face kept in the gallery {str(gallery)!r}: {ref.photos} photos, dropped {ref.dropped}")
    queries = analyse("images")
    frontal = model.frontalize(queries.emb, queries.landmarks, queries.pose).astype(np.float32)
    arrays = {
        "path": queries.path,
        "face": queries.face,
        "src_emb": queries.emb,
        "frontal_emb": frontal,
        "landmarks": queries.landmarks,
        "pose": queries.pose,
        "bbox": queries.bbox,
        "score": queries.score,
    }
    out = Path(args.out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")  # where np.savez would write it
    report_path = out.with_suffix(".json")
    summary = {"photos": queries.photos, "faces_detected": queries.detected, "faces": len(queries.path)}
    report = {
        "images": str(images.resolve()),
        "pack": {"dir": str(Path(args.pack).resolve()), "files": extractor.pack.files},
        "model": str(args.model),
        "backend": model.backend,
        "filters": {"min_score": args.min_score, "min_size": args.min_size, "keep": args.keep},
        "summary": summary,
        "dropped": queries.dropped,
        "problems": queries.problems,
    }
    figures = None
    if ref is not None:
        arrays["person"] = queries.person
        persons, centroids = person_centroids(ref)
        figures = gallery_figures(queries, frontal, persons, centroids)
        report["gallery"] = {
            "dir": str(gallery.resolve()),
            "photos": ref.photos,
            "faces": len(ref.path),
            "dropped": ref.dropped,
            "problems": ref.problems,
            **figures,
        }
    np.savez(output_file(out), **arrays)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(queries.dropped.items())) or "none"
    print(
        f"dist-train frontalize: {summary['faces']} faces from {queries.photos} photos "
        f"({summary['faces_detected']} detected) -> {out}\n"
        f"dropped: {reasons}; {len(queries.problems)} inputs that gave no face, with the reason: {report_path}"
    )
    if figures is not None:
        if report["gallery"]["problems"]:
            print(f"gallery: {len(report['gallery']['problems'])} inputs without a face (see {report_path})")
        print(format_figures(figures, len(ref.path)))
    return 0


def run_npz(args) -> int:
    with np.load(args.npz, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    missing = [k for k in MODEL_INPUTS if k not in data]
    if missing:
        raise ValueError(f"{args.npz} lacks arrays {missing}; it needs {list(MODEL_INPUTS)}")
    model = Frontalizer.load(args.model, args.backend, torch_device(args.device), args.precision)
    pred = model.frontalize(*(data[k] for k in MODEL_INPUTS))
    np.savez(output_file(args.out), **data, pred_emb=pred.astype(np.float32))
    print(f"dist-train frontalize: {len(pred)} rows -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(
        prog="dist-train frontalize",
        description="Apply a trained frontalizer to the arrays of an .npz (--npz) or to the faces in photos "
        "(--images, found and embedded by an InsightFace model pack with extract's code).",
    )
    p.add_argument("--model", required=True, help=".onnx, consolidated .safetensors or checkpoint dir")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--npz", help="input with arrays src_emb, src_kps, src_pose")
    source.add_argument(
        "--images",
        metavar="DIR",
        help="photos anywhere below DIR; with --gallery laid out DIR/<person>/** (the folder name is the person)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output .npz: with --npz the inputs' arrays and pred_emb; with --images per face path, face, "
        "src_emb, frontal_emb, landmarks, pose, bbox, score (and person); the photos that gave no face, and why, "
        "go to the same name with .json",
    )
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when onnxruntime (face models) and torch (frontalizer) have it",
    )
    p.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="torch frontalizer autocast (fp16: CUDA)"
    )
    g = p.add_argument_group("photos (--images)")
    g.add_argument("--pack", help="model pack directory in the buffalo_l layout (det_10g, w600k_r50, 1k3d68)")
    g.add_argument(
        "--gallery",
        metavar="DIR",
        help="frontal photos DIR/<person>/**: print rank-1 identification and TAR at FAR 1e-3 / 1e-2 of the "
        "--images faces (laid out one folder per person, same names) against each person's centroid, "
        "before and after frontalization, overall and per |yaw| bucket",
    )
    add_face_arguments(g, unit="photo")
    g.add_argument("--batch-size", type=int, default=32, help="photos per recognition batch (default 32)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    p = build_parser()
    args = cli.parse_args(p, argv)
    if args.images and not args.pack:
        p.error("--images needs --pack (the InsightFace model pack that finds and embeds the faces)")
    if args.npz and (args.pack or args.gallery):
        p.error("--pack and --gallery go with --images, not --npz")
    try:
        return run_photos(args) if args.images else run_npz(args)
    except (ValueError, FileNotFoundError) as e:  # ExtractError is a ValueError
        print(f"dist-train frontalize: error: {e}", file=sys.stderr)
        return 2
