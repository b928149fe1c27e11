//! The FUSE adapter: links fuser callbacks to the filesystem core.
//!
//! Each callback locks the core, calls one core method and replies; every error goes
//! through [`fail`], which logs it at a level fitting its errno and replies with it.
//! Nothing else lives here.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, Caller, Fs, FsError, SNAPDIR_INO, SeekWhence, SetAttr};
use crate::store::schema::{FileKind, Ts};

/// Snapshot threads (`mkdir` in `.snapshots/`) at once; more are answered EBUSY.
const SNAPSHOT_THREADS_MAX: usize = 4;
static SNAPSHOT_THREADS: AtomicUsize = AtomicUsize::new(0);

/// A taken place among [`SNAPSHOT_THREADS`], given back when dropped.
struct ThreadSlot;

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        SNAPSHOT_THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long the kernel may cache live entries and attributes. The daemon is the only
/// writer and every change passes through the kernel (which updates or drops what it
/// cached); rollback invalidates explicitly.
const LIVE_TTL: Duration = Duration::from_secs(10);
/// Snapshots never change: the kernel may keep what it learnt of them.
const SNAP_TTL: Duration = Duration::from_secs(86_400);

/// The cache lifetime of kernel inode `ino`.
fn ttl(ino: u64) -> Duration {
    match crate::fs::node(ino) {
        crate::fs::Node::Snap { .. } => SNAP_TTL,
        _ => LIVE_TTL,
    }
}

/// The fuser `Filesystem` of a mounted store.
pub struct SnapFuse {
    fs: Arc<Fs>,
    writeback: bool,
    uring: bool,
    /// The key the generation of each node id is derived with (see [`Self::generation`]).
    gen_key: [u8; 32],
}

impl SnapFuse {
    /// The result of an open that may have moved the access time (`res`'s flag):
    /// the kernel, which caches it, is told to ask again. Called without the core lock.
    fn atime_moved<T>(
        &self,
        ino: u64,
        res: crate::fs::FsResult<(T, bool)>,
    ) -> crate::fs::FsResult<T> {
        self.setid_dropped(ino, res)
    }

    /// Wraps a core for mounting; `writeback` lets the kernel cache writes, `uring`
    /// asks for FUSE over io_uring where the kernel offers it.
    pub fn new(fs: Arc<Fs>, writeback: bool, uring: bool) -> Self {
        let volume = fs.lock().store().volume_id;
        SnapFuse {
            fs,
            writeback,
            uring,
            gen_key: blake3::derive_key("snapfs 2026 file handle generations", &volume),
        }
    }

    /// The generation of node id `ino`, which file handles carry (export,
    /// open_by_handle_at): derived from the volume's id, which no NFS client sees,
    /// so that a handle cannot be made up from an inode number. Node ids are never
    /// reused, so it never has to change. The root's is 0, as the kernel made it.
    fn generation(&self, ino: u64) -> Generation {
        generation(&self.gen_key, ino)
    }
}

/// See [`SnapFuse::generation`].
fn generation(key: &[u8; 32], ino: u64) -> Generation {
    if ino == crate::store::schema::ROOT_INO {
        return Generation(0);
    }
    let h = blake3::keyed_hash(key, &ino.to_le_bytes());
    // The kernel keeps 32 bits of it.
    let b = h.as_bytes();
    Generation(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64)
}

pub(crate) fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

/// `FS_XFLAG_*` bits of inode flags (chattr's through xfs_io and FS_IOC_FSGETXATTR).
const XFLAGS: [(u32, u32); 4] = [
    (crate::store::schema::FS_IMMUTABLE_FL, 0x08),
    (crate::store::schema::FS_APPEND_FL, 0x10),
    (crate::store::schema::FS_NOATIME_FL, 0x40),
    (crate::store::schema::FS_NODUMP_FL, 0x80),
];

/// The `FS_XFLAG_*` form of inode flags `flags`.
fn xflags_of(flags: u32) -> u32 {
    XFLAGS
        .iter()
        .filter(|(f, _)| flags & f != 0)
        .fold(0, |x, (_, xf)| x | xf)
}

/// The inode flags of `FS_XFLAG_*` bits `x`; `None` if some are not kept.
fn flags_of_xflags(x: u32) -> Option<u32> {
    let known = XFLAGS.iter().fold(0, |k, (_, xf)| k | xf);
    (x & !known == 0).then(|| {
        XFLAGS
            .iter()
            .filter(|(_, xf)| x & xf != 0)
            .fold(0, |f, (fl, _)| f | fl)
    })
}

