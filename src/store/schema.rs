//! Every redb table of a snapfs store and the byte encoding of its values.
//!
//! This header is the layout table; `docs/FORMAT.md` repeats it with prose. All
//! integers inside values are little-endian (`to_le_bytes`). Keys are redb tuples, whose
//! integer elements redb itself encodes little-endian and orders numerically.
//!
//! | table       | key                                          | value                                   |
//! |-------------|----------------------------------------------|-----------------------------------------|
//! | `meta`      | `&str` name                                  | bytes, per name (see [`meta`])          |
//! | `versions`  | `(ino u64, kind u8, sub u64, name &[u8], epoch u64)` | tag u8 (0 tombstone, 1 present) + payload |
//! | `extents`   | `[u8; 32]` blake3 hash                        | segment u64, offset u64, len u32, refs u64 |
//! | `segments`  | segment id u64                               | dead bytes u64                          |
//! | `changed_rows` | `(epoch u64, ino u64, kind u8, sub u64, name &[u8])` | `()`: that record changed in that epoch |
//! | `orphans`   | ino u64                                      | `()`: nlink 0 but still open            |
//! | `snapshots` | `&str` name                                  | epoch u64, created secs i64, nsec u32, flags u8 |
//! | `holds`     | `&str` hold name                             | epoch u64, created secs i64, nsec u32   |
//!
//! `versions` holds every versioned metadata record. `kind` says which:
//!
//! | kind | record       | sub         | name        | payload                         |
//! |------|--------------|-------------|-------------|---------------------------------|
//! | 0    | inode        | 0           | empty       | [`InodeRec`] encoding           |
//! | 1    | dir entry    | 0           | entry name  | child ino u64, file kind u8     |
//! | 2    | block map    | block index | empty       | blake3 hash [32], length u32    |
//! | 3    | xattr        | 0           | xattr name  | the value bytes                 |
//! | 4    | back pointer | parent ino  | entry name  | empty                           |
//!
//! A reader at epoch `S` sees, for each `(ino, kind, sub, name)`, the row with the
//! greatest epoch `<= S`; a tombstone there means "absent".

use redb::TableDefinition;

use crate::store::StoreError;

/// Versioned metadata records; see the module header.
pub const VERSIONS: TableDefinition<'static, VersionKey, &[u8]> = TableDefinition::new("versions");

