"""Known-answer tests of the metric definitions: every expected value below is computed by hand from inputs
built so that each cosine is a ratio of small integers (3-4-5 and 5-12-13 triangles), never by calling the
function under test."""

from __future__ import annotations

import math

import numpy as np
import pytest

import dist_train.metrics as metrics
from dist_train.data.schema import YAW_BUCKETS, yaw_bucket_index
from dist_train.metrics import impostor_and_tar, quality, row_cos, scalars

# integer 2-D vectors of norm 5 whose cosine with (1, 0) is the key
AT_COS = {1.0: (5, 0), 0.8: (4, 3), 0.6: (3, 4), 0.0: (0, 5), -0.6: (-3, 4), -0.8: (-4, 3)}


def vectors_with_cos(cosines) -> np.ndarray:
    """Rows whose cosine with (2, 0) (or any positive multiple of (1, 0)) is the given value exactly."""
    return np.array([AT_COS[c] for c in cosines], dtype=np.float64)


# ---------------------------------------------------------------- row_cos


def test_row_cos_is_the_cosine_per_row_whatever_the_lengths():
    a = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[6.0, 8.0], [-7.0, 0.0], [5.0, 0.0], [1.0, 1.0]])
    # same direction, opposite, orthogonal, zero vector (guarded: 0 / 1e-12 = 0, not NaN)
    np.testing.assert_allclose(row_cos(a, b), [1.0, -1.0, 0.0, 0.0], atol=1e-15)
    # 5-12-13: (5, 12) . (1, 0) / 13 = 5/13
    assert row_cos(np.array([[5.0, 12.0]]), np.array([[1.0, 0.0]]))[0] == pytest.approx(5 / 13, abs=1e-15)


# ---------------------------------------------------------------- impostor cos


def test_impostor_cos_averages_only_pairs_of_different_identities():
    # queries (unit after normalising): (1,0), (0,1), (-1,0); targets: (1,0), (1,0), (0,1); identities 7, 7, 9
    query = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    tgt = np.array([[1.0, 0.0], [5.0, 0.0], [0.0, 4.0]])
    identity = np.array([7, 7, 9])
    # score matrix S[i, j] = q_i . t_j:   row 0: 1, 1, 0   row 1: 0, 0, 1   row 2: -1, -1, 0
    # impostor pairs (identity differs): S02 = 0, S12 = 1, S20 = -1, S21 = -1 -> mean -1/4
    # (every off-diagonal pair would give (1 + 0 + 0 + 1 - 1 - 1) / 6 = 0; same-identity S01 = 1 and S10 = 0
    # are genuine pairs and must not enter)
    out = impostor_and_tar(query, tgt, identity)
    assert out["impostor_cos"] == pytest.approx(-0.25, abs=1e-12)


def test_same_identity_off_diagonal_pairs_count_as_genuine():
    # targets e0, e1, e2 in R^4; a query's score with target j is its (normalised) j-th component
    tgt = np.eye(4)[:3]
    query = np.array([[3.0, 4.0, 0.0, 0.0], [-3.0, 0.0, 0.0, 4.0], [0.0, 0.0, 5.0, 0.0]])
    identity = np.array([0, 0, 1])
    # S = [[0.6, 0.8, 0], [-0.6, 0, 0], [0, 0, 1]]
    # impostors S02, S12, S20, S21 are all 0 -> every quantile of them is 0, threshold 0 for both FARs
    # genuine S00 = .6, S01 = .8, S10 = -.6, S11 = 0, S22 = 1 -> 3 of 5 strictly above 0
    # (the diagonal alone would give 2 of 3)
    out = impostor_and_tar(query, tgt, identity)
    assert out["impostor_cos"] == 0.0
    assert out["tar_at_far"] == {"0.001": pytest.approx(0.6), "0.01": pytest.approx(0.6)}


# ---------------------------------------------------------------- TAR@FAR


