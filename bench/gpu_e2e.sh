#!/usr/bin/env bash
# The end-to-end decode benchmark on the GPU host, in one command from the project root, with .gpu
# carried (../shared/gpu/prepare.sh here first):
#   1. configures as .gpu/build.sh does and builds e2e_bench alone, while
#      bench/write_random_llama.py writes a random-weight Llama-3-8B-shaped checkpoint under $TMPDIR;
#   2. e2e_bench on the bundled model: a context that cannot fit (RESOURCE_EXHAUSTED expected), then
#      32K/64K/128K at batch 1 and 4;
#   3. e2e_bench on the Llama-3-8B-shaped checkpoint, then bench/hf_reference.py (transformers, sdpa,
#      static cache) on the same checkpoint, which prints the merged table; the same for the bundled model.
# Logs go to $OUT (or /tmp/lychee-e2e). Extra arguments go to both e2e_bench runs.
set -uo pipefail
out=${OUT:-/tmp/lychee-e2e}
tmp=${TMPDIR:-/tmp}
checkpoint=$tmp/random-llama3-8b
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error
since() { echo "[$(( $(date +%s) - t0 )) s]"; }
t0=$(date +%s)

python3 bench/write_random_llama.py "$checkpoint" >"$out/checkpoint.log" 2>&1 &
writer=$!

# .gpu/build.sh configures, then builds every target: run its configure part only.
grep -v '^cmake --build' .gpu/build.sh >"$tmp/gpu-configure.sh"
bash "$tmp/gpu-configure.sh" >"$out/build.log" 2>&1 && source .gpu/env.sh &&
  cmake --build build-gpu --target e2e_bench -j"$(nproc)" >>"$out/build.log" 2>&1 ||
  { echo "build failed:"; grep -E "error|Error" "$out/build.log" | head -30; exit 1; }
echo "$(since) built e2e_bench"

# The checkpoint's pages are written back before anything is timed.
wait $writer || { echo "checkpoint writer failed:"; tail "$out/checkpoint.log"; exit 1; }
sync
cat "$out/checkpoint.log"
echo "$(since) checkpoint written"

bench=build-gpu/bench/e2e_bench
hf_steps="--steps 30 --warmup 5"
bundled=models/tiny-llama-retrieval
{
  echo "## a context that does not fit"
  $bench --model $bundled --contexts 100000000 --batches 4
  echo "exit status $?"
  echo "## bundled model"
  $bench --model $bundled --json "$out/e2e-bundled.json" --steps 30 --warmup 5 "$@"
} 2>&1 | tee "$out/e2e-bundled.txt"
echo "$(since) bundled done"

$bench --model "$checkpoint" --json "$out/e2e-llama.json" --steps 30 --warmup 5 "$@" 2>&1 | tee "$out/e2e-llama.txt"
echo "$(since) e2e_bench done"
python3 bench/hf_reference.py --model "$checkpoint" $hf_steps --ours "$out/e2e-llama.json" 2>&1 | grep -v Warning \
  | tee "$out/hf-llama.txt"
echo "$(since) transformers done"
python3 bench/hf_reference.py --model $bundled $hf_steps --ours "$out/e2e-bundled.json" 2>&1 | grep -v Warning \
  | tee "$out/hf-bundled.txt"
echo "$(since) all done"
