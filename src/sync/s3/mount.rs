//! `snapfs mount s3://BUCKET/PREFIX MOUNTPOINT`: the bucket's snapshots, read-only,
//! as `MOUNTPOINT/.snapshots/NAME/`. A snapshot's tree is built from its manifests
//! when it is first entered (a few are kept); file data is read from the packs as it
//! is asked for, by ranged GETs of its extents, each checked against its hash (and
//! opened, in an encrypted bucket), and kept in a cache of bounded size.
//!
//! Node ids: 1 is the mount's root, 2 its `.snapshots`; inode `ino` of the `k`th
//! snapshot (in the root object's order, from 0) is `(k + 1) << 40 | ino`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request,
};

use super::{Bucket, Place, RecordKey, Root, SyncError, err};
use crate::store::schema::{
    BlockRec, DirentRec, FileKind, InodeRec, KIND_BLOCK, KIND_DIRENT, KIND_INODE, KIND_XATTR,
    ROOT_INO,
};

/// The mount's root and its `.snapshots`.
const TOP: u64 = 1;
const SNAPDIR: u64 = 2;
/// Bits of a node id that hold the inode number within its snapshot.
const INO_BITS: u32 = 40;
/// Snapshot trees kept built at once.
const TREES_KEPT: usize = 4;
/// Default bytes of extents kept (`-o cache_size=`).
pub const DEFAULT_CACHE: u64 = 256 << 20;
/// Nothing here changes while mounted.
const TTL: Duration = Duration::from_secs(86_400);

/// A snapshot's records, as its manifests (overlaid in turn) leave them.
type Tree = BTreeMap<RecordKey, Vec<u8>>;

/// Extents read lately, up to a number of bytes.
#[derive(Default)]
struct Cache {
    map: HashMap<[u8; 32], Arc<Vec<u8>>>,
    order: VecDeque<[u8; 32]>,
    bytes: u64,
    limit: u64,
}

impl Cache {
    fn get(&self, h: &[u8; 32]) -> Option<Arc<Vec<u8>>> {
        self.map.get(h).cloned()
    }

    fn put(&mut self, h: [u8; 32], data: Arc<Vec<u8>>) {
        if self.map.contains_key(&h) {
            return;
        }
        self.bytes += data.len() as u64;
        self.map.insert(h, data);
        self.order.push_back(h);
        while self.bytes > self.limit {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(d) = self.map.remove(&old) {
                self.bytes -= d.len() as u64;
            }
        }
    }
}

/// A bucket's snapshots, served read-only.
pub struct BucketFs {
    b: Mutex<Bucket>,
    /// The root object: as read at mount, and again when a manifest it names is gone
    /// (a delete merged it into another).
    root: Mutex<Root>,
    /// The snapshots shown (those of the root at mount), by name and creation time:
    /// a name used again later is another snapshot.
    shown: Vec<(String, i64, u32)>,
    block_size: u32,
    /// Where each extent is: read at mount, and again when an extent is not where
    /// it was (a gc moved it to another pack).
    index: Mutex<HashMap<[u8; 32], Place>>,
    trees: Mutex<VecDeque<(usize, Arc<Tree>)>>,
    cache: Mutex<Cache>,
    /// Owner of the mount's own two directories.
    uid: u32,
    gid: u32,
    mounted: std::time::SystemTime,
}

fn node(k: usize, ino: u64) -> Option<u64> {
    (ino < 1 << INO_BITS && (k as u64) < (1 << (64 - INO_BITS)) - 1)
        .then(|| ((k as u64 + 1) << INO_BITS) | ino)
}

/// The snapshot (position among those shown) and inode of node id `n`.
fn split(n: u64) -> Option<(usize, u64)> {
    let k = n >> INO_BITS;
    (k >= 1).then(|| ((k - 1) as usize, n & ((1 << INO_BITS) - 1)))
}

use crate::fuse::{kind as file_type, xattr_reply};

