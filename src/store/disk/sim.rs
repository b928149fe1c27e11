//! A simulated disk for power-loss tests: it keeps, for every file, what was made
//! durable and the writes since, so that a crash can be played at any point.
//!
//! At a crash only what `sync_data` made durable survives for sure, and of the writes
//! after it a random subset, each torn at 4 KiB pages (the unit a disk writes whole);
//! a file made or deleted survives as such only once its directory was synced (redb's
//! own crash tests work the same way). Every I/O call counts as one step: a hook can
//! take an [`Image`] before any step (a crash point), and a step can be made to fail
//! with an errno (fault injection).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Disk, DiskFile};

/// The unit a write is torn at.
const PAGE: u64 = 4096;

/// A write not yet durable.
#[derive(Clone, Debug)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct FileState {
    /// What reads see now.
    data: Vec<u8>,
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// Writes since the last sync, in order.
    pending: Vec<Pending>,
}

/// Called before every step with its number; may take an [`Image`].
pub type StepHook = Box<dyn FnMut(u64, &SimDisk) + Send>;

#[derive(Default)]
struct Shared {
    steps: AtomicU64,
    /// `(step, errno)`: that step fails.
    fail_at: Mutex<Option<(u64, i32)>>,
    hook: Mutex<Option<StepHook>>,
}

/// One file of a [`SimDisk`].
#[derive(Debug)]
pub struct SimFile {
    st: Mutex<FileState>,
    disk: std::sync::Weak<Inner>,
}

#[derive(Default)]
struct Names {
    /// The files as the running system sees them.
    now: BTreeMap<PathBuf, Arc<SimFile>>,
    /// The files a crash would leave (directory entries made durable).
    durable: BTreeMap<PathBuf, Arc<SimFile>>,
    dirs: BTreeSet<PathBuf>,
}

struct Inner {
    names: Mutex<Names>,
    shared: Shared,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimDisk")
    }
}

/// A simulated disk; clones share it.
#[derive(Clone, Debug)]
pub struct SimDisk(Arc<Inner>);

impl Default for SimDisk {
    fn default() -> Self {
        SimDisk::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Counts a step; fails it if it is the one to fail. The hook runs first, so an
    /// image taken at step `n` holds what steps before `n` did.
    fn step(self: &Arc<Self>) -> io::Result<()> {
        let n = self.shared.steps.fetch_add(1, Ordering::SeqCst);
        let hook = lock(&self.shared.hook).take();
        if let Some(mut h) = hook {
            h(n, &SimDisk(self.clone()));
            let mut slot = lock(&self.shared.hook);
            if slot.is_none() {
                *slot = Some(h);
            }
        }
        if let Some((at, errno)) = *lock(&self.shared.fail_at)
            && at == n
        {
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(())
    }
}

impl SimFile {
    fn step(&self) -> io::Result<()> {
        match self.disk.upgrade() {
            Some(d) => d.step(),
            None => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }
}

impl DiskFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = lock(&self.st);
        let end = offset as usize + buf.len();
        if end > st.data.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&st.data[offset as usize..end]);
        Ok(())
    }

    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        // A file synced since its last write counts as evicted: both the cached and
        // the cold path of a caller get exercised.
        if lock(&self.st).pending.is_empty() {
            return Ok(false);
        }
        match self.read_exact_at(buf, offset) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn write_parts_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        self.step()?;
        let bytes = parts.concat();
        let mut st = lock(&self.st);
        let end = offset as usize + bytes.len();
        if st.data.len() < end {
            st.data.resize(end, 0);
        }
        st.data[offset as usize..end].copy_from_slice(&bytes);
        st.pending.push(Pending::Write(offset, bytes));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.step()?;
        let mut st = lock(&self.st);
        st.durable = st.data.clone();
        st.pending.clear();
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(lock(&self.st).data.len() as u64)
    }

    fn allocated(&self) -> io::Result<u64> {
        self.size()
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.step()?;
        let mut st = lock(&self.st);
        let end = ((offset + len) as usize).min(st.data.len());
        let start = (offset as usize).min(end);
        let zeros = vec![0u8; end - start];
        st.data[start..end].copy_from_slice(&zeros);
        st.pending.push(Pending::Write(start as u64, zeros));
        Ok(())
    }
}

impl SimFile {
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.step()?;
        let mut st = lock(&self.st);
        st.data.resize(len as usize, 0);
        st.pending.push(Pending::SetLen(len));
        Ok(())
    }
}

/// redb's metadata file on a [`SimDisk`].
#[derive(Debug)]
struct SimBackend(Arc<SimFile>);

impl redb::StorageBackend for SimBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.0.size()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        DiskFile::sync_data(&*self.0)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.0.write_parts_at(&[data], offset)
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk(Arc::new(Inner {
            names: Mutex::new(Names::default()),
            shared: Shared::default(),
        }))
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.0.shared.steps.load(Ordering::SeqCst)
    }

    /// Calls `hook` before every step from now on.
    pub fn set_hook(&self, hook: StepHook) {
        *lock(&self.0.shared.hook) = Some(hook);
    }

    /// Makes step `step` fail with `errno`.
    pub fn fail_at(&self, step: u64, errno: i32) {
        *lock(&self.0.shared.fail_at) = Some((step, errno));
    }

    /// What a crash now could leave: see [`Image::crash`].
    pub fn image(&self) -> Image {
        let names = lock(&self.0.names);
        let files = names
            .durable
            .iter()
            .map(|(p, f)| {
                let st = lock(&f.st);
                (p.clone(), (st.durable.clone(), st.pending.clone()))
            })
            .collect();
        Image {
            files,
            dirs: names.dirs.clone(),
        }
    }

    fn file(&self, data: Vec<u8>) -> Arc<SimFile> {
        Arc::new(SimFile {
            st: Mutex::new(FileState {
                durable: data.clone(),
                data,
                pending: Vec::new(),
            }),
            disk: Arc::downgrade(&self.0),
        })
    }
}

