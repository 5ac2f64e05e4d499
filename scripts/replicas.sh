#!/usr/bin/env bash
# Inference replicas behind HAProxy on the loopback, from the project root: one lychee-trainer, N
# lychee-inference replicas of the bundled model that follow it (each with its own state
# directory, gRPC and HTTP on free ports), and HAProxy in front with a configuration that
# scripts/haproxy-config.sh writes (health checks and balancing are explained there).
#   scripts/replicas.sh [--replicas N (2)] [--build DIR (build)] [--dir DIR (a temporary one)]
#                       [--trainer-port P (50061)] [--grpc-port P (50060)] [--http-port P (8000)]
#                       [--stats-port P (8404)] [--threads T (1)] [-- FLAGS for every replica]
# Then, from another shell:
#   build/tools/lychee/lychee publish models/tiny-llama-retrieval/partitions/learned-target-0.25.json
#   build/tools/lychee/lychee generate --server 127.0.0.1:50060 --prompt "The harbour was"
#   curl -s 127.0.0.1:8000/v1/completions -d '{"prompt": "The harbour was", "max_tokens": 8}'
#   curl -s '127.0.0.1:8404/stats;csv'         # HAProxy's view of the replicas
# It prints "replicas: ready" once HAProxy counts every replica up, and lists the processes in
# DIR/processes.txt (NAME PID GRPC_PORT HTTP_PORT; the trainer's HTTP port is "-"). Logs are
# DIR/*.log. It runs until SIGINT or SIGTERM, then stops every process it started; a replica that
# dies meanwhile is not restarted (an orchestrator's job: compose's restart policy, Kubernetes').
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
replicas=2 bin=build dir="" trainer_port=50061 grpc_port=50060 http_port=8000 stats_port=8404 threads=1
while [ $# -gt 0 ]; do
  case $1 in
    --replicas) replicas=$2; shift 2 ;;
    --build) bin=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --trainer-port) trainer_port=$2; shift 2 ;;
    --grpc-port) grpc_port=$2; shift 2 ;;
    --http-port) http_port=$2; shift 2 ;;
    --stats-port) stats_port=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
replica_flags=("$@")
[[ $replicas =~ ^[1-9][0-9]*$ ]] || { echo "replicas.sh: --replicas must be a positive number" >&2; exit 2; }
command -v haproxy >/dev/null || { echo "replicas.sh: haproxy is not installed (apt-get install haproxy)" >&2; exit 1; }
made_dir=""
if [ -z "$dir" ]; then
  dir=$(mktemp -d)
  made_dir=1
fi
mkdir -p "$dir"
# Children are stopped on any exit; a signal ends the final wait, and the script with it.
trap 'kill $(jobs -p) 2>/dev/null; wait; [ -z "$made_dir" ] || rm -rf "$dir"' EXIT
trap 'exit 0' INT TERM
processes=$dir/processes.txt
echo "# NAME PID GRPC_PORT HTTP_PORT" >"$processes"

# The port that `pattern` (a regular expression with one group) finds in a process's log, once
# the process has printed it; fails when the process ends first.
port_in_log() {  # pid log pattern
  for _ in $(seq 1200); do
    kill -0 "$1" 2>/dev/null || { echo "replicas.sh: a server stopped; its log ($2):" >&2; cat "$2" >&2; return 1; }
    if port=$(sed -nE "s/.*$3.*/\1/p" "$2" | head -1) && [ -n "$port" ]; then
      echo "$port"
      return 0
    fi
    sleep 0.1
  done
  echo "replicas.sh: no port in $2 after two minutes" >&2
  return 1
}

"$bin/trainer/lychee-trainer" --listen "127.0.0.1:$trainer_port" --registry-dir "$dir/registry" \
  --threads "$threads" >"$dir/trainer.log" 2>&1 &
trainer_pid=$!
trainer_port=$(port_in_log $trainer_pid "$dir/trainer.log" 'TrainerService on port ([0-9]+)')
echo "trainer $trainer_pid $trainer_port -" >>"$processes"

servers=()
for i in $(seq "$replicas"); do
  log=$dir/replica-$i.log
  "$bin/inference/lychee-inference" --state-dir "$dir/replica-$i" --trainer "127.0.0.1:$trainer_port" \
    --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --threads "$threads" "${replica_flags[@]}" >"$log" 2>&1 &
  pids[$i]=$!
done
for i in $(seq "$replicas"); do
  log=$dir/replica-$i.log
  replica_grpc=$(port_in_log "${pids[$i]}" "$log" 'InferenceService on port ([0-9]+)')
  replica_http=$(port_in_log "${pids[$i]}" "$log" 'HTTP API on port ([0-9]+)')
  echo "replica-$i ${pids[$i]} $replica_grpc $replica_http" >>"$processes"
  servers+=("replica-$i=127.0.0.1:$replica_grpc:$replica_http")
done

"$(dirname "$0")/haproxy-config.sh" --grpc-bind "127.0.0.1:$grpc_port" --http-bind "127.0.0.1:$http_port" \
  --stats-bind "127.0.0.1:$stats_port" "${servers[@]}" >"$dir/haproxy.cfg"
haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
haproxy_pid=$!
echo "balancer $haproxy_pid $grpc_port $http_port" >>"$processes"

# HAProxy's CSV statistics: rows of backend servers, the 18th column their status.
stats_csv() {
  exec 3<>"/dev/tcp/127.0.0.1/$stats_port" || return 1
  printf 'GET /stats;csv HTTP/1.0\r\n\r\n' >&3
  cat <&3
  exec 3<&-
}
# Two minutes: replicas that have printed their ports may still be loading the model.
deadline=$((SECONDS + 120))
while :; do
  kill -0 $haproxy_pid 2>/dev/null || { echo "replicas.sh: haproxy stopped; its log:" >&2; cat "$dir/haproxy.log" >&2; exit 1; }
  up=$(stats_csv 2>/dev/null | awk -F, '$1 ~ /_replicas$/ && $2 ~ /^replica-/ && $18 == "UP"' | wc -l) || up=0
  [ "$up" -eq $((2 * replicas)) ] && break
  [ $SECONDS -lt $deadline ] || { echo "replicas.sh: HAProxy did not count every replica up within two minutes; see $dir" >&2; exit 1; }
  sleep 0.1
done
echo "replicas: ready: $replicas replicas of trainer 127.0.0.1:$trainer_port; gRPC on 127.0.0.1:$grpc_port," \
  "HTTP on 127.0.0.1:$http_port, HAProxy statistics on http://127.0.0.1:$stats_port/stats; processes in $processes"
wait
