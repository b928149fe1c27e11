#!/usr/bin/env bash
# scripts/setup-and-demo.sh: first-run setup and a short snapfs demo.
# Installs what is missing (fuse3 and a C toolchain via apt-get when run as
# root; Rust must already be installed), builds snapfs in release mode, then
# mounts a fresh store in a temporary directory, writes files, shows
# `ls -la` and `snapfs status`, takes a snapshot, changes the live tree, shows
# the snapshot, `snapfs diff` and a rollback, and unmounts.
#
# usage: scripts/setup-and-demo.sh        (root recommended: apt-get, FUSE)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

say() { printf '\n>>> %s\n' "$*"; }

# --- prerequisites ------------------------------------------------------------
missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v cc >/dev/null || missing+=(build-essential)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v mountpoint >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    else
        echo "error: missing packages: ${missing[*]}" >&2
        echo "       install them, e.g.: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
if ! command -v cargo >/dev/null; then
    cat >&2 <<'EOF'
error: cargo (Rust) is not installed.
       Install a current Rust toolchain with rustup (https://rustup.rs), then
       run this script again. Debian 12's apt package "cargo" is too old to
       build snapfs.
EOF
    exit 1
fi
[ -e /dev/fuse ] || {
    echo "error: /dev/fuse does not exist (modprobe fuse?)" >&2
    exit 1
}

# FUSE over io_uring (Linux 6.14+) answers each request on the caller's CPU; the
# kernel offers it to snapfs once root sets the fuse module's enable_uring.
uring=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring" ] && [ "$(cat "$uring")" != Y ]; then
    say "echo Y > $uring   (FUSE over io_uring; snapfs -o nouring does without)"
    echo Y >"$uring"
fi

# --- build ----------------------------------------------------------------------
say "cargo build --release"
cargo build --release
SNAPFS=$(readlink -m "${CARGO_TARGET_DIR:-target}/release/snapfs")
export SNAPFS

# --- demo: mount helpers and cleanup trap from the peer test harness --------------
# shellcheck source=tests/peer/common.sh
. tests/peer/common.sh
peer_init demo
peer_resolve_snapfs
store="$PEER_WORK/store"
mnt="$PEER_WORK/mnt"

say "snapfs mount $store $mnt"
peer_mount "$store" "$mnt"

say "writing files"
echo "hello from snapfs, $(date -u)" >"$mnt/hello.txt"
mkdir -p "$mnt/docs"
printf 'line %d\n' 1 2 3 >"$mnt/docs/notes.txt"
sync -f "$mnt"
cat "$mnt/hello.txt"

say "ls -la $mnt"
ls -la "$mnt"

say "snapfs status $mnt"
"$SNAPFS" status "$mnt"

say "mkdir $mnt/.snapshots/demo   (take a snapshot)"
mkdir "$mnt/.snapshots/demo"
ls -la "$mnt/.snapshots/"

say "change the live tree, then compare with the snapshot"
echo "changed after the snapshot" >"$mnt/hello.txt"
rm "$mnt/docs/notes.txt"
echo "live:     $(cat "$mnt/hello.txt")"
echo "snapshot: $(cat "$mnt/.snapshots/demo/hello.txt")"
"$SNAPFS" snapshot list "$mnt"
say "snapfs diff $mnt demo live"
"$SNAPFS" diff "$mnt" demo live

say "snapfs snapshot rollback $mnt demo"
"$SNAPFS" snapshot rollback "$mnt" demo
echo "live:     $(cat "$mnt/hello.txt")"
ls -la "$mnt/docs"

say "umount $mnt"
peer_unmount "$mnt"

say "demo complete (the temporary store is removed on exit)"
