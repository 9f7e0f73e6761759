"""Loading never runs code from a checkpoint: what is checked before anything in one is unpickled.

A checkpoint holding symlinks, special files or paths resolving outside it is refused, then pickled files
are scanned for the globals they would import and refused unless every one is a known data type
(`assert_loadable`); the consolidated file is safetensors and needs neither check. Whatever the source, the
model its stored config describes must be the one its tensors make, within a sane size, before a model is
built (`assert_fits`): a config is read from the file, so it cannot make a process allocate what the file
does not hold.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import torch

from dist_train.config import ConfigError, ModelConfig
from dist_train.model import state_shapes

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
PICKLE_SUFFIXES = (".pt", ".pkl", ".bin", ".pth")  # what Accelerate and DeepSpeed torch.load from a checkpoint


class UnsafeCheckpointError(ConfigError):
    """A checkpoint that could run code or read outside itself when loaded; nothing was unpickled."""


def assert_contained(path: str | Path) -> None:
    """Refuse a checkpoint directory holding symlinks, special files or paths that resolve outside it.

    The directory itself may be reached through a symlink; nothing inside it may be one. Checked before
    anything is read, so the pickle scan (`assert_data_only`) sees every file that will be loaded.
    """
    root = Path(path)
    real = root.resolve()
    if not real.is_dir():
        raise UnsafeCheckpointError(f"checkpoint {root} is not a directory")

    def refuse(p: str, why: str):
        raise UnsafeCheckpointError(
            f"checkpoint {root} holds {why} ({p}); refusing to load it: a checkpoint must be plain files "
            "and directories inside it"
        )

    for dirpath, dirnames, filenames in os.walk(real, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                refuse(p, f"a symlink to {os.readlink(p)!r}")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                refuse(p, "a special file")
            if not Path(p).resolve().is_relative_to(real):
                refuse(p, "a path resolving outside it")


def assert_data_only(path: str | Path) -> None:
    """Refuse a checkpoint directory whose pickled files would import anything but data types."""
    for f in sorted(Path(path).rglob("*")):
        if not f.is_file() or f.suffix not in PICKLE_SUFFIXES:
            continue
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:
            raise UnsafeCheckpointError(
                f"checkpoint file {f} cannot be read as a torch archive ({e}); not loading it"
            ) from e
        bad = [n for n in names if n not in SAFE_GLOBALS and not n.startswith(SAFE_GLOBAL_PREFIXES)]
        if bad:
            raise UnsafeCheckpointError(f"checkpoint file {f} references code objects {bad}; refusing to load it")


def assert_loadable(path: str | Path) -> None:
    """Everything checked before a checkpoint is unpickled: containment first, then the pickle scan."""
    assert_contained(path)
    assert_data_only(path)


MAX_PARAMS = 2**31  # 8 GiB of fp32 weights: far above every preset (xl: tens of millions), far below a hostile ask


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def assert_fits(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str | Path) -> None:
    """Refuse a stored model config that is not the model of the stored tensors (``shapes``: name -> shape).

    Nothing is allocated: the config's model is built on the meta device, after a bound that keeps even
    that cheap (no layer without tensors in the file).
    """
    held = sum(math.prod(s) for s in shapes.values())
    what = (
        f"its config describes a model of d_model {cfg.d_model}, {cfg.num_layers} layers, feed-forward "
        f"{cfg.dim_feedforward}"
    )
    fix = (
        "refusing to build it: the config stored with these weights is not theirs; use a file written by "
        "dist-train (best/model.safetensors, `dist-train export`) or the checkpoint directory it came from"
    )
    if cfg.num_layers > len(shapes):
        raise ConfigError(f"{source}: {what}, but the file holds {len(shapes)} tensors in all; {fix}")
    expected = state_shapes(cfg)
    wanted = sum(math.prod(s) for s in expected.values())
    if wanted > MAX_PARAMS:
        raise ConfigError(
            f"{source}: {what}: {_millions(wanted)} parameters, over the bound of {_millions(MAX_PARAMS)} "
            f"(the file holds {_millions(held)}); {fix}"
        )
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    differ = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    problems = [
        f"{label}: {names[:4]}{' ...' if len(names) > 4 else ''}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("different shape", differ))
        if names
    ]
    if problems:
        raise ConfigError(
            f"{source}: {what} ({_millions(wanted)} parameters), but the file holds {_millions(held)} in tensors "
            f"that do not match ({'; '.join(problems)}); {fix}"
        )
