#!/bin/bash
# Inputs: $1 = a directory with package.json and package-lock.json (default:
# js/ beside this script, the e2b JS SDK, pinned); EMBER_CACHE (default
# /var/cache/ember).
# Output: prints a directory holding node_modules with those pins, made
# once per lock file (`npm ci`, keyed by its hash) and reused after. The
# E2B scripts run from it with `node --input-type=module` (imports resolve
# from there); the MCP tests run the Inspector's CLI from its bin.
# Needs node and npm, and the npm registry.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pkg=$(cd "${1:-$here/js}" && pwd)
cache=${EMBER_CACHE:-/var/cache/ember}
hash=$(cat "$pkg/package.json" "$pkg/package-lock.json" | sha256sum | cut -c1-16)
name=$(basename "$pkg")
[ "$name" = js ] && name=e2b-js || name=node-$name
dir="$cache/$name-$hash"
mkdir -p "$cache"
exec 9> "$cache/$name.lock"
flock 9
if [ ! -f "$dir/.complete" ]; then
  rm -rf "$dir" "$dir.tmp"
  mkdir -p "$dir.tmp"
  cp "$pkg/package.json" "$pkg/package-lock.json" "$dir.tmp/"
  (cd "$dir.tmp" && npm ci --no-audit --no-fund --silent >&2)
  touch "$dir.tmp/.complete"
  mv "$dir.tmp" "$dir"
fi
echo "$dir"
