"""Checkpoints: when to save, how to save atomically, what to keep, how to resume and consolidate.

Layout under the run directory::

    checkpoints/step-00000120/    accelerator.save_state (DeepSpeed: sharded engine state) +
                                  trainer_state.json + config.yaml + COMPLETE
    best/model.safetensors        fp32 master weights of the best model (config and step in metadata)
    abandoned/<step>-<time>/      checkpoints (and best/, DONE, eval metrics) of a branch left behind by an
                                  explicit resume from an older checkpoint

A checkpoint is written under ``*.tmp``, marked ``COMPLETE`` and renamed after
every rank has written its part; only complete checkpoints are resumed from.
A failed write removes the ``*.tmp`` and raises `CheckpointWriteError` on every
rank (one line: where, free space, bytes needed, what to resume from).

Lineage: a fresh start draws a run id (`new_run_id`), stored in every
checkpoint's trainer_state.json; a resume keeps the id of the checkpoint it
continues. Pruning deletes only checkpoints of the run's own id (never the best
step), ``--resume latest`` picks within one lineage, an explicit resume from an
older step moves the newer checkpoints of the abandoned branch aside, and a
fresh start into a directory that holds checkpoints is refused unless
``--overwrite`` (`Checkpointer.resolve_start`).

Loading never runs code from a checkpoint: a checkpoint holding symlinks,
special files or paths resolving outside it is refused, then pickled files are
scanned for the globals they would import and refused unless every one is a
known data type (`assert_loadable`); the consolidated file is safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_train import rundir
from dist_train.config import CheckpointConfig, Config, ConfigError, config_from_dict, load_run_config
from dist_train.rundir import CONSOLIDATED, RunDir
from dist_train.runtime import all_gather, broadcast, distributed
from dist_train.schedule import every

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
TMP_SUFFIX = ".tmp"
_STEP_RE = re.compile(r"^step-(\d+)(\.tmp)?$")

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


class CheckpointWriteError(RuntimeError):
    """A checkpoint (or the best model) could not be written; raised on every rank with the same one-line message.

    The partial ``*.tmp`` is gone by then; the message names the directory, its free space, the bytes a
    checkpoint needs and the last complete checkpoint to resume from.
    """


class UnsafeCheckpointError(ConfigError):
    """A checkpoint that could run code or read outside itself when loaded; nothing was unpickled."""


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
    data_fingerprint: str = ""
    # position in the plan's epochs minus step (the lr's position: applied steps + it); 0 unless a resume changed
    # the global batch (train.check_resume)
    schedule_offset: int = 0
    loader: dict = dataclasses.field(default_factory=dict)  # cumulative loader counters (stream.LoaderStats)

    @property
    def applied_steps(self) -> int:
        """Updates actually applied (not skipped for overflow or a non-finite loss); the lr follows these."""
        return self.step - self.skipped_steps - self.nonfinite_steps


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


def read_state(path: str | Path) -> TrainState:
    """The trainer state of a complete checkpoint (JSON only: nothing is unpickled, no collective)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"{path} is not a complete dist-train checkpoint (no {COMPLETE} marker)")
    try:
        raw = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read {STATE_FILE} ({e})") from e
    known = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in raw.items() if k in known})


def _run_id(path: Path) -> str:
    """run_id of a complete checkpoint; "" for checkpoints written before lineage existed."""
    try:
        return read_state(path).run_id
    except ConfigError:
        return ""


def lineage_checkpoints(run_dir: str | Path, run_id: str) -> list[Path]:
    """Complete checkpoints of one lineage in a run directory, oldest first."""
    return [p for p in complete_checkpoints(run_dir) if _run_id(p) == run_id]


# ---- loading safely ----------------------------------------------------------------------------------------


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


# ---- sizes and messages ------------------------------------------------------------------------------------


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


