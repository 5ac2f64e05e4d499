#!/usr/bin/env bash
# Builds the tests with AddressSanitizer and UndefinedBehaviorSanitizer (gcc) into build-asan/ and
# runs them under ctest: any memory error, leak or undefined behaviour fails its test. Extra
# arguments go to ctest (e.g. -R tokenizer_test).
#
# LibTorch (Debian's 1.13, or pip's) is not instrumented: ASan still sees every heap block, since
# it replaces malloc for the whole process, but not accesses made inside LibTorch. No report from
# LibTorch's side has come up, so every test runs (CI leaves out calibration_convergence_test, 90
# steps of LibTorch arithmetic), with the sanitizers' default settings and no suppressions.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# -O1 and line tables only (-g1): the sanitizers' usual setting, and the quickest build that
# still gives file:line in reports. UBSan aborts instead of printing and going on. CUDA off: the
# kernels do not run on a machine without a GPU, and nvcc does not take these flags.
sanitizers="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" -DCMAKE_CXX_FLAGS="$sanitizers" \
  -DCMAKE_EXE_LINKER_FLAGS="$sanitizers" -DCMAKE_SHARED_LINKER_FLAGS="$sanitizers" -DLYCHEE_ENABLE_CUDA=OFF
cmake --build build-asan -j"$(nproc)"

export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
ctest --test-dir build-asan --output-on-failure -j"$(nproc)" "$@"
