"""Validation: the training-time callback and `dist-train eval`.

Every rank runs the same number of forward passes (ZeRO-3 gathers parameters
collectively), predictions of real rows are gathered to rank 0, rank 0
computes the metrics of `dist_train.metrics` and broadcasts them, so every
rank takes the same early-stopping decision.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from dist_train import cli
from dist_train.ceiling import data_ceiling
from dist_train.checkpoint import load_consolidated
from dist_train.data.blocks import PART_IDENTITY_STRIDE, readable_split
from dist_train.data.eval_reader import eval_batches
from dist_train.data.schema import target_of, train_fields
from dist_train.data.shards import ShardSet
from dist_train.data.stream import LoaderStats
from dist_train.metrics import VERIFY_FAR, quality, row_cos
from dist_train.model import model_inputs
from dist_train.paths import output_file
from dist_train.probe import read_cached
from dist_train.rundir import RunDir
from dist_train.schedule import every
from dist_train.weights import load_model


def eval_fields(shard_sets: ShardSet | list[ShardSet], target: str = "sample") -> tuple[str, ...]:
    """Training's fields plus the oracle, when every shard set has one, for the ceiling metrics."""
    sets = shard_sets if isinstance(shard_sets, list) else [shard_sets]
    return train_fields(target) + tuple(f for f in ("oracle_emb",) if all(s.has(f) for s in sets))


