"""dist-train probe: the closed-form ridge equals an in-memory solve, its streamed metrics equal metrics.quality,
it is cached beside the set (keyed by index.json), and eval prints it and the data ceiling beside val cos."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_train import cli, probe
from dist_train.ceiling import identity_hashes
from dist_train.data.blocks import read_split
from dist_train.data.schema import YAW_BUCKETS
from dist_train.data.shards import ShardSet, write_index, write_split
from dist_train.metrics import MAX_PAIR_SAMPLES, quality
from dist_train.synth import SynthParams, generate, make_shard_set

REPO = Path(__file__).resolve().parent.parent


def run_cli(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(argv)
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def big_val(tmp_path_factory) -> Path:
    """Train 2,160 rows, val 5,040 rows: more val rows than the TAR@FAR pair sample (MAX_PAIR_SAMPLES)."""
    out = tmp_path_factory.mktemp("probe") / "set"
    make_shard_set(
        out, SynthParams(n_identities=600, samples_per_identity=12, seed=21), val_fraction=0.7, shard_samples=1024,
        block_size=256,
    )  # fmt: skip
    return out


def test_streamed_val_metrics_equal_metrics_quality_on_all_predictions(big_val):
    shard_set = ShardSet.open(big_val)
    fitted = probe.fit(shard_set)
    val = read_split(shard_set, "val")
    assert len(val["identity"]) > MAX_PAIR_SAMPLES
    pred = probe.predict(fitted["weights"], val["src_emb"], val["src_pose"])
    want = quality(pred, val["tgt_emb"], val["src_emb"], val["src_pose"][:, 1], val["identity"])
    got = probe.evaluate(shard_set, "val", fitted["weights"])
    for key in ("mean_cos", "identity_baseline_cos", "gain", "impostor_cos", "baseline_impostor_cos"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["n"] == want["n"] and got["tar_at_far"] == want["tar_at_far"]
    for b, e in want["per_yaw"].items():
        assert got["per_yaw"][b] == pytest.approx({k: e[k] for k in ("n", "cos", "baseline")}, abs=1e-9)
    assert got["frr_at_far"]["0.001"]["pred"] == pytest.approx(1 - want["tar_at_far"]["0.001"]["pred"])


def test_normal_equations_give_the_in_memory_ridge_solution(small_shards):
    """One streamed pass (held-out identities set aside, then added back) = the ridge of all train rows at once."""
    shard_set = ShardSet.open(small_shards)
    fitted = probe.fit(shard_set)
    a = read_split(shard_set, "train")
    x = probe.features(a["src_emb"], a["src_pose"])
    y = a["tgt_emb"].astype(np.float64) - a["src_emb"]
    gram = x.T @ x
    lam = fitted["ridge"]["alpha"] * np.mean(np.diag(gram)[:512])
    assert fitted["ridge"]["lambda"] == pytest.approx(lam, rel=1e-9)
    penalty = np.full(len(gram), lam)
    penalty[-1] = 0.0  # the bias is not penalised
    w = np.linalg.solve(gram + np.diag(penalty), x.T @ y)
    np.testing.assert_allclose(fitted["weights"], w, atol=1e-8)
    t = fitted["train"]
    held = identity_hashes(a["identity"]) < np.uint64(int(probe.holdout_fraction(1680) * 2.0**64))
    assert t["rows"] == 1680 and t["holdout_rows"] == int(held.sum()) > 0
    assert [g["alpha"] for g in fitted["ridge"]["grid"]] == list(probe.RIDGE_ALPHAS)
    best = max(fitted["ridge"]["grid"], key=lambda g: g["holdout_cos"])
    assert fitted["ridge"]["alpha"] == best["alpha"]


def test_probe_sits_between_baseline_and_oracle_on_synthetic_data(big_val):
    """The synthetic distortion depends on the pose, so no linear map undoes it: above the baseline, below the oracle."""
    p = probe.run_probe(big_val)
    v = p["val"]
    synth = json.loads((big_val / "index.json").read_text())["synth"]["per_split"]["val"]
    assert v["identity_baseline_cos"] == pytest.approx(synth["identity_baseline_cos"], abs=1e-6)
    assert synth["identity_baseline_cos"] + 0.005 < v["mean_cos"] < synth["oracle_cos"] - 0.05
    assert set(v["per_yaw"]) == set(YAW_BUCKETS)
    assert v["per_yaw"]["75-90"]["cos"] > v["per_yaw"]["75-90"]["baseline"]  # most to gain at full profile


def test_cli_writes_json_caches_beside_the_set_and_refits_when_the_set_changes(small_shards, tmp_path):
    import shutil

    copy = tmp_path / "set"
    shutil.copytree(small_shards, copy)
    code, out = run_cli(["probe", str(copy), "--json", str(tmp_path / "p.json")])
    assert code == 0 and "probe cos" in out and "cached in" in out
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["index_sha256"] == probe.set_key(copy) and p["val"]["split"] == "val"
    cached = json.loads((copy / probe.PROBE_NAME).read_text())
    assert cached["val"] == p["val"]
    code, out = run_cli(["probe", str(copy)])  # second call: read, not refitted
    assert code == 0 and "read from" in out
    assert probe.read_cached(copy)["val"]["mean_cos"] == p["val"]["mean_cos"]
    index = json.loads((copy / "index.json").read_text())
    index["provenance"]["changed"] = True  # any change to index.json: another set as far as the cache knows
    (copy / "index.json").write_text(json.dumps(index))
    assert probe.read_cached(copy) is None
    found, note = probe.probe_for(copy, run=False)
    assert found is None and "dist-train probe" in note
    assert run_cli(["probe", str(tmp_path / "missing")])[0] == 2


def test_cache_falls_back_to_the_run_dir_when_the_set_dir_is_not_writable(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")  # writing not_a_dir/probe.json fails as on a read-only set
    note = probe.write_cache({"x": 1}, not_a_dir, fallback=tmp_path / "run")
    assert "run/probe.json" in note and "not writable" in note
    assert json.loads((tmp_path / "run" / probe.PROBE_NAME).read_text()) == {"x": 1}
    assert "not cached" in probe.write_cache({"x": 1}, not_a_dir)


def test_rows_with_non_finite_or_zero_norm_embeddings_are_skipped_and_counted(tmp_path):
    a = generate(SynthParams(n_identities=60, samples_per_identity=8, seed=5))
    a = {k: v.copy() for k, v in a.items()}
    a["src_emb"][3, 7] = np.nan
    a["tgt_emb"][10] = 0.0
    a["src_pose"][400, 1] = np.inf
    ids = a["identity"]
    splits = {"train": ids < 48, "val": ids >= 48}
    entries = {s: write_split(tmp_path, s, {k: v[m] for k, v in a.items()}, block_size=64) for s, m in splits.items()}
    write_index(tmp_path, entries, fields=list(a), provenance={"test": "nan"}, block_size=64)
    p = probe.run_probe(tmp_path)
    assert p["train"]["invalid_rows"] == 2 and p["val"]["invalid_rows"] == 1
    assert p["train"]["rows"] == 382 and p["val"]["n"] == 95
    assert np.isfinite(p["val"]["mean_cos"])


def test_eval_prints_the_data_ceiling_and_cached_probe_beside_val_cos(small_shards, tmp_path):
    import shutil

    import torch

    from dist_train.checkpoint import save_consolidated
    from dist_train.config import build
    from dist_train.model import build_model

    copy = tmp_path / "set"
    shutil.copytree(small_shards, copy)
    cfg = build({"d_model": 32, "nhead": 2, "num_layers": 1, "dim_feedforward": 64, "data_dir": None})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ckpt = save_consolidated(tmp_path / "m.safetensors", model.state_dict(), cfg)
    argv = ["eval", "--checkpoint", str(ckpt), "--shards", str(copy), "--json", str(tmp_path / "e.json")]
    code, out = run_cli(argv)
    assert code == 0
    summary = json.loads(out)
    assert list(summary)[:4] == ["n", "mean_cos", "data_ceiling", "linear_probe_cos"]
    assert abs(summary["data_ceiling"]["cos"] - 1 / np.sqrt(1 + 0.2**2)) < 0.02  # synth's default target noise
    assert "not cached" in summary["linear_probe_cos"]
    assert run_cli(["probe", str(copy)])[0] == 0
    code, out = run_cli(argv)
    summary, m = json.loads(out), json.loads((tmp_path / "e.json").read_text())
    assert summary["linear_probe_cos"] == probe.read_cached(copy)["val"]["mean_cos"]
    assert set(summary["frr_at_far_0.001"]) == {"model", "baseline", "probe"}
    assert m["data_ceiling"]["n_identities"] == 40 and m["linear_probe"]["cache"].endswith("probe.json")


def test_probe_benchmark_runs_and_reports_both_sizes():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_probe.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| rows | train rows | seconds | fit s | eval s | cpu s | rows/s |" in done.stdout
    for n in ("2,048", "6,144"):
        assert re.search(rf"\| +{n} \| +[\d,]+ \| +[\d.]+ \| +[\d.]+ \| +[\d.]+ \| +[\d.]+ \|", done.stdout), (
            done.stdout
        )
