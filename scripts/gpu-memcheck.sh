#!/usr/bin/env bash
# Runs on the GPU host from the project root (with .gpu carried): builds the CUDA test binaries and
# runs each under compute-sanitizer's memcheck, then the raw-kernel test under racecheck. LibTorch's
# caching allocator is switched off so that an access past the end of a tensor lands outside any
# allocation, where memcheck sees it; except for cuda_attention_test, which captures CUDA graphs: a
# capture must allocate from the allocator's graph pool (a bare cudaMalloc invalidates it, and the
# step falls back to eager), so there memcheck sees accesses outside the allocator's segments only.
# Logs go to $OUT (or /tmp/lychee-memcheck); a line per run to
# stdout. Each run stops after $MEMCHECK_TIMEOUT seconds (default 300; exit 124 means it did).
# MEMCHECK_TESTS (binary names, space-separated) and MEMCHECK_CASES (a Catch2 test spec, e.g. one
# case's name) narrow the memcheck runs; MEMCHECK_RACECHECK=0 skips the racecheck run.
# Exit status: the number of runs that failed or timed out.
set -uo pipefail
out=${OUT:-/tmp/lychee-memcheck}
mkdir -p "$out"
tests=(tests/kernels/cuda/cuda_hybrid_decode_test tests/kernels/cuda/cuda_torch_hybrid_decode_test
       tests/kernels/cuda_policy_test tests/kernels/cuda_attention_test)
grep -v '^cmake --build' .gpu/build.sh >"${TMPDIR:-/tmp}/gpu-configure.sh"
bash "${TMPDIR:-/tmp}/gpu-configure.sh" >"$out/build.log" 2>&1 && source .gpu/env.sh &&
  cmake --build build-gpu -j"$(nproc)" --target "${tests[@]##*/}" >>"$out/build.log" 2>&1 ||
  { echo "build failed:"; grep -E "error" "$out/build.log" | head -20; exit 1; }
if [ -n "${MEMCHECK_TESTS:-}" ]; then
  narrowed=()
  for test in "${tests[@]}"; do [[ " $MEMCHECK_TESTS " == *" ${test##*/} "* ]] && narrowed+=("$test"); done
  tests=("${narrowed[@]}")
fi
cases=()
[ -n "${MEMCHECK_CASES:-}" ] && cases=("$MEMCHECK_CASES")
failures=0
check() {  # tool, test binary
  local log="$out/$1-${2##*/}.log" started=$SECONDS uncached=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  [ "${2##*/}" = cuda_attention_test ] && uncached=()  # LibTorch reads the variable's presence, not its value
  timeout "${MEMCHECK_TIMEOUT:-300}" env "${uncached[@]}" \
    compute-sanitizer --tool "$1" --error-exitcode 99 "build-gpu/$2" "${@:3}" >"$log" 2>&1
  local status=$?
  echo "$1 ${2##*/}: exit $status, $((SECONDS - started)) s, $(grep -E '^(=========|ERROR SUMMARY|RACECHECK SUMMARY)' "$log" | tail -1)"
  [ $status -eq 0 ] || failures=$((failures + 1))
}
for test in "${tests[@]}"; do check memcheck "$test" "${cases[@]}"; done
[ "${MEMCHECK_RACECHECK:-1}" = 0 ] || check racecheck tests/kernels/cuda/cuda_hybrid_decode_test
exit $failures
