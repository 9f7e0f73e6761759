"""ZeRO memory: per-rank bytes of parameters, gradients and optimizer state, DDP vs ZeRO-1/2/3 on 2 ranks.

    python bench/bench_zero_memory.py            # xl model (768-dim, 8 layers), 2 CPU processes
    python bench/bench_zero_memory.py --tiny     # debug-cpu model; a smoke test

Launches itself under torchrun with 2 CPU processes (gloo). Each rank builds the
model with `build_model` and the optimizer with `build_optimizer` (AdamW), wraps
them as dist-train does — torch DDP in fp32, or a DeepSpeed engine from
configs/deepspeed/zero{1,2,3}-bf16.json filled by `runtime.deepspeed_config` —
and takes one training step. The bytes are read from what the engine holds:

- parameters: the bf16 flat groups (ZeRO-1/2), the bf16 partitions plus the
  parameters kept whole (ZeRO-3 `stage3_param_persistence_threshold`), fp32 tensors (DDP);
- gradients, after backward at the step boundary: the reduced partitions
  (`averaged_gradients`, ZeRO-1/2; `grad_partitions_flat_buffer`, ZeRO-3), `.grad` (DDP);
- optimizer: the fp32 master partitions (`single_partition_of_fp32_groups`,
  `fp32_partitioned_groups_flat`) plus AdamW's state tensors (exp_avg, exp_avg_sq).

Beside each, the ZeRO paper's formula (Rajbhandari et al. 2020): mixed-precision Adam
needs 2Ψ (bf16 params) + 2Ψ (bf16 grads) + KΨ with K = 12 (fp32 params, momentum,
variance); ZeRO-1 divides KΨ by the ranks N, ZeRO-2 also the gradients, ZeRO-3 all
three. DDP here trains in fp32: 4Ψ + 4Ψ + 8Ψ (the same 16Ψ total). Reduce buckets
that DeepSpeed allocates up front are shown apart: they are sized by the config
(`reduce_bucket_size`), not by the model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dist_train import config as config_mod
from dist_train.losses import FrontalLoss
from dist_train.model import build_model
from dist_train.optim import build_optimizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import load_average, random_inputs, versions  # noqa: E402  (bench/ is not a package)

MODES = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")
WORLD = 2
K_ADAM = 12  # the paper's K for mixed-precision Adam: fp32 params + momentum + variance, 4 bytes each
MIB = 2**20


def formula(mode: str, psi: int, n: int) -> dict[str, float]:
    """Bytes per rank the ZeRO paper gives for each component."""
    if mode == "DDP":
        return {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi}  # fp32: weights, grads, Adam m and v
    stage = int(mode[-1])
    return {
        "params": 2 * psi / (n if stage >= 3 else 1),
        "grads": 2 * psi / (n if stage >= 2 else 1),
        "optimizer": K_ADAM * psi / n,
    }


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def adam_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return nbytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def loss_of(model, batch: dict, loss_fn: FrontalLoss) -> torch.Tensor:
    pred = model(batch["src_emb"], batch["src_kps"], batch["src_pose"])
    return loss_fn(pred.float(), batch["tgt_emb"])[0]


def measure_ddp(cfg: config_mod.Config, batch: dict) -> dict:
    model = build_model(cfg.model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(model, cfg)
    loss_of(ddp, batch, FrontalLoss(cfg.loss)).backward()
    grads = nbytes(p.grad for p in model.parameters())
    optimizer.step()
    return {
        "psi": sum(p.numel() for p in model.parameters()),
        "params": nbytes(p.data for p in model.parameters()),
        "grads": grads,
        "optimizer": adam_state_bytes(optimizer),
        "buffers": 0,
    }


def measure_zero(cfg: config_mod.Config, stage: int, batch: dict) -> dict:
    import deepspeed

    from dist_train.runtime import deepspeed_config

    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(REPO / "configs" / "deepspeed" / f"zero{stage}-bf16.json")
    ds, _ = deepspeed_config(cfg, WORLD, on_gpu=False)
    model = build_model(cfg.model)
    psi = sum(p.numel() for p in model.parameters())
    engine, zero, _, _ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg), config=ds, dist_init_required=False
    )
    if int(engine.zero_optimization_stage()) != stage:
        raise RuntimeError(f"asked for ZeRO-{stage}, the engine runs stage {engine.zero_optimization_stage()}")
    engine.backward(loss_of(engine, batch, FrontalLoss(cfg.loss)))
    if stage == 3:
        grads = nbytes([zero.grad_partitions_flat_buffer])  # averaged_gradients are views into it
        buffers = nbytes(b.buffer for b in zero.ipg_buckets.values() if getattr(b, "buffer", None) is not None)
    else:
        grads = nbytes(t for group in zero.averaged_gradients.values() for t in group)
        buffers = nbytes(getattr(zero, "ipg_buffer", None) or [])
    engine.step()
    if stage == 3:
        persistent = nbytes(p.data for p in engine.module.parameters())  # empty unless kept whole
        params = nbytes(zero.fp16_partitioned_groups_flat) + persistent
        master = nbytes(zero.fp32_partitioned_groups_flat)
    else:
        params = nbytes(zero.bit16_groups_flat)
        master = nbytes(zero.single_partition_of_fp32_groups)
    out = {
        "psi": psi,
        "params": params,
        "grads": grads,
        "optimizer": master + adam_state_bytes(zero.optimizer),
        "buffers": buffers,
    }
    if stage == 3:
        out["persistent"] = persistent
    engine.destroy()
    return out


def worker(preset: str, out: Path, batch_size: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if dist.get_world_size() != WORLD:
        raise RuntimeError(f"run with {WORLD} processes, not {dist.get_world_size()}")
    cfg = config_mod.build(config_mod.load_yaml(preset) | {"data_dir": None, "batch_size": batch_size})
    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        if mode == "DDP":
            rec = measure_ddp(cfg, random_inputs(batch_size))
        else:  # DeepSpeed bf16 keeps the module in bf16: the embedding input must match (runtime.input_dtype)
            batch = random_inputs(batch_size)
            rec = measure_zero(cfg, int(mode[-1]), batch | {"src_emb": batch["src_emb"].bfloat16()})
        gc.collect()
        per_rank = [None] * WORLD
        dist.all_gather_object(per_rank, rec)
        results[mode] = per_rank
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"preset": preset, "world": WORLD, "modes": results}, indent=2))
    dist.destroy_process_group()


def report(data: dict) -> None:
    n = data["world"]
    psi = data["modes"]["DDP"][0]["psi"]
    print(
        f"model {data['preset']}: Ψ = {psi:,} parameters; {n} ranks; MiB per rank (rank 0; ratios use the larger rank)"
    )
    print(f"{'mode':<8}{'params':>17}{'grads':>17}{'optimizer':>19}{'total':>19}{'buckets':>9}   measured/formula")
    totals = {}
    for mode in MODES:
        ranks = data["modes"][mode]
        r0 = ranks[0]
        f = formula(mode, psi, n)
        parts = ("params", "grads", "optimizer")
        total = sum(r0[k] for k in parts)
        f_total = sum(f.values())
        totals[mode] = (max(sum(r[k] for k in parts) for r in ranks), f_total)
        cells = "".join(f"{r0[k] / MIB:>8.1f} /{f[k] / MIB:>7.1f}" for k in parts[:2])
        cells += f"{r0['optimizer'] / MIB:>10.1f} /{f['optimizer'] / MIB:>7.1f}"
        print(
            f"{mode:<8}{cells}{total / MIB:>10.1f} /{f_total / MIB:>7.1f}{r0['buffers'] / MIB:>9.1f}"
            f"   {total / f_total:.3f}"
        )
    print("(each cell: measured / formula; totals exclude buckets)")
    z3 = data["modes"]["ZeRO-3"][0]
    print(
        f"ZeRO-3 params: {(z3['params'] - z3['persistent']) / MIB:.1f} MiB partition + {z3['persistent'] / MIB:.1f} MiB "
        "of small parameters kept whole on every rank (stage3_param_persistence_threshold)"
    )
    base, f_base = totals["DDP"]
    print(
        "ratio vs DDP, per-rank total (max over ranks): "
        + ", ".join(f"{m} {t / base:.3f} (formula {ft / f_base:.3f})" for m, (t, ft) in totals.items() if m != "DDP")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="xl", help="preset whose model is measured (default xl)")
    p.add_argument(
        "--batch-size", type=int, default=4, help="micro batch of the one step (memory of states is independent of it)"
    )
    p.add_argument("--json", default=None, help="also write the per-rank figures here")
    p.add_argument("--tiny", action="store_true", help="the debug-cpu model")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # set by the torchrun launch below
    args = p.parse_args(argv)
    if args.tiny:
        args.config = "debug-cpu"
    if args.worker:
        worker(args.config, Path(args.worker), args.batch_size)
        return 0
    print(versions())
    print(f"load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench_zero_") as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
            __file__, "--config", args.config, "--batch-size", str(args.batch_size), "--worker", str(out),
        ]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            print(proc.stdout[-4000:] + proc.stderr[-8000:], file=sys.stderr)
            print(f"bench_zero_memory: the {WORLD}-process run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        data = json.loads(out.read_text())
    report(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
