"""Stage 2: filter, pair, split and write, from the cache alone, so changing a rule needs no re-extraction.

It holds only light metadata per face (pose, box, score, identity, image/frame,
input, cache row: ~64 bytes) and never the faces' embeddings and landmarks (~2.9 kB)
all at once: the first pass reads the cache's small members to filter and pair, the
second copies the paired faces' arrays into an on-disk store (``store.py``), the third
writes each split's pairs in their shuffled order, gathering GATHER_ROWS rows at a time.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime

from dist_train.data import splits
from dist_train.data.schema import FIELDS
from dist_train.data.shards import write_index
from dist_train.extract import pairing
from dist_train.extract.cache import CHUNK_META, FACE_ARRAYS, CacheRows, scan_cache
from dist_train.extract.job import ExtractError, Job
from dist_train.extract.sources import Input
from dist_train.extract.store import write_pairs

REPORT_NAME = "extract-report.json"
# What each drop count counts; written to the report and index.json.
DROP_UNITS = {
    "unsupported_file": "files that are neither images nor videos, or not regular files (FIFOs, devices, sockets)",
    "outside_identity": "files directly under ROOT, not in an identity folder",
    "unreadable": "images or videos that could not be decoded (a JPEG cut short included)",
    "too_large": "images over --max-pixels (width x height from the header; never decoded)",
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

LIGHT_ARRAYS = ("owner", "frame", "pose", "bbox", "score")  # of FACE_ARRAYS: all the first pass reads
PAIR_FIELDS = ("src_emb", "src_kps", "src_pose", "tgt_emb", "identity", "tgt_centroid")  # what extract writes


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
    counts = {"unreadable": 0, "too_large": 0, "wrong_size": 0, "failed": 0, "no_face": 0, "bad_frame": 0}
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
        for i in valid[~ok[valid]].tolist():  # unreadable, too_large, wrong_size, failed
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
    import insightface  # lazy, as in models.load_pack (0.9-1.8 s to import); here only for its version

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
