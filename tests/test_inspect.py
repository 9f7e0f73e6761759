"""dist-train inspect: finds what was planted, stays quiet on clean data, reports corrupt shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dist_train.data.inspect import inspect, main
from dist_train.data.schema import YAW_BUCKETS
from dist_train.data.shards import ShardSet, read_split, write_index, write_split


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_train", "inspect", *args], capture_output=True, text=True)


def write_val_only(out, arrays) -> None:
    """A one-split shard set written directly, bypassing pack (which would refuse or skip bad rows)."""
    entry = write_split(out, "val", arrays, shard_samples=256, block_size=128)
    write_index(out, {"val": entry}, fields=list(arrays), provenance={"test": "planted"}, block_size=128)


@pytest.fixture(scope="module")
def val_arrays(small_shards) -> dict[str, np.ndarray]:
    return read_split(ShardSet.open(small_shards), "val")


def test_clean_synthetic_set_reports_counts_and_no_false_alarms(small_shards, tmp_path, capsys):
    assert main([str(small_shards), "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png")]) == 0
    assert "no problems found" in capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    for key in ("n_samples", "n_identities", "bad_samples", "identity_baseline_cos", "per_yaw", "oracle_cos", "splits"):
        assert key in r
    assert (r["n_samples"], r["n_identities"], r["bad_samples"]) == (2400, 200, 0)
    assert list(r["per_yaw"]) == list(YAW_BUCKETS)
    assert r["suspicious_pairs"] == r["duplicates"] == r["landmark_disagreements"] == 0
    assert r["cross_split"] == {"identity_overlap": 0, "duplicate_rows": 0}
    synth = json.loads((small_shards / "index.json").read_text())["synth"]["per_split"]
    for split, s in synth.items():
        assert r["splits"][split]["identity_baseline_cos"] == pytest.approx(s["identity_baseline_cos"], abs=1e-6)
        assert r["splits"][split]["oracle_cos"] == pytest.approx(s["oracle_cos"], abs=1e-6)
        assert r["splits"][split]["yaw_bucket_counts"] == {b: e["n"] for b, e in s["per_yaw"].items()}
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_planted_problems_are_found_with_their_sample_indices(val_arrays, tmp_path):
    a = {k: v.copy() for k, v in val_arrays.items()}
    a["src_emb"][0, 5] = np.nan
    a["tgt_emb"][1] = 0.0
    swapped = list(range(10, 15))
    for i in swapped:  # frontal image of another person: a wrong frontal/frame match
        j = int(np.flatnonzero(val_arrays["identity"] != val_arrays["identity"][i])[i])
        a["tgt_emb"][i] = val_arrays["tgt_emb"][j]
    for k in a:  # row 20 stored twice
        a[k][20] = a[k][21]
    a["src_pose"][30, 2] += 45.0  # roll no longer matches the landmarks
    write_val_only(tmp_path / "planted", a)

    r, _ = inspect(tmp_path / "planted")
    val = r["splits"]["val"]
    assert (val["non_finite_rows"], val["zero_norm_rows"]) == (1, 1)
    assert val["fields"]["src_emb"]["non_finite_rows"] == 1 and val["fields"]["tgt_emb"]["zero_norm_rows"] == 1
    assert sorted(e["index"] for e in val["suspicious_pairs"]["listed"]) == swapped
    assert val["suspicious_pairs"]["count"] == len(swapped)
    assert val["duplicates"] == {"count": 1, "groups": [[20, 21]]}
    assert val["landmarks"]["checked"] == len(a["identity"])
    assert val["landmarks"]["disagree"] == 1 and val["landmarks"]["listed"][0]["index"] == 30
    assert len(r["warnings"]) == 4


def test_nearly_empty_profile_bucket_is_warned_about(val_arrays, tmp_path):
    keep = (np.abs(val_arrays["src_pose"][:, 1]) < 75) | (np.arange(len(val_arrays["identity"])) < 3)
    write_val_only(tmp_path / "few", {k: v[keep] for k, v in val_arrays.items()})
    r, _ = inspect(tmp_path / "few")
    n_far = r["splits"]["val"]["yaw_bucket_counts"]["75-90"]
    assert n_far <= 3
    assert any(f"bucket 75-90 holds only {n_far} of" in w for w in r["warnings"])


def test_truncated_shard_counts_bad_samples_and_still_exits_zero(small_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_shards, copy)
    tar = copy / "train-000003.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size * 6 // 10])
    done = run_inspect(str(copy), "--split", "train", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["splits_inspected"] == ["train"]
    assert r["bad_samples"] > 0 and r["bad_blocks"] > 0
    assert r["n_samples"] + r["bad_samples"] == 1680
    assert "unreadable" in done.stdout


def test_not_a_shard_set_exits_nonzero_with_a_clear_message(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no shard set" in err and "dist-train synth" in err
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
