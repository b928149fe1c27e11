//! Append-only segment files that hold extent bytes.
//!
//! A segment is `segments/<id as 16 hex digits>.seg`: a 16-byte header
//! (`b"SNAPFSG1"`, then the segment id as u64 LE) followed by extents, each a 40-byte
//! header (`b"SXT1"`, data length u32 LE, blake3 hash of the data) and the data. The
//! `extents` table points at the data, not at its header; the headers let `fsck` walk a
//! segment on its own. Bytes past the last extent that redb knows of are the leftovers
//! of a crash before a commit (possibly a torn extent): harmless, because a segment is
//! sealed when the store is opened. Appends go to a new segment, started at the first
//! append after open, so nothing is ever written after a torn extent, and an open that
//! writes nothing (fsck, status) creates no file. Segment ids are never reused (the
//! store records the next one, see `meta::NEXT_SEGMENT`).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::store::StoreError;
use crate::store::disk::{Disk, DiskFile};

/// An open segment file.
pub type SegFile = Arc<dyn DiskFile>;

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"SNAPFSG1";
/// Bytes of the segment header.
pub const SEGMENT_HEADER: u64 = 16;
/// Magic at the start of every extent header.
pub const EXTENT_MAGIC: &[u8; 4] = b"SXT1";
/// Bytes of an extent header.
pub const EXTENT_HEADER: u64 = 40;
/// A segment is closed and a new one started past this size.
pub const SEGMENT_TARGET: u64 = 1 << 30;

/// The set of segment files of a store, with one open for appending.
#[derive(Debug)]
pub struct Segments {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    /// Open segment files, shared with reads that run outside the core's lock (a
    /// deleted segment stays readable through a handle opened before).
    files: HashMap<u64, SegFile>,
    /// The segment appends go to; its file exists only once `started`.
    active: u64,
    started: bool,
    active_len: u64,
    /// Segments written since the last `sync`.
    unsynced: Vec<u64>,
    /// Shared with every [`SyncHandle`]: see [`SyncState`].
    sync_state: Arc<SyncState>,
    /// Appends still to fail with EIO, likewise.
    append_faults: std::sync::atomic::AtomicU32,
    /// A file was removed since the directory was last synced.
    removed: bool,
    /// The volume's size (`size=`): extents may not take more of the disk than this.
    limit: Option<u64>,
    /// Bytes the segment files take on disk, while known (else `u64::MAX`): counted
    /// once when the limit needs it, then kept by appends; a punch or a removal makes
    /// it count again.
    used: std::sync::atomic::AtomicU64,
}

/// What every data sync of the segments shares. Linux reports a failed write-back
/// once, to whichever `fdatasync` comes first: the failure is recorded under the same
/// lock that the `fdatasync` ran under, so no sync that starts after it (on another
/// thread, through another handle) can report success for data the failure lost.
#[derive(Debug, Default)]
struct SyncState {
    /// Held across each `fdatasync` and the recording of its failure.
    lock: std::sync::Mutex<Option<String>>,
    /// Data syncs still to fail with EIO, for tests of the failure path.
    faults: std::sync::atomic::AtomicU32,
}

impl SyncState {
    /// Runs `sync` under the lock; a failure (now or before) is an error for good.
    fn run(&self, sync: impl FnOnce() -> io::Result<()>) -> Result<(), StoreError> {
        let mut failed = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = failed.as_ref() {
            return Err(StoreError::Failed(why.clone()));
        }
        if let Err(e) = take_fault(&self.faults).and_then(|()| sync()) {
            let why = format!("a segment data sync failed: {e}");
            *failed = Some(why.clone());
            return Err(StoreError::Failed(why));
        }
        Ok(())
    }
}

/// A segment file to `fdatasync` without the store's lock.
pub struct SyncHandle {
    file: SegFile,
    state: Arc<SyncState>,
}

impl SyncHandle {
    /// `fdatasync`s the file.
    pub fn sync_data(&self) -> Result<(), StoreError> {
        self.state.run(|| self.file.sync_data())
    }
}

/// Fails with EIO if a fault is armed (and uses it up).
fn take_fault(faults: &std::sync::atomic::AtomicU32) -> io::Result<()> {
    use std::sync::atomic::Ordering;
    if faults
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// The path of segment `id` under `dir`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// Reads `buf.len()` bytes at `offset` of `f`, the file of segment `id`; a short read
/// is corruption (the extent index names bytes the segment does not hold).
pub fn read_exact_from(
    f: &dyn DiskFile,
    id: u64,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), StoreError> {
    f.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            StoreError::Corrupt(format!(
                "extent at {offset}+{} is past the end of segment {id:016x}",
                buf.len()
            ))
        } else {
            e.into()
        }
    })
}