def tar_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """40 samples of 40 identities: 40 genuine pairs (the diagonal) and 40 * 39 = 1560 impostor pairs.

    Targets are the basis vectors e0..e39 of R^41, so the score of query i with target j is query i's
    normalised j-th component. Rows 0..9 put 3/5 on the next sample's target (10 impostor scores of 0.6,
    the other 1550 impostor scores are 0); rows 10..39 put nothing on other targets. Each query is an
    integer vector of norm 5, so equal scores are bitwise equal floats.
    """
    n, dim = 40, 41
    genuine = [0.8] * 10 + [1.0] * 4 + [0.6] * 6 + [5 / 13] * 8 + [0.0] * 7 + [-0.6] * 5
    query = np.zeros((n, dim))
    for i in range(10):
        query[i, i], query[i, i + 1] = 4.0, 3.0  # genuine 4/5, impostor 3/5
    rows = {1.0: (5, 0, 5), 0.6: (3, 4, 5), 5 / 13: (5, 12, 13), 0.0: (0, 5, 5), -0.6: (-3, 4, 5)}
    for i in range(10, n):
        a, slack, _ = rows[genuine[i]]
        query[i, i], query[i, n] = a, slack  # the last axis is no target's: it only sets the length
    return query, np.eye(dim)[:n], np.arange(n)


def test_tar_at_far_known_answer_and_strict_threshold():
    query, tgt, identity = tar_problem()
    # impostor scores sorted: 1550 x 0.0, then 10 x 0.6
    # FAR 1e-2: the 0.99 quantile sits at position 1559 * 0.99 = 1543.4, inside the zeros -> threshold 0.0
    # FAR 1e-3: the 0.999 quantile sits at position 1559 * 0.999 = 1557.4, inside the 0.6s -> threshold 0.6
    # genuine: 10 x 0.8, 4 x 1.0, 6 x 0.6, 8 x 5/13, 7 x 0.0, 5 x -0.6
    # TAR@1e-3 = #(genuine > 0.6) / 40 = (10 + 4) / 40 = 0.35   (>= would count the six 0.6s too: 0.5)
    # TAR@1e-2 = #(genuine > 0.0) / 40 = (10 + 4 + 6 + 8) / 40 = 0.7   (>= would count the seven 0s too: 0.875)
    out = impostor_and_tar(query, tgt, identity)
    assert out["tar_at_far"] == {"0.001": pytest.approx(0.35), "0.01": pytest.approx(0.7)}
    # mean impostor score: 10 * 0.6 / 1560
    assert out["impostor_cos"] == pytest.approx(6 / 1560, abs=1e-15)


def test_tar_at_far_does_not_depend_on_sample_order_or_vector_lengths():
    query, tgt, identity = tar_problem()
    p = np.random.default_rng(3).permutation(len(query))
    scale = np.arange(1, len(query) + 1)[:, None]  # metrics are on directions only
    out = impostor_and_tar(query[p] * scale, tgt[p] * 0.5, identity[p])
    assert out["tar_at_far"] == {"0.001": pytest.approx(0.35), "0.01": pytest.approx(0.7)}
    assert out["impostor_cos"] == pytest.approx(6 / 1560, abs=1e-15)


