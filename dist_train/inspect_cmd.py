"""`dist-train inspect`: the data-quality check of a shard set, before any training.

It answers the design notes' data questions: enough profile angles? broken
embeddings? frontal images matched to the wrong frames (pairs far below their
yaw bucket's cos)? duplicated samples? landmarks that do not give the stored
pose? corrupt shards? Text for people, ``--json`` for machines, ``--png`` for
the yaw histogram and cos-vs-yaw plot. It exits 0 whenever it ran, even when
it found problems: finding them is its job.

Memory stays bounded whatever the split's size: a split streams by one decoded
block at a time (``iter_blocks``) into running sums, histograms and seeded
samples. Per row only an 8-byte src_emb hash is kept (duplicates and leaks
between splits), per identity its id. Every count is exact; the impostor cos
and TAR@FAR come from a MAX_PAIR_SAMPLES sample of clean rows, as before, and
the suspicious-pair rule uses bucket medians and MADs read off COS_BIN-wide
histograms (each within COS_BIN of the exact value). A second streaming pass
re-reads only the shards that hold a suspicious pair, to count and list them.

It also reports the data's ceiling (``ceiling.TargetCeiling``): how well the
frontal targets agree with their own identity, from pairs of distinct frontal
embeddings of one identity, overall and per |yaw| bucket of the paired
sources, with a 95 % interval; no model's mean cos to a frontal can exceed it.
``ceiling.data_ceiling`` computes the same figure for one split, for eval and report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dist_train import cli
from dist_train.ceiling import (
    SAMPLE_SEED,
    IdentitySet,
    TargetCeiling,
    ceiling_report,
    ceiling_rows,
    pool_pair_stats,
    row_hashes,
    row_norms,
)
from dist_train.data.blocks import BlockTable, iter_blocks, split_table
from dist_train.data.schema import (
    EMBEDDING_FIELDS,
    FIELDS,
    REQUIRED,
    YAW_BUCKETS,
    YAW_EDGES,
    ZERO_NORM,
    finite_rows,
    yaw_bucket_index,
)
from dist_train.data.shards import ShardSet, ShardSetError
from dist_train.geometry import pose_from_landmarks, rotation_matrices
from dist_train.metrics import MAX_PAIR_SAMPLES, impostor_and_tar, row_cos
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
COS_BIN = 1e-5  # cos histogram bin per yaw bucket: 200k bins x 6 buckets = 9.6 MB, medians and MADs within 1e-5
PLOT_SAMPLES = 4000  # clean rows kept per split for the cos-vs-yaw scatter (the plot shows at most 4000)


def _hist_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin; values outside the edges go to the first/last bin (the counts still add up)."""
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]


def _at_ranks(values: np.ndarray, weights: np.ndarray, ranks: list[int]) -> np.ndarray:
    """The 0-based ``ranks``-th smallest of a multiset where sorted ``values[i]`` occurs ``weights[i]`` times."""
    return values[np.searchsorted(np.cumsum(weights), ranks, side="right")]


class Reservoir:
    """A uniform sample of at most ``size`` rows of a stream: the rows with the smallest seeded random keys.

    Bounded memory for figures that need whole rows (impostor pairs, the
    scatter plot); the same rows in the same order give the same sample.
    """

    def __init__(self, size: int, seed: int = SAMPLE_SEED):
        self.size, self.rng = size, np.random.default_rng(seed)
        self.keys = np.full(size, np.inf)  # inf: an empty slot
        self.cols: dict[str, np.ndarray] = {}

    def add(self, cols: dict[str, np.ndarray]) -> None:
        keys = self.rng.random(len(next(iter(cols.values()))))
        cand = np.flatnonzero(keys < self.keys.max())
        if not len(cand):
            return
        keep = np.argpartition(np.concatenate([self.keys, keys[cand]]), self.size - 1)[: self.size]
        entering = cand[keep[keep >= self.size] - self.size]
        kept = np.zeros(self.size, dtype=bool)
        kept[keep[keep < self.size]] = True
        freed = np.flatnonzero(~kept)  # as many slots as rows entering
        self.keys[freed] = keys[entering]
        for k, v in cols.items():
            if k not in self.cols:
                self.cols[k] = np.zeros((self.size, *v.shape[1:]), v.dtype)
            self.cols[k][freed] = v[entering]

    def rows(self) -> dict[str, np.ndarray]:
        """The sampled rows, in slot order."""
        filled = np.isfinite(self.keys)
        return {k: v[filled] for k, v in self.cols.items()}


