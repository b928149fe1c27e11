#!/usr/bin/env bash
# bench/snapshots.sh: how snapshot creation scales with volume size, and how `snapfs
# diff` of a few changes compares with a full stat walk of the volume.
#
# usage: bench/snapshots.sh [OUT.md]   (default: print the table)
#   SIZES="1000 100000 1000000"  volume sizes in (empty) files
#   RUNS=5                       timed repetitions; the median is reported
#   SNAPFS=target/release/snapfs
# Needs root (mounts) and about 1 GiB of disk for the largest volume.
set -euo pipefail
cd "$(dirname "$0")/.."
SNAPFS=${SNAPFS:-${CARGO_TARGET_DIR:-target}/release/snapfs}
SIZES=${SIZES:-"1000 100000 1000000"}
RUNS=${RUNS:-5}
[ -x "$SNAPFS" ] || cargo build --release --quiet
work=$(mktemp -d /var/tmp/snapfs-bench.XXXXXX)
mnt=$work/mnt
cleanup() { mountpoint -q "$mnt" && umount "$mnt"; rm -rf "$work"; }
trap cleanup EXIT

now_ns() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ms() { awk -v ns="$1" 'BEGIN {printf "%.2f", ns/1e6}'; }

rows=()
declare -A create_ms
for n in $SIZES; do
    rm -rf "$work/store" && mkdir -p "$mnt"
    "$SNAPFS" mount "$work/store" "$mnt"
    dirs=$(( (n + 999) / 1000 ))
    for ((d = 0; d < dirs; d++)); do
        mkdir "$mnt/d$d"
        count=$(( n - d * 1000 < 1000 ? n - d * 1000 : 1000 ))
        (cd "$mnt/d$d" && seq 1 "$count" | sed 's/^/f/' | xargs touch)
    done
    times=()
    for ((r = 0; r < RUNS; r++)); do
        t0=$(now_ns); mkdir "$mnt/.snapshots/s$r"; t1=$(now_ns)
        times+=($((t1 - t0)))
    done
    create_ms[$n]=$(ms "$(printf '%s\n' "${times[@]}" | median)")
    rows+=("| snapshot create (mkdir .snapshots/NAME), $n files | ${create_ms[$n]} ms |")
    if [ "$n" = "$(echo "$SIZES" | tr ' ' '\n' | tail -1)" ]; then
        for i in 1 2 3 4 5 6 7 8 9 10; do echo changed > "$mnt/d$((i * 7 % dirs))/f$i"; done
        diffs=(); walks=()
        for ((r = 0; r < 3; r++)); do
            t0=$(now_ns); "$SNAPFS" diff "$mnt" s0 live > "$work/diff.txt"; t1=$(now_ns)
            diffs+=($((t1 - t0)))
            sync; echo 3 > /proc/sys/vm/drop_caches
            t0=$(now_ns); find "$mnt" -path "$mnt/.snapshots" -prune -o -type f -print0 | xargs -0 stat > /dev/null; t1=$(now_ns)
            walks+=($((t1 - t0)))
        done
        changed=$(grep -c '^M' "$work/diff.txt" || true)
        d=$(printf '%s\n' "${diffs[@]}" | median); w=$(printf '%s\n' "${walks[@]}" | median)
        rows+=("| snapfs diff s0 live, 10 files changed of $n ($changed M lines) | $(ms "$d") ms |")
        rows+=("| find -type f \| xargs stat, $n files (cold) | $(ms "$w") ms |")
        rows+=("| diff / walk | $(awk -v a="$d" -v b="$w" 'BEGIN {printf "%.3f%%", 100*a/b}') |")
    fi
    umount "$mnt"
done
first=$(echo "$SIZES" | awk '{print $1}'); last=$(echo "$SIZES" | awk '{print $NF}')
rows+=("| create time at $last / at $first files | $(awk -v a="${create_ms[$last]}" -v b="${create_ms[$first]}" 'BEGIN {printf "%.2fx", a/b}') |")

table=$(printf '%s\n' "| measurement | median of $RUNS (diff, walk: of 3) |" "|---|---|" "${rows[@]}")
echo "$table"
if [ -n "${1:-}" ]; then
    {
        echo "## Snapshots"
        echo
        echo "Machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB, $(uname -r); store on $(df -T "$work" | awk 'NR==2 {print $2}')."
        echo "Command: \`bench/snapshots.sh\` ($(date -u +%Y-%m-%d))."
        echo
        echo "$table"
    } > "$1"
fi
