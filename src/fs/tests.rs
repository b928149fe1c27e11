//! Tests of the core without a mount: what a crash or a failed disk leaves.

use super::*;
use crate::store::StoreConfig;
use crate::store::schema::ROOT_INO;

pub(crate) const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 0,
};

/// Writes `data` to a new or existing file `name` in the root without syncing;
/// returns its inode.
pub(crate) fn put_file_unsynced(core: &mut Inner, name: &[u8], data: &[u8]) -> u64 {
    let ino = match core.lookup(ROOT_INO, name) {
        Ok(a) => a.ino,
        Err(_) => {
            core.mknod(ROOT_INO, name, libc::S_IFREG | 0o644, 0, 0, b"", ROOT)
                .unwrap()
                .ino
        }
    };
    let fh = core.open(ino, libc::O_WRONLY).unwrap();
    core.write(fh, ino, 0, data, &[]).unwrap();
    core.release(fh).unwrap();
    ino
}

/// [`put_file_unsynced`], then a sync.
pub(crate) fn put_file(core: &mut Inner, name: &[u8], data: &[u8]) -> u64 {
    let ino = put_file_unsynced(core, name, data);
    core.sync_all().unwrap();
    ino
}

/// A new store in a temporary directory, opened.
pub(crate) fn fresh() -> (tempfile::TempDir, Fs) {
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::open(&dir.path().join("s"), Some(&StoreConfig::default())).unwrap();
    (dir, fs)
}

/// Bytes of unique extents stored.
pub(crate) fn stored_bytes(core: &mut Inner) -> u64 {
    crate::check::status(core.store()).unwrap().stored_bytes
}

fn eio<T: std::fmt::Debug>(r: FsResult<T>) -> bool {
    matches!(r, Err(e) if e.errno() == libc::EIO)
}

#[test]
fn a_failed_data_sync_outside_the_lock_fails_fsync_and_sticks() {
    let (_dir, fs) = fresh();
    let ino = put_file_unsynced(&mut fs.lock(), b"f", &[7u8; 256 << 10]);
    // The kernel reports a failed write-back once: to the presync's descriptor.
    fs.lock().store().segs.fail_next_syncs(1);
    fs.presync(Some(ino));
    assert!(
        eio(fs.lock().fsync(ino, false)),
        "fsync reports the failure"
    );
    assert!(
        eio(fs.lock().sync_all()),
        "and so does every later durable point"
    );
    let mut core = fs.lock();
    let fh = core.open(ino, libc::O_WRONLY).unwrap();
    // A write may be buffered; it never becomes durable.
    let _ = core.write(fh, ino, 0, b"more", &[]);
    assert!(eio(core.fsync(ino, false)), "later data is refused");
}

#[test]
fn a_failed_data_sync_under_the_lock_sticks() {
    let (_dir, fs) = fresh();
    let mut core = fs.lock();
    put_file_unsynced(&mut core, b"f", &[9u8; 256 << 10]);
    core.store().segs.fail_next_syncs(1);
    assert!(eio(core.sync_all()), "the durable point fails");
    assert!(
        eio(core.sync_all()),
        "a retry must not claim what the failed sync lost"
    );
}

#[test]
fn a_failed_append_is_answered_not_buffered() {
    let (_dir, fs) = fresh();
    let mut core = fs.lock();
    let ino = put_file(&mut core, b"f", b"");
    let fh = core.open(ino, libc::O_WRONLY).unwrap();
    core.store().segs.fail_next_appends(1);
    // Whole blocks go to the store at once: the failure is the write's.
    assert!(eio(core.write(fh, ino, 0, &[3u8; 128 << 10], &[])));
    // Nothing of it was kept to be written later as if it had worked.
    assert_eq!(core.getattr(ino).unwrap().rec.size, 0);
}
