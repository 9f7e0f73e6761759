"""GPU benchmark: dist-train against a bare PyTorch loop on one GPU, one table from one run.

    python bench/bench_gpu.py                       # xl, batch 128/1024/8192, every row that fits --budget-s 330
    python bench/bench_gpu.py --tiny                # seconds-long CPU version (tiny model; the suite runs it)
    python bench/bench_gpu.py --batches 128 --modes bare,one --compile off

Rows, each at every batch of ``--batches`` (default 128, 1024, 8192), each with and without ``--compile``:

- **bare** (in this process): `dist_train.model.build_model`, `dist_train.optim.build_optimizer(fused=True)`,
  `FrontalLoss`, clipping, autocast in the row's precision (fp16 with a GradScaler), the step that dist-train
  takes (a non-finite gradient norm skips it on the device); batches sliced from the train split held on the
  device, reshuffled each pass. ``compile``: ``torch.compile(model)`` (inductor, default mode).
- **one**: dist-train in one process, no DeepSpeed, ``--precision bf16`` (what ``python -m dist_train train``
  runs);
- **zero2**, **zero3**: ``accelerate launch --use_deepspeed --deepspeed_config_file
  configs/deepspeed/zero{2,3}-{fp16,bf16}.json --num_processes 1`` running dist-train (ZeRO-2 fp16 and bf16,
  ZeRO-3 bf16).

The dist-train rows are subprocesses that run the real CLI, `dist_train.cli.main(["train", ...])`, the entry
point of ``-m dist_train``, through this file's ``--as-trainer`` shim (``python bench/bench_gpu.py
--as-trainer train ...``, or that after ``accelerate launch ...``). The shim adds one thing after the run:
``torch.cuda.max_memory_allocated()`` of the trainer process, written to a JSON file, since dist-train does
not report it. Their flags: the preset, ``--batch_size``, ``--precision``, ``--max_steps``,
``--log_every_steps 10``, ``--num_workers`` (``--num-workers``, default 4 on a GPU), ``--compile``,
``--samples_per_epoch`` so that one epoch outlasts the run (no epoch-end evaluation inside the timed steps)
and ``--eval_max_samples 1024`` for the final evaluation. The checkpoint policy is the default (every 30
minutes, and at the end of the run, after the timed steps).

Measured per row:

- samples/s: steady state, after warm-up (the first two log intervals: start-up, ``torch.compile`` and its
  first recompiles, the first batches, fp16's first loss-scale overflows). dist-train: from the wall times of
  its TensorBoard ``train/samples_per_s`` points; bare: timed between two device synchronisations.
- x bare: the ratio to the bare loop of the same batch, precision and compile setting (``vs eager`` in the
  note when the compiled bare row did not run).
- MFU: samples/s x training FLOP per sample (torch's FlopCounterMode, forward + backward, as bench_trainer)
  / the GPU's dense fp16/bf16 peak, looked up from its name (``--peak-tflops`` overrides; n/a otherwise, and
  always for fp32).
- peak memory: ``torch.cuda.max_memory_allocated()`` of the training process (bare: less the device-resident
  data pool, which dist-train does not have); n/a on CPU.
- skipped steps: dist-train's ``train/skipped_steps`` + ``train/nonfinite_steps``; bare: non-finite gradient
  norms (fp16: the GradScaler's inf checks), over the whole row.

Rows run in priority order (``priority``): first the fewest rows that decide each goal (eager bf16 bare, one
process and ZeRO-2 at batch <= 1024; one process --compile at the smallest and the largest batch), then the
rest of the matrix (``--plan`` prints the order and runs nothing). ``--budget-s`` (default 330) stops adding
rows when the next one would not fit (per-kind estimates, then the longest such row so far) and bounds each
subprocess by the time left; what was skipped is printed. The table, a machine line and the goal verdicts are
printed at the end; ``--json`` writes the rows (rewritten after every row, so an interrupted run leaves what
it measured), and ``--resume`` that JSON in a later call measures only the rows it lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent

# Dense fp16/bf16 tensor-core peak, TFLOP/s (vendor data sheets; SXM parts unless named). The longest name
# contained in torch.cuda.get_device_name() wins ("A100" before "A10", "H100 PCIe" before "H100").
PEAK_TFLOPS = {
    "B200": 2250, "H200": 989, "GH200": 989, "H100": 989, "H100 PCIe": 756, "H100 NVL": 835, "H800": 989,
    "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "L4": 121, "A10": 125, "A30": 165, "V100": 125, "T4": 65,
    "RTX 4090": 165, "RTX 3090": 71, "RTX A6000": 155,
}  # fmt: skip
MODES = ("bare", "one", "zero2", "zero3")  # table order
MODE_LABEL = {
    "bare": "bare loop",
    "one": "dist-train, 1 process",
    "zero2": "dist-train ZeRO-2",
    "zero3": "dist-train ZeRO-3",
}
DIST_PRECISIONS = {"one": ("bf16",), "zero2": ("fp16", "bf16"), "zero3": ("bf16",)}
BATCHES = (128, 1024, 8192)
LOG_EVERY = 10  # dist-train's default log interval (LogConfig.log_every_steps)
WARM_INTERVALS = 2  # log intervals not timed: start-up, compile, first batches
TIMED_STEPS = ((256, 150), (2048, 100), (None, 40))  # (batch up to, timed steps)
TINY_MODEL = {"d_model": 64, "nhead": 4, "num_layers": 2, "dim_feedforward": 128}
GOAL_RATIO, GOAL_COMPILED_128, GOAL_MFU_8192 = 0.90, 15_000, 0.35
# seconds a row is expected to take before one of its kind has run: (GPU, CPU --tiny)
ESTIMATE_S = {("bare", False): (10, 4), ("bare", True): (60, 150), ("dist", False): (35, 30), ("dist", True): (90, 180)}
STATS_ENV = "BENCH_GPU_STATS"  # where the --as-trainer shim writes the trainer's peak memory


@dataclass(frozen=True)
class Row:
    mode: str  # bare | one | zero2 | zero3
    precision: str  # bf16 | fp16 | fp32
    batch: int
    compile: bool

    @property
    def dist(self) -> bool:
        return self.mode != "bare"

    @property
    def kind(self) -> tuple[str, bool]:
        return ("dist" if self.dist else "bare", self.compile)

    @property
    def label(self) -> str:
        return MODE_LABEL[self.mode] + (" --compile" if self.compile and self.dist else "")

    @property
    def name(self) -> str:  # a file-name-safe id
        return f"{self.mode}-{self.precision}-b{self.batch}{'-compile' if self.compile else ''}"

    def sort_key(self) -> tuple:
        return (self.batch, MODES.index(self.mode), self.precision, self.compile)


@dataclass
class Result:
    row: Row
    status: str = "skipped"  # ok | failed | skipped
    note: str = ""
    samples_per_s: float | None = None
    timed_steps: int = 0
    ratio: float | None = None
    ratio_vs: str | None = None  # "compiled" or "eager": the bare row the ratio is taken to
    mfu: float | None = None
    peak_mem_gib: float | None = None
    skipped_steps: int | None = None
    total_steps: int | None = None
    row_s: float | None = None

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("row"), label=self.row.label, name=self.row.name)
        return d


# ---- the matrix and its order -----------------------------------------------------------------------


def matrix(batches, modes) -> list[Row]:
    """Every row of the table (with and without compile; ``--compile`` decides which run), in table order."""
    rows = []
    for b in batches:
        for mode in modes:
            for p in ("bf16", "fp16") if mode == "bare" else DIST_PRECISIONS[mode]:
                rows += [Row(mode, p, b, c) for c in (False, True)]
    return sorted(rows, key=Row.sort_key)


def not_run(row: Row, args, cuda: bool) -> str | None:
    """Why a row of the table is not run at all (before any budget question), or None."""
    if row.precision == "fp16" and not cuda:
        return "fp16 needs a GPU"
    if args.compile == "off" and row.compile:
        if args.tiny:
            return "--tiny: no compile rows (inductor's first compile takes ~2 min on 2 CPU cores; --compile both)"
        return "--compile off"
    if args.compile == "on" and not row.compile:
        return "--compile on"
    return None


def priority(row: Row, batches) -> int:
    """Which rows a short budget keeps: the fewest rows that decide each goal first, the rest of the matrix last.

    0: goal 1, eager bf16 at batch <= 1024: bare, one process, ZeRO-2;
    1: goals 2 and 3, one process --compile bf16 at the smallest and the largest batch;
    2: ZeRO-2 --compile bf16 there, the compiled bare loop there, fp16 eager at batch <= 1024 (bare, ZeRO-2);
    3: eager bf16 at the largest batch (bare, one process, ZeRO-2);
    4: the rest (ZeRO-3, fp16 compiled, other compiled rows ...).
    """
    ends = row.batch in (min(batches), max(batches))
    if row.mode == "zero3":
        return 4
    if not row.compile and row.batch <= 1024:
        return 0 if row.precision == "bf16" else 2
    if row.compile and ends and row.precision == "bf16":
        return 1 if row.mode == "one" else 2
    if not row.compile and row.batch == max(batches) and row.precision == "bf16":
        return 3
    return 4


def run_order(rows: list[Row], batches) -> list[Row]:
    """Priority order; within a priority, bare rows before the dist-train rows they are compared with."""
    return sorted(rows, key=lambda r: (priority(r, batches), r.batch, MODES.index(r.mode), r.precision, r.compile))


def timed_steps(batch: int) -> int:
    return next(n for limit, n in TIMED_STEPS if limit is None or batch <= limit)


# ---- data, FLOPs, peaks -----------------------------------------------------------------------------


def make_shards(out: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """A shard set of random unit embeddings, landmarks in pixels and poses in degrees (no insightface needed)."""
    import numpy as np

    from dist_train.data.schema import EMB_DIM, N_LANDMARKS
    from dist_train.data.shards import write_shard_set

    rng = np.random.default_rng(seed)

    def arrays(n: int, first_identity: int) -> dict:
        def unit():
            x = rng.standard_normal((n, EMB_DIM), dtype=np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        return {
            "src_emb": unit(),
            "src_kps": rng.uniform(150, 450, (n, N_LANDMARKS, 3)).astype(np.float32),
            "src_pose": rng.uniform(-90, 90, (n, 3)).astype(np.float32),
            "tgt_emb": unit(),
            "identity": first_identity + np.arange(n) // 16,
        }

    splits = {"train": arrays(n_train, 0), "val": arrays(n_val, n_train)}
    write_shard_set(out, splits, provenance={"bench": "bench_gpu", "seed": seed})
    return out


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    """Dense fp16/bf16 peak FLOP/s of the GPU, or None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    hits = [k for k in PEAK_TFLOPS if k in device_name]
    return PEAK_TFLOPS[max(hits, key=len)] * 1e12 if hits else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the bare loop (in this process) ----------------------------------------------------------------


