#!/usr/bin/env bash
# Learns a head partition with a calibration job and compares retrieval accuracy at a given
# context and budget: dense, the learned partition, a random partition of the same density and
# the hand-made one. usage: scripts/partition-eval.sh BUILD_DIR DEVICE OUT_DIR
#   [TARGET_DENSITY=0.25] [STEPS=300] [CONTEXT=4096] [BUDGET=1024] [SAMPLES=40]
set -euo pipefail
build=$1 device=$2 out=$3
density=${4:-0.25} steps=${5:-300} context=${6:-4096} budget=${7:-1024} samples=${8:-40}
cd "$(dirname "$0")/.."
mkdir -p "$out"
lychee=$build/tools/lychee/lychee
port=$((50100 + RANDOM % 500))
registry=$(mktemp -d)
"$build/trainer/lychee-trainer" --listen 127.0.0.1:$port --registry-dir "$registry" --device "$device" \
  >"$out/trainer.log" 2>&1 &
trainer=$!
trap 'kill $trainer 2>/dev/null; rm -rf "$registry"' EXIT
sleep 2
start=$(date +%s)
job=$("$lychee" submit --trainer 127.0.0.1:$port --target-density "$density" --steps "$steps" --budget "$budget" --seed 1)
"$lychee" watch "$job" --trainer 127.0.0.1:$port 2>"$out/watch.log" | tee "$out/job.txt"
echo "calibration on $device: $(( $(date +%s) - start )) s for $steps steps" | tee -a "$out/job.txt"
"$lychee" partition latest --trainer 127.0.0.1:$port | tee -a "$out/job.txt"
"$lychee" partition latest --trainer 127.0.0.1:$port --json >"$out/learned-partition.json"
# The learned partition's share of retrieval heads outside layer 0, for the random baseline.
learned=$out/learned-partition.json
retrieval=$(grep -o HEAD_ROLE_RETRIEVAL "$learned" | wc -l)
layers=$(grep -o '"numLayers": *[0-9]*' "$learned" | grep -o '[0-9]*$')
heads=$(grep -o '"numKvHeads": *[0-9]*' "$learned" | grep -o '[0-9]*$')
random_density=$(awk -v r="$retrieval" -v l="$layers" -v h="$heads" 'BEGIN { printf "%.4f", (r - h) / ((l - 1) * h) }')
eval_args=(--device "$device" --context "$context" --samples "$samples")
{
  echo "== dense"
  "$lychee" eval "${eval_args[@]}" --attention dense
  echo "== learned partition, budget $budget"
  "$lychee" eval "${eval_args[@]}" --attention hybrid --partition "$out/learned-partition.json" --budget "$budget"
  for seed in 1 2 3; do
    echo "== random partition of the same density ($random_density), seed $seed, budget $budget"
    "$lychee" eval "${eval_args[@]}" --attention hybrid --random-partition "$random_density" --partition-seed "$seed" \
      --budget "$budget"
  done
  echo "== hand-made partition (KV head 0 retrieval in every layer), budget $budget"
  "$lychee" eval "${eval_args[@]}" --attention hybrid \
    --partition models/tiny-llama-retrieval/partitions/retrieval-head-0.json --budget "$budget"
} | tee "$out/eval.txt"
