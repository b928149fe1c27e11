//! A daemon can always be stopped: aborting its FUSE connection (or killing it) while
//! requests are in flight ends it, and frees the callers, over io_uring as over
//! /dev/fuse.
//!
//! With `SNAPFS_EXPECT_URING=1` (CI sets it) a mount that did not get FUSE over
//! io_uring fails the test instead of testing /dev/fuse alone.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// The transport the mount's daemon serves requests on, from `snapfs status`.
fn transport(m: &Mount) -> String {
    let st = m.status_with("requests:");
    st.lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_default()
        .to_string()
}

/// Whether the kernel offers FUSE over io_uring now.
fn uring_on() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y")
}

/// Mounts with `opts`, checks the transport is what the machine promises.
fn mount(opts: &[&str], want_uring: bool) -> Mount {
    let m = Mount::with_options(opts);
    let t = transport(&m);
    if want_uring {
        let expected = std::env::var("SNAPFS_EXPECT_URING").is_ok_and(|v| v == "1");
        assert!(
            t.contains("io_uring") || (!expected && !uring_on()),
            "io_uring was expected: {t}"
        );
    } else {
        assert!(t.contains("/dev/fuse"), "{t}");
    }
    m
}

/// Starts `n` threads that each look up a name never looked up before (no kernel
/// cache can answer: each waits for the daemon); every result (an errno, or 0)
/// comes back on the channel.
fn callers(mnt: &Path, n: usize) -> mpsc::Receiver<i32> {
    let (tx, rx) = mpsc::channel();
    for i in 0..n {
        let (tx, mnt) = (tx.clone(), mnt.to_path_buf());
        std::thread::spawn(move || {
            let r = std::fs::metadata(mnt.join(format!("never-seen-{i}")));
            let _ = tx.send(r.err().and_then(|e| e.raw_os_error()).unwrap_or(0));
        });
    }
    rx
}

/// Sends SIGCONT when dropped, so that a test failing while the daemon is stopped
/// does not leave its unmount waiting on it for ever.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Waits until every thread of `pid` is stopped.
fn wait_stopped(pid: i32) {
    let t = std::time::Instant::now();
    loop {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .all(|t| {
                std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('T'))
                })
            });
        if all {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "daemon {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The kernel's control file of the FUSE connection mounted at `mnt`.
fn abort_file(dev: u64) -> std::path::PathBuf {
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    Path::new("/sys/fs/fuse/connections")
        .join(minor.to_string())
        .join("abort")
}

fn stop(pid: i32, sig: i32) {
    // SAFETY: plain kill(2).
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// Stops the daemon, puts requests in flight, aborts the connection (or kills the
/// daemon with `kill`), and checks that callers and daemon both get free.
fn in_flight_then(opts: &[&str], want_uring: bool, kill: bool) {
    let mut m = mount(opts, want_uring);
    {
        // Made durable: a kill loses what no fsync asked for.
        let f = std::fs::File::create(m.path("f")).unwrap();
        std::io::Write::write_all(&mut &f, b"data").unwrap();
        f.sync_all().unwrap();
    }
    drop_caches();
    let pid = m.pid();
    let dev = std::fs::metadata(&m.mnt).unwrap().dev();
    stop(pid, libc::SIGSTOP);
    let _resume = Resume(pid);
    wait_stopped(pid);
    let rx = callers(&m.mnt, 8);
    // Give the requests time to reach the kernel's queues; none can be answered.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        rx.try_recv().is_err(),
        "a request was answered by a stopped daemon"
    );
    if kill {
        stop(pid, libc::SIGKILL);
    } else {
        std::fs::write(abort_file(dev), b"1").unwrap();
        stop(pid, libc::SIGCONT);
    }
    // Every caller returns (with an error: the connection is gone).
    for _ in 0..8 {
        let e = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a caller stayed blocked after the connection ended");
        assert_ne!(e, 0, "a request succeeded on an aborted connection");
    }
    // The daemon exits, leaving no thread behind.
    assert!(
        exited_within(pid, Duration::from_secs(15)),
        "daemon {pid} did not exit after the connection ended: {}",
        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
    );
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&m.mnt)
        .status();
    m.forget();
    // The store is whole and can be mounted again.
    let mut again = Mount::at(m.store.clone(), m.mnt.clone(), opts);
    assert_eq!(std::fs::read(again.path("f")).unwrap(), b"data");
    again.unmount();
    m.assert_fsck_clean();
}

#[test]
fn aborting_the_connection_with_requests_in_flight_over_io_uring_ends_the_daemon() {
    in_flight_then(&[], true, false);
}

#[test]
fn killing_the_daemon_with_requests_in_flight_over_io_uring_frees_the_callers() {
    in_flight_then(&[], true, true);
}

#[test]
fn aborting_the_connection_with_requests_in_flight_over_dev_fuse_ends_the_daemon() {
    in_flight_then(&["nouring"], false, false);
}
