#!/bin/bash
# Inputs: a built target/release/ember and images; PORT (8095), N, ROUNDS.
# Output: figures on stdout (see loadtest/mcp-bench.py): an MCP `run` of
# `true` beside the same call over /v1/run, one fresh `ember serve`, same run.
set -euo pipefail
PORT=${PORT:-8095}
tmp=$(mktemp -d)
printf '[pool]\nmin_size = 2\nmax_size = 2\ntarget_free = 2\n[images]\nbuild_on_start = false\n' > "$tmp/ember.toml"
EMBER_KEYS="$tmp/none.json" EMBER_STATE_DIR="$tmp/state" EMBER_SESSIONS_DIR="$tmp/sessions" \
  ./target/release/ember serve --config "$tmp/ember.toml" --listen 127.0.0.1:"$PORT" > "$tmp/log" 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 1 300); do grep -q "ready on" "$tmp/log" && break; sleep 1; done
grep -q "ready on" "$tmp/log" || { cat "$tmp/log"; exit 1; }
venv=$(gateway/tests/e2b/sdk.sh "$PWD/gateway/tests/mcp/requirements.txt")
EMBER_URL=http://127.0.0.1:$PORT EMBER_PID=$pid "$venv/bin/python" loadtest/mcp-bench.py
