//! `snapfs fsck` and `snapfs status`: whole-store checks and figures.
//!
//! fsck verifies, at the live epoch (but a replica's, its sink's staging area) and at
//! every snapshot epoch, that the tree is reachable from the root with link counts
//! that match; over all versions, that every
//! block record names an indexed extent and that every extent's reference count equals
//! the records naming it; and that every extent lies inside its segment behind a valid
//! header. With `read_data` it rehashes every extent.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::store::schema::*;
use crate::store::segment::{EXTENT_HEADER, EXTENT_MAGIC, Segments};
use crate::store::{
    RecKey, Store, StoreError, for_each_visible, hex, paths_at, scan_visible, visible,
};
use crate::text::printable;

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
    /// The file data that damaged extents reach, by view and path.
    pub hurt: Vec<Hurt>,
}

/// Bytes of a file that damage reaches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hurt {
    /// `live`, `snapshot NAME`, or `deleting snapshot (epoch N)`.
    pub view: String,
    /// The file's path from the volume root (`/a/b`), or `(inode N)` where none leads
    /// to it.
    pub path: String,
    /// First byte hurt.
    pub start: u64,
    /// One past the last byte hurt.
    pub end: u64,
    /// What is wrong with the data there.
    pub cause: String,
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
        for h in &self.hurt {
            let _ = writeln!(
                s,
                "hurt: {}: {} bytes {}..{}: {}",
                h.view,
                printable(&h.path),
                h.start,
                h.end,
                h.cause
            );
        }
        let _ = write!(
            s,
            "fsck: {} inodes, {} extents ({} bytes){}, {} problems{}: {}",
            self.inodes,
            self.extents,
            self.extent_bytes,
            if self.rehashed > 0 {
                format!(", {} rehashed", self.rehashed)
            } else {
                String::new()
            },
            self.problems.len(),
            if self.hurt.is_empty() {
                String::new()
            } else {
                format!(", {} file ranges hurt", self.hurt.len())
            },
            if self.clean() { "clean" } else { "DAMAGED" }
        );
        s
    }

    /// The report as one JSON object.
    pub fn json(&self) -> String {
        let hurt: Vec<serde_json::Value> = self
            .hurt
            .iter()
            .map(|h| {
                serde_json::json!({
                    "view": h.view,
                    "path": h.path,
                    "start": h.start,
                    "end": h.end,
                    "cause": h.cause,
                })
            })
            .collect();
        serde_json::json!({
            "clean": self.clean(),
            "inodes": self.inodes,
            "extents": self.extents,
            "extent_bytes": self.extent_bytes,
            "rehashed": self.rehashed,
            "problems": self.problems,
            "hurt": hurt,
        })
        .to_string()
    }
}

type Versions<'a> = redb::ReadOnlyTable<(u64, u8, u64, &'static [u8], u64), &'static [u8]>;

