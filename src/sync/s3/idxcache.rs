//! Pack indexes kept on this machine, so that a sync, a restore or a mount reads
//! from the bucket only the indexes it has not read before.
//!
//! A pack index is written once under a random name and never changed, and a
//! bucket's indexes are read whole at the start of every sync: 44 bytes for each
//! extent the bucket holds (about 700 MB for a TiB of 64 KiB extents), in one GET
//! per pack. Kept here, a sync of a few changes costs a listing, not the bucket's
//! whole index again.
//!
//! What is kept is exactly the object as the bucket gave it (sealed, if the bucket
//! is encrypted: opened and checked with the key at every use, as a fresh read is),
//! under `~/.cache/snapfs/buckets/ID.idx/` (ID: blake3 of the endpoint and
//! `s3://BUCKET/PREFIX`), one file per index: the 8 bytes `snapfsC1`, blake3 (32) of
//! what follows it, the length (u32, little-endian) of the tag, the tag, then the
//! object. The tag is the pack's id and the object's size and entity tag as the
//! bucket gave them: a kept copy is used only while the listing still gives the
//! same, so an index replaced in the bucket is read again. A file whose checksum
//! does not match is read again from the bucket (and replaced).
//!
//! Other users are adversaries: the directory is opened once, without following a
//! link, and used only if it is this user's, writable by no one else, and holds
//! the `CACHEDIR.TAG` snapfs wrote when it made it; every file in it is then
//! reached through that open directory (`openat`), never by path again, so moving
//! or replacing the directory or a parent of it redirects nothing. Only names of
//! the form snapfs writes are ever deleted. `SNAPFS_S3_INDEX_CACHE=off` turns it off.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

const MAGIC: &[u8; 8] = b"snapfsC1";

/// The largest index kept (a 32 MiB pack of the smallest extents lists fewer).
const MAX_KEPT: u64 = 64 << 20;

/// Free space under which nothing more is kept.
const MIN_FREE: u64 = 1 << 30;

/// The marker of a directory snapfs made (the Cache Directory Tagging
/// Specification's, which backup tools honour).
const TAG_NAME: &str = "CACHEDIR.TAG";
const TAG: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55\n\
# This directory holds pack indexes snapfs read from an S3 bucket: a cache.\n";

/// The indexes kept for one bucket prefix.
pub(super) struct IdxCache {
    /// The directory, open.
    dir: OwnedFd,
    /// Whether new indexes may be kept (the filesystem has room).
    room: bool,
}

