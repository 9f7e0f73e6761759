"""Lineage: which checkpoints of a run directory belong to which run, and where a run starts.

A fresh start draws a run id (`new_run_id`), stored in every checkpoint's trainer_state.json; a resume
keeps the id of the checkpoint it continues. Pruning deletes only checkpoints of the run's own id (never
the best step), ``--resume latest`` picks within one lineage, an explicit resume from an older step moves
the newer checkpoints of the abandoned branch aside, and a fresh start into a directory that holds
checkpoints is refused unless ``--overwrite`` (`decide_start`), and a directory that another tool wrote is
refused outright (`check_output_dir`, `is_run_dir`). Everything here is file system work that rank 0 does
alone; `Checkpointer` tells the other ranks the outcome.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from dist_train import rundir
from dist_train.checkpoint.consolidated import load_consolidated_meta
from dist_train.checkpoint.state import COMPLETE, STATE_FILE, TrainState, read_state
from dist_train.config import SECTION_TYPES, ConfigError
from dist_train.rundir import RunDir

_STEP_RE = re.compile(r"^step-(\d+)(\.tmp)?$")


def new_run_id() -> str:
    """A fresh lineage id (time + random); rank 0 draws it and broadcasts it."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(4)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: str | Path) -> int:
    """The step in a ``step-NNNNNNNN`` (or ``.tmp``) directory name."""
    m = _STEP_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not named like a dist-train checkpoint (step-NNNNNNNN)")
    return int(m[1])


def _step_dirs(run_dir: str | Path, tmp: bool) -> list[Path]:
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if not m or bool(m[2]) != tmp or p.is_symlink() or not p.is_dir():
            continue  # a symlinked checkpoint is never picked up (nor pruned through its link)
        if tmp or (p / COMPLETE).is_file():
            found.append(p)
    return sorted(found, key=checkpoint_step)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run directory (every lineage), oldest first."""
    return _step_dirs(run_dir, tmp=False)


def partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """``*.tmp`` checkpoint directories: writes that never completed."""
    return _step_dirs(run_dir, tmp=True)


def _run_id(path: Path) -> str:
    """run_id of a complete checkpoint; "" for checkpoints written before lineage existed."""
    try:
        return read_state(path).run_id
    except ConfigError:
        return ""


def lineage_checkpoints(run_dir: str | Path, run_id: str) -> list[Path]:
    """Complete checkpoints of one lineage in a run directory, oldest first."""
    return [p for p in complete_checkpoints(run_dir) if _run_id(p) == run_id]


def prune(run_dir: str | Path, state: TrainState, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints of this lineage up to ``state.step``, and the best step.

    Deletes only complete checkpoints whose trainer state has this run's id and an older step.
    """
    mine = [p for p in lineage_checkpoints(run_dir, state.run_id) if checkpoint_step(p) <= state.step]
    for p in mine[: max(0, len(mine) - keep_last)]:
        if checkpoint_step(p) not in (state.best_step, state.step):
            shutil.rmtree(p, ignore_errors=True)


# ---- where a run starts (rank 0) ---------------------------------------------------------------------------


# set by SLURM on a requeued job and by torchrun on an elastic restart of its workers
RESTART_ENV = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")


def job_restarts() -> int:
    """How often this job has been restarted (requeue or elastic restart); 0 on its first start."""
    counts = [os.environ.get(name, "") for name in RESTART_ENV]
    return max((int(c) for c in counts if c.strip().isdigit()), default=0)


