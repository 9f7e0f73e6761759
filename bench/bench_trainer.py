"""Trainer overhead: dist-train's optimizer steps/s against a bare PyTorch loop (one process, CPU).

    python bench/bench_trainer.py                # debug-cpu model, 300 steps, 3 interleaved repeats
    python bench/bench_trainer.py --tiny         # seconds; a smoke test

Three loops train the same model (`build_model`), optimizer (`build_optimizer`: AdamW),
loss (`FrontalLoss`), gradient clipping and micro batch on the same `dist-train synth` data:

- bare: a plain PyTorch loop slicing in-memory tensors (the baseline);
- bare + TrainStream: the same loop fed by the streaming loader the trainer uses;
- dist-train: the real loop, `train.train(cfg)`, with evaluation and checkpoints pushed past the end.

Two rates per loop. Steps/s (wall clock) counts the steps after the first ``log_every``
(startup, worker spawn and the first batch excluded): for dist-train from the wall times of
its TensorBoard ``train/samples_per_s`` points, for the bare loops over the same step range.
Steps per CPU-second is the busy-machine-proof figure: the CPU time (this process and its
loader workers) of a run of ``--steps`` minus that of a run of 2 x ``log_every`` steps, per
extra step, so start-up, the final evaluation and checkpoint cancel out (one untimed short
run per loop first takes the one-time costs). The loops run interleaved, in a rotating order,
repeat by repeat; each ratio is the median of the per-repeat ratios. The gaps bare -> bare + TrainStream -> dist-train say where dist-train's
overhead goes.

Other benchmarks and bench/gpu_check.sh import `versions`, `bench_config`, `make_synth`,
`tb_steps_per_s`, `random_inputs` and `train_flops_per_sample` from here.
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

from dist_train import config as config_mod
from dist_train.data.blocks import read_split
from dist_train.data.schema import EMB_DIM, N_LANDMARKS, train_fields
from dist_train.data.shards import ShardSet
from dist_train.data.stream import TrainStream
from dist_train.losses import FrontalLoss
from dist_train.metrics import TRAIN_TAGS
from dist_train.model import build_model
from dist_train.optim import build_optimizer
from dist_train.synth import SynthParams, make_shard_set

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import machine  # noqa: E402  (bench/ is not a package)


def versions() -> str:
    """The machine line of bench_loader plus memory and the distributed stack's versions."""
    import accelerate
    import deepspeed

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{machine()}\nmemory {mem_gib:.1f} GiB, accelerate {accelerate.__version__}, "
        f"deepspeed {deepspeed.__version__}, {platform.platform()}"
    )


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def make_synth(out: Path, n_identities: int, samples_per_identity: int = 16, test_fraction: float = 0.0) -> ShardSet:
    """A `dist-train synth` shard set (val: 10% of the identities, held out)."""
    make_shard_set(
        out,
        SynthParams(n_identities=n_identities, samples_per_identity=samples_per_identity),
        val_fraction=0.1,
        test_fraction=test_fraction,
    )
    return ShardSet.open(out)


def bench_config(
    preset: str, data_dir: Path, output_dir: Path, steps: int, log_every: int, **overrides
) -> config_mod.Config:
    """A preset for a timed run of ``steps`` optimizer steps: no evaluation, checkpoint or early stop before the end.

    One epoch is made longer than the run, so the only evaluation and checkpoint
    come after the last logged step, outside the timed range.
    """
    values = config_mod.load_yaml(preset)
    batch = int(overrides.get("batch_size", values.get("batch_size", config_mod.TrainConfig.batch_size)))
    values.update(
        data_dir=str(data_dir),
        output_dir=str(output_dir),
        max_steps=steps,
        samples_per_epoch=4 * steps * batch,  # one epoch outlasts the run, even with 2 processes
        log_every_steps=log_every,
        eval_every_steps=0,
        save_every_steps=0,
        early_stopping_patience=0,
        eval_max_samples=512,
    )
    values.update(overrides)
    return config_mod.build(values)


def tb_steps_per_s(run_dir: Path) -> float:
    """Optimizer steps/s between the first and last logged `train/samples_per_s` points of a run.

    The first point closes the interval holding startup and the first batch, so it
    is where timing starts; evaluation and checkpoints after the last point are outside.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0}).Reload()
    points = ea.Scalars(TRAIN_TAGS["samples_per_s"])
    if len(points) < 2:
        raise ValueError(f"{run_dir}: fewer than 2 logged steps; run more steps or log more often")
    first, last = points[0], points[-1]
    return (last.step - first.step) / (last.wall_time - first.wall_time)


def random_inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Plausible model inputs and target (unit embeddings, landmarks in pixels, pose in degrees) for timing."""
    g = torch.Generator().manual_seed(seed)
    return {
        "src_emb": torch.nn.functional.normalize(torch.randn(batch, EMB_DIM, generator=g), dim=-1),
        "src_kps": torch.rand(batch, N_LANDMARKS, 3, generator=g) * 200 + 200,
        "src_pose": (torch.rand(batch, 3, generator=g) - 0.5) * 120,
        "tgt_emb": torch.nn.functional.normalize(torch.randn(batch, EMB_DIM, generator=g), dim=-1),
    }


