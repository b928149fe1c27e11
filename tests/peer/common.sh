#!/usr/bin/env bash
# tests/peer/common.sh: shared helpers for the third-party ("peer") file system
# test suites in this directory (pjdfstest.sh, fsx.sh). Source it, don't run it.
#
# What it provides:
#   - locating the snapfs binary ($SNAPFS, default
#     ${CARGO_TARGET_DIR:-target}/release/snapfs relative to the repo root)
#   - installing a pinned cargo tool when it is missing (pjdfstest, fsx)
#   - a private work directory and an EXIT trap that always unmounts whatever
#     was mounted and removes the work directory
#   - mounting a fresh snapfs store and waiting until the mount is live,
#     unmounting it (and waiting for the daemon to exit), and running
#     `snapfs fsck` on the store afterwards
#
# Environment knobs understood by every peer script:
#   SNAPFS              snapfs binary (default: target/release/snapfs)
#   PEER_TARGET_DIR     run the suite inside this existing directory instead of
#                       a fresh snapfs mount (no mounting at all; handy for
#                       checking the harness against ext4/tmpfs)
#   PEER_TMPDIR         where the work directory (store, mountpoint, logs) is
#                       created (default: ${TMPDIR:-/tmp})
#   PEER_MOUNT_OPTS     extra `-o` options for `snapfs mount`
#   PEER_MOUNT_TIMEOUT  seconds to wait for a mount to appear (default 30)
#   PEER_FSCK           after unmounting run `snapfs fsck STORE --read-data`:
#                       1 (default), 0 to skip, "quick" to omit --read-data
#   PEER_KEEP           1 keeps the work directory (store and logs) on exit
#   PEER_ARTIFACTS_DIR  where failure evidence is copied (default
#                       ${TMPDIR:-/tmp}/snapfs-peer-artifacts)

set -euo pipefail
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "tests/peer/common.sh is a library: source it from tests/peer/*.sh" >&2
    exit 2
fi

PEER_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

PEER_NAME=${PEER_NAME:-peer}
PEER_WORK=""
PEER_TARGET=""
PEER_STORE=""
PEER_MNT=""
PEER_MOUNTS=()
PEER_OWN_TARGET=""
PEER_MOUNT_SEQ=0
PEER_CHILD=""

peer_log() { printf '[%s] %s\n' "$PEER_NAME" "$*"; }
peer_warn() { printf '[%s] warning: %s\n' "$PEER_NAME" "$*" >&2; }
# Prints the script's header comment (its usage) and exits, when asked with -h or
# --help as its first argument.
peer_help_if_asked() {
    case ${1:-} in
    -h | --help)
        sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
        exit 0
        ;;
    esac
}

peer_die() {
    printf '[%s] error: %s\n' "$PEER_NAME" "$*" >&2
    exit 2
}

peer_require_root() {
    [ "$(id -u)" -eq 0 ] || peer_die "$1 must run as root"
}

# Resolve $SNAPFS to an absolute path of an executable and export it.
peer_resolve_snapfs() {
    local bin=${SNAPFS:-}
    if [ -z "$bin" ]; then
        bin="${CARGO_TARGET_DIR:-target}/release/snapfs"
        case $bin in /*) ;; *) bin="$PEER_REPO_ROOT/$bin" ;; esac
    fi
    case $bin in */*) ;; *) bin=$(command -v "$bin" || true) ;; esac
    if [ -z "$bin" ] || [ ! -x "$bin" ]; then
        peer_die "snapfs binary not found (${SNAPFS:-target/release/snapfs}); run 'cargo build --release' or set SNAPFS"
    fi
    SNAPFS=$(readlink -f "$bin")
    export SNAPFS
}

# peer_ensure_cargo_tool BIN CRATE VERSION: print the path of BIN, running
# `cargo install CRATE --version VERSION --locked` first when BIN is missing or
# reports another version.
peer_ensure_cargo_tool() {
    local bin=$1 crate=$2 version=$3 path have=""
    path=$(command -v "$bin" || true)
    if [ -n "$path" ]; then
        have=$("$path" --version 2>/dev/null | awk 'NR == 1 { print $2 }' || true)
    fi
    if [ -z "$path" ] || [ "$have" != "$version" ]; then
        command -v cargo >/dev/null || peer_die "$bin is missing and cargo is not installed"
        local force=()
        [ -z "$path" ] || force=(--force)
        printf '[%s] installing %s %s with cargo install (found: %s)\n' \
            "$PEER_NAME" "$crate" "$version" "${have:-none}" >&2
        cargo install "$crate" --version "$version" --locked "${force[@]}" >&2 ||
            peer_die "cargo install $crate $version failed"
        hash -r
        path="${CARGO_INSTALL_ROOT:-${CARGO_HOME:-$HOME/.cargo}}/bin/$bin"
        [ -x "$path" ] || path=$(command -v "$bin" || true)
        [ -n "$path" ] || peer_die "$bin not found after cargo install"
    fi
    printf '%s\n' "$path"
}

