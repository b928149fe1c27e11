//! Where a machine keeps what it knows of buckets (`~/.cache/snapfs/buckets`: the
//! rollback guard's generations, and the pack indexes it has read), beyond other
//! users' reach.
//!
//! Other users are adversaries, and root may run with another user's `HOME` (as
//! `sudo -E` leaves it). So the directory is reached by descriptor from `/`, one
//! component at a time and never through a link (`openat` with `O_NOFOLLOW`), and
//! each directory on the way must be one another user cannot change: owned by this
//! user or root, and writable by no one else (an ACL granting another user write
//! shows as group write), unless it is root's and sticky (as `/tmp` is: no one may
//! move another's entry in it). For root, no directory on the way may be on a FUSE
//! filesystem (whose daemon, any user's, says who owns what). What is under it is
//! then read and written through the open directory alone, so moving or replacing a
//! directory on the way afterwards redirects nothing; only files of this user's or
//! root's are read.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// An open directory no other user can change.
pub(super) struct Dir {
    fd: OwnedFd,
    /// Its path when it was opened, for messages.
    pub(super) path: PathBuf,
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Why open directory `fd` (at `path`) is one another user could change, if it is.
fn unsafe_dir(fd: &OwnedFd, path: &Path) -> Option<String> {
    // SAFETY: fstat and fstatfs fill their structs for an open descriptor; geteuid
    // cannot fail.
    let (st, fs, euid) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        let mut fs: libc::statfs = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 || libc::fstatfs(fd.as_raw_fd(), &mut fs) != 0
        {
            return Some(format!("{}: {}", path.display(), last_error()));
        }
        (st, fs, libc::geteuid())
    };
    let mode = st.st_mode & 0o7777;
    let owner_ok = st.st_uid == euid || st.st_uid == 0;
    let write_ok = mode & 0o022 == 0 || (mode & libc::S_ISVTX != 0 && st.st_uid == 0);
    if !owner_ok || !write_ok {
        return Some(format!(
            "{} (owner uid {}, mode {mode:o}) is another user's or writable by others: it must be this user's or root's, and `chmod go-w` (an ACL granting write shows as group write)",
            path.display(),
            st.st_uid
        ));
    }
    #[allow(clippy::unnecessary_cast)]
    if euid == 0 && fs.f_type as i64 == FUSE_SUPER_MAGIC {
        return Some(format!(
            "{} is on a FUSE filesystem, whose daemon (any user's) says who owns what",
            path.display()
        ));
    }
    None
}

