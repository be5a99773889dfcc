#!/usr/bin/env bash
# Build (or reuse from the cache) what every guest image shares, and link it
# into EMBER_IMAGES for ember to find: the kernel, the initrd, the
# debootstrap base every recipe adds to, and the agent. Each is cached
# outside the clone in a directory named after a hash of its inputs, so it
# is rebuilt only when an input changes. The images themselves (one per
# recipe) are built by `ember images build` (initrd/image.sh).
# Inputs:  $1 = the static ember-agent binary
#          EMBER_CACHE (default /var/cache/ember), EMBER_IMAGES (default target/images)
# Outputs: $EMBER_IMAGES/{vmlinuz,initrd.img,base.tar,ember-agent,manifest}
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=initrd/lib.sh
source "$here/lib.sh"
agent=${1:?usage: images.sh AGENT_BINARY}
[[ -x $agent ]] || die "agent binary $agent not found; build it first (make images does)"
cache=${EMBER_CACHE:-/var/cache/ember}
out=${EMBER_IMAGES:-$here/../target/images}
mkdir -p "$cache/images" "$out"

# The kernel: whatever linux-image-cloud-amd64 currently depends on.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [[ -z $kpkg ]]; then
    # No package lists (offline): reuse the newest cached kernel.
    kdir=$(ls -dt "$cache"/images/kernel-*/ 2>/dev/null | head -1)
    [[ -n $kdir ]] || die "cannot resolve the kernel package (run apt-get update) and none is cached"
    kdir=${kdir%/}
else
    kdir=$cache/images/kernel-$(input_hash "$here/kernel.sh" -- "$kpkg")
    [[ -e $kdir/.complete ]] || log "kernel: $kpkg"
    cache_build "$kdir" "$here/kernel.sh" "$kpkg"
fi

bbver=$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null || echo unknown)
idir=$cache/images/initrd-$(input_hash "$here/initrd.sh" "$here/overlay-initrd" -- "$(cat "$kdir/version")" "$bbver")
[[ -e $idir/.complete ]] || log "initrd"
cache_build "$idir" "$here/initrd.sh" "$kdir"

bdir=$cache/images/base-$(input_hash "$here/rootfs-base.sh")
[[ -e $bdir/.complete ]] || log "root filesystem base (debootstrap, about a minute)"
cache_build "$bdir" "$here/rootfs-base.sh"

# The agent, copied into the cache so that the images dir never points
# into a build tree that `cargo clean` may empty.
adir=$cache/images/agent-$(input_hash "$agent")
if [[ ! -e $adir/.complete ]]; then
    tmp=$(mktemp -d "$adir.tmp.XXXXXX")
    install -m 0755 "$agent" "$tmp/ember-agent"
    touch "$tmp/.complete"
    rm -rf "$adir"
    mv "$tmp" "$adir"
fi

ln -sfn "$kdir/vmlinuz" "$out/vmlinuz"
ln -sfn "$idir/initrd.img" "$out/initrd.img"
ln -sfn "$bdir/base.tar" "$out/base.tar"
ln -sfn "$adir/ember-agent" "$out/ember-agent"
{
    echo "kernel_package=$kpkg"
    echo "kernel=$kdir"
    echo "initrd=$idir"
    echo "base=$bdir"
    echo "agent=$adir"
    echo "initrd_bytes=$(stat -c %s "$idir/initrd.img")"
} >"$out/manifest"
log "kernel, initrd, base and agent ready in $out; \`ember images build\` makes the images"