# peer_init NAME: create the work directory and install the cleanup trap.
peer_init() {
    PEER_NAME=$1
    local base=${PEER_TMPDIR:-${TMPDIR:-/tmp}}
    mkdir -p "$base"
    PEER_WORK=$(mktemp -d "$base/snapfs-$PEER_NAME.XXXXXX")
    # Traversable by the unprivileged users some suites switch to.
    chmod 0755 "$PEER_WORK"
    mkdir -p "$PEER_WORK/logs"
    trap peer_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}

peer_is_mounted() {
    mountpoint -q "$1" 2>/dev/null
}

# PIDs of snapfs processes whose command line names mountpoint $1.
peer_daemon_pids() {
    local mnt=$1 p exe
    [ -n "${SNAPFS:-}" ] || return 0
    for p in /proc/[0-9]*; do
        exe=$(readlink -f "$p/exe" 2>/dev/null) || continue
        [ "$exe" = "$SNAPFS" ] || continue
        if grep -qxF -- "$mnt" < <(tr '\0' '\n' <"$p/cmdline" 2>/dev/null); then
            printf '%s\n' "${p#/proc/}"
        fi
    done
}

# peer_mount STORE MNT [OPTS]: mount a snapfs store and wait until it is live.
peer_mount() {
    local store=$1 mnt=$2 opts=${3:-} log i timeout=${PEER_MOUNT_TIMEOUT:-30}
    mkdir -p "$mnt"
    PEER_MOUNT_SEQ=$((PEER_MOUNT_SEQ + 1))
    log="$PEER_WORK/logs/snapfs-mount-$PEER_MOUNT_SEQ.log"
    local cmd=("$SNAPFS" mount "$store" "$mnt")
    [ -z "$opts" ] || cmd+=(-o "$opts")
    peer_log "mounting: ${cmd[*]}"
    # Output goes to a file, never a pipe: the daemon may keep stdio open.
    if ! "${cmd[@]}" </dev/null >"$log" 2>&1; then
        cat "$log" >&2
        peer_die "snapfs mount failed"
    fi
    PEER_MOUNTS+=("$mnt")
    for ((i = 0; i < timeout * 10; i++)); do
        if peer_is_mounted "$mnt"; then
            local fstype
            fstype=$(findmnt -n -o FSTYPE --mountpoint "$mnt" 2>/dev/null | tail -n 1)
            case $fstype in
            fuse | fuse.*) ;;
            *) peer_die "$mnt is mounted but has type '$fstype', expected fuse.snapfs" ;;
            esac
            peer_log "mounted $store on $mnt (type $fstype)"
            return 0
        fi
        sleep 0.1
    done
    cat "$log" >&2
    peer_die "$mnt did not become a mountpoint within ${timeout}s"
}

# peer_unmount MNT: unmount (retrying while busy) and wait for the daemon.
peer_unmount() {
    local mnt=$1 pids i m rest=()
    for m in "${PEER_MOUNTS[@]}"; do
        [ "$m" = "$mnt" ] || rest+=("$m")
    done
    if ! peer_is_mounted "$mnt"; then
        PEER_MOUNTS=("${rest[@]}")
        return 0
    fi
    pids=$(peer_daemon_pids "$mnt")
    sync -f "$mnt" 2>/dev/null || true
    for ((i = 0; i < 10; i++)); do
        umount "$mnt" 2>/dev/null && break
        sleep 1
    done
    if peer_is_mounted "$mnt"; then
        peer_warn "umount $mnt keeps failing; trying fusermount3 -u, then a lazy unmount"
        umount "$mnt" || fusermount3 -u "$mnt" || umount -l "$mnt" || return 1
    fi
    PEER_MOUNTS=("${rest[@]}")
    # The daemon exits once the kernel drops the connection; wait for it so
    # the store is quiescent before fsck or removal.
    for ((i = 0; i < 300; i++)); do
        local alive=0 p
        for p in $pids; do
            [ -d "/proc/$p" ] && alive=1
        done
        [ "$alive" -eq 1 ] || break
        sleep 0.1
    done
    [ "$i" -lt 300 ] || peer_warn "snapfs daemon for $mnt still running 30s after unmount (pids: $pids)"
    peer_log "unmounted $mnt"
}

