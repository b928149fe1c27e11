#!/usr/bin/env bash
# bench/s3.sh: backups into S3-compatible object storage side by side, in one run,
# against one Garage server on loopback: `snapfs sync` of a mounted volume to
# s3://bench/snapfs, and `restic backup` (Debian's restic) of the same tree to
# s3://bench/restic.
# Volumes of SIZE_MIB (random data; the machine's /usr files; 4 KiB files), a
# quarter of each duplicates of other files; `random@1M` is the random tree again in a
# snapfs volume made with `-o block_size=1M` (restic is run again beside it). Measured:
# a full backup, an incremental after changing 1% of the volume in place, and a
# restore of the newest: wall time, bytes added to the bucket, and S3 requests (from
# Garage's metrics), and the restore's peak memory; and after each full backup, the
# bucket's bytes by kind of object.
#
# With HISTORY=N (N > 0), also: a volume of N snapshots (3 new files of 100 KB each)
# in one bucket, reached through bench/lagproxy.py with a round trip of RTT_MS: fsck,
# fsck --read-data, gc --dry-run, diff of the first and the last, and restores, each
# with --jobs 1 (every manifest and pack read in turn) and the default --jobs 8; and
# a sync of one more snapshot with the pack indexes kept on this machine or not.
#
# usage: bench/s3.sh [OUT.md]   (default: print the table)
#   SIZE_MIB=1024  TREES="random random@1M usr small"  HISTORY=0  RTT_MS=20
#   SNAPFS=target/release/snapfs  GARAGE=~/.cache/snapfs/garage-2.3.0/bin/garage
# Needs root (the snapfs mount), and about 5 x SIZE_MIB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
SNAPFS=$(readlink -m "${SNAPFS:-${CARGO_TARGET_DIR:-target}/release/snapfs}")
SIZE_MIB=${SIZE_MIB:-1024}
GARAGE=${GARAGE:-$HOME/.cache/snapfs/garage-2.3.0/bin/garage}
[ -x "$SNAPFS" ] || cargo build --release --quiet
if [ ! -x "$GARAGE" ]; then
    cargo install garage --version 2.3.0 --locked --root "$(dirname "$(dirname "$GARAGE")")"
fi
need=()
command -v restic >/dev/null || need+=(restic)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

