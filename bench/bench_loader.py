"""Loader throughput: block shards via TrainStream vs in-memory tensors vs one-sample-per-member tars.

    python bench/bench_loader.py                 # 200k samples, batch 256, 3 repeats
    python bench/bench_loader.py --tiny          # seconds; a smoke test

Prints samples/s (median over repeats) by wall clock and by this process's CPU
time; on a shared machine the CPU-time figure is the steadier one.
(a) TrainStream, one process, num_workers 0, exact epoch over a shard set;
(b) the same data as in-memory torch tensors, a shuffled index gathered per batch
    with index_select (what an in-memory shuffled loader does, at its fastest); (c) the naive WebDataset layout,
    one tar sample per data sample with .npy members, decoded by webdataset and batched.

Then the worker scaling (``--workers``, default 0,1,2,4): TrainStream as the trainer builds it, with that many
DataLoader worker processes, pinned memory when CUDA is available and each batch copied to the GPU with
non_blocking=True (then one synchronisation at the end), as the training loop does. Timed from the first
batch (the workers' start-up, printed apart, excluded); per worker count: samples/s, the training process's
own CPU time per batch (unpacking, the pin-memory thread and the copies; the workers' CPU is not in it), the
workers' CPU time per batch, the ratio to (b), and the rate those CPU times allow on free cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from dist_train.data import blocks, shards
from dist_train.data.schema import EMB_DIM, FIELDS, N_LANDMARKS, REQUIRED
from dist_train.data.stream import TrainStream


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"machine: {platform.machine()} {platform.system()}, {cores} usable cores (os.cpu_count {os.cpu_count()}), "
        f"load average {load}\n"
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), webdataset {getattr(wds, '__version__', '?')}"
    )


def synthetic(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def unit():
        x = rng.standard_normal((n, EMB_DIM), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return {
        "src_emb": unit(),
        "src_kps": rng.standard_normal((n, N_LANDMARKS, 3), dtype=np.float32) * 100,
        "src_pose": rng.uniform(-90, 90, (n, 3)).astype(np.float32),
        "tgt_emb": unit(),
        "identity": np.arange(n) // 8,
    }


def timed(run, repeats: int) -> tuple[float, float, int]:
    """Median wall and CPU seconds of ``run()``, which returns the samples it produced."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        n = run()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), n


def loader_run(shard_set: shards.ShardSet, batch_size: int):
    n_batches = shard_set.n_samples("train") // batch_size
    stream = TrainStream(
        shard_set, "train", batch_size=batch_size, batches_per_epoch=n_batches, resampled=False, num_workers=0
    )

    def run() -> int:
        return sum(len(b["identity"]) for b in stream)

    return run


