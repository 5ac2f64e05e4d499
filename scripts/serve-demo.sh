#!/usr/bin/env bash
# The service pair on the bundled model, from the project root: a trainer and an inference service
# subscribed to it; the shipped learned partition published and rolled out; the demo prompt
# streamed through the inference service with dense and with hybrid attention; a 2-step calibration
# job whose partition rolls out while the service runs, then a rollback to the shipped one.
#   scripts/serve-demo.sh [BUILD_DIR (default build)] [DEVICE cpu|cuda (default cpu)]
# The servers' logs go to $OUT/serve.log (or a temporary directory's); both stop on exit.
set -euo pipefail
bin=${1:-build}
device=${2:-cpu}
state=$(mktemp -d)
log=${OUT:-$state}/serve.log
lychee=$bin/tools/lychee/lychee
trap 'kill $(jobs -p) 2>/dev/null; wait; rm -rf "$state"' EXIT

"$bin/trainer/lychee-trainer" --listen 127.0.0.1:50061 --registry-dir "$state/registry" >"$log" 2>&1 &
trainer=$!
# Shadow validation off: the demo's 2-step job shows the rollout path, not a trained partition, and
# validation would rightly reject it (the README's shadow-validation run shows that side).
"$bin/inference/lychee-inference" --device "$device" --state-dir "$state/inference" \
  --trainer 127.0.0.1:50061 --listen 127.0.0.1:50062 --shadow-validation false >>"$log" 2>&1 &
inference=$!
await() {  # text that `lychee server-info` must print
  for _ in $(seq 150); do
    # A server that cannot start (a port already taken, say) ends at once: say why.
    { kill -0 $trainer && kill -0 $inference; } 2>/dev/null || { echo "a server stopped; the servers' log:" >&2; cat "$log" >&2; return 1; }
    timeout 10 "$lychee" server-info 2>/dev/null | grep -q "$1" && return 0
    sleep 0.2
  done
  echo "the inference service never reported '$1'; the servers' log: $log" >&2
  return 1
}
step() { printf '\n== %s\n' "$*"; }

await "trainer 127.0.0.1:50061: connected"
step "publish the shipped learned partition; the inference service rolls it out"
"$lychee" publish models/tiny-llama-retrieval/partitions/learned-target-0.25.json
await "active partition: version 1 "
"$lychee" server-info
"$lychee" partition 1 --server 127.0.0.1:50062

step "the demo prompt through the inference service, dense"
"$lychee" generate --server 127.0.0.1:50062 --prompt-file scripts/demo-prompt.txt --max-new-tokens 16 --attention dense
step "the same, hybrid (partition 1): sparse heads attend to 256 of the 610 prompt tokens"
"$lychee" generate --server 127.0.0.1:50062 --prompt-file scripts/demo-prompt.txt --max-new-tokens 16 --budget 256

step "a 2-step calibration job (the path, not a trained partition); it rolls out as version 2"
job=$("$lychee" submit --target-density 0.25 --steps 2 --min-context 256 --max-context 512)
"$lychee" watch "$job"
await "active partition: version 2 "
"$lychee" partitions --server 127.0.0.1:50062
step "roll back to version 1"
"$lychee" rollback
