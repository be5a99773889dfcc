#!/usr/bin/env bash
# Unpack the Debian cloud kernel and the modules the initrd needs (overlay
# for images with a writable root).
# Inputs:  $1 = output dir, $2 = kernel package name (linux-image-6.1.0-NN-cloud-amd64)
# Outputs: $1/vmlinuz, $1/modules/*.ko, $1/version
set -euo pipefail
out=$1 pkg=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# _apt must be able to write here, or apt warns about an unsandboxed download.
chmod 0777 "$work"
(cd "$work" && apt-get download -q "$pkg" >/dev/null) || { echo "cannot download $pkg" >&2; exit 1; }
dpkg-deb -x "$work"/*.deb "$work/x"
install -m 0644 "$work"/x/boot/vmlinuz-* "$out/vmlinuz"
mkdir -p "$out/modules"
find "$work/x/lib/modules" -name '*.ko' \( \
    -name 'virtio.ko' -o -name 'virtio_ring.ko' -o -name 'virtio_mmio.ko' -o -name 'virtio_blk.ko' \
    -o -name 'virtio_console.ko' -o -name 'vsock.ko' -o -name 'vmw_vsock_virtio_transport_common.ko' \
    -o -name 'vmw_vsock_virtio_transport.ko' -o -name 'failover.ko' -o -name 'net_failover.ko' \
    -o -name 'virtio_net.ko' -o -name 'overlay.ko' \) -exec install -m 0644 {} "$out/modules/" \;
[[ $(find "$out/modules" -name '*.ko' | wc -l) -eq 12 ]] || { echo "kernel $pkg lacks a needed module" >&2; exit 1; }
basename "$(ls "$work"/x/lib/modules)" >"$out/version"
