#!/usr/bin/env bash
# GPU check: the xl config (768-dim, 8 layers, 16 heads, batch 128) under DeepSpeed ZeRO-2 on one NVIDIA GPU,
# fp16 then bf16, STEPS optimizer steps each. Prints per precision: samples/s, peak GPU memory, skipped (fp16
# overflow) steps and model FLOP utilisation. Under 5 minutes once .venv exists (launch/setup.sh then only checks;
# a first set-up also downloads the CUDA build of torch).
#   bash bench/gpu_check.sh
#   STEPS=500 GPU=1 PEAK_TFLOPS=989 bash bench/gpu_check.sh
# STEPS (300), LOG_EVERY (20), GPU (nvidia-smi index, 0), TIMEOUT_S per run (110), PEAK_TFLOPS (dense fp16/bf16
# tensor peak; looked up from the GPU name when unset), WORK (a new temporary directory by default).
# Exit: 0 all runs reported, 1 a run failed, 2 no NVIDIA GPU (nothing is set up or run).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU: nvidia-smi is not installed. Run this on a machine with an NVIDIA GPU and driver;" \
    "on CPU use bench/bench_trainer.py." >&2
  exit 2
fi
if ! gpus=$(nvidia-smi -L 2>&1) || [ -z "$gpus" ]; then
  echo "gpu_check: no NVIDIA GPU: 'nvidia-smi -L' failed (${gpus%%$'\n'*}). Check the driver, or run this on a" \
    "machine with an NVIDIA GPU; on CPU use bench/bench_trainer.py." >&2
  exit 2
fi

STEPS=${STEPS:-300}
LOG_EVERY=${LOG_EVERY:-20}
GPU=${GPU:-0}
TIMEOUT_S=${TIMEOUT_S:-110}
BATCH=128 # the xl preset's micro batch
started=$SECONDS
export CUDA_DEVICE_ORDER=PCI_BUS_ID # CUDA numbers GPUs as nvidia-smi does
echo "gpu_check: $(echo "$gpus" | sed -n "$((GPU + 1))p")"

bash launch/setup.sh
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK"
poll=""
trap '[ -n "$poll" ] && kill "$poll" 2>/dev/null; true' EXIT
.venv/bin/dist-train synth --out "$WORK/shards" --n-identities 2000 >"$WORK/synth.log"

failed=0
for precision in fp16 bf16; do
  run="$WORK/run-$precision"
  mkdir -p "$run"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU" >"$run/memory-before.txt"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU" -lms 200 >"$run/memory.txt" &
  poll=$!
  echo "gpu_check: $precision: $STEPS steps, log in $run/train.log"
  status=0
  CUDA_VISIBLE_DEVICES=$GPU timeout "$TIMEOUT_S" .venv/bin/accelerate launch --use_deepspeed \
    --deepspeed_config_file "configs/deepspeed/zero2-$precision.json" --num_processes 1 \
    -m dist_train train --config xl --data_dir "$WORK/shards" --output_dir "$run" --max_steps "$STEPS" \
    --log_every_steps "$LOG_EVERY" --samples_per_epoch $((STEPS * BATCH * 2)) --eval_max_samples 1024 \
    --early_stopping_patience 0 >"$run/train.log" 2>&1 || status=$?
  kill "$poll" 2>/dev/null || true
  wait "$poll" 2>/dev/null || true
  poll=""
  if [ "$status" -ne 0 ]; then
    echo "gpu_check: $precision run failed (exit $status$([ "$status" -eq 124 ] && echo ", timed out after ${TIMEOUT_S}s"));" \
      "its error lines and last lines ($run/train.log):" >&2
    grep -m 3 "error" "$run/train.log" >&2 || true
    tail -n 12 "$run/train.log" >&2
    failed=1
    continue
  fi
  .venv/bin/python - "$run" "$precision" "$BATCH" "$GPU" <<'EOF' || failed=1
"""Read one run's TensorBoard log and nvidia-smi samples; print its figures."""
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, "bench")
from bench_trainer import tb_steps_per_s, train_flops_per_sample  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from dist_train.config import load_run_config  # noqa: E402
from dist_train.metrics import TRAIN_TAGS  # noqa: E402

# Dense fp16/bf16 tensor-core peak, TFLOP/s (vendor data sheets; SXM parts unless named).
PEAKS = {"B200": 2250, "H200": 989, "GH200": 989, "H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "A100": 312,
         "A800": 312, "L40S": 362, "L40": 181, "L4": 121, "A10": 125, "A30": 165, "V100": 125, "T4": 65,
         "RTX 4090": 165, "RTX 3090": 71, "RTX A6000": 155}
run, precision, batch, gpu = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", gpu],
                      capture_output=True, text=True, check=True).stdout.strip()
peak = float(os.environ["PEAK_TFLOPS"]) if os.environ.get("PEAK_TFLOPS") else next(
    (v for k, v in PEAKS.items() if k in name), None)
samples_per_s = tb_steps_per_s(run) * batch
ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
skipped = int(ea.Scalars(TRAIN_TAGS["skipped_steps"])[-1].value)
steps = ea.Scalars(TRAIN_TAGS["samples_per_s"])[-1].step
before = int((run / "memory-before.txt").read_text().split()[0])
samples = [int(x) for x in (run / "memory.txt").read_text().split() if x.strip().isdigit()]
peak_mib = max(samples, default=before) - before
flops = train_flops_per_sample(load_run_config(run).model) * samples_per_s
mfu = f"{flops / (peak * 1e12):.1%} of {peak:g} TFLOP/s" if peak else "n/a (unknown GPU; set PEAK_TFLOPS)"
print(f"gpu_check: {precision} on {name}: {samples_per_s:,.0f} samples/s, peak GPU memory {peak_mib:,} MiB "
      f"(nvidia-smi, incl. CUDA context), skipped steps {skipped}/{steps}, "
      f"model FLOPs {flops / 1e12:.2f} TFLOP/s, MFU {mfu}")
EOF
done
echo "gpu_check: finished in $((SECONDS - started)) s; runs in $WORK"
exit "$failed"
