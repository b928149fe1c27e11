//! The store: one directory holding a volume's redb metadata and its extent segments.
//!
//! ```text
//! STORE/
//!   snapfs.redb        metadata (tables in `schema`)
//!   segments/*.seg     extent bytes (format in `segment`)
//!   snapfs.sock        control socket of a running daemon
//! ```
//!
//! Writes go through [`Store::write`], which opens one redb write transaction and the
//! tables an operation needs, and commits with `Durability::None` (grouped, cheap) or,
//! at durable points, `Durability::Immediate` after `fdatasync` of the segments, so
//! extents are durable before any metadata that names them.

pub mod clone;
pub mod disk;
pub mod role;
pub mod schema;
pub mod segment;
pub mod snapshots;
pub mod verify;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table};

use schema::*;
use segment::Segments;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The metadata database failed.
    #[error("metadata database: {0}")]
    Db(#[from] redb::Error),
    /// A segment or store file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Something on disk does not decode or does not match its hash.
    #[error("store is damaged: {0}")]
    Corrupt(String),
    /// Another daemon holds the store.
    #[error("store is in use by another snapfs process (is it mounted?)")]
    Locked,
    /// The path is not a snapfs store.
    #[error("{0} is not a snapfs store (no snapfs.redb, and the directory is not empty)")]
    NotAStore(PathBuf),
    /// A failed data sync or commit put the store in its error state.
    #[error("the store stopped making writes durable after an I/O error ({0}); remount to recover")]
    Failed(String),
    /// Written by an older snapfs, and looked at read-only.
    #[error(
        "store format {0} is older than this snapfs's ({FORMAT_VERSION}): mount it once to upgrade it, then check it"
    )]
    Upgrade(u32),
    /// Written by a newer snapfs.
    #[error("store format {0} is not supported by this snapfs (it reads format {FORMAT_VERSION})")]
    Format(u32),
}

impl StoreError {
    /// The errno a filesystem call should answer with.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::EDQUOT,
                _ => libc::EIO,
            },
            StoreError::Db(redb::Error::Io(e)) if e.raw_os_error() == Some(libc::ENOSPC) => {
                libc::ENOSPC
            }
            _ => libc::EIO,
        }
    }
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::DatabaseError,
    redb::SetDurabilityError,
    redb::CompactionError
);

/// Whether `bs` is a block size a store may have: a power of two from 4 KiB to 1 MiB.
pub fn valid_block_size(bs: u32) -> bool {
    bs.is_power_of_two() && (4096..=1 << 20).contains(&bs)
}

/// Settings fixed when a store is created.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Logical block size, a power of two between 4 KiB and 1 MiB.
    pub block_size: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            block_size: 64 * 1024,
        }
    }
}

/// An open store.
pub struct Store {
    /// The store directory.
    pub path: PathBuf,
    /// Closed by `Drop` unless the store is in its error state (see there).
    db: std::mem::ManuallyDrop<Database>,
    /// Segment files.
    pub segs: Segments,
    /// Logical block size.
    pub block_size: u32,
    /// Random volume identity.
    pub volume_id: [u8; 16],
    /// The epoch the live tree is written in.
    pub live_epoch: u64,
    /// Epochs frozen by snapshots (including ones held for sync).
    pub snapshot_epochs: BTreeSet<u64>,
    /// The open transaction group: operations since the last commit.
    txn: std::cell::RefCell<Option<Group>>,
    /// Operations in the open group.
    pending: u32,
    /// Set when answered operations were lost to a failed commit: writes then fail.
    failed: Option<String>,
    /// Live inode records by inode (`None`: known absent), kept in step by every
    /// write: most requests read an inode, and a table lookup costs more than the
    /// rest of the request.
    inode_cache: std::collections::HashMap<u64, Option<CachedInode>>,
    /// Live inodes known to have no extended attribute (each was made with none, and
    /// none was written since), so that the kernel's questions for
    /// `security.capability` and ACLs cost no lookup. Kept in step by every write.
    xattr_free: std::collections::HashSet<u64>,
    /// Pages of data held by the blocks of live inodes (see [`BlockRec::alloc_pages`]),
    /// counted on first asking and kept in step by every write since.
    alloc_cache: std::collections::HashMap<u64, u64>,
    /// The same for inodes as snapshots froze them, by (epoch, inode): they never
    /// change.
    snap_alloc_cache: std::collections::HashMap<(u64, u64), u64>,
    /// Leaf chaining values of extents verified whole (see [`verify`]).
    outboards: std::collections::HashMap<[u8; 32], Box<[blake3::hazmat::ChainingValue]>>,
    /// The leaf values `outboards` holds, all told.
    outboard_leaves: usize,
    /// Segments compaction gave up on (damaged extents, a failed move) until remount.
    compact_skip: std::collections::HashSet<u64>,
    /// The segment id `meta::NEXT_SEGMENT` holds (or will at the group's commit).
    next_segment: u64,
    /// Extent bytes freed in the open group: (segment, offset, length).
    freed_group: Vec<(u64, u64, u32)>,
    /// Extent bytes freed by groups committed since the last durable commit.
    freed_committed: Vec<(u64, u64, u32)>,
    /// Extent bytes freed durably, with when: their disk is given back (a hole punched)
    /// once [`PUNCH_DELAY`] has passed, so a read planned before the free still finds
    /// its bytes.
    punch_queue: std::collections::VecDeque<(std::time::Instant, (u64, u64, u32))>,
    /// Extents writes took without seeing their stored copy, checked at the next
    /// durable point (see [`Unverified`]).
    unverified: Unverified,
    /// The first segment made since this store was opened: every extent in it or a
    /// later one was written by this process from bytes it had at hand (a write, a
    /// repair) or had verified (compaction), so dedup trusts it as it trusts the
    /// page cache, unless a read has found it damaged since.
    trusted_from: u64,
    /// Extents reads found damaged since the store was opened (see [`Damaged`]).
    damaged: Damaged,
    /// The segment files as [`Store::lost_extents`] last found them with nothing
    /// lost: while they are the same, nothing can have gone missing.
    lost_clean: std::sync::Mutex<Option<Vec<SegmentFile>>>,
    /// Operations were committed since the last durable commit (a durable point with
    /// nothing new commits nothing).
    undurable: bool,
    /// [`Frozen`] views alive: while any is, no hole is punched (its read transaction
    /// may still name freed extents).
    readers: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Set at unmount: [`Frozen`] views stop.
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Records whose change index row at the live epoch is written (committed or in
    /// the open group), so that rewriting one costs no second insert.
    changed: ChangeMemo,
    /// An extent whose last reference goes keeps its row, with no reference (a sync
    /// sink rolling back a part-applied session keeps what it received for the
    /// session that resumes it; [`Store::free_unreferenced`] frees them).
    pub keep_unreferenced: bool,
}

/// See [`Store::changed`]. Forgotten whenever it could be wrong: an aborted group,
/// a new live epoch, a dropped epoch, a pruning, or past [`CHANGE_MEMO_MAX`] entries.
type ChangeMemo = std::collections::HashSet<(u64, u8, u64, Box<[u8]>)>;

/// Entries [`Store::changed`] keeps at most.
const CHANGE_MEMO_MAX: usize = 1 << 20;

/// A frozen view of a store, read without its lock (fsck, status, and sync later):
/// a read transaction of everything committed when it was taken, and the segment
/// files as they were (held open, so compaction deleting one takes nothing away).
pub struct Frozen {
    /// What was committed when the view was taken.
    pub txn: redb::ReadTransaction,
    /// The segments, for reading only.
    pub segs: Segments,
    /// The store directory.
    pub path: PathBuf,
    readers: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Frozen {
    /// The flag set when the store asks its views to stop (it is being unmounted).
    pub fn cancel_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.cancel.clone()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.readers
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies of extents reads have found damaged, shared with [`Fetch`]es: a write of
/// the same bytes stores them again instead of trusting the copy. Keyed by hash, with
/// where the damaged copy lies (segment, offset): once the extent is repointed and that
/// is committed, the entry no longer matches its row and is moot. At most
/// [`DAMAGED_MAX`]; once full, no session extent is trusted unseen any more.
#[derive(Clone, Default)]
pub struct Damaged(std::sync::Arc<DamagedShared>);

#[derive(Default)]
struct DamagedShared {
    /// Set once anything was noted: until then a write need not take the lock.
    any: std::sync::atomic::AtomicBool,
    set: std::sync::Mutex<DamagedSet>,
}

#[derive(Default)]
struct DamagedSet {
    at: std::collections::HashMap<[u8; 32], (u64, u64)>,
    full: bool,
}

impl Damaged {
    fn lock(&self) -> std::sync::MutexGuard<'_, DamagedSet> {
        self.0.set.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Damaged copies remembered at most.
const DAMAGED_MAX: usize = 1 << 16;

/// Remembers that a read found the copy of extent `hash` at `rec` damaged.
fn note_damaged(damaged: &Damaged, hash: &[u8; 32], rec: &ExtentRec) {
    damaged
        .0
        .any
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut set = damaged.lock();
    if set.at.len() < DAMAGED_MAX {
        set.at.insert(*hash, (rec.segment, rec.offset));
    } else {
        set.full = true;
    }
}

/// Stored extents that writes took a reference to (a deduplicated block, or a block
/// rewritten unchanged) without seeing their stored copy, because the page cache did
/// not hold it and a write must not wait for a random read: with the bytes written.
/// Every durable point first reads these copies, in disk order, and stores the bytes
/// again where a copy differs or cannot be read, so nothing becomes durable that
/// references bytes that were not written. Bounded by [`UNVERIFIED_MAX`]; past it, a
/// write stores the bytes again at once instead.
#[derive(Default)]
pub struct Unverified {
    map: std::collections::HashMap<[u8; 32], Box<[u8]>>,
    bytes: usize,
}

/// Bytes of written data [`Unverified`] holds at most.
pub const UNVERIFIED_MAX: usize = 64 << 20;
/// Extents [`Unverified`] holds at most: each may cost the durable point a seek, under
/// the core lock.
pub const UNVERIFIED_MAX_EXTENTS: usize = 4096;

/// Stored copies read together at a durable point: at most this many bytes per read,
/// across gaps of at most [`VERIFY_GAP`] between them.
const VERIFY_RUN: u64 = 4 << 20;
const VERIFY_GAP: u64 = 64 << 10;

/// A segment file as `lost_extents` compares it: name, length, inode, modification
/// time (seconds, nanoseconds).
type SegmentFile = (std::ffi::OsString, u64, u64, i64, i64);

impl Drop for Store {
    fn drop(&mut self) {
        // Closing redb makes its commits durable: the extents they took unseen are
        // checked first (a failure puts the store in its error state).
        if self.failed.is_none() && !self.unverified.map.is_empty() {
            // Unchecked, they must not become durable: not closing leaves the file as
            // the last durable commit left it.
            if let Err(e) = self.sync() {
                self.failed = Some(format!("checking extents taken unseen failed: {e}"));
            }
        }
        // The open group borrows the database: it goes first (uncommitted, it aborts).
        drop(self.txn.get_mut().take());
        if let Some(why) = &self.failed {
            // Closing redb makes its non-durable commits durable, and after a failed
            // data sync they may name extents whose bytes were lost: leave the file as
            // the last durable commit left it (the next open recovers to that), and let
            // the process's exit release it.
            tracing::error!(
                why,
                "store closed in its error state; not committing what is pending"
            );
            return;
        }
        // SAFETY: dropped once, here, and never used after.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.db) };
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// I/O error `e` on `path`, saying which path.
pub(crate) fn io_at(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(std::io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    ))
}

/// The database file inside a store.
pub const DB_FILE: &str = "snapfs.redb";

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: the pointer and length describe `b`, which lives across the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), N, 0) };
    if n != N as isize {
        // Fall back to something unique enough for an identity, never for keys.
        let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
        b.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..N]);
    }
    b
}

impl Store {
    /// Whether `path` holds a snapfs store.
    pub fn exists(path: &Path) -> bool {
        path.join(DB_FILE).is_file()
    }

    /// Opens the store at `path`; creates it when `create` is set and the directory is
    /// missing or empty. Never modifies a directory that is not a store.
    pub fn open(path: &Path, create: Option<&StoreConfig>) -> Result<Store, StoreError> {
        Self::open_on(disk::real(), path, create)
    }

