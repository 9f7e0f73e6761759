"""dist-train pack: exact round trips, identity names, bad-row accounting, refusals before writing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dist_train.data.blocks import read_split
from dist_train.data.shards import ShardSet, ShardWriter, write_split
from dist_train.data.splits import split_by_identity, split_rows
from dist_train.pack import PackError, load_arrays, main, pack


def make_arrays(n_ids: int = 20, per_id: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Random valid columns; src_pose[:, 0] (pitch) = 0.01 * row number identifies each row after shuffling."""
    rng = np.random.default_rng(seed)
    n = n_ids * per_id

    def unit(shape):
        a = rng.standard_normal(shape).astype(np.float32)
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    pose = rng.uniform(-80, 80, (n, 3)).astype(np.float32)
    pose[:, 0] = np.arange(n) * 0.01
    return {
        "src_emb": unit((n, 512)),
        "src_kps": rng.uniform(0, 640, (n, 68, 3)).astype(np.float32),
        "src_pose": pose,
        "tgt_emb": unit((n, 512)),
        "identity": np.repeat(np.arange(100, 100 + n_ids), per_id),
    }


def read_all(out) -> dict[str, np.ndarray]:
    """Every split, concatenated and put back into input row order."""
    ss = ShardSet.open(out)
    parts = [read_split(ss, s) for s in ss.splits]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols["src_pose"][:, 0])
    return {k: v[order] for k, v in cols.items()}


def assert_round_trip(stored: dict, original: dict) -> None:
    for k, v in original.items():
        if k.endswith("_emb") or k == "tgt_centroid":
            np.testing.assert_allclose(stored[k], v, atol=1e-3, rtol=0)  # float16 storage
            assert np.abs(stored[k] - v).max() <= np.abs(v.astype(np.float16).astype(np.float32) - v).max()
        else:
            np.testing.assert_array_equal(stored[k], v)


def test_npz_round_trip_is_exact_and_splits_are_disjoint_by_identity(tmp_path):
    arrays = make_arrays()
    np.savez(tmp_path / "in.npz", **arrays)
    summary = pack(load_arrays(npz=str(tmp_path / "in.npz")), tmp_path / "out", val_fraction=0.25, test_fraction=0.1)
    assert_round_trip(read_all(tmp_path / "out"), arrays)
    ss = ShardSet.open(tmp_path / "out")
    ids = {s: set(np.unique(read_split(ss, s)["identity"]).tolist()) for s in ss.splits}
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"].isdisjoint(ids["test"])
    assert ids["val"].isdisjoint(ids["test"])
    assert (len(ids["val"]), len(ids["test"]), len(ids["train"])) == (5, 2, 13)
    assert summary["skipped"] == {"non_finite": 0, "zero_norm_embedding": 0}