/// The key of `versions`: `(ino, kind, sub, name, epoch)`.
pub type VersionKey = (u64, u8, u64, &'static [u8], u64);
/// Extent index: blake3 hash to location and reference count.
pub const EXTENTS: TableDefinition<'static, [u8; 32], &[u8]> = TableDefinition::new("extents");
/// Per-segment dead byte counts (bytes of freed extents), for compaction.
pub const SEGMENTS: TableDefinition<'static, u64, u64> = TableDefinition::new("segments");
/// Change index: which record (`versions` identity) changed in which epoch. Rows are
/// written only while some snapshot exists (no diff, rollback or deletion needs a
/// change at or below the oldest snapshot's epoch), and pruned to that.
pub const CHANGES: TableDefinition<'static, ChangeKey, ()> = TableDefinition::new("changed_rows");

/// The key of `changed_rows`: `(epoch, ino, kind, sub, name)`.
pub type ChangeKey = (u64, u64, u8, u64, &'static [u8]);

/// The change index of format 2 and before, per inode: `(epoch, ino)`. Rebuilt as
/// [`CHANGES`] when the store is upgraded, then deleted.
pub const OLD_CHANGES: TableDefinition<'static, (u64, u64), ()> = TableDefinition::new("changes");
/// Inodes whose last link is gone while a handle is still open.
pub const ORPHANS: TableDefinition<'static, u64, ()> = TableDefinition::new("orphans");
/// Snapshot catalog.
pub const SNAPSHOTS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("snapshots");
/// Named holds: each keeps one snapshot (by epoch), and the change index after it,
/// until released; deleting a held snapshot only hides it.
pub const HOLDS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("holds");
/// Store-wide settings and counters.
pub const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("meta");

/// Names of the rows in `meta`.
pub mod meta {
    /// u32: the format version, [`super::FORMAT_VERSION`].
    pub const FORMAT: &str = "format";
    /// 16 bytes: random volume identity.
    pub const VOLUME_ID: &str = "volume_id";
    /// u32: logical block size in bytes.
    pub const BLOCK_SIZE: &str = "block_size";
    /// u64: the epoch the live tree is written in.
    pub const LIVE_EPOCH: &str = "live_epoch";
    /// u64: the next inode number to hand out.
    pub const NEXT_INO: &str = "next_ino";
    /// 16 bytes, on a replica only: the volume id of the store it receives
    /// snapshots from (`snapfs sync`).
    pub const REPLICA_OF: &str = "replica_of";
    /// i64: creation time, seconds since the Unix epoch.
    pub const CREATED: &str = "created";
    /// u64: the id the next new segment gets (ids are never reused). Absent in stores
    /// made before it; then one above every segment file and `segments` row.
    pub const NEXT_SEGMENT: &str = "next_segment";
    /// Empty, on a replica only: some extent row may have no reference (received
    /// by a sync, or let go by a rollback of a part-applied live tree), for a
    /// completed session to free.
    pub const UNREFERENCED: &str = "unreferenced";
    /// [`super::SyncRec`], on a replica: its last completed `snapfs sync` session.
    pub const LAST_RECEIVED: &str = "last_received";
    /// Prefix of one row per destination this volume was synced to, named by the
    /// destination's volume id in hex: a [`super::SyncRec`] of the last completed
    /// session, whose base is the snapshot the next session starts from.
    pub const SENT_TO: &str = "sent_to:";
    /// 16 bytes, on a replica: the volume its snapshots are of (the source's own
    /// origin, sent in `Hello`): the identity `promote --same-id` takes.
    pub const ORIGIN: &str = "origin";
    /// [`crate::store::role::Promotion`], on a volume that was a replica: the volume it
    /// replicated, when it was promoted (seconds) and the snapshot its live tree
    /// started from.
    pub const PROMOTED: &str = "promoted";
    /// i64 (seconds), on a demoted store until its first session: it mounts as a
    /// replica, and that session keeps what the store has past the base under
    /// `diverged-<time>` names.
    pub const DEMOTED: &str = "demoted";
    /// 16 bytes: who writes this volume's snapshots, new at each promotion (and at
    /// a clone): two writers of one volume (a replica promoted while the old
    /// source lives on) differ here. Absent: the volume id.
    pub const WRITER: &str = "writer";
    /// 16 bytes, on a replica: the writer whose snapshots it last began to take.
    /// Another writer's first snapshot must have this replica's newest as its base
    /// (else the histories forked).
    pub const LAST_SOURCE: &str = "last_source";
}

/// `segments` value of a segment whose extents all moved in a durable commit: its file
/// is deleted after that commit, and again at the next open should a crash come first.
pub const SEGMENT_RETIRED: u64 = u64::MAX;

/// Longest name (of an entry, an xattr, a snapshot), in bytes.
pub const NAME_MAX: usize = 255;

/// Checks a directory entry name as the store keeps them: 1..=255 bytes, no `/` or
/// NUL, not `.` or `..`. On failure, the errno and which rule it broke.
pub fn check_entry_name(name: &[u8]) -> Result<(), (i32, &'static str)> {
    if name.len() > NAME_MAX {
        return Err((libc::ENAMETOOLONG, "a name longer than 255 bytes"));
    }
    if name.is_empty() {
        return Err((libc::EINVAL, "an empty name"));
    }
    if name == b"." || name == b".." {
        return Err((libc::EINVAL, "a name '.' or '..'"));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err((libc::EINVAL, "a name with '/' or NUL"));
    }
    Ok(())
}

/// The on-disk format this build writes and reads. Format 2 ends every value of
/// `versions`, `extents`, `snapshots` and `meta` (but the format row) with a checksum
/// ([`SUM`]); format 3 indexes changes per record (`changed_rows`, which replaces the
/// per-inode `changes`) and adds `holds`. An older store is upgraded when it is first
/// opened to be written.
pub const FORMAT_VERSION: u32 = 4;

/// Inode numbers the kernel sees: the low 40 bits are a live inode, the bits above are
/// the epoch of the snapshot it is seen through (0 for the live tree). Stable across
/// remounts, and never equal between the live tree and a snapshot.
pub const EPOCH_SHIFT: u32 = 40;
/// Live inode numbers stay below this.
pub const MAX_LIVE_INO: u64 = 1 << EPOCH_SHIFT;

/// Bytes of the checksum that ends a checksummed value: the first 8 bytes of a keyed
/// blake3 hash over the table, the key and the value, so that a damaged value, or a
/// value found under a damaged key, is an error and never another record.
pub const SUM: usize = 8;

/// The checksums' key (a fixed key: checksums find damage, they are no secret).
fn sum_key() -> &'static [u8; 32] {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    KEY.get_or_init(|| blake3::derive_key("snapfs 2026-12-03 record checksum", b""))
}

/// The checksum of `value` under `key` in table `table` (its name).
fn sum(table: &str, key: &[&[u8]], value: &[u8]) -> [u8; SUM] {
    let mut h = blake3::Hasher::new_keyed(sum_key());
    h.update(&(table.len() as u32).to_le_bytes());
    h.update(table.as_bytes());
    for k in key {
        h.update(&(k.len() as u32).to_le_bytes());
        h.update(k);
    }
    h.update(value);
    let mut out = [0u8; SUM];
    out.copy_from_slice(&h.finalize().as_bytes()[..SUM]);
    out
}

/// `value` with its checksum appended.
fn seal(table: &str, key: &[&[u8]], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + SUM);
    out.extend_from_slice(value);
    out.extend_from_slice(&sum(table, key, value));
    out
}

/// The value inside `raw` if its checksum holds; `what` names the row for the error.
fn unseal<'v>(
    table: &str,
    key: &[&[u8]],
    raw: &'v [u8],
    what: impl FnOnce() -> String,
) -> Result<&'v [u8], StoreError> {
    if raw.len() >= SUM {
        let (value, s) = raw.split_at(raw.len() - SUM);
        if s == sum(table, key, value) {
            return Ok(value);
        }
    }
    Err(StoreError::Corrupt(format!(
        "{} fails its checksum",
        what()
    )))
}

/// The parts of a `versions` key that its checksum covers.
fn version_key_parts(k: &(u64, u8, u64, &[u8], u64)) -> [u8; 25] {
    let mut out = [0u8; 25];
    out[..8].copy_from_slice(&k.0.to_le_bytes());
    out[8] = k.1;
    out[9..17].copy_from_slice(&k.2.to_le_bytes());
    out[17..25].copy_from_slice(&k.4.to_le_bytes());
    out
}

/// Encodes a `versions` value: `payload` (`None`: a tombstone) under `key`.
pub fn seal_version(key: (u64, u8, u64, &[u8], u64), payload: Option<&[u8]>) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + payload.map_or(0, <[u8]>::len) + SUM);
    match payload {
        Some(p) => {
            v.push(TAG_PRESENT);
            v.extend_from_slice(p);
        }
        None => v.push(TAG_TOMBSTONE),
    }
    let s = sum("versions", &[&version_key_parts(&key), key.3], &v);
    v.extend_from_slice(&s);
    v
}

