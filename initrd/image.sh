#!/usr/bin/env bash
# Build one guest image: a root filesystem from the shared base (or from an
# imported root), the recipe's Debian packages and pip requirements, its
# overlay, and Ember's own parts (init, agent, busybox, the user), as the
# read-only root image and the template of the per-VM scratch disk.
# `ember images build` and `ember images import` run this; they compute the
# inputs' hash, cache the result and name the step a failure happened in
# (each step prints a "[image] step: NAME" line first).
#
# Inputs:  $1 = output dir (empty), $2 = agent binary,
#          $3 = base.tar (recipes) or a directory holding an imported root
#          EMBER_IMAGE_NAME       the image's name (for messages)
#          EMBER_IMAGE_RECIPE     recipe directory (its overlay/ is copied), or empty
#          EMBER_IMAGE_PACKAGES   Debian packages, space-separated
#          EMBER_IMAGE_PIP        pip requirements, one per line
#          EMBER_IMAGE_ENV        KEY=VALUE lines for every command (/etc/ember/env)
#          EMBER_IMAGE_PRELOAD    Python modules the fork server imports, one per line
#          EMBER_IMAGE_DISK_MB    size of the scratch (writable) disk in MB (default 1024)
#          EMBER_IMAGE_WRITABLE_ROOT  1: the root is an overlay whose changes live on
#                                 the scratch disk (the initrd mounts it), reset with the VM
#          EMBER_IMAGE_SUDO       1: install sudo; the user runs anything as root
#          EMBER_BUSYBOX          a static busybox (default /bin/busybox)
# Outputs: $1/rootfs.ext4, $1/scratch.ext4, $1/packages.txt (what dpkg has)
set -euo pipefail
out=$1 agent=$2 source=$3
here=$(cd "$(dirname "$0")" && pwd)
name=${EMBER_IMAGE_NAME:-image}
recipe=${EMBER_IMAGE_RECIPE:-}
busybox=${EMBER_BUSYBOX:-/bin/busybox}
step() { printf '[image] step: %s\n' "$*"; }

# Named after the image: a later build of it reaps what a killed one left.
work=$(mktemp -d "${TMPDIR:-/tmp}/ember-image-$name.XXXXXX")
# TMPDIR names a host directory: commands in the build chroot must not see it.
unset TMPDIR
root=$work/root
scratch=$work/scratch
mounted=()
cleanup() {
    local m
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        m=${mounted[i]}
        umount -l "$m" 2>/dev/null || true
    done
    # Never descend into a mount that could not be removed.
    rm -rf --one-file-system "$work" || true
}
trap cleanup EXIT
trap 'exit 143' INT TERM
mkdir -p "$root" "$scratch"

step "unpack the root"
if [[ -d $source ]]; then
    cp -a "$source/." "$root/"
else
    tar -C "$root" --numeric-owner -xf "$source"
fi

chroot_mounts() {
    mount -t proc proc "$root/proc" && mounted+=("$root/proc")
    mount -t sysfs sys "$root/sys" && mounted+=("$root/sys")
    mount --bind /dev "$root/dev" && mounted+=("$root/dev")
    # Package scripts must not start services in the build chroot.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    rm -f "$root/etc/resolv.conf"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
}
# Build commands in the root see only what they need: the host's own
# settings (PIP_FIND_LINKS, ...) must not change what an image holds.
# Proxy settings pass, so a build works where the host's downloads do.
in_root() {
    local pass=()
    for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        [[ -n ${!v:-} ]] && pass+=("$v=${!v}")
    done
    chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "${pass[@]}" "$@"
}
chroot_unmount() {
    local m
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        m=${mounted[i]}
        umount "$m"
    done
    mounted=()
    rm -f "$root/usr/sbin/policy-rc.d"
}

packages=${EMBER_IMAGE_PACKAGES:-}
writable_root=${EMBER_IMAGE_WRITABLE_ROOT:-0}
sudo=${EMBER_IMAGE_SUDO:-0}
if [[ $sudo == 1 && " $packages " != *" sudo "* ]]; then
    packages="$packages sudo"
