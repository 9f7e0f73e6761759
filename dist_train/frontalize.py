"""Inference API: ``Frontalizer.load(path).frontalize(src_emb, src_kps, src_pose)``.

Numpy in, L2-normalised numpy out, on PyTorch (any checkpoint or consolidated
file) or onnxruntime (an exported ``.onnx``). ``dist-train frontalize`` applies
it to the arrays of an ``.npz``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dist_train.data.schema import EMB_DIM, N_LANDMARKS
from dist_train.export import INPUTS, OUTPUT
from dist_train.paths import output_file


class Frontalizer:
    def __init__(self, run, backend: str):
        self._run = run
        self.backend = backend

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str = "cpu") -> Frontalizer:
        """``backend``: "onnx" for .onnx files, "torch" otherwise ("auto" picks by suffix)."""
        path = Path(path)
        if backend == "auto":
            backend = "onnx" if path.suffix == ".onnx" else "torch"
        if backend == "onnx":
            import onnxruntime as ort

            providers = [
                p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()
            ]
            sess = ort.InferenceSession(str(path), providers=providers)
            return cls(lambda x: sess.run([OUTPUT], x)[0], backend)
        from dist_train.evaluate import load_model

        model, _ = load_model(path)
        model.to(device)

        @torch.no_grad()
        def run(x):
            return model(*(torch.from_numpy(x[k]).to(device) for k in INPUTS)).float().cpu().numpy()

        return cls(run, backend)

    def frontalize(self, src_emb, src_kps, src_pose, batch_size: int = 4096) -> np.ndarray:
        """(N,512) profile embeddings, (N,68,3) landmark_3d_68 pixels, (N,3) pose degrees -> (N,512) unit vectors."""
        arrays = {
            "src_emb": np.asarray(src_emb, np.float32).reshape(-1, EMB_DIM),
            "src_kps": np.asarray(src_kps, np.float32).reshape(-1, N_LANDMARKS, 3),
            "src_pose": np.asarray(src_pose, np.float32).reshape(-1, 3),
        }
        n = len(arrays["src_emb"])
        if any(len(a) != n for a in arrays.values()):
            raise ValueError(f"row counts differ: { {k: len(a) for k, a in arrays.items()} }")
        out = (
            np.concatenate(
                [self._run({k: a[i : i + batch_size] for k, a in arrays.items()}) for i in range(0, n, batch_size)]
            )
            if n
            else np.zeros((0, EMB_DIM), np.float32)
        )
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dist-train frontalize", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=".onnx, consolidated .safetensors or checkpoint dir")
    p.add_argument("--npz", required=True, help="input with arrays src_emb, src_kps, src_pose")
    p.add_argument("--out", required=True, help="output .npz with pred_emb (and the inputs' other arrays)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    args = p.parse_args(argv)
    try:
        with np.load(args.npz, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        missing = [k for k in INPUTS if k not in data]
        if missing:
            raise ValueError(f"{args.npz} lacks arrays {missing}; it needs {list(INPUTS)}")
        pred = Frontalizer.load(args.model, args.backend).frontalize(*(data[k] for k in INPUTS))
    except (ValueError, FileNotFoundError) as e:
        print(f"dist-train frontalize: error: {e}", file=sys.stderr)
        return 2
    np.savez(output_file(args.out), **data, pred_emb=pred.astype(np.float32))
    print(f"dist-train frontalize: {len(pred)} rows -> {args.out}")
    return 0
