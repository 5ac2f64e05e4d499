#!/usr/bin/env bash
# On the GPU host after a build into build-gpu (scripts/gpu-decode.sh or gpu-check.sh): every
# selection policy through `lychee eval --audit` on CUDA (bf16) and on the CPU (float32), same
# prompts, then the two side by side: KV bytes per token and the mean dropped attention mass of
# each (policy, task), and their difference. On CUDA, dense and lychee are audited by the CUDA
# audit kernel; the other policies run their audited references. Logs go to $OUT (or
# /tmp/lychee-eval-audit).
#   EVAL_ARGS  overrides the prompts (default: passkey and multi-key at 4K, 10 samples each)
set -uo pipefail
out=${OUT:-/tmp/lychee-eval-audit}
mkdir -p "$out"
args=${EVAL_ARGS:---tasks passkey,multikey --context 4096 --samples 10}
for device in cuda cpu; do
  timeout 400 build-gpu/tools/lychee/lychee eval --device $device --audit \
    --policy dense,lychee,quest,double-p,prhs,streaming,tidal \
    --partition models/tiny-llama-retrieval/partitions/learned-target-0.25.json --budget 1024 \
    --corpus data/corpus/kjv-heldout.txt.gz $args --json "$out/eval-$device.json" >"$out/eval-$device.txt" 2>&1
  echo "eval on $device: exit $?"; grep -A20 '^policy' "$out/eval-$device.txt"
done
python3 - "$out/eval-cuda.json" "$out/eval-cpu.json" <<'PY'
import json, sys
cuda, cpu = ({(r["policy"], r["task"]): r for r in json.load(open(p))["results"]} for p in sys.argv[1:])
print(f"{'policy':10} {'task':9} {'acc cuda/cpu':>13} {'KV/token cuda':>14} {'mass cuda':>10} {'mass cpu':>9} {'|diff|':>7}")
worst = 0.0
for key, g in cuda.items():
    c = cpu.get(key)
    if c is None or "mean_dropped_mass" not in g or "mean_dropped_mass" not in c:
        print(key, "missing on one side"); continue
    diff = abs(g["mean_dropped_mass"] - c["mean_dropped_mass"])
    worst = max(worst, diff)
    print(f"{key[0]:10} {key[1]:9} {g['accuracy']:6.2f}/{c['accuracy']:<6.2f} "
          f"{g.get('kv_bytes_read_per_token', 0) / 1e6:11.2f} MB {g['mean_dropped_mass']:10.4f} "
          f"{c['mean_dropped_mass']:9.4f} {diff:7.4f}")
print(f"largest |cuda - cpu| mean dropped mass: {worst:.4f}")
PY
