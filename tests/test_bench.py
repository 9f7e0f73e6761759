"""The benchmarks run on a tiny size and print their figures and ratio lines; gpu_check.sh refuses without a GPU.

bench_gpu.py --tiny (the GPU benchmark's table, on CPU) and gpu_check.sh's plumbing (a stub nvidia-smi, the
interpreter given in PYTHON) run here too.

Benchmarks are not tests of speed: these only check that each script runs end to
end and that the figures it prints hold together. The four scripts start at once
(module fixture) so the suite waits for the slowest, not for their sum.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def run_tiny(name: str, json_out: Path | None = None) -> tuple[str, dict | None]:
    """A benchmark with --tiny (and --json when given): its stdout and JSON, after checking it exited 0.

    One at a time: run concurrently, the 2-process runs' gloo waits spin and the suite gets slower.
    """
    cmd = [sys.executable, str(BENCH / f"{name}.py"), "--tiny"] + (["--json", str(json_out)] if json_out else [])
    proc = subprocess.run(
        cmd, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "usable cores" in proc.stdout and "load average" in proc.stdout  # the machine line
    assert "deepspeed" in proc.stdout and "accelerate" in proc.stdout  # the versions line
    return proc.stdout, json.loads(json_out.read_text()) if json_out else None


def test_trainer_benchmark_prints_three_loops_and_the_ratio():
    out, _ = run_tiny("bench_trainer")
    # per loop: steps/s, samples/s, ms/step, GFLOP/s, steps/CPU-s, CPU ms/step
    rows = {
        name: [float(x) for x in m.group(1).split()]
        for name in ("bare", "bare + TrainStream", "dist-train")
        if (m := re.search(rf"^{re.escape(name)}((?:\s+[\d.]+){{6}})$", out, re.M))
    }
    assert len(rows) == 3 and all(v > 0 for row in rows.values() for v in row), out
    for column, label in ((0, "steps/s"), (4, "steps/CPU-s")):
        m = re.search(
            rf"ratio dist-train/bare \({label}\): ([\d.]+) \(median of 1 paired.*goal >= 0\.90: (met|NOT met)", out
        )
        assert m, out
        # with one repeat the ratio is that repeat's dist-train rate over its bare rate
        assert float(m.group(1)) == pytest.approx(
            rows["dist-train"][column] / rows["bare"][column], rel=0.02, abs=0.011
        )
    for label in ("wall", "CPU"):
        assert re.search(rf"overhead per step \({label}\): loader [+-][\d.]+ ms, trainer loop [+-][\d.]+ ms", out)


def test_zero_memory_benchmark_matches_the_paper_where_deepspeed_partitions(tmp_path):
    out, data = run_tiny("bench_zero_memory", tmp_path / "memory.json")
    assert re.search(
        r"ratio vs DDP, per-rank total.*ZeRO-1 [\d.]+ \(formula 0\.625\).*ZeRO-3 [\d.]+ \(formula 0\.500\)", out
    )
    assert data["world"] == 2 and set(data["modes"]) == {"DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3"}
    psi = data["modes"]["DDP"][0]["psi"]
    for rank in data["modes"]["DDP"]:  # fp32 DDP: whole weights, grads and two Adam moments on every rank
        assert rank["params"] == rank["grads"] == 4 * psi
        assert 8 * psi <= rank["optimizer"] <= 8 * psi + 1024  # + AdamW's scalar step counters
    for mode in ("ZeRO-1", "ZeRO-2", "ZeRO-3"):
        ranks = data["modes"][mode]
        # fp32 master + Adam moments: K = 12 bytes per parameter, split between the 2 ranks (padding aside)
        assert sum(r["optimizer"] for r in ranks) == pytest.approx(12 * psi, rel=0.01), mode
        # gradients held at the step: each rank keeps only its bf16 partition
        assert sum(r["grads"] for r in ranks) == pytest.approx(2 * psi, rel=0.01), mode
    for mode in ("ZeRO-1", "ZeRO-2"):  # bf16 weights whole on every rank
        assert all(r["params"] == pytest.approx(2 * psi, rel=0.001) for r in data["modes"][mode]), mode


def test_scaling_benchmark_prints_both_process_counts_and_the_efficiency():
    out, _ = run_tiny("bench_scaling")
    rows = dict(re.findall(r"^([12])\s+\d+\s+(\d+)\s+\d+\s+-$", out, re.M))  # no CPU figure with --tiny
    assert set(rows) == {"1", "2"} and all(int(v) > 0 for v in rows.values()), out
    m = re.search(r"ratio 2-process/1-process samples/s: ([\d.]+) .*efficiency ([\d.]+)", out)
    assert m, out
    assert float(m.group(2)) == pytest.approx(float(m.group(1)) / 2, abs=0.011)
    assert float(m.group(1)) == pytest.approx(int(rows["2"]) / int(rows["1"]), rel=0.02, abs=0.011)


def test_quality_benchmark_scores_every_method_against_baseline_and_oracle(tmp_path):
    out, scores = run_tiny("bench_quality", tmp_path / "quality.json")
    methods = {"identity", "ridge", "dream-mlp", "transformer", "transformer-chunked", "transformer-points"}
    assert set(scores) == methods
    identity = scores["identity"]
    # the do-nothing method is the baseline: no gain, none of the oracle gap closed
    assert identity["mean_cos"] == pytest.approx(identity["identity_baseline_cos"], abs=1e-9)
    assert identity["fraction_of_oracle_gap"] == pytest.approx(0.0, abs=1e-9)
    for name, q in scores.items():
        assert q["oracle_cos"] > q["identity_baseline_cos"], name
        assert math.isfinite(q["mean_cos"]) and set(q["per_yaw"]) <= {
            "0-15",
            "15-30",
            "30-45",
            "45-60",
            "60-75",
            "75-90",
        }
    n_per_bucket = re.search(r"^n((?:\s+\d+){6})$", out, re.M)
    assert n_per_bucket and sum(map(int, n_per_bucket.group(1).split())) == identity["n"]
    for name in ("transformer", "transformer-chunked", "transformer-points"):
        assert re.search(rf"issue 3, {name}: gap closed >= 0\.95 (yes|NO), impostor <= baseline (yes|NO)", out), out
    assert re.search(r"ratio mean cos / identity baseline: ridge [\d.]+, dream-mlp [\d.]+, transformer [\d.]+", out)


def test_quality_benchmark_refuses_an_unknown_method():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_quality.py"), "--tiny", "--methods", "ridge,lasso"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown ['lasso']" in proc.stderr and "transformer-points" in proc.stderr


GPU_COLUMNS = ["loop", "batch", "precision", "compile", "samples/s", "x bare", "MFU", "peak GiB", "skipped steps",
               "row s", "note"]  # fmt: skip


def gpu_table(out: str) -> list[dict[str, str]]:
    """bench_gpu's markdown table: one dict per row, keyed by column."""
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert lines and [c.strip() for c in lines[0].strip("|").split("|")] == GPU_COLUMNS, out
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[1:]]
    assert all(len(r) == len(GPU_COLUMNS) for r in rows), rows
    return [dict(zip(GPU_COLUMNS, r)) for r in rows]


