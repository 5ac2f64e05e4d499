#!/usr/bin/env bash
# The README's sweep on the bundled model with the trainer on $DEVICE (cuda), after a build into
# build-gpu (scripts/gpu-decode.sh), from the project root: the per-target training and validation
# seconds of the table on the GPU. Logs to $OUT (or /tmp/lychee-sweep).
set -uo pipefail
bin=${BIN:-build-gpu}
out=${OUT:-/tmp/lychee-sweep}
mkdir -p "$out"
state=$(mktemp -d)
"$bin/trainer/lychee-trainer" --registry-dir "$state/registry" --listen 127.0.0.1:50191 --device "${DEVICE:-cuda}" \
  >"$out/trainer.log" 2>&1 &
trainer=$!
sleep 2
start=$(date +%s)
"$bin/tools/lychee/lychee" submit --trainer 127.0.0.1:50191 --target-densities 0.05,0.1,0.2,0.3 --steps 40 \
  --learning-rate 0.05 --min-context 256 --max-context 384 --passkeys 2 --budget 128 --block-size 16 --sink 16 \
  --recent 32 --sparse-sink 16 --sparse-recent 32 --validation-context 1024 --validation-samples 20
timeout "${SWEEP_TIMEOUT:-400}" "$bin/tools/lychee/lychee" watch jobs/1 --trainer 127.0.0.1:50191 | tail -12
echo "sweep: $(( $(date +%s) - start )) s from submit to the end of watch"
kill $trainer; wait $trainer 2>/dev/null
rm -rf "$state"
