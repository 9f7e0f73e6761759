"""dist-train synth: determinism, the known distortion, the calibration targets, landmarks, the written set."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from dist_train.data.blocks import read_split
from dist_train.data.schema import YAW_BUCKETS, yaw_bucket_index
from dist_train.data.shards import ShardSet
from dist_train.data.splits import split_rows
from dist_train.geometry import pose_from_landmarks, rotation_matrices
from dist_train.metrics import row_cos
from dist_train.synth import (
    CHUNK_IDENTITIES,
    Distortion,
    DistortionB,
    FamilyB,
    SynthParams,
    face_pose,
    generate,
    make_shard_set,
    split_summary,
)
from dist_train.synth import main as synth_main


def test_same_seed_gives_identical_arrays_and_another_seed_different_ones():
    # more identities than one chunk, so chunk seeding is covered too
    p = SynthParams(n_identities=CHUNK_IDENTITIES + 7, samples_per_identity=1, seed=3)
    a, b = generate(p), generate(p)
    c = generate(SynthParams(n_identities=CHUNK_IDENTITIES + 7, samples_per_identity=1, seed=4))
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
        if name != "identity":
            assert not np.array_equal(a[name], c[name]), name


def test_same_command_writes_byte_identical_shard_files(tmp_path):
    p = SynthParams(n_identities=40, samples_per_identity=3, seed=2)
    for out in ("a", "b"):
        make_shard_set(tmp_path / out, p, val_fraction=0.2, shard_samples=64, block_size=32)
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert len(files) > 3
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_distortion_is_an_exactly_invertible_pose_dependent_rotation():
    d = Distortion.from_params(SynthParams(seed=7))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    pose = np.array([[0, 60, 0], [0, -60, 0], [10, 30, 5], [0, 0, 0], [-20, 85, 3], [5, -45, -5]], np.float32)
    y = d.apply(x, pose)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(d.apply(y, pose, inverse=True), x, atol=1e-4)
    np.testing.assert_allclose(y[3], x[3], atol=1e-6)  # frontal, level head: no distortion
    same = np.repeat(x[:1], 2, axis=0)
    turned = d.apply(same, pose[:2])
    assert row_cos(turned[:1], turned[1:])[0] < 0.9  # +60 and -60 yaw distort differently


def test_defaults_hit_the_calibration_targets_on_held_out_identities():
    """The trainer team's yardstick: baseline ~0.75-0.80, oracle ~0.92-0.95, baseline falling with |yaw|."""
    s = split_summary(generate(SynthParams(n_identities=300, samples_per_identity=16, seed=11)))
    assert 0.75 <= s["identity_baseline_cos"] <= 0.80
    assert 0.92 <= s["oracle_cos"] <= 0.95
    baseline = [s["per_yaw"][b]["baseline"] for b in YAW_BUCKETS]
    assert all(a > b for a, b in zip(baseline, baseline[1:])), baseline
    assert baseline[0] - baseline[-1] > 0.25
    assert all(s["per_yaw"][b]["n"] > 0.05 * s["n_samples"] for b in YAW_BUCKETS)


def test_landmarks_give_back_the_pose_through_insightface_code():
    a = generate(SynthParams(n_identities=100, samples_per_identity=3, seed=5))
    pose = a["src_pose"]
    recovered = pose_from_landmarks(a["src_kps"])
    r = np.einsum("nij,nij->n", rotation_matrices(pose), rotation_matrices(recovered))
    angle = np.degrees(np.arccos(np.clip((r - 1) / 2, -1, 1)))
    assert np.median(angle) < 1.0 and angle.max() < 3.0
    assert np.abs(recovered[:, 1] - pose[:, 1]).max() < 2.0
    kps = a["src_kps"]
    assert kps[..., :2].min() >= 0 and kps[..., :2].max() <= 640  # inside the image, in pixels
    width = kps[:, :, 0].max(1) - kps[:, :, 0].min(1)
    assert width.max() > 150 and width.min() > 20