def test_gpu_benchmark_tiny_prints_one_table_of_the_whole_matrix(tmp_path):
    """--tiny on CPU: every row of the matrix in the table; bf16 eager rows measured, fp16 and compile rows skipped."""
    out, data = run_tiny("bench_gpu", tmp_path / "gpu.json")
    table = gpu_table(out)
    loops = ["bare loop", "dist-train, 1 process", "dist-train ZeRO-2", "dist-train ZeRO-3"]
    # bare: bf16 and fp16; one process bf16; ZeRO-2 fp16 and bf16; ZeRO-3 bf16; each with and without compile
    assert len(table) == 12 and {r["loop"].removesuffix(" --compile") for r in table} == set(loops)
    assert len(data["rows"]) == 12 and data["tiny"] is True
    ran = [r for r in table if r["samples/s"] != "skipped"]
    assert {(r["loop"], r["precision"], r["compile"]) for r in ran} == {(name, "bf16", "no") for name in loops}, out
    bare = next(r for r in ran if r["loop"] == "bare loop")
    assert bare["x bare"] == "ref"
    for r in ran:
        rate = float(r["samples/s"].replace(",", ""))
        assert rate > 0 and r["MFU"] == "n/a" and r["peak GiB"] == "n/a"  # CPU: no peak FLOP/s, no CUDA memory
        skipped, total = map(int, r["skipped steps"].split("/"))
        assert skipped == 0 and total == 12  # bf16: nothing skipped; 4 warm-up + 8 timed steps
        if r is not bare:  # the ratio to the bare loop of the same batch, precision and compile setting
            assert float(r["x bare"]) == pytest.approx(rate / float(bare["samples/s"].replace(",", "")), abs=0.011)
    for r in table:
        if r["precision"] == "fp16":
            assert r["samples/s"] == "skipped" and r["note"] == "fp16 needs a GPU"
        elif r["compile"] == "yes":
            assert r["samples/s"] == "skipped" and r["note"].startswith("--tiny: no compile rows")
    by_name = {row["name"]: row for row in data["rows"]}
    assert by_name["zero2-bf16-b32"]["status"] == "ok" and by_name["zero2-fp16-b32"]["status"] == "skipped"
    assert re.search(r"^skipped 8 of 12 rows: ", out, re.M)
    assert "goals: not assessed" in out


