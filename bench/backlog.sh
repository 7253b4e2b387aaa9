#!/usr/bin/env bash
# Backlog: fill a queue with JOBS zero-work jobs, then let one taskworker drain it, sampling
# its resident memory. Shows that prefetch, not the backlog, bounds the worker's memory, and
# how fast it drains.
#
#   bench/backlog.sh [JOBS=1000000] [PREFETCH=200]
#
# Uses target/release binaries and the local RabbitMQ.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-1000000} prefetch=${2:-200}
bin=target/release
dir=$(mktemp -d /tmp/flagshed-backlog.XXXXXX)
queue="backlog.$$"
trap 'kill $(jobs -p) 2>/dev/null || true; rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT

cat >"$dir/flagshed.toml" <<TOML
[broker]
queue = "$queue"
durable = false
[worker]
concurrency = 4
prefetch = $prefetch
[queuer]
ttl_ms = 3600000
work_ms = 0
persistent = false
payload_bytes = 100
confirm_window = 2000
max_jobs = $jobs
[flags]
file = "$dir/flags.json"
[launchdarkly]
state_file = ""
[log]
stats_interval_ms = 1000
TOML
echo '{"flagValues": {"task-rate": 1000000, "skip-rate": 0}}' >"$dir/flags.json"

t0=$(date +%s.%N)
"$bin/taskqueuer" -c "$dir/flagshed.toml" 2>"$dir/queuer.log"
t1=$(date +%s.%N)
echo "filled: $(grep 'final role=queuer' "$dir/queuer.log" | sed 's/^.*final/final/')"
printf 'fill rate: %.0f jobs/s\n' "$(echo "$jobs / ($t1 - $t0)" | bc -l)"

"$bin/taskworker" -c "$dir/flagshed.toml" 2>"$dir/worker.log" &
worker=$!
t2=$(date +%s.%N)
printf '%8s %12s %10s\n' elapsed_s rss_kb received
while :; do
  received=$( (grep 'stats role=worker' "$dir/worker.log" || true) | tail -1 | tr ' ' '\n' | awk -F= '$1=="received"{print $2}')
  printf '%8.1f %12s %10s\n' "$(echo "$(date +%s.%N) - $t2" | bc -l)" \
    "$(awk '$1=="VmRSS:"{print $2}' /proc/$worker/status)" "${received:-0}"
  [ "${received:-0}" -ge "$jobs" ] && break
  sleep 5
done
t3=$(date +%s.%N)
hwm=$(awk '$1=="VmHWM:"{print $2}' /proc/$worker/status)
kill -TERM $worker; wait $worker || true
echo "worker: $(grep 'final role=worker' "$dir/worker.log" | sed 's/^.*final/final/')"
printf 'drained %d jobs in %.1f s: %.0f jobs/s; worker peak RSS %s kB\n' "$jobs" \
  "$(echo "$t3 - $t2" | bc -l)" "$(echo "$jobs / ($t3 - $t2)" | bc -l)" "$hwm"
