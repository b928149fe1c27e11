//! Snapshots on a real mount: frozen trees, read-only, rollback, diff, space.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use common::*;

fn snap(m: &Mount, args: &[&str]) -> String {
    let mut a = vec!["snapshot"];
    a.push(args[0]);
    a.push(m.mnt.to_str().unwrap());
    a.extend_from_slice(&args[1..]);
    let out = snapfs(&a);
    assert!(
        out.status.success(),
        "snapfs {a:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_snapshot_stays_byte_identical_through_churn_remount_and_other_deletions() {
    let mut m = Mount::new();
    populate(&m.mnt, 1);
    let before = tree_digest(&m.mnt);
    fs::create_dir(m.path(".snapshots/one")).unwrap();
    snap(&m, &["create", "two"]);
    assert_eq!(tree_digest(&m.path(".snapshots/one")), before);
    churn(&m.mnt, 2);
    snap(&m, &["create", "three"]);
    churn(&m.mnt, 3);
    assert_ne!(tree_digest(&m.mnt), before, "the live tree did change");
    assert_eq!(tree_digest(&m.path(".snapshots/one")), before);
    m.remount();
    assert_eq!(tree_digest(&m.path(".snapshots/one")), before);
    fs::remove_dir(m.path(".snapshots/two")).unwrap();
    snap(&m, &["delete", "three"]);
    assert_eq!(tree_digest(&m.path(".snapshots/one")), before);
    let names: Vec<String> = fs::read_dir(m.path(".snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["one"]);
    m.unmount();
    let f = m.fsck();
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

#[test]
fn every_change_under_snapshots_is_erofs() {
    let m = Mount::new();
    populate(&m.mnt, 7);
    fs::create_dir(m.path(".snapshots/s")).unwrap();
    let s = |p: &str| m.path(&format!(".snapshots/s/{p}"));
    let c = |p: &Path| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let erofs = libc::EROFS;
    assert_eq!(
        errno_of(OpenOptions::new().write(true).open(s("docs/f1"))),
        erofs,
        "open for write"
    );
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .read(true)
                .write(true)
                .truncate(true)
                .open(s("docs/f1"))
        ),
        erofs
    );
    assert_eq!(errno_of(fs::write(s("new"), b"x")), erofs, "create");
    assert_eq!(errno_of(fs::create_dir(s("newdir"))), erofs, "mkdir");
    assert_eq!(errno_of(fs::remove_file(s("docs/f1"))), erofs, "unlink");
    assert_eq!(errno_of(fs::remove_dir(s("bin"))), erofs, "rmdir");
    assert_eq!(
        errno_of(fs::rename(s("docs/f1"), s("docs/f1b"))),
        erofs,
        "rename within"
    );
    assert_eq!(
        errno_of(fs::rename(s("docs/f1"), m.path("out"))),
        erofs,
        "rename out"
    );
    assert_eq!(
        errno_of(fs::rename(m.path("sparse"), s("in"))),
        erofs,
        "rename in"
    );
    assert_eq!(
        errno_of(fs::hard_link(s("docs/f1"), s("docs/l"))),
        erofs,
        "link"
    );
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("x", s("sym"))),
        erofs,
        "symlink"
    );
    // SAFETY: valid paths and pointers throughout.
    unsafe {
        assert_eq!(
            libc::mknod(c(&s("fifo")).as_ptr(), libc::S_IFIFO | 0o644, 0),
            -1
        );
        assert_eq!(*libc::__errno_location(), erofs, "mknod");
        assert_eq!(libc::truncate(c(&s("docs/f1")).as_ptr(), 0), -1);
        assert_eq!(*libc::__errno_location(), erofs, "truncate");
        assert_eq!(libc::chmod(c(&s("docs/f1")).as_ptr(), 0o777), -1);
        assert_eq!(*libc::__errno_location(), erofs, "chmod");
        assert_eq!(libc::chown(c(&s("docs/f1")).as_ptr(), 1, 1), -1);
        assert_eq!(*libc::__errno_location(), erofs, "chown");
        assert_eq!(
            libc::utimes(c(&s("docs/f1")).as_ptr(), std::ptr::null()),
            -1
        );
        assert_eq!(*libc::__errno_location(), erofs, "utimes");
        let n = c(Path::new("user.x"));
        assert_eq!(
            libc::setxattr(
                c(&s("docs/f1")).as_ptr(),
                n.as_ptr(),
                b"1".as_ptr().cast(),
                1,
                0
            ),
            -1
        );
        assert_eq!(*libc::__errno_location(), erofs, "setxattr");
        let tag = c(Path::new("user.tag"));
        assert_eq!(
            libc::removexattr(c(&s("docs/f4")).as_ptr(), tag.as_ptr()),
            -1
        );
        assert_eq!(*libc::__errno_location(), erofs, "removexattr");
    }
    // Through an open handle.
    let f = File::open(s("docs/f1")).unwrap();
    // SAFETY: valid descriptor.
    unsafe {
        assert_eq!(libc::fchmod(f.as_raw_fd(), 0o600), -1);
        assert_eq!(*libc::__errno_location(), erofs, "fchmod through a handle");
    }
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("docs/f1"))
        .unwrap();
    drop(rw);
    // The snapshot itself is unchanged by all this.
    assert_eq!(
        fs::read(s("docs/f4")).unwrap(),
        fs::read(m.path("docs/f4")).unwrap()
    );
}

