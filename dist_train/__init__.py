"""dist_train: distributed training of a profile->frontal face-embedding Transformer.

The Python API, in three names (imported on first use, so the command line stays quick to start)::

    from dist_train import Config, train, Frontalizer

    cfg = Config.from_preset("debug-cpu", data_dir="shards/demo", output_dir="runs/api", epochs=2)
    train(cfg)                                                    # 0 when the run finished
    model = Frontalizer.load("runs/api/best/model.safetensors")   # or a checkpoint dir, or an .onnx
    frontal = model.frontalize(src_emb, src_kps, src_pose)        # numpy in, unit vectors out
"""

__version__ = "0.1.0"
__all__ = ["Config", "Frontalizer", "train"]

_API = {"Config": "dist_train.config", "train": "dist_train.loop", "Frontalizer": "dist_train.frontalize"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dist_train' has no attribute {name!r}")
