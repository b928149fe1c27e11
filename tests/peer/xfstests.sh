#!/usr/bin/env bash
# tests/peer/xfstests.sh: fstests (xfstests), the Linux file system regression
# suite, against snapfs, as xfstests-config/ sets it up.
#
# usage: tests/peer/xfstests.sh [CHECK-ARGS...]     (as root; default: -g quick)
#
# What it does:
#   1. installs xfstests' Debian build and run dependencies (unless SKIP_APT=1);
#   2. builds xfstests from the shared tarball (../shared/third_party/
#      xfstests-*.tar.gz from the project root) into a cache directory, once;
#   3. installs snapfs and its mount helper (mount-helper/install.sh), makes the
#      users the suite needs, the mountpoints and fresh store directories;
#   4. runs `./check CHECK-ARGS -E xfstests-config/exclude` with the project's
#      xfstests-config/local.config, and prints the totals;
#   5. fails when any test failed (the excluded ones are not run).
#
# Environment:
#   SNAPFS             snapfs binary (default target/release/snapfs)
#   XFSTESTS_TARBALL   the xfstests source archive (default: the newest
#                      ../shared/third_party/xfstests-*.tar.gz)
#   XFSTESTS_CACHE     where it is built (default /var/cache/snapfs-xfstests)
#   SKIP_APT=1         do not install Debian packages
#   XFSTESTS_TIMEOUT   seconds the whole ./check run may take (default 2400)
#   PEER_ARTIFACTS_DIR where the results of failed tests are copied (default
#                      ${TMPDIR:-/tmp}/snapfs-peer-artifacts/xfstests)
set -euo pipefail

PEER_NAME=xfstests
# shellcheck source=tests/peer/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
peer_require_root "xfstests"
peer_resolve_snapfs
repo=$PEER_REPO_ROOT
config=$repo/xfstests-config

args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-g quick)

tarball=${XFSTESTS_TARBALL:-}
if [ -z "$tarball" ]; then
    tarball=$(ls -1 "$repo"/../shared/third_party/xfstests-*.tar.gz 2>/dev/null | tail -n 1 || true)
fi
[ -n "$tarball" ] && [ -f "$tarball" ] ||
    peer_die "no xfstests source archive (../shared/third_party/xfstests-*.tar.gz); set XFSTESTS_TARBALL"
tarball=$(readlink -f "$tarball")

# What xfstests needs to build and to run the tests snapfs can take (xfsprogs and
# friends for the helpers it calls whatever the file system; fio, dbench and the
# like for the tests that load it).
apt_packages=(
    acl attr autoconf automake bc dbench dump e2fsprogs fio gawk gcc git indent
    libacl1-dev libaio-dev libcap-dev libgdbm-dev libinih-dev libtool libtool-bin
    liburcu-dev liburing-dev libuuid1 lvm2 make pkg-config psmisc python3 quota sed
    uuid-dev uuid-runtime xfsdump xfslibs-dev xfsprogs
    libcap2-bin # capsh, for the chattr tests that drop CAP_LINUX_IMMUTABLE
)
if [ "${SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        peer_log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# Build once per archive: the cache holds one tree per archive checksum.
cache=${XFSTESTS_CACHE:-/var/cache/snapfs-xfstests}
sum=$(sha256sum "$tarball" | cut -c1-16)
xfs=$cache/$sum/xfstests
if [ ! -e "$xfs/.snapfs-built" ]; then
    peer_log "building xfstests from $(basename "$tarball") in $xfs"
    rm -rf "${cache:?}/$sum"
    mkdir -p "$cache/$sum"
    tar xzf "$tarball" -C "$cache/$sum"
    [ -d "$xfs" ] || peer_die "$(basename "$tarball") holds no xfstests/ directory"
    make -C "$xfs" -j"$(nproc)" >"$cache/$sum/build.log" 2>&1 || {
        tail -n 30 "$cache/$sum/build.log" >&2
        peer_die "building xfstests failed (log: $cache/$sum/build.log)"
    }
    touch "$xfs/.snapfs-built"
fi

# snapfs as mount(8) finds it: /sbin/mount.fuse.snapfs and the binary it runs.
SNAPFS=$SNAPFS "$repo/mount-helper/install.sh" >/dev/null
# The run uses the installed copy: a rebuild meanwhile changes nothing under it.
export SNAPFS=${BINDIR:-/usr/local/bin}/snapfs
# The users the tests switch to.
id fsgqa >/dev/null 2>&1 || useradd -m fsgqa
id 123456-fsgqa >/dev/null 2>&1 || useradd 123456-fsgqa
id fsgqa2 >/dev/null 2>&1 || useradd fsgqa2
getent group fsgqa >/dev/null || groupadd fsgqa

# The mountpoints and the two stores local.config names, fresh.
for m in /mnt/test /mnt/scratch; do
    mkdir -p "$m"
    while mountpoint -q "$m"; do umount "$m" || umount -l "$m"; done
done
stores=/var/lib/snapfs-xfstests
rm -rf "$stores"
mkdir -p "$stores"
chmod 700 "$stores"
cp "$config/local.config" "$xfs/local.config"
cp "$config/exclude" "$xfs/snapfs.exclude"
# generic/531 raises the open files limit (`ulimit -n`, soft and hard) to
# min(50000 x LOAD_FACTOR, file-max / (4 x CPUs)). Where the hard limit is lower and
# root lacks CAP_SYS_RESOURCE (bit 24 of CapEff), that fails whatever the filesystem:
# excluded then, and the reason says what was found.
nr_cpus=$(($(getconf _NPROCESSORS_ONLN) * 2))
want=$((50000 * ${LOAD_FACTOR:-1}))
cap=$(($(cat /proc/sys/fs/file-max) / nr_cpus / 2))
if [ "$cap" -gt 0 ] && [ "$want" -gt "$cap" ]; then want=$cap; fi
hard=$(ulimit -Hn)
caps=$(awk '/^CapEff:/ { print $2 }' /proc/self/status)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ] && (( (0x$caps >> 24 & 1) == 0 )); then
    echo "generic/531  # raises the open files limit to $want with ulimit -n; the hard limit here is $hard and root lacks CAP_SYS_RESOURCE" >>"$xfs/snapfs.exclude"
