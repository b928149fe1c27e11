//! `snapfs fsck` and `snapfs status`: whole-store checks and figures.
//!
//! fsck verifies, at the live epoch and at every snapshot epoch, that the tree is
//! reachable from the root with link counts that match; over all versions, that every
//! block record names an indexed extent and that every extent's reference count equals
//! the records naming it; and that every extent lies inside its segment behind a valid
//! header. With `read_data` it rehashes every extent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::store::schema::*;
use crate::store::segment::{EXTENT_HEADER, EXTENT_MAGIC};
use crate::store::{RecKey, Store, StoreError, hex, scan_visible, visible};

/// What fsck found.
#[derive(Debug, Default)]
pub struct Report {
    /// Inodes reached at the live epoch.
    pub inodes: u64,
    /// Extents in the index.
    pub extents: u64,
    /// Bytes of those extents.
    pub extent_bytes: u64,
    /// Extents rehashed (with `read_data`).
    pub rehashed: u64,
    /// Every problem, one line each.
    pub problems: Vec<String>,
}

impl Report {
    /// Whether the store is clean.
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for p in &self.problems {
            let _ = writeln!(s, "damage: {p}");
        }
        let _ = write!(
            s,
            "fsck: {} inodes, {} extents ({} bytes){}, {} problems: {}",
            self.inodes,
            self.extents,
            self.extent_bytes,
            if self.rehashed > 0 {
                format!(", {} rehashed", self.rehashed)
            } else {
                String::new()
            },
            self.problems.len(),
            if self.clean() { "clean" } else { "DAMAGED" }
        );
        s
    }
}

type Versions<'a> = redb::ReadOnlyTable<(u64, u8, u64, &'static [u8], u64), &'static [u8]>;

/// Walks the tree visible at `epoch`; returns the inodes reached.
fn walk(
    t: &Versions<'_>,
    epoch: u64,
    label: &str,
    problems: &mut Vec<String>,
) -> Result<u64, StoreError> {
    let mut links: HashMap<u64, u32> = HashMap::new();
    let mut recs: HashMap<u64, InodeRec> = HashMap::new();
    let mut stack = vec![ROOT_INO];
    match visible(t, RecKey::inode(ROOT_INO), epoch)? {
        Some(b) => {
            recs.insert(ROOT_INO, InodeRec::decode(&b)?);
        }
        None => {
            problems.push(format!("{label}: the root directory is missing"));
            return Ok(0);
        }
    }
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    while let Some(dir) = stack.pop() {
        let mut children = Vec::new();
        scan_visible(t, dir, KIND_DIRENT, 0..=0, epoch, |_, name, v| {
            children.push((name.to_vec(), DirentRec::decode(v)?));
            Ok(true)
        })?;
        for (name, ent) in children {
            let shown = String::from_utf8_lossy(&name).into_owned();
            let rec = match recs.get(&ent.ino) {
                Some(r) => r.clone(),
                None => {
                    match visible(t, RecKey::inode(ent.ino), epoch)? {
                        Some(b) => {
                            let r = InodeRec::decode(&b)?;
                            recs.insert(ent.ino, r.clone());
                            if r.kind == FileKind::Dir {
                                stack.push(ent.ino);
                            }
                            r
                        }
                        None => {
                            problems.push(format!("{label}: entry {shown:?} of directory {dir} names missing inode {}", ent.ino));
                            continue;
                        }
                    }
                }
            };
            if rec.kind != ent.kind {
                problems.push(format!(
                    "{label}: entry {shown:?} of directory {dir} has the wrong kind"
                ));
            }
            *links.entry(ent.ino).or_default() += 1;
            if rec.kind == FileKind::Dir {
                *subdirs.entry(dir).or_default() += 1;
                if rec.parent != dir {
                    problems.push(format!(
                        "{label}: directory {} says its parent is {}, found in {dir}",
                        ent.ino, rec.parent
                    ));
                }
            }
        }
    }
    for (ino, rec) in &recs {
        let want = if rec.kind == FileKind::Dir {
            2 + subdirs.get(ino).copied().unwrap_or(0)
        } else {
            links.get(ino).copied().unwrap_or(0)
        };
        if rec.nlink != want {
            problems.push(format!(
                "{label}: inode {ino} has nlink {} but {want} links",
                rec.nlink
            ));
        }
    }
    Ok(recs.len() as u64)
}

