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
from dist_train.model import model_inputs

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
        """DeepSpeed fp16/bf16 keeps the module in half precision: the embedding it reads must match."""
        if self.deepspeed_stage is not None and self.precision != "fp32":
            return torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.float32

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`model.model_inputs` in this run's dtype: only the embedding is cast."""
        return model_inputs(batch, self.input_dtype)

    def describe(self) -> str:
        acc = self.accelerator
        engine = f"DeepSpeed ZeRO-{self.deepspeed_stage}" if self.deepspeed_stage is not None else acc.distributed_type
        return f"device {acc.device}, {self.precision}, {engine}"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Collective when distributed: element-wise sums over ranks (float64)."""
        return all_reduce_(torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)).tolist()

    def broadcast(self, value):
        return broadcast(value)  # the module's function: one place talks to the process group

    def all_gather(self, value) -> list:
        return all_gather(value)

    def gather_to_main(self, value) -> list | None:
        return gather_to_main(value)


# ---- the process group: every exchange of Python objects between ranks goes through these ------------------------


def distributed() -> bool:
    """Whether there are other ranks to talk to (a one-process run, or one without a process group, has none)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def end_process_group() -> None:
    """Tear the process group down before the interpreter exits (the command line's last act): a group left
    to interpreter shutdown can abort the process in a C++ destructor after the run has finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast(value):
    """Collective when distributed: rank 0's ``value`` on every rank (any picklable object)."""
    if not distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value) -> list:
    """Collective when distributed: every rank's ``value``, in rank order, on every rank."""
    if not distributed():
        return [value]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Collective when distributed: ``tensor`` summed (``op="sum"``) or maxed (``"max"``: any rank's flag) in place."""
    if distributed():
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(tensor, op=ops[op])
    return tensor


def gather_to_main(value) -> list | None:
    """Collective when distributed: every rank's ``value`` in rank order on rank 0; None on the other ranks."""
    if not distributed():
        return [value]
    dist = torch.distributed
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


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
        if str(ds["fp16"].get("auto_cast", False)).lower() == "true":
            raise ConfigError(
                "the DeepSpeed config sets fp16.auto_cast true, which casts landmarks and pose to fp16 before the model "
                "normalises them (pixels above 2048 lose whole pixels, above 65504 become inf); set it false: "
                "dist-train casts the embedding itself"
            )
        ds["fp16"]["auto_cast"] = False
    zero = ds.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        # lets the best model be gathered (a collective) for the consolidated file
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    ds.setdefault("steps_per_print", 10**9)  # dist-train does its own logging
    return ds, precision


def trackers(cfg: Config, extra: tuple = ()) -> list:
    """``log_with`` for Accelerate: the configured trackers (refused when not installed) plus ``extra`` instances."""
    from accelerate.tracking import get_available_trackers

    names = [n.strip() for n in cfg.log.log_with.split(",") if n.strip()]
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        raise ConfigError(
            f"log_with: {missing} not installed here (installed: {sorted(available)}); `pip install "
            f"{' '.join(m.replace('_', '-') for m in missing)}` or drop them from --log_with"
        )
    return names + list(extra)


def launched_world_size() -> int:
    """The number of processes the launcher started (accelerate launch, torchrun), known before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(cfg: Config, extra_trackers: tuple = ()) -> Runtime:
    """Create the Accelerator; call once per process, before any data or model work.

    ``extra_trackers``: `accelerate.tracking.GeneralTracker` instances that receive what the run logs.
    """
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, TorchDynamoPlugin

    on_gpu = torch.cuda.is_available()
    world = launched_world_size()
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
    dynamo = None
    if cfg.train.compile:  # Accelerate compiles in prepare(): torch.compile, or DeepSpeed's engine.compile
        dynamo = TorchDynamoPlugin(backend="inductor", mode=cfg.train.compile_mode)
    acc = Accelerator(
        log_with=trackers(cfg, extra_trackers),
        project_dir=cfg.train.output_dir,
        dynamo_plugin=dynamo,
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