fn cstr(s: &str) -> Option<CString> {
    CString::new(s).ok()
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl IdxCache {
    /// The kept indexes of `place` (`s3://BUCKET/PREFIX`) at `endpoint`, in `parent`
    /// (`~/.cache/snapfs/buckets`); `None` (with a warning) when the directory
    /// cannot be made or is not this user's alone.
    pub(super) fn open(parent: &Path, endpoint: &str, place: &str) -> Option<IdxCache> {
        let id = blake3::hash(format!("{endpoint}\n{place}").as_bytes());
        let path = parent.join(format!("{}.idx", &id.to_hex()[..32]));
        match Self::open_dir(&path) {
            Ok(c) => Some(c),
            Err(why) => {
                tracing::warn!(dir = %path.display(), "s3: not keeping pack indexes on this machine: {why}");
                None
            }
        }
    }

    fn open_dir(path: &Path) -> Result<IdxCache, String> {
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated path; mkdir only makes a directory.
        let made = unsafe { libc::mkdir(c.as_ptr(), 0o700) } == 0;
        if !made && last_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(last_error().to_string());
        }
        // SAFETY: a NUL-terminated path; the descriptor returned is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(format!("cannot open it: {}", last_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fstat fills `st` for an open descriptor; geteuid cannot fail.
        let (st, euid) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(dir.as_raw_fd(), &mut st) != 0 {
                return Err(last_error().to_string());
            }
            (st, libc::geteuid())
        };
        // A directory another user could write would let them say what the bucket
        // holds: a sync would then leave extents out.
        if st.st_uid != euid || st.st_mode & 0o022 != 0 {
            return Err("it is not this user's alone".into());
        }
        let mut c = IdxCache { dir, room: true };
        if made {
            c.write_file(TAG_NAME, &[TAG])
                .map_err(|e| format!("cannot write {TAG_NAME}: {e}"))?;
        } else if c.read_file(TAG_NAME, TAG.len() as u64).as_deref() != Some(TAG) {
            // Not one snapfs made: nothing in it is read or deleted.
            return Err(format!("it holds no {TAG_NAME} of snapfs's"));
        }
        // SAFETY: fstatvfs fills `vfs` for an open descriptor.
        let free = unsafe {
            let mut vfs: libc::statvfs = std::mem::zeroed();
            (libc::fstatvfs(c.dir.as_raw_fd(), &mut vfs) == 0)
                .then(|| vfs.f_bavail.saturating_mul(vfs.f_frsize))
        };
        c.room = free.is_some_and(|f| f >= MIN_FREE);
        Ok(c)
    }

    /// The bytes of regular file `name` in the directory, if it is one of at most
    /// `max` bytes.
    fn read_file(&self, name: &str, max: u64) -> Option<Vec<u8>> {
        let n = cstr(name)?;
        // SAFETY: a NUL-terminated name relative to an open directory.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                n.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let m = f.metadata().ok()?;
        if !m.is_file() || m.len() > max {
            return None;
        }
        let mut v = Vec::with_capacity(m.len() as usize);
        Read::by_ref(&mut f)
            .take(max + 1)
            .read_to_end(&mut v)
            .ok()?;
        (v.len() as u64 <= max).then_some(v)
    }

    /// Writes file `name` in the directory whole (a new file renamed over it).
    fn write_file(&self, name: &str, parts: &[&[u8]]) -> std::io::Result<()> {
        let tmp = format!(".{name}.{}.{}.tmp", std::process::id(), rand_tag());
        let (t, n) = (
            cstr(&tmp).ok_or_else(last_error)?,
            cstr(name).ok_or_else(last_error)?,
        );
        // SAFETY: a NUL-terminated name relative to an open directory; a new file.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                t.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(last_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let written = parts.iter().try_for_each(|p| f.write_all(p));
        drop(f);
        // SAFETY: names relative to the open directory.
        let res = written.and_then(|()| {
            if unsafe {
                libc::renameat(
                    self.dir.as_raw_fd(),
                    t.as_ptr(),
                    self.dir.as_raw_fd(),
                    n.as_ptr(),
                )
            } == 0
            {
                Ok(())
            } else {
                Err(last_error())
            }
        });
        if res.is_err() {
            self.unlink(&t);
        }
        res
    }

    fn unlink(&self, name: &CStr) {
        // SAFETY: a NUL-terminated name relative to an open directory.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), name.as_ptr(), 0) };
    }

    /// The names in the directory.
    fn names(&self) -> Vec<String> {
        // Through the descriptor's own link: the directory opened, wherever it is now.
        let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", self.dir.as_raw_fd()))
        else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }

    /// Index `id` as kept, if it was kept with `tag` and is whole.
    pub(super) fn get(&self, id: &str, tag: &str) -> Option<Vec<u8>> {
        let kept = self.read_file(&format!("{id}.idx"), MAX_KEPT + 4096)?;
        let rest = kept.strip_prefix(MAGIC.as_slice())?;
        let (sum, body) = rest.split_at_checked(32)?;
        if blake3::hash(body).as_bytes() != sum {
            tracing::debug!(id, "s3: a kept pack index is damaged; read again");
            return None;
        }
        let (len, body) = body.split_at_checked(4)?;
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let (kept_tag, object) = body.split_at_checked(len)?;
        (kept_tag == full_tag(id, tag).as_bytes()).then(|| object.to_vec())
    }

    /// Keeps index `id`, as the bucket gave it (`object`) with `tag`. A failure
    /// costs only a read next time.
    pub(super) fn put(&self, id: &str, tag: &str, object: &[u8]) {
        if !self.room || object.len() as u64 > MAX_KEPT {
            return;
        }
        let tag = full_tag(id, tag);
        let len = (tag.len() as u32).to_le_bytes();
        let mut h = blake3::Hasher::new();
        h.update(&len).update(tag.as_bytes()).update(object);
        let sum = h.finalize();
        if let Err(e) = self.write_file(
            &format!("{id}.idx"),
            &[MAGIC, sum.as_bytes(), &len, tag.as_bytes(), object],
        ) {
            tracing::debug!(error = %e, "s3: cannot keep a pack index");
        }
    }

    /// Drops the kept copy of index `id` (it did not open or decode).
    pub(super) fn drop_kept(&self, id: &str) {
        if let Some(n) = cstr(&format!("{id}.idx")) {
            self.unlink(&n);
        }
    }

    /// Drops what is kept of indexes not among `ids` (the bucket's, as just listed):
    /// their packs were collected. Only names snapfs writes go.
    pub(super) fn retain(&self, ids: &HashSet<&str>) {
        for name in self.names() {
            let ours = match name.strip_suffix(".idx") {
                Some(id) => super::is_pack_id(id) && !ids.contains(id),
                // A file left by a writer that stopped before its rename.
                None => name.starts_with('.') && name.ends_with(".tmp"),
            };
            if ours && let Some(n) = cstr(&name) {
                self.unlink(&n);
            }
        }
    }
}

