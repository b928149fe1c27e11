//! Shared test harness: mounts a real snapfs store through the built binary and
//! unmounts it when the guard drops.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const SNAPFS: &str = env!("CARGO_BIN_EXE_snapfs");

/// A store directory and a mountpoint in one temporary directory.
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub mnt: PathBuf,
    mounted: bool,
}

pub fn snapfs(args: &[&str]) -> Output {
    Command::new(SNAPFS)
        .args(args)
        .output()
        .expect("running snapfs")
}

impl Mount {
    /// A fresh store, mounted.
    pub fn new() -> Mount {
        Self::with_options(&[])
    }

    pub fn with_options(opts: &[&str]) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("snapfs-test")
            .tempdir()
            .expect("tempdir");
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut m = Mount {
            dir,
            store,
            mnt,
            mounted: false,
        };
        m.mount(opts);
        m
    }

    pub fn mount(&mut self, opts: &[&str]) {
        let mut args = vec![
            "mount",
            self.store.to_str().unwrap(),
            self.mnt.to_str().unwrap(),
        ];
        for o in opts {
            args.push("-o");
            args.push(o);
        }
        let out = snapfs(&args);
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = true;
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        std::fs::read_to_string(self.store.join("snapfs.pid"))
            .expect("pid file")
            .trim()
            .parse()
            .unwrap()
    }

    /// Unmounts and waits until the daemon has exited (and released the store).
    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        let pid = self.pid();
        let st = Command::new("umount").arg(&self.mnt).status().unwrap();
        assert!(st.success(), "umount failed");
        self.mounted = false;
        wait_exit(pid);
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.mount(&[]);
    }

    /// Kills the daemon with SIGKILL and detaches the dead mount.
    pub fn kill9(&mut self) {
        let pid = self.pid();
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_exit(pid);
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        self.mounted = false;
    }

    pub fn fsck(&self) -> Output {
        snapfs(&["fsck", self.store.to_str().unwrap(), "--read-data"])
    }

    /// Bytes used on disk by the store (allocated blocks).
    pub fn store_bytes(&self) -> u64 {
        du(&self.store)
    }
}

pub fn du(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        if md.is_dir() {
            total += du(&e.path());
        } else {
            total += md.blocks() * 512;
        }
    }
    total
}

/// Waits for `pid` to exit (or become a zombie), at most 30 s.
pub fn wait_exit(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        // A zombie leader may still have threads finishing their exit (and holding the
        // store's files); it is gone once only the leader is left.
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
        let zombie = |s: &str| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        };
        match stat {
            Err(_) => return,
            Ok(s) if zombie(&s) && threads <= 1 => return,
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "daemon {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let pid = std::fs::read_to_string(self.store.join("snapfs.pid")).ok();
            let _ = Command::new("umount").arg(&self.mnt).status();
            if let Some(pid) = pid.and_then(|p| p.trim().parse().ok()) {
                wait_exit(pid);
            }
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs `sh -c script` as uid/gid 65534 (nobody); returns the output.
pub fn as_nobody(script: &str) -> Output {
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}
