//! The store's file I/O, behind two small traits, so that tests can put the store on a
//! simulated disk that loses what was not made durable (see [`sim`]).
//!
//! [`Disk`] is a directory tree of files; [`DiskFile`] is one open file. [`RealDisk`]
//! is the machine's filesystem. Everything the store writes goes through them: segment
//! files, directory entries, and redb's metadata file (through redb's
//! `StorageBackend`, see [`Disk::open_db`]).

use std::ffi::OsString;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// One open file of the store.
pub trait DiskFile: Send + Sync + Debug {
    /// Reads exactly `buf.len()` bytes at `offset` (a short file is `UnexpectedEof`).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads `buf.len()` bytes at `offset` only if the page cache holds them all,
    /// without waiting for the disk: `false` if it does not (or the file is shorter).
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool>;
    /// Writes `parts`, one after the other, at `offset`.
    fn write_parts_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()>;
    /// Makes the written data durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// The file's length.
    fn size(&self) -> io::Result<u64>;
    /// Bytes of disk the file takes (holes not counted).
    fn allocated(&self) -> io::Result<u64>;
    /// Gives back the disk under `[offset, offset + len)`, page aligned; the length stays.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// The store's directory tree.
pub trait Disk: Send + Sync + Debug {
    /// Opens `path` for reading and writing; with `create_new`, makes it (and fails if
    /// it exists).
    fn open(&self, path: &Path, create_new: bool) -> io::Result<Arc<dyn DiskFile>>;
    /// Whether a file or directory `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// The names in directory `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    /// Makes directory `dir` (mode 0700) and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Deletes file `path`.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of directory `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Bytes available to the store and the size of the filesystem under `dir`.
    fn space(&self, dir: &Path) -> io::Result<(u64, u64)>;
    /// Opens (or with `create`, creates) the redb database at `path`, every page's
    /// checksum verified when an existing one is opened.
    fn open_db(&self, path: &Path, create: bool) -> Result<redb::Database, redb::DatabaseError>;
}

/// The machine's filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealDisk;

/// A file of the machine's filesystem.
#[derive(Debug)]
pub struct RealFile(File);

/// Slices per `pwritev` call (Linux allows 1024).
const IOV_BATCH: usize = 1024;

/// Writes `parts` one after the other at `at` with `pwritev`, without copying them
/// together (at most [`IOV_BATCH`] parts per call).
pub(crate) fn write_all_vectored_at(f: &File, parts: &[&[u8]], at: u64) -> io::Result<()> {
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

impl DiskFile for RealFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        use std::os::unix::io::AsRawFd;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec describes `buf`, which lives across the call.
        let n = unsafe {
            libc::preadv2(
                self.0.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINTR) => Ok(false),
                _ => Err(e),
            };
        }
        Ok(n as usize == buf.len())
    }

    fn write_parts_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        write_all_vectored_at(&self.0, parts, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn allocated(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = self.0.metadata()?;
        Ok((m.blocks() * 512).min(m.len()))
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor.
        let r = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            // Filesystems without hole punching keep the bytes until compaction.
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Disk for RealDisk {
    fn open(&self, path: &Path, create_new: bool) -> io::Result<Arc<dyn DiskFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if create_new {
            // Segments hold the content of every file: the owner's alone.
            o.create_new(true).mode(0o600);
        }
        match o.open(path) {
            Ok(f) => Ok(Arc::new(RealFile(f))),
            // A read-only copy of a store (or one on a read-only filesystem) still reads.
            Err(e)
                if !create_new && matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES)) =>
            {
                Ok(Arc::new(RealFile(File::open(path)?)))
            }
            Err(e) => Err(e),
        }
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        // A store's directories are its owner's alone, whatever the umask (or the mode
        // of an empty directory made into a store).
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn space(&self, dir: &Path) -> io::Result<(u64, u64)> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: all-zero is a valid statvfs; the kernel fills it.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `st` a valid out pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let unit = st.f_frsize.max(1);
        Ok((
            st.f_bavail.saturating_mul(unit),
            st.f_blocks.saturating_mul(unit),
        ))
    }

    fn open_db(&self, path: &Path, create: bool) -> Result<redb::Database, redb::DatabaseError> {
        if create {
            // The metadata names every file: the owner's alone.
            use std::os::unix::fs::OpenOptionsExt;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
            redb::Database::builder().create_with_backend(redb::backends::FileBackend::new(file)?)
        } else {
            redb::Database::builder()
                .set_check_integrity_on_open(true)
                .open(path)
        }
    }
}

/// The machine's filesystem, shared.
pub fn real() -> Arc<dyn Disk> {
    Arc::new(RealDisk)
}

pub mod sim;

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
}
