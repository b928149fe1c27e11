#!/usr/bin/env bash
# bench/latency.sh: how snapfs's request transports answer under load.
#
# Mounts three snapfs stores side by side (store on ext4 under BENCH_DIR):
#   uring-idle    the defaults: FUSE over io_uring, queue threads under SCHED_IDLE
#   uring-normal  -o uring_sched=normal
#   devfuse       -o nouring (requests through /dev/fuse)
# plus, with THREADS1=1, uring-1thread (-o uring_threads=1). It then measures the
# latency of `stat` on STATS files (each one uncached: its entry was dropped first),
# per request, in these conditions:
#   idle          nothing else runs
#   hogs4, hogs16 4 or 16 busy loops (`yes > /dev/null`) share the 2 CPUs
#   fsync         the stat runs pinned to CPU 0 next to a process, also on CPU 0,
#                 that writes 64 KiB and fsyncs it in a loop on the same mount
# and prints p50, p99, p99.9 and max (microseconds) and the total (ms), ROUNDS times,
# the mounts interleaved. Needs root (FUSE, drop_caches); sets fuse.enable_uring for
# the run and restores it.
#
# usage: bench/latency.sh        Environment: STATS=3000 ROUNDS=2 THREADS1=1
#        SNAPFS=path (default: cargo build --release)  BENCH_DIR=/var/tmp
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STATS=${STATS:-3000} ROUNDS=${ROUNDS:-2} THREADS1=${THREADS1:-1}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
if [ -z "${SNAPFS:-}" ]; then
    cargo build --release --quiet
    SNAPFS=${CARGO_TARGET_DIR:-target}/release/snapfs
fi
W=$(mktemp -d "$BENCH_DIR/snapfs-latency.XXXXXX")
param=/sys/module/fuse/parameters/enable_uring
was=
names=(uring-idle uring-normal devfuse)
opts=("" "uring_sched=normal" "nouring")
if [ "$THREADS1" = 1 ]; then
    names+=(uring-1thread)
    opts+=("uring_threads=1")
fi
cleanup() {
    pkill -P $$ yes 2> /dev/null || true
    for n in "${names[@]}"; do umount "$W/$n/mnt" 2> /dev/null || umount -l "$W/$n/mnt" 2> /dev/null || true; done
    [ -z "$was" ] || echo "$was" > "$param"
    sleep 1
    rm -rf "$W"
}
trap cleanup EXIT
if [ -w "$param" ]; then
    was=$(cat "$param")
    echo Y > "$param"
fi
for i in "${!names[@]}"; do
    mkdir -p "$W/${names[$i]}/mnt"
    # shellcheck disable=SC2086
    "$SNAPFS" mount "$W/${names[$i]}/store" "$W/${names[$i]}/mnt" ${opts[$i]:+-o "${opts[$i]}"}
done

# stat_lat MNT [CPU]: creates STATS files, drops cached entries, stats each one (on
# CPU, if given), prints figures.
stat_lat() {
    local pin=()
    [ -z "${2:-}" ] || pin=(taskset -c "$2")
    "${pin[@]}" python3 - "$1" "$STATS" << 'EOF'
import os, sys, time
mnt, n = sys.argv[1], int(sys.argv[2])
base = f'{mnt}/lat{time.time_ns()}'
os.mkdir(base)
for i in range(n):
    os.close(os.open(f'{base}/f{i}', os.O_CREAT | os.O_WRONLY, 0o644))
with open('/proc/sys/vm/drop_caches', 'w') as f:
    f.write('2')
lat = []
for i in range(n):
    t = time.perf_counter_ns()
    os.stat(f'{base}/f{i}')
    lat.append(time.perf_counter_ns() - t)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000
print(f'{q(.5):.0f} {q(.99):.0f} {q(.999):.0f} {lat[-1] / 1000:.0f} {sum(lat) / 1e6:.0f}')
EOF
}

fsync_loop() {
    exec taskset -c 0 python3 -c "
import os, time
f = os.open('$1/fsync.dat', os.O_CREAT | os.O_WRONLY, 0o644)
end = time.time() + $2
while time.time() < end:
    os.pwrite(f, os.urandom(65536), 0)
    os.fsync(f)
"
}

echo "kernel $(uname -r), $(nproc) CPUs, fuse.enable_uring=$(cat "$param" 2> /dev/null || echo absent), $STATS stats per figure"
printf '%-8s %-14s %8s %8s %8s %8s %9s\n' load transport 'p50 µs' 'p99' 'p99.9' 'max' 'total ms'
for r in $(seq "$ROUNDS"); do
    for load in idle hogs4 hogs16 fsync; do
        for n in "${names[@]}"; do
            m=$W/$n/mnt
            pids=()
            case $load in
            hogs4 | hogs16)
                for _ in $(seq "${load#hogs}"); do
                    yes > /dev/null &
                    pids+=($!)
                done
                sleep 0.5
                ;;
            fsync)
                fsync_loop "$m" 30 &
                pids+=($!)
                sleep 0.5
                ;;
            esac
            if [ "$load" = fsync ]; then
                res=$(stat_lat "$m" 0)
            else
                res=$(stat_lat "$m")
            fi
            [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2> /dev/null || true
            wait 2> /dev/null || true
            read -r p50 p99 p999 max total <<< "$res"
            printf '%-8s %-14s %8s %8s %8s %8s %9s\n' "$load" "$n" "$p50" "$p99" "$p999" "$max" "$total"
        done
    done
done