def _cause(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
    return text if len(text) <= 200 else text[:197] + "..."


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            if p.exists():
                return shutil.disk_usage(p).free
    return None


# ---- the checkpointer --------------------------------------------------------------------------------------


class Checkpointer:
    """Owns the checkpoint policy: the loop calls `maybe_save` and never decides intervals itself.

    Collective methods (`resolve_start`, `load`, `save`, `maybe_save`, `save_best`) must be called by every
    rank at the same point; rank 0 does the file system work and the others learn its outcome.
    """

    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path, accelerator, run_config: Config):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dirs = RunDir(self.run_dir)
        self.root = self.dirs.checkpoints
        self.acc = accelerator
        self.run_config = run_config
        self.last_saved_step = -1
        self.clock = time.monotonic
        self.last_save_time = self.clock()  # the clock of save_every_minutes starts with the run
        self._best = _BackgroundWriter(60 * cfg.best_every_minutes)

    # ---- rank 0 decides, everyone follows ----

    @property
    def _main(self) -> bool:
        return bool(self.acc.is_main_process)

    @property
    def _distributed(self) -> bool:
        return distributed()

    def _say(self, msg: str) -> None:
        if self._main:
            print(f"dist-train: {msg}", flush=True)

    def _on_main(self, fn):
        """Collective: run ``fn`` on rank 0 and return its result on every rank (ConfigError too)."""
        outcome = None
        if self._main:
            try:
                outcome = ("ok", fn())
            except ConfigError as e:
                outcome = ("config", str(e))
            except Exception as e:
                if not self._distributed:
                    raise
                outcome = ("fail", _cause(e))
                failure = e
        kind, value = broadcast(outcome)
        if kind == "config":
            raise ConfigError(value)
        if kind == "fail":
            if self._main:
                raise failure
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    # ---- where a run starts ----

    def resolve_start(self, resume: str | None, overwrite: bool) -> Path | None:
        """Collective: the checkpoint to load, or None for a fresh start. Rank 0 decides and acts, then broadcasts.

        - ``resume`` None: a run directory holding any checkpoint (complete or ``*.tmp``) is refused with a
          ConfigError naming it, its newest step and the two ways on; with ``overwrite`` the previous run's
          outputs (`rundir.OUTPUTS`) are deleted (and listed) and the run starts fresh.
        - ``"latest"``: the newest complete checkpoint of the lineage in the run directory (the lineage of the
          most recently completed checkpoint, should several share the directory), or None (fresh start, said
          so). ``overwrite`` with it is refused: a requeued job would wipe its own progress on every restart.
        - a path: must be a complete checkpoint (else ConfigError). Newer checkpoints of its lineage in the run
          directory (those of an abandoned branch) move to ``abandoned/<step>-<time>/``, with best/, DONE,
          PREEMPTED and eval metrics of later steps, and it says where. A checkpoint of another lineage while
          the run directory holds checkpoints is refused unless ``overwrite`` (which deletes them).

        Stale ``*.tmp`` directories are deleted whenever the run continues. The caller sets ``state.run_id``
        (`new_run_id`, broadcast) on a fresh start; a loaded state keeps its own.
        """
        found = self._on_main(lambda: self._decide(resume, overwrite))
        return Path(found) if found is not None else None

    def _decide(self, resume: str | None, overwrite: bool) -> str | None:
        done, partial = complete_checkpoints(self.run_dir), partial_checkpoints(self.run_dir)
        if resume is None:
            if (done or partial) and not overwrite:
                newest = max(done + partial, key=checkpoint_step)
                raise ConfigError(
                    f"output_dir {self.run_dir} already holds checkpoints of a run (newest: step "
                    f"{checkpoint_step(newest)}, {newest}{'' if newest in done else ', incomplete'}); pass "
                    f"--resume latest to continue that run, or --overwrite to delete its outputs and start over"
                )
            if overwrite:
                self._clear_previous_run()
            return None
        if resume == "latest":
            if overwrite:
                raise ConfigError(
                    "overwrite: --overwrite with --resume latest is refused: a restarted or requeued job would "
                    "delete its own progress every time; resume with --resume latest, or start over with "
                    f"--overwrite alone (or delete {self.run_dir} / choose another --output_dir)"
                )
            self._drop_partial(partial)
            if not done:
                self._say(f"resume 'latest': no complete checkpoint in {self.run_dir}, starting fresh")
                return None
            return str(self._latest(done))
        return str(self._resume_from(Path(resume), done, partial, overwrite))

    def _latest(self, done: list[Path]) -> Path:
        ids = {p: _run_id(p) for p in done}
        if len(set(ids.values())) > 1:
            # several lineages in one directory (written before lineage existed, or copied in): continue the
            # one that wrote last
            last = max(done, key=lambda p: (p / COMPLETE).stat().st_mtime)
            others = sorted(p.name for p in done if ids[p] != ids[last])
            self._say(
                f"resume 'latest': {self.root} holds checkpoints of several runs; continuing run "
                f"{ids[last] or '(no id)'}, whose checkpoint {last.name} was written last, and ignoring {others}"
            )
            done = [p for p in done if ids[p] == ids[last]]
        return done[-1]

    def _resume_from(self, path: Path, done: list[Path], partial: list[Path], overwrite: bool) -> Path:
        if not path.is_dir() or not (path / COMPLETE).is_file():
            raise ConfigError(
                f"resume: {str(path)!r} is not a complete dist-train checkpoint (no {COMPLETE} marker); give a "
                f"checkpoints/step-NNNNNNNN directory or 'latest'"
            )
        state = read_state(path)
        inside = path.resolve().parent == self.root.resolve()
        if not inside:
            foreign = [p for p in done if _run_id(p) != state.run_id]
            if foreign:
                if not overwrite:
                    raise ConfigError(
                        f"resume: {path} is a checkpoint of run {state.run_id or '(no id)'}, but output_dir "
                        f"{self.run_dir} holds checkpoints of another run (newest: {foreign[-1].name}, run "
                        f"{_run_id(foreign[-1]) or '(no id)'}); pass --overwrite to delete that run's outputs, "
                        f"or choose another --output_dir"
                    )
                self._clear_previous_run(keep=path)
                return path
        self._drop_partial(partial)
        newer = [p for p in done if checkpoint_step(p) > state.step and p.resolve() != path.resolve()]
        self._abandon(state.step, newer)
        return path

    def _drop_partial(self, partial: list[Path]) -> None:
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
        if partial:
            self._say(f"deleted {len(partial)} incomplete checkpoint write(s): {[p.name for p in partial]}")

    def _clear_previous_run(self, keep: Path | None = None) -> None:
        deleted = []
        for name in rundir.OUTPUTS:
            p = self.run_dir / name
            if keep is not None and keep.resolve().is_relative_to(p.resolve()):
                self._say(f"--overwrite: kept {p}, which holds the checkpoint resumed from")
                continue
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            else:
                continue
            deleted.append(name)
        if deleted:
            self._say(f"--overwrite: deleted the previous run's {', '.join(deleted)} in {self.run_dir}")

    def _abandon(self, step: int, newer: list[Path]) -> None:
        """Move what a branch wrote after ``step`` to abandoned/<step>-<time>/."""
        moves: list[tuple[Path, str]] = [(p, f"{rundir.CHECKPOINTS}/{p.name}") for p in newer]
        if not newer:
            return
        best = self.dirs.best_model
        if best.is_file():
            with contextlib.suppress(Exception):
                if int(load_consolidated_meta(best).get("step", -1)) > step:
                    moves.append((self.dirs.best, rundir.BEST))
        for name in (rundir.DONE, rundir.PREEMPTED):
            if (self.run_dir / name).is_file():
                moves.append((self.run_dir / name, name))
        metrics = self.dirs.metrics
        if metrics.is_dir():
            for f in metrics.iterdir():
                eval_step = rundir.eval_metrics_step(f.name)
                if eval_step is not None and eval_step > step:
                    moves.append((f, f"{rundir.METRICS}/{f.name}"))
        base = self.dirs.abandoned / f"{step:08d}-{time.strftime('%Y%m%dT%H%M%S')}"
        dest, n = base, 1
        while dest.exists():
            dest, n = base.with_name(f"{base.name}-{n}"), n + 1
        for src, rel in moves:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
        also = [rel for _, rel in moves[len(newer) :] if not rel.startswith(rundir.METRICS)]
        n_eval = sum(rel.startswith(rundir.METRICS) for _, rel in moves)
        extra = (f", {', '.join(also)}" if also else "") + (f" and {n_eval} eval metrics file(s)" if n_eval else "")
        self._say(
            f"resume from step {step}: moved the abandoned branch's newer checkpoints "
            f"{[p.name for p in newer]}{extra} to {dest}"
        )

    def load(self, path: str | Path) -> TrainState:
        """Restore model, optimizer, loss scaler and RNG (collective), then the trainer state.

        Refuses (UnsafeCheckpointError, a ConfigError) a checkpoint holding symlinks, special files, paths
        resolving outside it or pickles importing code, before anything is unpickled.
        """
        path = Path(path)
        assert_loadable(path)
        self.acc.load_state(str(path))
        state = read_state(path)
        self.last_saved_step = state.step
        return state

    # ---- when and how to save ----

    def time_due(self) -> bool:
        """``save_every_minutes`` have passed since the last save (or the start); ranks agree on it in the loop."""
        minutes = self.cfg.save_every_minutes
        return minutes > 0 and self.clock() - self.last_save_time >= 60 * minutes

    def due(self, step: int, completed_epoch: int | None = None, time_due: bool = False) -> bool:
        """Whether a checkpoint is due at ``step``: by time, every N steps, or at the end of every N-th epoch."""
        by_epoch = completed_epoch is not None and every(completed_epoch, self.cfg.save_every_epochs)
        return time_due or by_epoch or every(step, self.cfg.save_every_steps)

    def maybe_save(
        self, state: TrainState, *, completed_epoch: int | None = None, time_due: bool = False, force: bool = False
    ) -> Path | None:
        if state.step == self.last_saved_step or not (force or self.due(state.step, completed_epoch, time_due)):
            return None
        return self.save(state)

    def save(self, state: TrainState) -> Path:
        """Collective: every rank must call it at the same step. Atomic: ``*.tmp``, COMPLETE, rename.

        Then prunes to ``keep_last`` checkpoints of the lineage (``state.run_id``), never the best step.
        A failed write on any rank raises CheckpointWriteError on every rank, the ``*.tmp`` removed.
        """
        final = self.root / step_dir_name(state.step)
        tmp = self.root / (final.name + TMP_SUFFIX)
        what = f"checkpoint {final.name}"

        def prepare():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)

        self._agree(self._try(prepare) if self._main else None, what, tmp, state)
        error = None
        try:
            with self._deepspeed_write_guard() as guard:
                self.acc.save_state(str(tmp))
            error = guard.error
        except Exception as e:
            error = e
        self._agree(error, what, tmp, state)

        def finish():
            (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2))
            self.run_config.save(tmp)
            (tmp / COMPLETE).write_text(f"{state.step}\n")
            if final.exists():  # a same-step checkpoint of an earlier process
                shutil.rmtree(final)
            os.replace(tmp, final)

        self._agree(self._try(finish) if self._main else None, what, tmp, state)
        if self._main:
            self._prune(state)
        self.last_saved_step = state.step
        self.last_save_time = self.clock()
        return final

    @staticmethod
    def _try(fn) -> Exception | None:
        try:
            fn()
        except Exception as e:
            return e
        return None

    def _agree(
        self, error: Exception | None, what: str, partial: Path, state: TrainState, needed: int | None = None
    ) -> None:
        """Collective: every rank learns whether any rank failed; then all raise the same CheckpointWriteError."""
        local = None if error is None else _cause(error)
        failed = [(rank, c) for rank, c in enumerate(all_gather(local)) if c is not None]
        if not failed:
            return
        message = None
        if self._main:
            message = self._failure_message(what, partial, failed, state, needed)
        raise CheckpointWriteError(broadcast(message)) from error

    def _failure_message(self, what: str, partial: Path, failed: list, state: TrainState, needed_bytes) -> str:
        written = _tree_bytes(partial) if partial.exists() else 0
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.exists():
            partial.unlink(missing_ok=True)
        lineage = [p for p in lineage_checkpoints(self.run_dir, state.run_id) if p.name != partial.name]
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
    def _deepspeed_write_guard(self):
        """Keep a failed DeepSpeed file write from leaving other ranks in DeepSpeed's internal barrier.

        ``engine.save_checkpoint`` writes between collectives (tag check, final barrier): a rank whose write
        raised would skip the final barrier the others wait in. Its file writes are caught and recorded
        instead, so every rank runs its collectives; should anything else escape (the rank-0 'latest' file),
        the failed rank makes up the one barrier it skipped. The error is reported after ``save_state``.
        """

        class Guard:
            error: Exception | None = None

        guard = Guard()
        engines = [m for m in getattr(self.acc, "_models", []) if hasattr(m, "checkpoint_engine")]
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

    def _prune(self, state: TrainState) -> None:
        """Keep the newest ``keep_last`` checkpoints of this lineage up to ``state.step``, and the best step.

        Deletes only complete checkpoints whose trainer state has this run's id and an older step.
        """
        mine = [p for p in lineage_checkpoints(self.run_dir, state.run_id) if checkpoint_step(p) <= state.step]
        for p in mine[: max(0, len(mine) - self.cfg.keep_last)]:
            if checkpoint_step(p) not in (state.best_step, state.step):
                shutil.rmtree(p, ignore_errors=True)

    def save_best(self, model, state: TrainState, metrics: dict) -> Path | None:
        """Snapshot the best model so far (fp32 masters, on the host) and write it in the background.

        Collective in every distributed mode (every rank calls it at the same step): under DeepSpeed each
        parameter's fp32 master is gathered. The file is written by a thread on rank 0, at most every
        ``best_every_minutes`` (a newer best replaces a snapshot still waiting), so the step does not wait
        for the disk; `close` writes the last one. A failed write of an earlier snapshot raises
        CheckpointWriteError on every rank here or in `close`.
        """
        self._agree_best(state)
        sd = master_state_dict(model, self.acc)
        path = self.dirs.best_model
        if self._main:
            meta = {"step": state.step, "val_mean_cos": metrics.get("mean_cos"), "run_id": state.run_id}
            needed = sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in sd.values())
            self._best.submit(lambda: save_consolidated(path, sd, self.run_config, meta), (state.step, needed))
        return path if self._main else None

    def close(self, state: TrainState) -> None:
        """Collective: write the best model still waiting, and say so on every rank if it failed."""
        if self._main:
            self._best.flush()
        self._agree_best(state)

    def _agree_best(self, state: TrainState) -> None:
        error, (step, needed) = self._best.take_error() if self._main else (None, (state.step, None))
        path = self.dirs.best_model
        self._agree(error, f"best model (step {step})", path.with_suffix(TMP_SUFFIX), state, needed)


