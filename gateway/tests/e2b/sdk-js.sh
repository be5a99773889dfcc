#!/bin/bash
# Inputs: js/package.json and js/package-lock.json beside this script (the
# e2b JS SDK, pinned); EMBER_CACHE (default /var/cache/ember).
# Output: prints a directory holding node_modules with that SDK, made once
# per lock file (`npm ci`, keyed by its hash) and reused after. Scripts run
# from it with `node --input-type=module` (imports resolve from there).
# Needs node and npm, and the npm registry.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${EMBER_CACHE:-/var/cache/ember}
hash=$(cat "$here/js/package.json" "$here/js/package-lock.json" | sha256sum | cut -c1-16)
dir="$cache/e2b-js-$hash"
mkdir -p "$cache"
exec 9> "$cache/e2b-js.lock"
flock 9
if [ ! -f "$dir/.complete" ]; then
  rm -rf "$dir" "$dir.tmp"
  mkdir -p "$dir.tmp"
  cp "$here/js/package.json" "$here/js/package-lock.json" "$dir.tmp/"
  (cd "$dir.tmp" && npm ci --no-audit --no-fund --silent >&2)
  touch "$dir.tmp/.complete"
  mv "$dir.tmp" "$dir"
fi
echo "$dir"
