"""The data's ceiling on cos(prediction, frontal target): how well a split's frontal targets agree with their identity.

Eval, report and inspect all show it beside val cos, so it lives here rather
than in one of those commands; with it the row and identity hashes its bounded
identity sample uses (inspect's duplicate check uses the row hashes too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_train.data.blocks import BlockReader, split_table
from dist_train.data.schema import EMB_DIM, YAW_BUCKETS, ZERO_NORM, yaw_bucket_index
from dist_train.data.shards import BadBlock, ShardSet, widen
from dist_train.metrics import mix64

SAMPLE_SEED = 0  # seeds the hash keys and inspect's row samples: the same set gives the same report
CEILING_IDENTITIES = 1024  # identities the data ceiling keeps (~14 KB each): a 95 % interval of about +-0.005
CEILING_Z = 1.959964  # two-sided 95 % normal quantile
CEILING_RULE = (
    "c = sqrt(mean cos between distinct frontal embeddings of one identity), identities weighted by their rows: "
    "with frontal = identity + independent noise no prediction's mean cos to a frontal exceeds c"
)
_HASH_KEYS = np.random.default_rng(SAMPLE_SEED).integers(0, 2**63, EMB_DIM // 2, dtype=np.uint64)


def row_norms(a: np.ndarray) -> np.ndarray:
    """Row L2 norms in float64 (einsum: ~5x faster than linalg.norm on a block, no float64 copy)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))


