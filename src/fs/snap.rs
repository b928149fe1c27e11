//! Snapshots: the catalog, O(1) creation, deletion that gives space back, rollback
//! and diff, all over the versioned records and the change index.
//!
//! A snapshot is a name and the epoch it froze. Creating one flushes buffered data,
//! records `(name, E)` and moves the live tree to `E+1`: nothing is copied. Deleting
//! one drops the versions only it could see (found through the change index: a version
//! only snapshot `S` sees was superseded in `(S, next]`, where `next` is the next
//! snapshot or the live epoch), releases their extents and compacts segments.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::store::snapshots::RowChange;

/// What a kernel cache must forget after the tree changed under it (rollback).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inval {
    /// Attributes and cached pages of a live inode.
    Inode(u64),
    /// Attributes alone of a live inode (its pages stay good).
    Attr(u64),
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
    /// Deleted, kept while something holds it (its name is gone).
    pub deleted: bool,
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

pub use crate::store::snapshots::check_name as check_snapshot_name;

impl Inner {
    /// The catalog row of snapshot `name` (deleted ones are not found).
    pub fn snapshot_named(&mut self, name: &[u8]) -> FsResult<Option<SnapshotRec>> {
        Ok(self.store.snapshot(name)?)
    }

    /// Every snapshot, oldest first (sizes not computed).
    pub fn snapshots(&mut self) -> FsResult<Vec<SnapshotInfo>> {
        self.snapshot_listing(false)
    }

    /// [`Inner::snapshots`]; with `deleted`, also the deleted snapshots still kept.
    pub fn snapshot_listing(&mut self, deleted: bool) -> FsResult<Vec<SnapshotInfo>> {
        Ok(self
            .store
            .snapshot_list(deleted)?
            .into_iter()
            .map(|(name, rec)| SnapshotInfo {
                name,
                epoch: rec.epoch,
                created: rec.created,
                referenced: 0,
                exclusive: 0,
                deleted: rec.flags & SNAP_DELETED != 0,
            })
            .collect())
    }

    /// Every named hold, by name.
    pub fn holds(&mut self) -> FsResult<Vec<(String, HoldRec)>> {
        Ok(self.store.holds()?)
    }

    /// Fills in `referenced` and `exclusive` for `snaps`.
    pub fn snapshot_sizes(&mut self, snaps: &mut [SnapshotInfo]) -> FsResult<()> {
        let epochs: Vec<u64> = snaps.iter().map(|s| s.epoch).collect();
        for (s, (referenced, exclusive)) in
            snaps.iter_mut().zip(self.store.snapshot_sizes(&epochs)?)
        {
            s.referenced = referenced;
            s.exclusive = exclusive;
        }
        Ok(())
    }

    /// Attributes of the `.snapshots` directory (owned like the root, read and search
    /// for all, writable by whoever may write the root: mkdir there takes a snapshot).
    pub(super) fn snapdir_attr(&mut self) -> FsResult<Attr> {
        // The root the mount shows (a replica's live root may be mid-receive).
        let mut rec = self.inode_at(self.tree_epoch(), ROOT_INO)?;
        // Making and removing snapshots is for the root directory's owner: nobody else
        // may write here, even where the root is open to all (a sticky /tmp-like root).
        rec.perm &= 0o755;
        rec.nlink = 2;
        rec.size = 0;
        rec.parent = ROOT_INO;
        self.attr(SNAPDIR_INO, rec)
    }

    /// Takes snapshot `name` of the live tree; returns its epoch.
    pub fn snapshot_create(&mut self, name: &[u8], now: Ts) -> FsResult<u64> {
        if self.replica_view.is_some() {
            // A replica's snapshots are its source's.
            return err(libc::EROFS);
        }
        let name = check_snapshot_name(name)
            .map_err(|(e, _)| FsError::Errno(e))?
            .to_string();
        if self.snapshot_named(name.as_bytes())?.is_some() {
            return err(libc::EEXIST);
        }
        // Everything written so far belongs to the snapshot.
        self.flush_all()?;
        let epoch = self.store.snapshot_take(&name, now)?;
        self.undurable = false;
        tracing::info!(name, epoch, "snapshot taken");
        Ok(epoch)
    }

