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
    files: HashMap<u64, File>,
    active: u64,
    active_len: u64,
    /// Segments written since the last `sync`.
    unsynced: Vec<u64>,
}

/// Writes `head` then `body` at `at` with `pwritev`, without copying them together.
fn write_all_vectored_at(f: &File, head: &[u8], body: &[u8], at: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let total = head.len() + body.len();
    let mut done = 0usize;
    while done < total {
        let (h, b) = if done < head.len() {
            (&head[done..], body)
        } else {
            (&head[..0], &body[done - head.len()..])
        };
        let iov = [
            libc::iovec {
                iov_base: h.as_ptr() as *mut _,
                iov_len: h.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            },
        ];
        // SAFETY: both iovecs describe live slices for the duration of the call, and
        // pwritev only reads through them.
        let n = unsafe {
            libc::pwritev(
                f.as_raw_fd(),
                iov.as_ptr(),
                2,
                (at + done as u64) as libc::off_t,
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
        done += n as usize;
    }
    Ok(())
}

/// The path of segment `id` under `dir`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
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
        self.files.insert(id, f);
        self.active = id;
        self.active_len = SEGMENT_HEADER;
        self.unsynced.push(id);
        Ok(())
    }

    /// The open file of segment `id`.
    pub fn file(&mut self, id: u64) -> Result<&File, StoreError> {
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
            self.files.insert(id, f);
        }
        Ok(&self.files[&id])
    }

    /// Appends one extent; returns (segment, offset of its data).
    pub fn append(&mut self, hash: &[u8; 32], data: &[u8]) -> Result<(u64, u64), StoreError> {
        if self.active_len + EXTENT_HEADER + data.len() as u64 > SEGMENT_TARGET
            && self.active_len > SEGMENT_HEADER
        {
            let next = self.active + 1;
            self.start(next)?;
        }
        let id = self.active;
        let at = self.active_len;
        let mut header = [0u8; EXTENT_HEADER as usize];
        header[..4].copy_from_slice(EXTENT_MAGIC);
        header[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
        header[8..].copy_from_slice(hash);
        write_all_vectored_at(self.file(id)?, &header, data, at)?;
        self.active_len = at + EXTENT_HEADER + data.len() as u64;
        if self.unsynced.last() != Some(&id) {
            self.unsynced.push(id);
        }
        Ok((id, at + EXTENT_HEADER))
    }

    /// Reads `len` bytes of extent data at `offset` of segment `id`.
    pub fn read(&mut self, id: u64, offset: u64, len: u32) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0u8; len as usize];
        let f = self.file(id)?;
        f.read_exact_at(&mut buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                StoreError::Corrupt(format!(
                    "extent at {offset}+{len} is past the end of segment {id:016x}"
                ))
            } else {
                e.into()
            }
        })?;
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
