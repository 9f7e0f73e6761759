"""Tiny ONNX stand-ins for an InsightFace buffalo_l pack, built by the tests.

No model can be downloaded here, so the tests write three small ONNX files
with the input and output signatures of the pack's models. insightface's
``model_zoo`` routes them by those signatures exactly as it routes the real
files, so extraction runs through the real SCRFD, Landmark and ArcFaceONNX
code. What the stand-ins compute is simple and known, so tests can predict it:

- detector (SCRFD signature, 9 outputs: scores, boxes, 5 keypoints for strides
  8/16/32; static 128x128 input): every image holds two faces, a large one in
  the middle of the detector input (``BIG_BOX``) and a small one near the top
  left corner (``SMALL_BOX``), both scoring ``clip(mean(input) + 1, 0, 1)`` of
  the normalised detector input. Black images score ~0 (no face); a uniform
  grey level g scores about ``(g + 0.5) / 128`` (50 -> 0.39).
- landmarks (1k3d68 signature, 192x192 -> 3309): InsightFace's mean shape
  rotated by pitch ``PITCH``, roll ``ROLL`` and a yaw read from the colour of
  the crop's centre: yaw in degrees ~= (mean(R) - mean(B)) / 2 in grey levels,
  so a grey image tinted with R+d, B-d has yaw ~= d degrees (|yaw| <= 85).
- recognition (w600k_r50 signature, Nx3x112x112 -> 512): a fixed random
  projection of 8x8-pooled pixels; embeddings are meaningless but deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dist_train.geometry import mean_shape, rotation_matrices

OPSET = 17
DET_SIZE = 128  # static detector input, pixels
BIG_BOX = (32.0, 24.0, 96.0, 104.0)  # x0, y0, x1, y1 in detector-input pixels
SMALL_BOX = (10.0, 9.0, 22.0, 23.0)
PITCH, ROLL = 10.0, -5.0  # degrees, constant in every landmark output
MAX_YAW = 85.0
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
PACK_FILES = {"detector": "det_10g.onnx", "recognition": "w600k_r50.onnx", "landmark": "1k3d68.onnx"}


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _box_anchor(box, stride: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Anchor index at the box centre, its box distances and keypoint offsets (in strides)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    col, row = int(round(cx / stride)), int(round(cy / stride))
    ax, ay = col * stride, row * stride
    width = DET_SIZE // stride
    index = (row * width + col) * 2  # SCRFD has 2 anchors per cell at strides 8/16/32
    dist = np.array([ax - x0, ay - y0, x1 - ax, y1 - ay], dtype=np.float32) / stride
    scale = (x1 - x0) / 112.0
    kps = np.stack([x0 + ARCFACE_DST[:, 0] * scale, y0 + ARCFACE_DST[:, 1] * scale * (y1 - y0) / (x1 - x0)], -1)
    offsets = ((kps - [ax, ay]) / stride).astype(np.float32).reshape(-1)
    return index, dist, offsets


def write_detector(path: Path, keypoints: bool = True) -> Path:
    """SCRFD-signature detector with the two fixed faces described in the module docstring.

    ``keypoints=False`` leaves out the keypoint outputs (6 outputs, like SCRFD models without kps).
    """
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["mean"], name="det_mean", keepdims=0),
        helper.make_node("Add", ["mean", "one"], ["shifted"], name="det_shift"),
        helper.make_node("Clip", ["shifted", "zero", "one"], ["score"], name="det_score"),
    ]
    inits = [_const("one", 1.0), _const("zero", 0.0)]
    scores, boxes, kpss = [], [], []
    placed = {8: SMALL_BOX, 32: BIG_BOX}
    for stride in (8, 16, 32):
        n = (DET_SIZE // stride) ** 2 * 2
        mask = np.zeros((n, 1), np.float32)
        dist = np.zeros((n, 4), np.float32)
        offs = np.zeros((n, 10), np.float32)
        if stride in placed:
            i, d, o = _box_anchor(placed[stride], stride)
            mask[i], dist[i], offs[i] = 1.0, d, o
        inits += [_const(f"mask{stride}", mask), _const(f"dist{stride}", dist), _const(f"kps{stride}", offs)]
        nodes += [
            helper.make_node("Mul", [f"mask{stride}", "score"], [f"score_{stride}"], name=f"scores{stride}"),
            helper.make_node("Identity", [f"dist{stride}"], [f"bbox_{stride}"], name=f"boxes{stride}"),
            helper.make_node("Identity", [f"kps{stride}"], [f"kps_{stride}"], name=f"points{stride}"),
        ]
        scores.append(helper.make_tensor_value_info(f"score_{stride}", TensorProto.FLOAT, [n, 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{stride}", TensorProto.FLOAT, [n, 4]))
        kpss.append(helper.make_tensor_value_info(f"kps_{stride}", TensorProto.FLOAT, [n, 10]))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET_SIZE, DET_SIZE])
    outputs = scores + boxes + (kpss if keypoints else [])
    return _save(helper.make_graph(nodes, "scrfd_standin", [inp], outputs, inits), path)


def write_landmark(path: Path) -> Path:
    """1k3d68-signature model: mean shape rotated by (PITCH, tint yaw, ROLL), see module docstring."""
    shape = mean_shape().astype(np.float32)
    rx = rotation_matrices(np.array([[PITCH, 0.0, 0.0]]))[0]
    rz = rotation_matrices(np.array([[0.0, 0.0, ROLL]]))[0]
    # Landmark feeds (pixel - 127.5) / 128 with R first: (R - B) / 2 in grey levels is 64 * (r - b).
    gain = 64.0 * math.pi / 180.0
    lim = MAX_YAW * math.pi / 180.0
    inits = [
        _const("pitched", shape @ rx.T),
        _const("rz_t", rz.T),
        _const("y_axis", np.diag([0.0, 1.0, 0.0])),
        _const("cos_part", np.diag([1.0, 0.0, 1.0])),
        _const("sin_part", np.array([[0, 0, -1], [0, 0, 0], [1, 0, 0]])),  # Ry^T's sine terms
        _const("gain", gain),
        _const("lo", -lim),
        _const("hi", lim),
        _const("padding", np.zeros((1, 3309 - 68 * 3))),
        numpy_helper.from_array(np.array([0, 64, 64], np.int64), "starts"),
        numpy_helper.from_array(np.array([3, 128, 128], np.int64), "ends"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array(0, np.int64), "red"),
        numpy_helper.from_array(np.array(2, np.int64), "blue"),
        numpy_helper.from_array(np.array([1, 204], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Slice", ["data", "starts", "ends", "axes"], ["centre"], name="crop_centre"),
        helper.make_node("ReduceMean", ["centre"], ["chan"], name="channel_means", axes=[0, 2, 3], keepdims=0),
        helper.make_node("Gather", ["chan", "red"], ["r"], name="red_mean", axis=0),
        helper.make_node("Gather", ["chan", "blue"], ["b"], name="blue_mean", axis=0),
        helper.make_node("Sub", ["r", "b"], ["tint"], name="tint"),
        helper.make_node("Mul", ["tint", "gain"], ["raw_yaw"], name="tint_to_yaw"),
        helper.make_node("Clip", ["raw_yaw", "lo", "hi"], ["yaw"], name="yaw_limit"),
        helper.make_node("Cos", ["yaw"], ["c"], name="cos_yaw"),
        helper.make_node("Sin", ["yaw"], ["s"], name="sin_yaw"),
        helper.make_node("Mul", ["cos_part", "c"], ["cterm"], name="cos_term"),
        helper.make_node("Mul", ["sin_part", "s"], ["sterm"], name="sin_term"),
        helper.make_node("Add", ["y_axis", "cterm"], ["ry_a"], name="ry_a"),
        helper.make_node("Add", ["ry_a", "sterm"], ["ry_t"], name="ry_t"),
        helper.make_node("MatMul", ["pitched", "ry_t"], ["yawed"], name="apply_yaw"),
        helper.make_node("MatMul", ["yawed", "rz_t"], ["posed"], name="apply_roll"),
        helper.make_node("Reshape", ["posed", "flat"], ["points"], name="flatten_points"),
        helper.make_node("Concat", ["padding", "points"], ["fc1"], name="pad_output", axis=1),
    ]
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 192, 192])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3309])
    return _save(helper.make_graph(nodes, "landmark_standin", [inp], [out], inits), path)


def write_recognition(path: Path, seed: int = 0) -> Path:
    """w600k_r50-signature model: a fixed random projection of 8x8-pooled pixels."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["683"], name="project"),
    ]
    inits = [_const("proj", rng.standard_normal((3 * 14 * 14, 512)))]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    out = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])
    return _save(helper.make_graph(nodes, "arcface_standin", [inp], [out], inits), path)


def write_pack(directory: Path, parts=("detector", "recognition", "landmark")) -> Path:
    """A model pack directory in the buffalo_l layout holding the requested stand-ins."""
    directory.mkdir(parents=True, exist_ok=True)
    writers = {"detector": write_detector, "recognition": write_recognition, "landmark": write_landmark}
    for part in parts:
        writers[part](directory / PACK_FILES[part])
    return directory


def tinted(gray: np.ndarray, yaw_deg: float) -> np.ndarray:
    """A BGR image from a grey one with R + d, B - d, which the landmark stand-in reads as yaw ~= d."""
    g = gray.astype(np.float32)
    d = float(yaw_deg)
    return np.clip(np.stack([g - d, g, g + d], -1), 0, 255).astype(np.uint8)