fi
pip=${EMBER_IMAGE_PIP:-}
if [[ -n $packages || -n $pip ]]; then
    chroot_mounts
    export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
    if [[ -n $packages ]]; then
        step "apt-get update"
        in_root apt-get update -q
        step "install packages: $packages"
        # shellcheck disable=SC2086 # a list of package names
        in_root apt-get install -y -q --no-install-recommends $packages
        in_root apt-get clean
    fi
    if [[ -n $pip ]]; then
        step "pip install: $(tr '\n' ' ' <<<"$pip")"
        printf '%s\n' "$pip" >"$root/tmp/requirements.txt"
        # Downloads trust what the host trusts (a proxy's CA, say) for the
        # build only; the image keeps Debian's CA bundle.
        cp -L /etc/ssl/certs/ca-certificates.crt "$root/tmp/host-ca.crt"
        # Debian marks its Python as externally managed; the image is ours.
        in_root PIP_CERT=/tmp/host-ca.crt python3 -m pip install --no-cache-dir --break-system-packages \
            --disable-pip-version-check --root-user-action=ignore -r /tmp/requirements.txt
        rm -f "$root/tmp/requirements.txt" "$root/tmp/host-ca.crt"
    fi
    chroot_unmount
fi

step "Ember's parts"
if [[ -n $recipe && -d $recipe/overlay ]]; then
    cp -a "$recipe/overlay/." "$root/"
fi
mkdir -p "$root/usr/lib/ember" "$root/usr/sbin" "$root/etc/ember"
cp -a "$here/overlay-rootfs/." "$root/"
install -m 0755 "$busybox" "$root/usr/lib/ember/busybox"
install -s -m 0755 "$agent" "$root/usr/sbin/ember-agent"
printf '%s\n' "${EMBER_IMAGE_ENV:-}" | sed '/^$/d' >"$root/etc/ember/env"
printf '%s\n' "${EMBER_IMAGE_PRELOAD:-}" | sed '/^$/d' >"$root/etc/ember/preload"
printf '%s\n' "$name" >"$root/etc/ember/image"
# /bin/sh is what every command runs under.
[[ -e $root/bin/sh || -L $root/bin/sh ]] || ln -s /usr/lib/ember/busybox "$root/bin/sh"

step "the user"
touch "$root/etc/passwd" "$root/etc/group" "$root/etc/shadow"
if ! grep -q '^root:' "$root/etc/passwd"; then
    echo 'root:x:0:0:root:/root:/bin/sh' >>"$root/etc/passwd"
    echo 'root:x:0:' >>"$root/etc/group"
fi
if ! grep -q '^ember:' "$root/etc/passwd"; then
    if awk -F: '$3 == 1000 {found=1} END {exit !found}' "$root/etc/passwd"; then
        echo "uid 1000 belongs to another user in this root; Ember runs commands as uid 1000 named ember" >&2
        exit 1
    fi
    echo 'ember:x:1000:1000:Ember user:/home/ember:/bin/sh' >>"$root/etc/passwd"
    grep -q '^ember:' "$root/etc/group" || echo 'ember:x:1000:' >>"$root/etc/group"
    echo 'ember:*:19000:0:99999:7:::' >>"$root/etc/shadow"
fi
echo ember >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 ember\n::1 localhost\n' >"$root/etc/hosts"
# The root is read-only; the agent writes DNS settings to /run (tmpfs).
rm -f "$root/etc/resolv.conf"
ln -s /run/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root"/{home/ember,mnt/scratch,tmp,var/tmp,dev,dev/shm,proc,sys,run,sbin,sys/fs/cgroup,root}
# The initrd starts /sbin/init-fast: where /sbin is not /usr/sbin (a root
# without merged /usr, say one with nothing but /bin/sh) it points there.
[[ -e $root/sbin/init-fast ]] || ln -s /usr/sbin/init-fast "$root/sbin/init-fast"
chmod 0755 "$root/home/ember"
if [[ $sudo == 1 ]]; then
    step "passwordless sudo for the user"
    [[ -x $root/usr/bin/sudo ]] || { echo "sudo = true, but the root has no /usr/bin/sudo" >&2; exit 1; }
    mkdir -p "$root/etc/sudoers.d"
    printf '# Ember: the user may run anything as root (the VM is the boundary).\nember ALL=(ALL:ALL) NOPASSWD: ALL\n' \
        >"$root/etc/sudoers.d/ember"
    chmod 0440 "$root/etc/sudoers.d/ember"
    in_root visudo -c -q
