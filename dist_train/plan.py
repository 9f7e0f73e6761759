"""What a run trains on and how its steps are counted: the shard sets, the batch arithmetic, a resume's geometry.

Every rank computes the same `Plan` from the config and the index files (no
communication): steps per epoch, micro batches per epoch and the total follow by
arithmetic, so ranks agree on every epoch boundary without asking each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from dist_train.checkpoint import TrainState
from dist_train.config import Config, ConfigError, require_data
from dist_train.data.blocks import readable_split
from dist_train.data.schema import train_fields
from dist_train.data.shards import INDEX_NAME, ShardSet, ShardSetError
from dist_train.data.stream import Layout
from dist_train.runtime import Runtime, launched_world_size


@dataclass(frozen=True)
class Plan:
    """Batch and step arithmetic, identical on every rank."""

    micro_batch: int
    accumulation: int
    world_size: int
    samples_per_epoch: int

    @classmethod
    def of(cls, cfg: Config, world_size: int, shard_sets: list[ShardSet]) -> Plan:
        """The run's plan: an epoch is ``samples_per_epoch`` or the train splits' rows together."""
        samples = cfg.data.samples_per_epoch or sum(s.n_samples(cfg.data.train_split) for s in shard_sets)
        return cls(cfg.train.batch_size, cfg.train.gradient_accumulation_steps, world_size, samples)

    def describe(self) -> str:
        return (
            f"micro batch {self.micro_batch} x accumulation {self.accumulation} x world {self.world_size} "
            f"= global batch {self.global_batch}"
        )

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.samples_per_epoch // self.global_batch)

    @property
    def batches_per_epoch(self) -> int:  # micro batches per rank
        return self.steps_per_epoch * self.accumulation

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        total = epochs * self.steps_per_epoch
        return min(total, max_steps) if max_steps else total


def data_fingerprint(shard_sets: list[ShardSet]) -> str:
    """What a checkpoint was trained on: a hash of the shard sets' index.json files, in order."""
    digest = hashlib.sha256()
    for shard_set in shard_sets:
        digest.update((shard_set.root / INDEX_NAME).read_bytes())
    return digest.hexdigest()[:16]


def open_shard_sets(cfg: Config, world_size: int | None = None) -> list[ShardSet]:
    """The run's shard sets, refused before any work when one cannot give the run what it reads.

    Refused (ConfigError, one line): a set that is missing, whose index.json is malformed or does not
    describe its shards, that lacks a field the run reads, or whose train or val split (or test split,
    when it has one) is empty or has no readable block; and ``eval_max_samples`` below the number of
    processes (``world_size``, by default the launcher's), which would leave every rank without a row.
    The config's own validation does no I/O; this is the data check, run by `train` before it starts
    processes talking to each other, and by the SLURM jobs' preflight before an allocation is used. The
    header scans it does are the ones the run's readers use (cached on the sets).
    """
    cfg = require_data(cfg)
    world_size = launched_world_size() if world_size is None else world_size
    if cfg.eval.eval_max_samples is not None and cfg.eval.eval_max_samples < world_size:
        raise ConfigError(
            f"eval_max_samples: {cfg.eval.eval_max_samples} is fewer than the {world_size} processes, which "
            f"share it (each evaluates eval_max_samples / processes rows); give at least {world_size}, or null for all"
        )
    needed = train_fields(cfg.data.target)
    sets = []
    for path in cfg.data.data_dir:
        try:
            shard_set = ShardSet.open(path)
            shard_set.split(cfg.data.train_split)
            shard_set.split(cfg.data.val_split)
        except ShardSetError as e:
            raise ConfigError(f"data_dir: {e}") from e
        missing = [f for f in needed if not shard_set.has(f)]
        if missing == ["tgt_centroid"]:
            raise ConfigError(
                f"target: 'centroid' is not allowed; shard set {path} has no tgt_centroid; use target: sample"
            )
        if missing:
            raise ConfigError(
                f"data_dir: {shard_set.root} has no field(s) {missing}, which this run reads (it has "
                f"{shard_set.fields}); every shard set read together needs {list(needed)}"
            )
        splits = [cfg.data.train_split, cfg.data.val_split]
        splits += [s for s in [cfg.data.test_split] if s and s in shard_set.splits and s not in splits]
        try:
            for split in splits:
                readable_split(shard_set, split)
        except ShardSetError as e:
            raise ConfigError(f"data_dir: {e}") from e
        sets.append(shard_set)
    return sets


def saved_layouts(saved: TrainState) -> list[Layout]:
    """The layouts that read the checkpoint's epoch so far (none at an epoch's end or in resampled mode)."""
    try:
        return [Layout.of(raw) for raw in saved.epoch_layouts]
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise ConfigError(
            f"resume: trainer_state.json has a malformed epoch_layouts entry ({e}); resume from another checkpoint"
        ) from e


def _readers(num_workers: int) -> int:
    return max(1, num_workers)


