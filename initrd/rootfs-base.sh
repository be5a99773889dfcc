#!/usr/bin/env bash
# Debian minbase with python3 (full stdlib), busybox and systemd (for init_mode=full),
# trimmed, as a tarball. Slow (~1 min), so cached on its own.
# Inputs:  $1 = output dir
# Outputs: $1/base.tar
set -euo pipefail
out=$1
root=$(mktemp -d)
# Killed half-way, debootstrap leaves /proc mounted in the root: never
# descend into a mount, and unmount first.
trap 'umount -R "$root/proc" 2>/dev/null || true; rm -rf --one-file-system "$root"' EXIT
trap 'exit 143' INT TERM
debootstrap --variant=minbase --include=python3,busybox-static,systemd-sysv \
    bookworm "$root" >"$out/debootstrap.log" 2>&1 || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/* "$root"/var/log/*
tar -C "$root" --numeric-owner -cf "$out/base.tar" .
