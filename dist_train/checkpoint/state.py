"""The trainer state: what a resumed run needs besides model and optimizer, as trainer_state.json.

Plain JSON that rank 0 writes into every checkpoint, so that a checkpoint's step, lineage and counters
can be read (`read_state`) without unpickling anything and without a process group.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from dist_train.config import ConfigError
from dist_train.data.stream import LoaderStats

COMPLETE = "COMPLETE"  # the marker written last: only a checkpoint holding it is resumed from
STATE_FILE = "trainer_state.json"
TMP_SUFFIX = ".tmp"  # what a write goes to before it is renamed


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resumed run needs (JSON, rank 0 writes it)."""

    step: int = 0  # optimizer steps taken, fp16-skipped ones included
    samples_seen: int = 0
    skipped_steps: int = 0  # fp16 overflow: the optimizer did not apply the update
    nonfinite_steps: int = 0  # non-finite loss: the step was skipped on every rank
    consecutive_nonfinite: int = 0
    bad_rows: int = 0  # samples the loader skipped (non-finite values, unreadable blocks), over all resumes
    best_cos: float = -math.inf  # val mean cos of the best model
    best_value: float | None = None  # the monitored metric (--monitor) of the best model; None: no best yet
    best_step: int = -1
    evals_since_best: int = 0
    last_eval_step: int = -1
    # lineage: a fresh start draws a new run_id; a resume keeps the one of the checkpoint it continues
    run_id: str = ""
    resumed_from: int = -1  # step of the checkpoint this process started from (-1: fresh start)
    # what the checkpoint was trained with; a resume compares them with the current run (train.check_resume)
    world_size: int = 0
    micro_batch: int = 0
    accumulation: int = 0
    num_workers: int = -1  # loader workers per rank (-1: not recorded)
    data_fingerprint: str = ""
    # exact epochs, a checkpoint inside an epoch: the layouts (stream.Layout) that read it so far, so that a resume
    # under another geometry reads none of their rows again
    epoch_layouts: list = dataclasses.field(default_factory=list)
    relaid_epochs: int = 0  # resumes that continued an exact epoch under another layout (no row of it read twice)
    # position in the plan's epochs minus step (the lr's position: applied steps + it); 0 unless a resume changed
    # the global batch (train.check_resume)
    schedule_offset: int = 0
    loader: dict = dataclasses.field(default_factory=dict)  # cumulative loader counters (stream.LoaderStats)

    @property
    def applied_steps(self) -> int:
        """Updates actually applied (not skipped for overflow or a non-finite loss); the lr follows these."""
        return self.step - self.skipped_steps - self.nonfinite_steps


def write_state(path: str | Path, state: TrainState) -> None:
    """Write ``state`` as trainer_state.json into the checkpoint directory ``path`` (rank 0)."""
    (Path(path) / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2))


def read_state(path: str | Path) -> TrainState:
    """The trainer state of a complete checkpoint (JSON only: nothing is unpickled, no collective)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"{path} is not a complete dist-train checkpoint (no {COMPLETE} marker)")
    file = path / STATE_FILE
    fix = (
        f"resume from another checkpoint (--resume DIR), or start a new run from this one's weights "
        f"(--init_from {path})"
    )
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{file}: cannot be read as JSON ({e}); {fix}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: holds a {type(raw).__name__}, not the trainer state's mapping; {fix}")
    hints = typing.get_type_hints(TrainState)
    for key, value in raw.items():  # fields it does not know are left out: a state of an older version loads
        if key in hints and not _fits(key, hints[key], value):
            raise ConfigError(f"{file}: {key} is {value!r}, not {_kind(key, hints[key])}; {fix}")
    return TrainState(**{k: v for k, v in raw.items() if k in hints})


def _kind(key: str, tp) -> str:
    if key == "step":
        return "a count (an integer >= 0)"
    if key == "loader":
        return f"a mapping of loader counters {[f.name for f in dataclasses.fields(LoaderStats)]} to integers"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _kind(key, a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(tp, str(tp))


def _fits(key: str, tp, value) -> bool:
    """Whether a JSON value can be the field's: the file is read back by a process that computes with it."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return value is None or any(_fits(key, a, value) for a in typing.get_args(tp) if a is not type(None))
    if isinstance(value, bool):
        return tp is bool
    if tp is int:
        return isinstance(value, int) and (key != "step" or value >= 0)
    if tp is float:
        return isinstance(value, (int, float))
    if key == "loader":
        counters = {f.name for f in dataclasses.fields(LoaderStats)}
        return isinstance(value, dict) and all(k in counters and _fits(k, int, v) for k, v in value.items())
    return isinstance(value, typing.get_origin(tp) or tp)
