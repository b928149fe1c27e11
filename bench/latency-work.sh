#!/usr/bin/env bash
# bench/latency-work.sh: how long the mount keeps callers waiting while long work runs
# beside them.
#
# Mounts one store (on ext4 under BENCH_DIR) per binary given, and in each measures the
# latency of `stat` on uncached files and of cold 4 KiB reads (one block per 64 KiB
# extent of a 256 MiB file), p50/p99/max in microseconds, sampled every 2 ms for as
# long as the work runs, in three conditions:
#   idle      nothing else runs (`sleep 10` stands in for the work)
#   fsck      `snapfs fsck --read-data` of the store (holding SIZE of data) runs
#   delete    `snapfs snapshot delete` of a snapshot that alone holds DELETE of data
# Files are made, synced and caches dropped before the work starts, so that nothing
# the sampler does before its first sample waits for the work. Also printed: the
# samples taken and how long the work took.
#
# usage: bench/latency-work.sh [BINARY...]   (default: target/release/snapfs)
# Environment: SIZE=4g DELETE=1g FILES=20000 BENCH_DIR=/var/tmp
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE=${SIZE:-4g} DELETE=${DELETE:-1g} FILES=${FILES:-20000}
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

# prep MNT DIR: makes FILES empty files in MNT/DIR.
prep() {
    python3 - "$1/$2" "$FILES" << 'PYEOF'
import os, sys
base, n = sys.argv[1], int(sys.argv[2])
os.mkdir(base)
for i in range(n):
    os.close(os.open(f'{base}/f{i}', os.O_CREAT | os.O_WRONLY, 0o644))
PYEOF
}

# beside TAG DIR CMD...: syncs and drops caches, then (its files open first) starts
# CMD and samples in MNT/DIR while CMD runs; prints the figures and CMD's time. A
# sample that waits for the whole work counts, however long.
beside() {
    local tag=$1 dir=$2
    shift 2
    sync
    echo 3 > /proc/sys/vm/drop_caches
    python3 - "$W/mnt" "$dir" "$FILES" "$tag" "$W/work.out" "$@" << 'PYEOF' || exit 1
import os, subprocess, sys, time
mnt, d, n, tag, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
cmd = sys.argv[6:]
fd = os.open(f'{mnt}/read.dat', os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
t0 = time.monotonic()
work = subprocess.Popen(cmd, stdout=open(out, 'w'), stderr=subprocess.STDOUT)
stats, reads, i = [], [], 0
extents = (256 << 20) // 65536
while work.poll() is None and i < n:
    t = time.perf_counter_ns()
    os.stat(f'{mnt}/{d}/f{i}')
    stats.append(time.perf_counter_ns() - t)
    if i < extents:
        # One 4 KiB block of each 64 KiB extent, at a spot that varies.
        at = i * 65536 + (i * 7 % 16) * 4096
        t = time.perf_counter_ns()
        os.pread(fd, 4096, at)
        reads.append(time.perf_counter_ns() - t)
    i += 1
    time.sleep(0.002)
rc = work.wait()
took = time.monotonic() - t0
os.close(fd)
for what, lat in (('stat', stats), ('read', reads)):
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000 if lat else float('nan')
    print(f'{tag:<8} {what:<6} {len(lat):>7} {q(.5):>9.0f} {q(.99):>9.0f} {q(1):>9.0f}')
print(f'{tag} work took {took:.1f} s')
if rc != 0:
    sys.exit(f'bench/latency-work.sh: {" ".join(cmd)} failed:\n' + open(out).read())
PYEOF
}

echo "kernel $(uname -r), $(nproc) CPUs; SIZE=$SIZE DELETE=$DELETE FILES=$FILES"
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
    for d in idle fsck delete; do prep "$W/mnt" "$d"; done
    printf '%-8s %-6s %7s %9s %9s %9s\n' cond op samples 'p50 µs' 'p99 µs' 'max µs'
    beside idle idle sleep 10
    beside fsck fsck "$b" fsck --read-data "$W/mnt"
    beside delete delete "$b" snapshot delete "$W/mnt" doomed
    umount "$W/mnt"
    sleep 1
done
