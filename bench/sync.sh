#!/usr/bin/env bash
# bench/sync.sh: replication side by side, over loopback TCP, in one run:
#   snapfs sync (to a mounted replica listening on TCP), rsync -a (to an rsync daemon, ext4 to ext4) and
#   btrfs send | receive (two btrfs filesystems on loop devices, through socat).
# The volume: SIZE_MIB of data, a quarter of it duplicates of other files. Measured:
# a full sync, an incremental after changing 1% of the volume in place, and a sync
# with nothing new; wall time (until the destination is durable: each run ends with
# `sync -f` there) and bytes on the wire (payload and total for snapfs, rsync's
# "Total bytes sent/received", the size of btrfs's send stream).
#
# usage: bench/sync.sh [OUT.md]   (default: print the table)
#   SIZE_MIB=2048  RUNS=7  SNAPFS=target/release/snapfs
# Needs root (mounts, loop devices), btrfs in the kernel, and about 4 x SIZE_MIB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
SNAPFS=$(readlink -m "${SNAPFS:-${CARGO_TARGET_DIR:-target}/release/snapfs}")
SIZE_MIB=${SIZE_MIB:-2048}
RUNS=${RUNS:-7} # of each nothing-new sync (the median is shown)
[ -x "$SNAPFS" ] || cargo build --release --quiet
need=()
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v rsync >/dev/null || need+=(rsync)
command -v socat >/dev/null || need+=(socat)
command -v openssl >/dev/null || need+=(openssl)
command -v ss >/dev/null || need+=(iproute2)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

work=$(mktemp -d /var/tmp/snapfs-syncbench.XXXXXX)
pids=()
loops=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for m in "$work/snap-mnt" "$work/snap-dst-mnt" "$work/snap-dst2-mnt" "$work/btrfs-a" "$work/btrfs-b"; do
        mountpoint -q "$m" && umount "$m"
    done
    for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
