#!/usr/bin/env bash
# Canaries under load on the bundled model, from the project root (the README's rollout figures):
# a trainer and an inference service (shadow validation off, so that the bad partition gets stored
# at all: shadow validation would have rejected it at the door; the canary is what guards the
# operator's ActivatePartition of a stored version). The shipped learned partition is published
# and becomes active (version 1); then, stored while rollouts are held, a random partition of
# density 0.1 (version 2) and the learned one again (version 3). While bench/load_bench streams
# with 8 clients, three more clients send long held-out-text prompts (sparse heads at a budget of
# 256 tokens, so that they drop mass; load_bench's short prompts fit the budget and are not
# measured), and the operator starts a canary of version 2 at a fraction of 0.5: it must roll back
# by itself; then one of version 3: it must be promoted. Each is decided after 16 measured canary
# sequences (--canary-sequences; the default of 32 takes twice as long on a 2-core machine).
#   scripts/canary-demo.sh [BUILD_DIR (default build)]     (DEVICE=cuda: the model on the GPU)
# load_bench publishes to a trainer of its own (so that its publish changes nothing here) and
# checks after each round that the version it published is active, which stops holding once
# version 3 is promoted: the script stops it after that round and judges it by its errors column.
# The servers' logs go to $OUT/canary.log (or a temporary directory's); everything stops on exit.
set -euo pipefail
bin=${1:-build}
state=$(mktemp -d)
log=${OUT:-$state}/canary.log
lychee=$bin/tools/lychee/lychee
trap 'kill $(jobs -p) 2>/dev/null; wait; rm -rf "$state"' EXIT
trainer=127.0.0.1:50181
bench_trainer=127.0.0.1:50183
server=127.0.0.1:50182

"$bin/trainer/lychee-trainer" --listen $trainer --registry-dir "$state/registry" --threads 1 >"$log" 2>&1 &
"$bin/trainer/lychee-trainer" --listen $bench_trainer --registry-dir "$state/bench-registry" --threads 1 >>"$log" 2>&1 &
"$bin/inference/lychee-inference" --device "${DEVICE:-cpu}" --state-dir "$state/inference" --trainer $trainer --listen $server \
  --threads 1 --max-batch 16 --shadow-validation false --canary-sequences 16 >>"$log" 2>&1 &
inference_pid=$!
info() { timeout 10 "$lychee" server-info --server $server 2>/dev/null; }
await() {  # text that `lychee server-info` must print, within $2 seconds (default 30)
  local until=$((SECONDS + ${2:-30}))
  while ((SECONDS < until)); do
    kill -0 $inference_pid 2>/dev/null || { echo "lychee-inference stopped; its log:" >&2; cat "$log" >&2; return 1; }
    # Not grep -q: under pipefail, a writer cut off early would fail the pipeline.
    info | grep "$1" >/dev/null && return 0
    sleep 0.5
  done
  echo "the inference service never reported '$1'; the servers' log: $log" >&2
  return 1
}
step() { printf '\n== %s  (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

await "trainer $trainer: connected"
# The random partition of the README's shadow-validation run: the learned file with its one
# retrieval KV head outside layer 0 replaced by one drawn with Python's seed 2 (layer 3, head 1).
python3 -c 'import json, random, sys
d = json.load(open("models/tiny-llama-retrieval/partitions/learned-target-0.25.json"))
heads = [(l, h) for l in range(1, 6) for h in range(2)]; random.Random(2).shuffle(heads)
for l in range(1, 6): d["layers"][l]["kvHeads"] = ["HEAD_ROLE_SPARSE"] * 2
d["layers"][heads[0][0]]["kvHeads"][heads[0][1]] = "HEAD_ROLE_RETRIEVAL"; d.pop("metrics")
d["source"] = "random, density 0.1"; json.dump(d, open(sys.argv[1], "w"))' "$state/random-0.1.json"
step "version 1: the learned partition, active; versions 2 (random, density 0.1) and 3 (learned) stored"
"$lychee" publish models/tiny-llama-retrieval/partitions/learned-target-0.25.json --trainer $trainer
await "active partition: version 1 "
"$lychee" hold on --server $server >/dev/null
"$lychee" publish "$state/random-0.1.json" --trainer $trainer
"$lychee" publish models/tiny-llama-retrieval/partitions/learned-target-0.25.json --trainer $trainer
until "$lychee" partitions --server $server | grep 'holds 3 partition' >/dev/null; do sleep 0.5; done

# 16 prompts of about 1,150 tokens from different places of the held-out KJV text.
zcat data/corpus/kjv-heldout.txt.gz >"$state/kjv-heldout.txt"
for i in $(seq 0 15); do
  dd if="$state/kjv-heldout.txt" of="$state/long-$i.txt" bs=4400 skip=$((i * 9)) count=1 status=none
done
long_client() {  # $1: which client; sends long prompts until killed
  local i=$1
  while true; do
    "$lychee" generate --server $server --prompt-file "$state/long-$((i % 16)).txt" --max-new-tokens 8 \
      --budget 256 >/dev/null 2>>"$state/long-$1.err" || echo "long client $1: request failed" >&2
    i=$((i + 3))
  done
}

step "load_bench: 8 clients for 40 rounds of 20 s (no rollouts of its own)"
"$bin/bench/load_bench" --trainer $bench_trainer --inference $server --inference-pid $inference_pid --clients 8 \
  --rounds 40 --seconds 20 --rollout-every 100000 >"$state/load_bench.out" 2>&1 &
bench=$!
await "load: [1-9]" 60
long_client 0 &
long_a=$!
long_client 1 &
long_b=$!
long_client 2 &
long_c=$!

step "canary of version 2 (random, density 0.1) for half of the new sequences"
"$lychee" canary 2 --fraction 0.5 --server $server | grep -A3 '^canary'
await "canary of partition 2 (fraction 0.500): rolled_back" 600
info | grep -A3 '^canary'
step "canary of version 3 (learned) for half of the new sequences"
"$lychee" canary 3 --fraction 0.5 --server $server | grep -A3 '^canary'
await "canary of partition 3 (fraction 0.500): promoted" 600
info
kill $long_a $long_b $long_c
# load_bench checks after each round that the version it published to its own trainer is active;
# once version 3 is promoted that check fails (waiting 30 s each round), so the run is cut after
# the round in which the promotion happened and judged by its errors column.
step "load_bench, to the end of the round in which version 3 was promoted"
rounds=$(grep -c '^ *[0-9]' "$state/load_bench.out" || true)
until [ "$(grep -c '^ *[0-9]' "$state/load_bench.out" || true)" -gt "$rounds" ]; do sleep 1; done
kill $bench
wait $bench || true
cat "$state/load_bench.out"
awk '/^ *[0-9]+ +[0-9]/ { errors += $8 } END { print "load_bench errors: " errors; exit errors != 0 }' \
  "$state/load_bench.out"
