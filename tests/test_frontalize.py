"""`dist-train frontalize --images`: photos -> faces (extract's own code) -> frontalized embeddings, and the
gallery figures, through insightface's real model_zoo code with the tiny ONNX stand-ins of tests/onnx_models.py
on insightface's shipped sample images, tinted to set each face's yaw.

Known answers: an untrained model returns normalise(src_emb), so its "after" figures equal the "before" ones;
every figure is recomputed here by hand from extract's faces of the same photos.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import insightface
import numpy as np
import onnx_models as om
import pytest
import torch

from dist_train import cli, extract
from dist_train.checkpoint import save_consolidated
from dist_train.config import build
from dist_train.data.schema import YAW_BUCKETS, YAW_EDGES, yaw_bucket_index
from dist_train.frontalize import Frontalizer
from dist_train.metrics import identification
from dist_train.model import build_model

SAMPLES = Path(insightface.__file__).parent / "data" / "images"
FARS = ("0.001", "0.01")
ARRAYS = {  # name: (shape per face, dtype kind)
    "path": ((), "U"),
    "face": ((), "i"),
    "src_emb": ((512,), "f"),
    "frontal_emb": ((512,), "f"),
    "landmarks": ((68, 3), "f"),
    "pose": ((3,), "f"),
    "bbox": ((4,), "f"),
    "score": ((), "f"),
}


def gray(name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(SAMPLES / name)), cv2.COLOR_BGR2GRAY)


def write_tree(root: Path, images: dict[str, np.ndarray]) -> Path:
    for rel, img in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / rel), img)
    return root


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return om.write_pack(tmp_path_factory.mktemp("buffalo_l"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    """(queries, gallery), both one folder per person; the stand-in landmark model reads yaw ~= the tint.

    Each sample image is a "person". The stand-in detector finds a large face and a small one in every
    photo; in the 1280-px t1 and the mask photos the small one passes the filters (an extra_face), in the
    112-px Tom Hanks crop it is too_small. Bob's second query is another person's photo, so rank-1 misses it.
    """
    tmp = tmp_path_factory.mktemp("photos")
    t1, tom, white, blue, green = (
        gray(n) for n in ("t1.jpg", "Tom_Hanks_54745.png", "mask_white.jpg", "mask_blue.jpg", "mask_green.jpg")
    )
    queries = write_tree(
        tmp / "queries",
        {
            "alice/front.png": om.tinted(t1, 8),
            "alice/side.png": om.tinted(t1, 65),
            "bob/side.png": om.tinted(tom, -50),
            "bob/other.png": om.tinted(green, -35),
            "carol/turned.png": om.tinted(white, 75),
            "erin/any.png": om.tinted(blue, 0),  # no gallery photo: left out of the figures
            "dave/black.png": np.zeros((100, 100, 3), np.uint8),  # no_face
            "dave/gray.png": np.full((100, 100, 3), 50, np.uint8),  # two faces scoring ~0.39: low_score
        },
    )
    (queries / "dave/broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (queries / "dave/clip.mp4").write_bytes(b"\x00" * 64)
    (queries / "notes.txt").write_text("not in a person folder")
    gallery = write_tree(
        tmp / "gallery",
        {
            "alice/a.png": om.tinted(t1, 0),
            "alice/b.png": om.tinted(t1, 5),
            "bob/a.png": om.tinted(tom, 0),
            "carol/a.png": om.tinted(white, 0),
            "frank/black.png": np.zeros((80, 80, 3), np.uint8),  # frank has no face: no centroid
        },
    )
    return queries, gallery


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """An untrained consolidated model (returns normalise(src_emb)) and one with a non-zero residual."""
    tmp = tmp_path_factory.mktemp("models")
    cfg = build({"d_model": 32, "nhead": 2, "num_layers": 1, "dim_feedforward": 64, "gate": "none"})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    out = {"untrained": save_consolidated(tmp / "untrained.safetensors", model.state_dict(), cfg)}
    torch.nn.init.normal_(model.residual.out.weight, std=0.05)
    out["trained"] = save_consolidated(tmp / "trained.safetensors", model.state_dict(), cfg)
    return out


@dataclass
class Ran:
    rc: int
    stdout: str
    arrays: dict[str, np.ndarray]
    report: dict


def frontalize(*args) -> Ran:
    """`dist-train frontalize` in this process; its stdout, the .npz and its report."""
    argv = ["frontalize", *map(str, args), "--no-progress"]
    out = Path(argv[argv.index("--out") + 1])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    arrays, report = {}, {}
    if out.exists():
        with np.load(out, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    if out.with_suffix(".json").exists():  # --images only
        report = json.loads(out.with_suffix(".json").read_text())
    return Ran(rc, buf.getvalue(), arrays, report)


@pytest.fixture(scope="module")
def runs(photos, pack, models, tmp_path_factory) -> dict[str, Ran]:
    queries, gallery = photos
    tmp = tmp_path_factory.mktemp("runs")
    common = ["--images", queries, "--pack", pack, "--gallery", gallery]
    return {
        name: frontalize(*common, "--model", models[name], "--out", tmp / name / "faces.npz")
        for name in ("untrained", "trained")
    }


def extract_faces(root: Path, pack: Path, out: Path) -> dict[str, dict]:
    """{photo: its faces}, as `dist-train extract`'s stage 1 caches them (Extractor.run, load_records)."""
    inputs, _, _ = extract.discover(root, aligned=False)
    extractor = extract.Extractor(extract.Settings(pack=str(pack)), ["CPUExecutionProvider"], 0, 32, None)
    extractor.run(root, out, inputs)
    return extract.load_records(out, root, inputs)


