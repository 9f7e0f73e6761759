#!/usr/bin/env bash
# The main job on a demo shard set: set up, make the data, check it, train, evaluate, report.
#   bash launch/demo.sh                 # ~3 minutes on 2 CPU cores after set-up
#   bash launch/demo.sh --epochs 1      # trainer flags go to `dist-train train`
# The data: 2,000 synthetic identities x 16 samples (DEMO_IDENTITIES changes the count), made in seconds by
# `dist-train synth` (deterministic), so the model must learn the pose-dependent map for identities it never saw.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
OUT=${OUT:-runs/demo}
DATA=$OUT/shards
IDENTITIES=${DEMO_IDENTITIES:-2000}
DT=.venv/bin/dist-train
[ -f "$DATA/index.json" ] || $DT synth --out "$DATA" --n-identities "$IDENTITIES" --samples-per-identity 16 --seed 7
$DT inspect "$DATA" --json "$OUT/inspect.json" --png "$OUT/inspect.png"
$DT train --config debug-cpu --data_dir "$DATA" --output_dir "$OUT" --epochs 3 --overwrite "$@"
$DT eval --checkpoint "$OUT/best/model.safetensors" --shards "$DATA" --json "$OUT/eval.json"
$DT report "$OUT"