def test_npy_dir_round_trip_with_centroid(tmp_path):
    arrays = make_arrays(seed=1)
    arrays["tgt_centroid"] = arrays["tgt_emb"][::-1].copy()
    (tmp_path / "cols").mkdir()
    for k, v in arrays.items():
        np.save(tmp_path / "cols" / f"{k}.npy", v)
    done = subprocess.run(
        [sys.executable, "-m", "dist_train", "pack", "--npy-dir", str(tmp_path / "cols"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "skipped 0 of 120 rows" in done.stdout
    assert ShardSet.open(tmp_path / "o").has("tgt_centroid")
    assert_round_trip(read_all(tmp_path / "o"), arrays)


def test_string_identities_map_to_ints_with_names_in_the_index(tmp_path):
    arrays = make_arrays(n_ids=8, per_id=3)
    names = np.array([f"person_{i:03d}" for i in arrays["identity"]])
    arrays["identity"] = names
    pack(arrays, tmp_path / "o", val_fraction=0.25)
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    stored = read_all(tmp_path / "o")
    assert [index["identity_names"][i] for i in stored["identity"]] == names.tolist()


def test_bad_rows_are_skipped_and_counted_per_reason_and_off_unit_rows_renormalised(tmp_path):
    arrays = make_arrays()
    arrays["src_emb"][3, 7] = np.nan
    arrays["src_kps"][5, 0, 0] = np.inf
    arrays["tgt_emb"][7] = 0.0
    arrays["src_emb"][9] = 0.0
    arrays["src_pose"][9, 2] = np.nan  # both problems: counted once, as non_finite
    arrays["src_emb"][11] *= 3.0
    arrays["extra_column"] = np.zeros(len(arrays["identity"]))
    summary = pack(arrays, tmp_path / "o")
    assert summary["skipped"] == {"non_finite": 3, "zero_norm_embedding": 1}
    assert summary["renormalised"] == {"src_emb": 1, "tgt_emb": 0}
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    assert index["skipped"] == summary["skipped"]
    assert index["renormalised"]["src_emb"] == 1 and index["ignored_arrays"] == ["extra_column"]
    stored = read_all(tmp_path / "o")
    kept = np.setdiff1d(np.arange(len(arrays["identity"])), [3, 5, 7, 9])
    np.testing.assert_array_equal(stored["src_pose"], arrays["src_pose"][kept])
    row11 = int(np.flatnonzero(kept == 11)[0])
    assert np.linalg.norm(stored["src_emb"][row11]) == pytest.approx(1.0, abs=1e-3)


def test_strict_refuses_bad_rows_with_reasons_and_writes_nothing(tmp_path, capsys):
    arrays = make_arrays()
    arrays["src_emb"][0, 0] = np.nan
    arrays["src_emb"][1, 0] = np.nan
    arrays["tgt_emb"][2] = 0.0
    np.savez(tmp_path / "in.npz", **arrays)
    out = tmp_path / "o"
    assert main(["--npz", str(tmp_path / "in.npz"), "--out", str(out), "--strict"]) != 0
    err = capsys.readouterr().err
    assert "3 of 120 rows are bad (2 non_finite, 1 zero_norm_embedding)" in err and "--strict" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(src_emb=a["src_emb"][:, :256]), "'src_emb' has shape (120, 256), expected (120, 512)"),
        (lambda a: a.pop("tgt_emb"), "missing array(s) ['tgt_emb']"),
        (lambda a: a.update(src_pose=a["src_pose"][:-1]), "'src_pose' has shape (119, 3)"),
        (lambda a: a.update(identity=a["identity"].astype(np.float64)), "identity has dtype float64"),
        (
            lambda a: a.update(src_emb=(a["src_emb"] * 100).astype(np.int8)),
            "'src_emb' has dtype int8; it must be a floating-point dtype",
        ),
    ],
)
def test_whole_array_errors_stop_before_anything_is_written(tmp_path, change, message):
    arrays = make_arrays()
    change(arrays)
    with pytest.raises(PackError) as e:
        pack(arrays, tmp_path / "o")
    assert message in str(e.value)
    assert not (tmp_path / "o").exists()


def test_pickled_arrays_are_refused_with_a_fix(tmp_path):
    arrays = make_arrays()
    np.savez(
        tmp_path / "in.npz", **(arrays | {"identity": np.array([str(i) for i in arrays["identity"]], dtype=object)})
    )
    with pytest.raises(PackError, match="object \\(pickled\\) array"):
        load_arrays(npz=str(tmp_path / "in.npz"))


# ---------------------------------------------------------------- the splitter pack, synth and extract share


