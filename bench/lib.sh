# shellcheck shell=bash disable=SC2034
# bench/lib.sh: helpers for bench/run (sourced, not run): target set-up and tear-down,
# timing and recording, and one function per workload (wl_NAME).
#
# Everything here expects the variables that bench/run exports: W (work directory on
# ext4), RAW (raw results file), RUNS, the size knobs (SEQ_SIZE, RAND_SIZE, ...),
# SNAPFS, SNAPFS_OPTS, PLL (the compiled passthrough_ll), METABIN, TARBALL, GITSRC,
# CRATE. A target's files all live under $W/t/TARGET; its state (mountpoint, daemon
# pid, store) is kept in files there, so that any process can tear it down.

ALL_TARGETS="native tmpfs passthrough_ll passthrough_ll-strict bindfs snapfs-ext4 snapfs-tmpfs snapfs-devfuse"
ALL_WORKLOADS="fio meta metasmall untar git cargo rss"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

now_ns() { date +%s%N; }

# secs CMD...: run CMD (its stdout discarded), print its wall time in seconds; fails
# when CMD fails.
secs() {
    local t0 t1
    t0=$(now_ns)
    "$@" > /dev/null || return 1
    t1=$(now_ns)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f\n", (b - a) / 1e9}'
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# record TARGET METRIC RUN VALUE: VALUE must be a number (or n/a).
record() {
    if ! [[ $4 =~ ^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ || $4 == n/a ]]; then
        log "$1 $2 run $3: not a number: '$4'"
        return 1
    fi
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RAW"
}

# measure TARGET METRIC RUN CMD...: time CMD and record the seconds.
measure() {
    local t=$1 m=$2 r=$3 v
    shift 3
    v=$(secs "$@") || return 1
    record "$t" "$m" "$r" "$v"
}

# ---------------------------------------------------------------- targets

troot() { echo "$W/t/$1"; }

# daemon_pid_of MOUNTPOINT: the pid of a FUSE daemon whose command line names it.
daemon_pid_of() {
    local mnt=$1 p
    for p in /proc/[0-9]*; do
        if tr '\0' '\n' < "$p/cmdline" 2>/dev/null | grep -qxF "$mnt"; then
            echo "${p#/proc/}"
            return 0
        fi
    done
    return 1
}

wait_mounted() {
    local mnt=$1 i
    for ((i = 0; i < 100; i++)); do
        mountpoint -q "$mnt" && return 0
        sleep 0.1
    done
    log "$mnt did not become a mountpoint"
    return 1
}

# target_up TARGET: make a fresh, empty instance of TARGET; prints the directory the
# workloads run in (and nothing else on stdout). Every step is checked explicitly, as
# callers test its status (which turns errexit off inside).
target_up() {
    local t=$1 r mnt store
    r=$(troot "$t")
    rm -rf "$r" && mkdir -p "$r" || return 1
    case $t in
    native)
        mnt=$r/dir
        mkdir -p "$mnt" || return 1
        ;;
    tmpfs)
        mnt=$r/tmpfs
        mkdir -p "$mnt" && echo "$mnt" > "$r/tmpfs.mnt" || return 1
        mount -t tmpfs -o "size=$TMPFS_SIZE,mode=755" bench-tmpfs "$mnt" >&2 || return 1
        ;;
    passthrough_ll | passthrough_ll-strict | bindfs)
        mnt=$r/mnt
        mkdir -p "$r/src" "$mnt" && echo "$mnt" > "$r/fuse.mnt" || return 1
        if [ "$t" = passthrough_ll ]; then
            "$PLL" -o "writeback,cache=always,source=$r/src" "$mnt" >&2 || return 1
        elif [ "$t" = passthrough_ll-strict ]; then
            "$PLL" -o "writeback,cache=always,default_permissions,xattr,source=$r/src" "$mnt" >&2 || return 1
        else
            bindfs --multithreaded -o big_writes "$r/src" "$mnt" >&2 || return 1
        fi
        wait_mounted "$mnt" || return 1
        daemon_pid_of "$mnt" > "$r/daemon.pid" || { log "$t: no daemon found for $mnt"; return 1; }
        ;;
    snapfs-ext4 | snapfs-tmpfs | snapfs-devfuse)
        mnt=$r/mnt
        store=$r/store
        mkdir -p "$mnt" || return 1
        if [ "$t" = snapfs-tmpfs ]; then
            mkdir -p "$r/tmpfs" && echo "$r/tmpfs" > "$r/tmpfs.mnt" || return 1
            mount -t tmpfs -o "size=$TMPFS_SIZE,mode=755" bench-tmpfs "$r/tmpfs" >&2 || return 1
            store=$r/tmpfs/store
        fi
        echo "$mnt" > "$r/fuse.mnt" && echo "$store" > "$r/store.path" || return 1
        local opts=$SNAPFS_OPTS
        [ "$t" != snapfs-devfuse ] || opts=${opts:+$opts,}nouring
        # shellcheck disable=SC2086
        "$SNAPFS" mount "$store" "$mnt" ${opts:+-o "$opts"} >&2 || return 1
        wait_mounted "$mnt" || return 1
        cp "$store/snapfs.pid" "$r/daemon.pid" || return 1
        ;;
    *)
        log "unknown target $t"
        return 1
        ;;
    esac
    echo "$mnt"
}