/// What a kept index is bound to: its pack's id and the bucket's tag of it.
fn full_tag(id: &str, tag: &str) -> String {
    format!("{id} {tag}")
}

fn rand_tag() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let _ = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(name: &str) -> std::path::PathBuf {
        let home =
            std::env::temp_dir().join(format!("snapfs-idxcache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(home.join(".cache/snapfs/buckets")).unwrap();
        home
    }

    fn open(home: &Path, endpoint: &str) -> Option<IdxCache> {
        IdxCache::open(&home.join(".cache/snapfs/buckets"), endpoint, "s3://b/p")
    }

    fn dir_of(home: &Path) -> std::path::PathBuf {
        let top = home.join(".cache/snapfs/buckets");
        std::fs::read_dir(&top)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "idx"))
            .unwrap()
    }

    #[test]
    fn a_kept_index_is_used_only_whole_and_under_the_same_tag() {
        let home = home("tag");
        let c = open(&home, "http://e").expect("opens");
        let dir = dir_of(&home);
        assert_eq!(c.get("a", "1 x"), None);
        c.put("a", "1 x", b"index bytes");
        assert_eq!(c.get("a", "1 x").as_deref(), Some(&b"index bytes"[..]));
        // Replaced in the bucket: another tag.
        assert_eq!(c.get("a", "1 y"), None);
        // Damaged here: a byte changed anywhere.
        let f = dir.join("a.idx");
        let mut kept = std::fs::read(&f).unwrap();
        for i in 0..kept.len() {
            kept[i] ^= 1;
            std::fs::write(&f, &kept).unwrap();
            assert_eq!(c.get("a", "1 x"), None, "byte {i} flipped");
            kept[i] ^= 1;
        }
        std::fs::write(&f, &kept).unwrap();
        assert!(c.get("a", "1 x").is_some());
        // Another pack's copy under this one's name is not believed, tag alike.
        std::fs::copy(&f, dir.join("b.idx")).unwrap();
        assert_eq!(c.get("b", "1 x"), None);
        // Another endpoint or prefix keeps its own.
        let other = open(&home, "http://f").unwrap();
        assert_eq!(other.get("a", "1 x"), None);
        // Collected packs' indexes go, and files left half written; nothing else.
        c.put("b", "2 z", b"other");
        std::fs::write(dir.join(".a.idx.1.2.tmp"), b"half").unwrap();
        std::fs::write(dir.join("notes.txt"), b"not snapfs's").unwrap();
        c.retain(&["b"].into_iter().collect());
        assert_eq!(c.get("a", "1 x"), None);
        assert!(c.get("b", "2 z").is_some());
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["CACHEDIR.TAG", "b.idx", "notes.txt"]);
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn a_directory_others_could_write_or_redirect_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let home = home("dir");
        let c = open(&home, "http://e").expect("opens");
        let dir = dir_of(&home);
        c.put("a", "t", b"kept");
        // Writable by others: not used.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(open(&home, "http://e").is_none());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A link in its place, to a directory of this user's holding files: not
        // followed, and nothing there is touched.
        let elsewhere = home.join("precious");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("0123abcd.idx"), b"precious").unwrap();
        let moved = home.join("moved");
        std::fs::rename(&dir, &moved).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        assert!(open(&home, "http://e").is_none());
        // A directory of this user's that snapfs did not make: not used either.
        std::fs::remove_file(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("0123abcd.idx"), b"precious").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(open(&home, "http://e").is_none());
        assert!(dir.join("0123abcd.idx").exists());
        // One opened, then moved and replaced by a link: the open one is still the
        // one used (what is kept is read, and retain deletes there alone).
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::rename(&moved, &dir).unwrap();
        let c = open(&home, "http://e").expect("opens");
        std::fs::rename(&dir, &moved).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        assert_eq!(c.get("a", "t").as_deref(), Some(&b"kept"[..]));
        c.retain(&HashSet::new());
        assert_eq!(c.get("a", "t"), None);
        assert!(elsewhere.join("0123abcd.idx").exists());
        // A kept name that is a link, or not a regular file, is not read.
        std::os::unix::fs::symlink("/dev/zero", moved.join("z.idx")).unwrap();
        assert_eq!(c.get("z", "t"), None);
        std::fs::remove_dir_all(&home).unwrap();
    }
}
