"""The optimizer and its step: a window with a non-finite value is discarded whole, in every mode.

Every micro batch goes through backward, whatever its loss: a NaN then reaches
the gradients, DDP's all-reduce carries it to every rank, and the boundary sees
non-finite gradients on all ranks at once, so no rank needs to ask the others
(and the collectives stay in step). What happens at the boundary:

- outside DeepSpeed: the total gradient norm is computed (clipped to
  ``grad_clip`` when > 0; 0 means no clipping); a non-finite norm is a
  ``found_inf`` flag that the fused AdamW kernel reads on the device, so a bad
  window changes no weight and no moment, and the step counter it keeps stays put.
  The learning rate is a device tensor looked up in a table by the count of
  applied steps, so skipped windows do not advance the schedule, and no value
  crosses to the host on the step path.
- under DeepSpeed (ZeRO 1/2/3, fp32/bf16/fp16): the engine steps inside the
  boundary backward and discards a window with non-finite gradients itself
  (fp16 overflow, ``bf16.check_grad_overflow``, an invalid norm in fp32); the
  loop reads ``was_step_applied`` (DeepSpeed synchronises for it anyway) and
  sets the next learning rate from the applied count on the host.

Either way the gradients are zeroed after every boundary, so nothing of a bad
window leaks into the next one.
"""

from __future__ import annotations

import torch

from dist_train.config import Config
from dist_train.schedule import lr_at


def build_optimizer(model: torch.nn.Module, cfg: Config, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (1-D parameters).

    ``fused`` takes torch's fused kernel, which can skip a step on a device flag (``found_inf``).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = torch.tensor(cfg.optim.warmup_lr) if fused else cfg.optim.warmup_lr
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def lr_table(cfg: Config, steps_per_epoch: int, total_steps: int) -> torch.Tensor:
    """``lr_at`` for every schedule position 0..total_steps (float64 on the host, then float32)."""
    values = [lr_at(s, cfg.optim, steps_per_epoch, total_steps) for s in range(total_steps + 1)]
    return torch.tensor(values, dtype=torch.float64).float()


class Stepper:
    """Owns the optimizer step of one run: clipping, the non-finite skip and the learning rate.

    ``position`` is the schedule position of the next step (applied steps plus
    the run's ``schedule_offset``); ``boundary()`` returns (skipped, grad_norm)
    as device tensors outside DeepSpeed and host values under it.
    """

    def __init__(self, model, optimizer, runtime, cfg: Config, steps_per_epoch: int, total_steps: int, position: int):
        self.model, self.optimizer, self.runtime = model, optimizer, runtime
        self.grad_clip = cfg.optim.grad_clip
        self.deepspeed = runtime.deepspeed_stage is not None
        self.inner = getattr(optimizer, "optimizer", optimizer)  # torch's AdamW under Accelerate's wrapper
        device = runtime.accelerator.device
        self.table = lr_table(cfg, steps_per_epoch, total_steps)
        self.last = len(self.table) - 1
        if self.deepspeed:
            self.position = position
            self.table_host = self.table.tolist()
        else:
            self.table = self.table.to(device)
            self.position = torch.tensor(position, device=device)
            self.lr = self.inner.param_groups[0]["lr"]
            for group in self.inner.param_groups:
                group["lr"] = self.lr  # one tensor shared by every group
            self.scaler = getattr(runtime.accelerator, "scaler", None)  # fp16 outside DeepSpeed: GradScaler

    def set_lr(self) -> None:
        """The learning rate of the next step; call before its first backward (DeepSpeed steps inside the last one)."""
        if self.deepspeed:
            lr = self.table_host[min(self.position, self.last)]
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        else:
            self.lr.copy_(self.table[self.position.clamp(max=self.last)])

    def boundary(self):
        """After the window's last backward: step unless its gradients are non-finite, then zero them."""
        if self.deepspeed:
            engine = self.model
            applied = engine.was_step_applied()
            self.position += int(applied)
            norm = engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
            return not applied, norm
        if self.scaler is not None:
            self.runtime.accelerator.unscale_gradients()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        skipped = ~torch.isfinite(norm)
        if self.scaler is None:
            self.inner.found_inf = skipped.float()  # the fused kernel leaves weights and moments alone on 1
        self.optimizer.step()  # fp16: GradScaler finds the same non-finite gradients and skips
        self.optimizer.zero_grad(set_to_none=True)
        self.position += (~skipped).long()
        return skipped, norm

    def applied_position(self) -> int:
        """The schedule position as a host int (a sync outside DeepSpeed: for checkpoints and logs only)."""
        return int(self.position)

    def current_lr(self) -> float:
        return float(self.lr) if not self.deepspeed else float(self.optimizer.param_groups[0]["lr"])
