"""Evaluation rows: a sample cap cuts rows and forward passes alike, equally on every rank."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_train import cli
from dist_train.checkpoint import save_consolidated
from dist_train.config import Config, ModelConfig
from dist_train.data.shards import ShardSet
from dist_train.evaluate import predict_split
from dist_train.model import build_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(d_model=32, nhead=2, num_layers=1, dim_feedforward=64, dropout=0.0))


def rows_and_forwards(model, shard_set, **kw) -> tuple[dict, int]:
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        rows = predict_split(model, shard_set, "val", batch_size=64, device="cpu", **kw)
    finally:
        hook.remove()
    return rows, len(calls)


@pytest.mark.parametrize("cap, rows_per_rank, forwards", [(None, 240, 4), (100, 50, 1), (300, 150, 3)])
def test_sample_cap_limits_rows_and_forward_passes_equally_on_every_rank(
    model, small_shards, cap, rows_per_rank, forwards
):
    shard_set = ShardSet.open(small_shards)  # val: 480 rows
    seen = []
    for rank in (0, 1):
        rows, calls = rows_and_forwards(model, shard_set, rank=rank, world_size=2, max_samples=cap)
        assert (len(rows["pred"]), calls) == (rows_per_rank, forwards)
        seen.append(rows["identity"])
    if cap is None:  # uncapped, the two ranks' rows are the whole split
        assert len(np.concatenate(seen)) == shard_set.n_samples("val")


def test_eval_in_bf16_agrees_with_fp32_and_refuses_fp16_without_cuda(small_shards, tmp_path):
    """`dist-train eval --precision bf16` (autocast) gives the fp32 mean cos to within 1e-3 on a model that corrects."""
    cfg = Config()
    cfg.model = ModelConfig(d_model=32, nhead=2, num_layers=1, dim_feedforward=64, dropout=0.0)
    torch.manual_seed(1)
    net = build_model(cfg.model)
    with torch.no_grad():
        net.residual.out.weight.normal_(0, 0.05)  # away from the zero-initialised identity map
    path = save_consolidated(tmp_path / "m.safetensors", net.state_dict(), cfg)
    cos = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        argv = ["eval", "--checkpoint", str(path), "--shards", str(small_shards), "--device", "cpu"]
        assert cli.main([*argv, "--precision", precision, "--json", str(out)]) == 0
        cos[precision] = json.loads(out.read_text())
    assert abs(cos["fp32"]["mean_cos"] - cos["fp32"]["identity_baseline_cos"]) > 0.01, "the model must change things"
    assert cos["bf16"]["mean_cos"] == pytest.approx(cos["fp32"]["mean_cos"], abs=1e-3)
    argv = ["eval", "--checkpoint", str(path), "--shards", str(small_shards), "--device", "cpu", "--precision", "fp16"]
    assert cli.main(argv) == 2