    /// Makes this the mount of a replica: its tree shows its newest snapshot (held
    /// while shown, as by an open file), and nothing in it can be changed.
    pub fn show_replica(&mut self) -> FsResult<()> {
        if self.replica_view.is_none() {
            self.replica_view = Some(0);
            self.refresh_view()?;
        }
        Ok(())
    }

    /// Whether this is the mount of a replica.
    pub fn is_replica(&self) -> bool {
        self.replica_view.is_some()
    }

    /// Moves a replica's tree on to its newest snapshot (one just received). Returns
    /// what kernel caches must forget: O(changes) between the two, or the root's
    /// entries when the tree was empty. A shown snapshot deleted meanwhile stays shown
    /// (hidden from `.snapshots/`) until a newer one comes.
    pub fn refresh_view(&mut self) -> FsResult<Vec<Inval>> {
        let Some(old) = self.replica_view else {
            return Ok(Vec::new());
        };
        let snaps = self.store.snapshot_list(false)?;
        let Some((name, new)) = snaps
            .iter()
            .max_by_key(|(_, r)| r.epoch)
            .map(|(n, r)| (n.clone(), r.epoch))
        else {
            return Ok(Vec::new());
        };
        if new <= old {
            return Ok(Vec::new());
        }
        // Everything the kernel must forget, found before the view moves: a failure
        // here leaves the old view shown, whole.
        let mut invals = vec![
            Inval::Inode(ROOT_INO),
            // `.snapshots` lists one more (its cached listing and a negative entry go).
            Inval::Inode(SNAPDIR_INO),
            Inval::Entry(SNAPDIR_INO, name.into_bytes()),
        ];
        if old == 0 {
            let txn = self.store.read_txn()?;
            scan_visible(
                txn.versions(),
                ROOT_INO,
                KIND_DIRENT,
                0..=0,
                new,
                |_, name, _| {
                    invals.push(Inval::Entry(ROOT_INO, name.to_vec()));
                    Ok(true)
                },
            )?;
        } else {
            for c in self.store.changes_between(old, new)? {
                match c.kind {
                    KIND_DIRENT => {
                        invals.push(Inval::Entry(c.ino, c.name.clone()));
                        invals.push(Inval::Inode(c.ino));
                    }
                    _ => invals.push(Inval::Inode(c.ino)),
                }
            }
        }
        *self.snap_open.entry(new).or_insert(0) += 1;
        self.replica_view = Some(new);
        if old != 0
            && let Err(e) = self.release_snapshot_hold(old)
        {
            // The view has moved all the same; the old snapshot's space comes back
            // at a later durable tick.
            tracing::warn!(error = %e, epoch = old, "a snapshot no longer shown is not freed yet");
            self.deletions_pending = true;
        }
        invals.dedup();
        tracing::info!(epoch = new, "replica shows its newest snapshot");
        Ok(invals)
    }

    /// Whether something keeps epoch `epoch` from being dropped: a file open in it,
    /// or a named hold.
    fn epoch_kept(&mut self, epoch: u64) -> FsResult<bool> {
        Ok(self.snap_open.get(&epoch).copied().unwrap_or(0) > 0 || self.store.is_held(epoch)?)
    }

    /// Deletes snapshot `name`. While files opened in it are open, or a hold keeps
    /// it, it only leaves the listing; its space comes back when the last goes.
    pub fn snapshot_delete(&mut self, name: &[u8]) -> FsResult<()> {
        // One durable commit decides the deletion: the name goes and a hidden row marks
        // the epoch as deleting. Dropping its versions is a second commit that removes
        // that row; should it not happen (a crash, a full disk), the next mount or
        // durable tick finishes it, so nothing leaks and nothing is half deleted.
        let rec = self.store.snapshot_hide(name)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let kept = self.epoch_kept(rec.epoch)?;
        tracing::info!(name, epoch = rec.epoch, kept, "snapshot deleted");
        #[cfg(test)]
        if tests::CRASH_AFTER_DELETE_INTENT.get() {
            return Ok(());
        }
        if !kept && let Err(e) = self.drop_epoch(rec.epoch) {
            // Deleted all the same: its space comes back at a later durable point.
            tracing::warn!(name, error = %e, "a deleted snapshot's space is not given back yet");
            self.deletions_pending = true;
        }
        Ok(())
    }