/// Checks `store`; `progress(done, total)` is called while extents are checked.
pub fn fsck(
    store: &mut Store,
    read_data: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, StoreError> {
    store.commit_group(false)?;
    let mut rep = Report::default();
    let txn = store.db().begin_read()?;
    let versions = txn.open_table(VERSIONS)?;
    let mut epochs: Vec<(String, u64)> = vec![("live".into(), store.live_epoch)];
    for row in txn.open_table(SNAPSHOTS)?.iter()? {
        let (k, v) = row?;
        epochs.push((
            format!("snapshot {}", k.value()),
            SnapshotRec::decode(v.value())?.epoch,
        ));
    }
    for (label, epoch) in &epochs {
        let n = walk(&versions, *epoch, label, &mut rep.problems)?;
        if label == "live" {
            rep.inodes = n;
        }
    }
    // Reference counts over every version.
    let mut refs: HashMap<[u8; 32], u64> = HashMap::new();
    for row in versions.range((0u64, KIND_BLOCK, 0u64, &[][..], 0u64)..)? {
        let (k, v) = row?;
        let (ino, kind, idx, _, epoch) = k.value();
        if kind != KIND_BLOCK {
            continue;
        }
        let v = v.value();
        if v.first() == Some(&TAG_PRESENT) {
            match BlockRec::decode(&v[1..]) {
                Ok(b) => {
                    for h in b.extents() {
                        *refs.entry(*h).or_default() += 1;
                    }
                }
                Err(e) => rep
                    .problems
                    .push(format!("block {idx} of inode {ino} at epoch {epoch}: {e}")),
            }
        }
    }
    let extents = txn.open_table(EXTENTS)?;
    let total = extents.len()?;
    let mut seen = HashSet::new();
    let mut seg_len: BTreeMap<u64, u64> = BTreeMap::new();
    for (i, row) in extents.iter()?.enumerate() {
        let (k, v) = row?;
        let hash = k.value();
        seen.insert(hash);
        let ext = ExtentRec::decode(v.value())?;
        rep.extents += 1;
        rep.extent_bytes += ext.len as u64;
        let want = refs.get(&hash).copied().unwrap_or(0);
        if ext.refs != want {
            rep.problems.push(format!(
                "extent {} has {} references recorded, {want} found",
                hex(&hash),
                ext.refs
            ));
        }
        let len = match seg_len.get(&ext.segment) {
            Some(l) => *l,
            None => {
                let l = match store.segs.file(ext.segment) {
                    Ok(f) => f.metadata()?.len(),
                    Err(e) => {
                        rep.problems.push(e.to_string());
                        0
                    }
                };
                seg_len.insert(ext.segment, l);
                l
            }
        };
        if ext.offset < EXTENT_HEADER || ext.offset + ext.len as u64 > len {
            rep.problems.push(format!(
                "extent {} at {}+{} lies outside segment {:016x} ({len} bytes)",
                hex(&hash),
                ext.offset,
                ext.len,
                ext.segment
            ));
            continue;
        }
        let header = store.segs.read(
            ext.segment,
            ext.offset - EXTENT_HEADER,
            EXTENT_HEADER as u32,
        )?;
        if &header[..4] != EXTENT_MAGIC
            || u32::from_le_bytes([header[4], header[5], header[6], header[7]]) != ext.len
            || header[8..40] != hash
        {
            rep.problems.push(format!(
                "extent {} has a bad header in segment {:016x}",
                hex(&hash),
                ext.segment
            ));
        }
        if read_data {
            if let Err(e) = store.read_extent(&hash, &ext) {
                rep.problems.push(e.to_string());
            }
            rep.rehashed += 1;
        }
        if i % 256 == 0 {
            progress(i as u64, total);
        }
    }
    progress(total, total);
    for hash in refs.keys() {
        if !seen.contains(hash) {
            rep.problems.push(format!(
                "block records name extent {} that is not in the index",
                hex(hash)
            ));
        }
    }
    Ok(rep)
}

/// Space and dedup figures of a store.
#[derive(Debug, Default)]
pub struct Status {
    /// Inodes at the live epoch, by kind: files, directories, others.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks, devices, fifos, sockets.
    pub others: u64,
    /// Sum of live file sizes.
    pub logical_bytes: u64,
    /// Bytes of data the live tree's blocks name (before dedup).
    pub referenced_bytes: u64,
    /// Bytes of unique extents stored.
    pub stored_bytes: u64,
    /// Bytes all block records (live and snapshots) name, counting shared ones each time.
    pub named_bytes: u64,
    /// Bytes on disk: segments plus metadata.
    pub disk_bytes: u64,
    /// Snapshot names.
    pub snapshots: Vec<String>,
    /// The block size.
    pub block_size: u32,
}

impl Status {
    /// The human form.
    pub fn render(&self) -> String {
        let ratio = if self.stored_bytes > 0 {
            self.named_bytes as f64 / self.stored_bytes as f64
        } else {
            1.0
        };
        format!(
            "files:            {}\ndirectories:      {}\nother inodes:     {}\nlogical bytes:    {}\nreferenced bytes: {}\nstored bytes:     {}\non disk:          {}\ndedup ratio:      {ratio:.2}x\nblock size:       {}\nsnapshots:        {}{}\n",
            self.files,
            self.dirs,
            self.others,
            self.logical_bytes,
            self.referenced_bytes,
            self.stored_bytes,
            self.disk_bytes,
            self.block_size,
            self.snapshots.len(),
            if self.snapshots.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.snapshots.join(", "))
            },
        )
    }
}

