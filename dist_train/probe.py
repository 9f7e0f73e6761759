"""`dist-train probe`: a linear probe of a shard set, the figure a trained model has to beat.

A ridge regression from [src_emb, encode_pose(src_pose), 1] to tgt_emb,
fitted in closed form on the train split and scored on val with the model's
own metrics (mean cos, per |yaw| bucket, impostor cos, TAR@FAR). If the
Transformer does worse than this, the model setup (tokens, learning rate,
warm-up, head) is the bottleneck, not capacity or data.

- One streaming pass over train: the normal equations X'X and X'Y in float64,
  in bounded memory; rows with a non-finite value or a zero-norm embedding are
  skipped.
- The regression is of the correction tgt - src, so a large ridge shrinks it
  toward the identity map (the do-nothing baseline) rather than toward zero;
  the bias is not penalised. Lambda = alpha x the mean diagonal of X'X's
  embedding block; alpha is chosen by mean cos on a held-out slice of train
  (whole identities, by a seeded id hash, at most HOLDOUT_MAX_ROWS rows),
  then the probe is refitted on all of train.
- The val pass computes the same figures as `metrics.quality` would on all
  predictions at once (the TAR@FAR pair sample is the same hash-chosen subset),
  without holding the split in memory.

The result is cached as ``<SET>/probe.json``, keyed by the sha256 of
``index.json``; `dist-train report` and `dist-train eval` read it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dist_train import cli
from dist_train.ceiling import identity_hashes
from dist_train.data.blocks import BlockReader, readable_split, split_table
from dist_train.data.schema import EMB_DIM, YAW_BUCKETS, ZERO_NORM, finite_rows, yaw_bucket_index
from dist_train.data.shards import INDEX_NAME, BadBlock, ShardSet, ShardSetError, widen
from dist_train.geometry import encode_pose
from dist_train.metrics import FARS, MAX_PAIR_SAMPLES, VERIFY_FAR, _row_hash, impostor_and_tar
from dist_train.paths import output_file

PROBE_VERSION = 1  # bump when the same set would give a different probe: old caches are then ignored
PROBE_NAME = "probe.json"
POSE_FEATURES = 6  # geometry.encode_pose: sin and cos of pitch, yaw, roll
N_FEATURES = EMB_DIM + POSE_FEATURES + 1  # src_emb, encoded pose, bias
FIELDS = ("identity", "src_emb", "src_pose", "tgt_emb")
RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # lambda = alpha * mean diagonal of X'X's embedding block
DEFAULT_ALPHA = 1.0  # when train has too few identities to hold any out
HOLDOUT_SHARE = 0.1  # share of train identities held out to choose alpha
HOLDOUT_MAX_ROWS = 8192  # held-out rows kept in memory (float32: ~4 KB a row)
CHUNK_ROWS = 8192  # rows per normal-equation update (~70 MB of float64 buffers)


class ProbeError(ValueError):
    """A shard set the probe cannot use; the message says why."""


def set_key(root: str | Path) -> str:
    """The cache key of a shard set: sha256 of its index.json bytes (any change to the set changes it)."""
    return hashlib.sha256((Path(root) / INDEX_NAME).read_bytes()).hexdigest()


def pose_features(pose: np.ndarray) -> np.ndarray:
    """(n, POSE_FEATURES): the model's own pose encoding, `geometry.encode_pose` (sin and cos of the angles)."""
    return encode_pose(torch.from_numpy(np.array(pose, np.float32))).numpy()