work=$(mktemp -d /var/tmp/snapfs-s3bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for m in "$work/snap-mnt" "$work/restored-mnt"; do
        mountpoint -q "$m" && umount "$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT
log() { printf '[s3-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now_ns() { date +%s%N; }
secs_since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN {printf "%.2f", (b - a) / 1e9}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---------------------------------------------------------------- Garage
rpc=$(port) s3=$(port) admin=$(port)
cat > "$work/garage.toml" <<EOF
metadata_dir = "$work/garage/meta"
data_dir = "$work/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(openssl rand -hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
metrics_token = "bench"
admin_token = "bench"
EOF
g() { "$GARAGE" -c "$work/garage.toml" "$@"; }
g server > "$work/garage.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do g node id -q > "$work/node" 2>/dev/null && break; sleep 0.2; done
node=$(cut -d@ -f1 "$work/node")
# `node id` reads the node's key from disk; the layout needs the server up, which
# may take a moment longer.
for i in $(seq 100); do
    g layout assign -z dc1 -c 100G "$node" >/dev/null 2>&1 && break
    [ "$i" -lt 100 ] || { cat "$work/garage.log" >&2; exit 1; }
    sleep 0.2
done
g layout apply --version 1 >/dev/null
g key create bench > "$work/key.txt"
g bucket create bench >/dev/null
g bucket allow --read --write --owner bench --key bench >/dev/null
export AWS_ENDPOINT_URL=http://127.0.0.1:$s3 AWS_REGION=garage
AWS_ACCESS_KEY_ID=$(awk '/Key ID:/ {print $3}' "$work/key.txt")
AWS_SECRET_ACCESS_KEY=$(awk '/Secret key:/ {print $3}' "$work/key.txt")
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
export AWS_DEFAULT_REGION=garage RESTIC_PASSWORD=bench
# S3 requests Garage has served so far, all kinds.
requests() {
    curl -s -H "Authorization: Bearer bench" "http://127.0.0.1:$admin/metrics" |
        awk '/^api_s3_request_counter/ {n += $NF} END {printf "%d", n}'
}
# Bytes of the objects in the bucket (as Garage counts them; its data directory may
# hold less: it dedups and compresses blocks itself).
bucket_bytes() {
    curl -s -H "Authorization: Bearer bench" "http://127.0.0.1:$admin/v2/GetBucketInfo?globalAlias=bench" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["bytes"])'
}

# The bucket's objects under PREFIX/ by kind, as "KIND BYTES" lines: what a
# backup's bytes went to (snapfs: packs, their indexes, manifests, the root;
# restic: data packs with their headers, indexes, snapshots, keys and config).
breakdown() { # PREFIX
    curl -s --aws-sigv4 "aws:amz:garage:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
        -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
        "http://127.0.0.1:$s3/bench?list-type=2&max-keys=1000&prefix=$1%2F" |
        python3 -c '
import re, sys, collections
xml = sys.stdin.read()
if "<IsTruncated>true" in xml:
    sys.exit("more than 1000 objects: not counted")
kinds = collections.Counter()
for key, size in re.findall(r"<Key>([^<]*)</Key>.*?<Size>(\d+)</Size>", xml, re.S):
    rest = key.split("/", 1)[1]
    if rest.startswith("packs/"):
        kind = "packs/*" + rest[rest.rindex("."):]
    else:
        kind = rest.split("/")[0] + ("/" if "/" in rest else "")
    kinds[kind] += int(size)
for kind, n in sorted(kinds.items()):
    print(kind, n)
'
}

# ---------------------------------------------------------------- the trees
# Trees of SIZE_MIB, each a quarter duplicates of other files:
#   random: files of random bytes (nothing compresses);
#   usr:    the machine's own /usr files in path order (binaries, libraries, text),
#           as real volumes hold;
#   small:  files of 4 KiB of random bytes in 512 directories (many files: what a
#           tool holds per file shows), 5 of which the change extends.
# The incremental follows a change of 1% of the volume in place, in 1 MiB pieces.
stream() { openssl enc -aes-128-ctr -pass "pass:$1" -nosalt -pbkdf2 -in /dev/zero 2>/dev/null || true; }
changes=$((SIZE_MIB / 100))
stream change | head -c $((changes << 20)) > "$work/patch"
make_tree() { # KIND DIR: writes the tree, and DIR.big: the files the change hits
    local kind=$1 dir=$2 files dups
    mkdir -p "$dir/u" "$dir/dup"
    case $kind in
    random)
        files=$((SIZE_MIB * 3 / 4 / 16))
        dups=$((SIZE_MIB / 4 / 16))
        for ((i = 0; i < files; i++)); do stream "seed$i" | head -c $((16 << 20)) > "$dir/u/f$i"; done
        for ((i = 0; i < dups; i++)); do cp "$dir/u/f$i" "$dir/dup/f$i"; done
        for ((i = 0; i < changes; i++)); do echo "u/f$((i * 3 % files))"; done > "$dir.big"
        ;;
    small)
        python3 - "$dir" "$SIZE_MIB" "$changes" <<'PY'
import os, sys
out, size, changes = sys.argv[1], int(sys.argv[2]) << 20, int(sys.argv[3])
files, dups = size * 3 // 4 // 4096, size // 4 // 4096
for d in range(512):
    os.makedirs(os.path.join(out, "u", "d%03d" % d))
    os.makedirs(os.path.join(out, "dup", "d%03d" % d))
