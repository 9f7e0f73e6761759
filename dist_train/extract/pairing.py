"""Extracted faces -> profile/frontal training pairs.

Pure numpy on light per-face metadata (pose, box, score, identity, image or
frame, input file): the rules (filters, yaw thresholds, per-identity limits)
run on it without the faces' embeddings and landmarks, which stay on disk
until ``extract`` gathers the rows a shard needs. So the rules are testable
without any model, and a set of millions of faces fits in memory. Every face
that does not end up in a pair is counted under the reason why; the counts go
to ``index.json["skipped"]``. Splitting is ``data/splits.py``'s, shared with pack
and synth.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from dist_train.data.splits import check_fractions

KEEP_POLICIES = ("largest", "all")


@dataclass
class Faces:
    """One row per detected face: what the filters and the pairing need, not the face's arrays."""

    pose: np.ndarray  # (N, 3) float32, face.pose: pitch, yaw, roll in degrees
    bbox: np.ndarray  # (N, 4) float32, x0 y0 x1 y1 pixels
    score: np.ndarray  # (N,) float32 detection score
    identity: np.ndarray  # (N,) int64
    group: np.ndarray  # (N,) int64, one number per image or video frame
    source: np.ndarray  # (N,) int64, index of the input file
    ref: np.ndarray  # (N,) int64, where the face's embedding and landmarks are (extract: its row in the cache)

    def __len__(self) -> int:
        return len(self.identity)

    def take(self, index: np.ndarray) -> Faces:
        return Faces(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


@dataclass(frozen=True)
class FaceFilter:
    min_size: float = 40.0  # pixels, shorter side of the detection box
    min_score: float = 0.5
    keep: str = "largest"  # per image/frame: the largest face (the folder's person) or all faces


@dataclass(frozen=True)
class PairingRules:
    frontal_yaw: float = 20.0  # |yaw| <= this: frontal (a target)
    profile_yaw: float = 45.0  # |yaw| >= this: profile (a source)
    max_pairs_per_identity: int | None = None
    val_fraction: float = 0.1  # splits.split_rows, like pack and synth
    test_fraction: float = 0.0
    seed: int = 0  # of the pairing (targets dealt, identity caps) and of the split

    def check(self) -> None:
        if not 0.0 <= self.frontal_yaw < self.profile_yaw <= 90.0:
            raise ValueError(
                f"yaw thresholds need 0 <= frontal ({self.frontal_yaw}) < profile ({self.profile_yaw}) <= 90 degrees"
            )
        if self.max_pairs_per_identity is not None and self.max_pairs_per_identity < 1:
            raise ValueError(f"max pairs per identity must be >= 1, got {self.max_pairs_per_identity}")
        check_fractions(self.val_fraction, self.test_fraction)


@dataclass
class Pairs:
    """Profile -> frontal pairs as rows of the ``Faces`` table they were made from.

    Pair ``i`` is source face ``src[i]`` with target face ``tgt[i]`` and the
    centroid of frontal group ``centroid[i]``: the normalised mean embedding of
    faces ``frontal[starts[g]:starts[g + 1]]``, all frontal faces of identity
    ``group_identity[g]``.
    """

    src: np.ndarray  # (P,) int64
    tgt: np.ndarray  # (P,) int64
    identity: np.ndarray  # (P,) int64
    centroid: np.ndarray  # (P,) int64, index of the frontal group
    frontal: np.ndarray  # (F,) int64, face rows of the frontal groups, group by group
    starts: np.ndarray  # (G + 1,) int64
    group_identity: np.ndarray  # (G,) int64

    def __len__(self) -> int:
        return len(self.src)


def select_faces(faces: Faces, rule: FaceFilter) -> tuple[Faces, np.ndarray]:
    """Apply the score and size filters, then the keep policy per image/frame.

    Returns the kept faces and, for every input face, why it was dropped:
    ``low_score``, ``too_small`` (a face failing both counts as low_score),
    ``extra_face`` (passed the filters but was not the largest of its
    image/frame), or "" when kept.
    """
    if rule.keep not in KEEP_POLICIES:
        raise ValueError(f"keep policy {rule.keep!r} is not one of {KEEP_POLICIES}")
    w = faces.bbox[:, 2] - faces.bbox[:, 0]
    h = faces.bbox[:, 3] - faces.bbox[:, 1]
    reason = np.full(len(faces), "", dtype=object)
    reason[faces.score < rule.min_score] = "low_score"
    reason[(reason == "") & (np.minimum(w, h) < rule.min_size)] = "too_small"
    passed = np.flatnonzero(reason == "")
    if rule.keep == "largest" and len(passed):
        order = passed[np.lexsort((-(w * h)[passed], faces.group[passed]))]  # by group, largest first
        later = np.zeros(len(order), bool)
        later[1:] = faces.group[order][1:] == faces.group[order][:-1]
        reason[order[later]] = "extra_face"
    return faces.take(np.flatnonzero(reason == "")), reason


def count_reasons(reason: np.ndarray) -> dict[str, int]:
    """{reason: faces} for the non-empty reasons of ``select_faces``."""
    names, counts = np.unique(reason[reason != ""].astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts)}


