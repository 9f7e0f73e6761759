"""Typed run configuration: YAML presets + command-line overrides, validated up front.

Each component owns a section (data, model, loss, optim, train, eval,
checkpoint, log). YAML files are nested by section and may name a ``base:``
preset to start from; every field is also a flat command-line flag
(``--d_model 768``), the spelling the design notes use. Anything invalid is
rejected before work starts with the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import math
import sys
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from dist_train.data.schema import EMB_DIM
from dist_train.rundir import RunDir

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


class ConfigError(ValueError):
    """Invalid configuration; the message names the key, the value and what is allowed."""


def _need(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def _check(section, keys: tuple[str, ...], rule, allowed: str) -> None:
    for key in keys:
        value = getattr(section, key)
        _need(rule(value), key, value, allowed)


def _positive_ints(section, *keys: str) -> None:
    _check(section, keys, lambda v: v > 0, "must be a positive integer")


def _positive_or_null(section, *keys: str) -> None:
    _check(section, keys, lambda v: v is None or v > 0, "must be a positive integer or null")


def _counts(section, *keys: str) -> None:  # 0 switches the feature off
    _check(section, keys, lambda v: v >= 0, "must be zero or a positive integer")


def _positive(section, *keys: str) -> None:
    _check(section, keys, lambda v: v > 0, "must be positive")


def _non_negative(section, *keys: str) -> None:
    _check(section, keys, lambda v: v >= 0, "must be zero or positive")


@dataclass
class DataConfig:
    data_dir: Optional[list[str]] = None  # shard set directories (each holds index.json); several are read together
    data_weights: Optional[list[float]] = None  # sampling weight of each data_dir (resampled mode); default: by rows
    train_split: str = "train"  # split trained on
    val_split: str = "val"  # split evaluated during training (best model, early stopping)
    test_split: str = "test"  # the best model is evaluated on it at the end when the shard set has it
    target: Literal["sample", "centroid"] = "sample"  # centroid needs tgt_centroid in the shard set
    resampled: bool = True  # true: each reader samples blocks on its own; false: exact epochs, every row once
    shuffle_blocks: int = 8  # blocks whose rows are shuffled together before batches are cut (per reader)
    num_workers: int = 1  # DataLoader worker processes per rank (0: read in the training process)
    samples_per_epoch: Optional[int] = None  # default: the train split's sample count from index.json

    def validate(self) -> None:
        _positive_or_null(self, "samples_per_epoch")
        _counts(self, "num_workers", "shuffle_blocks")
        if self.data_weights is not None:
            weights = self.data_weights
            n_sets = len(self.data_dir or [])
            one_each = self.data_dir is not None and len(weights) == n_sets
            _need(one_each, "data_weights", weights, f"give one weight per data_dir ({n_sets} shard sets)")
            _need(all(w > 0 for w in weights), "data_weights", weights, "every weight must be positive")
            _need(
                self.resampled,
                "data_weights",
                weights,
                "exact epochs (resampled: false) read every row once; sampling weights need resampled: true",
            )


@dataclass
class AugmentConfig:
    """Training-time augmentation (dist_train.augment); all off by default, never applied to evaluation."""

    pose_jitter_deg: float = 0.0  # std of a random head rotation (degrees): landmarks rotated, pose changed to match
    landmark_jitter_px: float = 0.0  # std of Gaussian pixel noise on each landmark coordinate
    emb_noise: float = 0.0  # std of noise added to src_emb (per dimension, then re-normalised onto the sphere)
    drop_part_prob: float = 0.0  # probability that a sample loses one landmark part (jaw, brows, nose, eyes, mouth)

    def validate(self) -> None:
        _check(
            self,
            ("pose_jitter_deg", "landmark_jitter_px", "emb_noise"),
            lambda v: v >= 0,
            "must be zero (off) or positive",
        )
        _need(0.0 <= self.drop_part_prob <= 1.0, "drop_part_prob", self.drop_part_prob, "must be in [0, 1]")


@dataclass
class ModelConfig:
    d_model: int = 512  # width of the Transformer (token size)
    nhead: int = 8  # attention heads (divides d_model)
    num_layers: int = 4  # Transformer encoder layers
    dim_feedforward: int = 2048  # width of the feed-forward layers
    dropout: float = 0.15  # dropout in the encoder layers
    emb_tokens: Literal["whole", "chunked"] = "whole"  # the source embedding as one token or as emb_chunks tokens
    emb_chunks: int = 16  # chunks of the embedding when emb_tokens is chunked (divides 512)
    landmark_tokens: Literal["one", "parts", "points"] = "parts"  # landmarks as one token, one per face part, or 68
    residual_mlp: bool = True  # residual head that also sees src_emb (see model.ResidualHead)
    gate: Literal["learned", "yaw", "none"] = "learned"  # how much correction per pose: learned, DREAM's yaw gate, 1

    def validate(self) -> None:
        _positive_ints(self, "d_model", "nhead", "num_layers", "dim_feedforward", "emb_chunks")
        _need(self.d_model % self.nhead == 0, "d_model", self.d_model, f"must be divisible by nhead ({self.nhead})")
        _need(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        chunks_fit = self.emb_tokens != "chunked" or EMB_DIM % self.emb_chunks == 0
        _need(chunks_fit, "emb_chunks", self.emb_chunks, f"must divide {EMB_DIM}")


@dataclass
class LossConfig:
    mse_weight: float = 0.2  # weight of the MSE term (about 1/256 of the cosine term's gradient at equal weight)
    cosine_weight: float = 0.8  # weight of the (1 - cos) term
    contrastive_weight: float = 0.0  # weight of the in-batch InfoNCE term (keeps identities apart); 0: off
    contrastive_temperature: float = 0.05  # temperature of the InfoNCE term

    def validate(self) -> None:
        _positive(self, "contrastive_temperature")
        weights = ("mse_weight", "cosine_weight", "contrastive_weight")
        _check(self, weights, lambda v: v >= 0, "loss weights must be zero or positive")
        _need(
            sum(getattr(self, w) for w in weights) > 0,
            "cosine_weight",
            self.cosine_weight,
            "mse_weight, cosine_weight and contrastive_weight are all zero: nothing would be trained",
        )


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 1e-4  # AdamW weight decay (not on biases, norms and embeddings)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0: no clipping
    scheduler_type: Literal["cosine", "cosine_restarts", "constant"] = "cosine"  # lr after the warmup
    warmup_epochs: float = 5.0  # linear warmup from warmup_lr to lr, in epochs (may be fractional)
    warmup_lr: float = 1e-6  # learning rate at the first step
    cosine_eta_min: float = 1e-6  # learning rate at the end of the cosine
    restart_period_epochs: float = 10.0  # cosine_restarts: length of the first period, in epochs
    restart_mult: float = 2.0  # cosine_restarts: each period this many times longer than the last

    def validate(self) -> None:
        _positive(self, "lr", "warmup_lr")
        _non_negative(self, "weight_decay", "cosine_eta_min", "grad_clip", "warmup_epochs")
        _need(self.cosine_eta_min <= self.lr, "cosine_eta_min", self.cosine_eta_min, f"must not exceed lr ({self.lr})")
        _need(self.restart_period_epochs > 0, "restart_period_epochs", self.restart_period_epochs, "must be positive")
        _need(self.restart_mult >= 1, "restart_mult", self.restart_mult, "must be >= 1")


@dataclass
class TrainConfig:
    batch_size: int = 32  # micro batch per process; global = batch_size * accumulation * processes
    gradient_accumulation_steps: int = 1  # micro batches per optimizer step (emulates a larger batch)
    epochs: int = 100  # epochs to train; an epoch is samples_per_epoch / global batch steps
    max_steps: Optional[int] = None  # optimizer steps; caps the run
    use_mixed_precision: bool = False  # fp16 on GPUs (fp32 on CPU, where DeepSpeed cannot run fp16)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: follow use_mixed_precision
    compile: bool = False  # torch.compile the model (inductor; DeepSpeed: its engine.compile)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    seed: int = 42  # seed of the data order, the initialisation and dropout
    output_dir: str = "runs/default"  # the run directory
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops

    def validate(self) -> None:
        _positive_ints(self, "batch_size", "gradient_accumulation_steps", "epochs", "max_bad_steps")
        _positive_or_null(self, "max_steps")


@dataclass
class EvalConfig:
    eval_every_steps: int = 0  # evaluate every N steps too (always at each epoch end)
    eval_max_samples: Optional[int] = None  # evaluate on at most this many val rows (null: all)
    monitor: Literal["mean_cos", "loss", "tar@0.001", "tar@0.01"] = "mean_cos"  # val metric for best model, early stop
    early_stopping_patience: int = 20  # evaluations without improvement; 0 disables
    early_stopping_min_delta: float = 1e-4  # the smallest change of the monitored metric that counts as better

    def validate(self) -> None:
        _counts(self, "eval_every_steps", "early_stopping_patience")
        _positive_or_null(self, "eval_max_samples")
        _non_negative(self, "early_stopping_min_delta")


@dataclass
class CheckpointConfig:
    save_every_minutes: float = 30.0  # by wall time; also at the end, on preemption and on a stop request; 0: off
    save_every_steps: int = 0  # every N optimizer steps too; 0: off
    save_every_epochs: int = 0  # at the end of every N-th epoch too; 0: off
    keep_last: int = 3  # complete checkpoints kept (the best model's step is never pruned)
    best_every_minutes: float = 2.0  # the best model is written in the background, at most this often
    resume: Optional[str] = None  # "latest" or a checkpoint directory
    overwrite: bool = False  # start fresh in an output_dir that holds another run's checkpoints (they are deleted)
    allow_data_change: bool = False  # resume onto a shard set other than the one the checkpoint was trained on
    init_from: Optional[str] = None  # weights of a checkpoint or exported file; fresh optimizer and schedule
    init_from_strict: bool = True  # refuse weights whose names or shapes differ (false: load what matches)
    stop_grace_seconds: float = 20.0  # after SIGTERM: a run not ended by then (blocked) exits 143 unsaved; 0: off

    def validate(self) -> None:
        _positive_ints(self, "keep_last")
        _counts(self, "save_every_steps", "save_every_epochs", "save_every_minutes", "best_every_minutes")
        _check(self, ("stop_grace_seconds",), lambda v: 0 <= v < float("inf"), "must be 0 (off) or finite seconds")


@dataclass
class LogConfig:
    log_every_steps: int = 10  # write training scalars (and read the device's counters) every N steps
    trace_rows: bool = False  # write each micro batch's row numbers to RUN_DIR/trace/ (what the run read)
    log_with: str = "tensorboard"  # Accelerate trackers, comma-separated: tensorboard (always) + wandb, mlflow, ...

    def validate(self) -> None:
        _positive_ints(self, "log_every_steps")
        trackers = [n.strip() for n in self.log_with.split(",") if n.strip()]
        _need(
            "tensorboard" in trackers and set(trackers) <= set(TRACKERS),
            "log_with",
            self.log_with,
            f"a comma-separated list from {list(TRACKERS)} including tensorboard (what `dist-train report` reads)",
        )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str = "base", **values) -> Config:
        """A preset (configs/NAME.yaml or a YAML path) with flat overrides, validated: ``from_preset("xl", lr=3e-4)``."""
        return build(load_yaml(name) | values)

    def save(self, run_dir: str | Path) -> Path:
        path = RunDir(run_dir).config
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


_HINTS = typing.get_type_hints(Config)
SECTION_TYPES: dict[str, type] = {f.name: _HINTS[f.name] for f in dataclasses.fields(Config)}
# flat flag name -> (section, field)
FLAT: dict[str, tuple[str, dataclasses.Field]] = {}
for _sec, _cls in SECTION_TYPES.items():
    for _f in dataclasses.fields(_cls):
        assert _f.name not in FLAT, f"field name {_f.name} is used by two sections"
        FLAT[_f.name] = (_sec, _f)
_FIELD_TYPES = {name: typing.get_type_hints(SECTION_TYPES[sec])[name] for name, (sec, _) in FLAT.items()}


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _describe(inner[0]) + " or null"
    if origin is list:
        return _describe(typing.get_args(tp)[0]) + " or several"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(key: str, value):
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    bad = ConfigError(f"{key}: {value!r} is not valid; expected {_describe(_FIELD_TYPES[key])}")
    return _convert(_FIELD_TYPES[key], value, bad)


def _convert(tp, value, bad: ConfigError):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, (list, tuple)) and len(value) == 1:  # `--data_dir null`: a list flag given one value
            value = value[0] if value[0] is None or str(value[0]).lower() in ("none", "null") else value
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:  # one value or a list of them (YAML list, or several values after one flag)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise bad
        return [_convert(typing.get_args(tp)[0], v, bad) for v in items]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:  # inf and nan are no setting: `--lr inf` would pass "positive" and train on nothing
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(number):
            raise bad
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


# settings that moved to the section of the component that decides them: accepted in their old section too,
# so configs and checkpoints written before the move still load
MOVED = {
    "monitor": "train",
    "early_stopping_patience": "train",
    "early_stopping_min_delta": "train",
    "resume": "train",
    "overwrite": "train",
    "allow_data_change": "train",
    "init_from": "train",
    "init_from_strict": "train",
}


def _in_section(key: str, section: str) -> bool:
    return key in FLAT and (FLAT[key][0] == section or MOVED.get(key) == section)


def _flatten_yaml(raw: dict, source: str) -> dict:
    """Nested {section: {key: value}} (or flat keys) -> flat {key: value}."""
    flat: dict = {}
    for k, v in raw.items():
        if k in SECTION_TYPES:
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: section {k!r} must be a mapping, got {v!r}")
            for kk, vv in v.items():
                if not _in_section(kk, k):
                    allowed = [f.name for f in dataclasses.fields(SECTION_TYPES[k])]
                    raise ConfigError(f"{source}: unknown key {k}.{kk}; allowed in {k}: {allowed}")
                flat[kk] = vv
        elif k in FLAT:
            flat[k] = v
        else:
            raise ConfigError(f"{source}: unknown key {k!r}; sections are {list(SECTION_TYPES)}")
    return flat


def resolve_preset(name: str | Path) -> Path:
    """A preset name (``base``) or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cand = CONFIG_DIR / f"{name}.yaml"
    if cand.is_file():
        return cand
    presets = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name)!r} not found: give a YAML file path or one of the presets {presets}")