def row_hashes(emb: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row: splitmix64's finaliser on each 8-byte word (keyed by its position), summed.

    Bit-identical rows hash alike; distinct rows collide with probability
    ~2^-64 a pair (~1e-6 over 5M rows), so duplicates are found from 8 bytes a
    row instead of the rows (~0.7M rows/s a core, measured).
    """
    w = np.ascontiguousarray(emb, dtype=np.float32).view(np.uint64) ^ _HASH_KEYS
    return mix64(w, inplace=True).sum(axis=1, dtype=np.uint64)


class IdentitySet:
    """Distinct identities as a sorted int64 array (8 bytes an identity), merged when the pending part grows."""

    def __init__(self):
        self.known = np.zeros(0, np.int64)
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, ids: np.ndarray) -> None:
        u = np.unique(ids)
        self.pending.append(u)
        self.n_pending += len(u)
        if self.n_pending > max(len(self.known), 1 << 16):  # merge when pending outgrows known: amortised cost
            self.values()

    def values(self) -> np.ndarray:
        if self.pending:
            self.known = np.unique(np.concatenate([self.known, *self.pending]))
            self.pending, self.n_pending = [], 0
        return self.known

    def contains(self, values: np.ndarray) -> np.ndarray:
        """Which of ``values`` were added before (binary search in each sorted part, no merge)."""
        out = np.zeros(len(values), dtype=bool)
        for part in (self.known, *self.pending):
            if len(part) and len(values):
                i = np.minimum(np.searchsorted(part, values), len(part) - 1)
                out |= part[i] == values
        return out


def identity_hashes(identity: np.ndarray) -> np.ndarray:
    """A seeded 64-bit hash per identity id: which identities a bounded sample keeps, whatever the row order."""
    return mix64(np.asarray(identity, dtype=np.int64).view(np.uint64) ^ _HASH_KEYS[0])


class TargetCeiling:
    """How well the frontal targets agree with their identity: the data's ceiling on cos(prediction, target).

    Model: a target is its identity's direction plus independent noise, so
    cos(t_i, t_j) over pairs of distinct targets of one identity averages
    c^2 = |E[t | identity]|^2, and no prediction made from the source can
    agree with a target better than c on average (E[p . t] = p . E[t] <= c
    for a unit p). Per identity and |yaw| bucket of the paired source (and
    over all buckets) this keeps the sum S and count n of the identity's
    distinct unit targets (deduplicated by a 64-bit hash of the bits, since
    rows of one identity often share a frontal image); then the pairs' mean
    is (|S|^2 - n) / (n (n - 1)) with no pairwise loop.

    Memory is bounded: only the ``max_identities`` identities with the
    smallest seeded id hash are kept (a bottom-k sample that does not depend
    on row order), ~14 KB each, plus 8 bytes per distinct target of a kept
    identity for the deduplication.
    """

    KEYS = len(YAW_BUCKETS) + 1  # one per yaw bucket, the last for all buckets

    def __init__(self, max_identities: int = 0):
        self.cap = max_identities or CEILING_IDENTITIES
        self.ids = np.zeros(0, np.int64)  # kept identities, sorted
        self.hash = np.zeros(0, np.uint64)  # their id hashes, aligned with ids
        self.slot = np.zeros(0, np.int64)  # their rows in the arrays below, aligned with ids
        self.free: list[int] = []
        self.sums = np.zeros((0, self.KEYS, EMB_DIM), np.float32)  # sum of distinct unit targets
        self.n = np.zeros((0, self.KEYS), np.int64)  # distinct targets
        self.rows = np.zeros((0, self.KEYS), np.int64)  # source rows: the identity's weight
        self.seen = IdentitySet()  # (identity, key, target hash) already summed
        self.threshold: np.uint64 | None = None  # largest kept id hash once the sample is full
        self.n_rows = 0  # rows offered (valid target, pose and identity)

    def add(self, identity: np.ndarray, bucket: np.ndarray, tgt: np.ndarray) -> None:
        """Rows with a finite, non-zero target and a finite pose (``bucket``: yaw bucket of the source)."""
        self.n_rows += len(identity)
        if self.threshold is not None:
            keep = identity_hashes(identity) <= self.threshold
            identity, bucket, tgt = identity[keep], bucket[keep], tgt[keep]
        if not len(identity):
            return
        self._admit(np.unique(identity))
        pos = np.minimum(np.searchsorted(self.ids, identity), len(self.ids) - 1)
        kept = np.flatnonzero(self.ids[pos] == identity)
        if not len(kept):
            return
        slot, ident = self.slot[pos[kept]], identity[kept]
        t = np.asarray(tgt[kept], dtype=np.float32)
        keys = np.concatenate([bucket[kept], np.full(len(kept), self.KEYS - 1)])
        slot2, row2 = np.concatenate([slot, slot]), np.concatenate([np.arange(len(kept))] * 2)
        flat = slot2 * self.KEYS + keys
        self.rows.reshape(-1)[:] += np.bincount(flat, minlength=self.rows.size)
        who = mix64(np.concatenate([ident, ident]).view(np.uint64) * np.uint64(self.KEYS) + keys.astype(np.uint64))
        code = (who ^ np.concatenate([row_hashes(t)] * 2)).view(np.int64)
        code, first = np.unique(code, return_index=True)
        new = ~self.seen.contains(code)
        if not new.any():
            return
        self.seen.add(code[new])
        first = first[new]
        unit = t[row2[first]] / np.maximum(row_norms(t[row2[first]]), 1e-12)[:, None].astype(np.float32)
        f = flat[first]
        self.n.reshape(-1)[:] += np.bincount(f, minlength=self.n.size)
        sums, left = self.sums.reshape(-1, EMB_DIM), np.arange(len(f))
        while len(left):  # one round per repeat of a key: most keys get one new target a block (~5x np.add.at)
            keys, once = np.unique(f[left], return_index=True)
            sums[keys] += unit[left[once]]
            left = np.delete(left, once)

    def _admit(self, cand: np.ndarray) -> None:
        """Add identities not kept yet; past the cap keep those with the smallest hashes, freeing the others."""
        new = cand[~np.isin(cand, self.ids)]
        if not len(new):
            return
        ids = np.concatenate([self.ids, new])
        hashes = np.concatenate([self.hash, identity_hashes(new)])
        slots = np.concatenate([self.slot, np.full(len(new), -1)])
        if len(ids) > self.cap:
            keep = np.argpartition(hashes, self.cap - 1)[: self.cap]
            gone = np.setdiff1d(np.arange(len(ids)), keep)
            for s in slots[gone][slots[gone] >= 0].tolist():
                self.sums[s], self.n[s], self.rows[s] = 0.0, 0, 0
                self.free.append(s)
            ids, hashes, slots = ids[keep], hashes[keep], slots[keep]
            self.threshold = hashes.max()
        for i in np.flatnonzero(slots < 0).tolist():
            if not self.free:
                self._grow()
            slots[i] = self.free.pop()
        order = np.argsort(ids)
        self.ids, self.hash, self.slot = ids[order], hashes[order], slots[order]

    def _grow(self) -> None:
        old = len(self.n)
        size = min(max(2 * old, 64), self.cap)
        self.sums = np.concatenate([self.sums, np.zeros((size - old, self.KEYS, EMB_DIM), np.float32)])
        self.n = np.concatenate([self.n, np.zeros((size - old, self.KEYS), np.int64)])
        self.rows = np.concatenate([self.rows, np.zeros((size - old, self.KEYS), np.int64)])
        self.free.extend(range(size - 1, old - 1, -1))

    def pair_stats(self) -> dict:
        """Per key (yaw bucket name or "all"): the per-identity mean pair cos and row weights of identities
        with two or more distinct targets, and the counts of kept identities with one target."""
        s = self.sums[self.slot].astype(np.float64)
        sq, n, w = np.einsum("ikd,ikd->ik", s, s), self.n[self.slot], self.rows[self.slot]
        out = {}
        for j, key in enumerate((*YAW_BUCKETS, "all")):
            ok = n[:, j] >= 2
            nj = n[ok, j].astype(np.float64)
            out[key] = {
                "pair_cos": (sq[ok, j] - nj) / (nj * (nj - 1)),
                "weight": w[ok, j].astype(np.float64),
                "single": int((n[:, j] == 1).sum()),
                "sampled": int((n[:, j] >= 1).sum()),
            }
        return out

    def report(self, n_identities: int | None = None) -> dict:
        return ceiling_report(self.pair_stats(), n_identities)


def ceiling_estimate(pair_cos: np.ndarray, weight: np.ndarray, single: int, sampled: int) -> dict:
    """c = sqrt(mean pair cos), identities weighted by their source rows (as val cos weights them), and a 95 %
    interval from the normal approximation over identities (a ratio estimator's standard error)."""
    k = len(pair_cos)
    out: dict = {"estimable": k > 0, "n_identities": int(k), "single_target_identities": single, "sampled": sampled}
    if not k:
        out["reason"] = (
            "cannot be estimated: no identity has two or more distinct frontal (target) embeddings here"
            + (
                f" ({'all' if single == sampled else single} of the {sampled} identities examined have exactly one)"
                if single
                else ""
            )
            + "; the ceiling compares an identity's frontal references with each other"
        )
        return out
    total = weight.sum()
    mean = float((weight * pair_cos).sum() / total)
    out["cos"] = float(np.sqrt(np.clip(mean, 0.0, 1.0)))
    out["pair_cos"] = mean
    if k >= 2:
        se = float(np.sqrt(k / (k - 1) * ((weight * (pair_cos - mean)) ** 2).sum()) / total)
        lo, hi = mean - CEILING_Z * se, mean + CEILING_Z * se
        out["ci95"] = [float(np.sqrt(np.clip(lo, 0.0, 1.0))), float(np.sqrt(np.clip(hi, 0.0, 1.0)))]
        out["pair_cos_se"] = se
    else:
        out["ci95"] = None
    return out


def ceiling_report(stats: dict, n_identities: int | None = None) -> dict:
    """The ceiling overall and per |yaw| bucket of the paired sources, from `TargetCeiling.pair_stats` parts."""
    overall = ceiling_estimate(**stats["all"])
    if n_identities is not None:
        overall["of_identities"] = int(n_identities)
    overall["rule"] = CEILING_RULE
    overall["per_yaw"] = {b: ceiling_estimate(**stats[b]) for b in YAW_BUCKETS if stats[b]["sampled"]}
    return overall


def pool_pair_stats(parts: list[dict]) -> dict:
    """`pair_stats` of disjoint identity sets (the splits) as one."""
    out = {}
    for key in (*YAW_BUCKETS, "all"):
        out[key] = {
            "pair_cos": np.concatenate([p[key]["pair_cos"] for p in parts]) if parts else np.zeros(0),
            "weight": np.concatenate([p[key]["weight"] for p in parts]) if parts else np.zeros(0),
            "single": sum(p[key]["single"] for p in parts),
            "sampled": sum(p[key]["sampled"] for p in parts),
        }
    return out


def ceiling_rows(block: dict[str, np.ndarray], norms: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Rows the ceiling uses: a finite, non-zero target and a finite pose (the rest of the row does not matter)."""
    tn = norms["tgt_emb"] if norms and "tgt_emb" in norms else row_norms(block["tgt_emb"])
    return np.isfinite(tn) & (tn >= ZERO_NORM) & np.isfinite(block["src_pose"]).all(axis=1)


def data_ceiling(shard_set: ShardSet | str | Path, split: str = "val", max_identities: int = 0) -> dict:
    """The data ceiling of one split, streaming only identity, src_pose and tgt_emb (what eval and report call).

    Equal to `inspect`'s ``splits[split]["ceiling"]``; unreadable blocks are skipped and counted.
    """
    if not isinstance(shard_set, ShardSet):
        shard_set = ShardSet.open(shard_set)
    table = split_table(shard_set, split)
    reader = BlockReader(table, ("identity", "src_pose", "tgt_emb"))
    acc, ids, bad = TargetCeiling(max_identities), IdentitySet(), 0
    try:
        for i in range(len(table.blocks)):
            try:
                raw = reader.read(i)
            except BadBlock:
                bad += 1
                continue
            block = {k: widen(k, v) for k, v in raw.items()}
            ids.add(block["identity"])
            ok = ceiling_rows(block)
            acc.add(block["identity"][ok], yaw_bucket_index(block["src_pose"][ok, 1]), block["tgt_emb"][ok])
    finally:
        reader.close()
    out = acc.report(len(ids.values()))
    return out | {"split": split, "bad_blocks": bad}