impl Segments {
    /// Opens the segment directory, creating it if `create`. Every segment present is
    /// sealed: appends go to a new segment, numbered at least `next` and above every
    /// file present, whose file is made at the first append.
    pub fn open(
        disk: Arc<dyn Disk>,
        dir: &Path,
        create: bool,
        next: u64,
    ) -> Result<Self, StoreError> {
        if create {
            disk.create_dir_all(dir)?;
        }
        let mut segs = Segments::with_files(disk, dir.to_path_buf(), HashMap::new(), 0);
        let newest = segs.ids()?.last().copied().unwrap_or(0);
        segs.active = next.max(newest.saturating_add(1)).max(1);
        Ok(segs)
    }

    /// The id the next new segment will have: what the store must record so that no
    /// id is ever used twice.
    pub fn next_id(&self) -> u64 {
        if self.started {
            self.active + 1
        } else {
            self.active
        }
    }

    /// Ids of all segment files present.
    pub fn ids(&self) -> Result<Vec<u64>, StoreError> {
        let mut ids = Vec::new();
        let names = self
            .disk
            .list(&self.dir)
            .map_err(|e| super::io_at(&self.dir, e))?;
        for name in names {
            if let Some(id) = name
                .to_string_lossy()
                .strip_suffix(".seg")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Makes the file of the active segment.
    fn start(&mut self) -> Result<(), StoreError> {
        let id = self.active;
        let path = segment_path(&self.dir, id);
        // A file of this id would be one the store did not know of: never append to it.
        let f = self.disk.open(&path, true)?;
        let mut header = [0u8; SEGMENT_HEADER as usize];
        header[..8].copy_from_slice(SEGMENT_MAGIC);
        header[8..].copy_from_slice(&id.to_le_bytes());
        f.write_parts_at(&[&header], 0)?;
        self.files.insert(id, f);
        self.started = true;
        self.active_len = SEGMENT_HEADER;
        self.unsynced.push(id);
        Ok(())
    }

    /// The open file of segment `id`.
    pub fn file(&mut self, id: u64) -> Result<&dyn DiskFile, StoreError> {
        Ok(&**self.shared(id)?)
    }

    /// A reader of the segments as they are now, for a frozen view read without the
    /// store: every segment present is opened now (a later deletion does not take its
    /// bytes away). It never appends.
    pub fn reader(&mut self) -> Result<Segments, StoreError> {
        let mut files = HashMap::new();
        for id in self.ids()? {
            match self.shared(id) {
                Ok(f) => {
                    files.insert(id, f.clone());
                }
                // Deleted between the listing and the open: nothing references it.
                Err(StoreError::Corrupt(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Segments::with_files(
            self.disk.clone(),
            self.dir.clone(),
            files,
            self.active,
        ))
    }

    /// Segments of `dir` with `files` open and `active` next, nothing appended yet.
    fn with_files(
        disk: Arc<dyn Disk>,
        dir: PathBuf,
        files: HashMap<u64, SegFile>,
        active: u64,
    ) -> Segments {
        Segments {
            disk,
            dir,
            files,
            active,
            started: false,
            active_len: SEGMENT_HEADER,
            unsynced: Vec::new(),
            sync_state: Default::default(),
            append_faults: Default::default(),
            removed: false,
            limit: None,
            used: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// The open file of segment `id`, to read from without `self`.
    pub fn shared(&mut self, id: u64) -> Result<&SegFile, StoreError> {
        if !self.files.contains_key(&id) {
            let path = segment_path(&self.dir, id);
            let f = self.disk.open(&path, false).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    StoreError::Corrupt(format!("segment {id:016x} is missing"))
                } else {
                    e.into()
                }
            })?;
            self.files.insert(id, f);
        }
        Ok(&self.files[&id])
    }

    /// Appends one extent; returns (segment, offset of its data).
    pub fn append(&mut self, hash: &[u8; 32], data: &[u8]) -> Result<(u64, u64), StoreError> {
        Ok(self.append_many(&[(*hash, data)])?[0])
    }

    /// Appends extents, as few `pwritev` calls as the segment size allows; returns
    /// (segment, offset of its data) of each.
    pub fn append_many(
        &mut self,
        extents: &[([u8; 32], &[u8])],
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        if !extents.is_empty() {
            take_fault(&self.append_faults)?;
        }
        let mut out = Vec::with_capacity(extents.len());
        let headers: Vec<[u8; EXTENT_HEADER as usize]> = extents
            .iter()
            .map(|(hash, data)| {
                let mut h = [0u8; EXTENT_HEADER as usize];
                h[..4].copy_from_slice(EXTENT_MAGIC);
                h[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
                h[8..].copy_from_slice(hash);
                h
            })
            .collect();
        let mut i = 0;
        while i < extents.len() {
            let size = |j: usize| EXTENT_HEADER + extents[j].1.len() as u64;
            if self.started
                && self.active_len + size(i) > SEGMENT_TARGET
                && self.active_len > SEGMENT_HEADER
            {
                self.roll();
            }
            if !self.started {
                self.start()?;
            }
            // The run of extents that fits in the active segment (at least one).
            let (id, at) = (self.active, self.active_len);
            let mut end = self.active_len;
            let mut parts: Vec<&[u8]> = Vec::new();
            let first = i;
            while i < extents.len() && (i == first || end + size(i) <= SEGMENT_TARGET) {
                out.push((id, end + EXTENT_HEADER));
                parts.push(&headers[i]);
                parts.push(extents[i].1);
                end += size(i);
                i += 1;
            }
            self.file(id)?.write_parts_at(&parts, at)?;
            self.count_used(end - at);
            self.active_len = end;
            if self.unsynced.last() != Some(&id) {
                self.unsynced.push(id);
            }
        }
        Ok(out)
    }

    /// Reads `len` bytes of extent data at `offset` of segment `id`.
    pub fn read(&mut self, id: u64, offset: u64, len: u32) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0u8; len as usize];
        let f = self.file(id)?;
        read_exact_from(f, id, offset, &mut buf)?;
        Ok(buf)
    }

    /// Reads `len` bytes at `offset` of segment `id` if the page cache holds them
    /// (`None` if it does not, or the segment is missing): never waits for the disk.
    pub fn read_cached(
        &mut self,
        id: u64,
        offset: u64,
        len: u32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let f = match self.file(id) {
            Ok(f) => f,
            Err(StoreError::Corrupt(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; len as usize];
        Ok(f.read_cached(&mut buf, offset)?.then_some(buf))
    }

    /// Makes every appended extent durable (`fdatasync`), and the directory entries of
    /// new segment files.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced.is_empty() {
            // A sync through a handle may have failed meanwhile.
            return self.sync_state.run(|| Ok(()));
        }
        // Linux reports a failed write-back once: a segment whose sync failed is not
        // retried as if it were fine; the caller makes the failure stick.
        for id in std::mem::take(&mut self.unsynced) {
            let f = self.shared(id)?.clone();
            self.sync_state.run(|| f.sync_data())?;
        }
        // A sync through a handle may have failed meanwhile even with nothing left here.
        self.sync_state.run(|| Ok(()))?;
        self.disk.sync_dir(&self.dir)?;
        Ok(())
    }

    /// Handles on the segments written since the last `sync`, for an `fdatasync`
    /// outside the store's lock that leaves `sync` little to do.
    pub fn unsynced_handles(&mut self) -> Vec<SyncHandle> {
        let ids = self.unsynced.clone();
        ids.into_iter()
            .filter_map(|id| {
                Some(SyncHandle {
                    file: self.shared(id).ok()?.clone(),
                    state: self.sync_state.clone(),
                })
            })
            .collect()
    }

    /// Makes the next `n` appends fail with EIO (testing the failure path).
    #[doc(hidden)]
    pub fn fail_next_appends(&self, n: u32) {
        self.append_faults
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Makes the next `n` data syncs fail with EIO (testing the failure path).
    #[doc(hidden)]
    pub fn fail_next_syncs(&self, n: u32) {
        self.sync_state
            .faults
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes the active segment; appends go to a new one.
    pub fn roll(&mut self) {
        if self.started {
            self.active += 1;
            self.started = false;
            self.active_len = SEGMENT_HEADER;
        }
    }

    /// Gives the disk back under bytes `[offset, offset + len)` of segment `id`, the
    /// data of an extent nothing names any more (only whole 4 KiB pages inside it; the
    /// file keeps its length and reads zeros there). Call only once the commit that
    /// freed it is durable: a crash must not bring back a reference to punched bytes.
    pub fn punch(&mut self, id: u64, offset: u64, len: u64) -> Result<(), StoreError> {
        const PAGE: u64 = 4096;
        let (a, b) = (offset.div_ceil(PAGE) * PAGE, (offset + len) / PAGE * PAGE);
        if a >= b {
            return Ok(());
        }
        let f = match self.file(id) {
            Ok(f) => f,
            // Already compacted away.
            Err(StoreError::Corrupt(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        f.punch(a, b - a)?;
        self.recount_used();
        Ok(())
    }

    /// Whether `bytes` more of extents leave the disk its reserve: the space kept for
    /// metadata commits, so that a full disk refuses new data (ENOSPC) instead of
    /// failing a commit of operations already answered. The reserve is 5% of the
    /// filesystem, at least 8 MiB and at most 256 MiB.
    /// With a size limit, also whether the segments stay within it.
    pub fn room_for(&self, bytes: u64) -> io::Result<bool> {
        if !self.room_on_disk(bytes)? {
            return Ok(false);
        }
        Ok(match self.limit {
            Some(limit) => self.used_bytes()?.saturating_add(bytes) <= limit,
            None => true,
        })
    }

    /// Whether `bytes` more of extents leave the disk its reserve (the volume's size
    /// aside).
    pub fn room_on_disk(&self, bytes: u64) -> io::Result<bool> {
        let (avail, total) = self.disk.space(&self.dir)?;
        let reserve = (total / 20).clamp(8 << 20, 256 << 20);
        Ok(avail >= bytes.saturating_add(reserve))
    }

    /// Sets the volume's size (`None`: as much as the disk holds).
    pub fn set_limit(&mut self, limit: Option<u64>) {
        self.limit = limit;
    }

    /// The volume's size, if it has one.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Bytes the segment files take on disk (counted when not known).
    pub fn used_bytes(&self) -> io::Result<u64> {
        use std::sync::atomic::Ordering;
        let known = self.used.load(Ordering::Relaxed);
        if known != u64::MAX {
            return Ok(known);
        }
        let n = self.disk_bytes().map_err(|e| match e {
            StoreError::Io(e) => e,
            e => io::Error::other(e.to_string()),
        })?;
        self.used.store(n, Ordering::Relaxed);
        Ok(n)
    }

    /// `bytes` more were written (a known count grows; an unknown one stays so).
    fn count_used(&self, bytes: u64) {
        use std::sync::atomic::Ordering;
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n != u64::MAX).then(|| n.saturating_add(bytes).min(u64::MAX - 1))
            });
    }

    /// Space was given back: count again when next asked.
    fn recount_used(&self) {
        self.used
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
    }

    /// The segment appends go to.
    pub fn active(&self) -> u64 {
        self.active
    }

    /// The segment directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Deletes segment `id` (never the active one); a file already gone is fine.
    pub fn remove(&mut self, id: u64) -> Result<(), StoreError> {
        if id == self.active && self.started {
            return Ok(());
        }
        self.files.remove(&id);
        self.unsynced.retain(|s| *s != id);
        self.recount_used();
        match self.disk.remove(&segment_path(&self.dir, id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.removed = true;
        Ok(())
    }

    /// Makes the removals since the last call durable (one directory sync for all).
    /// Until then a crash may bring a removed file back; the next open finds it
    /// retired or unindexed, and deletes it or counts its bytes dead.
    pub fn sync_removals(&mut self) -> Result<(), StoreError> {
        if std::mem::take(&mut self.removed) {
            self.disk.sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Whether the file of segment `id` exists.
    pub fn exists(&self, id: u64) -> bool {
        self.files.contains_key(&id) || self.disk.exists(&segment_path(&self.dir, id))
    }

    /// The length of segment `id`'s file.
    pub fn len(&mut self, id: u64) -> Result<u64, StoreError> {
        Ok(self.file(id)?.size()?)
    }

    /// Bytes the disk holds for all segment files (holes punched in them not counted).
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for id in self.ids()? {
            // A segment open here is measured through its handle; one deleted since
            // the listing (compaction runs beside a frozen view) counts nothing.
            let bytes = match self.files.get(&id) {
                Some(f) => f.allocated(),
                None => match self.disk.open(&segment_path(&self.dir, id), false) {
                    Ok(f) => f.allocated(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
                    Err(e) => Err(e),
                },
            };
            total += bytes?;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_failed_through_a_handle_fails_every_later_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = Segments::open(crate::store::disk::real(), dir.path(), true, 1).unwrap();
        segs.append(&[1; 32], b"bytes").unwrap();
        let handles = segs.unsynced_handles();
        // The kernel reports the failed write-back once, to this handle...
        segs.fail_next_syncs(1);
        assert!(handles[0].sync_data().is_err());
        // ...and a sync that comes after must not take the silence for success.
        assert!(matches!(segs.sync(), Err(StoreError::Failed(_))));
        segs.append(&[2; 32], b"more").unwrap();
        assert!(matches!(segs.sync(), Err(StoreError::Failed(_))));
    }

    #[test]
    fn batched_appends_land_where_they_say() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = Segments::open(crate::store::disk::real(), dir.path(), true, 1).unwrap();
        let datas: Vec<Vec<u8>> = (0..600u32)
            .map(|i| vec![i as u8; 100 + i as usize])
            .collect();
        let items: Vec<([u8; 32], &[u8])> = datas
            .iter()
            .map(|d| (*blake3::hash(d).as_bytes(), d.as_slice()))
            .collect();
        let at = segs.append_many(&items).unwrap();
        for ((_, d), (id, off)) in items.iter().zip(at) {
            assert_eq!(segs.read(id, off, d.len() as u32).unwrap(), *d);
        }
    }
}
