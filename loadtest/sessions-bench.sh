#!/bin/bash
# Inputs: a built target/release/ember and images; PORT (default 8098),
# ROUNDS (pause/resume rounds, 5), MB (transfer size in MiB, 100).
# Output: figures on stdout (docs/BENCHMARKS.md, "Sandboxes").
# Against a fresh `ember serve` (its own state and sessions directories):
# a session with a counting background process is paused and resumed ROUNDS
# times over HTTP, each timed, and checked to have kept counting; forked ROUNDS
# times (each fork timed, checked and deleted); then MB MiB
# are uploaded and downloaded through the files API and compared by sha256,
# and downloaded again through the port proxy from python's http.server.
set -euo pipefail
PORT=${PORT:-8098}
ROUNDS=${ROUNDS:-5}
MB=${MB:-100}
work=$(mktemp -d)
# QEMU drops to an unprivileged user: it must reach its files in here.
chmod 755 "$work"
trap 'kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
url=http://127.0.0.1:$PORT
EMBER_STATE_DIR=$work/state EMBER_SESSIONS_DIR=$work/sessions \
  ./target/release/ember serve --listen 127.0.0.1:"$PORT" > "$work/log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do grep -q "ready on" "$work/log" && break; sleep 1; done
grep -q "ready on" "$work/log" || { tail -20 "$work/log"; exit 1; }

ms() { awk -v t="$1" 'BEGIN { printf "%.0f", t * 1000 }'; }
curl -sSf --json '{"key": "bench"}' "$url/v1/sessions" > /dev/null
curl -sSf --json '{"cmd": "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done"}' \
  "$url/v1/sessions/bench/processes" > /dev/null
count() { curl -sSf -H 'x-ember-session: bench' --json '{"cmd": "cat /tmp/count"}' "$url/v1/run" | jq -r .stdout; }
pauses=() resumes=()
for _ in $(seq 1 "$ROUNDS"); do
  sleep 0.5
  before=$(count)
  pauses+=("$(ms "$(curl -sSf -o /dev/null -w '%{time_total}' -X POST "$url/v1/sessions/bench/pause")")")
  resumes+=("$(ms "$(curl -sSf -o /dev/null -w '%{time_total}' -X POST "$url/v1/sessions/bench/resume")")")
  sleep 0.5
  after=$(count)
  [ "$after" -gt "$before" ] || { echo "the counter did not carry on: $before -> $after"; exit 1; }
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "pause ms: ${pauses[*]} (median $(median "${pauses[@]}")); resume ms: ${resumes[*]} (median $(median "${resumes[@]}"))"
# Forks of the running session: each timed to its 201 (the parent saved, the
# child resumed), checked to count on from where the parent was, then deleted.
forks=()
for i in $(seq 1 "$ROUNDS"); do
  out=$(curl -sSf -w ' %{time_total}' --json "{\"key\": \"fork-$i\"}" "$url/v1/sessions/bench/fork")
  state=$(jq -r .state <<< "${out% *}")
  [ "$state" = running ] || { echo "fork $i is $state, not running (no room?)"; exit 1; }
  forks+=("$(ms "${out##* }")")
  child=$(curl -sSf -H "x-ember-session: fork-$i" --json '{"cmd": "cat /tmp/count"}' "$url/v1/run" | jq -r .stdout)
  [ "$child" -gt 0 ] || { echo "fork $i has no counter"; exit 1; }
  curl -sSf -o /dev/null -X DELETE "$url/v1/sessions/fork-$i"
done
echo "fork ms (save + resume of the child): ${forks[*]} (median $(median "${forks[@]}"))"
curl -sSf -o /dev/null -X POST "$url/v1/sessions/bench/pause"
echo "a paused session on disk: $(du -sm "$work/sessions" | cut -f1) MB"
curl -sSf -o /dev/null -X POST "$url/v1/sessions/bench/resume"

head -c "$((MB << 20))" /dev/urandom > "$work/up"
up=$(curl -sSf -o /dev/null -w '%{time_total}' -X PUT --data-binary @"$work/up" "$url/v1/sessions/bench/files/big")
down=$(curl -sSf -o "$work/down" -w '%{time_total}' "$url/v1/sessions/bench/files/big")
[ "$(sha256sum < "$work/up")" = "$(sha256sum < "$work/down")" ] || { echo "the download differs"; exit 1; }
awk -v mb="$MB" -v u="$up" -v d="$down" \
  'BEGIN { printf "files: %d MiB upload %.1f MB/s (%.1f s), download %.1f MB/s (%.1f s), sha256 equal\n", mb, mb*1.048576/u, u, mb*1.048576/d, d }'
# The same file through the port proxy, from python's http.server in the guest.
curl -sSf --json '{"argv": ["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"]}' \
  "$url/v1/sessions/bench/processes" > /dev/null
curl -sf --retry 20 --retry-delay 1 -o /dev/null "$url/v1/sessions/bench/ports/8000/"
proxied=$(curl -sSf -o "$work/proxied" -w '%{time_total}' "$url/v1/sessions/bench/ports/8000/big")
cmp -s "$work/up" "$work/proxied" || { echo "the proxied download differs"; exit 1; }
awk -v mb="$MB" -v t="$proxied" \
  'BEGIN { printf "port proxy: %d MiB download %.1f MB/s (%.1f s), identical\n", mb, mb*1.048576/t, t }'
curl -sSf -X DELETE "$url/v1/sessions/bench"
