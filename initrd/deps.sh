#!/usr/bin/env bash
# Install what Ember needs on a Debian host, skipping what is present.
# Idempotent; run as root. Called by `make deps` (up) and `make test-deps`
# (test, bench, bench-load: `--test` adds what only the tests need).
# Inputs:  [--test]. Outputs: Debian packages, vhost-device-vsock in /usr/local/bin.
set -euo pipefail
for_tests=false
[[ ${1:-} == --test ]] && for_tests=true
log() { printf '[deps] %s\n' "$*" >&2; }

need_apt=()
have() { dpkg-query -W -f '${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
# curl (7.82+ for --json), jq and file: the README examples and the e2e tests.
for p in busybox-static cpio curl debootstrap e2fsprogs file gzip jq tar; do
    have "$p" || need_apt+=("$p")
done
# The cluster's etcd client (etcd-client crate) is built from etcd's .proto
# files: protoc and the well-known types it imports.
for p in protobuf-compiler libprotobuf-dev; do
    have "$p" || need_apt+=("$p")
done
if $for_tests; then
    # bubblewrap: the load tests' container-style baseline.
    have bubblewrap || need_apt+=(bubblewrap)
    # The ZFS backend's VM tests need `zfs`: zfs-fuse where no ZFS tools
    # exist (a host with kernel ZFS keeps its own zfsutils).
    command -v zfs >/dev/null || have zfs-fuse || need_apt+=(zfs-fuse)
    # Networking ([network] enabled): namespaces and TAPs, the VMs' rules,
    # their resolvers; sysctl for forwarding.
    for p in iproute2 nftables dnsmasq-base procps; do
        have "$p" || need_apt+=("$p")
    done
    # The cluster suite runs a real etcd (Debian's 3.4; etcdctl too).
    for p in etcd-server etcd-client; do
        have "$p" || need_apt+=("$p")
    done
    # The E2B tests run the real e2b SDKs from a venv (gateway/tests/e2b/sdk.sh):
    # python3 with venv and pip, wherever python3 comes from.
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        for p in python3 python3-venv python3-pip; do
            have "$p" || need_apt+=("$p")
        done
    fi
fi
# qemu-system-x86 and qemu-utils must come from the same release: the image
# may carry a newer qemu-utils that conflicts with bookworm's qemu-system-x86.
qemu_ok=false
if have qemu-system-x86 && have qemu-utils; then
    sv=$(dpkg-query -W -f '${Version}' qemu-system-x86)
    uv=$(dpkg-query -W -f '${Version}' qemu-utils)
    [[ $sv == "$uv" ]] && qemu_ok=true
fi

if ((${#need_apt[@]})) || ! $qemu_ok; then
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    apt-get update -qq
    if ((${#need_apt[@]})); then
        log "installing ${need_apt[*]}"
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    fi
    if ! $qemu_ok; then
        v=$(apt-cache policy qemu-system-x86 | awk '/Candidate/{print $2}')
        [[ -n $v && $v != "(none)" ]] || { log "no qemu-system-x86 candidate"; exit 1; }
        log "installing qemu-system-x86 and qemu-utils $v"
        apt-get install -y -qq --no-install-recommends --allow-downgrades \
            "qemu-system-x86=$v" "qemu-utils=$v" >/dev/null
    fi
fi

# The apt lists are also what images.sh resolves the guest kernel from.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    log "apt-get update (for the guest kernel package)"
    apt-get update -qq
fi

# vhost-user vsock back end for the hybrid-vsock channel. Installed under
# /usr/local so the unprivileged user it runs as can execute it.
export PATH="$HOME/.cargo/bin:$PATH"
vhost_version=0.3.0
if ! /usr/local/bin/vhost-device-vsock --version 2>/dev/null | grep -q "$vhost_version"; then
    log "cargo install vhost-device-vsock $vhost_version (about a minute)"
    cargo install --quiet --root /usr/local vhost-device-vsock --version "$vhost_version"
fi