    /// [`Store::open`] on `disk`.
    pub fn open_on(
        disk: std::sync::Arc<dyn disk::Disk>,
        path: &Path,
        create: Option<&StoreConfig>,
    ) -> Result<Store, StoreError> {
        let db_path = path.join(DB_FILE);
        let fresh = !disk.exists(&db_path);
        if fresh {
            let empty = match disk.list(path) {
                Ok(names) => names.is_empty(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => return Err(io_at(path, e)),
            };
            if create.is_none() || !empty {
                return Err(StoreError::NotAStore(path.to_path_buf()));
            }
            disk.create_dir_all(path)?;
            // The new directory's entry, durable before anything in it is.
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            disk.sync_dir(parent)?;
        } else if !disk.exists(path) {
            return Err(StoreError::NotAStore(path.to_path_buf()));
        }
        let db = {
            // An existing file has every page's checksum verified at open, so a damaged
            // metadata file is refused here instead of answering with what a damaged
            // page says (and redb's panics on such a file become errors).
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                disk.open_db(&db_path, fresh)
            }))
            .map_err(|p| panicked("opening the metadata", p))?;
            match opened {
                Ok(db) => db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::Locked),
                Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                    if e.raw_os_error() == Some(libc::EWOULDBLOCK) =>
                {
                    return Err(StoreError::Locked);
                }
                // Not damage: the file cannot be reached or written (permissions, a
                // read-only filesystem, an immutable file). Say so, with the path.
                Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))) => {
                    return Err(io_at(&db_path, e));
                }
                Err(e) => {
                    return Err(StoreError::Corrupt(format!(
                        "cannot open {}: {e}",
                        db_path.display()
                    )));
                }
            }
        };
        if fresh {
            let cfg = create.cloned().unwrap_or_default();
            if !valid_block_size(cfg.block_size) {
                return Err(StoreError::Corrupt(format!(
                    "block size {} (a power of two from 4096 to 1048576)",
                    cfg.block_size
                )));
            }
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                meta.insert(meta::FORMAT, &FORMAT_VERSION.to_le_bytes()[..])?;
                let rows: [(&str, &[u8]); 5] = [
                    (meta::VOLUME_ID, &random_bytes::<16>()),
                    (meta::BLOCK_SIZE, &cfg.block_size.to_le_bytes()),
                    (meta::LIVE_EPOCH, &1u64.to_le_bytes()),
                    (meta::NEXT_INO, &(ROOT_INO + 1).to_le_bytes()),
                    (meta::CREATED, &Ts::now().sec.to_le_bytes()),
                ];
                for (name, value) in rows {
                    meta.insert(name, seal_meta(name, value).as_slice())?;
                }
                txn.open_table(VERSIONS)?;
                txn.open_table(EXTENTS)?;
                txn.open_table(SEGMENTS)?;
                txn.open_table(CHANGES)?;
                txn.open_table(ORPHANS)?;
                txn.open_table(SNAPSHOTS)?;
                txn.open_table(HOLDS)?;
            }
            txn.commit()?;
            // The metadata file's entry, before anything else is made in the store.
            disk.sync_dir(path)?;
        }
        let mut segs = Segments::open(disk.clone(), &path.join("segments"), fresh, 1)?;
        if fresh {
            disk.sync_dir(path)?;
        }
        match read_format(&db.begin_read()?)? {
            FORMAT_VERSION => {}
            1 => {
                upgrade_from_1(&db)?;
                upgrade_from_2(&db)?;
            }
            2 => upgrade_from_2(&db)?,
            3 => upgrade_from_3(&db)?,
            f => return Err(StoreError::Format(f)),
        }
        let (block_size, volume_id, live_epoch, snapshot_epochs, next_segment) = {
            let txn = db.begin_read()?;
            let meta = txn
                .open_table(META)
                .map_err(|e| StoreError::Corrupt(format!("metadata has no meta table ({e})")))?;
            let block_size = read_meta_as(&meta, meta::BLOCK_SIZE, le_u32)?;
            if !valid_block_size(block_size) {
                return Err(StoreError::Corrupt(format!("block size {block_size}")));
            }
            let volume_id: [u8; 16] = read_meta_as(&meta, meta::VOLUME_ID, |b| {
                b.try_into()
                    .map_err(|_| StoreError::Corrupt("volume id".into()))
            })?;
            let live_epoch = read_meta_as(&meta, meta::LIVE_EPOCH, le_u64)?;
            let mut epochs = BTreeSet::new();
            for row in txn.open_table(SNAPSHOTS)?.iter()? {
                let (k, v) = row?;
                epochs.insert(SnapshotRec::decode(k.value(), v.value())?.epoch);
            }
            // Never reuse a segment id: not one recorded, nor one a row names.
            let mut next = match read_meta(&meta, meta::NEXT_SEGMENT)? {
                Some(v) => le_u64(&v)?,
                None => 1,
            };
            if let Some(row) = txn.open_table(SEGMENTS)?.last()? {
                next = next.max(row.0.value().saturating_add(1));
            }
            (block_size, volume_id, live_epoch, epochs, next)
        };
        if next_segment > segs.next_id() {
            segs = Segments::open(disk.clone(), &path.join("segments"), false, next_segment)?;
        }
        let segs_first = segs.next_id();
        Ok(Store {
            path: path.to_path_buf(),
            db: std::mem::ManuallyDrop::new(db),
            segs,
            block_size,
            volume_id,
            live_epoch,
            snapshot_epochs,
            txn: std::cell::RefCell::new(None),
            pending: 0,
            failed: None,
            inode_cache: std::collections::HashMap::new(),
            xattr_free: std::collections::HashSet::new(),
            alloc_cache: std::collections::HashMap::new(),
            snap_alloc_cache: std::collections::HashMap::new(),
            outboards: std::collections::HashMap::new(),
            outboard_leaves: 0,
            next_segment,
            compact_skip: Default::default(),
            freed_group: Vec::new(),
            freed_committed: Vec::new(),
            punch_queue: std::collections::VecDeque::new(),
            unverified: Unverified::default(),
            trusted_from: segs_first,
            damaged: Damaged::default(),
            lost_clean: Default::default(),
            undurable: false,
            readers: Default::default(),
            cancel: Default::default(),
            changed: Default::default(),
            keep_unreferenced: false,
        })
    }

    /// Finishes what a crash interrupted, for a store about to be written: deletes the
    /// files of segments retired by a durable compaction (a crash may have come before
    /// the delete), unless the index still places an extent in one (then it stays, and
    /// the error is logged); and counts the bytes no extent owns (appends a crash or an
    /// aborted operation left unindexed) as dead, so compaction takes them back.
    /// Opening alone never changes anything, so fsck and status can look.
    pub fn recover(&mut self) -> Result<(), StoreError> {
        let mut live: std::collections::HashMap<u64, u64> = Default::default();
        let mut rows: std::collections::BTreeMap<u64, u64> = Default::default();
        {
            let txn = self.db.begin_read()?;
            for row in txn.open_table(EXTENTS)?.iter()? {
                let (k, v) = row?;
                let rec = ExtentRec::decode(&k.value(), v.value())?;
                *live.entry(rec.segment).or_default() += rec.footprint();
            }
            for row in txn.open_table(SEGMENTS)?.iter()? {
                let (k, v) = row?;
                rows.insert(k.value(), v.value());
            }
        }
        let mut set: Vec<(u64, Option<u64>)> = Vec::new();
        let present: BTreeSet<u64> = self.segs.ids()?.into_iter().collect();
        for (&id, &dead) in &rows {
            if dead == SEGMENT_RETIRED && !present.contains(&id) {
                set.push((id, None));
            }
        }
        for &id in &present {
            let owned = live.get(&id).copied().unwrap_or(0);
            let row = rows.get(&id).copied();
            if row == Some(SEGMENT_RETIRED) {
                if owned == 0 {
                    self.segs.remove(id)?;
                    tracing::info!(segment = id, "deleted a segment retired before a crash");
                    set.push((id, None));
                    continue;
                }
                tracing::error!(
                    segment = id,
                    owned,
                    "a segment marked retired still holds extents; keeping it"
                );
            }
            let dead = self
                .segs
                .len(id)?
                .saturating_sub(segment::SEGMENT_HEADER + owned);
            if row != Some(dead) && (dead > 0 || row.is_some()) {
                set.push((id, Some(dead)));
            }
        }
        // The deletions first, then the rows that name them go.
        self.segs.sync_removals()?;
        if !set.is_empty() {
            self.write(true, |w| {
                for (id, dead) in &set {
                    match dead {
                        Some(d) => w.t.segments.insert(*id, *d)?,
                        None => w.t.segments.remove(*id)?,
                    };
                }
                Ok(())
            })
            .map_err(StoreError::from)?;
        }
        Ok(())
    }

    /// Runs `f` as one operation of the open transaction group, and commits the group
    /// when it is large enough, or at once with `durable` (segments synced first, then
    /// `Durability::Immediate`). Commits between durable points use `Durability::None`.
    ///
    /// An operation refused with an errno ([`OpError::Errno`]) must not have written
    /// anything; the group goes on. Any other failure aborts the group: if it held
    /// operations already answered, the store goes into an error state (writes answer
    /// EIO until remount) rather than pretend they happened.
    pub fn write<R>(
        &mut self,
        durable: bool,
        f: impl FnOnce(&mut Writer<'_>) -> Result<R, OpError>,
    ) -> Result<R, OpError> {
        self.write_seen_by(durable, None, f)
    }

    /// [`Store::write`], with the operation seeing `snaps` as the snapshot epochs
    /// instead of the store's own (dropping an epoch: the store's set changes only
    /// once the drop is done, so a failure or panic leaves it as it was).
    fn write_seen_by<R>(
        &mut self,
        durable: bool,
        snaps: Option<&BTreeSet<u64>>,
        f: impl FnOnce(&mut Writer<'_>) -> Result<R, OpError>,
    ) -> Result<R, OpError> {
        if let Some(why) = &self.failed {
            tracing::error!(why, "store is in an error state; remount to recover");
            return Err(OpError::Errno(libc::EIO));
        }
        if self.txn.get_mut().is_none() {
            *self.txn.get_mut() = Some(Group::begin(&self.db)?);
        }
        let res = {
            let group = self.txn.get_mut().as_mut().expect("begun above");
            let mut w = Writer {
                t: &mut group.tables,
                segs: &mut self.segs,
                live: self.live_epoch,
                snaps: snaps.unwrap_or(&self.snapshot_epochs),
                inodes: &self.inode_cache,
                inode_log: Vec::new(),
                xattr_log: Vec::new(),
                alloc_log: Vec::new(),
                changed: &mut self.changed,
                freed: Vec::new(),
                unverified: &mut self.unverified,
                trusted_from: self.trusted_from,
                damaged: &self.damaged,
                keep_unreferenced: self.keep_unreferenced,
            };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut w)));
            // A new segment's id is recorded in the group that first indexes into it.
            let mut recorded = Ok(None);
            let kept = match &r {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => matches!(e, OpError::Errno(_)),
                Err(_) => false,
            };
            if kept && w.segs.next_id() > self.next_segment {
                let next = w.segs.next_id();
                let row = seal_meta(meta::NEXT_SEGMENT, &next.to_le_bytes());
                recorded =
                    w.t.meta
                        .insert(meta::NEXT_SEGMENT, row.as_slice())
                        .map(|_| Some(next));
            }
            (r, w.inode_log, w.xattr_log, w.alloc_log, w.freed, recorded)
        };
        let (res, log, xlog, alog, freed, recorded) = res;
        match recorded {
            Ok(Some(next)) => self.next_segment = next,
            Ok(None) => {}
            Err(e) => {
                let e = StoreError::from(e);
                self.abort_group(&format!("recording a segment id failed: {e}"));
                return Err(e.into());
            }
        }
        let res = match res {
            Ok(r) => r,
            Err(panic) => {
                // Part of an operation may be in the group: it must never be committed.
                self.abort_group("an operation panicked inside a transaction group");
                std::panic::resume_unwind(panic);
            }
        };
        // The group keeps whatever the operation wrote (a group that fails is aborted
        // below, and the caches dropped with it).
        if !matches!(res, Err(OpError::Store(_))) {
            self.freed_group.extend(freed);
            if self.inode_cache.len() > INODE_CACHE_MAX {
                self.inode_cache.clear();
            }
            self.inode_cache.extend(log);
            if self.xattr_free.len() > INODE_CACHE_MAX {
                self.xattr_free.clear();
            }
            for (ino, none) in xlog {
                if none {
                    self.xattr_free.insert(ino);
                } else {
                    self.xattr_free.remove(&ino);
                }
            }
            for (ino, d) in alog {
                if let Some(n) = self.alloc_cache.get_mut(&ino) {
                    *n = n.saturating_add_signed(d);
                }
            }
        }
        match res {
            Ok(r) => {
                self.pending += 1;
                if durable {
                    self.commit_group(true)?;
                } else if self.pending >= GROUP_OPS {
                    self.commit_group(false)?;
                }
                Ok(r)
            }
            Err(e @ OpError::Errno(_)) => Err(e),
            Err(e) => {
                self.abort_group(&format!(
                    "an operation failed inside a transaction group: {e}"
                ));
                Err(e)
            }
        }
    }

    /// Aborts the open group after a failed operation; if it held answered ones, the
    /// store goes into the error state with `why`.
    fn abort_group(&mut self, why: &str) {
        if let Some(group) = self.txn.get_mut().take() {
            let _ = group.finish().abort();
        }
        // An aborted group may have held any record: forget them all.
        self.inode_cache.clear();
        self.alloc_cache.clear();
        self.changed.clear();
        self.xattr_free.clear();
        self.freed_group.clear();
        // The group may have held the segment id row.
        self.next_segment = 0;
        if self.pending > 0 {
            tracing::error!(lost = self.pending, "{why}");
            self.failed = Some(why.to_string());
        }
        self.pending = 0;
    }

    /// Commits the open transaction group, if any; with `durable`, makes everything
    /// committed so far durable (even with no group open).
    pub fn commit_group(&mut self, durable: bool) -> Result<(), StoreError> {
        if durable && self.failed.is_none() {
            self.verify_unverified()?;
        }
        if durable && self.failed.is_none() && self.pending == 0 && !self.undurable {
            // Nothing since the last durable point: no durable commit. An open group
            // holds only reads; it is closed (a cheap commit that changes nothing), so
            // that no write transaction stays open. Appends of refused operations are
            // still synced, and a data sync that failed through a handle still fails
            // this one.
            self.commit_group(false)?;
            if let Err(e) = self.segs.sync() {
                self.fail_durability(format!("a segment data sync failed: {e}"));
                return Err(e);
            }
            self.punch_freed(false);
            return Ok(());
        }
        let txn = self.txn.get_mut().take();
        let pending = std::mem::take(&mut self.pending);
        let mut txn = match (txn, durable) {
            (Some(g), _) => g.finish(),
            (None, true) => self.db.begin_write()?,
            (None, false) => return Ok(()),
        };
        if durable && let Some(why) = &self.failed {
            let _ = txn.abort();
            self.freed_group.clear();
            return Err(StoreError::Failed(why.clone()));
        }
        let res = (|| {
            if durable {
                if let Err(e) = self.segs.sync() {
                    self.fail_durability(format!("a segment data sync failed: {e}"));
                    return Err(e);
                }
                txn.set_durability(Durability::Immediate)?;
            } else {
                txn.set_durability(Durability::None)?;
            }
            txn.commit()?;
            Ok::<(), StoreError>(())
        })();
        match &res {
            Ok(()) => {
                self.freed_committed.append(&mut self.freed_group);
                self.undurable = !durable && (self.undurable || pending > 0);
                if durable {
                    let now = std::time::Instant::now();
                    for f in self.freed_committed.drain(..) {
                        self.punch_queue.push_back((now, f));
                    }
                    self.punch_freed(false);
                }
            }
            Err(e) => {
                self.freed_group.clear();
                self.next_segment = 0;
                // The group is gone with whatever it wrote: the caches of it too.
                self.inode_cache.clear();
                self.alloc_cache.clear();
                self.xattr_free.clear();
                if pending > 0 {
                    let why = format!("committing {pending} operations failed: {e}");
                    tracing::error!("{why}");
                    self.failed = Some(why);
                }
            }
        }
        res
    }

    /// Reads the stored copies of the extents writes took unseen (see [`Unverified`]),
    /// in disk order, and stores again the written bytes of each copy that differs or
    /// cannot be read, repointing its extent, as one operation of the open group.
    fn verify_unverified(&mut self) -> Result<(), StoreError> {
        if self.unverified.map.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.unverified);
        let res = self.write(false, |w| {
            // Where each copy is now (compaction may have moved it; an extent freed
            // since needs nothing).
            let mut at = Vec::with_capacity(pending.map.len());
            for (hash, data) in &pending.map {
                if let Some(row) = redb::ReadableTable::get(&w.t.extents, *hash)? {
                    at.push((ExtentRec::decode(hash, row.value())?, hash, &data[..]));
                }
            }
            at.sort_unstable_by_key(|(rec, _, _)| (rec.segment, rec.offset));
            let mut repair: Vec<([u8; 32], &[u8])> = Vec::new();
            let mut i = 0;
            while i < at.len() {
                // A run of copies close together in one segment, read at once.
                let (first, _, _) = at[i];
                let mut j = i + 1;
                let mut end = first.offset + first.len as u64;
                while j < at.len() {
                    let rec = &at[j].0;
                    if rec.segment != first.segment
                        || rec.offset > end + VERIFY_GAP
                        || rec.offset + rec.len as u64 - first.offset > VERIFY_RUN
                    {
                        break;
                    }
                    end = end.max(rec.offset + rec.len as u64);
                    j += 1;
                }
                let run = w
                    .segs
                    .read(first.segment, first.offset, (end - first.offset) as u32);
                for (rec, hash, data) in &at[i..j] {
                    let stored = match &run {
                        Ok(bytes) => {
                            let a = (rec.offset - first.offset) as usize;
                            Ok(bytes.get(a..a + rec.len as usize) == Some(*data))
                        }
                        // One unreadable copy must not condemn its neighbours.
                        Err(_) => w
                            .segs
                            .read(rec.segment, rec.offset, rec.len)
                            .map(|s| s == *data),
                    };
                    match stored {
                        Ok(true) => continue,
                        Ok(_) => tracing::error!(
                            extent = hex(&hash[..]),
                            segment = rec.segment,
                            offset = rec.offset,
                            "stored extent is damaged; storing it again from a write of the same bytes"
                        ),
                        Err(e) => tracing::error!(
                            extent = hex(&hash[..]),
                            error = %e,
                            "stored extent cannot be read; storing it again"
                        ),
                    }
                    repair.push((**hash, *data));
                }
                i = j;
            }
            w.store_again(&repair)?;
            tracing::debug!(
                checked = pending.map.len(),
                stored_again = repair.len(),
                "checked extents writes took unseen"
            );
            Ok(())
        });
        if let Err(e) = res {
            // Still unchecked: the durable point fails, and the next one tries again.
            for (hash, data) in pending.map {
                self.unverified.insert(hash, data);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Gives back the disk under extents freed by durable commits: those freed at
    /// least [`PUNCH_DELAY`] ago, or all of them with `now` (a full disk, unmount).
    /// Returns the bytes of extents whose space was given back.
    pub fn punch_freed(&mut self, now: bool) -> u64 {
        // A hole costs the filesystem work (and the disk a discard, on some): worth it
        // only while space is short. Otherwise compaction gives the space back in bulk.
        // A volume with a size counts what its files take: space freed under it is
        // the volume's to use again, so it is always given back.
        if !now
            && self.segs.limit().is_none()
            && self.segs.room_for(PUNCH_WHEN_FREE_BELOW).unwrap_or(true)
        {
            self.punch_queue.clear();
            return 0;
        }
        // A frozen view may still read what was freed after it was taken.
        if self.readers.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return 0;
        }
        let t = std::time::Instant::now();
        let mut bytes = 0;
        while let Some((at, (seg, off, len))) = self.punch_queue.front().copied() {
            if !now && t.duration_since(at) < PUNCH_DELAY {
                break;
            }
            self.punch_queue.pop_front();
            match self.segs.punch(seg, off, len as u64) {
                Ok(()) => bytes += len as u64,
                Err(e) => {
                    tracing::warn!(segment = seg, error = %e, "cannot give back freed extent space")
                }
            }
        }
        bytes
    }

    /// A [`Frozen`] view of everything committed so far (the open group is committed
    /// first, not durably). Take it under the core lock, then read it without.
    pub fn frozen(&mut self) -> Result<Frozen, StoreError> {
        if let Err(e) = self.commit_group(false) {
            // A full disk, say: the view shows the last commit.
            tracing::warn!(error = %e, "a frozen view shows the last commit");
        }
        let txn = self.db.begin_read()?;
        let segs = self.segs.reader()?;
        self.readers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Frozen {
            txn,
            segs,
            path: self.path.clone(),
            readers: self.readers.clone(),
            cancel: self.cancel.clone(),
        })
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.commit_group(true)
    }

    /// Handles on the segment files a `sync` would `fdatasync` now.
    pub fn unsynced_segments(&mut self) -> Vec<segment::SyncHandle> {
        self.segs.unsynced_handles()
    }

    /// Puts the store in the error state: a data sync failed, so what was written
    /// since the last durable point may be lost, and no later commit may claim it is
    /// durable. Writes and durable points answer EIO until the store is remounted.
    pub fn fail_durability(&mut self, why: String) {
        tracing::error!("{why}; the store refuses writes until remounted");
        if self.failed.is_none() {
            self.failed = Some(why);
        }
    }

    /// Rewrites segments that are mostly dead: the extents the index places in them
    /// move to the active segment, a durable commit points the index at the new copies
    /// and retires the segment, and only then is its file deleted. The index, not the
    /// segment's own headers, says what must move, so a torn or damaged extent in a
    /// segment can never make a live one be left behind. Segments with the least to
    /// move go first (a wholly dead one needs no room at all), so a full disk gets its
    /// space back. Returns the bytes of disk given back.
    pub fn compact(&mut self) -> Result<u64, StoreError> {
        // Extents taken unseen are checked first: a repair moves its extent, and must
        // not do so under the compaction of its segment.
        self.verify_unverified()?;
        // A frozen view holds the files open: deleting one would give nothing back,
        // and the copies would take more room. Compaction waits for the views to go.
        if self.readers.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return Ok(0);
        }
        let active = self.segs.active();
        // Compaction runs in transactions of its own, so a failure loses nothing else.
        self.commit_group(false)?;
        let mut roll = false;
        let mut candidates: std::collections::BTreeMap<u64, u64> = Default::default();
        {
            let txn = self.db.begin_read()?;
            let t = txn.open_table(SEGMENTS)?;
            for row in t.iter()? {
                let (k, v) = row?;
                let (id, dead) = (k.value(), v.value());
                if dead == SEGMENT_RETIRED {
                    continue;
                }
                let size = match self.segs.len(id) {
                    Ok(l) => l,
                    Err(_) => continue,
                };
                if dead * 2 < size.saturating_sub(segment::SEGMENT_HEADER) {
                    continue;
                }
                // A mostly dead active segment (files rewritten in place) is closed
                // first, so that overwriting never grows the store without bound.
                if id == active {
                    // Small stores roll too once their disk runs short.
                    if size < ROLL_DEAD_ACTIVE
                        && self.segs.room_for(ROLL_DEAD_ACTIVE).unwrap_or(true)
                    {
                        continue;
                    }
                    roll = true;
                }
                candidates.insert(id, size);
            }
        }
        if candidates.is_empty() {
            return Ok(0);
        }
        // One pass over the index finds every extent placed in a candidate.
        let mut placed: std::collections::HashMap<u64, Vec<([u8; 32], ExtentRec)>> =
            candidates.keys().map(|id| (*id, Vec::new())).collect();
        {
            let txn = self.db.begin_read()?;
            for row in txn.open_table(EXTENTS)?.iter()? {
                let (k, v) = row?;
                let rec = ExtentRec::decode(&k.value(), v.value())?;
                if let Some(list) = placed.get_mut(&rec.segment) {
                    list.push((k.value(), rec));
                }
            }
        }
        if roll {
            self.segs.roll();
        }
        let mut order: Vec<(u64, u64, u64)> = candidates
            .iter()
            .map(|(id, size)| {
                let live = placed[id].iter().map(|(_, r)| r.footprint()).sum();
                (live, *id, *size)
            })
            .collect();
        order.sort_unstable();
        let mut given_back = 0;
        for (live, id, size) in order {
            if self.compact_skip.contains(&id) {
                continue;
            }
            // Compaction gives space back in the end: only the disk's own room counts
            // here, not the volume's size.
            if live > 0 && !self.segs.room_on_disk(live).unwrap_or(false) {
                tracing::debug!(segment = id, live, "no room to compact this segment now");
                continue;
            }
            let mut exts = placed.remove(&id).unwrap_or_default();
            exts.sort_unstable_by_key(|(_, r)| r.offset);
            // Damaged extents stay where they are (fsck names them; a write of the same
            // bytes repairs them), and so does their segment; the intact ones move.
            let res: Result<usize, OpError> = self.write(true, |w| {
                let mut damaged = 0;
                for (hash, rec) in &exts {
                    let data = match w.segs.read(id, rec.offset, rec.len) {
                        Ok(d) if check_whole(hash, rec, &d).is_ok() => d,
                        Ok(_) | Err(StoreError::Corrupt(_)) => {
                            note_damaged(w.damaged, hash, rec);
                            damaged += 1;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let (seg, off) = w.segs.append(hash, &data)?;
                    // The row as it is now (the pass above read a committed state).
                    let mut now = w.extent(hash)?;
                    if (now.segment, now.offset) != (rec.segment, rec.offset) {
                        return Err(StoreError::Corrupt(format!(
                            "extent {} moved while segment {id:016x} was compacted",
                            hex(hash)
                        ))
                        .into());
                    }
                    now.segment = seg;
                    now.offset = off;
                    w.t.extents.insert(*hash, now.encode(hash).as_slice())?;
                }
                if damaged == 0 {
                    w.t.segments.insert(id, SEGMENT_RETIRED)?;
                }
                Ok(damaged)
            });
            match res {
                Ok(damaged) if damaged > 0 => {
                    tracing::warn!(
                        segment = id,
                        damaged,
                        "kept a segment with damaged extents (run fsck --read-data)"
                    );
                    self.compact_skip.insert(id);
                }
                Ok(_) => {
                    self.segs.remove(id)?;
                    // Lost in a crash, the row is found by the next `recover`.
                    self.write(false, |w| Ok(w.t.segments.remove(id).map(|_| ())?))
                        .map_err(StoreError::from)?;
                    self.commit_group(false)?;
                    given_back += size;
                }
                Err(e) => {
                    // What was appended before the failure is not indexed: not tried
                    // again this mount, so that a failing segment cannot fill the disk.
                    self.compact_skip.insert(id);
                    self.segs.sync_removals()?;
                    return Err(e.into());
                }
            }
        }
        self.segs.sync_removals()?;
        Ok(given_back)
    }

    /// The live inode record of `ino` (payload), from the cache or the table.
    pub fn live_inode(&mut self, ino: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.inode_cache.get(&ino) {
            return Ok(v.as_ref().map(|c| c.payload.clone()));
        }
        let v = {
            let txn = self.read_txn()?;
            let t = txn.versions();
            match newest(t, RecKey::inode(ino), self.live_epoch)? {
                Some((epoch, Some(payload))) => Some(CachedInode { epoch, payload }),
                _ => None,
            }
        };
        if self.inode_cache.len() > INODE_CACHE_MAX {
            self.inode_cache.clear();
        }
        let payload = v.as_ref().map(|c| c.payload.clone());
        self.inode_cache.insert(ino, v);
        Ok(payload)
    }

    /// Pages of data the blocks of `ino` hold at `epoch` (counted once; the live
    /// tree's kept in step after, a snapshot's never change).
    pub fn allocated_pages(&mut self, ino: u64, epoch: u64) -> Result<u64, StoreError> {
        let live = epoch == self.live_epoch;
        let cached = if live {
            self.alloc_cache.get(&ino)
        } else {
            self.snap_alloc_cache.get(&(epoch, ino))
        };
        if let Some(n) = cached {
            return Ok(*n);
        }
        let mut n = 0;
        {
            let txn = self.read_txn()?;
            scan_visible(
                txn.versions(),
                ino,
                KIND_BLOCK,
                0..=u64::MAX,
                epoch,
                |_, _, p| {
                    n += BlockRec::decode(p)?.alloc_pages();
                    Ok(true)
                },
            )?;
        }
        if live {
            if self.alloc_cache.len() > INODE_CACHE_MAX {
                self.alloc_cache.clear();
            }
            self.alloc_cache.insert(ino, n);
        } else {
            if self.snap_alloc_cache.len() > INODE_CACHE_MAX {
                self.snap_alloc_cache.clear();
            }
            self.snap_alloc_cache.insert((epoch, ino), n);
        }
        Ok(n)
    }

    /// Whether live inode `ino` is known to have no extended attribute (when false,
    /// it may have some: look).
    pub fn xattr_free(&self, ino: u64) -> bool {
        self.xattr_free.contains(&ino)
    }

    /// Shrinks the metadata file after many records went away (snapshot deletion,
    /// unmount). Commits the open group durably first.
    pub fn compact_metadata(&mut self) -> Result<(), StoreError> {
        self.commit_group(true)?;
        match self.db.compact() {
            Ok(_) => Ok(()),
            // A frozen view (fsck, status) is reading: the file shrinks next time.
            Err(redb::CompactionError::TransactionInProgress) => {
                tracing::info!("metadata file not compacted: a read is in progress");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Asks every [`Frozen`] view to stop (fsck checks between extents) and waits up
    /// to `wait` for them to go. Returns whether none is left.
    pub fn stop_views(
        readers: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
        cancel: &std::sync::Arc<std::sync::atomic::AtomicBool>,
        wait: std::time::Duration,
    ) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        cancel.store(true, SeqCst);
        let until = std::time::Instant::now() + wait;
        while readers.load(SeqCst) > 0 {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }

    /// The counter of live [`Frozen`] views and the flag that asks them to stop, to
    /// wait on without the store.
    pub fn view_handles(
        &self,
    ) -> (
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        (self.readers.clone(), self.cancel.clone())
    }

    /// Whether the live tree is the root directory alone.
    pub fn live_is_empty(&self) -> Result<bool, StoreError> {
        let txn = self.read_txn()?;
        let mut other = false;
        for_each_visible(txn.versions(), self.live_epoch, |ino, kind, _, _, _| {
            if ino != ROOT_INO || kind != KIND_INODE {
                other = true;
            }
            Ok(())
        })?;
        Ok(!other)
    }

    /// Whether the store holds no data its block size shapes: its live tree is an
    /// empty root, it has no snapshot (deleted or held ones included), and it is no
    /// demoted or promoted store. (Extents it may hold, staged by a session cut
    /// short, are bytes named by their hash, whatever the size.) A replica that
    /// holds no data takes its source's block size at its next session.
    pub fn holds_no_data(&self) -> Result<bool, StoreError> {
        Ok(self.demoted_at()?.is_none()
            && self.promotion()?.is_none()
            && self.snapshot_epochs.is_empty()
            && self.snapshot_list(true)?.is_empty()
            && self.live_is_empty()?)
    }

    /// [`Store::holds_no_data`], and it is no replica either: a mount may give it
    /// another block size.
    pub fn holds_nothing(&self) -> Result<bool, StoreError> {
        Ok(self.replica_of()?.is_none() && self.holds_no_data()?)
    }

    /// Gives the store block size `bs`, durably (only for a store that holds no
    /// data: see [`Store::holds_no_data`]; the caller has checked).
    pub fn take_block_size(&mut self, bs: u32) -> Result<(), OpError> {
        self.write(true, |w| Ok(w.set_block_size(bs)?))?;
        self.block_size = bs;
        Ok(())
    }

    /// The volume this store is a replica of (`snapfs sync`), if it is one.
    pub fn replica_of(&self) -> Result<Option<[u8; 16]>, StoreError> {
        let txn = self.read_txn()?;
        match read_meta(&txn.0.meta, meta::REPLICA_OF)? {
            Some(v) => Ok(Some(v.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt("meta row replica_of is not 16 bytes".into())
            })?)),
            None => Ok(None),
        }
    }

    /// A view of the current state, including the open transaction group (it begins
    /// one if none is open). Hold it briefly: a write needs the group back.
    pub fn read_txn(&self) -> Result<View<'_>, StoreError> {
        if self.txn.borrow().is_none() {
            let group = Group::begin(&self.db)?;
            *self.txn.borrow_mut() = Some(group);
        }
        Ok(View(std::cell::Ref::map(self.txn.borrow(), |g| {
            &*g.as_ref().expect("begun above").tables
        })))
    }

    /// Frees received extents no record took (see [`Writer::append_received`]): what
    /// interrupted sessions stored for snapshots that never came. Returns how many.
    pub fn free_unreferenced(&mut self) -> Result<u64, OpError> {
        let mut idle = Vec::new();
        {
            let txn = self.read_txn()?;
            // Only a store some session left such rows in is looked through.
            if txn.meta().get(meta::UNREFERENCED)?.is_none() {
                return Ok(0);
            }
            for row in txn.extents().iter()? {
                let (k, v) = row?;
                let hash = k.value();
                if ExtentRec::decode(&hash, v.value())?.refs == 0 {
                    idle.push(hash);
                }
            }
        }
        for chunk in idle.chunks(4096) {
            self.write(false, |w| {
                for h in chunk {
                    let rec = w.extent(h)?;
                    w.free_extent(h, &rec)?;
                }
                Ok(())
            })?;
        }
        self.write(false, |w| {
            w.t.meta.remove(meta::UNREFERENCED)?;
            Ok(())
        })?;
        Ok(idle.len() as u64)
    }

    /// Extents whose stored copy is known gone without reading any data: its segment
    /// file missing or too short to hold it, or a read found it damaged since the
    /// store was opened. One pass over the extent index, one `stat` per segment;
    /// none when the segment files are as the last pass that found nothing left them
    /// (an extent is stored by growing a file or making one, so every extent indexed
    /// since lies where that pass did not look only if some file changed).
    pub fn lost_extents(&self) -> Result<std::collections::HashSet<[u8; 32]>, StoreError> {
        let mut lost = std::collections::HashSet::new();
        let damaged = self.damaged.lock().at.clone();
        let seen = self.segment_files();
        let mut clean = self.lost_clean.lock().unwrap_or_else(|p| p.into_inner());
        if damaged.is_empty() && seen.is_some() && *clean == seen {
            return Ok(lost);
        }
        *clean = None;
        let mut lens: std::collections::HashMap<u64, Option<u64>> =
            std::collections::HashMap::new();
        let txn = self.read_txn()?;
        for row in txn.extents().iter()? {
            let (k, v) = row?;
            let hash = k.value();
            let rec = ExtentRec::decode(&hash, v.value())?;
            let len = *lens.entry(rec.segment).or_insert_with(|| {
                std::fs::metadata(segment::segment_path(self.segs.dir(), rec.segment))
                    .ok()
                    .map(|m| m.len())
            });
            if len.is_none_or(|l| rec.offset + rec.len as u64 > l)
                || damaged.get(&hash) == Some(&(rec.segment, rec.offset))
            {
                lost.insert(hash);
            }
        }
        if lost.is_empty() && damaged.is_empty() {
            *clean = seen;
        }
        Ok(lost)
    }

    /// Every segment file: name, length, inode, modification time (s, ns); `None`
    /// when the directory cannot be read.
    fn segment_files(&self) -> Option<Vec<SegmentFile>> {
        use std::os::unix::fs::MetadataExt;
        let mut v = Vec::new();
        for e in std::fs::read_dir(self.segs.dir()).ok()? {
            let e = e.ok()?;
            let m = e.metadata().ok()?;
            v.push((e.file_name(), m.len(), m.ino(), m.mtime(), m.mtime_nsec()));
        }
        v.sort();
        Some(v)
    }

    /// The database, for checks that walk whole tables (commit the group first).
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Reads the bytes of extent `rec`, re-verifying its hash; with `leaves`, an extent that splits into leaves is
    /// checked through them and their values are kept for later small reads (four
    /// times the hashing of a plain check, so only when a small read asks).
    fn read_extent_keeping(
        &mut self,
        hash: &[u8; 32],
        rec: &ExtentRec,
        leaves: bool,
    ) -> Result<Vec<u8>, StoreError> {
        let data = self.segs.read(rec.segment, rec.offset, rec.len)?;
        self.check_extent(hash, rec, &data, leaves)?;
        Ok(data)
    }

    /// Extent `rec` whole, to read and verify later without the store (see [`Fetch`]).
    pub fn fetch(&mut self, hash: &[u8; 32], rec: &ExtentRec) -> Result<Fetch, StoreError> {
        Ok(Fetch {
            file: self.segs.shared(rec.segment)?.clone(),
            hash: *hash,
            rec: *rec,
            damaged: self.damaged.clone(),
        })
    }

    /// Checks `data`, read from extent `rec`, against `hash`; see
    /// [`Store::read_extent_keeping`] for `leaves`.
    fn check_extent(
        &mut self,
        hash: &[u8; 32],
        rec: &ExtentRec,
        data: &[u8],
        leaves: bool,
    ) -> Result<(), StoreError> {
        if leaves && verify::eligible(data.len()) {
            // One pass gives both the check and the leaf values later small reads use.
            let cvs = verify::leaf_cvs(data);
            if verify::root_of(&cvs) != *hash {
                note_damaged(&self.damaged, hash, rec);
                return Err(mismatch(hash, rec));
            }
            if self.outboard_leaves + cvs.len() > OUTBOARD_LEAVES_MAX {
                self.outboards.clear();
                self.outboard_leaves = 0;
            }
            self.outboard_leaves += cvs.len();
            if let Some(old) = self.outboards.insert(*hash, cvs.into_boxed_slice()) {
                self.outboard_leaves -= old.len();
            }
        } else {
            if let Err(e) = check_whole(hash, rec, data) {
                note_damaged(&self.damaged, hash, rec);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reads bytes `[start, end)` of extent `rec` into the front of `dst`, verified:
    /// through the leaves that hold them when the extent's leaf values are known, else
    /// by reading it whole. Returns how many bytes it read (fewer at the extent's end).
    pub fn read_extent_into(
        &mut self,
        hash: &[u8; 32],
        rec: &ExtentRec,
        start: usize,
        end: usize,
        dst: &mut [u8],
    ) -> Result<usize, StoreError> {
        let end = end.min(rec.len as usize);
        if start >= end {
            return Ok(0);
        }
        let n = end - start;
        if start == 0 && end == rec.len as usize {
            // The whole extent, straight into place.
            self.fetch(hash, rec)?.run(dst)?;
        } else {
            dst[..n].copy_from_slice(&self.read_extent_range(hash, rec, start, end)?);
        }
        Ok(n)
    }

    /// Reads bytes `[start, end)` of extent `rec`, verified: through the leaves that
    /// hold them when the extent's leaf values are known, else by reading it whole.
    pub fn read_extent_range(
        &mut self,
        hash: &[u8; 32],
        rec: &ExtentRec,
        start: usize,
        end: usize,
    ) -> Result<Vec<u8>, StoreError> {
        let end = end.min(rec.len as usize);
        if start >= end {
            return Ok(Vec::new());
        }
        let partial = start > 0 || end < rec.len as usize;
        let known =
            partial && verify::eligible(rec.len as usize) && self.outboards.contains_key(hash);
        if !known {
            let whole = self.read_extent_keeping(hash, rec, partial)?;
            return Ok(if partial {
                whole[start..end].to_vec()
            } else {
                whole
            });
        }
        let (first, last) = (start / verify::LEAF, (end - 1) / verify::LEAF);
        let at = first * verify::LEAF;
        let bytes = self.segs.read(
            rec.segment,
            rec.offset + at as u64,
            ((last - first + 1) * verify::LEAF) as u32,
        )?;
        let cvs = &self.outboards[hash];
        for (i, leaf) in bytes.chunks(verify::LEAF).enumerate() {
            if verify::leaf_cv(first + i, leaf) != cvs[first + i] {
                note_damaged(&self.damaged, hash, rec);
                return Err(StoreError::Corrupt(format!(
                    "extent {} in segment {:016x}: bytes {}..{} do not match its hash",
                    hex(hash),
                    rec.segment,
                    (first + i) * verify::LEAF,
                    (first + i + 1) * verify::LEAF
                )));
            }
        }
        Ok(bytes[start - at..end - at].to_vec())
    }
}

/// The store's format, from its bare `format` row.
pub fn read_format(txn: &redb::ReadTransaction) -> Result<u32, StoreError> {
    let meta = txn
        .open_table(META)
        .map_err(|e| StoreError::Corrupt(format!("metadata has no meta table ({e})")))?;
    match meta.get(meta::FORMAT)? {
        Some(v) => le_u32(v.value()),
        None => Err(StoreError::Corrupt("meta row format is missing".into())),
    }
}

/// A `versions` key, owned.
type OwnedKey = (u64, u8, u64, Vec<u8>, u64);

/// Rows moved per step of [`upgrade_from_1`].
const UPGRADE_BATCH: usize = 4096;

/// Upgrades a format 1 store to format 2 in one durable commit: every value of
/// `versions`, `extents`, `snapshots` and `meta` gets its checksum.
fn upgrade_from_1(db: &Database) -> Result<(), StoreError> {
    use std::ops::Bound;
    tracing::info!("upgrading the store to format 2 (record checksums)");
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let rows: Vec<(String, Vec<u8>)> = meta
            .iter()?
            .map(|r| r.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
            .collect::<Result<_, _>>()?;
        for (k, v) in rows {
            if k != meta::FORMAT {
                meta.insert(k.as_str(), seal_meta(&k, &v).as_slice())?;
            }
        }
        meta.insert(meta::FORMAT, &2u32.to_le_bytes()[..])?;

        let mut versions = txn.open_table(VERSIONS)?;
        let mut after: Option<OwnedKey> = None;
        loop {
            let batch: Vec<(OwnedKey, Vec<u8>)> = {
                let lower = match &after {
                    Some(k) => Bound::Excluded((k.0, k.1, k.2, k.3.as_slice(), k.4)),
                    None => Bound::Unbounded,
                };
                versions
                    .range((lower, Bound::Unbounded))?
                    .take(UPGRADE_BATCH)
                    .map(|r| {
                        r.map(|(k, v)| {
                            let (a, b, c, d, e) = k.value();
                            ((a, b, c, d.to_vec(), e), v.value().to_vec())
                        })
                    })
                    .collect::<Result<_, _>>()?
            };
            let Some(last) = batch.last().map(|(k, _)| k.clone()) else {
                break;
            };
            for (k, v) in batch {
                let key = (k.0, k.1, k.2, k.3.as_slice(), k.4);
                let payload = match v.split_first() {
                    Some((&TAG_PRESENT, p)) => Some(p),
                    Some((&TAG_TOMBSTONE, _)) => None,
                    _ => {
                        return Err(StoreError::Corrupt(format!(
                            "record of inode {} has no tag",
                            k.0
                        )));
                    }
                };
                versions.insert(key, seal_version(key, payload).as_slice())?;
            }
            after = Some(last);
        }

        let mut extents = txn.open_table(EXTENTS)?;
        let mut after: Option<[u8; 32]> = None;
        loop {
            let batch: Vec<([u8; 32], ExtentRec)> = {
                let lower = match after {
                    Some(h) => Bound::Excluded(h),
                    None => Bound::Unbounded,
                };
                let mut out = Vec::new();
                for r in extents
                    .range::<[u8; 32]>((lower, Bound::Unbounded))?
                    .take(UPGRADE_BATCH)
                {
                    let (k, v) = r?;
                    out.push((k.value(), ExtentRec::decode_bare(v.value())?));
                }
                out
            };
            let Some(last) = batch.last().map(|(h, _)| *h) else {
                break;
            };
            for (h, rec) in batch {
                extents.insert(h, rec.encode(&h).as_slice())?;
            }
            after = Some(last);
        }

        let mut snaps = txn.open_table(SNAPSHOTS)?;
        let rows: Vec<(String, SnapshotRec)> = {
            let mut out = Vec::new();
            for r in snaps.iter()? {
                let (k, v) = r?;
                out.push((k.value().to_string(), SnapshotRec::decode_bare(v.value())?));
            }
            out
        };
        for (name, rec) in rows {
            snaps.insert(name.as_str(), rec.encode(&name).as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Upgrades a format 2 store to format 3 in one durable commit: the per-inode change
/// index becomes a per-record one (each inode's versions in the epochs it names), and
/// the `holds` table is made.
fn upgrade_from_2(db: &Database) -> Result<(), StoreError> {
    tracing::info!(
        "upgrading the store to format {FORMAT_VERSION} (per-record change index, holds)"
    );
    let txn = db.begin_write()?;
    {
        let old: Vec<(u64, u64)> = {
            let t = txn.open_table(OLD_CHANGES)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                out.push(row?.0.value());
            }
            out
        };
        // Rows at or below the oldest snapshot (kept or deleting) are never needed;
        // with no snapshot, none is.
        let mut oldest = None::<u64>;
        for row in txn.open_table(SNAPSHOTS)?.iter()? {
            let (k, v) = row?;
            let e = SnapshotRec::decode(k.value(), v.value())?.epoch;
            oldest = Some(oldest.map_or(e, |o| o.min(e)));
        }
        let mut by_ino: std::collections::BTreeMap<u64, BTreeSet<u64>> = Default::default();
        for (epoch, ino) in old {
            if oldest.is_some_and(|o| epoch > o) {
                by_ino.entry(ino).or_default().insert(epoch);
            }
        }
        let versions = txn.open_table(VERSIONS)?;
        let mut changes = txn.open_table(CHANGES)?;
        for (ino, epochs) in by_ino {
            for row in versions.range((ino, 0u8, 0u64, &[][..], 0u64)..)? {
                let (k, _) = row?;
                let (kino, kind, sub, name, epoch) = k.value();
                if kino != ino {
                    break;
                }
                if epochs.contains(&epoch) {
                    changes.insert((epoch, ino, kind, sub, name), ())?;
                }
            }
        }
        txn.open_table(HOLDS)?;
        let mut meta = txn.open_table(META)?;
        meta.insert(meta::FORMAT, &FORMAT_VERSION.to_le_bytes()[..])?;
    }
    txn.delete_table(OLD_CHANGES)?;
    txn.commit()?;
    Ok(())
}

/// Upgrades a format 3 store to format 4, which adds record forms only (inode flags
/// after a non-symlink's record, unwritten block bases): the number changes, so that
/// an older snapfs, which would misread them, refuses the store.
fn upgrade_from_3(db: &Database) -> Result<(), StoreError> {
    tracing::info!(
        "upgrading the store to format {FORMAT_VERSION} (inode flags, unwritten blocks)"
    );
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(meta::FORMAT, &FORMAT_VERSION.to_le_bytes()[..])?;
    }
    txn.commit()?;
    Ok(())
}

/// A core error met inside the store's own operations, as a store error.
/// An operation's error: a refusal with an errno (the operation wrote nothing, and
/// the group goes on) or a failure of the store (the group is aborted). The
/// filesystem core answers with it (`fs::FsError` is this type).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A POSIX error with no further cause: a refusal.
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    /// The store failed underneath.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OpError {
    /// The errno to answer with.
    pub fn errno(&self) -> i32 {
        match self {
            OpError::Errno(e) => *e,
            OpError::Store(e) => e.errno(),
        }
    }
}

impl From<std::io::Error> for OpError {
    fn from(e: std::io::Error) -> Self {
        OpError::Store(StoreError::Io(e))
    }
}

impl From<redb::StorageError> for OpError {
    fn from(e: redb::StorageError) -> Self {
        OpError::Store(e.into())
    }
}

impl From<OpError> for StoreError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Errno(n) => StoreError::Io(std::io::Error::from_raw_os_error(n)),
            OpError::Store(e) => e,
        }
    }
}

/// Checks `data`, all of extent `rec`, against its `hash`.
pub(crate) fn check_whole(hash: &[u8; 32], rec: &ExtentRec, data: &[u8]) -> Result<(), StoreError> {
    if blake3::hash(data).as_bytes() != hash {
        return Err(mismatch(hash, rec));
    }
    Ok(())
}

fn mismatch(hash: &[u8; 32], rec: &ExtentRec) -> StoreError {
    StoreError::Corrupt(format!(
        "extent {} in segment {:016x} at {} does not match its hash",
        hex(hash),
        rec.segment,
        rec.offset
    ))
}

/// A whole extent to read and verify outside the core's lock, so that reads use both
/// CPUs and wait on the disk side by side. It holds its segment's file open: extents
/// are never overwritten, and a segment that compaction deletes meanwhile stays
/// readable through the open file.
pub struct Fetch {
    file: segment::SegFile,
    hash: [u8; 32],
    rec: ExtentRec,
    damaged: Damaged,
}

impl Fetch {
    /// Reads the extent into the front of `dst` and checks it against its hash.
    pub fn run(&self, dst: &mut [u8]) -> Result<(), StoreError> {
        let dst = &mut dst[..self.rec.len as usize];
        segment::read_exact_from(&*self.file, self.rec.segment, self.rec.offset, dst)?;
        let res = check_whole(&self.hash, &self.rec, dst);
        if res.is_err() {
            note_damaged(&self.damaged, &self.hash, &self.rec);
        }
        res
    }
}

/// Freed extents are punched out only while less than this (beyond the reserve kept
/// for metadata) is free on the store's filesystem.
const PUNCH_WHEN_FREE_BELOW: u64 = 1 << 30;

/// How long freed extent bytes stay readable before their disk is given back.
const PUNCH_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// An active segment at least this large and half dead is closed and compacted.
const ROLL_DEAD_ACTIVE: u64 = 64 << 20;

/// Extents appended to a segment in the current operation and not yet indexed: hash to
/// segment, offset and length.
pub type Staged = std::collections::HashMap<[u8; 32], (u64, u64, u32)>;

/// Leaf values kept, whatever the block size: 32 bytes each, four per 64 KiB block
/// (131,072 such blocks, 16 MiB), 64 per 1 MiB block.
const OUTBOARD_LEAVES_MAX: usize = 1 << 19;

/// Inode records the cache holds before it starts over.
const INODE_CACHE_MAX: usize = 1 << 20;

/// Operations per transaction group before it is committed (the background tick
/// also commits it every second).
const GROUP_OPS: u32 = 512;

/// A live inode record in the cache, with the epoch of the version that holds it.
#[derive(Clone, Debug)]
struct CachedInode {
    epoch: u64,
    payload: Vec<u8>,
}

/// A view of the store's current state through the open transaction group.
pub struct View<'s>(std::cell::Ref<'s, Tables<'static>>);

impl View<'_> {
    /// The `versions` table.
    pub fn versions(&self) -> &Table<'static, VKey, &'static [u8]> {
        &self.0.versions
    }

    /// The `changed_rows` table (the change index).
    pub fn changes(&self) -> &Table<'static, ChangeKey, ()> {
        &self.0.changes
    }

    /// The `holds` table.
    pub fn holds(&self) -> &Table<'static, &'static str, &'static [u8]> {
        &self.0.holds
    }

    /// The `extents` table.
    pub fn extents(&self) -> &Table<'static, [u8; 32], &'static [u8]> {
        &self.0.extents
    }

    /// The `orphans` table.
    pub fn orphans(&self) -> &Table<'static, u64, ()> {
        &self.0.orphans
    }

    /// The `snapshots` table.
    pub fn snapshots(&self) -> &Table<'static, &'static str, &'static [u8]> {
        &self.0.snapshots
    }

    /// The `meta` table.
    pub fn meta(&self) -> &Table<'static, &'static str, &'static [u8]> {
        &self.0.meta
    }
}

