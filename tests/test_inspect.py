"""dist-train inspect: finds what was planted, stays quiet on clean data, reports corrupt shards; streams in bounded memory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from dist_train import ceiling
from dist_train import inspect_cmd as inspect_module
from dist_train.ceiling import row_hashes
from dist_train.data.blocks import read_split
from dist_train.data.schema import EMBEDDING_FIELDS, YAW_BUCKETS, ZERO_NORM, yaw_bucket_index
from dist_train.data.shards import ShardSet, write_index, write_split
from dist_train.inspect_cmd import (
    COS_BIN,
    LANDMARK_CHECK_MAX,
    MIN_ROBUST_SD,
    OFF_UNIT,
    SUSPICIOUS_ROBUST_Z,
    CosHistogram,
    LandmarkRows,
    Reservoir,
    inspect,
    main,
)
from dist_train.metrics import quality, row_cos
from dist_train.synth import SynthParams, generate

REPO = Path(__file__).resolve().parent.parent


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


# --- streaming: the same figures as the in-memory computation, in bounded memory ----------------------


def reference_split(a: dict[str, np.ndarray]) -> dict:
    """The exact figures of one split computed the old way, from the whole split in memory (read_split)."""
    n = len(a["identity"])
    non_finite = ~np.isfinite(np.concatenate([a[k].reshape(n, -1) for k in a if k != "identity"], axis=1)).all(1)
    norms = {k: np.linalg.norm(a[k].astype(np.float64), axis=1) for k in EMBEDDING_FIELDS if k in a}
    zero = np.any([nm < ZERO_NORM for nm in norms.values()], axis=0) & ~non_finite
    clean = ~(non_finite | zero)
    pose = a["src_pose"][np.isfinite(a["src_pose"]).all(1)]
    r = {
        "n_samples": n,
        "n_identities": len(np.unique(a["identity"])),
        "yaw_bucket_counts": {b: int((yaw_bucket_index(pose[:, 1]) == i).sum()) for i, b in enumerate(YAW_BUCKETS)},
        "yaw_histogram": np.histogram(np.clip(pose[:, 1], -90, 90), bins=np.arange(-90.0, 91.0, 10.0))[0].tolist(),
        "pitch_histogram": np.histogram(np.clip(pose[:, 0], -60, 60), bins=np.arange(-60.0, 61.0, 10.0))[0].tolist(),
        "non_finite_rows": int(non_finite.sum()),
        "zero_norm_rows": int(zero.sum()),
        "clean_rows": int(clean.sum()),
        "fields": {},
    }
    for k in (k for k in a if k != "identity"):
        r["fields"][k] = {"non_finite_rows": int((~np.isfinite(a[k].reshape(n, -1)).all(1)).sum())}
        if k in norms:
            ok = norms[k][np.isfinite(norms[k])]
            r["fields"][k] |= {"zero_norm_rows": int((ok < ZERO_NORM).sum())}
            r["fields"][k]["norm"] = {"min": ok.min(), "mean": ok.mean(), "max": ok.max()}
            r["fields"][k]["norm"]["off_unit_rows"] = int((np.abs(ok - 1) > OFF_UNIT).sum())
    c = {k: v[clean] for k, v in a.items()}
    q = quality(c["src_emb"], c["tgt_emb"], c["src_emb"], c["src_pose"][:, 1], c["identity"], c["oracle_emb"])
    r |= {k: q[k] for k in ("identity_baseline_cos", "oracle_cos", "baseline_impostor_cos")}
    r["baseline_tar_at_far"] = {far: e["baseline"] for far, e in q["tar_at_far"].items()}
    r["per_yaw"] = {b: {k: e[k] for k in ("n", "baseline", "oracle")} for b, e in q["per_yaw"].items()}
    r["suspicious"] = reference_suspicious(c, np.flatnonzero(clean))
    finite = np.isfinite(a["src_kps"].reshape(n, -1)).all(1) & np.isfinite(a["src_pose"]).all(1)
    r["landmarks_checked"] = min(int(finite.sum()), LANDMARK_CHECK_MAX)
    _, inverse, counts = np.unique(a["src_emb"], axis=0, return_inverse=True, return_counts=True)
    r["duplicates"] = (
        n - len(counts),
        sorted(np.flatnonzero(inverse.ravel() == g).tolist() for g in np.flatnonzero(counts > 1)),
    )
    return r


def assert_close(got, want, path: str) -> None:
    """Equal structure and keys; ints equal, floats within 1e-9."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            assert_close(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, (int, np.integer)):
        assert got == want, path
    else:
        assert got == pytest.approx(float(want), rel=0, abs=1e-9), path


