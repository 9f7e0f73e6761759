"""The checkpoint policy the training loop follows: when to save, what to keep, the best model, resuming.

`Checkpointer` decides and coordinates; the work is done by its neighbours: `lineage` (where a run starts,
pruning), `lock` (one run per directory), `write` (the atomic, all-ranks-agree write), `consolidated` and `background` (the best model,
written by a thread), `safety` (checks before loading) and `state` (trainer_state.json).
"""

from __future__ import annotations

import time
from pathlib import Path

from dist_train.checkpoint.background import BackgroundWriter
from dist_train.checkpoint.best import restore_best
from dist_train.checkpoint.consolidated import (
    DEEPSPEED,
    PLAIN,
    checkpoint_kind,
    is_deepspeed,
    master_state_dict,
    safetensors_header,
    save_consolidated,
)
from dist_train.checkpoint.lineage import check_output_dir, decide_start, prune
from dist_train.checkpoint.lock import RunLock
from dist_train.checkpoint.safety import assert_loadable
from dist_train.checkpoint.state import TMP_SUFFIX, TrainState, read_state
from dist_train.checkpoint.write import agree, cause, write_checkpoint
from dist_train.config import CheckpointConfig, Config, ConfigError, load_run_config
from dist_train.model import state_shapes
from dist_train.rundir import CONSOLIDATED, RunDir
from dist_train.runtime import broadcast, distributed
from dist_train.schedule import every


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
        self._best = BackgroundWriter(60 * cfg.best_every_minutes)
        self._lock: RunLock | None = None  # rank 0's, from resolve_start for the process's life

    # ---- rank 0 decides, everyone follows ----

    @property
    def _main(self) -> bool:
        return bool(self.acc.is_main_process)

    @property
    def _distributed(self) -> bool:
        return distributed()

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
                outcome = ("fail", cause(e))
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
        """Collective: the checkpoint to load, or None for a fresh start.

        Rank 0 decides and acts, then broadcasts; a ConfigError is raised on every rank. Before anything is
        written it refuses an output_dir that is a file or another tool's (`lineage.check_output_dir`), then
        takes the directory's lock (`RunLock`: a second run is refused, naming the holder), then decides
        (`lineage.decide_start`: refusals, ``--overwrite``, ``latest``, moving an abandoned branch aside). The
        caller sets ``state.run_id`` (`new_run_id`, broadcast) on a fresh start; a loaded state keeps its own.
        """

        def start():
            check_output_dir(self.run_dir)
            if self._lock is None:
                self._lock = RunLock.acquire(self.run_dir)
            return decide_start(self.run_dir, resume, overwrite, self.check_resumable)

        found = self._on_main(start)
        return Path(found) if found is not None else None

    def check_resumable(self, path: Path) -> None:
        """Refuse a checkpoint this run cannot load, naming why and the way on, before anything is loaded.

        Its trainer state and config must read back as dist-train's; it must be of this run's launcher
        (DeepSpeed's sharded engine state and Accelerate's DDP / single-process files do not load into each
        other); the model its config describes must be this run's (`load` checks the tensors themselves).
        """
        read_state(path)
        saved = load_run_config(path)
        kind = checkpoint_kind(path)
        here = DEEPSPEED if is_deepspeed(self.acc, None) else PLAIN
        weights_only = f"or start a new run from its weights with --init_from {path} (a fresh optimizer and schedule)"
        if kind is None:
            raise ConfigError(f"resume: {path} holds no model weights dist-train knows how to read; {weights_only}")
        if kind != here:
            launcher = "under `accelerate launch` with a DeepSpeed config" if kind == DEEPSPEED else "without DeepSpeed"
            raise ConfigError(
                f"resume: {path} is a {kind} checkpoint, but this run is {here}: their optimizer states "
                f"do not load into each other. Resume it {launcher}, as it was trained, {weights_only}"
            )
        if (path / CONSOLIDATED).is_file():  # a file under that name that is not safetensors is refused
            try:
                safetensors_header(path / CONSOLIDATED)
            except ConfigError as e:
                raise ConfigError(f"resume: {str(e).split('; ')[0]}; resume from another checkpoint") from None
        if state_shapes(saved.model) != state_shapes(self.run_config.model):
            mine, theirs = vars(self.run_config.model), vars(saved.model)
            differ = ", ".join(f"{k} {theirs[k]!r}, now {mine[k]!r}" for k in theirs if theirs[k] != mine[k])
            raise ConfigError(
                f"resume: {path} holds another model ({differ}); resume with the model settings it was trained "
                f"with (they are in {RunDir(path).config})"
            )

    def load(self, path: str | Path) -> TrainState:
        """Restore model, optimizer, loss scaler and RNG (collective), then the trainer state.

        Refuses (UnsafeCheckpointError, a ConfigError) a checkpoint holding symlinks, special files, paths
        resolving outside it or pickles importing code, before anything is unpickled. Then best/ is made
        to hold the best model the state records (`best.restore_best`), and what was done is said.
        """
        path = Path(path)
        assert_loadable(path)
        try:
            self.acc.load_state(str(path))
        except RuntimeError as e:  # torch's "size mismatch" / "Missing key(s)": weights not of its config's model
            said = " ".join(str(e).split())
            if not any(m in said for m in ("size mismatch", "Missing key", "Unexpected key")):
                raise
            raise ConfigError(
                f"resume: the weights in {path} do not fit the model of its config, which is this run's "
                f"({said[:300]}{' ...' if len(said) > 300 else ''}); resume from another checkpoint of the run"
            ) from None
        state = read_state(path)
        said = self._on_main(lambda: restore_best(self.run_dir, path, state))
        if said and self._main:
            print(f"dist-train: {said}", flush=True)
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

        The best model still waiting is written first, so that the checkpoint records only a best model
        that is on disk, and holds it. Then prunes to ``keep_last`` checkpoints of the lineage
        (``state.run_id``), never the best step. A failed write on any rank raises CheckpointWriteError on
        every rank, the ``*.tmp`` removed.
        """
        self._write_pending_best(state)
        final = write_checkpoint(self.acc, self.run_config, self.run_dir, state)
        if self._main:
            prune(self.run_dir, state, self.cfg.keep_last)
        self.last_saved_step = state.step
        self.last_save_time = self.clock()
        return final

    def save_best(self, model, state: TrainState, metrics: dict) -> Path | None:
        """Snapshot the best model so far (fp32 masters, on the host) and write it in the background.

        Collective in every distributed mode (every rank calls it at the same step): under DeepSpeed each
        parameter's fp32 master is gathered. The file is written by a thread on rank 0, at most every
        ``best_every_minutes`` (a newer best replaces a snapshot still waiting), so the step does not wait
        for the disk; `save` and `close` write the one waiting. A failed write of an earlier snapshot raises
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
        self._write_pending_best(state)

    def _write_pending_best(self, state: TrainState) -> None:
        if self._main:
            self._best.flush()
        self._agree_best(state)

    def _agree_best(self, state: TrainState) -> None:
        error, (step, needed) = self._best.take_error() if self._main else (None, (state.step, None))
        path = self.dirs.best_model
        agree(error, f"best model (step {step})", path.with_suffix(TMP_SUFFIX), state, self.run_dir, self._main, needed)