def check_resume(saved: TrainState, plan: Plan, fingerprint: str, runtime: Runtime, cfg: Config) -> int:
    """Refuse a resume that cannot continue; else the schedule offset (position - step) to continue with.

    Changing world size, micro batch, accumulation or loader workers changes who reads which rows. One
    process or DDP continue: in exact epochs an interrupted epoch goes on where its rows read so far
    end (`epoch_start`), otherwise at the same fraction of the schedule. DeepSpeed's ZeRO partitions are
    bound to the world size they were saved with, so a changed batch geometry is refused there before
    anything loads.
    """
    if saved.data_fingerprint and saved.data_fingerprint != fingerprint and not cfg.checkpoint.allow_data_change:
        raise ConfigError(
            f"resume: the checkpoint was trained on another shard set (index.json fingerprint "
            f"{saved.data_fingerprint}, now {fingerprint} for {cfg.data.data_dir}); pass --allow_data_change true "
            "to continue on this data, or --data_dir the set it was trained on"
        )
    old = (saved.world_size, saved.micro_batch, saved.accumulation)
    new = (plan.world_size, plan.micro_batch, plan.accumulation)
    workers_changed = saved.num_workers >= 0 and _readers(saved.num_workers) != _readers(cfg.data.num_workers)
    if not saved.world_size or (old == new and not workers_changed):
        return saved.schedule_offset
    said = f"saved world {old[0]} x micro batch {old[1]} x accumulation {old[2]}, now {new[0]} x {new[1]} x {new[2]}"
    if workers_changed:
        said += f", loader workers {saved.num_workers} -> {cfg.data.num_workers}"
    if runtime.deepspeed_stage is not None and old != new:
        raise ConfigError(
            f"resume: {said}: DeepSpeed ZeRO checkpoints are bound to the geometry they were saved with. Resume with "
            "the same processes, --batch_size and --gradient_accumulation_steps, or start a new run from its weights "
            "(--init_from CHECKPOINT, which takes any checkpoint directory, with a fresh optimizer and schedule)"
        )
    layouts = saved_layouts(saved)
    if layouts and not cfg.data.resampled:
        epoch, read = layouts[-1].epoch, sum(lay.rows for lay in layouts)
        steps_read = -(-read // plan.global_batch)  # the first step after them: no step left short of new rows
        position = epoch * plan.steps_per_epoch + min(steps_read, plan.steps_per_epoch)
        what = (
            f"epoch {epoch} continues exactly: its {read} rows read so far are not read again, the others are dealt "
            f"over {new[0]} x {_readers(cfg.data.num_workers)} readers"
            if steps_read < plan.steps_per_epoch
            else f"epoch {epoch} ends here: its {read} rows read so far leave less than a global batch of the "
            "others (counted as dropped tail)"
        )
        runtime.accelerator.print(
            f"dist-train: resume: {said}; {what} (step {saved.step} is schedule position {position})"
        )
        return position - saved.step
    if old == new:  # only the workers changed, at an epoch's end or in resampled mode: nothing to continue
        if cfg.data.resampled:
            runtime.accelerator.print(
                f"dist-train: resume: {said}; resampled readers draw their blocks anew (no exact epoch to keep)"
            )
        return saved.schedule_offset
    old_plan = Plan(saved.micro_batch, saved.accumulation, saved.world_size, plan.samples_per_epoch)
    epochs_done = (saved.step + saved.schedule_offset) / old_plan.steps_per_epoch
    position = round(epochs_done * plan.steps_per_epoch)
    runtime.accelerator.print(
        f"dist-train: resume: {said}; steps per epoch {old_plan.steps_per_epoch} -> {plan.steps_per_epoch}, "
        f"continuing the schedule at epoch {epochs_done:.3f} (step {saved.step} is schedule position {position})"
        + ("; resampled readers draw their blocks anew (no exact epoch to keep)" if cfg.data.resampled else "")
    )
    return position - saved.step


@dataclass(frozen=True)
class EpochStart:
    """How a resumed process reads the epoch it resumes in (`TrainStream.set_epoch`'s layout arguments)."""

    epoch: int
    earlier: tuple[Layout, ...] = ()
    first: int = 0  # the epoch batch its layout began at
    cursors: tuple[int, ...] = ()  # every rank's readers' cursors, when it continues the checkpoint's own layout
    unread: tuple[Layout, ...] = field(default=())  # the resume ended the epoch: what read it (the rest is a gap)
    relaid: bool = False  # another layout than the checkpoint's goes on with the epoch


def epoch_start(saved: TrainState, plan: Plan, cfg: Config, position: int) -> EpochStart | None:
    """The checkpoint's epoch as the resumed run continues it at schedule ``position``; None: a fresh epoch."""
    layouts = saved_layouts(saved)
    if not layouts or cfg.data.resampled:
        return None
    last, epoch = layouts[-1], position // plan.steps_per_epoch
    if epoch != last.epoch:  # the rows read so far left less than one global batch of the new geometry
        return EpochStart(last.epoch, unread=tuple(layouts), relaid=True)
    same = (last.world_size, last.batch_size, last.readers, last.batches_per_epoch) == (
        plan.world_size,
        plan.micro_batch,
        _readers(cfg.data.num_workers),
        plan.batches_per_epoch,
    )
    if same:
        return EpochStart(epoch, tuple(layouts[:-1]), last.first, last.cursors)
    return EpochStart(epoch, tuple(layouts), (position % plan.steps_per_epoch) * plan.accumulation, relaid=True)