impl BucketFs {
    /// Opens the bucket at `url` and reads its root and pack indexes.
    pub fn open(url: &str, cache_bytes: u64) -> Result<BucketFs, SyncError> {
        let b = Bucket::open(url)?;
        let root = b
            .root()?
            .ok_or_else(|| err(format!("{url} holds no snapfs volume")))?;
        let index = b.index()?;
        let shown = root
            .snapshots
            .iter()
            .filter(|s| !s.deleted)
            .map(|s| (s.name.clone(), s.created_sec, s.created_nsec))
            .collect();
        let block_size = root.block_size;
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ok(BucketFs {
            b: Mutex::new(b),
            root: Mutex::new(root),
            shown,
            block_size,
            index: Mutex::new(index),
            trees: Mutex::default(),
            cache: Mutex::new(Cache {
                limit: cache_bytes,
                ..Default::default()
            }),
            uid,
            gid,
            mounted: std::time::SystemTime::now(),
        })
    }

    /// The tree of shown snapshot `k`, built on first use.
    fn tree(&self, k: usize) -> Result<Arc<Tree>, Errno> {
        let mut trees = self.trees.lock().expect("trees");
        if let Some(p) = trees.iter().position(|(i, _)| *i == k) {
            let t = trees.remove(p).expect("present");
            trees.push_back(t.clone());
            return Ok(t.1);
        }
        let (name, sec, nsec) = self.shown.get(k).ok_or(Errno::ENOENT)?;
        let b = self.b.lock().expect("bucket");
        let build = |root: &Root| -> Result<Tree, SyncError> {
            let at = root
                .snapshots
                .iter()
                .position(|s| &s.name == name && s.created_sec == *sec && s.created_nsec == *nsec)
                .ok_or_else(|| err(format!("snapshot {name} is gone from the bucket")))?;
            let mut tree = Tree::new();
            for (s, stored) in b.manifests(&root.snapshots[..=at]) {
                if s.base.is_none() {
                    tree.clear();
                }
                for batch in b.batches(s, stored?)? {
                    for r in batch? {
                        let key = (r.ino, r.kind, r.sub, r.name);
                        match r.payload {
                            Some(p) => tree.insert(key, p),
                            None => tree.remove(&key),
                        };
                    }
                }
            }
            Ok(tree)
        };
        let mut root = self.root.lock().expect("root");
        let tree = build(&root).or_else(|first| {
            // Its manifests may have been merged since: read the root again.
            tracing::info!(error = %first, "reading the bucket's root again");
            *root = b.root()?.ok_or(first)?;
            build(&root)
        });
        drop(root);
        drop(b);
        let tree = Arc::new(tree.map_err(|e| {
            tracing::error!(error = %e, snapshot = %name, "cannot read a snapshot's manifests");
            Errno::EIO
        })?);
        trees.push_back((k, tree.clone()));
        while trees.len() > TREES_KEPT {
            trees.pop_front();
        }
        Ok(tree)
    }

    fn inode(tree: &Tree, ino: u64) -> Result<InodeRec, Errno> {
        let p = tree
            .get(&(ino, KIND_INODE, 0, Vec::new()))
            .ok_or(Errno::ENOENT)?;
        InodeRec::decode(p).map_err(|e| {
            tracing::error!(error = %e, ino, "a damaged inode record");
            Errno::EIO
        })
    }