class _BackgroundWriter:
    """One writer thread with a one-slot queue: the newest job replaces one not yet started.

    Jobs start at most every ``min_interval_s`` seconds; an error is kept (with the job's tag) until taken.
    """

    def __init__(self, min_interval_s: float):
        self.min_interval_s = min_interval_s
        self.cond = threading.Condition()
        self.job = None  # (fn, tag) waiting
        self.busy = False
        self.error: tuple[Exception, object] | None = None
        self.next_start = -math.inf  # earliest start of the next job
        self.flushing = False
        self.thread: threading.Thread | None = None

    def submit(self, fn, tag) -> None:
        with self.cond:
            self.job = (fn, tag)
            self.cond.notify_all()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="dist-train best model", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.job is None or (not self.flushing and time.monotonic() < self.next_start):
                    self.cond.wait(timeout=None if self.job is None else self.next_start - time.monotonic())
                fn, tag = self.job
                self.job, self.busy, self.next_start = None, True, time.monotonic() + self.min_interval_s
            try:
                fn()
            except Exception as e:  # reported on every rank by the next save_best or close
                with self.cond:
                    self.error = (e, tag)
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def flush(self) -> None:
        with self.cond:
            self.flushing = True
            self.cond.notify_all()
            while self.job is not None or self.busy:
                self.cond.wait()
            self.flushing = False

    def take_error(self) -> tuple[Exception | None, object]:
        with self.cond:
            error, self.error = self.error, None
        return (error[0], error[1]) if error else (None, (None, None))


