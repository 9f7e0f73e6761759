"""`dist-train train`: the training loop, readable top to bottom.

The same code runs as a plain single-process debug run (`dist-train train`),
under DDP and under DeepSpeed ZeRO 1/2/3 (`accelerate launch ... -m dist_train
train`). Components own their policies: the checkpointer decides when to save,
the evaluator when to validate, the logger when to write, the stepper how a
step is taken or skipped, the run policy which model is best and when the run
ends; the loop reports what it measured and asks. Values the host needs
(losses, non-finite flags, loader counters) stay on the device between log
intervals.
"""

from __future__ import annotations

import argparse
import sys

import torch

from dist_train import augment, cli
from dist_train import config as config_mod
from dist_train.checkpoint import (
    Checkpointer,
    CheckpointWriteError,
    TrainState,
    check_output_dir,
    new_run_id,
    read_state,
)
from dist_train.config import Config, ConfigError
from dist_train.data.schema import target_of, train_fields
from dist_train.data.shards import ShardSetError
from dist_train.data.stream import LoaderStats, TrainStream
from dist_train.evaluate import Evaluator
from dist_train.losses import FrontalLoss
from dist_train.model import build_model
from dist_train.optim import Stepper, build_optimizer
from dist_train.plan import Plan, check_resume, data_fingerprint, epoch_start, open_shard_sets
from dist_train.preemption import StopRequest
from dist_train.progress import Outcome, RunPolicy
from dist_train.rundir import RunDir
from dist_train.runtime import end_process_group, setup
from dist_train.stepstats import StepStats
from dist_train.tracking import RowTrace, TrainLogger, data_summary
from dist_train.weights import init_weights

EXIT_CHECKPOINT_WRITE = 4


