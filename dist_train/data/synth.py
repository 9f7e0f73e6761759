"""`dist-train synth`: synthetic profile->frontal embedding pairs with a known answer.

Stands in for InsightFace output. Each identity has a unit vector ``z``; its
frontal embedding is ``tgt = normalize(z + noise)`` and a profile embedding is
``src = normalize(D(pose) z + noise(|yaw|))``, where ``D(pose)`` rotates a fixed
set of random orthogonal 2-D planes by angles linear in yaw and pitch. ``D`` is
known and invertible, so ``oracle_emb = normalize(D(pose)^-1 src)`` is the
best any model can do: only the noise is lost. Because ``D`` depends on the
pose, no single linear map of ``src_emb`` undoes it. Landmarks are InsightFace's
mean shape, deformed per identity, rotated by the pose and placed in image
pixels, so ``face.pose``'s own computation recovers the pose from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_train import __version__
from dist_train.data.pack import PackError, ensure_new_output_dir
from dist_train.data.schema import DEFAULT_BLOCK_SIZE, EMB_DIM, FIELDS, YAW_BUCKETS, yaw_bucket_index
from dist_train.data.shards import DEFAULT_SHARD_SAMPLES, add_layout_arguments, write_shard_set
from dist_train.data.splits import split_by_identity
from dist_train.geometry import mean_shape, rotation_matrices
from dist_train.metrics import row_cos

SYNTH_VERSION = 1  # bump when the same seed and params would give different arrays
CHUNK_IDENTITIES = 512  # generation unit; each chunk has its own seed, so output does not depend on memory


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines the generated arrays (recorded as provenance)."""

    n_identities: int = 2000
    samples_per_identity: int = 16
    seed: int = 0
    # Pose mix: a share of near-frontal faces, the rest in the 30-90 deg profile range.
    frontal_share: float = 0.2  # |yaw| ~ U(0, 30) for this share, U(30, 90) otherwise
    pitch_std: float = 10.0
    roll_std: float = 5.0
    # Distortion D(pose): `planes` random orthogonal 2-D planes, each rotated by
    # theta = yaw_rate * yaw + pitch_rate * pitch (radians). The correction
    # D^-1 x - x = (cos theta - 1) P x - sin theta J x is two pose-dependent
    # scalars times two fixed linear maps: learnable, yet no single linear map,
    # as the sin term flips sign with the sign of yaw.
    planes: int = 64
    yaw_rate: float = 1.35
    pitch_rate: float = 0.3
    # Noise the model cannot recover (norm of the added Gaussian, relative to |z| = 1).
    tgt_noise: float = 0.2
    src_noise_frontal: float = 0.15
    src_noise_profile: float = 0.5  # at |yaw| = 90, growing with (|yaw| / 90)^2
    # Landmarks in image pixels.
    shape_variation: float = 0.02  # per-identity smooth deformation of the mean shape (pose error ~0.6 deg)
    face_scale_px: tuple[float, float] = (80.0, 250.0)
    image_px: float = 640.0
    pixel_noise: float = 0.7

    def check(self) -> None:
        if self.n_identities < 2 or self.samples_per_identity < 1:
            raise ValueError(
                f"need --n-identities >= 2 and --samples-per-identity >= 1 "
                f"(got {self.n_identities}, {self.samples_per_identity})"
            )
        if not 1 <= self.planes <= EMB_DIM // 2:
            raise ValueError(f"planes must be in 1..{EMB_DIM // 2}, got {self.planes}")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _unit(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in place (float32 rows; einsum is ~3x faster than linalg.norm here)."""
    a /= np.sqrt(np.einsum("ij,ij->i", a, a))[:, None]
    return a


@dataclass(frozen=True)
class Distortion:
    """D(pose): rotation of the planes spanned by column pairs of ``basis`` (EMB_DIM, 2*planes).

    Applied in closed form as x + B (R(theta) - I) B^T x, with no per-sample matrix.
    """

    basis: np.ndarray
    yaw_rate: float  # radians of plane rotation per radian of yaw
    pitch_rate: float

    @classmethod
    def from_params(cls, p: SynthParams) -> Distortion:
        basis, _ = np.linalg.qr(_rng(p.seed, 0).standard_normal((EMB_DIM, 2 * p.planes)))
        return cls(basis.astype(np.float32), p.yaw_rate, p.pitch_rate)

    def apply(self, x: np.ndarray, pose_deg: np.ndarray, inverse: bool = False) -> np.ndarray:
        rad = np.deg2rad(pose_deg.astype(np.float32))
        theta = (rad[:, 1:2] * self.yaw_rate + rad[:, 0:1] * self.pitch_rate) * (-1.0 if inverse else 1.0)
        c, s = np.cos(theta), np.sin(theta)
        y = (x @ self.basis).reshape(len(x), -1, 2)
        a, b = y[..., 0], y[..., 1]
        delta = np.stack([(c - 1) * a - s * b, s * a + (c - 1) * b], axis=-1)
        return x + delta.reshape(len(x), -1) @ self.basis.T


def sample_poses(rng: np.random.Generator, n: int, p: SynthParams) -> np.ndarray:
    """(n, 3) pitch, yaw, roll in degrees; every yaw bucket populated, most samples in profile."""
    frontal = rng.random(n) < p.frontal_share
    abs_yaw = np.where(frontal, rng.uniform(0.0, 30.0, n), rng.uniform(30.0, 90.0, n))
    yaw = abs_yaw * rng.choice([-1.0, 1.0], n)
    pitch = rng.normal(0.0, p.pitch_std, n)
    roll = rng.normal(0.0, p.roll_std, n)
    return np.stack([pitch, yaw, roll], axis=1).astype(np.float32)


def identity_shapes(rng: np.random.Generator, n_ids: int, p: SynthParams) -> np.ndarray:
    """(n_ids, 68, 3) mean shape plus a smooth per-identity deformation (quadratic in the coordinates)."""
    m = mean_shape()
    x, y, z = m.T
    quad = np.stack([x * x, y * y, z * z, x * y, y * z, x * z], axis=1)  # (68, 6)
    coef = rng.normal(0.0, p.shape_variation, (n_ids, 6, 3))
    return m + quad @ coef


def landmarks(rng: np.random.Generator, shapes: np.ndarray, pose: np.ndarray, p: SynthParams) -> np.ndarray:
    """(n, 68, 3) like ``landmark_3d_68``: x, y in image pixels, z relative depth in the same units."""
    n = len(pose)
    scale = rng.uniform(*p.face_scale_px, n)
    half = 0.7 * scale  # mean shape spans about ±0.63, so the face stays inside the image
    centre = np.stack([rng.uniform(half, p.image_px - half), rng.uniform(half, p.image_px - half)], axis=1)
    rot_t = rotation_matrices(pose).transpose(0, 2, 1) * scale[:, None, None]
    pts = (shapes @ rot_t).astype(np.float32)
    pts[..., :2] += centre[:, None, :].astype(np.float32)
    pts += rng.standard_normal(pts.shape, dtype=np.float32) * np.float32(p.pixel_noise)
    return pts


def generate_chunk(p: SynthParams, dist: Distortion, chunk: int) -> dict[str, np.ndarray]:
    """All samples of identities [chunk*CHUNK_IDENTITIES, ...), from the chunk's own seed (float32)."""
    rng = _rng(p.seed, 1, chunk)
    first = chunk * CHUNK_IDENTITIES
    n_ids = min(CHUNK_IDENTITIES, p.n_identities - first)
    k = p.samples_per_identity
    n = n_ids * k
    z = _unit(rng.standard_normal((n_ids, EMB_DIM), dtype=np.float32))
    pose = sample_poses(rng, n, p)
    kps = landmarks(rng, np.repeat(identity_shapes(rng, n_ids, p), k, axis=0), pose, p)
    z_rows = np.repeat(z, k, axis=0)
    # Per-component noise std = level / sqrt(EMB_DIM), so the noise vector's norm is about the level.
    tgt = rng.standard_normal((n, EMB_DIM), dtype=np.float32)
    tgt *= np.float32(p.tgt_noise / np.sqrt(EMB_DIM))
    tgt = _unit(np.add(tgt, z_rows, out=tgt))
    rel_yaw = (np.abs(pose[:, 1]) / np.float32(90.0)) ** 2
    src_level = p.src_noise_frontal + (p.src_noise_profile - p.src_noise_frontal) * rel_yaw
    src = rng.standard_normal((n, EMB_DIM), dtype=np.float32)
    src *= (src_level / np.sqrt(EMB_DIM)).astype(np.float32)[:, None]
    src = _unit(np.add(src, dist.apply(z_rows, pose), out=src))
    oracle = _unit(dist.apply(src, pose, inverse=True))
    # tgt_centroid: normalised mean of the identity's own k frontal samples (tgt_emb), not of z.
    centroid = np.repeat(_unit(tgt.reshape(n_ids, k, EMB_DIM).mean(axis=1)), k, axis=0)
    identity = np.repeat(np.arange(first, first + n_ids, dtype=np.int64), k)
    return {
        "src_emb": src,
        "src_kps": kps,
        "src_pose": pose,
        "tgt_emb": tgt,
        "identity": identity,
        "tgt_centroid": centroid,
        "oracle_emb": oracle,
    }


def generate(p: SynthParams) -> dict[str, np.ndarray]:
    """All samples in storage dtypes, grouped by identity; the same params give byte-identical arrays.

    Chunks are cast into preallocated storage arrays (float16 embeddings), so a
    million samples take ~5 GB rather than ~10 GB of float32 plus a concatenation.
    """
    p.check()
    dist = Distortion.from_params(p)
    n = p.n_identities * p.samples_per_identity
    out = {name: np.empty((n, *f.shape), dtype=f.storage) for name, f in FIELDS.items()}
    for c in range(-(-p.n_identities // CHUNK_IDENTITIES)):
        part = generate_chunk(p, dist, c)
        start = c * CHUNK_IDENTITIES * p.samples_per_identity
        for name, a in part.items():
            out[name][start : start + len(a)] = a
    return out


def split_summary(arrays: dict[str, np.ndarray]) -> dict:
    """Baseline cos(src, tgt) and oracle cos(oracle, tgt), overall and per yaw bucket, as stored (float16)."""
    base = row_cos(arrays["src_emb"], arrays["tgt_emb"])
    orc = row_cos(arrays["oracle_emb"], arrays["tgt_emb"])
    bucket = yaw_bucket_index(arrays["src_pose"][:, 1])
    per_yaw = {}
    for i, name in enumerate(YAW_BUCKETS):
        m = bucket == i
        if m.any():
            per_yaw[name] = {"n": int(m.sum()), "baseline": float(base[m].mean()), "oracle": float(orc[m].mean())}
    return {
        "n_samples": int(len(base)),
        "n_identities": int(len(np.unique(arrays["identity"]))),
        "identity_baseline_cos": float(base.mean()),
        "oracle_cos": float(orc.mean()),
        "per_yaw": per_yaw,
    }


def make_shard_set(
    out: str | Path,
    p: SynthParams,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict:
    """Generate, split by identity and write; returns the summary stored as index.json["synth"]."""
    out = Path(out)
    ensure_new_output_dir(out)
    t0 = time.perf_counter()
    arrays = generate(p)
    gen_s = time.perf_counter() - t0
    splits = split_by_identity(arrays, val_fraction, test_fraction, p.seed)
    summary = {
        "tgt_centroid": "normalised mean of the identity's samples_per_identity tgt_emb rows",
        "per_split": {s: split_summary(a) for s, a in splits.items()},
    }
    provenance = {
        "tool": "dist_train.data.synth",
        "synth_version": SYNTH_VERSION,
        "dist_train_version": __version__,
        "params": dataclasses.asdict(p),
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
    }
    write_shard_set(
        out, splits, provenance=provenance, extra={"synth": summary}, shard_samples=shard_samples, block_size=block_size
    )
    return summary | {"generate_seconds": gen_s}


def format_summary(out: Path, summary: dict) -> str:
    n = sum(s["n_samples"] for s in summary["per_split"].values())
    lines = [f"wrote {out}: {n} samples (generated in {summary['generate_seconds']:.2f} s)"]
    lines.append(f"  {'split':<6}{'samples':>9}{'identities':>12}{'baseline cos':>14}{'oracle cos':>12}")
    for split, s in summary["per_split"].items():
        lines.append(
            f"  {split:<6}{s['n_samples']:>9}{s['n_identities']:>12}"
            f"{s['identity_baseline_cos']:>14.4f}{s['oracle_cos']:>12.4f}"
        )
    for split, s in summary["per_split"].items():
        cells = "  ".join(
            f"{b} {s['per_yaw'][b]['baseline']:.3f}/{s['per_yaw'][b]['oracle']:.3f}"
            for b in YAW_BUCKETS
            if b in s["per_yaw"]
        )
        lines.append(f"  {split} per |yaw| (baseline/oracle): {cells}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = SynthParams()
    p = argparse.ArgumentParser(prog="dist-train synth", description=__doc__.splitlines()[0])
    p.add_argument("--n-identities", type=int, default=d.n_identities)
    p.add_argument("--samples-per-identity", type=int, default=d.samples_per_identity)
    p.add_argument("--seed", type=int, default=d.seed)
    add_layout_arguments(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    params = SynthParams(n_identities=args.n_identities, samples_per_identity=args.samples_per_identity, seed=args.seed)
    try:
        summary = make_shard_set(
            args.out,
            params,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            shard_samples=args.shard_samples,
            block_size=args.block_size,
        )
    except (PackError, ValueError) as e:
        print(f"dist-train synth: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(Path(args.out), summary))
    return 0
