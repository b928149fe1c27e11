//! `snapfs clone` on a filesystem whose files can share blocks (XFS with reflink,
//! btrfs): the store's files are cloned (FICLONE), not copied, and the copy then
//! keeps the one snapshot it was made for. A clone punching holes or compacting
//! later changes only its own files' blocks, so the two stores stay independent.

use std::os::fd::AsRawFd;
use std::path::Path;

use super::role::RoleError;
use super::schema::{meta, seal_meta};
use super::{DB_FILE, ReadOnlyStore, Store, StoreError, random_bytes};

/// Clones the files of the unmounted store at `src` into `dest` (missing, or an
/// empty directory), sharing their blocks. `Ok(false)`: the filesystem cannot share
/// blocks between these files, and `dest` is left as it was.
pub fn reflink_store(src: &Path, dest: &Path) -> Result<bool, StoreError> {
    // Held for the whole copy: no daemon opens the store meanwhile, so its files do
    // not change under us.
    let held = ReadOnlyStore::open(src, false)?;
    // Only its owner may enter a store: its files hold every file's content.
    let made = match std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(dest)
    {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if std::fs::read_dir(dest)?.next().is_some() {
                return Err(StoreError::Corrupt(format!(
                    "{} is not empty",
                    dest.display()
                )));
            }
            false
        }
        Err(e) => return Err(e.into()),
    };
    let undo = || {
        let _ = std::fs::remove_file(dest.join(DB_FILE));
        let _ = std::fs::remove_dir_all(dest.join("segments"));
        if made {
            let _ = std::fs::remove_dir(dest);
        }
    };
    let res = (|| {
        // The metadata first: if it cannot be cloned, nothing else is tried.
        if !ficlone(&src.join(DB_FILE), &dest.join(DB_FILE))? {
            return Ok(false);
        }
        std::fs::create_dir(dest.join("segments"))?;
        for e in std::fs::read_dir(src.join("segments"))? {
            let e = e?;
            if !e.file_type()?.is_file() {
                continue;
            }
            let to = dest.join("segments").join(e.file_name());
            if !ficlone(&e.path(), &to)? {
                return Err(StoreError::Corrupt(format!(
                    "{} could not be cloned where the metadata could",
                    e.path().display()
                )));
            }
        }
        for dir in [dest.join("segments"), dest.to_path_buf()] {
            std::fs::File::open(&dir)?.sync_all()?;
        }
        Ok(true)
    })();
    drop(held);
    match res {
        Ok(true) => Ok(true),
        r => {
            undo();
            r
        }
    }
}

/// Clones file `from` to the new file `to` (synced); `Ok(false)` when the
/// filesystem cannot share blocks between them (`to` is removed again).
fn ficlone(from: &Path, to: &Path) -> Result<bool, StoreError> {
    let src = std::fs::File::open(from)?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both are open.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        drop(dst);
        let _ = std::fs::remove_file(to);
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::EPERM) => {
                Ok(false)
            }
            _ => Err(e.into()),
        };
    }
    dst.sync_all()?;
    Ok(true)
}

impl Store {
    /// Makes this store (a copy of another's files) a new volume holding snapshot
    /// `snapshot` only, as its live tree too: a new volume id, no role, no cursor or
    /// hold, every other snapshot dropped (their blocks freed here only).
    pub fn keep_only(&mut self, snapshot: &str) -> Result<(), RoleError> {
        let Some(rec) = self.snapshot(snapshot.as_bytes())? else {
            return Err(RoleError::Refused(format!(
                "there is no snapshot named {}",
                crate::text::printable(snapshot)
            )));
        };
        self.free_unreferenced()?;
        self.rollback_to(rec.epoch)?;
        for (hold, _) in self.holds()? {
            self.release(&hold)?;
        }
        for (name, r) in self.snapshot_list(true)? {
            if r.epoch == rec.epoch {
                continue;
            }
            if r.flags & super::schema::SNAP_DELETED == 0 {
                self.snapshot_hide(name.as_bytes())?;
            }
            self.drop_epoch(r.epoch, false)?;
        }
        self.prune_changes()?;
        let id = random_bytes::<16>();
        let sent: Vec<String> = super::snapshots::sent_to_rows(self.read_txn()?.meta())?
            .into_iter()
            .map(|(d, _)| format!("{}{}", meta::SENT_TO, super::hex(&d)))
            .collect();
        self.write(true, |w| {
            for row in [
                meta::REPLICA_OF,
                meta::ORIGIN,
                meta::PROMOTED,
                meta::DEMOTED,
                meta::LAST_RECEIVED,
            ] {
                w.t.meta.remove(row)?;
            }
            for row in &sent {
                w.t.meta.remove(row.as_str())?;
            }
            let row = seal_meta(meta::VOLUME_ID, &id);
            w.t.meta.insert(meta::VOLUME_ID, row.as_slice())?;
            Ok(())
        })?;
        self.volume_id = id;
        Ok(())
    }
}