def train(cfg: Config, trackers: tuple = ()) -> int:
    """Run a training to its end; returns the exit code (0 done, 3 diverged, 4 a checkpoint write failed).

    ``trackers``: `accelerate.tracking.GeneralTracker` instances that receive what the run logs, besides
    the ``log_with`` trackers of the config.
    """
    shard_sets = open_shard_sets(cfg)  # refused here, before any process group or file
    check_output_dir(cfg.train.output_dir)  # a file, another tool's directory; rank 0 checks again when locking
    runtime = setup(cfg, trackers)
    acc = runtime.accelerator
    run_dir = RunDir(cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed + runtime.rank)

    # ---- data, arithmetic, and where this run starts ----------------------------------------------
    plan = Plan.of(cfg, runtime.world_size, shard_sets)
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
    fingerprint = data_fingerprint(shard_sets)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir.root, acc, cfg)
    # refusals come before any write
    start = checkpointer.resolve_start(cfg.checkpoint.resume, cfg.checkpoint.overwrite)
    saved = read_state(start) if start else None
    offset = check_resume(saved, plan, fingerprint, runtime, cfg) if saved else 0
    resumed_epoch = epoch_start(saved, plan, cfg, saved.step + offset) if saved else None

    # ---- model, optimizer, loss ---------------------------------------------------------------
    model = build_model(cfg.model)
    if cfg.checkpoint.init_from and start is None:
        acc.print(init_weights(model, cfg.checkpoint.init_from, strict=cfg.checkpoint.init_from_strict))
    optimizer = build_optimizer(model, cfg, fused=runtime.deepspeed_stage is None)
    model, optimizer = acc.prepare(model, optimizer)  # the stream stays out of prepare()
    loss_fn = FrontalLoss(cfg.loss)
    if runtime.is_main:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir.root)
    acc.wait_for_everyone()
    if start is None:
        state = TrainState(run_id=runtime.broadcast(new_run_id()))
    else:
        state = checkpointer.load(start)
        state.resumed_from, state.schedule_offset = state.step, offset
        state.relaid_epochs += bool(resumed_epoch and resumed_epoch.relaid)
        acc.print(f"dist-train: resumed from {start} at step {state.step}")
    position = state.applied_steps + state.schedule_offset
    stepper = Stepper(model, optimizer, runtime, cfg, steps_per_epoch, total_steps, position)

    # ---- callbacks ----------------------------------------------------------------------------
    stop = StopRequest(run_dir.root, acc, cfg.checkpoint.stop_grace_seconds)
    evaluator = Evaluator(
        cfg.eval, runtime, shard_sets, cfg.data.val_split, cfg.train.batch_size, cfg.data.target, run_dir.root
    )
    logger = TrainLogger(cfg.log, acc, cfg, state.step, total_steps, plan.global_batch)
    policy = RunPolicy(state, cfg.eval, cfg.train.max_bad_steps, say=logger.print)
    stats = StepStats(loss_fn.term_names, acc.device, runtime.world_size)
    stream = TrainStream(
        shard_sets,
        split=cfg.data.train_split,
        batch_size=plan.micro_batch,
        rank=runtime.rank,
        world_size=runtime.world_size,
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
    trace = RowTrace(run_dir.root, runtime.rank, state.step) if cfg.log.trace_rows else None
    # training-time augmentation, seeded per (seed, rank, step, micro batch): a resumed run draws the same noise
    noise = torch.Generator(device=acc.device) if augment.enabled(cfg.augment) else None
    loader_base = LoaderStats(**state.loader)  # counted by earlier processes of this run
    print(f"[rank {runtime.rank}/{runtime.world_size}] {runtime.describe()}", flush=True)
    acc.print(
        f"dist-train: {plan.describe()}; {steps_per_epoch} steps/epoch, {total_steps} steps; "
        f"{acc.unwrap_model(model).describe()}; augmentation: {augment.describe(cfg.augment)}"
    )

    def progress() -> int:  # position in the plan's epochs (== step unless a resume changed the global batch)
        return state.step + state.schedule_offset

    def loader_totals() -> LoaderStats:  # collective
        here = stream.stats.as_dict()
        total = LoaderStats(**dict(zip(here, map(int, runtime.sum_over_ranks(list(here.values()))))))
        total.add(loader_base)
        return total

    def epoch_layouts() -> list[dict]:  # collective: what read the running epoch so far, every rank's cursors
        cursors = [0] * (runtime.world_size * stream.readers)
        cursors[runtime.rank * stream.readers : (runtime.rank + 1) * stream.readers] = stream.cursors()
        cursors = [int(c) for c in runtime.sum_over_ranks(cursors)]
        return [lay.as_dict() for lay in stream.layouts(cursors, (progress() % steps_per_epoch) * plan.accumulation)]

    def checkpoint(force: bool, completed_epoch: int | None, time_due: bool) -> None:
        if state.step == checkpointer.last_saved_step or not (
            force or checkpointer.due(state.step, completed_epoch, time_due)
        ):
            return
        state.loader = loader_totals().as_dict()
        state.epoch_layouts = epoch_layouts()
        state.schedule_offset = stepper.applied_position() - state.applied_steps
        state.world_size, state.micro_batch, state.accumulation = plan.world_size, plan.micro_batch, plan.accumulation
        state.num_workers = cfg.data.num_workers
        state.data_fingerprint = fingerprint
        logger.flush()  # the curve up to a checkpoint is on disk before the checkpoint is
        if trace:
            trace.flush()
        checkpointer.save(state)

    def micro_step(batch: dict, epoch: int, micro: int) -> bool:
        """Forward and backward of one micro batch; True when it ended its window (the step is taken or skipped)."""
        if trace:
            trace.write(state.step + 1, epoch, batch["row"])
        batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
        if noise is not None:
            augment.seed_generator(noise, cfg.train.seed, runtime.rank, state.step, micro)
            batch = augment.augment(batch, cfg.augment, noise)
        with acc.accumulate(model):
            if acc.sync_gradients:  # the window's last micro batch: DeepSpeed steps inside backward
                stepper.set_lr()
            with acc.autocast():
                pred = model(*runtime.model_inputs(batch))
            loss, terms = loss_fn(pred.float(), target_of(batch, cfg.data.target), batch["identity"])
            acc.backward(loss)  # always: a non-finite window is discarded whole at the boundary
            stats.micro(loss, terms)
            if acc.sync_gradients:
                stats.boundary(*stepper.boundary())
                return True
        return False

    def read_interval(last: bool) -> bool:
        """Collective, at the same steps on every rank: the interval's values and the ranks' votes, counted and
        logged; returns whether a checkpoint is due by any rank's clock."""
        interval = stats.read(votes=(stop.requested(), checkpointer.time_due()))
        stop_now, time_due = interval.votes
        policy.count(interval)
        logger.add(interval)
        if logger.due(state.step) or last:
            totals = loader_totals()
            state.bad_rows = totals.bad_samples
            logger.write(state, totals, stepper.current_lr(), epoch=progress() / steps_per_epoch)
        if stop.agreed(stop_now):
            policy.preempt()
        return time_due

    # ---- the loop -----------------------------------------------------------------------------
    outcome, micro = None, 0
    try:
        while progress() < total_steps and outcome is None:
            epoch = progress() // steps_per_epoch
            at = (progress() % steps_per_epoch) * plan.accumulation
            if resumed_epoch is not None and resumed_epoch.unread:
                stream.count_unread(resumed_epoch.unread)
            if resumed_epoch is not None and resumed_epoch.epoch == epoch:  # the rest of the checkpoint's epoch
                r = runtime.rank * stream.readers
                stream.set_epoch(
                    epoch,
                    at,
                    earlier=resumed_epoch.earlier,
                    first=resumed_epoch.first,
                    cursors=resumed_epoch.cursors[r : r + stream.readers],
                )
            else:
                stream.set_epoch(epoch, start_batch=at)
            resumed_epoch = None
            for batch in stream:
                if not micro_step(batch, epoch, micro):
                    micro += 1
                    continue

                # ---- one optimizer step done (or skipped) on every rank ----
                state.step, micro = state.step + 1, 0
                state.samples_seen += plan.global_batch
                last = progress() >= total_steps
                epoch_end = progress() % steps_per_epoch == 0 or last
                completed_epoch = progress() // steps_per_epoch if progress() % steps_per_epoch == 0 else None
                evaluate = evaluator.due(state.step, epoch_end)
                if not (
                    logger.due(state.step) or evaluate or epoch_end or checkpointer.due(state.step, completed_epoch)
                ):
                    continue
                time_due = read_interval(last)
                if evaluate:
                    m = evaluator.run(
                        model, loss_fn, state.step, progress() / steps_per_epoch, logger.take_train_loss()
                    )
                    logger.eval(state.step, m)
                    if policy.judge(m):
                        checkpointer.save_best(model, state, m)
                outcome = policy.outcome
                checkpoint(force=outcome is not None or last, completed_epoch=completed_epoch, time_due=time_due)
                if outcome is not None or last or epoch_end:
                    break
        checkpointer.close(state)  # the best model still being written
    except CheckpointWriteError as e:
        logger.close()
        print(f"dist-train train: error: {e}", file=sys.stderr, flush=True)
        stop.close()
        return EXIT_CHECKPOINT_WRITE

    # ---- the end --------------------------------------------------------------------------------
    outcome = outcome or Outcome.FINISHED
    totals = loader_totals()
    if outcome.complete:
        test = evaluator.test_best(cfg.data.test_split)  # the best model on the test split, when there is one
        if test is not None:
            logger.test(test)
    logger.close()
    if trace:
        trace.close()
    if outcome is Outcome.PREEMPTED:
        stop.mark(state.step)
        acc.print(
            f"dist-train: preempted at step {state.step} ({stop.reason}), checkpoint {checkpointer.last_saved_step}"
        )
    elif outcome.complete and runtime.is_main:
        run_dir.done.write_text(f"{state.step}\n")
    *said, best = policy.summary(outcome)
    for line in said:
        acc.print(line)
    acc.print(data_summary(totals, state))
    acc.print(f"{best}; run dir {run_dir.root}")
    print(f"[rank {runtime.rank}/{runtime.world_size}] {outcome.value} at step {state.step}", flush=True)
    acc.end_training()
    stop.close()
    return outcome.exit_code


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dist-train train",
        description="Train the frontalizer. Runs as is (one process) or under `accelerate launch -m dist_train train`.",
    )
    config_mod.add_arguments(p, preset=config_mod.preset_for_help(argv))
    args = cli.parse_args(p, argv)
    try:
        return train(config_mod.from_args(args))
    except (ConfigError, ShardSetError) as e:
        print(f"dist-train train: error: {e}", file=sys.stderr)
        return 2
    finally:
        end_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
