"""Writing a checkpoint: atomically, and failing on every rank together.

A checkpoint is written under ``*.tmp``, marked ``COMPLETE`` and renamed after every rank has written its
part; only complete checkpoints are resumed from. A failed write removes the ``*.tmp`` and raises
`CheckpointWriteError` on every rank (one line: where, free space, bytes needed, what to resume from):
after each phase the ranks agree (`agree`) whether any of them failed, and DeepSpeed's own save is guarded
so that a rank whose write raised still runs the collectives the others wait in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from dist_train.checkpoint.best import keep_best
from dist_train.checkpoint.lineage import checkpoint_step, lineage_checkpoints, step_dir_name
from dist_train.checkpoint.state import COMPLETE, TMP_SUFFIX, TrainState, write_state
from dist_train.config import Config
from dist_train.rundir import RunDir
from dist_train.runtime import all_gather, broadcast, distributed


class CheckpointWriteError(RuntimeError):
    """A checkpoint (or the best model) could not be written; raised on every rank with the same one-line message.

    The partial ``*.tmp`` is gone by then; the message names the directory, its free space, the bytes a
    checkpoint needs and the last complete checkpoint to resume from.
    """


def write_checkpoint(accelerator, run_config: Config, run_dir: str | Path, state: TrainState) -> Path:
    """Collective: ``accelerator.save_state`` + trainer state + config + the best model it records
    (`best.keep_best`) + COMPLETE under ``*.tmp``, then rename.

    Every rank must call it at the same step; rank 0 does the directory work. A failure on any rank raises
    CheckpointWriteError on every rank, the ``*.tmp`` removed.
    """
    main = bool(accelerator.is_main_process)
    root = RunDir(run_dir).checkpoints
    final = root / step_dir_name(state.step)
    tmp = root / (final.name + TMP_SUFFIX)
    what = f"checkpoint {final.name}"

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)

    agree(_try(prepare) if main else None, what, tmp, state, run_dir, main)
    error = None
    try:
        with deepspeed_write_guard(accelerator) as guard:
            accelerator.save_state(str(tmp))
        error = guard.error
    except Exception as e:
        error = e
    agree(error, what, tmp, state, run_dir, main)

    def finish():
        write_state(tmp, state)
        run_config.save(tmp)
        keep_best(run_dir, tmp, state)
        (tmp / COMPLETE).write_text(f"{state.step}\n")
        if final.exists():  # a same-step checkpoint of an earlier process
            shutil.rmtree(final)
        os.replace(tmp, final)

    agree(_try(finish) if main else None, what, tmp, state, run_dir, main)
    return final


def _try(fn) -> Exception | None:
    try:
        fn()
    except Exception as e:
        return e
    return None


def agree(
    error: Exception | None,
    what: str,
    partial: Path,
    state: TrainState,
    run_dir: str | Path,
    main: bool,
    needed: int | None = None,
) -> None:
    """Collective: every rank learns whether any rank failed; then all raise the same CheckpointWriteError."""
    local = None if error is None else cause(error)
    failed = [(rank, c) for rank, c in enumerate(all_gather(local)) if c is not None]
    if not failed:
        return
    message = None
    if main:
        message = _failure_message(what, partial, failed, Path(run_dir), state, needed)
    raise CheckpointWriteError(broadcast(message)) from error


def _failure_message(
    what: str, partial: Path, failed: list, run_dir: Path, state: TrainState, needed_bytes: int | None
) -> str:
    written = _tree_bytes(partial) if partial.exists() else 0
    if partial.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
    elif partial.exists():
        partial.unlink(missing_ok=True)
    lineage = [p for p in lineage_checkpoints(run_dir, state.run_id) if p.name != partial.name]
    last = lineage[-1] if lineage else None
    if needed_bytes is not None:
        needed = f"it needs about {_human(needed_bytes)}"
    elif last is not None:
        needed = f"a checkpoint needs about {_human(_tree_bytes(last))} (the size of {last.name})"
    else:
        needed = f"a checkpoint needs more than the {_human(written)} written before the failure"
    free = _free_bytes(partial.parent)
    causes = "; ".join(f"rank {r}: {c}" for r, c in failed[:4]) + ("; ..." if len(failed) > 4 else "")
    resume = (
        f"the last complete checkpoint is {last} (step {checkpoint_step(last)}): free space, then rerun with "
        f"--resume latest"
        if last is not None
        else "there is no complete checkpoint of this run to resume from: free space and start again"
    )
    return (
        f"{what} could not be written to {partial.parent} ({causes}); "
        f"{_human(free) if free is not None else 'unknown space'} free there, {needed}; "
        f"removed the partial {partial.name}; {resume}"
    )


@contextlib.contextmanager
def deepspeed_write_guard(accelerator):
    """Keep a failed DeepSpeed file write from leaving other ranks in DeepSpeed's internal barrier.

    ``engine.save_checkpoint`` writes between collectives (tag check, final barrier): a rank whose write
    raised would skip the final barrier the others wait in. Its file writes are caught and recorded
    instead, so every rank runs its collectives; should anything else escape (the rank-0 'latest' file),
    the failed rank makes up the one barrier it skipped. The error is reported after ``save_state``.
    """

    class Guard:
        error: Exception | None = None

    guard = Guard()
    engines = [m for m in getattr(accelerator, "_models", []) if hasattr(m, "checkpoint_engine")]
    patched = []

    def record(fn):
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                guard.error = guard.error or e
                return None

        return wrapped

    def guarded_save_checkpoint(fn):
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                guard.error = guard.error or e
                if distributed():
                    torch.distributed.barrier()  # the final barrier of save_checkpoint, which this rank skipped
                return False

        return wrapped

    try:
        for engine in engines:
            ce = engine.checkpoint_engine
            for obj, name, wrap in (
                (ce, "save", record),
                (engine, "_copy_recovery_script", record),
                (engine, "save_checkpoint", guarded_save_checkpoint),
            ):
                original = getattr(obj, name)
                patched.append((obj, name))
                setattr(obj, name, wrap(original))
        yield guard
    finally:
        for obj, name in patched:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)


# ---- sizes and messages ------------------------------------------------------------------------------------


def cause(e: BaseException) -> str:
    """An exception in one short line (type and first line of its message), as one rank tells the others."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
    return text if len(text) <= 200 else text[:197] + "..."


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            if p.exists():
                return shutil.disk_usage(p).free
    return None
