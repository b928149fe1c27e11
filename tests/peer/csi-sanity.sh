#!/usr/bin/env bash
# tests/peer/csi-sanity.sh: run csi-sanity, the Kubernetes CSI conformance suite
# (kubernetes-csi/csi-test v5.2.0), against `snapfs csi`, the CSI driver, serving
# both the controller and the node service on one unix socket.
#
# usage: tests/peer/csi-sanity.sh [CSI-SANITY-ARGS...]     (as root)
#   extra arguments go to csi-sanity as they are, e.g. --ginkgo.v or
#   --ginkgo.focus='ListSnapshots'
#
# What it does:
#   1. installs Debian's golang-go when `go` is missing (unless SKIP_APT=1);
#   2. builds csi-sanity offline from the vendored source archive
#      ../shared/third_party/csi-test-*.tar.gz (from the project root) into a
#      cache, once per archive (about 15 s on 2 cores);
#   3. starts `snapfs csi --endpoint unix://WORK/csi.sock --node-id sanity-node
#      --root WORK/root --controller --node` and waits for its socket;
#   4. runs csi-sanity with the target (mount) and staging paths under WORK;
#      which specs run follows from the capabilities the driver reports (there
#      is no flag for snapshots, cloning or expansion): CREATE_DELETE_SNAPSHOT,
#      LIST_SNAPSHOTS, CLONE_VOLUME, EXPAND_VOLUME and the node's EXPAND_VOLUME
#      turn those specs on;
#   5. stops the driver, unmounts whatever is still mounted under WORK, prints
#      "csi-sanity: N passed, N failed, N skipped" and exits with csi-sanity's
#      status (a leftover mount is reported, and so is a driver that died).
#
# Needs root: NodePublishVolume mounts. Failure evidence (the driver's log,
# csi-sanity's output and JUnit report) is saved under
# ${PEER_ARTIFACTS_DIR:-${TMPDIR:-/tmp}/snapfs-peer-artifacts}.
#
# Environment (besides PEER_TMPDIR, PEER_KEEP and PEER_ARTIFACTS_DIR, see
# common.sh):
#   SNAPFS                     snapfs binary (default target/release/snapfs)
#   SKIP_APT=1                 do not install golang-go
#   CSI_SANITY_TARBALL         the csi-test source archive (default: the newest
#                              ../shared/third_party/csi-test-*.tar.gz)
#   CSI_SANITY_CACHE           where csi-sanity is built (default
#                              $HOME/.cache/snapfs/csi-sanity)
#   CSI_SANITY_VOLUME_SIZE     --csi.testvolumesize, bytes (default 67108864,
#                              64 MiB; csi-sanity's own default is 10 GiB)
#   CSI_SANITY_EXPAND_SIZE     --csi.testvolumeexpandsize, bytes (default
#                              134217728); ControllerExpandVolume must answer
#                              exactly this capacity
#   CSI_SANITY_VOLUME_PARAMETERS    YAML file of CreateVolume parameters
#   CSI_SANITY_SNAPSHOT_PARAMETERS  YAML file of CreateSnapshot parameters
#   CSI_SANITY_SKIP            regular expression: skip the specs it matches
#                              (--ginkgo.skip)
#   CSI_SANITY_FOCUS           regular expression: run only the specs it
#                              matches (--ginkgo.focus)
#   CSI_SANITY_TIMEOUT         time limit for the whole run, timeout(1) syntax
#                              (default 15m)
#   CSI_SANITY_START_TIMEOUT   seconds to wait for the driver's socket
#                              (default 30)
set -euo pipefail

# shellcheck source=tests/peer/common.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PEER_NAME=csi-sanity

peer_help_if_asked "$@"
extra_args=("$@")

peer_require_root "csi-sanity.sh"
for tool in findmnt timeout flock sha256sum tar; do
    command -v "$tool" >/dev/null || peer_die "$tool is required (apt-get install util-linux coreutils tar)"
done

volume_size=${CSI_SANITY_VOLUME_SIZE:-67108864}
expand_size=${CSI_SANITY_EXPAND_SIZE:-134217728}
run_timeout=${CSI_SANITY_TIMEOUT:-15m}
start_timeout=${CSI_SANITY_START_TIMEOUT:-30}
for f in "${CSI_SANITY_VOLUME_PARAMETERS:-}" "${CSI_SANITY_SNAPSHOT_PARAMETERS:-}"; do
    [ -z "$f" ] || [ -f "$f" ] || peer_die "parameters file $f not found"
