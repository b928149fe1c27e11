//! How requests reach the daemon: FUSE over io_uring (a queue per CPU, served by
//! threads on that CPU) when the kernel offers it, `/dev/fuse` otherwise.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;

use common::*;

/// The kernel offers FUSE over io_uring only with `fuse.enable_uring` set (the test
/// scripts set it where the kernel has it). Where they promise it
/// (`SNAPFS_EXPECT_URING=1`), its absence fails the test instead of skipping it.
fn uring_enabled() -> bool {
    let on = fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .map(|v| v.trim() == "Y")
        .unwrap_or(false);
    let promised = std::env::var("SNAPFS_EXPECT_URING").is_ok_and(|v| v == "1");
    assert!(
        on || !promised,
        "SNAPFS_EXPECT_URING=1 but the kernel does not offer FUSE over io_uring"
    );
    on && cfg!(feature = "uring")
}

/// The daemon's threads whose name starts with `prefix`: (tid, context switches).
fn threads(pid: i32, prefix: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = fs::read_to_string(t.join("comm")).unwrap_or_default();
        if !comm.trim().starts_with(prefix) {
            continue;
        }
        let status = fs::read_to_string(t.join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.push((
            t.file_name().unwrap().to_string_lossy().into_owned(),
            switches,
        ));
    }
    out.sort();
    out
}

/// The daemon's `prefix` threads once there are at least `n` of them (at most 10 s):
/// the daemon reports the mount live before its session starts them (requests wait in
/// the kernel meanwhile).
fn wait_threads(pid: i32, prefix: &str, n: usize) -> Vec<(String, u64)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut t = threads(pid, prefix);
    while t.len() < n && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        t = threads(pid, prefix);
    }
    t
}

fn switches(pid: i32, prefix: &str) -> u64 {
    threads(pid, prefix).iter().map(|t| t.1).sum()
}

/// The kernel's queues: one per possible CPU (a list such as `0-3,8-11`).
fn possible_cpus() -> usize {
    let s = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    s.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// Lookups, creates, writes, a snapshot by mkdir (answered from another thread), reads
/// and removals, checked for content.
fn exercise(m: &Mount, n: usize) {
    for i in 0..n {
        let p = m.path(&format!("f{i}"));
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(&pattern(i as u64, 5000 + i)).unwrap();
        drop(f);
        assert!(fs::metadata(m.path(&format!("absent{i}"))).is_err());
    }
    fs::create_dir(m.path(".snapshots/s1")).unwrap();
    let big = pattern(99, 3 << 20);
    let f = create_rw(&m.path("big"));
    f.write_all_at(&big, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    drop_caches();
    assert!(fs::read(m.path("big")).unwrap() == big);
    for i in 0..n {
        let want = pattern(i as u64, 5000 + i);
        assert!(fs::read(m.path(&format!("f{i}"))).unwrap() == want);
        assert!(fs::read(m.path(&format!(".snapshots/s1/f{i}"))).unwrap() == want);
        fs::remove_file(m.path(&format!("f{i}"))).unwrap();
    }
}

#[test]
fn requests_are_served_by_threads_pinned_per_cpu_over_io_uring() {
    if !uring_enabled() {
        eprintln!("skipped: the kernel does not offer FUSE over io_uring (fuse.enable_uring)");
        return;
    }
    let mut m = Mount::new();
    let pid = m.pid();
    let want = possible_cpus() * snapfs::daemon::DEFAULT_URING_THREADS;
    let rings = wait_threads(pid, "fuser-ring-", want);
    assert_eq!(rings.len(), want, "ring threads: {rings:?}");
    let st = m.status_with("requests:");
    assert!(
        st.contains(&format!(
            "requests:         FUSE over io_uring, {want} threads on {} CPU queues",
            possible_cpus()
        )),
        "{st}"
    );
    let (ring0, dev0) = (switches(pid, "fuser-ring-"), switches(pid, "fuser-"));
    exercise(&m, 300);
    let ring = switches(pid, "fuser-ring-") - ring0;
    // `fuser-` counts the ring threads too: what is left are the /dev/fuse threads.
    let dev = switches(pid, "fuser-") - dev0 - ring;
    // Each of the 1,500-odd requests above wakes a ring thread (some in batches); the
    // /dev/fuse threads see forgets only.
    assert!(
        ring >= 600,
        "ring threads switched {ring} times, /dev/fuse threads {dev}"
    );
    assert!(
        dev * 4 < ring,
        "/dev/fuse threads switched {dev} times, ring threads {ring}"
    );
    m.unmount();
    assert!(m.fsck().status.success());
    m.mount(&[]);
    assert!(fs::read(m.path("big")).unwrap() == pattern(99, 3 << 20));
}

#[test]
fn uring_threads_sets_the_threads_per_cpu() {
    if !uring_enabled() {
        eprintln!("skipped: the kernel does not offer FUSE over io_uring (fuse.enable_uring)");
        return;
    }
    let m = Mount::with_options(&["uring_threads=3", "uring_depth=3"]);
    let pid = m.pid();
    let want = possible_cpus() * 3;
    assert_eq!(wait_threads(pid, "fuser-ring-", want).len(), want);
    exercise(&m, 50);
}

#[test]
fn nouring_serves_everything_through_dev_fuse() {
    let m = Mount::with_options(&["nouring"]);
    let pid = m.pid();
    // The session starts its queue threads (if any) before its /dev/fuse threads.
    assert!(!wait_threads(pid, "fuser-0", 1).is_empty());
    assert!(threads(pid, "fuser-ring-").is_empty());
    // Waits for the last of the four /dev/fuse threads to start.
    let st = m.status_with("requests:         /dev/fuse, 4 threads");
    assert!(
        st.contains("requests:         /dev/fuse, 4 threads (-o nouring)\n"),
        "{st}"
    );
    let dev0 = switches(pid, "fuser-");
    exercise(&m, 100);
    assert!(switches(pid, "fuser-") - dev0 >= 300);
}
