"""`dist-train train`: the training loop, readable top to bottom.

The same code runs as a plain single-process debug run (`dist-train train`),
under DDP and under DeepSpeed ZeRO 1/2/3 (`accelerate launch ... -m dist_train
train`). Components own their policies: the checkpointer decides when to save,
the evaluator when to validate, the logger when to write, the stepper how a
step is taken or skipped; the loop only asks. Values the host needs (losses,
non-finite flags, loader counters) stay on the device between log intervals.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_train import augment, cli
from dist_train import config as config_mod
from dist_train.checkpoint import (
    Checkpointer,
    CheckpointWriteError,
    TrainState,
    consolidate_checkpoint,
    new_run_id,
    read_state,
)
from dist_train.config import Config, ConfigError
from dist_train.data.shards import INDEX_NAME, ShardSet, ShardSetError
from dist_train.data.stream import LoaderStats, TrainStream
from dist_train.evaluate import Evaluator, target_of, train_fields
from dist_train.losses import FrontalLoss
from dist_train.metrics import monitored
from dist_train.model import build_model
from dist_train.optim import Stepper, build_optimizer
from dist_train.preemption import StopRequest
from dist_train.progress import count_interval, record_eval
from dist_train.runtime import Runtime, setup
from dist_train.stepstats import StepStats
from dist_train.tracking import RowTrace, TrainLogger, data_summary

DONE = "DONE"
EXIT_DIVERGED = 3
EXIT_CHECKPOINT_WRITE = 4


@dataclass(frozen=True)
class Plan:
    """Batch and step arithmetic, identical on every rank."""

    micro_batch: int
    accumulation: int
    world_size: int
    samples_per_epoch: int

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


def open_shard_sets(cfg: Config) -> list[ShardSet]:
    """The run's shard sets, refused before training when one lacks a field or a split the run reads."""
    sets = [ShardSet.open(path) for path in cfg.data.data_dir]
    needed = train_fields(cfg.data.target)
    for shard_set in sets:
        missing = [f for f in needed if not shard_set.has(f)]
        if missing:
            raise ConfigError(
                f"data_dir: {shard_set.root} has no field(s) {missing}, which this run reads (it has "
                f"{shard_set.fields}); every shard set read together needs {list(needed)}"
            )
        shard_set.split(cfg.data.train_split)
        shard_set.split(cfg.data.val_split)
    return sets


def check_resume(saved: TrainState, plan: Plan, fingerprint: str, rt: Runtime, cfg: Config) -> int:
    """Refuse a resume that cannot continue; else the schedule offset (position - step) to continue with.

    Changing world size, micro batch or accumulation changes steps per epoch. One process or DDP
    continue at the same fraction of the schedule; DeepSpeed's ZeRO partitions are bound to the
    world size they were saved with, so a changed geometry is refused there before anything loads.
    """
    if saved.data_fingerprint and saved.data_fingerprint != fingerprint and not cfg.train.allow_data_change:
        raise ConfigError(
            f"resume: the checkpoint was trained on another shard set (index.json fingerprint "
            f"{saved.data_fingerprint}, now {fingerprint} for {cfg.data.data_dir}); pass --allow_data_change true "
            "to continue on this data, or --data_dir the set it was trained on"
        )
    old = (saved.world_size, saved.micro_batch, saved.accumulation)
    new = (plan.world_size, plan.micro_batch, plan.accumulation)
    if not saved.world_size or old == new:
        return saved.schedule_offset
    said = f"saved world {old[0]} x micro batch {old[1]} x accumulation {old[2]}, now {new[0]} x {new[1]} x {new[2]}"
    if rt.deepspeed_stage is not None:
        raise ConfigError(
            f"resume: {said}: DeepSpeed ZeRO checkpoints are bound to the geometry they were saved with. Resume with "
            "the same processes, --batch_size and --gradient_accumulation_steps, or start a new run from its weights "
            "(--init_from CHECKPOINT, which takes any checkpoint directory, with a fresh optimizer and schedule)"
        )
    old_plan = Plan(saved.micro_batch, saved.accumulation, saved.world_size, plan.samples_per_epoch)
    epochs_done = (saved.step + saved.schedule_offset) / old_plan.steps_per_epoch
    position = round(epochs_done * plan.steps_per_epoch)
    rt.accelerator.print(
        f"dist-train: resume: {said}; steps per epoch {old_plan.steps_per_epoch} -> {plan.steps_per_epoch}, "
        f"continuing the schedule at epoch {epochs_done:.3f} (step {saved.step} is schedule position {position})"
    )
    return position - saved.step