class DevicePool:
    """The train split on the device; batches are slices of a copy reshuffled at every pass."""

    def __init__(self, arrays: dict, device):
        import torch

        keys = ("src_emb", "src_kps", "src_pose", "tgt_emb", "identity")
        self.tensors = {k: torch.from_numpy(arrays[k]).to(device) for k in keys}
        self.n = len(self.tensors["identity"])
        self.generator = torch.Generator(device=device).manual_seed(0)

    def batches(self, batch: int):
        import torch

        if self.n < batch:
            raise ValueError(f"the bench's train split ({self.n} rows) is smaller than batch {batch}")
        device = self.tensors["identity"].device
        while True:
            perm = torch.randperm(self.n, device=device, generator=self.generator)
            shuffled = {k: t.index_select(0, perm) for k, t in self.tensors.items()}
            for j in range(self.n // batch):
                yield {k: t[j * batch : (j + 1) * batch] for k, t in shuffled.items()}


def run_bare(row: Row, cfg, pool: DevicePool, warm: int, steps: int) -> dict:
    """The bare loop for ``warm`` + ``steps`` steps; returns samples/s of the last ``steps``, peak memory, skips."""
    import torch

    from dist_train.losses import FrontalLoss
    from dist_train.model import build_model, model_inputs
    from dist_train.optim import build_optimizer

    device = pool.tensors["identity"].device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device).train()
    optimizer = build_optimizer(model, cfg, fused=True)  # the fused AdamW dist-train steps with
    lr = torch.tensor(cfg.optim.lr, device=device)  # on the device, one tensor for every group (as the Stepper)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_fn = FrontalLoss(cfg.loss)
    forward = torch.compile(model) if row.compile else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(row.precision)
    scaler = torch.amp.GradScaler(device.type) if row.precision == "fp16" else None
    params = [p for p in model.parameters() if p.requires_grad]
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    clip = cfg.optim.grad_clip

    def step(batch) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = forward(*model_inputs(batch))
        loss, _ = loss_fn(pred.float(), batch["tgt_emb"], batch["identity"])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        norm = (
            torch.nn.utils.clip_grad_norm_(params, clip)
            if clip > 0
            else torch.nn.utils.get_total_norm([p.grad for p in params])
        )
        bad = ~torch.isfinite(norm)
        if scaler is None:
            optimizer.found_inf = bad.float()  # the fused kernel leaves weights and moments alone on 1
            optimizer.step()
        else:
            scaler.step(optimizer)  # skips on the inf it found while unscaling
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        skipped.add_(bad.long())

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    batches = pool.batches(row.batch)
    for _ in range(warm):
        step(next(batches))
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    sync()
    seconds = time.perf_counter() - t0
    out = {
        "samples_per_s": steps * row.batch / seconds,
        "timed_steps": steps,
        "skipped_steps": int(skipped),
        "total_steps": warm + steps,
        "peak_mem_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None,
    }
    if row.compile:
        torch._dynamo.reset()
    return out


