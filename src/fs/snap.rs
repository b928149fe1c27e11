//! Snapshots: the catalog, O(1) creation, deletion that gives space back, rollback
//! and diff, all over the versioned records and the change index.
//!
//! A snapshot is a name and the epoch it froze. Creating one flushes buffered data,
//! records `(name, E)` and moves the live tree to `E+1`: nothing is copied. Deleting
//! one drops the versions only it could see (found through the change index: a version
//! only snapshot `S` sees was superseded in `(S, next]`, where `next` is the next
//! snapshot or the live epoch), releases their extents and compacts segments.

use std::collections::{BTreeSet, HashMap};

use redb::ReadableTable as _;

use super::*;
use crate::store::changed_between;

/// What a kernel cache must forget after the tree changed under it (rollback).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inval {
    /// Attributes and cached pages of a live inode.
    Inode(u64),
    /// A (possibly negative) directory entry: parent and name.
    Entry(u64, Vec<u8>),
}

/// A snapshot as `snapshot list` shows it.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    /// Name.
    pub name: String,
    /// The epoch it froze.
    pub epoch: u64,
    /// When it was taken.
    pub created: Ts,
    /// Bytes of data its files name.
    pub referenced: u64,
    /// Bytes deleting it would give back.
    pub exclusive: u64,
}

/// One line of a diff.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// `+` added, `-` removed, `M` modified, `R` renamed.
    pub kind: char,
    /// The path (the old path for `R`).
    pub path: String,
    /// The new path, for `R`.
    pub new_path: Option<String>,
    /// Changed byte ranges `[start, end)`, for `M` on files when asked.
    pub ranges: Vec<(u64, u64)>,
}

/// Validates a snapshot name; on failure, the errno and which rule it broke.
pub fn check_snapshot_name(name: &[u8]) -> Result<&str, (i32, &'static str)> {
    if name.is_empty() {
        return Err((libc::EINVAL, "a snapshot name may not be empty"));
    }
    if name.len() > NAME_MAX {
        return Err((libc::ENAMETOOLONG, "a snapshot name is at most 255 bytes"));
    }
    if name == b"." || name == b".." {
        return Err((libc::EINVAL, "a snapshot may not be named '.' or '..'"));
    }
    if name.contains(&b'/') {
        return Err((libc::EINVAL, "a snapshot name may not contain '/'"));
    }
    let name =
        std::str::from_utf8(name).map_err(|_| (libc::EINVAL, "a snapshot name must be UTF-8"))?;
    // Names are printed by `snapshot list` and the like: no terminal escapes, and no
    // invisible characters that reorder or hide what is shown.
    let invisible = |c: char| {
        matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}' | '\u{061C}' | '\u{180E}' | '\u{FEFF}')
    };
    if name.chars().any(|c| c.is_control() || invisible(c)) {
        return Err((
            libc::EINVAL,
            "a snapshot name may not contain control characters or invisible formatting characters",
        ));
    }
    Ok(name)
}

/// The catalog key of a deleted snapshot kept for its holders.
fn held_key(epoch: u64) -> String {
    format!("\0{epoch}")
}

impl Inner {
    /// The catalog row of snapshot `name` (deleted ones are not found).
    pub fn snapshot_named(&mut self, name: &[u8]) -> FsResult<Option<SnapshotRec>> {
        let Ok(name) = std::str::from_utf8(name) else {
            return Ok(None);
        };
        if name.starts_with('\0') {
            return Ok(None);
        }
        let txn = self.store.read_txn()?;
        let t = txn.snapshots();
        Ok(
            match redb::ReadableTable::get(t, name).map_err(StoreError::from)? {
                Some(v) => Some(SnapshotRec::decode(name, v.value())?),
                None => None,
            },
        )
    }

