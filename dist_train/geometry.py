"""Face geometry in one place: keypoint normalisation, pose encoding, pose from landmarks.

The pose maths (Euler angles <-> rotations in InsightFace's ``face.pose``
convention, the batched landmark fit) takes numpy arrays or torch tensors, so
data generation, inspection and training-time augmentation share one formula.

`normalize_keypoints` and `encode_pose` are the only input encodings of the
model; they run inside `forward`, so training, evaluation, the exported ONNX
graph and the inference API cannot disagree about them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import pickle

import numpy as np
import torch

_DEG = math.pi / 180.0
Array = np.ndarray | torch.Tensor  # what the pose maths takes and returns, one library in, the same out

# iBUG 68-point facial parts (0-based, end exclusive), the default landmark tokens.
LANDMARK_PARTS: dict[str, tuple[int, int]] = {
    "jaw": (0, 17),
    "brows": (17, 27),
    "nose": (27, 36),
    "eyes": (36, 48),
    "mouth": (48, 68),
}


def normalize_keypoints(kps: torch.Tensor) -> torch.Tensor:
    """Remove position and scale from ``landmark_3d_68`` pixels: (..., 68, 3) -> same shape.

    Subtracts the centroid and divides by the RMS distance to it, so the result
    does not depend on where the face was in the image or how large it was.
    Computed in float32 whatever the input dtype: squared pixel distances
    overflow float16.
    """
    kps = kps.float()
    centred = kps - kps.mean(dim=-2, keepdim=True)
    scale = centred.pow(2).sum(dim=-1).mean(dim=-1, keepdim=True).sqrt().unsqueeze(-1)
    return centred / scale.clamp_min(1e-6)


def encode_pose(pose_deg: torch.Tensor) -> torch.Tensor:
    """(..., 3) pitch/yaw/roll in degrees -> (..., 6) sin and cos, continuous at ±180."""
    rad = pose_deg.float() * (math.pi / 180.0)
    return torch.cat([rad.sin(), rad.cos()], dim=-1)


def dream_yaw_gate(pose_deg: torch.Tensor) -> torch.Tensor:
    """DREAM's fixed gate sigma(10(|yaw|/45 - 1)): ~0 for frontal faces, 0.5 at 45 deg, ~1 at profile."""
    return torch.sigmoid(10.0 * (pose_deg[..., 1:2].float().abs() / 45.0 - 1.0))


@functools.lru_cache(maxsize=1)
def mean_shape() -> np.ndarray:
    """InsightFace's 68-point 3D mean face (68, 3), y down, the reference of ``face.pose``."""
    # find_spec locates the installed package without running its __init__ (seconds of imports)
    package_dir = importlib.util.find_spec("insightface").submodule_search_locations[0]
    path = os.path.join(package_dir, "data", "objects", "meanshape_68.pkl")
    with open(path, "rb") as f:  # a file of the installed package, not user data
        return np.asarray(pickle.load(f), dtype=np.float64)


def _xp(a: Array):
    """The array library of ``a``: the pose formulas below are written once for numpy arrays and torch tensors."""
    return torch if isinstance(a, torch.Tensor) else np


def rotation_matrices(pose_deg: Array) -> Array:
    """(N, 3) pitch/yaw/roll degrees -> (N, 3, 3) with R = Rz(roll) Ry(yaw) Rx(pitch).

    This is the inverse of insightface's ``matrix2angle``, so landmarks made as
    ``s * R @ mean_shape`` give back the same pose through ``face.pose``'s code.
    numpy input is computed in float64; a torch tensor keeps its dtype, device
    and leading dimensions (``augment`` runs it batched on the training device).
    """
    if not isinstance(pose_deg, torch.Tensor):
        pose_deg = np.asarray(pose_deg, dtype=np.float64).reshape(-1, 3)
    xp = _xp(pose_deg)
    p, y, r = (pose_deg[..., i] * _DEG for i in range(3))
    cp, sp, cy, sy, cr, sr = xp.cos(p), xp.sin(p), xp.cos(y), xp.sin(y), xp.cos(r), xp.sin(r)
    one, zero = xp.ones_like(p), xp.zeros_like(p)
    shape = tuple(p.shape) + (3, 3)
    rx = xp.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).reshape(shape)
    ry = xp.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(shape)
    rz = xp.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).reshape(shape)
    return rz @ ry @ rx


