"""Inputs that must be counted, not decoded, waited on or used half-grey: in `extract` and in `frontalize --images`.

An image declaring more pixels than --max-pixels (a crafted PNG header: nothing to decode), a FIFO in the
faces tree, and a JPEG cut short (OpenCV would decode the rest as grey) beside complete baseline and
progressive JPEGs, through the tiny ONNX stand-ins of tests/onnx_models.py.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import insightface
import onnx_models as om
import pytest

from dist_train import extract
from dist_train.frontalize import analyse_photos, find_photos

IMAGES = Path(insightface.__file__).parent / "data" / "images"
HUGE = 30_000  # the crafted PNG's declared width and height: more pixels than Pillow reads a header of
BIG = 8_000  # another's: over --max-pixels, not Pillow's limit


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, IHDR (8-bit RGB) and IEND: any reader learns the size, and there are no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("limits")
    t1 = cv2.cvtColor(cv2.imread(str(IMAGES / "t1.jpg")), cv2.COLOR_BGR2GRAY)
    for person in ("alice", "bob"):
        (root / person).mkdir()
    # each person's only frontal face is a JPEG: read wrongly as cut short, the person would have no pair
    assert cv2.imwrite(str(root / "alice/front.jpg"), om.tinted(t1, 0))
    assert cv2.imwrite(str(root / "bob/front.jpg"), om.tinted(t1, 0), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    for person in ("alice", "bob"):
        assert cv2.imwrite(str(root / person / "side.png"), om.tinted(t1, 60))
    (root / "alice/huge.png").write_bytes(png_header_only(HUGE, HUGE))
    (root / "bob/big.png").write_bytes(png_header_only(BIG, BIG))
    data = (IMAGES / "t1.jpg").read_bytes()
    (root / "bob/cut.jpg").write_bytes(data[: len(data) * 6 // 10])
    os.mkfifo(root / "bob/pipe.jpg")
    return root


EXPECTED = {
    "alice/huge.png": (
        "too_large",
        f"over --max-pixels 40000000; Pillow: Image size ({HUGE * HUGE} pixels) exceeds limit of 178956970 pixels, "
        "could be decompression bomb DOS attack.",
    ),
    "bob/big.png": ("too_large", f"{BIG}x{BIG} = {BIG * BIG} pixels, over --max-pixels 40000000"),
    "bob/cut.jpg": ("unreadable", "the JPEG is cut short (no end-of-image marker): the rest would decode as grey"),
    "bob/pipe.jpg": ("unsupported_file", "not a regular file: a FIFO"),
}


def test_extract_counts_huge_cut_and_fifo_inputs_and_pairs_the_rest(tree, tmp_path, capsys):
    pack, out = om.write_pack(tmp_path / "pack"), tmp_path / "set"
    rc = extract.main([str(tree), "--pack", str(pack), "--out", str(out), "--no-progress"])
    said = capsys.readouterr()
    assert rc == 0, said.err
    index = json.loads((out / "index.json").read_text())
    dropped = index["skipped"]
    assert (dropped["too_large"], dropped["unreadable"], dropped["unsupported_file"]) == (2, 1, 1)
    assert "too_large 2" in said.out and "unreadable 1" in said.out and "unsupported_file 1" in said.out
    assert index["extract"]["settings"]["max_pixels"] == 40_000_000
    report = json.loads((out / extract.REPORT_NAME).read_text())
    assert {p["input"]: (p["reason"], p["detail"]) for p in report["problems"]} == EXPECTED
    assert "2 pairs from 2 identities" in said.out  # both complete JPEGs read, baseline and progressive


def test_frontalize_photos_count_the_same_inputs(tree, tmp_path):
    pack = om.write_pack(tmp_path / "pack")
    extractor = extract.Extractor(extract.Settings(pack=str(pack)), ["CPUExecutionProvider"], 0, 32, None)
    faces = analyse_photos(extractor, tree, find_photos(tree, by_person=True), extract.pairing.FaceFilter(), 32)
    assert {p["input"]: (p["reason"], p["detail"]) for p in faces.problems} == EXPECTED
    assert (faces.dropped["too_large"], faces.dropped["unreadable"], faces.dropped["unsupported_file"]) == (2, 1, 1)
    assert sorted(set(faces.path.tolist())) == ["alice/front.jpg", "alice/side.png", "bob/front.jpg", "bob/side.png"]


def test_max_pixels_is_the_limit_and_is_checked(tree, tmp_path, capsys):
    """A lower --max-pixels drops the 1280x886 photos too, by their headers; a limit that cannot hold is refused."""
    pack = om.write_pack(tmp_path / "pack")
    extractor = extract.Extractor(
        extract.Settings(pack=str(pack), max_pixels=1280 * 886 - 1), ["CPUExecutionProvider"], 0, 32, None
    )
    faces = analyse_photos(extractor, tree, find_photos(tree, by_person=True), extract.pairing.FaceFilter(), 32)
    assert faces.dropped["too_large"] == 7 and len(faces.path) == 0  # the cut JPEG too: its header is whole
    for bad in ("0", "178956971"):
        rc = extract.main([str(tree), "--pack", str(pack), "--out", str(tmp_path / "set"), "--max-pixels", bad])
        assert rc == 1 and f"--max-pixels {bad}: must be >= 1 and at most 178956970" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()


def test_a_cache_made_before_max_pixels_existed_is_still_used(tmp_path):
    settings = extract.Settings(pack=str(tmp_path))
    marker = tmp_path / extract.CACHE_DIR / extract.SETTINGS_NAME
    marker.parent.mkdir()
    before = {k: v for k, v in settings.fingerprint().items() if k != "max_pixels"}
    marker.write_text(json.dumps(before))
    extract.check_cache_settings(tmp_path, settings, fresh=False)  # no refusal; the marker now records max_pixels
    with pytest.raises(extract.ExtractError, match=r"changed: \['max_pixels'\]"):
        extract.check_cache_settings(tmp_path, extract.Settings(pack=str(tmp_path), max_pixels=10), fresh=False)