def init_weights(model: torch.nn.Module, path: str, strict: bool) -> str:
    """Weights only from any checkpoint or exported file (fine-tuning: fresh optimizer and schedule).

    Names and shapes are compared before anything is loaded; a mismatch is refused listing the
    tensors, unless ``strict`` is off, which loads what matches and says what did not.
    """
    try:
        weights, _ = consolidate_checkpoint(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"init_from: {path!r} cannot be read: {e}") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape))
    problems = [
        f"{what}: {names[:8]}{' ...' if len(names) > 8 else ''}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("different shape", shapes))
        if names
    ]
    if problems and strict:
        raise ConfigError(
            f"init_from: {path} does not fit the model ({'; '.join(problems)}); use the model flags it was trained "
            "with, or --init_from_strict false to load the tensors that match"
        )
    matching = {k: v for k, v in weights.items() if k in own and k not in shapes}
    model.load_state_dict(matching, strict=False)
    said = f"; not loaded: {'; '.join(problems)}" if problems else ""
    return f"dist-train: initialised {len(matching)} of {len(own)} tensors from {path}{said}"


def train(cfg: Config, trackers: tuple = ()) -> int:
    """Run a training to its end; returns the exit code (0 done, 3 diverged, 4 a checkpoint write failed).

    ``trackers``: `accelerate.tracking.GeneralTracker` instances that receive what the run logs, besides
    the ``log_with`` trackers of the config.
    """
    rt = setup(cfg, trackers)
    acc = rt.accelerator
    run_dir = Path(cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed + rt.rank)

    # ---- data, arithmetic, and where this run starts ----------------------------------------------
    shard_sets = open_shard_sets(cfg)
    plan = Plan(
        cfg.train.batch_size,
        cfg.train.gradient_accumulation_steps,
        rt.world_size,
        cfg.data.samples_per_epoch or sum(s.n_samples(cfg.data.train_split) for s in shard_sets),
    )
    spe = plan.steps_per_epoch
    total_steps = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
    fingerprint = data_fingerprint(shard_sets)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir, acc, cfg)
    start = checkpointer.resolve_start(cfg.train.resume, cfg.train.overwrite)  # refusals come before any write
    offset = check_resume(read_state(start), plan, fingerprint, rt, cfg) if start else 0

    # ---- model, optimizer, loss ---------------------------------------------------------------
    model = build_model(cfg.model)
    if cfg.train.init_from and start is None:
        acc.print(init_weights(model, cfg.train.init_from, strict=cfg.train.init_from_strict))
    optimizer = build_optimizer(model, cfg, fused=rt.deepspeed_stage is None)
    model, optimizer = acc.prepare(model, optimizer)  # the stream stays out of prepare()
    loss_fn = FrontalLoss(cfg.loss)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir)
    acc.wait_for_everyone()
    if start is None:
        state = TrainState(run_id=rt.broadcast(new_run_id()))
    else:
        state = checkpointer.load(start)
        state.resumed_from, state.schedule_offset = state.step, offset
        acc.print(f"dist-train: resumed from {start} at step {state.step}")
    stepper = Stepper(model, optimizer, rt, cfg, spe, total_steps, state.applied_steps + state.schedule_offset)

    # ---- callbacks ----------------------------------------------------------------------------
    stop = StopRequest(run_dir, acc)
    evaluator = Evaluator(cfg.eval, rt, shard_sets, cfg.data.val_split, cfg.train.batch_size, cfg.data.target, run_dir)
    logger = TrainLogger(cfg.log, acc, cfg, state.step, total_steps, plan.global_batch)
    stats = StepStats(loss_fn.term_names, acc.device, rt.world_size)
    stream = TrainStream(
        shard_sets,
        split=cfg.data.train_split,
        batch_size=plan.micro_batch,
        rank=rt.rank,
        world_size=rt.world_size,
        batches_per_epoch=plan.batches_per_epoch,
        resampled=cfg.data.resampled,
        seed=cfg.train.seed,
        shuffle_blocks=cfg.data.shuffle_blocks,
        num_workers=cfg.data.num_workers,
        fields=train_fields(cfg.data.target),  # no oracle: training never reads it
        trace_rows=cfg.log.trace_rows,
        pin_memory=acc.device.type == "cuda",
        weights=cfg.data.data_weights,
        transient=True,  # a batch is dropped once its micro step is done
    )
    trace = RowTrace(run_dir, rt.rank, state.step) if cfg.log.trace_rows else None
    # training-time augmentation, seeded per (seed, rank, step, micro batch): a resumed run draws the same noise
    noise = torch.Generator(device=acc.device) if augment.enabled(cfg.augment) else None
    loader_base = LoaderStats(**state.loader)  # counted by earlier processes of this run
    print(
        f"[rank {rt.rank}/{rt.world_size}] device {acc.device}, {rt.precision}, "
        f"{'DeepSpeed ZeRO-' + str(rt.deepspeed_stage) if rt.deepspeed_stage is not None else acc.distributed_type}",
        flush=True,
    )
    acc.print(
        f"dist-train: micro batch {plan.micro_batch} x accumulation {plan.accumulation} x world {plan.world_size} "
        f"= global batch {plan.global_batch}; {spe} steps/epoch, {total_steps} steps; "
        f"{acc.unwrap_model(model).describe()}; augmentation: {augment.describe(cfg.augment)}"
    )

    def progress() -> int:  # position in the plan's epochs (== step unless a resume changed the global batch)
        return state.step + state.schedule_offset

    def loader_totals() -> LoaderStats:  # collective
        here = stream.stats.as_dict()
        total = LoaderStats(**dict(zip(here, map(int, rt.sum_over_ranks(list(here.values()))))))
        total.add(loader_base)
        return total

    def checkpoint(force: bool, completed_epoch: int | None, time_due: bool) -> None:
        if state.step == checkpointer.last_saved_step or not (
            force or checkpointer.due(state.step, completed_epoch, time_due)
        ):
            return
        state.loader = loader_totals().as_dict()
        state.schedule_offset = stepper.applied_position() - state.applied_steps
        state.world_size, state.micro_batch, state.accumulation = plan.world_size, plan.micro_batch, plan.accumulation
        state.data_fingerprint = fingerprint
        logger.flush()  # the curve up to a checkpoint is on disk before the checkpoint is
        if trace:
            trace.flush()
        checkpointer.save(state)

    # ---- the loop -----------------------------------------------------------------------------
    outcome, diverged_at, micro = "finished", None, 0
    try:
        while progress() < total_steps and outcome == "finished":
            epoch = progress() // spe
            stream.set_epoch(epoch, start_batch=(progress() % spe) * plan.accumulation)
            for batch in stream:
                if trace:
                    trace.write(state.step + 1, epoch, batch["row"])
                batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
                if noise is not None:
                    augment.seed_generator(noise, cfg.train.seed, rt.rank, state.step, micro)
                    batch = augment.augment(batch, cfg.augment, noise)
                micro += 1
                with acc.accumulate(model):
                    if acc.sync_gradients:  # the window's last micro batch: DeepSpeed steps inside backward
                        stepper.set_lr()
                    with acc.autocast():
                        pred = model(*rt.model_inputs(batch))
                    loss, terms = loss_fn(pred.float(), target_of(batch, cfg.data.target), batch["identity"])
                    acc.backward(loss)  # always: a non-finite window is discarded whole at the boundary
                    stats.micro(loss, terms)
                    if not acc.sync_gradients:
                        continue
                    stats.boundary(*stepper.boundary())

                # ---- one optimizer step done (or skipped) on every rank ----
                state.step, micro = state.step + 1, 0
                state.samples_seen += plan.global_batch
                last = progress() >= total_steps
                epoch_end = progress() % spe == 0 or last
                completed_epoch = progress() // spe if progress() % spe == 0 else None
                if not (logger.due(state.step) or evaluator.due(state.step, epoch_end) or epoch_end):
                    if not checkpointer.due(state.step, completed_epoch):
                        continue
                # collective, at the same steps on every rank: the interval's values, and the ranks' votes
                interval = stats.read(votes=(stop.requested(), checkpointer.time_due()))
                stop_now, time_due = interval.votes
                diverged_at = count_interval(state, interval, cfg.train.max_bad_steps) or diverged_at
                logger.add(interval)
                if logger.due(state.step) or last:
                    totals = loader_totals()
                    state.bad_rows = totals.bad_samples
                    logger.write(state, totals, stepper.current_lr(), epoch=progress() / spe)
                if stop.agreed(stop_now):
                    outcome = "preempted"

                if evaluator.due(state.step, epoch_end):
                    m = evaluator.run(model, loss_fn, state.step, progress() / spe, logger.take_train_loss())
                    logger.eval(state.step, m)
                    if record_eval(state, m, state.step, cfg.train.monitor, cfg.train.early_stopping_min_delta):
                        checkpointer.save_best(model, state, m)
                    elif not math.isfinite(monitored(m, cfg.train.monitor)[0]):
                        logger.print(
                            f"dist-train: warning: val {cfg.train.monitor} is {monitored(m, cfg.train.monitor)[0]} "
                            f"at step {state.step} ({m['n']} valid rows): not compared with the best "
                            f"({state.best_value} at step {state.best_step}); the model or the val data has "
                            "non-finite values"
                        )
                    patience = cfg.train.early_stopping_patience
                    if patience and state.evals_since_best >= patience and outcome == "finished":
                        outcome = "early-stopped"
                if diverged_at is not None and outcome == "finished":
                    outcome = "diverged"
                final = outcome != "finished" or last
                checkpoint(force=final, completed_epoch=completed_epoch, time_due=time_due)
                if final or epoch_end:
                    break
        checkpointer.close(state)  # the best model still being written
    except CheckpointWriteError as e:
        logger.close()
        print(f"dist-train train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT_WRITE

    # ---- the end --------------------------------------------------------------------------------
    totals = loader_totals()
    if outcome in ("finished", "early-stopped"):
        test = evaluator.test_best(cfg.data.test_split)  # the best model on the test split, when there is one
        if test is not None:
            logger.test(test)
    logger.close()
    if trace:
        trace.close()
    if outcome == "preempted":
        stop.mark(state.step)
        acc.print(
            f"dist-train: preempted at step {state.step} ({stop.reason}), checkpoint {checkpointer.last_saved_step}"
        )
    elif outcome == "diverged":
        acc.print(
            f"dist-train: error: {cfg.train.max_bad_steps} consecutive non-finite losses at step "
            f"{diverged_at}; checkpoint saved at step {state.step}. Lower --lr, use --precision bf16/fp32, "
            "or check the data with `dist-train inspect`."
        )
    else:
        if rt.is_main:
            (run_dir / DONE).write_text(f"{state.step}\n")
        if outcome == "early-stopped":
            acc.print(
                f"dist-train: early stop at step {state.step}: val {cfg.train.monitor} gained no more than "
                f"{cfg.train.early_stopping_min_delta} for {state.evals_since_best} evaluations"
            )
    acc.print(data_summary(totals, state))
    best = "none" if state.best_value is None else f"{state.best_value:.4f} (val cos {state.best_cos:.4f})"
    acc.print(f"dist-train: best val {cfg.train.monitor} {best} at step {state.best_step}; run dir {run_dir}")
    print(f"[rank {rt.rank}/{rt.world_size}] {outcome} at step {state.step}", flush=True)
    acc.end_training()
    return EXIT_DIVERGED if outcome == "diverged" else 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dist-train train",
        description="Train the frontalizer. Runs as is (one process) or under `accelerate launch -m dist_train train`.",
    )
    config_mod.add_arguments(p, preset=config_mod.preset_for_help(argv))
    args = cli.parse_args(p, argv)
    try:
        return train(config_mod.require_data(config_mod.from_args(args)))
    except (ConfigError, ShardSetError) as e:
        print(f"dist-train train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