    /// Takes hold `hold` on snapshot `snapshot`: it is kept, and the changes after it,
    /// until the hold is released (a deletion meanwhile only hides it).
    pub fn hold(&mut self, hold: &[u8], snapshot: &[u8], now: Ts) -> FsResult<u64> {
        let hold = check_snapshot_name(hold).map_err(|(e, _)| FsError::Errno(e))?;
        let epoch = self.store.hold(hold, snapshot, now)?;
        tracing::info!(hold, snapshot = %String::from_utf8_lossy(snapshot), epoch, "hold taken");
        Ok(epoch)
    }

    /// Releases hold `hold`; a deleted snapshot nothing else keeps is then dropped.
    pub fn hold_release(&mut self, hold: &[u8]) -> FsResult<()> {
        let hold = std::str::from_utf8(hold).map_err(|_| FsError::Errno(libc::ENOENT))?;
        let epoch = self.store.release(hold)?;
        tracing::info!(hold, epoch, "hold released");
        self.forget_if_unkept(epoch)
    }

    /// Drops deleting epoch `epoch` when nothing keeps it any more (a hold released,
    /// or moved off it by a sync).
    pub fn forget_if_unkept(&mut self, epoch: u64) -> FsResult<()> {
        if self.store.is_deleting(epoch)?
            && !self.epoch_kept(epoch)?
            && let Err(e) = self.drop_epoch(epoch)
        {
            tracing::warn!(epoch, error = %e, "a deleted snapshot's space is not given back yet");
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
        if self.store.is_deleting(epoch)?
            && !self.store.is_held(epoch)?
            && let Err(e) = self.drop_epoch(epoch)
        {
            self.deletions_pending = true;
            return Err(e);
        }
        Ok(())
    }

    /// Finishes deletions whose holders are gone (open files, holds, or a crash or
    /// full disk that came between a deletion and the return of its space): at mount,
    /// and at a durable tick after a deletion could not give its space back. Then
    /// prunes the change index.
    pub(super) fn reap_deleted_snapshots(&mut self) -> FsResult<()> {
        self.deletions_pending = false;
        for epoch in self.store.deleting_epochs()? {
            if self.epoch_kept(epoch)? {
                continue;
            }
            if let Err(e) = self.drop_epoch(epoch) {
                self.deletions_pending = true;
                return Err(e);
            }
        }
        self.store.prune_changes()?;
        Ok(())
    }

    /// Forgets epoch `epoch`: drops what only it could see and its hidden catalog row
    /// in one commit, then compacts and prunes the change index (best effort: the
    /// deletion is done by then).
    fn drop_epoch(&mut self, epoch: u64) -> FsResult<u64> {
        let t = std::time::Instant::now();
        let freed = self.store.drop_epoch(epoch, false)?;
        let dropped = t.elapsed();
        let compacted = self.store.compact();
        let segments = t.elapsed();
        if let Err(e) = compacted.and_then(|_| self.store.compact_metadata()) {
            tracing::warn!(error = %e, "compaction after a snapshot deletion failed");
        }
        if let Err(e) = self.store.prune_changes() {
            tracing::warn!(error = %e, "pruning the change index failed");
        }
        tracing::debug!(epoch, freed, ?dropped, ?segments, total = ?t.elapsed(),
            "snapshot versions dropped, segments and metadata compacted");
        Ok(freed)
    }

    /// Makes the live tree equal to snapshot `name`, at a cost of O(changes since it).
    /// Newer snapshots stay. Returns what kernel caches must forget.
    pub fn rollback(&mut self, name: &[u8]) -> FsResult<Vec<Inval>> {
        if self.replica_view.is_some() {
            return err(libc::EROFS);
        }
        let snap = self
            .snapshot_named(name)?
            .ok_or(FsError::Errno(libc::ENOENT))?
            .epoch;
        self.flush_all()?;
        if self.kernel_times {
            // The kernel keeps its own size of an open file and takes none from us:
            // a file the rollback changes must not be open.
            let open: BTreeSet<u64> = self.open_live_inos().into_iter().collect();
            if !open.is_empty() {
                let busy: Vec<u64> = self
                    .store
                    .changed_inos(snap)?
                    .intersection(&open)
                    .copied()
                    .collect();
                for ino in busy {
                    if self.inode(ino)?.kind == FileKind::File {
                        return err(libc::EBUSY);
                    }
                }
            }
        }
        let mut invals = Vec::new();
        for rolled in self.store.rollback_to(snap)? {
            // With the writeback cache the kernel keeps its own size of a file and
            // takes none from us: the inode must go, so its entries go too (an inode
            // no entry and no open file holds is dropped at once).
            for (dir, name) in rolled.links {
                invals.push(Inval::Entry(dir, name));
            }
            for (kind, _, name) in rolled.rows {
                match kind {
                    KIND_DIRENT => {
                        invals.push(Inval::Entry(rolled.ino, name));
                        invals.push(Inval::Inode(rolled.ino));
                    }
                    KIND_INODE | KIND_BLOCK => invals.push(Inval::Inode(rolled.ino)),
                    _ => {}
                }
            }
        }
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

    /// What changed from snapshot `old` to `new` (a snapshot or `live`), from the change
    /// index: O(changes), never a tree walk. With `blocks`, modified files carry their
    /// changed byte ranges.
    pub fn diff(&mut self, old: &str, new: &str, blocks: bool) -> FsResult<Vec<Change>> {
        let d = self.diff_view(old, new)?;
        d.run(blocks)
    }

    /// What [`Inner::diff`] needs, taken under the core lock: the two epochs and a
    /// frozen view of the store; [`DiffView::run`] then works without the lock.
    pub fn diff_view(&mut self, old: &str, new: &str) -> FsResult<DiffView> {
        let (a, b) = (self.diff_epoch(old)?, self.diff_epoch(new)?);
        if a >= b {
            return err(libc::EINVAL);
        }
        Ok(DiffView {
            view: self.store.frozen()?,
            a,
            b,
            bs: self.bs_u64(),
        })
    }

    fn bs_u64(&self) -> u64 {
        self.store.block_size as u64
    }
}

/// A diff between epochs `a < b` of a frozen view, computed without the core lock.
pub struct DiffView {
    view: crate::store::Frozen,
    a: u64,
    b: u64,
    bs: u64,
}

impl DiffView {
    /// The changes, from the change index: O(changes), never a tree walk. With
    /// `blocks`, modified files carry their changed byte ranges.
    pub fn run(&self, blocks: bool) -> FsResult<Vec<Change>> {
        let (a_e, b_e, bs) = (self.a, self.b, self.bs);
        let txn = &self.view.txn;
        let versions = txn.open_table(VERSIONS).map_err(StoreError::from)?;
        let changes = txn.open_table(CHANGES).map_err(StoreError::from)?;
        let mut by_ino: BTreeMap<u64, Vec<RowChange>> = BTreeMap::new();
        for c in crate::store::snapshots::changed_rows(&changes, &versions, a_e, b_e)? {
            by_ino.entry(c.ino).or_default().push(c);
        }
        // The record of an inode at an epoch; `None` where it does not exist. Only
        // "not there" is absence: an unreadable record is an error, not a file diff may
        // call added or removed.
        let inode_at = |e: u64, ino: u64| -> FsResult<Option<InodeRec>> {
            match crate::store::visible(&versions, RecKey::inode(ino), e)? {
                Some(b) => Ok(Some(InodeRec::decode(&b)?)),
                None => Ok(None),
            }
        };
        // Paths of an inode at an epoch, from the back pointers (the root is the empty
        // path here: its children print as `/name`).
        let paths_at = |e: u64, ino: u64| -> FsResult<Vec<String>> {
            if ino == ROOT_INO {
                return Ok(vec![String::new()]);
            }
            Ok(crate::store::paths_at(&versions, e, ino)?)
        };
        let mut out = Vec::new();
        for (ino, rows) in by_ino {
            let (a, b) = (inode_at(a_e, ino)?, inode_at(b_e, ino)?);
            let (pa, pb) = (paths_at(a_e, ino)?, paths_at(b_e, ino)?);
            // Back pointers are names, reported as renames, not as
            // modifications; the inode record is compared apart.
            let data = rows
                .iter()
                .filter(|c| c.kind != KIND_INODE && c.kind != KIND_PARENT);
            let changed_rows = data.clone().next().is_some();
            let block_idx: Vec<u64> = data
                .filter(|c| c.kind == KIND_BLOCK)
                .map(|c| c.sub)
                .collect();
            inode_changes(
                a.as_ref(),
                b.as_ref(),
                &pa,
                &pb,
                changed_rows,
                &block_idx,
                blocks,
                bs,
                &mut out,
            );
        }
        out.sort_by(|x, y| x.path.cmp(&y.path).then(x.kind.cmp(&y.kind)));
        Ok(out)
    }
}

/// How one inode changed between two versions, onto `out`: `a` and `b` its record at
/// each (`None`: not there), `pa` and `pb` its paths (the root's is empty),
/// `changed_rows` whether any other record of it (an entry, a block, an xattr)
/// changed, `block_idx` the blocks that did; with `blocks`, modified files carry
/// their changed byte ranges (`bs` the block size).
#[allow(clippy::too_many_arguments)]
pub(crate) fn inode_changes(
    a: Option<&InodeRec>,
    b: Option<&InodeRec>,
    pa: &[String],
    pb: &[String],
    changed_rows: bool,
    block_idx: &[u64],
    blocks: bool,
    bs: u64,
    out: &mut Vec<Change>,
) {
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
            let mut na = (*ra).clone();
            na.ctime = rb.ctime;
            na.atime = rb.atime;
            if (na != **rb || changed_rows)
                && let Some(p) = pb.first()
            {
                let mut ranges = Vec::new();
                if blocks && rb.kind == FileKind::File {
                    for &idx in block_idx {
                        let s = idx.saturating_mul(bs);
                        if s < rb.size.max(ra.size) {
                            ranges.push((s, s.saturating_add(bs).min(rb.size.max(ra.size))));
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

/// The change index, per record.
#[cfg(test)]
mod change_index_tests {
    use redb::{ReadableTable as _, ReadableTableMetadata as _};

    use super::*;
    use crate::fs::Fs;
    use crate::fs::tests::{ROOT, put_file};
    use crate::store::StoreConfig;
    use crate::store::schema::{CHANGES, HOLDS, META, OLD_CHANGES};

    /// Every row of the change index.
    fn index_rows(core: &mut Inner) -> Vec<(u64, u64, u8, u64, Vec<u8>)> {
        let txn = core.store().read_txn().unwrap();
        txn.changes()
            .iter()
            .unwrap()
            .map(|r| {
                let (key, _) = r.unwrap();
                let (e, i, k, s, n) = key.value();
                (e, i, k, s, n.to_vec())
            })
            .collect()
    }

    fn rows(core: &mut Inner) -> u64 {
        core.store().read_txn().unwrap().changes().len().unwrap()
    }

    /// Writes `data` at `off` into live file `ino`, stored.
    fn write_at(core: &mut Inner, ino: u64, off: u64, data: &[u8]) {
        let fh = core.open(ino, libc::O_WRONLY).unwrap();
        core.write(fh, ino, off, data, &[]).unwrap();
        core.release(fh).unwrap();
        core.sync_all().unwrap();
    }

    #[test]
    fn the_change_index_names_the_changed_block_and_nothing_without_a_snapshot() {
        let (_dir, fs) = crate::fs::tests::fresh();
        let mut core = fs.lock();
        let bs = core.bs_u64();
        let ino = put_file(&mut core, b"big", &vec![5u8; 64 * bs as usize]);
        assert_eq!(rows(&mut core), 0, "no snapshot needs a change row");
        let s1 = core.snapshot_create(b"s1", Ts::now()).unwrap();
        write_at(&mut core, ino, 10 * bs + 100, &[9u8; 4096]);
        let live = core.store().live_epoch;
        let changed = core.store().changes_between(s1, live).unwrap();
        let blocks: Vec<u64> = changed
            .iter()
            .filter(|c| c.kind == KIND_BLOCK)
            .map(|c| c.sub)
            .collect();
        assert_eq!(blocks, [10], "{changed:?}");
        assert!(changed.iter().all(|c| c.ino == ino), "{changed:?}");
        // One row per record changed, not per block of the file.
        assert!(rows(&mut core) <= 3, "{} rows", rows(&mut core));
        let d = core.diff("s1", "live", true).unwrap();
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].ranges, [(10 * bs, 11 * bs)]);
        // With no snapshot left, nothing is kept.
        core.snapshot_delete(b"s1").unwrap();
        assert_eq!(rows(&mut core), 0);
        write_at(&mut core, ino, 0, &[1u8; 4096]);
        assert_eq!(rows(&mut core), 0);
    }

    #[test]
    fn a_format_2_store_is_upgraded_to_the_same_change_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let before: Vec<(u64, u64, u8, u64, Vec<u8>)>;
        {
            let fs = Fs::open(&path, Some(&StoreConfig::default())).unwrap();
            let mut core = fs.lock();
            let bs = core.bs_u64();
            let a = put_file(&mut core, b"a", &vec![1u8; 8 * bs as usize]);
            core.snapshot_create(b"s1", Ts::now()).unwrap();
            write_at(&mut core, a, 3 * bs, &[2u8; 100]);
            core.mknod(ROOT_INO, b"d", libc::S_IFDIR | 0o755, 0, 0, b"", ROOT)
                .unwrap();
            core.snapshot_create(b"s2", Ts::now()).unwrap();
            put_file(&mut core, b"b", b"bee");
            core.store().commit_group(true).unwrap();
            before = index_rows(&mut core);
        }
        assert!(before.len() >= 5, "{before:?}");
        // Format 2 kept one row per inode and epoch, and had no holds.
        {
            let db = redb::Database::open(path.join(crate::store::DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut old = txn.open_table(OLD_CHANGES).unwrap();
                for (e, i, ..) in &before {
                    old.insert((*e, *i), ()).unwrap();
                }
                txn.open_table(META)
                    .unwrap()
                    .insert("format", &2u32.to_le_bytes()[..])
                    .unwrap();
            }
            txn.delete_table(CHANGES).unwrap();
            txn.delete_table(HOLDS).unwrap();
            txn.commit().unwrap();
        }
        let ro = crate::store::ReadOnlyStore::open(&path, false);
        assert!(matches!(ro, Err(StoreError::Upgrade(2))), "{:?}", ro.err());
        let fs = Fs::open(&path, None).unwrap();
        let mut core = fs.lock();
        assert_eq!(index_rows(&mut core), before);
        let d = core.diff("s1", "live", false).unwrap();
        let paths: Vec<&str> = d.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["/", "/a", "/b", "/d"], "{d:?}");
        assert!(core.holds().unwrap().is_empty());
    }

    #[test]
    fn fsck_names_a_change_missing_from_the_index_and_repair_restores_it() {
        let (_dir, fs) = crate::fs::tests::fresh();
        let mut core = fs.lock();
        let ino = put_file(&mut core, b"f", b"one");
        core.snapshot_create(b"s1", Ts::now()).unwrap();
        put_file(&mut core, b"f", b"two");
        let before = core.diff("s1", "live", false).unwrap();
        assert_eq!(before.len(), 1, "{before:?}");
        core.store()
            .write(true, |w| {
                let mut gone = Vec::new();
                for row in w.t.changes.iter()? {
                    let (key, _) = row?;
                    let (e, i, k, s, n) = key.value();
                    if i == ino && k == KIND_BLOCK {
                        gone.push((e, i, k, s, n.to_vec()));
                    }
                }
                assert!(!gone.is_empty());
                for (e, i, k, s, n) in &gone {
                    w.t.changes.remove((*e, *i, *k, *s, n.as_slice()))?;
                }
                Ok(())
            })
            .unwrap();
        let rep = crate::check::fsck(core.store(), false, &mut |_, _| {}).unwrap();
        assert!(
            rep.problems
                .iter()
                .any(|p| p.contains(&format!("inode {ino}"))
                    && p.contains("missing from the change index")),
            "{}",
            rep.summary()
        );
        let done = crate::check::repair(core.store()).unwrap();
        assert!(done.iter().any(|d| d.contains("change index")), "{done:?}");
        let rep = crate::check::fsck(core.store(), false, &mut |_, _| {}).unwrap();
        assert!(rep.clean(), "{}", rep.summary());
        assert_eq!(core.diff("s1", "live", false).unwrap(), before);
    }
}