def reference_suspicious(c: dict[str, np.ndarray], index: np.ndarray) -> list[int]:
    """Row indices with robust z < -SUSPICIOUS_ROBUST_Z, from exact per-bucket medians and MADs."""
    cos = row_cos(c["src_emb"], c["tgt_emb"])
    bucket = yaw_bucket_index(c["src_pose"][:, 1])
    flagged = []
    for b in np.unique(bucket):
        m = bucket == b
        med = np.median(cos[m])
        sd = max(1.4826 * np.median(np.abs(cos[m] - med)), MIN_ROBUST_SD)
        flagged += index[m][(cos[m] - med) / sd < -SUSPICIOUS_ROBUST_Z].tolist()
    return sorted(flagged)


@pytest.fixture(scope="module")
def leaky_set(small_shards, tmp_path_factory) -> tuple:
    """Two splits with planted problems in several shards, and 3 val rows (and identities) copied into train."""
    s = ShardSet.open(small_shards)
    val, train = read_split(s, "val"), read_split(s, "train")
    val["src_emb"][0, 5] = np.nan
    val["tgt_emb"][1] = 0.0
    val["src_kps"][2, 7, 1] = np.inf
    for i in [10, 11, 200, 201, 470]:  # wrong frontal images, in different blocks and shards
        val["tgt_emb"][i] = val["tgt_emb"][(i + 240) % 480]
    for dst, src in ((20, 21), (300, 40), (301, 40)):
        for k in val:
            val[k][dst] = val[k][src]
    val["src_pose"][30, 2] += 45.0
    for k in train:
        train[k][[5, 900, 1600]] = val[k][[100, 101, 102]]
    out = tmp_path_factory.mktemp("leaky") / "set"
    entries = {
        name: write_split(out, name, a, shard_samples=256, block_size=128)
        for name, a in (("train", train), ("val", val))
    }
    write_index(out, entries, fields=list(val), provenance={"test": "planted"}, block_size=128)
    return out, {"train": train, "val": val}


def test_streamed_report_equals_the_in_memory_computation(leaky_set):
    out, arrays = leaky_set
    r, _ = inspect(out)
    for split, a in arrays.items():
        got, want = r["splits"][split], reference_split(a)
        for key in (
            "n_samples",
            "n_identities",
            "yaw_bucket_counts",
            "non_finite_rows",
            "zero_norm_rows",
            "clean_rows",
        ):
            assert got[key] == want[key], key
        assert got["yaw_histogram"]["counts"] == want["yaw_histogram"]
        assert got["pitch_histogram"]["counts"] == want["pitch_histogram"]
        for key in ("fields", "identity_baseline_cos", "oracle_cos", "baseline_impostor_cos", "baseline_tar_at_far"):
            assert_close(got[key], want[key], key)
        assert_close(got["per_yaw"], want["per_yaw"], "per_yaw")
        assert sorted(e["index"] for e in got["suspicious_pairs"]["listed"]) == want["suspicious"]
        assert got["suspicious_pairs"]["count"] == len(want["suspicious"])
        assert (got["duplicates"]["count"], sorted(got["duplicates"]["groups"])) == want["duplicates"]
        assert got["landmarks"]["checked"] == want["landmarks_checked"]
    val = r["splits"]["val"]
    assert val["suspicious_pairs"]["count"] == 5 and val["duplicates"]["count"] == 3
    assert val["landmarks"]["disagree"] == 1 and val["landmarks"]["listed"][0]["index"] == 30
    ids = [set(a["identity"].tolist()) for a in arrays.values()]
    assert r["cross_split"] == {"identity_overlap": len(ids[0] & ids[1]), "duplicate_rows": 6}
    assert r["n_identities"] == len(ids[0] | ids[1])


