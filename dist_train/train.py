"""`dist-train train`: the training loop, readable top to bottom.

The same code runs as a plain single-process debug run (`dist-train train`),
under DDP and under DeepSpeed ZeRO 1/2/3 (`accelerate launch ... -m dist_train
train`). Components own their policies: the checkpointer decides when to save,
the evaluator when to validate, the logger when to write; the loop only asks.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_train import config as config_mod
from dist_train.checkpoint import Checkpointer, TrainState
from dist_train.config import Config, ConfigError
from dist_train.data.shards import ShardSet, ShardSetError
from dist_train.data.stream import TrainStream, check_exact_epoch
from dist_train.evaluate import Evaluator, target_of, train_fields
from dist_train.losses import FrontalLoss
from dist_train.model import build_model
from dist_train.preemption import StopRequest
from dist_train.runtime import Runtime, setup
from dist_train.schedule import lr_at
from dist_train.tracking import TrainLogger

DONE = "DONE"


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


class Window:
    """What happened in the micro batches of one optimizer step (means are what gets logged)."""

    def __init__(self):
        self.nonfinite = 0
        self.n = 0
        self.sums: dict[str, float] = {}
        self.grad_norm = None

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        self.n += 1
        for k, v in {"loss": loss, **{f"loss_{t}": x for t, x in terms.items()}}.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())

    def means(self) -> dict[str, float]:
        out = {k: v / self.n for k, v in self.sums.items()} if self.n else {}
        if self.grad_norm is not None and math.isfinite(float(self.grad_norm)):
            out["grad_norm"] = float(self.grad_norm)
        return out


def all_ranks_finite(loss: torch.Tensor, rt: Runtime) -> bool:
    """Collective when distributed: every rank skips a step together or none does."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if rt.world_size > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.warmup_lr, betas=(0.9, 0.999))


