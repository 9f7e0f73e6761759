"""The one definition of a dist_train sample, its storage and the yaw buckets.

Everything that reads or writes samples (synth, pack, extract, the loader,
inspect, eval) imports these names instead of restating shapes or dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 1
EMB_DIM = 512
N_LANDMARKS = 68
POSE_NAMES = ("pitch", "yaw", "roll")  # degrees, InsightFace `face.pose` order

# Samples are stored in blocks: one tar member per field per block of this many
# samples. One-sample-per-member shards read at ~2.5k samples/s here, blocks at
# ~400k (BENCHMARKS.md §1).
DEFAULT_BLOCK_SIZE = 1024


@dataclass(frozen=True)
class Field:
    name: str
    shape: tuple[int, ...]  # per-sample shape
    storage: str  # numpy dtype on disk
    required: bool
    doc: str


# Embeddings are unit vectors with components of about 1/sqrt(512) ~ 0.044;
# float16 keeps them to ~5e-5 absolute, which moves cos by < 1e-5. Landmarks are
# image pixels (up to thousands), so they stay float32.
FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        Field("src_emb", (EMB_DIM,), "float16", True, "L2-normalised profile/side-view ArcFace embedding"),
        Field("src_kps", (N_LANDMARKS, 3), "float32", True, "InsightFace landmark_3d_68, image pixels"),
        Field("src_pose", (3,), "float32", True, "pitch, yaw, roll in degrees (face.pose)"),
        Field("tgt_emb", (EMB_DIM,), "float16", True, "L2-normalised frontal embedding, same identity"),
        Field("identity", (), "int64", True, "integer identity id, unique within a shard set"),
        Field("tgt_centroid", (EMB_DIM,), "float16", False, "identity's mean frontal embedding, L2-normalised"),
        Field("oracle_emb", (EMB_DIM,), "float16", False, "synthetic only: the distortion undone exactly"),
    )
}
REQUIRED = tuple(n for n, f in FIELDS.items() if f.required)
OPTIONAL = tuple(n for n, f in FIELDS.items() if not f.required)
EMBEDDING_FIELDS = ("src_emb", "tgt_emb", "tgt_centroid", "oracle_emb")
ZERO_NORM = 1e-6  # an embedding with a norm below this has no direction: pack skips it, inspect counts it
MODEL_INPUTS = ("src_emb", "src_kps", "src_pose")  # what the model reads, in its argument order
TARGETS = {"sample": "tgt_emb", "centroid": "tgt_centroid"}  # config data.target -> the field trained toward


def train_fields(target: str = "sample") -> tuple[str, ...]:
    """What a training step reads: the model's inputs, the target and the identity (for the contrastive term)."""
    return (*MODEL_INPUTS, "tgt_emb", "identity") + (("tgt_centroid",) if target == "centroid" else ())


def target_of(batch: dict, target: str):
    """The training target of a batch (arrays or tensors): the frontal sample, or the identity's centroid."""
    return batch[TARGETS[target]]


# |yaw| buckets in degrees, used by eval, inspect, report and synth summaries.
YAW_EDGES = (0.0, 15.0, 30.0, 45.0, 60.0, 75.0, 90.0)
YAW_BUCKETS = tuple(f"{int(a)}-{int(b)}" for a, b in zip(YAW_EDGES[:-1], YAW_EDGES[1:]))


def yaw_bucket_index(yaw_deg: np.ndarray) -> np.ndarray:
    """Bucket index of |yaw| per sample; |yaw| > 90 falls in the last bucket."""
    a = np.abs(np.asarray(yaw_deg, dtype=np.float64))
    idx = np.searchsorted(np.asarray(YAW_EDGES[1:-1]), a, side="right")
    return idx.astype(np.int64)


def finite_rows(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Rows whose every float value is finite: the one definition of a non-finite sample (pack, inspect, loader)."""
    n = len(next(iter(arrays.values())))
    ok = np.ones(n, dtype=bool)
    for a in arrays.values():
        rows = a.reshape(n, int(np.prod(a.shape[1:])))
        if a.dtype == np.float16:  # inf/nan: all exponent bits set; 5x faster than numpy's emulated isfinite
            ok &= (rows.view(np.uint16) & 0x7C00).max(axis=1, initial=0) != 0x7C00
        elif a.dtype.kind == "f":
            ok &= np.isfinite(rows).all(axis=1)
    return ok


def dtype_problem(name: str, dtype) -> str | None:
    """Why a field cannot hold values of this dtype, or None: identities are integers, every other field
    (embeddings, landmarks, pose) floating point; integer embeddings would be cast to nonsense vectors."""
    integer = np.dtype(FIELDS[name].storage).kind == "i"
    if np.dtype(dtype).kind in ("iu" if integer else "f"):
        return None
    return f"field {name!r} has dtype {np.dtype(dtype)}; it must be {'an integer' if integer else 'a floating-point'} dtype"


def check_arrays(arrays: dict[str, np.ndarray]) -> int:
    """Validate field names, shapes and dtypes of a column dict; returns the sample count.

    Raises ValueError naming the field, the shape or dtype found and what is expected.
    """
    missing = [n for n in REQUIRED if n not in arrays]
    if missing:
        raise ValueError(f"missing required field(s) {missing}; a sample needs {list(REQUIRED)}")
    unknown = [n for n in arrays if n not in FIELDS]
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed fields are {list(FIELDS)}")
    n = len(arrays["identity"])
    for name, a in arrays.items():
        want = (n, *FIELDS[name].shape)
        if tuple(a.shape) != want:
            raise ValueError(f"field {name!r} has shape {tuple(a.shape)}, expected {want}")
        problem = dtype_problem(name, a.dtype)
        if problem:
            raise ValueError(problem)
    return n