def test_cos_histogram_median_and_mad_are_within_one_bin():
    rng = np.random.default_rng(3)
    for cos in (0.6 + 0.05 * rng.standard_normal(5001), np.r_[0.9 + 0.01 * rng.standard_normal(2000), [0.1] * 30]):
        h = CosHistogram()
        h.add(np.full(len(cos), 2), cos)
        median, sd = h.median_sd(2)
        assert median == pytest.approx(np.median(cos), abs=COS_BIN)
        assert sd == pytest.approx(1.4826 * np.median(np.abs(cos - np.median(cos))), abs=1.4826 * COS_BIN)
        assert h.median_sd(0) is None


def test_reservoir_is_a_seeded_uniform_sample_that_keeps_everything_when_it_can():
    def sample(n: int, size: int) -> np.ndarray:
        res = Reservoir(size)
        for lo in range(0, n, 100):
            res.add({"x": np.arange(lo, min(lo + 100, n))})
        return res.rows()["x"]

    assert sorted(sample(250, 300)) == list(range(250))
    s = sample(20_000, 1000)
    assert len(np.unique(s)) == 1000 and np.array_equal(s, sample(20_000, 1000))
    assert abs(s.mean() - 10_000) < 600 and (s < 10_000).sum() == pytest.approx(500, abs=80)


def test_landmark_rows_are_picked_evenly_from_the_index_count_as_blocks_stream_by():
    block = {"src_kps": np.ones((7, 68, 3), np.float32), "src_pose": np.ones((7, 3), np.float32)}
    block["identity"] = np.arange(7)
    rows = LandmarkRows(n_expected=10_000, cap=1000)  # every 10th row
    rows.add(block, start=1)  # rows 1..7 hold no pick (short blocks do)
    assert rows.rows() == {}
    rows.add(block, start=7)  # rows 7..13: 10 is picked
    block["src_pose"][3, 1] = np.nan
    rows.add(block, start=27)  # rows 27..33: 30 is picked, but its pose is not finite
    assert rows.rows()["index"].tolist() == [10]


def test_row_hashes_match_bit_identical_rows_only():
    x = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float16).astype(np.float32)
    x[1] = x[0]
    x[2] = x[0]
    x[2, [3, 200]] *= -1  # two sign flips: a plain multiply-and-add hash of the words would collide here
    x[3] = x[0]
    x[3, 511] = np.nextafter(x[3, 511], np.float32(9))
    h = row_hashes(x)
    assert h.dtype == np.uint64 and h[0] == h[1]
    assert len(set(h.tolist())) == 5


@pytest.fixture(scope="module")
def memory_sets(tmp_path_factory) -> dict[int, tuple]:
    """Shard sets of 4096 and 16384 rows (blocks of 256), with each split's size in memory as read_split holds it."""
    a = generate(SynthParams(n_identities=1024, samples_per_identity=16, seed=5))
    out = {}
    for n in (4096, 16384):
        path = tmp_path_factory.mktemp(f"mem{n}")
        entry = write_split(path, "train", {k: v[:n] for k, v in a.items()}, shard_samples=2048, block_size=256)
        write_index(path, {"train": entry}, fields=list(a), provenance={"test": "memory"}, block_size=256)
        in_memory = sum(
            n * int(np.prod(v.shape[1:], dtype=np.int64)) * (8 if k == "identity" else 4) for k, v in a.items()
        )
        out[n] = (path, in_memory)
    return out