/// Walks the tree visible at `epoch`; returns the inodes reached.
fn walk(
    t: &Versions<'_>,
    epoch: u64,
    label: &str,
    problems: &mut Vec<String>,
) -> Result<HashSet<u64>, StoreError> {
    let mut links: HashMap<u64, u32> = HashMap::new();
    let mut recs: HashMap<u64, InodeRec> = HashMap::new();
    let mut stack = vec![ROOT_INO];
    match visible(t, RecKey::inode(ROOT_INO), epoch)? {
        Some(b) => {
            recs.insert(ROOT_INO, InodeRec::decode(&b)?);
        }
        None => {
            problems.push(format!("{label}: the root directory is missing"));
            return Ok(HashSet::new());
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
    Ok(recs.into_keys().collect())
}

/// Cross-checks the records visible at `epoch` against each other: every directory
/// entry has its back pointer and every back pointer its entry (a lost entry leaves
/// one behind, and is named by it), and every inode is reached from the root (`reached`)
/// unless it is an open, unlinked file (`orphans`, for the live tree).
fn structure(
    t: &Versions<'_>,
    epoch: u64,
    label: &str,
    reached: &HashSet<u64>,
    orphans: Option<&HashSet<u64>>,
    problems: &mut Vec<String>,
) -> Result<(), StoreError> {
    let mut inodes: BTreeMap<u64, InodeRec> = BTreeMap::new();
    let mut entries: HashMap<(u64, Vec<u8>), u64> = HashMap::new();
    let mut backs: Vec<(u64, u64, Vec<u8>)> = Vec::new();
    for_each_visible(t, epoch, |ino, kind, sub, name, payload| {
        match kind {
            KIND_INODE => match InodeRec::decode(payload) {
                Ok(r) => {
                    inodes.insert(ino, r);
                }
                Err(e) => problems.push(format!("{label}: inode {ino}: {e}")),
            },
            KIND_DIRENT => match DirentRec::decode(payload) {
                Ok(d) => {
                    entries.insert((ino, name.to_vec()), d.ino);
                }
                Err(e) => problems.push(format!(
                    "{label}: entry {:?} of directory {ino}: {e}",
                    String::from_utf8_lossy(name)
                )),
            },
            KIND_PARENT => backs.push((ino, sub, name.to_vec())),
            _ => {}
        }
        Ok(())
    })?;
    let path = |ino: u64| -> String {
        match paths_at(t, epoch, ino) {
            Ok(p) if !p.is_empty() => printable(&p[0]).into_owned(),
            _ => format!("(inode {ino})"),
        }
    };
    let mut backed: HashSet<(u64, &[u8])> = HashSet::new();
    for (ino, dir, name) in &backs {
        backed.insert((*dir, name.as_slice()));
        if entries.get(&(*dir, name.clone())) != Some(ino) {
            let what = match inodes.get(ino) {
                Some(r) if r.kind == FileKind::File => format!("a file of {} bytes", r.size),
                Some(r) => format!("a {:?}", r.kind).to_lowercase(),
                None => "an inode with no record".into(),
            };
            problems.push(format!(
                "{label}: entry {:?} of directory {} is missing; inode {ino} ({what}) linked there is lost",
                String::from_utf8_lossy(name),
                path(*dir)
            ));
        }
    }
    for ((dir, name), ino) in &entries {
        if !backed.contains(&(*dir, name.as_slice())) {
            problems.push(format!(
                "{label}: entry {:?} of directory {} (inode {ino}) has no back pointer",
                String::from_utf8_lossy(name),
                path(*dir)
            ));
        }
    }
    for (ino, rec) in &inodes {
        if reached.contains(ino) || orphans.is_some_and(|o| o.contains(ino)) {
            continue;
        }
        // An unlinked file still open when a snapshot was taken is in it, unnamed.
        if orphans.is_none() && rec.nlink == 0 {
            continue;
        }
        problems.push(format!(
            "{label}: inode {ino} ({} bytes, nlink {}) is not reachable from the root",
            rec.size, rec.nlink
        ));
    }
    Ok(())
}

/// Checks `store`; `progress(done, total)` is called while extents are checked.
pub fn fsck(
    store: &mut Store,
    read_data: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, StoreError> {
    fsck_frozen(&mut store.frozen()?, read_data, progress)
}

/// Checks a [`crate::store::Frozen`] view, without the store (or its lock).
pub fn fsck_frozen(
    view: &mut crate::store::Frozen,
    read_data: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, StoreError> {
    let cancel = view.cancel_flag();
    fsck_checked(&view.txn, &mut view.segs, read_data, progress, &cancel)
}

/// Checks a store that no daemon holds, opened with [`crate::store::ReadOnlyStore`]:
/// not a byte of it changes.
pub fn fsck_offline(
    ro: &mut crate::store::ReadOnlyStore,
    read_data: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, StoreError> {
    let txn = ro.begin_read()?;
    fsck_txn(&txn, &mut ro.segs, read_data, progress)
}

/// Checks the store as `txn` sees it, with its segment files `segs`.
pub fn fsck_txn(
    txn: &redb::ReadTransaction,
    segs: &mut Segments,
    read_data: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, StoreError> {
    let never = std::sync::atomic::AtomicBool::new(false);
    fsck_checked(txn, segs, read_data, progress, &never)
}

/// [`fsck_txn`] that stops with an error once `cancel` is set (checked between
/// extents).
fn fsck_checked(
    txn: &redb::ReadTransaction,
    segs: &mut Segments,
    read_data: bool,
    progress: &mut dyn FnMut(u64, u64),
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<Report, StoreError> {
    let mut rep = Report::default();
    let (live, block_size) = live_and_block_size(txn)?;
    let block_size = block_size as u64;
    let versions = txn.open_table(VERSIONS)?;
    let mut views: Vec<(String, u64)> = vec![("live".into(), live)];
    for row in txn.open_table(SNAPSHOTS)?.iter()? {
        let (k, v) = row?;
        let name = k.value();
        let epoch = match SnapshotRec::decode(name, v.value()) {
            Ok(r) => r.epoch,
            Err(e) => {
                rep.problems
                    .push(format!("snapshot {}: {e}", printable(name)));
                continue;
            }
        };
        views.push(if name.starts_with('\0') {
            (format!("deleting snapshot (epoch {epoch})"), epoch)
        } else {
            (format!("snapshot {}", printable(name)), epoch)
        });
    }
    let mut orphans = HashSet::new();
    for row in txn.open_table(ORPHANS)?.iter()? {
        orphans.insert(row?.0.value());
    }
    // A replica's live tree is where its sink stages the snapshot being received: a
    // session cut short leaves it part-applied, for the next one to roll back. It is
    // never shown (a replica shows its newest snapshot), so it is not held to a
    // tree's rules; the checksums of its records and the extents they name are
    // checked below with every other version's.
    let replica = txn.open_table(META)?.get(meta::REPLICA_OF)?.is_some();
    for (label, epoch) in &views {
        if replica && label == "live" {
            let mut staging = Vec::new();
            rep.inodes = walk(&versions, *epoch, label, &mut staging)?.len() as u64;
            continue;
        }
        let reached = walk(&versions, *epoch, label, &mut rep.problems)?;
        let o = (label == "live").then_some(&orphans);
        structure(&versions, *epoch, label, &reached, o, &mut rep.problems)?;
        if label == "live" {
            rep.inodes = reached.len() as u64;
        }
    }
    // Every record's checksum, versions no view can see, and reference counts over
    // every version.
    let mut refs: HashMap<[u8; 32], u64> = HashMap::new();
    let mut damaged_inos: BTreeMap<u64, u64> = BTreeMap::new();
    let mut leaked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut seen_by: Vec<u64> = views.iter().map(|v| v.1).collect();
    seen_by.sort_unstable();
    let mut prev: Option<(Identity, u64)> = None;
    // The change index must name every version above the oldest snapshot: diff,
    // rollback and snapshot deletion find what changed there through it alone.
    let changes = txn.open_table(CHANGES)?;
    let cutoff = views.iter().skip(1).map(|v| v.1).min();
    let mut unindexed: BTreeMap<u64, u64> = BTreeMap::new();
    for row in versions.iter()? {
        let (k, v) = row?;
        let (ino, kind, idx, name, epoch) = k.value();
        if cutoff.is_some_and(|c| epoch > c)
            && changes.get((epoch, ino, kind, idx, name))?.is_none()
        {
            *unindexed.entry(ino).or_default() += 1;
        }
        // A version superseded before any view's epoch came is seen by none.
        if let Some(((pi, pk, ps, pn), pe)) = &prev
            && (*pi, *pk, *ps, pn.as_slice()) == (ino, kind, idx, name)
        {
            let first = seen_by.partition_point(|e| e < pe);
            if seen_by.get(first).is_none_or(|e| *e >= epoch) {
                *leaked.entry(ino).or_default() += 1;
            }
        }
        prev = Some(((ino, kind, idx, name.to_vec()), epoch));
        let payload = match open_version(k.value(), v.value()) {
            Ok(p) => p,
            Err(e) => {
                rep.problems.push(e.to_string());
                *damaged_inos.entry(ino).or_default() += 1;
                continue;
            }
        };
        if kind != KIND_BLOCK {
            continue;
        }
        if let Some(p) = payload
            && let Err(e) = count_refs(p, &mut refs)
        {
            rep.problems
                .push(format!("block {idx} of inode {ino} at epoch {epoch}: {e}"));
        }
    }
    for (ino, n) in &unindexed {
        rep.problems.push(format!(
            "inode {ino}: {n} changes missing from the change index (diff, rollback and snapshot deletion would miss them; fsck --repair rebuilds it)"
        ));
    }
    for (ino, n) in &leaked {
        rep.problems.push(format!(
            "inode {ino}: {n} versions that no view can see (leaked; fsck --repair drops them)"
        ));
    }
    for (ino, n) in &damaged_inos {
        for (label, epoch) in &views {
            if let Ok(paths) = paths_at(&versions, *epoch, *ino)
                && !paths.is_empty()
            {
                rep.problems.push(format!(
                    "{label}: {} has {n} damaged metadata records",
                    printable(&paths.join(", ")).into_owned()
                ));
            }
        }
    }
    let extents = txn.open_table(EXTENTS)?;
    let total = extents.len()?;
    let mut seen = HashSet::new();
    // Per segment: its length, or None if its file is missing.
    let mut seg_len: BTreeMap<u64, Option<u64>> = BTreeMap::new();
    let mut missing: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    // Damaged extents, with what is wrong with each.
    let mut bad: HashMap<[u8; 32], String> = HashMap::new();
    for (i, row) in extents.iter()?.enumerate() {
        let (k, v) = row?;
        let hash = k.value();
        seen.insert(hash);
        let ext = match ExtentRec::decode(&hash, v.value()) {
            Ok(e) => e,
            Err(e) => {
                rep.problems
                    .push(format!("extent {}: index row: {e}", hex(&hash)));
                bad.insert(hash, "its index row is damaged".into());
                continue;
            }
        };
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
                let l = if segs.exists(ext.segment) {
                    match segs.len(ext.segment) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            rep.problems
                                .push(format!("segment {}: {e}", seg_name(ext.segment)));
                            Some(0)
                        }
                    }
                } else {
                    None
                };
                seg_len.insert(ext.segment, l);
                l
            }
        };
        let Some(len) = len else {
            let m = missing.entry(ext.segment).or_default();
            m.0 += 1;
            m.1 += ext.len as u64;
            bad.insert(
                hash,
                format!("its segment file {} is missing", seg_name(ext.segment)),
            );
            continue;
        };
        if ext.offset < EXTENT_HEADER || ext.offset + ext.len as u64 > len {
            rep.problems.push(format!(
                "extent {} at {}+{} lies outside segment {} ({len} bytes)",
                hex(&hash),
                ext.offset,
                ext.len,
                seg_name(ext.segment)
            ));
            bad.insert(
                hash,
                format!("segment {} is cut short", seg_name(ext.segment)),
            );
            continue;
        }
        let header = match segs.read(
            ext.segment,
            ext.offset - EXTENT_HEADER,
            EXTENT_HEADER as u32,
        ) {
            Ok(h) => h,
            Err(e) => {
                rep.problems.push(format!("extent {}: {e}", hex(&hash)));
                bad.insert(hash, format!("its segment cannot be read: {e}"));
                continue;
            }
        };
        if &header[..4] != EXTENT_MAGIC
            || u32::from_le_bytes([header[4], header[5], header[6], header[7]]) != ext.len
            || header[8..40] != hash
        {
            rep.problems.push(format!(
                "extent {} has a bad header in segment {}",
                hex(&hash),
                seg_name(ext.segment)
            ));
        }
        if read_data {
            let ok = match segs.read(ext.segment, ext.offset, ext.len) {
                Ok(data) => crate::store::check_whole(&hash, &ext, &data).is_ok(),
                Err(e) => {
                    rep.problems.push(format!("extent {}: {e}", hex(&hash)));
                    false
                }
            };
            if !ok {
                rep.problems.push(format!(
                    "extent {} in segment {} at {} does not match its hash",
                    hex(&hash),
                    seg_name(ext.segment),
                    ext.offset
                ));
                bad.insert(
                    hash,
                    format!(
                        "its bytes in segment {} at {} do not match their hash",
                        seg_name(ext.segment),
                        ext.offset
                    ),
                );
            }
            rep.rehashed += 1;
        }
        if i % 256 == 0 {
            if cancel.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "fsck stopped: the volume is being unmounted",
                )));
            }
            progress(i as u64, total);
        }
    }
    progress(total, total);
    for (id, (n, bytes)) in &missing {
        rep.problems.push(format!(
            "segment file {} is missing: {n} extents ({bytes} bytes) were in it",
            seg_name(*id)
        ));
    }
    for hash in refs.keys() {
        if !seen.contains(hash) {
            rep.problems.push(format!(
                "block records name extent {} that is not in the index",
                hex(hash)
            ));
            bad.insert(*hash, "its extent is not in the index".into());
        }
    }
    if !bad.is_empty() {
        rep.hurt = name_damage(&versions, &views, block_size, &bad)?;
    }
    Ok(rep)
}

