#!/usr/bin/env bash
# The CUDA kernels' check on the GPU host, from the project root, with .gpu carried
# (../shared/gpu/prepare.sh): configures like .gpu/build.sh but builds only the kernel targets, runs
# their tests and the kernel benchmark, then (SANITIZE=0 skips) racecheck and memcheck on the test
# cases SANITIZE_TESTS names (Catch2 specs, comma-separated) where compute-sanitizer works.
# Logs under $OUT (or /tmp/lychee-kernels); extra arguments go to kernel_bench.
#   bash kernels/cuda/gpu_kernels.sh [--quick] [--sweep]
set -uo pipefail
out=${OUT:-/tmp/lychee-kernels}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
sed '$d' .gpu/build.sh >/tmp/lychee-configure.sh  # build.sh without its last line, the full build
if ! bash /tmp/lychee-configure.sh -DLYCHEE_CUDA_PTXAS_VERBOSE=ON >"$out/build.log" 2>&1; then
  tail -30 "$out/build.log"
  exit 1
fi
source .gpu/env.sh
if ! cmake --build build-gpu -j"$(nproc)" --target kernel_bench cuda_hybrid_plan_test cuda_hybrid_decode_test \
  cuda_torch_hybrid_decode_test >>"$out/build.log" 2>&1; then
  grep -E "error" -A3 "$out/build.log" | head -40
  exit 1
fi
grep -A2 "HybridDecodeMmaKernelILi128ELi4E" "$out/build.log" | grep -E "Used|spill"
ctest --test-dir build-gpu -R "^cuda_(hybrid|torch)_" --output-on-failure --timeout 300 >"$out/test.log" 2>&1
grep -E "tests passed|tests failed|Failed|\*\*\*" "$out/test.log"
build-gpu/bench/kernel_bench "$@" >"$out/bench.log" 2>&1
tail -18 "$out/bench.log"
[ "${SANITIZE:-1}" = 1 ] || exit 0
test_bin=build-gpu/tests/kernels/cuda/cuda_hybrid_decode_test
for tool in racecheck memcheck; do
  # Catch2 test specs: one argument, comma-separated alternatives (separate arguments are ANDed).
  timeout "${SANITIZE_TIMEOUT:-90}" compute-sanitizer --tool "$tool" "$test_bin" "${SANITIZE_TESTS:-block selection*}" \
    >/tmp/sanitizer.log 2>&1
  echo "compute-sanitizer $tool: exit $?; $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|not supported" /tmp/sanitizer.log | head -2)"
  cat /tmp/sanitizer.log >>"$out/sanitizer.log"
done