def test_inspect_memory_stays_flat_as_the_split_grows(memory_sets, monkeypatch):
    # The pair sample's metric (metrics.impostor_and_tar) builds an n x n score matrix, ~400 MB at
    # MAX_PAIR_SAMPLES rows: a constant of the metric, not of the split, shrunk here so the streaming shows.
    monkeypatch.setattr(inspect_module, "MAX_PAIR_SAMPLES", 256)
    # Likewise the data ceiling keeps up to CEILING_IDENTITIES identities (~14 KB each): a cap, not growth.
    monkeypatch.setattr(ceiling, "CEILING_IDENTITIES", 64)
    peaks = {}
    for n, (path, _) in memory_sets.items():
        tracemalloc.start()
        try:
            r, _ = inspect(path)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert r["n_samples"] == n
    path, in_memory = memory_sets[16384]
    assert in_memory > 140e6
    assert peaks[16384] < in_memory / 5  # the old read_split version held the whole split: > in_memory
    # 12288 more rows: ~8 bytes a row of hashes plus a few identities, not ~9 KB a row
    assert peaks[16384] - peaks[4096] < 2e6, peaks


def test_inspect_benchmark_runs_and_reports_both_sizes():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_inspect.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| inspect | rows | seconds | cpu s | rows/s | peak RSS MB |" in done.stdout
    for n in ("1,024", "3,072"):
        assert re.search(rf"\| new +\| +{n} \| +[\d.]+ \| +[\d.]+ \|", done.stdout), done.stdout
    if "git archive" not in done.stdout:  # the old version runs on its own package (not in a shallow clone)
        assert re.search(r"\| old +\| +1,024 \| +[\d.]+ \| +[\d.]+ \|", done.stdout), done.stdout


# --- the data ceiling: how well frontal targets agree with their identity --------------------------------


def synth_set(out: Path, **params) -> Path:
    """A two-split synthetic set (val 30% of identities) in small blocks, so the ceiling streams over many."""
    from dist_train.synth import make_shard_set

    make_shard_set(out, SynthParams(**params), val_fraction=0.3, shard_samples=512, block_size=128)
    return out


@pytest.mark.parametrize(
    "noise, frontal_per_identity",
    [(0.3, None), (0.75, None), (1.2, None), (0.75, 3)],  # the last: rows of an identity share 3 frontal images
)
def test_data_ceiling_recovers_a_planted_target_noise(tmp_path, noise, frontal_per_identity):
    """Targets = normalize(z + noise of norm sigma): every prediction's mean cos is at most c = 1 / sqrt(1 + sigma^2)."""
    out = synth_set(
        tmp_path / "s", n_identities=200, samples_per_identity=8, seed=3, tgt_noise=noise,
        frontal_per_identity=frontal_per_identity,
    )  # fmt: skip
    truth = 1.0 / np.sqrt(1.0 + noise**2)
    r, _ = inspect(out)
    for c in (r["ceiling"], r["splits"]["val"]["ceiling"], r["splits"]["train"]["ceiling"]):
        assert c["estimable"] and abs(c["cos"] - truth) < 0.02, (c["cos"], truth)
        assert c["ci95"][0] <= c["cos"] <= c["ci95"][1] and c["ci95"][1] - c["ci95"][0] < 0.04
        assert c["pair_cos"] == pytest.approx(c["cos"] ** 2)
        for b in YAW_BUCKETS:
            assert abs(c["per_yaw"][b]["cos"] - truth) < 0.03, (b, c["per_yaw"][b])
    assert r["ceiling"]["n_identities"] == 200 and r["splits"]["val"]["ceiling"]["n_identities"] == 60
    # eval and report stream only three fields of one split: the same figures
    alone = ceiling.data_ceiling(out, "val")
    assert {k: v for k, v in alone.items() if k not in ("split", "bad_blocks")} == r["splits"]["val"]["ceiling"]