def test_gpu_benchmark_judges_each_goal_from_its_rows():
    """The GPU-only part of bench_gpu's report (MFU, goals), on made-up rows: ratios and verdicts per row."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_gpu as g
    finally:
        sys.path.remove(str(BENCH))

    def ok(mode, batch, compiled, rate, mfu=None):
        row = g.Row(mode, "bf16", batch, compiled)
        return g.Result(row, status="ok", samples_per_s=rate, mfu=mfu, skipped_steps=0, total_steps=60, row_s=9.0)

    results = [
        ok("bare", 128, False, 5000), ok("one", 128, False, 4600), ok("zero2", 128, False, 4000),
        ok("one", 128, True, 16000), ok("zero2", 128, True, 12000),
        ok("bare", 8192, False, 54000, 0.15), ok("one", 8192, True, 130000, 0.36),
        g.Result(g.Row("zero3", "bf16", 128, False), note="budget: ~35 s needed, 10 s left"),
    ]  # fmt: skip
    g.fill_ratios(results)
    lines = g.goals(results, assessed=True)
    # goal 1 compares eager with eager: the compiled rows (no compiled bare row here) are left out of it
    assert lines[0].endswith("one-bf16-b128 0.92 met; zero2-bf16-b128 0.80 NOT met"), lines[0]
    assert lines[1].endswith("one-bf16-b128-compile 16,000 met; zero2-bf16-b128-compile 12,000 NOT met"), lines[1]
    assert "one-bf16-b8192-compile 36.0% met (bare loop: bare-bf16-b8192 15.0%)" in lines[2]
    rows = {r["loop"] + " " + r["batch"]: r for r in gpu_table(g.table(results))}
    assert rows["dist-train, 1 process --compile 128"]["x bare"] == "3.20"  # against the eager bare loop, said so
    assert rows["dist-train, 1 process --compile 128"]["note"] == "x bare: vs eager bare"
    assert rows["dist-train ZeRO-3 128"]["samples/s"] == "skipped" and rows["dist-train ZeRO-3 128"]["note"].startswith(
        "budget"
    )
    assert g.peak_flops("NVIDIA H200", None) == 989e12 and g.peak_flops("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert g.peak_flops("NVIDIA H100 PCIe", None) == 756e12 and g.peak_flops("Some GPU", None) is None
    assert g.goals(results, assessed=False) == [
        "goals: not assessed (they are for the xl preset on a GPU; this run is not)"
    ]


def test_gpu_check_is_valid_bash_and_runs_bench_gpu_with_the_given_python(tmp_path):
    """With PYTHON whose imports work, gpu_check.sh skips set-up and writes the table and JSON under $OUT.

    A stub nvidia-smi stands for the GPU; GPU_CHECK_ALLOW_CPU lets the CPU build of torch through for this test.
    """
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-stub)"\n')
    fake.chmod(0o755)
    out_dir = tmp_path / "out"
    env = os.environ | {
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "OUT": str(out_dir),
        "GPU_CHECK_ALLOW_CPU": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--tiny", "--modes", "bare"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: GPU 0: NVIDIA H200" in proc.stdout and "setup:" not in proc.stdout  # no set-up
    assert f"gpu_check: {sys.executable} (python" in proc.stdout
    table = gpu_table(proc.stdout)
    assert len(table) == 4 and table[0]["loop"] == "bare loop"
    rows = json.loads((out_dir / "bench_gpu.json").read_text())["rows"]
    assert [r["status"] for r in rows if not r["compile"] and r["precision"] == "bf16"] == ["ok"]
    assert "| loop | batch |" in (out_dir / "bench_gpu.txt").read_text()


def test_gpu_check_refuses_cleanly_when_the_driver_is_unreachable(tmp_path):
    fake = tmp_path / "nvidia-smi"  # what a machine with the tool but no working driver prints
    fake.write_text(
        '#!/bin/sh\necho "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n'
    )
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh")],
        env=os.environ | {"PATH": f"{tmp_path}:{os.environ['PATH']}", "WORK": str(tmp_path / "work")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "no NVIDIA GPU" in proc.stderr and "couldn't communicate with the NVIDIA driver" in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "work").exists()  # refused before set-up or synth


@pytest.mark.skipif(shutil.which("nvidia-smi", path="/usr/bin:/bin") is not None, reason="nvidia-smi is installed")
def test_gpu_check_refuses_cleanly_without_nvidia_smi(tmp_path):
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh")],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "no NVIDIA GPU: nvidia-smi is not installed" in proc.stderr


def test_checkpoint_benchmark_prints_each_save_and_the_policys_share_of_wall_time(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_checkpoint.py"), "--tiny", "--dir", str(tmp_path)],
        cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = re.search(r"checkpoint 1: ([\d.]+) s, ([\d,]+) MiB \(debug-cpu, 1.0M params\)", proc.stdout)
    assert saved and float(saved[1]) > 0 and int(saved[2].replace(",", "")) >= 10, proc.stdout
    assert re.search(r"save_best: the step waits [\d.]+ s .* the thread finishes [\d.]+ s later", proc.stdout)
    assert re.search(r"--save_every_minutes 30\): [\d.]+% of wall time spent saving", proc.stdout)
    assert not list(tmp_path.iterdir()), "its checkpoints are removed"
