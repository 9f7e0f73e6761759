"""Logging callbacks kept outside the loop: TensorBoard scalars, progress bar, console lines, row traces.

Only the main process writes; the others keep the same bookkeeping and write
nothing, so the loop never branches on rank.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dist_train import rundir
from dist_train.metrics import TRAIN_TAGS, VAL_EPOCH_TAG, scalars
from dist_train.rundir import RunDir
from dist_train.schedule import every
from dist_train.stepstats import Interval

LOADER_COUNTERS = ("unreadable_rows", "nonfinite_rows", "bad_blocks", "shard_errors", "repeats", "dropped_tail")


class TrainLogger:
    """Collects step intervals (`stepstats.Interval`) and writes their means every `log_every_steps` steps.

    Everything goes through Accelerate's tracker API (``accelerator.log``: one call site), so the
    trackers of ``--log_with`` (wandb, mlflow, ...) receive what TensorBoard does; TensorBoard is always
    one of them, in ``RUN_DIR/tb``, because ``dist-train report`` reads it.
    """

    def __init__(self, cfg, accelerator, run_config, start_step: int, total_steps: int, global_batch: int):
        self.cfg = cfg  # config.LogConfig
        self.acc = accelerator
        self.is_main = accelerator.is_main_process
        self.global_batch = global_batch
        self.pending = Interval()  # since the last write
        self.since_eval = Interval()  # since the last evaluation: the denominator of val/train
        self.t0 = time.perf_counter()
        self.bar = None
        # purge_step hides points a crashed run wrote after the checkpoint we resume from; TensorBoard drops
        # steps >= purge_step, and the checkpoint's own step was logged before it was saved
        tensorboard = {"purge_step": start_step + 1 if start_step else None, "flush_secs": 30}
        accelerator.init_trackers(rundir.TB, init_kwargs={"tensorboard": tensorboard})
        if self.is_main:
            for tracker in accelerator.trackers:  # the run's settings, where a tracker keeps them (not TensorBoard:
                if tracker.name != "tensorboard":  # its hparams would add event folders that report would read)
                    tracker.store_init_configuration(_flat(run_config.to_dict()))
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=2.0)

    def due(self, step: int) -> bool:
        return every(step, self.cfg.log_every_steps)

    def add(self, interval: Interval) -> None:
        self.pending.merge(interval)
        self.since_eval.merge(interval)
        if self.bar:
            self.bar.update(interval.steps)

    def write(self, state, loader, lr: float, epoch: float) -> None:
        """The pending interval's means, the learning rate and the run's cumulative counters, at ``state.step``."""
        now = time.perf_counter()
        values = dict(self.pending.means)
        values["lr"] = lr
        values["samples_per_s"] = self.pending.steps * self.global_batch / max(now - self.t0, 1e-9)
        values |= {
            "epoch": epoch,
            "skipped_steps": state.skipped_steps,
            "nonfinite_steps": state.nonfinite_steps,
            "bad_samples": loader.bad_samples,
            "samples_seen": state.samples_seen,
        }
        values |= {k: getattr(loader, k) for k in LOADER_COUNTERS}
        if torch.cuda.is_available():
            values["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.pending, self.t0 = Interval(), now
        self.acc.log({TRAIN_TAGS[k]: v for k, v in values.items()}, step=state.step)
        if self.bar:
            self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}")

    def take_train_loss(self) -> float | None:
        """Mean training loss since the last evaluation (the denominator of val/train)."""
        mean = self.since_eval.means.get("loss")
        self.since_eval = Interval()
        return mean

    def eval(self, step: int, metrics: dict) -> None:
        self.acc.log(scalars(metrics) | {VAL_EPOCH_TAG: metrics["epoch"]}, step=step)
        self.flush()
        gap = metrics.get("fraction_of_oracle_gap")
        dropped = metrics.get("dropped_rows") or {}
        self.print(
            f"eval step {step} epoch {metrics['epoch']:.2f}: val cos {metrics['mean_cos']:.4f} "
            f"(identity baseline {metrics['identity_baseline_cos']:.4f}, gain {metrics['gain']:+.4f}"
            + (f", oracle {metrics['oracle_cos']:.4f}, {gap:.0%} of gap closed" if gap is not None else "")
            + f"), impostor {metrics['impostor_cos']:.4f} (baseline {metrics['baseline_impostor_cos']:.4f}), "
            f"val loss {metrics.get('loss', float('nan')):.4f}"
            + (f"; {sum(dropped.values())} val rows dropped ({_counts(dropped)})" if any(dropped.values()) else "")
        )

    def test(self, metrics: dict) -> None:
        """The best model on the test split: TensorBoard ``test/*`` at the best step, and one line."""
        step = metrics.get("step") or 0
        self.acc.log(scalars(metrics, prefix="test"), step=step)
        gap = metrics.get("fraction_of_oracle_gap")
        self.print(
            f"test ({metrics['n']} rows, best model of step {step}): cos {metrics['mean_cos']:.4f} "
            f"(identity baseline {metrics['identity_baseline_cos']:.4f}, gain {metrics['gain']:+.4f}"
            + (f", {gap:.0%} of the oracle gap" if gap is not None else "")
            + "); written to metrics/test.json"
        )

    def flush(self) -> None:
        if self.is_main:
            self.acc.get_tracker("tensorboard", unwrap=True).flush()

    def print(self, msg: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar else print)(msg)

    def close(self) -> None:
        """Flush the trackers; `accelerator.end_training` closes them."""
        self.flush()
        if self.bar:
            self.bar.close()
            self.bar = None


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": ...}} -> {"train.lr": ...}: the form trackers keep run settings in."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def data_summary(loader, state) -> str:
    """The end-of-run account of the data: every row skipped, repeated or left out, by reason."""
    parts = [f"{state.samples_seen} samples trained on"]
    parts += [f"{v} {k.replace('_', ' ')}" for k, v in ((k, getattr(loader, k)) for k in LOADER_COUNTERS) if v]
    if state.nonfinite_steps or state.skipped_steps:
        parts.append(f"{state.nonfinite_steps} non-finite and {state.skipped_steps} overflow steps skipped")
    clean = len(parts) == 1
    if state.relaid_epochs:
        parts.append(
            f"{state.relaid_epochs} resume(s) under another geometry continued an exact epoch, "
            "reading none of its rows again"
        )
    return "dist-train: data: " + ", ".join(parts) + ("; no row skipped, repeated or left out" if clean else "")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v)


class RowTrace:
    """Each micro batch's row numbers in the split, per rank: ``RUN_DIR/trace/rows-rank<R>-from<step>.txt``.

    One line per micro batch: ``<optimizer step> <epoch> <row> <row> ...``. A process
    writes its own file, named by the step it started from, so after a crash and
    a resume the last file holding a step tells what the finished run read there.
    """

    def __init__(self, run_dir: Path, rank: int, start_step: int):
        path = RunDir(run_dir).trace / f"rows-rank{rank}-from{start_step:08d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w")  # noqa: SIM115 - open for the whole run, closed in close()

    def write(self, step: int, epoch: int, rows) -> None:
        self.file.write(f"{step} {epoch} " + " ".join(map(str, np.asarray(rows).tolist())) + "\n")

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
