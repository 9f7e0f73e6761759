"""`dist-train pack`: arrays from an .npz file or a directory of .npy files -> shard set.

Whole-array problems (a missing field, a wrong shape, unequal lengths, pickled
arrays) stop the command before anything is written. Row problems (non-finite
values, zero-norm embeddings) are skipped and counted per reason, or refused
with ``--strict``. Embeddings that are not unit length are L2-normalised and
counted as "renormalised" in index.json, never altered silently.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dist_train import __version__, cli
from dist_train.data.schema import (
    DEFAULT_BLOCK_SIZE,
    EMBEDDING_FIELDS,
    FIELDS,
    REQUIRED,
    ZERO_NORM,
    dtype_problem,
    finite_rows,
)
from dist_train.data.shards import DEFAULT_SHARD_SAMPLES, INDEX_NAME, add_layout_arguments, write_shard_set
from dist_train.data.splits import split_by_identity

# Each skipped row is counted once, under the first reason that applies, so the
# counts add up to the number of rows skipped.
SKIP_REASONS = ("non_finite", "zero_norm_embedding")
UNIT_TOLERANCE = 1e-3  # |norm - 1| above this counts as "renormalised"


class PackError(ValueError):
    """Input arrays that cannot become a shard set; the message says what to fix."""


def ensure_new_output_dir(out: Path) -> None:
    """Refuse to write over an existing shard set: stale shards would mix with new ones."""
    if out.exists() and ((out / INDEX_NAME).exists() or any(out.glob("*.tar"))):
        raise PackError(f"{str(out)!r} already holds a shard set; remove it or choose another --out directory")


def load_arrays(npz: str | None = None, npy_dir: str | None = None) -> dict[str, np.ndarray]:
    """Read named arrays without pickle (arrays are data, never code)."""
    if (npz is None) == (npy_dir is None):
        raise PackError("give exactly one of --npz FILE or --npy-dir DIR")
    if npz is not None:
        path = Path(npz)
        if not path.is_file():
            raise PackError(f"--npz {npz!r}: no such file")
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            return {name: _load_one(lambda name=name: f[name], name, npz) for name in names}
    root = Path(npy_dir)
    if not root.is_dir():
        raise PackError(f"--npy-dir {npy_dir!r}: no such directory")
    files = sorted(root.glob("*.npy"))
    if not files:
        raise PackError(f"--npy-dir {npy_dir!r} holds no .npy files; expected {list(REQUIRED)} as NAME.npy")
    return {p.stem: _load_one(lambda p=p: np.load(p, allow_pickle=False), p.stem, str(p)) for p in files}


def _load_one(load, name: str, source: str) -> np.ndarray:
    try:
        return np.asarray(load())
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise PackError(
                f"array {name!r} in {source!r} is an object (pickled) array; save it as numbers or "
                "fixed-width strings, e.g. np.array(names, dtype=str)"
            ) from e
        raise PackError(f"array {name!r} in {source!r} does not load: {e}") from e


def identity_ids(identity: np.ndarray) -> tuple[np.ndarray, list[str] | None]:
    """Integer identities as int64, or strings mapped to 0..n-1 in sorted order plus the names."""
    if identity.dtype.kind in "iu":
        return identity.astype(np.int64), None
    if identity.dtype.kind in "US":
        names, ids = np.unique(identity.astype(str), return_inverse=True)
        return ids.astype(np.int64), [str(n) for n in names]
    raise PackError(f"identity has dtype {identity.dtype}; use integers or strings (one per sample)")


def check_columns(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Whole-array checks; returns the schema fields and the names of arrays not used."""
    missing = [n for n in REQUIRED if n not in arrays]
    if missing:
        raise PackError(f"missing array(s) {missing}; pack needs {list(REQUIRED)} (optional: tgt_centroid, oracle_emb)")
    columns = {k: v for k, v in arrays.items() if k in FIELDS}
    ignored = sorted(k for k in arrays if k not in FIELDS)
    n = len(columns["identity"]) if columns["identity"].ndim else -1
    for name, a in columns.items():
        want = (n, *FIELDS[name].shape)
        if a.shape != want:
            raise PackError(f"array {name!r} has shape {a.shape}, expected {want} (identity has {n} rows)")
        problem = None if name == "identity" else dtype_problem(name, a.dtype)  # identities: integers or names
        if problem:
            raise PackError(f"array {problem}: integers are no embedding, pose or landmarks; save them as floats")
    if n == 0:
        raise PackError("the arrays hold no rows")
    return columns, ignored


