"""What the steps of a log interval did, kept on the device and read once per interval.

Reading a loss or a finiteness flag on the host after every micro batch stalls
a GPU until it catches up; here each value is added into a device tensor and the
interval's sums cross to the host in one all-reduce and one copy when the
logger, the evaluator or the checkpointer asks (``read``).

Per micro batch: the loss and each term, summed over micro batches whose loss
is finite (so means are over the values that exist, and over all ranks). Per
optimizer step: whether any rank's window had a non-finite loss, and whether
the step was skipped. The host learns the per-step flags at ``read`` time,
which is when divergence (``max_bad_steps`` non-finite windows in a row) is
judged; skipped steps change no weight, so judging a few steps late costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dist_train.runtime import all_reduce_


@dataclass
class Interval:
    """Host values of the steps between two reads (or several such intervals merged)."""

    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # loss, loss_<term>: over micro batches with a finite loss
    count: float = 0.0  # those micro batches, over all ranks
    norm_sum: float = 0.0  # grad norm over applied steps
    norm_count: float = 0.0
    nonfinite: list[bool] = field(default_factory=list)  # per step: some rank's window had a non-finite loss
    skipped: list[bool] = field(default_factory=list)  # per step: the optimizer did not apply it
    votes: list[bool] = field(default_factory=list)  # per question asked at the read: did any rank say yes

    @property
    def means(self) -> dict[str, float]:
        """loss, loss_<term> and grad_norm, each over the values that exist (none: absent)."""
        out = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        if self.norm_count:
            out["grad_norm"] = self.norm_sum / self.norm_count
        return out

    @property
    def nonfinite_steps(self) -> int:
        return sum(self.nonfinite)

    @property
    def overflow_steps(self) -> int:
        """Skipped with finite losses: fp16 gradient overflow (loss scale calibration)."""
        return sum(s and not n for s, n in zip(self.skipped, self.nonfinite))

    def merge(self, other: Interval) -> None:
        self.steps += other.steps
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += other.count
        self.norm_sum += other.norm_sum
        self.norm_count += other.norm_count
        self.nonfinite += other.nonfinite
        self.skipped += other.skipped


class StepStats:
    def __init__(self, terms: tuple[str, ...], device, world_size: int):
        self.keys = ("loss", *(f"loss_{t}" for t in terms))
        self.device, self.world_size = device, world_size
        self._new_interval()

    def _new_interval(self) -> None:
        z = torch.zeros
        self.sums = z(len(self.keys) + 1, dtype=torch.float64, device=self.device)  # values..., count
        self.window_bad = z((), dtype=torch.float64, device=self.device)
        self.flags: list[torch.Tensor] = []  # per step: (window_bad, skipped) on the device
        self.norm_sum = z((), dtype=torch.float64, device=self.device)
        self.norm_count = z((), dtype=torch.float64, device=self.device)
        self.host_flags: list[tuple[bool, bool]] = []

    def micro(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        values = torch.stack([loss.detach(), *(terms[k[5:]] for k in self.keys[1:])]).double()
        finite = torch.isfinite(values[0])
        self.sums[:-1] += torch.where(finite, values, 0.0)
        self.sums[-1] += finite.double()
        self.window_bad = torch.maximum(self.window_bad, (~finite).double())

    def boundary(self, skipped, grad_norm) -> None:
        """One optimizer step: ``skipped``/``grad_norm`` are device tensors or host values."""
        if isinstance(skipped, torch.Tensor):
            self.flags.append(torch.stack([self.window_bad, skipped.double()]))
            ok = ~skipped & torch.isfinite(grad_norm)
            self.norm_sum += torch.where(ok, grad_norm.double(), 0.0)
            self.norm_count += ok.double()
        else:
            self.flags.append(torch.stack([self.window_bad, torch.tensor(float(skipped), device=self.device)]))
            if not skipped and grad_norm == grad_norm and abs(grad_norm) != float("inf"):
                self.norm_sum += grad_norm
                self.norm_count += 1
        self.window_bad = torch.zeros((), dtype=torch.float64, device=self.device)

    def read(self, votes: tuple[bool, ...] = ()) -> Interval:
        """Collective when distributed: every rank must call it at the same step.

        ``votes``: this rank's yes/no on questions the ranks must answer together (a stop request, a
        checkpoint due by this rank's clock); ``Interval.votes`` holds whether any rank said yes.
        """
        flags = torch.stack(self.flags) if self.flags else torch.zeros(0, 2, dtype=torch.float64, device=self.device)
        either = torch.cat([flags.flatten(), torch.tensor(votes, dtype=torch.float64, device=self.device)])
        if self.world_size > 1:
            all_reduce_(self.sums)  # loss sums and counts over ranks
            all_reduce_(either, op="max")
        sums, either = self.sums.tolist(), either.tolist()
        steps = len(self.flags)
        out = Interval(
            steps=steps,
            sums=dict(zip(self.keys, sums)),
            count=sums[-1],
            norm_sum=float(self.norm_sum),
            norm_count=float(self.norm_count),
            nonfinite=[bool(a) for a in either[0 : 2 * steps : 2]],
            skipped=[bool(b) for b in either[1 : 2 * steps : 2]],
            votes=[bool(v) for v in either[2 * steps :]],
        )
        self._new_interval()
        return out