# daemon_alive TARGET: true when TARGET has no daemon or its daemon still runs.
daemon_alive() {
    local r pid
    r=$(troot "$1")
    [ -s "$r/daemon.pid" ] || return 0
    pid=$(cat "$r/daemon.pid")
    # A daemon killed but not yet reaped is a zombie: dead too.
    [ -e "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null
}

# target_down TARGET: unmount (waiting for a FUSE daemon to flush and exit), unmount
# any tmpfs, delete everything. Safe to call on a target that is half up or gone.
target_down() {
    local t=$1 r mnt pid="" i
    r=$(troot "$t")
    [ -d "$r" ] || return 0
    [ -s "$r/daemon.pid" ] && pid=$(cat "$r/daemon.pid")
    if [ -s "$r/fuse.mnt" ]; then
        mnt=$(cat "$r/fuse.mnt")
        if mountpoint -q "$mnt"; then
            umount "$mnt" 2>/dev/null || umount -l "$mnt" || true
        fi
    fi
    if [ -n "$pid" ]; then
        # snapfs flushes before it exits; give any daemon up to 5 minutes.
        for ((i = 0; i < 3000; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$t: daemon $pid still running after unmount; sending SIGTERM"
            kill "$pid" 2>/dev/null || true
            sleep 2
            if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        fi
    fi
    if [ -s "$r/store.path" ] && [ -s "$(cat "$r/store.path")/snapfs.log" ]; then
        cp "$(cat "$r/store.path")/snapfs.log" "$W/logs/$t-snapfs-$(date +%s).log" 2>/dev/null || true
    fi
    if [ -s "$r/tmpfs.mnt" ]; then
        mnt=$(cat "$r/tmpfs.mnt")
        if mountpoint -q "$mnt"; then
            umount "$mnt" 2>/dev/null || umount -l "$mnt" || true
        fi
    fi
    # Never delete through a mount that is still there.
    if ! grep -qF " $r/" /proc/mounts; then
        rm -rf "$r"
    fi
}

# ---------------------------------------------------------------- fio

# fio_rec TARGET METRIC RUN FIELD FIO-ARGS...: run one fio job (JSON output) and
# record FIELD of its first job: read.bw / write.bw (MiB/s), read.iops / write.iops.
# fio's runtime, and so its figures, include the final fsync of end_fsync=1.
fio_rec() {
    local t=$1 m=$2 r=$3 field=$4 out=$W/fio.json v
    shift 4
    fio --output-format=json --output="$out" --name=job --invalidate=0 --fallocate=none "$@" > /dev/null
    case $field in
    *.bw) v=$(jq -r ".jobs[0].${field%.bw}.bw_bytes / 1048576" "$out") ;;
    *) v=$(jq -r ".jobs[0].$field" "$out") ;;
    esac
    [ "$(jq -r '.jobs[0].error' "$out")" = 0 ] || return 1
    v=$(awk -v v="$v" 'BEGIN {printf "%.1f\n", v}')
    [ "$m" = - ] || record "$t" "$m" "$r" "$v"
}

# Every wl_NAME TARGET MNT RUN does one run of its workload in MNT, a fresh, empty
# instance of TARGET, and records its figures under RUN.

wl_fio() {
    local t=$1 mnt=$2 r=$3 f
    f=$mnt/seq.dat
    fio_rec "$t" seq_write "$r" write.bw --filename="$f" --rw=write --bs=1M --size="$SEQ_SIZE" \
        --ioengine=psync --end_fsync=1 --refill_buffers=1
    drop_caches
    fio_rec "$t" seq_read_cold "$r" read.bw --filename="$f" --rw=read --bs=1M --size="$SEQ_SIZE" \
        --ioengine=psync --readonly
    fio_rec "$t" seq_read_warm "$r" read.bw --filename="$f" --rw=read --bs=1M --size="$SEQ_SIZE" \
        --ioengine=psync --readonly
    rm -f "$f"

    f=$mnt/rand.dat
    fio_rec "$t" - "$r" write.bw --filename="$f" --rw=write --bs=1M --size="$RAND_SIZE" --ioengine=psync \
        --end_fsync=1 --refill_buffers=1
    # RAND_IO of 4 KiB I/O at random offsets, each block at most once (fio's random map),
    # so that reads after drop_caches stay cold; RAND_RUNTIME caps a slow job.
    local common=(--filename="$f" --bs=4k --size="$RAND_SIZE" --io_size="$RAND_IO" --runtime="$RAND_RUNTIME")
    drop_caches
    fio_rec "$t" randread_psync "$r" read.iops "${common[@]}" --rw=randread --ioengine=psync \
        --iodepth=1 --readonly
    drop_caches
    fio_rec "$t" randread_libaio16 "$r" read.iops "${common[@]}" --rw=randread --ioengine=libaio \
        --iodepth=16 --readonly
    drop_caches
    fio_rec "$t" randwrite_psync "$r" write.iops "${common[@]}" --rw=randwrite --ioengine=psync \
        --iodepth=1 --end_fsync=1 --refill_buffers=1
    drop_caches
    fio_rec "$t" randwrite_libaio16 "$r" write.iops "${common[@]}" --rw=randwrite --ioengine=libaio \
        --iodepth=16 --end_fsync=1 --refill_buffers=1
    rm -f "$f"
}

# ---------------------------------------------------------------- metadata

# meta_run TARGET MOUNT RUN PREFIX FILES: bench/meta.c, one record per phase.
meta_run() {
    local t=$1 mnt=$2 r=$3 prefix=$4 files=$5 phase s
    drop_caches
    "$METABIN" "$mnt/meta" "$files" "$META_DIRS" > "$W/meta.out"
    while read -r phase s; do
        record "$t" "${prefix}_$phase" "$r" "$s"
    done < "$W/meta.out"
}

wl_meta() { meta_run "$1" "$2" "$3" meta "$META_FILES"; }

# The same at a scale passthrough_ll can hold open under a 20,000 fd limit.
wl_metasmall() { meta_run "$1" "$2" "$3" metasmall "$METASMALL_FILES"; }

# ---------------------------------------------------------------- untar

# tar c of a tree; through cat, because GNU tar skips reading file data when its
# archive is /dev/null itself.
tar_c() { tar -cf - -C "$1" . | cat > /dev/null; }

wl_untar() {
    local t=$1 mnt=$2 r=$3 d=$2/untar
    mkdir "$d"
    cat "$TARBALL" > /dev/null # the source tarball is read from the page cache
    measure "$t" untar "$r" tar -xf "$TARBALL" -C "$d"
    drop_caches
    measure "$t" ls_lR_cold "$r" ls -lR "$d"
    measure "$t" ls_lR_warm "$r" ls -lR "$d"
    measure "$t" tar_c "$r" tar_c "$d"
    measure "$t" rm_rf "$r" rm -rf "$d"
}

# ---------------------------------------------------------------- git

wl_git() {
    local t=$1 mnt=$2 r=$3 d=$2/clone
    git -C "$GITSRC" status --porcelain > /dev/null # the source repo warm in cache
    measure "$t" git_clone "$r" git clone -q --no-hardlinks "$GITSRC" "$d"
    measure "$t" git_status "$r" git -C "$d" status --porcelain
}

# ---------------------------------------------------------------- cargo

cargo_build() { (cd "$1" && CARGO_TARGET_DIR="$1/target" cargo build --offline --quiet); }

wl_cargo() {
    local t=$1 mnt=$2 r=$3 d=$2/crate
    mkdir "$d"
    cp -r "$CRATE/Cargo.toml" "$CRATE/Cargo.lock" "$CRATE/src" "$d/"
    measure "$t" cargo_build "$r" cargo_build "$d"
}

# ---------------------------------------------------------------- peak RSS

# wl_rss TARGET MNT RUN: on a freshly mounted snapfs (VmHWM counts from the daemon's
# start), write RSS_SIZE sequentially, then read the daemon's VmHWM (MiB).
wl_rss() {
    local t=$1 mnt=$2 r=$3 pid kb
    pid=$(cat "$(troot "$t")/daemon.pid")
    fio_rec "$t" - "$r" write.bw --filename="$mnt/big.dat" --rw=write --bs=1M --size="$RSS_SIZE" \
        --ioengine=psync --end_fsync=1 --refill_buffers=1
    kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
    [ -n "$kb" ] || return 1
    record "$t" peak_rss "$r" "$(awk -v k="$kb" 'BEGIN {printf "%.1f\n", k / 1024}')"
    rm -f "$mnt/big.dat"
}