/// Decodes a `versions` value read under `key`: `None` for a tombstone, else the
/// payload. A value whose checksum fails, or with no known tag, is `Corrupt`.
pub fn open_version<'v>(
    key: (u64, u8, u64, &[u8], u64),
    raw: &'v [u8],
) -> Result<Option<&'v [u8]>, StoreError> {
    let what = || {
        format!(
            "record of inode {} (kind {}, {}, {:?}) at epoch {}",
            key.0,
            key.1,
            key.2,
            String::from_utf8_lossy(key.3),
            key.4
        )
    };
    let v = unseal("versions", &[&version_key_parts(&key), key.3], raw, what)?;
    match v.split_first() {
        Some((&TAG_PRESENT, p)) => Ok(Some(p)),
        Some((&TAG_TOMBSTONE, [])) => Ok(None),
        _ => Err(StoreError::Corrupt(format!("{} has no valid tag", what()))),
    }
}

/// Encodes the `meta` row `name` (the format row is written bare, see
/// [`meta::FORMAT`]).
pub fn seal_meta(name: &str, value: &[u8]) -> Vec<u8> {
    seal("meta", &[name.as_bytes()], value)
}

/// Reads the `meta` row `name` from `t`; `None` if it is absent.
pub fn read_meta<T: redb::ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    name: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    match t.get(name).map_err(|e| StoreError::Db(e.into()))? {
        None => Ok(None),
        Some(v) => Ok(Some(
            unseal("meta", &[name.as_bytes()], v.value(), || {
                format!("meta row {name}")
            })?
            .to_vec(),
        )),
    }
}

/// Reads the `meta` row `name`, which must be there, decoded by `decode` (such as
/// [`le_u64`]); a missing row is `Corrupt`.
pub fn read_meta_as<T: redb::ReadableTable<&'static str, &'static [u8]>, V>(
    t: &T,
    name: &str,
    decode: fn(&[u8]) -> Result<V, StoreError>,
) -> Result<V, StoreError> {
    match read_meta(t, name)? {
        Some(v) => decode(&v),
        None => Err(StoreError::Corrupt(format!("meta row {name} is missing"))),
    }
}

/// Record kinds in `versions`.
pub const KIND_INODE: u8 = 0;
/// Directory entry.
pub const KIND_DIRENT: u8 = 1;
/// Block map entry.
pub const KIND_BLOCK: u8 = 2;
/// Extended attribute.
pub const KIND_XATTR: u8 = 3;
/// Back pointer: `(ino, 4, parent, name)` says `parent/name` links to `ino`, so that
/// a path can be found from an inode (diff) without walking the tree.
pub const KIND_PARENT: u8 = 4;

/// Value tag of a tombstone.
pub const TAG_TOMBSTONE: u8 = 0;
/// Value tag of a present record.
pub const TAG_PRESENT: u8 = 1;

/// The inode number of the volume root.
pub const ROOT_INO: u64 = 1;

/// File kinds as stored (the `kind` byte of inodes and entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FileKind {
    /// Regular file.
    File = 1,
    /// Directory.
    Dir = 2,
    /// Symbolic link.
    Symlink = 3,
    /// Named pipe.
    Fifo = 4,
    /// Unix socket.
    Socket = 5,
    /// Character device.
    CharDev = 6,
    /// Block device.
    BlockDev = 7,
}

impl FileKind {
    /// Decodes a stored kind byte.
    pub fn from_u8(v: u8) -> Result<Self, StoreError> {
        Ok(match v {
            1 => Self::File,
            2 => Self::Dir,
            3 => Self::Symlink,
            4 => Self::Fifo,
            5 => Self::Socket,
            6 => Self::CharDev,
            7 => Self::BlockDev,
            _ => return Err(StoreError::Corrupt(format!("unknown file kind {v}"))),
        })
    }

    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Self::File => libc::S_IFREG,
            Self::Dir => libc::S_IFDIR,
            Self::Symlink => libc::S_IFLNK,
            Self::Fifo => libc::S_IFIFO,
            Self::Socket => libc::S_IFSOCK,
            Self::CharDev => libc::S_IFCHR,
            Self::BlockDev => libc::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Self::File,
            libc::S_IFDIR => Self::Dir,
            libc::S_IFLNK => Self::Symlink,
            libc::S_IFIFO => Self::Fifo,
            libc::S_IFSOCK => Self::Socket,
            libc::S_IFCHR => Self::CharDev,
            libc::S_IFBLK => Self::BlockDev,
            _ => return None,
        })
    }
}

/// A timestamp: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Ts {
    /// Seconds (may be negative).
    pub sec: i64,
    /// Nanoseconds, below 1e9.
    pub nsec: u32,
}

impl Ts {
    /// The current wall-clock time, from the clock the kernel stamps file times with
    /// (`CLOCK_REALTIME_COARSE`): with the writeback cache the kernel stamps some
    /// times itself, and a finer clock here would put the daemon's stamps ahead of
    /// the kernel's, so that times could go backwards from one file to the next.
    pub fn now() -> Self {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime(2) writes a timespec to a valid pointer.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut t) } == 0 {
            return Ts {
                sec: t.tv_sec,
                nsec: t.tv_nsec as u32,
            };
        }
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ts {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }

    /// Converts to `SystemTime`.
    pub fn to_system(self) -> std::time::SystemTime {
        use std::time::{Duration, UNIX_EPOCH};
        if self.sec >= 0 {
            UNIX_EPOCH + Duration::new(self.sec as u64, self.nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.sec.unsigned_abs()) + Duration::new(0, self.nsec)
        }
    }

    /// Converts from `SystemTime`.
    pub fn from_system(t: std::time::SystemTime) -> Self {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Ts {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos();
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Ts { sec, nsec }
            }
        }
    }
}

