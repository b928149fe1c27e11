//! The command line on bad input: one clear line, a non-zero exit, nothing changed.

mod common;

use std::fs;

use common::*;

fn fails_with(args: &[&str], needle: &str) {
    let out = snapfs(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        err.contains(needle),
        "{args:?}: stderr {err:?} lacks {needle:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err:?}");
    assert!(!err.contains("panicked"));
}

#[test]
fn mount_refuses_bad_mountpoints_and_stores() {
    let m = Mount::new();
    let d = m.dir.path();
    let s = |p: &str| d.join(p).display().to_string();
    fs::write(d.join("file"), b"x").unwrap();
    fs::create_dir(d.join("notastore")).unwrap();
    fs::write(d.join("notastore/keep"), b"data").unwrap();
    fs::create_dir(d.join("mnt2")).unwrap();

    fails_with(&["mount", &s("new"), &s("missing")], "missing");
    fails_with(&["mount", &s("new"), &s("file")], "not a directory");
    fails_with(
        &["mount", &s("new"), m.mnt.to_str().unwrap()],
        "already a mount point",
    );
    fails_with(
        &["mount", &s("notastore"), &s("mnt2")],
        "not a snapfs store",
    );
    assert_eq!(fs::read(d.join("notastore/keep")).unwrap(), b"data");
    assert_eq!(
        fs::read_dir(d.join("notastore")).unwrap().count(),
        1,
        "nothing added"
    );
    // A second mount is a bind mount of the first, with per-mount options only.
    fails_with(
        &[
            "mount",
            m.store.to_str().unwrap(),
            &s("mnt2"),
            "-o",
            "snapdir=visible",
        ],
        "is the volume's, set by its first mount",
    );
    assert!(!snapfs::daemon::is_mounted(&d.join("mnt2")));
    fails_with(
        &["mount", &s("new"), &s("mnt2"), "-o", "bogus"],
        "unknown mount option",
    );
    // A block size that is no power of two from 4K to 1M, and one for a store that
    // exists already (or a second mount): refused, nothing made.
    for bad in ["3K", "2M", "0", "x", "", "4294967296", "1G"] {
        fails_with(
            &[
                "mount",
                &s("new"),
                &s("mnt2"),
                "-o",
                &format!("block_size={bad}"),
            ],
            "want a power of two from 4K to 1M",
        );
    }
    fails_with(
        &[
            "mount",
            m.store.to_str().unwrap(),
            &s("mnt2"),
            "-o",
            "block_size=64K",
        ],
        "is the volume's, set by its first mount",
    );
    assert!(!d.join("new").exists(), "a refused mount made a store");
    fails_with(&["fsck", &s("notastore")], "neither a snapfs store");
}

