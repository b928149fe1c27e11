//! Integrity under damage and faults: a torn append, a damaged extent, a full disk.
//! Each test fails without the fix it is named for (see docs/ARCHITECTURE.md).

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The store's segment files, in id order.
fn segments(store: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = fs::read_dir(store.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    segs
}

fn write_synced(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn compaction_after_a_torn_append_keeps_every_live_extent() {
    let mut m = Mount::new();
    // Large enough that, half dead, even a segment still being appended to is compacted.
    let old = pattern(1, 66 << 20);
    let keep = pattern(2, 512 << 10);
    write_synced(&m.path("old"), &old);
    write_synced(&m.path("keep"), &keep);
    m.unmount();
    // A crash in the middle of an append: a header for 64 KiB, and 1000 bytes of it.
    let seg = segments(&m.store).pop().unwrap();
    {
        let f = OpenOptions::new().append(true).open(&seg).unwrap();
        let torn = pattern(3, 1000);
        let mut header = Vec::new();
        header.extend_from_slice(b"SXT1");
        header.extend_from_slice(&65536u32.to_le_bytes());
        header.extend_from_slice(blake3::hash(&pattern(3, 65536)).as_bytes());
        (&f).write_all(&header).unwrap();
        (&f).write_all(&torn).unwrap();
    }
    m.mount(&[]);
    let new = pattern(4, 1 << 20);
    write_synced(&m.path("new"), &new);
    // Most of the first segment dies; unmounting compacts it.
    fs::remove_file(m.path("old")).unwrap();
    m.unmount();
    m.mount(&[]);
    drop_caches();
    assert!(
        fs::read(m.path("keep")).unwrap() == keep,
        "keep reads its bytes"
    );
    assert!(
        fs::read(m.path("new")).unwrap() == new,
        "new reads its bytes"
    );
    m.unmount();
    m.assert_fsck_clean();
    assert!(
        !segments(&m.store).contains(&seg),
        "the mostly dead segment was compacted away"
    );
}

#[test]
fn a_write_of_the_same_bytes_repairs_a_damaged_extent() {
    same_bytes_repair(false);
}

/// The same with the damaged copy out of the page cache: the write takes it unseen,
/// and the fsync's durable point reads it and stores the bytes again.
#[test]
fn a_write_of_the_same_bytes_repairs_a_damaged_extent_out_of_the_cache() {
    same_bytes_repair(true);
}

fn same_bytes_repair(cold: bool) {
    let mut m = Mount::new();
    let block = pattern(5, 65536);
    write_synced(&m.path("a"), &block);
    m.unmount();
    damage_extent(&m.store, 0, &block);
    m.mount(&[]);
    // (A look at a cold copy starts the kernel's readahead: out of the cache again.)
    let evict = || {
        if cold {
            drop_caches();
        }
    };
    evict();
    // The same bytes again: a new file, and the damaged file rewritten in place.
    write_synced(&m.path("b"), &block);
    evict();
    {
        let f = OpenOptions::new().write(true).open(m.path("a")).unwrap();
        f.write_all_at(&block, 0).unwrap();
        f.sync_all().unwrap();
    }
    assert_repaired_after_remount(&mut m, &block);
}

/// An extent written since the mount is trusted by dedup as the page cache is, until
/// a read finds it damaged: then a write of the same bytes stores them again.
#[test]
fn a_read_that_finds_damage_makes_the_next_write_of_those_bytes_repair_it() {
    let mut m = Mount::new();
    let block = pattern(9, 65536);
    write_synced(&m.path("a"), &block);
    // Damaged under the running daemon, after it wrote the extent.
    damage_extent(&m.store, 0, &block);
    drop_caches();
    let err = fs::read(m.path("a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "the damage is seen");
    write_synced(&m.path("b"), &block);
    assert_repaired_after_remount(&mut m, &block);
}

/// After a remount, with caches dropped: `a` (once damaged) and `b` (a new file of the
/// same bytes) read `block`, and fsck is clean.
fn assert_repaired_after_remount(m: &mut Mount, block: &[u8]) {
    m.unmount();
    m.mount(&[]);
    drop_caches();
    assert!(fs::read(m.path("b")).unwrap() == block, "b reads its bytes");
    assert!(fs::read(m.path("a")).unwrap() == block, "a was repaired");
    m.unmount();
    m.assert_fsck_clean();
}

/// A tmpfs of `mib` MiB mounted for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(at: PathBuf, mib: u32) -> Tmpfs {
        fs::create_dir_all(&at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&at)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs");
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes 4 MiB files `prefix0`, `prefix1`, ... (each fsynced) until one fails;
/// returns how many were written whole.
fn fill(m: &Mount, prefix: &str, seed: u64, most: usize) -> usize {
    for i in 0..most {
        let p = m.path(&format!("{prefix}{i}"));
        let res = File::create(&p).and_then(|mut f| {
            f.write_all(&pattern(seed + i as u64, 4 << 20))?;
            f.sync_all()
        });
        if let Err(e) = res {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            let _ = fs::remove_file(&p);
            return i;
        }
    }
    most
}

#[test]
fn deleting_data_on_a_full_disk_gives_its_space_back() {
    let dir = test_dir();
    let small = Tmpfs::new(dir.path().join("small"), 64);
    let mut m = Mount::at(small.0.join("store"), dir.path().join("mnt"), &[]);
    let n = fill(&m, "f", 100, 64);
    assert!(n >= 6, "a 64 MiB disk holds more than {n} files of 4 MiB");
    // Delete every other file: half the data, held by no snapshot.
    for i in (0..n).step_by(2) {
        fs::remove_file(m.path(&format!("f{i}"))).unwrap();
    }
    let deleted = n.div_ceil(2);
    // As much again fits, less one file for what the store keeps for itself.
    let again = fill(&m, "g", 200, deleted - 1);
    assert_eq!(again, deleted - 1, "the deleted space came back");
    for i in (1..n).step_by(2) {
        assert!(
            fs::read(m.path(&format!("f{i}"))).unwrap() == pattern(100 + i as u64, 4 << 20),
            "f{i} kept its bytes"
        );
    }
    m.unmount();
    m.assert_fsck_clean();
    drop(m);
    drop(small);
}

/// Every file under `dir`: path, length and content hash.
fn tree_state(dir: &Path) -> std::collections::BTreeMap<PathBuf, (u64, String)> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let t = fs::symlink_metadata(&p).unwrap().file_type();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                let bytes = fs::read(&p).unwrap();
                let hash = blake3::hash(&bytes).to_hex().to_string();
                out.insert(p, (bytes.len() as u64, hash));
            } else {
                out.insert(p, (0, "not a regular file".into()));
            }
        }
    }
    out
}

