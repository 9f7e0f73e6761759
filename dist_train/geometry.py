"""Face geometry in one place: keypoint normalisation, pose encoding, pose from landmarks.

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


def rotation_matrices(pose_deg: np.ndarray) -> np.ndarray:
    """(N, 3) pitch/yaw/roll degrees -> (N, 3, 3) with R = Rz(roll) Ry(yaw) Rx(pitch).

    This is the inverse of insightface's ``matrix2angle``, so landmarks made as
    ``s * R @ mean_shape`` give back the same pose through ``face.pose``'s code.
    """
    p, y, r = np.deg2rad(np.asarray(pose_deg, dtype=np.float64)).T
    cp, sp, cy, sy, cr, sr = np.cos(p), np.sin(p), np.cos(y), np.sin(y), np.cos(r), np.sin(r)
    one, zero = np.ones_like(p), np.zeros_like(p)
    rx = np.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).reshape(-1, 3, 3)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = np.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


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