/// The durable state of a [`SimDisk`] and the writes that may or may not survive.
#[derive(Clone, Debug)]
pub struct Image {
    files: BTreeMap<PathBuf, (Vec<u8>, Vec<Pending>)>,
    dirs: BTreeSet<PathBuf>,
}

impl Image {
    /// A disk as a crash could leave it: every file's durable bytes, then each later
    /// write whole, not at all, or some of its 4 KiB pages, as `seed` picks.
    pub fn crash(&self, seed: u64) -> SimDisk {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let disk = SimDisk::new();
        {
            let mut names = lock(&disk.0.names);
            names.dirs = self.dirs.clone();
            for (path, (durable, pending)) in &self.files {
                let mut data = durable.clone();
                for p in pending {
                    match p {
                        Pending::SetLen(len) => {
                            if next() % 2 == 0 {
                                data.resize(*len as usize, 0);
                            }
                        }
                        Pending::Write(off, bytes) => {
                            let how = next() % 3;
                            if how == 0 {
                                continue;
                            }
                            let end = off + bytes.len() as u64;
                            let mut at = *off;
                            while at < end {
                                let page_end = ((at / PAGE + 1) * PAGE).min(end);
                                if how == 1 || next() % 2 == 0 {
                                    let (a, b) = ((at - off) as usize, (page_end - off) as usize);
                                    if data.len() < page_end as usize {
                                        data.resize(page_end as usize, 0);
                                    }
                                    data[at as usize..page_end as usize]
                                        .copy_from_slice(&bytes[a..b]);
                                }
                                at = page_end;
                            }
                        }
                    }
                }
                let f = disk.file(data);
                names.now.insert(path.clone(), f.clone());
                names.durable.insert(path.clone(), f);
            }
        }
        disk
    }
}

impl Disk for SimDisk {
    fn open(&self, path: &Path, create_new: bool) -> io::Result<Arc<dyn DiskFile>> {
        Ok(self.open_sim(path, create_new)?)
    }

    fn exists(&self, path: &Path) -> bool {
        let names = lock(&self.0.names);
        names.now.contains_key(path) || names.dirs.contains(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        let names = lock(&self.0.names);
        if !names.dirs.contains(dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let mut out: Vec<OsString> = names
            .now
            .keys()
            .chain(names.dirs.iter())
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut names = lock(&self.0.names);
        for d in dir.ancestors() {
            if !d.as_os_str().is_empty() {
                names.dirs.insert(d.to_path_buf());
            }
        }
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.0.step()?;
        match lock(&self.0.names).now.remove(path) {
            Some(_) => Ok(()),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.0.step()?;
        let mut names = lock(&self.0.names);
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        names.durable.retain(|p, _| !in_dir(p));
        let now: Vec<_> = names
            .now
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect();
        names.durable.extend(now);
        Ok(())
    }

    fn space(&self, _dir: &Path) -> io::Result<(u64, u64)> {
        // A disk short of room, so that the store compacts its active segment and
        // punches freed extents (see `Segments::room_for`) and crashes meet both.
        Ok((96 << 20, 1 << 30))
    }

    fn open_db(&self, path: &Path, create: bool) -> Result<redb::Database, redb::DatabaseError> {
        let f = self.open_sim(path, create && !self.exists(path))?;
        redb::Database::builder()
            .set_check_integrity_on_open(!create)
            .create_with_backend(SimBackend(f))
    }
}

impl SimDisk {
    fn open_sim(&self, path: &Path, create_new: bool) -> io::Result<Arc<SimFile>> {
        if create_new {
            self.0.step()?;
            let mut names = lock(&self.0.names);
            if names.now.contains_key(path) {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            if !path.parent().is_some_and(|d| names.dirs.contains(d)) {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            let f = self.file(Vec::new());
            names.now.insert(path.to_path_buf(), f.clone());
            Ok(f)
        } else {
            lock(&self.0.names)
                .now
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_synced_data_and_entries_survive_for_sure() {
        let d = SimDisk::new();
        d.create_dir_all(Path::new("/s")).unwrap();
        let f = d.open(Path::new("/s/a"), true).unwrap();
        f.write_parts_at(&[b"durable"], 0).unwrap();
        f.sync_data().unwrap();
        // Not yet in a synced directory: gone after a crash.
        assert!(!d.image().crash(1).exists(Path::new("/s/a")));
        d.sync_dir(Path::new("/s")).unwrap();
        f.write_parts_at(&[&[7u8; 3 * 4096]], 4096).unwrap();
        let mut kept = BTreeSet::new();
        for seed in 0..64 {
            let c = d.image().crash(seed);
            let g = c.open(Path::new("/s/a"), false).unwrap();
            let mut b = [0u8; 7];
            g.read_exact_at(&mut b, 0).unwrap();
            assert_eq!(&b, b"durable");
            // Each page of the unsynced write is there whole or not at all.
            let len = g.size().unwrap();
            let mut pages = Vec::new();
            for p in 1..4u64 {
                if len >= (p + 1) * 4096 {
                    let mut page = vec![0u8; 4096];
                    g.read_exact_at(&mut page, p * 4096).unwrap();
                    assert!(page == [7u8; 4096] || page == [0u8; 4096]);
                    pages.push(page[0] == 7);
                }
            }
            kept.insert(pages);
        }
        assert!(kept.len() > 2, "crashes keep different subsets: {kept:?}");
    }
}
