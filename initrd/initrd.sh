#!/usr/bin/env bash
# Build the initrd: busybox-static, the virtio/vsock modules and /init.
# Inputs:  $1 = output dir, $2 = kernel dir (from kernel.sh)
# Outputs: $1/initrd.img (gzip cpio)
set -euo pipefail
out=$1 kdir=$2
here=$(cd "$(dirname "$0")" && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,newroot,lib/modules}
install -m 0755 /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 0644 "$kdir"/modules/*.ko "$root/lib/modules/"
install -m 0755 "$here/overlay-initrd/init" "$root/init"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0 --reproducible) \
    | gzip -9 -n >"$out/initrd.img"
