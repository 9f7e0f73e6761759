"""Model weights from files: a model to run from any checkpoint, or a new run's start from trained weights.

Both read through `checkpoint.consolidate_checkpoint`, so a checkpoint of any
ZeRO stage, a DDP checkpoint, ``best/model.safetensors`` and an exported file
are the same to the caller.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_train.checkpoint import consolidate_checkpoint
from dist_train.config import ConfigError
from dist_train.model import build_model


def load_model(path: str | Path):
    """A model in eval mode, fp32, from any checkpoint or consolidated file."""
    sd, cfg = consolidate_checkpoint(path)
    model = build_model(cfg.model)
    model.load_state_dict(sd)
    return model.eval(), cfg


def init_weights(model: torch.nn.Module, path: str, strict: bool) -> str:
    """Weights only from any checkpoint or exported file (fine-tuning: fresh optimizer and schedule).

    Names and shapes are compared before anything is loaded; a mismatch is refused listing the
    tensors, unless ``strict`` is off, which loads what matches and says what did not.
    """
    try:
        weights, _ = consolidate_checkpoint(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"init_from: {path!r} cannot be read: {e}") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape))
    problems = [
        f"{what}: {names[:8]}{' ...' if len(names) > 8 else ''}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("different shape", shapes))
        if names
    ]
    if problems and strict:
        raise ConfigError(
            f"init_from: {path} does not fit the model ({'; '.join(problems)}); use the model flags it was trained "
            "with, or --init_from_strict false to load the tensors that match"
        )
    matching = {k: v for k, v in weights.items() if k in own and k not in shapes}
    model.load_state_dict(matching, strict=False)
    said = f"; not loaded: {'; '.join(problems)}" if problems else ""
    return f"dist-train: initialised {len(matching)} of {len(own)} tensors from {path}{said}"
