#!/usr/bin/env bash
# A load run of the service pair on one model, from the project root: a trainer and an inference
# service following it; a partition with one retrieval head per layer (KV head 0; layer 0 dense) is
# published and rolled out; then, for dense and for hybrid attention, CLIENTS concurrent streams
# each send a different PROMPT_TOKENS-token prompt (held-out text) for NEW_TOKENS tokens. Prints per
# attention the wall time, the tokens/s over the whole run (prefill included) and while decoding
# (streams over the mean per-token latency), and how many such sequences the KV pool holds with pages
# taken as they grow against a reservation of prompt + --max-new-tokens at admission.
#   BIN (default build-gpu), DEVICE (cuda), MODEL (default $TMPDIR/random-llama3-8b, written by
#   scripts/gpu-decode.sh; the bundled tokenizer is copied beside it when it has none), CLIENTS (8),
#   PROMPT_TOKENS (32768), NEW_TOKENS (128), BUDGET (4096), RESERVED_NEW_TOKENS (4096: what clients
#   typically ask for), INFERENCE_FLAGS (extra flags of lychee-inference; on CUDA by default
#   --kv-cache-fraction 0.85), ATTENTIONS (which halves run, in order; default "dense hybrid").
# Shadow validation is off: the partition is made up for a model of random weights.
# Logs to $OUT (or a temporary directory); both servers stop on exit.
set -euo pipefail
bin=${BIN:-build-gpu}
device=${DEVICE:-cuda}
model=${MODEL:-${TMPDIR:-/tmp}/random-llama3-8b}
clients=${CLIENTS:-8}
prompt_tokens=${PROMPT_TOKENS:-32768}
new_tokens=${NEW_TOKENS:-128}
budget=${BUDGET:-4096}
reserved_new_tokens=${RESERVED_NEW_TOKENS:-4096}
state=$(mktemp -d)
out=${OUT:-$state}
mkdir -p "$out"
log=$out/serve-load.log
lychee=$bin/tools/lychee/lychee
trap 'kill $(jobs -p) 2>/dev/null; wait; rm -rf "$state"' EXIT

[ -f "$model/tokenizer.json" ] || cp models/tiny-llama-retrieval/tokenizer.json "$model/"

# Prompts: slices of held-out text cut to PROMPT_TOKENS tokens of the model's tokenizer.
zcat data/corpus/kjv-heldout.txt.gz >"$state/corpus.txt"
tokens_of() { "$lychee" tokenize --tokenizer "$model/tokenizer.json" <"$1" | wc -w; }
head -c 200000 "$state/corpus.txt" >"$state/sample.txt"
chars_per_token=$(python3 -c "print(200000 / $(tokens_of "$state/sample.txt"))")
corpus_chars=$(wc -c <"$state/corpus.txt")
for i in $(seq "$clients"); do
  chars=$(python3 -c "print(int($prompt_tokens * $chars_per_token * 0.98))")
  offset=$(( (i - 1) * corpus_chars / clients / 2 ))
  python3 -c "import sys; sys.stdout.write(open(sys.argv[1], 'rb').read()[$offset:$offset + $chars].decode('utf-8', 'ignore'))" \
    "$state/corpus.txt" >"$state/prompt-$i.txt"
done
echo "prompts: $clients of $(tokens_of "$state/prompt-1.txt") tokens (the first)"

python3 - "$model/config.json" "$budget" >"$state/partition.json" <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))
layers, heads = config["num_hidden_layers"], config["num_key_value_heads"]
roles = lambda layer: ["HEAD_ROLE_RETRIEVAL" if layer == 0 or head == 0 else "HEAD_ROLE_SPARSE" for head in range(heads)]
print(json.dumps({"numLayers": layers, "numKvHeads": heads, "layers": [{"kvHeads": roles(l)} for l in range(layers)],
                  "blockSize": 64, "tokenBudget": int(sys.argv[2]), "sinkTokens": 64, "recentTokens": 64,
                  "source": "load run: KV head 0 of every layer a retrieval head, the others sparse (layer 0 dense)"}))
EOF

"$bin/trainer/lychee-trainer" --listen 127.0.0.1:50061 --registry-dir "$state/registry" \
  --model-root "$(dirname "$model")" >"$log" 2>&1 &
"$bin/inference/lychee-inference" --model "$model" --device "$device" --state-dir "$state/inference" \
  --trainer 127.0.0.1:50061 --listen 127.0.0.1:50062 --max-batch "$clients" --max-new-tokens "$reserved_new_tokens" \
  --shadow-validation false ${INFERENCE_FLAGS:-$([ "$device" = cuda ] && echo --kv-cache-fraction 0.85)} >>"$log" 2>&1 &
await() {  # text that `lychee server-info` must print
  for _ in $(seq 600); do
    timeout 10 "$lychee" server-info 2>/dev/null | grep -q "$1" && return 0
    sleep 0.5
  done
  echo "the inference service never reported '$1'; its log:" >&2
  tail -20 "$log" >&2
  return 1
}
await "trainer 127.0.0.1:50061: connected"
"$lychee" publish "$state/partition.json" --model "$(basename "$model")"
await "active partition: version 1 "
"$lychee" server-info | tee "$out/server-info.txt"

for attention in ${ATTENTIONS:-dense hybrid}; do
  start=$(date +%s.%N)
  for i in $(seq "$clients"); do
    "$lychee" generate --server 127.0.0.1:50062 --prompt-file "$state/prompt-$i.txt" --max-new-tokens "$new_tokens" \
      --attention "$attention" --timeout 1200 >/dev/null 2>"$state/$attention-$i.txt" &
  done
  wait $(jobs -p | tail -n "$clients") || { echo "a $attention stream failed:"; cat "$state/$attention"-*.txt; exit 1; }
  end=$(date +%s.%N)
  cat "$state/$attention"-*.txt >"$out/streams-$attention.txt"
  python3 - "$attention" "$start" "$end" "$out/streams-$attention.txt" <<'EOF'
import re, sys
attention, start, end, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
runs = re.findall(r"\[(\d+) tokens after (\d+) prompt tokens; first token ([\d.]+) ms, then ([\d.]+) ms/token", open(path).read())
tokens = sum(int(r[0]) for r in runs)
latency = sum(float(r[3]) for r in runs) / len(runs)
first = max(float(r[2]) for r in runs)
print(f"{attention}: {len(runs)} streams of {runs[0][1]} prompt tokens, {tokens} tokens in {end - start:.1f} s "
      f"({tokens / (end - start):.1f} tokens/s with prefill); last first token after {first / 1e3:.1f} s; "
      f"then {latency:.2f} ms/token per stream, {len(runs) * 1e3 / latency:.0f} tokens/s decoding together")
EOF
done

python3 - "$out/server-info.txt" "$prompt_tokens" "$new_tokens" "$reserved_new_tokens" <<'EOF'
import math, re, sys
pages = int(re.search(r"of (\d+) pages\)", open(sys.argv[1]).read()).group(1))
prompt, new, reserved = (int(x) for x in sys.argv[2:5])
grown = math.ceil((prompt + new) / 64)
whole = math.ceil((prompt + reserved) / 64)
print(f"KV pool of {pages} pages of 64 positions: {pages // grown} sequences of {prompt} + {new} tokens fit with pages "
      f"taken as they grow; {pages // whole} with prompt + max_new_tokens ({reserved}) reserved at admission")
EOF