def _rows_by_identity(mask: np.ndarray, identity: np.ndarray) -> dict[int, np.ndarray]:
    """{identity: row indices where mask}, in one sort instead of one scan per identity."""
    rows = np.flatnonzero(mask)
    rows = rows[np.argsort(identity[rows], kind="stable")]
    ids, starts = np.unique(identity[rows], return_index=True)
    return dict(zip(ids.tolist(), np.split(rows, starts[1:])))


def make_pairs(faces: Faces, rules: PairingRules) -> tuple[Pairs, dict[str, int]]:
    """Pair every profile face with a frontal face and the frontal centroid of its identity.

    Frontal targets are dealt round-robin from a seeded shuffle, so an
    identity's frontal faces are used about equally often. Returns the pairs
    (identities in ascending order) and counts of faces dropped as ``mid_yaw``
    (between the thresholds), ``no_frontal`` (profile face of an identity
    without a frontal face) and ``identity_limit`` (over the per-identity cap).
    """
    rules.check()
    rng = np.random.default_rng(rules.seed)
    abs_yaw = np.abs(faces.pose[:, 1])
    frontal_mask = abs_yaw <= rules.frontal_yaw
    profile_mask = abs_yaw >= rules.profile_yaw
    counts = {"mid_yaw": int((~frontal_mask & ~profile_mask).sum()), "no_frontal": 0, "identity_limit": 0}
    frontal_of = _rows_by_identity(frontal_mask, faces.identity)
    src, tgt, groups = [], [], []
    for ident, profile in _rows_by_identity(profile_mask, faces.identity).items():
        frontal = frontal_of.get(ident)
        if frontal is None:
            counts["no_frontal"] += len(profile)
            continue
        cap = rules.max_pairs_per_identity
        if cap is not None and len(profile) > cap:
            counts["identity_limit"] += len(profile) - cap
            profile = np.sort(rng.choice(profile, cap, replace=False))
        dealt = rng.permutation(frontal)
        src.append(profile)
        tgt.append(dealt[np.arange(len(profile)) % len(dealt)])
        groups.append((ident, frontal))
    empty = np.zeros(0, np.int64)
    if not src:
        return Pairs(empty, empty, empty, empty, empty, np.zeros(1, np.int64), empty), counts
    sizes = np.array([len(p) for p in src])
    group_sizes = np.array([len(f) for _, f in groups])
    pairs = Pairs(
        src=np.concatenate(src).astype(np.int64),
        tgt=np.concatenate(tgt).astype(np.int64),
        identity=np.repeat(np.array([i for i, _ in groups], np.int64), sizes),
        centroid=np.repeat(np.arange(len(groups), dtype=np.int64), sizes),
        frontal=np.concatenate([f for _, f in groups]).astype(np.int64),
        starts=np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64),
        group_identity=np.array([i for i, _ in groups], np.int64),
    )
    return pairs, counts


def group_centroids(emb, starts: np.ndarray, out: np.ndarray, batch_rows: int = 4096) -> np.ndarray:
    """``out[g]`` = normalised mean of ``emb[starts[g]:starts[g + 1]]`` (float64 sums), for every group.

    ``emb`` is any row-sliceable (N, D) array, such as an on-disk memmap whose
    rows are laid out group by group; at most ``batch_rows`` of its rows are
    read into memory at a time, so a group may be larger than a batch.
    """
    n_groups = len(starts) - 1
    total = np.zeros(out.shape[1], np.float64)
    g = 0
    for lo in range(0, int(starts[-1]), batch_rows):
        hi = min(lo + batch_rows, int(starts[-1]))
        block = np.asarray(emb[lo:hi], dtype=np.float64)
        while g < n_groups and starts[g] < hi:
            a, b = max(int(starts[g]), lo), min(int(starts[g + 1]), hi)
            total += block[a - lo : b - lo].sum(0)
            if starts[g + 1] > hi:  # continues in the next batch
                break
            mean = total / (starts[g + 1] - starts[g])
            out[g] = mean / np.linalg.norm(mean)
            total[:] = 0.0
            g += 1
    return out


def pair_columns(faces_emb: np.ndarray, faces_kps: np.ndarray, faces: Faces, pairs: Pairs) -> dict[str, np.ndarray]:
    """Sample columns (schema field names) of all pairs from in-memory per-face arrays (rows of ``faces``)."""
    centroids = np.zeros((len(pairs.group_identity), faces_emb.shape[1]), np.float32)
    group_centroids(faces_emb[pairs.frontal], pairs.starts, centroids)
    return {
        "src_emb": faces_emb[pairs.src],
        "src_kps": faces_kps[pairs.src],
        "src_pose": faces.pose[pairs.src],
        "tgt_emb": faces_emb[pairs.tgt],
        "identity": pairs.identity,
        "tgt_centroid": centroids[pairs.centroid],
    }
