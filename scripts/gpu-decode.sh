#!/usr/bin/env bash
# The decode path on the GPU host, in one command from the project root with .gpu carried
# (../shared/gpu/prepare.sh here first): configures as .gpu/build.sh does, builds only the decode
# targets (the CUDA attention and model-kernel tests, the benchmarks, the servers and the CLI for
# scripts/gpu-calibration.sh and scripts/gpu-serve-load.sh) while bench/write_random_llama.py
# writes a random Llama-3-8B-shaped checkpoint, runs those tests, then e2e_bench on the bundled model
# and on the checkpoint. Logs go to $OUT (or /tmp/lychee-decode).
#   E2E_ARGS   extra arguments of every e2e_bench run (e.g. "--steps 30 --graphs false")
#   SKIP_TESTS=1, SKIP_E2E=1, SKIP_KERNEL_BENCH=1, BUNDLED_E2E=1 (the bundled model's rows too)
#   E2E_ROWS   the checkpoint's invocations, ';'-separated (default below)
# The checkpoint's rows run in three invocations (32K and 128K at batch 1; 32K and 64K at batch 4;
# 128K at batch 4), so that a GPU too small for the last (an 80 GB H100) still gives the others.
set -uo pipefail
out=${OUT:-/tmp/lychee-decode}
tmp=${TMPDIR:-/tmp}
checkpoint=$tmp/random-llama3-8b
mkdir -p "$out"
since() { echo "[$(( $(date +%s) - t0 )) s]"; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ "${SKIP_E2E:-0}" != 1 ]; then
  PYTHONUNBUFFERED=1 python3 bench/write_random_llama.py "$checkpoint" >"$out/checkpoint.log" 2>&1 &
  writer=$!
fi

tests=(cuda_hybrid_plan_test cuda_hybrid_decode_test cuda_torch_hybrid_decode_test cuda_attention_test
       cuda_policy_test model_test model_kernels_test)
grep -v '^cmake --build' .gpu/build.sh >"$tmp/gpu-configure.sh"
bash "$tmp/gpu-configure.sh" >"$out/build.log" 2>&1 && source .gpu/env.sh || { tail -30 "$out/build.log"; exit 1; }
targets=(e2e_bench model_kernels_bench calibration_bench lychee-inference lychee-trainer lychee)
ninja -C build-gpu -t targets all >"$tmp/gpu-targets.txt" 2>/dev/null
for t in "${tests[@]}"; do
  grep -q "^$t:" "$tmp/gpu-targets.txt" && targets+=("$t")
done
if ! cmake --build build-gpu -j"$(nproc)" --target "${targets[@]}" -- -k 0 >>"$out/build.log" 2>&1; then
  echo "build failed:"; grep -E "error" -A3 "$out/build.log" | head -60
fi
echo "$(since) built: ${targets[*]}"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  regex=$(IFS='|'; echo "^(${tests[*]}|model_test_cuda)\$")
  timeout "${TESTS_TIMEOUT:-400}" ctest --test-dir build-gpu --output-on-failure --timeout 300 -j2 -R "$regex" \
    >"$out/ctest.log" 2>&1
  grep -E "tests passed|Passed|Failed|SKIPPED|\*\*\*" "$out/ctest.log" | head -30
  grep -E "max \|logit|graph vs eager|FAILED|REQUIRE|CHECK\(" "$out/ctest.log" | head -40
  echo "$(since) tests done"
fi

if [ -x build-gpu/bench/model_kernels_bench ] && [ "${SKIP_KERNEL_BENCH:-0}" != 1 ]; then
  timeout 120 build-gpu/bench/model_kernels_bench --reps 20 ${KERNEL_BENCH_ARGS:-} >"$out/kernels-bench.txt" 2>&1
  cat "$out/kernels-bench.txt"
  echo "$(since) model_kernels_bench done"
fi

if [ "${SKIP_E2E:-0}" != 1 ]; then
  bench=build-gpu/bench/e2e_bench
  if [ "${BUNDLED_E2E:-0}" = 1 ]; then
    $bench --model models/tiny-llama-retrieval --contexts 32768,131072 --batches 1,4 --steps 20 --warmup 5 \
      ${E2E_ARGS:-} 2>&1 | tee "$out/e2e-bundled.txt"
  fi
  wait $writer || { echo "checkpoint writer failed:"; tail "$out/checkpoint.log"; exit 1; }
  echo "$(since) checkpoint written"
  : >"$out/e2e-llama.json"
  IFS=';' read -ra invocations <<<"${E2E_ROWS:---contexts 32768,131072 --batches 1;--contexts 32768,65536 --batches 4;--contexts 131072 --batches 4}"
  for rows in "${invocations[@]}"; do
    timeout "${E2E_TIMEOUT:-300}" $bench --model "$checkpoint" --json "$out/e2e-part.json" $rows --steps 15 --warmup 4 \
      ${E2E_ARGS:-} 2>&1 |
      tee -a "$out/e2e-llama.txt"
    cat "$out/e2e-part.json" >>"$out/e2e-llama.json" 2>/dev/null
    echo "$(since) e2e $rows done"
  done
fi