def train(cfg: Config) -> int:
    rt = setup(cfg)
    acc = rt.accelerator
    run_dir = Path(cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed + rt.rank)

    # ---- data and arithmetic ------------------------------------------------------------------
    shard_set = ShardSet.open(cfg.data.data_dir)
    train_shards = shard_set.shard_paths(cfg.data.train_split)
    if not cfg.data.resampled:
        try:
            check_exact_epoch(len(train_shards), rt.world_size, cfg.data.num_workers)
        except ValueError as e:
            raise ConfigError(f"resampled: {e}") from e
    plan = Plan(
        cfg.train.batch_size,
        cfg.train.gradient_accumulation_steps,
        rt.world_size,
        cfg.data.samples_per_epoch or shard_set.n_samples(cfg.data.train_split),
    )
    total_steps = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
    spe = plan.steps_per_epoch

    # ---- model, optimizer, loss ---------------------------------------------------------------
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = acc.prepare(model, optimizer)  # the WebDataset stream stays out of prepare()
    loss_fn = FrontalLoss(cfg.loss)

    # ---- callbacks ----------------------------------------------------------------------------
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir)
    acc.wait_for_everyone()
    checkpointer = Checkpointer(cfg.checkpoint, run_dir, acc, cfg)
    state = TrainState()
    if cfg.train.resume:
        found = checkpointer.find(cfg.train.resume)
        if found is None:
            acc.print(f"dist-train: resume {cfg.train.resume!r}: no complete checkpoint in {run_dir}, starting fresh")
        else:
            state = checkpointer.load(found)
            acc.print(f"dist-train: resumed from {found} at step {state.step}")
    stop = StopRequest(run_dir, acc)
    bad_rows_before = state.bad_rows  # counted by earlier processes of this run
    evaluator = Evaluator(cfg.eval, rt, shard_set, cfg.data.val_split, cfg.train.batch_size, cfg.data.target, run_dir)
    logger = TrainLogger(cfg.log, run_dir, acc.is_main_process, state.step, total_steps, plan.global_batch)
    stream = TrainStream(
        shard_set,
        split=cfg.data.train_split,
        batch_size=plan.micro_batch,
        rank=rt.rank,
        world_size=rt.world_size,
        batches_per_epoch=plan.batches_per_epoch,
        resampled=cfg.data.resampled,
        # resuming mid-epoch draws fresh data rather than replaying the epoch's start; at an epoch
        # boundary the (seed, epoch) stream is the one the uninterrupted run would have read
        seed=cfg.train.seed + (7919 * state.step if state.step % spe else 0),
        shuffle_blocks=cfg.data.shuffle_blocks,
        num_workers=cfg.data.num_workers,
        fields=train_fields(cfg.data.target),  # no oracle: training never reads it
    )
    print(
        f"[rank {rt.rank}/{rt.world_size}] device {acc.device}, {rt.precision}, "
        f"{'DeepSpeed ZeRO-' + str(rt.deepspeed_stage) if rt.deepspeed_stage is not None else acc.distributed_type}",
        flush=True,
    )
    acc.print(
        f"dist-train: micro batch {plan.micro_batch} x accumulation {plan.accumulation} x world {plan.world_size} "
        f"= global batch {plan.global_batch}; {spe} steps/epoch, {total_steps} steps; "
        f"{acc.unwrap_model(model).describe()}"
    )

    # ---- the loop -----------------------------------------------------------------------------
    outcome = "finished"
    window = Window()
    epoch = state.step // spe
    while state.step < total_steps and outcome == "finished":
        stream.set_epoch(epoch)
        for batch in stream:
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            lr = lr_at(state.applied_steps, cfg.optim, spe, total_steps)
            for group in optimizer.param_groups:  # before backward: DeepSpeed steps inside it
                group["lr"] = lr
            with acc.accumulate(model):
                with acc.autocast():
                    pred = model(batch["src_emb"].to(rt.input_dtype), batch["src_kps"], batch["src_pose"])
                loss, terms = loss_fn(pred.float(), target_of(batch, cfg.data.target), batch["identity"])
                if all_ranks_finite(loss, rt):
                    acc.backward(loss)
                    window.add(loss, terms)
                    if acc.sync_gradients and not window.nonfinite:
                        window.grad_norm = rt.clip_gradients(model, cfg.optim.grad_clip)
                        optimizer.step()
                else:
                    window.nonfinite += 1
                optimizer.zero_grad()  # a no-op inside an accumulation window
            if not acc.sync_gradients:
                continue

            # ---- one optimizer step done (or skipped) on every rank ----
            state.step += 1
            state.samples_seen += plan.global_batch
            state.bad_rows = bad_rows_before + stream.stats.bad_samples  # the loader drops and counts them
            if window.nonfinite:
                state.nonfinite_steps += 1
                state.consecutive_nonfinite += 1
            else:
                state.consecutive_nonfinite = 0
                state.skipped_steps += int(acc.optimizer_step_was_skipped)
            values = window.means() | {"lr": lr}
            if rt.precision == "fp16":
                values["loss_scale"] = loss_scale(optimizer, acc)
            counters = {
                "epoch": state.step / spe,
                "skipped_steps": state.skipped_steps,
                "nonfinite_steps": state.nonfinite_steps,
                "bad_samples": state.bad_rows,
                "samples_seen": state.samples_seen,
            }
            logger.step(state.step, values, counters)
            window = Window()
            epoch_end = state.step % spe == 0 or state.step == total_steps

            if evaluator.due(state.step, epoch_end):
                m = evaluator.run(model, loss_fn, state.step, state.step / spe, logger.take_train_loss())
                logger.eval(state.step, m)
                state.last_eval_step = state.step
                if m["mean_cos"] > state.best_cos + cfg.train.early_stopping_min_delta:
                    state.best_cos, state.best_step, state.evals_since_best = m["mean_cos"], state.step, 0
                    checkpointer.save_best(model, state, m)
                else:
                    state.evals_since_best += 1
                if cfg.train.early_stopping_patience and state.evals_since_best >= cfg.train.early_stopping_patience:
                    outcome = "early-stopped"
            if state.consecutive_nonfinite >= cfg.train.max_bad_steps:
                outcome = "diverged"
            elif stop.agreed():
                outcome = "preempted"
            final = outcome != "finished" or state.step >= total_steps
            if checkpointer.maybe_save(state, epoch_end=epoch_end, force=final):
                logger.flush()  # the curve up to a checkpoint survives a crash after it
            if final or epoch_end:
                break
        epoch += 1

    # ---- the end --------------------------------------------------------------------------------
    logger.close()
    if outcome == "preempted":
        stop.mark(state.step)
        acc.print(
            f"dist-train: preempted at step {state.step} ({stop.reason}), checkpoint {checkpointer.last_saved_step}"
        )
    elif outcome == "diverged":
        acc.print(
            f"dist-train: error: {state.consecutive_nonfinite} consecutive non-finite losses at step {state.step}; "
            f"checkpoint saved. Lower --lr, use --precision bf16/fp32, or check the data with `dist-train inspect`."
        )
    else:
        if acc.is_main_process:
            (run_dir / DONE).write_text(f"{state.step}\n")
        if outcome == "early-stopped":
            acc.print(
                f"dist-train: early stop at step {state.step}: val cos gained no more than "
                f"{cfg.train.early_stopping_min_delta} for {state.evals_since_best} evaluations"
            )
    acc.print(f"dist-train: best val cos {state.best_cos:.4f} at step {state.best_step}; run dir {run_dir}")
    print(f"[rank {rt.rank}/{rt.world_size}] {outcome} at step {state.step}", flush=True)
    acc.end_training()
    return 3 if outcome == "diverged" else 0


def loss_scale(optimizer, acc) -> float:
    """The live fp16 loss scale (DeepSpeed keeps it private; torch's GradScaler exposes it)."""
    scaler = getattr(acc, "scaler", None)
    if scaler is not None:
        return float(scaler.get_scale())
    inner = getattr(optimizer, "optimizer", optimizer)
    for name in ("cur_scale", "loss_scale"):
        v = getattr(inner, name, None)
        if isinstance(v, (int, float)):
            return float(v)
    return float("nan")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dist-train train",
        description="Train the frontalizer. Runs as is (one process) or under `accelerate launch -m dist_train train`.",
    )
    config_mod.add_arguments(p)
    args = p.parse_args(argv)
    try:
        cfg = config_mod.from_args(args)
        if cfg.data.data_dir is None:
            raise ConfigError("data_dir: not set; pass --data_dir DIR (a shard set) or set data.data_dir in the config")
        return train(cfg)
    except (ConfigError, ShardSetError) as e:
        print(f"dist-train train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
