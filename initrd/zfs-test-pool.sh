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

start_daemon() {
    log "starting zfs-fuse"
    setsid zfs-fuse --no-daemon >/var/tmp/ember-zfs-fuse.log 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 300); do daemon_up && break; sleep 0.1; done
    daemon_up || { log "zfs-fuse did not start; see /var/tmp/ember-zfs-fuse.log"; exit 1; }
}

# The file systems zfs-fuse has mounted, deepest first.
zfs_mounts() { awk '$3 == "fuse.zfs" {print $2}' /proc/mounts | sort -r; }

# Whether the daemon's FUSE side hangs: it happens (every thread of
# zfs-fuse waiting on another, every request on its mounts waiting for
# good) while `zpool` still answers. A stat that does not come back in 5 s
# says so (SIGKILL: a process waiting on FUSE dies of nothing less).
fs_hung() {
    local m
    for m in $(zfs_mounts); do
        (timeout -s KILL 5 stat -t "$m" >/dev/null 2>&1) 2>/dev/null || return 0
    done
    return 1
}

# SIGTERM, then SIGKILL: a daemon holding a dataset busy may not exit on
# its own. A new daemon cannot start while this one is still exiting.
# Its mounts, dead with it, are taken off lazily.
stop_daemon() {
    pkill -x zfs-fuse 2>/dev/null || true
    for _ in $(seq 1 50); do pgrep -x zfs-fuse >/dev/null || break; sleep 0.1; done
    pkill -9 -x zfs-fuse 2>/dev/null || true
    for _ in $(seq 1 50); do pgrep -x zfs-fuse >/dev/null || break; sleep 0.1; done
    local m
    for m in $(zfs_mounts); do umount -l "$m" 2>/dev/null || true; done
    rm -f "$pidfile"
}

# zfs-fuse calls a pool busy for a moment after use: retry.
try_destroy_pool() {
    for _ in $(seq 1 20); do
        zpool destroy -f "$pool" 2>/dev/null && return 0
        sleep 0.5
    done
    return 1
}

# A run that failed half-way can leave a dataset zfs-fuse holds busy for
# good (no process has it open, nothing is mounted): a new daemon lets go.
destroy_pool() {
    try_destroy_pool && return 0
    log "pool $pool stays busy; restarting zfs-fuse"
    stop_daemon
    start_daemon
    try_destroy_pool || { log "cannot destroy pool $pool"; exit 1; }
}

case ${1:-} in
up)
    command -v zfs-fuse >/dev/null || { log "zfs-fuse is not installed (make deps)"; exit 1; }
    if daemon_up && fs_hung; then
        log "zfs-fuse answers but its file systems hang; restarting it"
        stop_daemon
    fi
    if ! daemon_up; then
        start_daemon
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
    if daemon_up && fs_hung; then
        log "zfs-fuse answers but its file systems hang; restarting it"
        stop_daemon
        start_daemon
    fi
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
