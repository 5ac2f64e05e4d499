#!/usr/bin/env bash
# Checks the compose profile `replicas` once it runs (docker-compose.yml), from the project root:
#   docker compose --profile replicas up -d --scale inference-replica=3 balancer
#   scripts/compose-replicas-check.sh [--lychee PATH (build/tools/lychee/lychee)]
#                                     [--partition FILE] [--streams N (4)] [--tokens N (128)]
# The host reaches each replica at its address on the compose network (Linux: no published port
# needed). It prints what it measures:
#   1. rollout: FILE (default the bundled learned partition) published to the trainer, the seconds
#      until each replica serves it as its active version (shadow validation included);
#   2. a replica that dies: N gRPC and N HTTP streams of --tokens tokens through the balancer, then
#      the process of the replica with the most sequences active killed with SIGKILL from the host
#      (as a crash: compose's restart policy brings it back, which `docker kill` would not); which
#      streams broke, by replica (HTTP from x-lychee-replica, gRPC from HAProxy's log), and when
#      HAProxy marked it down;
#   3. new gRPC and HTTP requests through the balancer, and the seconds until the restarted replica
#      is up again in HAProxy.
# Exits 1 when a stream on a replica that lived broke, a rollout took over 10 minutes, a new
# request failed or the killed replica did not come back.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
lychee=build/tools/lychee/lychee partition=models/tiny-llama-retrieval/partitions/learned-target-0.25.json
streams=4 tokens=128
while [ $# -gt 0 ]; do
  case $1 in
    --lychee) lychee=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --streams) streams=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    *) usage ;;
  esac
done
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
compose+=(--profile replicas)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait; rm -rf "$work"' EXIT
failed=0
fail() { echo "FAIL: $*"; failed=1; }
now() { date +%s.%N; }
elapsed() { echo "$1 $2" | awk '{ printf "%.2f", $2 - $1 }'; }

# HAProxy's CSV statistics of a backend (grpc or http): "NAME ADDRESS STATUS SESSIONS" per server
# in use. The two backends fill their slots from DNS each in its own order, so a replica is known
# by its address.
servers() {
  curl -sf '127.0.0.1:8404/stats;csv' |
    awk -F, -v b="${1}_replicas" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "addr") a = i; next }
             $1 == b && $2 ~ /^replica/ && $18 !~ /^MAINT/ { sub(/:.*/, "", $a); print $2, $a, $18, $5 }'
}
# Waits until `condition` (a shell command) holds, up to $1 seconds; prints the seconds it took.
wait_for() {
  local limit=$1 start
  shift
  start=$(now)
  while ! "$@"; do
    [ "$(elapsed "$start" "$(now)" | cut -d. -f1)" -lt "$limit" ] || return 1
    sleep 0.1
  done
  elapsed "$start" "$(now)"
}

mapfile -t containers < <("${compose[@]}" ps -q inference-replica)
declare -A address_of container_of
for c in "${containers[@]}"; do
  address=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$c")
  address_of[$c]=$address
  container_of[$address]=$c
