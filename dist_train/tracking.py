"""Logging callbacks kept outside the loop: TensorBoard scalars, progress bar, console lines.

Only the main process writes; the others get no-op instances so the loop
never branches on rank.
"""

from __future__ import annotations

import time
from pathlib import Path

from dist_train.metrics import TRAIN_TAGS, VAL_EPOCH_TAG, scalars


class TrainLogger:
    """Accumulates per-step values and writes their means every `log_every_steps` optimizer steps."""

    def __init__(self, cfg, run_dir: Path, is_main: bool, start_step: int, total_steps: int, global_batch: int):
        self.cfg = cfg  # config.LogConfig
        self.is_main = is_main
        self.global_batch = global_batch
        self.sums: dict[str, float] = {}
        self.count = 0
        self.epoch_loss_sum = 0.0
        self.epoch_loss_n = 0
        self.t0 = time.perf_counter()
        self.steps_since = 0
        self.writer = None
        self.bar = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            # purge_step hides points a crashed run wrote after the checkpoint we resume from; TensorBoard
            # drops steps >= purge_step, and the checkpoint's own step was logged before it was saved
            self.writer = SummaryWriter(
                str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None, flush_secs=30
            )
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=2.0)

    def step(self, step: int, values: dict[str, float], counters: dict[str, float]) -> None:
        """Called after every optimizer step with this step's values (loss terms, lr, grad norm...)."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        self.steps_since += 1
        if "loss" in values:
            self.epoch_loss_sum += float(values["loss"])
            self.epoch_loss_n += 1
        if not self.is_main:
            return
        self.bar.update(1)
        if step % self.cfg.log_every_steps:
            return
        now = time.perf_counter()
        means = {k: v / self.count for k, v in self.sums.items()}
        means["samples_per_s"] = self.steps_since * self.global_batch / max(now - self.t0, 1e-9)
        means.update(counters)
        for k, v in means.items():
            self.writer.add_scalar(TRAIN_TAGS[k], v, step)
        self.bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", lr=f"{means.get('lr', 0):.2e}")
        self.sums, self.count, self.steps_since, self.t0 = {}, 0, 0, now

    def take_train_loss(self) -> float | None:
        """Mean training loss since the last evaluation (the denominator of val/train)."""
        if not self.epoch_loss_n:
            return None
        mean = self.epoch_loss_sum / self.epoch_loss_n
        self.epoch_loss_sum, self.epoch_loss_n = 0.0, 0
        return mean

    def eval(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        for tag, v in scalars(metrics).items():
            self.writer.add_scalar(tag, v, step)
        self.writer.add_scalar(VAL_EPOCH_TAG, metrics["epoch"], step)
        self.writer.flush()
        gap = metrics.get("fraction_of_oracle_gap")
        self.print(
            f"eval step {step} epoch {metrics['epoch']:.2f}: val cos {metrics['mean_cos']:.4f} "
            f"(identity baseline {metrics['identity_baseline_cos']:.4f}, gain {metrics['gain']:+.4f}"
            + (f", oracle {metrics['oracle_cos']:.4f}, {gap:.0%} of gap closed" if gap is not None else "")
            + f"), impostor {metrics['impostor_cos']:.4f} (baseline {metrics['baseline_impostor_cos']:.4f}), "
            f"val loss {metrics.get('loss', float('nan')):.4f}"
        )

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def print(self, msg: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar else print)(msg)

    def close(self) -> None:
        if self.writer:
            self.writer.flush()
            self.writer.close()
        if self.bar:
            self.bar.close()
