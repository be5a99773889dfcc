#!/usr/bin/env bash
# A throw-away ZFS pool for the VM tests, on a sparse file, served by
# zfs-fuse (no kernel ZFS on the build machines).
#   zfs-test-pool.sh up     start zfs-fuse if needed, (re)create the pool,
#                           print the parent dataset to use (POOL/ember)
#   zfs-test-pool.sh down   destroy the pool and its file; stop zfs-fuse if
#                           this script started it
# Inputs: EMBER_ZFS_TEST_POOL (default embertest), EMBER_ZFS_TEST_FILE
# (default /var/tmp/<pool>.img). Run as root; `make deps` installs zfs-fuse.
set -euo pipefail
pool=${EMBER_ZFS_TEST_POOL:-embertest}
file=${EMBER_ZFS_TEST_FILE:-/var/tmp/$pool.img}
pidfile=/run/ember-zfs-fuse.pid
log() { printf '[zfs-test-pool] %s\n' "$*" >&2; }

daemon_up() { zpool list >/dev/null 2>&1; }

# zfs-fuse calls a pool busy for a moment after use: retry.
destroy_pool() {
    for i in $(seq 1 20); do
        zpool destroy -f "$pool" 2>/dev/null && return 0
        ((i == 20)) && { log "cannot destroy pool $pool"; exit 1; }
        sleep 0.5
    done
}

case ${1:-} in
up)
    command -v zfs-fuse >/dev/null || { log "zfs-fuse is not installed (make deps)"; exit 1; }
    if ! daemon_up; then
        log "starting zfs-fuse"
        setsid zfs-fuse --no-daemon >/var/tmp/ember-zfs-fuse.log 2>&1 &
        echo $! >"$pidfile"
        for _ in $(seq 1 300); do daemon_up && break; sleep 0.1; done
        daemon_up || { log "zfs-fuse did not start; see /var/tmp/ember-zfs-fuse.log"; exit 1; }
    fi
    if zpool list -H -o name "$pool" >/dev/null 2>&1; then
        log "destroying the pool a previous run left"
        destroy_pool
    fi
    rm -f "$file"
    truncate -s 4G "$file"
    zpool create -f -m "/$pool" "$pool" "$file" 2>/dev/null
    zfs create "$pool/ember"
    echo "$pool/ember"
    ;;
down)
    if daemon_up && zpool list -H -o name "$pool" >/dev/null 2>&1; then
        destroy_pool
    fi
    rm -f "$file"
    rmdir "/$pool" 2>/dev/null || true
    if [[ -f $pidfile ]]; then
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        # A new daemon cannot start while this one is still exiting.
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$pidfile"
    fi
    ;;
*)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