/// Every table of the store, open in one write transaction.
pub struct Tables<'t> {
    /// `versions`.
    pub versions: Table<'t, VKey, &'static [u8]>,
    /// `changed_rows`.
    pub changes: Table<'t, ChangeKey, ()>,
    /// `extents`.
    pub extents: Table<'t, [u8; 32], &'static [u8]>,
    /// `segments`.
    pub segments: Table<'t, u64, u64>,
    /// `orphans`.
    pub orphans: Table<'t, u64, ()>,
    /// `snapshots`.
    pub snapshots: Table<'t, &'static str, &'static [u8]>,
    /// `holds`.
    pub holds: Table<'t, &'static str, &'static [u8]>,
    /// `meta`.
    pub meta: Table<'t, &'static str, &'static [u8]>,
}

/// An open transaction group: a write transaction and its tables, opened once for
/// all the group's operations (opening a table looks its root up in the table tree
/// and writes it back on close, which cost more than a small operation's own work).
///
/// The tables borrow the transaction, which lives on the heap at a fixed address
/// until [`Group::finish`] or drop has closed them.
struct Group {
    /// Borrows `*txn`; closed before `txn` is freed or handed out.
    tables: std::mem::ManuallyDrop<Tables<'static>>,
    /// From `Box::into_raw`; owned by the group.
    txn: std::ptr::NonNull<redb::WriteTransaction>,
}