def test_tar_and_impostor_cos_are_nan_without_impostor_or_genuine_pairs():
    # one identity only: 4 genuine pairs, no impostor pair
    one_identity = impostor_and_tar(np.eye(2), np.eye(2), np.array([5, 5]))
    assert math.isnan(one_identity["impostor_cos"])
    assert all(math.isnan(v) for v in one_identity["tar_at_far"].values())
    assert set(one_identity["tar_at_far"]) == {"0.001", "0.01"}
    # no samples: no genuine pair (nor impostor)
    empty = impostor_and_tar(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    assert math.isnan(empty["impostor_cos"])
    assert all(math.isnan(v) for v in empty["tar_at_far"].values())


@pytest.fixture
def few_pair_samples(monkeypatch):
    """A subset cap of 8 rows, so subset selection can be checked on a few dozen samples."""
    monkeypatch.setattr(metrics, "MAX_PAIR_SAMPLES", 8)
    return 8


def random_problem(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    tgt = rng.normal(size=(n, 16))
    query = tgt + rng.normal(size=(n, 16))
    return query, tgt, np.arange(n) // 2  # two samples per identity


def test_pair_subset_is_capped_deterministic_and_the_same_for_any_sample_order(few_pair_samples):
    query, tgt, identity = random_problem(40)
    idx = metrics._pair_subset(query, tgt, identity)
    assert len(idx) == few_pair_samples and len(np.unique(idx)) == few_pair_samples
    assert np.array_equal(idx, metrics._pair_subset(query, tgt, identity))  # deterministic
    # the metrics are those of exactly the chosen rows
    assert impostor_and_tar(query, tgt, identity) == impostor_and_tar(query[idx], tgt[idx], identity[idx])

    chosen = {tuple(tgt[i]) for i in idx}
    for seed in range(3):  # any order of the same set of samples picks the same samples
        p = np.random.default_rng(seed).permutation(len(query))
        sub = metrics._pair_subset(query[p], tgt[p], identity[p])
        assert {tuple(tgt[p][i]) for i in sub} == chosen
        got = impostor_and_tar(query[p], tgt[p], identity[p])
        want = impostor_and_tar(query, tgt, identity)
        assert got["impostor_cos"] == pytest.approx(want["impostor_cos"], abs=1e-12)
        assert got["tar_at_far"] == want["tar_at_far"]
    # the same rows gathered from two ranks' contiguous halves, rank 1 first
    halves = np.r_[20:40, 0:20]
    assert (
        impostor_and_tar(query[halves], tgt[halves], identity[halves])["tar_at_far"]
        == (impostor_and_tar(query, tgt, identity)["tar_at_far"])
    )


def test_pair_subset_picks_the_same_samples_for_prediction_and_baseline(few_pair_samples):
    query, tgt, identity = random_problem(40)
    other_query = np.random.default_rng(9).normal(size=query.shape)  # e.g. src beside pred
    a = metrics._pair_subset(query, tgt, identity)
    b = metrics._pair_subset(other_query, tgt, identity)
    assert np.array_equal(a, b)


def test_pair_subset_keeps_every_sample_up_to_the_cap(few_pair_samples):
    query, tgt, identity = random_problem(8)
    assert np.array_equal(metrics._pair_subset(query, tgt, identity), np.arange(8))


# ---------------------------------------------------------------- yaw buckets


def test_yaw_bucket_edges_belong_to_the_bucket_above_except_90():
    assert YAW_BUCKETS == ("0-15", "15-30", "30-45", "45-60", "60-75", "75-90")
    yaw = np.array([0.0, 14.999, 15.0, 29.9, 30.0, 45.0, 60.0, 74.9, 75.0, 89.9, 90.0])
    assert yaw_bucket_index(yaw).tolist() == [0, 0, 1, 1, 2, 3, 4, 4, 5, 5, 5]
    # negative yaws bucket by |yaw|
    assert yaw_bucket_index(-yaw).tolist() == [0, 0, 1, 1, 2, 3, 4, 4, 5, 5, 5]
    # |yaw| > 90 (a face turned past profile) falls in the last bucket
    assert yaw_bucket_index(np.array([90.01, 120.0, -135.0, 180.0])).tolist() == [5, 5, 5, 5]
    assert yaw_bucket_index(np.array([[15.0], [-45.0]], dtype=np.float16)).tolist() == [[1], [3]]


# ---------------------------------------------------------------- quality


# per row: yaw, cos(pred, tgt), cos(src, tgt), cos(oracle, tgt); identities all different
ROWS = [
    (0.0, 1.0, 0.6, 1.0),
    (14.9, 0.8, 0.8, 1.0),
    (15.0, 0.6, 0.0, 0.8),
    (-15.0, 1.0, 0.6, 1.0),
    (30.0, 0.8, 0.6, 1.0),
    (-44.9, 0.0, -0.6, 0.6),
    (45.0, 0.6, 0.6, 0.6),
    (59.9, 0.8, 0.0, 1.0),
    (-75.0, 0.6, -0.6, 0.8),
    (90.0, 0.0, 0.0, 0.6),
    (120.0, 0.8, 0.0, 1.0),
    (-90.0, 1.0, 0.6, 1.0),
]


def quality_problem(oracle: bool = True) -> dict:
    yaw, c_pred, c_src, c_orc = (list(col) for col in zip(*ROWS))
    n = len(ROWS)
    return quality(
        pred=vectors_with_cos(c_pred),
        tgt=np.tile([2.0, 0.0], (n, 1)),
        src=vectors_with_cos(c_src),
        yaw=np.array(yaw),
        identity=np.arange(n),
        oracle=vectors_with_cos(c_orc) if oracle else None,
    )


def test_quality_known_answer():
    q = quality_problem()
    assert q["n"] == 12
    # pred:   1 + .8 + .6 + 1 + .8 + 0 + .6 + .8 + .6 + 0 + .8 + 1 = 8.0
    # src:   .6 + .8 + 0 + .6 + .6 - .6 + .6 + 0 - .6 + 0 + 0 + .6 = 2.6
    # oracle: 1 + 1 + .8 + 1 + 1 + .6 + .6 + 1 + .8 + .6 + 1 + 1 = 10.4
    assert q["mean_cos"] == pytest.approx(8.0 / 12)
    assert q["identity_baseline_cos"] == pytest.approx(2.6 / 12)
    assert q["oracle_cos"] == pytest.approx(10.4 / 12)
    assert q["gain"] == pytest.approx((8.0 - 2.6) / 12)  # mean_cos - identity_baseline_cos = 0.45
    assert q["fraction_of_oracle_gap"] == pytest.approx(5.4 / 7.8)  # gain / (oracle - baseline) = 9/13
    # every target is the same direction, so a query's score is its own cosine with every target and the
    # mean over the 11 other targets of every row is the mean cosine
    assert q["impostor_cos"] == pytest.approx(8.0 / 12)
    assert q["baseline_impostor_cos"] == pytest.approx(2.6 / 12)
    assert set(q["tar_at_far"]) == {"0.001", "0.01"}
    assert set(q["tar_at_far"]["0.01"]) == {"pred", "baseline"}


def test_quality_per_yaw_lists_non_empty_buckets_with_their_means():
    per_yaw = quality_problem()["per_yaw"]
    # 0-15: 0, 14.9 | 15-30: 15, -15 | 30-45: 30, -44.9 | 45-60: 45, 59.9 | 60-75: none | 75-90: -75, 90, 120, -90
    assert list(per_yaw) == ["0-15", "15-30", "30-45", "45-60", "75-90"]
    want = {
        "0-15": (2, (1 + 0.8) / 2, (0.6 + 0.8) / 2, (1 + 1) / 2),
        "15-30": (2, (0.6 + 1) / 2, (0 + 0.6) / 2, (0.8 + 1) / 2),
        "30-45": (2, (0.8 + 0) / 2, (0.6 - 0.6) / 2, (1 + 0.6) / 2),
        "45-60": (2, (0.6 + 0.8) / 2, (0.6 + 0) / 2, (0.6 + 1) / 2),
        "75-90": (4, (0.6 + 0 + 0.8 + 1) / 4, (-0.6 + 0 + 0 + 0.6) / 4, (0.8 + 0.6 + 1 + 1) / 4),
    }
    for bucket, (n, cos, base, orc) in want.items():
        entry = per_yaw[bucket]
        assert entry["n"] == n, bucket
        assert entry == {
            "n": n,
            "cos": pytest.approx(cos, abs=1e-12),
            "baseline": pytest.approx(base, abs=1e-12),
            "oracle": pytest.approx(orc, abs=1e-12),
        }, bucket


def test_quality_without_oracle_has_no_oracle_figures():
    q = quality_problem(oracle=False)
    assert "oracle_cos" not in q and "fraction_of_oracle_gap" not in q
    assert all(set(e) == {"n", "cos", "baseline"} for e in q["per_yaw"].values())
    assert q["gain"] == pytest.approx(5.4 / 12)


def gap_case(c_pred, c_src, c_orc) -> dict:
    n = len(c_pred)
    return quality(
        vectors_with_cos(c_pred),
        np.tile([1.0, 0.0], (n, 1)),
        vectors_with_cos(c_src),
        np.zeros(n),
        np.arange(n),
        vectors_with_cos(c_orc),
    )


def test_fraction_of_oracle_gap():
    # baseline .6, oracle 1.0, gap .4
    assert gap_case([0.8], [0.6], [1.0])["fraction_of_oracle_gap"] == pytest.approx(0.2 / 0.4)  # halfway: 0.5
    assert gap_case([1.0], [0.6], [1.0])["fraction_of_oracle_gap"] == pytest.approx(1.0)  # the oracle itself
    assert gap_case([0.6], [0.6], [1.0])["fraction_of_oracle_gap"] == pytest.approx(0.0, abs=1e-12)  # do-nothing
    # worse than doing nothing: gain 0 - .6 = -.6, fraction -.6 / .4 = -1.5
    worse = gap_case([0.0], [0.6], [1.0])
    assert worse["gain"] == pytest.approx(-0.6)
    assert worse["fraction_of_oracle_gap"] == pytest.approx(-1.5)
    # two rows: pred (.8 + .6) / 2 = .7, src (.6 + 0) / 2 = .3, oracle (1 + .8) / 2 = .9 -> .4 / .6
    assert gap_case([0.8, 0.6], [0.6, 0.0], [1.0, 0.8])["fraction_of_oracle_gap"] == pytest.approx(2 / 3)
    # no gap to close (oracle no better than the baseline): undefined, not a division by ~0
    no_gap = gap_case([0.8], [0.6], [0.6])
    assert no_gap["gain"] == pytest.approx(0.2)
    assert math.isnan(no_gap["fraction_of_oracle_gap"])


def test_quality_of_no_samples_is_nan_not_an_error():
    q = quality(
        np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), np.zeros((0, 4))
    )
    assert q["n"] == 0 and q["per_yaw"] == {}
    for key in ("mean_cos", "identity_baseline_cos", "gain", "oracle_cos", "fraction_of_oracle_gap", "impostor_cos"):
        assert math.isnan(q[key]), key


# ---------------------------------------------------------------- scalars


def test_scalars_tag_names_and_values():
    m = {
        "n": 12,
        "mean_cos": 0.7,
        "identity_baseline_cos": 0.3,
        "gain": 0.4,
        "fraction_of_oracle_gap": 0.5,
        "impostor_cos": 0.01,
        "baseline_impostor_cos": 0.02,
        "loss": 1.5,
        "val_train_loss_ratio": None,  # skipped, as when there is no train loss yet
        "step": 100,  # not a scalar tag
        "per_yaw": {"0-15": {"n": 3, "cos": 0.9, "baseline": 0.8}, "75-90": {"n": 1, "cos": 0.2, "baseline": 0.1}},
        "tar_at_far": {"0.001": {"pred": 0.25, "baseline": 0.125}, "0.01": {"pred": 0.5, "baseline": 0.375}},
    }
    assert scalars(m) == {
        "val/mean_cos": 0.7,
        "val/identity_baseline_cos": 0.3,
        "val/gain": 0.4,
        "val/fraction_of_oracle_gap": 0.5,
        "val/impostor_cos": 0.01,
        "val/baseline_impostor_cos": 0.02,
        "val/loss": 1.5,
        "val_yaw/0-15/cos": 0.9,
        "val_yaw/0-15/baseline": 0.8,
        "val_yaw/75-90/cos": 0.2,
        "val_yaw/75-90/baseline": 0.1,
        "val/tar_at_far_0.001/pred": 0.25,
        "val/tar_at_far_0.001/baseline": 0.125,
        "val/tar_at_far_0.01/pred": 0.5,
        "val/tar_at_far_0.01/baseline": 0.375,
    }
    assert set(scalars({"mean_cos": 0.7, "oracle_cos": None}, prefix="test")) == {"test/mean_cos"}
    assert scalars({}) == {}


def test_scalars_of_a_quality_dict_cover_every_documented_tag():
    tags = scalars(quality_problem() | {"loss": 0.25, "val_train_loss_ratio": 1.25})
    want = {
        f"val/{k}"
        for k in (
            "mean_cos",
            "identity_baseline_cos",
            "gain",
            "oracle_cos",
            "fraction_of_oracle_gap",
            "impostor_cos",
            "baseline_impostor_cos",
            "loss",
            "val_train_loss_ratio",
        )
    }
    want |= {
        f"val_yaw/{b}/{k}" for b in ("0-15", "15-30", "30-45", "45-60", "75-90") for k in ("cos", "baseline", "oracle")
    }
    want |= {f"val/tar_at_far_{far}/{k}" for far in ("0.001", "0.01") for k in ("pred", "baseline")}
    assert set(tags) == want
    assert tags["val/fraction_of_oracle_gap"] == pytest.approx(5.4 / 7.8)
    assert tags["val_yaw/75-90/oracle"] == pytest.approx(0.85)
    assert tags["val/val_train_loss_ratio"] == 1.25