log() { printf '[sync-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now_ns() { date +%s%N; }
secs_since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN {printf "%.3f", (b - a) / 1e9}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---------------------------------------------------------------- the data
# Unique files of 16 MiB from a seeded generator (the same bytes for every tool), and
# copies of some of them: a quarter of the volume duplicated.
data=$work/data
# stream SEED: endless pseudo-random bytes (ended by the reader: SIGPIPE is expected).
stream() { openssl enc -aes-128-ctr -pass "pass:$1" -nosalt -pbkdf2 -in /dev/zero 2>/dev/null || true; }
mkdir -p "$data/u" "$data/dup"
files=$((SIZE_MIB * 3 / 4 / 16))
dups=$((SIZE_MIB / 4 / 16))
log "writing $files unique files and $dups duplicates of 16 MiB"
for ((i = 0; i < files; i++)); do
    stream "seed$i" | head -c $((16 << 20)) > "$data/u/f$i"
done
for ((i = 0; i < dups; i++)); do cp "$data/u/f$i" "$data/dup/f$i"; done
# 1% of the volume, changed in place: 1 MiB in the middle of that many unique files.
changes=$((SIZE_MIB / 100))
stream change | head -c $((changes << 20)) > "$work/patch"
change() { # DIR: apply the 1% change to the tree at DIR
    for ((i = 0; i < changes; i++)); do
        dd if="$work/patch" of="$1/u/f$((i * 3 % files))" bs=1M skip="$i" seek=7 count=1 \
            conv=notrunc status=none
    done
}
unique_mib=$((files * 16))

# ---------------------------------------------------------------- snapfs
log "snapfs"
mkdir -p "$work/snap-mnt"
"$SNAPFS" mount "$work/snap-src" "$work/snap-mnt"
cp -a "$data/." "$work/snap-mnt/"
"$SNAPFS" snapshot create "$work/snap-mnt" s1 >/dev/null
head -c 32 /dev/urandom | base64 > "$work/key" && chmod 600 "$work/key"
p=$(port)
# The destination: a mounted replica whose daemon listens on TCP (it keeps the store
# open between sessions, as a replica in service does).
mkdir -p "$work/snap-dst-mnt"
"$SNAPFS" mount "$work/snap-dst" "$work/snap-dst-mnt" -o "listen=127.0.0.1:$p,key_file=$work/key"
snap_sync() { # NAME [warm] [PORT]: a sync, its summary kept in $work/NAME.json, the CLI's CPU seconds in $work/NAME.cpu
    [ "${2:-}" = warm ] || drop
    local t0
    t0=$(now_ns)
    /usr/bin/time -f '%U %S' -o "$work/$1.cpu" \
        "$SNAPFS" sync "$work/snap-mnt" "tcp://127.0.0.1:${3:-$p}" --key-file "$work/key" --json > "$work/$1.json"
    secs_since "$t0"
}
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$work/$1.json" "$2"; }
cpu() { awk '{printf "%.2f", $1 + $2}' "$work/$1.cpu"; }
s_full=$(snap_sync full)
# The same full sync into a second new replica, the relay (the CLI between the
# source's daemon and the TCP connection) copying extents through its memory instead
# of splicing them from socket to socket.
p2=$(port)
mkdir -p "$work/snap-dst2-mnt"
"$SNAPFS" mount "$work/snap-dst2" "$work/snap-dst2-mnt" -o "listen=127.0.0.1:$p2,key_file=$work/key"
s_full_copy=$(SNAPFS_SYNC_SPLICE=0 snap_sync fullcopy cold "$p2")
umount "$work/snap-dst2-mnt"
rm -rf "$work/snap-dst2"
change "$work/snap-mnt"
"$SNAPFS" snapshot create "$work/snap-mnt" s2 >/dev/null
s_inc=$(snap_sync inc)
# Nothing new: an empty snapshot each time (as btrfs's send -p of an unchanged one),
# RUNS times with the caches dropped and RUNS times warm; the median of each.
snap_none() { # cold|warm: the median of RUNS syncs, each of one new empty snapshot
    local i ts=()
    for ((i = 0; i < RUNS; i++)); do
        "$SNAPFS" snapshot create "$work/snap-mnt" "n$1$i" >/dev/null
        ts+=("$(snap_sync "none$1" "$1")")
    done
    median "${ts[@]}"
}
s_none=$(snap_none cold)
s_warm=$(snap_none warm)
umount "$work/snap-mnt"
umount "$work/snap-dst-mnt"

# ---------------------------------------------------------------- btrfs
log "btrfs"
for fsn in a b; do
    truncate -s $((SIZE_MIB * 2 + 1024))M "$work/btrfs-$fsn.img"
    l=$(losetup -f --show "$work/btrfs-$fsn.img")
    loops+=("$l")
    mkfs.btrfs -q -f "$l"
    mkdir -p "$work/btrfs-$fsn"
    mount "$l" "$work/btrfs-$fsn"
done
A=$work/btrfs-a B=$work/btrfs-b
btrfs -q subvolume create "$A/vol"
cp -a "$data/." "$A/vol/"
btrfs -q subvolume snapshot -r "$A/vol" "$A/s1"
bp=$(port)
btrfs_run() { # SNAP [PARENT [warm]]: send | socat | receive; prints the seconds
    local snap=$1 parent=${2:-} t0
    local args=("$A/$snap")
    [ -n "$parent" ] && args=(-p "$A/$parent" "$A/$snap")
    [ "${3:-}" = warm ] || drop
    # The receiver listens first (seen listening without connecting to it).
    socat -u "TCP-LISTEN:$bp,bind=127.0.0.1,reuseaddr" - | btrfs -q receive "$B" &
    local rx=$!
    until ss -Hltn "sport = :$bp" | grep -q LISTEN; do sleep 0.01; done
    t0=$(now_ns)
    btrfs -q send "${args[@]}" | socat -u - "TCP:127.0.0.1:$bp"
    wait "$rx"
    sync -f "$B"
    secs_since "$t0"
}
b_full=$(btrfs_run s1)
b_full_bytes=$(btrfs -q send "$A/s1" | wc -c)
change "$A/vol"
btrfs -q subvolume snapshot -r "$A/vol" "$A/s2"
b_inc=$(btrfs_run s2 s1)
b_inc_bytes=$(btrfs -q send -p "$A/s1" "$A/s2" | wc -c)
btrfs_none() { # cold|warm: as snap_none
    local i ts=() prev=${last_b:-s2}
    for ((i = 0; i < RUNS; i++)); do
        btrfs -q subvolume snapshot -r "$A/vol" "$A/n$1$i"
        ts+=("$(btrfs_run "n$1$i" "$prev" "$1")")
        prev=n$1$i
    done
    last_b=$prev
    median "${ts[@]}"
}
b_none=$(btrfs_none cold)
b_none_bytes=$(btrfs -q send -p "$A/ncold0" "$A/ncold1" | wc -c)
last_b=ncold$((RUNS - 1))
b_warm=$(btrfs_none warm)

# ---------------------------------------------------------------- rsync
log "rsync"
mkdir -p "$work/rsync-dst"
rp=$(port)
cat > "$work/rsyncd.conf" <<EOF
pid file = $work/rsyncd.pid
use chroot = no
[dst]
path = $work/rsync-dst
read only = no
uid = root
gid = root
EOF
rsync --daemon --no-detach --config="$work/rsyncd.conf" --port="$rp" --address=127.0.0.1 &
pids+=($!)
until (exec 3<>"/dev/tcp/127.0.0.1/$rp") 2>/dev/null; do sleep 0.1; done
rsync_run() { # NAME [warm]: an rsync, its --stats kept in $work/NAME.stats
    local name=$1 t0
    [ "${2:-}" = warm ] || drop
    t0=$(now_ns)
    rsync -a --stats "$data/" "rsync://127.0.0.1:$rp/dst/" > "$work/$name.stats"
    sync -f "$work/rsync-dst"
    secs_since "$t0"
}
rbytes() { awk -F': ' '/Total bytes sent/ {gsub(/,/,"",$2); s=$2} /Total bytes received/ {gsub(/,/,"",$2); r=$2} END {print s + r}' "$work/$1.stats"; }
r_full=$(rsync_run rfull)
change "$data"
r_inc=$(rsync_run rinc)
r_none=$(rsync_run rnone)
r_warm=$(rsync_run rwarm warm)

# ---------------------------------------------------------------- the table
row() { printf '| %s | %s | %s | %s |\n' "$@"; }
table=$(
    printf '| sync of a %d MiB volume (%d MiB unique, 25%% duplicated), loopback TCP | wall time | payload | bytes on the wire |\n' "$SIZE_MIB" "$unique_mib"
    echo "|---|---:|---:|---:|"
    row "snapfs sync, full (relay splices; its CPU $(cpu full) s)" "${s_full} s" "$(mib "$(field full payload_bytes)") MiB" "$(mib "$(field full wire_bytes)") MiB"
    row "snapfs sync, full, relay copies (SNAPFS_SYNC_SPLICE=0; its CPU $(cpu fullcopy) s)" "${s_full_copy} s" "$(mib "$(field fullcopy payload_bytes)") MiB" "$(mib "$(field fullcopy wire_bytes)") MiB"
    row "btrfs send \| receive, full" "${b_full} s" "" "$(mib "$b_full_bytes") MiB"
    row "rsync -a, full" "${r_full} s" "" "$(mib "$(rbytes rfull)") MiB"
    row "snapfs sync, incremental ($changes MiB changed)" "${s_inc} s" "$(mib "$(field inc payload_bytes)") MiB" "$(mib "$(field inc wire_bytes)") MiB"
    row "btrfs send -p \| receive, incremental" "${b_inc} s" "" "$(mib "$b_inc_bytes") MiB"
    row "rsync -a (delta over the daemon), incremental" "${r_inc} s" "" "$(mib "$(rbytes rinc)") MiB"
    row "snapfs sync, nothing new (median of $RUNS)" "${s_none} s" "$(mib "$(field nonecold payload_bytes)") MiB" "$(field nonecold wire_bytes) B"
    row "btrfs send -p \| receive, nothing new (median of $RUNS)" "${b_none} s" "" "$b_none_bytes B"
    row "rsync -a, nothing new" "${r_none} s" "" "$(rbytes rnone) B"
    row "snapfs sync, nothing new, caches warm (median of $RUNS)" "${s_warm} s" "" "$(field nonewarm wire_bytes) B"
    row "btrfs send -p \| receive, nothing new, caches warm (median of $RUNS)" "${b_warm} s" "" ""
    row "rsync -a, nothing new, caches warm" "${r_warm} s" "" "$(rbytes rwarm) B"
    row "snapfs full / btrfs full, wall time" "$(awk -v a="$s_full" -v b="$b_full" 'BEGIN {printf "%.2fx", a/b}')" "" ""
)
echo "$table"
if [ -n "${1:-}" ]; then
    {
        echo "## Sync"
        echo
        echo "Machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB, $(uname -r); stores and ext4 directories on $(df -T "$work" | awk 'NR==2 {print $2}'), btrfs on loop files there."
        echo "Command: \`bench/sync.sh\` ($(date -u +%Y-%m-%d)). Caches dropped before each run but the \"caches warm\" ones; each run ends when the destination is synced (\`sync -f\`; snapfs commits durably itself)."
        echo
        echo "$table"
    } > "$1"
fi