/// Repairs what can be repaired without guessing, on a store no daemon holds, and
/// says what it did: extent reference counts set to the records that name them (an
/// extent no record names is freed, an index row that fails its checksum dropped),
/// versions no view can see dropped, and wholly dead segments (unindexed leftovers of
/// a crash) deleted. Damaged data and lost directory entries are only reported.
pub fn repair(store: &mut Store) -> Result<Vec<String>, StoreError> {
    let mut done = Vec::new();
    store.commit_group(true)?;
    let (recount, rows) = {
        let txn = store.db().begin_read()?;
        let versions = txn.open_table(VERSIONS)?;
        let mut recount: HashMap<[u8; 32], u64> = HashMap::new();
        for row in versions.iter()? {
            let (k, v) = row?;
            if k.value().1 != KIND_BLOCK {
                continue;
            }
            if let Ok(Some(p)) = open_version(k.value(), v.value()) {
                let _ = count_refs(p, &mut recount);
            }
        }
        let mut rows = Vec::new();
        for row in txn.open_table(EXTENTS)?.iter()? {
            let (k, v) = row?;
            let hash = k.value();
            rows.push((hash, ExtentRec::decode(&hash, v.value()).ok()));
        }
        (recount, rows)
    };
    let mut fixes: Vec<([u8; 32], Option<ExtentRec>)> = Vec::new();
    for (hash, rec) in rows {
        let want = recount.get(&hash).copied().unwrap_or(0);
        match rec {
            None => {
                done.push(format!(
                    "dropped the damaged index row of extent {}",
                    hex(&hash)
                ));
                fixes.push((hash, None));
            }
            Some(r) if r.refs != want => {
                if want == 0 {
                    done.push(format!(
                        "freed extent {} (it counted {} references; no record names it)",
                        hex(&hash),
                        r.refs
                    ));
                    fixes.push((hash, None));
                } else {
                    done.push(format!(
                        "extent {}: references {} -> {want}",
                        hex(&hash),
                        r.refs
                    ));
                    fixes.push((hash, Some(ExtentRec { refs: want, ..r })));
                }
            }
            Some(_) => {}
        }
    }
    if !fixes.is_empty() {
        store
            .write(true, |w| {
                for (hash, rec) in &fixes {
                    match rec {
                        Some(r) => {
                            w.t.extents.insert(*hash, r.encode(hash).as_slice())?;
                        }
                        None => match w.extent(hash) {
                            // Freed as the last reference would free it: its bytes
                            // count as dead.
                            Ok(r) => {
                                let one = ExtentRec { refs: 1, ..r };
                                w.t.extents.insert(*hash, one.encode(hash).as_slice())?;
                                w.decref(hash, 1)?;
                            }
                            Err(_) => {
                                w.t.extents.remove(*hash)?;
                            }
                        },
                    }
                }
                Ok(())
            })
            .map_err(|e| StoreError::Corrupt(format!("repairing reference counts: {e}")))?;
    }
    // Versions no view can see.
    let count_versions = |store: &mut Store| -> Result<u64, StoreError> {
        store.commit_group(false)?;
        Ok(store.db().begin_read()?.open_table(VERSIONS)?.len()?)
    };
    let before = count_versions(store)?;
    let inos: BTreeSet<u64> = {
        let txn = store.db().begin_read()?;
        let mut inos = BTreeSet::new();
        for row in txn.open_table(VERSIONS)?.iter()? {
            inos.insert(row?.0.value().0);
        }
        inos
    };
    let inos: Vec<u64> = inos.into_iter().collect();
    let mut dropped_bytes = 0;
    for chunk in inos.chunks(1024) {
        dropped_bytes += store
            .write(true, |w| {
                let mut freed = 0;
                for ino in chunk {
                    freed += w.gc_ino(*ino, None)?;
                }
                Ok(freed)
            })
            .map_err(|e| StoreError::Corrupt(format!("dropping leaked versions: {e}")))?;
    }
    let dropped = before.saturating_sub(count_versions(store)?);
    if dropped > 0 {
        done.push(format!(
            "dropped {dropped} versions no view could see, freeing {dropped_bytes} bytes of extents"
        ));
    }
    let indexed = store
        .reindex_changes()
        .map_err(|e| StoreError::Corrupt(format!("rebuilding the change index: {e}")))?;
    if indexed > 0 {
        done.push(format!("added {indexed} missing rows to the change index"));
    }
    let given_back = store.compact()?;
    if given_back > 0 {
        done.push(format!(
            "compacted segments, giving back {given_back} bytes"
        ));
    }
    store.sync()?;
    Ok(done)
}

