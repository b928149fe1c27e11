//! The filesystem core: POSIX semantics over the versioned store, with no FUSE types.
//!
//! [`Fs`] is shared by every FUSE request thread and the background flusher. All state
//! sits behind one mutex ([`Inner`]): an operation takes it, runs one redb write
//! transaction (or reads), and releases it. Data writes are buffered per inode in
//! memory ([`Dirty`]) and become extents on flush, fsync, release, memory pressure or
//! the background tick. See `docs/ARCHITECTURE.md` for the concurrency model.

mod acl;
mod data;
mod snap;
#[cfg(test)]
pub(crate) mod tests;
mod xattr;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::store::schema::*;
use crate::store::{RecKey, Store, StoreConfig, StoreError, Writer, scan_visible};

pub use data::{Digest, SeekWhence, digest_blocks, finish_read};
pub(crate) use snap::inode_changes;
pub use snap::{Change, Inval, SnapshotInfo, check_snapshot_name};

pub use crate::store::schema::{EPOCH_SHIFT, MAX_LIVE_INO};
/// The `.snapshots` directory at the mount root.
pub const SNAPDIR_INO: u64 = MAX_LIVE_INO - 1;
/// Its name.
pub const SNAPDIR_NAME: &[u8] = b".snapshots";

/// What a kernel inode number names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// An inode of the live tree.
    Live(u64),
    /// The `.snapshots` directory.
    SnapDir,
    /// Inode `ino` as snapshot `epoch` froze it.
    Snap {
        /// The snapshot's epoch.
        epoch: u64,
        /// The inode.
        ino: u64,
    },
}

/// Decodes a kernel inode number.
pub fn node(fino: u64) -> Node {
    let (epoch, ino) = (fino >> EPOCH_SHIFT, fino & (MAX_LIVE_INO - 1));
    match (epoch, ino) {
        (0, SNAPDIR_INO) => Node::SnapDir,
        (0, ino) => Node::Live(ino),
        (epoch, ino) => Node::Snap { epoch, ino },
    }
}

/// The kernel inode number of `ino` seen through the snapshot of `epoch`.
pub fn snap_ino(epoch: u64, ino: u64) -> u64 {
    (epoch << EPOCH_SHIFT) | ino
}

/// Most hard links one inode may have (as ext4).
pub const LINK_MAX: u32 = 65000;
pub use crate::store::schema::NAME_MAX;

/// Errors of filesystem operations; each knows its errno. The store's operation
/// error: a refusal with an errno, or a failure of the store.
pub use crate::store::OpError as FsError;

/// Shorthand for a POSIX error.
pub fn err<T>(errno: i32) -> Result<T, FsError> {
    Err(FsError::Errno(errno))
}

/// Result of filesystem operations.
pub type FsResult<T> = Result<T, FsError>;

/// Who is asking: the credentials of the calling process.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// The calling thread, for the capability check of [`Caller::has_fsetid`].
    pub pid: u32,
}

impl Caller {
    /// The caller's `/proc/PID/status` line `key`, without the key.
    fn status(&self, key: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    }

    /// Whether the caller holds CAP_FSETID, which keeps set-id bits through writes and
    /// truncates. Read from `/proc` only when a set-id file is changed. Only
    /// capabilities in the daemon's own user namespace count (the kernel asks about the
    /// initial one), so root in a rootless container does not hold it. A caller that cannot
    /// be looked up is taken not to hold it, so the bits are dropped.
    pub fn has_fsetid(&self) -> bool {
        const CAP_FSETID: u32 = 4;
        self.has_cap(CAP_FSETID)
    }

    /// Whether the caller holds capability `cap` in the daemon's user namespace (see
    /// [`Caller::has_fsetid`]).
    pub fn has_cap(&self, cap: u32) -> bool {
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).ok();
        let same_ns = ns(&self.pid.to_string()).is_some_and(|n| Some(n) == ns("self"));
        same_ns
            && self
                .status("CapEff:")
                .and_then(|v| u64::from_str_radix(&v, 16).ok())
                .is_some_and(|caps| caps & (1 << cap) != 0)
    }

    /// Whether `gid` is the caller's group or one of its supplementary groups.
    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid
            || self
                .status("Groups:")
                .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
    }
}

/// The set-id bits that a write, truncate, fallocate or copy by `caller` removes
/// from a file of mode `perm` and group `gid` when the caller lacks CAP_FSETID, as
/// Linux 6.2 and later: [`killed_setid`]'s, and set-group-id without group execute
/// too when the caller is outside the file's group.
fn setid_dropped_by(perm: u32, gid: u32, caller: &Caller) -> u32 {
    let outside = perm & libc::S_ISGID != 0 && !caller.in_group(gid);
    killed_setid(perm) | if outside { libc::S_ISGID } else { 0 }
}

/// The set-id bits that a write, truncate or chown of a file removes from `perm`:
/// set-user-id always, set-group-id when group execute is also set (without it, the bit
/// marks mandatory locking and stays).
fn killed_setid(perm: u32) -> u32 {
    let sgid = libc::S_ISGID | libc::S_IXGRP;
    (perm & libc::S_ISUID)
        | if perm & sgid == sgid {
            libc::S_ISGID
        } else {
            0
        }
}

/// A new inode's record, the access ACL it inherits and (a directory) its default ACL.
type NewInode = (InodeRec, Option<Vec<u8>>, Option<Vec<u8>>);

/// An inode and its attributes as the kernel should see them.
#[derive(Clone, Debug)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// The record.
    pub rec: InodeRec,
    /// Preferred I/O size.
    pub blksize: u32,
    /// 512-byte blocks of data the file holds (holes take none).
    pub blocks: u64,
}

/// Which attributes a setattr changes.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    /// New permission bits (file type bits ignored).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New access time (`Some(None)` = now).
    pub atime: Option<Option<Ts>>,
    /// New modification time (`Some(None)` = now).
    pub mtime: Option<Option<Ts>>,
    /// New change time: the kernel's own, sent with its cached mtime when it writes
    /// back (writeback cache); otherwise ctime becomes now.
    pub ctime: Option<Ts>,
    /// The request names an open handle (the kernel's write-back of a writer's
    /// times does; utimensat never does).
    pub via_handle: bool,
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// Inode.
    pub ino: u64,
    /// Kind.
    pub kind: FileKind,
    /// Name.
    pub name: Vec<u8>,
}

/// Buffered, not yet stored changes of one inode.
#[derive(Debug, Default)]
struct Dirty {
    /// Attributes changed by writes (size, times), newer than the stored record.
    attr: Option<InodeRec>,
    /// Buffered blocks by index.
    blocks: BTreeMap<u64, data::DBlock>,
}

#[derive(Debug)]
enum Handle {
    /// A live file.
    File { ino: u64, append: bool },
    /// A file seen through a snapshot: holds the snapshot while open.
    SnapFile { epoch: u64 },
    /// A file of a replica's tree (its newest snapshot).
    Frozen,
    Dir {
        /// The directory.
        fino: u64,
        /// Its live inode, counted open ([`Inner::open_count`]).
        live: Option<u64>,
        /// Its listing, as of the last read from position 0 (or the first read).
        entries: Vec<DirEntry>,
        /// Whether a read listed it yet.
        listed: bool,
    },
}

/// The state behind the lock.
pub struct Inner {
    store: Store,
    dirty: HashMap<u64, Dirty>,
    dirty_bytes: usize,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    open_count: HashMap<u64, u32>,
    /// Commits since the last durable one.
    undurable: bool,
    /// Open files per snapshot epoch (a deleted snapshot stays until they close).
    snap_open: HashMap<u64, u32>,
    /// Leave `.snapshots` out of the root's listing (it stays reachable by name).
    pub hide_snapdir: bool,
    /// Directories removed and freed, by inode, with their last record (nlink 0):
    /// see [`Inner::gone_dir`].
    gone_dirs: HashMap<u64, InodeRec>,
    /// Open files whose `st_blocks` was answered from their size (see
    /// [`Inner::attr`]): the kernel's cached count is dropped when they close.
    blocks_guessed: std::collections::HashSet<u64>,
    /// When an access moves a live inode's access time.
    pub atime: Atime,
    /// Opening a directory leaves its access time alone (`nodiratime`).
    pub nodiratime: bool,
    /// The retention policy `snapshot prune` applies by default.
    pub keep: Option<crate::policy::Keep>,
    /// The kernel caches writes and keeps file times itself (FUSE writeback cache): it
    /// sends them with setattr, so written data does not set them here.
    pub kernel_times: bool,
    /// A deleted snapshot's versions are still to be dropped (a durable tick retries).
    deletions_pending: bool,
    /// On a mounted replica, the epoch of the snapshot its tree shows (0 before the
    /// first has come); `None` on a writable volume. The live tree of a replica is
    /// where the snapshots being received are staged, and is never shown.
    replica_view: Option<u64>,
}

