# Shared helpers for the image scripts. Sourced, not run.
# shellcheck shell=bash

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }

# Hash of files and directories (paths and contents), plus extra strings.
# usage: input_hash FILE_OR_DIR... -- STRING...
input_hash() {
    local paths=() extra=()
    while (($#)); do
        if [[ $1 == -- ]]; then shift; extra=("$@"); break; fi
        paths+=("$1"); shift
    done
    # Paths are hashed relative to the repository, so every clone of it
    # (CI's among them) finds the images another clone built.
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
    {
        find "${paths[@]}" -type f -print0 | LC_ALL=C sort -z | while IFS= read -r -d '' f; do
            f=$(realpath -m "$f")
            printf '%s\n' "${f#"$root"/}"
            sha256sum <"$f"
            # Mode matters for scripts that end up in an image.
            stat -c '%a' "$f"
        done
        printf '%s\n' "${extra[@]}"
    } | sha256sum | cut -c1-16
}

# Build into a temp dir beside the destination and rename it into place, so
# an interrupted build never leaves a half-made cache entry.
# usage: cache_build DEST SCRIPT ARGS...   (runs SCRIPT TEMP_DIR ARGS...)
cache_build() {
    local dest=$1 script=$2; shift 2
    if [[ -e $dest/.complete ]]; then
        return 0
    fi
    local tmp
    tmp=$(mktemp -d "${dest}.tmp.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    "$script" "$tmp" "$@"
    touch "$tmp/.complete"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    trap - EXIT
}