def kept_faces(records: dict[str, dict], keep_all: bool = False) -> list[tuple[str, int, dict]]:
    """(photo, face index, face) kept by the default filters (score >= 0.5, shorter side >= 40, largest)."""
    kept = []
    for rel, r in sorted(records.items()):
        if r["status"] != "ok":
            continue
        side = np.minimum(r["bbox"][:, 2] - r["bbox"][:, 0], r["bbox"][:, 3] - r["bbox"][:, 1])
        ok = np.flatnonzero((r["score"] >= 0.5) & (side >= 40))
        if not keep_all and len(ok):
            area = np.prod(r["bbox"][ok, 2:] - r["bbox"][ok, :2], axis=1)
            ok = ok[[np.argmax(area)]]
        kept += [(rel, int(i), {k: r[k][i] for k in ("emb", "kps", "pose", "bbox", "score")}) for i in ok]
    return kept


@pytest.fixture(scope="module")
def reference(photos, pack, tmp_path_factory) -> dict[str, list]:
    queries, gallery = photos
    tmp = tmp_path_factory.mktemp("extracted")
    records = {"queries": extract_faces(queries, pack, tmp / "q"), "gallery": extract_faces(gallery, pack, tmp / "g")}
    return {
        "queries": kept_faces(records["queries"]),
        "queries_all": kept_faces(records["queries"], keep_all=True),
        "gallery": kept_faces(records["gallery"]),
    }


# ---------------------------------------------------------------- the .npz and the problem list


def test_each_kept_face_is_written_as_extract_finds_it(runs, reference):
    ran = runs["untrained"]
    assert ran.rc == 0, ran.stdout
    got = ran.arrays
    assert set(got) == {*ARRAYS, "person"}
    n = len(got["path"])
    for name, (shape, kind) in ARRAYS.items():
        assert got[name].shape == (n, *shape) and got[name].dtype.kind == kind, name
    want = reference["queries"]
    assert [(p, i) for p, i, _ in want] == list(zip(got["path"].tolist(), got["face"].tolist()))
    assert got["path"].tolist() == [
        "alice/front.png",
        "alice/side.png",
        "bob/other.png",
        "bob/side.png",
        "carol/turned.png",
        "erin/any.png",
    ]
    assert got["person"].tolist() == [p.split("/")[0] for p in got["path"].tolist()]
    for name, key in (("src_emb", "emb"), ("landmarks", "kps"), ("pose", "pose"), ("bbox", "bbox"), ("score", "score")):
        np.testing.assert_allclose(got[name], np.stack([f[key] for _, _, f in want]), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got["pose"][:, 0], om.PITCH, atol=1e-3)
    assert abs(got["pose"][1, 1] - 65) < 3 and abs(got["pose"][3, 1] + 50) < 3  # the tints
    # an untrained model returns normalise(src_emb)
    np.testing.assert_allclose(got["frontal_emb"], got["src_emb"], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got["frontal_emb"], axis=1), 1.0, atol=1e-6)


def test_photos_without_a_face_are_listed_with_the_reason(runs):
    ran = runs["untrained"]
    listed = {p["input"]: p["reason"] for p in ran.report["problems"]}
    assert listed == {
        "dave/black.png": "no_face",
        "dave/broken.jpg": "unreadable",
        "dave/clip.mp4": "unsupported_file",
        "dave/gray.png": "low_score",
        "notes.txt": "outside_identity",
    }
    assert ran.report["summary"] == {"photos": 9, "faces_detected": 14, "faces": 6}
    # the t1 and the larger mask photos: 4 extra faces; Tom Hanks and mask_green: 2 too small; grey: 2 low-scoring
    assert ran.report["dropped"] == {
        "no_face": 1,
        "unreadable": 1,
        "unsupported_file": 1,
        "outside_identity": 1,
        "low_score": 2,
        "too_small": 2,
        "extra_face": 4,
    }
    assert {p["input"]: p["reason"] for p in ran.report["gallery"]["problems"]} == {"frank/black.png": "no_face"}
    assert "6 faces from 9 photos (14 detected)" in ran.stdout
    assert "5 inputs that gave no face" in ran.stdout