/// An inode record: attributes plus, for symlinks, the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeRec {
    /// File kind.
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// Access time.
    pub atime: Ts,
    /// Modification time.
    pub mtime: Ts,
    /// Status change time.
    pub ctime: Ts,
    /// Creation time.
    pub crtime: Ts,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Parent directory (directories only; 0 otherwise).
    pub parent: u64,
    /// Symlink target (symlinks only).
    pub target: Vec<u8>,
    /// Inode flags set with chattr (`FS_*_FL`, see [`INODE_FLAGS`]); never on a
    /// symlink (which cannot be opened for the ioctl).
    pub flags: u32,
}

/// The inode flags kept: immutable, append-only, no-dump and no-atime.
pub const INODE_FLAGS: u32 = FS_IMMUTABLE_FL | FS_APPEND_FL | FS_NODUMP_FL | FS_NOATIME_FL;
/// `chattr +i`: no change at all, no new link, no removal.
pub const FS_IMMUTABLE_FL: u32 = 0x10;
/// `chattr +a`: data may only be appended; no removal, no new link.
pub const FS_APPEND_FL: u32 = 0x20;
/// `chattr +d`: backup programs skip the file.
pub const FS_NODUMP_FL: u32 = 0x40;
/// `chattr +A`: reads do not move the access time.
pub const FS_NOATIME_FL: u32 = 0x80;

const INODE_FIXED: usize = 1 + 4 * 4 + 8 + 4 * 12 + 4 + 8;

impl InodeRec {
    /// A new inode of `kind` made at `now` (every time), with no size, device,
    /// parent, target or flags.
    pub fn new(kind: FileKind, perm: u32, uid: u32, gid: u32, nlink: u32, now: Ts) -> Self {
        InodeRec {
            kind,
            perm,
            uid,
            gid,
            nlink,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            parent: 0,
            target: Vec::new(),
            flags: 0,
        }
    }

    /// Encodes the record (payload only, without the tag byte).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.kind as u8);
        for v in [self.perm, self.uid, self.gid, self.nlink] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.size.to_le_bytes());
        for t in [self.atime, self.mtime, self.ctime, self.crtime] {
            out.extend_from_slice(&t.sec.to_le_bytes());
            out.extend_from_slice(&t.nsec.to_le_bytes());
        }
        out.extend_from_slice(&self.rdev.to_le_bytes());
        out.extend_from_slice(&self.parent.to_le_bytes());
        // After the fixed part: a symlink's target, or another inode's flags when
        // any is set (records without flags are as they always were).
        if self.kind == FileKind::Symlink {
            out.extend_from_slice(&self.target);
        } else if self.flags != 0 {
            out.extend_from_slice(&self.flags.to_le_bytes());
        }
    }

    /// Decodes a payload written by [`InodeRec::encode`].
    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() < INODE_FIXED {
            return Err(StoreError::Corrupt(format!(
                "inode record of {} bytes",
                b.len()
            )));
        }
        let mut r = Reader(b);
        let kind = FileKind::from_u8(r.u8()?)?;
        let perm = r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        let nlink = r.u32()?;
        let size = r.u64()?;
        let mut ts = [Ts::default(); 4];
        for t in &mut ts {
            *t = r.ts()?;
        }
        let rdev = r.u32()?;
        let parent = r.u64()?;
        let (target, flags) = match (kind, r.0.len()) {
            (FileKind::Symlink, _) => (r.0.to_vec(), 0),
            (_, 0) => (Vec::new(), 0),
            (_, 4) => (Vec::new(), r.u32()?),
            (_, n) => {
                return Err(StoreError::Corrupt(format!(
                    "inode record with {n} trailing bytes"
                )));
            }
        };
        if flags & !INODE_FLAGS != 0 {
            return Err(StoreError::Corrupt(format!("inode flags {flags:#x}")));
        }
        Ok(InodeRec {
            kind,
            perm,
            uid,
            gid,
            nlink,
            size,
            atime: ts[0],
            mtime: ts[1],
            ctime: ts[2],
            crtime: ts[3],
            rdev,
            parent,
            target,
            flags,
        })
    }
}

/// A directory entry's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirentRec {
    /// The inode the name points at.
    pub ino: u64,
    /// Its kind (kept here so readdir needs no inode lookups).
    pub kind: FileKind,
}

impl DirentRec {
    /// Encodes the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ino.to_le_bytes());
        out.push(self.kind as u8);
    }

    /// Decodes the payload.
    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() != 9 {
            return Err(StoreError::Corrupt(format!("dirent of {} bytes", b.len())));
        }
        let mut r = Reader(b);
        Ok(DirentRec {
            ino: r.u64()?,
            kind: FileKind::from_u8(r.u8()?)?,
        })
    }
}

/// The unit of a block's fragments: small writes are stored page by page.
pub const PAGE: usize = 4096;

/// Pages of a block overlaid with the pages of another extent: block pages
/// `[at, at + n)` read extent pages `[from, from + n)`. A fragment extent may end short
/// (a tail written at end of file); the missing bytes read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frag {
    /// First block page covered.
    pub at: u16,
    /// Pages covered.
    pub n: u16,
    /// First page of the extent used.
    pub from: u16,
    /// The fragment extent's hash.
    pub hash: [u8; 32],
}

/// Bytes `[offset, offset + len)` of a block and where they come from: `Some((hash,
/// offset in that extent))` for a fragment, `None` for the base.
pub type Piece<'a> = (usize, usize, Option<(&'a [u8; 32], usize)>);

/// Bytes of an encoded [`Frag`].
const FRAG_BYTES: usize = 38;

/// The largest block size a store may have (opening a store checks its block size
/// against the same bound): no block record may name more.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;