def features(src: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """(n, N_FEATURES) float64: src_emb, the encoded pose and 1."""
    x = np.empty((len(src), N_FEATURES), np.float64)
    x[:, :EMB_DIM] = src
    x[:, EMB_DIM:-1] = pose_features(pose)
    x[:, -1] = 1.0
    return x


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.sqrt(np.einsum("ij,ij->i", a, a)), 1e-12)[:, None]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row cos in float64 (metrics.row_cos without its float64 copies)."""
    num = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    den = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64) * np.einsum("ij,ij->i", b, b, dtype=np.float64))
    return num / np.maximum(den, 1e-12)


def read_valid(shard_set: ShardSet, split: str, counts: dict):
    """Yield the split's blocks (float32 / int64) with invalid rows dropped; bad blocks and rows are counted."""
    table = split_table(shard_set, split)
    reader = BlockReader(table, FIELDS)
    try:
        for i in range(len(table.blocks)):
            try:
                raw = reader.read(i)
            except BadBlock:
                counts["bad_blocks"] += 1
                counts["unreadable_rows"] += table.blocks[i].n_rows
                continue
            block = {k: widen(k, v) for k, v in raw.items()}
            ok = finite_rows(block)
            for k in ("src_emb", "tgt_emb"):
                with np.errstate(invalid="ignore", over="ignore"):
                    ok &= np.sqrt(np.einsum("ij,ij->i", block[k], block[k], dtype=np.float64)) >= ZERO_NORM
            counts["invalid_rows"] += int((~ok).sum())
            yield block if ok.all() else {k: v[ok] for k, v in block.items()}
    finally:
        reader.close()


class NormalEquations:
    """Running X'X and X'Y in float64 for X = features(src, pose), Y = tgt - src.

    Rows are gathered into CHUNK_ROWS-row buffers so each update is one large
    matrix product (torch's, ~2x numpy's OpenBLAS here; small blocks run far
    below peak).
    """

    def __init__(self, chunk_rows: int = 0):

        self.chunk = chunk_rows or CHUNK_ROWS
        self.xtx = torch.zeros((N_FEATURES, N_FEATURES), dtype=torch.float64)
        self.xty = torch.zeros((N_FEATURES, EMB_DIM), dtype=torch.float64)
        self.x = self.y = self.pose = None  # buffers, allocated at the first row
        self.fill = 0
        self.n = 0

    def add(self, src: np.ndarray, pose: np.ndarray, tgt: np.ndarray) -> None:
        i = 0
        while i < len(src):
            if self.x is None:
                self.x = np.empty((self.chunk, N_FEATURES), np.float64)
                self.x[:, -1] = 1.0
                self.y = np.empty((self.chunk, EMB_DIM), np.float64)
                self.pose = np.empty((self.chunk, 3), np.float32)
            m = min(len(src) - i, self.chunk - self.fill)
            rows = slice(self.fill, self.fill + m)
            self.x[rows, :EMB_DIM] = src[i : i + m]
            self.pose[rows] = pose[i : i + m]
            np.subtract(tgt[i : i + m], src[i : i + m], out=self.y[rows])
            self.fill += m
            i += m
            if self.fill == self.chunk:
                self.flush()
        self.n += len(src)

    def flush(self) -> None:
        """Encode the buffered poses (one call a chunk: small torch calls are slow next to a busy BLAS) and update."""
        if self.fill:
            self.x[: self.fill, EMB_DIM:-1] = pose_features(self.pose[: self.fill])
            x, y = torch.from_numpy(self.x[: self.fill]), torch.from_numpy(self.y[: self.fill])
            self.xtx.addmm_(x.T, x)
            self.xty.addmm_(x.T, y)
            self.fill = 0

    def solved(self, alpha: float) -> tuple[np.ndarray, float]:
        """The ridge weights (N_FEATURES, EMB_DIM) for ``alpha``, and lambda."""
        self.flush()
        gram = self.xtx.numpy()
        gram = (gram + gram.T) / 2.0  # exactly symmetric
        lam = alpha * float(np.mean(np.diag(gram)[:EMB_DIM]))
        return solve(gram, self.xty.numpy(), lam), lam


