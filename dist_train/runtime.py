"""The Accelerator for a run: device, precision, process group and DeepSpeed config.

One code path serves the plain single-process debug run, DDP and DeepSpeed
ZeRO 1/2/3 under ``accelerate launch``. Decisions that Accelerate cannot make
for a streaming loader (integer micro batch, accumulation, clipping) are made
here from the run config, and conflicts are refused before any work starts.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_train.config import Config, ConfigError

PRECISIONS = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # ours -> Accelerate's mixed_precision


@dataclass
class Runtime:
    accelerator: object  # accelerate.Accelerator
    precision: str  # fp32 | fp16 | bf16
    deepspeed_stage: int | None  # None without DeepSpeed

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def input_dtype(self) -> torch.dtype:
        """DeepSpeed fp16/bf16 keeps the module in half precision: its inputs must match."""
        if self.deepspeed_stage is not None and self.precision != "fp32":
            return torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.float32

    def clip_gradients(self, model: torch.nn.Module, max_norm: float):
        """Clip to ``max_norm`` and return the total norm (DeepSpeed: the norm its step clipped with).

        Outside DeepSpeed this is what Accelerate's ``clip_grad_norm_`` does for DDP and single
        processes, without the version and package lookups it makes on every call (~0.7 ms per step
        on CPU, BENCHMARKS.md §2).
        """
        acc = self.accelerator
        if self.deepspeed_stage is not None:
            return acc.clip_grad_norm_(model.parameters(), max_norm)  # DeepSpeed clips inside its step
        acc.unscale_gradients()  # fp16 loss scaling: a no-op otherwise
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def resolve_precision(cfg: Config, on_gpu: bool) -> str:
    """``precision: auto`` follows ``--use_mixed_precision``: fp16 on GPUs, fp32 on CPU."""
    p = cfg.train.precision
    if p == "auto":
        p = "fp16" if (cfg.train.use_mixed_precision and on_gpu) else "fp32"
    if p == "fp16" and not on_gpu:
        raise ConfigError(
            "precision: 'fp16' is not allowed on CPU (DeepSpeed and PyTorch CPU kernels cannot train in fp16 here); "
            "use --precision bf16 or fp32 on CPU, fp16 on GPUs"
        )
    return p


def _deepspeed_json() -> dict:
    """The DeepSpeed config `accelerate launch` was given (file, or stage flags)."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path.lower() != "none":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"deepspeed_config_file: {path!r} does not exist; pass an existing JSON file")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed_config_file: {path!r} is not valid JSON ({e})") from e
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    return {"zero_optimization": {"stage": stage}}


def _fill(ds: dict, key: str, value, source: str) -> None:
    """Fill an "auto"/missing DeepSpeed key from our config; refuse a disagreeing integer."""
    have = ds.get(key, "auto")
    if have == "auto":
        ds[key] = value
    elif float(have) != float(value):
        raise ConfigError(
            f"DeepSpeed config sets {key}={have!r} but the run config gives {value!r} ({source}); "
            f'set "{key}": "auto" in the JSON (dist-train fills it) or pass the matching flag'
        )


def deepspeed_config(cfg: Config, world_size: int, on_gpu: bool) -> tuple[dict, str]:
    """The resolved DeepSpeed JSON and the precision it trains in."""
    ds = _deepspeed_json()
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.batch_size, "--batch_size")
    _fill(ds, "gradient_accumulation_steps", t.gradient_accumulation_steps, "--gradient_accumulation_steps")
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, "--grad_clip")
    _fill(ds, "train_batch_size", t.batch_size * t.gradient_accumulation_steps * world_size, "batch x accum x world")
    enabled = {k for k in ("fp16", "bf16") if str(ds.get(k, {}).get("enabled", False)).lower() == "true"}
    wanted = resolve_precision(cfg, on_gpu) if (t.precision != "auto" or not enabled) else None
    if enabled:
        ds_prec = enabled.pop()
        if wanted is not None and wanted != ds_prec:
            raise ConfigError(
                f"precision: the run asks for {wanted!r} but the DeepSpeed config enables {ds_prec}; "
                f"use a {wanted} DeepSpeed config (configs/deepspeed/) or --precision {ds_prec}"
            )
        precision = ds_prec
        if precision == "fp16" and not on_gpu:
            raise ConfigError(
                "the DeepSpeed config enables fp16, which DeepSpeed cannot run on CPU; "
                "use a bf16 or fp32 DeepSpeed config (configs/deepspeed/*-bf16.json, *-fp32.json) on CPU"
            )
    else:
        precision = wanted
    for k in ("fp16", "bf16"):
        ds.setdefault(k, {})["enabled"] = precision == k
    if precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling
        ds["fp16"].setdefault("auto_cast", True)
    zero = ds.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        # lets the best model be gathered (a collective) for the consolidated file
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    ds.setdefault("steps_per_print", 10**9)  # dist-train does its own logging
    return ds, precision


def setup(cfg: Config) -> Runtime:
    """Create the Accelerator; call once per process, before any data or model work."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "LOCAL_RANK" in os.environ  # under accelerate launch / torchrun, even with one process
    handlers = []
    if launched and not on_gpu:
        # Without it Accelerate picks no backend on CPU and every rank believes it is alone.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    plugin, stage = None, None
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        if sys.prefix != sys.base_prefix:
            # DeepSpeed JIT-builds its ops into ~/.cache/torch_extensions, one directory for every venv on
            # the machine: venvs with different torch builds then rebuild each other's op (50-120 s of CPU)
            # on every switch. Inside a venv, the venv keeps its own.
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        ds, precision = deepspeed_config(cfg, world, on_gpu)
        stage = int(ds["zero_optimization"].get("stage", 0))
        plugin = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False)
    else:
        precision = resolve_precision(cfg, on_gpu)
    acc = Accelerator(
        mixed_precision=PRECISIONS[precision],
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        # without cpu=True a CPU DDP launch reports DistributedType.NO: no DDP wrapper, no gradient averaging
        # (DeepSpeed must not get it: Accelerator(cpu=True) disables DeepSpeed)
        cpu=not on_gpu and plugin is None,
        step_scheduler_with_optimizer=False,
    )
    return Runtime(acc, precision, stage)
