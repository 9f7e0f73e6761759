"""Training loss: ``mse_weight * MSE + cosine_weight * (1 - cos) [+ contrastive_weight * InfoNCE]``.

MSE is ``nn.functional.mse_loss`` (mean over batch and the 512 dims); the
cosine term is the batch mean of 1 - cos(pred, target), as the design notes
define them.

Term balance: for unit vectors ||p - t||^2 = 2 - 2 cos, so MSE averaged over
512 dims equals (2 - 2 cos) / 512 = (1 - cos) / 256. Through the model's final
L2 normalisation its gradient is exactly 2/512 = 1/256 of the cosine term's
at equal weight (`mse_to_cos_gradient_ratio`): an MSE weight of 0.2 next to a
cosine weight of 0.8 contributes well under 0.1% of the gradient.

The optional in-batch contrastive term (InfoNCE of each prediction against the
batch's frontal targets) keeps regression toward targets from pulling
different identities together. Other rows of the same identity are masked
out: they are not negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import LossConfig
from dist_train.data.schema import EMB_DIM


def mse_to_cos_gradient_ratio(emb_dim: int = EMB_DIM) -> float:
    """Gradient of the MSE term relative to the (1 - cos) term for unit vectors at equal weight: 2 / emb_dim."""
    return 2.0 / emb_dim


def contrastive_loss(
    pred: torch.Tensor, target: torch.Tensor, identity: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE: row i must pick target i among the batch's targets; same-identity rows j != i are not negatives."""
    logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / temperature
    same = identity[:, None] == identity[None, :]
    diagonal = torch.eye(len(identity), dtype=torch.bool, device=identity.device)
    logits = logits.masked_fill(same & ~diagonal, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(identity), device=logits.device))


class FrontalLoss(nn.Module):
    """``total, terms = loss(pred, target, identity)``; terms are unweighted, detached 0-d tensors."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def term_names(self) -> tuple[str, ...]:
        """The keys of ``terms`` that ``forward`` returns."""
        return ("mse", "cos") + (("contrastive",) if self.cfg.contrastive_weight > 0 else ())

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, identity: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if pred.shape != target.shape:
            raise ValueError(f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")
        pred, target = pred.float(), target.float()  # reduce in float32 under fp16/bf16
        terms = {
            "mse": F.mse_loss(pred, target),
            "cos": (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean(),
        }
        total = self.cfg.mse_weight * terms["mse"] + self.cfg.cosine_weight * terms["cos"]
        if self.cfg.contrastive_weight > 0:
            if identity is None or identity.shape != pred.shape[:1]:
                got = None if identity is None else tuple(identity.shape)
                raise ValueError(
                    f"contrastive_weight > 0 needs identity of shape ({pred.shape[0]},), got {got}; "
                    "pass the batch's identity ids or set contrastive_weight 0"
                )
            terms["contrastive"] = contrastive_loss(pred, target, identity, self.cfg.contrastive_temperature)
            total = total + self.cfg.contrastive_weight * terms["contrastive"]
        return total, {name: value.detach() for name, value in terms.items()}
