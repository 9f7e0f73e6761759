"""Several shard sets read together: weights, identities kept apart, fields checked, every command takes the list."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST_TRAIN_FLAGS, REPO, RUN_ENV, RUN_TIMEOUT_S

from dist_train import config as config_mod
from dist_train.config import ConfigError
from dist_train.data.blocks import PART_IDENTITY_STRIDE
from dist_train.data.shards import ShardSet
from dist_train.data.stream import TrainStream


def part_of(ids: np.ndarray) -> np.ndarray:
    return ids // PART_IDENTITY_STRIDE


@pytest.mark.parametrize("weights, share", [(None, 2400 / (2400 + 1680)), ((1, 3), 0.25), ((9, 1), 0.9)])
def test_weights_are_the_sets_shares_of_the_rows_drawn(demo_shards, small_shards, weights, share):
    """Without weights rows are drawn in proportion to each set's size; with weights, in those shares."""
    sets = [ShardSet.open(demo_shards), ShardSet.open(small_shards)]
    drawn = []
    for rank in range(4):
        s = TrainStream(
            sets, batch_size=64, rank=rank, world_size=4, batches_per_epoch=80, num_workers=0, weights=weights
        )
        drawn.append(np.concatenate([b["identity"].numpy() for b in s]))
    first = float((part_of(np.concatenate(drawn)) == 0).mean())
    assert first == pytest.approx(share, abs=0.05)


def test_exact_epochs_over_two_sets_read_each_row_once_with_identities_apart(demo_shards, small_shards):
    sets = [ShardSet.open(demo_shards), ShardSet.open(small_shards)]
    total = sum(s.n_samples("train") for s in sets)
    rows, ids = [], []
    for rank in range(2):
        s = TrainStream(sets, batch_size=64, rank=rank, world_size=2, batches_per_epoch=total // 128, num_workers=0,
                        resampled=False, trace_rows=True)  # fmt: skip
        for b in s:
            rows.append(b["row"].numpy())
            ids.append(b["identity"].numpy())
    rows, ids = np.concatenate(rows), np.concatenate(ids)
    assert len(rows) == len(set(rows.tolist())) == total // 128 * 128
    first = rows < sets[0].n_samples("train")
    assert (part_of(ids[first]) == 0).all() and (part_of(ids[~first]) == 1).all(), "set 2's ids are offset"
    with pytest.raises(ValueError, match="resampled=True"):
        TrainStream(sets, batch_size=8, batches_per_epoch=2, resampled=False, weights=(1, 1))


def test_weights_are_checked_against_the_sets_and_the_mode(demo_shards):
    with pytest.raises(ConfigError, match="one weight per data_dir"):
        config_mod.build({"data_dir": [str(demo_shards)], "data_weights": [1, 2]})
    with pytest.raises(ConfigError, match="sampling weights need resampled: true"):
        config_mod.build({"data_dir": [str(demo_shards)] * 2, "data_weights": [1, 2], "resampled": False})
    with pytest.raises(ConfigError, match="every weight must be positive"):
        config_mod.build({"data_dir": [str(demo_shards)] * 2, "data_weights": [1, 0]})


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dist_train", *args], capture_output=True, text=True, cwd=REPO,
        timeout=RUN_TIMEOUT_S, env={**os.environ, **RUN_ENV},
    )  # fmt: skip


def test_training_on_two_sets_reports_each_and_eval_inspect_take_the_same_list(demo_shards, small_shards, tmp_path):
    out = tmp_path / "run"
    flags = ["train", *FAST_TRAIN_FLAGS, "--data_dir", str(demo_shards), str(small_shards), "--data_weights", "1", "1"]
    done = run(*flags, "--output_dir", str(out), "--max_steps", "6", "--eval_max_samples", "5000")
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(sorted((out / "metrics").glob("eval-step*.json"))[-1].read_text())
    val = {str(demo_shards): 600, str(small_shards): 480}
    assert {k: v["n"] for k, v in m["per_set"].items()} == val and m["n"] == sum(val.values())
    assert json.loads((out / "metrics" / "test.json").read_text())["n"] == 240, "the set that has a test split"
    evaluated = run("eval", "--checkpoint", str(out / "best" / "model.safetensors"), "--shards", str(demo_shards),
                    str(small_shards), "--device", "cpu", "--json", str(tmp_path / "m.json"))  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert {k: v["n"] for k, v in json.loads((tmp_path / "m.json").read_text())["per_set"].items()} == val
    inspected = run(
        "inspect", str(demo_shards), str(small_shards), "--split", "val", "--json", str(tmp_path / "i.json")
    )
    assert inspected.returncode == 0 and set(json.loads((tmp_path / "i.json").read_text())["sets"]) == set(val)


def test_a_set_without_a_field_the_run_reads_is_refused_before_training(demo_shards, small_shards, tmp_path):
    lacking = tmp_path / "no_centroid"
    shutil.copytree(demo_shards, lacking)
    index = json.loads((lacking / "index.json").read_text())
    index["fields"].remove("tgt_centroid")
    (lacking / "index.json").write_text(json.dumps(index))
    refused = run("train", *FAST_TRAIN_FLAGS, "--data_dir", str(small_shards), str(lacking), "--target", "centroid",
                  "--output_dir", str(tmp_path / "r"))  # fmt: skip
    assert refused.returncode == 2 and "has no tgt_centroid" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "r").exists()
