"""Checkpoints: when to save, how to save atomically, what to keep, how to resume and consolidate.

Layout under the run directory::

    checkpoints/step-00000120/    accelerator.save_state (DeepSpeed: sharded engine state) +
                                  trainer_state.json + config.yaml + best.safetensors (the best model
                                  it records, a hard link to best/'s file) + COMPLETE
    best/model.safetensors        fp32 master weights of the best model (config and step in metadata)
    abandoned/<step>-<time>/      checkpoints (and best/, DONE, eval metrics) of a branch left behind by an
                                  explicit resume from an older checkpoint

One job per module: ``checkpointer`` (the policy the loop follows: `Checkpointer`), ``state`` (the trainer
state, trainer_state.json), ``lineage`` (run ids, listing, pruning, where a run starts, whose directory it
is), ``lock`` (one run per directory: an flock the main process holds), ``write`` (the atomic write and the
failure every rank agrees on), ``background`` (the best-model writer thread), ``best`` (best/ agrees with the
trainer state: kept in each checkpoint, restored on resume),
``consolidated`` (fp32 safetensors weights, from any checkpoint) and ``safety`` (what is checked before
anything is unpickled). The names below are the package's interface; import them from here.
"""

from dist_train.checkpoint.best import BEST_COPY
from dist_train.checkpoint.checkpointer import Checkpointer
from dist_train.checkpoint.consolidated import (
    consolidate_checkpoint,
    load_consolidated,
    load_consolidated_meta,
    master_state_dict,
    save_consolidated,
)
from dist_train.checkpoint.lineage import (
    check_output_dir,
    checkpoint_step,
    complete_checkpoints,
    is_run_dir,
    lineage_checkpoints,
    new_run_id,
    partial_checkpoints,
    step_dir_name,
)
from dist_train.checkpoint.lock import RunLock
from dist_train.checkpoint.safety import (
    PICKLE_SUFFIXES,
    SAFE_GLOBAL_PREFIXES,
    SAFE_GLOBALS,
    UnsafeCheckpointError,
    assert_contained,
    assert_data_only,
    assert_loadable,
)
from dist_train.checkpoint.state import COMPLETE, STATE_FILE, TMP_SUFFIX, TrainState, read_state, write_state
from dist_train.checkpoint.write import CheckpointWriteError
from dist_train.rundir import CONSOLIDATED

__all__ = [
    "BEST_COPY",
    "COMPLETE",
    "CONSOLIDATED",
    "PICKLE_SUFFIXES",
    "SAFE_GLOBALS",
    "SAFE_GLOBAL_PREFIXES",
    "STATE_FILE",
    "TMP_SUFFIX",
    "CheckpointWriteError",
    "Checkpointer",
    "RunLock",
    "TrainState",
    "UnsafeCheckpointError",
    "assert_contained",
    "assert_data_only",
    "assert_loadable",
    "check_output_dir",
    "checkpoint_step",
    "complete_checkpoints",
    "consolidate_checkpoint",
    "is_run_dir",
    "lineage_checkpoints",
    "load_consolidated",
    "load_consolidated_meta",
    "master_state_dict",
    "new_run_id",
    "partial_checkpoints",
    "read_state",
    "save_consolidated",
    "step_dir_name",
    "write_state",
]
