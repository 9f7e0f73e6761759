"""Training-time augmentation of a batch on the training device: pure torch, vectorised, no host sync.

Four independent augmentations, each off at 0 (`config.AugmentConfig`), applied
in this order to the *source* side of a training batch only (targets, evaluation
and export are never touched):

- **pose jitter** (``pose_jitter_deg``): a small random 3D head rotation J per
  sample, a rotation vector with each component N(0, sigma^2) (each axis turns
  by about sigma degrees; the total angle averages 1.6 sigma). The landmarks
  are rotated by J about their centroid, in their own pixel units (InsightFace
  scales ``landmark_3d_68``'s z by the same factor as x and y).
- **landmark jitter** (``landmark_jitter_px``): Gaussian noise of that std
  (pixels) on every coordinate of every landmark. ``face.pose`` is a
  least-squares fit of the mean shape to the 68 points, so the noise moves it
  too: by 0.2-0.5 deg per pixel of noise (geodesic angle, mean) for faces
  250-80 px wide, most of it in pitch and roll near profile (measured with
  `geometry.pose_from_landmarks` on `dist-train synth` landmarks; the depth
  spread of a face is small, so out-of-plane turns are the least determined).
  That is the size of pose jitter one would ask for, so it is not ignored:

  **How the pose stays consistent.** After the geometric changes (rotation,
  noise) the pose is turned by what they did to ``face.pose``'s own fit:
  R' = R(fit(kps')) R(fit(kps))^T R(pose), written back as InsightFace's
  (pitch, yaw, roll). The fit is InsightFace's computation (affine least
  squares of the mean shape, a fixed 4x68 matrix, so one batched matmul;
  ``P2sRt``; ``matrix2angle``), `geometry.fitted_pose` on the batch's device.
  On real data the stored pose *is* fit(kps), so the new pose is exactly what
  InsightFace would report for the augmented landmarks (to 2e-4 deg,
  tests/test_augment.py). For a rigid face (s R M + t from the mean shape M)
  the turn is exactly J; with identity shape deformations, the fit's turn
  differs from J by a median 0.03 deg (sigma = 2). A synthetic set's stored
  pose, the true rotation rather than the fit, keeps its own offset from the
  fit unchanged.
- **embedding noise** (``emb_noise``): src_emb + N(0, sigma^2) per dimension,
  re-normalised onto the unit sphere; the expected cos to the clean embedding
  is about 1 / sqrt(1 + 512 sigma^2) (0.99 at sigma = 0.0063).
- **part drop** (``drop_part_prob``): with that probability a sample loses one
  part of `geometry.LANDMARK_PARTS`, chosen uniformly. The part's points are
  moved to the centroid of the remaining points. Why that representation:
  the model sees landmarks only through `geometry.normalize_keypoints`
  (centroid removed, divided by the RMS distance to it). Points at the rest's
  centroid leave the centroid where the rest puts it and add nothing to the
  RMS, so after normalisation the dropped part is exactly zero (one constant
  "missing" input for any token layout) and the other parts keep their exact
  shapes and relative placement (one shift and one uniform scale, by about
  sqrt(68 / points kept), 1.08-1.19, change them all alike). Zeroed pixels
  (0, 0, 0) would instead drag the centroid to the image corner and rescale
  every other part; collapsing the part to its own centroid
  would still tell where the part was. The pose is left as it is: the head did
  not move, only the part's landmarks are missing.

Pose jitter and landmark jitter simulate errors of the landmark model and of
``face.pose``; the target stays the clean frontal embedding, so the model learns
to tolerate them. `augment` is deterministic for a given generator state; seed
one per micro batch with `seed_generator` so that a resumed run draws the same
noise as an uninterrupted one.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from dist_train.config import AugmentConfig
from dist_train.data.schema import N_LANDMARKS
from dist_train.geometry import LANDMARK_PARTS, matrix_to_pose, rotation_matrices
from dist_train.geometry import fitted_pose as pose_from_landmarks  # face.pose of a batch, on its device

AUGMENTED_FIELDS = ("src_emb", "src_kps", "src_pose")


def enabled(cfg: AugmentConfig) -> list[str]:
    """Names of the augmentations that are on (empty: `augment` returns its input)."""
    return [k for k in ("pose_jitter_deg", "landmark_jitter_px", "emb_noise", "drop_part_prob") if getattr(cfg, k) > 0]


def describe(cfg: AugmentConfig) -> str:
    """One line for logs and reports, e.g. ``pose_jitter_deg 2, emb_noise 0.005`` or ``none``."""
    return ", ".join(f"{k} {getattr(cfg, k):g}" for k in enabled(cfg)) or "none"


def step_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """A 63-bit seed for one micro batch of one rank, from the run's seed and the batch's place in the run."""
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_generator(generator: torch.Generator, seed: int, rank: int, step: int, micro: int = 0) -> torch.Generator:
    """Re-seed ``generator`` (host-side only, no device sync) for micro batch ``micro`` of optimizer step ``step``."""
    generator.manual_seed(step_seed(seed, rank, step, micro))
    return generator


def random_rotations(n: int, std_deg: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 3, 3) rotations exp([w]x), w ~ N(0, std^2 I) radians (Rodrigues' formula, safe at w = 0)."""
    w = torch.randn(n, 3, generator=generator, device=device) * math.radians(std_deg)
    theta2 = (w * w).sum(-1)
    theta = theta2.sqrt()
    small = theta < 1e-4
    safe = torch.where(small, torch.ones_like(theta), theta)
    a = torch.where(small, 1.0 - theta2 / 6.0, safe.sin() / safe)  # sin(t) / t
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - safe.cos()) / (safe * safe))  # (1 - cos t) / t^2
    zero = torch.zeros_like(theta)
    k = torch.stack([zero, -w[:, 2], w[:, 1], w[:, 2], zero, -w[:, 0], -w[:, 1], w[:, 0], zero], -1).unflatten(
        -1, (3, 3)
    )
    eye = torch.eye(3, device=device).expand(n, 3, 3)
    return eye + a[:, None, None] * k + b[:, None, None] * (k @ k)


