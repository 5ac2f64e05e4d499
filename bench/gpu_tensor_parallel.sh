#!/usr/bin/env bash
# Tensor and data parallelism on a multi-GPU host, in one command from the project root with .gpu
# carried (../shared/gpu/prepare.sh here first):
#   1. configures as .gpu/build.sh does and builds the benchmarks and the NCCL tests, while
#      bench/write_random_llama.py writes the Llama-3-8B-shaped and (with 4 or more GPUs, or
#      SHAPES=8b,70b) the 70B-shaped random checkpoints under $TMPDIR;
#   2. cuda_tensor_parallel_test, its one-GPU and its multi-GPU cases;
#   3. e2e_bench on the 8B shape over 1, 2 and 4 GPUs (scaling, and the all-reduce share of the
#      step), then on the 70B shape over 2 and 4 GPUs, each at 32K and 128K, batch 1 and 4, dense
#      and hybrid, the limit per GPU plus the all-reduces timed alone;
#   4. calibration_bench on the 8B shape with 1 and 2 data-parallel ranks (a GPU each).
# NVLink multicast stays off (the device README): NCCL_NVLS_ENABLE=0, inherited by every rank.
# Logs go to $OUT (or /tmp/lychee-tp). Extra arguments go to every e2e_bench run.
set -uo pipefail
out=${OUT:-/tmp/lychee-tp}
tmp=${TMPDIR:-/tmp}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
since() { echo "[$(( $(date +%s) - t0 )) s]"; }
t0=$(date +%s)
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
shapes=${SHAPES:-$([ "$gpus" -ge 4 ] && echo 8b,70b || echo 8b)}

writers=()
for shape in ${shapes//,/ }; do
  python3 bench/write_random_llama.py "$tmp/random-llama3-$shape" --shape "$shape" >"$out/checkpoint-$shape.log" 2>&1 &
  writers+=($!)
done
grep -v '^cmake --build' .gpu/build.sh >"$tmp/gpu-configure.sh"
bash "$tmp/gpu-configure.sh" >"$out/build.log" 2>&1 && source .gpu/env.sh &&
  cmake --build build-gpu --target e2e_bench calibration_bench cuda_tensor_parallel_test tensor_parallel_worker \
    -j"$(nproc)" >>"$out/build.log" 2>&1 ||
  { echo "build failed:"; grep -E "error|Error" "$out/build.log" | head -30; exit 1; }
grep "lychee: NCCL" "$out/build.log"
echo "$(since) built"

build-gpu/tests/common/cuda_tensor_parallel_test 2>&1 | tail -30 | tee "$out/cuda-tensor-parallel-test.txt"
echo "$(since) tests done"

for writer in "${writers[@]}"; do wait "$writer" || { echo "a checkpoint writer failed"; cat "$out"/checkpoint-*.log; exit 1; }; done
sync
cat "$out"/checkpoint-*.log

bench=build-gpu/bench/e2e_bench
rows="--contexts 32768,131072 --batches 1,4 --steps 30 --warmup 5"
for ranks in 1 2 4; do
  [ "$ranks" -le "$gpus" ] || continue
  $bench --model "$tmp/random-llama3-8b" $rows --tensor-parallel $ranks --json "$out/e2e-8b-tp$ranks.json" "$@" 2>&1 |
    tee "$out/e2e-8b-tp$ranks.txt"
  echo "$(since) 8B over $ranks GPUs done"
done
if [[ ",$shapes," == *",70b,"* ]]; then
  for ranks in 2 4; do
    [ "$ranks" -le "$gpus" ] || continue
    # One row per invocation: a row whose KV does not fit beside the shard (RESOURCE_EXHAUSTED)
    # leaves the others.
    for row in 32768:1 131072:1 32768:4 131072:4; do
      $bench --model "$tmp/random-llama3-70b" --contexts ${row%:*} --batches ${row#*:} --steps 30 --warmup 5 \
        --tensor-parallel $ranks --json "$out/e2e-70b-tp$ranks-${row/:/-b}.json" "$@" 2>&1 |
        tee -a "$out/e2e-70b-tp$ranks.txt"
    done
    echo "$(since) 70B over $ranks GPUs done"
  done
fi

# Calibration needs a tokenizer beside the checkpoint: the bundled model's is borrowed.
for ranks in 1 2; do
  [ "$ranks" -le "$gpus" ] || continue
  build-gpu/bench/calibration_bench --model "$tmp/random-llama3-8b" --tokenizer models/tiny-llama-retrieval/tokenizer.json \
    --device cuda --contexts 2048 --checkpointing on --steps 4 --samples-per-step 2 --data-parallel $ranks 2>&1 |
    tee "$out/calibration-dp$ranks.txt"
  echo "$(since) calibration over $ranks GPUs done"
done