name = lambda i: "d%03d/file-%07d" % (i % 512, i)
for i in range(files):
    with open(os.path.join(out, "u", name(i)), "wb") as f:
        f.write(os.urandom(4096))
for i in range(dups):
    with open(os.path.join(out, "u", name(i)), "rb") as f, open(os.path.join(out, "dup", name(i)), "wb") as g:
        g.write(f.read())
with open(out + ".big", "w") as f:
    for i in range(changes):
        f.write("u/" + name(i * 7 % files) + "\n")
PY
        ;;
    usr)
        python3 - "$dir" "$SIZE_MIB" "$changes" <<'PY'
import os, shutil, sys
out, size, changes = sys.argv[1], int(sys.argv[2]) << 20, int(sys.argv[3])
taken, total = [], 0
for root, dirs, names in os.walk("/usr"):
    dirs.sort()
    for n in sorted(names):
        src = os.path.join(root, n)
        if not os.path.isfile(src) or os.path.islink(src) or total >= size * 3 // 4:
            continue
        rel = os.path.relpath(src, "/usr")
        os.makedirs(os.path.join(out, "u", os.path.dirname(rel)), exist_ok=True)
        shutil.copyfile(src, os.path.join(out, "u", rel))
        taken.append((rel, os.path.getsize(src)))
        total += taken[-1][1]
dup = 0
for rel, n in taken:
    if dup >= size // 4:
        break
    os.makedirs(os.path.join(out, "dup", os.path.dirname(rel)), exist_ok=True)
    shutil.copyfile(os.path.join(out, "u", rel), os.path.join(out, "dup", rel))
    dup += n
# The change: 1 MiB in place in each of the largest files (2 MiB and more, as a
# machine's /usr has; else the largest there are, which the change extends).
big = sorted(taken, key=lambda r: -r[1])
big = [r for r in big if r[1] >= 2 << 20] or big[:max(changes, 1)]
if not big:
    sys.exit("/usr has no files to build the tree from")
with open(out + ".big", "w") as f:
    for i in range(changes):
        f.write("u/" + big[i % len(big)][0] + "\n")
PY
        ;;
    esac
}
change() { # DIR LIST
    local i=0 f
    while read -r f; do
        dd if="$work/patch" of="$1/$f" bs=1M skip="$i" seek=1 count=1 conv=notrunc status=none
        i=$((i + 1))
    done < "$2"
}

# Each run: wall seconds, bytes added to the bucket, requests, and the command's
# peak resident memory (KiB).
declare -A T B R M
run() { # KEY CMD...
    local key=$1 t0 b0 r0
    shift
    drop
    b0=$(bucket_bytes)
    r0=$(requests)
    t0=$(now_ns)
    /usr/bin/time -f %M -o "$work/$key.rss" "$@" > "$work/$key.out"
    T[$key]=$(secs_since "$t0")
    M[$key]=$(tail -n 1 "$work/$key.rss")
    B[$key]=$(($(bucket_bytes) - b0))
    R[$key]=$(($(requests) - r0))
}

