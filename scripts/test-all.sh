#!/usr/bin/env bash
# scripts/test-all.sh: the full snapfs check, as CI runs it (.ci/run execs
# this). Installs what the checks need (Debian packages when run as root,
# pjdfstest and fsx via cargo install, and Garage, the S3-compatible server
# tests/s3.rs starts, built once into ~/.cache/snapfs), then runs the stages
#
#   fmt             cargo fmt --all -- --check
#   clippy          cargo clippy --all-targets -- -D warnings
#   build           cargo build --release
#   test            cargo test --release    (mounts real snapfs file systems; with
#                   SNAPFS_EXPECT_URING=1 where the kernel has FUSE over io_uring, so
#                   that its tests fail rather than skip without it), the vendored
#                   fuser's own tests (cargo test -p fuser --lib --features uring),
#                   and a check of the build without the uring feature
#   pjdfstest-root  tests/peer/pjdfstest.sh root
#   pjdfstest-user  tests/peer/pjdfstest.sh user, over /dev/fuse (-o nouring)
#   fsx             tests/peer/fsx.sh
#   fsx-snapshots   tests/peer/fsx.sh, one more seed, a snapshot every second
#   fsx-block-sizes tests/peer/fsx.sh on stores made with -o block_size=4K and
#                   1M (the smallest and largest), a seed each
#   xfstests        tests/peer/xfstests.sh -g quick: xfstests built from
#                   ../shared/third_party/, run with xfstests-config/; any failure
#                   not in xfstests-config/exclude fails the stage
#   csi-sanity      tests/peer/csi-sanity.sh: Kubernetes' CSI conformance suite,
#                   built offline from ../shared/third_party/ with Debian's Go,
#                   against `snapfs csi`
#   k8s-manifests   tests/peer/k8s-manifests.sh: deploy/kubernetes/ checked against
#                   the Kubernetes schemas, offline (kubernetes-validate from PyPI)
#
# It keeps going after a failed stage (stages that need the release build are
# marked failed if the build fails), prints each stage's time and a summary,
# ends with the line "stages: N passed, N failed" and exits non-zero if any
# stage failed. Must run as root (FUSE mounts, pjdfstest's user switching).
#
# Environment: SKIP_APT=1 skips apt-get; STAGES="fmt clippy ..." runs only
# those stages; the tests/peer scripts' variables (FSX_*, PJDFSTEST_*, PEER_*,
# XFSTESTS_*) pass through.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export SNAPFS=${SNAPFS:-$(readlink -m "${CARGO_TARGET_DIR:-target}/release/snapfs")}

all_stages=(fmt clippy build test pjdfstest-root pjdfstest-user fsx fsx-snapshots fsx-block-sizes xfstests csi-sanity k8s-manifests)
read -r -a stages <<<"${STAGES:-${all_stages[*]}}"

apt_packages=(
    fuse3 libfuse3-dev pkg-config build-essential # FUSE, C toolchain for crates
    attr acl libacl1-dev e2fsprogs                # xattr/ACL tools, pjdfstest's acl dependency
    util-linux mount passwd coreutils findutils   # mountpoint, findmnt, setpriv, prlimit, useradd, timeout
    tar                                           # the tree-copy tests
    openssh-server openssh-client                 # sync over ssh to an sshd the test starts
    python3 libcap2-bin                           # copy_file_range and setcap in the set-id test
    xfsprogs                                      # an XFS image with reflink for the clone test
    golang-go                                     # csi-sanity, built from source
    python3-venv                                  # the manifests' validator
)

section() { printf '\n===== %s =====\n' "$*"; }