def _is_deepspeed(accelerator, model) -> bool:
    kind = getattr(accelerator, "distributed_type", None)
    return str(getattr(kind, "value", kind)) == "DEEPSPEED" or hasattr(model, "checkpoint_engine")


def master_state_dict(model, accelerator) -> dict[str, torch.Tensor]:
    """The model's state dict with fp32 master weights, on CPU; keys as ``build_model(...).state_dict()``.

    Under DeepSpeed (any ZeRO stage, any precision) each parameter is the optimizer's fp32 master,
    assembled by ``safe_get_full_fp32_param``: a collective per parameter, so every rank must call this,
    and the parameters are visited in the module's order on every rank. Elsewhere the model's own
    weights are the fp32 ones.
    """
    if not _is_deepspeed(accelerator, model):  # copies: the live weights go on changing while a thread writes
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


def load_consolidated_meta(path: str | Path) -> dict:
    """The ``meta`` record of a consolidated file (step, val_mean_cos, ...), without reading the tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    return json.loads(md.get("meta", "{}"))


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
    if (path / "pytorch_model" / "latest").is_file() or (path / "latest").is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, cfg
    st = path / CONSOLIDATED
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st)), cfg
    bin_ = path / "pytorch_model.bin"
    if bin_.is_file():
        return torch.load(bin_, map_location="cpu", weights_only=True), cfg
    raise ValueError(f"{path} holds no model weights that dist-train knows how to read")