#[test]
fn snapshot_inodes_differ_from_live_and_survive_remount() {
    let mut m = Mount::new();
    fs::write(m.path("f"), b"x").unwrap();
    fs::create_dir(m.path(".snapshots/a")).unwrap();
    fs::create_dir(m.path(".snapshots/b")).unwrap();
    let mnt = m.mnt.clone();
    let ino = |p: &str| fs::metadata(mnt.join(p)).unwrap().ino();
    let (live, a, b) = (ino("f"), ino(".snapshots/a/f"), ino(".snapshots/b/f"));
    assert!(live != a && a != b && live != b);
    assert_eq!(
        fs::metadata(m.path(".snapshots/a/f")).unwrap().dev(),
        fs::metadata(m.path("f")).unwrap().dev()
    );
    m.remount();
    assert_eq!(
        (ino("f"), ino(".snapshots/a/f"), ino(".snapshots/b/f")),
        (live, a, b)
    );
    // tar sees no hard links between the live file and its snapshot copies
    let out = std::process::Command::new("tar")
        .arg("cf")
        .arg("-")
        .arg("-C")
        .arg(&m.mnt)
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success());
    let listing = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar cvf /dev/null -C {} . 2>&1 | grep -c 'link to' || true",
            m.mnt.display()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listing.stdout).trim(), "0");
}

#[test]
fn an_open_snapshot_file_reads_after_the_snapshot_is_deleted() {
    let m = Mount::new();
    let data = pattern(11, 2 << 20);
    fs::write(m.path("f"), &data).unwrap();
    fs::create_dir(m.path(".snapshots/s")).unwrap();
    fs::write(m.path("f"), b"overwritten").unwrap();
    let mut f = File::open(m.path(".snapshots/s/f")).unwrap();
    fs::remove_dir(m.path(".snapshots/s")).unwrap();
    assert!(!m.path(".snapshots/s").exists());
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert!(back == data);
    drop(f);
    // Once closed, the space goes.
    m.status_with("stored bytes:     11\n");
}

#[test]
fn names_are_validated_with_the_rule_broken() {
    let m = Mount::new();
    snap(&m, &["create", "ok"]);
    let bad = |name: &str, rule: &str| {
        let out = snapfs(&["snapshot", "create", m.mnt.to_str().unwrap(), name]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(rule), "{name:?}: {err}");
    };
    bad("ok", "already exists");
    bad("..", "'.' or '..'");
    bad("a/b", "'/'");
    bad(&"x".repeat(256), "255 bytes");
    assert_eq!(
        errno_of(fs::create_dir(m.path(".snapshots/ok"))),
        libc::EEXIST
    );
    assert_eq!(
        errno_of(fs::create_dir(
            m.path(&format!(".snapshots/{}", "y".repeat(256)))
        )),
        libc::ENAMETOOLONG
    );
    let out = snapfs(&["snapshot", "delete", m.mnt.to_str().unwrap(), "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot named"));
}

