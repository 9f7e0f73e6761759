"""The benchmarks run on a tiny size and print their figures and ratio lines; gpu_check.sh refuses without a GPU.

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


def test_gpu_check_is_valid_bash_and_its_report_is_valid_python():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
    script = (BENCH / "gpu_check.sh").read_text()
    report = re.search(r"<<'EOF'.*?\n(.*?)\nEOF\n", script, re.S)
    assert report, "the per-run report (a Python heredoc) is missing"
    compile(report.group(1), "gpu_check.sh report", "exec")


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
