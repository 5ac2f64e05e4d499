#!/usr/bin/env bash
# On the GPU host after scripts/gpu-check.sh's build: the service pair with the model on CUDA
# (the shipped partition published to the trainer, rolled out to the inference service, one dense
# and one hybrid generation through the CLI), then every selection policy through lychee eval on
# CUDA. Logs go to $OUT (or /tmp/lychee-gpu).
set -uo pipefail
out=${OUT:-/tmp/lychee-gpu}
mkdir -p "$out"
bin=build-gpu
state=$(mktemp -d)
$bin/trainer/lychee-trainer --listen 127.0.0.1:50061 --registry-dir "$state/registry" >"$out/serve.log" 2>&1 &
trainer=$!
$bin/inference/lychee-inference --device cuda --state-dir "$state/inference" --trainer 127.0.0.1:50061 \
  --listen 127.0.0.1:50062 >>"$out/serve.log" 2>&1 &
inference=$!
for _ in $(seq 100); do $bin/tools/lychee/lychee health --target 127.0.0.1:50062 >/dev/null 2>&1 && break; sleep 0.2; done
$bin/tools/lychee/lychee publish models/tiny-llama-retrieval/partitions/learned-target-0.25.json
sleep 2
$bin/tools/lychee/lychee server-info
$bin/tools/lychee/lychee generate --server 127.0.0.1:50062 --prompt-file scripts/demo-prompt.txt --max-new-tokens 16 --attention dense
$bin/tools/lychee/lychee generate --server 127.0.0.1:50062 --prompt-file scripts/demo-prompt.txt --max-new-tokens 16
kill "$inference" "$trainer"
wait
timeout 300 $bin/tools/lychee/lychee eval --device cuda --policy dense,lychee,quest,double-p,prhs,streaming,tidal \
  --partition models/tiny-llama-retrieval/partitions/learned-target-0.25.json --budget 1024 --samples 20 \
  --corpus data/corpus/kjv-heldout.txt.gz --tasks passkey,multikey --context 4096 \
  --json "$out/eval-cuda-4k.json" 2>&1 | tail -20