#[test]
fn fsck_changes_nothing_even_after_a_crash() {
    let mut m = Mount::new();
    write_synced(&m.path("a"), &pattern(6, 300_000));
    fs::write(m.path("b"), pattern(7, 100_000)).unwrap();
    m.kill9();
    let before = tree_state(&m.store);
    let out = m.fsck();
    assert!(
        out.status.success(),
        "fsck after a crash: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = snapfs(&["fsck", m.store.to_str().unwrap()]);
    assert!(plain.status.success());
    let status = snapfs(&["status", m.store.to_str().unwrap()]);
    assert!(status.status.success());
    assert!(
        tree_state(&m.store) == before,
        "fsck and status left the store as they found it"
    );
}

/// Flips one byte of the data of the `n`th extent appended to the store's first
/// segment (extents of 64 KiB each, in order), checking it holds `want` there.
fn damage_extent(store: &Path, n: u64, want: &[u8]) {
    let seg = segments(store).remove(0);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let at = 16 + n * (40 + 65536) + 40 + 777;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    assert_eq!(b[0], want[777], "the layout is as assumed");
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
}

#[test]
fn fsck_names_the_files_and_ranges_damage_reaches() {
    let mut m = Mount::new();
    fs::create_dir(m.path("d")).unwrap();
    let data = pattern(8, 3 * 65536);
    write_synced(&m.path("d/f"), &data);
    fs::create_dir(m.path(".snapshots/s1")).unwrap();
    write_synced(&m.path("g"), &pattern(9, 65536));
    m.unmount();
    damage_extent(&m.store, 1, &data[65536..]);
    let out = m.fsck();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("hurt: live: /d/f bytes 65536..131072: its bytes in segment"),
        "{text}"
    );
    assert!(
        text.contains("hurt: snapshot s1: /d/f bytes 65536..131072"),
        "{text}"
    );
    assert!(!text.contains("/g "), "an intact file is not named: {text}");
    let json = snapfs(&["fsck", m.store.to_str().unwrap(), "--read-data", "--json"]);
    let j = String::from_utf8_lossy(&json.stdout);
    assert_eq!(json.status.code(), Some(1));
    assert!(j.starts_with("{\"clean\":false,"), "{j}");
    assert!(
        j.contains("{\"view\":\"live\",\"path\":\"/d/f\",\"start\":65536,\"end\":131072,"),
        "{j}"
    );
}