def test_written_set_splits_by_identity_and_oracle_beats_baseline_everywhere(small_shards):
    ss = ShardSet.open(small_shards)
    assert ss.splits == ["train", "val", "test"]
    assert ss.index["provenance"]["params"]["seed"] == 1234
    summary = ss.index["synth"]["per_split"]
    seen = set()
    for split in ss.splits:
        a = read_split(ss, split)
        ids = set(np.unique(a["identity"]).tolist())
        assert not ids & seen
        seen |= ids
        assert len(a["identity"]) == 12 * len(ids) == ss.n_samples(split)
        base = row_cos(a["src_emb"], a["tgt_emb"])
        orc = row_cos(a["oracle_emb"], a["tgt_emb"])
        assert orc.mean() > base.mean() + 0.1
        bucket = yaw_bucket_index(a["src_pose"][:, 1])
        for i, name in enumerate(YAW_BUCKETS):
            m = bucket == i
            assert orc[m].mean() >= base[m].mean()
            assert summary[split]["per_yaw"][name]["baseline"] == pytest.approx(base[m].mean(), abs=1e-6)
        # tgt_centroid is the normalised mean of the identity's frontal samples
        ident = a["identity"][0]
        rows = a["identity"] == ident
        mean = a["tgt_emb"][rows].mean(0)
        np.testing.assert_allclose(
            a["tgt_centroid"][rows], np.tile(mean / np.linalg.norm(mean), (rows.sum(), 1)), atol=2e-3
        )
    assert len(seen) == 200


