#!/bin/bash
# Inputs: a pinned requirements file (default requirements.txt beside this
# script); EMBER_CACHE (default /var/cache/ember).
# Output: prints the directory of a Python venv holding those pins, made
# once per pin set (keyed by a hash of the file) and reused after; the E2B
# end-to-end tests run the real SDKs with its bin/python. Needs python3
# with venv and pip, and PyPI. A venv is made under a temporary name and
# renamed when whole (only bin/python is used, which survives the move).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${EMBER_CACHE:-/var/cache/ember}
req=${1:-$here/requirements.txt}
hash=$(sha256sum "$req" | cut -c1-16)
venv="$cache/e2b-sdk-$hash"
mkdir -p "$cache"
exec 9> "$cache/e2b-sdk.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv" "$venv.tmp"
  python3 -m venv "$venv.tmp" >&2
  "$venv.tmp/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q -r "$req" >&2
  touch "$venv.tmp/.complete"
  mv "$venv.tmp" "$venv"
fi
echo "$venv"
