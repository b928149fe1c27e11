#!/usr/bin/env bash
# bench/crash.sh: the power-loss harness (tests/powerloss.rs) at full strength.
#
# Every I/O step of SEEDS workloads is a crash point: the simulated disk keeps what
# was made durable and a random part of the rest, torn at 4 KiB pages; the real store
# code recovers it, and fsck, every fsync-acknowledged file and every snapshot are
# checked. Then an EIO or ENOSPC is injected at every FAULT_EVERY-th step in turn.
# Prints the crash points tried and the failures (0 expected), and exits non-zero on
# any failure.
#
# usage: bench/crash.sh            (SEEDS=12: about 12,000 crash points, a minute or two)
#        SEEDS=40 bench/crash.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
seeds=${SEEDS:-12}
start=$(date +%s)
POWERLOSS_SEEDS=$seeds POWERLOSS_EVERY=1 POWERLOSS_FAULT_EVERY=${FAULT_EVERY:-1} \
    cargo test --release --test powerloss -- --nocapture --test-threads=2 2>&1 |
    tee /dev/stderr | grep -E '^(power loss|faults):' || {
    echo "bench/crash.sh: the harness failed" >&2
    exit 1
}
echo "bench/crash.sh: $seeds workloads, $(($(date +%s) - start)) s"
