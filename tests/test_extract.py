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
import tracemalloc
from pathlib import Path

import cv2
import insightface
import numpy as np
import onnx_models as om
import onnxruntime
import pytest

from dist_train import extract
from dist_train.data import splits
from dist_train.data.blocks import read_split
from dist_train.data.shards import ShardSet
from dist_train.extract import pairing
from dist_train.geometry import pose_from_landmarks
from dist_train.pack import pack as pack_arrays

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
    "too_large": 0,
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
        import dist_train.inspect_cmd  # noqa: F401
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


def faces_table(yaw, identity, group=None, score=None, size=None) -> tuple[pairing.Faces, np.ndarray, np.ndarray]:
    """Face metadata plus the per-face embeddings and landmarks (row i: face i, ``ref`` i)."""
    n = len(yaw)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, 512)).astype(np.float32)
    size = np.full(n, 100.0) if size is None else np.asarray(size, float)
    faces = pairing.Faces(
        pose=np.stack([np.zeros(n), yaw, np.zeros(n)], 1).astype(np.float32),
        bbox=np.stack([np.zeros(n), np.zeros(n), size, size * 1.2], 1).astype(np.float32),
        score=np.full(n, 0.9, np.float32) if score is None else np.asarray(score, np.float32),
        identity=np.asarray(identity, np.int64),
        group=np.arange(n) if group is None else np.asarray(group, np.int64),
        source=np.arange(n),
        ref=np.arange(n),
    )
    return faces, emb / np.linalg.norm(emb, axis=1, keepdims=True), rng.standard_normal((n, 68, 3)).astype(np.float32)


def pair_up(table, rules: pairing.PairingRules) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    faces, emb, kps = table
    pairs, counts = pairing.make_pairs(faces, rules)
    return pairing.pair_columns(emb, kps, faces, pairs), counts


def test_yaw_thresholds_are_inclusive_and_mid_faces_unused():
    table = faces_table(yaw=[0, 20, -20.01, 30, 44.99, 45, -60, 90], identity=[0] * 8)
    cols, counts = pair_up(table, pairing.PairingRules())
    assert sorted(cols["src_pose"][:, 1].tolist()) == [-60, 45, 90]
    assert counts == {"mid_yaw": 3, "no_frontal": 0, "identity_limit": 0}
    frontal = table[1][:2]
    assert all(np.isclose(frontal @ t, 1, atol=1e-6).any() for t in cols["tgt_emb"])  # targets are yaw 0 and 20
    c = frontal.mean(0) / np.linalg.norm(frontal.mean(0))
    np.testing.assert_allclose(cols["tgt_centroid"], np.broadcast_to(c, (3, 512)), atol=1e-6)
    np.testing.assert_array_equal(cols["src_kps"][np.argsort(cols["src_pose"][:, 1])], table[2][[6, 5, 7]])
    cols, counts = pair_up(table, pairing.PairingRules(frontal_yaw=25, profile_yaw=30))
    assert len(cols["identity"]) == 5 and counts["mid_yaw"] == 0  # -20.01 now frontal; 30, 44.99 now profile


def test_identity_limit_no_frontal_and_even_use_of_frontals():
    yaw = [0, 5, 60, 61, 62, 63, 64, 70, 80]
    table = faces_table(yaw=yaw, identity=[0, 0, 0, 0, 0, 0, 0, 1, 1])
    cols, counts = pair_up(table, pairing.PairingRules(max_pairs_per_identity=4))
    assert counts == {"mid_yaw": 0, "no_frontal": 2, "identity_limit": 1}
    assert cols["identity"].tolist() == [0, 0, 0, 0]
    uses = [(cols["tgt_emb"] @ f > 0.999).sum() for f in table[1][:2]]
    assert uses == [2, 2]


def test_select_faces_filters_then_keeps_the_largest_per_image():
    faces, _, _ = faces_table(
        yaw=[0] * 6,
        identity=[0] * 6,
        group=[0, 0, 0, 1, 1, 2],
        score=[0.9, 0.9, 0.3, 0.9, 0.2, 0.9],
        size=[50, 80, 200, 30, 10, 60],
    )
    kept, reason = pairing.select_faces(faces, pairing.FaceFilter(min_size=40, min_score=0.5))
    assert reason.tolist() == ["extra_face", "", "low_score", "too_small", "low_score", ""]
    assert kept.source.tolist() == [1, 5] and kept.ref.tolist() == [1, 5]
    assert pairing.count_reasons(reason) == {"extra_face": 1, "low_score": 2, "too_small": 1}
    kept, reason = pairing.select_faces(faces, pairing.FaceFilter(min_size=40, min_score=0.5, keep="all"))
    assert kept.source.tolist() == [0, 1, 5]


