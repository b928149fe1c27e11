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

/// A temporary directory for one test.
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("snapfs-test")
        .tempdir()
        .expect("tempdir")
}

pub fn snapfs(args: &[&str]) -> Output {
    Command::new(SNAPFS)
        .args(args)
        .output()
        .expect("running snapfs")
}

/// `snapfs ARGS`, which must succeed: its standard output.
#[allow(dead_code)] // not every test file uses it
pub fn snapfs_ok(args: &[&str]) -> String {
    let out = snapfs(args);
    assert!(
        out.status.success(),
        "snapfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Mount {
    /// A fresh store, mounted.
    pub fn new() -> Mount {
        Self::with_options(&[])
    }

    pub fn with_options(opts: &[&str]) -> Mount {
        let dir = test_dir();
        let (store, mnt) = (dir.path().join("store"), dir.path().join("mnt"));
        Self::in_dir(dir, store, mnt, opts)
    }

    /// A store at `store` (made if missing), mounted at `mnt` (made if missing).
    pub fn at(store: PathBuf, mnt: PathBuf, opts: &[&str]) -> Mount {
        Self::in_dir(test_dir(), store, mnt, opts)
    }

    fn in_dir(dir: tempfile::TempDir, store: PathBuf, mnt: PathBuf, opts: &[&str]) -> Mount {
        std::fs::create_dir_all(&mnt).unwrap();
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
        // The kernel may hold the mount busy a moment after the last close (a
        // file's writeback still in flight, or a descriptor another test's fork
        // carries until its exec): tried again for up to 10 s.
        let mut tries = 0;
        loop {
            let out = Command::new("umount").arg(&self.mnt).output().unwrap();
            if out.status.success() {
                break;
            }
            let e = String::from_utf8_lossy(&out.stderr);
            tries += 1;
            assert!(e.contains("busy") && tries < 100, "umount failed: {e}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.mounted = false;
        wait_exit(pid);
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.mount(&[]);
    }

    /// Forgets the mount (the test ended it another way).
    pub fn forget(&mut self) {
        self.mounted = false;
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

    /// Asserts that `fsck --read-data` finds the store clean, showing its report if not.
    pub fn assert_fsck_clean(&self) {
        let out = self.fsck();
        assert!(
            out.status.success(),
            "fsck: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// The store's first segment file.
    pub fn first_segment(&self) -> PathBuf {
        let mut segs: Vec<PathBuf> = std::fs::read_dir(self.store.join("segments"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        segs.remove(0)
    }

    /// Bytes used on disk by the store (allocated blocks).
    pub fn store_bytes(&self) -> u64 {
        du(&self.store)
    }
}

impl Mount {
    /// `snapfs status` once it contains `needle`. The kernel sends RELEASE after
    /// close(2) has returned, so what a close frees shows up shortly after; this
    /// waits (at most 10 s) for it, and fails with the last status otherwise.
    pub fn status_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = snapfs(&["status", self.mnt.to_str().unwrap()]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "status never showed {needle:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Creates (or truncates) `p` for reading and writing.
/// Writes back every filesystem's dirty pages and drops the kernel's caches, so the
/// next reads reach the daemon.
pub fn drop_caches() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"3").expect("dropping caches (needs root)");
}

/// Bytes appended to the store's segments so far.
pub fn segment_bytes(store: &Path) -> u64 {
    std::fs::read_dir(store.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Writes `data` at `off` both to `f` and to `model`, the bytes the file should hold.
pub fn write_modelled(f: &std::fs::File, model: &mut Vec<u8>, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    f.write_all_at(data, off).unwrap();
    let end = off as usize + data.len();
    if model.len() < end {
        model.resize(end, 0);
    }
    model[off as usize..end].copy_from_slice(data);
}

pub fn create_rw(p: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(p)
        .unwrap()
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

/// Waits for `pid` to exit (or become a zombie), at most 30 s; panics if it does not.
pub fn wait_exit(pid: i32) {
    assert!(
        exited_within(pid, Duration::from_secs(30)),
        "daemon {pid} did not exit"
    );
}

/// Whether `pid` exits (or becomes a zombie with no threads left) within `limit`.
pub fn exited_within(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
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
            Err(_) => return true,
            Ok(s) if zombie(&s) && threads <= 1 => return true,
            Ok(_) => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Mount {
    /// Never panics (it may run while a failed test unwinds): a busy mount is detached
    /// lazily and the daemon given time to go.
    fn drop(&mut self) {
        if self.mounted {
            let pid = std::fs::read_to_string(self.store.join("snapfs.pid")).ok();
            let clean = Command::new("umount")
                .arg(&self.mnt)
                .status()
                .is_ok_and(|s| s.success());
            if !clean {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
            if let Some(pid) = pid.and_then(|p| p.trim().parse().ok()) {
                let _ = exited_within(pid, Duration::from_secs(30));
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

/// Everything a snapshot must preserve about a tree: per path, the kind, mode, owner,
/// size, content hash (or link target) and xattrs. `.snapshots` at the top is skipped.
pub fn tree_digest(root: &Path) -> std::collections::BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == ".snapshots" {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            let body = if md.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if md.is_file() {
                format!(
                    "file {}",
                    blake3::hash(&std::fs::read(&p).unwrap()).to_hex()
                )
            } else if md.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else {
                format!("special {}", md.rdev())
            };
            let mut xattrs = xattr_names(&p);
            xattrs.sort();
            let xv: Vec<String> = xattrs
                .iter()
                .map(|n| format!("{n}={}", blake3::hash(&xattr_value(&p, n)).to_hex()))
                .collect();
            out.insert(
                rel,
                format!(
                    "{body} mode={:o} uid={} gid={} size={} nlink={} mtime={} xattrs={xv:?}",
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    if md.is_dir() { 0 } else { md.size() },
                    md.nlink(),
                    md.mtime_nsec() + md.mtime() * 1_000_000_000,
                ),
            );
        }
    }
    out
}

fn cstr(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn xattr_names(p: &Path) -> Vec<String> {
    let c = cstr(p);
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid pointers.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "listxattr {}", p.display());
    buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

pub fn xattr_value(p: &Path, name: &str) -> Vec<u8> {
    let c = cstr(p);
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid pointers.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "getxattr {} {name}", p.display());
    buf.truncate(r as usize);
    buf
}

/// Builds a varied tree under `root`: files of several sizes, a sparse file, hard
/// links, symlinks, xattrs, modes and owners.
pub fn populate(root: &Path, seed: u64) {
    use std::os::unix::fs::PermissionsExt;
    let p = |s: &str| root.join(s);
    std::fs::create_dir_all(p("docs/deep/er")).unwrap();
    std::fs::create_dir_all(p("bin")).unwrap();
    for i in 0..20u64 {
        std::fs::write(
            p(&format!("docs/f{i}")),
            pattern(seed + i, (i as usize * 37_123) % 300_000),
        )
        .unwrap();
    }
    std::fs::write(p("docs/deep/er/big"), pattern(seed + 99, 3 << 20)).unwrap();
    let f = std::fs::File::create(p("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"end", 50 << 20).unwrap();
    std::fs::hard_link(p("docs/f3"), p("bin/f3-link")).unwrap();
    std::os::unix::fs::symlink("../docs/f1", p("bin/link")).unwrap();
    std::fs::set_permissions(p("bin/f3-link"), std::fs::Permissions::from_mode(0o751)).unwrap();
    std::os::unix::fs::chown(p("docs/f2"), Some(1234), Some(5678)).unwrap();
    let c = cstr(&p("docs/f4"));
    let n = std::ffi::CString::new("user.tag").unwrap();
    // SAFETY: valid pointers.
    assert_eq!(
        unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), b"v1".as_ptr().cast(), 2, 0) },
        0
    );
}

/// Heavy changes: rewrite, truncate, delete, rename, chmod, new files, xattr changes.
pub fn churn(root: &Path, seed: u64) {
    use std::os::unix::fs::PermissionsExt;
    let p = |s: &str| root.join(s);
    for i in 0..20u64 {
        let f = p(&format!("docs/f{i}"));
        if !f.exists() {
            std::fs::write(&f, pattern(seed * 7 + i, 5000)).unwrap();
            continue;
        }
        match i % 4 {
            0 => std::fs::write(&f, pattern(seed * 1000 + i, 100_000)).unwrap(),
            1 => std::fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .unwrap()
                .set_len(10)
                .unwrap(),
            2 => std::fs::remove_file(&f).unwrap(),
            _ => std::fs::rename(&f, p(&format!("docs/deep/moved{i}-{seed}"))).unwrap(),
        }
    }
    if p("docs/deep/er/big").exists() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p("docs/deep/er/big"))
            .unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&pattern(seed, 70_000), 1 << 20).unwrap();
    }
    std::fs::set_permissions(p("bin"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(p(&format!("new-{seed}")), pattern(seed, 12345)).unwrap();
    let _ = std::fs::remove_file(p("bin/link"));
}

/// Each snapshot of a mount, by name, as `tree_digest` sees it.
pub fn snapshot_trees(m: &Mount) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    let mut names: Vec<String> = std::fs::read_dir(m.path(".snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = tree_digest(&m.path(&format!(".snapshots/{n}")));
            (n, t)
        })
        .collect()
}

/// The snapshot names a `snapshot list --json` that must have succeeded printed.
pub fn names_listed(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "snapshot list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// A loopback port for a server a test starts by number. Taken below the kernel's
/// ephemeral range (32768 and up by default), so no client connection on the machine
/// is given it as its source port between our check and the server's bind; each port
/// is handed out once per test process, and must bind now.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Start somewhere that depends on the process, so test binaries run side by side
    // (by hand) do not walk the same ports.
    let base = 20_000 + (std::process::id() % 500) * 20;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + n) % 12_000 + 20_000;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

/// A `snapfs serve` child, killed when dropped.
#[allow(dead_code)]
pub struct Server {
    pub child: std::process::Child,
    pub addr: String,
}

impl Server {
    #[allow(dead_code)]
    pub fn start(store: &Path, key: &Path) -> Server {
        use std::io::BufRead;
        let mut child = std::process::Command::new(SNAPFS)
            .args(["serve", store.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .arg("--key-file")
            .arg(key)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{line:?}"))
            .to_string();
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