def test_cli_writes_a_set_prints_the_summary_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "set"
    cmd = [sys.executable, "-m", "dist_train", "synth", "--out", str(out), "--n-identities", "30"]
    cmd += ["--samples-per-identity", "4", "--val-fraction", "0.2", "--seed", "9"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "baseline cos" in done.stdout and "oracle cos" in done.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["splits"]["train"]["n_identities"] == 24 and index["splits"]["val"]["n_samples"] == 24
    assert index["provenance"]["params"]["seed"] == 9
    assert synth_main(cmd[4:]) == 1
    assert "already holds a shard set" in capsys.readouterr().err


def test_splits_are_the_shared_splitter_s_on_the_generated_rows(small_shards):
    """synth splits like pack and extract: the same ids, fractions and seed give the same identities and row order."""
    ss = ShardSet.open(small_shards)
    identity = np.repeat(np.arange(200), 12)  # generate() order: identity by identity
    rows = split_rows(identity, 0.2, 0.1, seed=ss.index["provenance"]["params"]["seed"])
    assert list(rows) == ss.splits
    for split in ss.splits:
        np.testing.assert_array_equal(read_split(ss, split)["identity"], identity[rows[split]])


# ---- family B ------------------------------------------------------------------------------------------


def _family_b(n_identities: int = 300, samples: int = 8, seed: int = 11) -> dict[str, np.ndarray]:
    return generate(SynthParams(n_identities=n_identities, samples_per_identity=samples, seed=seed, family="B"))


def test_family_b_is_deterministic_and_built_differently_from_a():
    p = SynthParams(n_identities=CHUNK_IDENTITIES + 5, samples_per_identity=1, seed=3, family="B")
    a, b = generate(p), generate(p)
    c = generate(dataclasses.replace(p, family="A"))
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
        if name != "identity":
            assert not np.array_equal(a[name], c[name]), name
    with pytest.raises(ValueError, match="family"):
        generate(dataclasses.replace(p, family="C"))


def test_family_b_distortion_is_exactly_invertible_nonlinear_and_identity_dependent():
    p = SynthParams(seed=7, family="B")
    d = DistortionB.from_params(p, FamilyB())
    rng = np.random.default_rng(0)
    z = rng.standard_normal((400, 512)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    pose = np.tile(np.array([[5.0, 60.0, 0.0]], np.float32), (400, 1))
    y = d.apply(z, pose)
    np.testing.assert_allclose(d.invert(y, pose), z, atol=2e-4)
    np.testing.assert_allclose(d.invert(3.0 * y, pose), z, atol=2e-4)  # reads only the direction
    level = np.zeros((2, 3), np.float32)
    np.testing.assert_allclose(d.apply(z[:2], level), z[:2], atol=1e-6)  # frontal, level head: no change
    # identity-dependent: at one pose each identity's planes turn by different angles
    theta = d.angles(z, pose)
    assert theta.std(axis=0).mean() > 0.1
    # nonlinear in yaw: 30 deg turns the planes by far less than half of what 60 deg does
    half = d.angles(z, pose * np.float32([1, 0.5, 1]) - np.float32([5, 0, 0]))
    assert np.abs(half).mean() < 0.4 * np.abs(d.angles(z, pose - np.float32([5, 0, 0]))).mean()
    # the profile drift: same-side profiles of different identities are more alike than frontal ones
    far = d.apply(z, np.tile(np.float32([[0, 85, 0]]), (400, 1)))
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    cos = far @ far.T
    assert cos[np.triu_indices(400, 1)].mean() > 0.1 > np.abs((z @ z.T)[np.triu_indices(400, 1)].mean())


def test_family_b_calibration_oracle_and_impostor_structure():
    a = _family_b()
    s = split_summary(a)
    assert 0.74 <= s["identity_baseline_cos"] <= 0.82
    assert 0.90 <= s["oracle_cos"] <= 0.95
    baseline = [s["per_yaw"][b]["baseline"] for b in YAW_BUCKETS]
    assert all(x > y for x, y in zip(baseline, baseline[1:])), baseline
    assert all(s["per_yaw"][b]["oracle"] >= s["per_yaw"][b]["baseline"] for b in YAW_BUCKETS)
    assert all(s["per_yaw"][b]["n"] > 0.03 * s["n_samples"] for b in YAW_BUCKETS)
    # ArcFace-like impostors: positive on average, with a tail of look-alikes (same cluster)
    tgt = a["tgt_emb"][::8].astype(np.float64)
    cos = (tgt @ tgt.T)[np.triu_indices(len(tgt), 1)]
    assert 0.04 < cos.mean() < 0.12 and np.percentile(cos, 99) > 0.2
    # the oracle is (nearly) a ceiling: shrinking it toward the identities' mean direction gains < 0.002
    mean_dir = a["tgt_emb"].astype(np.float64).mean(0)
    for c in (0.05, 0.1):
        shrunk = a["oracle_emb"] + c * mean_dir / np.linalg.norm(mean_dir)
        assert row_cos(shrunk, a["tgt_emb"]).mean() < s["oracle_cos"] + 0.002
    # photo noise is heavy-tailed: frontal samples' baseline cos has a long low tail
    frontal = np.abs(a["src_pose"][:, 1]) < 15
    base = row_cos(a["src_emb"][frontal], a["tgt_emb"][frontal])
    assert np.percentile(base, 50) - np.percentile(base, 1) > 3 * (np.percentile(base, 99) - np.percentile(base, 50))


def test_family_b_pose_is_face_pose_of_its_landmarks():
    a = _family_b(n_identities=60, samples=5)
    pose = a["src_pose"]
    np.testing.assert_allclose(face_pose(a["src_kps"]), pose, atol=1e-3)
    recovered = pose_from_landmarks(a["src_kps"])  # InsightFace's own code, sample by sample
    r = np.einsum("nij,nij->n", rotation_matrices(pose), rotation_matrices(recovered))
    assert np.degrees(np.arccos(np.clip((r - 1) / 2, -1, 1))).max() < 0.01
    kps = a["src_kps"]
    assert kps[..., :2].min() >= 0 and kps[..., :2].max() <= 640
    width = kps[:, :, 0].max(1) - kps[:, :, 0].min(1)
    assert width.max() > 150 and width.min() > 15
    assert np.abs(pose[:, 1]).max() > 75 and (np.abs(pose[:, 1]) < 15).mean() > 0.1


def test_cli_family_b_records_the_family_and_its_constants(tmp_path):
    out = tmp_path / "b"
    assert synth_main(["--out", str(out), "--n-identities", "30", "--samples-per-identity", "3", "--family", "B"]) == 0
    prov = json.loads((out / "index.json").read_text())["provenance"]
    assert prov["params"]["family"] == "B"
    assert prov["family_b"] == json.loads(json.dumps(dataclasses.asdict(FamilyB())))
    a = read_split(ShardSet.open(out), "train")
    assert row_cos(a["oracle_emb"], a["tgt_emb"]).mean() > row_cos(a["src_emb"], a["tgt_emb"]).mean() + 0.05