/// Pages in the largest block: where every fragment must end.
const MAX_BLOCK_PAGES: u16 = (MAX_BLOCK_SIZE as usize / PAGE) as u16;

/// A block map entry's payload: which extent holds the block (its *base*; `len == 0`
/// for none), overlaid by fragments written since (sorted by `at`, disjoint). A small
/// write to a stored block adds a fragment instead of rewriting the whole block; a
/// block with too many fragments is folded back into one extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRec {
    /// The base extent's hash (zeros when there is no base, or when the base is
    /// unwritten: `len` bytes allocated by fallocate that read as zeros and name no
    /// extent).
    pub hash: [u8; 32],
    /// The base extent's length (the block's stored length; a short tail is short;
    /// 0 = no base, the block reads zeros outside its fragments).
    pub len: u32,
    /// Fragments over the base.
    pub frags: Vec<Frag>,
}

impl BlockRec {
    /// A block stored whole in one extent.
    pub fn whole(hash: [u8; 32], len: u32) -> Self {
        BlockRec {
            hash,
            len,
            frags: Vec::new(),
        }
    }

    /// Encodes the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.len.to_le_bytes());
        for f in &self.frags {
            out.extend_from_slice(&f.at.to_le_bytes());
            out.extend_from_slice(&f.n.to_le_bytes());
            out.extend_from_slice(&f.from.to_le_bytes());
            out.extend_from_slice(&f.hash);
        }
    }

    /// Decodes the payload.
    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() < 36 || !(b.len() - 36).is_multiple_of(FRAG_BYTES) {
            return Err(StoreError::Corrupt(format!(
                "block entry of {} bytes",
                b.len()
            )));
        }
        let mut r = Reader(b);
        let hash = r.take::<32>()?;
        let len = r.u32()?;
        if len > MAX_BLOCK_SIZE {
            return Err(StoreError::Corrupt(format!(
                "block entry of a {len}-byte base, longer than any block"
            )));
        }
        // The count comes from the input's length, so the allocation is bounded by it.
        let mut frags = Vec::with_capacity(r.0.len() / FRAG_BYTES);
        let mut end = 0u16;
        while !r.0.is_empty() {
            let frag = Frag {
                at: r.u16()?,
                n: r.u16()?,
                from: r.u16()?,
                hash: r.take()?,
            };
            // Page arithmetic on fragments is u16 everywhere: both page ranges must end
            // inside the largest block, so no sum of them can overflow.
            let inside = |start: u16| start.checked_add(frag.n).filter(|&e| e <= MAX_BLOCK_PAGES);
            let (Some(frag_end), Some(_)) = (inside(frag.at), inside(frag.from)) else {
                return Err(StoreError::Corrupt(format!(
                    "block entry with a fragment of {} pages at {} from {} outside the block",
                    frag.n, frag.at, frag.from
                )));
            };
            if frag.n == 0 || frag.at < end {
                return Err(StoreError::Corrupt(
                    "block entry with overlapping or empty fragments".into(),
                ));
            }
            end = frag_end;
            frags.push(frag);
        }
        if len == 0 && frags.is_empty() {
            return Err(StoreError::Corrupt("block entry naming no extent".into()));
        }
        Ok(BlockRec { hash, len, frags })
    }

    /// A block fallocate allocated and nothing wrote: `len` bytes that read as zeros.
    pub fn unwritten(len: u32) -> Self {
        BlockRec {
            hash: [0; 32],
            len,
            frags: Vec::new(),
        }
    }

    /// The base extent and its length, if the base is one (not absent or unwritten).
    pub fn base_extent(&self) -> Option<(&[u8; 32], u32)> {
        (self.len > 0 && self.hash != [0; 32]).then_some((&self.hash, self.len))
    }

    /// Allocated by fallocate and holding nothing: no base extent, no fragment.
    pub fn is_unwritten(&self) -> bool {
        self.len > 0 && self.hash == [0; 32] && self.frags.is_empty()
    }

    /// The extents this entry holds a reference to, one per naming (a fragment split
    /// in two names its extent twice).
    pub fn extents(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.base_extent()
            .map(|(h, _)| h)
            .into_iter()
            .chain(self.frags.iter().map(|f| &f.hash))
    }

    /// Pages of the block the entry holds data for: those of the base extent and
    /// those its fragments cover (each counted once), for `st_blocks`.
    pub fn alloc_pages(&self) -> u64 {
        let mut set = [0u64; 4];
        let base = (self.len as usize).div_ceil(PAGE);
        let frags = self
            .frags
            .iter()
            .map(|f| (f.at as usize, (f.at + f.n) as usize));
        for (a, b) in std::iter::once((0, base)).chain(frags) {
            for p in a..b.min(256) {
                set[p / 64] |= 1 << (p % 64);
            }
        }
        set.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Bytes of stored data the entry names (fragments counted whole pages).
    pub fn stored_bytes(&self) -> u64 {
        self.base_extent().map_or(0, |(_, n)| n as u64)
            + self
                .frags
                .iter()
                .map(|f| f.n as u64 * PAGE as u64)
                .sum::<u64>()
    }

    /// Where the bytes of block range `[start, end)` come from, in order.
    pub fn pieces(&self, start: usize, end: usize) -> Vec<Piece<'_>> {
        let mut out = Vec::new();
        let mut pos = start;
        for f in &self.frags {
            let (fs, fe) = (f.at as usize * PAGE, (f.at as usize + f.n as usize) * PAGE);
            if fe <= pos {
                continue;
            }
            if fs >= end {
                break;
            }
            if fs > pos {
                out.push((pos, fs - pos, None));
                pos = fs;
            }
            let e = fe.min(end);
            out.push((
                pos,
                e - pos,
                Some((&f.hash, pos - fs + f.from as usize * PAGE)),
            ));
            pos = e;
        }
        if pos < end {
            out.push((pos, end - pos, None));
        }
        out
    }
}