def test_centroids_are_summed_in_batches_smaller_than_a_group():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((23, 512)).astype(np.float32)
    starts = np.array([0, 1, 9, 10, 23])
    want = [emb[a:b].astype(np.float64).mean(0) for a, b in zip(starts[:-1], starts[1:])]
    want = np.stack([w / np.linalg.norm(w) for w in want]).astype(np.float32)
    for batch in (1, 3, 8, 100):
        got = pairing.group_centroids(emb, starts, np.zeros((4, 512), np.float32), batch_rows=batch)
        np.testing.assert_allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------- stage 2 on a synthetic cache


def synthetic_cache(tmp: Path, n_ids: int, videos: int, frames: int, seed: int = 0) -> tuple[Path, Path]:
    """ROOT/<identity>/vK.mp4 inputs and a cache written by ``write_chunk`` as stage 1 writes it, without models.

    The videos are empty files (stage 2 reads only their size and mtime). Each
    sampled frame has a face of random yaw, score and size; one frame in five
    a second, smaller face; one video in twenty failed to decode.
    """
    root, out = tmp / "faces", tmp / "out"
    for i in range(n_ids):
        (root / f"id{i:04d}").mkdir(parents=True)
        for v in range(videos):
            (root / f"id{i:04d}" / f"v{v}.mp4").write_bytes(b"")
    inputs, _, _ = extract.discover(root, aligned=False)
    rng = np.random.default_rng(seed)
    for inp in inputs:
        result = extract.Result(inp, extract.cache._stamp(root / inp.rel), frames=frames)
        if rng.random() < 0.05:
            result.status, result.detail = "unreadable", "no decodable frames in this video"
            extract.write_chunk(out, [result])
            continue
        for frame in range(frames):
            for extra in range(1 + (rng.random() < 0.2)):
                size = rng.uniform(30, 200) / (1 + 2 * extra)
                emb = rng.standard_normal(512).astype(np.float32)
                result.faces.append(
                    {
                        "emb": emb / np.linalg.norm(emb),
                        "kps": rng.uniform(0, 640, (68, 3)).astype(np.float32),
                        "pose": np.array([5, rng.choice([0, 10, -15, 30, 50, -60, 75]), 0], np.float32),
                        "bbox": np.array([10, 10, 10 + size, 10 + 1.2 * size], np.float32),
                        "score": rng.uniform(0.35, 1.0),
                        "frame": 3 * frame,
                    }
                )
        extract.write_chunk(out, [result])
    return root, out


def stage2(root: Path, out: Path, rules: pairing.PairingRules) -> dict:
    inputs, names, problems = extract.discover(root, aligned=False)
    job = extract.Job(
        root, out, extract.Settings(pack=str(root)), pairing.FaceFilter(), rules, ("CPUExecutionProvider",)
    )
    return extract.run_stage2(job, inputs, names, problems, {}, len(inputs))


def in_memory_stage2(root: Path, out: Path, rules: pairing.PairingRules) -> tuple[dict[str, np.ndarray], dict]:
    """Pairs and drop counts of the whole cache loaded into memory, as stage 2 worked before it streamed."""
    inputs, names, _ = extract.discover(root, aligned=False)
    records = extract.load_records(out, root, inputs)
    ok = [(s, records[i.rel]) for s, i in enumerate(inputs) if records[i.rel]["status"] == "ok"]
    frames = [np.unique(r["frame"], return_inverse=True) for _, r in ok]
    offsets = np.cumsum([0] + [len(f) for f, _ in frames])
    cat = {k: np.concatenate([r[k] for _, r in ok]) for k in ("emb", "kps", "pose", "bbox", "score")}
    source = np.concatenate([np.full(len(r["frame"]), s) for s, r in ok])
    faces = pairing.Faces(
        pose=cat["pose"],
        bbox=cat["bbox"],
        score=cat["score"],
        identity=np.array([names.index(inputs[s].identity) for s in source], np.int64),
        group=np.concatenate([o + g.reshape(-1) for o, (_, g) in zip(offsets, frames)]),
        source=source,
        ref=np.arange(len(source)),
    )
    kept, reason = pairing.select_faces(faces, pairing.FaceFilter())
    pairs, counts = pairing.make_pairs(kept, rules)
    counts |= pairing.count_reasons(reason)
    counts["unreadable"] = sum(r["status"] == "unreadable" for r in records.values())
    return pairing.pair_columns(cat["emb"][kept.ref], cat["kps"][kept.ref], kept, pairs), counts


