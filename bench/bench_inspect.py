"""`dist-train inspect` memory and speed: the streamed version against the in-memory one it replaced.

    python bench/bench_inspect.py              # 100k and 1M rows; the old version on sets up to 100k rows
    python bench/bench_inspect.py --tiny       # seconds; a smoke test

Each shard set (train 90% / val 10% of identities, every field synth writes,
~5 KB a row on disk) is built from a pool of synthetic rows (dist_train.synth):
copy r flips the signs of a fixed random set of embedding components in all four
embeddings (cos, norms and poses stay, the rows differ bit-wise) and shifts the
identities, so a million realistic rows take seconds rather than synth's ~50 s.
Each inspection runs in a fresh subprocess that reports its own peak RSS
(VmHWM), its RSS once imports are done, its wall time and its CPU time (the
steadier figure on a shared machine; rows/s is by wall time). "old" is
dist_train/data/inspect.py at commit OLD_COMMIT (read_split: the whole split in
memory), loaded from git and run against this tree's other modules; it needs
~25 KB a row, so it is only run up to --old-max-rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OLD_COMMIT = "0cb925d"  # the last commit whose inspect read whole splits with read_split
VAL_SHARE = 0.1


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"machine: {platform.machine()} {platform.system()}, {cores} usable cores, load average {load}"


def pool_rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n synthetic rows in storage dtypes (16 a identity), from synth's own generator."""
    from dist_train.synth import SynthParams, generate

    return generate(SynthParams(n_identities=max(2, -(-n // 16)), samples_per_identity=16, seed=seed))


def flipped_copy(pool: dict[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    """Copy r of the pool: embedding signs flipped on copy r's component set (bit ops on float16), ids shifted."""
    mask = np.where(np.random.default_rng(1000 + r).random(pool["src_emb"].shape[1]) < 0.5, 0x8000, 0)
    mask = mask.astype(np.uint16)
    out = dict(pool)
    for k in ("src_emb", "tgt_emb", "tgt_centroid", "oracle_emb"):
        out[k] = (pool[k].view(np.uint16) ^ mask).view(np.float16)
    out["identity"] = pool["identity"] + r * (int(pool["identity"].max()) + 1)
    return out


def write_set(out: Path, pool: dict[str, np.ndarray], n: int, block_size: int = 1024) -> float:
    """A train/val shard set of n rows made of pool copies; returns seconds taken."""
    from dist_train.data.shards import write_index, write_split

    t0 = time.perf_counter()
    ids = pool["identity"]
    is_val = ids >= np.quantile(ids, 1.0 - VAL_SHARE)
    entries: dict[str, dict] = {s: {"shards": [], "n_samples": 0, "n_identities": 0} for s in ("train", "val")}
    r = 0
    while sum(e["n_samples"] for e in entries.values()) < n:
        left = n - sum(e["n_samples"] for e in entries.values())
        copy = {k: v[:left] for k, v in flipped_copy(pool, r).items()}
        for split, rows in (("train", ~is_val[:left]), ("val", is_val[:left])):
            if rows.any():
                part = {k: v[rows] for k, v in copy.items()}
                e = write_split(out, f"{split}_r{r:04d}", part, shard_samples=16 * block_size, block_size=block_size)
                entries[split]["shards"] += e["shards"]
                entries[split]["n_samples"] += e["n_samples"]
                entries[split]["n_identities"] += e["n_identities"]  # copies share no identities
        r += 1
    write_index(out, entries, fields=list(pool), provenance={"bench": "bench_inspect"}, block_size=block_size)
    return time.perf_counter() - t0


def _status_mb(key: str) -> float:
    """A /proc/self/status memory figure in MB (Linux); else the peak from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def old_package(tmp: Path) -> Path | None:
    """OLD_COMMIT's whole dist_train package, extracted under ``tmp`` (None if git cannot): the old inspect runs
    against the package it was written for, not against this tree's."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "dist_train"], capture_output=True)
    if archive.returncode:
        return None
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    return tmp


def child(set_dir: str, impl: str) -> int:
    """Runs in the measured subprocess: one inspect() call; prints one JSON line."""
    import torch  # noqa: F401  (imported before the baseline RSS: every version loads it)
    import webdataset  # noqa: F401

    if impl == "new":
        from dist_train import inspect_cmd as module
    else:  # PYTHONPATH puts OLD_COMMIT's package first (`measure`)
        module = importlib.import_module("dist_train.data.inspect")
    base = _status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    report, _ = module.inspect(set_dir)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = {"rows": report["n_samples"], "seconds": seconds, "cpu_seconds": cpu}
    result |= {"peak_rss_mb": _status_mb("VmHWM"), "base_rss_mb": base}
    result["suspicious"], result["duplicates"] = report["suspicious_pairs"], report["duplicates"]
    print(json.dumps(result))
    return 0


def in_child(script: str, *args: str, env: dict | None = None) -> dict:
    """Run ``script --child ARGS`` in a fresh process (its own peak RSS): the JSON of its last line, or the error."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    done = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(set_dir: Path, impl: str) -> dict:
    script, env = str(Path(__file__).resolve()), {"OMP_NUM_THREADS": "1"}
    if impl == "new":
        return in_child(script, str(set_dir), "--impl", impl, env=env)
    with tempfile.TemporaryDirectory(prefix="bench_inspect_old_") as tmp:
        package = old_package(Path(tmp))
        if package is None:
            return {"error": f"git archive {OLD_COMMIT} failed (a shallow clone?)"}
        return in_child(script, str(set_dir), "--impl", impl, env=env | {"PYTHONPATH": str(package)})


def row(impl: str, n: int, m: dict) -> str:
    if "error" in m:
        return f"| {impl:<5} | {n:>9,} | {m['error']} |"
    growth = m["peak_rss_mb"] - m["base_rss_mb"]
    return (
        f"| {impl:<5} | {m['rows']:>9,} | {m['seconds']:>7.1f} | {m['cpu_seconds']:>7.1f} | {m['rows'] / m['seconds']:>9,.0f} "
        f"| {m['peak_rss_mb']:>8,.0f} | {growth:>11,.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="set sizes (default 100k 1M)")
    p.add_argument("--pool", type=int, default=65_536, help="synthetic rows generated; sets repeat them (flipped)")
    p.add_argument("--old-max-rows", type=int, default=100_000, help="run the old version on sets up to this size")
    p.add_argument("--tiny", action="store_true", help="sets of 1024 and 3072 rows from a 1024-row pool")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="new", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.impl)
    if args.tiny:
        args.rows, args.pool, args.old_max_rows = [1024, 3072], 1024, 1024
    print(machine())
    t0 = time.perf_counter()
    pool = pool_rows(args.pool)
    print(f"pool: {len(pool['identity']):,} synthetic rows in {time.perf_counter() - t0:.1f} s")
    lines = [
        "| inspect | rows | seconds | cpu s | rows/s | peak RSS MB | over imports MB |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench_inspect_") as tmp:
        for n in args.rows:
            set_dir = Path(tmp) / f"set{n}"
            seconds = write_set(set_dir, pool, n)
            size = sum(f.stat().st_size for f in set_dir.iterdir()) / 2**20
            print(f"wrote {n:,} rows ({size:,.0f} MB) in {seconds:.1f} s")
            for impl in ("new", "old") if n <= args.old_max_rows else ("new",):
                m = measure(set_dir, impl)
                lines.append(row(impl, n, m))
                print(lines[-1], flush=True)
            for f in set_dir.iterdir():  # free the disk before the next set
                f.unlink()
    print("\n".join(["", *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