# ---- dist-train rows (subprocesses) -----------------------------------------------------------------


def dist_command(row: Row, args, shards: Path, run_dir: Path, warm: int, steps: int) -> list[str]:
    total = warm + steps
    flags = [
        "train", "--config", args.config, "--data_dir", str(shards), "--output_dir", str(run_dir),
        "--batch_size", str(row.batch), "--precision", row.precision, "--max_steps", str(total),
        "--log_every_steps", str(args.log_every), "--samples_per_epoch", str(2 * total * row.batch),
        "--eval_max_samples", str(args.eval_max_samples), "--early_stopping_patience", "0",
        "--num_workers", str(args.num_workers), "--compile", "true" if row.compile else "false",
    ]  # fmt: skip
    for k, v in args.model_overrides.items():
        flags += [f"--{k}", str(v)]
    shim = [str(Path(__file__).resolve()), "--as-trainer"]
    if row.mode == "one":
        return [sys.executable, *shim, *flags]
    stage = {"zero2": 2, "zero3": 3}[row.mode]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
        str(REPO / "configs" / "deepspeed" / f"zero{stage}-{row.precision}.json"), "--num_processes", "1",
        "--num_machines", "1", "--main_process_port", str(free_port()),
    ]  # fmt: skip
    return [*launch, *shim, *flags]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in a session of its own, so no process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def tb_rate(run_dir: Path, batch: int, warm_steps: int) -> tuple[float, int, int, int]:
    """(samples/s, timed steps, skipped + non-finite steps, last step) from the run's TensorBoard log.

    Timed from the first logged point at or after ``warm_steps`` to the last one.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_train.metrics import TRAIN_TAGS

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    points = ea.Scalars(TRAIN_TAGS["samples_per_s"])
    timed = [p for p in points if p.step >= warm_steps]
    if len(timed) < 2:
        raise ValueError(f"{len(points)} logged points, {len(timed)} after warm-up: too few to time")
    first, last = timed[0], timed[-1]
    skipped = sum(int(ea.Scalars(TRAIN_TAGS[k])[-1].value) for k in ("skipped_steps", "nonfinite_steps"))
    return (
        (last.step - first.step) * batch / (last.wall_time - first.wall_time),
        last.step - first.step,
        skipped,
        last.step,
    )


def run_dist(row: Row, args, shards: Path, work: Path, warm: int, steps: int, timeout_s: float) -> dict:
    run_dir = work / row.name
    stats_path = work / f"{row.name}.stats.json"
    log_path = work / f"{row.name}.log"
    cmd = dist_command(row, args, shards, run_dir, warm, steps)
    env = os.environ | {
        STATS_ENV: str(stats_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            rc = None
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, args.logs / log_path.name)
    if rc is None:
        raise RuntimeError(f"timed out after {timeout_s:.0f} s (log {log_path.name})")
    if rc != 0:
        lines = log_path.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if "error" in ln.lower()][:3]
        print(f"  {row.name}: exit {rc}; {log_path}:\n    " + "\n    ".join(errors + lines[-8:]), file=sys.stderr)
        raise RuntimeError(f"exit {rc}: {(errors or lines[-1:] or ['no output'])[0][:160]}")
    rate, timed, skipped, last = tb_rate(run_dir, row.batch, warm)
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    peak = stats.get("max_memory_allocated")
    if not args.keep:  # checkpoints and the best model of every row would add up to GBs (in /dev/shm)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "samples_per_s": rate,
        "timed_steps": timed,
        "skipped_steps": skipped,
        "total_steps": last,
        "peak_mem_gib": peak / 2**30 if peak is not None else None,
    }


def as_trainer(argv: list[str]) -> int:
    """The trainer process of a dist-train row: `dist-train ARGV`, then its peak device memory to $BENCH_GPU_STATS."""
    from dist_train.cli import main

    code = 1
    try:
        code = main(argv)
    finally:
        path = os.environ.get(STATS_ENV)
        if path and os.environ.get("RANK", "0") == "0":
            import torch

            stats = {"exit": code, "max_memory_allocated": None, "max_memory_reserved": None}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                stats.update(
                    max_memory_allocated=torch.cuda.max_memory_allocated(),
                    max_memory_reserved=torch.cuda.max_memory_reserved(),
                )
            Path(path).write_text(json.dumps(stats))
    return code


# ---- report -----------------------------------------------------------------------------------------


def load_results(path: Path, rows: list[Row]) -> dict[Row, Result]:
    """The measured rows of an earlier --json, for the rows of this matrix."""
    known = {r.name: r for r in rows}
    names = {f.name for f in dataclasses.fields(Result)} - {"row"}
    out = {}
    for d in json.loads(Path(path).read_text())["rows"]:
        row = known.get(d.get("name"))
        if row is not None and d.get("status") == "ok":
            res = Result(row, **{k: d[k] for k in names if k in d})
            res.note = "; ".join(filter(None, [res.note, f"from {Path(path).name}"]))
            out[row] = res
    return out


def fill_ratios(results: list[Result]) -> None:
    bare = {(r.row.batch, r.row.precision, r.row.compile): r for r in results if not r.row.dist and r.status == "ok"}
    for r in results:
        if not r.row.dist or r.status != "ok":
            continue
        ref = bare.get((r.row.batch, r.row.precision, r.row.compile))
        if ref is None and r.row.compile:  # no compiled bare row: the eager one, said in the note
            ref = bare.get((r.row.batch, r.row.precision, False))
        r.ratio = r.samples_per_s / ref.samples_per_s if ref is not None else None
        r.ratio_vs = None if ref is None else "compiled" if ref.row.compile else "eager"


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


COLUMNS = ("loop", "batch", "precision", "compile", "samples/s", "x bare", "MFU", "peak GiB", "skipped steps",
           "row s", "note")  # fmt: skip


def table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        ok = r.status == "ok"
        cells = [
            r.row.label,
            str(r.row.batch),
            r.row.precision,
            "yes" if r.row.compile else "no",
            f"{r.samples_per_s:,.0f}" if ok else r.status,
            ("ref" if not r.row.dist else _fmt(r.ratio, ".2f", "—")) if ok else "—",
            _fmt(r.mfu, ".1%") if ok else "—",
            _fmt(r.peak_mem_gib, ".2f") if ok else "—",
            f"{r.skipped_steps}/{r.total_steps}" if ok else "—",
            _fmt(r.row_s, ".0f", "—"),
            "; ".join(
                filter(None, [r.note, "x bare: vs eager bare" if r.row.compile and r.ratio_vs == "eager" else ""])
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: list[Result], assessed: bool) -> list[str]:
    """One line per goal of the GPU issue: each row that bears on it (by name), its figure and a verdict."""
    if not assessed:
        return ["goals: not assessed (they are for the xl preset on a GPU; this run is not)"]
    ok = [r for r in results if r.status == "ok"]
    dist = [r for r in ok if r.row.dist]

    def verdict(flag: bool) -> str:
        return "met" if flag else "NOT met"

    def line(goal: str, parts: list[str]) -> str:
        return f"{goal}: " + ("; ".join(parts) if parts else "no row ran")

    # goal 1: against the bare loop of the same compile setting only (a compiled row over eager bare says nothing)
    g1 = [r for r in dist if r.row.mode in ("one", "zero2") and r.row.batch in (128, 1024) and r.ratio is not None
          and (r.ratio_vs == "compiled") == r.row.compile]  # fmt: skip
    lines = [line(f"goal 1, dist-train >= {GOAL_RATIO:.2f}x the bare loop at batch 128 and 1024 (one process, ZeRO-2)",
                  [f"{r.row.name} {r.ratio:.2f} {verdict(r.ratio >= GOAL_RATIO)}" for r in g1])]  # fmt: skip
    g2 = [r for r in dist if r.row.compile and r.row.batch == 128 and r.row.mode in ("one", "zero2")]
    lines.append(line(f"goal 2, --compile at batch 128 >= {GOAL_COMPILED_128:,} samples/s",
                      [f"{r.row.name} {r.samples_per_s:,.0f} {verdict(r.samples_per_s >= GOAL_COMPILED_128)}"
                       for r in g2]))  # fmt: skip
    g3 = [r for r in dist if r.row.batch == 8192 and r.mfu is not None]
    bare = [f"{r.row.name} {r.mfu:.1%}" for r in ok if not r.row.dist and r.row.batch == 8192 and r.mfu is not None]
    lines.append(line(f"goal 3, dist-train at batch 8192 >= {GOAL_MFU_8192:.0%} MFU",
                      [f"{r.row.name} {r.mfu:.1%} {verdict(r.mfu >= GOAL_MFU_8192)}" for r in g3])
                 + (f" (bare loop: {', '.join(bare)})" if bare else ""))  # fmt: skip
    return lines


# ---- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="xl", help="preset of every row (default xl)")
    p.add_argument("--batches", default=None, help="comma-separated micro batches (default 128,1024,8192)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--compile", choices=("both", "off", "on"), default=None,
                   help="rows without and/or with --compile (default both; --tiny: off)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=None, help="stop adding rows after this (default 330; --tiny 600)")
    p.add_argument("--row-timeout-s", type=float, default=240, help="limit of one dist-train row (default 240)")
    p.add_argument(
        "--num-workers", type=int, default=None, help="dist-train loader workers (default 4 on GPU, 0 on CPU)"
    )
    p.add_argument("--log-every", type=int, default=None, help=f"dist-train log interval (default {LOG_EVERY})")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default by batch: 150/100/40)")
    p.add_argument("--n-train", type=int, default=None, help="rows of the synthetic train split (default 65536)")
    p.add_argument("--eval-max-samples", type=int, default=1024)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense fp16/bf16 peak (default: from the GPU name)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here (rewritten after every row)")
    p.add_argument("--work", type=Path, default=None, help="shards and run directories (default: a temporary one)")
    p.add_argument("--logs", type=Path, default=None, help="copy each dist-train row's log into this directory")
    p.add_argument("--keep", action="store_true", help="keep the runs' checkpoints and the work directory")
    p.add_argument("--resume", type=Path, default=None,
                   help="a --json of an earlier run on this machine: its measured rows are kept (noted), not rerun")  # fmt: skip
    p.add_argument("--plan", action="store_true", help="print the rows in the order they would run, run nothing")
    p.add_argument("--tiny", action="store_true", help="a seconds-long CPU version: tiny model, one batch, few steps")
    args = p.parse_args(argv)
    if args.tiny:
        args.batches = args.batches or "32"
        args.compile = args.compile or "off"
        args.budget_s = args.budget_s or 600
        args.log_every = args.log_every or 2
        args.steps = args.steps or 8
        args.n_train = args.n_train or 4096
        args.eval_max_samples = min(args.eval_max_samples, 256)
        args.model_overrides = dict(TINY_MODEL)
    else:
        args.model_overrides = {}
    args.batches = tuple(int(b) for b in (args.batches or ",".join(map(str, BATCHES))).split(","))
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if set(args.modes) - set(MODES):
        p.error(f"--modes: unknown {sorted(set(args.modes) - set(MODES))}; choose from {list(MODES)}")
    args.compile = args.compile or "both"
    args.budget_s = args.budget_s or 330
    args.log_every = args.log_every or LOG_EVERY
    args.n_train = args.n_train or 65536
    if max(args.batches) > args.n_train:
        p.error(f"--n-train ({args.n_train}) must hold the largest batch ({max(args.batches)})")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--as-trainer"]:
        return as_trainer(argv[1:])
    started = time.monotonic()
    args = parse_args(argv)
    import torch

    sys.path.insert(0, str(BENCH))
    from bench_trainer import train_flops_per_sample, versions

    from dist_train import config as config_mod
    from dist_train.data.blocks import read_split
    from dist_train.data.shards import ShardSet

    cuda = torch.cuda.is_available()
    if cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.num_workers is None:
        args.num_workers = 4 if cuda else 0
    device = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name(0) if cuda else None
    peak = peak_flops(gpu, args.peak_tflops) if cuda else None
    cfg = config_mod.Config.from_preset(args.config, **args.model_overrides)
    flops = train_flops_per_sample(cfg.model)
    rows = matrix(args.batches, args.modes)
    if args.plan:
        total = 0
        for i, r in enumerate(run_order(rows, args.batches), 1):
            why, estimate = not_run(r, args, cuda), ESTIMATE_S[r.kind][0 if cuda else 1]
            total += 0 if why else estimate
            print(f"{i:>2}. {r.name} (priority {priority(r, args.batches)}): " + (f"not run: {why}" if why else
                  f"~{estimate} s before any row ran, {total} s so far, budget {args.budget_s:.0f} s"))  # fmt: skip
        return 0
    results = {r: Result(r) for r in rows}
    if args.resume is not None:
        earlier = load_results(args.resume, rows)
        results.update(earlier)
        print(f"resume: {len(earlier)} measured rows kept from {args.resume}")
    machine = versions()
    print(machine)
    print(
        f"device: {gpu or 'CPU (no CUDA device)'}; torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if cuda else "")
        + f"; peak {'n/a' if peak is None else f'{peak / 1e12:g} TFLOP/s dense fp16/bf16'}"
    )
    model_desc = ", ".join(
        f"{k} {getattr(cfg.model, k)}" for k in ("d_model", "num_layers", "nhead", "dim_feedforward")
    )
    print(
        f"config {args.config} ({model_desc}{'; --tiny' if args.tiny else ''}): {flops / 1e9:.3f} GFLOP per training "
        f"sample (FlopCounterMode); log every {args.log_every} steps, first {WARM_INTERVALS} intervals not timed; "
        f"dist-train loader workers {args.num_workers}; budget {args.budget_s:.0f} s",
        flush=True,
    )
    work_root = args.work
    tmp = None
    if work_root is None:
        shm = Path("/dev/shm")  # checkpoints written at each row's end cost less in memory than on a slow disk
        base = str(shm) if cuda and shm.is_dir() and shutil.disk_usage(shm).free > 16 * 2**30 else None
        tmp = tempfile.TemporaryDirectory(prefix="bench_gpu_", dir=base)
        work_root = Path(tmp.name)
    work_root.mkdir(parents=True, exist_ok=True)

    def save_json() -> None:
        if args.json is None:
            return
        fill_ratios(list(results.values()))
        doc = {
            "machine": machine,
            "device": gpu or "cpu",
            "torch": torch.__version__,
            "config": args.config,
            "model": dataclasses.asdict(cfg.model),
            "tiny": args.tiny,
            "flops_per_sample": flops,
            "peak_flops": peak,
            "warm_steps": WARM_INTERVALS * args.log_every,
            "num_workers": args.num_workers,
            "budget_s": args.budget_s,
            "elapsed_s": time.monotonic() - started,
            "rows": [r.as_dict() for r in results.values()],
            "goals": goals(list(results.values()), cuda and not args.tiny and args.config == "xl"),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))

    try:
        shards = make_shards(work_root / "shards", args.n_train, max(args.n_train // 16, 512))
        pool = DevicePool(read_split(ShardSet.open(shards), "train"), device) if "bare" in args.modes else None
        print(f"data: {args.n_train} train rows written in {time.monotonic() - started:.0f} s since start", flush=True)
        warm = WARM_INTERVALS * args.log_every
        seen: dict[tuple[str, bool], float] = {}
        order = run_order(rows, args.batches)
        for i, row in enumerate(order, 1):
            res = results[row]
            if res.status == "ok":  # measured by the run given to --resume
                continue
            why = not_run(row, args, cuda)
            if why:
                res.note = why
                continue
            elapsed = time.monotonic() - started
            estimate = seen.get(row.kind, ESTIMATE_S[row.kind][0 if cuda else 1])
            left = args.budget_s - elapsed
            if estimate > left:
                res.note = f"budget: ~{estimate:.0f} s needed, {max(left, 0):.0f} s left"
                continue
            steps = args.steps or timed_steps(row.batch)
            t0 = time.monotonic()
            try:
                if row.dist:
                    out = run_dist(row, args, shards, work_root, warm, steps, min(args.row_timeout_s, left))
                else:
                    out = run_bare(row, cfg, pool, warm, steps)
            except Exception as e:  # one row failing does not stop the table
                res.status, res.note = "failed", str(e)[:200]
            else:
                res.status = "ok"
                for k, v in out.items():
                    setattr(res, k, v)
                res.mfu = res.samples_per_s * flops / peak if peak and row.precision != "fp32" else None
            res.row_s = time.monotonic() - t0
            if cuda:  # what a bare row cached is not held while the next row runs
                torch.cuda.empty_cache()
            if res.status == "ok":  # the next estimate for this kind of row: the longest so far
                seen[row.kind] = max(seen.get(row.kind, 0.0), res.row_s)
            figure = f"{res.samples_per_s:,.0f} samples/s" if res.status == "ok" else f"{res.status}: {res.note}"
            compiled = ", compiled" if row.compile and not row.dist else ""
            print(f"[{i}/{len(order)}] {row.label}{compiled}, {row.precision}, batch {row.batch}: {figure} "
                  f"({res.row_s:.0f} s)", flush=True)  # fmt: skip
            save_json()
    finally:
        if tmp is not None and not args.keep:
            tmp.cleanup()

    final = list(results.values())
    fill_ratios(final)
    print()
    print(
        f"bench_gpu: {args.config} on {gpu or 'CPU'}, torch {torch.__version__}; samples/s after "
        f"{WARM_INTERVALS * args.log_every} warm-up steps (start-up and compile excluded); x bare: same batch, "
        "precision and compile setting; peak GiB: torch.cuda.max_memory_allocated of the training process"
    )
    print(table(final))
    skipped = [r for r in final if r.status == "skipped"]
    if skipped:
        reasons: dict[str, list[str]] = {}
        for r in skipped:
            reasons.setdefault(r.note.split(":")[0], []).append(r.row.name)
        print(
            f"skipped {len(skipped)} of {len(final)} rows: "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in reasons.items())
        )
    for line in goals(final, cuda and not args.tiny and args.config == "xl"):
        print(line)
    save_json()
    print(f"bench_gpu: {time.monotonic() - started:.0f} s in all" + (f"; rows in {args.json}" if args.json else ""))
    return 1 if any(r.status == "failed" for r in final) else 0


if __name__ == "__main__":
    sys.exit(main())
