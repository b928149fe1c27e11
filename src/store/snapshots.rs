//! The snapshot layer: the catalog, named holds, epochs and the change index, over
//! the store's tables. The filesystem core, the commands (and sync) use it; none of
//! them writes these tables.
//!
//! A snapshot is a name and the epoch it froze. Taking one records `(name, E)` and
//! moves the live tree to `E+1`: nothing is copied. Deleting one is one durable commit
//! that hides it and marks its epoch as deleting; its versions are dropped (a second
//! commit) once nothing holds it: no open file in it (the filesystem core counts
//! those) and no named hold. A hold keeps a snapshot, and the change index after it,
//! until released: sync holds its bases with them.
//!
//! The change index (`changed_rows`) names every record written in an epoch while
//! some snapshot exists. What differs between epochs `a < b` is found from the rows
//! of `(a, b]` alone, so diff, rollback, deletion and incremental sends cost the
//! records that changed, never a walk of the tree or of a file's blocks.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::*;

/// The catalog key of a deleted snapshot kept while something holds it: a name no
/// user can give (see [`check_name`]).
pub fn deleted_key(epoch: u64) -> String {
    format!("\0{epoch}")
}

/// Validates a snapshot or hold name; on failure, the errno and which rule it broke.
pub fn check_name(name: &[u8]) -> Result<&str, (i32, &'static str)> {
    if name.is_empty() {
        return Err((libc::EINVAL, "a snapshot name may not be empty"));
    }
    if name.len() > 255 {
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

/// A record's identity: `(ino, kind, sub, name)`.
pub type Ident = (u64, u8, u64, Vec<u8>);

/// The key of the record `id` names.
pub fn ident_key(id: &Ident) -> RecKey<'_> {
    RecKey {
        ino: id.0,
        kind: id.1,
        sub: id.2,
        name: &id.3,
    }
}

/// A record that reads differently at two epochs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowChange {
    /// Inode.
    pub ino: u64,
    /// Record kind (`KIND_*`).
    pub kind: u8,
    /// Block index, parent inode, or 0.
    pub sub: u64,
    /// Entry or xattr name, or empty.
    pub name: Vec<u8>,
    /// Payload at the older epoch (`None`: absent then).
    pub before: Option<Vec<u8>>,
    /// Payload at the newer epoch (`None`: absent then).
    pub after: Option<Vec<u8>>,
}

impl RowChange {
    /// The record's key.
    pub fn key(&self) -> RecKey<'_> {
        RecKey {
            ino: self.ino,
            kind: self.kind,
            sub: self.sub,
            name: &self.name,
        }
    }
}

/// The identities of the records written in epochs `(a, b]`, in order.
pub fn changed_idents<T: ReadableTable<ChangeKey, ()>>(
    t: &T,
    a: u64,
    b: u64,
) -> Result<BTreeSet<Ident>, StoreError> {
    let mut out = BTreeSet::new();
    if a >= b {
        return Ok(out);
    }
    let lo: ChangeKey = (a + 1, 0, 0, 0, &[]);
    for row in t.range(lo..)? {
        let (k, _) = row?;
        let (epoch, ino, kind, sub, name) = k.value();
        if epoch > b {
            break;
        }
        out.insert((ino, kind, sub, name.to_vec()));
    }
    Ok(out)
}

/// The records that read differently at epoch `a` and at epoch `b > a`, in identity
/// order: O(records written in `(a, b]`).
pub fn changed_rows<C, V>(
    changes: &C,
    versions: &V,
    a: u64,
    b: u64,
) -> Result<Vec<RowChange>, StoreError>
where
    C: ReadableTable<ChangeKey, ()>,
    V: ReadableTable<VKey, &'static [u8]>,
{
    let mut out = Vec::new();
    for_each_changed(changes, versions, a, b, |c| {
        out.push(c);
        Ok(())
    })?;
    Ok(out)
}

/// [`changed_rows`], one at a time: what is held is the identities written in
/// `(a, b]`, not their values.
pub fn for_each_changed<C, V>(
    changes: &C,
    versions: &V,
    a: u64,
    b: u64,
    mut f: impl FnMut(RowChange) -> Result<(), StoreError>,
) -> Result<(), StoreError>
where
    C: ReadableTable<ChangeKey, ()>,
    V: ReadableTable<VKey, &'static [u8]>,
{
    for (ino, kind, sub, name) in changed_idents(changes, a, b)? {
        let key = RecKey {
            ino,
            kind,
            sub,
            name: &name,
        };
        let before = visible(versions, key, a)?;
        let after = visible(versions, key, b)?;
        if before != after {
            f(RowChange {
                ino,
                kind,
                sub,
                name,
                before,
                after,
            })?;
        }
    }
    Ok(())
}