def solve(gram: np.ndarray, xty: np.ndarray, lam: float) -> np.ndarray:
    """(N_FEATURES, EMB_DIM) weights of the correction; the bias (last row) is not penalised."""
    penalty = np.full(len(gram), lam)
    penalty[-1] = 0.0
    a, b = torch.from_numpy(gram + np.diag(penalty)), torch.from_numpy(np.ascontiguousarray(xty))
    w, info = torch.linalg.solve_ex(a, b)  # torch's LAPACK: ~10x numpy's on this busy 2-core machine
    if int(info) != 0:  # singular even with the ridge (e.g. a constant column): least squares
        w = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return w.numpy()


def predict(w: np.ndarray, src: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """float32 predictions src + [src, pose, 1] W, in float64 (not normalised: cos does not care)."""
    out = torch.from_numpy(features(src, pose)) @ torch.from_numpy(w)
    return (out.numpy() + src).astype(np.float32)


class PairSample:
    """The rows `metrics.impostor_and_tar` would pick from the whole split, kept as the split streams by.

    `metrics._pair_subset` keeps the MAX_PAIR_SAMPLES rows first in the order
    (hash of identity and target, hash of the query); this keeps the same
    bottom-k, so the TAR@FAR and impostor cos equal those of all rows at once.
    """

    def __init__(self, size: int = MAX_PAIR_SAMPLES):
        self.size = size
        self.cols: dict[str, np.ndarray] | None = None
        self.last: tuple[np.uint64, np.uint64] | None = None  # the largest key kept, once the sample is full

    def add(self, query: np.ndarray, tgt: np.ndarray, identity: np.ndarray, h1: np.ndarray | None = None) -> None:
        """``h1``: `_row_hash(identity, tgt)` when the caller has it (it is the same for every query)."""
        h1 = _row_hash(identity, tgt) if h1 is None else h1
        if self.last is not None:  # only rows that sort before the largest kept key can enter
            cand = np.flatnonzero(h1 <= self.last[0])
            if not len(cand):
                return
            query, tgt, identity, h1 = query[cand], tgt[cand], identity[cand], h1[cand]
        new = {"h1": h1, "h2": _row_hash(query), "q": query, "t": tgt, "id": identity}
        cols = new if self.cols is None else {k: np.concatenate([self.cols[k], v]) for k, v in new.items()}
        if len(cols["id"]) > self.size:
            keep = np.lexsort((cols["h2"], cols["h1"]))[: self.size]
            cols = {k: v[keep] for k, v in cols.items()}
            self.last = (cols["h1"][-1], cols["h2"][-1])
        self.cols = cols

    def result(self) -> dict:
        c = self.cols
        return impostor_and_tar(c["q"], c["t"], c["id"]) if c is not None else {"impostor_cos": float("nan")}


class StreamingQuality:
    """`metrics.quality` (without the oracle) of predictions made block by block."""

    def __init__(self):
        m = len(YAW_BUCKETS)
        self.n = np.zeros(m, np.int64)
        self.pred = np.zeros(m)
        self.base = np.zeros(m)
        self.pairs = {"pred": PairSample(), "baseline": PairSample()}

    def add(self, pred: np.ndarray, tgt: np.ndarray, src: np.ndarray, yaw: np.ndarray, identity: np.ndarray) -> None:
        b = yaw_bucket_index(yaw)
        m = len(YAW_BUCKETS)
        self.n += np.bincount(b, minlength=m)
        self.pred += np.bincount(b, weights=_cos(pred, tgt), minlength=m)
        self.base += np.bincount(b, weights=_cos(src, tgt), minlength=m)
        h1 = _row_hash(identity, tgt)
        self.pairs["pred"].add(pred, tgt, identity, h1)
        self.pairs["baseline"].add(src, tgt, identity, h1)

    def result(self) -> dict:
        n = int(self.n.sum())
        out: dict = {
            "n": n,
            "mean_cos": float(self.pred.sum() / n) if n else float("nan"),
            "identity_baseline_cos": float(self.base.sum() / n) if n else float("nan"),
        }
        out["gain"] = out["mean_cos"] - out["identity_baseline_cos"]
        out["per_yaw"] = {
            name: {
                "n": int(self.n[i]),
                "cos": float(self.pred[i] / self.n[i]),
                "baseline": float(self.base[i] / self.n[i]),
            }
            for i, name in enumerate(YAW_BUCKETS)
            if self.n[i]
        }
        p, b = self.pairs["pred"].result(), self.pairs["baseline"].result()
        out["impostor_cos"], out["baseline_impostor_cos"] = p["impostor_cos"], b["impostor_cos"]
        out["tar_at_far"] = {
            f"{far:g}": {"pred": p["tar_at_far"][f"{far:g}"], "baseline": b["tar_at_far"][f"{far:g}"]}
            for far in FARS
            if "tar_at_far" in p
        }
        out["frr_at_far"] = {far: {k: 1.0 - v for k, v in e.items()} for far, e in out["tar_at_far"].items()}
        return out


def holdout_fraction(n_train: int) -> float:
    """Share of train identities to hold out: HOLDOUT_SHARE, less when that many rows would pass the cap."""
    return min(HOLDOUT_SHARE, 0.9 * HOLDOUT_MAX_ROWS / max(n_train, 1))


def fit(shard_set: ShardSet, split: str = "train") -> dict:
    """One pass over the split: the fit part's normal equations and the held-out rows; alpha; the final weights."""
    counts = {"bad_blocks": 0, "unreadable_rows": 0, "invalid_rows": 0, "holdout_dropped_rows": 0}
    limit = np.uint64(int(holdout_fraction(shard_set.n_samples(split)) * 2.0**64))
    eq = NormalEquations()
    held: dict[str, list[np.ndarray]] = {"src": [], "pose": [], "tgt": []}
    n_held = 0
    for block in read_valid(shard_set, split, counts):
        out = identity_hashes(block["identity"]) < limit
        src, pose, tgt = block["src_emb"], block["src_pose"], block["tgt_emb"]
        if out.any():
            take = np.flatnonzero(out)
            room = HOLDOUT_MAX_ROWS - n_held
            counts["holdout_dropped_rows"] += max(len(take) - room, 0)
            take = take[:room]
            for k, v in (("src", src), ("pose", pose), ("tgt", tgt)):
                held[k].append(v[take].copy())
            n_held += len(take)
            src, pose, tgt = src[~out], pose[~out], tgt[~out]
        eq.add(src, pose, tgt)
    if eq.n == 0 and n_held == 0:
        raise ProbeError(f"split {split!r} of {shard_set.root} has no valid rows to fit a probe on")
    widths = {"src": EMB_DIM, "pose": 3, "tgt": EMB_DIM}
    h = {k: np.concatenate(v) if v else np.zeros((0, widths[k]), np.float32) for k, v in held.items()}
    grid, best = [], None
    if n_held and eq.n:
        for alpha in RIDGE_ALPHAS:
            w, _ = eq.solved(alpha)
            score = float(_cos(predict(w, h["src"], h["pose"]), h["tgt"]).mean())
            grid.append({"alpha": alpha, "holdout_cos": score})
            if best is None or score > best[1]:
                best = (alpha, score)
    alpha = best[0] if best else DEFAULT_ALPHA
    n_fit = eq.n
    if n_held:
        eq.add(h["src"], h["pose"], h["tgt"])
    w, lam = eq.solved(alpha)
    return {
        "weights": w,
        "train": {
            "split": split,
            "rows": int(eq.n),
            "fit_rows": int(n_fit),
            "holdout_rows": int(n_held),
            "holdout_baseline_cos": float(_cos(h["src"], h["tgt"]).mean()) if n_held else None,
        }
        | counts,
        "ridge": {
            "alpha": alpha,
            "lambda": lam,
            "grid": grid,
            "chosen_by": "mean cos on held-out train identities; then refitted on all train rows"
            if grid
            else f"default alpha {DEFAULT_ALPHA:g} (no identities to hold out)",
        },
    }


def evaluate(shard_set: ShardSet, split: str, w: np.ndarray) -> dict:
    counts = {"bad_blocks": 0, "unreadable_rows": 0, "invalid_rows": 0}
    q = StreamingQuality()
    for block in read_valid(shard_set, split, counts):
        pred = predict(w, block["src_emb"], block["src_pose"])
        q.add(pred, block["tgt_emb"], block["src_emb"], block["src_pose"][:, 1], block["identity"])
    return q.result() | {"split": split} | counts


def run_probe(root: str | Path, train_split: str = "train", split: str = "val") -> dict:
    """Fit on ``train_split``, score on ``split``; the JSON-ready result (no weights)."""
    shard_set = ShardSet.open(root)
    for s in (train_split, split):
        readable_split(shard_set, s)  # ShardSetError: no such split, empty, unreadable, or a lying index
    t0, c0 = time.perf_counter(), time.process_time()
    fitted = fit(shard_set, train_split)
    t1, c1 = time.perf_counter(), time.process_time()
    val = evaluate(shard_set, split, fitted.pop("weights"))
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "probe_version": PROBE_VERSION,
        "set": str(root),
        "index_sha256": set_key(root),
        "model": "ridge: tgt_emb - src_emb ~ [src_emb, encode_pose(src_pose), 1] (closed form, float64)",
        **fitted,
        "val": val,
        "seconds": {"fit": t1 - t0, "eval": t2 - t1, "total": t2 - t0, "cpu": (c1 - c0) + (c2 - c1)},
    }


