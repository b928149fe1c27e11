#!/usr/bin/env bash
# bench/folios.sh: why a warm sequential read through FUSE trails the disk's own.
#
# For each target it writes a SIZE file, drops the caches, reads it once cold (the
# kernel's readahead fills the page cache) and then twice warm, and prints:
#   folios   the page-cache folios the cold read added to the file, by size, counted
#            with the filemap:mm_filemap_add_to_page_cache tracepoint (perf)
#   cold, warm1, warm2   fio's sequential 1 MiB read throughput (MiB/s)
# The first warm read moves every folio to the active LRU list (one locked LRU
# operation per folio); the second finds them active. A filesystem cached in 4 KiB
# folios pays that per 4 KiB, one cached in 2 MiB folios per 2 MiB.
#
# Targets: native (a directory under BENCH_DIR), passthrough_ll (compiled from
# libfuse3-dev's examples, -o writeback,cache=always, when they are installed),
# snapfs (defaults) and snapfs-nowb (-o nowriteback: the first version of the Linux
# patch that enables large folios for FUSE enables them only without the writeback
# cache).
#
# BENCH_DIR must be on a filesystem whose files report their superblock's device
# (ext4, xfs; not btrfs or overlayfs), or the native row counts no folios.
#
# usage: bench/folios.sh        Environment: SIZE=2g ROUNDS=3 BENCH_DIR=/var/tmp
#        SNAPFS=path (default: cargo build --release)  NO_INSTALL=1 (skip apt-get)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE=${SIZE:-2g} ROUNDS=${ROUNDS:-3} BENCH_DIR=${BENCH_DIR:-/var/tmp}
if [ "${NO_INSTALL:-0}" != 1 ]; then
    need=()
    command -v fio > /dev/null || need+=(fio)
    command -v jq > /dev/null || need+=(jq)
    command -v perf > /dev/null || need+=(linux-perf)
    command -v gcc > /dev/null || need+=(build-essential)
    pkg-config --exists fuse3 2> /dev/null || need+=(libfuse3-dev pkg-config)
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" > /dev/null
    fi
fi
if [ -z "${SNAPFS:-}" ]; then
    cargo build --release --quiet
    SNAPFS=${CARGO_TARGET_DIR:-target}/release/snapfs
fi
W=$(mktemp -d "$BENCH_DIR/snapfs-folios.XXXXXX")
names=(native)
mkdir -p "$W/native"
cleanup() {
    local n pid i
    for n in "${names[@]}"; do
        [ "$n" = native ] || umount "$W/$n/mnt" 2> /dev/null || umount -l "$W/$n/mnt" 2> /dev/null || true
    done
    # snapfs flushes and compacts its store after the unmount: let it finish.
    for n in snapfs snapfs-nowb; do
        pid=$(cat "$W/$n/store/snapfs.pid" 2> /dev/null) || continue
        for i in $(seq 600); do
            kill -0 "$pid" 2> /dev/null || break
            sleep 0.1
        done
    done
    rm -rf "$W"
}
trap cleanup EXIT

ex=/usr/share/doc/libfuse3-dev/examples
if ls "$ex"/passthrough_ll.c* > /dev/null 2>&1; then
    mkdir -p "$W/pll/src" "$W/pll/mnt"
    cp "$ex"/passthrough_ll.c* "$ex"/passthrough_helpers.h* "$W/pll/"
    for gz in "$W"/pll/*.gz; do [ -e "$gz" ] && gunzip -f "$gz"; done
    # shellcheck disable=SC2046
    gcc -O2 -Wall -o "$W/pll/passthrough_ll" "$W/pll/passthrough_ll.c" $(pkg-config fuse3 --cflags --libs)
    names+=(pll)
    "$W/pll/passthrough_ll" -o "writeback,cache=always,source=$W/pll/src" "$W/pll/mnt"
fi
for n in snapfs snapfs-nowb; do
    mkdir -p "$W/$n/mnt"
    names+=("$n")
    opts=
    [ "$n" = snapfs ] || opts=nowriteback
    "$SNAPFS" mount "$W/$n/store" "$W/$n/mnt" ${opts:+-o "$opts"}
done
dir() { if [ "$1" = native ]; then echo "$W/native"; else echo "$W/$1/mnt"; fi; }

rd() {
    fio --name=job --output-format=json --invalidate=0 --filename="$1" --rw=read --bs=1M \
        --size="$SIZE" --ioengine=psync --readonly | jq -r '.jobs[0].read.bw_bytes / 1048576 | floor'
}

printf '%-12s %-48s %6s %6s %6s\n' target "folios added by the cold read" cold warm1 warm2
for r in $(seq "$ROUNDS"); do
    for n in "${names[@]}"; do
        f=$(dir "$n")/seq.dat
        fio --name=job --output-format=json --filename="$f" --rw=write --bs=1M --size="$SIZE" \
            --ioengine=psync --end_fsync=1 --refill_buffers=1 > /dev/null
        sync
        echo 3 > /proc/sys/vm/drop_caches
        ino=$(stat -c %i "$f")
        perf record -q -o "$W/trace.data" -a -e filemap:mm_filemap_add_to_page_cache \
            --filter "i_ino == $ino" -- fio --name=job --output-format=json --invalidate=0 \
            --filename="$f" --rw=read --bs=1M --size="$SIZE" --ioengine=psync --readonly > "$W/cold.json"
        cold=$(jq -r '.jobs[0].read.bw_bytes / 1048576 | floor' "$W/cold.json")
        # The filter may also match a same-numbered inode on another device (the
        # store's files, for snapfs); count only the file's own device.
        dev=$(stat -c '%Hd:%Ld' "$f")
        folios=$(perf script -i "$W/trace.data" 2> /dev/null |
            awk -v dev="$dev" '$0 ~ "dev " dev " " { for (i = 1; i <= NF; i++) if ($i ~ /^order=/) { split($i, a, "="); c[a[2]]++ } }
                END { for (o = 12; o >= 0; o--) if (o in c) printf "%s%d x %d KiB", (n++ ? ", " : ""), c[o], 4 * 2 ^ o; if (!n) printf "none seen" }')
        w1=$(rd "$f")
        w2=$(rd "$f")
        printf '%-12s %-48s %6s %6s %6s\n' "$n" "$folios" "$cold" "$w1" "$w2"
        rm -f "$f"
    done
done
