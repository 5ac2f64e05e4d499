#!/usr/bin/env bash
# Runs on the GPU host from the project root (after ../shared/gpu/prepare.sh here, with .gpu
# carried): builds against pip PyTorch's LibTorch with CUDA, runs every test, the bf16 parity
# check and the benchmarks. Logs go to $OUT (or /tmp/lychee-gpu); the summary to stdout.
set -uo pipefail
out=${OUT:-/tmp/lychee-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
if ! bash .gpu/build.sh >"$out/build.log" 2>&1; then
  echo "full build failed; building what can be built:"
  grep -E "error" "$out/build.log" | head -20
  cmake --build build-gpu -j"$(nproc)" -- -k 0 >>"$out/build.log" 2>&1
fi
source .gpu/env.sh
ctest --test-dir build-gpu --output-on-failure --timeout 300 -j4 >"$out/ctest.log" 2>&1
tail -25 "$out/ctest.log"
build-gpu/tests/common/model_test "[cuda]" -s 2>&1 | grep -E "bf16 on CUDA|passed|failed" | tee "$out/bf16-parity.txt"
build-gpu/bench/model_bench --device cuda --contexts 2048,8192 2>&1 | tee "$out/model-bench-cuda.txt"
for extra in "$@"; do bash -c "$extra" 2>&1 | tee -a "$out/extra.txt"; done
