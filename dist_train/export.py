"""`dist-train export`: any checkpoint -> consolidated fp32 safetensors + ONNX, parity-checked.

Works offline in one process for DDP/single-process checkpoints, DeepSpeed
ZeRO 1/2/3 sharded checkpoints and consolidated files. The ONNX graph takes
raw InsightFace outputs (embedding, landmark_3d_68 pixels, pose degrees):
keypoint normalisation and pose encoding are part of the model's forward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dist_train import cli
from dist_train.checkpoint import CONSOLIDATED, save_consolidated
from dist_train.data.blocks import read_split
from dist_train.data.schema import EMB_DIM, MODEL_INPUTS, N_LANDMARKS
from dist_train.data.shards import ShardSet
from dist_train.weights import load_model

ONNX_NAME = "model.onnx"
OUTPUT = "pred_emb"
PARITY_TOL = 1e-4


def export_onnx(model: torch.nn.Module, path: str | Path, opset: int = 17) -> Path:
    """ONNX with a dynamic batch axis on every input and the output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = (
        torch.randn(2, EMB_DIM),
        torch.randn(2, N_LANDMARKS, 3) * 50 + 200,
        torch.randn(2, 3) * 30,
    )
    dynamic = {name: {0: "batch"} for name in (*MODEL_INPUTS, OUTPUT)}
    torch.onnx.export(
        model.eval(),
        example,
        str(path),
        input_names=list(MODEL_INPUTS),
        output_names=[OUTPUT],
        dynamic_axes=dynamic,
        opset_version=opset,
        dynamo=False,
    )
    return path


def sample_inputs(shards: str | None, split: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Real rows from a shard set for the parity check, or plausible random ones without it."""
    if shards:
        rows = read_split(ShardSet.open(shards), split)
        return {k: rows[k][:n].astype(np.float32) for k in MODEL_INPUTS}
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, EMB_DIM)).astype(np.float32)
    return {
        "src_emb": emb / np.linalg.norm(emb, axis=1, keepdims=True),
        "src_kps": (rng.normal(size=(n, N_LANDMARKS, 3)) * 50 + 300).astype(np.float32),
        "src_pose": rng.uniform(-90, 90, size=(n, 3)).astype(np.float32),
    }


def parity(model: torch.nn.Module, onnx_path: str | Path, inputs: dict[str, np.ndarray]) -> float:
    """Max abs difference between onnxruntime and PyTorch outputs on the same inputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run([OUTPUT], inputs)
    with torch.no_grad():
        torch_out = model.eval()(*(torch.from_numpy(inputs[k]) for k in MODEL_INPUTS)).numpy()
    return float(np.abs(onnx_out - torch_out).max())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dist-train export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (DDP / ZeRO-1/2/3) or consolidated file")
    p.add_argument("--out", required=True, help="output directory for model.safetensors and model.onnx")
    p.add_argument("--shards", default=None, help="shard set whose rows feed the parity check (default: random)")
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=256, help="rows in the parity check")
    p.add_argument("--opset", type=int, default=17)
    args = cli.parse_args(p, argv)

    try:
        model, cfg = load_model(args.checkpoint)
        inputs = sample_inputs(args.shards, args.split, args.n)
    except (ValueError, FileNotFoundError) as e:
        print(f"dist-train export: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    st = save_consolidated(out / CONSOLIDATED, model.state_dict(), cfg, {"exported_from": str(args.checkpoint)})
    onnx_path = export_onnx(model, out / ONNX_NAME, args.opset)
    diff = parity(model, onnx_path, inputs)
    ok = diff < PARITY_TOL
    report = {
        "consolidated": str(st),
        "onnx": str(onnx_path),
        "parity_max_abs_diff": diff,
        "parity_ok": ok,
        "parity_rows": len(inputs["src_emb"]),
        "parity_inputs": args.shards or "random",
    }
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"dist-train export: {st} and {onnx_path}; onnxruntime vs PyTorch max |diff| = {diff:.2e} "
        f"on {report['parity_rows']} rows ({'ok' if ok else f'FAILED, tolerance {PARITY_TOL}'})"
    )
    return 0 if ok else 1