def matrix_to_pose(rot: Array) -> Array:
    """(..., 3, 3) -> (..., 3) pitch/yaw/roll degrees: insightface's ``transform.matrix2angle``, batched."""
    xp = _xp(rot)
    sy = xp.sqrt(rot[..., 0, 0] ** 2 + rot[..., 1, 0] ** 2)
    singular = sy < 1e-6
    pitch = xp.where(singular, xp.arctan2(-rot[..., 1, 2], rot[..., 1, 1]), xp.arctan2(rot[..., 2, 1], rot[..., 2, 2]))
    yaw = xp.arctan2(-rot[..., 2, 0], sy)
    roll = xp.where(singular, xp.zeros_like(sy), xp.arctan2(rot[..., 1, 0], rot[..., 0, 0]))
    return xp.stack([pitch, yaw, roll], -1) / _DEG


@functools.lru_cache(maxsize=1)
def _mean_shape_pinv() -> np.ndarray:
    """(4, 68) float64 least-squares solver of [mean_shape, 1] P^T = landmarks."""
    return np.linalg.pinv(np.hstack([mean_shape(), np.ones((len(mean_shape()), 1))]))


@functools.lru_cache(maxsize=8)
def _mean_shape_pinv_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`_mean_shape_pinv` on ``device`` (cached: no host-to-device copy per batch)."""
    return torch.from_numpy(_mean_shape_pinv()).to(device=device, dtype=dtype)


def _unit(v: Array) -> Array:
    """Rows scaled to length 1 (torch's ``normalize`` on tensors, as ``augment`` always did)."""
    if isinstance(v, torch.Tensor):
        return torch.nn.functional.normalize(v, dim=-1)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _cross(a: Array, b: Array) -> Array:
    return torch.linalg.cross(a, b) if isinstance(a, torch.Tensor) else np.cross(a, b)


def fitted_rotation(kps: Array) -> Array:
    """(N, 68, 3) landmarks -> (N, 3, 3): ``face.pose``'s R (affine fit of the mean shape, then ``P2sRt``).

    InsightFace's ``estimate_affine_matrix_3d23d`` solves the same least squares
    one face at a time; one matmul with the mean shape's pseudo-inverse fits
    them all (numpy: float64; torch: the tensor's dtype and device).
    """
    xp = _xp(kps)
    pinv = _mean_shape_pinv_on(kps.device, kps.dtype) if xp is torch else _mean_shape_pinv()
    linear = (pinv @ kps)[..., :3, :]  # (N, 3, 3): column c is row c of P[:, :3]
    r1, r2 = _unit(linear[..., 0]), _unit(linear[..., 1])
    return xp.stack([r1, r2, _cross(r1, r2)], -2)


def fitted_pose(kps: Array) -> Array:
    """(N, 68, 3) landmarks -> (N, 3) degrees: `pose_from_landmarks`' result, batched in numpy or torch."""
    return matrix_to_pose(fitted_rotation(kps))


def pose_from_landmarks(lmk: np.ndarray) -> np.ndarray:
    """(N, 68, 3) landmark_3d_68 -> (N, 3) pitch/yaw/roll, by insightface's own computation.

    Calls ``insightface.utils.transform`` exactly as ``model_zoo/landmark.py``
    does for ``face.pose``; used to check stored poses against landmarks.
    """
    from insightface.utils import transform

    mean = mean_shape().astype(np.float32)
    out = np.empty((len(lmk), 3), dtype=np.float32)
    for i, pts in enumerate(np.asarray(lmk, dtype=np.float32)):
        P = transform.estimate_affine_matrix_3d23d(mean, pts)
        _, R, _ = transform.P2sRt(P)
        out[i] = transform.matrix2angle(R)
    return out