done

# --- Go -----------------------------------------------------------------------
if ! command -v go >/dev/null; then
    if [ "${SKIP_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null; then
        peer_die "go is missing (apt-get install golang-go)"
    fi
    peer_log "installing golang-go"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends golang-go >/dev/null
    hash -r
    command -v go >/dev/null || peer_die "go not found after installing golang-go"
fi

# --- csi-sanity, built once per archive ----------------------------------------
tarball=${CSI_SANITY_TARBALL:-}
if [ -z "$tarball" ]; then
    # ../shared/third_party from the project root; the newest version wins.
    for f in "$(dirname "${BASH_SOURCE[0]}")"/../../../shared/third_party/csi-test-*.tar.gz; do
        [ ! -f "$f" ] || tarball=$f
    done
fi
if [ -z "$tarball" ] || [ ! -f "$tarball" ]; then
    peer_die "no csi-test source archive (../shared/third_party/csi-test-*.tar.gz); set CSI_SANITY_TARBALL"
fi
tarball=$(readlink -f "$tarball")
version=$(basename "$tarball" .tar.gz)
version=${version#csi-test-}

cache=${CSI_SANITY_CACHE:-$HOME/.cache/snapfs/csi-sanity}
sum=$(sha256sum "$tarball" | cut -c1-16)
csi_sanity=$cache/$sum/csi-sanity
mkdir -p "$cache"
(
    # One build at a time; a second run waits for the first one's binary.
    flock 9
    [ -x "$csi_sanity" ] && exit 0
    peer_log "building csi-sanity $version from $(basename "$tarball") into $cache/$sum (once)"
    rm -rf "${cache:?}/$sum"
    mkdir -p "$cache/$sum"
    tar xzf "$tarball" -C "$cache/$sum"
    src=$cache/$sum/csi-test
    [ -d "$src/cmd/csi-sanity" ] || peer_die "$(basename "$tarball") holds no csi-test/cmd/csi-sanity"
    start=$SECONDS
    # Offline: every dependency is vendored in the archive. -trimpath makes a
    # failure's location read pkg/sanity/FILE.go:LINE within the module, and the
    # sources stay in $src to look them up.
    if ! (cd "$src" &&
        GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local GOCACHE="$cache/$sum/gocache" \
            GOPATH="$cache/$sum/gopath" \
            go build -trimpath -ldflags "-X main.VERSION=$version" -o "$csi_sanity.tmp" ./cmd/csi-sanity) \
        >"$cache/$sum/build.log" 2>&1; then
        tail -n 30 "$cache/$sum/build.log" >&2
        peer_die "building csi-sanity failed (log: $cache/$sum/build.log)"
    fi
    mv "$csi_sanity.tmp" "$csi_sanity"
    chmod -R u+w "$cache/$sum/gocache" "$cache/$sum/gopath" 2>/dev/null || true
    rm -rf "$cache/$sum/gocache" "$cache/$sum/gopath"
    peer_log "built csi-sanity $version in $((SECONDS - start))s (sources in $src)"
) 9>"$cache/.lock"
[ -x "$csi_sanity" ] || peer_die "csi-sanity was not built"

# --- the driver -----------------------------------------------------------------
peer_resolve_snapfs
"$SNAPFS" csi --help >/dev/null 2>&1 || peer_die "$SNAPFS has no 'csi' subcommand"

peer_init csi
PEER_NAME=csi-sanity
work=$PEER_WORK
sock=$work/csi.sock
# sun_path holds 107 bytes.
[ ${#sock} -le 107 ] || peer_die "socket path $sock is longer than 107 bytes; set PEER_TMPDIR shorter"
mkdir -p "$work/root"
server_log=$work/logs/snapfs-csi.log
sanity_log=$work/logs/csi-sanity.log
junit=$work/logs/junit.xml
SERVER_PID=""

# indent PREFIX: copy standard input with PREFIX before each line.
indent() {
    local line
    while IFS= read -r line; do
        printf '%s%s\n' "$1" "$line"
    done
}

# mounts_under DIR...: the mountpoints at or below the DIRs, deepest first.
mounts_under() {
    findmnt -rn -o TARGET | awk '
        BEGIN { for (i = 1; i < ARGC; i++) dirs[i] = ARGV[i]; n = ARGC; ARGC = 1 }
        { for (i = 1; i < n; i++) if ($0 == dirs[i] || index($0, dirs[i] "/") == 1) { print; next } }
    ' "$@" | sort -r
}

# Unmount everything still mounted under the work directory, deepest first.
unmount_leftovers() {
    local m
    while read -r m; do
        [ -n "$m" ] || continue
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || peer_warn "could not unmount $m"
    done < <(mounts_under "$work")
}

# Stop the driver and any snapfs process it started for this work directory.
stop_server() {
    local i p exe pids=""
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            peer_warn "snapfs csi (pid $SERVER_PID) still running 10s after SIGTERM; killing it"
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
    # A driver that exits on SIGTERM should leave nothing mounted behind.
    local left
    left=$(mounts_under "$work")
    if [ -n "$left" ]; then
        peer_warn "still mounted after the driver stopped (unmounting):"
        indent "    " <<<"$left" >&2
    fi
    # Mount daemons the driver forked for volumes under $work (found by binary and
    # command line, stopped by pid) once their mounts are gone.
    unmount_leftovers
    for p in /proc/[0-9]*; do
        exe=$(readlink -f "$p/exe" 2>/dev/null) || continue
        [ "$exe" = "$SNAPFS" ] || continue
        if tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qF -- "$work/"; then
            pids+=" ${p#/proc/}"
        fi
    done
    for p in $pids; do
        kill -TERM "$p" 2>/dev/null || true
    done
}

# shellcheck disable=SC2317 # run by the EXIT trap
csi_cleanup() {
    local rc=$?
    set +e
    stop_server
    (exit "$rc")
    peer_cleanup
}
trap csi_cleanup EXIT

cmd=("$SNAPFS" csi --endpoint "unix://$sock" --node-id sanity-node --root "$work/root" --controller --node)
peer_log "starting: ${cmd[*]}"
# Output goes to a file, never a pipe: the driver's mount daemons may keep it open.
"${cmd[@]}" </dev/null >"$server_log" 2>&1 &
SERVER_PID=$!
for ((i = 0; i < start_timeout * 10; i++)); do
    [ -S "$sock" ] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        rc=0
        wait "$SERVER_PID" || rc=$?
        SERVER_PID=""
        cat "$server_log" >&2
        peer_die "snapfs csi exited (status $rc) before creating $sock"
    fi
    sleep 0.1
done
[ -S "$sock" ] || {
    cat "$server_log" >&2
    peer_die "snapfs csi did not create $sock within ${start_timeout}s"
}
peer_log "driver listening on $sock (pid $SERVER_PID)"

# --- csi-sanity -------------------------------------------------------------------
args=(
    --csi.endpoint "unix://$sock"
    # Parents of NodePublishVolume's target ($mountdir/target, which the driver
    # creates and removes) and NodeStageVolume's staging path; csi-sanity
    # creates both before each spec and removes them after it.
    --csi.mountdir "$work/mnt"
    --csi.stagingdir "$work/staging"
    --csi.testvolumesize "$volume_size"
    --csi.testvolumeexpandsize "$expand_size"
    --csi.testvolumeaccesstype mount
    --ginkgo.no-color
    --ginkgo.timeout 1h
    --ginkgo.junit-report "$junit"
)
[ -z "${CSI_SANITY_VOLUME_PARAMETERS:-}" ] || args+=(--csi.testvolumeparameters "$(readlink -f "$CSI_SANITY_VOLUME_PARAMETERS")")
[ -z "${CSI_SANITY_SNAPSHOT_PARAMETERS:-}" ] || args+=(--csi.testsnapshotparameters "$(readlink -f "$CSI_SANITY_SNAPSHOT_PARAMETERS")")
[ -z "${CSI_SANITY_SKIP:-}" ] || args+=(--ginkgo.skip "$CSI_SANITY_SKIP")
[ -z "${CSI_SANITY_FOCUS:-}" ] || args+=(--ginkgo.focus "$CSI_SANITY_FOCUS")
args+=("${extra_args[@]}")

peer_log "running: $csi_sanity ${args[*]}"
start=$SECONDS
status=0
peer_run "$sanity_log" timeout --kill-after=30 "$run_timeout" "$csi_sanity" "${args[@]}" || status=$?
# csi-test's own Connect (utils/grpcutil.go) has a race: it waits for the
# connection's state to change from the state it reads next, and when the
# connection became READY just before that read it waits for a change that never
# comes, failing the first spec with "Connection timed out" after a minute. A run
# whose every failure is that is run once more, and says so.
connect_races=$(grep -c 's: "Connection timed out"' "$sanity_log" || true)
first_failed=$(grep -E '[0-9]+ Passed \| [0-9]+ Failed \|' "$sanity_log" | tail -n 1 | sed -nE 's/.* ([0-9]+) Failed.*/\1/p')
rerun_note=""
if [ "$status" -ne 0 ] && [ "${first_failed:-0}" -gt 0 ] && [ "$connect_races" -eq "${first_failed:-0}" ]; then
    rerun_note="the first run's $first_failed failure(s) were all csi-test's connect race (\"Connection timed out\" while connecting); run again"
    peer_warn "$rerun_note"
    mv "$sanity_log" "$sanity_log.first"
    status=0
    peer_run "$sanity_log" timeout --kill-after=30 "$run_timeout" "$csi_sanity" "${args[@]}" || status=$?
fi
elapsed=$((SECONDS - start))

server_died=""
if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
    server_died=1
fi
# csi-sanity unpublishes and unstages every volume it made: nothing may stay
# mounted at the target and staging paths.
leftovers=$(mounts_under "$work/mnt" "$work/staging")
stop_server

# --- summary ------------------------------------------------------------------------
# Ginkgo closes with "Ran N of M Specs in S seconds" and
# "SUCCESS! -- P Passed | F Failed | X Pending | K Skipped".
ran_line=$(grep -E '^Ran [0-9]+ of [0-9]+ Specs' "$sanity_log" | tail -n 1 || true)
counts=$(grep -E '[0-9]+ Passed \| [0-9]+ Failed \|' "$sanity_log" | tail -n 1 || true)
count_of() { sed -nE "s/.*[^0-9]([0-9]+) $1.*/\1/p" <<<" $counts" | head -n 1; }
passed=$(count_of Passed)
failed=$(count_of Failed)
pending=$(count_of Pending)
skipped=$(count_of Skipped)

echo
echo "== csi-sanity $version results (${elapsed}s) =="
[ -z "$ran_line" ] || echo "$ran_line"
if [ -f "$junit" ]; then
    # Why specs were skipped, most common first (from the JUnit report).
    reasons=$(sed -nE 's/.*<skipped message="skipped - ([^"]*)".*/\1/p' "$junit" | sort | uniq -c | sort -rn | sed -E 's/^ +//' || true)
    [ -z "$reasons" ] || {
        echo "skipped specs by reason:"
        indent "  " <<<"$reasons"
    }
fi
if [ -n "$leftovers" ]; then
    echo "still mounted at csi-sanity's target or staging paths after the run (unmounted now):"
    indent "  " <<<"$leftovers"
fi
if [ -n "$server_died" ]; then
    echo "snapfs csi exited during the run; the end of its log:"
    tail -n 30 "$server_log"
fi
case $status in
124 | 137) echo "csi-sanity timed out after $run_timeout (CSI_SANITY_TIMEOUT)" ;;
esac
if [ -z "$counts" ]; then
    echo "csi-sanity printed no summary (exit status $status)"
    [ "$status" -ne 0 ] || status=1
fi
if [ "$status" -ne 0 ] || [ -n "$server_died" ] || [ -n "$leftovers" ]; then
    peer_save_artifacts csi-sanity "$work/logs"/.
fi
[ -z "$rerun_note" ] || echo "note: $rerun_note"
[ "${pending:-0}" -eq 0 ] || echo "pending (disabled upstream, never run): $pending"
echo "csi-sanity: ${passed:-0} passed, ${failed:-0} failed, ${skipped:-0} skipped"
exit "$status"
