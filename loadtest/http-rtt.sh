#!/bin/bash
# Inputs: a built target/release/ember and images; PORT (default 8099), N (40).
# Output: one line of figures on stdout.
# Sequential HTTP round trips of `true` against a fresh ember serve, with a
# pause between calls so every call finds a reset VM. Prints p50/p95 in ms.
set -euo pipefail
PORT=${PORT:-8099}
N=${N:-40}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
./target/release/ember serve --listen 127.0.0.1:"$PORT" > "$log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do grep -q "ready on" "$log" && break; sleep 1; done
for _ in $(seq 1 "$N"); do
  curl -sS -o /dev/null -w '%{time_total}\n' --json '{"cmd":"true"}' "http://127.0.0.1:$PORT/v1/run"
  sleep 0.6
done | sort -n | awk '{a[NR]=$1*1000} END {printf "n=%d p50=%.1f ms p95=%.1f ms max=%.1f ms\n", NR, a[int(NR*0.5)], a[int(NR*0.95)], a[NR]}'
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^ember_reset_seconds_(sum|count)" | tr '\n' ' '; echo
kill -INT "$pid"; wait "$pid" || true
