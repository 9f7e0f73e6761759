"""Checkpoints: when to save, how to save atomically, what to keep, how to resume and consolidate.

Layout under the run directory::

    checkpoints/step-00000120/    accelerator.save_state (DeepSpeed: sharded engine state) +
                                  trainer_state.json + config.yaml + COMPLETE
    best/model.safetensors        consolidated fp32 weights of the best model (config in metadata)

A checkpoint is written under ``*.tmp`` and renamed after every rank has
finished, then marked ``COMPLETE``; only complete checkpoints are resumed
from. Loading never runs code from a checkpoint: pickled files are scanned
for the globals they would import and refused unless every one is a known
data type (`assert_data_only`); the consolidated file is safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_train.config import CheckpointConfig, Config, config_from_dict

CKPT_DIR = "checkpoints"
BEST_DIR = "best"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
CONSOLIDATED = "model.safetensors"

# Globals that pickled checkpoint files (DeepSpeed engine/optimizer states,
# Accelerate's RNG states) reference beyond torch's own weights-only allowlist:
# numpy array reconstruction and DeepSpeed's plain records. Anything else is
# refused rather than unpickled (`get_unsafe_globals_in_checkpoint` lists them
# without executing anything).
SAFE_GLOBALS = frozenset(
    {
        "numpy.dtype",
        "numpy.ndarray",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray.scalar",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)
SAFE_GLOBAL_PREFIXES = ("numpy.dtypes.",)  # numpy's dtype classes (numpy.dtypes.Float32DType, ...)


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resumed run needs (JSON, rank 0 writes it)."""

    step: int = 0  # optimizer steps taken, fp16-skipped ones included
    samples_seen: int = 0
    skipped_steps: int = 0  # fp16 overflow: the optimizer did not apply the update
    nonfinite_steps: int = 0  # non-finite loss: the step was skipped on every rank
    consecutive_nonfinite: int = 0
    bad_rows: int = 0  # samples the loader skipped (non-finite values, unreadable blocks), over all resumes
    best_cos: float = -math.inf
    best_step: int = -1
    evals_since_best: int = 0
    last_eval_step: int = -1

    @property
    def applied_steps(self) -> int:
        """Updates actually applied; the learning rate is a function of this."""
        return self.step - self.skipped_steps


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def assert_data_only(path: str | Path) -> None:
    """Refuse a checkpoint directory whose pickled files would import anything but data types."""
    for f in sorted(Path(path).rglob("*")):
        if not f.is_file() or f.suffix not in (".pt", ".pkl", ".bin", ".pth"):
            continue
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:
            raise ValueError(f"checkpoint file {f} cannot be read as a torch archive ({e}); not loading it") from e
        bad = [n for n in names if n not in SAFE_GLOBALS and not n.startswith(SAFE_GLOBAL_PREFIXES)]
        if bad:
            raise ValueError(f"checkpoint file {f} references code objects {bad}; refusing to load it")


class Checkpointer:
    """Owns the checkpoint policy: the loop calls `maybe_save` and never decides intervals itself."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path, accelerator, run_config: Config):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CKPT_DIR
        self.acc = accelerator
        self.run_config = run_config
        self.last_saved_step = -1

    def due(self, step: int, epoch_end: bool) -> bool:
        every = self.cfg.save_every_steps
        return epoch_end or (every > 0 and step % every == 0)

    def maybe_save(self, state: TrainState, *, epoch_end: bool = False, force: bool = False) -> Path | None:
        if state.step == self.last_saved_step or not (force or self.due(state.step, epoch_end)):
            return None
        return self.save(state)

    def save(self, state: TrainState) -> Path:
        """Collective: every rank must call it at the same step."""
        final = self.root / step_dir_name(state.step)
        tmp = self.root / (final.name + ".tmp")
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2))
            self.run_config.save(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (final / COMPLETE).write_text(f"{state.step}\n")
            self._prune(keep={state.best_step})
        self.acc.wait_for_everyone()
        self.last_saved_step = state.step
        return final

    def _prune(self, keep: set[int]) -> None:
        done = complete_checkpoints(self.run_dir)
        for p in done[: max(0, len(done) - self.cfg.keep_last)]:
            if int(p.name.split("-")[1]) not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def find(self, resume: str) -> Path | None:
        """``latest`` -> newest complete checkpoint (None if there is none); else the given path."""
        if resume == "latest":
            done = complete_checkpoints(self.run_dir)
            return done[-1] if done else None
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise ValueError(f"resume: {resume!r} is not a complete dist-train checkpoint (no {COMPLETE} marker)")
        return path

    def load(self, path: Path) -> TrainState:
        """Restore model, optimizer, loss scaler and RNG (collective), then the trainer state."""
        assert_data_only(path)
        self.acc.load_state(str(path))
        raw = json.loads((path / STATE_FILE).read_text())
        state = TrainState(**raw)
        self.last_saved_step = state.step
        return state

    def save_best(self, model, state: TrainState, metrics: dict) -> Path | None:
        """Consolidated fp32 weights + config of the best model so far (collective under ZeRO-3)."""
        sd = self.acc.get_state_dict(model)
        if not self.acc.is_main_process:
            return None
        meta = {"step": state.step, "val_mean_cos": metrics.get("mean_cos")}
        return save_consolidated(self.run_dir / BEST_DIR / CONSOLIDATED, sd, self.run_config, meta)


def save_consolidated(path: str | Path, state_dict: dict, cfg: Config, meta: dict | None = None) -> Path:
    """fp32 safetensors with the run config in its metadata: loads with plain PyTorch, no DeepSpeed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    metadata = {"config": json.dumps(cfg.to_dict()), "meta": json.dumps(meta or {})}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_consolidated(path: str | Path) -> tuple[dict, Config, dict]:
    """(state_dict, config, meta) of a consolidated file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    if "config" not in md:
        raise ValueError(f"{path} has no dist-train config in its metadata; is it a dist-train consolidated file?")
    return load_file(str(path)), config_from_dict(json.loads(md["config"])), json.loads(md.get("meta", "{}"))


def consolidate_checkpoint(path: str | Path) -> tuple[dict, Config]:
    """fp32 state dict + config from any checkpoint: DeepSpeed ZeRO 1/2/3, DDP/single, or consolidated file.

    Runs offline in one process (no launcher, no process group).
    """
    path = Path(path)
    if path.is_file():
        sd, cfg, _ = load_consolidated(path)
        return sd, cfg
    if not (path / COMPLETE).is_file():
        raise ValueError(f"{path} is neither a consolidated .safetensors file nor a complete dist-train checkpoint")
    from dist_train.config import load_run_config

    cfg = load_run_config(path)
    assert_data_only(path)
    if (path / "pytorch_model" / "latest").is_file() or (path / "latest").is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
        return {k: v.float() for k, v in sd.items()}, cfg
    st = path / CONSOLIDATED
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st)), cfg
    bin_ = path / "pytorch_model.bin"
    if bin_.is_file():
        return torch.load(bin_, map_location="cpu", weights_only=True), cfg
    raise ValueError(f"{path} holds no model weights that dist-train knows how to read")