/// Where an extent lives and how many block map records name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentRec {
    /// Segment id.
    pub segment: u64,
    /// Offset of the extent's data (after its header) in the segment file.
    pub offset: u64,
    /// Data length.
    pub len: u32,
    /// Number of block map records (of any epoch) naming this extent.
    pub refs: u64,
}

impl ExtentRec {
    /// Bytes the extent takes in its segment: its header and its data.
    pub fn footprint(&self) -> u64 {
        crate::store::segment::EXTENT_HEADER + self.len as u64
    }

    /// Encodes the value of the row of extent `hash`.
    pub fn encode(&self, hash: &[u8; 32]) -> Vec<u8> {
        let mut out = [0u8; 28];
        out[..8].copy_from_slice(&self.segment.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..20].copy_from_slice(&self.len.to_le_bytes());
        out[20..28].copy_from_slice(&self.refs.to_le_bytes());
        seal("extents", &[hash], &out)
    }

    /// Decodes the value of the row of extent `hash`.
    pub fn decode(hash: &[u8; 32], raw: &[u8]) -> Result<Self, StoreError> {
        let b = unseal("extents", &[hash], raw, || {
            format!("index row of extent {}", crate::store::hex(hash))
        })?;
        Self::decode_bare(b)
    }

    /// Decodes a value without its checksum (format 1).
    pub(crate) fn decode_bare(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() != 28 {
            return Err(StoreError::Corrupt(format!(
                "extent row of {} bytes",
                b.len()
            )));
        }
        let mut r = Reader(b);
        Ok(ExtentRec {
            segment: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
            refs: r.u64()?,
        })
    }
}

/// A snapshot catalog row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotRec {
    /// The epoch the snapshot froze.
    pub epoch: u64,
    /// When it was taken.
    pub created: Ts,
    /// [`SNAP_DELETED`] and friends.
    pub flags: u8,
}

/// Snapshot flag: deleted by the user, kept only while something still holds it (an
/// open file in it). Such rows are keyed `"\0<epoch>"`, a name no user can give.
pub const SNAP_DELETED: u8 = 1;

impl SnapshotRec {
    /// Encodes the value of the row named `name`.
    pub fn encode(&self, name: &str) -> Vec<u8> {
        let mut out = [0u8; 21];
        out[..8].copy_from_slice(&self.epoch.to_le_bytes());
        out[8..16].copy_from_slice(&self.created.sec.to_le_bytes());
        out[16..20].copy_from_slice(&self.created.nsec.to_le_bytes());
        out[20] = self.flags;
        seal("snapshots", &[name.as_bytes()], &out)
    }

    /// Decodes the value of the row named `name`.
    pub fn decode(name: &str, raw: &[u8]) -> Result<Self, StoreError> {
        let b = unseal("snapshots", &[name.as_bytes()], raw, || {
            format!("snapshot row {name:?}")
        })?;
        Self::decode_bare(b)
    }

    /// Decodes a value without its checksum (format 1).
    pub(crate) fn decode_bare(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() != 21 {
            return Err(StoreError::Corrupt(format!(
                "snapshot row of {} bytes",
                b.len()
            )));
        }
        let mut r = Reader(b);
        Ok(SnapshotRec {
            epoch: r.u64()?,
            created: r.ts()?,
            flags: r.u8()?,
        })
    }
}

/// A `holds` row: the epoch of the snapshot a hold keeps, and when it was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldRec {
    /// The epoch of the held snapshot.
    pub epoch: u64,
    /// When the hold was taken.
    pub created: Ts,
}

impl HoldRec {
    /// Encodes the value of the hold named `name`.
    pub fn encode(&self, name: &str) -> Vec<u8> {
        let mut out = [0u8; 20];
        out[..8].copy_from_slice(&self.epoch.to_le_bytes());
        out[8..16].copy_from_slice(&self.created.sec.to_le_bytes());
        out[16..20].copy_from_slice(&self.created.nsec.to_le_bytes());
        seal("holds", &[name.as_bytes()], &out)
    }

    /// Decodes the value of the hold named `name`.
    pub fn decode(name: &str, raw: &[u8]) -> Result<Self, StoreError> {
        let b = unseal("holds", &[name.as_bytes()], raw, || {
            format!("hold {name:?}")
        })?;
        if b.len() != 20 {
            return Err(StoreError::Corrupt(format!(
                "hold {name:?} is {} bytes long",
                b.len()
            )));
        }
        let mut r = Reader(b);
        Ok(HoldRec {
            epoch: r.u64()?,
            created: r.ts()?,
        })
    }
}

/// A completed `snapfs sync` session, as one side records it: when it ended, how
/// many snapshots and bytes it moved, and the newest snapshot both sides then held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncRec {
    /// When the session ended.
    pub at: Ts,
    /// Snapshots sent (received).
    pub snapshots: u32,
    /// Bytes of extents.
    pub payload: u64,
    /// Bytes on the wire, both directions.
    pub wire: u64,
    /// The newest snapshot both sides hold (empty: none).
    pub base: String,
}