#[test]
fn rollback_waits_for_changed_files_to_close_and_keeps_working_directories() {
    let m = Mount::new();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"0123456789").unwrap();
    snap(&m, &["create", "s"]);
    // An open file the rollback would change: the kernel would keep its size.
    let mut f = OpenOptions::new().write(true).open(m.path("d/f")).unwrap();
    f.write_all(&[7u8; 100_000]).unwrap();
    f.sync_all().unwrap();
    let out = snapfs(&["snapshot", "rollback", m.mnt.to_str().unwrap(), "s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open"), "{err}");
    assert_eq!(fs::metadata(m.path("d/f")).unwrap().len(), 100_000);
    drop(f);
    // A process inside a directory the rollback changes keeps a working directory.
    let script = format!(
        "cd {d} && touch new && {bin} snapshot rollback {mnt} s >/dev/null && /bin/pwd && ls",
        d = m.path("d").display(),
        bin = SNAPFS,
        mnt = m.mnt.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[1..], ["f"], "pwd, then the listing: {stdout}");
    assert_eq!(fs::read(m.path("d/f")).unwrap(), b"0123456789");
}

#[test]
fn rollback_restores_the_exact_tree_and_keeps_newer_snapshots() {
    let mut m = Mount::new();
    populate(&m.mnt, 21);
    let at_s1 = tree_digest(&m.mnt);
    snap(&m, &["create", "s1"]);
    churn(&m.mnt, 22);
    let at_s2 = tree_digest(&m.mnt);
    snap(&m, &["create", "s2"]);
    churn(&m.mnt, 23);
    snap(&m, &["rollback", "s1"]);
    assert_eq!(
        tree_digest(&m.mnt),
        at_s1,
        "live equals s1 right away (kernel caches dropped)"
    );
    assert_eq!(
        tree_digest(&m.path(".snapshots/s2")),
        at_s2,
        "the newer snapshot survives"
    );
    // The rolled-back tree is writable and consistent.
    churn(&m.mnt, 24);
    m.unmount();
    let f = m.fsck();
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
    m.mount(&[]);
    snap(&m, &["rollback", "s2"]);
    assert_eq!(tree_digest(&m.mnt), at_s2);
}