/// What a rollback changed in one inode, for the caches above the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rolled {
    /// The inode.
    pub ino: u64,
    /// The records restored: kind, sub, name.
    pub rows: Vec<(u8, u64, Vec<u8>)>,
    /// Where a file whose data or attributes changed was linked before the rollback
    /// (the entries a kernel cache must forget).
    pub links: Vec<(u64, Vec<u8>)>,
}

/// Changed records of one inode past which dropping an epoch scans all the inode's
/// versions once instead of looking each record up.
const GC_SCAN_FROM: usize = 64;

/// Rows of the change index pruned per commit.
const PRUNE_BATCH: usize = 65_536;

impl Store {
    /// The catalog row of snapshot `name` (a deleted one is not found).
    pub fn snapshot(&self, name: &[u8]) -> Result<Option<SnapshotRec>, StoreError> {
        let Ok(name) = std::str::from_utf8(name) else {
            return Ok(None);
        };
        if name.starts_with('\0') {
            return Ok(None);
        }
        let txn = self.read_txn()?;
        match txn.snapshots().get(name)? {
            Some(v) => Ok(Some(SnapshotRec::decode(name, v.value())?)),
            None => Ok(None),
        }
    }

    /// Every snapshot, oldest first; with `deleted`, also the deleted ones still kept
    /// (named by [`deleted_key`]).
    pub fn snapshot_list(&self, deleted: bool) -> Result<Vec<(String, SnapshotRec)>, StoreError> {
        let txn = self.read_txn()?;
        let mut out = Vec::new();
        for row in txn.snapshots().iter()? {
            let (k, v) = row?;
            let rec = SnapshotRec::decode(k.value(), v.value())?;
            if deleted || rec.flags & SNAP_DELETED == 0 {
                out.push((k.value().to_string(), rec));
            }
        }
        out.sort_by_key(|(_, r)| r.epoch);
        Ok(out)
    }

    /// Takes snapshot `name` (already validated, buffered data already stored) of the
    /// live tree in one durable commit; returns its epoch.
    pub fn snapshot_take(&mut self, name: &str, created: Ts) -> Result<u64, OpError> {
        if self.snapshot(name.as_bytes())?.is_some() {
            return Err(OpError::Errno(libc::EEXIST));
        }
        let epoch = self.live_epoch;
        if epoch >= (1 << (64 - EPOCH_SHIFT)) - 1 {
            return Err(OpError::Errno(libc::EOVERFLOW));
        }
        let rec = SnapshotRec {
            epoch,
            created,
            flags: 0,
        };
        self.write(true, |w| {
            w.t.snapshots.insert(name, rec.encode(name).as_slice())?;
            let live = seal_meta(meta::LIVE_EPOCH, &(epoch + 1).to_le_bytes());
            w.t.meta.insert(meta::LIVE_EPOCH, live.as_slice())?;
            Ok(())
        })?;
        self.live_epoch = epoch + 1;
        self.snapshot_epochs.insert(epoch);
        self.changed.clear();
        Ok(epoch)
    }

    /// Deletes snapshot `name` from the catalog in one durable commit: the name goes
    /// and a hidden row marks its epoch as deleting, until [`Store::drop_epoch`]
    /// removes it. Returns the snapshot's row.
    pub fn snapshot_hide(&mut self, name: &[u8]) -> Result<SnapshotRec, OpError> {
        let rec = self.snapshot(name)?.ok_or(OpError::Errno(libc::ENOENT))?;
        let name = std::str::from_utf8(name).map_err(|_| OpError::Errno(libc::ENOENT))?;
        let key = deleted_key(rec.epoch);
        self.write(true, |w| {
            w.t.snapshots.remove(name)?;
            let kept = SnapshotRec {
                flags: SNAP_DELETED,
                ..rec
            };
            w.t.snapshots
                .insert(key.as_str(), kept.encode(&key).as_slice())?;
            Ok(())
        })?;
        Ok(rec)
    }

    /// Whether epoch `epoch` belongs to a deleted snapshot not yet dropped.
    pub fn is_deleting(&self, epoch: u64) -> Result<bool, StoreError> {
        let key = deleted_key(epoch);
        Ok(self.read_txn()?.snapshots().get(key.as_str())?.is_some())
    }