done
echo "replicas: ${#containers[@]} (${address_of[*]})"
all_up() { [ "$( (servers grpc; servers http) | awk '$3 == "UP"' | wc -l)" -eq $((2 * ${#containers[@]})) ]; }
wait_for 300 all_up >/dev/null || { echo "HAProxy does not count every replica up:"; servers grpc; servers http; exit 1; }
for backend in grpc http; do servers $backend | sed "s/^/  $backend /"; done

echo "== rollout"
published=$("$lychee" publish "$partition" --trainer 127.0.0.1:50061)
published_at=$(now)
version=$(sed -nE 's/.* as version ([0-9]+) .*/\1/p' <<<"$published")
echo "$published"
for c in "${containers[@]}"; do
  serves() { "$lychee" server-info --server "${address_of[$c]}:50062" 2>/dev/null | grep -q "^active partition: version $version "; }
  if wait_for 600 serves >/dev/null; then
    echo "  ${address_of[$c]}: version $version active $(elapsed "$published_at" "$(now)") s after the publication"
  else
    fail "${address_of[$c]} did not activate version $version within 10 minutes"
  fi
done

echo "== a replica that dies while $streams gRPC and $streams HTTP streams of $tokens tokens run"
since=$(date +%s)
prompt="The harbour was quiet when the ships came in, and"
for i in $(seq "$streams"); do
  "$lychee" generate --server 127.0.0.1:50060 --prompt "$prompt" --max-new-tokens "$tokens" \
    >"$work/grpc-$i.out" 2>"$work/grpc-$i.err" &
  grpc_pids[$i]=$!
  curl -sN -D "$work/http-$i.headers" 127.0.0.1:8000/v1/completions \
    -d "{\"prompt\": \"$prompt\", \"max_tokens\": $tokens, \"stream\": true}" >"$work/http-$i.out" &
  http_pids[$i]=$!
done
first_tokens() { [ "$(grep -l '^data: {' "$work"/http-*.out 2>/dev/null | wc -l)" -eq "$streams" ]; }
wait_for 120 first_tokens >/dev/null || fail "the HTTP streams sent no tokens within two minutes"
victim_address=$(for c in "${containers[@]}"; do
  "$lychee" server-info --server "${address_of[$c]}:50062" |
    sed -nE "s/^load: ([0-9]+) sequences active.*/\1 ${address_of[$c]}/p"
done | sort -rn | awk 'NR == 1 { print $2 }')
victim=$(servers grpc | awk -v a="$victim_address" '$2 == a { print $1 }')
victim_http=$(servers http | awk -v a="$victim_address" '$2 == a { print $1 }')
victim_container=${container_of[$victim_address]}
docker_pid=$(docker inspect -f '{{.State.Pid}}' "$victim_container")
kill -KILL "$docker_pid"
killed_at=$(now)
echo "  killed $victim_address (gRPC $victim, HTTP $victim_http; container ${victim_container:0:12}, pid $docker_pid)"
down() { servers grpc | awk -v n="$victim" '$1 == n && $3 ~ /^DOWN/ { found = 1 } END { exit !found }'; }
if wait_for 60 down >/dev/null; then
  echo "  HAProxy marked $victim down $(elapsed "$killed_at" "$(now)") s after the kill"
else
  fail "HAProxy did not mark $victim down within a minute"
fi
for i in $(seq "$streams"); do
  status=0
  wait "${http_pids[$i]}" || status=$?
  replica=$(sed -nE 's/^x-lychee-replica: *([^\r]*)\r?$/\1/ip' "$work/http-$i.headers")
  chunks=$(grep -c '^data: {' "$work/http-$i.out" || true)
  if grep -q '^data: \[DONE\]' "$work/http-$i.out"; then outcome=completed; else outcome="broke off (curl $status)"; fi
  echo "  HTTP stream $i on $replica: $chunks chunks, $outcome"
  [ "$replica" = "$victim_http" ] || [ "$outcome" = completed ] || fail "HTTP stream $i on $replica, which lived, broke off"
done
grpc_failed=0
for i in $(seq "$streams"); do
  status=0
  wait "${grpc_pids[$i]}" || status=$?
  if [ $status -eq 0 ]; then
    echo "  gRPC stream $i: completed, $(wc -c <"$work/grpc-$i.out") bytes"
  else
    grpc_failed=$((grpc_failed + 1))
    echo "  gRPC stream $i: failed after $(wc -c <"$work/grpc-$i.out") bytes: $(tail -1 "$work/grpc-$i.err")"
  fi
done
# HAProxy logs each gRPC stream as it ends, with the server that served it.
balancer=$("${compose[@]}" ps -q balancer)
on_victim=$(docker logs --since "$since" "$balancer" 2>&1 | grep '/Generate ' | grep -c " grpc_replicas/$victim " || true)
echo "  gRPC streams HAProxy logged on $victim: $on_victim; gRPC streams that failed: $grpc_failed"
[ "$grpc_failed" -eq "$on_victim" ] || fail "$grpc_failed gRPC streams failed, but $on_victim ran on $victim"

echo "== new requests through the balancer"
if "$lychee" generate --server 127.0.0.1:50060 --prompt "$prompt" --max-new-tokens 8 >/dev/null 2>"$work/after.err"; then
  echo "  gRPC: succeeded"
else
  fail "a new gRPC request failed: $(tail -1 "$work/after.err")"
fi
if curl -sf -D "$work/after.headers" 127.0.0.1:8000/v1/completions -d "{\"prompt\": \"$prompt\", \"max_tokens\": 8}" >/dev/null; then
  echo "  HTTP: succeeded on $(sed -nE 's/^x-lychee-replica: *([^\r]*)\r?$/\1/ip' "$work/after.headers")"
else
  fail "a new HTTP request failed"
fi
# The restarted container may come back at another address, in another of HAProxy's slots.
if wait_for 300 all_up >/dev/null; then
  echo "  the killed replica restarted by compose; every replica up in HAProxy again $(elapsed "$killed_at" "$(now)") s after the kill"
else
  fail "the killed replica was not up again within 5 minutes"
fi
exit $failed