#[test]
fn diff_lists_added_removed_modified_renamed_and_ranges() {
    let m = Mount::new();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/keep"), pattern(1, 300_000)).unwrap();
    fs::write(m.path("gone"), b"x").unwrap();
    fs::write(m.path("old-name"), b"y").unwrap();
    fs::write(m.path("same"), b"z").unwrap();
    snap(&m, &["create", "a"]);
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("d/keep"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"changed", 200_000).unwrap();
    drop(f);
    fs::remove_file(m.path("gone")).unwrap();
    fs::rename(m.path("old-name"), m.path("d/new-name")).unwrap();
    fs::write(m.path("added"), b"new").unwrap();
    let text = snapfs_ok(&["diff", m.mnt.to_str().unwrap(), "a", "live", "--blocks"]);
    assert!(text.contains("+\t/added\n"), "{text}");
    assert!(text.contains("-\t/gone\n"), "{text}");
    assert!(text.contains("R\t/old-name\t->\t/d/new-name\n"), "{text}");
    assert!(text.contains("M\t/d/keep\n\t\t196608-262144\n"), "{text}");
    assert!(!text.contains("/same"), "{text}");
    snap(&m, &["create", "b"]);
    let json = snapfs(&["diff", m.mnt.to_str().unwrap(), "a", "b", "--json"]);
    let j = String::from_utf8_lossy(&json.stdout);
    assert!(
        j.starts_with('[')
            && j.contains("{\"change\":\"R\",\"path\":\"/old-name\",\"new_path\":\"/d/new-name\"}"),
        "{j}"
    );
    let bad = snapfs(&["diff", m.mnt.to_str().unwrap(), "b", "a"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not older"));
}

#[test]
fn the_snapdir_is_hidden_by_default_and_reachable_by_name() {
    let root_names = |m: &Mount| -> Vec<String> {
        fs::read_dir(&m.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    for opts in [&[][..], &["snapdir=hidden"][..]] {
        let m = Mount::with_options(opts);
        fs::create_dir(m.path(".snapshots/s")).unwrap();
        assert!(
            !root_names(&m).contains(&".snapshots".to_string()),
            "{opts:?}"
        );
        assert!(m.path(".snapshots/s").is_dir());
    }
    let m = Mount::with_options(&["snapdir=visible"]);
    assert!(root_names(&m).contains(&".snapshots".to_string()));
}

/// Page `p` of version `v` of the file the writer below rewrites: `v` first, so a
/// page names its version.
fn versioned_page(v: u64, p: u64) -> Vec<u8> {
    let mut b = pattern(v * 16 + p, 4096);
    b[..8].copy_from_slice(&v.to_le_bytes());
    b
}

/// Takes 20 snapshots while a writer rewrites a 64 KiB file with one pwrite per
/// version; checks every snapshot's copy: each page whole, of a version no older than
/// the last write that returned before the snapshot began, and with `atomic` all
/// pages of one version.
fn snapshots_during_writes(opts: &[&str], atomic: bool) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    let m = Mount::with_options(opts);
    let mnt = m.mnt.clone();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let written = std::sync::Arc::new(AtomicU64::new(0));
    let (stop2, written2) = (stop.clone(), written.clone());
    let writer = std::thread::spawn(move || {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(mnt.join("f"))
            .unwrap();
        use std::os::unix::fs::FileExt;
        let mut v = 1u64;
        while !stop2.load(SeqCst) {
            let block: Vec<u8> = (0..16).flat_map(|p| versioned_page(v, p)).collect();
            f.write_all_at(&block, 0).unwrap();
            written2.store(v, SeqCst);
            if v.is_multiple_of(5) {
                f.sync_data().unwrap();
            }
            v += 1;
        }
    });
    // Snapshots are to be taken during the writes: wait for the first one (on a loaded
    // machine the writer can start late, and snapshots before it see no file).
    while written.load(SeqCst) == 0 && !writer.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut checked = 0;
    let mut problems = Vec::new();
    for i in 0..20 {
        let floor = written.load(SeqCst);
        let name = format!("during-{i}");
        fs::create_dir(m.path(&format!(".snapshots/{name}"))).unwrap();
        let p = m.path(&format!(".snapshots/{name}/f"));
        if !p.exists() {
            continue;
        }
        let data = fs::read(&p).unwrap();
        checked += 1;
        // Right after creation the file is empty: a state that existed (version 0).
        if data.is_empty() {
            if floor > 0 {
                problems.push(format!("{name}: empty, but version {floor} was written"));
            }
            continue;
        }
        if data.len() != 65536 {
            problems.push(format!(
                "{name}: {} bytes, a size the file never had",
                data.len()
            ));
            continue;
        }
        let versions: Vec<u64> = data
            .chunks(4096)
            .map(|c| u64::from_le_bytes(c[..8].try_into().unwrap()))
            .collect();
        for (p, (c, &v)) in data.chunks(4096).zip(&versions).enumerate() {
            if c != versioned_page(v, p as u64) {
                problems.push(format!("{name}: page {p} is torn"));
            } else if v < floor {
                problems.push(format!(
                    "{name}: page {p} has version {v}, but {floor} was written before"
                ));
            }
        }
        if atomic && versions.iter().any(|&v| v != versions[0]) {
            problems.push(format!("{name}: one write seen in part: {versions:?}"));
        }
    }
    stop.store(true, SeqCst);
    writer.join().unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(checked >= 10, "only {checked} snapshots saw the file");
}

#[test]
fn snapshots_taken_during_writes_hold_every_write_made_before_them() {
    // Through the writeback cache the kernel hands a write over page by page: a
    // snapshot may catch one in progress in part (crash-consistent, as a power cut
    // would), but holds every write that returned before it began.
    snapshots_during_writes(&[], false);
}

#[test]
fn without_the_writeback_cache_a_snapshot_never_splits_one_write() {
    snapshots_during_writes(&["nowriteback"], true);
}

#[test]
fn deleting_snapshots_of_rewrites_gives_the_space_back() {
    let mut m = Mount::new();
    let gib = 1usize << 30;
    let chunk = 8 << 20;
    for round in 0..6u64 {
        let mut f = File::create(m.path("big")).unwrap();
        for c in 0..(gib / chunk) as u64 {
            use std::io::Write;
            f.write_all(&pattern(round * 1000 + c, chunk)).unwrap();
        }
        drop(f);
        if round < 5 {
            fs::create_dir(m.path(&format!(".snapshots/r{round}"))).unwrap();
        }
    }
    m.unmount();
    let full = m.store_bytes();
    assert!(full > 5 * gib as u64, "six versions are stored: {full}");
    m.mount(&[]);
    for round in 0..5 {
        fs::remove_dir(m.path(&format!(".snapshots/r{round}"))).unwrap();
    }
    m.unmount();
    let after = m.store_bytes();
    assert!(
        (after as f64) < gib as f64 * 1.05,
        "store is {after} bytes for {gib} bytes of live data (was {full})"
    );
    let f = m.fsck();
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
}

#[test]
fn prune_follows_the_policy_and_spares_named_snapshots() {
    let m = Mount::new();
    for name in [
        "auto-2026-01-01T00:00:00Z",
        "auto-2026-01-01T00:30:00Z",
        "mine",
    ] {
        snap(&m, &["create", name]);
    }
    // All three were taken this hour: hourly:1 keeps the newest auto- one only.
    let dry = snap(&m, &["prune", "--dry-run", "--keep", "hourly:1"]);
    assert!(
        dry.contains("would prune auto-2026-01-01T00:00:00Z"),
        "{dry}"
    );
    assert!(!dry.contains("mine"));
    assert_eq!(
        fs::read_dir(m.path(".snapshots")).unwrap().count(),
        3,
        "dry run deletes nothing"
    );
    snap(&m, &["prune", "--keep", "hourly:1"]);
    let mut left: Vec<String> = fs::read_dir(m.path(".snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["auto-2026-01-01T00:30:00Z", "mine"]);
}

#[test]
fn snapshot_commands_work_on_an_unmounted_store() {
    let mut m = Mount::new();
    fs::write(m.path("f"), b"first").unwrap();
    m.unmount();
    let store = m.store.to_str().unwrap().to_string();
    snapfs_ok(&["snapshot", "create", &store, "offline"]);
    assert!(snapfs_ok(&["snapshot", "list", &store]).contains("offline"));
    m.mount(&[]);
    fs::write(m.path("f"), b"second").unwrap();
    m.unmount();
    snapfs_ok(&["snapshot", "rollback", &store, "offline"]);
    assert!(snapfs_ok(&["diff", &store, "offline", "live"]).is_empty());
    m.mount(&[]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"first");
    assert_eq!(fs::read(m.path(".snapshots/offline/f")).unwrap(), b"first");
    m.unmount();
    snapfs_ok(&["snapshot", "delete", &store, "offline"]);
    assert!(!snapfs_ok(&["snapshot", "list", &store]).contains("offline"));
}

#[test]
fn scheduled_snapshots_are_taken_and_pruned() {
    let m = Mount::with_options(&["snapshot_every=1s,keep=hourly:1"]);
    fs::write(m.path("f"), b"x").unwrap();
    snap(&m, &["create", "named"]);
    // Wait (bounded) for the scheduler to have run at least three times.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let list = || -> Vec<String> {
        fs::read_dir(m.path(".snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the scheduler took {} snapshots in 30 s",
            seen.len()
        );
        for n in list() {
            if n.starts_with("auto-") {
                seen.insert(n);
            }
        }
        std::thread::yield_now();
    }
    // keep=hourly:1 leaves at most the newest auto- snapshot (two if the hour just
    // turned), and never the named one's absence.
    let now: Vec<String> = list();
    assert!(now.contains(&"named".to_string()));
    assert!(
        now.iter().filter(|n| n.starts_with("auto-")).count() <= 2,
        "{now:?}"
    );
}

#[test]
fn reads_stay_right_while_a_snapshot_delete_compacts_their_segment() {
    // Reads of whole extents run outside the core's lock: here they race a compaction
    // that moves their extents to a new segment and deletes the old file.
    let m = Mount::new();
    let keep = pattern(21, 4 << 20);
    fs::write(m.path("big"), pattern(22, 64 << 20)).unwrap();
    fs::write(m.path("keep"), &keep).unwrap();
    fs::create_dir(m.path(".snapshots/s")).unwrap();
    fs::remove_file(m.path("big")).unwrap();
    let before = segment_bytes(&m.store);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (path, keep, stop) = (m.path("keep"), keep.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rounds = 0u32;
                while rounds < 2 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut f = File::open(&path).unwrap();
                    // Drop the kernel's pages, so that every read reaches the daemon.
                    // SAFETY: a valid open fd.
                    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                    let mut back = Vec::new();
                    f.read_to_end(&mut back).unwrap();
                    assert!(back == keep, "round {rounds}: wrong bytes");
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    fs::remove_dir(m.path(".snapshots/s")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() >= 2);
    }
    // The delete compacted: the 64 MiB went, and `keep` moved to a new segment.
    let after = segment_bytes(&m.store);
    assert!(after < before / 4, "segments {before} -> {after} bytes");
    drop_caches();
    assert!(fs::read(m.path("keep")).unwrap() == keep);
}

#[test]
fn a_held_snapshot_is_only_hidden_by_a_delete_until_its_hold_is_released() {
    let mut m = Mount::new();
    let data = pattern(21, 2 << 20);
    fs::write(m.path("f"), &data).unwrap();
    snap(&m, &["create", "base"]);
    fs::write(m.path("f"), b"overwritten").unwrap();
    let out = snap(&m, &["hold", "base", "sync-to-b"]);
    assert!(out.contains("hold sync-to-b keeps snapshot base"), "{out}");
    // A second hold of the same name on another snapshot is refused.
    snap(&m, &["create", "other"]);
    let clash = snapfs(&[
        "snapshot",
        "hold",
        m.mnt.to_str().unwrap(),
        "other",
        "sync-to-b",
    ]);
    assert!(!clash.status.success());
    assert!(
        String::from_utf8_lossy(&clash.stderr).contains("keeps another snapshot"),
        "{}",
        String::from_utf8_lossy(&clash.stderr)
    );
    snap(&m, &["delete", "other"]);

    // Deleting the held snapshot hides it; its data stays, across a remount.
    snap(&m, &["delete", "base"]);
    assert!(!m.path(".snapshots/base").exists());
    let list = snap(&m, &["list"]);
    assert!(
        !list.contains("base") && !list.contains("deleted"),
        "{list}"
    );
    let all = snap(&m, &["list", "--all"]);
    assert!(
        all.contains("(deleted, epoch") && all.contains("sync-to-b"),
        "{all}"
    );
    m.remount();
    m.status_with(&format!("stored bytes:     {}\n", (2 << 20) + 11));
    let json = snap(&m, &["list", "--all", "--json"]);
    assert!(
        json.contains("\"deleted\":true") && json.contains("\"holds\":[\"sync-to-b\"]"),
        "{json}"
    );

    // Released, the deleted snapshot's space comes back.
    let out = snap(&m, &["release", "sync-to-b"]);
    assert!(out.contains("released hold sync-to-b"), "{out}");
    m.status_with("stored bytes:     11\n");
    assert!(!snap(&m, &["list", "--all"]).contains("deleted"));
    let gone = snapfs(&["snapshot", "release", m.mnt.to_str().unwrap(), "sync-to-b"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no hold named"));
    m.unmount();
    let f = m.fsck();
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
}