def row_reasons(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Index into SKIP_REASONS per row, or -1 for a good row."""
    n = len(columns["identity"])
    reason = np.full(n, -1, dtype=np.int64)
    reason[~finite_rows(columns)] = SKIP_REASONS.index("non_finite")
    for name in EMBEDDING_FIELDS:
        if name in columns:
            with np.errstate(invalid="ignore", over="ignore"):
                zero = np.linalg.norm(columns[name].astype(np.float64), axis=1) < ZERO_NORM
            reason[zero & (reason < 0)] = SKIP_REASONS.index("zero_norm_embedding")
    return reason


def renormalise(columns: dict[str, np.ndarray]) -> dict[str, int]:
    """L2-normalise embedding rows that are not unit length, in place; returns counts per field."""
    counts = {}
    for name in EMBEDDING_FIELDS:
        if name not in columns:
            continue
        a = columns[name].astype(np.float32)
        norm = np.linalg.norm(a.astype(np.float64), axis=1)
        off = np.abs(norm - 1.0) > UNIT_TOLERANCE
        a[off] /= norm[off, None].astype(np.float32)
        columns[name] = a
        counts[name] = int(off.sum())
    return counts


def pack(
    arrays: dict[str, np.ndarray],
    out: str | Path,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    strict: bool = False,
    source: str = "",
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict:
    """Validate, clean, split and write; returns a summary (also stored in index.json)."""
    out = Path(out)
    ensure_new_output_dir(out)
    columns, ignored = check_columns(arrays)
    columns["identity"], names = identity_ids(columns["identity"])
    reasons = row_reasons(columns)
    skipped = {r: int((reasons == i).sum()) for i, r in enumerate(SKIP_REASONS)}
    n_input = len(reasons)
    if strict and any(skipped.values()):
        raise PackError(
            f"refusing (--strict): {sum(skipped.values())} of {n_input} rows are bad ({_describe(skipped)}); "
            "fix them, or drop --strict to skip and count them"
        )
    keep = reasons < 0
    if not keep.any():
        raise PackError(f"no usable rows: all {n_input} were bad ({_describe(skipped)})")
    columns = {k: v[keep] for k, v in columns.items()}
    renormalised = renormalise(columns)
    splits = split_by_identity(columns, val_fraction, test_fraction, seed)
    extra = {"renormalised": renormalised, "ignored_arrays": ignored}
    if names is not None:
        extra["identity_names"] = names
    provenance = {
        "tool": "dist_train.data.pack",
        "dist_train_version": __version__,
        "source": source,
        "n_input_rows": n_input,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "strict": strict,
    }
    write_shard_set(
        out,
        splits,
        provenance=provenance,
        skipped=skipped,
        extra=extra,
        shard_samples=shard_samples,
        block_size=block_size,
    )
    return {
        "n_input_rows": n_input,
        "skipped": skipped,
        "renormalised": renormalised,
        "ignored_arrays": ignored,
        "splits": {
            s: {"n_samples": len(a["identity"]), "n_identities": len(np.unique(a["identity"]))}
            for s, a in splits.items()
        },
    }


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {r}" for r, n in counts.items() if n) or "none"


def format_summary(out: Path, summary: dict) -> str:
    lines = [f"packed {out} from {summary['n_input_rows']} input rows"]
    for split, s in summary["splits"].items():
        lines.append(f"  {split:<5} {s['n_samples']:>9} samples  {s['n_identities']:>7} identities")
    n_skipped = sum(summary["skipped"].values())
    lines.append(
        f"  skipped {n_skipped} of {summary['n_input_rows']} rows"
        + (f" ({_describe(summary['skipped'])})" if n_skipped else "")
    )
    renorm = {k: v for k, v in summary["renormalised"].items() if v}
    if renorm:
        lines.append("  renormalised to unit length (rows): " + ", ".join(f"{k} {v}" for k, v in renorm.items()))
    if summary["ignored_arrays"]:
        lines.append(f"  ignored arrays (not sample fields): {summary['ignored_arrays']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-train pack", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", help="an .npz holding src_emb, src_kps, src_pose, tgt_emb, identity [, tgt_centroid]")
    src.add_argument("--npy-dir", help="a directory holding NAME.npy for the same arrays")
    p.add_argument("--seed", type=int, default=0, help="seed of the identity split and row shuffle")
    p.add_argument("--strict", action="store_true", help="refuse bad rows instead of skipping and counting them")
    add_layout_arguments(p)
    return p


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    try:
        arrays = load_arrays(args.npz, args.npy_dir)
        summary = pack(
            arrays,
            args.out,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            strict=args.strict,
            source=str(args.npz or args.npy_dir),
            shard_samples=args.shard_samples,
            block_size=args.block_size,
        )
    except (PackError, ValueError) as e:
        print(f"dist-train pack: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(Path(args.out), summary))
    return 0