#[test]
fn a_corrupt_database_is_refused_cleanly() {
    let mut m = Mount::new();
    fs::write(m.path("f"), b"data").unwrap();
    m.unmount();
    let db = m.store.join("snapfs.redb");
    let mut bytes = fs::read(&db).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b ^= 0x5a;
    }
    fs::write(&db, &bytes).unwrap();
    let mnt2 = m.dir.path().join("mnt2");
    fs::create_dir(&mnt2).unwrap();
    fails_with(
        &["mount", m.store.to_str().unwrap(), mnt2.to_str().unwrap()],
        "cannot open store",
    );
    assert_eq!(fs::read(&db).unwrap(), bytes, "the store is left as it was");
    // For fsck the damage is a finding: named, exit 1, the store untouched.
    let out = snapfs(&["fsck", m.store.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("damage: store is damaged: the metadata file")
            && text.contains("fails its checks"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("DAMAGED"), "{text}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    assert_eq!(
        fs::read(&db).unwrap(),
        bytes,
        "fsck left the store as it was"
    );
}

#[test]
fn fsck_finds_a_damaged_extent() {
    let mut m = Mount::new();
    fs::write(m.path("f"), pattern(7, 200_000)).unwrap();
    m.unmount();
    assert!(m.fsck().status.success());
    let seg = m.first_segment();
    let mut bytes = fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xff;
    fs::write(&seg, &bytes).unwrap();
    let out = m.fsck();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not match its hash"));
    // Reading the damaged block answers EIO, not wrong bytes.
    m.mount(&[]);
    let e = fs::read(m.path("f")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
}

#[test]
fn status_and_fsck_work_mounted_and_unmounted() {
    let mut m = Mount::new();
    fs::write(m.path("a"), pattern(1, 100_000)).unwrap();
    let mounted = snapfs(&["status", m.mnt.to_str().unwrap()]);
    assert!(mounted.status.success());
    let text = String::from_utf8_lossy(&mounted.stdout).into_owned();
    assert!(text.contains("files:            1"), "{text}");
    assert!(text.contains("logical bytes:    100000"), "{text}");
    // Only a mounted volume has requests to serve.
    assert!(text.contains("\nrequests:         "), "{text}");
    let f = snapfs(&["fsck", m.mnt.to_str().unwrap()]);
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
    m.unmount();
    let st = snapfs(&["status", m.store.to_str().unwrap()]);
    let unmounted = String::from_utf8_lossy(&st.stdout).into_owned();
    assert!(!unmounted.contains("requests:"), "{unmounted}");
    // Unmounting compacts the metadata file, so only the bytes on disk may differ.
    let strip = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with("on disk:") && !l.starts_with("requests:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&unmounted), strip(&text));
}

#[test]
fn sigterm_flushes_and_exits_cleanly() {
    let mut m = Mount::new();
    fs::write(m.path("f"), b"written before SIGTERM").unwrap();
    let pid = m.pid();
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_exit(pid);
    assert!(!snapfs::daemon::is_mounted(&m.mnt));
    m.mount(&[]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"written before SIGTERM");
}

fn pread_4k(path: &std::path::Path, at: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let f = fs::File::open(path)?;
    // SAFETY: valid descriptor; no readahead, so the read asks for this page alone.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, at)?;
    Ok(buf)
}

#[test]
fn small_reads_verify_the_leaves_they_touch() {
    let m = Mount::new();
    let data = pattern(9, 1 << 20);
    fs::write(m.path("f"), &data).unwrap();
    drop_caches();
    assert!(fs::read(m.path("f")).unwrap() == data);
    drop_caches();
    // A first small read in block 2 verifies the block whole and keeps its leaf values.
    let block2 = 2 * 65536u64;
    assert!(pread_4k(&m.path("f"), block2).unwrap() == data[block2 as usize..][..4096]);
    // Damage one byte of block 2 in place (extents are appended in order: a 16-byte
    // segment header, then a 40-byte header before each 64 KiB extent).
    let seg = m.first_segment();
    let at = 16 + 2 * (40 + 65536) + 40 + 5000;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    assert_eq!(b[0], data[2 * 65536 + 5000], "the layout is as assumed");
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    drop(f);
    drop_caches();
    let e = pread_4k(&m.path("f"), block2 + 4096).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EIO),
        "the damaged leaf is caught"
    );
    let good = pread_4k(&m.path("f"), block2 + 8 * 4096).unwrap();
    assert!(
        good == data[(block2 + 8 * 4096) as usize..][..4096],
        "other leaves still read"
    );
}

/// The mount's share of the kernel's dirty pages: 10% by default, `bdi_max_ratio=`
/// (from `-o` or snapfs.toml) otherwise, and a bad value refused before anything is
/// mounted.
#[test]
fn the_mount_sets_its_share_of_dirty_pages() {
    use std::os::unix::fs::MetadataExt;
    let ratio = |m: &Mount| {
        let dev = std::fs::metadata(&m.mnt).unwrap().dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        std::fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/max_ratio"))
            .unwrap()
            .trim()
            .to_string()
    };
    let m = Mount::new();
    assert_eq!(ratio(&m), "10");
    drop(m);
    let mut m = Mount::with_options(&["bdi_max_ratio=3"]);
    assert_eq!(ratio(&m), "3");
    // STORE/snapfs.toml sets it too, and -o wins over the file.
    m.unmount();
    std::fs::write(m.store.join("snapfs.toml"), "bdi_max_ratio = \"4\"\n").unwrap();
    m.mount(&[]);
    assert_eq!(ratio(&m), "4");
    m.unmount();
    m.mount(&["bdi_max_ratio=5"]);
    assert_eq!(ratio(&m), "5");
    fails_with(
        &[
            "mount",
            "-o",
            "bdi_max_ratio=0",
            m.store.to_str().unwrap(),
            "/nonexistent",
        ],
        "bdi_max_ratio=0: want a percentage from 1 to 100",
    );
}

/// The mount options of the mount at `mnt`, as /proc/self/mountinfo lists them.
fn mount_flags(mnt: &std::path::Path) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mnt = mnt.to_str().unwrap();
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(mnt))
        .unwrap_or_else(|| panic!("{mnt} is not mounted"));
    line.split(' ')
        .nth(5)
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect()
}

