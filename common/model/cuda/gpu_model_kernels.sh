#!/usr/bin/env bash
# The model kernels' check on the GPU host, from the project root, with .gpu carried
# (../shared/gpu/prepare.sh): configures like .gpu/build.sh but builds only model_kernels_test and
# model_kernels_bench, prints the kernels' registers and spills, runs the test (each case prints
# its largest difference in bf16 ulps), then (SANITIZE=0 skips) compute-sanitizer memcheck and
# racecheck on the test's small cases, then the benchmark. Logs under $OUT (or /tmp/lychee-model-kernels);
# extra arguments go to model_kernels_bench.
#   bash common/model/cuda/gpu_model_kernels.sh [--quick]
set -uo pipefail
out=${OUT:-/tmp/lychee-model-kernels}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
sed '$d' .gpu/build.sh >/tmp/lychee-configure.sh  # build.sh without its last line, the full build
if ! bash /tmp/lychee-configure.sh -DLYCHEE_CUDA_PTXAS_VERBOSE=ON >"$out/build.log" 2>&1; then
  tail -30 "$out/build.log"
  exit 1
fi
source .gpu/env.sh
if ! cmake --build build-gpu -j"$(nproc)" --target model_kernels_test model_kernels_bench >>"$out/build.log" 2>&1; then
  grep -E "error" -A3 "$out/build.log" | head -40
  exit 1
fi
grep -A2 "model_kernels_cu" "$out/build.log" | grep -E "Compiling entry|Used|spill" |
  sed -E -e 's/.*model_kernels_cu_[0-9a-f]+[0-9]+/  /' -e 's/ptxas info +: //'
test_bin=build-gpu/tests/common/model_kernels_test
"$test_bin" >"$out/test.log" 2>&1
echo "model_kernels_test: exit $?"
grep -E "ulp|relative|test cases|assertions|FAILED" "$out/test.log" | head -80
if [ "${SANITIZE:-1}" = 1 ]; then
  for tool in memcheck racecheck; do
    # The small cases: the argument checks and the graph-captured chain of every kernel.
    timeout "${SANITIZE_TIMEOUT:-300}" compute-sanitizer --tool "$tool" "$test_bin" \
      "the entry points refuse*,a decode-step chain*,RopeAppend: without q_norm*" >/tmp/sanitizer.log 2>&1
    echo "compute-sanitizer $tool: exit $?; $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|not supported" /tmp/sanitizer.log | head -2)"
    cat /tmp/sanitizer.log >>"$out/sanitizer.log"
  done
fi
build-gpu/bench/model_kernels_bench "$@" 2>&1 | tee "$out/bench.log"
