#!/usr/bin/env bash
# bench/latency-work.sh: how long the mount keeps callers waiting while long work runs
# beside them.
#
# Mounts one store (on ext4 under BENCH_DIR) per binary given, and in each measures the
# latency of `stat` on STATS uncached files and of 4 KiB reads at random offsets of a
# cold 256 MiB file (each block once, caches dropped first), p50/p99/max in
# microseconds, in three conditions:
#   idle      nothing else runs
#   fsck      `snapfs fsck --read-data` of the store (holding SIZE of data) runs
#   delete    `snapfs snapshot delete` of a snapshot that alone holds DELETE of data
# The measurement starts 1 s after the work and the work's own time is printed too.
#
# usage: bench/latency-work.sh [BINARY...]   (default: target/release/snapfs)
# Environment: SIZE=4g DELETE=1g STATS=3000 READS=3000 BENCH_DIR=/var/tmp
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE=${SIZE:-4g} DELETE=${DELETE:-1g} STATS=${STATS:-3000} READS=${READS:-3000}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
[ "$(id -u)" = 0 ] || { echo "bench/latency-work.sh: must run as root (mounts, drop_caches)" >&2; exit 2; }
command -v fio > /dev/null || { echo "bench/latency-work.sh: needs fio (apt-get install -y fio)" >&2; exit 2; }
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then
    cargo build --release --quiet
    bins=("${CARGO_TARGET_DIR:-target}/release/snapfs")
fi
W=$(mktemp -d "$BENCH_DIR/snapfs-latwork.XXXXXX")
cleanup() {
    umount "$W/mnt" 2> /dev/null || umount -l "$W/mnt" 2> /dev/null || true
    sleep 1
    rm -rf "$W"
}
trap cleanup EXIT

# lat MNT TAG: stat and read latencies, one line each.
lat() {
    python3 - "$1" "$STATS" "$READS" "$2" << 'PYEOF'
import os, random, sys, time
mnt, n, reads, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
base = f'{mnt}/lat{time.time_ns()}'
os.mkdir(base)
for i in range(n):
    os.close(os.open(f'{base}/f{i}', os.O_CREAT | os.O_WRONLY, 0o644))
with open('/proc/sys/vm/drop_caches', 'w') as f:
    f.write('3')
def show(what, lat):
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000
    print(f'{tag:<8} {what:<6} {q(.5):>9.0f} {q(.99):>9.0f} {lat[-1] / 1000:>9.0f}')
lat = []
for i in range(n):
    t = time.perf_counter_ns()
    os.stat(f'{base}/f{i}')
    lat.append(time.perf_counter_ns() - t)
show('stat', lat)
fd = os.open(f'{mnt}/read.dat', os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
blocks = random.Random(7).sample(range((256 << 20) // 4096), reads)
lat = []
for b in blocks:
    t = time.perf_counter_ns()
    os.pread(fd, 4096, b * 4096)
    lat.append(time.perf_counter_ns() - t)
os.close(fd)
show('read', lat)
PYEOF
}

# beside CMD...: runs CMD in the background, measures after 1 s, prints CMD's time.
beside() {
    local tag=$1 t0 pid
    shift
    t0=$(date +%s.%N)
    "$@" > "$W/work.out" 2>&1 &
    pid=$!
    sleep 1
    lat "$W/mnt" "$tag"
    wait "$pid" || { echo "bench/latency-work.sh: $* failed:" >&2; cat "$W/work.out" >&2; exit 1; }
    echo "$tag work took $(echo "$(date +%s.%N) - $t0" | bc) s"
}

echo "kernel $(uname -r), $(nproc) CPUs; SIZE=$SIZE DELETE=$DELETE STATS=$STATS READS=$READS"
for b in "${bins[@]}"; do
    rm -rf "$W/store" "$W/mnt"
    mkdir -p "$W/mnt"
    "$b" mount "$W/store" "$W/mnt"
    echo "== $b ($("$b" --version))"
    fio --name=fill --filename="$W/mnt/big.dat" --rw=write --bs=1M --size="$SIZE" \
        --ioengine=psync --end_fsync=1 --refill_buffers=1 --output=/dev/null
    fio --name=fill --filename="$W/mnt/read.dat" --rw=write --bs=1M --size=256m \
        --ioengine=psync --end_fsync=1 --refill_buffers=1 --output=/dev/null
    fio --name=fill --filename="$W/mnt/gone.dat" --rw=write --bs=1M --size="$DELETE" \
        --ioengine=psync --end_fsync=1 --refill_buffers=1 --output=/dev/null
    "$b" snapshot create "$W/mnt" doomed > /dev/null
    rm "$W/mnt/gone.dat"
    sync
    printf '%-8s %-6s %9s %9s %9s\n' cond op 'p50 µs' 'p99 µs' 'max µs'
    lat "$W/mnt" idle
    beside fsck "$b" fsck --read-data "$W/mnt"
    beside delete "$b" snapshot delete "$W/mnt" doomed
    umount "$W/mnt"
    sleep 1
done