// SAFETY: a group owns its transaction and the tables that borrow it, and they only
// ever move together; redb's transaction and tables may be used from any one thread.
unsafe impl Send for Group {}

impl Group {
    fn begin(db: &Database) -> Result<Group, StoreError> {
        let txn = std::ptr::NonNull::from(Box::leak(Box::new(db.begin_write()?)));
        // SAFETY: `txn` came from a live Box just leaked, and stays allocated until
        // the group frees it after closing every table (`finish`, `drop`); the
        // reference is only given to the tables.
        let t: &'static redb::WriteTransaction = unsafe { txn.as_ref() };
        let open = || -> Result<Tables<'static>, StoreError> {
            Ok(Tables {
                versions: t.open_table(VERSIONS)?,
                changes: t.open_table(CHANGES)?,
                extents: t.open_table(EXTENTS)?,
                segments: t.open_table(SEGMENTS)?,
                orphans: t.open_table(ORPHANS)?,
                snapshots: t.open_table(SNAPSHOTS)?,
                holds: t.open_table(HOLDS)?,
                meta: t.open_table(META)?,
            })
        };
        match open() {
            Ok(tables) => Ok(Group {
                tables: std::mem::ManuallyDrop::new(tables),
                txn,
            }),
            Err(e) => {
                // SAFETY: the tables opened before the failure were dropped inside
                // `open`; nothing borrows the transaction any more.
                drop(unsafe { Box::from_raw(txn.as_ptr()) });
                Err(e)
            }
        }
    }

    /// Closes the tables and hands out the transaction, to commit or abort.
    fn finish(self) -> redb::WriteTransaction {
        let mut me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never used or dropped again; the tables are closed before
        // the transaction they borrow leaves its allocation.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut me.tables);
            *Box::from_raw(me.txn.as_ptr())
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: as in `finish`: tables first, then the transaction they borrow.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.tables);
            drop(Box::from_raw(self.txn.as_ptr()));
        }
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `N` bytes written as `2N` hex digits (as [`hex`] writes them).
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    let mut out = [0u8; N];
    for (i, pair) in b.chunks(2).enumerate() {
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// The identity of a versioned record: `(ino, kind, sub, name)`.
#[derive(Clone, Copy, Debug)]
pub struct RecKey<'a> {
    /// Inode.
    pub ino: u64,
    /// Record kind (`KIND_*`).
    pub kind: u8,
    /// Block index for block records, else 0.
    pub sub: u64,
    /// Entry or xattr name, else empty.
    pub name: &'a [u8],
}

