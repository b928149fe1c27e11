//! Append-only segment files that hold extent bytes.
//!
//! A segment is `segments/<id as 16 hex digits>.seg`: a 16-byte header
//! (`b"SNAPFSG1"`, then the segment id as u64 LE) followed by extents, each a 40-byte
//! header (`b"SXT1"`, data length u32 LE, blake3 hash of the data) and the data. The
//! `extents` table points at the data, not at its header; the headers let `fsck` walk a
//! segment on its own. Bytes past the last extent that redb knows of are the leftovers
//! of a crash before a commit: harmless, and overwritten by nothing (appends go to the
//! end of the file).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::store::StoreError;

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
    dir: PathBuf,
    /// Open segment files, shared with reads that run outside the core's lock (a
    /// deleted segment stays readable through a handle opened before).
    files: HashMap<u64, Arc<File>>,
    active: u64,
    active_len: u64,
    /// Segments written since the last `sync`.
    unsynced: Vec<u64>,
}

/// Writes `parts` one after the other at `at` with `pwritev`, without copying them
/// together (at most [`IOV_BATCH`] parts per call).
fn write_all_vectored_at(f: &File, parts: &[&[u8]], at: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut first = 0usize; // the first part not wholly written
    let mut skip = 0usize; // bytes of it already written
    let mut pos = at;
    while first < parts.len() {
        let iov: Vec<libc::iovec> = parts[first..]
            .iter()
            .take(IOV_BATCH)
            .enumerate()
            .map(|(i, p)| {
                let p = if i == 0 { &p[skip..] } else { p };
                libc::iovec {
                    iov_base: p.as_ptr() as *mut _,
                    iov_len: p.len(),
                }
            })
            .collect();
        // SAFETY: every iovec describes a live slice for the duration of the call, and
        // pwritev only reads through them.
        let n = unsafe {
            libc::pwritev(
                f.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                pos as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        pos += n as u64;
        let mut n = n as usize;
        while n > 0 && first < parts.len() {
            let left = parts[first].len() - skip;
            if n >= left {
                n -= left;
                first += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
        // Parts of no bytes left behind a full write.
        while first < parts.len() && parts[first].len() == skip {
            first += 1;
            skip = 0;
        }
    }
    Ok(())
}

/// Slices per `pwritev` call (Linux allows 1024).
const IOV_BATCH: usize = 1024;

/// The path of segment `id` under `dir`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// Reads `buf.len()` bytes at `offset` of `f`, the file of segment `id`; a short read
/// is corruption (the extent index names bytes the segment does not hold).
pub fn read_exact_from(f: &File, id: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
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
    /// Opens the segment directory, creating it if `create`, and picks the newest
    /// segment to append to.
    pub fn open(dir: &Path, create: bool) -> Result<Self, StoreError> {
        if create {
            std::fs::create_dir_all(dir)?;
        }
        let mut newest = 0u64;
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_suffix(".seg")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            {
                newest = newest.max(id);
            }
        }
        let mut segs = Segments {
            dir: dir.to_path_buf(),
            files: HashMap::new(),
            active: 0,
            active_len: 0,
            unsynced: Vec::new(),
        };
        if newest == 0 {
            segs.start(1)?;
        } else {
            let len = segs.file(newest)?.metadata()?.len();
            segs.active = newest;
            segs.active_len = len.max(SEGMENT_HEADER);
        }
        Ok(segs)
    }

    /// Ids of all segment files present.
    pub fn ids(&self) -> Result<Vec<u64>, StoreError> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
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

    fn start(&mut self, id: u64) -> Result<(), StoreError> {
        let path = segment_path(&self.dir, id);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut header = [0u8; SEGMENT_HEADER as usize];
        header[..8].copy_from_slice(SEGMENT_MAGIC);
        header[8..].copy_from_slice(&id.to_le_bytes());
        f.write_all_at(&header, 0)?;
        self.files.insert(id, Arc::new(f));
        self.active = id;
        self.active_len = SEGMENT_HEADER;
        self.unsynced.push(id);
        Ok(())
    }

    /// The open file of segment `id`.
    pub fn file(&mut self, id: u64) -> Result<&File, StoreError> {
        Ok(self.shared(id)?)
    }

    /// The open file of segment `id`, to read from without `self`.
    pub fn shared(&mut self, id: u64) -> Result<&Arc<File>, StoreError> {
        if !self.files.contains_key(&id) {
            let path = segment_path(&self.dir, id);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        StoreError::Corrupt(format!("segment {id:016x} is missing"))
                    } else {
                        e.into()
                    }
                })?;
            self.files.insert(id, Arc::new(f));
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
            if self.active_len + size(i) > SEGMENT_TARGET && self.active_len > SEGMENT_HEADER {
                let next = self.active + 1;
                self.start(next)?;
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
            write_all_vectored_at(self.file(id)?, &parts, at)?;
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
        read_exact_from(self.file(id)?, id, offset, &mut buf)?;
        Ok(buf)
    }

    /// Makes every appended extent durable (`fdatasync`), and the directory entries of
    /// new segment files.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        for id in std::mem::take(&mut self.unsynced) {
            self.file(id)?.sync_data()?;
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Handles on the segments written since the last `sync`, for an `fdatasync`
    /// outside the store's lock that leaves `sync` little to do.
    pub fn unsynced_handles(&mut self) -> Vec<File> {
        let ids = self.unsynced.clone();
        ids.into_iter()
            .filter_map(|id| self.file(id).ok()?.try_clone().ok())
            .collect()
    }

    /// Closes the active segment; appends go to a new one.
    pub fn roll(&mut self) -> Result<(), StoreError> {
        let next = self.active + 1;
        self.start(next)
    }

    /// Whether `bytes` more of extents leave the disk its reserve: the space kept for
    /// metadata commits, so that a full disk refuses new data (ENOSPC) instead of
    /// failing a commit of operations already answered. The reserve is 5% of the
    /// filesystem, at least 8 MiB and at most 256 MiB.
    pub fn room_for(&self, bytes: u64) -> io::Result<bool> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: all-zero is a valid statvfs; the kernel fills it.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `st` a valid out pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let unit = st.f_frsize.max(1);
        let avail = st.f_bavail.saturating_mul(unit);
        let total = st.f_blocks.saturating_mul(unit);
        let reserve = (total / 20).clamp(8 << 20, 256 << 20);
        Ok(avail >= bytes.saturating_add(reserve))
    }

    /// The segment appends go to.
    pub fn active(&self) -> u64 {
        self.active
    }

    /// The segment directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Deletes segment `id` (never the active one).
    pub fn remove(&mut self, id: u64) -> Result<(), StoreError> {
        if id == self.active {
            return Ok(());
        }
        self.files.remove(&id);
        self.unsynced.retain(|s| *s != id);
        std::fs::remove_file(segment_path(&self.dir, id))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Bytes used on disk by all segment files.
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for id in self.ids()? {
            total += std::fs::metadata(segment_path(&self.dir, id))?.len();
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_writes_keep_every_part_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("f"))
            .unwrap();
        // More parts than one pwritev takes, some empty.
        let parts: Vec<Vec<u8>> = (0..2500u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize * 3])
            .collect();
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        write_all_vectored_at(&f, &refs, 5).unwrap();
        let want: Vec<u8> = parts.concat();
        let mut got = vec![0u8; want.len()];
        f.read_exact_at(&mut got, 5).unwrap();
        assert!(got == want);
        assert_eq!(f.metadata().unwrap().len(), 5 + want.len() as u64);
    }

    #[test]
    fn batched_appends_land_where_they_say() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = Segments::open(dir.path(), true).unwrap();
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
