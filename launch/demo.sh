#!/usr/bin/env bash
# The main job on the demo shard set: set up, check the data, train, evaluate, report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
OUT=${OUT:-runs/demo}
.venv/bin/dist-train inspect shards/demo --json "$OUT/inspect.json" --png "$OUT/inspect.png"
.venv/bin/dist-train train --config debug-cpu --data_dir shards/demo --output_dir "$OUT" --epochs 20 "$@"
.venv/bin/dist-train eval --checkpoint "$OUT/best/model.safetensors" --shards shards/demo --json "$OUT/eval.json"
.venv/bin/dist-train report "$OUT"