    /// Every snapshot, oldest first (sizes not computed).
    pub fn snapshots(&mut self) -> FsResult<Vec<SnapshotInfo>> {
        let txn = self.store.read_txn()?;
        let t = txn.snapshots();
        let mut out = Vec::new();
        for row in redb::ReadableTable::iter(t).map_err(StoreError::from)? {
            let (k, v) = row.map_err(StoreError::from)?;
            let rec = SnapshotRec::decode(k.value(), v.value())?;
            if rec.flags & SNAP_DELETED != 0 {
                continue;
            }
            out.push(SnapshotInfo {
                name: k.value().to_string(),
                epoch: rec.epoch,
                created: rec.created,
                referenced: 0,
                exclusive: 0,
            });
        }
        out.sort_by_key(|s| s.epoch);
        Ok(out)
    }

    /// Fills in `referenced` and `exclusive` for `snaps`.
    pub fn snapshot_sizes(&mut self, snaps: &mut [SnapshotInfo]) -> FsResult<()> {
        // referenced: one pass over all versions, picking per identity the row each
        // snapshot sees.
        {
            let txn = self.store.read_txn()?;
            let t = txn.versions();
            let epochs: Vec<u64> = snaps.iter().map(|s| s.epoch).collect();
            let mut totals = vec![0u64; epochs.len()];
            let mut group: Vec<(u64, u64)> = Vec::new(); // (epoch, len or 0) of one block identity
            let mut ident: Option<(u64, u64)> = None;
            let settle = |group: &mut Vec<(u64, u64)>, totals: &mut Vec<u64>| {
                for (i, &s) in epochs.iter().enumerate() {
                    if let Some(&(_, len)) = group.iter().rev().find(|(e, _)| *e <= s) {
                        totals[i] += len;
                    }
                }
                group.clear();
            };
            for row in redb::ReadableTable::iter(t).map_err(StoreError::from)? {
                let (k, v) = row.map_err(StoreError::from)?;
                let (ino, kind, sub, _, epoch) = k.value();
                if kind != KIND_BLOCK {
                    continue;
                }
                if ident != Some((ino, sub)) {
                    settle(&mut group, &mut totals);
                    ident = Some((ino, sub));
                }
                let len = match open_version(k.value(), v.value())? {
                    Some(p) => BlockRec::decode(p)?.stored_bytes(),
                    None => 0,
                };
                group.push((epoch, len));
            }
            settle(&mut group, &mut totals);
            for (s, total) in snaps.iter_mut().zip(totals) {
                s.referenced = total;
            }
        }
        // exclusive: a dry run of the deletion.
        for s in snaps.iter_mut() {
            s.exclusive = self.drop_epoch_inner(s.epoch, true)?;
        }
        Ok(())
    }

    /// Attributes of the `.snapshots` directory (owned like the root, read and search
    /// for all, writable by whoever may write the root: mkdir there takes a snapshot).
    pub(super) fn snapdir_attr(&mut self) -> FsResult<Attr> {
        let mut rec = self.inode(ROOT_INO)?;
        // Making and removing snapshots is for the root directory's owner: nobody else
        // may write here, even where the root is open to all (a sticky /tmp-like root).
        rec.perm &= 0o755;
        rec.nlink = 2;
        rec.size = 0;
        rec.parent = ROOT_INO;
        Ok(self.attr(SNAPDIR_INO, rec))
    }

    /// Takes snapshot `name` of the live tree; returns its epoch.
    pub fn snapshot_create(&mut self, name: &[u8], now: Ts) -> FsResult<u64> {
        let name = check_snapshot_name(name)
            .map_err(|(e, _)| FsError::Errno(e))?
            .to_string();
        if self.snapshot_named(name.as_bytes())?.is_some() {
            return err(libc::EEXIST);
        }
        let epoch = self.store.live_epoch;
        if epoch >= (1 << (64 - EPOCH_SHIFT)) - 1 {
            return err(libc::EOVERFLOW);
        }
        // Everything written so far belongs to the snapshot.
        self.flush_all()?;
        let rec = SnapshotRec {
            epoch,
            created: now,
            flags: 0,
        };
        self.store.write(true, |w| {
            w.t.snapshots
                .insert(name.as_str(), rec.encode(&name).as_slice())?;
            let live = seal_meta(meta::LIVE_EPOCH, &(epoch + 1).to_le_bytes());
            w.t.meta.insert(meta::LIVE_EPOCH, live.as_slice())?;
            Ok(())
        })?;
        self.store.live_epoch = epoch + 1;
        self.store.snapshot_epochs.insert(epoch);
        self.undurable = false;
        tracing::info!(name, epoch, "snapshot taken");
        Ok(epoch)
    }