def test_repeated_frontal_images_count_once():
    """An identity whose rows repeat two frontal images has one pair, not (rows choose 2) pairs of which most are cos 1."""
    rng = np.random.default_rng(0)
    t = rng.standard_normal((2, 512)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    rows = t[[0, 1, 0, 0, 0, 0]]
    acc = ceiling.TargetCeiling()
    acc.add(np.zeros(3, np.int64), np.full(3, 4), rows[:3])  # repeats across blocks too
    acc.add(np.zeros(3, np.int64), np.full(3, 5), rows[3:])
    c = acc.report()
    assert c["pair_cos"] == pytest.approx(float(t[0] @ t[1]), abs=1e-6) and c["n_identities"] == 1
    assert c["ci95"] is None  # one identity: no interval
    assert c["per_yaw"]["60-75"]["pair_cos"] == pytest.approx(float(t[0] @ t[1]), abs=1e-6)
    assert not c["per_yaw"]["75-90"]["estimable"]  # the 75-90 rows paired only frontal image 0


def test_ceiling_keeps_a_bounded_seeded_sample_of_identities(tmp_path):
    """With a cap, the identities with the smallest id hashes are kept, whatever the row order, all their rows used."""
    out = synth_set(tmp_path / "s", n_identities=200, samples_per_identity=6, seed=4, tgt_noise=0.75)
    a = read_split(ShardSet.open(out), "train")
    got = ceiling.data_ceiling(out, "train", max_identities=32)
    ids = np.unique(a["identity"])
    kept = ids[np.argsort(ceiling.identity_hashes(ids))[:32]]
    pair, weight = [], []
    for i in kept:
        t = a["tgt_emb"][a["identity"] == i].astype(np.float64)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        g = t @ t.T
        n = len(t)
        pair.append((g.sum() - n) / (n * (n - 1)))
        weight.append(n)
    mean = np.average(pair, weights=weight)
    assert got["n_identities"] == 32 and got["sampled"] == 32 and got["of_identities"] == len(ids)
    assert got["pair_cos"] == pytest.approx(mean, abs=1e-6)
    assert abs(got["cos"] - 0.8) < 0.03
    shuffled = {k: v[::-1] for k, v in a.items()}  # another row order, the same sample
    write_val_only(tmp_path / "rev", shuffled)
    again = ceiling.data_ceiling(tmp_path / "rev", "val", max_identities=32)
    assert again["pair_cos"] == pytest.approx(got["pair_cos"], abs=1e-9)


def test_one_frontal_per_identity_says_the_ceiling_cannot_be_estimated(tmp_path, capsys):
    from dist_train.synth import main as synth_main

    out = tmp_path / "s"
    argv = ["--out", str(out), "--n-identities", "60", "--samples-per-identity", "5", "--seed", "2"]
    assert synth_main([*argv, "--tgt-noise", "0.5", "--frontal-per-identity", "1", "--val-fraction", "0.3"]) == 0
    params = json.loads((out / "index.json").read_text())["provenance"]["params"]
    assert (params["tgt_noise"], params["frontal_per_identity"]) == (0.5, 1)
    assert main([str(out), "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "data ceiling: cannot be estimated: no identity has two or more distinct frontal" in text
    assert "(all of the 18 identities examined have exactly one)" in text
    r = json.loads((tmp_path / "r.json").read_text())
    c = r["splits"]["val"]["ceiling"]
    assert not c["estimable"] and c["n_identities"] == 0 and c["single_target_identities"] == 18
    assert "cos" not in c and not r["ceiling"]["estimable"]


def test_ceiling_skips_rows_with_a_bad_target_only(val_arrays, tmp_path):
    a = {k: v.copy() for k, v in val_arrays.items()}
    a["tgt_emb"][0] = np.nan
    a["tgt_emb"][1] = 0.0
    a["src_emb"][2] = np.nan  # the target of this row is still a frontal image of its identity
    write_val_only(tmp_path / "bad", a)
    c = ceiling.data_ceiling(tmp_path / "bad", "val")
    r, _ = inspect(tmp_path / "bad")
    assert {k: v for k, v in c.items() if k not in ("split", "bad_blocks")} == r["splits"]["val"]["ceiling"]
    ok = np.ones(len(a["identity"]), bool)
    ok[[0, 1]] = False
    acc = ceiling.TargetCeiling()
    acc.add(a["identity"][ok], yaw_bucket_index(a["src_pose"][ok, 1]), a["tgt_emb"][ok])
    assert c["pair_cos"] == pytest.approx(acc.report()["pair_cos"], abs=1e-7)  # float32 sums, another order
