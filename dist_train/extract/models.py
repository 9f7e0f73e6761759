"""The user's InsightFace model pack as onnxruntime sessions: checked up front, so a wrong pack fails before any work."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime

from dist_train.data.schema import EMB_DIM
from dist_train.extract.job import ExtractError

# The three models extraction needs and their file names in insightface's buffalo_l pack.
BUFFALO_L = {"detection": "det_10g.onnx", "recognition": "w600k_r50.onnx", "landmark_3d_68": "1k3d68.onnx"}
ALIGNED_SIZE = 112  # ArcFace crops


def choose_providers(device: str) -> list[str]:
    """onnxruntime providers: CUDA when present (or demanded), CPU otherwise."""
    available = onnxruntime.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise ExtractError(
            f"--device cuda, but onnxruntime offers only {available}; install onnxruntime-gpu "
            "(pip uninstall onnxruntime && pip install onnxruntime-gpu) or use --device cpu"
        )
    if device in ("cuda", "auto") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass
class Pack:
    """The three insightface model objects extraction uses, routed by their ONNX signatures."""

    detector: object  # model_zoo SCRFD
    landmark: object  # model_zoo Landmark, taskname landmark_3d_68
    recognition: object  # model_zoo ArcFaceONNX
    files: dict[str, str]  # task -> file name


def _layout_hint(pack: Path) -> str:
    names = ", ".join(BUFFALO_L.values())
    return (
        f"expected a model pack directory in the buffalo_l layout: {pack}/{{{names}}} "
        "(unzip insightface's buffalo_l.zip there; any pack with an SCRFD detector, a 1k3d68 landmark model "
        "and a 112x112 ArcFace model works). dist-train never downloads models."
    )


def load_pack(pack_dir: str | os.PathLike, providers: list[str], threads: int = 0) -> Pack:
    """Load the detector, 3D landmark and recognition models of a pack directory, or say what is missing."""
    # lazy: importing insightface takes 0.9-1.8 s, which `extract --help` and `frontalize --npz` need not pay
    from insightface.model_zoo import model_zoo

    pack = Path(pack_dir)
    if not pack.is_dir():
        raise ExtractError(f"model pack {str(pack)!r} is not a directory; {_layout_hint(pack)}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    onnxruntime.set_default_logger_severity(3)
    models, files = {}, {}
    for path in sorted(pack.glob("*.onnx")):
        try:
            model = model_zoo.get_model(str(path), providers=providers, sess_options=options)
        except Exception as e:  # a truncated download, a non-ONNX file
            raise ExtractError(f"model file {path} does not load ({type(e).__name__}: {e}); replace it") from e
        task = getattr(model, "taskname", None)
        if task in BUFFALO_L and task not in models:
            models[task], files[task] = model, path.name
    missing = [t for t in BUFFALO_L if t not in models]
    if missing:
        found = sorted(p.name for p in pack.glob("*.onnx")) or "no .onnx files"
        wanted = ", ".join(f"{t} (buffalo_l: {BUFFALO_L[t]})" for t in missing)
        raise ExtractError(f"model pack {str(pack)!r} has no {wanted}; it holds {found}. {_layout_hint(pack)}")
    if not models["detection"].use_kps:
        raise ExtractError(
            f"detector {files['detection']} gives no 5-point keypoints, which ArcFace alignment needs; "
            f"use an SCRFD model with keypoints such as {BUFFALO_L['detection']}"
        )
    rec = models["recognition"]
    out_dim = rec.output_shape[-1]
    if out_dim != EMB_DIM or tuple(rec.input_size) != (ALIGNED_SIZE, ALIGNED_SIZE):
        raise ExtractError(
            f"recognition model {files['recognition']} maps {rec.input_size} -> {out_dim}; "
            f"dist_train needs a {ALIGNED_SIZE}x{ALIGNED_SIZE} -> {EMB_DIM} ArcFace model such as {BUFFALO_L['recognition']}"
        )
    return Pack(models["detection"], models["landmark_3d_68"], rec, files)