def test_splitter_deals_whole_identities_and_shuffles_rows_as_pack_always_has():
    arrays = {"identity": np.repeat(np.arange(100, 110), 2), "row": np.arange(20)}
    parts = split_by_identity(arrays, 0.2, 0.1, seed=3)
    # pinned: what pack wrote before the splitter was shared, so packed sets stay the same
    assert {s: p["row"].tolist() for s, p in parts.items()} == {
        "train": [6, 10, 11, 9, 5, 7, 2, 17, 16, 8, 3, 14, 4, 15],
        "val": [18, 19, 13, 12],
        "test": [1, 0],
    }
    rows = split_rows(arrays["identity"], 0.2, 0.1, seed=3)
    assert {s: r.tolist() for s, r in rows.items()} == {s: p["row"].tolist() for s, p in parts.items()}
    again = split_rows(arrays["identity"], 0.2, 0.1, seed=3)
    assert all(np.array_equal(rows[s], again[s]) for s in rows)
    other = split_rows(arrays["identity"], 0.2, 0.1, seed=4)
    assert any(not np.array_equal(rows[s], other.get(s, [])) for s in rows)


@pytest.mark.parametrize(
    "n_ids, val, test, sizes",
    [
        (10, 0.2, 0.1, {"train": 7, "val": 2, "test": 1}),
        (10, 0.01, 0.01, {"train": 8, "val": 1, "test": 1}),  # a requested split gets at least one identity ...
        (2, 0.1, 0.1, {"train": 1, "val": 1}),  # ... while train keeps one
        (1, 0.1, 0.0, {"train": 1}),
        (10, 0.0, 0.0, {"train": 10}),
    ],
)
def test_splitter_gives_requested_splits_an_identity_while_train_keeps_one(n_ids, val, test, sizes):
    identity = np.repeat(np.arange(n_ids), 3)
    rows = split_rows(identity, val, test, seed=0)
    assert {s: len(np.unique(identity[r])) for s, r in rows.items()} == sizes
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(len(identity)))


@pytest.mark.parametrize(
    "n_ids, val, test, message",
    [
        (10, -0.1, 0.0, "--val-fraction -0.1 and --test-fraction 0.0 must be >= 0"),
        (10, 0.6, 0.4, "--val-fraction 0.6 and --test-fraction 0.4 must be >= 0 and leave identities for training"),
        (3, 0.5, 0.4, "--val-fraction 0.5 and --test-fraction 0.4 of 3 identities take 2 + 1 identities"),
    ],
)
def test_splitter_errors_name_the_fractions(tmp_path, capsys, n_ids, val, test, message):
    with pytest.raises(ValueError) as e:
        split_rows(np.arange(n_ids), val, test, seed=0)
    assert message in str(e.value)
    np.savez(tmp_path / "in.npz", **make_arrays(n_ids=n_ids, per_id=2))
    args = ["--npz", str(tmp_path / "in.npz"), "--out", str(tmp_path / "o"), f"--val-fraction={val}"]
    assert main([*args, f"--test-fraction={test}"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "index.json").exists()


def test_shard_writer_writes_the_same_bytes_however_the_rows_are_chunked(tmp_path):
    """extract streams rows through ShardWriter; write_split (pack, synth) is one chunk: same rows, same tar bytes."""
    arrays = make_arrays(n_ids=50, per_id=11)  # 550 rows: 4 shards of 128 (blocks of 32), the last one short
    entry = write_split(tmp_path / "whole", "train", arrays, shard_samples=128, block_size=32)
    assert [s["n_samples"] for s in entry["shards"]] == [128, 128, 128, 128, 38]
    for cuts in ([1, 33, 34, 300], list(range(0, 550, 100)), list(range(0, 550, 32))):
        edges = sorted({0, 550, *cuts})
        with ShardWriter(tmp_path / "chunked", "train", shard_samples=128, block_size=32) as writer:
            for a, b in zip(edges[:-1], edges[1:]):
                writer.write({k: v[a:b] for k, v in arrays.items()})
        assert writer.entry == entry
        for shard in entry["shards"]:
            assert (tmp_path / "whole" / shard["file"]).read_bytes() == (
                tmp_path / "chunked" / shard["file"]
            ).read_bytes()
        assert sorted(p.name for p in (tmp_path / "chunked").iterdir()) == [s["file"] for s in entry["shards"]]