def is_run_dir(run_dir: str | Path) -> bool:
    """Whether dist-train wrote this directory: its config.yaml is a dist-train config (the sections of
    `Config`), or checkpoints/ holds a step-NNNNNNNN checkpoint with a trainer_state.json."""
    dirs = RunDir(run_dir)
    root = dirs.checkpoints
    if root.is_dir() and not root.is_symlink():
        if any(_STEP_RE.match(p.name) and (p / STATE_FILE).is_file() for p in root.iterdir()):
            return True
    try:
        if not dirs.config.is_file() or dirs.config.stat().st_size > 1 << 20:
            return False
        doc = yaml.safe_load(dirs.config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and {"train", "checkpoint"} <= set(doc) <= set(SECTION_TYPES)


def check_output_dir(run_dir: str | Path) -> None:
    """Refuse (ConfigError) an output_dir that is not a directory, or a directory that no dist-train run wrote
    but that holds names a run writes (`rundir.WRITTEN`): the run would write into them, ``--overwrite``
    would delete them. Reads only: it runs before the lock file or anything else is created."""
    root = Path(run_dir)
    for p in (root, *root.parents):
        if p.is_dir():
            break
        if p.exists() or p.is_symlink():
            what = "is a file" if p.is_file() else "is not a directory"
            raise ConfigError(
                f"output_dir {root}{' ' if p == root else f': {p} '}{what}; pass a directory "
                f"path to --output_dir (it is created when missing)"
            )
    if not root.is_dir() or is_run_dir(root):
        return
    found = [name + ("/" if (root / name).is_dir() else "") for name in rundir.WRITTEN if os.path.lexists(root / name)]
    if found:
        raise ConfigError(
            f"output_dir {root} is not a dist-train run directory (no dist-train config.yaml, no checkpoint) but "
            f"holds {', '.join(found)}: a run would write into them and --overwrite would delete them; choose "
            f"another --output_dir (a new or empty directory, or one a dist-train run wrote)"
        )


def _say(msg: str) -> None:
    print(f"dist-train: {msg}", flush=True)


def decide_start(
    run_dir: str | Path, resume: str | None, overwrite: bool, check: Callable[[Path], None] = lambda p: None
) -> str | None:
    """The checkpoint to load, or None for a fresh start; run on rank 0 only (`Checkpointer.resolve_start`).

    ``check`` is given the checkpoint chosen before anything is moved or deleted for it; it raises ConfigError
    to refuse it.

    - ``resume`` None: a run directory holding any checkpoint (complete or ``*.tmp``) is refused with a
      ConfigError naming it, its newest step and the two ways on; with ``overwrite`` the previous run's
      outputs (`rundir.OUTPUTS`) are deleted (and listed) and the run starts fresh.
    - ``"latest"``: the newest complete checkpoint of the lineage in the run directory (the lineage of the
      most recently completed checkpoint, should several share the directory), or None (fresh start, said
      so). ``overwrite`` with it is refused: a requeued job would wipe its own progress on every restart.
    - a path: must be a complete checkpoint (else ConfigError). Newer checkpoints of its lineage in the run
      directory (those of an abandoned branch) move to ``abandoned/<step>-<time>/``, with best/, DONE,
      PREEMPTED and eval metrics of later steps, and it says where. A checkpoint of another lineage while
      the run directory holds checkpoints is refused unless ``overwrite`` (which deletes them). A restarted
      job (`job_restarts`) with the same path continues from its own newer checkpoints instead: its first
      start already rewound there, and rewinding again would move its progress aside on every restart.

    Stale ``*.tmp`` directories are deleted whenever the run continues.
    """
    dirs = RunDir(run_dir)
    done, partial = complete_checkpoints(dirs.root), partial_checkpoints(dirs.root)
    if resume is None:
        if (done or partial) and not overwrite:
            newest = max(done + partial, key=checkpoint_step)
            raise ConfigError(
                f"output_dir {dirs.root} already holds checkpoints of a run (newest: step "
                f"{checkpoint_step(newest)}, {newest}{'' if newest in done else ', incomplete'}); pass "
                f"--resume latest to continue that run, or --overwrite to delete its outputs and start over"
            )
        if overwrite:
            _clear_previous_run(dirs)
        return None
    if resume == "latest":
        if overwrite:
            raise ConfigError(
                "overwrite: --overwrite with --resume latest is refused: a restarted or requeued job would "
                "delete its own progress every time; resume with --resume latest, or start over with "
                f"--overwrite alone (or delete {dirs.root} / choose another --output_dir)"
            )
        _drop_partial(partial)
        if not done:
            _say(f"resume 'latest': no complete checkpoint in {dirs.root}, starting fresh")
            return None
        latest = _latest(dirs, done)
        check(latest)
        return str(latest)
    return str(_resume_from(dirs, Path(resume), done, partial, overwrite, check))


def _latest(dirs: RunDir, done: list[Path]) -> Path:
    ids = {p: _run_id(p) for p in done}
    if len(set(ids.values())) > 1:
        # several lineages in one directory (written before lineage existed, or copied in): continue the
        # one that wrote last
        last = max(done, key=lambda p: (p / COMPLETE).stat().st_mtime)
        others = sorted(p.name for p in done if ids[p] != ids[last])
        _say(
            f"resume 'latest': {dirs.checkpoints} holds checkpoints of several runs; continuing run "
            f"{ids[last] or '(no id)'}, whose checkpoint {last.name} was written last, and ignoring {others}"
        )
        done = [p for p in done if ids[p] == ids[last]]
    return done[-1]


def _resume_from(
    dirs: RunDir, path: Path, done: list[Path], partial: list[Path], overwrite: bool, check: Callable[[Path], None]
) -> Path:
    if not path.is_dir() or not (path / COMPLETE).is_file():
        raise ConfigError(
            f"resume: {str(path)!r} is not a complete dist-train checkpoint (no {COMPLETE} marker); give a "
            f"checkpoints/step-NNNNNNNN directory or 'latest'"
        )
    state = read_state(path)
    inside = path.resolve().parent == dirs.checkpoints.resolve()
    own = [p for p in done if _run_id(p) == state.run_id and checkpoint_step(p) > state.step]
    if inside and own and job_restarts():
        check(own[-1])
        _say(
            f"resume {path}: restart {job_restarts()} of this job, which already continued from it; continuing "
            f"from its newest checkpoint {own[-1]} instead of moving its progress aside"
        )
        _drop_partial(partial)
        return own[-1]
    check(path)
    if not inside:
        foreign = [p for p in done if _run_id(p) != state.run_id]
        if foreign:
            if not overwrite:
                raise ConfigError(
                    f"resume: {path} is a checkpoint of run {state.run_id or '(no id)'}, but output_dir "
                    f"{dirs.root} holds checkpoints of another run (newest: {foreign[-1].name}, run "
                    f"{_run_id(foreign[-1]) or '(no id)'}); pass --overwrite to delete that run's outputs, "
                    f"or choose another --output_dir"
                )
            _clear_previous_run(dirs, keep=path)
            return path
    _drop_partial(partial)
    newer = [p for p in done if checkpoint_step(p) > state.step and p.resolve() != path.resolve()]
    _abandon(dirs, state.step, newer)
    return path


def _drop_partial(partial: list[Path]) -> None:
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    if partial:
        _say(f"deleted {len(partial)} incomplete checkpoint write(s): {[p.name for p in partial]}")


def _clear_previous_run(dirs: RunDir, keep: Path | None = None) -> None:
    deleted = []
    for name in rundir.OUTPUTS:
        p = dirs.root / name
        if keep is not None and keep.resolve().is_relative_to(p.resolve()):
            _say(f"--overwrite: kept {p}, which holds the checkpoint resumed from")
            continue
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            continue
        deleted.append(name)
    if deleted:
        _say(f"--overwrite: deleted the previous run's {', '.join(deleted)} in {dirs.root}")


def _abandon(dirs: RunDir, step: int, newer: list[Path]) -> None:
    """Move what a branch wrote after ``step`` to abandoned/<step>-<time>/."""
    moves: list[tuple[Path, str]] = [(p, f"{rundir.CHECKPOINTS}/{p.name}") for p in newer]
    if not newer:
        return
    best = dirs.best_model
    if best.is_file():
        with contextlib.suppress(Exception):
            if int(load_consolidated_meta(best).get("step", -1)) > step:
                moves.append((dirs.best, rundir.BEST))
    for name in (rundir.DONE, rundir.PREEMPTED):
        if (dirs.root / name).is_file():
            moves.append((dirs.root / name, name))
    metrics = dirs.metrics
    if metrics.is_dir():
        for f in metrics.iterdir():
            eval_step = rundir.eval_metrics_step(f.name)
            if eval_step is not None and eval_step > step:
                moves.append((f, f"{rundir.METRICS}/{f.name}"))
    dest = aside_dir(dirs, step)
    for src, rel in moves:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)
    also = [rel for _, rel in moves[len(newer) :] if not rel.startswith(rundir.METRICS)]
    n_eval = sum(rel.startswith(rundir.METRICS) for _, rel in moves)
    extra = (f", {', '.join(also)}" if also else "") + (f" and {n_eval} eval metrics file(s)" if n_eval else "")
    _say(
        f"resume from step {step}: moved the abandoned branch's newer checkpoints "
        f"{[p.name for p in newer]}{extra} to {dest}"
    )


def aside_dir(dirs: RunDir, step: int) -> Path:
    """A new abandoned/<step>-<time>/ path (not yet created) for what a branch wrote after ``step``."""
    base = dirs.abandoned / f"{step:08d}-{time.strftime('%Y%m%dT%H%M%S')}"
    dest, n = base, 1
    while dest.exists():
        dest, n = base.with_name(f"{base.name}-{n}"), n + 1
    return dest
