#!/usr/bin/env bash
# Issue 23's cases, measured with oha against `ember serve` with the default
# configuration, in one run: readiness right after start, an image's first
# use, a burst of 2 x max_size into an idle pool, a sequential client,
# closed loops at c=4 and c=8 (`true`, a Python one-liner, a function), and
# overload (c=64 for 10 s, /healthz probed and 429s checked for Retry-After
# alongside). Prints one markdown table; docs/BENCHMARKS.md records it.
#
# Inputs:  target/release/ember, built images (EMBER_IMAGES), oha on PATH or
#          in ~/.cargo/bin; PORT (default 8090).
# Outputs: the table on stdout; the server's log and oha's JSON in $OUT
#          (default target/admission-bench).
set -euo pipefail

cd "$(dirname "$0")/.."
PORT=${PORT:-8090}
OUT=${OUT:-target/admission-bench}
URL=http://127.0.0.1:$PORT
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
mkdir -p "$OUT"

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

./target/release/ember serve --listen "127.0.0.1:$PORT" >"$OUT/serve.out" 2>"$OUT/serve.log" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
started=$(now)

# Readiness: /healthz as soon as it listens, /readyz once warm, a call then.
until curl -sf -o /dev/null "$URL/healthz"; do sleep 0.05; done
live=$(now)
warming=0
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/readyz")" = 200 ]; do
    warming=$((warming + 1))
    sleep 0.05
done
ready=$(now)
at_ready=$(curl -s -D "$OUT/ready.headers" --json '{"cmd":"true"}' "$URL/v1/run")
warm=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["warm"])' "$at_ready")
claim=$(grep -io 'claim;dur=[0-9.]*' "$OUT/ready.headers" | cut -d= -f2)

echo "| case | measured |"
echo "|---|---|"
echo "| right after start | /healthz 200 after $(secs "$started" "$live") s; /readyz 503 x $warming, 200 after $(secs "$started" "$ready") s; a call then: warm=$warm, claim ${claim} ms |"

# oha, closed loop (`spec` -n COUNT or -z DURATION, the 6th argument);
# prints "statuses; p50/p99 of the 200s".
load() {
    local name=$1 conc=$2 spec=$3 body=$4 path=${5:-/v1/run}
    "$OHA" "$spec" "$6" -c "$conc" --no-tui --stats-success-breakdown \
        --output-format json -m POST -H 'content-type: application/json' -d "$body" "$URL$path" >"$OUT/$name.json"
    python3 - "$OUT/$name.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
st = d["statusCodeDistribution"]
ok = d.get("latencyPercentilesSuccessful") or {}
p = lambda k: f"{ok[k] * 1000:.0f}" if ok.get(k) is not None else "-"
statuses = ", ".join(f"{n} x {c}" for c, n in sorted(st.items()))
print(f"{statuses}; 200s p50 {p('p50')} ms, p99 {p('p99')} ms")
EOF
}

echo "| burst of 20 (2 x max_size) into the idle ready pool | $(load burst 20 -n '{"cmd":"true"}' /v1/run 20) |"

first=$(now)
first_status=$(curl -s -o "$OUT/first-use.json" -w '%{http_code}' --json '{"cmd":"python3 -c \"import numpy; print(numpy.__version__)\"","image":"python-data"}' "$URL/v1/run")
echo "| first use of python-data on this fresh server | HTTP $first_status after $(secs "$first" "$(now)") s |"

echo "| one call at a time (c=1, 30 calls) | $(load seq 1 -n '{"cmd":"true"}' /v1/run 30) |"
python='{"lang":"python","code":"print(sum(range(1000)))"}'
stats='[{"price": 3, "kind": "tea"}, {"price": 5, "kind": "coffee"}]'
for c in 4 8; do
    echo "| closed loop c=$c, true, 20 s | $(load "true-c$c" "$c" -z '{"cmd":"true"}' /v1/run 20s) |"
    echo "| closed loop c=$c, Python one-liner, 20 s | $(load "python-c$c" "$c" -z "$python" /v1/run 20s) |"
    echo "| closed loop c=$c, json-stats function, 20 s | $(load "function-c$c" "$c" -z "$stats" /v1/functions/json-stats 20s) |"
done

# Overload: /healthz probed every 200 ms and 429s sampled for Retry-After
# while oha runs.
(
    end=$(( $(date +%s) + 11 ))
    while [ "$(date +%s)" -lt "$end" ]; do
        curl -s -o /dev/null -m 5 -w '%{http_code} %{time_total}\n' "$URL/healthz" || echo "000 5"
        sleep 0.2
    done
) >"$OUT/healthz.txt" &
probe=$!
(
    end=$(( $(date +%s) + 10 ))
    while [ "$(date +%s)" -lt "$end" ]; do
        # Four at a time: a lone sampler is usually queued and served, not refused.
        for _ in 1 2 3 4; do
            curl -s -D - -o /dev/null --json '{"cmd":"true"}' "$URL/v1/run" | tr -d '\r' | awk '
                /^HTTP/ { s = $2 } tolower($1) == "retry-after:" { r = 1 } END { print s, (r ? "retry-after" : "none") }' &
        done
        wait
    done
) >"$OUT/refusals.txt" &
sampler=$!
overload=$(load overload 64 -z '{"cmd":"true"}' /v1/run 10s)
wait "$probe" "$sampler"
hz_ok=$(grep -c '^200 ' "$OUT/healthz.txt" || true)
hz_all=$(wc -l <"$OUT/healthz.txt")
hz_max=$(sort -k2 -n "$OUT/healthz.txt" | tail -1 | awk '{printf "%.0f", $2 * 1000}')
refused=$(grep -c '^429 ' "$OUT/refusals.txt" || true)
without=$(grep -c '^429 none' "$OUT/refusals.txt" || true)
echo "| overload c=64, 10 s | $overload; /healthz $hz_ok of $hz_all 200 (slowest $hz_max ms); sampled 429s without Retry-After: $without of $refused |"