#[test]
fn a_missing_segment_is_named_and_never_made_anew() {
    let mut m = Mount::new();
    let data = pattern(10, 200_000);
    write_synced(&m.path("f"), &data);
    m.unmount();
    let segs = segments(&m.store);
    assert_eq!(segs.len(), 1);
    fs::remove_file(&segs[0]).unwrap();
    let name = segs[0].file_name().unwrap().to_string_lossy().into_owned();
    for _ in 0..2 {
        let out = snapfs(&["fsck", m.store.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains(&format!("segment file segments/{name} is missing")),
            "{text}"
        );
        assert!(
            text.contains("hurt: live: /f bytes 0..65536: its segment file"),
            "{text}"
        );
        m.mount(&[]);
        let e = fs::read(m.path("f")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        m.unmount();
        assert!(!segs[0].exists(), "the missing segment was not made anew");
    }
}

#[test]
fn fsck_finds_a_lost_directory_entry() {
    use redb::{ReadableDatabase, ReadableTable};
    use snapfs::store::schema::{KIND_DIRENT, VERSIONS};
    let mut m = Mount::new();
    fs::create_dir(m.path("d")).unwrap();
    for i in 0..10 {
        fs::write(m.path(&format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    m.unmount();
    m.assert_fsck_clean();
    // Lose one entry, as a damaged metadata page would.
    {
        let db = redb::Database::open(m.store.join("snapfs.redb")).unwrap();
        let key = {
            let r = db.begin_read().unwrap();
            let t = r.open_table(VERSIONS).unwrap();
            let mut found = None;
            for row in t.iter().unwrap() {
                let (k, _) = row.unwrap();
                let (ino, kind, sub, name, epoch) = k.value();
                if kind == KIND_DIRENT && name == b"f3" {
                    found = Some((ino, kind, sub, name.to_vec(), epoch));
                }
            }
            found.expect("the entry's row")
        };
        let w = db.begin_write().unwrap();
        {
            let mut t = w.open_table(VERSIONS).unwrap();
            t.remove((key.0, key.1, key.2, key.3.as_slice(), key.4))
                .unwrap();
        }
        w.commit().unwrap();
    }
    let out = m.fsck();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("live: entry \"f3\" of directory /d is missing; inode"),
        "{text}"
    );
    assert!(text.contains("(a file of 6 bytes)"), "{text}");
}

#[test]
fn on_a_full_disk_status_fsck_and_snapshot_deletion_tell_the_truth() {
    let dir = test_dir();
    let small = Tmpfs::new(dir.path().join("small"), 64);
    let mut m = Mount::at(small.0.join("store"), dir.path().join("mnt"), &[]);
    let n = fill(&m, "f", 300, 4);
    fs::create_dir(m.path(".snapshots/s1")).unwrap();
    // The snapshot holds these; the live tree lets go of them and fills the disk.
    for i in 0..n {
        fs::remove_file(m.path(&format!("f{i}"))).unwrap();
    }
    let more = fill(&m, "g", 400, 64);
    assert!(more > 0);
    let store = m.store.to_str().unwrap().to_string();
    let mnt = m.mnt.to_str().unwrap().to_string();
    // Looking needs no room.
    let status = snapfs(&["status", &mnt]);
    assert!(
        status.status.success(),
        "status on a full disk: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let fsck = snapfs(&["fsck", &mnt]);
    assert!(
        fsck.status.success(),
        "fsck on a full disk: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    // Deleting the snapshot either works and gives its space back, or fails and
    // keeps it: never gone with an error.
    let res = fs::remove_dir(m.path(".snapshots/s1"));
    let listed = fs::read_dir(m.path(".snapshots"))
        .unwrap()
        .any(|e| e.unwrap().file_name() == "s1");
    match res {
        Ok(()) => {
            assert!(!listed, "deleted, yet listed");
            // Its space comes back: as much again fits, less one file.
            let again = fill(&m, "h", 500, n - 1);
            assert_eq!(again, n - 1, "the snapshot's space came back");
        }
        Err(e) => assert!(listed, "{e}, yet the snapshot is gone"),
    }
    m.unmount();
    let out = snapfs(&["fsck", &store, "--read-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(m);
    drop(small);
}

#[test]
fn syncfs_right_after_deleting_a_written_file_succeeds() {
    use std::os::unix::io::AsRawFd;
    let m = Mount::new();
    fs::write(m.path("f"), pattern(11, 300_000)).unwrap();
    fs::remove_file(m.path("f")).unwrap();
    // The kernel still writes back the deleted file's cached times.
    let root = File::open(&m.mnt).unwrap();
    // SAFETY: syncfs(2) on an open descriptor.
    let r = unsafe { libc::syncfs(root.as_raw_fd()) };
    assert_eq!(r, 0, "syncfs: {}", std::io::Error::last_os_error());
    fs::create_dir(m.path(".snapshots/s1")).unwrap();
    let log = fs::read_to_string(m.store.join("snapfs.log")).unwrap_or_default();
    assert!(
        !log.contains("ENOENT") && !log.contains("No such file"),
        "{log}"
    );
}

#[test]
fn fsck_repair_fixes_counts_and_leaked_versions_and_says_so() {
    use redb::ReadableTable;
    use snapfs::store::schema::{
        EXTENTS, ExtentRec, KIND_INODE, ROOT_INO, VERSIONS, open_version, seal_version,
    };
    let mut m = Mount::new();
    let data = pattern(12, 200_000);
    fs::write(m.path("f"), &data).unwrap();
    m.unmount();
    m.assert_fsck_clean();
    {
        let db = redb::Database::open(m.store.join("snapfs.redb")).unwrap();
        let w = db.begin_write().unwrap();
        {
            // One extent counts a reference too many.
            let mut ext = w.open_table(EXTENTS).unwrap();
            let (hash, rec) = {
                let (k, v) = ext.iter().unwrap().next().unwrap().unwrap();
                let h = k.value();
                (h, ExtentRec::decode(&h, v.value()).unwrap())
            };
            let more = ExtentRec {
                refs: rec.refs + 1,
                ..rec
            };
            ext.insert(hash, more.encode(&hash).as_slice()).unwrap();
            // f's inode gets an older version that no view can see.
            let mut ver = w.open_table(VERSIONS).unwrap();
            let (ino, payload) = {
                let mut found = None;
                for row in ver.iter().unwrap() {
                    let (k, v) = row.unwrap();
                    let key = k.value();
                    if key.1 == KIND_INODE && key.0 != ROOT_INO {
                        let p = open_version(key, v.value()).unwrap().unwrap().to_vec();
                        found = Some((key.0, p));
                    }
                }
                found.unwrap()
            };
            let old = (ino, KIND_INODE, 0u64, &[][..], 0u64);
            ver.insert(old, seal_version(old, Some(&payload)).as_slice())
                .unwrap();
        }
        w.commit().unwrap();
    }
    let out = m.fsck();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("references recorded"), "{text}");
    assert!(text.contains("versions that no view can see"), "{text}");
    let store = m.store.to_str().unwrap().to_string();
    let fixed = snapfs(&["fsck", &store, "--repair"]);
    let text = String::from_utf8_lossy(&fixed.stdout);
    assert!(fixed.status.success(), "{text}");
    assert!(text.contains("repaired: extent "), "{text}");
    assert!(text.contains("repaired: dropped 1 versions"), "{text}");
    m.assert_fsck_clean();
    m.mount(&[]);
    assert!(fs::read(m.path("f")).unwrap() == data);
    // Mounted, a repair is refused.
    let busy = snapfs(&["fsck", &store, "--repair"]);
    assert_eq!(busy.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("unmount"));
}

/// fsck reads a frozen view beside the running filesystem; an unmount meanwhile stops
/// it, and the store is still closed cleanly (compacted, its database released).
#[test]
fn unmounting_during_fsck_stops_it_and_closes_the_store() {
    let mut m = Mount::new();
    {
        let mut f = File::create(m.path("big")).unwrap();
        for i in 0..16 {
            f.write_all(&pattern(100 + i, 64 << 20)).unwrap();
        }
        f.sync_all().unwrap();
    }
    drop_caches();
    let fsck = Command::new(SNAPFS)
        .args(["fsck", "--read-data", m.mnt.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    m.unmount();
    let out = fsck.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() || said.contains("unmounted"),
        "fsck: {said}"
    );
    let log = fs::read_to_string(m.store.join("snapfs.log")).unwrap();
    assert!(
        !log.contains("still shared"),
        "the store was not closed: {log}"
    );
    assert!(
        !log.contains("final flush"),
        "the final flush failed: {log}"
    );
    m.mount(&[]);
    m.unmount();
    m.assert_fsck_clean();
}
