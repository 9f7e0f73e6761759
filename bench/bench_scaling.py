"""Scaling: dist-train samples/s with 1 and 2 CPU processes, one thread each, and the parallel efficiency.

    python bench/bench_scaling.py                # debug-cpu model, 200 steps, 3 interleaved repeats
    python bench/bench_scaling.py --tiny         # a smoke test

Each run is the real trainer under torchrun (`torchrun --nproc_per_node N -m
dist_train train`, DDP over gloo), OMP_NUM_THREADS=1 and no loader worker
processes, so N processes use N cores. The micro batch per process stays fixed
(weak scaling: the global batch doubles with 2 processes). Samples/s comes from
the trainer's TensorBoard log (`bench_trainer.tb_steps_per_s` x global batch:
startup, evaluation and checkpoints excluded). Efficiency = samples/s(2) /
(2 x samples/s(1)), median over paired repeats; 1.0 is perfect scaling. On a busy
machine the wall-clock figure mostly measures the other load, so the CPU work per sample
is printed too: the CPU seconds (launcher and ranks) of a run of ``--steps`` minus those of a
run of 2 x ``log_every`` steps, per extra sample; its 1-process/2-process ratio is 1.0 when
going distributed (DDP all-reduce over gloo) adds no work.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import (  # noqa: E402
    bench_config,
    cpu_seconds,
    load_average,
    make_synth,
    parse_timed_run,
    tb_steps_per_s,
    timed_run_parser,
    versions,
)

REPO = Path(__file__).resolve().parent.parent
PROCESSES = (1, 2)


def run_trainer(config_file: Path, output_dir: Path, processes: int, steps: int) -> float:
    """One torchrun launch; returns the CPU seconds of all its processes (launcher and ranks)."""
    cpu = cpu_seconds()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        "-m", "dist_train", "train", "--config", str(config_file), "--output_dir", str(output_dir),
        "--max_steps", str(steps),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:] + proc.stderr[-6000:], file=sys.stderr)
        raise RuntimeError(f"dist-train with {processes} process(es) exited {proc.returncode}")
    return cpu_seconds() - cpu


def main(argv: list[str] | None = None) -> int:
    args = parse_timed_run(timed_run_parser(__doc__, "model and micro batch are", steps=200), argv)
    print(versions())
    rates: dict[int, list[float]] = {n: [] for n in PROCESSES}
    cpu_per_sample: dict[int, list[float]] = {n: [] for n in PROCESSES}
    short = 2 * args.log_every  # the short run of the CPU-time difference
    measure_cpu = not args.tiny  # a tiny run is too short for a CPU-time difference

    def per_cpu_s(n: int, i: int | None = None) -> str:
        """Samples per CPU-second of repeat i (or the median), '-' when not measured."""
        if not cpu_per_sample[n]:
            return "-"
        return f"{1 / (statistics.median(cpu_per_sample[n]) if i is None else cpu_per_sample[n][i]):.0f}"

    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        tmp = Path(tmp)
        shard_set = make_synth(tmp / "synth", args.n_identities)
        cfg = bench_config(args.config, shard_set.root, tmp / "run", args.steps, args.log_every, num_workers=0)
        config_file = cfg.save(tmp)
        batch = cfg.train.batch_size
        print(
            f"config {args.config}: micro batch {batch} per process, {args.steps} steps (first {args.log_every} "
            f"not timed), {args.repeats} repeats, 1 thread per process, DDP (gloo); load average {load_average()}"
        )
        for r in range(args.repeats):
            for n in PROCESSES:
                out = tmp / f"run-{n}-{r}"
                cpu_long = run_trainer(config_file, out, n, args.steps)
                rates[n].append(tb_steps_per_s(out) * batch * n)
                if measure_cpu:
                    cpu_short = run_trainer(config_file, tmp / f"short-{n}-{r}", n, short)
                    cpu_per_sample[n].append((cpu_long - cpu_short) / ((args.steps - short) * batch * n))
            print(
                f"repeat {r + 1}: "
                + ", ".join(
                    f"{n} proc {rates[n][-1]:.0f} samples/s, {per_cpu_s(n, -1)} samples/CPU-s" for n in PROCESSES
                ),
                flush=True,
            )
    print(f"load average after: {load_average()}")
    print(f"{'processes':<11}{'global batch':>13}{'samples/s':>11}{'per process':>13}{'samples/CPU-s':>15}   (medians)")
    for n, v in rates.items():
        m = statistics.median(v)
        print(f"{n:<11}{batch * n:>13}{m:>11.0f}{m / n:>13.0f}{per_cpu_s(n):>15}")
    ratios = [b / a for a, b in zip(rates[1], rates[2])]
    ratio = statistics.median(ratios)
    print(
        f"ratio 2-process/1-process samples/s: {ratio:.2f} (median of {len(ratios)} paired repeats, range "
        f"{min(ratios):.2f}-{max(ratios):.2f}); efficiency {ratio / 2:.2f}"
    )
    if not measure_cpu:
        print("CPU work per sample: not measured with --tiny")
        return 0
    work = [c1 / c2 for c1, c2 in zip(cpu_per_sample[1], cpu_per_sample[2])]
    print(
        f"CPU work per sample, 1-process/2-process: {statistics.median(work):.2f} (median; 1.00 = distributing adds "
        f"no work; range {min(work):.2f}-{max(work):.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
