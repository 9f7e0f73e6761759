"""`dist-train inspect`: the data-quality check of a shard set, before any training.

It answers the design notes' data questions: enough profile angles? broken
embeddings? frontal images matched to the wrong frames (pairs far below their
yaw bucket's cos)? duplicated samples? landmarks that do not give the stored
pose? corrupt shards? Text for people, ``--json`` for machines, ``--png`` for
the yaw histogram and cos-vs-yaw plot. It exits 0 whenever it ran, even when
it found problems: finding them is its job.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dist_train.data.pack import ZERO_NORM
from dist_train.data.schema import EMBEDDING_FIELDS, FIELDS, YAW_BUCKETS, YAW_EDGES, finite_rows, yaw_bucket_index
from dist_train.data.shards import ShardSet, ShardSetError, read_split
from dist_train.geometry import pose_from_landmarks, rotation_matrices
from dist_train.metrics import quality, row_cos
from dist_train.paths import output_file

SUSPICIOUS_ROBUST_Z = 6.0  # cos below bucket median - 6 * 1.4826 * MAD: far outside the bucket's spread
MIN_ROBUST_SD = 1e-3  # floor for the MAD-based sd, so a bucket of identical cos values flags nothing by accident
LANDMARK_CHECK_MAX = 1000  # per split: pose_from_landmarks runs one least-squares fit per sample (~0.1 ms)
POSE_DISAGREE_DEG = 10.0
NEARLY_EMPTY_SHARE = 0.02  # a |yaw| >= 45 bucket holding less than this share of its split
PROFILE_BUCKETS = tuple(b for b, lo in zip(YAW_BUCKETS, YAW_EDGES) if lo >= 45.0)
OFF_UNIT = 1e-2  # |norm - 1| beyond float16 rounding
LISTED = 20  # examples listed per finding (counts are always complete)
YAW_HIST_EDGES = np.arange(-90.0, 91.0, 10.0)
PITCH_HIST_EDGES = np.arange(-60.0, 61.0, 10.0)


def _histogram(values: np.ndarray, edges: np.ndarray) -> dict:
    """Counts per bin; values outside the edges go to the first/last bin (the counts still add up)."""
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _norms(a: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.linalg.norm(a.astype(np.float64), axis=1)


def embedding_health(arrays: dict[str, np.ndarray]) -> dict:
    """Per field: rows with non-finite values; per embedding: zero-norm rows and norm statistics."""
    out = {}
    n = len(arrays["identity"])
    for name in (f for f in FIELDS if f in arrays and f != "identity"):
        a = arrays[name]
        entry = {"non_finite_rows": int((~np.isfinite(a.reshape(n, -1)).all(axis=1)).sum())}
        if name in EMBEDDING_FIELDS:
            norm = _norms(a)
            ok = np.isfinite(norm)
            entry["zero_norm_rows"] = int((norm[ok] < ZERO_NORM).sum())
            if ok.any():
                entry["norm"] = {
                    "min": float(norm[ok].min()),
                    "mean": float(norm[ok].mean()),
                    "max": float(norm[ok].max()),
                    "off_unit_rows": int((np.abs(norm[ok] - 1.0) > OFF_UNIT).sum()),
                }
        out[name] = entry
    return out


def bad_rows(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Masks of rows with any non-finite value, and of finite rows with a zero-norm embedding."""
    n = len(arrays["identity"])
    non_finite = ~finite_rows(arrays)
    zero = np.zeros(n, dtype=bool)
    for name in (f for f in EMBEDDING_FIELDS if f in arrays):
        zero |= _norms(arrays[name]) < ZERO_NORM
    return non_finite, zero & ~non_finite