/// When reading moves a file's access time, as Linux's mount options say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Atime {
    /// `relatime` (the default): when the access time is not after the
    /// modification or change time, or is a day old.
    #[default]
    Relative,
    /// `strictatime`: at every access.
    Strict,
    /// `noatime` (and read-only mounts): never.
    Never,
}

/// Tells the kernel to forget cached state (set by the daemon; absent in tests of the
/// core alone).
pub type Invalidator = Box<dyn Fn(&Inval) + Send + Sync>;

/// Makes the kernel write back the pages it holds dirty for the mount and deliver
/// them, given the paths of the files open now (set by the daemon when the kernel
/// caches writes).
pub type KernelFlush = Box<dyn Fn(&[Vec<u8>]) + Send + Sync>;

/// The filesystem core.
pub struct Fs {
    inner: Mutex<Inner>,
    /// The store's block size, read without the lock (a store that holds nothing yet
    /// may take another, see [`Fs::retake_block_size`]).
    block_size: std::sync::atomic::AtomicU64,
    invalidator: Mutex<Option<Invalidator>>,
    kernel_flush: Mutex<Option<KernelFlush>>,
}

/// Removed directories whose attributes are remembered (see [`Inner::gone_dir`]).
const GONE_DIRS_MAX: usize = 4096;

/// Dirty data above which a write flushes its inode.
const DIRTY_INODE_LIMIT: usize = 32 << 20;
/// Dirty data above which a write flushes everything.
const DIRTY_TOTAL_LIMIT: usize = 128 << 20;

fn check_name(name: &[u8]) -> FsResult<()> {
    crate::store::schema::check_entry_name(name).or_else(|(errno, _)| err(errno))
}

impl Fs {
    /// Opens (or with `create`, creates) the store at `path` and makes sure it has a root.
    pub fn open(path: &Path, create: Option<&StoreConfig>) -> Result<Fs, FsError> {
        Self::open_on(crate::store::disk::real(), path, create)
    }

    /// [`Fs::open`] on `disk` (a simulated one in power-loss tests).
    pub fn open_on(
        disk: std::sync::Arc<dyn crate::store::disk::Disk>,
        path: &Path,
        create: Option<&StoreConfig>,
    ) -> Result<Fs, FsError> {
        let mut store = Store::open_on(disk, path, create)?;
        // Best effort: a store that cannot finish what a crash left still mounts.
        if let Err(e) = store.recover() {
            tracing::error!(error = %e, "could not finish what an earlier run left");
        }
        let mut inner = Inner {
            store,
            dirty: HashMap::new(),
            dirty_bytes: 0,
            handles: HashMap::new(),
            next_fh: 1,
            open_count: HashMap::new(),
            undurable: false,
            snap_open: HashMap::new(),
            hide_snapdir: false,
            gone_dirs: HashMap::new(),
            blocks_guessed: Default::default(),
            atime: Atime::Relative,
            nodiratime: false,
            keep: None,
            kernel_times: false,
            deletions_pending: false,
            replica_view: None,
        };
        inner.ensure_root()?;
        inner.reap_orphans()?;
        if let Err(e) = inner.reap_deleted_snapshots() {
            // Retried at the durable ticks; the store mounts all the same.
            tracing::error!(error = %e, "could not finish deleting a snapshot");
        }
        Ok(Fs {
            block_size: (inner.store.block_size as u64).into(),
            inner: Mutex::new(inner),
            invalidator: Mutex::new(None),
            kernel_flush: Mutex::new(None),
        })
    }

    /// Installs the kernel cache invalidator.
    pub fn set_invalidator(&self, f: Invalidator) {
        *self.invalidator.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Installs the kernel write-back trigger.
    pub fn set_kernel_flush(&self, f: KernelFlush) {
        *self.kernel_flush.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Writes buffered data to the segments and `fdatasync`s them without holding the
    /// core lock, so that a durable point taken next (`fsync`, the durable tick) holds
    /// the lock only for what arrived meanwhile. `ino`: flush that inode only.
    pub fn presync(&self, ino: Option<u64>) {
        let files = {
            let mut core = self.lock();
            let flushed = match ino {
                Some(ino) => core.flush_inode(ino),
                None => core.flush_all(),
            };
            if flushed.is_err() {
                return; // the durable point reports it
            }
            core.store.unsynced_segments()
        };
        for f in files {
            if let Err(e) = f.sync_data() {
                // The kernel reports a failed write-back once: the segments recorded it
                // before any other sync could run, and the store stops here too.
                self.lock().store.fail_durability(e.to_string());
                return;
            }
        }
    }

    /// Brings the writes the kernel still caches to the core, so a snapshot or a
    /// rollback covers every write made before it. Call without holding the core lock
    /// and not from a request thread: the kernel sends the data as requests.
    pub fn flush_kernel(&self) {
        let hook = self.kernel_flush.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = hook.as_ref() {
            let open = self.lock().open_file_paths().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot name the open files");
                Vec::new()
            });
            f(&open);
        }
    }