def train_flops_per_sample(model_cfg: config_mod.ModelConfig, batch: int = 4) -> float:
    """Model FLOPs of one training sample (forward + backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(model_cfg)
    x = random_inputs(batch)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x["src_emb"], x["src_kps"], x["src_pose"]).sum().backward()
    return counter.get_total_flops() / batch


class BareLoop:
    """The baseline: model, optimizer, loss and clipping of the config, nothing else."""

    def __init__(self, cfg: config_mod.Config):
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        self.model = build_model(cfg.model).train()
        self.optimizer = build_optimizer(self.model, cfg, fused=True)  # what dist-train steps with
        self.loss_fn = FrontalLoss(cfg.loss)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        pred = self.model(batch["src_emb"], batch["src_kps"], batch["src_pose"])
        loss, _ = self.loss_fn(pred, batch["tgt_emb"], batch["identity"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, batches, steps: int, skip: int) -> float:
        """Run ``steps`` steps; returns steps/s of the ones after the first ``skip``."""
        for i, batch in enumerate(batches):
            if i == skip:
                t0 = time.perf_counter()
            self.step(batch)
            if i + 1 == steps:
                return (steps - skip) / (time.perf_counter() - t0)
        raise ValueError(f"the batches ran out before {steps} steps")


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its finished children (DataLoader workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def memory_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int):
    """Endless batches sliced from in-memory tensors, reshuffled at each pass."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in train_fields()}
    n = len(tensors["identity"])
    if n < batch_size:
        raise ValueError(f"{n} samples are fewer than one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        perm = torch.from_numpy(rng.permutation(n))
        shuffled = {k: t.index_select(0, perm) for k, t in tensors.items()}
        for j in range(n // batch_size):
            yield {k: t[j * batch_size : (j + 1) * batch_size] for k, t in shuffled.items()}


def stream_batches(cfg: config_mod.Config, shard_set: ShardSet, steps: int):
    """The trainer's loader with the trainer's settings (one process)."""
    stream = TrainStream(
        shard_set,
        split=cfg.data.train_split,
        batch_size=cfg.train.batch_size,
        batches_per_epoch=steps,
        resampled=cfg.data.resampled,
        seed=cfg.train.seed,
        shuffle_blocks=cfg.data.shuffle_blocks,
        num_workers=cfg.data.num_workers,
        fields=train_fields(),
        transient=True,  # as in the trainer
    )
    return iter(stream)


class Loops:
    """The three loops; each call runs ``steps`` steps and returns (wall steps/s after the first ``skip``, CPU s).

    CPU seconds cover the whole run, set-up to teardown (loader workers joined),
    so the difference of a long and a short run is the CPU cost of the extra steps.
    """

    def __init__(self, preset: str, shard_set: ShardSet, run_root: Path, skip: int, **overrides):
        self.preset, self.shard_set, self.run_root, self.skip = preset, shard_set, run_root, skip
        self.overrides = overrides  # config values, e.g. num_workers
        self.runs = 0
        self.arrays = read_split(shard_set, "train")

    def config(self, steps: int) -> config_mod.Config:
        self.runs += 1
        run_dir = self.run_root / f"run-{self.runs}"
        return bench_config(self.preset, self.shard_set.root, run_dir, steps, self.skip, **self.overrides)

    def bare(self, steps: int) -> tuple[float, float]:
        cpu = cpu_seconds()
        cfg = self.config(steps)
        rate = BareLoop(cfg).run(memory_batches(self.arrays, cfg.train.batch_size, cfg.train.seed), steps, self.skip)
        return rate, cpu_seconds() - cpu

    def bare_stream(self, steps: int) -> tuple[float, float]:
        cpu = cpu_seconds()
        cfg = self.config(steps)
        batches = stream_batches(cfg, self.shard_set, steps)
        rate = BareLoop(cfg).run(batches, steps, self.skip)
        batches.close()  # joins the loader workers, so their CPU time is counted
        return rate, cpu_seconds() - cpu

    def dist_train(self, steps: int) -> tuple[float, float]:
        from dist_train.loop import train

        cpu = cpu_seconds()
        cfg = self.config(steps)
        if train(cfg) != 0:
            raise RuntimeError(f"dist-train exited non-zero; see {cfg.train.output_dir}")
        cpu = cpu_seconds() - cpu
        return tb_steps_per_s(Path(cfg.train.output_dir)), cpu


def profile(loops: Loops, steps: int) -> None:
    """cProfile of one dist-train run: the trainer, Accelerate and loader-IPC functions by cumulative time."""
    import cProfile
    import io
    import pstats

    loops.dist_train(2 * loops.skip)  # one-time costs outside the profile
    profiler = cProfile.Profile()
    profiler.enable()
    loops.dist_train(steps)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    stats.print_stats(
        r"dist_train/(train|tracking|data/stream|data/transport)|accelerate/|multiprocessing/(resource_sharer|reductions)",
        30,
    )
    print(f"profile of one {steps}-step dist-train run (cProfile inflates Python-level costs):{out.getvalue()}")


def timed_run_parser(doc: str, timed: str, steps: int) -> argparse.ArgumentParser:
    """The arguments every timed-run benchmark shares (bench_trainer, bench_scaling)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--config", default="debug-cpu", help=f"preset whose {timed} timed")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per run (default {steps})")
    p.add_argument("--log-every", type=int, default=20, help="dist-train log interval; the first is not timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-identities", type=int, default=500, help="synth identities x 16 samples (default 500)")
    p.add_argument("--tiny", action="store_true", help="64 identities, 12 steps, 1 repeat")
    return p


def parse_timed_run(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parsed arguments with --tiny applied; refuses a run too short to time (the first log interval is not)."""
    args = p.parse_args(argv)
    if args.tiny:
        args.n_identities, args.steps, args.log_every, args.repeats = 64, 12, 4, 1
    if args.steps <= 2 * args.log_every:
        p.error(f"--steps ({args.steps}) must be more than 2 x --log-every ({args.log_every}) to time anything")
    return args


def main(argv: list[str] | None = None) -> int:
    p = timed_run_parser(__doc__, "model, batch and optimizer are", steps=300)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every loop (default 1)")
    p.add_argument("--num-workers", type=int, default=None, help="loader worker processes (default: the preset's)")
    p.add_argument(
        "--profile", action="store_true", help="then profile one dist-train run: where its time outside torch goes"
    )
    args = parse_timed_run(p, argv)
    short = 2 * args.log_every  # the short run of the CPU-time difference
    torch.set_num_threads(args.threads)
    print(versions())
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        overrides = {} if args.num_workers is None else {"num_workers": args.num_workers}
        shard_set = make_synth(Path(tmp) / "synth", args.n_identities)
        loops = Loops(args.config, shard_set, Path(tmp), args.log_every, **overrides)
        cfg = loops.config(args.steps)
        print(
            f"config {args.config}: {build_model(cfg.model).describe()}; batch {cfg.train.batch_size}, "
            f"{args.steps} steps (first {args.log_every} not timed), CPU per step from runs of {args.steps} and "
            f"{short} steps, {args.repeats} repeats, {args.threads} thread(s), loader workers "
            f"{cfg.data.num_workers}; load average {load_average()}"
        )
        if args.profile:
            profile(loops, args.steps)
        cases = {"bare": loops.bare, "bare + TrainStream": loops.bare_stream, "dist-train": loops.dist_train}
        if not args.tiny:  # one-time costs (lazy initialisation, first loader fork) outside the figures
            for run in cases.values():
                run(short)
        for r in range(args.repeats):
            order = list(cases)[r % len(cases) :] + list(cases)[: r % len(cases)]  # no loop always goes first
            for name in order:
                rate, cpu_long = cases[name](args.steps)
                _, cpu_short = cases[name](short)
                wall.setdefault(name, []).append(rate)
                cpu.setdefault(name, []).append((args.steps - short) / (cpu_long - cpu_short))
            print(
                f"repeat {r + 1}: "
                + ", ".join(f"{n} {wall[n][-1]:.1f} steps/s, {cpu[n][-1]:.1f} steps/CPU-s" for n in cases),
                flush=True,
            )
    print(f"load average after: {load_average()}")
    flops = train_flops_per_sample(cfg.model) * cfg.train.batch_size
    print(
        f"{'loop':<20}{'steps/s':>9}{'samples/s':>11}{'ms/step':>9}{'GFLOP/s':>9}"
        f"{'steps/CPU-s':>13}{'CPU ms/step':>13}   (medians)"
    )
    for name in cases:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"{name:<20}{w:>9.1f}{w * cfg.train.batch_size:>11.0f}{1000 / w:>9.2f}{w * flops / 1e9:>9.2f}"
            f"{c:>13.1f}{1000 / c:>13.2f}"
        )
    for label, rates in (("wall", wall), ("CPU", cpu)):
        ms = {n: 1000 / statistics.median(v) for n, v in rates.items()}
        print(
            f"overhead per step ({label}): loader {ms['bare + TrainStream'] - ms['bare']:+.2f} ms, "
            f"trainer loop {ms['dist-train'] - ms['bare + TrainStream']:+.2f} ms"
        )
    for label, rates in (("steps/s", wall), ("steps/CPU-s", cpu)):
        ratios = [d / b for d, b in zip(rates["dist-train"], rates["bare"])]
        ratio = statistics.median(ratios)
        print(
            f"ratio dist-train/bare ({label}): {ratio:.2f} (median of {len(ratios)} paired repeats, range "
            f"{min(ratios):.2f}-{max(ratios):.2f}); goal >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