fi
rm -rf "$xfs/results"

unmount_all() {
    local m
    for m in /mnt/test /mnt/scratch; do
        while mountpoint -q "$m"; do umount "$m" 2>/dev/null || umount -l "$m" || break; done
    done
}
trap unmount_all EXIT

peer_log "running ./check -E snapfs.exclude ${args[*]}"
log=$(mktemp "${TMPDIR:-/tmp}/snapfs-xfstests.XXXXXX.log")
rc=0
# A test that hangs must not hold CI: the whole run has a limit.
limit=${XFSTESTS_TIMEOUT:-2400}
(cd "$xfs" && timeout --kill-after=60 "$limit" ./check -E snapfs.exclude "${args[@]}") 2>&1 |
    tee "$log" || rc=$?

# The totals, from check's closing lines: "Ran: ...", "Not run: ...", "Failures: ...".
words() { { grep -E "^$1:" "$log" || true; } | tail -n 1 | sed -E "s/^$1: *//" | wc -w; }
ran=$(words Ran)
notrun=$(words "Not run")
failures=$(grep -E '^Failures:' "$log" | tail -n 1 | sed -E 's/^Failures: *//' || true)
nfail=$(printf '%s\n' "$failures" | wc -w)
excluded=$(grep -cE '^[a-z]+/[0-9]+' "$xfs/snapfs.exclude" || true)
# "Ran:" lists the tests not run too.
passed=$((ran - notrun - nfail))
echo
echo "== xfstests results (${args[*]}) =="
echo "xfstests: $passed passed, $nfail failed, $notrun not run, $excluded excluded"
grep -E '^[a-z]+/[0-9]+' "$xfs/snapfs.exclude" | sed 's/^/excluded: /'
[ "$nfail" -eq 0 ] || echo "failed: $failures"

if [ "$nfail" -gt 0 ]; then
    art=${PEER_ARTIFACTS_DIR:-${TMPDIR:-/tmp}/snapfs-peer-artifacts}/xfstests
    mkdir -p "$art"
    cp -r "$xfs/results" "$art/" 2>/dev/null || true
    cp "$log" "$art/check.log"
    peer_log "results of the failed tests copied to $art"
    exit 1
fi
if [ "$ran" -eq 0 ] || [ "$rc" -ne 0 ]; then
    peer_log "check ran no test, failed to run or ran out of time (exit $rc)"
    exit 1
fi
