"""Metric definitions, used by training-time validation, `dist-train eval`, inspect and report.

Every quality figure is reported beside the do-nothing baseline cos(src, tgt)
and, when the shard set carries ``oracle_emb`` (synthetic data), beside the
ceiling cos(oracle, tgt).
"""

from __future__ import annotations

import numpy as np

from dist_train.data.schema import YAW_BUCKETS, yaw_bucket_index

FARS = (1e-3, 1e-2)
MAX_PAIR_SAMPLES = 4096  # samples used for impostor / TAR@FAR pairs (n^2 pairs)


def row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per row (float64)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def mix64(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """splitmix64's finaliser on uint64 values: a well-mixed 64-bit hash of each (the one copy of it)."""
    w = x if inplace else np.array(x, dtype=np.uint64)
    t = np.empty_like(w)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
        np.right_shift(w, np.uint64(shift), out=t)
        w ^= t
        if mult is not None:
            w *= np.uint64(mult)
    return w


def _row_hash(*arrays: np.ndarray) -> np.ndarray:
    """A pseudo-random uint64 per row from the row's values alone (never its position).

    Floats are hashed as float32 bits (float16 storage and its float32 copies
    agree; -0.0 counts as 0.0), integers as int64 bits.
    """
    n = len(arrays[0])
    words = []
    for a in arrays:
        a = np.asarray(a).reshape(n, -1)
        if a.dtype.kind == "f":
            a = (a.astype(np.float32) + np.float32(0.0)).view(np.uint32)
        words.append(a.astype(np.int64).view(np.uint64))
    words = np.concatenate(words, axis=1)
    rng = np.random.default_rng(0)
    mult = rng.integers(0, 2**63, size=words.shape[1], dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    h = np.empty(n, dtype=np.uint64)
    for lo in range(0, n, 8192):  # integer matmul wraps mod 2^64; chunks bound the memory
        h[lo : lo + 8192] = words[lo : lo + 8192] @ mult
    return mix64(h, inplace=True)


def _pair_subset(query: np.ndarray, tgt: np.ndarray, identity: np.ndarray) -> np.ndarray:
    """A fixed subset, the same for any rank count or sample order of the same set.

    At most MAX_PAIR_SAMPLES rows, chosen by a hash of each row's (identity,
    target) and then its query, so the choice depends on which samples there
    are, not on where they sit, and the pred and baseline calls of `quality`
    pick the same samples.
    """
    n = len(query)
    if n <= MAX_PAIR_SAMPLES:
        return np.arange(n)
    order = np.lexsort((_row_hash(query), _row_hash(identity, tgt)))
    return np.sort(order[:MAX_PAIR_SAMPLES])


def impostor_and_tar(query: np.ndarray, tgt: np.ndarray, identity: np.ndarray) -> dict:
    """Mean impostor cos and TAR at fixed FARs for (query_i, tgt_j) pairs.

    Genuine pairs: same identity; impostors: different identities. The
    threshold for a FAR is the (1 - FAR) quantile of impostor scores.
    """
    idx = _pair_subset(query, tgt, identity)
    q, t, ids = _unit(query[idx]), _unit(tgt[idx]), identity[idx]
    scores = q @ t.T
    same = ids[:, None] == ids[None, :]
    imp = scores[~same]
    gen = scores[same]
    return {"impostor_cos": float(imp.mean()) if imp.size else float("nan"), "tar_at_far": tar_at_far(gen, imp)}


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, fars=FARS) -> dict[str, float]:
    """{f"{far:g}": TAR}: the share of genuine scores strictly above the (1 - FAR) quantile of the impostor scores.

    NaN for every FAR when either set of scores is empty.
    """
    genuine, impostor = np.asarray(genuine).reshape(-1), np.asarray(impostor).reshape(-1)
    out = {}
    for far in fars:
        if impostor.size == 0 or genuine.size == 0:
            out[f"{far:g}"] = float("nan")
            continue
        thr = np.quantile(impostor, 1.0 - far)
        out[f"{far:g}"] = float((genuine > thr).mean())
    return out


def identification(
    query: np.ndarray, query_identity: np.ndarray, gallery: np.ndarray, gallery_identity: np.ndarray
) -> dict:
    """Closed-set identification and verification of (N, D) queries against (K, D) templates, one per identity.

    ``gallery`` holds one template per identity (e.g. a centroid); every query's
    identity must have one. Scores are cosines. Keys: ``n`` queries;
    ``rank1``: share of queries whose highest-scoring template is their own
    (a tie goes to the template listed first); ``tar_at_far`` (`tar_at_far`):
    genuine pairs are each query with its own template, impostor pairs each
    query with every other template.
    """
    template = {ident: k for k, ident in enumerate(np.asarray(gallery_identity).tolist())}
    if len(template) != len(gallery_identity):
        raise ValueError("identification needs one gallery template per identity")
    missing = set(np.asarray(query_identity).tolist()) - set(template)
    if missing:
        raise ValueError(f"queries of identities without a gallery template: {sorted(missing)[:5]}")
    own = np.array([template[i] for i in np.asarray(query_identity).tolist()], np.int64)
    scores = _unit(query) @ _unit(gallery).T  # (queries, templates)
    rows = np.arange(len(own))
    genuine = scores[rows, own]
    others = np.ones(scores.shape, bool)
    others[rows, own] = False
    n = len(own)
    return {
        "n": int(n),
        "rank1": float((scores.argmax(1) == own).mean()) if n else float("nan"),
        "tar_at_far": tar_at_far(genuine, scores[others]),
    }


def quality(
    pred: np.ndarray,
    tgt: np.ndarray,
    src: np.ndarray,
    yaw: np.ndarray,
    identity: np.ndarray,
    oracle: np.ndarray | None = None,
) -> dict:
    """All validation metrics for predictions on one split.

    Keys: n, mean_cos, identity_baseline_cos, gain, [oracle_cos,
    fraction_of_oracle_gap], per_yaw, impostor_cos, baseline_impostor_cos,
    tar_at_far {far: {"pred", "baseline"}}.
    """
    n = len(pred)
    c_pred = row_cos(pred, tgt)
    c_base = row_cos(src, tgt)
    out: dict = {
        "n": int(n),
        "mean_cos": float(c_pred.mean()) if n else float("nan"),
        "identity_baseline_cos": float(c_base.mean()) if n else float("nan"),
    }
    out["gain"] = out["mean_cos"] - out["identity_baseline_cos"]
    c_orc = None
    if oracle is not None:
        c_orc = row_cos(oracle, tgt)
        out["oracle_cos"] = float(c_orc.mean()) if n else float("nan")
        gap = out["oracle_cos"] - out["identity_baseline_cos"]
        out["fraction_of_oracle_gap"] = out["gain"] / gap if abs(gap) > 1e-9 else float("nan")
    buckets = yaw_bucket_index(yaw)
    per_yaw = {}
    for i, name in enumerate(YAW_BUCKETS):
        m = buckets == i
        if not m.any():
            continue
        entry = {"n": int(m.sum()), "cos": float(c_pred[m].mean()), "baseline": float(c_base[m].mean())}
        if c_orc is not None:
            entry["oracle"] = float(c_orc[m].mean())
        per_yaw[name] = entry
    out["per_yaw"] = per_yaw
    p = impostor_and_tar(pred, tgt, identity)
    b = impostor_and_tar(src, tgt, identity)
    out["impostor_cos"] = p["impostor_cos"]
    out["baseline_impostor_cos"] = b["impostor_cos"]
    out["tar_at_far"] = {
        far: {"pred": p["tar_at_far"][far], "baseline": b["tar_at_far"][far]} for far in p["tar_at_far"]
    }
    return out


def scalars(metrics: dict, prefix: str = "val") -> dict[str, float]:
    """Flatten a `quality` dict into TensorBoard tags; `report` reads these names."""
    out = {}
    for key in (
        "mean_cos",
        "identity_baseline_cos",
        "gain",
        "oracle_cos",
        "fraction_of_oracle_gap",
        "impostor_cos",
        "baseline_impostor_cos",
        "loss",
        "val_train_loss_ratio",
    ):
        if key in metrics and metrics[key] is not None:
            out[f"{prefix}/{key}"] = float(metrics[key])
    for bucket, entry in metrics.get("per_yaw", {}).items():
        for k, v in entry.items():
            if k != "n":
                out[f"{prefix}_yaw/{bucket}/{k}"] = float(v)
    for far, entry in metrics.get("tar_at_far", {}).items():
        for k, v in entry.items():
            out[f"{prefix}/tar_at_far_{far}/{k}"] = float(v)
    return out


# Training scalars the trainer writes to TensorBoard (x axis: optimizer step).
# `report` reads exactly these names; counters are cumulative since step 0.
TRAIN_TAGS = {
    "loss": "train/loss",  # weighted total, mean over the log interval
    "loss_mse": "train/loss_mse",  # unweighted MSE term
    "loss_cos": "train/loss_cos",  # unweighted (1 - cos) term
    "loss_contrastive": "train/loss_contrastive",  # unweighted InfoNCE term (when enabled)
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "loss_scale": "train/loss_scale",  # fp16 only
    "samples_per_s": "train/samples_per_s",
    "epoch": "train/epoch",  # fractional epoch at this step
    "skipped_steps": "train/skipped_steps",  # fp16 overflow steps, cumulative
    "nonfinite_steps": "train/nonfinite_steps",  # non-finite losses skipped, cumulative
    "bad_samples": "train/bad_samples",  # samples the loader skipped (non-finite values, undecodable blocks), cumulative
    "samples_seen": "train/samples_seen",
    # loader counters over all ranks, cumulative (stream.LoaderStats; bad_samples = unreadable + non-finite rows)
    "unreadable_rows": "train/unreadable_rows",
    "nonfinite_rows": "train/nonfinite_rows",
    "bad_blocks": "train/bad_blocks",
    "shard_errors": "train/shard_errors",
    "repeats": "train/repeats",  # rows read a second time within an epoch
    "dropped_tail": "train/dropped_tail",  # exact epochs: rows left out because they do not fill a global batch
    "gpu_memory_gb": "train/gpu_memory_gb",  # peak CUDA memory allocated by this rank so far (CUDA only)
}
# Validation: `scalars(quality(...) | {"loss": ..., "val_train_loss_ratio": ...})`
# gives val/mean_cos, val/identity_baseline_cos, val/gain, val/oracle_cos,
# val/fraction_of_oracle_gap, val/impostor_cos, val/baseline_impostor_cos,
# val/loss, val/val_train_loss_ratio, val_yaw/<bucket>/{cos,baseline,oracle},
# val/tar_at_far_<far>/{pred,baseline}; plus "val/epoch" (the epoch evaluated).
VAL_EPOCH_TAG = "val/epoch"  # the (fractional) epoch an evaluation was run at, logged beside scalars()
VERIFY_FAR = "0.001"
"""The FAR whose false-reject rate (1 - TAR) is shown beside cos, spelled as `scalars` writes it."""


def val_tag(key: str) -> str:
    """TensorBoard tag of a validation metric, exactly as `scalars` names it."""
    (tag,) = scalars({key: 0.0})
    return tag


def yaw_tag(bucket: str, key: str) -> str:
    """TensorBoard tag of a per-|yaw|-bucket figure (``key`` cos, baseline or oracle)."""
    (tag,) = scalars({"per_yaw": {bucket: {key: 0.0}}})
    return tag


def tar_tag(key: str, far: str = VERIFY_FAR) -> str:
    """TensorBoard tag of TAR at a FAR (``key`` pred or baseline)."""
    (tag,) = scalars({"tar_at_far": {far: {key: 0.0}}})
    return tag


# What the best model and early stopping can follow (`--monitor`): name -> (how to read it, higher is better).
MONITORS = {
    "mean_cos": (lambda m: m["mean_cos"], True),
    "loss": (lambda m: m.get("loss", float("nan")), False),
    **{f"tar@{far:g}": ((lambda m, far=far: m["tar_at_far"][f"{far:g}"]["pred"]), True) for far in FARS},
}


def monitored(metrics: dict, name: str) -> tuple[float, bool]:
    """(value, higher_is_better) of a `MONITORS` entry in an evaluation's metrics."""
    read, higher = MONITORS[name]
    return float(read(metrics)), higher