impl<'a> RecKey<'a> {
    /// The inode record of `ino`.
    pub fn inode(ino: u64) -> Self {
        RecKey {
            ino,
            kind: KIND_INODE,
            sub: 0,
            name: &[],
        }
    }
    /// Entry `name` of directory `dir`.
    pub fn dirent(dir: u64, name: &'a [u8]) -> Self {
        RecKey {
            ino: dir,
            kind: KIND_DIRENT,
            sub: 0,
            name,
        }
    }
    /// Block `idx` of `ino`.
    pub fn block(ino: u64, idx: u64) -> Self {
        RecKey {
            ino,
            kind: KIND_BLOCK,
            sub: idx,
            name: &[],
        }
    }
    /// Back pointer: `dir/name` links to `ino`.
    pub fn parent(ino: u64, dir: u64, name: &'a [u8]) -> Self {
        RecKey {
            ino,
            kind: KIND_PARENT,
            sub: dir,
            name,
        }
    }
    /// Xattr `name` of `ino`.
    pub fn xattr(ino: u64, name: &'a [u8]) -> Self {
        RecKey {
            ino,
            kind: KIND_XATTR,
            sub: 0,
            name,
        }
    }
    fn at(&self, epoch: u64) -> (u64, u8, u64, &'a [u8], u64) {
        (self.ino, self.kind, self.sub, self.name, epoch)
    }
}