    /// Deletes snapshot `name`. While files opened in it are open, it only leaves the
    /// listing; its space comes back when the last one closes.
    pub fn snapshot_delete(&mut self, name: &[u8]) -> FsResult<()> {
        let rec = self
            .snapshot_named(name)?
            .ok_or(FsError::Errno(libc::ENOENT))?;
        let name = String::from_utf8_lossy(name).into_owned();
        let held = self.snap_open.get(&rec.epoch).copied().unwrap_or(0) > 0;
        // One durable commit decides the deletion: the name goes and a hidden row marks
        // the epoch as deleting. Dropping its versions is a second commit that removes
        // that row; should it not happen (a crash, a full disk), the next mount or
        // durable tick finishes it, so nothing leaks and nothing is half deleted.
        let key = held_key(rec.epoch);
        self.store.write(true, |w| {
            w.t.snapshots.remove(name.as_str())?;
            let kept = SnapshotRec {
                flags: SNAP_DELETED,
                ..rec
            };
            w.t.snapshots
                .insert(key.as_str(), kept.encode(&key).as_slice())?;
            Ok(())
        })?;
        tracing::info!(name, epoch = rec.epoch, held, "snapshot deleted");
        #[cfg(test)]
        if tests::CRASH_AFTER_DELETE_INTENT.get() {
            return Ok(());
        }
        if !held && let Err(e) = self.drop_epoch(rec.epoch) {
            // Deleted all the same: its space comes back at a later durable point.
            tracing::warn!(name, error = %e, "a deleted snapshot's space is not given back yet");
            self.deletions_pending = true;
        }
        Ok(())
    }

    /// A file opened in snapshot `epoch` closed.
    pub(super) fn release_snapshot_hold(&mut self, epoch: u64) -> FsResult<()> {
        let left = match self.snap_open.get_mut(&epoch) {
            Some(n) => {
                *n -= 1;
                *n
            }
            None => 0,
        };
        if left > 0 {
            return Ok(());
        }
        self.snap_open.remove(&epoch);
        let key = held_key(epoch);
        let pending = {
            let txn = self.store.read_txn()?;
            let t = txn.snapshots();
            redb::ReadableTable::get(t, key.as_str())
                .map_err(StoreError::from)?
                .is_some()
        };
        if pending && let Err(e) = self.drop_epoch(epoch) {
            self.deletions_pending = true;
            return Err(e);
        }
        Ok(())
    }