fi
if [[ $writable_root == 1 ]]; then
    # The initrd sees this and mounts the root as an overlay over the
    # scratch disk's root/ (see initrd/overlay-initrd/init).
    touch "$root/etc/ember/writable-root"
fi
if [[ -x $root/usr/bin/dpkg-query ]]; then
    in_root dpkg-query -W -f '${Package}=${Version}\n' >"$out/packages.txt" 2>/dev/null || true
fi
touch "$out/packages.txt"

preload=${EMBER_IMAGE_PRELOAD:-}
if [[ -n $preload ]]; then
    # Import what the fork server will preload, as the user with the
    # image's environment: a module that does not import fails the build
    # here, and caches that land in $HOME (matplotlib's font list) go into
    # the scratch template below, so every VM starts with them.
    step "import the preloaded modules: $(tr '\n' ' ' <<<"$preload")"
    chown 1000:1000 "$root/home/ember"
    imports=$(sed '/^$/d; s/^/import /' <<<"$preload" | paste -sd ';')
    envs=()
    while IFS= read -r kv; do [[ -n $kv ]] && envs+=("$kv"); done <<<"${EMBER_IMAGE_ENV:-}"
    chroot_mounts
    chroot --userspec=1000:1000 "$root" /usr/bin/env -i HOME=/home/ember LANG=C.UTF-8 \
        PATH=/usr/local/bin:/usr/bin:/bin "${envs[@]}" python3 -c "$imports"
    chroot_unmount
    rm -f "$root/etc/resolv.conf"
    ln -s /run/resolv.conf "$root/etc/resolv.conf"
fi
home_seed=$work/home-seed
mkdir -p "$home_seed"
cp -a "$root/home/ember/." "$home_seed/"
find "$root/home/ember" -mindepth 1 -delete
chown 0:0 "$root/home/ember"

step "make the root image"
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/* "$root"/root/.cache
# Where a writable root's `apt-get update && apt-get install` writes.
mkdir -p "$root"/var/cache/apt/archives/partial "$root"/var/lib/apt/lists/partial "$root"/var/log/apt
# Sized to the content: 20% and 64 MiB of headroom for the filesystem's own.
used_mb=$(du -s --block-size=1M --one-file-system "$root" | cut -f1)
size_mb=$((used_mb + used_mb / 5 + 64))
# Root image: no reserved blocks, no journal replay on a read-only mount.
mkfs.ext4 -q -F -L ember-root -m 0 -O ^has_journal -d "$root" "$out/rootfs.ext4" "${size_mb}M"

step "make the scratch template"
# The only places the user can write, on their own disk.
mkdir -p "$scratch"/{home,tmp,var-tmp}
mkdir -p "$scratch/home/ember"
cp -a "$home_seed/." "$scratch/home/ember/"
chown -R 1000:1000 "$scratch/home/ember"
chmod 1777 "$scratch/tmp" "$scratch/var-tmp"
if [[ $writable_root == 1 ]]; then
    # The overlay's upper and work directories: what the VM changes in /.
    mkdir -p "$scratch/root" "$scratch/root-work"
    chmod 0755 "$scratch/root"
    chmod 0700 "$scratch/root-work"
fi
mkfs.ext4 -q -F -L ember-scratch -m 0 -d "$scratch" "$out/scratch.ext4" "${EMBER_IMAGE_DISK_MB:-1024}M"
step "done"
