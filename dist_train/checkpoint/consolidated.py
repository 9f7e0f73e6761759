"""Consolidated weights: one fp32 safetensors file that loads with plain PyTorch, no DeepSpeed, no launcher.

The best model (best/model.safetensors) and exports are written this way (`save_consolidated`, with the run
config and a ``meta`` record in the file's metadata); `consolidate_checkpoint` turns any resumable checkpoint
(DeepSpeed ZeRO 1/2/3 through ``zero_to_fp32``, DDP/single) into the same state dict offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dist_train.checkpoint.safety import assert_fits, assert_loadable
from dist_train.checkpoint.state import COMPLETE, TMP_SUFFIX
from dist_train.config import Config, ConfigError, config_from_dict, load_run_config
from dist_train.rundir import CONSOLIDATED


def is_deepspeed(accelerator, model) -> bool:
    kind = getattr(accelerator, "distributed_type", None)
    return str(getattr(kind, "value", kind)) == "DEEPSPEED" or hasattr(model, "checkpoint_engine")


def master_state_dict(model, accelerator) -> dict[str, torch.Tensor]:
    """The model's state dict with fp32 master weights, on CPU; keys as ``build_model(...).state_dict()``.

    Under DeepSpeed (any ZeRO stage, any precision) each parameter is the optimizer's fp32 master,
    assembled by ``safe_get_full_fp32_param``: a collective per parameter, so every rank must call this,
    and the parameters are visited in the module's order on every rank. Elsewhere the model's own
    weights are the fp32 ones.
    """
    if not is_deepspeed(accelerator, model):  # copies: the live weights go on changing while a thread writes
        module = accelerator.unwrap_model(model, keep_torch_compile=False)  # no DDP, no torch.compile prefix
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    from deepspeed.utils import safe_get_full_fp32_param

    module = accelerator.unwrap_model(model)
    masters = {}
    for p in module.parameters():  # shared parameters once, the same order on every rank
        full = safe_get_full_fp32_param(p)
        if full is None:  # no fp32 master held apart from the module (DeepSpeed without ZeRO, fp32)
            full = p.detach()
        masters[id(p)] = full.detach().to("cpu", torch.float32).clone()
    out = {}
    for k, v in module.state_dict(keep_vars=True).items():
        out[k] = masters[id(v)] if id(v) in masters else v.detach().to("cpu")
    return out


def save_consolidated(path: str | Path, state_dict: dict, cfg: Config, meta: dict | None = None) -> Path:
    """fp32 safetensors with the run config in its metadata: loads with plain PyTorch, no DeepSpeed.

    Floating tensors are stored as fp32, others as they are. Written to ``*.tmp`` and renamed; a failed
    write removes the ``*.tmp`` and re-raises.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in state_dict.items()
    }
    metadata = {"config": json.dumps(cfg.to_dict()), "meta": json.dumps(meta or {})}
    tmp = path.with_suffix(TMP_SUFFIX)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def safetensors_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, tensor name -> shape) of a safetensors file, from its header alone: no tensor is read.

    A file that is not safetensors (a pickle under that name, a truncated write) is refused, never unpickled.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ConfigError(
            f"{path}: not a readable safetensors file ({e}); give a model.safetensors written by dist-train "
            "(best/, `dist-train export`) or a checkpoint directory"
        ) from None


def _metadata_json(path: str | Path, md: dict[str, str], key: str, default: str | None = None):
    """A JSON record of the metadata (the run config, ``meta``): a mapping, or refused naming the file."""
    if key not in md and default is None:
        raise ConfigError(f"{path} has no dist-train {key} in its metadata; is it a dist-train consolidated file?")
    try:
        value = json.loads(md.get(key, default))
    except ValueError as e:
        raise ConfigError(
            f"{path}: its {key!r} metadata is not JSON ({e}); the file was not written by dist-train"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: its {key!r} metadata is a {type(value).__name__}, not a mapping")
    return value


def load_consolidated_meta(path: str | Path) -> dict:
    """The ``meta`` record of a consolidated file (step, val_mean_cos, ...), without reading the tensors."""
    return _metadata_json(path, safetensors_header(path)[0], "meta", "{}")


def load_consolidated(path: str | Path) -> tuple[dict, Config, dict]:
    """(state_dict, config, meta) of a consolidated file; the config is checked against the tensors first."""
    from safetensors.torch import load_file

    md, shapes = safetensors_header(path)
    cfg = config_from_dict(_metadata_json(path, md, "config"), f"{path} (config metadata)")
    meta = _metadata_json(path, md, "meta", "{}")
    assert_fits(cfg.model, shapes, path)
    return load_file(str(path)), cfg, meta


def consolidate_checkpoint(path: str | Path) -> tuple[dict, Config]:
    """fp32 state dict + config from any checkpoint: DeepSpeed ZeRO 1/2/3, DDP/single, or consolidated file.

    Runs offline in one process (no launcher, no process group). A checkpoint directory is checked like
    `Checkpointer.load` (`assert_loadable`) before anything in it is read.
    """
    path = Path(path)
    if path.is_file():
        sd, cfg, _ = load_consolidated(path)
        return sd, cfg
    if not (path / COMPLETE).is_file():
        raise ValueError(f"{path} is neither a consolidated .safetensors file nor a complete dist-train checkpoint")
    assert_loadable(path)
    cfg = load_run_config(path)
    kind = checkpoint_kind(path)
    if kind == DEEPSPEED:  # the ZeRO shards hold flat partitions: shapes are known once they are joined
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    elif (path / CONSOLIDATED).is_file():
        from safetensors.torch import load_file

        st = path / CONSOLIDATED
        assert_fits(cfg.model, safetensors_header(st)[1], st)
        return load_file(str(st)), cfg
    elif kind == PLAIN:
        sd = torch.load(path / PLAIN_BIN, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path} holds no model weights that dist-train knows how to read")
    assert_fits(cfg.model, {k: tuple(v.shape) for k, v in sd.items()}, path)
    return sd, cfg


DEEPSPEED, PLAIN = "DeepSpeed ZeRO", "DDP / single-process"  # the launchers whose checkpoints differ
PLAIN_BIN = "pytorch_model.bin"


def checkpoint_kind(path: str | Path) -> str | None:
    """Which launcher wrote a checkpoint, from what it holds: DeepSpeed's ``latest`` tag, or Accelerate's
    model file (DDP and single process); None when it holds neither."""
    path = Path(path)
    if (path / "pytorch_model" / "latest").is_file() or (path / "latest").is_file():
        return DEEPSPEED
    if (path / CONSOLIDATED).is_file() or (path / PLAIN_BIN).is_file():
        return PLAIN
    return None
