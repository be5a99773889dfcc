#!/bin/bash
# Inputs: a built target/release/ember and images; PORT (default 8096),
# E2B_BENCH_N (5). Output: the SDK's figures on stdout.
# The e2b Python SDK (pinned, gateway/tests/e2b/sdk.sh) against a fresh
# `ember serve` with the default configuration: Sandbox.create() + the first
# command, pause, and connect() (resume) + a command, one sandbox at a time.
set -euo pipefail
PORT=${PORT:-8096}
tmp=$(mktemp -d)
./target/release/ember serve --listen 127.0.0.1:"$PORT" > "$tmp/log" 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 1 300); do grep -q "ready on" "$tmp/log" && break; sleep 1; done
grep -q "ready on" "$tmp/log" || { cat "$tmp/log"; exit 1; }
venv=$(gateway/tests/e2b/sdk.sh)
E2B_API_URL=http://127.0.0.1:$PORT E2B_SANDBOX_URL=http://127.0.0.1:$PORT \
  E2B_API_KEY=e2b_0000000000000000000000000000000000000000 \
  "$venv/bin/python" gateway/tests/e2b/bench.py