# ---------------------------------------------------------------- gallery figures


def hand_figures(arrays: dict[str, np.ndarray], gallery: list, key: str) -> dict[str, dict]:
    """{row: {n, rank1, tar 0.001, tar 0.01}} recomputed from the .npz and extract's gallery faces."""
    persons = sorted({p.split("/")[0] for p, _, _ in gallery})
    centroids = []
    for person in persons:
        mean = np.mean([f["emb"].astype(np.float64) for p, _, f in gallery if p.startswith(person + "/")], axis=0)
        centroids.append(mean / np.linalg.norm(mean))
    centroids = np.stack(centroids)
    known = np.isin(arrays["person"], persons)
    emb = arrays[key][known].astype(np.float64)
    own = np.array([persons.index(p) for p in arrays["person"][known]])
    scores = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ centroids.T
    yaw = np.abs(arrays["pose"][known, 1])
    rows = {"all": np.ones(len(own), bool)}
    for name, lo, hi in zip(YAW_BUCKETS, YAW_EDGES[:-1], YAW_EDGES[1:]):
        if ((yaw >= lo) & (yaw < hi)).any():
            rows[name] = (yaw >= lo) & (yaw < hi)
    out = {}
    for name, m in rows.items():
        s, o = scores[m], own[m]
        genuine = s[np.arange(len(o)), o]
        impostor = np.concatenate([np.delete(row, k) for row, k in zip(s, o)])
        out[name] = {"n": int(m.sum()), "rank1": float(np.mean(s.argmax(1) == o))}
        for far in FARS:
            out[name][far] = float(np.mean(genuine > np.quantile(impostor, 1 - float(far))))
    return out


def printed_figures(stdout: str) -> dict[str, list[float]]:
    """{row: [n, rank1 before, after, TAR@1e-3 before, after, TAR@1e-2 before, after]} from the table."""
    rows = {}
    for line in stdout.splitlines():
        words = line.split()
        if words and (words[0] == "all" or words[0] in YAW_BUCKETS):
            rows[words[0]] = [float(w) for w in words[1:]]
    return rows


@pytest.mark.parametrize("name", ["untrained", "trained"])
def test_gallery_figures_match_a_hand_computation(runs, reference, name):
    ran = runs[name]
    assert ran.rc == 0, ran.stdout
    before = hand_figures(ran.arrays, reference["gallery"], "src_emb")
    after = hand_figures(ran.arrays, reference["gallery"], "frontal_emb")
    assert list(before) == ["all", "0-15", "15-30", "30-45", "45-60", "60-75"]
    assert before["all"]["n"] == 5 and before["all"]["rank1"] == pytest.approx(0.8)  # bob/other.png is missed
    printed = printed_figures(ran.stdout)
    assert list(printed) == list(before)
    figures = ran.report["gallery"]["figures"]
    for row in before:
        b, a = before[row], after[row]
        assert printed[row] == pytest.approx(
            [b["n"], b["rank1"], a["rank1"], b[FARS[0]], a[FARS[0]], b[FARS[1]], a[FARS[1]]], abs=5e-4
        ), row
        for when, want in (("before", b), ("after", a)):
            got = figures[row][when]
            assert (got["n"], got["rank1"]) == (want["n"], pytest.approx(want["rank1"], abs=1e-12))
            assert got["tar_at_far"] == pytest.approx({far: want[far] for far in FARS}, abs=1e-12)
    assert (yaw_bucket_index(ran.arrays["pose"][:, 1]) >= 0).all()
    assert ran.report["gallery"]["persons"] == ["alice", "bob", "carol"]
    assert ran.report["gallery"]["persons_without_gallery"] == ["erin"]
    if name == "untrained":
        assert all(figures[row]["before"] == figures[row]["after"] for row in figures)
        assert any(v < 1 for row in before.values() for k, v in row.items() if k != "n"), "figures of 1 prove little"
    else:  # the residual moves the embeddings: "after" is computed from frontal_emb, not src_emb
        assert np.abs(ran.arrays["frontal_emb"] - ran.arrays["src_emb"]).max() > 1e-2
        assert figures["all"]["before"] != figures["all"]["after"], "else swapped arrays would go unnoticed"