/// Gathers [`Status`].
pub fn status(store: &mut Store) -> Result<Status, StoreError> {
    store.commit_group(false)?;
    let mut st = Status {
        block_size: store.block_size,
        ..Default::default()
    };
    let txn = store.db().begin_read()?;
    let versions = txn.open_table(VERSIONS)?;
    let live = store.live_epoch;
    let mut last: Option<(u64, u8, u64, Vec<u8>)> = None;
    let mut pending: Option<Vec<u8>> = None;
    let account =
        |key: &(u64, u8, u64, Vec<u8>), v: &[u8], st: &mut Status| -> Result<(), StoreError> {
            if v.first() != Some(&TAG_PRESENT) {
                return Ok(());
            }
            match key.1 {
                KIND_INODE => {
                    let r = InodeRec::decode(&v[1..])?;
                    match r.kind {
                        FileKind::File => {
                            st.files += 1;
                            st.logical_bytes += r.size;
                        }
                        FileKind::Dir => st.dirs += 1,
                        _ => st.others += 1,
                    }
                }
                KIND_BLOCK => st.referenced_bytes += BlockRec::decode(&v[1..])?.stored_bytes(),
                _ => {}
            }
            Ok(())
        };
    for row in versions.iter()? {
        let (k, v) = row?;
        let (ino, kind, sub, name, epoch) = k.value();
        if epoch > live {
            continue;
        }
        let key = (ino, kind, sub, name.to_vec());
        if last.as_ref() != Some(&key) {
            if let (Some(l), Some(p)) = (&last, &pending) {
                account(l, p, &mut st)?;
            }
            last = Some(key);
        }
        pending = Some(v.value().to_vec());
    }
    if let (Some(l), Some(p)) = (&last, &pending) {
        account(l, p, &mut st)?;
    }
    for row in txn.open_table(EXTENTS)?.iter()? {
        let (_, v) = row?;
        let e = ExtentRec::decode(v.value())?;
        st.stored_bytes += e.len as u64;
        st.named_bytes += e.len as u64 * e.refs;
    }
    for row in txn.open_table(SNAPSHOTS)?.iter()? {
        st.snapshots.push(row?.0.value().to_string());
    }
    st.disk_bytes =
        store.segs.disk_bytes()? + std::fs::metadata(store.path.join(crate::store::DB_FILE))?.len();
    Ok(st)
}
