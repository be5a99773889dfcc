#!/bin/bash
# Inputs: a built target/release/ember and images; N calls per round (30),
# ROUNDS (4), PORT_OPEN (8097), PORT_KEYED (8098).
# Output: figures on stdout, one line per server.
# What a key check costs a warm `true` call: two ember serves side by side,
# one open (no keys) and one with a key (every call sends it as a bearer
# token), called in alternating rounds (open, keyed, open, keyed, ...) of
# sequential calls 0.6 s apart, so every call finds a reset VM and both
# servers see the same machine. Prints each server's client latency
# p50/p95 and the gateway process's own CPU per call (utime + stime of
# `ember serve` from /proc; its QEMU children are not counted, the key check
# happens in the gateway).
set -euo pipefail
N=${N:-30}
ROUNDS=${ROUNDS:-4}
PORT_OPEN=${PORT_OPEN:-8097}
PORT_KEYED=${PORT_KEYED:-8098}
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
ember=./target/release/ember
printf '[pool]\nmin_size = 2\nmax_size = 2\ntarget_free = 2\n[images]\nbuild_on_start = false\n' > "$tmp/ember.toml"
key=$("$ember" keys create bench --keys-file "$tmp/keys.json")

start() { # name port keys-file
  mkdir -p "$tmp/$1"
  EMBER_KEYS=$3 EMBER_STATE_DIR="$tmp/$1/state" EMBER_SESSIONS_DIR="$tmp/$1/sessions" \
    "$ember" serve --config "$tmp/ember.toml" --listen 127.0.0.1:"$2" > "$tmp/$1.log" 2>&1 &
  pids+=($!)
}
start open "$PORT_OPEN" "$tmp/none.json"
start keyed "$PORT_KEYED" "$tmp/keys.json"
open_pid=${pids[0]} keyed_pid=${pids[1]}
for _ in $(seq 1 300); do
  grep -q "ready on" "$tmp/open.log" && grep -q "ready on" "$tmp/keyed.log" && break
  sleep 1
done
grep -q "ready on" "$tmp/keyed.log" || { cat "$tmp/open.log" "$tmp/keyed.log"; exit 1; }
# A keyed server without the key: refused.
code=$(curl -s -o /dev/null -w '%{http_code}' --json '{"cmd":"true"}' "http://127.0.0.1:$PORT_KEYED/v1/run")
[ "$code" = 401 ] || { echo "the keyed server answered $code without a key"; exit 1; }

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
round() { # port pid out-file [header]
  local before after
  before=$(ticks "$2")
  for _ in $(seq 1 "$N"); do
    curl -sS -o /dev/null -w '%{time_total}\n' ${4:+-H "$4"} --json '{"cmd":"true"}' "http://127.0.0.1:$1/v1/run" >> "$3"
    sleep 0.6
  done
  after=$(ticks "$2")
  echo $((after - before)) >> "$3.ticks"
}
for _ in $(seq 1 "$ROUNDS"); do
  round "$PORT_OPEN" "$open_pid" "$tmp/open.times"
  round "$PORT_KEYED" "$keyed_pid" "$tmp/keyed.times" "authorization: Bearer $key"
done
report() { # name file
  local cpu
  cpu=$(awk -v hz="$hz" -v n="$((N * ROUNDS))" '{t += $1} END {printf "%.2f", t * 1000 / hz / n}' "$2.ticks")
  sort -n "$2" | awk -v name="$1" -v cpu="$cpu" '{a[NR] = $1 * 1000}
    END {printf "%-6s n=%d p50=%.2f ms p95=%.2f ms max=%.2f ms, gateway CPU %s ms/call\n",
         name, NR, a[int(NR * 0.5)], a[int(NR * 0.95)], a[NR], cpu}'
}
report open "$tmp/open.times"
report keyed "$tmp/keyed.times"