def stream_into_process(shard_set: shards.ShardSet, batch_size: int, workers: int, repeats: int) -> dict:
    """TrainStream with ``workers`` worker processes feeding this process (and the GPU, when there is one).

    Returns medians over ``repeats`` epochs: samples/s from the first batch on, this process's CPU seconds
    per batch over the same span, the workers' CPU seconds per batch (their whole life, start-up included;
    counted once they are joined at the epoch's end) and the seconds until the first batch (worker start-up).
    """
    cuda = torch.cuda.is_available()
    n_batches = shard_set.n_samples("train") // batch_size
    stream = TrainStream(
        shard_set,
        "train",
        batch_size=batch_size,
        batches_per_epoch=n_batches,
        resampled=False,
        num_workers=workers,
        pin_memory=cuda,
        transient=True,  # as the trainer: each batch is dropped before the next few are taken
    )
    device = torch.device("cuda" if cuda else "cpu")
    rates, cpus, worker_cpus, starts = [], [], [], []
    for _ in range(repeats):
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        t_start = time.perf_counter()
        done, t0, c0 = 0, None, None
        for batch in stream:
            if cuda:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if t0 is None:  # the first batch closes the start-up; timing starts here
                t0, c0 = time.perf_counter(), time.process_time()
                starts.append(t0 - t_start)
                continue
            done += len(batch["identity"])
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers are joined when the epoch ends
        rates.append(done / wall)
        cpus.append(cpu / max(done // batch_size, 1))
        worker_cpus.append((after.ru_utime + after.ru_stime - kids.ru_utime - kids.ru_stime) / n_batches)
    return {
        "samples_per_s": statistics.median(rates),
        "cpu_s_per_batch": statistics.median(cpus),
        "worker_cpu_s_per_batch": statistics.median(worker_cpus),
        "startup_s": statistics.median(starts),
        "batches": n_batches,
    }


def memory_run(arrays: dict[str, np.ndarray], batch_size: int):
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    n = len(tensors["identity"])

    def run() -> int:
        perm = torch.randperm(n)
        done = 0
        for i in range(n // batch_size):
            rows = perm[i * batch_size : (i + 1) * batch_size]
            batch = {k: t.index_select(0, rows) for k, t in tensors.items()}
            done += len(batch["identity"])
        return done

    return run


def write_naive(arrays: dict[str, np.ndarray], n: int, out: Path) -> str:
    """One tar sample per data sample, one .npy member per field (webdataset's own encoder)."""
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "naive-%06d.tar"), maxcount=8192, verbose=0) as sink:
        for i in range(n):
            sample = {"__key__": f"s{i:08d}"}
            for k in REQUIRED:
                sample[f"{k}.npy"] = np.asarray(arrays[k][i], FIELDS[k].storage)
            sink.write(sample)
    return str(out / "naive-*.tar")


def naive_run(pattern: str, batch_size: int):
    urls = sorted(str(p) for p in Path(pattern).parent.glob(Path(pattern).name))
    names = tuple(f"{k}.npy" for k in REQUIRED)

    def run() -> int:
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode().to_tuple(*names).batched(batch_size)
        done = 0
        for cols in ds:
            batch = {
                k: torch.from_numpy(np.asarray(c)).to(torch.int64 if k == "identity" else torch.float32)
                for k, c in zip(REQUIRED, cols)
            }
            done += len(batch["identity"])
        return done

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=200_000, help="samples in the shard set (default 200000)")
    p.add_argument(
        "--naive-samples", type=int, default=20_000, help="samples for the slow naive layout (default 20000)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="8192 samples, 1024 naive, 2 repeats")
    p.add_argument("--workers", default="0,1,2,4", help="worker counts of the scaling (default 0,1,2,4)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a busy machine more threads make (b)'s gathers ~10x slower)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tiny:
        args.samples, args.naive_samples, args.repeats = 8192, 1024, 2
    print(machine())
    print(
        f"samples {args.samples} (naive layout {args.naive_samples}), batch {args.batch_size}, repeats {args.repeats}"
    )
    arrays = synthetic(args.samples)
    rates: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards.write_shard_set(Path(tmp) / "set", {"train": arrays}, provenance={"bench": "bench_loader"})
        shard_set = shards.ShardSet.open(Path(tmp) / "set")
        naive = write_naive(arrays, args.naive_samples, Path(tmp) / "naive")
        # (b) uses the shard set's own values (float16 storage, widened), so all three move the same numbers
        stored = blocks.read_split(shard_set, "train")
        cases = {
            "a: TrainStream (block shards, 1 process)": loader_run(shard_set, args.batch_size),
            "b: in-memory tensors (shuffled gather)": memory_run(stored, args.batch_size),
            "c: one sample per tar member (.npy)": naive_run(naive, args.batch_size),
        }
        for name, run in cases.items():
            wall, cpu, n = timed(run, args.repeats)
            rates[name] = (n / wall, n / cpu)
            print(f"{name:44s} {n / wall:>12,.0f} samples/s wall   {n / cpu:>12,.0f} samples/s cpu   ({n} samples)")
        a, b, c = rates.values()
        print(f"ratio a/b: {a[0] / b[0]:.2f} wall, {a[1] / b[1]:.2f} cpu")
        print(f"ratio a/c: {a[0] / c[0]:.1f} wall, {a[1] / c[1]:.1f} cpu")
        cuda = torch.cuda.is_available()
        where = (
            f"into {torch.cuda.get_device_name(0)} (pinned memory, non_blocking copies)"
            if cuda
            else "(no CUDA: no pinning, no copy)"
        )
        counts = [int(w) for w in args.workers.split(",")]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(
            f"worker scaling: TrainStream into this process {where}, exact epoch, batch {args.batch_size}, "
            f"{args.repeats} repeats, timed from the first batch; {cores} usable cores"
        )
        first = f"x {counts[0]} workers"
        print(
            f"{'workers':>7} {'samples/s':>12} {'x (b)':>7} {first:>12} {'own CPU ms/batch':>17} "
            f"{'workers CPU ms/batch':>21} {'start-up s':>11} {'free-core bound':>16}"
        )
        base = None
        for workers in counts:
            r = stream_into_process(shard_set, args.batch_size, workers, args.repeats)
            base = base or r["samples_per_s"]
            # what CPU time allows with a core for this process and each worker: the slower side sets the pace
            per_batch = max(r["cpu_s_per_batch"], r["worker_cpu_s_per_batch"] / workers if workers else 0.0)
            print(
                f"{workers:>7} {r['samples_per_s']:>12,.0f} {r['samples_per_s'] / b[0]:>7.2f} "
                f"{r['samples_per_s'] / base:>12.2f} {1000 * r['cpu_s_per_batch']:>17.2f} "
                f"{1000 * r['worker_cpu_s_per_batch']:>21.2f} {r['startup_s']:>11.2f} "
                f"{args.batch_size / per_batch:>16,.0f}",
                flush=True,
            )
        print(
            "free-core bound: batch / max(own CPU per batch, workers' CPU per batch / workers), samples/s: the rate "
            "CPU time allows when this process and every worker have a core of their own (a bound, not a measurement)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
