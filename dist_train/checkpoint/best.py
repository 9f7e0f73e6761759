"""The best model on disk is the one the trainer state names.

A checkpoint records ``best_step``. `Checkpointer.save` first waits for the pending best write, then
`keep_best` puts that file into the checkpoint as ``best.safetensors`` (a hard link: no bytes are copied
while best/ is unchanged; a copy where links are not supported). A resumed run calls `restore_best`:
best/ is left alone when it holds the best the loaded state records; otherwise the best model written
after the checkpoint (by the interrupted process) moves to abandoned/ and best/ is restored from the
checkpoint's copy. A checkpoint without a copy cannot restore it, and the run says so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dist_train.checkpoint.consolidated import load_consolidated_meta
from dist_train.checkpoint.lineage import aside_dir
from dist_train.checkpoint.state import TMP_SUFFIX, TrainState
from dist_train.rundir import BEST, CONSOLIDATED, RunDir

BEST_COPY = "best.safetensors"  # in each checkpoint: the best model it records


def _identity(path: Path) -> tuple[int, str] | None:
    """(step, run_id) in a best model's metadata; None when the file is missing or unreadable."""
    try:
        meta = load_consolidated_meta(path)
        return int(meta["step"]), str(meta.get("run_id", ""))
    except Exception:
        return None


def _recorded(state: TrainState) -> tuple[int, str] | None:
    return (state.best_step, state.run_id) if state.best_step >= 0 else None


def _link(src: Path, dest: Path) -> None:
    """``dest`` holds ``src``'s bytes: a hard link, or a copy where the file system has none; atomic."""
    tmp = dest.with_suffix(TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def keep_best(run_dir: str | Path, checkpoint: Path, state: TrainState) -> None:
    """Rank 0, while the checkpoint is written: add the best model it records, when best/ holds that one."""
    best = RunDir(run_dir).best_model
    if _recorded(state) is not None and _identity(best) == _recorded(state):
        _link(best, checkpoint / BEST_COPY)


def restore_best(run_dir: str | Path, checkpoint: Path, state: TrainState) -> str | None:
    """Rank 0, on resume: make best/ hold the best model ``state`` records; what was done, None if nothing."""
    dirs = RunDir(run_dir)
    best, copy, want = dirs.best_model, checkpoint / BEST_COPY, _recorded(state)
    best.with_suffix(TMP_SUFFIX).unlink(missing_ok=True)  # a write the interrupted process left unfinished
    held = _identity(best)
    if held == want and (want is not None or not best.exists()):
        return None
    if want is not None and _identity(copy) != want:
        return (
            f"warning: checkpoint {checkpoint} records the best model at step {state.best_step} but holds no copy "
            f"of it, and {best} holds {_describe(best, held)}: left as it is; it is replaced when the run finds a "
            "better model"
        )
    said = [
        f"best model: checkpoint {checkpoint} records "
        + ("none yet" if want is None else f"the one of step {state.best_step}")
        + f", but {best} held {_describe(best, held)}"
    ]
    if best.exists():
        dest = aside_dir(dirs, state.step) / BEST
        dest.mkdir(parents=True)
        os.replace(best, dest / CONSOLIDATED)
        said.append(f"moved that to {dest}")
    if want is not None:
        best.parent.mkdir(parents=True, exist_ok=True)
        _link(copy, best)
        said.append(f"restored step {state.best_step}'s from {copy}")
    return "; ".join(said)


def _describe(path: Path, held: tuple[int, str] | None) -> str:
    if not path.exists():
        return "nothing"
    if held is None:
        return "an unreadable file"
    return f"step {held[0]} of run {held[1] or '(no id)'}"