/// `name` as one plain name within a directory (no `/`, not `.` or `..`).
fn one_name(name: &[u8]) -> std::io::Result<CString> {
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn open_at(dir: &OwnedFd, name: &[u8], flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let n = one_name(name)?;
    // SAFETY: a NUL-terminated name relative to an open directory; the descriptor
    // returned is owned below.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            n.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY,
        )
    };
    if fd < 0 {
        return Err(last_error());
    }
    // SAFETY: just opened, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Dir {
    /// `home/.cache/snapfs/buckets`, made (mode 0700) where missing, if `home` and
    /// every directory on the way to it and below it is beyond other users' reach;
    /// else why not.
    pub(super) fn buckets(home: &Path) -> Result<Dir, String> {
        if !home.is_absolute() {
            return Err(format!("{}: not an absolute path", home.display()));
        }
        let real = std::fs::canonicalize(home).map_err(|e| format!("{}: {e}", home.display()))?;
        // SAFETY: a NUL-terminated path; the descriptor is owned below.
        let fd = unsafe {
            libc::open(
                c"/".as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(format!("/: {}", last_error()));
        }
        // SAFETY: just opened, owned by nothing else.
        let mut fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut path = PathBuf::from("/");
        if let Some(why) = unsafe_dir(&fd, &path) {
            return Err(why);
        }
        for c in real.components() {
            match c {
                Component::RootDir => continue,
                Component::Normal(name) => {
                    path.push(name);
                    fd = open_at(&fd, name.as_bytes(), libc::O_PATH | libc::O_DIRECTORY)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    if let Some(why) = unsafe_dir(&fd, &path) {
                        return Err(why);
                    }
                }
                _ => return Err(format!("{}: not a plain path", real.display())),
            }
        }
        let mut dir = Dir { fd, path };
        for name in [".cache", "snapfs", "buckets"] {
            dir = dir.sub(name, name != ".cache")?;
        }
        Ok(dir)
    }

    /// Directory `name` in this one, made (mode 0700) if missing, and beyond other
    /// users' reach. One of `ours` (snapfs's own) left open to others by the umask it
    /// was made under is closed to them.
    pub(super) fn sub(&self, name: &str, ours: bool) -> Result<Dir, String> {
        let path = self.path.join(name);
        let n = one_name(name.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: a NUL-terminated name relative to an open directory.
        if unsafe { libc::mkdirat(self.fd.as_raw_fd(), n.as_ptr(), 0o700) } != 0
            && last_error().raw_os_error() != Some(libc::EEXIST)
        {
            return Err(format!("cannot make {}: {}", path.display(), last_error()));
        }
        let fd = open_at(
            &self.fd,
            name.as_bytes(),
            libc::O_RDONLY | libc::O_DIRECTORY,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        if ours {
            // SAFETY: fstat fills `st` for an open descriptor; fchmod changes the
            // mode of this directory alone.
            unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::fstat(fd.as_raw_fd(), &mut st) == 0
                    && st.st_uid == libc::geteuid()
                    && st.st_mode & 0o077 != 0
                {
                    libc::fchmod(fd.as_raw_fd(), 0o700);
                }
            }
        }
        if let Some(why) = unsafe_dir(&fd, &path) {
            return Err(why);
        }
        Ok(Dir { fd, path })
    }

    /// The bytes of file `name` here: `Ok(None)` when there is none; an error when
    /// it is not a regular file of this user's or root's of at most `max` bytes, or
    /// cannot be read.
    pub(super) fn read(&self, name: &str, max: u64) -> std::io::Result<Option<Vec<u8>>> {
        let fd = match open_at(&self.fd, name.as_bytes(), libc::O_RDONLY | libc::O_NONBLOCK) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut f = std::fs::File::from(fd);
        let m = f.metadata()?;
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        if !m.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        if m.uid() != euid && m.uid() != 0 {
            return Err(std::io::Error::other(format!(
                "owned by uid {}, neither this user nor root",
                m.uid()
            )));
        }
        if m.len() > max {
            return Err(std::io::Error::other(format!(
                "{} bytes, more than the {max} it may hold",
                m.len()
            )));
        }
        let mut v = Vec::with_capacity(m.len() as usize);
        Read::by_ref(&mut f).take(max + 1).read_to_end(&mut v)?;
        if v.len() as u64 > max {
            return Err(std::io::Error::other("it grew as it was read"));
        }
        Ok(Some(v))
    }

    /// Writes file `name` here whole: a new file (mode 0600) renamed over it; with
    /// `durable`, on disk (the file, then the directory) when this returns, so a
    /// crash leaves the old or the new, whole.
    pub(super) fn write(&self, name: &str, parts: &[&[u8]], durable: bool) -> std::io::Result<()> {
        let mut r = [0u8; 8];
        // SAFETY: getrandom writes at most `r.len()` bytes into `r`.
        unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
        let tmp = format!(
            ".{name}.{}.{:016x}.tmp",
            std::process::id(),
            u64::from_le_bytes(r)
        );
        let (t, n) = (one_name(tmp.as_bytes())?, one_name(name.as_bytes())?);
        // SAFETY: a NUL-terminated name relative to an open directory; a new file.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                t.as_ptr(),
                libc::O_WRONLY
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_NOFOLLOW
                    | libc::O_CLOEXEC
                    | libc::O_NOCTTY,
                0o600,
            )
        };
        if fd < 0 {
            return Err(last_error());
        }
        // SAFETY: just opened, owned by nothing else.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let written = parts
            .iter()
            .try_for_each(|p| f.write_all(p))
            .and_then(|()| if durable { f.sync_all() } else { Ok(()) });
        drop(f);
        let res = written.and_then(|()| {
            // SAFETY: names relative to the open directory.
            let r = unsafe {
                libc::renameat(
                    self.fd.as_raw_fd(),
                    t.as_ptr(),
                    self.fd.as_raw_fd(),
                    n.as_ptr(),
                )
            };
            if r != 0 {
                return Err(last_error());
            }
            // SAFETY: fsync of the open directory.
            if durable && unsafe { libc::fsync(self.fd.as_raw_fd()) } != 0 {
                return Err(last_error());
            }
            Ok(())
        });
        if res.is_err() {
            self.unlink(&tmp);
        }
        res
    }

    /// Removes file `name` here, if it is there.
    pub(super) fn unlink(&self, name: &str) {
        if let Ok(n) = one_name(name.as_bytes()) {
            // SAFETY: a NUL-terminated name relative to an open directory.
            unsafe { libc::unlinkat(self.fd.as_raw_fd(), n.as_ptr(), 0) };
        }
    }

    /// The names here (read through the open directory, opened anew).
    pub(super) fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        // SAFETY: openat gives a descriptor fdopendir then owns (closedir closes it);
        // each entry's name is a NUL-terminated string valid until the next readdir.
        unsafe {
            // A descriptor of its own (not a dup, which would share the offset).
            let fd = libc::openat(
                self.fd.as_raw_fd(),
                c".".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return out;
            }
            let d = libc::fdopendir(fd);
            if d.is_null() {
                libc::close(fd);
                return out;
            }
            loop {
                let e = libc::readdir(d);
                if e.is_null() {
                    break;
                }
                let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr()).to_bytes();
                if name != b"."
                    && name != b".."
                    && let Ok(s) = std::str::from_utf8(name)
                {
                    out.push(s.to_string());
                }
            }
            libc::closedir(d);
        }
        out
    }

    /// Bytes free for this user on its filesystem.
    pub(super) fn free(&self) -> Option<u64> {
        // SAFETY: fstatvfs fills `vfs` for an open descriptor.
        unsafe {
            let mut vfs: libc::statvfs = std::mem::zeroed();
            (libc::fstatvfs(self.fd.as_raw_fd(), &mut vfs) == 0)
                .then(|| vfs.f_bavail.saturating_mul(vfs.f_frsize))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn what_a_machine_keeps_of_buckets_is_kept_where_no_other_user_reaches() {
        let top = std::env::temp_dir().join(format!("snapfs-keep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let home = top.join("alice");
        std::fs::create_dir_all(&home).unwrap();
        mode(&top, 0o755);
        mode(&home, 0o755);
        let d = Dir::buckets(&home).expect("made");
        assert!(d.path.ends_with(".cache/snapfs/buckets"));
        d.write("f", &[b"kept"], true).unwrap();
        assert_eq!(d.read("f", 100).unwrap().as_deref(), Some(&b"kept"[..]));
        assert_eq!(d.read("none", 100).unwrap(), None);
        assert!(d.read("f", 3).is_err());
        assert!(d.names().contains(&"f".to_string()));
        for bad in ["", ".", "..", "a/b", "../f"] {
            assert!(d.write(bad, &[b"x"], false).is_err(), "{bad:?}");
            assert!(d.read(bad, 100).is_err(), "{bad:?}");
        }
        // A file of another user's is not believed.
        std::os::unix::fs::chown(d.path.join("f"), Some(65534), None).unwrap();
        assert!(d.read("f", 100).is_err());
        std::os::unix::fs::chown(d.path.join("f"), Some(0), None).unwrap();
        // snapfs's own directories made open to others (a umask of 0) are closed.
        mode(&home.join(".cache/snapfs"), 0o777);
        mode(&d.path, 0o775);
        assert!(Dir::buckets(&home).is_ok());
        let m = std::fs::metadata(&d.path).unwrap().permissions().mode();
        assert_eq!(m & 0o777, 0o700);
        // A directory on the way that others may write (a group too), or that is
        // another user's: nothing is kept there.
        let cache = home.join(".cache");
        mode(&cache, 0o777);
        let e = Dir::buckets(&home).err().expect("refused");
        assert!(e.contains(".cache") && e.contains("mode 777"), "{e}");
        mode(&cache, 0o775);
        assert!(Dir::buckets(&home).is_err());
        mode(&cache, 0o700);
        mode(&top, 0o777);
        assert!(Dir::buckets(&home).is_err());
        // Unless it is root's and sticky, as /tmp is; another's sticky one is not.
        mode(&top, 0o1777);
        assert!(Dir::buckets(&home).is_ok());
        std::os::unix::fs::chown(&top, Some(65534), None).unwrap();
        assert!(Dir::buckets(&home).is_err());
        mode(&top, 0o755);
        assert!(Dir::buckets(&home).is_err());
        std::os::unix::fs::chown(&top, Some(0), None).unwrap();
        assert!(Dir::buckets(&home).is_ok());
        // A relative HOME is not taken ("." would resolve).
        assert!(Dir::buckets(Path::new(".")).is_err());
        // A link on the way below HOME is not followed.
        let elsewhere = top.join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("buckets")).unwrap();
        std::fs::remove_dir_all(home.join(".cache/snapfs")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, home.join(".cache/snapfs")).unwrap();
        assert!(Dir::buckets(&home).is_err());
        std::fs::remove_file(home.join(".cache/snapfs")).unwrap();
        // A HOME that is a link is the directory it names (checked on its own way).
        let link = top.join("home-link");
        std::os::unix::fs::symlink(&home, &link).unwrap();
        assert!(Dir::buckets(&link).is_ok());
        // Once open, a directory on the way moved and replaced by a link redirects
        // nothing: what is written, listed and deleted is where it was opened.
        let d = Dir::buckets(&home).unwrap();
        d.write("old", &[b"x"], false).unwrap();
        std::fs::rename(&home, top.join("moved")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &home).unwrap();
        std::fs::write(elsewhere.join("old"), b"not snapfs's").unwrap();
        d.write("g", &[b"here"], false).unwrap();
        let kept = top.join("moved/.cache/snapfs/buckets");
        assert!(kept.join("g").exists());
        assert!(d.names().contains(&"g".to_string()));
        d.unlink("old");
        assert!(!kept.join("old").exists());
        assert!(elsewhere.join("old").exists());
        assert!(!elsewhere.join(".cache").exists());
        // A name that is a link, a FIFO or a device is not read (nor waited on).
        std::os::unix::fs::symlink("/dev/zero", kept.join("z")).unwrap();
        assert!(d.read("z", 1 << 20).is_err());
        let fifo = std::ffi::CString::new(kept.join("p").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(d.read("p", 1 << 20).is_err());
        std::fs::remove_dir_all(&top).unwrap();
    }
}