class CosHistogram:
    """cos(src, tgt) counts per yaw bucket in COS_BIN bins: bucket medians and MADs without keeping the values."""

    def __init__(self):
        self.n_bins = int(round(2.0 / COS_BIN))
        self.counts = np.zeros((len(YAW_BUCKETS), self.n_bins), np.int64)

    def add(self, bucket: np.ndarray, cos: np.ndarray) -> None:
        idx = np.clip(((cos + 1.0) / COS_BIN).astype(np.int64), 0, self.n_bins - 1)
        np.add.at(self.counts, (bucket, idx), 1)

    def median_sd(self, b: int) -> tuple[float, float] | None:
        """Bucket b's median and robust sd (1.4826 MAD, floored), from bin centres: each within COS_BIN."""
        nz = np.flatnonzero(self.counts[b])
        if not len(nz):
            return None
        weights = self.counts[b, nz]
        n = int(weights.sum())
        ranks = [(n - 1) // 2, n // 2]  # np.median's two middle ranks
        centres = -1.0 + (nz + 0.5) * COS_BIN
        median = float(_at_ranks(centres, weights, ranks).mean())
        dev = np.abs(centres - median)
        order = np.argsort(dev, kind="stable")
        mad = float(_at_ranks(dev[order], weights[order], ranks).mean())
        return median, max(1.4826 * mad, MIN_ROBUST_SD)


class FieldHealth:
    """One field's running health figures: non-finite rows; for embeddings zero-norm rows and norm statistics."""

    def __init__(self, embedding: bool):
        self.embedding = embedding
        self.non_finite = self.zero_norm = self.n_ok = self.off_unit = 0
        self.norm_sum, self.norm_min, self.norm_max = 0.0, np.inf, -np.inf

    def add(self, a: np.ndarray, norm: np.ndarray | None) -> None:
        if norm is None:
            self.non_finite += int((~np.isfinite(a.reshape(len(a), -1)).all(axis=1)).sum())
            return
        ok = np.isfinite(norm)  # float64 norms of float32 rows overflow never: not finite = a non-finite value
        self.non_finite += int((~ok).sum())
        norm = norm[ok]
        self.zero_norm += int((norm < ZERO_NORM).sum())
        if len(norm):
            self.n_ok += len(norm)
            self.norm_sum += float(norm.sum())
            self.norm_min, self.norm_max = min(self.norm_min, float(norm.min())), max(self.norm_max, float(norm.max()))
            self.off_unit += int((np.abs(norm - 1.0) > OFF_UNIT).sum())

    def report(self) -> dict:
        entry: dict = {"non_finite_rows": self.non_finite}
        if self.embedding:
            entry["zero_norm_rows"] = self.zero_norm
            if self.n_ok:
                entry["norm"] = {
                    "min": self.norm_min,
                    "mean": self.norm_sum / self.n_ok,
                    "max": self.norm_max,
                    "off_unit_rows": self.off_unit,
                }
        return entry


def bad_rows(block: dict[str, np.ndarray], norms: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Masks of rows with any non-finite value, and of finite rows with a zero-norm embedding."""
    non_finite = ~finite_rows(block)
    zero = np.zeros(len(non_finite), dtype=bool)
    for norm in norms.values():
        zero |= norm < ZERO_NORM
    return non_finite, zero & ~non_finite


def block_norms(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each embedding's row norms, computed once a block: health figures and bad rows share them."""
    return {f: row_norms(block[f]) for f in EMBEDDING_FIELDS if f in block}


def clean_part(
    block: dict[str, np.ndarray], norms: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The bad-row masks, and the clean rows' src, tgt, [oracle], yaw, identity, row, cos and yaw bucket.

    Clean rows (finite, no zero-norm embedding) are the ones cos statistics use.
    """
    non_finite, zero = bad_rows(block, norms)
    keep = ("src_emb", "tgt_emb", "oracle_emb", "identity")
    clean = {k: block[k] for k in keep if k in block} | {"yaw": block["src_pose"][:, 1]}
    clean["row"] = np.arange(len(non_finite))
    bad = non_finite | zero
    if bad.any():
        clean = {k: v[~bad] for k, v in clean.items()}
    clean["cos"] = row_cos(clean["src_emb"], clean["tgt_emb"])
    clean["bucket"] = yaw_bucket_index(clean["yaw"])
    return clean, non_finite, zero


class LandmarkRows:
    """The rows landmark_check recomputes, collected as they stream by.

    Up to ``cap`` row indices spread evenly over the split's index.json count
    (known before reading); picked rows with a non-finite pose or landmarks are skipped.
    """

    def __init__(self, n_expected: int, cap: int = LANDMARK_CHECK_MAX):
        self.cap = cap
        m = min(cap, n_expected)
        self.picks = np.unique(np.linspace(0, n_expected - 1, m).astype(np.int64)) if m > 0 else np.zeros(0, np.int64)
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, block: dict[str, np.ndarray], start: int) -> None:
        lo, hi = np.searchsorted(self.picks, [start, start + len(block["identity"])])
        if lo == hi:
            return
        local = self.picks[lo:hi] - start
        kps, pose = block["src_kps"][local], block["src_pose"][local]
        ok = np.isfinite(kps.reshape(len(local), -1)).all(axis=1) & np.isfinite(pose).all(axis=1)
        if ok.any():
            self.parts.append(
                {"index": local[ok] + start, "identity": block["identity"][local[ok]], "kps": kps[ok], "pose": pose[ok]}
            )

    def rows(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]} if self.parts else {}


class SplitScan:
    """The first pass over a split: every figure of its report except the suspicious pairs, in bounded state."""

    def __init__(self, n_expected: int):
        self.n = self.non_finite = self.zero_norm = self.clean = self.n_errors = 0
        self.errors: list[str] = []  # the first LISTED read errors
        self.ids = IdentitySet()
        self.hashes: list[np.ndarray] = []
        self.bucket_counts = np.zeros(len(YAW_BUCKETS), np.int64)
        self.yaw_hist = np.zeros(len(YAW_HIST_EDGES) - 1, np.int64)
        self.pitch_hist = np.zeros(len(PITCH_HIST_EDGES) - 1, np.int64)
        self.fields: dict[str, FieldHealth] = {}
        self.cos_sum = {k: np.zeros(len(YAW_BUCKETS)) for k in ("baseline", "oracle")}
        self.cos_n = np.zeros(len(YAW_BUCKETS), np.int64)
        self.oracle_rows = 0  # clean rows that carried oracle_emb: oracle figures only when all did
        self.cos_hist = CosHistogram()
        self.pairs = Reservoir(MAX_PAIR_SAMPLES)
        self.plot = Reservoir(PLOT_SAMPLES)
        self.landmarks = LandmarkRows(n_expected)
        self.shards: list[tuple[BlockTable, int, np.ndarray]] = []  # (shard's blocks, first row, lowest cos per bucket)
        self.ceiling = TargetCeiling()

    def on_error(self, exc: Exception) -> bool:
        """iter_blocks' callback: count and skip a bad tar or block."""
        self.n_errors += 1
        if len(self.errors) < LISTED:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        return True

    def run(self, table: BlockTable) -> SplitScan:
        """Stream the shards one by one (so the second pass can re-read only the shards it needs)."""
        for s in range(len(table.paths)):
            self.shards.append((table.shard(s), self.n, np.full(len(YAW_BUCKETS), np.inf)))
            for block in iter_blocks(self.shards[-1][0], on_error=self.on_error):
                self.add(block)
        return self

    def add(self, block: dict[str, np.ndarray]) -> None:
        start, n = self.n, len(block["identity"])
        if not n:
            return
        self.n += n
        self.ids.add(block["identity"])
        self.hashes.append(row_hashes(block["src_emb"]))
        self.landmarks.add(block, start)
        pose = block["src_pose"][np.isfinite(block["src_pose"]).all(axis=1)]
        self.bucket_counts += np.bincount(yaw_bucket_index(pose[:, 1]), minlength=len(YAW_BUCKETS))
        self.yaw_hist += _hist_counts(pose[:, 1], YAW_HIST_EDGES)
        self.pitch_hist += _hist_counts(pose[:, 0], PITCH_HIST_EDGES)
        norms = block_norms(block)
        for name in (f for f in block if f != "identity"):
            self.fields.setdefault(name, FieldHealth(name in EMBEDDING_FIELDS)).add(block[name], norms.get(name))
        ok = ceiling_rows(block, norms)
        self.ceiling.add(block["identity"][ok], yaw_bucket_index(block["src_pose"][ok, 1]), block["tgt_emb"][ok])
        clean, non_finite, zero = clean_part(block, norms)
        self.non_finite += int(non_finite.sum())
        self.zero_norm += int(zero.sum())
        if len(clean["cos"]):
            self.add_clean(clean)

    def add_clean(self, c: dict[str, np.ndarray]) -> None:
        """Per-bucket cos sums and histograms, the shard's lowest cos per bucket, and the row samples."""
        m = len(YAW_BUCKETS)
        self.clean += len(c["cos"])
        self.cos_n += np.bincount(c["bucket"], minlength=m)
        self.cos_sum["baseline"] += np.bincount(c["bucket"], weights=c["cos"], minlength=m)
        self.cos_hist.add(c["bucket"], c["cos"])
        np.minimum.at(self.shards[-1][2], c["bucket"], c["cos"])
        sample = {"yaw": c["yaw"], "cos": c["cos"]}
        if "oracle_emb" in c:
            oracle = row_cos(c["oracle_emb"], c["tgt_emb"])
            self.cos_sum["oracle"] += np.bincount(c["bucket"], weights=oracle, minlength=m)
            self.oracle_rows += len(oracle)
            sample["oracle_cos"] = oracle
        self.pairs.add({"src": c["src_emb"], "tgt": c["tgt_emb"], "id": c["identity"]})
        self.plot.add(sample)


def baseline_quality(scan: SplitScan) -> dict:
    """Do-nothing quality on clean rows, with pred = src: what a model has to beat.

    The cos means (overall, per yaw bucket) are exact; impostor cos and TAR@FAR
    come from metrics.impostor_and_tar on a seeded MAX_PAIR_SAMPLES sample of
    clean rows (all of them when there are fewer, as the metric itself samples).
    """
    oracle = scan.oracle_rows == scan.clean
    per_yaw = {}
    for i, b in enumerate(YAW_BUCKETS):
        if scan.cos_n[i]:
            per_yaw[b] = {"n": int(scan.cos_n[i])} | {
                k: float(scan.cos_sum[k][i] / scan.cos_n[i])
                for k in ("baseline", "oracle")
                if k == "baseline" or oracle
            }
    pairs = scan.pairs.rows()
    imp = impostor_and_tar(pairs["src"], pairs["tgt"], pairs["id"])
    out = {
        "identity_baseline_cos": float(scan.cos_sum["baseline"].sum() / scan.clean),
        "per_yaw": per_yaw,
        "baseline_impostor_cos": imp["impostor_cos"],
        "baseline_tar_at_far": imp["tar_at_far"],
    }
    if oracle:
        out["oracle_cos"] = float(scan.cos_sum["oracle"].sum() / scan.clean)
    return out


def _robust_stats(scan: SplitScan) -> tuple[np.ndarray, np.ndarray]:
    """Per yaw bucket: median and robust sd of cos (nan median for an empty bucket)."""
    stats = [scan.cos_hist.median_sd(b) for b in range(len(YAW_BUCKETS))]
    return np.array([s[0] if s else np.nan for s in stats]), np.array([s[1] if s else 1.0 for s in stats])


def suspicious_pairs(scan: SplitScan) -> dict:
    """Pairs whose cos(src, tgt) is far below their yaw bucket's median (robust z-score).

    A profile embedding of the right person sits in its bucket's spread; one
    paired with the wrong frontal image or frame falls to impostor level. The
    medians and MADs come from the first pass's histograms (within COS_BIN);
    this second pass re-reads only the shards whose lowest cos in a bucket is
    flagged (z is monotonic in cos), so on clean data it reads nothing.
    """
    median, sd = _robust_stats(scan)
    count, worst = 0, []
    for shard, start, lowest in scan.shards:
        with np.errstate(invalid="ignore"):
            if not ((lowest - median) / sd < -SUSPICIOUS_ROBUST_Z).any():
                continue
        for block in iter_blocks(shard, on_error=lambda exc: True):  # errors were counted by the first pass
            c, _, _ = clean_part(block, block_norms(block))
            z = (c["cos"] - median[c["bucket"]]) / sd[c["bucket"]]
            flagged = np.flatnonzero(z < -SUSPICIOUS_ROBUST_Z)
            count += len(flagged)
            block_worst = flagged[np.argsort(z[flagged], kind="stable")][:LISTED]
            worst = sorted(worst + [_suspicious_entry(c, i, start, z, median) for i in block_worst])[:LISTED]
            start += len(block["identity"])
    return {
        "count": count,
        "rule": f"cos < bucket median - {SUSPICIOUS_ROBUST_Z:g} robust sd (medians, MADs from {COS_BIN:g} bins)",
        "listed": [e for _, _, e in worst],
    }


def _suspicious_entry(c: dict[str, np.ndarray], i: int, start: int, z: np.ndarray, median: np.ndarray) -> tuple:
    """(z, index, listed entry) of clean row i of a block starting at row ``start``: sorts worst first."""
    index = start + int(c["row"][i])
    entry = {
        "index": index,
        "identity": int(c["identity"][i]),
        "yaw": round(float(c["yaw"][i]), 2),
        "cos": round(float(c["cos"][i]), 4),
        "bucket_median": round(float(median[c["bucket"][i]]), 4),
        "robust_z": round(float(z[i]), 1),
    }
    return float(z[i]), index, entry


def duplicate_rows(hashes: np.ndarray) -> dict:
    """Rows whose src_emb is bit-identical to an earlier row's (the same face stored twice), by row hash.

    Groups (row indices) are listed in order of their first row.
    """
    _, first, inverse, counts = np.unique(hashes, return_index=True, return_inverse=True, return_counts=True)
    dup = np.flatnonzero(counts > 1)
    listed = dup[np.argsort(first[dup], kind="stable")][:LISTED]
    return {"count": int(len(hashes) - len(counts)), "groups": [np.flatnonzero(inverse == g).tolist() for g in listed]}


def landmark_check(rows: dict[str, np.ndarray], n: int, cap: int = LANDMARK_CHECK_MAX) -> dict:
    """Recompute the pose from landmarks (face.pose's own code) for the rows LandmarkRows picked.

    Compares rotations, not Euler angles: near |yaw| = 90 pitch and roll trade
    off (gimbal lock) while the rotation stays the same.
    """
    if not rows:
        return {"checked": 0, "of": n, "cap": cap, "disagree": 0, "listed": []}
    stored = rows["pose"]
    recomputed = pose_from_landmarks(rows["kps"])
    r1, r2 = rotation_matrices(stored), rotation_matrices(recomputed)
    cos_angle = (np.einsum("nij,nij->n", r1, r2) - 1.0) / 2.0
    angle = np.degrees(np.arccos(np.clip(cos_angle, -1.0, 1.0)))
    bad = np.flatnonzero(angle > POSE_DISAGREE_DEG)
    listed = [
        {
            "index": int(rows["index"][i]),
            "identity": int(rows["identity"][i]),
            "stored_pose": [round(float(v), 1) for v in stored[i]],
            "landmark_pose": [round(float(v), 1) for v in recomputed[i]],
            "angle_deg": round(float(angle[i]), 1),
        }
        for i in bad[np.argsort(-angle[bad])][:LISTED]
    ]
    return {
        "checked": int(len(angle)),
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


def scan_report(scan: SplitScan, expected: int) -> dict:
    """The first pass's figures, in the report's key order."""
    fields = [f for f in FIELDS if f in scan.fields] or [f for f in REQUIRED if f != "identity"]
    return {
        "n_samples": scan.n,
        "n_expected": expected,
        "bad_samples": max(expected - scan.n, 0),
        "bad_blocks": scan.n_errors,
        "read_errors": scan.errors,
        "n_identities": int(len(scan.ids.values())),
        "yaw_bucket_counts": {b: int(c) for b, c in zip(YAW_BUCKETS, scan.bucket_counts)},
        "yaw_histogram": {"edges": YAW_HIST_EDGES.tolist(), "counts": scan.yaw_hist.tolist()},
        "pitch_histogram": {"edges": PITCH_HIST_EDGES.tolist(), "counts": scan.pitch_hist.tolist()},
        "fields": {f: scan.fields.get(f, FieldHealth(f in EMBEDDING_FIELDS)).report() for f in fields},
        "non_finite_rows": scan.non_finite,
        "zero_norm_rows": scan.zero_norm,
        "clean_rows": scan.clean,
    }


def inspect_split(shard_set: ShardSet, split: str) -> tuple[dict, dict]:
    """One split's report, plus the plot's row sample and the cross-split checks' identities and row hashes.

    Streams the split (bounded memory; see the module docstring).
    """
    expected = shard_set.n_samples(split)
    scan = SplitScan(expected).run(split_table(shard_set, split))  # refuses an index.json that lies
    report = scan_report(scan, expected)
    if scan.clean:
        report.update(baseline_quality(scan))
        report["suspicious_pairs"] = suspicious_pairs(scan)
    else:
        report["suspicious_pairs"] = {"count": 0, "listed": []}
    hashes = np.concatenate(scan.hashes) if scan.hashes else np.zeros(0, np.uint64)
    report["duplicates"] = duplicate_rows(hashes)
    report["landmarks"] = landmark_check(scan.landmarks.rows(), scan.n)
    stats = scan.ceiling.pair_stats()
    report["ceiling"] = ceiling_report(stats, report["n_identities"])
    report["warnings"] = split_warnings(split, report)
    sample = scan.plot.rows()
    data = {k: sample.get(k, np.zeros(0)) for k in ("yaw", "cos")} | {
        "identities": scan.ids.values(),
        "src_hash": hashes,
        "ceiling_stats": stats,
    }
    if "oracle_cos" in report:
        data["oracle_cos"] = sample["oracle_cos"]
    return report, data


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
    """Leaks between splits: identities in more than one split, src_emb rows (by hash) that also occur in another."""
    if len(data) < 2 or not sum(len(d["src_hash"]) for d in data.values()):
        return {"identity_overlap": 0, "duplicate_rows": 0}
    _, in_splits = np.unique(np.concatenate([d["identities"] for d in data.values()]), return_counts=True)
    which = np.concatenate([np.full(len(d["src_hash"]), i) for i, d in enumerate(data.values())])
    _, group = np.unique(np.concatenate([d["src_hash"] for d in data.values()]), return_inverse=True)
    group = group.reshape(-1)
    lowest = np.full(group.max() + 1, len(data))
    highest = np.full(group.max() + 1, -1)
    np.minimum.at(lowest, group, which)
    np.maximum.at(highest, group, which)
    return {
        "identity_overlap": int((in_splits > 1).sum()),
        "duplicate_rows": int((lowest[group] != highest[group]).sum()),
    }


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
        "n_identities": int(len(np.unique(np.concatenate([d["identities"] for d in data.values()])))),
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
    total["ceiling"] = ceiling_report(
        pool_pair_stats([d["ceiling_stats"] for d in data.values()]), total["n_identities"]
    )
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


def ceiling_text(c: dict) -> str:
    """One line: the data ceiling with its interval and identities, or why it cannot be estimated."""
    if not c["estimable"]:
        return f"data ceiling: {c['reason']}"
    ci = f" [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]" if c.get("ci95") else ""
    used = f"{c['n_identities']} identities with >= 2 distinct frontal embeddings"
    if c["n_identities"] < c.get("of_identities", 0):
        used += f" (of {c['of_identities']}" + (", a seeded sample" if c["sampled"] < c["of_identities"] else "") + ")"
    return (
        f"data ceiling: cos {c['cos']:.3f}{ci} (95 %), from {used}; same-identity frontal pairs agree to "
        f"cos {c['pair_cos']:.3f}: no model's mean cos to a frontal can exceed about {c['cos']:.3f}"
    )


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
        ceiling_yaw = r["ceiling"]["per_yaw"]
        if any(e["estimable"] for e in ceiling_yaw.values()):
            cells = "".join(
                f"{ceiling_yaw[b]['cos']:>8.3f}" if ceiling_yaw.get(b, {}).get("estimable") else f"{'-':>8}"
                for b in YAW_BUCKETS
            )
            lines.append(f"  {'data ceiling':<15}{cells}")
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
        lines.append("  " + ceiling_text(r["ceiling"]))
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
    lines.append(ceiling_text(report["ceiling"]))
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
        ceiling = report["splits"][name]["ceiling"]["per_yaw"]
        have = [(c, ceiling[b]["cos"]) for c, b in zip(centres, YAW_BUCKETS) if ceiling.get(b, {}).get("estimable")]
        if have:
            ax.plot(*zip(*have), "^:", label=f"{name} data ceiling")
    ax.set(title="identity baseline cos vs |yaw|", xlabel="|yaw| (deg)", ylabel="cos")
    for a in axes:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-train inspect", description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="+", help="shard set directory (holds index.json), or several (a report each)")
    p.add_argument("--split", default="all", help="a split name, or 'all' (default)")
    p.add_argument("--json", help="also write the report as JSON here (several sets: {'sets': {dir: report}})")
    p.add_argument("--png", help="also write the yaw histograms and cos-vs-yaw plot here (several sets: one each)")
    return p


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    reports = {}
    for i, path in enumerate(args.dir):
        try:
            report, data = inspect(path, args.split)
        except ShardSetError as e:
            print(f"dist-train inspect: error: {e}", file=sys.stderr)
            return 2
        print(("\n" if i else "") + format_text(report))
        reports[path] = report
        if args.png:
            png = Path(args.png)
            plot(report, data, output_file(png if len(args.dir) == 1 else png.with_stem(f"{png.stem}-{i}")))
    if args.json:
        out = reports[args.dir[0]] if len(args.dir) == 1 else {"sets": reports}
        output_file(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