impl SyncRec {
    /// The value of `meta` row `name`.
    pub fn encode(&self, name: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.base.len());
        out.extend_from_slice(&self.at.sec.to_le_bytes());
        out.extend_from_slice(&self.at.nsec.to_le_bytes());
        out.extend_from_slice(&self.snapshots.to_le_bytes());
        out.extend_from_slice(&self.payload.to_le_bytes());
        out.extend_from_slice(&self.wire.to_le_bytes());
        out.extend_from_slice(self.base.as_bytes());
        seal_meta(name, &out)
    }

    /// Decodes the unsealed value of `meta` row `name`.
    pub fn decode(name: &str, b: &[u8]) -> Result<Self, StoreError> {
        if b.len() < 32 || b.len() > 32 + NAME_MAX {
            return Err(StoreError::Corrupt(format!(
                "meta row {name:?} is {} bytes long",
                b.len()
            )));
        }
        let mut r = Reader(&b[..32]);
        Ok(SyncRec {
            at: r.ts()?,
            snapshots: r.u32()?,
            payload: r.u64()?,
            wire: r.u64()?,
            base: String::from_utf8(b[32..].to_vec())
                .map_err(|_| StoreError::Corrupt(format!("meta row {name:?}: a base not UTF-8")))?,
        })
    }
}

/// Little-endian cursor over a byte slice. Callers check the length first, for a
/// message naming the record; reading past the end is still `Corrupt`, never a panic.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    /// The next `N` bytes.
    fn take<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let Some((head, rest)) = self.0.split_first_chunk::<N>() else {
            return Err(StoreError::Corrupt(format!(
                "record ends {} bytes short",
                N - self.0.len()
            )));
        };
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, StoreError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    /// A timestamp: seconds i64, nanoseconds u32 below one second (more would carry
    /// into the seconds wherever the time is used, or overflow them).
    fn ts(&mut self) -> Result<Ts, StoreError> {
        let sec = self.u64()? as i64;
        let nsec = self.u32()?;
        if nsec >= 1_000_000_000 {
            return Err(StoreError::Corrupt(format!(
                "timestamp with {nsec} nanoseconds"
            )));
        }
        Ok(Ts { sec, nsec })
    }
}

/// Reads a little-endian u64 from a `meta` value.
pub fn le_u64(b: &[u8]) -> Result<u64, StoreError> {
    b.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| StoreError::Corrupt(format!("meta value of {} bytes, want 8", b.len())))
}