bench_tree() { # KIND[@BLOCK_SIZE]: the tree, and the block size of the snapfs volume
    local k=${1//@/-bs} kind=${1%@*} bs="" data=$work/data-${1//@/-bs} mnt=$work/snap-mnt
    [[ $1 != *@* ]] || bs=${1#*@}
    log "$k tree: writing $SIZE_MIB MiB"
    make_tree "$kind" "$data"
    log "$k tree: snapfs${bs:+ (block_size=$bs)}"
    mkdir -p "$mnt"
    "$SNAPFS" mount "$work/snap-src-$k" "$mnt" ${bs:+-o "block_size=$bs"}
    cp -a "$data/." "$mnt/"
    "$SNAPFS" snapshot create "$mnt" s1 >/dev/null
    run "$k.snap_full" "$SNAPFS" sync "$mnt" "s3://bench/snapfs-$k" --json
    breakdown "snapfs-$k" > "$work/$k.snap_parts"
    change "$mnt" "$data.big"
    "$SNAPFS" snapshot create "$mnt" s2 >/dev/null
    run "$k.snap_inc" "$SNAPFS" sync "$mnt" "s3://bench/snapfs-$k" --json
    umount "$mnt"
    run "$k.snap_restore" "$SNAPFS" restore "s3://bench/snapfs-$k" "$work/restored-$k" --only s2
    run "$k.snap_restore_all" "$SNAPFS" restore "s3://bench/snapfs-$k" "$work/restored-all-$k"
    log "$k tree: restic"
    local repo="s3:http://127.0.0.1:$s3/bench/restic-$k"
    restic -q -r "$repo" init
    run "$k.restic_full" restic -q -r "$repo" backup "$data"
    breakdown "restic-$k" > "$work/$k.restic_parts"
    change "$data" "$data.big"
    run "$k.restic_inc" restic -q -r "$repo" backup "$data"
    run "$k.restic_restore" restic -q -r "$repo" restore latest --target "$work/restic-restored-$k"
    rm -rf "$data" "$work/restored-$k" "$work/restored-all-$k" "$work/restic-restored-$k" "$work/snap-src-$k"
}

TREES=${TREES:-random random@1M usr small}
for k in $TREES; do bench_tree "$k"; done

# ---------------------------------------------------------------- a long history
HISTORY=${HISTORY:-0} RTT_MS=${RTT_MS:-20}
bench_history() {
    local mnt=$work/snap-mnt i f url=s3://bench/history lag jobs
    log "history: $HISTORY snapshots"
    mkdir -p "$mnt"
    "$SNAPFS" mount "$work/history-src" "$mnt"
    for ((i = 1; i <= HISTORY; i++)); do
        for f in 1 2 3; do stream "h$i-$f" | head -c 100000 > "$mnt/f$i-$f"; done
        "$SNAPFS" snapshot create "$mnt" "s$i" >/dev/null
    done
    "$SNAPFS" sync "$mnt" "$url" --json > /dev/null
    umount "$mnt"
    lag=$(port)
    python3 bench/lagproxy.py "$lag" "$s3" "$((RTT_MS / 2))" &
    pids+=($!)
    sleep 0.5
    for jobs in 1 8; do
        log "history: --jobs $jobs, through a round trip of $RTT_MS ms"
        AWS_ENDPOINT_URL=http://127.0.0.1:$lag run "h$jobs.fsck" "$SNAPFS" --jobs $jobs fsck "$url"
        AWS_ENDPOINT_URL=http://127.0.0.1:$lag run "h$jobs.fsck_data" "$SNAPFS" --jobs $jobs fsck --read-data "$url"
        AWS_ENDPOINT_URL=http://127.0.0.1:$lag run "h$jobs.gc" "$SNAPFS" --jobs $jobs gc --dry-run "$url"
        AWS_ENDPOINT_URL=http://127.0.0.1:$lag run "h$jobs.diff" "$SNAPFS" --jobs $jobs diff "$url" s1 "s$HISTORY"
        AWS_ENDPOINT_URL=http://127.0.0.1:$lag run "h$jobs.restore" "$SNAPFS" --jobs $jobs restore "$url" "$work/h-restored-$jobs"
        AWS_ENDPOINT_URL=http://127.0.0.1:$lag run "h$jobs.restore_one" "$SNAPFS" --jobs $jobs restore "$url" "$work/h-one-$jobs" --only "s$HISTORY"
    done
    # A sync of one more snapshot (--jobs 8), reading every pack index from the
    # bucket (SNAPFS_S3_INDEX_CACHE=off) or only those this machine does not keep
    # (after one sync through the proxy has kept them), twice each, alternating.
    "$SNAPFS" mount "$work/history-src" "$mnt"
    AWS_ENDPOINT_URL=http://127.0.0.1:$lag "$SNAPFS" sync "$mnt" "$url" > /dev/null
    for i in 1 2; do
        for mode in off on; do
            stream "hs-$mode-$i" | head -c 100000 > "$mnt/g-$mode-$i"
            "$SNAPFS" snapshot create "$mnt" "t-$mode-$i" > /dev/null
            AWS_ENDPOINT_URL=http://127.0.0.1:$lag SNAPFS_S3_INDEX_CACHE=$mode \
                run "hsync.$mode$i" "$SNAPFS" sync "$mnt" "$url"
        done
    done
    umount "$mnt"
}
[ "$HISTORY" -gt 0 ] && bench_history

# ---------------------------------------------------------------- the table
table() {
    local t k bs
    for t in $TREES; do
        k=${t//@/-bs} bs=""
        [[ $t != *@* ]] || bs=", snapfs volume of block_size=${t#*@}"
        echo "| ${SIZE_MIB} MiB, ${t%@*} tree, a quarter duplicates$bs | snapfs sync | restic backup |"
        echo "|---|---|---|"
        echo "| full: wall s | ${T[$k.snap_full]} | ${T[$k.restic_full]} |"
        echo "| full: MiB added to the bucket | $(mib "${B[$k.snap_full]}") | $(mib "${B[$k.restic_full]}") |"
        echo "| full: S3 requests | ${R[$k.snap_full]} | ${R[$k.restic_full]} |"
        echo "| incremental (1% changed): wall s | ${T[$k.snap_inc]} | ${T[$k.restic_inc]} |"
        echo "| incremental: MiB added | $(mib "${B[$k.snap_inc]}") | $(mib "${B[$k.restic_inc]}") |"
        echo "| incremental: S3 requests | ${R[$k.snap_inc]} | ${R[$k.restic_inc]} |"
        echo "| restore of the newest: wall s | ${T[$k.snap_restore]} | ${T[$k.restic_restore]} |"
        echo "| restore: S3 requests | ${R[$k.snap_restore]} | ${R[$k.restic_restore]} |"
        echo "| restore: peak memory, MiB | $((M[$k.snap_restore] >> 10)) | $((M[$k.restic_restore] >> 10)) |"
        echo "| restore of every snapshot (snapfs: both, as a volume with its history): wall s | ${T[$k.snap_restore_all]} | - |"
        echo
        echo "| ${t%@*} tree$bs, after the full backup: objects by kind | bytes |"
        echo "|---|---|"
        awk '{printf "| snapfs %s | %d |\n", $1, $2}' "$work/$k.snap_parts"
        awk '{printf "| restic %s | %d |\n", $1, $2}' "$work/$k.restic_parts"
        echo
    done
    [ "$HISTORY" -gt 0 ] || return 0
    echo "| $HISTORY snapshots in a bucket, a round trip of $RTT_MS ms: wall s | --jobs 1 | --jobs 8 |"
    echo "|---|---|---|"
    local what
    for what in "fsck:fsck" "fsck --read-data:fsck_data" "gc --dry-run:gc" "diff s1 s$HISTORY:diff" \
        "restore (every snapshot):restore" "restore --only s$HISTORY:restore_one"; do
        echo "| ${what%%:*} | ${T[h1.${what#*:}]} | ${T[h8.${what#*:}]} |"
    done
    echo
    echo "| sync of one more snapshot to those $HISTORY, --jobs 8 | every pack index read from the bucket | indexes kept on this machine |"
    echo "|---|---|---|"
    echo "| wall s (two runs) | ${T[hsync.off1]}, ${T[hsync.off2]} | ${T[hsync.on1]}, ${T[hsync.on2]} |"
    echo "| S3 requests | ${R[hsync.off1]}, ${R[hsync.off2]} | ${R[hsync.on1]}, ${R[hsync.on2]} |"
    echo
}
if [ $# -gt 0 ]; then table > "$1"; else table; fi
