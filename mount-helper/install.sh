#!/usr/bin/env bash
# mount-helper/install.sh: install snapfs so that mount(8) and /etc/fstab can
# mount it: the snapfs binary into /usr/local/bin and the mount helpers
# mount.fuse.snapfs and mount.snapfs (a symlink to it) into /sbin, where
# mount(8) looks for /sbin/mount.TYPE helpers.
#
# usage: mount-helper/install.sh [--uninstall]
#
# Environment:
#   SNAPFS   binary to install (default ${CARGO_TARGET_DIR:-target}/release/snapfs;
#            build it first with `cargo build --release`)
#   BINDIR   default /usr/local/bin
#   SBINDIR  default /sbin
#   DESTDIR  staging root for packaging (default: none)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
bindir=${DESTDIR:-}${BINDIR:-/usr/local/bin}
sbindir=${DESTDIR:-}${SBINDIR:-/sbin}

if [ -z "${DESTDIR:-}" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or set DESTDIR)" >&2
    exit 1
fi

if [ "${1:-}" = --uninstall ]; then
    rm -fv "$sbindir/mount.fuse.snapfs" "$sbindir/mount.snapfs" "$bindir/snapfs"
    exit 0
fi
[ $# -eq 0 ] || {
    echo "usage: $0 [--uninstall]" >&2
    exit 1
}

snapfs=${SNAPFS:-${CARGO_TARGET_DIR:-target}/release/snapfs}
case $snapfs in /*) ;; *) [ -n "${SNAPFS:-}" ] || snapfs="$repo/$snapfs" ;; esac
if [ ! -x "$snapfs" ]; then
    echo "install.sh: $snapfs not found; run 'cargo build --release' first" >&2
    exit 1
fi

install -d "$bindir" "$sbindir"
install -m 0755 "$snapfs" "$bindir/snapfs"
install -m 0755 "$here/mount.fuse.snapfs" "$sbindir/mount.fuse.snapfs"
ln -sfn mount.fuse.snapfs "$sbindir/mount.snapfs"

echo "installed:"
echo "  $bindir/snapfs"
echo "  $sbindir/mount.fuse.snapfs"
echo "  $sbindir/mount.snapfs -> mount.fuse.snapfs"
echo "try: mount -t fuse.snapfs /srv/store /mnt/data"