# peer_setup_target NAME: provide $PEER_TARGET, a fresh directory to run a
# suite in: inside a new snapfs mount, or inside $PEER_TARGET_DIR.
peer_setup_target() {
    local name=$1
    if [ -n "${PEER_TARGET_DIR:-}" ]; then
        mkdir -p "$PEER_TARGET_DIR"
        PEER_TARGET=$(mktemp -d "$(readlink -f "$PEER_TARGET_DIR")/$name.XXXXXX")
        chmod 0755 "$PEER_TARGET"
        PEER_OWN_TARGET=$PEER_TARGET
        peer_log "PEER_TARGET_DIR set: running in $PEER_TARGET without mounting snapfs"
        return 0
    fi
    peer_resolve_snapfs
    # Short paths: pjdfstest binds unix sockets deep below the target, and
    # sun_path holds only 107 bytes.
    local n=$((PEER_MOUNT_SEQ + 1))
    PEER_STORE="$PEER_WORK/store$n"
    PEER_MNT="$PEER_WORK/mnt$n"
    peer_mount "$PEER_STORE" "$PEER_MNT" "${PEER_MOUNT_OPTS:-}"
    PEER_TARGET="$PEER_MNT/$name"
    mkdir -p "$PEER_TARGET"
    chmod 0755 "$PEER_TARGET"
}

# peer_fsck STORE: check the store of an unmounted file system.
peer_fsck() {
    local store=$1 args=()
    case ${PEER_FSCK:-1} in
    0 | no | false) return 0 ;;
    quick) ;;
    *) args=(--read-data) ;;
    esac
    peer_log "checking store: snapfs fsck $store ${args[*]}"
    if "$SNAPFS" fsck "$store" "${args[@]}"; then
        peer_log "fsck: clean"
    else
        peer_warn "snapfs fsck reported problems in $store"
        return 1
    fi
}

# peer_finish: unmount the suite's snapfs mount and fsck its store. Returns
# non-zero if either fails.
peer_finish() {
    [ -n "$PEER_MNT" ] || return 0
    peer_unmount "$PEER_MNT" || return 1
    peer_fsck "$PEER_STORE"
}

# peer_run [--quiet] LOG CMD...: run CMD with its output in LOG (and echoed
# unless --quiet), in the background so that a signal to this script is
# handled at once (the cleanup trap then stops CMD and unmounts).
peer_run() {
    local quiet=0
    if [ "$1" = --quiet ]; then
        quiet=1
        shift
    fi
    local log=$1 rc=0 tail_pid=""
    shift
    : >"$log"
    "$@" </dev/null >"$log" 2>&1 &
    PEER_CHILD=$!
    if [ "$quiet" -eq 0 ]; then
        tail -n +1 -s 0.2 -f --pid="$PEER_CHILD" "$log" &
        tail_pid=$!
    fi
    wait "$PEER_CHILD" || rc=$?
    PEER_CHILD=""
    [ -z "$tail_pid" ] || wait "$tail_pid" || true
    return "$rc"
}

peer_cleanup() {
    local rc=$? i
    trap - EXIT INT TERM HUP
    if [ -n "${PEER_CHILD:-}" ] && kill -0 "$PEER_CHILD" 2>/dev/null; then
        peer_warn "interrupted; stopping pid $PEER_CHILD"
        kill -TERM "$PEER_CHILD" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$PEER_CHILD" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$PEER_CHILD" 2>/dev/null || true
        wait "$PEER_CHILD" 2>/dev/null || true
    fi
    for ((i = ${#PEER_MOUNTS[@]} - 1; i >= 0; i--)); do
        peer_unmount "${PEER_MOUNTS[$i]}" || peer_warn "could not unmount ${PEER_MOUNTS[$i]}"
    done
    if [ -n "$PEER_OWN_TARGET" ] && [ "${PEER_KEEP:-0}" != 1 ]; then
        rm -rf --one-file-system "$PEER_OWN_TARGET" || true
    fi
    if [ -n "$PEER_WORK" ] && [ -d "$PEER_WORK" ]; then
        if [ "${PEER_KEEP:-0}" = 1 ]; then
            peer_log "keeping work directory $PEER_WORK"
        elif grep -qF "$PEER_WORK/" < <(findmnt -rn -o TARGET); then
            peer_warn "something is still mounted under $PEER_WORK; not removing it"
        else
            rm -rf --one-file-system "$PEER_WORK" || true
        fi
    fi
    exit "$rc"
}

# peer_save_artifacts NAME PATH...: copy failure evidence somewhere that
# survives the cleanup and print where.
peer_save_artifacts() {
    local name=$1 dest
    shift
    dest="${PEER_ARTIFACTS_DIR:-${TMPDIR:-/tmp}/snapfs-peer-artifacts}/$name-$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$dest"
    cp -a "$@" "$dest"/ 2>/dev/null || true
    peer_log "artifacts saved in $dest"
}
