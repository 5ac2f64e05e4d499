#!/usr/bin/env bash
# Calibration at real size on the GPU host, from the project root with .gpu carried, after
# scripts/gpu-decode.sh has configured build-gpu and written the Llama-3-8B-shaped checkpoint
# (or with CHECKPOINT naming another model directory): builds calibration_bench and times
# calibration steps at 2K and 8K tokens with and without activation checkpointing, the bundled
# tokenizer standing in for the checkpoint's. Output to stdout and $OUT/calibration.txt.
set -uo pipefail
out=${OUT:-/tmp/lychee-calibration}
checkpoint=${CHECKPOINT:-${TMPDIR:-/tmp}/random-llama3-8b}
mkdir -p "$out"
source .gpu/env.sh
cmake --build build-gpu --target calibration_bench -j"$(nproc)" >"$out/calibration-build.log" 2>&1 ||
  { echo "build failed:"; grep -E "error" -A3 "$out/calibration-build.log" | head -30; exit 1; }
timeout "${CALIBRATION_TIMEOUT:-400}" build-gpu/bench/calibration_bench --model "$checkpoint" \
  --tokenizer models/tiny-llama-retrieval/tokenizer.json --contexts "${CALIBRATION_CONTEXTS:-2048,8192}" \
  --checkpointing "${CALIBRATION_MODES:-on,off}" --steps "${CALIBRATION_STEPS:-3}" 2>&1 | tee "$out/calibration.txt"
