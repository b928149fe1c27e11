#!/usr/bin/env bash
# tests/peer/fsx.sh: run the File System eXerciser (crate fsx 0.3.2) against a
# file on a fresh snapfs mount: several seeds, each a long pseudorandom
# sequence of reads, writes, mmap I/O, truncates, fsync/fdatasync,
# posix_fallocate, hole punching and copy_file_range, verifying every read.
# Operation mix and file size: tests/peer/fsx.toml.
#
# usage: tests/peer/fsx.sh
#
# Environment (besides the PEER_* knobs described in common.sh):
#   SNAPFS        snapfs binary (default target/release/snapfs)
#   FSX_SEEDS     space-separated seeds (default "1 2 3")
#   FSX_OPS       operations per seed (default 100000)
#   FSX_CONFIG    fsx config file (default tests/peer/fsx.toml)
#   FSX_TIMEOUT   time limit per seed, timeout(1) syntax (default 20m)
#   FSX_SNAPSHOT_EVERY  seconds; when set, a snapshot of the mount is taken
#                 this often while fsx runs, and afterwards every snapshot's
#                 copy of the fsx file must read back whole (no EIO) and the
#                 store's fsck must stay clean
# Exits non-zero if any seed fails (or the store's fsck fails afterwards);
# failure logs and fsx's expected-contents file are saved under
# ${PEER_ARTIFACTS_DIR:-${TMPDIR:-/tmp}/snapfs-peer-artifacts}.
set -euo pipefail

# shellcheck source=tests/peer/common.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PEER_NAME=fsx

case ${1:-} in
-h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    exit 0
    ;;
"") ;;
*) peer_die "unexpected argument '$1'" ;;
esac

seeds=${FSX_SEEDS:-1 2 3}
ops=${FSX_OPS:-100000}
config=${FSX_CONFIG:-$PEER_REPO_ROOT/tests/peer/fsx.toml}
seed_timeout=${FSX_TIMEOUT:-20m}
[ -f "$config" ] || peer_die "fsx config $config not found"
command -v timeout >/dev/null || peer_die "timeout (coreutils) is required"

fsx_bin=$(peer_ensure_cargo_tool fsx fsx 0.3.2)

peer_init fsx
peer_setup_target fsx

passed=0
failed=0
results=()
for seed in $seeds; do
    file="$PEER_TARGET/fsx-$seed.dat"
    log="$PEER_WORK/logs/fsx-$seed.log"
    artifacts="$PEER_WORK/artifacts-$seed"
    mkdir -p "$artifacts"
    cmd=(timeout --kill-after=30 "$seed_timeout" "$fsx_bin" -f "$config" -N "$ops" -S "$seed" -P "$artifacts" "$file")
    peer_log "seed $seed: ${cmd[*]}"
    start=$SECONDS
    rc=0
    snapper=""
    if [ -n "${FSX_SNAPSHOT_EVERY:-}" ] && [ -n "${PEER_MNT:-}" ]; then
        (
            n=0
            while :; do
                sleep "$FSX_SNAPSHOT_EVERY"
                n=$((n + 1))
                mkdir "$PEER_MNT/.snapshots/fsx-$seed-$n" || exit 1
            done
        ) &
        snapper=$!
    fi
    peer_run --quiet "$log" "${cmd[@]}" || rc=$?
    elapsed=$((SECONDS - start))
    if [ -n "$snapper" ]; then
        kill "$snapper" 2>/dev/null || true
        wait "$snapper" 2>/dev/null || true
        taken=0
        for snap in "$PEER_MNT/.snapshots/fsx-$seed-"*; do
            [ -d "$snap" ] || continue
            taken=$((taken + 1))
            copy="$snap/fsx/fsx-$seed.dat"
            if [ -e "$copy" ] && ! cat "$copy" >/dev/null; then
                echo "snapshot $snap: the fsx file does not read back"
                rc=1
            fi
        done
        peer_log "seed $seed: $taken snapshots taken while fsx ran, all readable"
        [ "$taken" -gt 0 ] || { echo "no snapshot was taken during fsx"; rc=1; }
    fi
    if [ "$rc" -eq 0 ] && grep -q 'All operations completed A-OK!' "$log"; then
        line="fsx seed $seed: PASS ($ops ops, ${elapsed}s)"
        passed=$((passed + 1))
    else
        case $rc in
        124 | 137) why="timed out after $seed_timeout" ;;
        *) why="exit status $rc" ;;
        esac
        line="fsx seed $seed: FAIL ($why, ${elapsed}s)"
        failed=$((failed + 1))
        echo "---- last 60 lines of the fsx log for seed $seed ----"
        tail -n 60 "$log"
        echo "---- end of log ----"
        cp "$log" "$artifacts"/ 2>/dev/null || true
        cp "$file" "$artifacts/fsx-$seed.dat.actual" 2>/dev/null || true
        peer_save_artifacts "fsx-seed-$seed" "$artifacts"/.
    fi
    echo "$line"
    results+=("$line")
done

fsck_line=""
if ! peer_finish; then
    fsck_line="fsx: unmount or fsck of the store failed"
    failed=$((failed + 1))
fi

echo
echo "== fsx results ($(wc -w <<<"$seeds") seeds x $ops ops, config ${config#"$PEER_REPO_ROOT"/}) =="
printf '%s\n' "${results[@]}"
[ -z "$fsck_line" ] || echo "$fsck_line"
echo "fsx: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
