//! `snapfs clone` on a filesystem whose files can share blocks (XFS with reflink,
//! btrfs): the store's files are cloned (FICLONE), not copied, and the copy then
//! keeps the one snapshot it was made for. A clone punching holes or compacting
//! later changes only its own files' blocks, so the two stores stay independent.

use std::os::fd::AsRawFd;
use std::path::Path;

use super::role::RoleError;
use super::schema::{meta, seal_meta};
use super::{DB_FILE, Store, StoreError, random_bytes};

/// Makes the new store `dest` (missing, or an empty directory) from snapshot
/// `snapshot` of the unmounted store at `src`, sharing their blocks: the store's
/// files are cloned into a directory beside `dest`, which keeps only the snapshot
/// and is then renamed into place, so that `dest` is never a half-made store (a
/// clone cut short leaves that directory, which the next clone there removes).
/// Returns the new volume id, or `None` when this cannot be done here (the store
/// is mounted, or the filesystem cannot share blocks between these files), for a
/// clone by sync instead.
pub fn reflink_clone(
    src: &Path,
    snapshot: &str,
    dest: &Path,
) -> Result<Option<[u8; 16]>, RoleError> {
    let refused = |m: String| Err(RoleError::Refused(m));
    match std::fs::read_dir(dest).map(|mut d| d.next().is_some()) {
        Ok(true) => return refused(format!("{} is not empty", dest.display())),
        Ok(false) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return refused(format!("{} is not a directory", dest.display()));
        }
        Err(e) => return Err(StoreError::from(e).into()),
    }
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return refused(format!("{}: not a path to make a store at", dest.display()));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let mut partial = std::ffi::OsString::from(".");
    partial.push(name);
    partial.push(".clone-partial");
    let tmp = parent.join(partial);
    // Held for the whole copy (exclusively: no daemon opens it meanwhile, and a
    // store a crash left open is recovered first), so its files do not change.
    let held = match Store::open(src, None) {
        Ok(s) => s,
        Err(StoreError::Locked) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if held.snapshot(snapshot.as_bytes())?.is_none() {
        return refused(format!(
            "there is no snapshot named {}",
            crate::text::printable(snapshot)
        ));
    }
    if tmp.exists() {
        // What a clone cut short left (only a clone names a directory so).
        std::fs::remove_dir_all(&tmp).map_err(StoreError::from)?;
    }
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&tmp)
        .map_err(StoreError::from)?;
    let copied = copy_files(src, &tmp);
    drop(held);
    match copied {
        Ok(true) => {}
        other => {
            let _ = std::fs::remove_dir_all(&tmp);
            return other.map(|_| None).map_err(Into::into);
        }
    }
    let kept = (|| {
        let mut st = Store::open(&tmp, None)?;
        st.keep_only(snapshot)?;
        Ok::<_, RoleError>(st.volume_id)
    })();
    let id = match kept {
        Ok(id) => id,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let _ = std::fs::remove_file(tmp.join("snapfs.log"));
    std::fs::rename(&tmp, dest).map_err(StoreError::from)?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::from)?;
    Ok(Some(id))
}

/// Clones the metadata file and the segment files of the store at `src` into the
/// directory `to`; `Ok(false)` when the filesystem cannot share their blocks.
fn copy_files(src: &Path, to: &Path) -> Result<bool, StoreError> {
    // The metadata first: if it cannot be cloned, nothing else is tried.
    if !ficlone(&src.join(DB_FILE), &to.join(DB_FILE))? {
        return Ok(false);
    }
    std::fs::create_dir(to.join("segments"))?;
    for e in std::fs::read_dir(src.join("segments"))? {
        let e = e?;
        if e.file_type()?.is_file()
            && !ficlone(&e.path(), &to.join("segments").join(e.file_name()))?
        {
            return Ok(false);
        }
    }
    for dir in [to.join("segments"), to.to_path_buf()] {
        std::fs::File::open(&dir)?.sync_all()?;
    }
    Ok(true)
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
                meta::LAST_SOURCE,
                meta::WRITER,
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
