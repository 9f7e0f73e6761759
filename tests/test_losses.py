"""FrontalLoss: term values on known vectors, weighting, the MSE/cosine gradient ratio, contrastive masking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_train.config import LossConfig
from dist_train.losses import FrontalLoss, mse_to_cos_gradient_ratio


def unit(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_terms_on_known_vectors_and_weighting():
    e = torch.eye(512)
    pred = torch.stack([e[0], e[1], e[2]])
    target = torch.stack([e[1], e[1], -e[2]])  # orthogonal, identical, opposite
    total, terms = FrontalLoss(LossConfig(mse_weight=0.2, cosine_weight=0.8))(pred, target, torch.arange(3))
    # per row: cos 0, 1, -1 -> 1 - cos = 1, 0, 2; squared distance 2, 0, 4 over 512 dims
    assert terms["cos"].item() == pytest.approx(1.0)
    assert terms["mse"].item() == pytest.approx((2 + 0 + 4) / (3 * 512))
    assert total.item() == pytest.approx(0.2 * terms["mse"].item() + 0.8 * terms["cos"].item())
    assert set(terms) == {"mse", "cos"}
    assert all(t.dim() == 0 and not t.requires_grad for t in terms.values())

    one = FrontalLoss(LossConfig())(e[:1], e[1:2], torch.arange(1))[1]
    assert one["cos"].item() == pytest.approx(1.0) and one["mse"].item() == pytest.approx(2 / 512)


def test_mse_gradient_is_1_over_256_of_the_cosine_gradient():
    ratio = mse_to_cos_gradient_ratio()
    assert ratio == pytest.approx(1 / 256)
    raw = torch.randn(8, 512, generator=torch.Generator().manual_seed(1), requires_grad=True)
    target = unit(8, seed=2)
    mse_only = FrontalLoss(LossConfig(mse_weight=1.0, cosine_weight=0.0))
    cos_only = FrontalLoss(LossConfig(mse_weight=0.0, cosine_weight=1.0))

    # through the model's final L2 normalisation: exactly 2/512, same direction
    (g_mse,) = torch.autograd.grad(mse_only(F.normalize(raw, dim=-1), target)[0], raw)
    (g_cos,) = torch.autograd.grad(cos_only(F.normalize(raw, dim=-1), target)[0], raw)
    assert (g_mse.norm() / g_cos.norm()).item() == pytest.approx(ratio, rel=1e-4)
    assert F.cosine_similarity(g_mse.flatten(), g_cos.flatten(), dim=0).item() == pytest.approx(1.0, abs=1e-5)

    # on the unit vectors themselves the cosine gradient lacks the radial part: per row the ratio is
    # (2/512) * sqrt(2 / (1 + cos)), from 1/256 at cos 1 up to sqrt(2)/256 at cos 0
    pred = F.normalize(raw.detach(), dim=-1).requires_grad_()
    (g_mse,) = torch.autograd.grad(mse_only(pred, target)[0], pred)
    (g_cos,) = torch.autograd.grad(cos_only(pred, target)[0], pred)
    cos = (pred * target).sum(-1).detach()
    want = ratio * torch.sqrt(2 / (1 + cos))
    assert torch.allclose(g_mse.norm(dim=-1) / g_cos.norm(dim=-1), want, rtol=1e-4)


def reference_info_nce(pred, target, identity, temperature):
    """Row i: -log softmax over {i} and the rows of other identities; written out row by row."""
    sims = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / temperature
    losses = []
    for i in range(len(pred)):
        allowed = [j for j in range(len(pred)) if j == i or identity[j] != identity[i]]
        losses.append(-(sims[i, i] - torch.logsumexp(sims[i, allowed], dim=0)))
    return torch.stack(losses).mean()


def test_contrastive_term_masks_other_rows_of_the_same_identity():
    cfg = LossConfig(mse_weight=0.1, cosine_weight=0.9, contrastive_weight=0.5, contrastive_temperature=0.1)
    loss_fn = FrontalLoss(cfg)
    pred, target = unit(6, seed=3), unit(6, seed=4)
    identity = torch.tensor([7, 7, 3, 3, 3, 9])
    total, terms = loss_fn(pred, target, identity)
    want = reference_info_nce(pred, target, identity, 0.1)
    assert terms["contrastive"].item() == pytest.approx(want.item(), rel=1e-5)
    weighted = 0.1 * terms["mse"] + 0.9 * terms["cos"] + 0.5 * terms["contrastive"]
    assert total.item() == pytest.approx(weighted.item(), rel=1e-6)
    # without the mask the same batch would score differently
    unmasked = reference_info_nce(pred, target, torch.arange(6), 0.1)
    assert abs(unmasked.item() - want.item()) > 0.1

    # a batch of one identity has no negatives at all: nothing to push apart, whatever the vectors
    _, alone = loss_fn(pred, target, torch.full((6,), 5))
    assert alone["contrastive"].item() == pytest.approx(0.0, abs=1e-6)
    # perfect predictions of distinct identities with a low temperature cost almost nothing
    _, perfect = loss_fn(target, target, torch.arange(6))
    assert perfect["contrastive"].item() < 1e-3


def test_contrastive_gradient_ignores_a_same_identity_target():
    loss_fn = FrontalLoss(
        LossConfig(mse_weight=0.0, cosine_weight=0.0, contrastive_weight=1.0, contrastive_temperature=0.5)
    )
    target = unit(3, seed=5)
    pred = unit(3, seed=6).requires_grad_()
    (with_twin,) = torch.autograd.grad(loss_fn(pred, target, torch.tensor([0, 0, 1]))[0], pred)
    # row 0's gradient is the same as if row 1 (the same identity) were not in the batch
    pair = pred.detach()[[0, 2]].requires_grad_()
    (without,) = torch.autograd.grad(loss_fn(pair, target[[0, 2]], torch.tensor([0, 1]))[0], pair)
    assert torch.allclose(with_twin[0] * 3, without[0] * 2, atol=1e-6)  # mean over 3 rows vs over 2
    # while a row of another identity does change it
    (distinct,) = torch.autograd.grad(loss_fn(pred, target, torch.tensor([0, 2, 1]))[0], pred)
    assert (distinct[0] * 3 - without[0] * 2).abs().max() > 1e-3


def test_bad_inputs_are_named():
    loss_fn = FrontalLoss(LossConfig(contrastive_weight=0.1))
    with pytest.raises(ValueError, match="needs identity of shape"):
        loss_fn(unit(4), unit(4), None)
    with pytest.raises(ValueError, match=r"pred has shape \(4, 512\) but target has \(3, 512\)"):
        loss_fn(unit(4), unit(3), torch.arange(4))
    # without the contrastive term identity is not needed
    FrontalLoss(LossConfig())(unit(4), unit(4))


def test_half_precision_inputs_reduce_in_float32():
    pred, target = unit(4, seed=6), unit(4, seed=7)
    total, terms = FrontalLoss(LossConfig(contrastive_weight=0.2))(pred.half(), target.half(), torch.arange(4))
    ref_total, ref_terms = FrontalLoss(LossConfig(contrastive_weight=0.2))(pred, target, torch.arange(4))
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-3)
    assert terms["mse"].item() == pytest.approx(ref_terms["mse"].item(), rel=1e-2)
