"""Extracted faces -> profile/frontal training pairs, split by identity.

Pure numpy on the face table that ``extract`` builds from its cache, so the
rules (filters, yaw thresholds, per-identity limits, splits) are testable
without any model. Every face that does not end up in a pair is counted under
the reason why; the counts go to ``index.json["skipped"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from dist_train.data.schema import EMB_DIM, N_LANDMARKS

KEEP_POLICIES = ("largest", "all")


@dataclass
class Faces:
    """One row per detected face."""

    emb: np.ndarray  # (N, 512) float32, L2-normalised (face.normed_embedding)
    kps: np.ndarray  # (N, 68, 3) float32, face.landmark_3d_68
    pose: np.ndarray  # (N, 3) float32, face.pose: pitch, yaw, roll in degrees
    bbox: np.ndarray  # (N, 4) float32, x0 y0 x1 y1 pixels
    score: np.ndarray  # (N,) float32 detection score
    identity: np.ndarray  # (N,) int64
    group: np.ndarray  # (N,) int64, one number per image or video frame
    source: np.ndarray  # (N,) int64, index of the input file

    def __len__(self) -> int:
        return len(self.identity)

    def take(self, index: np.ndarray) -> Faces:
        return Faces(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def empty(cls) -> Faces:
        return cls(
            emb=np.zeros((0, EMB_DIM), np.float32),
            kps=np.zeros((0, N_LANDMARKS, 3), np.float32),
            pose=np.zeros((0, 3), np.float32),
            bbox=np.zeros((0, 4), np.float32),
            score=np.zeros(0, np.float32),
            identity=np.zeros(0, np.int64),
            group=np.zeros(0, np.int64),
            source=np.zeros(0, np.int64),
        )

    @classmethod
    def concat(cls, parts: list[Faces]) -> Faces:
        parts = [p for p in parts if len(p)] or [cls.empty()]
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})


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
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0

    def check(self) -> None:
        if not 0.0 <= self.frontal_yaw < self.profile_yaw <= 90.0:
            raise ValueError(
                f"yaw thresholds need 0 <= frontal ({self.frontal_yaw}) < profile ({self.profile_yaw}) <= 90 degrees"
            )
        if self.max_pairs_per_identity is not None and self.max_pairs_per_identity < 1:
            raise ValueError(f"max pairs per identity must be >= 1, got {self.max_pairs_per_identity}")
        if min(self.val_fraction, self.test_fraction) < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val fraction {self.val_fraction} and test fraction {self.test_fraction} must be >= 0 "
                "and leave identities for training (sum < 1)"
            )


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


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _rows_by_identity(mask: np.ndarray, identity: np.ndarray) -> dict[int, np.ndarray]:
    """{identity: row indices where mask}, in one sort instead of one scan per identity."""
    rows = np.flatnonzero(mask)
    rows = rows[np.argsort(identity[rows], kind="stable")]
    ids, starts = np.unique(identity[rows], return_index=True)
    return dict(zip(ids.tolist(), np.split(rows, starts[1:])))


def make_pairs(faces: Faces, rules: PairingRules) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Pair every profile face with a frontal face and the frontal centroid of its identity.

    Frontal targets are dealt round-robin from a seeded shuffle, so an
    identity's frontal faces are used about equally often. Returns sample
    columns (schema field names) and counts of faces dropped as ``mid_yaw``
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
    src, tgt, centroids = [], [], []
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
        centroid = _normalise(faces.emb[frontal].astype(np.float64).mean(0))
        centroids.append(np.repeat(centroid[None].astype(np.float32), len(profile), 0))
    if not src:
        return {}, counts
    s, t = np.concatenate(src), np.concatenate(tgt)
    columns = {
        "src_emb": faces.emb[s],
        "src_kps": faces.kps[s],
        "src_pose": faces.pose[s],
        "tgt_emb": faces.emb[t],
        "identity": faces.identity[s],
        "tgt_centroid": np.concatenate(centroids),
    }
    return columns, counts


def split_by_identity(columns: dict[str, np.ndarray], rules: PairingRules) -> dict[str, dict[str, np.ndarray]]:
    """Deal whole identities to train/val/test by a seeded shuffle; empty splits are left out.

    A requested val or test split gets at least one identity as long as train
    keeps one, so a small set still has something to validate on.
    """
    rules.check()
    idents = np.unique(columns["identity"])
    order = np.random.default_rng(rules.seed + 1).permutation(idents)
    n = len(order)
    n_val = int(round(rules.val_fraction * n))
    n_test = int(round(rules.test_fraction * n))
    if rules.val_fraction > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    if rules.test_fraction > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    splits = {}
    for name in ("train", "val", "test"):
        rows = np.isin(columns["identity"], parts[name])
        if rows.any():
            splits[name] = {k: v[rows] for k, v in columns.items()}
    return splits