use schema::VersionKey as VKey;

/// A version found: its epoch and payload (`None` for a tombstone).
pub type Version = (u64, Option<Vec<u8>>);

/// The newest version of `key` at or below `epoch`: `(its epoch, payload)`, where a
/// tombstone's payload is `None`.
pub fn newest<T: ReadableTable<VKey, &'static [u8]>>(
    t: &T,
    key: RecKey<'_>,
    epoch: u64,
) -> Result<Option<Version>, StoreError> {
    let mut it = t.range(key.at(0)..=key.at(epoch))?;
    match it.next_back() {
        None => Ok(None),
        Some(row) => {
            let (k, v) = row?;
            let k = k.value();
            Ok(Some((k.4, open_version(k, v.value())?.map(<[u8]>::to_vec))))
        }
    }
}

/// The payload of `key` visible at `epoch`, `None` if absent or deleted.
pub fn visible<T: ReadableTable<VKey, &'static [u8]>>(
    t: &T,
    key: RecKey<'_>,
    epoch: u64,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(newest(t, key, epoch)?.and_then(|(_, v)| v))
}

/// Calls `f(sub, name, payload)` for every record of `kind` under `ino` visible at
/// `epoch`, in key order, within `sub` range `subs`.
pub fn scan_visible<T: ReadableTable<VKey, &'static [u8]>>(
    t: &T,
    ino: u64,
    kind: u8,
    subs: std::ops::RangeInclusive<u64>,
    epoch: u64,
    mut f: impl FnMut(u64, &[u8], &[u8]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let lo: VKey = (ino, kind, *subs.start(), &[], 0);
    // The newest row at or below `epoch` of the identity being read: (sub, name,
    // epoch, value); only that one is opened (checked and decoded).
    let mut pending: Option<(u64, Vec<u8>, u64, Vec<u8>)> = None;
    let open =
        |(s, n, e, val): &(u64, Vec<u8>, u64, Vec<u8>)| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(open_version((ino, kind, *s, n, *e), val)?.map(<[u8]>::to_vec))
        };
    for row in t.range(lo..)? {
        let (k, v) = row?;
        let (kino, kkind, ksub, kname, kepoch) = k.value();
        if kino != ino || kkind != kind || ksub > *subs.end() {
            break;
        }
        if kepoch > epoch {
            continue;
        }
        match pending.as_mut() {
            Some(p) if p.0 == ksub && p.1.as_slice() == kname => {
                p.2 = kepoch;
                p.3 = v.value().to_vec();
            }
            _ => {
                if let Some(p) = pending.replace((ksub, kname.to_vec(), kepoch, v.value().to_vec()))
                    && let Some(payload) = open(&p)?
                    && !f(p.0, &p.1, &payload)?
                {
                    return Ok(());
                }
            }
        }
    }
    if let Some(p) = pending
        && let Some(payload) = open(&p)?
    {
        f(p.0, &p.1, &payload)?;
    }
    Ok(())
}

/// Calls `f(ino, kind, sub, name, payload)` for every record visible at `epoch`, over
/// the whole table, in key order.
pub fn for_each_visible<T: ReadableTable<VKey, &'static [u8]>>(
    t: &T,
    epoch: u64,
    mut f: impl FnMut(u64, u8, u64, &[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    // The identity being read and its newest value at or below `epoch`, with the
    // value's epoch.
    let mut ident: Option<(u64, u8, u64, Vec<u8>)> = None;
    let mut value: Option<(u64, Vec<u8>)> = None;
    let mut emit = |ident: &Option<(u64, u8, u64, Vec<u8>)>,
                    value: &mut Option<(u64, Vec<u8>)>|
     -> Result<(), StoreError> {
        if let (Some((ino, kind, sub, name)), Some((e, v))) = (ident, value.take())
            && let Some(payload) = open_version((*ino, *kind, *sub, name, e), &v)?
        {
            f(*ino, *kind, *sub, name, payload)?;
        }
        Ok(())
    };
    for row in t.iter()? {
        let (k, v) = row?;
        let (ino, kind, sub, name, e) = k.value();
        let same = ident
            .as_ref()
            .is_some_and(|i| i.0 == ino && i.1 == kind && i.2 == sub && i.3 == name);
        if !same {
            emit(&ident, &mut value)?;
            ident = Some((ino, kind, sub, name.to_vec()));
        }
        if e <= epoch {
            value = Some((e, v.value().to_vec()));
        }
    }
    emit(&ident, &mut value)
}

/// The paths (from the root, `/a/b`) of `ino` in the tree at `epoch`, through the back
/// pointers; empty if none reaches the root.
pub fn paths_at<T: ReadableTable<VKey, &'static [u8]>>(
    t: &T,
    epoch: u64,
    ino: u64,
) -> Result<Vec<String>, StoreError> {
    fn up<T: ReadableTable<VKey, &'static [u8]>>(
        t: &T,
        epoch: u64,
        ino: u64,
        depth: u32,
        out: &mut Vec<String>,
        suffix: &str,
    ) -> Result<(), StoreError> {
        if ino == ROOT_INO {
            out.push(if suffix.is_empty() {
                "/".into()
            } else {
                suffix.to_string()
            });
            return Ok(());
        }
        if depth > 4096 {
            return Err(StoreError::Corrupt(format!(
                "path of inode {ino} does not reach the root"
            )));
        }
        let mut links = Vec::new();
        scan_visible(t, ino, KIND_PARENT, 0..=u64::MAX, epoch, |dir, name, _| {
            links.push((dir, String::from_utf8_lossy(name).into_owned()));
            Ok(true)
        })?;
        for (dir, name) in links {
            up(t, epoch, dir, depth + 1, out, &format!("/{name}{suffix}"))?;
        }
        Ok(())
    }
    let mut out = Vec::new();
    up(t, epoch, ino, 0, &mut out, "")?;
    out.sort();
    Ok(out)
}

/// A store opened to look at, never to change: by fsck and status while no daemon
/// holds it.
pub struct ReadOnlyStore {
    db: ReadOnlyDb,
    /// Segment files (none is made or written).
    pub segs: Segments,
}

enum ReadOnlyDb {
    /// The store's own metadata file, opened read-only.
    Own(redb::ReadOnlyDatabase),
    /// A repaired copy (the file was not closed cleanly), deleted when dropped (after
    /// the database, which is declared first).
    Copy {
        db: Database,
        _copy: tempfile_path::TempCopy,
    },
}

mod tempfile_path {
    /// A file deleted when dropped.
    pub struct TempCopy(pub std::path::PathBuf);

    impl Drop for TempCopy {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl ReadOnlyStore {
    /// Opens the store at `path` read-only. The store itself is never changed: with
    /// `verify` (fsck), or when the metadata file was not closed cleanly (redb would
    /// have to repair it, which writes), a private copy of it is opened instead, with
    /// every page's checksum verified.
    pub fn open(path: &Path, verify: bool) -> Result<ReadOnlyStore, StoreError> {
        let db_path = path.join(DB_FILE);
        if !db_path.is_file() {
            return Err(StoreError::NotAStore(path.to_path_buf()));
        }
        // Held while the copy is taken, so no daemon opens the store meanwhile.
        let res = std::panic::catch_unwind(|| redb::ReadOnlyDatabase::open(&db_path));
        let own = match res {
            Ok(Ok(db)) => Some(db),
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => return Err(StoreError::Locked),
            Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) =>
            {
                return Err(StoreError::Locked);
            }
            Ok(Err(redb::DatabaseError::RepairAborted)) => None,
            Ok(Err(e)) if verify => {
                tracing::debug!(error = %e, "read-only open failed; checking a copy");
                None
            }
            Ok(Err(e)) => {
                return Err(StoreError::Corrupt(format!(
                    "cannot open {}: {e}",
                    db_path.display()
                )));
            }
            Err(_) if verify => None,
            Err(p) => return Err(panicked("opening the metadata", p)),
        };
        let db = match own {
            Some(db) if !verify => ReadOnlyDb::Own(db),
            _ => {
                let copy = std::env::temp_dir().join(format!(
                    "snapfs-check-{}-{}.redb",
                    std::process::id(),
                    hex(&random_bytes::<4>())
                ));
                // Readable by this user alone (it holds every file name), and never
                // through a link someone else left in the temporary directory.
                let copied = (|| {
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut to = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&copy)?;
                    std::io::copy(&mut std::fs::File::open(&db_path)?, &mut to)
                })();
                let guard = tempfile_path::TempCopy(copy);
                copied.map_err(|e| {
                    StoreError::Io(std::io::Error::new(
                        e.kind(),
                        format!(
                            "copying the metadata to {} to check it there failed: {e}",
                            guard.0.display()
                        ),
                    ))
                })?;
                drop(own);
                let db = std::panic::catch_unwind(|| {
                    Database::builder()
                        .set_check_integrity_on_open(true)
                        .open(&guard.0)
                })
                .map_err(|p| panicked("checking a copy of the metadata", p))?
                .map_err(|e| {
                    StoreError::Corrupt(format!(
                        "the metadata file {} fails its checks: {e}",
                        db_path.display()
                    ))
                })?;
                ReadOnlyDb::Copy { db, _copy: guard }
            }
        };
        let mut ro = ReadOnlyStore {
            db,
            segs: Segments::open(disk::real(), &path.join("segments"), false, 1)?,
        };
        match read_format(&ro.begin_read()?)? {
            // Format 4 only adds record forms: a format 3 store reads as it is.
            FORMAT_VERSION | 3 => Ok(ro),
            f @ (1 | 2) => Err(StoreError::Upgrade(f)),
            f => Err(StoreError::Format(f)),
        }
    }

    /// A read transaction over the metadata.
    pub fn begin_read(&mut self) -> Result<redb::ReadTransaction, StoreError> {
        Ok(match &self.db {
            ReadOnlyDb::Own(db) => db.begin_read()?,
            ReadOnlyDb::Copy { db, .. } => db.begin_read()?,
        })
    }
}

/// A panic inside redb (damaged metadata can cause one), as an error.
pub fn panicked(doing: &str, p: Box<dyn std::any::Any + Send>) -> StoreError {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    StoreError::Corrupt(format!(
        "the metadata database failed while {doing}: {what}"
    ))
}

/// A row of `versions` under one inode: kind, sub, name, epoch, value.
type VersionRow = (u8, u64, Vec<u8>, u64, Vec<u8>);

/// One operation of the open transaction group, with the group's tables.
pub struct Writer<'t> {
    /// The group's tables.
    pub t: &'t mut Tables<'static>,
    /// Segment files.
    pub segs: &'t mut Segments,
    /// The live epoch.
    pub live: u64,
    /// Snapshot epochs.
    pub snaps: &'t BTreeSet<u64>,
    /// The store's inode cache as it was when the operation began.
    inodes: &'t std::collections::HashMap<u64, Option<CachedInode>>,
    /// Live inode records this operation wrote (`None`: deleted), for the cache.
    inode_log: Vec<(u64, Option<CachedInode>)>,
    /// In order: inodes made without extended attributes (`true`), inodes whose
    /// attributes were written (`false`).
    xattr_log: Vec<(u64, bool)>,
    /// Changes in the pages held by live blocks (see [`Store::allocated_pages`]).
    alloc_log: Vec<(u64, i64)>,
    /// See [`Store::changed`].
    changed: &'t mut ChangeMemo,
    /// Extent bytes this operation freed: (segment, offset, length).
    freed: Vec<(u64, u64, u32)>,
    /// Extents taken unseen, checked at the next durable point.
    unverified: &'t mut Unverified,
    /// See [`Store::trusted_from`].
    trusted_from: u64,
    /// Extents reads found damaged.
    damaged: &'t Damaged,
    /// See [`Store::keep_unreferenced`].
    keep_unreferenced: bool,
}

impl Unverified {
    fn insert(&mut self, hash: [u8; 32], data: Box<[u8]>) {
        let n = data.len();
        if self.map.insert(hash, data).is_none() {
            self.bytes += n;
        }
    }
}