def baseline_quality(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict:
    """Do-nothing quality on clean rows: metrics.quality with pred = src."""
    src = arrays["src_emb"][rows]
    oracle = arrays["oracle_emb"][rows] if "oracle_emb" in arrays else None
    q = quality(src, arrays["tgt_emb"][rows], src, arrays["src_pose"][rows, 1], arrays["identity"][rows], oracle)
    keys = ("n", "baseline") + (("oracle",) if oracle is not None else ())
    out = {
        "identity_baseline_cos": q["identity_baseline_cos"],
        "per_yaw": {b: {k: e[k] for k in keys} for b, e in q["per_yaw"].items()},
        "baseline_impostor_cos": q["baseline_impostor_cos"],
        "baseline_tar_at_far": {far: e["baseline"] for far, e in q["tar_at_far"].items()},
    }
    if oracle is not None:
        out["oracle_cos"] = q["oracle_cos"]
    return out


def suspicious_pairs(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict:
    """Pairs whose cos(src, tgt) is far below their yaw bucket's median (robust z-score).

    A profile embedding of the right person sits in its bucket's spread; one
    paired with the wrong frontal image or frame falls to impostor level.
    """
    index = np.flatnonzero(rows)
    cos = row_cos(arrays["src_emb"][index], arrays["tgt_emb"][index])
    yaw = arrays["src_pose"][index, 1]
    bucket = yaw_bucket_index(yaw)
    z = np.zeros(len(index))
    median = np.zeros(len(index))
    for b in np.unique(bucket):
        m = bucket == b
        med = np.median(cos[m])
        sd = max(1.4826 * np.median(np.abs(cos[m] - med)), MIN_ROBUST_SD)
        z[m] = (cos[m] - med) / sd
        median[m] = med
    flagged = np.flatnonzero(z < -SUSPICIOUS_ROBUST_Z)
    flagged = flagged[np.argsort(z[flagged])]
    listed = [
        {
            "index": int(index[i]),
            "identity": int(arrays["identity"][index[i]]),
            "yaw": round(float(yaw[i]), 2),
            "cos": round(float(cos[i]), 4),
            "bucket_median": round(float(median[i]), 4),
            "robust_z": round(float(z[i]), 1),
        }
        for i in flagged[:LISTED]
    ]
    return {
        "count": int(len(flagged)),
        "rule": f"cos < bucket median - {SUSPICIOUS_ROBUST_Z:g} robust sd",
        "listed": listed,
    }


def duplicate_rows(src_emb: np.ndarray) -> dict:
    """Rows whose src_emb is bit-identical to an earlier row's (the same face stored twice)."""
    _, inverse, counts = np.unique(src_emb, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    groups = [np.flatnonzero(inverse == g).tolist() for g in np.flatnonzero(counts > 1)[:LISTED]]
    return {"count": int(len(src_emb) - len(counts)), "groups": groups}


def landmark_check(arrays: dict[str, np.ndarray], cap: int = LANDMARK_CHECK_MAX) -> dict:
    """Recompute the pose from landmarks (face.pose's own code) for up to ``cap`` evenly spread rows.

    Compares rotations, not Euler angles: near |yaw| = 90 pitch and roll trade
    off (gimbal lock) while the rotation stays the same.
    """
    n = len(arrays["identity"])
    finite = np.flatnonzero(
        np.isfinite(arrays["src_kps"].reshape(n, -1)).all(axis=1) & np.isfinite(arrays["src_pose"]).all(axis=1)
    )
    pick = (
        finite[np.unique(np.linspace(0, len(finite) - 1, min(cap, len(finite))).astype(np.int64))]
        if len(finite)
        else finite
    )
    if not len(pick):
        return {"checked": 0, "of": n, "cap": cap, "disagree": 0, "listed": []}
    stored = arrays["src_pose"][pick]
    recomputed = pose_from_landmarks(arrays["src_kps"][pick])
    r1, r2 = rotation_matrices(stored), rotation_matrices(recomputed)
    cos_angle = (np.einsum("nij,nij->n", r1, r2) - 1.0) / 2.0
    angle = np.degrees(np.arccos(np.clip(cos_angle, -1.0, 1.0)))
    bad = np.flatnonzero(angle > POSE_DISAGREE_DEG)
    listed = [
        {
            "index": int(pick[i]),
            "identity": int(arrays["identity"][pick[i]]),
            "stored_pose": [round(float(v), 1) for v in stored[i]],
            "landmark_pose": [round(float(v), 1) for v in recomputed[i]],
            "angle_deg": round(float(angle[i]), 1),
        }
        for i in bad[np.argsort(-angle[bad])][:LISTED]
    ]
    return {
        "checked": int(len(pick)),
        "of": n,
        "cap": cap,
        "disagree": int(len(bad)),
        "threshold_deg": POSE_DISAGREE_DEG,
        "angle_deg": {
            "median": float(np.median(angle)),
            "p95": float(np.percentile(angle, 95)),
            "max": float(angle.max()),
        },
        "listed": listed,
    }


def coverage_warnings(split: str, bucket_counts: dict[str, int], n: int) -> list[str]:
    out = []
    for b in PROFILE_BUCKETS:
        c = bucket_counts.get(b, 0)
        if n and c < NEARLY_EMPTY_SHARE * n:
            out.append(
                f"split {split}: |yaw| bucket {b} holds only {c} of {n} samples ({100 * c / n:.1f}%); "
                "the model sees almost no profiles at that angle: add data there"
            )
    return out


def inspect_split(shard_set: ShardSet, split: str) -> tuple[dict, dict]:
    """One split's report, plus the per-sample arrays the plot and the cross-split checks need."""
    errors: list[str] = []

    def on_error(exc: Exception) -> bool:
        errors.append(f"{type(exc).__name__}: {exc}")
        return True

    arrays = read_split(shard_set, split, on_error=on_error)
    n = len(arrays["identity"])
    expected = shard_set.n_samples(split)
    non_finite, zero_norm = bad_rows(arrays)
    rows = ~(non_finite | zero_norm)  # clean rows: the ones cos statistics use
    yaw = arrays["src_pose"][:, 1]
    finite_pose = np.isfinite(arrays["src_pose"]).all(axis=1)
    buckets = yaw_bucket_index(yaw[finite_pose])
    bucket_counts = {b: int((buckets == i).sum()) for i, b in enumerate(YAW_BUCKETS)}
    report = {
        "n_samples": n,
        "n_expected": expected,
        "bad_samples": max(expected - n, 0),
        "bad_blocks": len(errors),
        "read_errors": errors[:LISTED],
        "n_identities": int(len(np.unique(arrays["identity"]))),
        "yaw_bucket_counts": bucket_counts,
        "yaw_histogram": _histogram(yaw[finite_pose], YAW_HIST_EDGES),
        "pitch_histogram": _histogram(arrays["src_pose"][finite_pose, 0], PITCH_HIST_EDGES),
        "fields": embedding_health(arrays),
        "non_finite_rows": int(non_finite.sum()),
        "zero_norm_rows": int(zero_norm.sum()),
        "clean_rows": int(rows.sum()),
    }
    if rows.any():
        report.update(baseline_quality(arrays, rows))
        report["suspicious_pairs"] = suspicious_pairs(arrays, rows)
    else:
        report["suspicious_pairs"] = {"count": 0, "listed": []}
    report["duplicates"] = duplicate_rows(arrays["src_emb"])
    report["landmarks"] = landmark_check(arrays)
    report["warnings"] = split_warnings(split, report)
    plot_data = {
        "yaw": yaw[rows],
        "cos": row_cos(arrays["src_emb"][rows], arrays["tgt_emb"][rows]),
        "identity": arrays["identity"],
        "src_emb": arrays["src_emb"],
    }
    if "oracle_emb" in arrays:
        plot_data["oracle_cos"] = row_cos(arrays["oracle_emb"][rows], arrays["tgt_emb"][rows])
    return report, plot_data


def split_warnings(split: str, r: dict) -> list[str]:
    w = coverage_warnings(split, r["yaw_bucket_counts"], r["n_samples"])
    if r["bad_samples"] or r["bad_blocks"]:
        w.append(
            f"split {split}: {r['bad_samples']} of {r['n_expected']} samples unreadable "
            f"({r['bad_blocks']} read errors); re-create or re-copy the damaged shards"
        )
    if r["non_finite_rows"] or r["zero_norm_rows"]:
        w.append(
            f"split {split}: {r['non_finite_rows']} rows with non-finite values, {r['zero_norm_rows']} rows with a "
            "zero-norm embedding; re-pack the data (pack skips and counts such rows)"
        )
    if r["suspicious_pairs"]["count"]:
        w.append(
            f"split {split}: {r['suspicious_pairs']['count']} suspicious pairs far below their yaw bucket's cos; "
            "check that their frontal image belongs to the same person and video"
        )
    if r["duplicates"]["count"]:
        w.append(f"split {split}: {r['duplicates']['count']} duplicate rows (identical src_emb)")
    if r["landmarks"]["disagree"]:
        w.append(
            f"split {split}: {r['landmarks']['disagree']} of {r['landmarks']['checked']} checked samples have a stored "
            f"pose more than {POSE_DISAGREE_DEG:g} deg from the pose of their landmarks; pose and landmarks may come "
            "from different faces or frames"
        )
    return w


def cross_split(data: dict[str, dict]) -> dict:
    """Leaks between splits: identities in more than one split, src_emb rows that also occur in another split."""
    if len(data) < 2 or not sum(len(d["src_emb"]) for d in data.values()):
        return {"identity_overlap": 0, "duplicate_rows": 0}
    ids = [set(np.unique(d["identity"]).tolist()) for d in data.values()]
    overlap = set().union(*[a & b for i, a in enumerate(ids) for b in ids[i + 1 :]])
    which = np.concatenate([np.full(len(d["src_emb"]), i) for i, d in enumerate(data.values())])
    _, group = np.unique(np.concatenate([d["src_emb"] for d in data.values()]), axis=0, return_inverse=True)
    group = group.reshape(-1)
    lowest = np.full(group.max() + 1, len(data))
    highest = np.full(group.max() + 1, -1)
    np.minimum.at(lowest, group, which)
    np.maximum.at(highest, group, which)
    return {"identity_overlap": len(overlap), "duplicate_rows": int((lowest[group] != highest[group]).sum())}


def inspect(path: str | Path, split: str = "all") -> tuple[dict, dict]:
    """The whole report (JSON-ready) and the per-split plot data."""
    shard_set = ShardSet.open(path)
    if split != "all":
        shard_set.split(split)  # raises ShardSetError naming the splits there are
    names = shard_set.splits if split == "all" else [split]
    reports, data = {}, {}
    for name in names:
        reports[name], data[name] = inspect_split(shard_set, name)
    leaks = cross_split(data)
    total = {
        "dir": str(path),
        "splits_inspected": names,
        "n_samples": sum(r["n_samples"] for r in reports.values()),
        "n_identities": int(len(np.unique(np.concatenate([d["identity"] for d in data.values()])))),
        "bad_samples": sum(r["bad_samples"] for r in reports.values()),
        "bad_blocks": sum(r["bad_blocks"] for r in reports.values()),
        "non_finite_rows": sum(r["non_finite_rows"] for r in reports.values()),
        "zero_norm_rows": sum(r["zero_norm_rows"] for r in reports.values()),
        "suspicious_pairs": sum(r["suspicious_pairs"]["count"] for r in reports.values()),
        "duplicates": sum(r["duplicates"]["count"] for r in reports.values()),
        "landmark_disagreements": sum(r["landmarks"]["disagree"] for r in reports.values()),
        "cross_split": leaks,
    }
    total.update(pooled_quality(reports))
    warnings = [w for r in reports.values() for w in r["warnings"]]
    if leaks["identity_overlap"] or leaks["duplicate_rows"]:
        warnings.append(
            f"{leaks['identity_overlap']} identities and {leaks['duplicate_rows']} src_emb rows occur in more than one "
            "split: held-out metrics would be optimistic; re-split by identity (dist-train pack does)"
        )
    total["warnings"] = warnings
    total["splits"] = reports
    return total, data


def pooled_quality(reports: dict[str, dict]) -> dict:
    """Sample-weighted means over the inspected splits (each split's figures come from metrics.quality)."""
    out: dict = {"per_yaw": {}}
    with_cos = [r for r in reports.values() if "identity_baseline_cos" in r]
    n = sum(r["clean_rows"] for r in with_cos)
    if not n:
        out["identity_baseline_cos"] = None
        return out
    for key in ("identity_baseline_cos", "oracle_cos"):
        if all(key in r for r in with_cos):
            out[key] = sum(r[key] * r["clean_rows"] for r in with_cos) / n
    for b in YAW_BUCKETS:
        entries = [r["per_yaw"][b] for r in with_cos if b in r["per_yaw"]]
        if entries:
            m = sum(e["n"] for e in entries)
            out["per_yaw"][b] = {"n": m} | {
                k: sum(e[k] * e["n"] for e in entries) / m for k in ("baseline", "oracle") if k in entries[0]
            }
    return out


def format_text(report: dict) -> str:
    lines = [f"shard set {report['dir']}: splits {', '.join(report['splits_inspected'])}"]
    for name, r in report["splits"].items():
        lines.append("")
        lines.append(
            f"[{name}] {r['n_samples']} samples ({r['n_expected']} in index.json, {r['bad_samples']} unreadable, "
            f"{r['bad_blocks']} read errors), {r['n_identities']} identities"
        )
        lines.append("  |yaw| bucket   " + "".join(f"{b:>8}" for b in YAW_BUCKETS))
        lines.append("  samples        " + "".join(f"{r['yaw_bucket_counts'][b]:>8}" for b in YAW_BUCKETS))
        for key in ("baseline", "oracle"):
            if any(key in e for e in r.get("per_yaw", {}).values()):
                cells = "".join(
                    f"{r['per_yaw'][b][key]:>8.3f}" if b in r["per_yaw"] else f"{'-':>8}" for b in YAW_BUCKETS
                )
                lines.append(f"  {key + ' cos':<15}{cells}")
        yh = r["yaw_histogram"]
        lines.append("  yaw  -90..90 by 10: " + " ".join(map(str, yh["counts"])))
        ph = r["pitch_histogram"]
        lines.append("  pitch -60..60 by 10: " + " ".join(map(str, ph["counts"])))
        if "identity_baseline_cos" in r:
            cos = f"  identity baseline cos {r['identity_baseline_cos']:.4f}"
            if "oracle_cos" in r:
                cos += f", oracle cos {r['oracle_cos']:.4f}"
            lines.append(cos + f", baseline impostor cos {r['baseline_impostor_cos']:.4f}")
        for field, h in r["fields"].items():
            if "norm" in h:
                nm = h["norm"]
                lines.append(
                    f"  {field:<13} norm {nm['min']:.4f}..{nm['max']:.4f} (mean {nm['mean']:.4f}, "
                    f"{nm['off_unit_rows']} off unit), {h['non_finite_rows']} non-finite, {h['zero_norm_rows']} zero-norm"
                )
            elif h["non_finite_rows"]:
                lines.append(f"  {field:<13} {h['non_finite_rows']} non-finite rows")
        sp = r["suspicious_pairs"]
        lines.append(f"  suspicious pairs: {sp['count']}" + (f" ({sp['rule']})" if sp["count"] else ""))
        for e in sp["listed"][:5]:
            lines.append(
                f"    index {e['index']} identity {e['identity']} yaw {e['yaw']:.1f}: cos {e['cos']:.3f} "
                f"vs bucket median {e['bucket_median']:.3f} (z {e['robust_z']})"
            )
        lines.append(f"  duplicate rows (identical src_emb): {r['duplicates']['count']}")
        lm = r["landmarks"]
        line = f"  landmarks: pose recomputed for {lm['checked']} of {lm['of']} samples (capped at {lm['cap']})"
        if lm["checked"]:
            line += (
                f", {lm['disagree']} differ from the stored pose by > {POSE_DISAGREE_DEG:g} deg "
                f"(median {lm['angle_deg']['median']:.2f}, max {lm['angle_deg']['max']:.1f} deg)"
            )
        lines.append(line)
    lines.append("")
    overall = f"all inspected: {report['n_samples']} samples, {report['n_identities']} identities"
    if report.get("identity_baseline_cos") is not None:
        overall += f", identity baseline cos {report['identity_baseline_cos']:.4f}"
        if "oracle_cos" in report:
            overall += f", oracle cos {report['oracle_cos']:.4f}"
    lines.append(overall)
    lines.append("sample indices count rows in shard order within a split; unreadable blocks shift later indices")
    if report["warnings"]:
        lines.append(f"{len(report['warnings'])} warning(s):")
        lines += [f"  WARNING {w}" for w in report["warnings"]]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def plot(report: dict, data: dict[str, dict], path: str | Path) -> None:
    """Yaw histogram, pitch histogram and cos(src, tgt) against |yaw| with bucket means (and the oracle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, r in report["splits"].items():
        for ax, key in ((axes[0], "yaw_histogram"), (axes[1], "pitch_histogram")):
            h = r[key]
            ax.stairs(h["counts"], h["edges"], label=name)
    axes[0].set(title="yaw (deg)", ylabel="samples")
    axes[1].set(title="pitch (deg)")
    ax = axes[2]
    rng = np.random.default_rng(0)
    centres = [(a + b) / 2 for a, b in zip(YAW_EDGES[:-1], YAW_EDGES[1:])]
    for name, d in data.items():
        show = rng.permutation(len(d["cos"]))[:4000]
        ax.scatter(np.abs(d["yaw"][show]), d["cos"][show], s=2, alpha=0.3, label=f"{name} cos(src, tgt)")
        per_yaw = report["splits"][name].get("per_yaw", {})
        xs = [c for c, b in zip(centres, YAW_BUCKETS) if b in per_yaw]
        ax.plot(xs, [per_yaw[b]["baseline"] for b in YAW_BUCKETS if b in per_yaw], "o-", label=f"{name} baseline mean")
        if "oracle_cos" in d:
            ax.plot(xs, [per_yaw[b]["oracle"] for b in YAW_BUCKETS if b in per_yaw], "s--", label=f"{name} oracle mean")
    ax.set(title="identity baseline cos vs |yaw|", xlabel="|yaw| (deg)", ylabel="cos")
    for a in axes:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-train inspect", description=__doc__.splitlines()[0])
    p.add_argument("dir", help="shard set directory (holds index.json)")
    p.add_argument("--split", default="all", help="a split name, or 'all' (default)")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--png", help="also write the yaw histograms and cos-vs-yaw plot here")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        report, data = inspect(args.dir, args.split)
    except ShardSetError as e:
        print(f"dist-train inspect: error: {e}", file=sys.stderr)
        return 2
    print(format_text(report))
    if args.json:
        output_file(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.png:
        plot(report, data, output_file(args.png))
    return 0