@functools.lru_cache(maxsize=8)
def _part_of_point(device: torch.device) -> torch.Tensor:
    """(68,) part number of each landmark, on ``device`` (cached: no host-to-device copy per batch)."""
    index = torch.empty(N_LANDMARKS, dtype=torch.long)
    for i, (start, end) in enumerate(LANDMARK_PARTS.values()):
        index[start:end] = i
    return index.to(device)


# ---- the augmentation ---------------------------------------------------------------------------------


def augment(batch: dict[str, torch.Tensor], cfg: AugmentConfig, generator: torch.Generator) -> dict:
    """Augmented copy of a training batch (src_emb (B,512), src_kps (B,68,3), src_pose (B,3), float32).

    Returns ``batch`` itself when every augmentation is off. Otherwise a new dict
    with the same keys: the augmented source fields are new tensors, every other
    field (targets, identity, row numbers) is the same object. ``generator`` must
    be on the batch's device; the draws depend only on its state and the config.
    """
    if not enabled(cfg):
        return batch
    with torch.autocast(batch["src_kps"].device.type, enabled=False):  # pose fits in float32 even if called inside
        return _augment(batch, cfg, generator)


def _augment(batch: dict[str, torch.Tensor], cfg: AugmentConfig, generator: torch.Generator) -> dict:
    emb, kps, pose = batch["src_emb"], batch["src_kps"], batch["src_pose"]
    n, device = kps.shape[0], kps.device
    out = dict(batch)
    if cfg.pose_jitter_deg > 0 or cfg.landmark_jitter_px > 0:
        kps, pose = kps.float(), pose.float()
        before = pose_from_landmarks(kps)
        if cfg.pose_jitter_deg > 0:
            jitter = random_rotations(n, cfg.pose_jitter_deg, generator, device)
            centre = kps.mean(dim=1, keepdim=True)
            kps = (kps - centre) @ jitter.transpose(1, 2) + centre
        if cfg.landmark_jitter_px > 0:
            kps = kps + torch.randn(kps.shape, generator=generator, device=device) * cfg.landmark_jitter_px
        # turn the stored pose by what the changes did to face.pose's fit: R(after) R(before)^T R(pose)
        turn = rotation_matrices(pose_from_landmarks(kps)) @ rotation_matrices(before).transpose(1, 2)
        out["src_kps"], out["src_pose"] = (
            kps,
            matrix_to_pose(turn @ rotation_matrices(pose)).to(batch["src_pose"].dtype),
        )
    if cfg.emb_noise > 0:
        noise = torch.randn(emb.shape, generator=generator, device=device, dtype=emb.dtype)
        out["src_emb"] = torch.nn.functional.normalize(emb + cfg.emb_noise * noise, dim=-1)
    if cfg.drop_part_prob > 0:
        drop = torch.rand(n, generator=generator, device=device) < cfg.drop_part_prob
        part = torch.randint(0, len(LANDMARK_PARTS), (n,), generator=generator, device=device)
        mask = drop[:, None] & (_part_of_point(device)[None, :] == part[:, None])  # (B, 68): points to drop
        kps = out["src_kps"]
        keep = (~mask).unsqueeze(-1).to(kps.dtype)
        centre = (kps * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True)
        out["src_kps"] = torch.where(mask.unsqueeze(-1), centre, kps)
    return out