fn fattr(a: &Attr) -> FileAttr {
    let r = &a.rec;
    FileAttr {
        ino: INodeNo(a.ino),
        size: r.size,
        blocks: a.blocks,
        atime: r.atime.to_system(),
        mtime: r.mtime.to_system(),
        ctime: r.ctime.to_system(),
        crtime: r.crtime.to_system(),
        kind: kind(r.kind),
        perm: r.perm as u16,
        nlink: r.nlink,
        uid: r.uid,
        gid: r.gid,
        rdev: r.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn time(t: TimeOrNow) -> Option<Ts> {
    match t {
        TimeOrNow::Now => None,
        TimeOrNow::SpecificTime(t) => Some(Ts::from_system(t)),
    }
}

/// Logs a failed operation at a level fitting its errno and returns the errno.
fn fail(op: &str, e: FsError) -> Errno {
    let errno = e.errno();
    match errno {
        libc::EIO | libc::ENOSPC | libc::EDQUOT => {
            tracing::error!(op, error = %e, "operation failed")
        }
        _ => tracing::debug!(op, errno, "operation refused"),
    }
    Errno::from_i32(errno)
}

/// Fills a readdirplus reply with `batch`, the listing from `offset` on: `getattr`
/// reads an entry's attributes, `add` puts the entry (with the offset that follows
/// it) in the reply and says whether the reply was full instead.
///
/// An entry gone since opendir took the listing (ENOENT) is left out. Any other
/// failure must reach the caller, never drop the entry from the listing: it is the
/// reply's error when nothing is in the reply yet; otherwise the reply ends before
/// the entry, so that the kernel asks again from its offset and gets the error then.
fn fill_plus(
    batch: &[crate::fs::DirEntry],
    offset: u64,
    mut getattr: impl FnMut(u64) -> Result<Attr, FsError>,
    mut add: impl FnMut(&crate::fs::DirEntry, u64, &Attr) -> bool,
) -> Result<(), FsError> {
    let mut added = false;
    for (i, e) in batch.iter().enumerate() {
        let next = offset + i as u64 + 1;
        let attr = match getattr(e.ino) {
            Ok(a) => a,
            Err(err) if err.errno() == libc::ENOENT => continue,
            Err(err) if !added => return Err(err),
            Err(_) => break,
        };
        if add(e, next, &attr) {
            break;
        }
        added = true;
    }
    Ok(())
}

/// Answers with `$ok` or the error. The result is bound first, so that a core guard
/// taken while computing it (`self.fs.lock().op(..)`) is dropped before the reply is
/// sent: no reply goes out under the core lock.
macro_rules! reply {
    ($reply:expr, $op:literal, $res:expr, |$v:ident| $ok:expr) => {{
        let res = $res;
        match res {
            Ok($v) => $ok,
            Err(e) => $reply.error(fail($op, e)),
        }
    }};
}

impl SnapFuse {
    /// Answers a create or tmpfile with the new inode and its open handle.
    fn created(
        &self,
        reply: ReplyCreate,
        what: &'static str,
        res: crate::fs::FsResult<(Attr, u64)>,
    ) {
        match res {
            Ok((a, fh)) => reply.created(
                &ttl(a.ino),
                &fattr(&a),
                self.generation(a.ino),
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(fail(what, e)),
        }
    }

    /// The result of an operation that may have dropped set-id bits (`res`'s flag):
    /// the kernel, which caches the mode, is told to ask for it again. Called without
    /// the core lock.
    fn setid_dropped<T>(
        &self,
        ino: u64,
        res: crate::fs::FsResult<(T, bool)>,
    ) -> crate::fs::FsResult<T> {
        res.map(|(v, dropped)| {
            if dropped {
                self.fs.invalidate(&[crate::fs::Inval::Attr(ino)]);
            }
            v
        })
    }
}

impl Filesystem for SnapFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // The kernel enforces POSIX ACLs; the core applies umask and default ACLs itself.
        for flag in [
            InitFlags::FUSE_POSIX_ACL,
            InitFlags::FUSE_DONT_MASK,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            // Set-id bits are ours to drop on write, truncate and chown. In return the
            // kernel stops asking for security.capability before every write.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            // Node ids are inode numbers, never reused: a file handle stays good
            // across cache drops and remounts (open_by_handle_at, NFS export). The
            // kernel then looks up "." and ".." by node id.
            InitFlags::FUSE_EXPORT_SUPPORT,
        ] {
            if let Err(missing) = config.add_capabilities(flag) {
                tracing::warn!(?missing, "kernel lacks a FUSE capability");
            }
        }
        if self.writeback
            && let Err(missing) = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
        {
            tracing::warn!(
                ?missing,
                "kernel lacks the writeback cache; writes go through"
            );
            self.writeback = false;
        }
        self.fs.lock().kernel_times = self.writeback;
        // Requests then come on a queue per CPU, answered by a thread on that CPU. The
        // kernel offers it only when `fuse.enable_uring` is set.
        if self.uring {
            match config.add_capabilities(InitFlags::FUSE_OVER_IO_URING) {
                Ok(()) => tracing::info!("serving requests over io_uring"),
                Err(_) => tracing::debug!("kernel does not offer FUSE over io_uring"),
            }
        }
        let _ = config.set_max_write(1 << 20);
        // Written-back pages arrive as background requests; let enough of them queue
        // that the request thread never waits for the next one.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.lock().sync_all() {
            tracing::error!(error = %e, "final flush failed");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _s = tracing::trace_span!("lookup", ino = parent.0, ?name).entered();
        reply!(
            reply,
            "lookup",
            self.fs.lock().lookup(parent.0, name.as_bytes()),
            |a| reply.entry(&ttl(a.ino), &fattr(&a), self.generation(a.ino))
        )
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = tracing::trace_span!("getattr", ino = ino.0).entered();
        reply!(reply, "getattr", self.fs.lock().getattr(ino.0), |a| reply
            .attr(&ttl(a.ino), &fattr(&a)))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _s = tracing::trace_span!("setattr", ino = ino.0, fh = fh.map(|f| f.0)).entered();
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time),
            mtime: mtime.map(time),
            ctime: ctime.map(Ts::from_system),
            via_handle: fh.is_some(),
        };
        reply!(
            reply,
            "setattr",
            self.fs.lock().setattr(ino.0, caller(req), set),
            |a| reply.attr(&ttl(a.ino), &fattr(&a))
        )
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        reply!(reply, "readlink", self.fs.lock().readlink(ino.0), |t| reply
            .data(&t))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _s = tracing::trace_span!("mknod", ino = parent.0, ?name).entered();
        let res = self.fs.lock().mknod(
            parent.0,
            name.as_bytes(),
            mode,
            umask,
            rdev,
            &[],
            caller(req),
        );
        reply!(reply, "mknod", res, |a| reply.entry(
            &ttl(a.ino),
            &fattr(&a),
            self.generation(a.ino)
        ))
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _s = tracing::trace_span!("mkdir", ino = parent.0, ?name).entered();
        let mode = (mode & 0o7777) | libc::S_IFDIR;
        if parent.0 == SNAPDIR_INO && self.writeback {
            // A snapshot must hold every write made before it, including those the
            // kernel still caches. Writing those back takes request threads, so the
            // snapshot is taken on a thread of its own and answered from there.
            // Bounded: each waits for the kernel's write-back, and a loop of mkdirs
            // must not pile up threads.
            if SNAPSHOT_THREADS.fetch_add(1, Ordering::SeqCst) >= SNAPSHOT_THREADS_MAX {
                SNAPSHOT_THREADS.fetch_sub(1, Ordering::SeqCst);
                return reply.error(Errno::from_i32(libc::EBUSY));
            }
            let slot = ThreadSlot;
            let (fs, name, caller) = (self.fs.clone(), name.to_owned(), caller(req));
            let key = self.gen_key;
            let spawned = std::thread::Builder::new()
                .name("snapshot".into())
                .spawn(move || {
                    let _slot = slot;
                    fs.flush_kernel();
                    let res =
                        fs.lock()
                            .mknod(parent.0, name.as_bytes(), mode, umask, 0, &[], caller);
                    reply!(reply, "mkdir", res, |a| reply.entry(
                        &ttl(a.ino),
                        &fattr(&a),
                        generation(&key, a.ino)
                    ))
                });
            if let Err(e) = spawned {
                // The closure (and its slot and reply) went with the error: the reply
                // answered EIO as it dropped.
                tracing::error!(error = %e, "cannot start a snapshot thread");
            }
            return;
        }
        let res = self
            .fs
            .lock()
            .mknod(parent.0, name.as_bytes(), mode, umask, 0, &[], caller(req));
        reply!(reply, "mkdir", res, |a| reply.entry(
            &ttl(a.ino),
            &fattr(&a),
            self.generation(a.ino)
        ))
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = tracing::trace_span!("unlink", ino = parent.0, ?name).entered();
        reply!(
            reply,
            "unlink",
            self.fs.lock().remove(parent.0, name.as_bytes(), false),
            |_v| reply.ok()
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = tracing::trace_span!("rmdir", ino = parent.0, ?name).entered();
        reply!(
            reply,
            "rmdir",
            self.fs.lock().remove(parent.0, name.as_bytes(), true),
            |_v| reply.ok()
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _s = tracing::trace_span!("symlink", ino = parent.0, name = ?link_name).entered();
        let res = self.fs.lock().mknod(
            parent.0,
            link_name.as_bytes(),
            libc::S_IFLNK | 0o777,
            0,
            0,
            target.as_os_str().as_bytes(),
            caller(req),
        );
        reply!(reply, "symlink", res, |a| reply.entry(
            &ttl(a.ino),
            &fattr(&a),
            self.generation(a.ino)
        ))
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::trace_span!("rename", ino = parent.0, ?name, ?newname).entered();
        let res = self.fs.lock().rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
            caller(req),
        );
        reply!(reply, "rename", res, |_v| reply.ok())
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _s = tracing::trace_span!("link", ino = ino.0, name = ?newname).entered();
        reply!(
            reply,
            "link",
            self.fs.lock().link(ino.0, newparent.0, newname.as_bytes()),
            |a| reply.entry(&ttl(a.ino), &fattr(&a), self.generation(a.ino))
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _s = tracing::trace_span!("open", ino = ino.0).entered();
        // Every change to file data passes through the kernel's page cache (rollback
        // invalidates explicitly), so cached pages stay valid across opens.
        let res = {
            let mut core = self.fs.lock();
            core.open(ino.0, flags.0).and_then(|fh| {
                // O_NOATIME (the owner's, or root's: the kernel checks) asks for none.
                let read =
                    flags.0 & libc::O_ACCMODE != libc::O_WRONLY && flags.0 & libc::O_NOATIME == 0;
                Ok((fh, read && core.accessed(ino.0)?))
            })
        };
        let res = self.atime_moved(ino.0, res);
        reply!(reply, "open", res, |fh| {
            reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
        })
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _s = tracing::trace_span!("read", ino = ino.0, fh = fh.0, offset, size).entered();
        // Whole extents are read and verified after the lock is released, so that the
        // kernel's concurrent read-ahead requests use both CPUs and overlap their disk
        // waits.
        let planned = self.fs.lock().read_planned(ino.0, offset, size);
        let read = planned.and_then(crate::fs::finish_read);
        reply!(reply, "read", read, |d| reply.data(&d))
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _s = tracing::trace_span!("write", ino = ino.0, fh = fh.0, offset, len = data.len())
            .entered();
        reply!(
            reply,
            "write",
            {
                // Whole blocks are hashed before the lock, so that the kernel's
                // concurrent writeback requests hash on both CPUs.
                let digests = crate::fs::digest_blocks(self.fs.block_size(), offset, data);
                let mut fs = self.fs.lock();
                // The kernel checked the writer's CAP_FSETID before setting the flag.
                let res = fs.write(fh.0, ino.0, offset, data, &digests).and_then(|n| {
                    let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
                    Ok((n, kill && fs.drop_setid(ino.0, caller(req), true)?))
                });
                drop(fs);
                self.setid_dropped(ino.0, res)
            },
            |n| reply.written(n)
        )
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::trace_span!("flush", ino = ino.0, fh = fh.0).entered();
        reply!(reply, "flush", self.fs.lock().flush_inode(ino.0), |_v| {
            reply.ok()
        })
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::trace_span!("release", ino = ino.0, fh = fh.0).entered();
        let res = self.fs.lock().release(fh.0);
        if let Ok(true) = res {
            // Its st_blocks was a guess while it was open.
            self.fs.invalidate(&[crate::fs::Inval::Attr(ino.0)]);
        }
        reply!(reply, "release", res, |_v| reply.ok())
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::trace_span!("fsync", ino = ino.0, fh = fh.0).entered();
        self.fs.presync(Some(ino.0));
        reply!(
            reply,
            "fsync",
            self.fs.lock().fsync(ino.0, datasync),
            |_v| reply.ok()
        )
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _s = tracing::trace_span!("opendir", ino = ino.0).entered();
        // The kernel may keep listings: it drops them itself when it changes a directory,
        // and rollback invalidates the directories it rewrites.
        let res = {
            let mut core = self.fs.lock();
            // O_NOATIME (the owner's, or root's: the kernel checks) asks for none, for a
            // directory as for a file.
            let touch = flags.0 & libc::O_NOATIME == 0;
            core.opendir(ino.0)
                .and_then(|fh| Ok((fh, touch && core.accessed(ino.0)?)))
        };
        let res = self.atime_moved(ino.0, res);
        reply!(reply, "opendir", res, |fh| reply.opened(
            FileHandle(fh),
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        ))
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _s = tracing::trace_span!("readdir", ino = ino.0, fh = fh.0, offset).entered();
        let mut core = self.fs.lock();
        // Entries go into the reply's buffer under the lock; it is sent after.
        let res = core.readdir(fh.0, offset).map(|entries| {
            for (i, e) in entries.iter().enumerate() {
                let next = offset + i as u64 + 1;
                if reply.add(
                    INodeNo(e.ino),
                    next,
                    kind(e.kind),
                    OsStr::from_bytes(&e.name),
                ) {
                    break;
                }
            }
        });
        drop(core);
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("readdir", e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _s = tracing::trace_span!("readdirplus", ino = ino.0, fh = fh.0, offset).entered();
        let mut core = self.fs.lock();
        // A reply holds a few hundred entries at most; look up only what may fit.
        let batch: Vec<crate::fs::DirEntry> = match core.readdir(fh.0, offset) {
            Ok(entries) => entries.iter().take(512).cloned().collect(),
            Err(e) => {
                drop(core);
                return reply.error(fail("readdirplus", e));
            }
        };
        let filled = fill_plus(
            &batch,
            offset,
            |ino| core.getattr(ino),
            |e, next, attr| {
                reply.add(
                    INodeNo(e.ino),
                    next,
                    OsStr::from_bytes(&e.name),
                    &ttl(e.ino),
                    &fattr(attr),
                    self.generation(e.ino),
                )
            },
        );
        drop(core);
        match filled {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("readdirplus", e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply!(reply, "releasedir", self.fs.lock().releasedir(fh.0), |_v| {
            reply.ok()
        })
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::trace_span!("fsyncdir", ino = ino.0).entered();
        reply!(reply, "fsyncdir", self.fs.lock().sync_all(), |_v| reply
            .ok())
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply!(reply, "statfs", self.fs.lock().statfs(), |st| reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            u64::from(u32::MAX),
            u64::from(u32::MAX),
            st.f_bsize as u32,
            crate::fs::NAME_MAX as u32,
            st.f_frsize as u32,
        ))
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::trace_span!("setxattr", ino = ino.0, ?name).entered();
        reply!(
            reply,
            "setxattr",
            self.fs
                .lock()
                .setxattr(ino.0, name.as_bytes(), value, flags, Some(caller(req))),
            |_v| reply.ok()
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _s = tracing::trace_span!("getxattr", ino = ino.0, ?name).entered();
        reply!(
            reply,
            "getxattr",
            self.fs.lock().getxattr(ino.0, name.as_bytes()),
            |v| xattr_reply(reply, &v, size)
        )
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _s = tracing::trace_span!("listxattr", ino = ino.0).entered();
        reply!(reply, "listxattr", self.fs.lock().listxattr(ino.0), |v| {
            xattr_reply(reply, &v, size)
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = tracing::trace_span!("removexattr", ino = ino.0, ?name).entered();
        reply!(
            reply,
            "removexattr",
            self.fs.lock().removexattr(ino.0, name.as_bytes()),
            |_v| reply.ok()
        )
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes and ACLs; only existence is ours.
        reply!(reply, "access", self.fs.lock().getattr(ino.0), |_v| reply
            .ok())
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _s = tracing::trace_span!("create", ino = parent.0, ?name).entered();
        let mut core = self.fs.lock();
        let res = core
            .mknod(
                parent.0,
                name.as_bytes(),
                (mode & 0o7777) | libc::S_IFREG,
                umask,
                0,
                &[],
                caller(req),
            )
            .and_then(|a| core.open(a.ino, flags).map(|fh| (a, fh)));
        drop(core);
        self.created(reply, "create", res);
    }

    fn tmpfile(
        &self,
        req: &Request,
        parent: INodeNo,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _s = tracing::trace_span!("tmpfile", ino = parent.0).entered();
        let mut core = self.fs.lock();
        let res = core
            .tmpfile(parent.0, mode, umask, caller(req))
            .and_then(|a| core.open(a.ino, flags).map(|fh| (a, fh)));
        drop(core);
        self.created(reply, "tmpfile", res);
    }

    /// getattr with the creation time, which statx(2) callers may ask for.
    fn statx(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        _flags: u32,
        _mask: u32,
        reply: fuser::ReplyStatx,
    ) {
        let _s = tracing::trace_span!("statx", ino = ino.0).entered();
        // STATX_ATTR_{IMMUTABLE,APPEND,NODUMP} are the FS_*_FL bits of the same names.
        let known = crate::store::schema::FS_IMMUTABLE_FL
            | crate::store::schema::FS_APPEND_FL
            | crate::store::schema::FS_NODUMP_FL;
        reply!(reply, "statx", self.fs.lock().getattr(ino.0), |a| reply
            .statx(
                &ttl(a.ino),
                &fattr(&a),
                (a.rec.flags & known) as u64,
                known as u64
            ))
    }

    /// The inode flags of chattr and lsattr, which the kernel asks for with
    /// FS_IOC_{GET,SET}FLAGS and FS_IOC_FS{GET,SET}XATTR. Any other ioctl is answered
    /// ENOTTY, as a file that is not a terminal answers `isatty`'s TCGETS, without a
    /// warning for each.
    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
        const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
        const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
        const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
        let _s = tracing::trace_span!("ioctl", ino = ino.0, cmd).entered();
        let word = |b: &[u8], at: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
        };
        let set = |flags: u32| {
            let res = self.fs.lock().set_flags(ino.0, flags, &caller(req));
            if res.is_ok() {
                // ctime moved; the kernel caches it.
                self.fs.invalidate(&[crate::fs::Inval::Attr(ino.0)]);
            }
            res
        };
        match cmd {
            FS_IOC_GETFLAGS if out_size >= 4 => {
                reply!(reply, "ioctl", self.fs.lock().get_flags(ino.0), |f| reply
                    .ioctl(0, &f.to_ne_bytes()))
            }
            FS_IOC_SETFLAGS => match word(in_data, 0) {
                Some(f) => reply!(reply, "ioctl", set(f), |_a| reply.ioctl(0, &[])),
                None => reply.error(Errno::from_i32(libc::EINVAL)),
            },
            FS_IOC_FSGETXATTR if out_size >= 28 => {
                reply!(reply, "ioctl", self.fs.lock().get_flags(ino.0), |f| {
                    // struct fsxattr: xflags, extsize, nextents, projid, cowextsize, pad.
                    let mut out = [0u8; 28];
                    out[..4].copy_from_slice(&xflags_of(f).to_ne_bytes());
                    reply.ioctl(0, &out)
                })
            }
            FS_IOC_FSSETXATTR => {
                let fields = (1..5)
                    .map(|i| word(in_data, 4 * i))
                    .collect::<Option<Vec<_>>>();
                match (word(in_data, 0), fields) {
                    // Extent sizes and project ids are not kept: only zero is.
                    (Some(x), Some(f)) if f[0] == 0 && f[2] == 0 && f[3] == 0 => {
                        match flags_of_xflags(x) {
                            Some(flags) => {
                                reply!(reply, "ioctl", set(flags), |_a| reply.ioctl(0, &[]))
                            }
                            None => reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
                        }
                    }
                    (Some(_), Some(_)) => reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
                    _ => reply.error(Errno::from_i32(libc::EINVAL)),
                }
            }
            _ => reply.error(Errno::from_i32(libc::ENOTTY)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::trace_span!("fallocate", ino = ino.0, fh = fh.0, offset, length, mode)
            .entered();
        reply!(
            reply,
            "fallocate",
            {
                let mut fs = self.fs.lock();
                let res = fs
                    .fallocate(ino.0, offset, length, mode)
                    .and_then(|()| Ok(((), fs.drop_setid(ino.0, caller(req), false)?)));
                drop(fs);
                self.setid_dropped(ino.0, res)
            },
            |_v| reply.ok()
        )
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _s = tracing::trace_span!("lseek", ino = ino.0, fh = fh.0, offset, whence).entered();
        if self.writeback {
            // The kernel may hold written pages we have not seen, and does not write
            // them back for lseek: a hole we report could hide data. ENOSYS makes it
            // answer from its own size instead (all data up to the end, which is
            // always correct), for the rest of the mount.
            return reply.error(Errno::ENOSYS);
        }
        let whence = match whence {
            libc::SEEK_DATA => SeekWhence::Data,
            libc::SEEK_HOLE => SeekWhence::Hole,
            _ => return reply.error(Errno::EINVAL),
        };
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        reply!(
            reply,
            "lseek",
            self.fs.lock().lseek(ino.0, offset as u64, whence),
            |o| reply.offset(o as i64)
        )
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _s =
            tracing::trace_span!("copy_file_range", ino = ino_in.0, out = ino_out.0, len).entered();
        // The reply counts bytes in a u32.
        let len = len.min(1 << 30);
        let res = {
            let mut fs = self.fs.lock();
            let res = fs
                .copy_range(ino_in.0, offset_in, ino_out.0, offset_out, len)
                .and_then(|n| Ok((n, fs.drop_setid(ino_out.0, caller(req), false)?)));
            drop(fs);
            self.setid_dropped(ino_out.0, res)
        };
        reply!(reply, "copy_file_range", res, |n| reply.written(n as u32))
    }
}

pub(crate) fn xattr_reply(reply: ReplyXattr, v: &[u8], size: u32) {
    if size == 0 {
        reply.size(v.len() as u32)
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::DirEntry;
    use crate::store::schema::InodeRec;

    fn entry(ino: u64) -> DirEntry {
        DirEntry {
            ino,
            kind: FileKind::File,
            name: format!("f{ino}").into_bytes(),
        }
    }

    fn attr(ino: u64) -> Attr {
        Attr {
            ino,
            rec: InodeRec {
                kind: FileKind::File,
                perm: 0o644,
                uid: 0,
                gid: 0,
                nlink: 1,
                size: 0,
                atime: Ts::default(),
                mtime: Ts::default(),
                ctime: Ts::default(),
                crtime: Ts::default(),
                rdev: 0,
                parent: 0,
                target: Vec::new(),
                flags: 0,
            },
            blksize: 4096,
            blocks: 0,
        }
    }

    /// Runs [`fill_plus`] over entries 10..16 from `offset`: entries 12 and 13 are gone
    /// (ENOENT), entry 14 is unreadable (EIO), and the reply takes `room` entries. Returns the
    /// (ino, next offset) pairs added and the errno answered, if any.
    fn listing(offset: u64, room: usize) -> (Vec<(u64, u64)>, Option<i32>) {
        let batch: Vec<DirEntry> = (10 + offset..16).map(entry).collect();
        let mut added = Vec::new();
        let res = fill_plus(
            &batch,
            offset,
            |ino| match ino {
                12 | 13 => Err(FsError::Errno(libc::ENOENT)),
                14 => Err(crate::store::StoreError::Corrupt("test".into()).into()),
                _ => Ok(attr(ino)),
            },
            |e, next, _| {
                if added.len() == room {
                    return true;
                }
                added.push((e.ino, next));
                false
            },
        );
        (added, res.err().map(|e| e.errno()))
    }

    #[test]
    fn readdirplus_never_drops_an_entry_it_cannot_read() {
        // The gone entry is left out; the reply ends before the unreadable one.
        assert_eq!(listing(0, 100), (vec![(10, 1), (11, 2)], None));
        // Asked again from there, the unreadable entry is the reply's error...
        assert_eq!(listing(4, 100), (vec![], Some(libc::EIO)));
        // ...as it is when only gone entries come before it.
        assert_eq!(listing(2, 100), (vec![], Some(libc::EIO)));
        // A full reply ends before it, as before.
        assert_eq!(listing(0, 1), (vec![(10, 1)], None));
        // Past it, the listing goes on.
        assert_eq!(listing(5, 100), (vec![(15, 6)], None));
    }
}