    /// Tells the kernel to forget `invals`. Call without holding the core lock: the
    /// kernel may need to send requests to answer.
    pub fn invalidate(&self, invals: &[Inval]) {
        if let Some(f) = self
            .invalidator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            for i in invals {
                f(i);
            }
        }
    }

    /// Locks the core. A poisoned lock (a panicking request) is taken anyway: an
    /// operation that panics aborts the open transaction group, so no part of it is
    /// ever committed (see `Store::write`).
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store's block size (fixed once it holds anything).
    pub fn block_size(&self) -> u64 {
        self.block_size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Gives the store block size `bs` if it holds nothing yet (see
    /// [`Store::holds_nothing`]): a store made by a mount that failed, or with the
    /// default size by `-o replica`. `false`, and nothing changed, if it holds anything.
    pub fn retake_block_size(&self, bs: u32) -> Result<bool, FsError> {
        let mut core = self.lock();
        if !core.dirty.is_empty() || !core.store.holds_nothing()? {
            return Ok(false);
        }
        core.store.take_block_size(bs)?;
        self.note_block_size(&core);
        Ok(true)
    }

    /// Takes the store's block size again (after a sync made the store a replica,
    /// which may have changed it), under the lock `core` holds.
    pub fn note_block_size(&self, core: &Inner) {
        self.block_size.store(
            core.store.block_size as u64,
            std::sync::atomic::Ordering::Release,
        );
    }
}

impl Inner {
    /// The store underneath.
    pub fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    fn ensure_root(&mut self) -> FsResult<()> {
        let root = self.store.read_txn()?;
        let t = root.versions();
        if crate::store::visible(t, RecKey::inode(ROOT_INO), self.store.live_epoch)?.is_some() {
            return Ok(());
        }
        drop(root);
        let rec = fresh_root(Ts::now());
        self.store.write(true, |w| put_inode(w, ROOT_INO, &rec))
    }

    /// The live inode behind `fino`, to be changed: EROFS for anything under
    /// `.snapshots`, and for everything on a replica (its tree is its newest snapshot).
    fn live(&self, fino: u64) -> FsResult<u64> {
        match node(fino) {
            Node::Live(ino) if self.replica_view.is_none() => Ok(ino),
            _ => err(libc::EROFS),
        }
    }

    /// The epoch the tree at the mount's root shows: the live epoch, or on a replica
    /// its newest snapshot (0 before the first has come: an empty root).
    fn tree_epoch(&self) -> u64 {
        self.replica_view.unwrap_or(self.store.live_epoch)
    }

    /// Frees inodes left unlinked-but-open by a daemon that stopped.
    fn reap_orphans(&mut self) -> FsResult<()> {
        let txn = self.store.read_txn()?;
        let t = txn.orphans();
        let mut inos = Vec::new();
        for row in redb::ReadableTable::iter(t).map_err(StoreError::from)? {
            inos.push(row.map_err(StoreError::from)?.0.value());
        }
        drop(txn);
        for ino in inos {
            // A rollback may have given an orphan its links back; then it stays.
            let unlinked = matches!(self.inode(ino), Ok(r) if r.nlink == 0);
            self.store.write(false, |w| {
                w.set_orphan(ino, false)?;
                if unlinked { free_inode(w, ino) } else { Ok(()) }
            })?;
        }
        Ok(())
    }

    fn blksize(&self) -> u32 {
        self.store.block_size
    }

    /// The current record of `ino`, including buffered writes.
    pub fn inode(&mut self, ino: u64) -> FsResult<InodeRec> {
        if let Some(a) = self.dirty.get(&ino).and_then(|d| d.attr.clone()) {
            return Ok(a);
        }
        match self.store.live_inode(ino)? {
            Some(b) => Ok(InodeRec::decode(&b)?),
            None => err(libc::ENOENT),
        }
    }

    /// The epoch and live inode behind kernel inode `fino` (`.snapshots` has none).
    fn at(&self, fino: u64) -> FsResult<(u64, u64)> {
        match node(fino) {
            Node::Live(ino) => Ok((self.tree_epoch(), ino)),
            Node::Snap { epoch, ino } => Ok((epoch, ino)),
            Node::SnapDir => err(libc::EISDIR),
        }
    }

    /// The record of `ino` as the tree at `epoch` has it.
    fn inode_at(&mut self, epoch: u64, ino: u64) -> FsResult<InodeRec> {
        if epoch == self.store.live_epoch {
            return self.inode(ino);
        }
        if epoch == 0 && ino == ROOT_INO {
            // A replica before its first snapshot: an empty root.
            return Ok(fresh_root(Ts { sec: 0, nsec: 0 }));
        }
        let txn = self.store.read_txn()?;
        let t = txn.versions();
        match crate::store::visible(t, RecKey::inode(ino), epoch)? {
            Some(b) => Ok(InodeRec::decode(&b)?),
            None => err(libc::ENOENT),
        }
    }

    /// The attributes of kernel inode `fino` whose record is `rec`.
    fn attr(&mut self, fino: u64, rec: InodeRec) -> FsResult<Attr> {
        // Every page of the size: a symlink's target and a directory's entries live
        // in the metadata (a block per started 4 KiB, as ext4 shows), and a file's
        // count when its own cannot be had.
        let whole = rec.size.div_ceil(PAGE as u64);
        let pages = match (rec.kind, node(fino)) {
            (FileKind::File, Node::Live(ino)) => {
                let counted = self
                    .store
                    .allocated_pages(ino, self.tree_epoch())
                    .map_err(FsError::from)
                    .and_then(|p| Ok(p + self.dirty_pages(ino)?));
                match counted {
                    // Under the writeback cache an open file may have data the
                    // kernel holds and has not written back (and a size only the
                    // kernel knows): "no block" would tell `tar --sparse` and others
                    // that it is all hole.
                    Ok(0) if self.kernel_times && self.open_count.contains_key(&ino) => {
                        // The kernel is told to ask again once the file is closed.
                        self.blocks_guessed.insert(ino);
                        whole.max(1)
                    }
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(ino, error = %e, "st_blocks: cannot count the file's blocks");
                        whole
                    }
                }
            }
            (FileKind::File, Node::Snap { epoch, ino }) => {
                self.store.allocated_pages(ino, epoch).unwrap_or_else(|e| {
                    tracing::warn!(ino, epoch, error = %e, "st_blocks: cannot count the file's blocks");
                    whole
                })
            }
            _ => whole,
        };
        Ok(Attr {
            ino: fino,
            rec,
            blksize: self.blksize(),
            blocks: pages * (PAGE as u64 / 512),
        })
    }

    /// Attributes of kernel inode `fino`.
    pub fn getattr(&mut self, fino: u64) -> FsResult<Attr> {
        match node(fino) {
            Node::Live(ino) => {
                let rec = match self.inode_at(self.tree_epoch(), ino) {
                    Err(FsError::Errno(libc::ENOENT)) if self.gone_dirs.contains_key(&ino) => {
                        self.gone_dirs[&ino].clone()
                    }
                    r => r?,
                };
                self.attr(ino, rec)
            }
            Node::SnapDir => self.snapdir_attr(),
            Node::Snap { epoch, ino } => {
                let rec = self.inode_at(epoch, ino)?;
                self.attr(fino, rec)
            }
        }
    }

    /// Looks `name` up in directory `parent` (a kernel inode number).
    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return err(libc::ENAMETOOLONG);
        }
        match name {
            // The kernel asks for "." of a node it has a file handle for (export:
            // open_by_handle_at, NFS) and for ".." of a directory it reconnects. A
            // handle is data from outside: one naming an epoch that is no snapshot
            // shown (the live tree's, a deleted snapshot's, a replica's staging) is
            // stale.
            b"." => {
                if let Node::Snap { epoch, .. } = node(parent)
                    && !self.snapshots()?.iter().any(|s| s.epoch == epoch)
                {
                    return err(libc::ENOENT);
                }
                return self.getattr(parent);
            }
            b".." => return self.lookup_parent(parent),
            _ => {}
        }
        let (epoch, dir) = match node(parent) {
            Node::Live(ROOT_INO) if name == SNAPDIR_NAME => return self.snapdir_attr(),
            Node::Live(ino) => (self.tree_epoch(), ino),
            Node::SnapDir => {
                let s = self
                    .snapshot_named(name)?
                    .ok_or(FsError::Errno(libc::ENOENT))?;
                return self.getattr(snap_ino(s.epoch, ROOT_INO));
            }
            Node::Snap { epoch, ino } => (epoch, ino),
        };
        if self.inode_at(epoch, dir)?.kind != FileKind::Dir {
            return err(libc::ENOTDIR);
        }
        let ent = self
            .entry_at(epoch, dir, name)?
            .ok_or(FsError::Errno(libc::ENOENT))?;
        if epoch == self.tree_epoch() {
            self.getattr(ent.ino)
        } else {
            self.getattr(snap_ino(epoch, ent.ino))
        }
    }

    /// The directory that holds directory `fino` (the root holds itself; a
    /// snapshot's root is held by `.snapshots`, which the root holds).
    fn lookup_parent(&mut self, fino: u64) -> FsResult<Attr> {
        match node(fino) {
            Node::SnapDir => self.getattr(ROOT_INO),
            Node::Snap { ino: ROOT_INO, .. } => self.snapdir_attr(),
            Node::Snap { epoch, ino } => {
                let rec = self.inode_at(epoch, ino)?;
                if rec.kind != FileKind::Dir {
                    return err(libc::ENOTDIR);
                }
                self.getattr(snap_ino(epoch, rec.parent))
            }
            Node::Live(ino) => {
                let rec = self.inode_at(self.tree_epoch(), ino)?;
                if rec.kind != FileKind::Dir {
                    return err(libc::ENOTDIR);
                }
                self.getattr(if ino == ROOT_INO {
                    ROOT_INO
                } else {
                    rec.parent
                })
            }
        }
    }

    /// Records an access to kernel inode `fino` (a file opened for reading, a directory
    /// opened), moving its access time as [`Inner::atime`] says. Returns whether it
    /// moved: the kernel, which caches it, must then be told.
    ///
    /// The kernel serves reads from its page cache without asking, so an access is
    /// counted at open, which it always sends.
    pub fn accessed(&mut self, fino: u64) -> FsResult<bool> {
        let Node::Live(ino) = node(fino) else {
            return Ok(false);
        };
        if self.atime == Atime::Never || self.replica_view.is_some() {
            return Ok(false);
        }
        let rec = self.inode(ino)?;
        if (rec.kind == FileKind::Dir && self.nodiratime) || rec.flags & FS_NOATIME_FL != 0 {
            return Ok(false);
        }
        let now = Ts::now();
        let due = match self.atime {
            Atime::Strict => rec.atime != now,
            Atime::Relative => {
                rec.atime <= rec.mtime
                    || rec.atime <= rec.ctime
                    || now.sec.saturating_sub(rec.atime.sec) >= 24 * 3600
            }
            Atime::Never => false,
        };
        // Best effort: an access time that cannot be stored (a full disk, a store in
        // its error state) must not fail the open.
        if due
            && let Err(e) = self.modify_inode(ino, |r| {
                r.atime = now;
                Ok(())
            })
        {
            tracing::debug!(ino, error = %e, "access time not stored");
            return Ok(false);
        }
        Ok(due)
    }

    /// EPERM when live `ino` carries any of the inode flags `mask` (chattr).
    fn refuse_flagged(&mut self, ino: u64, mask: u32) -> FsResult<()> {
        if self.inode(ino)?.flags & mask != 0 {
            return err(libc::EPERM);
        }
        Ok(())
    }

    /// The inode flags of kernel inode `fino` (FS_IOC_GETFLAGS).
    pub fn get_flags(&mut self, fino: u64) -> FsResult<u32> {
        Ok(self.getattr(fino)?.rec.flags)
    }

    /// Sets the inode flags of live `fino` (FS_IOC_SETFLAGS): the owner or a holder
    /// of CAP_FOWNER may, and only a holder of CAP_LINUX_IMMUTABLE may change
    /// immutable or append-only (the kernel checks so too). Flags snapfs does not
    /// keep are refused with EOPNOTSUPP.
    pub fn set_flags(&mut self, fino: u64, flags: u32, caller: &Caller) -> FsResult<Attr> {
        const CAP_FOWNER: u32 = 3;
        const CAP_LINUX_IMMUTABLE: u32 = 9;
        let ino = self.live(fino)?;
        if flags & !INODE_FLAGS != 0 {
            return err(libc::EOPNOTSUPP);
        }
        let rec = self.inode(ino)?;
        if rec.kind == FileKind::Symlink {
            return err(libc::ENOTTY);
        }
        if caller.uid != rec.uid && !caller.has_cap(CAP_FOWNER) {
            return err(libc::EPERM);
        }
        let guarded = FS_IMMUTABLE_FL | FS_APPEND_FL;
        if (rec.flags ^ flags) & guarded != 0 && !caller.has_cap(CAP_LINUX_IMMUTABLE) {
            return err(libc::EPERM);
        }
        self.modify_inode(ino, |r| {
            r.flags = flags;
            r.ctime = Ts::now();
            Ok(())
        })
    }

    /// Applies `f` to the stored (and buffered) record of `ino` inside a write.
    fn modify_inode(
        &mut self,
        ino: u64,
        f: impl FnOnce(&mut InodeRec) -> FsResult<()>,
    ) -> FsResult<Attr> {
        let mut rec = self.inode(ino)?;
        f(&mut rec)?;
        let rec2 = rec.clone();
        self.store.write(false, |w| put_inode(w, ino, &rec2))?;
        if let Some(d) = self.dirty.get_mut(&ino) {
            d.attr = None;
        }
        self.undurable = true;
        self.attr(ino, rec)
    }

    /// Changes attributes.
    ///
    /// The kernel leaves set-id bits to us (FUSE_HANDLE_KILLPRIV_V2), so a change of
    /// owner or group drops them, as does a truncate by a caller without CAP_FSETID,
    /// unless the same call sets the mode. Set-group-id without group execute survives
    /// a chown or truncate only by a caller in the file's group or holding CAP_FSETID,
    /// as in Linux 6.2 and later.
    pub fn setattr(&mut self, ino: u64, caller: Caller, set: SetAttr) -> FsResult<Attr> {
        let ino = self.live(ino)?;
        // (An inode gone already is left to the checks below: the kernel still writes
        // back the times of a deleted file.)
        let flags = self.inode(ino).map_or(0, |r| r.flags);
        if flags & (FS_IMMUTABLE_FL | FS_APPEND_FL) != 0 {
            // An immutable or append-only file keeps its mode, owner, size and set
            // times; an immutable one takes no "now" either. The kernel's own write-back
            // of a writer's times (a set mtime alone, through its handle) still lands.
            let owner = set.mode.is_some() || set.uid.is_some() || set.gid.is_some();
            let written_back = set.via_handle && set.atime.is_none();
            // Under the writeback cache the kernel sends "now" for mtime as its own
            // clock's time (atime still as "now"): a touch, not a set time.
            let touch = matches!(set.atime, Some(None))
                && matches!(set.mtime, Some(Some(t)) if t.sec.abs_diff(Ts::now().sec) <= 1);
            let set_times = matches!(set.atime, Some(Some(_)))
                || (matches!(set.mtime, Some(Some(_))) && !written_back && !touch);
            let now_times = matches!(set.atime, Some(None)) || matches!(set.mtime, Some(None));
            let immutable = flags & FS_IMMUTABLE_FL != 0;
            if owner || set.size.is_some() || set_times || (immutable && now_times) {
                return err(libc::EPERM);
            }
        }
        let mut kill = 0;
        if set.mode.is_none() && (set.size.is_some() || set.uid.is_some() || set.gid.is_some()) {
            let rec = self.inode(ino)?;
            if rec.kind != FileKind::Dir {
                let chown = set.uid.is_some() || set.gid.is_some();
                kill = setid_dropped_by(rec.perm, rec.gid, &caller);
                if kill != 0 && caller.has_fsetid() {
                    kill = if chown {
                        // A chown by a holder of CAP_FSETID still drops set-user-id and
                        // a set-group-id with group execute.
                        killed_setid(rec.perm)
                    } else {
                        0
                    };
                }
            }
        }
        if let Some(size) = set.size {
            let rec = self.inode(ino)?;
            match rec.kind {
                FileKind::Dir => return err(libc::EISDIR),
                FileKind::File => {}
                _ => return err(libc::EINVAL),
            }
            self.truncate(ino, size)?;
        }
        if let Some(mode) = set.mode {
            self.chmod_acl(ino, mode & 0o7777)?;
        }
        let now = Ts::now();
        let times_only =
            set.mode.is_none() && set.uid.is_none() && set.gid.is_none() && set.size.is_none();
        let res = self.modify_inode(ino, |r| {
            if let Some(mode) = set.mode {
                r.perm = mode & 0o7777;
            }
            r.perm &= !kill;
            if let Some(uid) = set.uid {
                r.uid = uid;
            }
            if let Some(gid) = set.gid {
                r.gid = gid;
            }
            if set.size.is_some() && set.mtime.is_none() {
                r.mtime = now;
            }
            if let Some(t) = set.atime {
                r.atime = t.unwrap_or(now);
            }
            if let Some(t) = set.mtime {
                r.mtime = t.unwrap_or(now);
            }
            r.ctime = set.ctime.unwrap_or(now);
            Ok(())
        });
        match res {
            // The kernel writes back the times it caches for a file whose last link and
            // last handle are gone, and its records with them (`sync -f` after `rm`):
            // nothing is left to update, and refusing would fail the caller's sync.
            Err(FsError::Errno(libc::ENOENT)) if times_only => {
                let t = |x: Option<Option<Ts>>| x.flatten().unwrap_or(now);
                let rec = InodeRec {
                    kind: FileKind::File,
                    perm: 0,
                    uid: caller.uid,
                    gid: caller.gid,
                    nlink: 0,
                    size: 0,
                    atime: t(set.atime),
                    mtime: t(set.mtime),
                    ctime: set.ctime.unwrap_or(now),
                    crtime: now,
                    rdev: 0,
                    parent: 0,
                    target: Vec::new(),
                    flags: 0,
                };
                self.attr(ino, rec)
            }
            res => res,
        }
    }

    /// Drops the set-id bits of file `ino` after a write, fallocate or copy_file_range
    /// by `caller`, unless it holds CAP_FSETID (`flagged`: the kernel flagged the
    /// write, having found that it does not; see [`Inner::setattr`]). As Linux 6.2
    /// and later: set-user-id always; set-group-id when group execute is set too, or
    /// when the caller is outside the file's group. Returns whether the mode changed,
    /// for the caller to tell the kernel, which caches it.
    pub fn drop_setid(&mut self, ino: u64, caller: Caller, flagged: bool) -> FsResult<bool> {
        let ino = self.live(ino)?;
        let rec = self.inode(ino)?;
        let kill = setid_dropped_by(rec.perm, rec.gid, &caller);
        if kill == 0 || (!flagged && caller.has_fsetid()) {
            return Ok(false);
        }
        self.modify_inode(ino, |r| {
            r.perm &= !kill;
            r.ctime = Ts::now();
            Ok(())
        })?;
        Ok(true)
    }

    /// The target of symlink `fino`.
    pub fn readlink(&mut self, fino: u64) -> FsResult<Vec<u8>> {
        let rec = self.getattr(fino)?.rec;
        if rec.kind != FileKind::Symlink {
            return err(libc::EINVAL);
        }
        Ok(rec.target)
    }

    /// Creates a node of any kind: file, directory, symlink, fifo, socket or device.
    /// `mode` carries the type bits; `umask` applies unless the parent has a default ACL.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Attr> {
        check_name(name)?;
        let kind = FileKind::from_mode(mode).ok_or(FsError::Errno(libc::EINVAL))?;
        if node(parent) == Node::SnapDir {
            if kind != FileKind::Dir {
                return err(libc::EROFS);
            }
            let epoch = self.snapshot_create(name, Ts::now())?;
            return self.getattr(snap_ino(epoch, ROOT_INO));
        }
        let parent = self.live(parent)?;
        if parent == ROOT_INO && name == SNAPDIR_NAME {
            return err(libc::EEXIST);
        }
        if kind == FileKind::Symlink && (target.is_empty() || target.len() > 4095) {
            return err(if target.is_empty() {
                libc::ENOENT
            } else {
                libc::ENAMETOOLONG
            });
        }
        let dir = self.inode(parent)?;
        if dir.kind != FileKind::Dir {
            return err(libc::ENOTDIR);
        }
        if dir.flags & FS_IMMUTABLE_FL != 0 {
            return err(libc::EPERM);
        }
        if kind == FileKind::Dir && dir.nlink >= LINK_MAX {
            return err(libc::EMLINK);
        }
        let (rec, access_acl, default_acl) =
            self.new_inode(parent, &dir, kind, mode, umask, rdev, target, &caller)?;
        let now = rec.ctime;
        let mut dir = dir;
        let rec2 = rec.clone();
        let dirty = &mut self.dirty;
        let ino = self.store.write(false, |w| {
            let prev = w.version(RecKey::dirent(parent, name))?;
            if matches!(prev, Some((_, Some(_)))) {
                return err(libc::EEXIST);
            }
            let ino = w.alloc_ino()?;
            // A new inode has no versions to look up; the entry is known absent.
            let mut b = Vec::with_capacity(80);
            rec2.encode(&mut b);
            w.put_fresh(RecKey::inode(ino), &b)?;
            w.put_fresh(RecKey::parent(ino, parent, name), &[])?;
            b.clear();
            DirentRec { ino, kind }.encode(&mut b);
            w.put_after(RecKey::dirent(parent, name), Some(&b), prev)?;
            if let Some(a) = &access_acl {
                w.put_fresh(RecKey::xattr(ino, acl::ACCESS.as_bytes()), a)?;
            }
            if kind == FileKind::Dir {
                if let Some(d) = &default_acl {
                    w.put_fresh(RecKey::xattr(ino, acl::DEFAULT.as_bytes()), d)?;
                }
                dir.nlink += 1;
            }
            dir.mtime = now;
            dir.ctime = now;
            put_inode(w, parent, &dir)?;
            Ok(ino)
        })?;
        if let Some(d) = dirty.get_mut(&parent) {
            d.attr = None;
        }
        self.undurable = true;
        self.attr(ino, rec)
    }

    /// The record of a new inode of `kind` in directory `parent` (record `dir`), with
    /// the access ACL it inherits and, for a directory, the default ACL.
    #[allow(clippy::too_many_arguments)]
    fn new_inode(
        &mut self,
        parent: u64,
        dir: &InodeRec,
        kind: FileKind,
        mode: u32,
        umask: u32,
        rdev: u32,
        target: &[u8],
        caller: &Caller,
    ) -> FsResult<NewInode> {
        let default_acl = if kind == FileKind::Symlink {
            None
        } else {
            self.default_acl(parent)?
        };
        let mut perm = if kind == FileKind::Symlink {
            0o777
        } else {
            mode & 0o7777
        };
        let mut gid = caller.gid;
        if dir.perm & libc::S_ISGID != 0 {
            gid = dir.gid;
            if kind == FileKind::Dir {
                perm |= libc::S_ISGID;
            }
        }
        let access_acl = match (&default_acl, kind) {
            (_, FileKind::Symlink) => None,
            (Some(def), _) => acl::create_masq(def, &mut perm)?,
            (None, _) => {
                perm &= !umask;
                None
            }
        };
        let now = Ts::now();
        let rec = InodeRec {
            kind,
            perm,
            uid: caller.uid,
            gid,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            size: if kind == FileKind::Symlink {
                target.len() as u64
            } else {
                0
            },
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
                rdev
            } else {
                0
            },
            parent: if kind == FileKind::Dir { parent } else { 0 },
            target: if kind == FileKind::Symlink {
                target.to_vec()
            } else {
                Vec::new()
            },
            flags: 0,
        };
        Ok((rec, access_acl, default_acl))
    }

    /// Makes an unnamed regular file in directory `parent` (O_TMPFILE): an orphan
    /// (no link, open) until a link is made to it, freed when its last handle closes
    /// without one.
    pub fn tmpfile(
        &mut self,
        parent: u64,
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let parent = self.live(parent)?;
        let dir = self.inode(parent)?;
        if dir.kind != FileKind::Dir {
            return err(libc::ENOTDIR);
        }
        if dir.flags & FS_IMMUTABLE_FL != 0 {
            return err(libc::EPERM);
        }
        let mode = (mode & 0o7777) | libc::S_IFREG;
        let (mut rec, access_acl, _) =
            self.new_inode(parent, &dir, FileKind::File, mode, umask, 0, &[], &caller)?;
        rec.nlink = 0;
        let rec2 = rec.clone();
        let ino = self.store.write(false, |w| {
            let ino = w.alloc_ino()?;
            let mut b = Vec::with_capacity(80);
            rec2.encode(&mut b);
            w.put_fresh(RecKey::inode(ino), &b)?;
            if let Some(a) = &access_acl {
                w.put_fresh(RecKey::xattr(ino, acl::ACCESS.as_bytes()), a)?;
            }
            w.set_orphan(ino, true)?;
            Ok(ino)
        })?;
        self.undurable = true;
        self.attr(ino, rec)
    }

    /// Makes a hard link to `ino` as `parent/name`.
    pub fn link(&mut self, ino: u64, parent: u64, name: &[u8]) -> FsResult<Attr> {
        check_name(name)?;
        let (ino, parent) = (self.live(ino)?, self.live(parent)?);
        if parent == ROOT_INO && name == SNAPDIR_NAME {
            return err(libc::EEXIST);
        }
        let mut rec = self.inode(ino)?;
        if rec.kind == FileKind::Dir || rec.flags & (FS_IMMUTABLE_FL | FS_APPEND_FL) != 0 {
            return err(libc::EPERM);
        }
        if rec.nlink >= LINK_MAX {
            return err(libc::EMLINK);
        }
        let mut dir = self.inode(parent)?;
        if dir.kind != FileKind::Dir {
            return err(libc::ENOTDIR);
        }
        if dir.flags & FS_IMMUTABLE_FL != 0 {
            return err(libc::EPERM);
        }
        let now = Ts::now();
        // An inode with no link is an open O_TMPFILE file (the kernel lets no other
        // be linked): its first link ends its time as an orphan.
        let orphan = rec.nlink == 0;
        rec.nlink += 1;
        rec.ctime = now;
        dir.mtime = now;
        dir.ctime = now;
        let rec2 = rec.clone();
        self.store.write(false, |w| {
            if w.get(RecKey::dirent(parent, name))?.is_some() {
                return err(libc::EEXIST);
            }
            if orphan {
                w.set_orphan(ino, false)?;
            }
            put_dirent(
                w,
                parent,
                name,
                Some(DirentRec {
                    ino,
                    kind: rec2.kind,
                }),
            )?;
            put_inode(w, ino, &rec2)?;
            put_inode(w, parent, &dir)
        })?;
        self.settle(&[ino, parent]);
        self.attr(ino, rec)
    }

    /// Drops buffered attributes of inodes whose record a write just stored.
    fn settle(&mut self, inos: &[u64]) {
        for ino in inos {
            if let Some(d) = self.dirty.get_mut(ino) {
                d.attr = None;
            }
        }
        self.undurable = true;
    }

    fn entry(&mut self, parent: u64, name: &[u8]) -> FsResult<Option<DirentRec>> {
        self.entry_at(self.store.live_epoch, parent, name)
    }

    fn entry_at(&mut self, epoch: u64, parent: u64, name: &[u8]) -> FsResult<Option<DirentRec>> {
        let txn = self.store.read_txn()?;
        let t = txn.versions();
        Ok(
            match crate::store::visible(t, RecKey::dirent(parent, name), epoch)? {
                Some(b) => Some(DirentRec::decode(&b)?),
                None => None,
            },
        )
    }

    fn is_empty_dir(&mut self, ino: u64) -> FsResult<bool> {
        let txn = self.store.read_txn()?;
        let t = txn.versions();
        let mut empty = true;
        scan_visible(
            t,
            ino,
            KIND_DIRENT,
            0..=0,
            self.store.live_epoch,
            |_, _, _| {
                empty = false;
                Ok(false)
            },
        )?;
        Ok(empty)
    }

    /// Removes `parent/name`; `dir` selects rmdir semantics.
    pub fn remove(&mut self, parent: u64, name: &[u8], dir: bool) -> FsResult<()> {
        if name.len() > NAME_MAX {
            return err(libc::ENAMETOOLONG);
        }
        if node(parent) == Node::SnapDir && dir {
            return self.snapshot_delete(name);
        }
        let parent = self.live(parent)?;
        if parent == ROOT_INO && name == SNAPDIR_NAME {
            return err(libc::EROFS);
        }
        if name == b"." {
            return err(libc::EINVAL);
        }
        if name == b".." {
            return err(libc::ENOTEMPTY);
        }
        let mut pdir = self.inode(parent)?;
        if pdir.kind != FileKind::Dir {
            return err(libc::ENOTDIR);
        }
        let ent = self
            .entry(parent, name)?
            .ok_or(FsError::Errno(libc::ENOENT))?;
        if pdir.flags & (FS_IMMUTABLE_FL | FS_APPEND_FL) != 0 {
            return err(libc::EPERM);
        }
        self.refuse_flagged(ent.ino, FS_IMMUTABLE_FL | FS_APPEND_FL)?;
        let mut rec = self.inode(ent.ino)?;
        if dir {
            if rec.kind != FileKind::Dir {
                return err(libc::ENOTDIR);
            }
            if !self.is_empty_dir(ent.ino)? {
                return err(libc::ENOTEMPTY);
            }
        } else if rec.kind == FileKind::Dir {
            return err(libc::EISDIR);
        }
        let now = Ts::now();
        pdir.mtime = now;
        pdir.ctime = now;
        rec.ctime = now;
        if rec.kind == FileKind::Dir {
            pdir.nlink -= 1;
            rec.nlink = 0;
        } else {
            rec.nlink = rec.nlink.saturating_sub(1);
        }
        let open = self.open_count.get(&ent.ino).copied().unwrap_or(0) > 0;
        if rec.nlink == 0 && !open {
            self.dirty_drop(ent.ino);
        }
        self.store.write(false, |w| {
            put_dirent(w, parent, name, None)?;
            put_inode(w, parent, &pdir)?;
            unlink_inode(w, ent.ino, &rec, open)
        })?;
        self.settle(&[parent, ent.ino]);
        if rec.kind == FileKind::Dir && !open {
            self.gone_dir(ent.ino, rec);
        }
        Ok(())
    }

    /// Remembers the last attributes of directory `ino`, removed and freed: a process
    /// whose working directory it was still reaches it, and the kernel asks for its
    /// attributes (to check search permission for `chdir("..")`), which a local
    /// filesystem still has in memory then.
    fn gone_dir(&mut self, ino: u64, rec: InodeRec) {
        if self.gone_dirs.len() >= GONE_DIRS_MAX {
            self.gone_dirs.clear();
        }
        self.gone_dirs.insert(ino, rec);
    }

    /// Renames `parent/name` to `newparent/newname` with `RENAME_*` `flags`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
        caller: Caller,
    ) -> FsResult<()> {
        check_name(newname)?;
        if name.len() > NAME_MAX {
            return err(libc::ENAMETOOLONG);
        }
        let (parent, newparent) = (self.live(parent)?, self.live(newparent)?);
        if (parent == ROOT_INO && name == SNAPDIR_NAME)
            || (newparent == ROOT_INO && newname == SNAPDIR_NAME)
        {
            return err(libc::EROFS);
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let whiteout = flags & libc::RENAME_WHITEOUT != 0;
        let known = libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE | libc::RENAME_WHITEOUT;
        if flags & !known != 0 || (exchange && (noreplace || whiteout)) {
            return err(libc::EINVAL);
        }
        let src = self
            .entry(parent, name)?
            .ok_or(FsError::Errno(libc::ENOENT))?;
        let dst = self.entry(newparent, newname)?;
        if self.inode(newparent)?.kind != FileKind::Dir {
            return err(libc::ENOTDIR);
        }
        if exchange && dst.is_none() {
            return err(libc::ENOENT);
        }
        if noreplace && dst.is_some() {
            return err(libc::EEXIST);
        }
        if dst.is_some_and(|d| d.ino == src.ino) {
            return Ok(());
        }
        // Nothing leaves or is replaced in an immutable or append-only directory,
        // nothing enters an immutable one, and such files do not move.
        let fixed = FS_IMMUTABLE_FL | FS_APPEND_FL;
        self.refuse_flagged(parent, fixed)?;
        self.refuse_flagged(src.ino, fixed)?;
        self.refuse_flagged(newparent, FS_IMMUTABLE_FL)?;
        if let Some(d) = dst {
            self.refuse_flagged(newparent, fixed)?;
            self.refuse_flagged(d.ino, fixed)?;
        }
        // A directory may not move under itself.
        if src.kind == FileKind::Dir
            && parent != newparent
            && self.is_ancestor(src.ino, newparent)?
        {
            return err(libc::EINVAL);
        }
        if exchange {
            let d = dst.expect("checked above");
            if d.kind == FileKind::Dir && parent != newparent && self.is_ancestor(d.ino, parent)? {
                return err(libc::EINVAL);
            }
            return self.exchange(parent, name, src, newparent, newname, d);
        }
        let mut victim = None;
        if let Some(d) = dst {
            let drec = self.inode(d.ino)?;
            if src.kind == FileKind::Dir {
                if drec.kind != FileKind::Dir {
                    return err(libc::ENOTDIR);
                }
                if !self.is_empty_dir(d.ino)? {
                    return err(libc::ENOTEMPTY);
                }
            } else if drec.kind == FileKind::Dir {
                return err(libc::EISDIR);
            }
            victim = Some((d.ino, drec));
        }
        let now = Ts::now();
        let mut srec = self.inode(src.ino)?;
        srec.ctime = now;
        let mut pold = self.inode(parent)?;
        pold.mtime = now;
        pold.ctime = now;
        let mut pnew = if newparent == parent {
            pold.clone()
        } else {
            self.inode(newparent)?
        };
        pnew.mtime = now;
        pnew.ctime = now;
        if src.kind == FileKind::Dir && parent != newparent {
            srec.parent = newparent;
            pold.nlink -= 1;
            pnew.nlink += 1;
        }
        let mut victim_open = false;
        let mut gone = None;
        // RENAME_WHITEOUT (overlayfs): the old name becomes a whiteout, a character
        // device 0:0 of the caller's.
        let whiteout = whiteout.then(|| {
            let gid = if pold.perm & libc::S_ISGID != 0 {
                pold.gid
            } else {
                caller.gid
            };
            InodeRec::new(FileKind::CharDev, 0, caller.uid, gid, 1, now)
        });
        if let Some((vino, vrec)) = victim.as_mut() {
            vrec.ctime = now;
            if vrec.kind == FileKind::Dir {
                vrec.nlink = 0;
                pnew.nlink -= 1;
            } else {
                vrec.nlink -= 1;
            }
            victim_open = self.open_count.get(vino).copied().unwrap_or(0) > 0;
            if vrec.nlink == 0 && !victim_open {
                self.dirty_drop(*vino);
                if vrec.kind == FileKind::Dir {
                    gone = Some((*vino, vrec.clone()));
                }
            }
        }
        let made = self.store.write(false, |w| {
            let made = match &whiteout {
                Some(rec) => {
                    let ino = w.alloc_ino()?;
                    let mut b = Vec::with_capacity(80);
                    rec.encode(&mut b);
                    w.put_fresh(RecKey::inode(ino), &b)?;
                    let d = DirentRec {
                        ino,
                        kind: FileKind::CharDev,
                    };
                    put_dirent(w, parent, name, Some(d))?;
                    Some(ino)
                }
                None => {
                    put_dirent(w, parent, name, None)?;
                    None
                }
            };
            put_dirent(w, newparent, newname, Some(src))?;
            put_inode(w, src.ino, &srec)?;
            if newparent == parent {
                put_inode(w, parent, &pnew)?;
            } else {
                put_inode(w, parent, &pold)?;
                put_inode(w, newparent, &pnew)?;
            }
            if let Some((vino, vrec)) = &victim {
                unlink_inode(w, *vino, vrec, victim_open)?;
            }
            Ok(made)
        })?;
        let mut touched = vec![parent, newparent, src.ino];
        touched.extend(made);
        if let Some((ino, rec)) = gone {
            self.gone_dir(ino, rec);
        }
        if let Some((vino, _)) = victim {
            touched.push(vino);
        }
        self.settle(&touched);
        Ok(())
    }

    fn exchange(
        &mut self,
        parent: u64,
        name: &[u8],
        a: DirentRec,
        newparent: u64,
        newname: &[u8],
        b: DirentRec,
    ) -> FsResult<()> {
        let now = Ts::now();
        let mut arec = self.inode(a.ino)?;
        let mut brec = self.inode(b.ino)?;
        arec.ctime = now;
        brec.ctime = now;
        let mut pa = self.inode(parent)?;
        pa.mtime = now;
        pa.ctime = now;
        let mut pb = if parent == newparent {
            pa.clone()
        } else {
            self.inode(newparent)?
        };
        pb.mtime = now;
        pb.ctime = now;
        if parent != newparent {
            if a.kind == FileKind::Dir {
                arec.parent = newparent;
                pa.nlink -= 1;
                pb.nlink += 1;
            }
            if b.kind == FileKind::Dir {
                brec.parent = parent;
                pb.nlink -= 1;
                pa.nlink += 1;
            }
        }
        self.store.write(false, |w| {
            put_dirent(w, parent, name, Some(b))?;
            put_dirent(w, newparent, newname, Some(a))?;
            put_inode(w, a.ino, &arec)?;
            put_inode(w, b.ino, &brec)?;
            put_inode(w, parent, &pa)?;
            if parent != newparent {
                put_inode(w, newparent, &pb)?;
            }
            Ok(())
        })?;
        self.settle(&[parent, newparent, a.ino, b.ino]);
        Ok(())
    }

    /// Whether directory `dir` is `ino` or one of its ancestors.
    fn is_ancestor(&mut self, ancestor: u64, mut dir: u64) -> FsResult<bool> {
        for _ in 0..1_000_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = self.inode(dir)?.parent;
        }
        Err(StoreError::Corrupt("directory parent chain does not end at the root".into()).into())
    }

    /// Opens a file; returns a handle.
    pub fn open(&mut self, fino: u64, flags: i32) -> FsResult<u64> {
        let rec = self.getattr(fino)?.rec;
        if rec.kind == FileKind::Dir && flags & libc::O_ACCMODE != libc::O_RDONLY {
            return err(libc::EISDIR);
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        let ino = match node(fino) {
            Node::Live(_) if self.replica_view.is_some() => {
                if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                    return err(libc::EROFS);
                }
                // Read through whatever the tree shows: nothing to account.
                self.handles.insert(fh, Handle::Frozen);
                return Ok(fh);
            }
            Node::Live(ino) => ino,
            Node::Snap { epoch, .. } => {
                if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                    return err(libc::EROFS);
                }
                *self.snap_open.entry(epoch).or_insert(0) += 1;
                self.handles.insert(fh, Handle::SnapFile { epoch });
                return Ok(fh);
            }
            Node::SnapDir => return err(libc::EISDIR),
        };
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes {
            let append_only = rec.flags & FS_APPEND_FL != 0
                && (flags & libc::O_APPEND == 0 || flags & libc::O_TRUNC != 0);
            if rec.flags & FS_IMMUTABLE_FL != 0 || append_only {
                return err(libc::EPERM);
            }
        }
        self.handles.insert(
            fh,
            Handle::File {
                ino,
                // With the writeback cache the kernel places appends itself, and its
                // write-back of any page comes at that page's offset, whatever the
                // handle it goes through.
                append: flags & libc::O_APPEND != 0 && !self.kernel_times,
            },
        );
        *self.open_count.entry(ino).or_insert(0) += 1;
        Ok(fh)
    }

    /// Closes a file handle; frees the inode if it was the last reference.
    /// Returns whether the kernel should drop the file's cached attributes (its
    /// `st_blocks` was a guess while it was open).
    pub fn release(&mut self, fh: u64) -> FsResult<bool> {
        let ino = match self.handles.remove(&fh) {
            Some(Handle::File { ino, .. }) => ino,
            Some(Handle::SnapFile { epoch }) => {
                return self.release_snapshot_hold(epoch).map(|_| false);
            }
            _ => return Ok(false),
        };
        self.closed(ino)?;
        Ok(!self.open_count.contains_key(&ino) && self.blocks_guessed.remove(&ino))
    }

    /// One open handle of live inode `ino` less: with none left, an inode with no
    /// link left goes (an orphan until now), and another one's buffered data is
    /// flushed.
    fn closed(&mut self, ino: u64) -> FsResult<()> {
        let left = {
            let c = self.open_count.entry(ino).or_insert(1);
            *c -= 1;
            *c
        };
        if left == 0 {
            self.open_count.remove(&ino);
            let gone = matches!(self.inode(ino), Ok(r) if r.nlink == 0);
            if gone {
                self.dirty_drop(ino);
                self.store.write(false, |w| {
                    w.set_orphan(ino, false)?;
                    free_inode(w, ino)
                })?;
                self.undurable = true;
            } else {
                self.flush_inode(ino)?;
            }
        }
        Ok(())
    }

    /// Opens a directory. Reading it from position 0 takes a listing that the reads
    /// after it page through.
    pub fn opendir(&mut self, fino: u64) -> FsResult<u64> {
        if self.getattr(fino)?.rec.kind != FileKind::Dir {
            return err(libc::ENOTDIR);
        }
        // A live directory open here stays, as an orphan, when it is removed or
        // renamed over: fstat of the handle still answers (with no link).
        let live = match node(fino) {
            Node::Live(ino) if self.replica_view.is_none() => Some(ino),
            _ => None,
        };
        if let Some(ino) = live {
            *self.open_count.entry(ino).or_insert(0) += 1;
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(
            fh,
            Handle::Dir {
                fino,
                live,
                entries: Vec::new(),
                listed: false,
            },
        );
        Ok(fh)
    }

    /// The entries of directory `fino`, `.` and `..` first.
    fn listing(&mut self, fino: u64) -> FsResult<Vec<DirEntry>> {
        let rec = self.getattr(fino)?.rec;
        if rec.kind != FileKind::Dir {
            return err(libc::ENOTDIR);
        }
        let (epoch, ino, encode) = match node(fino) {
            Node::Live(ino) => (self.tree_epoch(), ino, 0),
            Node::Snap { epoch, ino } => (epoch, ino, epoch),
            Node::SnapDir => {
                let mut entries = vec![
                    DirEntry {
                        ino: SNAPDIR_INO,
                        kind: FileKind::Dir,
                        name: b".".to_vec(),
                    },
                    DirEntry {
                        ino: ROOT_INO,
                        kind: FileKind::Dir,
                        name: b"..".to_vec(),
                    },
                ];
                for s in self.snapshots()? {
                    entries.push(DirEntry {
                        ino: snap_ino(s.epoch, ROOT_INO),
                        kind: FileKind::Dir,
                        name: s.name.into_bytes(),
                    });
                }
                return Ok(entries);
            }
        };
        let up = match (encode, ino) {
            (0, _) => rec.parent.max(ROOT_INO),
            (_, ROOT_INO) => SNAPDIR_INO,
            (e, _) => snap_ino(e, rec.parent),
        };
        let mut entries = vec![
            DirEntry {
                ino: fino,
                kind: FileKind::Dir,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: up,
                kind: FileKind::Dir,
                name: b"..".to_vec(),
            },
        ];
        if fino == ROOT_INO && !self.hide_snapdir {
            entries.push(DirEntry {
                ino: SNAPDIR_INO,
                kind: FileKind::Dir,
                name: SNAPDIR_NAME.to_vec(),
            });
        }
        {
            let txn = self.store.read_txn()?;
            let t = txn.versions();
            scan_visible(t, ino, KIND_DIRENT, 0..=0, epoch, |_, name, v| {
                let d = DirentRec::decode(v)?;
                let ino = if encode == 0 {
                    d.ino
                } else {
                    snap_ino(encode, d.ino)
                };
                entries.push(DirEntry {
                    ino,
                    kind: d.kind,
                    name: name.to_vec(),
                });
                Ok(true)
            })?;
        }
        Ok(entries)
    }

    /// Entries of directory handle `fh` from position `offset` on. Reading from 0
    /// lists the directory (again, after a rewinddir): entries made since the
    /// opendir, or since the last rewind, are seen, as POSIX asks.
    pub fn readdir(&mut self, fh: u64, offset: u64) -> FsResult<&[DirEntry]> {
        let fino = match self.handles.get(&fh) {
            Some(Handle::Dir { fino, .. }) => *fino,
            _ => return err(libc::EBADF),
        };
        let listed = matches!(
            self.handles.get(&fh),
            Some(Handle::Dir { listed: true, .. })
        );
        // From 0 afresh; from anywhere else once, if no read listed it yet (a reader
        // that seeks first, as knfsd does, or one the kernel's cache served until
        // it was dropped).
        let fresh = if offset == 0 || !listed {
            match self.listing(fino) {
                Ok(v) => Some(v),
                // A directory removed since lists as empty.
                Err(FsError::Errno(libc::ENOENT)) => Some(Vec::new()),
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        match self.handles.get_mut(&fh) {
            Some(Handle::Dir {
                entries, listed, ..
            }) => {
                if let Some(f) = fresh {
                    *entries = f;
                    *listed = true;
                }
                Ok(entries.get(offset as usize..).unwrap_or_default())
            }
            _ => err(libc::EBADF),
        }
    }

    /// Closes a directory handle; frees the directory if it was removed meanwhile.
    pub fn releasedir(&mut self, fh: u64) -> FsResult<()> {
        match self.handles.remove(&fh) {
            Some(Handle::Dir {
                live: Some(ino), ..
            }) => self.closed(ino),
            _ => Ok(()),
        }
    }

    /// Filesystem statistics: the space of the disk under the store.
    pub fn statfs(&mut self) -> FsResult<libc::statvfs> {
        let path = std::ffi::CString::new(self.store.path.as_os_str().as_encoded_bytes())
            .map_err(|_| FsError::Errno(libc::EINVAL))?;
        // SAFETY: all-zero is a valid statvfs; the kernel fills it.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `st` is a valid out pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // A volume with a size (`size=`) shows that size, and what of it is left (or
        // what the disk has left, when that is less).
        if let Some(limit) = self.store.segs.limit() {
            let unit = st.f_frsize.max(1);
            let used = self.store.segs.used_bytes()?;
            let left = (limit.saturating_sub(used) / unit).min(st.f_bavail);
            st.f_blocks = limit / unit;
            st.f_bfree = left;
            st.f_bavail = left;
        }
        Ok(st)
    }

    /// Sets the volume's size (`size=`; `None`: as much as the disk holds). Writes
    /// that would take its extents past it get ENOSPC; what is stored stays.
    pub fn set_size_limit(&mut self, limit: Option<u64>) {
        self.store.segs.set_limit(limit);
    }

    /// Makes everything durable: buffered data, then a durable commit.
    pub fn sync_all(&mut self) -> FsResult<()> {
        // What could be stored is committed even if some data could not be (ENOSPC).
        let flushed = self.flush_all();
        self.store.sync()?;
        self.undurable = false;
        flushed
    }

    /// The background tick: flushes buffered data, and makes it durable every `durable`
    /// call.
    pub fn tick(&mut self, durable: bool) -> FsResult<()> {
        let flushed = self.flush_all();
        if durable && (self.undurable || flushed.is_err() || self.deletions_pending) {
            self.store.sync()?;
            self.undurable = false;
            if self.deletions_pending
                && let Err(e) = self.reap_deleted_snapshots()
            {
                tracing::warn!(error = %e, "finishing a snapshot deletion failed");
            }
            // Give back the space of overwritten and deleted data.
            let freed = self.store.compact()?;
            if freed > 0 {
                tracing::debug!(freed, "segments compacted");
            }
        } else {
            self.store.commit_group(false)?;
        }
        flushed
    }
}

impl Drop for Inner {
    /// A core opened by the CLI (store not mounted) leaves nothing uncommitted.
    fn drop(&mut self) {
        if let Err(e) = self.sync_all() {
            tracing::error!(error = %e, "final commit failed");
        }
    }
}

/// Stores the live inode record of `ino`.
/// The root directory of a new volume, owned by the daemon's user.
fn fresh_root(now: Ts) -> InodeRec {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    InodeRec {
        parent: ROOT_INO,
        ..InodeRec::new(FileKind::Dir, 0o755, uid, gid, 2, now)
    }
}

fn put_inode(w: &mut Writer<'_>, ino: u64, rec: &InodeRec) -> FsResult<()> {
    let mut b = Vec::with_capacity(80);
    rec.encode(&mut b);
    w.put(RecKey::inode(ino), Some(&b))?;
    Ok(())
}

/// Stores (or with `None`, deletes) a live directory entry, and keeps the back
/// pointers of the inodes it names in step.
fn put_dirent(w: &mut Writer<'_>, dir: u64, name: &[u8], ent: Option<DirentRec>) -> FsResult<()> {
    let prev = w.version(RecKey::dirent(dir, name))?;
    if let Some((_, Some(old))) = &prev {
        let old = DirentRec::decode(old)?;
        w.put(RecKey::parent(old.ino, dir, name), None)?;
    }
    if let Some(e) = ent {
        w.put(RecKey::parent(e.ino, dir, name), Some(&[]))?;
    }
    match ent {
        Some(e) => {
            let mut b = Vec::with_capacity(9);
            e.encode(&mut b);
            w.put_after(RecKey::dirent(dir, name), Some(&b), prev)?;
        }
        None => w.put_after(RecKey::dirent(dir, name), None, prev)?,
    }
    Ok(())
}

/// Stores `rec` after one of its links went away; frees it when no link and no open
/// handle is left, or records it as an orphan when handles remain.
fn unlink_inode(w: &mut Writer<'_>, ino: u64, rec: &InodeRec, open: bool) -> FsResult<()> {
    if rec.nlink > 0 {
        put_inode(w, ino, rec)
    } else if open {
        w.set_orphan(ino, true)?;
        put_inode(w, ino, rec)
    } else {
        free_inode(w, ino)
    }
}

/// Deletes every live record of `ino` (releasing its extents).
fn free_inode(w: &mut Writer<'_>, ino: u64) -> FsResult<()> {
    Ok(w.delete_live_records(ino)?)
}