def sorted_rows(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.lexsort((cols["src_kps"][:, 0, 1], cols["src_kps"][:, 0, 0]))  # random floats: one per pair
    return {k: v[order] for k, v in cols.items()}


def test_stage2_shuffles_rows_within_splits_and_keeps_the_pairs(tmp_path):
    root, out = synthetic_cache(tmp_path, n_ids=200, videos=1, frames=70)
    rules = pairing.PairingRules(max_pairs_per_identity=25, val_fraction=0.1, test_fraction=0.05, seed=7)
    report = stage2(root, out, rules)
    shard_set = ShardSet.open(out)
    data = {s: read_split(shard_set, s) for s in shard_set.splits}
    assert shard_set.splits == ["train", "val", "test"] and report["splits"] == {
        s: len(data[s]["identity"]) for s in data
    }

    # the same pairs as pairing the whole cache in memory, and the same counts
    want, counts = in_memory_stage2(root, out, rules)
    got = sorted_rows({k: np.concatenate([d[k] for d in data.values()]) for k in want})
    want = sorted_rows(want)
    assert len(got["identity"]) == report["summary"]["pairs"] > 3000
    for k in ("src_kps", "src_pose", "identity"):
        np.testing.assert_array_equal(got[k], want[k])
    for k in ("src_emb", "tgt_emb", "tgt_centroid"):  # as stored: float16
        np.testing.assert_array_equal(got[k], want[k].astype(np.float16).astype(np.float32))
    assert {k: report["dropped"][k] for k in counts} == counts
    assert counts["identity_limit"] > 0 and counts["extra_face"] > 0 and counts["unreadable"] > 0

    # blocks mix identities: the first 1024-row block of train holds nearly every train identity
    train = data["train"]["identity"]
    block = train[: shard_set.index["block_size"]]
    assert len(train) > 2 * len(block)
    assert len(np.unique(block)) > 0.9 * len(np.unique(train))
    assert np.mean(block[1:] == block[:-1]) < 0.05

    # the same identities per split as pack (and synth) would choose for these ids, fractions and seed
    ids = np.unique(want["identity"])
    expected = splits.split_rows(ids, rules.val_fraction, rules.test_fraction, rules.seed)
    assert {s: set(np.unique(d["identity"]).tolist()) for s, d in data.items()} == {
        s: set(ids[r].tolist()) for s, r in expected.items()
    }
    emb = np.zeros((len(ids), 512), np.float32)
    emb[:, 0] = 1
    arrays = {"src_emb": emb, "src_kps": np.zeros((len(ids), 68, 3)), "src_pose": np.zeros((len(ids), 3))}
    arrays |= {"tgt_emb": emb, "identity": ids}
    pack_arrays(arrays, tmp_path / "packed", val_fraction=rules.val_fraction, test_fraction=rules.test_fraction, seed=7)
    packed = ShardSet.open(tmp_path / "packed")
    assert {s: set(read_split(packed, s)["identity"].tolist()) for s in packed.splits} == {
        s: set(np.unique(d["identity"]).tolist()) for s, d in data.items()
    }
    assert not list((out / extract.CACHE_DIR).glob(extract.STORE_PREFIX + "*"))  # the face store is gone


def test_stage2_memory_stays_far_below_the_faces_size(tmp_path, monkeypatch):
    root, out = synthetic_cache(tmp_path, n_ids=150, videos=2, frames=100, seed=1)
    n_faces = sum(len(np.load(p)["owner"]) for p in (out / extract.CACHE_DIR / "chunks").glob("*.npz"))
    faces_bytes = n_faces * (512 + 68 * 3) * 4  # float32 embeddings and landmarks
    monkeypatch.setattr(extract.store, "GATHER_ROWS", 1024)
    tracemalloc.start()
    try:
        report = stage2(root, out, pairing.PairingRules())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report["summary"]["pairs"] > 8000 and faces_bytes > 90e6
    # ~17 MB: ~100 bytes of metadata per face, one gather of 1024 pairs (7 MB) and one block being written;
    # stage 2 used to hold every face, so its peak was a multiple of faces_bytes
    assert peak < faces_bytes / 4, (peak, faces_bytes)