impl Writer<'_> {
    /// The live payload of `key`.
    pub fn get(&self, key: RecKey<'_>) -> Result<Option<Vec<u8>>, StoreError> {
        visible(&self.t.versions, key, self.live)
    }

    /// The newest version of `key` at the live epoch, for [`Writer::put_after`].
    pub fn version(&self, key: RecKey<'_>) -> Result<Option<Version>, StoreError> {
        newest(&self.t.versions, key, self.live)
    }

    /// [`Writer::put`] with the newest version of `key` looked up already by
    /// [`Writer::version`] in this operation, and not written since.
    pub fn put_after(
        &mut self,
        key: RecKey<'_>,
        payload: Option<&[u8]>,
        prev: Option<Version>,
    ) -> Result<(), StoreError> {
        self.put_known(key, payload, true, prev)
    }

    /// Whether some snapshot can see a version written at `epoch` and superseded at
    /// the live epoch.
    fn held(&self, epoch: u64) -> bool {
        self.snaps.range(epoch..self.live).next().is_some()
    }

    /// Writes `payload` (or a tombstone for `None`) as the live version of `key`:
    /// overwrites a version of the live epoch, drops a previous version no snapshot
    /// can see, and records the change. A block payload's extent references must have
    /// been taken by the caller; a dropped version's are released.
    pub fn put(&mut self, key: RecKey<'_>, payload: Option<&[u8]>) -> Result<(), StoreError> {
        self.put_inner(key, payload, true)
    }

    fn put_inner(
        &mut self,
        key: RecKey<'_>,
        payload: Option<&[u8]>,
        release: bool,
    ) -> Result<(), StoreError> {
        // An inode record's version is known from the cache (stale only where this
        // operation replaced it already by one of the live epoch, which `put_known`
        // treats alike); an inode payload holds no extents to release.
        let cached = match (key.kind, payload) {
            (KIND_INODE, Some(_)) => self.inodes.get(&key.ino).and_then(Option::as_ref),
            _ => None,
        };
        let prev = match cached {
            Some(c) => Some((c.epoch, None)),
            None => newest(&self.t.versions, key, self.live)?,
        };
        self.put_known(key, payload, release, prev)
    }

    /// [`Writer::put_inner`] with the newest version of `key` already looked up.
    fn put_known(
        &mut self,
        key: RecKey<'_>,
        payload: Option<&[u8]>,
        release: bool,
        prev: Option<Version>,
    ) -> Result<(), StoreError> {
        let live = self.live;
        if key.kind == KIND_BLOCK {
            let pages = |p: Option<&[u8]>| -> Result<i64, StoreError> {
                Ok(match p {
                    Some(p) => BlockRec::decode(p)?.alloc_pages() as i64,
                    None => 0,
                })
            };
            let was = pages(prev.as_ref().and_then(|(_, p)| p.as_deref()))?;
            let d = pages(payload)? - was;
            if d != 0 {
                self.alloc_log.push((key.ino, d));
            }
        }
        // Whether an older version stays (for a snapshot) that a deletion must hide.
        let mut older = false;
        if let Some((e, old)) = prev {
            if e == live || !self.held(e) {
                // A payload of the live epoch is overwritten by the insert below.
                if e != live || payload.is_none() {
                    self.t.versions.remove(key.at(e))?;
                }
                if let Some(old) = old
                    && release
                {
                    self.release(key, &old)?;
                }
                older = payload.is_none() && newest(&self.t.versions, key, live)?.is_some();
            } else {
                older = true;
            }
        }
        // A tombstone is needed only to hide an older version some snapshot keeps.
        if payload.is_some() || older {
            let v = seal_version(key.at(live), payload);
            self.t.versions.insert(key.at(live), v.as_slice())?;
        }
        // The change index is needed only above the oldest snapshot: with none, a
        // snapshot taken later freezes this epoch and needs none of its rows.
        if !self.snaps.is_empty() {
            if self.changed.len() >= CHANGE_MEMO_MAX {
                self.changed.clear();
            }
            if self
                .changed
                .insert((key.ino, key.kind, key.sub, key.name.into()))
            {
                self.t
                    .changes
                    .insert((live, key.ino, key.kind, key.sub, key.name), ())?;
            }
        }
        match key.kind {
            KIND_INODE => self.inode_log.push((
                key.ino,
                payload.map(|p| CachedInode {
                    epoch: live,
                    payload: p.to_vec(),
                }),
            )),
            KIND_XATTR => self.xattr_log.push((key.ino, false)),
            _ => {}
        }
        Ok(())
    }

    /// [`Writer::put`] for a record of an inode allocated in this operation: no
    /// version of it can exist yet, so none is looked up.
    pub fn put_fresh(&mut self, key: RecKey<'_>, payload: &[u8]) -> Result<(), StoreError> {
        self.put_known(key, Some(payload), true, None)?;
        if key.kind == KIND_INODE {
            // A new inode has no attributes until the operation writes some.
            self.xattr_log.push((key.ino, true));
        }
        Ok(())
    }

    /// Releases what a dropped version held: block records hold extent references.
    fn release(&mut self, key: RecKey<'_>, payload: &[u8]) -> Result<(), StoreError> {
        if key.kind == KIND_BLOCK {
            let b = BlockRec::decode(payload)?;
            for h in b.extents() {
                self.decref(h, 1)?;
            }
        }
        Ok(())
    }

    /// How writing `rec` (`None`: a hole) as the live version of a block whose newest
    /// version is `prev` moves extent references: +1 for each extent `rec` names, -1
    /// for each the version it drops named. Apply with [`Writer::apply_refs`], then write with
    /// [`Writer::put_block`].
    pub fn block_refs(
        &mut self,
        prev: &Option<Version>,
        rec: Option<&BlockRec>,
        delta: &mut std::collections::HashMap<[u8; 32], i64>,
    ) -> Result<(), StoreError> {
        for h in rec.iter().flat_map(|r| r.extents()) {
            *delta.entry(*h).or_default() += 1;
        }
        if let Some((e, Some(old))) = prev
            && (*e == self.live || !self.held(*e))
        {
            for h in BlockRec::decode(old)?.extents() {
                *delta.entry(*h).or_default() -= 1;
            }
        }
        Ok(())
    }

    /// Applies reference moves: every increase before any decrease, so an extent one
    /// block lets go of while another takes it (the same bytes) is never freed in
    /// between. Extents appended in this operation are in `staged` (hash to segment,
    /// offset and length).
    pub fn apply_refs(
        &mut self,
        delta: std::collections::HashMap<[u8; 32], i64>,
        staged: &mut Staged,
    ) -> Result<(), StoreError> {
        for (h, d) in &delta {
            if *d > 0 {
                self.take_refs(*h, *d as u64, staged)?;
            }
        }
        for (h, d) in &delta {
            if *d < 0 {
                self.decref(h, d.unsigned_abs())?;
            }
        }
        Ok(())
    }

    /// Writes `rec` (`None`: a hole) as the live version of block `idx` of `ino`
    /// (newest version `prev`), its references already moved by
    /// [`Writer::block_refs`] and [`Writer::apply_refs`].
    pub fn put_block(
        &mut self,
        ino: u64,
        idx: u64,
        rec: Option<&BlockRec>,
        prev: Option<Version>,
    ) -> Result<(), StoreError> {
        let b = rec.map(|r| {
            let mut b = Vec::with_capacity(36 + 38 * r.frags.len());
            r.encode(&mut b);
            b
        });
        self.put_known(RecKey::block(ino, idx), b.as_deref(), false, prev)
    }

    /// Takes `n` references to extent `hash`: an indexed one, or one appended to a
    /// segment earlier in this operation.
    fn take_refs(&mut self, hash: [u8; 32], n: u64, staged: &mut Staged) -> Result<(), StoreError> {
        let rec = match staged.remove(&hash) {
            // Staged only when the index lacked it, and nothing indexes it meanwhile:
            // no need to look again.
            Some((segment, offset, len)) => ExtentRec {
                segment,
                offset,
                len,
                refs: n,
            },
            None => {
                let mut rec = self.extent(&hash)?;
                rec.refs += n;
                rec
            }
        };
        self.t.extents.insert(hash, rec.encode(&hash).as_slice())?;
        Ok(())
    }

    /// Takes one more reference to a stored extent.
    pub fn incref(&mut self, hash: &[u8; 32]) -> Result<(), StoreError> {
        let mut rec = self.extent(hash)?;
        rec.refs += 1;
        self.t.extents.insert(*hash, rec.encode(hash).as_slice())?;
        Ok(())
    }

    /// Drops `n` references; the last one frees the extent (its bytes count as dead in
    /// their segment until compaction).
    pub fn decref(&mut self, hash: &[u8; 32], n: u64) -> Result<(), StoreError> {
        let mut rec = self.extent(hash)?;
        rec.refs = rec.refs.checked_sub(n).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "extent {} has {} references and {n} are let go",
                hex(hash),
                rec.refs
            ))
        })?;
        if rec.refs == 0 && !self.keep_unreferenced {
            self.free_extent(hash, &rec)?;
        } else {
            if rec.refs == 0 {
                self.note_unreferenced()?;
            }
            self.t.extents.insert(*hash, rec.encode(hash).as_slice())?;
        }
        Ok(())
    }

    /// Frees extent `hash` (at `rec`): its row goes, its bytes count as dead.
    fn free_extent(&mut self, hash: &[u8; 32], rec: &ExtentRec) -> Result<(), StoreError> {
        self.t.extents.remove(*hash)?;
        self.freed.push((rec.segment, rec.offset, rec.len));
        self.add_dead(rec)
    }

    /// Counts the bytes of extent `rec` (header and data) as dead in its segment.
    fn add_dead(&mut self, rec: &ExtentRec) -> Result<(), StoreError> {
        let dead = self
            .t
            .segments
            .get(rec.segment)?
            .map(|v| v.value())
            .unwrap_or(0);
        // A retired segment is all dead already (and its mark must stay).
        if dead != SEGMENT_RETIRED {
            self.t
                .segments
                .insert(rec.segment, dead + rec.footprint())?;
        }
        Ok(())
    }

    /// Whether a write of `data` (whose hash is `hash`) may take extent `hash` as
    /// stored. If not, the caller stores `data` again and [`Writer::relocate`]s the
    /// extent there. A copy the page cache holds is compared now (one that differs or
    /// cannot be read is damaged); one it does not hold is not read from the disk (a
    /// write would wait for a random read) but checked at the next durable point (see
    /// [`Unverified`]), or, with too much waiting already, not trusted.
    pub fn extent_holds(
        &mut self,
        hash: &[u8; 32],
        rec: &ExtentRec,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        if rec.len as usize != data.len() {
            tracing::error!(
                extent = hex(hash),
                "stored extent has the wrong length; storing it again"
            );
            return Ok(false);
        }
        let noted = self.damaged.0.any.load(std::sync::atomic::Ordering::SeqCst);
        let (damaged, full) = if !noted {
            (false, false)
        } else {
            let set = self.damaged.lock();
            (
                set.at.get(hash) == Some(&(rec.segment, rec.offset)),
                set.full,
            )
        };
        if damaged {
            return Ok(false);
        }
        if rec.segment >= self.trusted_from && !full {
            return Ok(true);
        }
        match self.segs.read_cached(rec.segment, rec.offset, rec.len) {
            Ok(None) if self.unverified.map.contains_key(hash) => Ok(true),
            Ok(None)
                if self.unverified.bytes + data.len() <= UNVERIFIED_MAX
                    && self.unverified.map.len() < UNVERIFIED_MAX_EXTENTS =>
            {
                self.unverified.insert(*hash, data.into());
                Ok(true)
            }
            Ok(None) => Ok(false),
            Ok(Some(stored)) if stored == data => Ok(true),
            Ok(Some(_)) => {
                tracing::error!(
                    extent = hex(hash),
                    segment = rec.segment,
                    offset = rec.offset,
                    "stored extent is damaged; storing it again from a write of the same bytes"
                );
                Ok(false)
            }
            Err(e) => {
                tracing::error!(extent = hex(hash), error = %e, "stored extent cannot be read; storing it again");
                Ok(false)
            }
        }
    }

    /// Stores the bytes of extents found damaged (or unseen and not trusted) again,
    /// and points each extent at its new copy. A failed append is a refusal (nothing
    /// indexed yet); a failed repoint is a failure.
    pub fn store_again(&mut self, items: &[([u8; 32], &[u8])]) -> Result<(), OpError> {
        let at = self
            .segs
            .append_many(items)
            .map_err(|e| OpError::Errno(e.errno()))?;
        for ((hash, data), (seg, off)) in items.iter().zip(at) {
            self.relocate(hash, seg, off, data.len() as u32)?;
        }
        Ok(())
    }

    /// Points extent `hash` at a new copy of its bytes at `offset` of `segment`; the
    /// old copy's bytes count as dead.
    pub fn relocate(
        &mut self,
        hash: &[u8; 32],
        segment: u64,
        offset: u64,
        len: u32,
    ) -> Result<(), StoreError> {
        let mut rec = self.extent(hash)?;
        self.add_dead(&rec)?;
        rec.segment = segment;
        rec.offset = offset;
        rec.len = len;
        self.t.extents.insert(*hash, rec.encode(hash).as_slice())?;
        Ok(())
    }

    /// The extent row of `hash`.
    pub fn extent(&mut self, hash: &[u8; 32]) -> Result<ExtentRec, StoreError> {
        match self.t.extents.get(*hash)? {
            Some(v) => ExtentRec::decode(hash, v.value()),
            None => Err(StoreError::Corrupt(format!(
                "extent {} is not in the index",
                hex(hash)
            ))),
        }
    }

    /// Drops every version of `ino` that neither the live tree nor any snapshot in
    /// `self.snaps` can see, releasing what it holds, and tombstones that hide nothing.
    /// Returns the bytes of extents this freed. With `dry_run` nothing changes and the
    /// figure is what would be freed (counted against `pending`, the references already
    /// planned away by earlier dry calls).
    pub fn gc_ino(
        &mut self,
        ino: u64,
        dry_run: Option<&mut std::collections::HashMap<[u8; 32], u64>>,
    ) -> Result<u64, StoreError> {
        self.gc_rows(ino, (ino, 0u8, 0u64, &[][..], 0u64), |_| true, dry_run)
    }

    /// [`Writer::gc_ino`] for the versions of one record.
    pub fn gc_ident(
        &mut self,
        key: RecKey<'_>,
        dry_run: Option<&mut std::collections::HashMap<[u8; 32], u64>>,
    ) -> Result<u64, StoreError> {
        let same =
            |k: &(u64, u8, u64, &[u8], u64)| k.1 == key.kind && k.2 == key.sub && k.3 == key.name;
        self.gc_rows(key.ino, key.at(0), same, dry_run)
    }

    /// The versions of `ino` from `from` on while `within` holds, garbage collected.
    fn gc_rows(
        &mut self,
        ino: u64,
        from: (u64, u8, u64, &[u8], u64),
        within: impl Fn(&(u64, u8, u64, &[u8], u64)) -> bool,
        dry_run: Option<&mut std::collections::HashMap<[u8; 32], u64>>,
    ) -> Result<u64, StoreError> {
        // (kind, sub, name, epoch, value), in key order.
        let mut rows: Vec<VersionRow> = Vec::new();
        for row in self.t.versions.range(from..)? {
            let (k, v) = row?;
            let (kino, kind, sub, name, epoch) = k.value();
            if kino != ino || !within(&k.value()) {
                break;
            }
            // Kept as tag and payload, checked.
            let value = match open_version(k.value(), v.value())? {
                Some(p) => [&[TAG_PRESENT][..], p].concat(),
                None => vec![TAG_TOMBSTONE],
            };
            rows.push((kind, sub, name.to_vec(), epoch, value));
        }
        let mut drop: Vec<usize> = Vec::new();
        let mut start = 0;
        while start < rows.len() {
            let mut end = start + 1;
            while end < rows.len()
                && rows[end].0 == rows[start].0
                && rows[end].1 == rows[start].1
                && rows[end].2 == rows[start].2
            {
                end += 1;
            }
            let mut kept_any = false;
            for i in start..end {
                let e = rows[i].3;
                let superseded_unseen =
                    i + 1 < end && self.snaps.range(e..rows[i + 1].3).next().is_none();
                let useless_tombstone = !kept_any && rows[i].4.first() == Some(&TAG_TOMBSTONE);
                if superseded_unseen || useless_tombstone {
                    drop.push(i);
                } else {
                    kept_any = true;
                }
            }
            start = end;
        }
        let mut freed = 0u64;
        let mut pending = dry_run;
        for i in drop {
            let (kind, sub, name, epoch, value) = &rows[i];
            let key = RecKey {
                ino,
                kind: *kind,
                sub: *sub,
                name,
            };
            let block = if *kind == KIND_BLOCK && value.first() == Some(&TAG_PRESENT) {
                Some(BlockRec::decode(&value[1..])?)
            } else {
                None
            };
            match pending.as_deref_mut() {
                Some(planned) => {
                    for h in block.iter().flat_map(BlockRec::extents) {
                        let ext = self.extent(h)?;
                        let n = planned.entry(*h).or_insert(0);
                        *n += 1;
                        if *n == ext.refs {
                            freed += ext.len as u64;
                        }
                    }
                }
                None => {
                    self.t.versions.remove(key.at(*epoch))?;
                    for h in block.iter().flat_map(BlockRec::extents) {
                        let ext = self.extent(h)?;
                        if ext.refs == 1 {
                            freed += ext.len as u64;
                        }
                        self.decref(h, 1)?;
                    }
                }
            }
        }
        Ok(freed)
    }

    /// The payload of `key` visible at `epoch`.
    pub fn visible_at(&self, key: RecKey<'_>, epoch: u64) -> Result<Option<Vec<u8>>, StoreError> {
        visible(&self.t.versions, key, epoch)
    }

    /// The extent row of `hash`, if it is stored.
    pub fn extent_row(&self, hash: &[u8; 32]) -> Result<Option<ExtentRec>, StoreError> {
        match self.t.extents.get(*hash)? {
            Some(v) => Ok(Some(ExtentRec::decode(hash, v.value())?)),
            None => Ok(None),
        }
    }

    /// [`scan_visible`] over the live tree.
    pub fn scan_live(
        &self,
        ino: u64,
        kind: u8,
        subs: std::ops::RangeInclusive<u64>,
        f: impl FnMut(u64, &[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        scan_visible(&self.t.versions, ino, kind, subs, self.live, f)
    }

    /// Marks `ino` as an orphan (no link left, still open) or not.
    pub fn set_orphan(&mut self, ino: u64, orphan: bool) -> Result<(), StoreError> {
        if orphan {
            self.t.orphans.insert(ino, ())?;
        } else {
            self.t.orphans.remove(ino)?;
        }
        Ok(())
    }

    /// Deletes every live record of `ino` (releasing its extents), its inode last.
    pub fn delete_live_records(&mut self, ino: u64) -> Result<(), StoreError> {
        // Every record but the inode's own, in one scan: (kind, sub, name) of those
        // whose newest version at the live epoch is present.
        let mut keys: Vec<(u8, u64, Vec<u8>)> = Vec::new();
        let mut newest_present: Option<bool> = None;
        let lo: VKey = (ino, KIND_DIRENT, 0, &[], 0);
        let hi: VKey = (ino + 1, 0, 0, &[], 0);
        for row in self.t.versions.range(lo..hi)? {
            let (k, v) = row?;
            let (_, kind, sub, name, epoch) = k.value();
            if epoch > self.live {
                continue;
            }
            let present = open_version(k.value(), v.value())?.is_some();
            match keys.last() {
                Some(last) if last.0 == kind && last.1 == sub && last.2 == name => {}
                _ => {
                    if newest_present == Some(false) {
                        keys.pop();
                    }
                    keys.push((kind, sub, name.to_vec()));
                }
            }
            newest_present = Some(present);
        }
        if newest_present == Some(false) {
            keys.pop();
        }
        for (kind, sub, name) in keys {
            let key = RecKey {
                ino,
                kind,
                sub,
                name: &name,
            };
            self.put(key, None)?;
        }
        self.put(RecKey::inode(ino), None)
    }

    /// Stores received extents the index lacks (`items` already rehashed by the
    /// caller), each indexed with no reference yet: a record of this session or of
    /// a resumed one takes them, and [`Store::free_unreferenced`] frees those no
    /// record took once a session completes. An extent row with no reference is such
    /// a received extent, and nothing else.
    pub fn append_received(&mut self, items: &[([u8; 32], &[u8])]) -> Result<(), OpError> {
        let new: Vec<([u8; 32], &[u8])> = items
            .iter()
            .filter_map(|(h, d)| match self.t.extents.get(*h) {
                Ok(None) => Some(Ok((*h, *d))),
                Ok(Some(_)) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()?;
        if new.is_empty() {
            return Ok(());
        }
        let at = self
            .segs
            .append_many(&new)
            .map_err(|e| OpError::Errno(e.errno()))?;
        for ((hash, data), (segment, offset)) in new.iter().zip(at) {
            let rec = ExtentRec {
                segment,
                offset,
                len: data.len() as u32,
                refs: 0,
            };
            self.t.extents.insert(*hash, rec.encode(hash).as_slice())?;
        }
        self.note_unreferenced()?;
        Ok(())
    }

    /// Notes that some extent row may have no reference (see [`meta::UNREFERENCED`]).
    fn note_unreferenced(&mut self) -> Result<(), StoreError> {
        if self.t.meta.get(meta::UNREFERENCED)?.is_none() {
            let row = seal_meta(meta::UNREFERENCED, &[]);
            self.t.meta.insert(meta::UNREFERENCED, row.as_slice())?;
        }
        Ok(())
    }

    /// Writes a received record as the live version of `key`, after checking that
    /// its payload decodes as its kind's must; a block record takes a reference to
    /// each extent it names, which must be stored.
    pub fn put_received(
        &mut self,
        key: RecKey<'_>,
        payload: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        if let Some(p) = payload {
            match key.kind {
                KIND_INODE => {
                    InodeRec::decode(p)?;
                }
                KIND_DIRENT => {
                    DirentRec::decode(p)?;
                }
                KIND_BLOCK => {
                    let rec = BlockRec::decode(p)?;
                    let mut n: std::collections::HashMap<[u8; 32], u64> = Default::default();
                    for h in rec.extents() {
                        *n.entry(*h).or_default() += 1;
                    }
                    for (h, n) in n {
                        if self.t.extents.get(h)?.is_none() {
                            return Err(StoreError::Corrupt(format!(
                                "block {} of inode {} names extent {} that was never sent",
                                key.sub,
                                key.ino,
                                hex(&h)
                            )));
                        }
                        self.take_refs(h, n, &mut Staged::new())?;
                    }
                }
                KIND_PARENT if !p.is_empty() => {
                    return Err(StoreError::Corrupt("a back pointer with a payload".into()));
                }
                _ => {}
            }
        }
        if key.ino == 0 || key.ino >= MAX_LIVE_INO {
            return Err(StoreError::Corrupt(format!("inode number {}", key.ino)));
        }
        self.put(key, payload)?;
        // Inode numbers handed out later must not collide with received ones.
        let next = read_meta_as(&self.t.meta, meta::NEXT_INO, le_u64)?;
        if key.ino >= next {
            let row = seal_meta(meta::NEXT_INO, &(key.ino + 1).to_le_bytes());
            self.t.meta.insert(meta::NEXT_INO, row.as_slice())?;
        }
        Ok(())
    }

    /// Sets the block size row (see [`Store::take_block_size`]).
    fn set_block_size(&mut self, bs: u32) -> Result<(), StoreError> {
        if !valid_block_size(bs) {
            return Err(StoreError::Corrupt(format!("block size {bs}")));
        }
        let row = seal_meta(meta::BLOCK_SIZE, &bs.to_le_bytes());
        self.t.meta.insert(meta::BLOCK_SIZE, row.as_slice())?;
        Ok(())
    }

    /// Records that this store is a replica of volume `volume`.
    pub fn set_replica_of(&mut self, volume: &[u8; 16]) -> Result<(), StoreError> {
        let row = seal_meta(meta::REPLICA_OF, volume);
        self.t.meta.insert(meta::REPLICA_OF, row.as_slice())?;
        Ok(())
    }

    /// Hands out a new inode number.
    pub fn alloc_ino(&mut self) -> Result<u64, StoreError> {
        let next = read_meta_as(&self.t.meta, meta::NEXT_INO, le_u64)?;
        if next >= MAX_LIVE_INO {
            return Err(StoreError::Corrupt("inode numbers exhausted".into()));
        }
        let row = seal_meta(meta::NEXT_INO, &(next + 1).to_le_bytes());
        self.t.meta.insert(meta::NEXT_INO, row.as_slice())?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &mut Store, ino: u64, v: &[u8]) -> Result<(), OpError> {
        s.write(
            false,
            |w| Ok(w.put(RecKey::xattr(ino, b"user.t"), Some(v))?),
        )
    }

    fn get(s: &Store, ino: u64) -> Option<Vec<u8>> {
        let txn = s.read_txn().unwrap();
        visible(txn.versions(), RecKey::xattr(ino, b"user.t"), s.live_epoch).unwrap()
    }

    #[test]
    fn letting_go_of_more_references_than_an_extent_has_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s"), Some(&StoreConfig::default())).unwrap();
        let hash = *blake3::hash(b"data").as_bytes();
        s.write(true, |w| {
            let (segment, offset) = w.segs.append(&hash, b"data")?;
            let rec = ExtentRec {
                segment,
                offset,
                len: 4,
                refs: 1,
            };
            w.t.extents.insert(hash, rec.encode(&hash).as_slice())?;
            Ok(())
        })
        .unwrap();
        let r = s.write(false, |w| Ok(w.decref(&hash, 2)?));
        assert!(
            matches!(r, Err(OpError::Store(StoreError::Corrupt(_)))),
            "{r:?}"
        );
    }

    #[test]
    fn a_panicking_operation_is_never_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut s = Store::open(&path, Some(&StoreConfig::default())).unwrap();
        // Alone in its group: the group is dropped and the store goes on.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.write(false, |w| -> Result<(), OpError> {
                w.put(RecKey::xattr(7, b"user.t"), Some(b"half"))?;
                panic!("in the middle of an operation");
            })
        }));
        assert!(r.is_err());
        assert_eq!(get(&s, 7), None, "the half operation is gone");
        put(&mut s, 8, b"next").unwrap();
        assert_eq!(get(&s, 8).as_deref(), Some(&b"next"[..]));

        // After an answered operation in the same group: that one is lost with the
        // group, so the store refuses writes rather than pretend it happened.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.write(false, |w| -> Result<(), OpError> {
                w.put(RecKey::xattr(9, b"user.t"), Some(b"half"))?;
                panic!("in the middle of an operation");
            })
        }));
        assert!(r.is_err());
        assert!(matches!(
            put(&mut s, 10, b"x"),
            Err(OpError::Errno(libc::EIO))
        ));
        // A store in its error state keeps its file open and uncommitted until the
        // process exits (as a daemon's would): look at a copy, as the next process would.
        drop(s);
        let copy = dir.path().join("copy");
        std::fs::create_dir_all(copy.join("segments")).unwrap();
        std::fs::copy(path.join(DB_FILE), copy.join(DB_FILE)).unwrap();
        let s = Store::open(&copy, None).unwrap();
        assert_eq!(
            get(&s, 9),
            None,
            "nothing of the panicking operation was committed"
        );
    }
}
