#!/usr/bin/env bash
# On the GPU host after scripts/gpu-check.sh's build: the service pair with the model on CUDA
# (scripts/serve-demo.sh), then every selection policy through lychee eval on CUDA. Logs go to
# $OUT (or /tmp/lychee-gpu).
set -uo pipefail
out=${OUT:-/tmp/lychee-gpu}
mkdir -p "$out"
OUT="$out" bash scripts/serve-demo.sh build-gpu cuda
timeout 300 build-gpu/tools/lychee/lychee eval --device cuda --policy dense,lychee,quest,double-p,prhs,streaming,tidal \
  --partition models/tiny-llama-retrieval/partitions/learned-target-0.25.json --budget 1024 --samples 20 \
  --corpus data/corpus/kjv-heldout.txt.gz --tasks passkey,multikey --context 4096 \
  --json "$out/eval-cuda-4k.json" 2>&1 | tail -20