def test_trained_model_output_and_keep_all(photos, pack, models, reference, runs, tmp_path):
    queries, _ = photos
    ran = frontalize(
        "--images",
        queries,
        "--pack",
        pack,
        "--model",
        models["trained"],
        "--out",
        tmp_path / "all.npz",
        "--keep",
        "all",
    )
    assert ran.rc == 0, ran.stdout
    got = ran.arrays
    assert "person" not in got  # no gallery: any layout, no persons
    want = reference["queries_all"]
    assert [(p, i) for p, i, _ in want] == list(zip(got["path"].tolist(), got["face"].tolist()))
    assert got["path"].tolist().count("alice/side.png") == 2 and len(got["path"]) == 10
    np.testing.assert_allclose(got["src_emb"], np.stack([f["emb"] for _, _, f in want]), atol=1e-6)
    # frontal_emb is the model applied to the face's own embedding, landmarks and pose
    expected = Frontalizer.load(models["trained"]).frontalize(got["src_emb"], got["landmarks"], got["pose"])
    np.testing.assert_allclose(got["frontal_emb"], expected, atol=1e-6)
    largest = runs["trained"].arrays
    rows = [list(zip(got["path"], got["face"])).index(k) for k in zip(largest["path"], largest["face"])]
    np.testing.assert_allclose(got["frontal_emb"][rows], largest["frontal_emb"], atol=1e-6)
    assert "gallery" not in ran.stdout


def test_npz_input_still_works_and_bad_arguments_are_refused(models, photos, pack, tmp_path, capsys):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3, 512)).astype(np.float32)
    src = tmp_path / "in.npz"
    np.savez(src, src_emb=emb, src_kps=rng.uniform(0, 200, (3, 68, 3)), src_pose=rng.uniform(-60, 60, (3, 3)))
    ran = frontalize("--npz", src, "--model", models["untrained"], "--out", tmp_path / "out.npz")
    assert ran.rc == 0
    np.testing.assert_allclose(ran.arrays["pred_emb"], emb / np.linalg.norm(emb, axis=1, keepdims=True), atol=1e-6)
    queries, gallery = photos
    with pytest.raises(SystemExit):
        cli.main(["frontalize", "--images", str(queries), "--model", str(models["untrained"]), "--out", "x.npz"])
    assert "--images needs --pack" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "someone").mkdir(parents=True)
    out = tmp_path / "none.npz"
    argv = ["--images", empty, "--pack", pack, "--model", models["untrained"], "--out", out, "--gallery", gallery]
    assert frontalize(*argv).rc == 2
    assert "holds no photos" in capsys.readouterr().err and not out.exists()
    shutil.rmtree(empty)


def test_identification_known_answer():
    # templates listed c, a, b: (-1, 0), (1, 0), (0, 1); queries (unit after normalising) of a, a, c
    gallery, gallery_id = np.array([[-2.0, 0.0], [1.0, 0.0], [0.0, 3.0]]), np.array(["c", "a", "b"])
    query, query_id = np.array([[4.0, 3.0], [3.0, 4.0], [-4.0, 3.0]]), np.array(["a", "a", "c"])
    # scores (a, b, c): q0 .8 .6 -.8 (right), q1 .6 .8 -.6 (b wins: wrong), q2 -.8 .6 .8 (right) -> rank-1 2/3
    # genuine .8 .6 .8; impostors -.8 -.8 -.6 .6 .6 .8: the 0.999 and 0.99 quantiles are .6 + .2 * (.995, .95),
    # i.e. .799 and .79, and the genuine .8 pass both strictly, .6 does not -> TAR 2/3 at both FARs
    out = identification(query, query_id, gallery, gallery_id)
    assert out == {"n": 3, "rank1": pytest.approx(2 / 3), "tar_at_far": pytest.approx({"0.001": 2 / 3, "0.01": 2 / 3})}
    # a tie goes to the template listed first: (1, 1) scores a and b equally; a is listed before b
    tie = identification(np.array([[1.0, 1.0]]), np.array(["b"]), gallery, gallery_id)
    # impostors (a, c) = +-1/sqrt(2): the thresholds (2 * 0.999 - 1) / sqrt(2) and (2 * 0.99 - 1) / sqrt(2) lie
    # below the genuine 1/sqrt(2), so verification accepts what identification got wrong
    assert tie["rank1"] == 0.0 and tie["tar_at_far"] == {"0.001": 1.0, "0.01": 1.0}
    empty = identification(np.zeros((0, 2)), np.array([], str), gallery, gallery_id)
    assert empty["n"] == 0 and np.isnan(empty["rank1"]) and np.isnan(empty["tar_at_far"]["0.01"])
    with pytest.raises(ValueError, match="without a gallery template"):
        identification(query, np.array(["a", "a", "zed"]), gallery, gallery_id)
    with pytest.raises(ValueError, match="one gallery template per identity"):
        identification(query, query_id, gallery, np.array(["a", "a", "b"]))
