"""Checkpoint cost: how long `Checkpointer.save` and `save_best` take for a preset's model, one process.

    python bench/bench_checkpoint.py               # xl (58.2M parameters), 3 saves, on the disk of --dir
    python bench/bench_checkpoint.py --tiny        # debug-cpu, seconds; a smoke test

Prints the size and seconds of each full checkpoint (weights, fused AdamW moments, RNG, trainer state), the
time `save_best` takes before the step may go on (gathering the fp32 weights to the host) and the time its
background thread needs to finish the file, and the share of wall time the default policy
(`--save_every_minutes`) spends saving.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from dist_train import config as config_mod
from dist_train.checkpoint import Checkpointer, TrainState, step_dir_name
from dist_train.model import build_model
from dist_train.optim import build_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="xl")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--dir", default=".", help="where the checkpoints are written (a temporary folder inside it)")
    p.add_argument("--tiny", action="store_true", help="debug-cpu, one save")
    args = p.parse_args()
    preset, saves = ("debug-cpu", 1) if args.tiny else (args.preset, args.saves)
    cfg = config_mod.build(config_mod.load_yaml(preset) | {"data_dir": None})
    acc = Accelerator(cpu=True)
    model = build_model(cfg.model)
    model, optimizer = acc.prepare(model, build_optimizer(model, cfg, fused=True))
    acc.backward(model(torch.randn(4, 512), torch.randn(4, 68, 3) * 100, torch.randn(4, 3)).sum())
    optimizer.step()  # moments exist, as in a real checkpoint
    params = sum(p.numel() for p in model.parameters())
    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir))
    try:
        ck = Checkpointer(cfg.checkpoint, root, acc, cfg)
        seconds = []
        for i in range(1, saves + 1):
            t = time.perf_counter()
            ck.save(TrainState(step=i, run_id="bench"))
            seconds.append(time.perf_counter() - t)
            size = sum(f.stat().st_size for f in (ck.root / step_dir_name(i)).rglob("*") if f.is_file())
            print(
                f"checkpoint {i}: {seconds[-1]:.2f} s, {size / 2**20:,.0f} MiB ({preset}, {params / 1e6:.1f}M params)"
            )
        t = time.perf_counter()
        ck.save_best(model, TrainState(step=saves + 1, run_id="bench"), {"mean_cos": 0.0})
        held = time.perf_counter() - t
        t = time.perf_counter()
        ck.close(TrainState(step=saves + 1, run_id="bench"))
        print(
            f"save_best: the step waits {held:.3f} s (weights to the host); the thread finishes {time.perf_counter() - t:.2f} s later"
        )
        minutes = cfg.checkpoint.save_every_minutes
        share = max(seconds) / (60 * minutes) if minutes else float("nan")
        print(f"default policy (--save_every_minutes {minutes:g}): {share:.2%} of wall time spent saving")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
