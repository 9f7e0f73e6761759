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

That is family A (``--family A``, the default). Family B (``--family B``) is
built differently in every part, so that quality can be judged on data the
model was not designed around: identities with impostor structure, a nonlinear
identity-dependent distortion plus a drift toward a shared profile direction
(both exactly invertible: it has an oracle too), log-normal photo noise with
bad photos, other landmark shapes and noise, and the stored pose measured from
the landmarks by ``face.pose``'s code rather than the true one (see `FamilyB`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_train import __version__
from dist_train.data.schema import DEFAULT_BLOCK_SIZE, EMB_DIM, FIELDS, YAW_BUCKETS, yaw_bucket_index
from dist_train.data.shards import DEFAULT_SHARD_SAMPLES, add_layout_arguments, write_shard_set
from dist_train.data.splits import split_by_identity
from dist_train.geometry import mean_shape, rotation_matrices
from dist_train.metrics import row_cos
from dist_train.pack import PackError, ensure_new_output_dir

SYNTH_VERSION = 1  # bump when the same seed and params would give different arrays
FAMILIES = ("A", "B")
CHUNK_IDENTITIES = 512  # generation unit; each chunk has its own seed, so output does not depend on memory


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines the generated arrays (recorded as provenance)."""

    n_identities: int = 2000
    samples_per_identity: int = 16
    seed: int = 0
    family: str = "A"  # "A": the fields below; "B": a differently built family (FamilyB), see below
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
    tgt_noise: float = 0.2  # frontal samples agree with z to cos ~ 1 / sqrt(1 + tgt_noise^2): the data's ceiling
    # Distinct frontal samples per identity, dealt round-robin to its samples as extract does (None: one per sample).
    frontal_per_identity: int | None = None
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
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if not 1 <= self.planes <= EMB_DIM // 2:
            raise ValueError(f"planes must be in 1..{EMB_DIM // 2}, got {self.planes}")
        if self.tgt_noise < 0:
            raise ValueError(f"--tgt-noise must be >= 0, got {self.tgt_noise}")
        if self.frontal_per_identity is not None and self.frontal_per_identity < 1:
            raise ValueError(f"--frontal-per-identity must be >= 1, got {self.frontal_per_identity}")


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


def target_samples(rng: np.random.Generator, z: np.ndarray, k: int, p: SynthParams) -> np.ndarray:
    """(n_ids * k, EMB_DIM) frontal samples normalize(z + independent noise of norm ~tgt_noise), k per identity.

    With ``frontal_per_identity`` f, each identity has f such samples, dealt round-robin to its k rows.
    """
    f = p.frontal_per_identity or k
    tgt = rng.standard_normal((len(z) * f, EMB_DIM), dtype=np.float32)
    tgt *= np.float32(p.tgt_noise / np.sqrt(EMB_DIM))
    tgt = _unit(np.add(tgt, np.repeat(z, f, axis=0), out=tgt))
    if f == k:
        return tgt
    return tgt.reshape(len(z), f, EMB_DIM)[:, np.arange(k) % f].reshape(-1, EMB_DIM)


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
    tgt = target_samples(rng, z, k, p)
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


# ---- family B: a second, differently built distortion family -----------------------------------------
#
# Built so that quality is judged on data the model and its presets were not designed around. Where
# family A is one pose-linear rotation of fixed planes with isotropic noise and the true pose stored,
# family B differs in every part:
#
# - identities have ArcFace-like impostor structure: z = normalize(sqrt(a) m + sqrt(b) c_k + u) with a
#   shared mean direction m and one of `clusters` centres c_k, so impostors have cos ~0.07 on average
#   and ~0.3 within a cluster (family A: 0 for all);
# - the distortion is nonlinear and identity-dependent: plane k turns by
#   theta_k = rate_k * s(yaw) * (1 + mod * tanh(h_k(z))) + pitch_rate_k * pitch, where s(yaw) grows as
#   |yaw|^1.5 and h_k reads z's components in the subspace the planes leave alone; then the embedding
#   drifts toward a shared left- or right-profile direction by an angle growing as yaw^2 (profile
#   impostors become more alike). Both steps are exactly invertible given the pose, so the oracle is
#   normalize(D^-1(src)) with the true pose: the distortion undone, the noise left in;
# - photo noise: the profile noise level (growing with yaw^2) is scaled per sample by a log-normal
#   photo quality, and a share of "bad photos" get several times more;
# - landmarks: the mean shape deformed by smooth per-identity modes (Gaussian bumps) and per-sample
#   expression (mouth opening, brows), rotated by the true pose, faces 70-300 px (log-uniform), pixel
#   noise proportional to face size and larger on the far, self-occluded side; the stored pose is
#   computed from these landmarks by InsightFace's own ``face.pose`` code, as for real data (so it
#   differs from the true pose by ~2.5 deg median, like a real landmark model's error).


@dataclass(frozen=True)
class FamilyB:
    """Family B's constants (recorded in provenance as ``family_b``); the shared SynthParams give the sizes,
    the seed, ``image_px`` and the frontal targets (``tgt_noise``, ``frontal_per_identity``)."""

    clusters: int = 32
    mean_share: float = 0.1  # squared weight of the shared mean direction in z (impostor cos ~0.07)
    cluster_share: float = 0.35  # squared weight of the cluster centre (same-cluster impostor cos ~0.3)
    planes: int = 96
    rate_range: tuple[float, float] = (0.5, 1.5)  # radians of plane rotation at |yaw| = 90 deg, per pi/2
    identity_modulation: float = 0.5
    pitch_rate_std: float = 0.5
    yaw_power: float = 1.5
    drift_max: float = 0.45  # radians toward the profile direction at |yaw| = 90 (< pi/4: invertible)
    src_noise_frontal: float = 0.15
    src_noise_profile: float = 0.45
    quality_sigma: float = 0.3  # log-normal photo quality multiplying the noise level
    bad_photo_share: float = 0.03
    bad_photo_factor: float = 2.5
    frontal_share: float = 0.25  # |yaw| ~ |N(0, 12)| (at most 30) for this share, 25 + 64 Beta(2, 1.2) otherwise
    shape_modes: int = 8
    shape_std: float = 0.03
    face_px: tuple[float, float] = (70.0, 300.0)
    landmark_noise: float = 0.005  # pixel noise std as a fraction of the face scale
    occluded_noise_factor: float = 3.0  # on the far side at |yaw| = 90


MOUTH_LOWER = (55, 56, 57, 58, 59, 65, 66, 67)  # lower lip, outer and inner (iBUG 68, 0-based)
CHIN = tuple(range(5, 12))
BROWS = tuple(range(17, 27))


@dataclass(frozen=True)
class DistortionB:
    """Family B's D(z, pose): identity-modulated plane rotations, then a drift toward a profile direction."""

    planes: np.ndarray  # (EMB_DIM, 2 * planes) orthonormal: the rotated planes
    fixed: np.ndarray  # (EMB_DIM, EMB_DIM - 2 * planes) orthonormal: left alone, read by the modulation
    modulation: np.ndarray  # (EMB_DIM - 2 * planes, planes)
    rate: np.ndarray  # (planes,)
    pitch_rate: np.ndarray  # (planes,)
    side: np.ndarray  # (2, EMB_DIM) unit: right (yaw >= 0) and left profile directions, sharing a component
    f: FamilyB

    @classmethod
    def from_params(cls, p: SynthParams, f: FamilyB) -> DistortionB:
        rng = _rng(p.seed, 10)
        q, _ = np.linalg.qr(rng.standard_normal((EMB_DIM, EMB_DIM)))
        q = q.astype(np.float32)
        g = rng.standard_normal((EMB_DIM - 2 * f.planes, f.planes))
        g *= np.sqrt(EMB_DIM) / np.linalg.norm(g, axis=0)  # h_k ~ N(0, ~1) for a unit z
        rate = rng.uniform(*f.rate_range, f.planes).astype(np.float32)
        pitch_rate = rng.normal(0.0, f.pitch_rate_std, f.planes).astype(np.float32)
        d = _unit(rng.standard_normal((2, EMB_DIM), dtype=np.float32))
        side = _unit(np.stack([d[0] + d[1], d[0] - d[1]]))
        return cls(q[:, : 2 * f.planes], q[:, 2 * f.planes :], g.astype(np.float32), rate, pitch_rate, side, f)

    def angles(self, x: np.ndarray, pose_deg: np.ndarray) -> np.ndarray:
        """(n, planes) plane angles: nonlinear in yaw, modulated by x's component outside the planes."""
        rad = np.deg2rad(pose_deg.astype(np.float32))
        yaw = rad[:, 1:2]
        s = np.sign(yaw) * np.abs(yaw) ** self.f.yaw_power / np.float32((np.pi / 2) ** (self.f.yaw_power - 1))
        h = np.tanh((x @ self.fixed) @ self.modulation)
        return s * self.rate * (1 + self.f.identity_modulation * h) + rad[:, 0:1] * self.pitch_rate

    def _rotate(self, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        c, s = np.cos(theta), np.sin(theta)
        y = (x @ self.planes).reshape(len(x), -1, 2)
        a, b = y[..., 0], y[..., 1]
        delta = np.stack([(c - 1) * a - s * b, s * a + (c - 1) * b], axis=-1)
        return x + delta.reshape(len(x), -1) @ self.planes.T

    def _drift(self, pose_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        phi = (self.f.drift_max * (np.abs(pose_deg[:, 1:2]) / 90.0) ** 2).astype(np.float32)
        return phi, np.where(pose_deg[:, 1:2] >= 0, self.side[0], self.side[1])

    def apply(self, z: np.ndarray, pose_deg: np.ndarray) -> np.ndarray:
        """Unit z -> cos(phi) w + sin(phi) side, w = z with its planes turned (norm ~1, not exactly)."""
        w = self._rotate(z, self.angles(z, pose_deg))  # the angles read z outside the planes: unchanged by them
        phi, side = self._drift(pose_deg)
        return np.cos(phi) * w + np.sin(phi) * side

    def invert(self, y: np.ndarray, pose_deg: np.ndarray) -> np.ndarray:
        """Any vector in the direction of apply(z) -> z, exactly (w = (lam y - sin phi side) / cos phi, |w| = 1)."""
        y = _unit(y.astype(np.float32, copy=True))
        phi, side = self._drift(pose_deg)
        sp, cp = np.sin(phi), np.cos(phi)
        yp = np.einsum("ij,ij->i", y, side)[:, None]
        lam = sp * yp + np.sqrt(np.maximum(sp * sp * yp * yp + cp * cp - sp * sp, 0.0))
        w = (lam * y - sp * side) / cp
        return self._rotate(w, -self.angles(w, pose_deg))


def sample_poses_b(rng: np.random.Generator, n: int, f: FamilyB) -> np.ndarray:
    """(n, 3) true pitch, yaw, roll (degrees): a frontal share and a profile range skewed toward 90."""
    frontal = rng.random(n) < f.frontal_share
    abs_yaw = np.where(frontal, np.minimum(np.abs(rng.normal(0.0, 12.0, n)), 30.0), 25.0 + 64.0 * rng.beta(2.0, 1.2, n))
    yaw = abs_yaw * rng.choice([-1.0, 1.0], n)
    return np.stack([rng.normal(-3.0, 12.0, n), yaw, rng.normal(0.0, 7.0, n)], axis=1).astype(np.float32)


def shape_modes_b(p: SynthParams, f: FamilyB) -> np.ndarray:
    """(modes, 68, 3): smooth deformations of the mean shape, each a Gaussian bump around one landmark."""
    rng = _rng(p.seed, 12)
    m = mean_shape()
    centres = m[rng.choice(len(m), f.shape_modes, replace=False)]
    weight = np.exp(-((m[None] - centres[:, None]) ** 2).sum(-1) / (2 * 0.25**2))  # (modes, 68)
    return weight[..., None] * rng.standard_normal((f.shape_modes, 1, 3))


def landmarks_b(
    rng: np.random.Generator, modes: np.ndarray, coef: np.ndarray, pose: np.ndarray, p: SynthParams, f: FamilyB
) -> np.ndarray:
    """(n, 68, 3) landmark_3d_68-like pixels: identity modes, expression, true pose, size-scaled noise."""
    n = len(pose)
    shapes = mean_shape() + np.einsum("nj,jpc->npc", coef, modes) * f.shape_std
    mouth = rng.random(n) ** 2 * 0.08  # mostly closed
    shapes[:, MOUTH_LOWER, 1] += mouth[:, None]
    shapes[:, CHIN, 1] += 0.6 * mouth[:, None]
    shapes[:, BROWS, 1] -= rng.normal(0.0, 0.015, n)[:, None]
    scale = np.exp(rng.uniform(*np.log(f.face_px), n))
    pts = np.einsum("npc,nkc->npk", shapes, rotation_matrices(pose)) * scale[:, None, None]
    depth = pts[..., 2] - pts[..., 2].mean(axis=1, keepdims=True)
    far = depth * depth[:, 30:31] < 0  # on the other side of the face from the nose tip
    occluded = 1 + (f.occluded_noise_factor - 1) * far * np.abs(np.sin(np.deg2rad(pose[:, 1:2])))
    half = 0.7 * scale
    centre = np.stack([rng.uniform(half, p.image_px - half), rng.uniform(half, p.image_px - half)], axis=1)
    pts[..., :2] += centre[:, None, :]
    pts += rng.standard_normal(pts.shape) * (f.landmark_noise * scale[:, None] * occluded)[..., None]
    return pts.astype(np.float32)


def face_pose(kps: np.ndarray) -> np.ndarray:
    """(n, 68, 3) -> (n, 3) degrees: InsightFace's ``face.pose`` (`geometry.pose_from_landmarks`), vectorised."""
    homo = np.hstack([mean_shape(), np.ones((len(mean_shape()), 1))])
    linear = np.einsum("ap,npc->nca", np.linalg.pinv(homo), kps.astype(np.float64))[:, :, :3]  # rows of P[:, :3]
    r1 = linear[:, 0] / np.linalg.norm(linear[:, 0], axis=1, keepdims=True)
    r2 = linear[:, 1] / np.linalg.norm(linear[:, 1], axis=1, keepdims=True)
    r3 = np.cross(r1, r2)
    sy = np.sqrt(r1[:, 0] ** 2 + r2[:, 0] ** 2)
    angles = np.stack([np.arctan2(r3[:, 1], r3[:, 2]), np.arctan2(-r3[:, 0], sy), np.arctan2(r2[:, 0], r1[:, 0])], 1)
    return np.degrees(angles).astype(np.float32)


@dataclass(frozen=True)
class FamilyBWorld:
    """What all of family B's chunks share: the distortion, identity clusters and shape modes."""

    dist: DistortionB
    mean_dir: np.ndarray  # (EMB_DIM,)
    centres: np.ndarray  # (clusters, EMB_DIM)
    modes: np.ndarray  # (shape_modes, 68, 3)

    @classmethod
    def from_params(cls, p: SynthParams, f: FamilyB) -> FamilyBWorld:
        rng = _rng(p.seed, 13)
        mean_dir = _unit(rng.standard_normal((1, EMB_DIM), dtype=np.float32))[0]
        centres = _unit(rng.standard_normal((f.clusters, EMB_DIM), dtype=np.float32))
        return cls(DistortionB.from_params(p, f), mean_dir, centres, shape_modes_b(p, f))


def generate_chunk_b(p: SynthParams, world: FamilyBWorld, chunk: int) -> dict[str, np.ndarray]:
    """Family B's samples of identities [chunk*CHUNK_IDENTITIES, ...), from the chunk's own seed (float32)."""
    f = world.dist.f
    rng = _rng(p.seed, 11, chunk)
    first = chunk * CHUNK_IDENTITIES
    n_ids = min(CHUNK_IDENTITIES, p.n_identities - first)
    k = p.samples_per_identity
    n = n_ids * k
    cluster = rng.integers(0, f.clusters, n_ids)
    z = rng.standard_normal((n_ids, EMB_DIM), dtype=np.float32) / np.float32(np.sqrt(EMB_DIM))
    z += (
        np.float32(np.sqrt(f.mean_share)) * world.mean_dir
        + np.float32(np.sqrt(f.cluster_share)) * world.centres[cluster]
    )
    z = _unit(z)
    true_pose = sample_poses_b(rng, n, f)
    coef = np.repeat(rng.standard_normal((n_ids, f.shape_modes)), k, axis=0)
    kps = landmarks_b(rng, world.modes, coef, true_pose, p, f)
    tgt = target_samples(rng, z, k, p)
    quality = np.exp(rng.normal(0.0, f.quality_sigma, n)) * np.where(
        rng.random(n) < f.bad_photo_share, f.bad_photo_factor, 1.0
    )
    rel_yaw = (np.abs(true_pose[:, 1]) / 90.0) ** 2
    level = (f.src_noise_frontal + (f.src_noise_profile - f.src_noise_frontal) * rel_yaw) * quality
    src = rng.standard_normal((n, EMB_DIM), dtype=np.float32)
    src *= (level / np.sqrt(EMB_DIM)).astype(np.float32)[:, None]
    src = _unit(np.add(src, world.dist.apply(np.repeat(z, k, axis=0), true_pose), out=src))
    oracle = _unit(world.dist.invert(src, true_pose))
    centroid = np.repeat(_unit(tgt.reshape(n_ids, k, EMB_DIM).mean(axis=1)), k, axis=0)
    return {
        "src_emb": src,
        "src_kps": kps,
        "src_pose": face_pose(kps),  # measured from the landmarks, as InsightFace does
        "tgt_emb": tgt,
        "identity": np.repeat(np.arange(first, first + n_ids, dtype=np.int64), k),
        "tgt_centroid": centroid,
        "oracle_emb": oracle,
    }


def generate(p: SynthParams) -> dict[str, np.ndarray]:
    """All samples in storage dtypes, grouped by identity; the same params give byte-identical arrays.

    Chunks are cast into preallocated storage arrays (float16 embeddings), so a
    million samples take ~5 GB rather than ~10 GB of float32 plus a concatenation.
    """
    p.check()
    if p.family == "B":
        world = FamilyBWorld.from_params(p, FamilyB())
        chunk_of = functools.partial(generate_chunk_b, p, world)
    else:
        chunk_of = functools.partial(generate_chunk, p, Distortion.from_params(p))
    n = p.n_identities * p.samples_per_identity
    out = {name: np.empty((n, *f.shape), dtype=f.storage) for name, f in FIELDS.items()}
    for c in range(-(-p.n_identities // CHUNK_IDENTITIES)):
        part = chunk_of(c)
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
        **({"family_b": dataclasses.asdict(FamilyB())} if p.family == "B" else {}),
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
    p.add_argument(
        "--family",
        choices=FAMILIES,
        default=d.family,
        help="A: pose-linear plane rotations (the default); B: a differently built family, nonlinear and "
        "identity-dependent, with impostor structure, photo noise and face.pose measured from the landmarks",
    )
    p.add_argument(
        "--tgt-noise",
        type=float,
        default=d.tgt_noise,
        help="noise norm on each frontal sample; the data's ceiling is cos ~ 1/sqrt(1 + tgt_noise^2)",
    )
    p.add_argument(
        "--frontal-per-identity",
        type=int,
        default=None,
        help="distinct frontal samples per identity, dealt round-robin (default: one per sample)",
    )
    add_layout_arguments(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    params = SynthParams(
        n_identities=args.n_identities,
        samples_per_identity=args.samples_per_identity,
        seed=args.seed,
        family=args.family,
        tgt_noise=args.tgt_noise,
        frontal_per_identity=args.frontal_per_identity,
    )
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
