#!/usr/bin/env bash
# The VM root image (read-only, shared by every VM) and the template of the
# per-VM scratch disk (each VM gets a copy-on-write overlay of it).
# Inputs:  $1 = output dir, $2 = base dir (from rootfs-base.sh), $3 = ember-agent binary
# Outputs: $1/rootfs.ext4, $1/scratch.ext4
set -euo pipefail
out=$1 base=$2 agent=$3
here=$(cd "$(dirname "$0")" && pwd)
root=$(mktemp -d)
scratch=$(mktemp -d)
trap 'rm -rf "$root" "$scratch"' EXIT

tar -C "$root" -xf "$base/base.tar"
cp -a "$here/overlay-rootfs/." "$root/"
install -s -m 0755 "$agent" "$root/usr/sbin/ember-agent"
# The unprivileged user that runs every command.
echo 'ember:x:1000:1000:Ember user:/home/ember:/bin/sh' >>"$root/etc/passwd"
echo 'ember:x:1000:' >>"$root/etc/group"
echo 'ember:*:19000:0:99999:7:::' >>"$root/etc/shadow"
echo ember >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 ember\n::1 localhost\n' >"$root/etc/hosts"
# The root is read-only; the agent writes DNS settings to /run (tmpfs).
ln -sf /run/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root"/{home/ember,mnt/scratch,tmp,var/tmp,dev/shm,run,sys/fs/cgroup}
chmod 0755 "$root/home/ember"
# Root image: no reserved blocks, no journal replay on a read-only mount.
mkfs.ext4 -q -F -L ember-root -m 0 -O ^has_journal -d "$root" "$out/rootfs.ext4" 1200M

# Scratch template: the only places the user can write, on their own disk.
mkdir -p "$scratch"/{home,tmp,var-tmp}
mkdir -p "$scratch/home/ember"
chown 1000:1000 "$scratch/home/ember"
chmod 1777 "$scratch/tmp" "$scratch/var-tmp"
mkfs.ext4 -q -F -L ember-scratch -m 0 -d "$scratch" "$out/scratch.ext4" 1G