    fn dir_attr(&self, ino: u64, nlink: u32) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
            crtime: self.mounted,
            kind: FileType::Directory,
            perm: 0o555,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self.block_size,
            flags: 0,
        }
    }

    fn attr(&self, n: u64) -> Result<FileAttr, Errno> {
        match n {
            TOP => return Ok(self.dir_attr(TOP, 3)),
            SNAPDIR => return Ok(self.dir_attr(SNAPDIR, 2 + self.shown.len() as u32)),
            _ => {}
        }
        let (k, ino) = split(n).ok_or(Errno::ENOENT)?;
        let r = Self::inode(&*self.tree(k)?, ino)?;
        Ok(FileAttr {
            ino: INodeNo(n),
            size: r.size,
            blocks: r.size.div_ceil(512),
            atime: r.atime.to_system(),
            mtime: r.mtime.to_system(),
            ctime: r.ctime.to_system(),
            crtime: r.crtime.to_system(),
            kind: file_type(r.kind),
            perm: r.perm as u16,
            nlink: r.nlink,
            uid: r.uid,
            gid: r.gid,
            rdev: r.rdev,
            blksize: self.block_size,
            flags: 0,
        })
    }

    fn lookup_in(&self, parent: u64, name: &[u8]) -> Result<FileAttr, Errno> {
        match parent {
            TOP if name == b".snapshots" => self.attr(SNAPDIR),
            TOP => Err(Errno::ENOENT),
            SNAPDIR => {
                let k = self
                    .shown
                    .iter()
                    .position(|(n, _, _)| n.as_bytes() == name)
                    .ok_or(Errno::ENOENT)?;
                self.attr(node(k, ROOT_INO).expect("small"))
            }
            _ => {
                let (k, dir) = split(parent).ok_or(Errno::ENOENT)?;
                let tree = self.tree(k)?;
                let p = tree
                    .get(&(dir, KIND_DIRENT, 0, name.to_vec()))
                    .ok_or(Errno::ENOENT)?;
                let d = DirentRec::decode(p).map_err(|_| Errno::EIO)?;
                self.attr(node(k, d.ino).ok_or(Errno::EOVERFLOW)?)
            }
        }
    }

    /// The entries of directory `n`, with `.` and `..`.
    fn entries(&self, n: u64) -> Result<Vec<(u64, FileType, Vec<u8>)>, Errno> {
        let mut out = vec![
            (n, FileType::Directory, b".".to_vec()),
            (TOP, FileType::Directory, b"..".to_vec()),
        ];
        match n {
            TOP => out.push((SNAPDIR, FileType::Directory, b".snapshots".to_vec())),
            SNAPDIR => {
                for (k, (name, _, _)) in self.shown.iter().enumerate() {
                    out.push((
                        node(k, ROOT_INO).expect("small"),
                        FileType::Directory,
                        name.clone().into_bytes(),
                    ));
                }
            }
            _ => {
                let (k, dir) = split(n).ok_or(Errno::ENOENT)?;
                let tree = self.tree(k)?;
                if Self::inode(&tree, dir)?.kind != FileKind::Dir {
                    return Err(Errno::ENOTDIR);
                }
                let range =
                    (dir, KIND_DIRENT, 0, Vec::new())..(dir, KIND_DIRENT + 1, 0, Vec::new());
                for ((_, _, _, name), p) in tree.range(range) {
                    let d = DirentRec::decode(p).map_err(|_| Errno::EIO)?;
                    let id = node(k, d.ino).ok_or(Errno::EOVERFLOW)?;
                    out.push((id, file_type(d.kind), name.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Extent `hash`: from the cache, or read from its pack and checked.
    fn extent(&self, hash: &[u8; 32]) -> Result<Arc<Vec<u8>>, Errno> {
        if let Some(d) = self.cache.lock().expect("cache").get(hash) {
            return Ok(d);
        }
        let b = self.b.lock().expect("bucket");
        let place = |reload: bool| -> Result<Place, Errno> {
            let mut index = self.index.lock().expect("index");
            if reload {
                *index = b.index().map_err(|e| {
                    tracing::error!(error = %e, "cannot read the packs' indexes");
                    Errno::EIO
                })?;
            }
            index.get(hash).cloned().ok_or_else(|| {
                tracing::error!(extent = %crate::store::hex(hash), "an extent in no pack");
                Errno::EIO
            })
        };
        let read = |place: &Place| {
            let end = place
                .offset
                .checked_add(place.len as u64)
                .ok_or_else(|| err(format!("{}: a damaged index entry", place.pack)))?;
            b.rt.block_on(b.get_range_async(&place.pack, place.offset..end))
        };
        let mut at = place(false)?;
        let raw = match read(&at) {
            Ok(raw) => raw,
            Err(first) => {
                // Moved since the mount (gc rewrote its pack)? Then read it there.
                let again = place(true)?;
                if again.pack == at.pack {
                    tracing::error!(error = %first, "cannot read an extent");
                    return Err(Errno::EIO);
                }
                at = again;
                read(&at).map_err(|e| {
                    tracing::error!(error = %e, "cannot read an extent");
                    Errno::EIO
                })?
            }
        };
        let data = b.extent(&at, hash, &raw).ok_or_else(|| {
            tracing::error!(extent = %crate::store::hex(hash), pack = %at.pack,
                "an extent does not match its hash");
            Errno::EIO
        })?;
        drop(b);
        let data = Arc::new(data);
        self.cache.lock().expect("cache").put(*hash, data.clone());
        Ok(data)
    }

    fn read_at(&self, n: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let (k, ino) = split(n).ok_or(Errno::EISDIR)?;
        let tree = self.tree(k)?;
        let r = Self::inode(&tree, ino)?;
        if r.kind != FileKind::File {
            return Err(Errno::EISDIR);
        }
        let end = offset.saturating_add(size as u64).min(r.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let bs = self.block_size as u64;
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let (bstart, bend) = ((pos - idx * bs) as usize, (end - idx * bs).min(bs) as usize);
            let dst = (pos - offset) as usize;
            if let Some(p) = tree.get(&(ino, KIND_BLOCK, idx, Vec::new())) {
                let block = BlockRec::decode(p).map_err(|_| Errno::EIO)?;
                for (at, len, src) in block.pieces(bstart, bend) {
                    let into = &mut out[dst + (at - bstart)..dst + (at - bstart) + len];
                    let (hash, from, avail) = match src {
                        Some((h, from)) => (Some(h), from, usize::MAX),
                        None => match block.base_extent() {
                            Some((h, blen)) => (Some(h), at, blen as usize),
                            None => (None, 0, 0),
                        },
                    };
                    let Some(hash) = hash else { continue };
                    let data = self.extent(hash)?;
                    // Bytes past an extent's end (or the base's length) read as zeros.
                    let stop = data.len().min(avail);
                    if from < stop {
                        let n = (stop - from).min(len);
                        into[..n].copy_from_slice(&data[from..from + n]);
                    }
                }
            }
            pos = (idx + 1) * bs;
        }
        Ok(out)
    }

    fn xattr(&self, n: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        let (k, ino) = split(n).ok_or(Errno::ENODATA)?;
        let tree = self.tree(k)?;
        tree.get(&(ino, KIND_XATTR, 0, name.to_vec()))
            .cloned()
            .ok_or(Errno::ENODATA)
    }

    fn xattr_names(&self, n: u64) -> Result<Vec<u8>, Errno> {
        let Some((k, ino)) = split(n) else {
            return Ok(Vec::new());
        };
        let tree = self.tree(k)?;
        let mut out = Vec::new();
        for ((_, _, _, name), _) in
            tree.range((ino, KIND_XATTR, 0, Vec::new())..(ino, KIND_XATTR + 1, 0, Vec::new()))
        {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }
}

impl Filesystem for BucketFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // The kernel enforces the ACLs stored with the files.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_POSIX_ACL) {
            tracing::warn!(?missing, "kernel lacks POSIX ACLs over FUSE");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_in(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let res = split(ino.0)
            .ok_or(Errno::EINVAL)
            .and_then(|(k, i)| Self::inode(&*self.tree(k)?, i))
            .and_then(|r| {
                if r.kind == FileKind::Symlink {
                    Ok(r.target)
                } else {
                    Err(Errno::EINVAL)
                }
            });
        match res {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), fuser::FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_at(ino.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.entries(ino.0) {
            Ok(entries) => {
                for (i, (id, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*id), i as u64 + 1, *kind, OsStr::from_bytes(name)) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            0,
            0,
            0,
            0,
            0,
            self.block_size,
            crate::fs::NAME_MAX as u32,
            self.block_size,
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.xattr(ino.0, name.as_bytes()) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.xattr_names(ino.0) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(e),
        }
    }
}

/// `-o cache_size=N[K|M|G],log=FILE` (the options a bucket mount takes, besides
/// `ro`): the bytes of extents cached, and where a mount in the background logs.
pub fn parse_options(opts: &[String]) -> Result<(u64, Option<std::path::PathBuf>), String> {
    let mut cache = DEFAULT_CACHE;
    let mut log = None;
    for o in opts.iter().flat_map(|o| o.split(',')) {
        match o.split_once('=') {
            Some(("cache_size", v)) => {
                let (num, mult) = match v.chars().last() {
                    Some('K' | 'k') => (&v[..v.len() - 1], 1 << 10),
                    Some('M' | 'm') => (&v[..v.len() - 1], 1 << 20),
                    Some('G' | 'g') => (&v[..v.len() - 1], 1 << 30),
                    _ => (v, 1),
                };
                cache = num
                    .parse::<u64>()
                    .ok()
                    .and_then(|n| n.checked_mul(mult))
                    .ok_or_else(|| format!("cache_size={v}: not a size (say 256M)"))?;
            }
            Some(("log", v)) if !v.is_empty() => log = Some(std::path::PathBuf::from(v)),
            None if o == "ro" || o.is_empty() => {}
            _ => {
                return Err(format!(
                    "-o {o}: a bucket mount takes only cache_size= and log= (and ro)"
                ));
            }
        }
    }
    Ok((cache, log))
}

/// Mounts the bucket at `url` on `mp` and serves it: in the foreground, or (the
/// default) in a child process once the mount is up.
pub fn mount(url: &str, mp: &Path, opts: &[String], foreground: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let (cache, log) = parse_options(opts).map_err(|e| anyhow::anyhow!(e))?;
    let log = log.map(|l| std::path::absolute(&l).unwrap_or(l));
    if foreground {
        crate::daemon::init_logging(None);
    }
    // Checked here, so that a wrong key or credentials fail the command; the
    // bucket's client (its threads) is made again in the process that serves.
    {
        let b = Bucket::open(url).map_err(|e| anyhow::anyhow!("{e}"))?;
        if b.root().map_err(|e| anyhow::anyhow!("{e}"))?.is_none() {
            anyhow::bail!("{url} holds no snapfs volume");
        }
    }
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::FSName(url.to_string()),
        fuser::MountOption::Subtype("snapfs".into()),
    ];
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        config.acl = fuser::SessionACL::All;
    }
    let ready = if foreground {
        None
    } else {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a valid out array of two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            anyhow::bail!("pipe: {}", std::io::Error::last_os_error());
        }
        // SAFETY: this process has one thread (the bucket's client was dropped above,
        // its threads joined); the parent leaves with `_exit`.
        match unsafe { libc::fork() } {
            -1 => anyhow::bail!("fork: {}", std::io::Error::last_os_error()),
            0 => {}
            _ => unsafe {
                libc::close(fds[1]);
                let mut b = 0u8;
                if libc::read(fds[0], (&mut b as *mut u8).cast(), 1) != 1 {
                    libc::_exit(1);
                }
                libc::_exit(0)
            },
        }
        // SAFETY: plain syscalls on descriptors we own.
        unsafe {
            libc::close(fds[0]);
            libc::setsid();
        }
        crate::daemon::init_logging(log.as_deref());
        Some(fds[1])
    };
    let fs = BucketFs::open(url, cache).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Signals: blocked in every thread, waited for by one, which unmounts; the
    // session then ends.
    // SAFETY: sigset operations on a zeroed, then emptied, set we own.
    let signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let mut session = fuser::Session::new(fs, mp, &config)
        .with_context(|| format!("cannot mount on {}", mp.display()))?;
    let mut unmounter = session.unmount_callable();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `signals` is an initialised set and `sig` a valid out pointer.
            unsafe { libc::sigwait(&signals, &mut sig) };
            let _ = unmounter.unmount();
        })?;
    if let Some(fd) = ready {
        // SAFETY: plain syscalls: the parent exits 0 on this byte; our output goes.
        unsafe {
            libc::write(fd, b"1".as_ptr().cast(), 1);
            libc::close(fd);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::dup2(null, 2);
            }
        }
    }
    session.run().context("serving the bucket")?;
    Ok(())
}
