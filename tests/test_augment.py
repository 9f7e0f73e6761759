"""dist_train.augment: no-op when off, determinism, pose consistency through InsightFace's code, noise statistics."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN_FLAGS, TrainRun, scalars

from dist_train import augment as aug
from dist_train.config import AugmentConfig
from dist_train.geometry import LANDMARK_PARTS, normalize_keypoints, pose_from_landmarks, rotation_matrices
from dist_train.metrics import TRAIN_TAGS
from dist_train.synth import SynthParams, generate

PARTS = list(LANDMARK_PARTS.values())


def geodesic_deg(pose_a: np.ndarray, pose_b: np.ndarray) -> np.ndarray:
    """Angle (degrees) of the rotation between two (N, 3) poses: blind to Euler-angle folding near |yaw| 90."""
    r = np.einsum("nij,nij->n", rotation_matrices(pose_a), rotation_matrices(pose_b))
    return np.degrees(np.arccos(np.clip((r - 1) / 2, -1, 1)))


@functools.lru_cache(maxsize=4)
def _synth(rigid: bool) -> dict[str, np.ndarray]:
    extra = {"shape_variation": 0.0, "pixel_noise": 0.0} if rigid else {}
    return generate(SynthParams(n_identities=40, samples_per_identity=8, seed=5, **extra))


def batch_of(rigid: bool = False, pose: str = "stored") -> dict[str, torch.Tensor]:
    """320 synthetic samples; pose "stored" (the true rotation) or "fit" (face.pose of the landmarks, as real data)."""
    a = _synth(rigid)
    p = pose_from_landmarks(a["src_kps"]) if pose == "fit" else a["src_pose"]
    return {
        "src_emb": torch.from_numpy(a["src_emb"].astype(np.float32)),
        "src_kps": torch.from_numpy(a["src_kps"].copy()),
        "src_pose": torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32)),
        "tgt_emb": torch.from_numpy(a["tgt_emb"].astype(np.float32)),
        "identity": torch.from_numpy(a["identity"]),
    }


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


ALL_ON = AugmentConfig(pose_jitter_deg=3.0, landmark_jitter_px=1.0, emb_noise=0.01, drop_part_prob=0.5)


def test_everything_off_returns_the_same_batch_object_and_draws_nothing():
    b = batch_of()
    g = gen(3)
    state = g.get_state()
    assert aug.augment(b, AugmentConfig(), g) is b
    assert torch.equal(g.get_state(), state)
    assert aug.enabled(AugmentConfig()) == [] and aug.describe(AugmentConfig()) == "none"
    assert aug.describe(ALL_ON) == "pose_jitter_deg 3, landmark_jitter_px 1, emb_noise 0.01, drop_part_prob 0.5"


def test_deterministic_for_a_generator_seed_and_other_fields_untouched():
    b = batch_of()
    x, y, z = (aug.augment(b, ALL_ON, gen(s)) for s in (1, 1, 2))
    for k in aug.AUGMENTED_FIELDS:
        assert torch.equal(x[k], y[k]), k
        assert not torch.equal(x[k], z[k]), k
        assert not torch.equal(x[k], b[k]), k
        assert x[k].dtype == torch.float32 and x[k].shape == b[k].shape
    assert x["tgt_emb"] is b["tgt_emb"] and x["identity"] is b["identity"]
    assert set(x) == set(b)


def test_step_seeds_differ_per_rank_step_and_micro_batch_and_are_stable():
    seeds = {aug.step_seed(42, r, s, m) for r in range(4) for s in range(50) for m in range(3)}
    assert len(seeds) == 600 and all(0 <= s < 2**63 for s in seeds)
    assert aug.step_seed(42, 1, 7, 0) == aug.step_seed(42, 1, 7, 0) != aug.step_seed(43, 1, 7, 0)
    b = batch_of()
    one = aug.augment(b, ALL_ON, aug.seed_generator(gen(0), 42, 1, 7, 0))
    two = aug.augment(b, ALL_ON, aug.seed_generator(gen(99), 42, 1, 7, 0))  # any prior state: reseeded
    assert torch.equal(one["src_kps"], two["src_kps"])


def test_torch_geometry_matches_insightface_and_geometry():
    b = batch_of()
    kps = b["src_kps"]
    np.testing.assert_allclose(aug.pose_from_landmarks(kps).numpy(), pose_from_landmarks(kps.numpy()), atol=0.01)
    pose = torch.tensor([[10.0, 60.0, -5.0], [-20.0, -85.0, 3.0], [0.0, 0.0, 0.0], [170.0, 30.0, -175.0]])
    np.testing.assert_allclose(aug.rotation_matrices(pose).numpy(), rotation_matrices(pose.numpy()), atol=1e-6)
    np.testing.assert_allclose(aug.matrix_to_pose(aug.rotation_matrices(pose)).numpy(), pose.numpy(), atol=1e-3)


def test_random_rotations_are_rotations_with_the_asked_spread():
    r = aug.random_rotations(20000, 2.0, gen(0), torch.device("cpu")).double()
    np.testing.assert_allclose((r @ r.transpose(1, 2)).numpy(), np.broadcast_to(np.eye(3), r.shape), atol=1e-6)
    np.testing.assert_allclose(torch.linalg.det(r).numpy(), 1.0, atol=1e-6)
    # rotation vector components ~ N(0, 2 deg): the angle is 2 deg x chi(3), mean 2 * sqrt(8 / pi) = 3.19 deg
    angle = torch.rad2deg(torch.arccos(((r.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert angle.mean().item() == pytest.approx(2.0 * math.sqrt(8 / math.pi), rel=0.03)
    assert torch.equal(aug.random_rotations(3, 0.0, gen(0), torch.device("cpu")), torch.eye(3).expand(3, 3, 3))


def test_pose_jitter_rotates_rigidly_about_the_centroid_and_the_pose_follows_exactly():
    """Rigid faces (s R M + t): the landmarks turn by the drawn J and the pose becomes J R(pose), to 1e-3 deg."""
    b = batch_of(rigid=True)
    cfg = AugmentConfig(pose_jitter_deg=4.0)
    out = aug.augment(b, cfg, gen(7))
    jitter = aug.random_rotations(len(b["src_kps"]), 4.0, gen(7), torch.device("cpu"))  # the same first draw
    kps, new = b["src_kps"].double(), out["src_kps"].double()
    torch.testing.assert_close(new.mean(1), kps.mean(1), atol=1e-3, rtol=0)  # about the centroid
    torch.testing.assert_close(torch.cdist(new, new), torch.cdist(kps, kps), atol=2e-3, rtol=0)  # rigid
    expected = aug.matrix_to_pose(jitter @ aug.rotation_matrices(b["src_pose"]))
    assert geodesic_deg(out["src_pose"].numpy(), expected.numpy()).max() < 1e-3
    assert np.median(geodesic_deg(out["src_pose"].numpy(), b["src_pose"].numpy())) > 3.0  # it did turn
    # and face.pose's own code agrees with the new pose
    assert geodesic_deg(out["src_pose"].numpy(), pose_from_landmarks(out["src_kps"].numpy())).max() < 1e-3


GEOMETRIC = [AugmentConfig(pose_jitter_deg=5.0), AugmentConfig(landmark_jitter_px=2.0), AugmentConfig(3.0, 1.0, 0.01)]


@pytest.mark.parametrize("cfg", GEOMETRIC)
def test_pose_recomputed_from_augmented_real_like_landmarks_equals_the_augmented_pose(cfg):
    """Identity-deformed, noisy landmarks with face.pose as the stored pose (real data): equal to 0.01 deg.

    (Part drop is left out on purpose: it keeps the true pose while the landmarks lose a part.)
    """
    b = batch_of(pose="fit")
    out = aug.augment(b, cfg, gen(1))
    recomputed = pose_from_landmarks(out["src_kps"].numpy())
    assert geodesic_deg(out["src_pose"].numpy(), recomputed).max() < 0.01
    # a synthetic set's stored pose (the true rotation) keeps its own offset from the fit
    b = batch_of(pose="stored")
    before = geodesic_deg(b["src_pose"].numpy(), pose_from_landmarks(b["src_kps"].numpy()))
    out = aug.augment(b, cfg, gen(1))
    after = geodesic_deg(out["src_pose"].numpy(), pose_from_landmarks(out["src_kps"].numpy()))
    assert np.abs(after - before).max() < 0.01 and np.median(before) > 0.2


def test_landmark_jitter_is_gaussian_pixel_noise_of_the_asked_std():
    b = batch_of()
    out = aug.augment(b, AugmentConfig(landmark_jitter_px=1.5), gen(2))
    noise = (out["src_kps"] - b["src_kps"]).double()
    assert noise.mean().abs().item() < 0.01
    np.testing.assert_allclose(noise.std(dim=(0, 1)).numpy(), 1.5, rtol=0.02)  # x, y and z each
    kurtosis = ((noise / noise.std()) ** 4).mean().item()
    assert kurtosis == pytest.approx(3.0, abs=0.1)
    # the pose moves by what the noise does to face.pose: a fraction of a degree per pixel, more for small faces
    turned = geodesic_deg(out["src_pose"].numpy(), b["src_pose"].numpy())
    assert 0.1 < np.median(turned) < 1.5


def test_embedding_noise_stays_on_the_sphere_with_the_expected_cos():
    b = batch_of()
    sigma = 0.01
    out = aug.augment(b, AugmentConfig(emb_noise=sigma), gen(4))
    e = out["src_emb"].double()
    np.testing.assert_allclose(e.norm(dim=1).numpy(), 1.0, atol=1e-6)
    cos = (e * b["src_emb"].double()).sum(1)
    assert cos.mean().item() == pytest.approx(1 / math.sqrt(1 + 512 * sigma**2), abs=2e-3)  # 0.9754
    # the component orthogonal to the clean embedding is isotropic noise of std sigma (before normalising)
    ortho = e / cos[:, None] - b["src_emb"].double()
    assert ortho.std().item() == pytest.approx(sigma, rel=0.02)
    assert out["src_kps"] is b["src_kps"] and out["src_pose"] is b["src_pose"]


def test_part_drop_moves_exactly_one_whole_part_to_the_centroid_of_the_rest():
    b = batch_of()
    out = aug.augment(b, AugmentConfig(drop_part_prob=1.0), gen(5))
    kps, new = b["src_kps"], out["src_kps"]
    changed = (new != kps).any(-1)  # (B, 68)
    dropped = []
    for i in range(len(kps)):
        parts = [j for j, (s, e) in enumerate(PARTS) if changed[i, s:e].any()]
        assert len(parts) == 1, (i, parts)
        s, e = PARTS[parts[0]]
        assert changed[i, s:e].all()
        rest = torch.cat([kps[i, :s], kps[i, e:]])
        torch.testing.assert_close(new[i, s:e], rest.mean(0).expand(e - s, 3))
        dropped.append(parts[0])
    counts = np.bincount(dropped, minlength=len(PARTS))
    assert counts.min() > 0.6 * len(kps) / len(PARTS)  # each part chosen about equally often
    # the model's normalisation sees the dropped part as exactly zero, the rest with its shape kept
    norm = normalize_keypoints(new)
    i, (s, e) = 0, PARTS[dropped[0]]
    assert norm[i, s:e].abs().max().item() < 1e-5
    assert torch.equal(out["src_pose"], b["src_pose"]) and out["src_emb"] is b["src_emb"]


def test_part_drop_probability():
    b = batch_of()
    kps = b["src_kps"]
    fractions = []
    for seed in range(10):
        out = aug.augment(b, AugmentConfig(drop_part_prob=0.3), gen(seed))
        fractions.append((out["src_kps"] != kps).any(-1).any(-1).double().mean().item())
    assert np.mean(fractions) == pytest.approx(0.3, abs=0.03)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_without_host_device_sync():
    b = {k: v.cuda() for k, v in batch_of().items()}
    g = torch.Generator(device="cuda").manual_seed(0)
    aug.augment(b, ALL_ON, g)  # first call: caches the constant tensors on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = aug.augment(b, ALL_ON, aug.seed_generator(g, 1, 0, 3))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = aug.augment(batch_of(), AugmentConfig(pose_jitter_deg=3.0, landmark_jitter_px=1.0), gen(0))
    assert out["src_kps"].is_cuda and cpu["src_kps"].shape == out["src_kps"].shape
    recomputed = pose_from_landmarks(out["src_kps"].cpu().numpy())
    assert geodesic_deg(out["src_pose"].cpu().numpy(), recomputed).max() < 2.0  # stored synth pose: its own offset


def test_the_training_loop_applies_augmentation_to_training_batches_only_and_reproducibly(demo_shards, tmp_path):
    """Same flags, same noise (seeded by step and rank); off, other losses; evaluation never sees the noise."""
    flags = [*FAST_TRAIN_FLAGS, "--data_dir", str(demo_shards), "--max_steps", "4", "--log_every_steps", "1"]
    augmented = [
        "--pose_jitter_deg",
        "3",
        "--landmark_jitter_px",
        "2",
        "--emb_noise",
        "0.02",
        "--drop_part_prob",
        "0.5",
    ]
    runs = {
        "a": TrainRun(tmp_path, "a", [*flags, *augmented]),
        "b": TrainRun(tmp_path, "b", [*flags, *augmented]),
        "off": TrainRun(tmp_path, "off", flags),
    }
    logs = {}
    for name, run in runs.items():
        rc, logs[name] = run.finish()
        assert rc == 0, logs[name][-3000:]
    assert "augmentation: pose_jitter_deg 3, landmark_jitter_px 2, emb_noise 0.02, drop_part_prob 0.5" in logs["a"]
    assert "augmentation: none" in logs["off"]
    loss = {name: scalars(run.run_dir, TRAIN_TAGS["loss"]) for name, run in runs.items()}
    assert loss["a"] == loss["b"], "the same run twice draws the same noise"
    assert loss["a"][1] != loss["off"][1], "the noise reaches the training batches"
    val = {name: scalars(run.run_dir, "val/identity_baseline_cos") for name, run in runs.items()}
    assert val["a"] == val["off"], "validation rows are never augmented"