/// Reads a little-endian u32 from a `meta` value.
pub fn le_u32(b: &[u8]) -> Result<u32, StoreError> {
    b.try_into()
        .map(u32::from_le_bytes)
        .map_err(|_| StoreError::Corrupt(format!("meta value of {} bytes, want 4", b.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_round_trip() {
        let rec = InodeRec {
            kind: FileKind::Symlink,
            perm: 0o4755,
            uid: 1000,
            gid: 100,
            nlink: 1,
            size: 1 << 40,
            atime: Ts { sec: -5, nsec: 7 },
            mtime: Ts::now(),
            ctime: Ts::now(),
            crtime: Ts::now(),
            rdev: 0x0801,
            parent: 0,
            target: b"../target".to_vec(),
            flags: 0,
        };
        let mut b = Vec::new();
        rec.encode(&mut b);
        assert_eq!(InodeRec::decode(&b).unwrap(), rec);
        assert!(InodeRec::decode(&b[..10]).is_err());
    }

    #[test]
    fn ts_negative_round_trip() {
        let t = Ts { sec: -3, nsec: 250 };
        assert_eq!(Ts::from_system(t.to_system()), t);
    }

    fn inode() -> InodeRec {
        InodeRec {
            kind: FileKind::Symlink,
            perm: 0o755,
            uid: 1000,
            gid: 100,
            nlink: 1,
            size: 9,
            atime: Ts { sec: -5, nsec: 7 },
            mtime: Ts {
                sec: 1 << 31,
                nsec: 999_999_999,
            },
            ctime: Ts::default(),
            crtime: Ts { sec: 1, nsec: 2 },
            rdev: 0,
            parent: 0,
            target: b"../target".to_vec(),
            flags: 0,
        }
    }

    fn frag(at: u16, n: u16, from: u16) -> Frag {
        Frag {
            at,
            n,
            from,
            hash: [at as u8; 32],
        }
    }

    fn encoded(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = Vec::new();
        f(&mut b);
        b
    }

    /// Feeds `decode` every prefix of `valid`, every one-byte change of it, runs of
    /// pseudo-random garbage and longer inputs: it must answer every one (bad bytes
    /// are `Err`, not a panic), and what it accepts must pass `sane`.
    fn hostile<T>(
        valid: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, StoreError>,
        sane: impl Fn(&T),
    ) {
        let check = |b: &[u8]| {
            if let Ok(v) = decode(b) {
                sane(&v);
            }
        };
        assert!(decode(valid).is_ok());
        for i in 0..valid.len() {
            check(&valid[..i]);
            let mut b = valid.to_vec();
            for v in [
                0x00,
                0x01,
                0x7f,
                0x80,
                0xff,
                valid[i] ^ 0x80,
                valid[i] ^ 0x01,
            ] {
                b[i] = v;
                check(&b);
            }
        }
        let mut longer = valid.to_vec();
        for _ in 0..100 {
            longer.push(0xff);
            check(&longer);
        }
        // A fixed xorshift stream: reproducible garbage of lengths around every size.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..4000 {
            let len = (next() % (valid.len() as u64 + 80)) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            check(&b);
            // The same garbage over a valid record's head, to get past length checks.
            let n = b.len().min(valid.len());
            b[..n].copy_from_slice(&valid[..n]);
            let at = (next() as usize) % valid.len();
            if at < b.len() {
                b[at] = next() as u8;
            }
            check(&b);
        }
    }

    fn sane_ts(t: &Ts) {
        assert!(t.nsec < 1_000_000_000, "{t:?} accepted");
    }

    fn sane_block(r: &BlockRec) {
        assert!(r.len <= MAX_BLOCK_SIZE);
        for f in &r.frags {
            // The sums the write path does in u16.
            for start in [f.at, f.from] {
                let end = start.checked_add(f.n).expect("fragment end overflows u16");
                assert!(end <= MAX_BLOCK_PAGES, "{f:?} accepted");
            }
        }
        let _ = r.pieces(0, MAX_BLOCK_SIZE as usize);
        let _ = r.stored_bytes();
        let _ = r.extents().count();
    }

    #[test]
    fn decoders_refuse_truncated_and_garbled_bytes_without_panicking() {
        let inode = encoded(|b| inode().encode(b));
        hostile(&inode, InodeRec::decode, |r| {
            [r.atime, r.mtime, r.ctime, r.crtime]
                .iter()
                .for_each(sane_ts);
            assert!(r.target.len() <= inode.len() + 100);
        });
        let dirent = encoded(|b| {
            DirentRec {
                ino: 77,
                kind: FileKind::Dir,
            }
            .encode(b)
        });
        hostile(&dirent, DirentRec::decode, |_| {});
        let block = encoded(|b| {
            BlockRec {
                hash: [3; 32],
                len: 65536,
                frags: vec![frag(0, 2, 0), frag(5, 3, 1), frag(250, 6, 250)],
            }
            .encode(b)
        });
        hostile(&block, BlockRec::decode, sane_block);
        let extent = ExtentRec {
            segment: 4,
            offset: 4096,
            len: 65536,
            refs: 2,
        }
        .encode(&[5; 32]);
        hostile(&extent, |b| ExtentRec::decode(&[5; 32], b), |_| {});
        hostile(&extent[..28], ExtentRec::decode_bare, |_| {});
        let snap = SnapshotRec {
            epoch: 9,
            created: Ts {
                sec: 1_768_046_400,
                nsec: 5,
            },
            flags: SNAP_DELETED,
        }
        .encode("s");
        hostile(
            &snap,
            |b| SnapshotRec::decode("s", b),
            |r| sane_ts(&r.created),
        );
        hostile(&snap[..21], SnapshotRec::decode_bare, |r| {
            sane_ts(&r.created)
        });
        hostile(&7u64.to_le_bytes(), le_u64, |_| {});
        hostile(&7u32.to_le_bytes(), le_u32, |_| {});
        hostile(
            &[2],
            |b| FileKind::from_u8(b.first().copied().unwrap_or(0)),
            |_| {},
        );
    }

    #[test]
    fn every_flipped_bit_of_a_record_or_its_key_fails_its_checksum() {
        let key = (12u64, KIND_BLOCK, 3u64, &b""[..], 7u64);
        let payload = [9u8; 36];
        let v = seal_version(key, Some(&payload));
        assert_eq!(open_version(key, &v).unwrap(), Some(&payload[..]));
        for bit in 0..v.len() * 8 {
            let mut w = v.clone();
            w[bit / 8] ^= 1 << (bit % 8);
            assert!(open_version(key, &w).is_err(), "value bit {bit}");
        }
        let others = [
            (13, KIND_BLOCK, 3, &b""[..], 7),
            (12, KIND_XATTR, 3, &b""[..], 7),
            (12, KIND_BLOCK, 2, &b""[..], 7),
            (12, KIND_BLOCK, 3, &b"x"[..], 7),
            (12, KIND_BLOCK, 3, &b""[..], 6),
        ];
        for k in others {
            assert!(open_version(k, &v).is_err(), "{k:?}");
        }
        let t = seal_version(key, None);
        assert_eq!(open_version(key, &t).unwrap(), None);
        let e = ExtentRec {
            segment: 1,
            offset: 56,
            len: 65536,
            refs: 1,
        }
        .encode(&[1; 32]);
        assert!(ExtentRec::decode(&[1; 32], &e).is_ok());
        assert!(ExtentRec::decode(&[2; 32], &e).is_err());
        let m = seal_meta(meta::LIVE_EPOCH, &5u64.to_le_bytes());
        assert!(unseal("meta", &[meta::NEXT_INO.as_bytes()], &m, String::new).is_err());
    }

    #[test]
    fn a_second_of_nanoseconds_is_corrupt() {
        for nsec in [1_000_000_000, u32::MAX] {
            let mut rec = inode();
            rec.ctime.nsec = nsec;
            let b = encoded(|b| rec.encode(b));
            assert!(matches!(InodeRec::decode(&b), Err(StoreError::Corrupt(_))));
            let snap = SnapshotRec {
                epoch: 1,
                created: Ts { sec: 0, nsec },
                flags: 0,
            };
            assert!(matches!(
                SnapshotRec::decode("s", &snap.encode("s")),
                Err(StoreError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn fragments_must_lie_inside_the_block() {
        let decode = |frags: Vec<Frag>| {
            let rec = BlockRec {
                hash: [1; 32],
                len: 4096,
                frags,
            };
            BlockRec::decode(&encoded(|b| rec.encode(b)))
        };
        // The last page of the largest block, from the last page of its extent.
        let last = MAX_BLOCK_PAGES - 1;
        assert!(decode(vec![frag(0, 1, 0), frag(last, 1, last)]).is_ok());
        for bad in [
            vec![frag(u16::MAX, 2, 0)],
            vec![frag(0, 1, u16::MAX)],
            vec![frag(last, 2, 0)],
            vec![frag(0, 2, last)],
            vec![frag(0, u16::MAX, 0)],
            // Ends past page 2^16: a u16 sum would wrap to page 0.
            vec![frag(1, u16::MAX, 0), frag(2, 1, 0)],
        ] {
            assert!(
                matches!(decode(bad.clone()), Err(StoreError::Corrupt(_))),
                "{bad:?}"
            );
        }
        let huge = BlockRec::whole([1; 32], MAX_BLOCK_SIZE + 1);
        assert!(BlockRec::decode(&encoded(|b| huge.encode(b))).is_err());
    }
}