def _read_yaml(path: Path) -> dict:
    """A YAML mapping, read with the safe loader: a tag such as ``!!python/object`` is refused, never run."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(
            f"{path}: not a plain YAML config ({problem}{at}); dist-train configs hold sections of plain values, "
            "no Python tags"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Flat values of a YAML config, following ``base:`` chains."""
    path = resolve_preset(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: base chain loops through {[str(s) for s in _seen]}")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    values = load_yaml(base if Path(str(base)).suffix else str(base), _seen + (path.resolve(),)) if base else {}
    values.update(_flatten_yaml(raw, str(path)))
    return values


def build(values: dict) -> Config:
    """Flat {key: value} -> validated Config."""
    cfg = Config()
    for key, value in values.items():
        if key not in FLAT:
            raise ConfigError(f"unknown key {key!r}; allowed keys: {sorted(FLAT)}")
        sec, _ = FLAT[key]
        setattr(getattr(cfg, sec), key, coerce(key, value))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Each section checks its own settings; then the rules that span sections. No I/O: the shard sets
    are checked when a run opens them (`plan.open_shard_sets`, and the job scripts' preflight)."""
    for section in SECTION_TYPES:
        getattr(cfg, section).validate()
    o, t = cfg.optim, cfg.train
    _need(o.warmup_epochs < t.epochs, "warmup_epochs", o.warmup_epochs, f"must be smaller than epochs ({t.epochs})")


def _field_docs() -> dict[str, str]:
    """Each setting's description: the comment after its field above (one place; `--help` shows it)."""
    source = inspect.getsource(sys.modules[__name__])
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    sections = {cls.__name__ for cls in SECTION_TYPES.values()}
    return {
        node.target.id: comments.get(node.lineno, "")
        for cls in ast.parse(source).body
        if isinstance(cls, ast.ClassDef) and cls.name in sections
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def require_data(cfg: Config) -> Config:
    """The config, or a ConfigError when it names no shard set (train and the job scripts' check)."""
    if cfg.data.data_dir is None:
        raise ConfigError("data_dir: not set; pass --data_dir DIR (a shard set) or set data.data_dir in the config")
    return cfg


def add_arguments(parser: argparse.ArgumentParser, preset: tuple[str, dict] | None = None) -> None:
    """``--config`` plus one flag per field, grouped by section, all defaulting to 'not given'.

    Each flag's help is its field's description, its type and default, and, with ``preset``
    (name, flat values), the preset's value where it sets one.
    """
    parser.add_argument(
        "--config",
        default=None,
        help="YAML preset name (configs/NAME.yaml) or path; flags override it. Default: base",
    )
    docs = _field_docs()
    name, values = preset or (None, {})
    for sec, cls in SECTION_TYPES.items():
        group = parser.add_argument_group(sec)
        for f in dataclasses.fields(cls):
            tp = _FIELD_TYPES[f.name]
            given = f"; {name}: {values[f.name]!r}" if f.name in values else ""
            kw: dict = {
                "default": argparse.SUPPRESS,
                "help": f"{docs.get(f.name) or f.name} [{_describe(tp)}; default {f.default!r}{given}]".replace(
                    "%", "%%"
                ),
            }
            if tp is bool:
                # `--use_mixed_precision` alone means true; `--use_mixed_precision false` also works.
                kw.update(nargs="?", const="true")
            if list in map(typing.get_origin, typing.get_args(tp)):  # --data_dir A B
                kw.update(nargs="+")
            group.add_argument(f"--{f.name}", dest=f.name, metavar=f.name.upper(), **kw)


def preset_for_help(argv: list[str]) -> tuple[str, dict] | None:
    """(name, values) of the ``--config`` in ``argv`` when it asks for ``--help``: the help shows them."""
    if not {"-h", "--help"} & set(argv):
        return None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="base")
    name = pre.parse_known_args(argv)[0].config
    try:
        return name, load_yaml(name)
    except ConfigError:
        return None


def from_args(args: argparse.Namespace) -> Config:
    """Preset (or ``base``) values, then the flags given on the command line."""
    values = load_yaml(args.config or "base")
    values.update({k: getattr(args, k) for k in FLAT if hasattr(args, k)})
    return build(values)


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run wrote into its directory (no data check)."""
    path = RunDir(run_dir).config
    return config_from_dict(_read_yaml(path), str(path))


def config_from_dict(raw: dict, source: str = "stored config") -> Config:
    """Nested dict (as stored in checkpoints and exported files) -> Config, without the data check.

    Such a dict comes from a file, so only the known sections and fields are accepted (a setting stored
    in the section it had before it moved still loads), each coerced to its type; anything else is
    refused naming ``source`` and the key: nothing in it reaches an attribute other than a field.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return build(_flatten_yaml(raw, source))
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None


def dumps(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
