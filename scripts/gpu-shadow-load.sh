#!/usr/bin/env bash
# Shadow validation on the GPU host, after a build into build-gpu (scripts/gpu-decode.sh), from the
# project root. The bundled model served on $DEVICE (cuda) behind a trainer:
#   1. with validation on, a random partition of density 0.1 and the shipped learned one are
#      published; server-info shows what was rejected and what promoted, with the numbers;
#   2. load_bench (8 clients, 2 rounds of 15 s, a publish every 3 s, so that a validation runs
#      nearly all the time) against the service with validation on a low-priority stream, on a
#      stream of serving's priority (--shadow-low-priority-stream false), then off: p99 per-token
#      latency of live streams during validations.
# Logs to $OUT (or /tmp/lychee-shadow).
set -uo pipefail
bin=${BIN:-build-gpu}
device=${DEVICE:-cuda}
out=${OUT:-/tmp/lychee-shadow}
mkdir -p "$out"
lychee=$bin/tools/lychee/lychee
python3 - "$out/random-0.1.json" <<'PY'
import json, random, sys
d = json.load(open("models/tiny-llama-retrieval/partitions/learned-target-0.25.json"))
heads = [(l, h) for l in range(1, 6) for h in range(2)]; random.Random(2).shuffle(heads)
for l in range(1, 6): d["layers"][l]["kvHeads"] = ["HEAD_ROLE_SPARSE"] * 2
d["layers"][heads[0][0]]["kvHeads"][heads[0][1]] = "HEAD_ROLE_RETRIEVAL"; d.pop("metrics", None)
d["source"] = "random, density 0.1"; json.dump(d, open(sys.argv[1], "w"))
PY

run=0
for variant in low-priority same-priority off; do
  run=$((run + 1))
  validation=true; low_priority=true
  [ $variant = off ] && validation=false
  [ $variant = same-priority ] && low_priority=false
  state=$(mktemp -d)
  trainer_port=$((50170 + 2 * run)); inference_port=$((trainer_port + 1))
  "$bin/trainer/lychee-trainer" --listen 127.0.0.1:$trainer_port --registry-dir "$state/registry" \
    >"$out/trainer-$variant.log" 2>&1 &
  trainer_pid=$!
  "$bin/inference/lychee-inference" --device "$device" --state-dir "$state/inference" --trainer 127.0.0.1:$trainer_port \
    --listen 127.0.0.1:$inference_port --max-batch 16 --shadow-validation $validation --shadow-low-priority-stream $low_priority \
    >"$out/inference-$variant.log" 2>&1 &
  inference_pid=$!
  for _ in $(seq 240); do
    timeout 10 "$lychee" server-info --server 127.0.0.1:$inference_port 2>/dev/null | grep -q "connected" && break
    sleep 0.5
  done
  if [ $variant = low-priority ]; then
    "$lychee" publish "$out/random-0.1.json" --trainer 127.0.0.1:$trainer_port
    "$lychee" publish models/tiny-llama-retrieval/partitions/learned-target-0.25.json --trainer 127.0.0.1:$trainer_port
    for _ in $(seq 240); do
      timeout 10 "$lychee" server-info --server 127.0.0.1:$inference_port 2>/dev/null | grep -q "active partition: version 2 " && break
      sleep 0.5
    done
    "$lychee" server-info --server 127.0.0.1:$inference_port | tee "$out/server-info.txt" | grep -iE "partition|shadow"
  fi
  echo "load_bench with shadow validation $variant on $device:"
  timeout 200 "$bin/bench/load_bench" --trainer 127.0.0.1:$trainer_port --inference 127.0.0.1:$inference_port \
    --inference-pid $inference_pid --rounds 2 --seconds 15 --rss-tolerance-mib 1024 2>&1 | tee "$out/load-$variant.txt"
  grep -iE "shadow|validat|stream" "$out/inference-$variant.log" | tail -5
  kill $inference_pid $trainer_pid 2>/dev/null; wait $inference_pid $trainer_pid 2>/dev/null
  rm -rf "$state"
done
