"""`dist-train extract` end to end through insightface's real model_zoo code, and the pairing rules.

The model pack is made of tiny ONNX stand-ins (tests/onnx_models.py) whose
outputs are known: every bright enough image holds a large face and a small
one, and the 3D landmarks encode pitch 10, roll -5 and a yaw equal to the
image's red-blue tint. The inputs are insightface's own sample images, tinted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import insightface
import numpy as np
import onnx_models as om
import onnxruntime
import pytest

from dist_train.data import extract, pairing
from dist_train.data.shards import ShardSet, read_split
from dist_train.geometry import pose_from_landmarks

IMAGES = Path(insightface.__file__).parent / "data" / "images"
VIDEO_FRAMES, VIDEO_EVERY, VIDEO_SIZE = 12, 4, (320, 240)


def video_tint(frame: int) -> float:
    return 0.0 if frame % 8 == 0 else 70.0  # sampled frames 0, 4, 8: frontal, profile, frontal


def gray(name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(IMAGES / name)), cv2.COLOR_BGR2GRAY)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dist_train", "extract", *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return om.write_pack(tmp_path_factory.mktemp("buffalo_l"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Identity folders with tinted sample images, a video and the bad inputs a real tree has."""
    root = tmp_path_factory.mktemp("faces")
    t1, tom = gray("t1.jpg"), gray("Tom_Hanks_54745.png")
    images = {
        "alice/front.png": om.tinted(t1, 0),
        "alice/side.png": om.tinted(t1, 60),
        "alice/sub/deep/mid.png": om.tinted(t1, 30),
        "bob/front.png": om.tinted(tom, 0),
        "bob/side.png": om.tinted(tom, -60),
        "carol/side.png": om.tinted(t1, -60),
        "dave/black.png": np.zeros((100, 100, 3), np.uint8),
        "dave/gray.png": np.full((100, 100, 3), 50, np.uint8),
    }
    for rel, img in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / rel), img)
    small = cv2.resize(t1, VIDEO_SIZE)
    writer = cv2.VideoWriter(str(root / "bob/clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, VIDEO_SIZE)
    for i in range(VIDEO_FRAMES):
        writer.write(om.tinted(small, video_tint(i)))
    writer.release()
    (root / "dave/broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "dave/broken.mp4").write_bytes(b"\x00" * 64)
    (root / "dave/notes.txt").write_text("not an image")
    shutil.copy(IMAGES / "t1.jpg", root / "loose.jpg")
    return root


@pytest.fixture(scope="module")
def extracted(tree, pack, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "set"
    proc = run_cli(tree, "--pack", pack, "--out", out, "--every", VIDEO_EVERY)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def cached_faces(out: Path, root: Path) -> dict[str, dict]:
    inputs, _, _ = extract.discover(root, aligned=False)
    return extract.load_records(out, root, inputs)


def largest_per_frame(record: dict) -> dict:
    """The faces --keep largest keeps (in this tree the large faces pass every filter)."""
    area = np.prod(record["bbox"][:, 2:] - record["bbox"][:, :2], axis=1)
    keep = [
        np.flatnonzero(record["frame"] == f)[np.argmax(area[record["frame"] == f])] for f in np.unique(record["frame"])
    ]
    return {k: record[k][keep] for k in ("emb", "pose")}


# What the stand-in detector finds in each input (see tests/onnx_models.py), with the defaults
# --min-size 40 --min-score 0.5 --det-thresh 0.3 --keep largest --frontal-yaw 20 --profile-yaw 45:
# t1 images are 1280 px wide, so their small face is ~120 px: an extra_face (alice x3, carol);
# the 112 px Tom Hanks crop and the 320 px video make it 10 and 30 px: too_small (bob x2, 3 frames);
# grey 50 scores ~0.39: two low_score faces; black scores ~0: no_face.
EXPECTED_DROPS = {
    "unsupported_file": 1,  # dave/notes.txt
    "outside_identity": 1,  # loose.jpg
    "unreadable": 2,  # dave/broken.jpg, dave/broken.mp4
    "bad_frame": 0,
    "wrong_size": 0,
    "failed": 0,
    "no_face": 1,  # dave/black.png
    "low_score": 2,  # dave/gray.png, both faces
    "too_small": 5,
    "extra_face": 4,
    "mid_yaw": 1,  # alice/sub/deep/mid.png, yaw 30
    "no_frontal": 1,  # carol has only a profile
    "identity_limit": 0,
}


def test_extract_writes_profile_frontal_pairs_with_insightface_pose(extracted, tree):
    out, proc = extracted
    shard_set = ShardSet.open(out)
    assert shard_set.index["identities"] == ["alice", "bob", "carol", "dave"]
    assert shard_set.has("tgt_centroid")
    data = {s: read_split(shard_set, s) for s in shard_set.splits}
    cols = {k: np.concatenate([d[k] for d in data.values()]) for k in data["train"]}
    # alice: one profile (side.png); bob: side.png and the video's frame 4
    assert sorted(np.bincount(cols["identity"], minlength=4).tolist()) == [0, 0, 1, 2]
    assert set(np.unique(cols["identity"])) == {0, 1}
    n = len(cols["identity"])
    assert (
        cols["src_emb"].shape == (n, 512) and cols["src_kps"].shape == (n, 68, 3) and cols["src_pose"].shape == (n, 3)
    )
    for name in ("src_emb", "tgt_emb", "tgt_centroid"):
        np.testing.assert_allclose(np.linalg.norm(cols[name], axis=1), 1.0, atol=2e-3)
    # pose is what insightface computes from these very landmarks, in pitch, yaw, roll order
    np.testing.assert_allclose(cols["src_pose"], pose_from_landmarks(cols["src_kps"]), atol=1e-3)
    np.testing.assert_allclose(cols["src_pose"][:, 0], om.PITCH, atol=1e-3)
    np.testing.assert_allclose(cols["src_pose"][:, 2], om.ROLL, atol=1e-3)
    assert (np.abs(cols["src_pose"][:, 1]) >= 45).all()
    # landmarks are in image pixels: inside bob's 112x112 photo and 320x240 video frames
    bob = cols["identity"] == 1
    assert cols["src_kps"][bob][..., :2].max() < 330 and cols["src_kps"][bob][..., :2].min() > -10

    # every target is one of its identity's frontal faces; the centroid is their normalised mean
    faces = cached_faces(out, tree)
    for ident, name in enumerate(["alice", "bob"]):
        recs = [largest_per_frame(r) for rel, r in faces.items() if rel.startswith(name + "/") and r["status"] == "ok"]
        emb = np.concatenate([r["emb"] for r in recs])
        yaw = np.abs(np.concatenate([r["pose"][:, 1] for r in recs]))
        frontal = emb[yaw <= 20]
        mine = cols["identity"] == ident
        best = (cols["tgt_emb"][mine] @ frontal.T).max(1)
        np.testing.assert_allclose(best, 1.0, atol=2e-3)
        centroid = frontal.mean(0) / np.linalg.norm(frontal.mean(0))
        np.testing.assert_allclose(cols["tgt_centroid"][mine], np.broadcast_to(centroid, (mine.sum(), 512)), atol=2e-3)

    assert "extract: 100%" in proc.stderr  # the progress bar ran to the end
    assert "3 pairs from 2 identities" in proc.stdout


def test_drops_are_counted_per_reason_and_listed(extracted):
    out, _ = extracted
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == EXPECTED_DROPS
    info = index["extract"]
    assert info["model_pack"]["files"] == {
        "detection": "det_10g.onnx",
        "recognition": "w600k_r50.onnx",
        "landmark_3d_68": "1k3d68.onnx",
    }
    assert info["pairing"]["frontal_yaw"] == 20 and info["pairing"]["profile_yaw"] == 45
    assert info["filters"] == {"min_size": 40.0, "min_score": 0.5, "keep": "largest"}
    assert info["summary"]["faces_detected"] == 20 and info["summary"]["faces_kept"] == 9
    report = json.loads((out / extract.REPORT_NAME).read_text())
    listed = {p["input"]: p["reason"] for p in report["problems"]}
    assert listed == {
        "dave/notes.txt": "unsupported_file",
        "loose.jpg": "outside_identity",
        "dave/broken.jpg": "unreadable",
        "dave/broken.mp4": "unreadable",
        "dave/black.png": "no_face",
        "dave/gray.png": "low_score",
    }


def test_video_frames_are_sampled_every_k_or_at_a_rate(tree, extracted):
    out, _ = extracted
    clip = cached_faces(out, tree)["bob/clip.avi"]
    assert int(clip["frames"]) == 3
    assert sorted(set(clip["frame"].tolist())) == [0, 4, 8]
    yaw = {int(f): y for f, y in zip(clip["frame"], clip["pose"][:, 1])}
    assert abs(yaw[0]) < 5 and abs(yaw[8]) < 5 and yaw[4] > 45  # the tint survives MJPG
    by_rate = extract.Settings(pack="", fps=2.5)  # the clip is 10 fps: every 4th frame
    assert [i for i, _ in extract.read_frames(tree / "bob/clip.avi", "video", by_rate)] == [0, 4, 8]
    every5 = extract.Settings(pack="", every=5, fps=None)
    assert [i for i, _ in extract.read_frames(tree / "bob/clip.avi", "video", every5)] == [0, 5, 10]


def test_restart_skips_inputs_already_done(extracted, tree, pack, tmp_path, capsys):
    done, _ = extracted
    out = tmp_path / "set"
    shutil.copytree(done, out)
    chunks = {p: p.stat().st_mtime_ns for p in (out / extract.CACHE_DIR).rglob("*.npz")}
    assert len(chunks) == 3  # one for the images (a batch), one per video
    args = [str(tree), "--pack", str(pack), "--out", str(out), "--every", str(VIDEO_EVERY), "--no-progress"]
    assert extract.main(args) == 0
    assert "11 already extracted" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (out / extract.CACHE_DIR).rglob("*.npz")} == chunks
    report = json.loads((out / extract.REPORT_NAME).read_text())
    assert report["summary"]["extracted_now"] == 0
    for split in ShardSet.open(done).splits:
        a, b = read_split(ShardSet.open(done), split), read_split(ShardSet.open(out), split)
        assert all(np.array_equal(a[k], b[k]) for k in a)

    # an unreadable cache chunk (disk trouble) and a changed input are extracted again, nothing else
    inputs, _, _ = extract.discover(tree, aligned=False)
    clip_chunk = extract.scan_cache(out, tree, inputs)["bob/clip.avi"]
    clip_chunk.write_bytes(b"PK\x03\x04 torn")
    side = tree / "alice/side.png"
    original, stat = side.read_bytes(), side.stat()
    try:
        cv2.imwrite(str(side), om.tinted(gray("t1.jpg"), 40))
        third = extract.main(args)
        changed = cached_faces(out, tree)["alice/side.png"]
    finally:
        side.write_bytes(original)
        os.utime(side, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert third == 0
    assert "9 already extracted" in capsys.readouterr().err
    assert json.loads((out / extract.REPORT_NAME).read_text())["summary"]["extracted_now"] == 2
    assert 35 < changed["pose"][:, 1].max() < 41  # the new tint, not the cached 60
    assert cached_faces(out, tree)["alice/side.png"]["pose"][:, 1].max() > 55  # original file back: old result valid

    # other extraction settings are refused until --fresh
    assert extract.main([*args[:5], "--every", "3", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--fresh" in err and "every" in err


def test_worker_processes_give_the_same_shard_set(extracted, tree, pack, tmp_path):
    done, _ = extracted
    out = tmp_path / "set"
    proc = run_cli(tree, "--pack", pack, "--out", out, "--every", VIDEO_EVERY, "--workers", 2, "--batch-size", 2)
    assert proc.returncode == 0, proc.stderr
    a, b = ShardSet.open(done), ShardSet.open(out)
    assert a.index["skipped"] == b.index["skipped"]
    for split in a.splits:
        x, y = read_split(a, split), read_split(b, split)
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_aligned_crops_skip_detection_and_embed_the_crop_as_is(pack, tmp_path, capsys):
    tom = gray("Tom_Hanks_54745.png")
    root, out = tmp_path / "aligned", tmp_path / "set"
    crops = {"ann/a.png": 0, "ann/b.png": 55, "ben/a.png": 0, "ben/b.png": -55, "ben/c.png": 70}
    for rel, yaw in crops.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), om.tinted(tom, yaw))
    cv2.imwrite(str(root / "ben/big.png"), cv2.resize(om.tinted(tom, 0), (224, 224)))
    rc = extract.main([str(root), "--pack", str(pack), "--out", str(out), "--aligned", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"]["wrong_size"] == 1 and index["skipped"]["no_face"] == 0
    shard_set = ShardSet.open(out)
    cols = {
        k: np.concatenate([read_split(shard_set, s)[k] for s in shard_set.splits])
        for k in ("src_emb", "src_pose", "identity")
    }
    assert sorted(cols["identity"].tolist()) == [0, 1, 1]
    np.testing.assert_allclose(cols["src_pose"][:, 0], om.PITCH, atol=1e-3)
    # the recognition model applied to the untouched crop (ArcFace preprocessing) gives the stored embedding
    session = onnxruntime.InferenceSession(str(pack / om.PACK_FILES["recognition"]), providers=["CPUExecutionProvider"])
    img = cv2.imread(str(root / "ann/b.png"))[:, :, ::-1].astype(np.float32)
    blob = ((img - 127.5) / 127.5).transpose(2, 0, 1)[None]
    emb = session.run(None, {"input.1": blob})[0][0]
    ann = cols["src_emb"][cols["identity"] == 0][0]
    np.testing.assert_allclose(ann, emb / np.linalg.norm(emb), atol=2e-3)


@pytest.mark.parametrize(
    "parts, named, not_named",
    [
        ((), ["det_10g.onnx", "w600k_r50.onnx", "1k3d68.onnx"], []),
        (("recognition", "landmark"), ["det_10g.onnx"], ["w600k_r50.onnx (", "1k3d68.onnx ("]),
    ],
)
def test_incomplete_model_pack_is_refused_before_any_work(tree, tmp_path, capsys, parts, named, not_named):
    pack = om.write_pack(tmp_path / "pack", parts=parts)
    out = tmp_path / "set"
    assert extract.main([str(tree), "--pack", str(pack), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    for name in named:
        assert name in err
    for name in not_named:
        assert name not in err
    assert "never downloads" in err and "buffalo_l" in err
    assert not out.exists()


def test_detector_without_keypoints_is_refused(tree, tmp_path, capsys):
    pack = om.write_pack(tmp_path / "pack", parts=("recognition", "landmark"))
    om.write_detector(pack / om.PACK_FILES["detector"], keypoints=False)
    assert extract.main([str(tree), "--pack", str(pack), "--out", str(tmp_path / "set")]) == 1
    assert "no 5-point keypoints" in capsys.readouterr().err


def test_bad_arguments_are_refused_with_the_fix(tree, pack, tmp_path, capsys):
    base = [str(tree), "--pack", str(pack)]
    cases = [
        (["--out", str(tmp_path / "o"), "--min-score", "0.2"], "below --det-thresh"),
        (["--out", str(tree / "inside")], "inside the input root"),
        (["--out", str(tmp_path / "o"), "--frontal-yaw", "50"], "frontal (50.0) < profile (45.0)"),
        (["--out", str(tmp_path / "o"), "--val-fraction", "0.6", "--test-fraction", "0.5"], "sum < 1"),
    ]
    for extra, message in cases:
        assert extract.main(base + extra) == 1
        assert message in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "someone").mkdir(parents=True)
    assert extract.main([str(empty), "--pack", str(pack), "--out", str(tmp_path / "o")]) == 1
    assert "holds no images or videos" in capsys.readouterr().err


def test_no_pairs_is_an_error_that_points_to_the_report(pack, tmp_path, capsys):
    root = tmp_path / "faces"
    (root / "solo").mkdir(parents=True)
    cv2.imwrite(str(root / "solo/front.png"), om.tinted(gray("t1.jpg"), 0))
    assert extract.main([str(root), "--pack", str(pack), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no profile/frontal pairs" in err and "1 frontal" in err and extract.REPORT_NAME in err
    assert not (tmp_path / "o" / "index.json").exists()


def test_inspect_reads_the_extracted_set(extracted, tmp_path):
    try:
        import dist_train.data.inspect  # noqa: F401
    except ImportError:
        pytest.skip("dist-train inspect is not written yet")
    out, _ = extracted
    report = tmp_path / "inspect.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train", "inspect", str(out), "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    assert (result["n_samples"], result["n_identities"], result["bad_blocks"]) == (3, 2, 0)
    assert result["landmark_disagreements"] == 0  # inspect's own pose-from-landmarks agrees with the stored pose
    assert result["cross_split"]["identity_overlap"] == 0


# ---------------------------------------------------------------- pairing rules on known arrays


def faces_table(yaw, identity, group=None, score=None, size=None) -> pairing.Faces:
    n = len(yaw)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, 512)).astype(np.float32)
    size = np.full(n, 100.0) if size is None else np.asarray(size, float)
    return pairing.Faces(
        emb=emb / np.linalg.norm(emb, axis=1, keepdims=True),
        kps=rng.standard_normal((n, 68, 3)).astype(np.float32),
        pose=np.stack([np.zeros(n), yaw, np.zeros(n)], 1).astype(np.float32),
        bbox=np.stack([np.zeros(n), np.zeros(n), size, size * 1.2], 1).astype(np.float32),
        score=np.full(n, 0.9, np.float32) if score is None else np.asarray(score, np.float32),
        identity=np.asarray(identity, np.int64),
        group=np.arange(n) if group is None else np.asarray(group, np.int64),
        source=np.arange(n),
    )


def test_yaw_thresholds_are_inclusive_and_mid_faces_unused():
    faces = faces_table(yaw=[0, 20, -20.01, 30, 44.99, 45, -60, 90], identity=[0] * 8)
    cols, counts = pairing.make_pairs(faces, pairing.PairingRules())
    assert sorted(cols["src_pose"][:, 1].tolist()) == [-60, 45, 90]
    assert counts == {"mid_yaw": 3, "no_frontal": 0, "identity_limit": 0}
    frontal = faces.emb[:2]
    assert all(np.isclose(frontal @ t, 1, atol=1e-6).any() for t in cols["tgt_emb"])  # targets are yaw 0 and 20
    c = frontal.mean(0) / np.linalg.norm(frontal.mean(0))
    np.testing.assert_allclose(cols["tgt_centroid"], np.broadcast_to(c, (3, 512)), atol=1e-6)
    cols, counts = pairing.make_pairs(faces, pairing.PairingRules(frontal_yaw=25, profile_yaw=30))
    assert len(cols["identity"]) == 5 and counts["mid_yaw"] == 0  # -20.01 now frontal; 30, 44.99 now profile


def test_identity_limit_no_frontal_and_even_use_of_frontals():
    yaw = [0, 5, 60, 61, 62, 63, 64, 70, 80]
    faces = faces_table(yaw=yaw, identity=[0, 0, 0, 0, 0, 0, 0, 1, 1])
    cols, counts = pairing.make_pairs(faces, pairing.PairingRules(max_pairs_per_identity=4))
    assert counts == {"mid_yaw": 0, "no_frontal": 2, "identity_limit": 1}
    assert cols["identity"].tolist() == [0, 0, 0, 0]
    uses = [(cols["tgt_emb"] @ f > 0.999).sum() for f in faces.emb[:2]]
    assert uses == [2, 2]


def test_select_faces_filters_then_keeps_the_largest_per_image():
    faces = faces_table(
        yaw=[0] * 6,
        identity=[0] * 6,
        group=[0, 0, 0, 1, 1, 2],
        score=[0.9, 0.9, 0.3, 0.9, 0.2, 0.9],
        size=[50, 80, 200, 30, 10, 60],
    )
    kept, reason = pairing.select_faces(faces, pairing.FaceFilter(min_size=40, min_score=0.5))
    assert reason.tolist() == ["extra_face", "", "low_score", "too_small", "low_score", ""]
    assert kept.source.tolist() == [1, 5]
    assert pairing.count_reasons(reason) == {"extra_face": 1, "low_score": 2, "too_small": 1}
    kept, reason = pairing.select_faces(faces, pairing.FaceFilter(min_size=40, min_score=0.5, keep="all"))
    assert kept.source.tolist() == [0, 1, 5]


def test_splits_are_by_identity_and_seeded():
    faces = faces_table(yaw=[0, 60] * 10, identity=np.repeat(np.arange(10), 2))
    cols, _ = pairing.make_pairs(faces, pairing.PairingRules())
    rules = pairing.PairingRules(val_fraction=0.2, test_fraction=0.1, seed=3)
    splits = pairing.split_by_identity(cols, rules)
    ids = {k: set(v["identity"].tolist()) for k, v in splits.items()}
    assert [len(ids[k]) for k in ("train", "val", "test")] == [7, 2, 1]
    assert not (ids["train"] & ids["val"]) and not (ids["val"] & ids["test"]) and not (ids["train"] & ids["test"])
    again = pairing.split_by_identity(cols, rules)
    assert {k: set(v["identity"].tolist()) for k, v in again.items()} == ids
    two = {k: v[np.isin(cols["identity"], [0, 1])] for k, v in cols.items()}
    assert set(pairing.split_by_identity(two, pairing.PairingRules(val_fraction=0.1))) == {"train", "val"}
