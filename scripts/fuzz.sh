#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (clang 14, AddressSanitizer + UndefinedBehaviorSanitizer,
# leak checking) into build-fuzz/ and runs each for FUZZ_SECONDS seconds (default 60), starting
# from its seed corpus in tests/fuzz/corpus/<target>/ (FUZZ_SECONDS=0 only runs the corpus once,
# the crash-* regression inputs included). Fails when any target crashes, leaks,
# trips a sanitizer or breaks one of its properties; the input that did it is kept in
# build-fuzz/findings/<target>/. New inputs the fuzzers find go to build-fuzz/corpus/<target>/,
# never into the repository.
# Extra arguments name the targets to run (default: all), e.g. scripts/fuzz.sh tokenizer_json.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-60}

scripts/setup.sh
# clang and its runtime libraries (libFuzzer, the sanitizers), installed when missing.
fuzz_packages=(clang-14 libclang-rt-14-dev)
missing=()
for package in "${fuzz_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "fuzz: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Target name and the largest input it is given: above the seeds' sizes with room to grow, small
# enough to keep the executions fast.
declare -A max_len=(
  [safetensors]=16384
  [model_config]=4096
  [tokenizer_json]=16384
  [tokenizer_encode]=4096
  [partition_proto]=4096
  [partition_json]=8192
  [partition_registry]=4096
)
if [ $# -gt 0 ]; then targets=("$@"); else targets=(safetensors model_config tokenizer_json tokenizer_encode partition_proto partition_json partition_registry); fi
for target in "${targets[@]}"; do
  [ -n "${max_len[$target]:-}" ] || { echo "fuzz: unknown target $target (known: ${!max_len[*]})" >&2; exit 2; }
done

# CUDA off: the fuzzers link no kernels, and nvcc would not take clang as its host compiler.
CC=clang-14 CXX=clang++-14 cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DLYCHEE_FUZZ=ON -DLYCHEE_ENABLE_CUDA=OFF
cmake --build build-fuzz -j"$(nproc)" --target "${targets[@]/%/_fuzzer}"

# Leaks are checked after every input; UBSan aborts (built with -fno-sanitize-recover).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
failed=()
summary=()
for target in "${targets[@]}"; do
  work_corpus=build-fuzz/corpus/$target
  findings=build-fuzz/findings/$target
  log=build-fuzz/fuzz-$target.log
  mkdir -p "$work_corpus" "$findings"
  echo "fuzz: $target for ${FUZZ_SECONDS} s (max_len ${max_len[$target]})"
  options=(-max_len="${max_len[$target]}" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1
           -artifact_prefix="$findings/")
  # libFuzzer takes -max_total_time=0 as no limit.
  if [ "$FUZZ_SECONDS" -gt 0 ]; then options+=(-max_total_time="$FUZZ_SECONDS"); else options+=(-runs=0); fi
  # The JSON formats' syntax and field names, for the targets that read JSON.
  case $target in safetensors | model_config | tokenizer_json | partition_json) options+=(-dict=tests/fuzz/json.dict) ;; esac
  status=0
  # New inputs are written to the first corpus directory, the work one; the seeds are only read.
  "build-fuzz/tests/fuzz/${target}_fuzzer" "${options[@]}" "$work_corpus" "tests/fuzz/corpus/$target" \
    >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    summary+=("$(printf '%-20s FAILED (exit %s), see %s and %s' "$target" "$status" "$log" "$findings")")
    tail -n 60 "$log"
  else
    summary+=("$(printf '%-20s ok: %s runs, %s runs/s, corpus %s files' "$target" "${runs:-?}" "${rate:-?}" \
      "$(find "$work_corpus" "tests/fuzz/corpus/$target" -type f | wc -l)")")
  fi
done

echo "fuzz: ${FUZZ_SECONDS} s per target"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}; reproduce with build-fuzz/tests/fuzz/<target>_fuzzer <input>" >&2
  exit 1
fi