    /// The epochs of deleted snapshots not yet dropped.
    pub fn deleting_epochs(&self) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .snapshot_list(true)?
            .into_iter()
            .filter(|(_, r)| r.flags & SNAP_DELETED != 0)
            .map(|(_, r)| r.epoch)
            .collect())
    }

    /// Every named hold, by name.
    pub fn holds(&self) -> Result<Vec<(String, HoldRec)>, StoreError> {
        let txn = self.read_txn()?;
        let mut out = Vec::new();
        for row in txn.holds().iter()? {
            let (k, v) = row?;
            out.push((
                k.value().to_string(),
                HoldRec::decode(k.value(), v.value())?,
            ));
        }
        Ok(out)
    }

    /// Whether a named hold keeps epoch `epoch`.
    pub fn is_held(&self, epoch: u64) -> Result<bool, StoreError> {
        Ok(self.holds()?.iter().any(|(_, h)| h.epoch == epoch))
    }

    /// Takes hold `hold` (a valid name) on snapshot `snapshot`, durably. A hold of that
    /// name on that snapshot already is kept as it is; on another, EEXIST.
    pub fn hold(&mut self, hold: &str, snapshot: &[u8], created: Ts) -> Result<u64, OpError> {
        let epoch = self
            .snapshot(snapshot)?
            .ok_or(OpError::Errno(libc::ENOENT))?
            .epoch;
        if let Some((_, h)) = self.holds()?.into_iter().find(|(n, _)| n == hold) {
            return if h.epoch == epoch {
                Ok(epoch)
            } else {
                Err(OpError::Errno(libc::EEXIST))
            };
        }
        let rec = HoldRec { epoch, created };
        self.write(true, |w| {
            w.t.holds.insert(hold, rec.encode(hold).as_slice())?;
            Ok(())
        })?;
        Ok(epoch)
    }

    /// Records a completed sync session to destination `dest` (its volume id): the
    /// `sent_to:` row, and hold `sync-DEST` moved onto the session's base, in one
    /// commit, which need not be durable: the destination's barrier made what was
    /// sent durable there, and a crash that loses this commit loses every later one
    /// too (commits reach the disk in order), so the hold is back on the older base,
    /// which both sides still hold and the next session finds again from what the
    /// destination says it holds. Returns the epoch the hold kept before, if it moved
    /// off one: the caller drops that epoch when it is deleting and nothing else
    /// keeps it.
    pub fn record_sent(&mut self, dest: &[u8; 16], rec: &SyncRec) -> Result<Option<u64>, OpError> {
        let hold = format!("sync-{}", hex(dest));
        let row = format!("{}{}", meta::SENT_TO, hex(dest));
        let new = match rec.base.as_str() {
            "" => None,
            b => Some(
                self.snapshot(b.as_bytes())?
                    .ok_or(OpError::Errno(libc::ENOENT))?
                    .epoch,
            ),
        };
        let old = self
            .holds()?
            .into_iter()
            .find(|(n, _)| *n == hold)
            .map(|(_, h)| h.epoch);
        self.write(false, |w| {
            match new {
                Some(epoch) if old == Some(epoch) => {}
                Some(epoch) => {
                    let h = HoldRec {
                        epoch,
                        created: rec.at,
                    };
                    w.t.holds
                        .insert(hold.as_str(), h.encode(&hold).as_slice())?;
                }
                None => {
                    w.t.holds.remove(hold.as_str())?;
                }
            }
            w.t.meta.insert(row.as_str(), rec.encode(&row).as_slice())?;
            Ok(())
        })?;
        self.commit_group(false)?;
        Ok(old.filter(|o| Some(*o) != new))
    }

    /// The destinations this volume was synced to: each one's volume id and its last
    /// completed session.
    pub fn sent_to(&self) -> Result<Vec<([u8; 16], SyncRec)>, StoreError> {
        sent_to_rows(self.read_txn()?.meta())
    }

    /// Releases hold `hold`, durably; returns the epoch it kept. The caller drops that
    /// epoch when it is deleting and nothing else holds it.
    pub fn release(&mut self, hold: &str) -> Result<u64, OpError> {
        let epoch = self
            .holds()?
            .into_iter()
            .find(|(n, _)| n == hold)
            .ok_or(OpError::Errno(libc::ENOENT))?
            .1
            .epoch;
        self.write(true, |w| {
            w.t.holds.remove(hold)?;
            Ok(())
        })?;
        Ok(epoch)
    }

    /// Forgets deleting epoch `epoch` (nothing may hold it): drops what only it could
    /// see and its hidden catalog row in one commit, and returns the bytes of extents
    /// that freed. With `dry_run` nothing changes and the figure is what dropping it
    /// would free. Cost: the records written in `(epoch, next]`, where `next` is the
    /// next snapshot or the live epoch.
    pub fn drop_epoch(&mut self, epoch: u64, dry_run: bool) -> Result<u64, OpError> {
        // The operation sees the epochs without this one; the store's own set loses
        // it only once the drop is done.
        let mut snaps = self.snapshot_epochs.clone();
        snaps.remove(&epoch);
        let next = snaps
            .range(epoch + 1..)
            .next()
            .copied()
            .unwrap_or(self.live_epoch);
        let res = self.write_seen_by(!dry_run, Some(&snaps), |w| {
            let idents = changed_idents(&w.t.changes, epoch, next)?;
            let mut planned = HashMap::new();
            let mut freed = 0;
            // Per inode: one scan of all its versions where many of its records
            // changed (a rewritten file), else a lookup per changed record.
            let mut by_ino: BTreeMap<u64, Vec<&Ident>> = BTreeMap::new();
            for id in &idents {
                by_ino.entry(id.0).or_default().push(id);
            }
            for (ino, ids) in by_ino {
                if ids.len() > GC_SCAN_FROM {
                    freed += w.gc_ino(ino, dry_run.then_some(&mut planned))?;
                    continue;
                }
                for id in ids {
                    freed += w.gc_ident(ident_key(id), dry_run.then_some(&mut planned))?;
                }
            }
            if !dry_run {
                w.t.snapshots.remove(deleted_key(epoch).as_str())?;
            }
            Ok(freed)
        });
        if res.is_ok() && !dry_run {
            self.snapshot_epochs.remove(&epoch);
            self.changed.clear();
        }
        res
    }

    /// Deletes the change index rows no diff, rollback, deletion or send can need:
    /// those at or below the oldest snapshot's epoch (every row when there is no
    /// snapshot), in commits of a bounded size. Returns the rows deleted.
    pub fn prune_changes(&mut self) -> Result<u64, OpError> {
        let cutoff = self.snapshot_epochs.first().copied().unwrap_or(u64::MAX);
        // Nothing to prune: no commit.
        let first = {
            let txn = self.read_txn()?;
            txn.changes().first()?.map(|(k, _)| k.value().0)
        };
        if first.is_none_or(|e| e > cutoff) {
            return Ok(0);
        }
        // The memo may name rows about to go (at the live epoch, with no snapshot).
        self.changed.clear();
        let mut total = 0u64;
        loop {
            let n = self.write(true, |w| {
                let mut old: Vec<(u64, u64, u8, u64, Vec<u8>)> = Vec::new();
                for row in w.t.changes.iter()?.take(PRUNE_BATCH) {
                    let (k, _) = row?;
                    let (e, ino, kind, sub, name) = k.value();
                    if e > cutoff {
                        break;
                    }
                    old.push((e, ino, kind, sub, name.to_vec()));
                }
                for (e, ino, kind, sub, name) in &old {
                    w.t.changes
                        .remove((*e, *ino, *kind, *sub, name.as_slice()))?;
                }
                Ok(old.len())
            })?;
            total += n as u64;
            if n < PRUNE_BATCH {
                break;
            }
        }
        if total > 0 {
            tracing::debug!(rows = total, "change index pruned");
        }
        Ok(total)
    }

    /// Adds the change index rows missing for versions above the oldest snapshot (a
    /// repair); returns how many.
    pub fn reindex_changes(&mut self) -> Result<u64, OpError> {
        let Some(cutoff) = self.snapshot_epochs.first().copied() else {
            return Ok(0);
        };
        let mut missing: Vec<(u64, u64, u8, u64, Vec<u8>)> = Vec::new();
        {
            let txn = self.read_txn()?;
            for row in txn.versions().iter()? {
                let (k, _) = row?;
                let (ino, kind, sub, name, epoch) = k.value();
                if epoch > cutoff && txn.changes().get((epoch, ino, kind, sub, name))?.is_none() {
                    missing.push((epoch, ino, kind, sub, name.to_vec()));
                }
            }
        }
        for chunk in missing.chunks(PRUNE_BATCH) {
            self.write(true, |w| {
                for (e, ino, kind, sub, name) in chunk {
                    w.t.changes
                        .insert((*e, *ino, *kind, *sub, name.as_slice()), ())?;
                }
                Ok(())
            })?;
        }
        Ok(missing.len() as u64)
    }

    /// The live inodes written since epoch `snap`.
    pub fn changed_inos(&self, snap: u64) -> Result<BTreeSet<u64>, StoreError> {
        let txn = self.read_txn()?;
        Ok(changed_idents(txn.changes(), snap, self.live_epoch)?
            .into_iter()
            .map(|(ino, ..)| ino)
            .collect())
    }

    /// The records that read differently at epochs `a < b`.
    pub fn changes_between(&self, a: u64, b: u64) -> Result<Vec<RowChange>, StoreError> {
        let txn = self.read_txn()?;
        changed_rows(txn.changes(), txn.versions(), a, b)
    }

    /// Makes the live tree equal to epoch `snap` (a snapshot), in one durable commit,
    /// at a cost of O(records written since). `file` says whether an inode is a
    /// regular file now (its links are then reported, for the kernel's caches).
    pub fn rollback_to(&mut self, snap: u64) -> Result<Vec<Rolled>, OpError> {
        let live = self.live_epoch;
        self.write(true, |w| {
            let rows = changed_rows(&w.t.changes, &w.t.versions, snap, live)?;
            let mut by_ino: BTreeMap<u64, Vec<RowChange>> = BTreeMap::new();
            for r in rows {
                by_ino.entry(r.ino).or_default().push(r);
            }
            let mut out = Vec::new();
            for (ino, rows) in by_ino {
                let mut rolled = Rolled {
                    ino,
                    ..Rolled::default()
                };
                let file = match w.get(RecKey::inode(ino))? {
                    Some(b) => InodeRec::decode(&b)?.kind == FileKind::File,
                    None => false,
                };
                if file
                    && rows
                        .iter()
                        .any(|c| c.kind == KIND_INODE || c.kind == KIND_BLOCK)
                {
                    scan_visible(
                        &w.t.versions,
                        ino,
                        KIND_PARENT,
                        0..=u64::MAX,
                        live,
                        |dir, name, _| {
                            rolled.links.push((dir, name.to_vec()));
                            Ok(true)
                        },
                    )?;
                }
                for c in rows {
                    if let (KIND_BLOCK, Some(p)) = (c.kind, &c.before) {
                        for h in BlockRec::decode(p)?.extents() {
                            w.incref(h)?;
                        }
                    }
                    w.put(c.key(), c.before.as_deref())?;
                    rolled.rows.push((c.kind, c.sub, c.name));
                }
                out.push(rolled);
            }
            Ok(out)
        })
    }

    /// For each of `epochs` (snapshots), the bytes of data its files name
    /// (`referenced`) and the bytes deleting it would give back (`exclusive`).
    pub fn snapshot_sizes(&mut self, epochs: &[u64]) -> Result<Vec<(u64, u64)>, OpError> {
        let mut totals = vec![0u64; epochs.len()];
        {
            // One pass over all block versions, picking per identity the row each
            // snapshot sees.
            let txn = self.read_txn()?;
            let mut group: Vec<(u64, u64)> = Vec::new(); // (epoch, len or 0) of one block
            let mut ident: Option<(u64, u64)> = None;
            let settle = |group: &mut Vec<(u64, u64)>, totals: &mut Vec<u64>| {
                for (i, &s) in epochs.iter().enumerate() {
                    if let Some(&(_, len)) = group.iter().rev().find(|(e, _)| *e <= s) {
                        totals[i] += len;
                    }
                }
                group.clear();
            };
            for row in txn.versions().iter()? {
                let (k, v) = row?;
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
        }
        let mut out = Vec::with_capacity(epochs.len());
        for (&e, referenced) in epochs.iter().zip(totals) {
            out.push((referenced, self.drop_epoch(e, true)?));
        }
        Ok(out)
    }
}

/// The `sent_to:` rows of `meta` (see [`Store::sent_to`]).
pub fn sent_to_rows<T: ReadableTable<&'static str, &'static [u8]>>(
    meta_t: &T,
) -> Result<Vec<([u8; 16], SyncRec)>, StoreError> {
    let mut out = Vec::new();
    let end = format!("{}~", meta::SENT_TO);
    for row in meta_t.range(meta::SENT_TO..end.as_str())? {
        let (k, _) = row?;
        let name = k.value();
        let Some(id) = name.strip_prefix(meta::SENT_TO).and_then(unhex::<16>) else {
            return Err(StoreError::Corrupt(format!("meta row {name:?}")));
        };
        let raw = read_meta(meta_t, name)?.unwrap_or_default();
        out.push((id, SyncRec::decode(name, &raw)?));
    }
    Ok(out)
}