@torch.no_grad()
def predict_split(
    model,
    shard_set: ShardSet,
    split: str,
    *,
    batch_size: int,
    device,
    rank: int = 0,
    world_size: int = 1,
    loss_fn=None,
    target: str = "sample",
    max_samples: int | None = None,
    autocast=None,
    input_dtype: torch.dtype = torch.float32,
    stats: LoaderStats | None = None,
    fields: tuple[str, ...] | None = None,
) -> dict[str, np.ndarray]:
    """This rank's valid rows of the split with predictions (and per-row loss when ``loss_fn``).

    Rows of bad blocks and rows with a non-finite value are left out and counted in ``stats``.
    """
    was_training = model.training
    model.eval()
    cols: dict[str, list[np.ndarray]] = {}
    seen = 0
    # A cap stops after the same number of batches on every rank (ZeRO-3's forward is collective).
    room0 = None if max_samples is None else max_samples // max(world_size, 1)
    n_batches = None if room0 is None else -(-room0 // batch_size)
    batches = eval_batches(
        shard_set, split, batch_size, rank, world_size, fields=fields or eval_fields(shard_set, target), stats=stats
    )
    for batch, valid in itertools.islice(batches, n_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        ctx = autocast() if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            pred = model(*model_inputs(batch, input_dtype))
        pred = pred.float()
        keep = valid.cpu().numpy()
        if room0 is not None:
            keep &= np.cumsum(keep) <= max(0, room0 - seen)
        seen += int(keep.sum())
        if loss_fn is not None:
            # the batch loss over its real rows, repeated per row: gathering then averaging rows
            # gives the sample-weighted mean whatever the split across ranks
            k = torch.from_numpy(keep).to(pred.device)
            loss = (
                float(loss_fn(pred[k], target_of(batch, target).float()[k], batch["identity"][k])[0])
                if keep.any()
                else 0.0
            )
            cols.setdefault("loss", []).append(np.full(int(keep.sum()), loss))
        cols.setdefault("pred", []).append(pred.cpu().numpy()[keep])
        for k, v in batch.items():
            cols.setdefault(k, []).append(v.float().cpu().numpy()[keep] if k != "identity" else v.cpu().numpy()[keep])
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in cols.items()} if cols else {}


def predict_sets(model, shard_sets: list[ShardSet], split: str, **kw) -> dict[str, np.ndarray]:
    """`predict_split` over several shard sets read together: identities kept apart, a ``part`` column per row.

    Each set is capped at ``max_samples`` on its own; the sets' fields are those all of them have.
    """
    fields = eval_fields(shard_sets, kw.get("target", "sample"))
    parts = []
    for part, shard_set in enumerate(shard_sets):
        rows = predict_split(model, shard_set, split, fields=fields, **kw)
        if rows:
            rows["identity"] = rows["identity"] + part * PART_IDENTITY_STRIDE
            rows["part"] = np.full(len(rows["pred"]), part, np.int64)
            parts.append(rows)
    return {k: np.concatenate([r[k] for r in parts]) for k in parts[0]} if parts else {}


def metrics_of(rows: dict[str, np.ndarray], names: list[str] | None = None) -> dict:
    """`metrics.quality` on gathered rows, plus the mean validation loss when present.

    With ``names`` (several shard sets, a ``part`` column), also ``per_set``: each set's n, mean cos and baseline.
    """
    out = quality(
        rows["pred"], rows["tgt_emb"], rows["src_emb"], rows["src_pose"][:, 1], rows["identity"], rows.get("oracle_emb")
    )
    if "loss" in rows:
        out["loss"] = float(rows["loss"].mean()) if len(rows["loss"]) else float("nan")
    if names and len(names) > 1:
        out["per_set"] = {}
        for part, name in enumerate(names):
            mine = rows["part"] == part
            cos, base = (
                row_cos(rows["pred"][mine], rows["tgt_emb"][mine]),
                row_cos(rows["src_emb"][mine], rows["tgt_emb"][mine]),
            )
            out["per_set"][name] = {
                "n": int(mine.sum()),
                "mean_cos": float(cos.mean()) if mine.any() else float("nan"),
                "identity_baseline_cos": float(base.mean()) if mine.any() else float("nan"),
            }
    return out


class Evaluator:
    """Training-time validation callback; owns its schedule (`due`) and its metrics JSON files."""

    def __init__(
        self, cfg, runtime, shard_sets: list[ShardSet], split: str, batch_size: int, target: str, run_dir: Path
    ):
        self.cfg = cfg  # config.EvalConfig
        self.runtime = runtime
        self.shard_sets = shard_sets
        self.names = [str(s.root) for s in shard_sets]
        self.split = split
        self.batch_size = batch_size
        self.target = target
        self.dirs = RunDir(run_dir)

    def due(self, step: int, epoch_end: bool) -> bool:
        return epoch_end or every(step, self.cfg.eval_every_steps)

    def run(self, model, loss_fn, step: int, epoch: float, train_loss: float | None) -> dict:
        """Collective. Returns the same metrics dict on every rank."""
        acc = self.runtime.accelerator
        stats = LoaderStats()
        if self.runtime.deepspeed_stage is None:  # eager and without DDP: no second (eval) compile, no collective
            model = acc.unwrap_model(model, keep_torch_compile=False)
        rows = predict_sets(
            model,
            self.shard_sets,
            self.split,
            batch_size=self.batch_size,
            device=acc.device,
            rank=acc.process_index,
            world_size=acc.num_processes,
            loss_fn=loss_fn,
            target=self.target,
            max_samples=self.cfg.eval_max_samples,
            autocast=acc.autocast if self.runtime.precision != "fp32" else None,
            input_dtype=self.runtime.input_dtype,
            stats=stats,
        )
        nonfinite, unreadable = map(int, self.runtime.sum_over_ranks([stats.nonfinite_rows, stats.unreadable_rows]))
        gathered = self.runtime.gather_to_main(rows)
        m = None
        if acc.is_main_process:
            rows = {k: np.concatenate([g[k] for g in gathered if g]) for k in rows}
            m = metrics_of(rows, self.names)
            m.update(step=step, epoch=epoch, train_loss=train_loss)
            m["dropped_rows"] = {"nonfinite": nonfinite, "unreadable": unreadable}
            m["val_train_loss_ratio"] = (
                m["loss"] / train_loss if train_loss and train_loss > 0 and math.isfinite(train_loss) else None
            )
            self.dirs.metrics.mkdir(parents=True, exist_ok=True)
            self.dirs.eval_metrics(step).write_text(json.dumps(m, indent=2) + "\n")
        return self.runtime.broadcast(m)

    def test_best(self, split: str) -> dict | None:
        """Collective: rank 0 evaluates the best model's file on ``split`` (when the set has that split).

        Writes ``metrics/test.json`` and returns the metrics there; None on other ranks and without a split
        or a best model. One process is enough: a test split is read once, at the end.
        """
        acc = self.runtime.accelerator
        best = self.dirs.best_model
        result = None
        sets = [s for s in self.shard_sets if split and split in s.splits]
        if acc.is_main_process and sets and best.is_file():
            model, _ = load_model(best)
            stats = LoaderStats()
            rows = predict_sets(
                model.to(acc.device), sets, split, batch_size=self.batch_size, device=acc.device, stats=stats
            )
            result = metrics_of(rows, [str(s.root) for s in sets])
            result.update(split=split, step=load_consolidated(best)[2].get("step"), model=str(best))
            result["dropped_rows"] = {"nonfinite": stats.nonfinite_rows, "unreadable": stats.unreadable_rows}
            self.dirs.metrics.mkdir(parents=True, exist_ok=True)
            self.dirs.test_metrics.write_text(json.dumps(result, indent=2) + "\n")
        acc.wait_for_everyone()
        return result


def data_limits(shard_set: ShardSet, split: str) -> dict:
    """A set's data ceiling and, when cached, its linear probe: the figures val cos is read against."""
    out = {"data_ceiling": data_ceiling(shard_set, split)}
    probe = read_cached(shard_set.root, split=split)
    if probe is not None:
        out["linear_probe"] = {"cache": probe["cache"]} | {
            k: probe["val"][k] for k in ("mean_cos", "per_yaw", "impostor_cos", "tar_at_far")
        }
    return out


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_device(device: str | None, precision: str = "fp32"):
    """(torch device, autocast factory or None) for inference: CUDA when available unless told otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this torch build sees no CUDA device; use --device cpu")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (CPU kernels do not run fp16); use bf16 or fp32")
    dtype = AUTOCAST[precision]
    return device, (None if dtype is None else (lambda: torch.autocast(device.type, dtype=dtype)))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dist-train eval", description="Validation metrics of a checkpoint on a split.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (any ZeRO stage / DDP) or consolidated file")
    p.add_argument(
        "--shards", required=True, nargs="+", help="shard set directory, or several (pooled metrics and per set)"
    )
    p.add_argument("--split", default="val")
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--precision", choices=tuple(AUTOCAST), default="fp32", help="autocast dtype of the forward (fp16: CUDA only)"
    )
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument(
        "--predictions", default=None, help="also write predictions (.npy, the valid rows in the split's order)"
    )
    args = cli.parse_args(p, argv)
    try:
        shard_sets = [ShardSet.open(path) for path in args.shards]
        for shard_set in shard_sets:
            readable_split(shard_set, args.split)  # no such split, empty, unreadable, or a lying index
        model, cfg = load_model(args.checkpoint)
        device, autocast = inference_device(args.device, args.precision)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dist-train eval: error: {e}", file=sys.stderr)
        return 2
    stats = LoaderStats()
    rows = predict_sets(
        model.to(device),
        shard_sets,
        args.split,
        batch_size=args.batch_size,
        device=device,
        stats=stats,
        autocast=autocast,
    )
    m = metrics_of(rows, args.shards)
    m["dropped_rows"] = {"nonfinite": stats.nonfinite_rows, "unreadable": stats.unreadable_rows}
    # beside val cos: each set's data ceiling (how well frontal references agree with their identity) and
    # linear probe (closed-form ridge, when `dist-train probe` has cached it beside the set)
    beside = {path: data_limits(shard_set, args.split) for path, shard_set in zip(args.shards, shard_sets)}
    frr = {
        "model": 1.0 - m["tar_at_far"][VERIFY_FAR]["pred"],
        "baseline": 1.0 - m["tar_at_far"][VERIFY_FAR]["baseline"],
    }
    if len(args.shards) == 1:
        m |= beside[args.shards[0]]
        if "linear_probe" in m:
            frr["probe"] = 1.0 - m["linear_probe"]["tar_at_far"][VERIFY_FAR]["pred"]
    else:
        for path, limits in beside.items():
            m["per_set"][path] |= limits
    m["frr_at_far_" + VERIFY_FAR] = frr
    summary = {k: m[k] for k in ("n", "mean_cos") if k in m}
    for path, limits in beside.items():
        c = limits["data_ceiling"]
        where = "" if len(args.shards) == 1 else f" of {path}"
        summary["data_ceiling" + where] = (
            {"cos": c["cos"], "ci95": c["ci95"], "n_identities": c["n_identities"]} if c["estimable"] else c["reason"]
        )
        summary["linear_probe_cos" + where] = (
            limits["linear_probe"]["mean_cos"]
            if "linear_probe" in limits
            else f"not cached: run `dist-train probe {path}`"
        )
    for k in ("identity_baseline_cos", "gain", "oracle_cos", "fraction_of_oracle_gap", "impostor_cos", "per_set"):
        if k in m:
            summary[k] = m[k]
    summary["frr_at_far_" + VERIFY_FAR] = frr
    summary["dropped_rows"] = m["dropped_rows"]
    print(json.dumps(summary, indent=2))
    if args.json:
        output_file(args.json).write_text(json.dumps(m, indent=2) + "\n")
    if args.predictions:
        np.save(output_file(args.predictions), rows["pred"].astype(np.float32))
    return 0