install_packages() {
    if [ "${SKIP_APT:-0}" = 1 ]; then
        echo "SKIP_APT=1: not installing Debian packages"
    elif [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "not root or no apt-get: not installing Debian packages"
    else
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${apt_packages[@]}"; }; then
            echo "warning: apt-get failed; continuing with what is installed" >&2
        fi
    fi
    local missing=() c
    for c in cargo cc fusermount3 mountpoint findmnt setpriv prlimit useradd timeout tar ssh ssh-keygen setfacl mkfs.xfs; do
        command -v "$c" >/dev/null || missing+=("$c")
    done
    [ ${#missing[@]} -eq 0 ] || echo "warning: missing commands: ${missing[*]}" >&2
}

install_cargo_tools() {
    # shellcheck source=tests/peer/common.sh
    (. tests/peer/common.sh && PEER_NAME=setup &&
        peer_ensure_cargo_tool pjdfstest pjdfstest 0.2.2 >/dev/null &&
        peer_ensure_cargo_tool fsx fsx 0.3.2 >/dev/null) ||
        echo "warning: installing pjdfstest/fsx failed; their stages will fail" >&2
    install_garage
}

# Garage (crates.io `garage`), the S3-compatible server tests/s3.rs starts: built
# once (about 20 minutes on 2 cores) and cached where the test looks for it.
garage_version=2.3.0
install_garage() {
    local root="$HOME/.cache/snapfs/garage-$garage_version"
    [ -x "$root/bin/garage" ] && return 0
    echo "building garage $garage_version into $root (once)"
    nice -n 10 cargo install garage --version "$garage_version" --locked --root "$root" >&2 ||
        echo "warning: building garage failed; tests/s3.rs will fail" >&2
}

# FUSE over io_uring (Linux 6.14+) stays off until the fuse module's enable_uring is
# set; snapfs uses it whenever the kernel offers it. The tests run with it on where
# the kernel has it: tests/transport.rs checks that requests do go that way, and the
# unprivileged pjdfstest run mounts with -o nouring to keep /dev/fuse under a peer suite.
enable_fuse_uring() {
    local p=/sys/module/fuse/parameters/enable_uring
    modprobe fuse 2>/dev/null || true
    if [ ! -w "$p" ]; then
        echo "kernel without FUSE over io_uring: every request goes through /dev/fuse"
        return
    fi
    echo Y >"$p" && echo "fuse.enable_uring=$(cat "$p")"
    # The kernel has it: tests that need io_uring fail, rather than skip, without it.
    if [ "$(cat "$p")" = Y ]; then export SNAPFS_EXPECT_URING=1; fi
}

# tests/abort.rs aborts a connection through the fuse control filesystem, which a
# fresh machine may not have mounted.
mount_fusectl() {
    local d=/sys/fs/fuse/connections
    if [ -d "$d" ] && ! mountpoint -q "$d"; then
        mount -t fusectl none "$d" 2>/dev/null || echo "warning: could not mount fusectl on $d" >&2
    fi
}

names=()
results=()
times=()
build_ok=1

record() {
    names+=("$1")
    results+=("$2")
    times+=("$3")
}

# Each stage's output also goes to a file, so that a failed stage's last lines
# can be shown again just above the summary (CI logs are often read from the end).
stage_logs=$(mktemp -d "${TMPDIR:-/tmp}/snapfs-test-all.XXXXXX")
trap 'rm -rf "$stage_logs"' EXIT

run_stage() {
    local name=$1 rc=0 start
    shift
    section "stage $name: $*"
    start=$(date +%s)
    "$@" 2>&1 | tee "$stage_logs/$name.log" || rc=${PIPESTATUS[0]}
    local secs=$(($(date +%s) - start))
    if [ "$rc" -eq 0 ]; then
        record "$name" PASS "$secs"
        section "stage $name: PASS (${secs}s)"
    else
        record "$name" "FAIL (exit $rc)" "$secs"
        section "stage $name: FAIL, exit status $rc (${secs}s)"
    fi
    return "$rc"
}

wants() {
    local s
    for s in "${stages[@]}"; do
        [ "$s" = "$1" ] && return 0
    done
    return 1
}

needs_build() {
    local name=$1
    shift
    if [ "$build_ok" -eq 1 ]; then
        run_stage "$name" "$@" || true
    else
        record "$name" "FAIL (not run: release build failed)" 0
        section "stage $name: not run, the release build failed"
    fi
}

total_start=$(date +%s)
section "snapfs test-all: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -sr)"

prep_start=$(date +%s)
section "prerequisites"
install_packages
install_cargo_tools
enable_fuse_uring
mount_fusectl
echo "toolchain: $(cargo --version 2>/dev/null || echo 'cargo missing'); $(rustc --version 2>/dev/null || true)"
echo "pjdfstest: $(pjdfstest --version 2>/dev/null || echo missing); fsx: $(fsx --version 2>/dev/null || echo missing)"
prep_secs=$(($(date +%s) - prep_start))
echo "prerequisites took ${prep_secs}s"

for s in "${stages[@]}"; do
    case " ${all_stages[*]} " in
    *" $s "*) ;;
    *) echo "unknown stage '$s' (known: ${all_stages[*]})" >&2 && exit 2 ;;
    esac
done

if wants fmt; then run_stage fmt cargo fmt --all -- --check || true; fi
if wants clippy; then run_stage clippy cargo clippy --all-targets -- -D warnings || true; fi
if wants build || wants test || wants pjdfstest-root || wants pjdfstest-user || wants fsx || wants fsx-snapshots || wants fsx-block-sizes || wants xfstests || wants csi-sanity; then
    if wants build; then
        run_stage build cargo build --release || build_ok=0
    else
        # Not reported as a stage, but the later ones need the binary.
        cargo build --release || build_ok=0
    fi
fi
if wants test; then needs_build test sh -c 'cargo test --release && cargo test --release -p fuser --lib --features uring && cargo check --release --no-default-features'; fi
if wants pjdfstest-root; then needs_build pjdfstest-root bash tests/peer/pjdfstest.sh root; fi
if wants pjdfstest-user; then needs_build pjdfstest-user env PEER_MOUNT_OPTS=nouring bash tests/peer/pjdfstest.sh user; fi
if wants fsx; then needs_build fsx bash tests/peer/fsx.sh; fi
if wants fsx-snapshots; then needs_build fsx-snapshots env FSX_SEEDS=4 FSX_SNAPSHOT_EVERY=1 bash tests/peer/fsx.sh; fi
if wants fsx-block-sizes; then
    needs_build fsx-block-sizes sh -c 'for bs in 4K 1M; do FSX_SEEDS=5 PEER_MOUNT_OPTS=block_size=$bs bash tests/peer/fsx.sh || exit 1; done'
fi
if wants xfstests; then needs_build xfstests bash tests/peer/xfstests.sh -g quick; fi
if wants csi-sanity; then needs_build csi-sanity bash tests/peer/csi-sanity.sh; fi
if wants k8s-manifests; then run_stage k8s-manifests bash tests/peer/k8s-manifests.sh || true; fi

for i in "${!names[@]}"; do
    [ "${results[$i]}" != PASS ] || continue
    log="$stage_logs/${names[$i]}.log"
    [ -s "$log" ] || continue
    section "stage ${names[$i]} failed; the lines of its output that name a failure, then its last 40 lines"
    grep -E 'UNEXPECTED|FAILED|[Ff]ailed|panicked|error(\[|:)|^failures:|^test .* FAILED|warning: ' "$log" | head -n 60 || true
    echo "-----"
    tail -n 40 "$log"
done

passed=0
failed=0
section "summary"
printf '%-16s %-42s %8s\n' stage result time
printf '%-16s %-42s %7ss\n' prerequisites "done" "$prep_secs"
for i in "${!names[@]}"; do
    printf '%-16s %-42s %7ss\n' "${names[$i]}" "${results[$i]}" "${times[$i]}"
    if [ "${results[$i]}" = PASS ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
    fi
done
echo "total time: $(($(date +%s) - total_start))s"
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