#[test]
fn the_mount_helper_gives_root_dev_and_suid_unless_asked_not_to() {
    let dir = test_dir();
    let helper = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/mount-helper/mount.fuse.snapfs"
    );
    for (opts, nosuid, nodev) in [
        ("", false, false),
        ("nosuid", true, false),
        ("nodev,noatime", false, true),
    ] {
        let store = dir.path().join(format!("store-{opts}"));
        let mnt = dir.path().join(format!("mnt-{opts}"));
        fs::create_dir(&mnt).unwrap();
        // As mount(8) runs it: SPEC DIR -o OPTIONS (mount(8) passes no dev/suid).
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(helper).arg(&store).arg(&mnt).env("SNAPFS", SNAPFS);
        if !opts.is_empty() {
            cmd.args(["-o", opts]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{opts}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let flags = mount_flags(&mnt);
        let umount = std::process::Command::new("umount").arg(&mnt).status();
        assert!(umount.unwrap().success());
        assert_eq!(
            flags.iter().any(|f| f == "nosuid"),
            nosuid,
            "{opts}: {flags:?}"
        );
        assert_eq!(
            flags.iter().any(|f| f == "nodev"),
            nodev,
            "{opts}: {flags:?}"
        );
    }
}

#[test]
fn status_finds_the_store_of_a_mount_whose_source_is_a_name() {
    let m = Mount::with_options(&["source=a_plain_name"]);
    fs::write(m.path("a"), b"x").unwrap();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        info.lines()
            .any(|l| l.contains(m.mnt.to_str().unwrap()) && l.contains(" a_plain_name ")),
        "the mount's source is the name"
    );
    let text = snapfs_ok(&["status", m.mnt.to_str().unwrap()]);
    assert!(text.contains("files:            1"), "{text}");
    snapfs_ok(&["fsck", m.mnt.to_str().unwrap()]);
}

#[test]
fn a_second_mount_of_a_mounted_store_is_a_bind_mount_with_its_own_flags() {
    let mut m = Mount::with_options(&["source=a_name"]);
    let second = m.dir.path().join("second");
    fs::create_dir(&second).unwrap();
    let (store, mnt2) = (m.store.to_str().unwrap(), second.to_str().unwrap());
    snapfs_ok(&["mount", store, mnt2, "-o", "ro,source=a_name,noexec"]);
    let flags = mount_flags(&second);
    for f in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(flags.iter().any(|x| x == f), "{f} in {flags:?}");
    }
    // One volume at two places (xfstests generic/732's moves).
    fs::create_dir_all(m.path("A")).unwrap();
    fs::create_dir_all(m.path("B")).unwrap();
    fs::write(m.path("A/f"), b"one volume").unwrap();
    fs::rename(m.path("A/f"), m.path("B/f")).unwrap();
    assert_eq!(fs::read(second.join("B/f")).unwrap(), b"one volume");
    let e = fs::write(second.join("x"), b"").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EROFS),
        "the second mount is read-only"
    );
    // The first mount point goes; the volume lives on at the second, and commands
    // given that mount point find the store (its source is a name).
    let pid = m.pid();
    assert!(
        std::process::Command::new("umount")
            .arg(&m.mnt)
            .status()
            .unwrap()
            .success()
    );
    assert!(!exited_within(pid, std::time::Duration::from_millis(500)));
    assert_eq!(fs::read(second.join("B/f")).unwrap(), b"one volume");
    let text = snapfs_ok(&["status", mnt2]);
    assert!(text.contains("files:            1"), "{text}");
    snapfs_ok(&["snapshot", "create", mnt2, "s"]);
    assert_eq!(
        fs::read(second.join(".snapshots/s/B/f")).unwrap(),
        b"one volume"
    );
    // SIGTERM takes every mount of the volume down, and the daemon exits.
    let again = m.dir.path().join("again");
    fs::create_dir(&again).unwrap();
    snapfs_ok(&["mount", store, again.to_str().unwrap()]);
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_exit(pid);
    assert!(!snapfs::daemon::is_mounted(&second));
    assert!(!snapfs::daemon::is_mounted(&again));
    m.mount(&[]);
    assert_eq!(fs::read(m.path("B/f")).unwrap(), b"one volume");
    m.assert_fsck_clean();
}
