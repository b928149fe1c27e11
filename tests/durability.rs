//! Crash safety and space: what fsync promised survives kill -9; dedup stores data once.

mod common;

use std::fs::{self, File};
use std::io::Write;

use common::*;

#[test]
fn fsynced_data_survives_kill_9_and_fsck_is_clean() {
    let mut m = Mount::new();
    let durable = pattern(1, 5 << 20);
    {
        let mut f = File::create(m.path("durable")).unwrap();
        f.write_all(&durable).unwrap();
        f.sync_all().unwrap();
    }
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("dir/small"), b"small and synced").unwrap();
    File::open(m.path("dir/small")).unwrap().sync_all().unwrap();
    File::open(m.path("dir")).unwrap().sync_all().unwrap();
    // Not synced: may or may not survive, but must not damage anything.
    let mut f = File::create(m.path("unsynced")).unwrap();
    f.write_all(&pattern(2, 3 << 20)).unwrap();
    m.kill9();
    drop(f);

    let out = m.fsck();
    assert!(
        out.status.success(),
        "fsck after kill -9: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    m.mount(&[]);
    assert!(fs::read(m.path("durable")).unwrap() == durable);
    assert_eq!(fs::read(m.path("dir/small")).unwrap(), b"small and synced");
    // The store keeps working after the crash.
    fs::write(m.path("after"), b"after").unwrap();
    m.unmount();
    assert!(m.fsck().status.success());
}

#[test]
fn kill_9_during_heavy_writes_leaves_a_consistent_store() {
    let mut m = Mount::new();
    let mnt = m.mnt.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..200u64 {
            let p = mnt.join(format!("f{}", i % 20));
            if fs::write(&p, pattern(i, 200_000)).is_err() {
                return;
            }
            if i % 7 == 0 {
                let _ = File::open(&p).and_then(|f| f.sync_all());
            }
        }
    });
    // Let some work happen, then pull the plug.
    while !m.path("f5").exists() {
        std::thread::yield_now();
    }
    m.kill9();
    let _ = writer.join();
    m.assert_fsck_clean();
}

#[test]
fn the_same_100_mib_under_two_names_is_stored_once() {
    let mut m = Mount::new();
    let data = pattern(42, 100 << 20);
    fs::write(m.path("one"), &data).unwrap();
    m.unmount();
    let once = m.store_bytes();
    m.mount(&[]);
    fs::write(m.path("two"), &data).unwrap();
    m.unmount();
    let twice = m.store_bytes();
    assert!(once >= 100 << 20, "the first copy is stored: {once}");
    assert!(
        twice < once + (1 << 20),
        "second copy grew the store by {} bytes",
        twice.saturating_sub(once)
    );
    m.mount(&[]);
    assert!(fs::read(m.path("two")).unwrap() == data);
}

#[test]
fn overwriting_a_file_does_not_grow_the_store_without_bound() {
    let mut m = Mount::new();
    // 24 rewrites of 8 MiB: 192 MiB written, 8 MiB live, all in the active segment.
    for round in 0..24u64 {
        fs::write(m.path("f"), pattern(round, 8 << 20)).unwrap();
    }
    m.unmount();
    let size = m.store_bytes();
    assert!(
        size < 80 << 20,
        "store holds {size} bytes for 8 MiB of live data"
    );
    m.mount(&[]);
    assert!(fs::read(m.path("f")).unwrap() == pattern(23, 8 << 20));
    m.unmount();
    assert!(m.fsck().status.success());
}

#[test]
fn a_full_disk_refuses_new_data_with_enospc_and_loses_nothing_answered() {
    // A 48 MiB tmpfs under the store.
    let dir = tempfile::Builder::new()
        .prefix("snapfs-full")
        .tempdir()
        .unwrap();
    let disk = dir.path().join("disk");
    fs::create_dir(&disk).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs (needs root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _disk_guard = Unmount(disk.clone());
    let mut m = Mount::new();
    m.unmount();
    m.store = disk.join("store");
    m.mount(&[]);
    fs::write(m.path("kept"), b"answered before the disk filled").unwrap();
    // Through the kernel's writeback cache a write may land in the page cache first:
    // the error then comes at the latest from fsync, as on any writeback filesystem.
    let e = {
        use std::io::Write;
        let mut f = fs::File::create(m.path("big")).unwrap();
        f.write_all(&pattern(1, 100 << 20))
            .and_then(|()| f.sync_all())
            .unwrap_err()
    };
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "full disk: {e}");
    // Metadata still works, and small files written now are kept.
    fs::write(m.path("after"), b"small").unwrap();
    fs::remove_file(m.path("big")).unwrap();
    m.unmount();
    let f = m.fsck();
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
    m.mount(&[]);
    assert_eq!(
        fs::read(m.path("kept")).unwrap(),
        b"answered before the disk filled"
    );
    assert_eq!(fs::read(m.path("after")).unwrap(), b"small");
    // The space of the removed file came back.
    fs::write(m.path("again"), pattern(2, 20 << 20)).unwrap();
    m.unmount();
}

/// The metadata file as a durable commit leaves it: its size and content hash.
fn db_state(m: &Mount) -> (u64, blake3::Hash) {
    let b = fs::read(m.store.join("snapfs.redb")).unwrap();
    (b.len() as u64, blake3::hash(&b))
}

#[test]
fn an_fsync_with_nothing_new_commits_nothing() {
    let m = Mount::new();
    let mut f = File::create(m.path("f")).unwrap();
    f.write_all(b"first").unwrap();
    f.sync_all().unwrap();
    // The background tick's own durable point, if one is due, comes and goes.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    f.sync_all().unwrap();
    let before = db_state(&m);
    for _ in 0..5 {
        f.sync_all().unwrap();
        f.sync_data().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        db_state(&m),
        before,
        "fsync with nothing new wrote the metadata"
    );
    // A change is committed by the next fsync (the check above can fail).
    f.write_all(b" and second").unwrap();
    f.sync_all().unwrap();
    assert_ne!(
        db_state(&m),
        before,
        "an fsync after a write committed nothing"
    );
}