/// The live epoch and block size, from `meta`.
fn live_and_block_size(txn: &redb::ReadTransaction) -> Result<(u64, u32), StoreError> {
    let meta = txn.open_table(META)?;
    Ok((
        read_meta_as(&meta, meta::LIVE_EPOCH, le_u64)?,
        read_meta_as(&meta, meta::BLOCK_SIZE, le_u32)?,
    ))
}

/// Adds the extent references of block record `payload` to `refs`.
fn count_refs(payload: &[u8], refs: &mut HashMap<[u8; 32], u64>) -> Result<(), StoreError> {
    for h in BlockRec::decode(payload)?.extents() {
        *refs.entry(*h).or_default() += 1;
    }
    Ok(())
}

/// A record's identity in `versions`: ino, kind, sub, name.
type Identity = (u64, u8, u64, Vec<u8>);

/// A segment file's name.
fn seg_name(id: u64) -> String {
    format!("segments/{id:016x}.seg")
}

/// The file ranges, in every view, whose block records name an extent of `bad`.
fn name_damage(
    t: &Versions<'_>,
    views: &[(String, u64)],
    block_size: u64,
    bad: &HashMap<[u8; 32], String>,
) -> Result<Vec<Hurt>, StoreError> {
    // (ino, block, epoch written, block record) of each version naming a bad extent,
    // and the epoch the next version of the same block was written (it hides it).
    let mut found: Vec<(u64, u64, u64, u64, BlockRec)> = Vec::new();
    let mut prev: Option<(u64, u64)> = None;
    for row in t.iter()? {
        let (k, v) = row?;
        let (ino, kind, idx, _, epoch) = k.value();
        if kind != KIND_BLOCK {
            continue;
        }
        if let Some(last) = found.last_mut()
            && prev == Some((ino, idx))
            && last.3 == u64::MAX
            && (last.0, last.1) == (ino, idx)
        {
            last.3 = epoch;
        }
        prev = Some((ino, idx));
        // Damaged records are reported on their own.
        let Ok(Some(p)) = open_version(k.value(), v.value()) else {
            continue;
        };
        let Ok(b) = BlockRec::decode(p) else {
            continue;
        };
        if b.extents().any(|h| bad.contains_key(h)) {
            found.push((ino, idx, epoch, u64::MAX, b));
        }
    }
    let mut out = Vec::new();
    let mut names: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    for (ino, idx, from, until, b) in found {
        let base = idx * block_size;
        let mut ranges: Vec<(u64, u64, &String)> = Vec::new();
        if let Some((h, n)) = b.base_extent()
            && let Some(cause) = bad.get(h)
        {
            ranges.push((base, base + n as u64, cause));
        }
        for f in &b.frags {
            if let Some(cause) = bad.get(&f.hash) {
                let at = base + f.at as u64 * 4096;
                ranges.push((at, at + f.n as u64 * 4096, cause));
            }
        }
        for (view, epoch) in views {
            if *epoch < from || *epoch >= until {
                continue;
            }
            let paths = match names.get(&(*epoch, ino)) {
                Some(p) => p.clone(),
                None => {
                    let p = match paths_at(t, *epoch, ino) {
                        Ok(p) if !p.is_empty() => p,
                        _ => vec![format!("(inode {ino})")],
                    };
                    names.insert((*epoch, ino), p.clone());
                    p
                }
            };
            for path in &paths {
                for (start, end, cause) in &ranges {
                    out.push(Hurt {
                        view: view.clone(),
                        path: path.clone(),
                        start: *start,
                        end: *end,
                        cause: (*cause).clone(),
                    });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
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
    /// The volume's identity.
    pub volume: [u8; 16],
    /// The volume this store is a replica of (`snapfs sync`), if it is one.
    pub replica_of: Option<[u8; 16]>,
    /// On a replica: the volume its snapshots are of.
    pub origin: Option<[u8; 16]>,
    /// On a volume that was a replica: how it was promoted.
    pub promoted: Option<crate::store::role::Promotion>,
    /// On a demoted store waiting for its first session: when it was demoted.
    pub demoted: Option<i64>,
    /// On a replica: its last completed sync session.
    pub last_received: Option<SyncRec>,
    /// The destinations this volume was synced to, with each one's last session.
    pub sent_to: Vec<([u8; 16], SyncRec)>,
}

/// One line about a sync session: its base, when it ended, what it moved.
fn sync_line(r: &SyncRec) -> String {
    format!(
        "base {}, last {}: {} snapshots, {} payload bytes, {} bytes on the wire",
        if r.base.is_empty() { "(none)" } else { &r.base },
        crate::policy::utc(r.at.sec),
        r.snapshots,
        r.payload,
        r.wire
    )
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
        ) + &format!("volume:           {}\n", hex(&self.volume))
            + &match &self.replica_of {
                Some(v) => format!(
                    "replica of:       {} (receives snapshots by snapfs sync)\n",
                    hex(v)
                ),
                None => String::new(),
            }
            + &match (&self.origin, &self.replica_of) {
                (Some(o), Some(r)) if o != r => {
                    format!(
                        "origin:           {} (the volume its snapshots are of)\n",
                        hex(o)
                    )
                }
                _ => String::new(),
            }
            + &match &self.promoted {
                Some(p) => format!(
                    "promoted:         {} from snapshot {}; was a replica of {}\n",
                    crate::policy::utc(p.at),
                    printable(&p.snapshot),
                    hex(&p.from)
                ),
                None => String::new(),
            }
            + &match self.demoted {
                Some(t) => format!(
                    "demoted:          {}; mounts read-only until the volume that replaced it syncs to it\n",
                    crate::policy::utc(t)
                ),
                None => String::new(),
            }
            + &match &self.last_received {
                Some(r) => format!("last received:    {}\n", sync_line(r)),
                None => String::new(),
            }
            + &self
                .sent_to
                .iter()
                .map(|(v, r)| format!("synced to:        {} ({})\n", hex(v), sync_line(r)))
                .collect::<String>()
    }
}

/// Gathers [`Status`] of an open store (its open group committed first, if it can be).
pub fn status(store: &mut Store) -> Result<Status, StoreError> {
    status_frozen(&store.frozen()?)
}

/// Gathers [`Status`] from a [`crate::store::Frozen`] view, without the store.
pub fn status_frozen(view: &crate::store::Frozen) -> Result<Status, StoreError> {
    status_txn(
        &view.txn,
        &view.segs,
        &view.path.join(crate::store::DB_FILE),
    )
}

/// Gathers [`Status`] of a store no daemon holds, changing nothing.
pub fn status_offline(
    ro: &mut crate::store::ReadOnlyStore,
    path: &std::path::Path,
) -> Result<Status, StoreError> {
    let txn = ro.begin_read()?;
    status_txn(&txn, &ro.segs, &path.join(crate::store::DB_FILE))
}

/// A volume id from its `meta` row.
fn sixteen(b: &[u8]) -> Result<[u8; 16], StoreError> {
    b.try_into()
        .map_err(|_| StoreError::Corrupt("a volume id that is not 16 bytes".into()))
}

/// Gathers [`Status`] as `txn` sees the store.
fn status_txn(
    txn: &redb::ReadTransaction,
    segs: &Segments,
    db_path: &std::path::Path,
) -> Result<Status, StoreError> {
    let (live, block_size) = live_and_block_size(txn)?;
    let meta_t = txn.open_table(META)?;
    let mut st = Status {
        block_size,
        volume: read_meta_as(&meta_t, meta::VOLUME_ID, sixteen)?,
        replica_of: read_meta(&meta_t, meta::REPLICA_OF)?
            .map(|v| sixteen(&v))
            .transpose()?,
        origin: crate::store::role::origin_of(&meta_t)?,
        promoted: crate::store::role::promotion_of(&meta_t)?,
        demoted: crate::store::role::demoted_of(&meta_t)?,
        last_received: read_meta(&meta_t, meta::LAST_RECEIVED)?
            .map(|v| SyncRec::decode(meta::LAST_RECEIVED, &v))
            .transpose()?,
        sent_to: crate::store::snapshots::sent_to_rows(&meta_t)?,
        ..Default::default()
    };
    let versions = txn.open_table(VERSIONS)?;
    for_each_visible(&versions, live, |_, kind, _, _, payload| {
        match kind {
            KIND_INODE => {
                let r = InodeRec::decode(payload)?;
                match r.kind {
                    FileKind::File => {
                        st.files += 1;
                        st.logical_bytes += r.size;
                    }
                    FileKind::Dir => st.dirs += 1,
                    _ => st.others += 1,
                }
            }
            KIND_BLOCK => st.referenced_bytes += BlockRec::decode(payload)?.stored_bytes(),
            _ => {}
        }
        Ok(())
    })?;
    for row in txn.open_table(EXTENTS)?.iter()? {
        let (k, v) = row?;
        let e = ExtentRec::decode(&k.value(), v.value())?;
        st.stored_bytes += e.len as u64;
        st.named_bytes += e.len as u64 * e.refs;
    }
    for row in txn.open_table(SNAPSHOTS)?.iter()? {
        let row = row?;
        // Hidden rows (snapshots being deleted) are not shown.
        if !row.0.value().starts_with('\0') {
            st.snapshots.push(row.0.value().to_string());
        }
    }
    st.disk_bytes = segs.disk_bytes()? + std::fs::metadata(db_path)?.len();
    Ok(st)
}