    /// Finishes deletions whose holders are gone (open files, or a crash or full disk
    /// that came between a deletion and the return of its space): at mount, and at a
    /// durable tick after a deletion could not give its space back.
    pub(super) fn reap_deleted_snapshots(&mut self) -> FsResult<()> {
        self.deletions_pending = false;
        let mut epochs = Vec::new();
        {
            let txn = self.store.read_txn()?;
            let t = txn.snapshots();
            for row in redb::ReadableTable::iter(t).map_err(StoreError::from)? {
                let (k, v) = row.map_err(StoreError::from)?;
                let rec = SnapshotRec::decode(k.value(), v.value())?;
                if rec.flags & SNAP_DELETED != 0 {
                    epochs.push(rec.epoch);
                }
            }
        }
        for epoch in epochs {
            if self.snap_open.get(&epoch).copied().unwrap_or(0) > 0 {
                continue;
            }
            if let Err(e) = self.drop_epoch(epoch) {
                self.deletions_pending = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Forgets epoch `epoch`: drops what only it could see and its hidden catalog row
    /// in one commit, then compacts (best effort: the deletion is done by then).
    fn drop_epoch(&mut self, epoch: u64) -> FsResult<u64> {
        let t = std::time::Instant::now();
        let freed = self.drop_epoch_inner(epoch, false)?;
        let dropped = t.elapsed();
        let compacted = self.store.compact();
        let segments = t.elapsed();
        if let Err(e) = compacted.and_then(|_| self.store.compact_metadata()) {
            tracing::warn!(error = %e, "compaction after a snapshot deletion failed");
        }
        tracing::debug!(epoch, freed, ?dropped, ?segments, total = ?t.elapsed(),
            "snapshot versions dropped, segments and metadata compacted");
        Ok(freed)
    }

    /// With `dry_run`, only computes the bytes that dropping `epoch` would free.
    fn drop_epoch_inner(&mut self, epoch: u64, dry_run: bool) -> FsResult<u64> {
        let was_held = self.store.snapshot_epochs.remove(&epoch);
        let next = self
            .store
            .snapshot_epochs
            .range(epoch + 1..)
            .next()
            .copied()
            .unwrap_or(self.store.live_epoch);
        let oldest = self.store.snapshot_epochs.first().copied();
        let res = self.store.write(!dry_run, |w| {
            let mut inos = BTreeSet::new();
            for row in w.t.changes.range((epoch + 1, 0)..=(next, u64::MAX))? {
                inos.insert(row?.0.value().1);
            }
            let mut planned = HashMap::new();
            let mut freed = 0;
            for ino in inos {
                freed += w.gc_ino(ino, dry_run.then_some(&mut planned))?;
            }
            if !dry_run {
                w.t.snapshots.remove(held_key(epoch).as_str())?;
                // No diff or deletion ever needs changes at or below the oldest snapshot.
                let cutoff = oldest.unwrap_or(u64::MAX);
                let mut old = Vec::new();
                for row in w.t.changes.range(..=(cutoff, u64::MAX))? {
                    old.push(row?.0.value());
                }
                for k in old {
                    w.t.changes.remove(k)?;
                }
            }
            Ok(freed)
        });
        // Still held while it is not gone.
        if (dry_run || res.is_err()) && was_held {
            self.store.snapshot_epochs.insert(epoch);
        }
        res
    }

    /// Makes the live tree equal to snapshot `name`, at a cost of O(changes since it).
    /// Newer snapshots stay. Returns what kernel caches must forget.
    pub fn rollback(&mut self, name: &[u8]) -> FsResult<Vec<Inval>> {
        let snap = self
            .snapshot_named(name)?
            .ok_or(FsError::Errno(libc::ENOENT))?
            .epoch;
        self.flush_all()?;
        let live = self.store.live_epoch;
        if self.kernel_times {
            // The kernel keeps its own size of an open file and takes none from us:
            // a file the rollback changes must not be open.
            let open: BTreeSet<u64> = self.open_live_inos().into_iter().collect();
            let mut busy = Vec::new();
            if !open.is_empty() {
                let txn = self.store.read_txn()?;
                let t = txn.changes();
                for row in t
                    .range((snap + 1, 0)..=(live, u64::MAX))
                    .map_err(StoreError::from)?
                {
                    let ino = row.map_err(StoreError::from)?.0.value().1;
                    if open.contains(&ino) {
                        busy.push(ino);
                    }
                }
            }
            for ino in busy {
                if self.inode(ino)?.kind == FileKind::File {
                    return err(libc::EBUSY);
                }
            }
        }
        let mut invals = Vec::new();
        self.store.write(true, |w| {
            let mut inos = BTreeSet::new();
            for row in w.t.changes.range((snap + 1, 0)..=(live, u64::MAX))? {
                inos.insert(row?.0.value().1);
            }
            for ino in inos {
                let changes = changed_between(&w.t.versions, ino, snap, live)?;
                let file = match w.get(RecKey::inode(ino))? {
                    Some(b) => InodeRec::decode(&b)?.kind == FileKind::File,
                    None => false,
                };
                if file
                    && changes
                        .iter()
                        .any(|c| c.0 == KIND_INODE || c.0 == KIND_BLOCK)
                {
                    // With the writeback cache the kernel keeps its own size of a file
                    // and takes none from us: the inode must go, so its entries go too
                    // (an inode no entry and no open file holds is dropped at once).
                    scan_visible(
                        &w.t.versions,
                        ino,
                        KIND_PARENT,
                        0..=u64::MAX,
                        live,
                        |dir, name, _| {
                            invals.push(Inval::Entry(dir, name.to_vec()));
                            Ok(true)
                        },
                    )?;
                }
                for (kind, sub, name, then) in changes {
                    let key = RecKey {
                        ino,
                        kind,
                        sub,
                        name: &name,
                    };
                    if let (KIND_BLOCK, Some(p)) = (kind, &then) {
                        for h in BlockRec::decode(p)?.extents() {
                            w.incref(h)?;
                        }
                    }
                    w.put(key, then.as_deref())?;
                    match kind {
                        KIND_DIRENT => {
                            invals.push(Inval::Entry(ino, name.clone()));
                            invals.push(Inval::Inode(ino));
                        }
                        KIND_INODE | KIND_BLOCK => invals.push(Inval::Inode(ino)),
                        _ => {}
                    }
                }
            }
            Ok(())
        })?;
        invals.dedup();
        self.undurable = false;
        tracing::info!(name = %String::from_utf8_lossy(name), epoch = snap, "rolled back");
        Ok(invals)
    }

    /// The epoch a diff endpoint names: a snapshot, or `live`.
    fn diff_epoch(&mut self, name: &str) -> FsResult<u64> {
        if name == "live" {
            self.flush_all()?;
            return Ok(self.store.live_epoch);
        }
        Ok(self
            .snapshot_named(name.as_bytes())?
            .ok_or(FsError::Errno(libc::ENOENT))?
            .epoch)
    }

    /// The live inodes open now, in order.
    fn open_live_inos(&self) -> Vec<u64> {
        let mut inos: Vec<u64> = self
            .open_count
            .iter()
            .filter(|(ino, n)| **n > 0 && **ino < SNAPDIR_INO)
            .map(|(ino, _)| *ino)
            .collect();
        inos.sort_unstable();
        inos
    }

    /// A path (relative to the root, as bytes) of each live file open now, from the
    /// first back pointer of each inode up to the root.
    pub fn open_file_paths(&mut self) -> FsResult<Vec<Vec<u8>>> {
        let live = self.store.live_epoch;
        let inos = self.open_live_inos();
        let mut out = Vec::new();
        'files: for ino in inos {
            let mut parts: Vec<Vec<u8>> = Vec::new();
            let mut at = ino;
            while at != ROOT_INO {
                if parts.len() > 4096 {
                    continue 'files;
                }
                let mut link = None;
                {
                    let txn = self.store.read_txn()?;
                    let t = txn.versions();
                    scan_visible(t, at, KIND_PARENT, 0..=u64::MAX, live, |dir, name, _| {
                        link = Some((dir, name.to_vec()));
                        Ok(false)
                    })?;
                }
                // Unlinked (open but deleted): nothing a snapshot would show.
                let Some((dir, name)) = link else {
                    continue 'files;
                };
                parts.push(name);
                at = dir;
            }
            parts.reverse();
            out.push(parts.join(&b'/'));
        }
        Ok(out)
    }

    /// Paths of `ino` in the tree at `epoch`, from the back pointers.
    fn paths_at(&mut self, epoch: u64, ino: u64) -> FsResult<Vec<String>> {
        // The root is the empty path here (diff prints its children as `/name`).
        if ino == ROOT_INO {
            return Ok(vec![String::new()]);
        }
        let txn = self.store.read_txn()?;
        Ok(crate::store::paths_at(txn.versions(), epoch, ino)?)
    }

    /// What changed from snapshot `old` to `new` (a snapshot or `live`), from the change
    /// index: O(changes), never a tree walk. With `blocks`, modified files carry their
    /// changed byte ranges.
    pub fn diff(&mut self, old: &str, new: &str, blocks: bool) -> FsResult<Vec<Change>> {
        let (a_e, b_e) = (self.diff_epoch(old)?, self.diff_epoch(new)?);
        if a_e >= b_e {
            return err(libc::EINVAL);
        }
        let mut inos = BTreeSet::new();
        {
            let txn = self.store.read_txn()?;
            let t = txn.changes();
            for row in redb::ReadableTable::range(t, (a_e + 1, 0)..=(b_e, u64::MAX))
                .map_err(StoreError::from)?
            {
                inos.insert(row.map_err(StoreError::from)?.0.value().1);
            }
        }
        let bs = self.bs_u64();
        let mut out = Vec::new();
        for ino in inos {
            let (a, b) = (self.inode_if_at(a_e, ino)?, self.inode_if_at(b_e, ino)?);
            let (pa, pb) = (self.paths_at(a_e, ino)?, self.paths_at(b_e, ino)?);
            let show = |p: &str| {
                if p.is_empty() {
                    "/".to_string()
                } else {
                    p.to_string()
                }
            };
            match (&a, &b) {
                (None, None) => {}
                (None, Some(_)) => out.extend(pb.iter().map(|p| Change {
                    kind: '+',
                    path: show(p),
                    new_path: None,
                    ranges: vec![],
                })),
                (Some(_), None) => out.extend(pa.iter().map(|p| Change {
                    kind: '-',
                    path: show(p),
                    new_path: None,
                    ranges: vec![],
                })),
                (Some(ra), Some(rb)) => {
                    if pa != pb {
                        if pa.len() == 1 && pb.len() == 1 {
                            out.push(Change {
                                kind: 'R',
                                path: show(&pa[0]),
                                new_path: Some(show(&pb[0])),
                                ranges: vec![],
                            });
                        } else {
                            for p in pa.iter().filter(|p| !pb.contains(p)) {
                                out.push(Change {
                                    kind: '-',
                                    path: show(p),
                                    new_path: None,
                                    ranges: vec![],
                                });
                            }
                            for p in pb.iter().filter(|p| !pa.contains(p)) {
                                out.push(Change {
                                    kind: '+',
                                    path: show(p),
                                    new_path: None,
                                    ranges: vec![],
                                });
                            }
                        }
                    }
                    let (changed_rows, block_idx) = self.changed_rows(ino, a_e, b_e)?;
                    let mut na = ra.clone();
                    na.ctime = rb.ctime;
                    na.atime = rb.atime;
                    if (na != *rb || changed_rows)
                        && let Some(p) = pb.first()
                    {
                        let mut ranges = Vec::new();
                        if blocks && rb.kind == FileKind::File {
                            for idx in block_idx {
                                let s = idx * bs;
                                if s < rb.size.max(ra.size) {
                                    ranges.push((s, (s + bs).min(rb.size.max(ra.size))));
                                }
                            }
                            if ra.size != rb.size {
                                ranges.push((ra.size.min(rb.size), ra.size.max(rb.size)));
                            }
                            ranges = merge(ranges);
                        }
                        out.push(Change {
                            kind: 'M',
                            path: show(p),
                            new_path: None,
                            ranges,
                        });
                    }
                }
            }
        }
        out.sort_by(|x, y| x.path.cmp(&y.path).then(x.kind.cmp(&y.kind)));
        Ok(out)
    }

    fn bs_u64(&self) -> u64 {
        self.store.block_size as u64
    }

    /// The record of `ino` at `epoch`, `None` where it does not exist. Only "not there"
    /// is absence: an unreadable record is an error, not a file diff may call added or
    /// removed.
    fn inode_if_at(&mut self, epoch: u64, ino: u64) -> FsResult<Option<InodeRec>> {
        match self.inode_at(epoch, ino) {
            Ok(rec) => Ok(Some(rec)),
            Err(FsError::Errno(libc::ENOENT)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether block, xattr or entry rows of `ino` differ between `a` and `b`, and the
    /// indexes of the blocks that do.
    fn changed_rows(&mut self, ino: u64, a: u64, b: u64) -> FsResult<(bool, Vec<u64>)> {
        let txn = self.store.read_txn()?;
        let t = txn.versions();
        let mut any = false;
        let mut blocks = Vec::new();
        for (kind, sub, _, _) in changed_between(t, ino, a, b)? {
            // Back pointers are names, reported as renames, not as modifications.
            if kind == KIND_INODE || kind == KIND_PARENT {
                continue;
            }
            any = true;
            if kind == KIND_BLOCK {
                blocks.push(sub);
            }
        }
        Ok((any, blocks))
    }
}

/// Sorts and joins overlapping or touching ranges.
fn merge(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Diff over records it cannot read.
#[cfg(test)]
mod diff_tests {
    use super::*;
    use crate::fs::tests::put_file;

    #[test]
    fn diff_fails_on_a_record_it_cannot_read() {
        let (_dir, fs) = crate::fs::tests::fresh();
        let mut core = fs.lock();
        let ino = put_file(&mut core, b"f", b"old");
        let s1 = core.snapshot_create(b"s1", Ts::now()).unwrap();
        put_file(&mut core, b"f", b"newer");
        core.snapshot_create(b"s2", Ts::now()).unwrap();
        let changes = core.diff("s1", "s2", false).unwrap();
        assert_eq!(
            changes
                .iter()
                .map(|c| (c.kind, c.path.as_str()))
                .collect::<Vec<_>>(),
            [('M', "/f")]
        );
        // The record of f that s1 sees no longer decodes: f is neither added nor
        // modified, the diff cannot tell, and must say so.
        core.store
            .write(true, |w| {
                let key = (ino, KIND_INODE, 0, &[][..], s1);
                w.t.versions
                    .insert(key, seal_version(key, Some(&[0xff])).as_slice())?;
                Ok(())
            })
            .unwrap();
        let res = core.diff("s1", "s2", false);
        assert!(matches!(&res, Err(e) if e.errno() == libc::EIO), "{res:?}");
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::fs::Fs;
    use crate::fs::tests::{put_file, stored_bytes};
    use crate::store::StoreConfig;

    thread_local! {
        /// Stops `snapshot_delete` right after its first commit, as a crash would.
        pub static CRASH_AFTER_DELETE_INTENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[test]
    fn a_crash_between_deletion_and_release_leaks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let fs = Fs::open(&path, Some(&StoreConfig::default())).unwrap();
        let old: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let new: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 241) as u8).collect();
        {
            let mut core = fs.lock();
            put_file(&mut core, b"f", &old);
            core.snapshot_create(b"s1", Ts::now()).unwrap();
            put_file(&mut core, b"f", &new);
            let before = stored_bytes(&mut core);
            assert_eq!(before, 512 * 1024, "both versions are stored");
            CRASH_AFTER_DELETE_INTENT.set(true);
            core.snapshot_delete(b"s1").unwrap();
            CRASH_AFTER_DELETE_INTENT.set(false);
            assert!(core.snapshot_named(b"s1").unwrap().is_none());
        }
        drop(fs);
        // The next open finishes the deletion: the old version's extents go.
        let fs = Fs::open(&path, None).unwrap();
        let mut core = fs.lock();
        assert_eq!(stored_bytes(&mut core), 256 * 1024);
        let rep = crate::check::fsck(core.store(), true, &mut |_, _| {}).unwrap();
        assert!(rep.clean(), "{}", rep.summary());
        assert!(core.snapshots().unwrap().is_empty());
    }
}
