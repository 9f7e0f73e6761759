"""`dist-train probe` speed and memory: the closed-form linear probe on 100k and 1M rows, CPU only.

    python bench/bench_probe.py              # 100k and 1M rows (a ~5 GB shard set at a time, in /tmp)
    python bench/bench_probe.py --tiny       # seconds; a smoke test

The shard sets (train 90% / val 10% of identities, every field synth writes)
are built as bench/bench_inspect.py builds them: copies of a pool of synthetic
rows with embedding signs flipped per copy, so a million realistic rows take
seconds. Each probe runs in a fresh subprocess that reports its wall time, CPU
time, the fit / eval split of it, its peak RSS (VmHWM) and RSS after imports,
and the probe's val cos beside the identity baseline. The probe reads four
fields (identity, src_emb, src_pose, tgt_emb) of train once and of val once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_inspect import _status_mb, in_child, machine, pool_rows, write_set  # noqa: E402


def child(set_dir: str) -> int:
    """Runs in the measured subprocess: one run_probe() call; prints one JSON line."""
    import torch

    from dist_train import probe

    base = _status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    p = probe.run_probe(set_dir)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    v = p["val"]
    result = {
        "train_rows": p["train"]["rows"],
        "val_rows": v["n"],
        "seconds": seconds,
        "cpu_seconds": cpu,
        "fit_seconds": p["seconds"]["fit"],
        "eval_seconds": p["seconds"]["eval"],
        "peak_rss_mb": _status_mb("VmHWM"),
        "base_rss_mb": base,
        "probe_cos": v["mean_cos"],
        "baseline_cos": v["identity_baseline_cos"],
        "alpha": p["ridge"]["alpha"],
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


def measure(set_dir: Path) -> dict:
    return in_child(str(Path(__file__).resolve()), str(set_dir))


def row(n: int, m: dict) -> str:
    if "error" in m:
        return f"| {n:>9,} | {m['error']} |"
    rows = m["train_rows"] + m["val_rows"]
    return (
        f"| {rows:>9,} | {m['train_rows']:>9,} | {m['seconds']:>7.1f} | {m['fit_seconds']:>6.1f} | "
        f"{m['eval_seconds']:>6.1f} | {m['cpu_seconds']:>7.1f} | {rows / m['seconds']:>9,.0f} | "
        f"{m['peak_rss_mb']:>8,.0f} | {m['peak_rss_mb'] - m['base_rss_mb']:>8,.0f} | "
        f"{m['probe_cos']:.4f} | {m['baseline_cos']:.4f} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="set sizes (default 100k 1M)")
    p.add_argument("--pool", type=int, default=65_536, help="synthetic rows generated; sets repeat them (flipped)")
    p.add_argument("--tiny", action="store_true", help="sets of 2048 and 6144 rows from a 2048-row pool")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.tiny:
        args.rows, args.pool = [2048, 6144], 2048
    print(machine())
    t0 = time.perf_counter()
    pool = pool_rows(args.pool)
    print(f"pool: {len(pool['identity']):,} synthetic rows in {time.perf_counter() - t0:.1f} s")
    lines = [
        "| rows | train rows | seconds | fit s | eval s | cpu s | rows/s | peak RSS MB | over imports MB "
        "| probe cos | baseline cos |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench_probe_") as tmp:
        for n in args.rows:
            set_dir = Path(tmp) / f"set{n}"
            seconds = write_set(set_dir, pool, n)
            size = sum(f.stat().st_size for f in set_dir.iterdir()) / 2**20
            print(f"wrote {n:,} rows ({size:,.0f} MB) in {seconds:.1f} s")
            lines.append(row(n, measure(set_dir)))
            print(lines[-1], flush=True)
            for f in set_dir.iterdir():  # free the disk before the next set
                f.unlink()
    print("\n".join(["", *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
