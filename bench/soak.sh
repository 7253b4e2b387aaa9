#!/usr/bin/env bash
# Soak: taskqueuer and taskworker at a steady load for a while, sampling each daemon's
# resident memory and thread count, to show that neither grows.
#
#   bench/soak.sh [SECONDS=3600] [RATE=500] [SAMPLE_EVERY=60]
#
# Uses target/release binaries and the local RabbitMQ (scripts/ensure-rabbitmq). Prints one
# row per sample and the final ledger lines; exits non-zero if a ledger does not balance or
# the thread count changed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3600} rate=${2:-500} every=${3:-60}
bin=target/release
dir=$(mktemp -d /tmp/flagshed-soak.XXXXXX)
queue="soak.$$"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT

cat >"$dir/flagshed.toml" <<TOML
[broker]
queue = "$queue"
durable = false
[worker]
concurrency = 4
prefetch = 64
[queuer]
ttl_ms = 5000
work_ms = 2
[flags]
file = "$dir/flags.json"
[launchdarkly]
state_file = ""
[log]
stats_interval_ms = 10000
TOML
echo "{\"flagValues\": {\"task-rate\": $rate, \"skip-rate\": 5}}" >"$dir/flags.json"

"$bin/taskworker" -c "$dir/flagshed.toml" 2>"$dir/worker.log" &
worker=$!
sleep 1
"$bin/taskqueuer" -c "$dir/flagshed.toml" 2>"$dir/queuer.log" &
queuer=$!

field() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
stat() { (grep 'stats role=' "$1" || true) | tail -1 | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k { print $2 }'; }

printf '%8s %12s %8s %12s %8s %10s %10s\n' elapsed_s worker_rss_kb threads queuer_rss_kb threads received published
start=$(date +%s)
first_threads_w="" first_threads_q=""
while :; do
  now=$(( $(date +%s) - start ))
  tw=$(field $worker Threads) tq=$(field $queuer Threads)
  : "${first_threads_w:=$tw}" "${first_threads_q:=$tq}"
  printf '%8d %12s %8s %12s %8s %10s %10s\n' "$now" "$(field $worker VmRSS)" "$tw" \
    "$(field $queuer VmRSS)" "$tq" "$(stat "$dir/worker.log" received)" "$(stat "$dir/queuer.log" published)"
  [ "$now" -ge "$secs" ] && break
  sleep "$every"
done

echo "peak RSS: worker $(field $worker VmHWM) kB, queuer $(field $queuer VmHWM) kB"
kill -TERM $queuer; wait $queuer || true
sleep 2
kill -TERM $worker; wait $worker || true
grep 'final role=' "$dir/queuer.log" "$dir/worker.log" | sed 's/^.*final/final/'
status=0
grep -q 'final role=worker.*balanced=true' "$dir/worker.log" || { echo "worker ledger does not balance"; status=1; }
[ "$tw" = "$first_threads_w" ] || { echo "worker threads went from $first_threads_w to $tw"; status=1; }
[ "$tq" = "$first_threads_q" ] || { echo "queuer threads went from $first_threads_q to $tq"; status=1; }
exit $status