# ---- cache --------------------------------------------------------------------------------------


def _matches(p: dict, root: Path, train_split: str, split: str) -> bool:
    return (
        p.get("probe_version") == PROBE_VERSION
        and p.get("index_sha256") == set_key(root)
        and p.get("train", {}).get("split") == train_split
        and p.get("val", {}).get("split") == split
    )


def read_cached(
    root: str | Path, *extra_dirs: str | Path, train_split: str = "train", split: str = "val"
) -> dict | None:
    """A cached probe of this exact set (index.json hash) from ``<SET>/probe.json`` or ``extra_dirs``, else None."""
    root = Path(root)
    for d in (root, *extra_dirs):
        path = Path(d) / PROBE_NAME
        try:
            p = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(p, dict) and _matches(p, root, train_split, split):
            return p | {"cache": str(path)}
    return None


def write_cache(p: dict, root: str | Path, fallback: str | Path | None = None) -> str:
    """Store beside the set, else under ``fallback``; returns a sentence saying where (or that it could not)."""
    text = json.dumps(p, indent=2) + "\n"
    for d in (Path(root), *([Path(fallback)] if fallback else [])):
        path = d / PROBE_NAME
        tmp = path.with_name(PROBE_NAME + ".tmp")
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            tmp.replace(path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            continue
        return f"cached in {path}" + ("" if d == Path(root) else f" ({root} is not writable)")
    return f"not cached: {root} is not writable" + (f", nor {fallback}" if fallback else "")


def probe_for(
    root: str | Path,
    *,
    run: bool = True,
    fallback: str | Path | None = None,
    train_split: str = "train",
    split: str = "val",
) -> tuple[dict | None, str]:
    """(probe, note): the cached probe of the set, or (``run``) a fresh one, cached; None with the reason."""
    try:
        cached = read_cached(root, *([fallback] if fallback else []), train_split=train_split, split=split)
    except OSError as e:
        return None, f"no linear probe: {e}"
    if cached is not None:
        return cached, f"linear probe read from {cached['cache']}"
    if not run:
        return None, f"no linear probe cached for {root} (run `dist-train probe {root}`)"
    try:
        p = run_probe(root, train_split, split)
    except (ShardSetError, ProbeError, OSError) as e:
        return None, f"no linear probe: {e}"
    note = write_cache(p, root, fallback)
    return p, f"linear probe fitted in {p['seconds']['total']:.1f} s, {note}"


# ---- command line -------------------------------------------------------------------------------


def frr(p: dict, key: str = "pred") -> float | None:
    """False-reject rate at FAR 1e-3 of the probe's val figures (``key`` pred or baseline)."""
    v = p.get("val", p).get("tar_at_far", {}).get(VERIFY_FAR, {}).get(key)
    return None if v is None else 1.0 - v


def format_text(p: dict) -> str:
    v, t, r = p["val"], p["train"], p["ridge"]
    lines = [
        f"linear probe of {p['set']}: {p['model']}",
        f"  fitted on {t['split']}: {t.get('fit_rows', t['rows'])} rows + {t['holdout_rows']} held-out rows (alpha chosen there: "
        + ", ".join(f"{g['alpha']:g} -> {g['holdout_cos']:.4f}" for g in r["grid"])
        + f"); alpha {r['alpha']:g}, lambda {r['lambda']:.4g}",
        f"  {v['split']}: {v['n']} rows, probe cos {v['mean_cos']:.4f}, identity baseline {v['identity_baseline_cos']:.4f} "
        f"(gain {v['gain']:+.4f})",
        "  |yaw| bucket   " + "".join(f"{b:>8}" for b in YAW_BUCKETS),
        "  probe cos      "
        + "".join(f"{v['per_yaw'][b]['cos']:>8.3f}" if b in v["per_yaw"] else f"{'-':>8}" for b in YAW_BUCKETS),
        "  baseline cos   "
        + "".join(f"{v['per_yaw'][b]['baseline']:>8.3f}" if b in v["per_yaw"] else f"{'-':>8}" for b in YAW_BUCKETS),
    ]
    if v.get("tar_at_far"):
        cells = ", ".join(
            f"FAR {far}: TAR {e['pred']:.4f} (baseline {e['baseline']:.4f})" for far, e in v["tar_at_far"].items()
        )
        lines.append(
            f"  verification: {cells}; impostor cos {v['impostor_cos']:.4f} (baseline {v['baseline_impostor_cos']:.4f})"
        )
        lines.append(f"  false-reject rate at FAR 1e-3: probe {frr(p):.4f}, baseline {frr(p, 'baseline'):.4f}")
    skipped = t["invalid_rows"] + v["invalid_rows"] + t["unreadable_rows"] + v["unreadable_rows"]
    if skipped:
        lines.append(f"  skipped: {skipped} rows (non-finite, zero-norm or in unreadable blocks)")
    lines.append(
        f"  {p['seconds']['total']:.1f} s ({p['seconds']['fit']:.1f} s fit, {p['seconds']['eval']:.1f} s eval)"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-train probe", description=__doc__.splitlines()[0])
    p.add_argument("dir", help="shard set directory (holds index.json)")
    p.add_argument("--json", help="also write the result as JSON here")
    p.add_argument("--train-split", default="train", help="split the probe is fitted on (default train)")
    p.add_argument("--split", default="val", help="split it is scored on (default val)")
    p.add_argument("--refresh", action="store_true", help=f"fit again even when {PROBE_NAME} holds this set's probe")
    p.add_argument("--no-cache", action="store_true", help=f"do not write {PROBE_NAME} beside the set")
    return p


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    try:
        cached = None if args.refresh else read_cached(args.dir, train_split=args.train_split, split=args.split)
        p = cached or run_probe(args.dir, args.train_split, args.split)
    except (ShardSetError, ProbeError, OSError) as e:
        print(f"dist-train probe: error: {e}", file=sys.stderr)
        return 2
    print(format_text(p))
    if cached is not None:
        print(f"  (read from {cached['cache']}; --refresh fits again)")
    elif not args.no_cache:
        print(f"  {write_cache(p, args.dir)}")
    if args.json:
        output_file(args.json).write_text(json.dumps({k: v for k, v in p.items() if k != "cache"}, indent=2) + "\n")
    return 0
