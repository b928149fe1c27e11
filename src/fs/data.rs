//! File data: buffered writes, block reads, flush to extents, truncate, fallocate,
//! SEEK_DATA/SEEK_HOLE and extent-sharing copy_file_range.
//!
//! A file is a sequence of `block_size` logical blocks. Block `i` is stored as the
//! extent of its bytes (a short tail block as a short extent); a block of zeros or a
//! block never written is a hole and stores nothing. Writes land in [`super::Dirty`]
//! block buffers and reach the store on flush. A buffer knows which of its 4 KiB pages
//! it holds, so a small write into a stored block neither reads the block first nor
//! rewrites it at flush: the written pages are stored as a fragment over it (see
//! [`BlockRec`]), and a block that gathers more than [`MAX_FRAGS`] fragments is folded
//! back into one extent.

use super::*;
use crate::store::{Fetch, Staged, visible};
use std::mem::MaybeUninit;
use std::ops::Range;

/// Fragments a block may carry before a flush folds it back into one extent.
pub const MAX_FRAGS: usize = 8;

/// A set of pages of one block (blocks are at most 1 MiB: 256 pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Pages([u64; 4]);

impl Pages {
    fn get(&self, p: usize) -> bool {
        self.0[p / 64] & (1 << (p % 64)) != 0
    }

    fn set_range(&mut self, a: usize, b: usize) {
        for p in a..b {
            self.0[p / 64] |= 1 << (p % 64);
        }
    }

    /// Pages `[0, n)` are all in the set.
    fn all(&self, n: usize) -> bool {
        (0..n).all(|p| self.get(p))
    }

    /// Maximal runs `[a, b)` of pages below `n` that are in the set (`want`) or not.
    fn runs(&self, n: usize, want: bool) -> Vec<(usize, usize)> {
        self.groups(0, n)
            .into_iter()
            .filter(|g| g.2 == want)
            .map(|(a, b, _)| (a, b))
            .collect()
    }

    /// Maximal runs `(a, b, held)` of pages in `[p0, p1)` alike in being in the set.
    fn groups(&self, p0: usize, p1: usize) -> Vec<(usize, usize, bool)> {
        let mut out: Vec<(usize, usize, bool)> = Vec::new();
        for p in p0..p1 {
            let held = self.get(p);
            match out.last_mut() {
                Some((_, b, h)) if *h == held => *b = p + 1,
                _ => out.push((p, p + 1, held)),
            }
        }
        out
    }
}

/// A buffered block: room for a whole block, of which the pages in `valid` hold the
/// file's bytes; the others are still read from the store.
///
/// Most buffers hold a page or two of a 64 KiB block, so the room is not zeroed: only
/// the pages in `valid` are initialised, and every method keeps it so.
pub(super) struct DBlock {
    data: Box<[MaybeUninit<u8>]>,
    valid: Pages,
}

impl std::fmt::Debug for DBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DBlock")
            .field("len", &self.data.len())
            .field("valid", &self.valid)
            .finish()
    }
}

impl DBlock {
    /// The pages of a `bs`-byte block.
    fn pages(bs: u64) -> usize {
        (bs as usize).div_ceil(PAGE)
    }

    /// A buffer of a `bs`-byte block holding no page yet.
    fn empty(bs: u64) -> DBlock {
        DBlock {
            data: Box::new_uninit_slice(bs as usize),
            valid: Pages::default(),
        }
    }

    /// A buffer holding all of `data`, a whole block.
    fn whole(data: Vec<u8>) -> DBlock {
        let mut valid = Pages::default();
        valid.set_range(0, data.len().div_ceil(PAGE));
        let data = Box::into_raw(data.into_boxed_slice()) as *mut [MaybeUninit<u8>];
        DBlock {
            // SAFETY: the pointer comes from a Box of the same length, and
            // MaybeUninit<u8> has the layout of u8.
            data: unsafe { Box::from_raw(data) },
            valid,
        }
    }

    /// The pages `[a, b)` that bytes `r` touch.
    fn pages_of(r: &Range<usize>) -> (usize, usize) {
        (r.start / PAGE, r.end.div_ceil(PAGE))
    }

    /// Bytes `r`, all in held pages.
    fn bytes(&self, r: Range<usize>) -> &[u8] {
        let (a, b) = Self::pages_of(&r);
        assert!((a..b).all(|p| self.valid.get(p)), "read of a page not held");
        let part = &self.data[r];
        // SAFETY: every page in `valid` is initialised (see the type), and `part` lies
        // in such pages.
        unsafe { std::slice::from_raw_parts(part.as_ptr().cast::<u8>(), part.len()) }
    }

    /// Copies `bytes` in at `at`. A page the copy covers in part must be held already;
    /// the pages it touches are held afterwards.
    fn put(&mut self, at: usize, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let r = at..at + bytes.len();
        let (a, b) = Self::pages_of(&r);
        let whole =
            |p: usize| r.start <= p * PAGE && r.end >= ((p + 1) * PAGE).min(self.data.len());
        assert!(
            [a, b - 1].iter().all(|&p| whole(p) || self.valid.get(p)),
            "partial write into a page not held"
        );
        let dst = &mut self.data[r];
        // SAFETY: `dst` and `bytes` have the same length, and a shared and a mutable
        // borrow cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.as_mut_ptr().cast(), bytes.len())
        };
        self.valid.set_range(a, b);
    }

    /// Page `p` holds `bytes` (a whole page), or zeros.
    fn put_page(&mut self, p: usize, bytes: Option<&[u8]>) {
        let r = p * PAGE..((p + 1) * PAGE).min(self.data.len());
        match bytes {
            Some(b) => self.put(r.start, b),
            None => {
                self.data[r].fill(MaybeUninit::new(0));
                self.valid.set_range(p, p + 1);
            }
        }
    }
}

/// `frags` with pages `[at, at + n)` now read from extent `hash` (from its page 0):
/// fragments under the new one are cut around it.
fn overlay(frags: &[Frag], at: u16, n: u16, hash: [u8; 32]) -> Vec<Frag> {
    let (a, b) = (at, at + n);
    let mut out = Vec::with_capacity(frags.len() + 2);
    for f in frags {
        let (fa, fb) = (f.at, f.at + f.n);
        if fb <= a || fa >= b {
            out.push(*f);
            continue;
        }
        if fa < a {
            out.push(Frag { n: a - fa, ..*f });
        }
        if fb > b {
            out.push(Frag {
                at: b,
                n: fb - b,
                from: f.from + (b - fa),
                hash: f.hash,
            });
        }
    }
    out.push(Frag {
        at,
        n,
        from: 0,
        hash,
    });
    out.sort_by_key(|f| f.at);
    out
}

/// `lseek` whence values the filesystem answers itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekWhence {
    /// SEEK_DATA: the next offset holding data.
    Data,
    /// SEEK_HOLE: the next offset in a hole (the end of file counts).
    Hole,
}

impl Inner {
    fn bs(&self) -> u64 {
        self.store.block_size as u64
    }

    /// The bytes of block `idx` of `ino` (dirty or stored, a whole block), `None` for a
    /// hole.
    fn block(&mut self, ino: u64, idx: u64) -> FsResult<Option<Vec<u8>>> {
        let bs = self.bs();
        let Some(valid) = self
            .dirty
            .get(&ino)
            .and_then(|d| d.blocks.get(&idx))
            .map(|b| b.valid)
        else {
            return self.stored_block(ino, idx);
        };
        let mut out = if valid.all(DBlock::pages(bs)) {
            vec![0u8; bs as usize]
        } else {
            self.stored_block(ino, idx)?
                .unwrap_or_else(|| vec![0u8; bs as usize])
        };
        let b = &self.dirty[&ino].blocks[&idx];
        for (p0, p1) in valid.runs(DBlock::pages(bs), true) {
            let r = p0 * PAGE..(p1 * PAGE).min(bs as usize);
            out[r.clone()].copy_from_slice(b.bytes(r));
        }
        Ok(Some(out))
    }

    /// The whole stored block `idx` of live `ino`, `None` for a hole.
    fn stored_block(&mut self, ino: u64, idx: u64) -> FsResult<Option<Vec<u8>>> {
        self.stored_range_at(self.store.live_epoch, ino, idx, 0, usize::MAX)
    }

    /// The stored record of block `idx` of live `ino`.
    fn block_rec(&mut self, ino: u64, idx: u64) -> FsResult<Option<BlockRec>> {
        let txn = self.store.read_txn()?;
        let t = txn.versions();
        match visible(t, RecKey::block(ino, idx), self.store.live_epoch)? {
            Some(b) => Ok(Some(BlockRec::decode(&b)?)),
            None => Ok(None),
        }
    }

    /// Pages of live `ino` that its write buffers hold and its stored blocks do not
    /// (see [`BlockRec::alloc_pages`]): data written and not yet flushed.
    pub(super) fn dirty_pages(&mut self, ino: u64) -> FsResult<u64> {
        let held: Vec<(u64, Pages)> = match self.dirty.get(&ino) {
            Some(d) => d.blocks.iter().map(|(i, b)| (*i, b.valid)).collect(),
            None => return Ok(0),
        };
        let n = DBlock::pages(self.bs());
        let mut extra = 0;
        for (idx, valid) in held {
            let mut stored = Pages::default();
            if let Some(rec) = self.block_rec(ino, idx)? {
                stored.set_range(0, (rec.len as usize).div_ceil(PAGE));
                for f in &rec.frags {
                    stored.set_range(f.at as usize, (f.at + f.n) as usize);
                }
            }
            extra += (0..n).filter(|&p| valid.get(p) && !stored.get(p)).count() as u64;
        }
        Ok(extra)
    }

    /// Bytes `[start, end)` of stored block `idx` (`end` capped at the block size;
    /// zeros where nothing is stored), `None` for a hole.
    fn stored_range_at(
        &mut self,
        epoch: u64,
        ino: u64,
        idx: u64,
        start: usize,
        end: usize,
    ) -> FsResult<Option<Vec<u8>>> {
        let end = end.min(self.bs() as usize);
        let mut out = vec![0u8; end.saturating_sub(start)];
        Ok(self
            .stored_into(epoch, ino, idx, start, &mut out, None)?
            .then_some(out))
    }

    /// Reads bytes `[start, start + dst.len())` of stored block `idx` of `ino` at
    /// `epoch` into `dst`, which holds zeros; `false` for a hole (nothing read).
    fn stored_into(
        &mut self,
        epoch: u64,
        ino: u64,
        idx: u64,
        start: usize,
        dst: &mut [u8],
        mut later: Later<'_>,
    ) -> FsResult<bool> {
        let end = start + dst.len();
        // (block offset, length, extent hash, extent row, offset in the extent)
        let mut parts = Vec::new();
        {
            let txn = self.store.read_txn()?;
            let t = txn.versions();
            let b = match visible(t, RecKey::block(ino, idx), epoch)? {
                Some(b) => BlockRec::decode(&b)?,
                None => return Ok(false),
            };
            let e = txn.extents();
            for (off, len, src) in b.pieces(start, end) {
                let (hash, eoff) = match src {
                    Some((h, eoff)) => (*h, eoff),
                    None => match b.base_extent() {
                        Some((h, _)) => (*h, off),
                        // No base, or an unwritten one: zeros.
                        None => continue,
                    },
                };
                let ext = match redb::ReadableTable::get(e, hash).map_err(StoreError::from)? {
                    Some(v) => ExtentRec::decode(&hash, v.value())?,
                    None => {
                        return Err(StoreError::Corrupt(format!(
                            "block {idx} of inode {ino} names a missing extent"
                        ))
                        .into());
                    }
                };
                parts.push((off, len, hash, ext, eoff));
            }
        }
        for (off, len, hash, ext, eoff) in parts {
            if let Some((fetches, base)) = later.as_mut()
                && eoff == 0
                && len >= ext.len as usize
            {
                // A whole extent: read after the lock is released.
                fetches.push((*base + off - start, self.store.fetch(&hash, &ext)?));
                continue;
            }
            // A short extent (a tail) yields fewer bytes; the rest stays zero.
            self.store
                .read_extent_into(&hash, &ext, eoff, eoff + len, &mut dst[off - start..])?;
        }
        Ok(true)
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&mut self, fino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        finish_read(self.read_planned(fino, offset, size)?)
    }

    /// [`Inner::read`], less the whole extents it names: those come back as
    /// [`Fetch`]es, each with its offset in the returned buffer, for the caller to run
    /// once it has released the core's lock. Everything else (buffered bytes, parts of
    /// extents, zeros) is in the buffer already.
    pub fn read_planned(&mut self, fino: u64, offset: u64, size: u32) -> FsResult<Planned> {
        let (epoch, ino) = self.at(fino)?;
        let rec = self.inode_at(epoch, ino)?;
        if rec.kind == FileKind::Dir {
            return err(libc::EISDIR);
        }
        if offset >= rec.size {
            return Ok((Vec::new(), Vec::new()));
        }
        let end = rec.size.min(offset + size as u64);
        let bs = self.bs();
        let mut out = vec![0u8; (end - offset) as usize];
        let mut fetches = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let within = (pos % bs) as usize;
            let n = ((bs - within as u64).min(end - pos)) as usize;
            let base = (pos - offset) as usize;
            let dst = &mut out[base..][..n];
            let valid = (epoch == self.store.live_epoch)
                .then(|| self.dirty.get(&ino).and_then(|d| d.blocks.get(&idx)))
                .flatten()
                .map(|b| b.valid);
            match valid {
                Some(valid) => {
                    // Buffered pages from the buffer, the others from the store.
                    let (p0, p1) = (within / PAGE, (within + n).div_ceil(PAGE));
                    for (a, b, held) in valid.groups(p0, p1) {
                        let (s, e) = ((a * PAGE).max(within), (b * PAGE).min(within + n));
                        if held {
                            let d = &self.dirty[&ino].blocks[&idx];
                            dst[s - within..e - within].copy_from_slice(d.bytes(s..e));
                        } else {
                            let later = Some((&mut fetches, base + s - within));
                            let dst = &mut dst[s - within..e - within];
                            self.stored_into(epoch, ino, idx, s, dst, later)?;
                        }
                    }
                }
                None => {
                    self.stored_into(epoch, ino, idx, within, dst, Some((&mut fetches, base)))?;
                }
            }
            pos += n as u64;
        }
        Ok((out, fetches))
    }

    /// Writes `data` at `offset` (at the end of file for an O_APPEND handle); returns
    /// the bytes written. `digests` are those of the whole blocks the write covers at
    /// `offset` (see [`digest_blocks`]), taken before the lock; empty if not known.
    pub fn write(
        &mut self,
        fh: u64,
        ino: u64,
        offset: u64,
        data: &[u8],
        digests: &[Digest],
    ) -> FsResult<u32> {
        let ino = self.live(ino)?;
        let append = matches!(
            self.handles.get(&fh),
            Some(Handle::File { append: true, .. })
        );
        let mut rec = self.inode(ino)?;
        if rec.kind != FileKind::File {
            return err(libc::EINVAL);
        }
        // Without the writeback cache a write comes from write(2) itself: one through
        // a descriptor opened before `chattr +i` is refused, as a local filesystem
        // refuses it. (With the cache it is the kernel's write-back of data it took
        // already; that lands.)
        if !self.kernel_times && rec.flags & FS_IMMUTABLE_FL != 0 {
            return err(libc::EPERM);
        }
        // An append-only file changes nothing below its end. The kernel's write-back
        // of a partial last page carries the bytes before the end as they are; any
        // other write there (O_APPEND cleared with fcntl, a shared mapping) is refused.
        // (Through a handle opened with O_APPEND without the writeback cache, every
        // write goes to the end whatever its offset.)
        if rec.flags & FS_APPEND_FL != 0 && !append && offset < rec.size {
            let n = (rec.size - offset).min(data.len() as u64) as u32;
            if self.read(ino, offset, n)? != data[..n as usize] {
                return err(libc::EPERM);
            }
        }
        // An appending write whose end of file moved hashes its blocks anew.
        let (offset, digests) = if append && rec.size != offset {
            (rec.size, &[][..])
        } else {
            (offset, digests)
        };
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        let old_size = rec.size;
        rec.size = rec.size.max(end);
        if !self.kernel_times {
            let now = Ts::now();
            rec.mtime = now;
            rec.ctime = now;
        }
        // Whole blocks no buffer holds go to the store at once, straight from the
        // request (no copy), with the attributes that cover them; the rest is
        // buffered. Should storing fail (a full disk), everything is buffered.
        let bs = self.bs();
        let (first, last) = (offset.div_ceil(bs), end / bs);
        let held = |d: &Dirty| d.blocks.range(first..last).next().is_some();
        if first < last
            && !self.dirty.get(&ino).is_some_and(held)
            && self.direct(ino, &rec, offset, data, digests, first..last)?
        {
            let head = ((first * bs).min(end) - offset) as usize;
            let tail = ((last * bs).max(offset) - offset) as usize;
            self.buffer(ino, old_size, offset, &data[..head])?;
            self.buffer(ino, old_size, last * bs, &data[tail..])?;
            self.undurable = true;
        } else {
            self.buffer(ino, old_size, offset, data)?;
        }
        self.dirty.entry(ino).or_default().attr = Some(rec);
        if self.dirty_bytes > DIRTY_TOTAL_LIMIT {
            self.flush_all()?;
        } else if self.dirty.get(&ino).map_or(0, |d| d.blocks.len()) * self.bs() as usize
            > DIRTY_INODE_LIMIT
        {
            self.flush_inode(ino)?;
        }
        Ok(data.len() as u32)
    }

    /// Stores blocks `idxs` of a write of `data` at `offset` to `ino` (whole blocks,
    /// with their `digests` if known), with `rec`, the inode record the write leaves.
    /// Returns whether they were stored; they are not on a full disk (the caller then
    /// buffers them).
    fn direct(
        &mut self,
        ino: u64,
        rec: &InodeRec,
        offset: u64,
        data: &[u8],
        digests: &[Digest],
        idxs: std::ops::Range<u64>,
    ) -> FsResult<bool> {
        let bs = self.bs();
        let known = digests.len() == idxs.clone().count();
        let blocks: Vec<_> = idxs
            .enumerate()
            .map(|(i, idx)| {
                let at = (idx * bs - offset) as usize;
                let digest = known.then(|| digests[i]);
                (idx, Src::Bytes(&data[at..at + bs as usize], digest))
            })
            .collect();
        match self
            .store
            .write(false, |w| store_blocks(w, ino, Some(rec), &blocks, bs))
        {
            Ok(()) => Ok(true),
            // Only a full disk leaves the data to the buffers (and a retry at flush); a
            // failed write answers its error now.
            Err(FsError::Errno(libc::ENOSPC | libc::EDQUOT)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Copies `data` into dirty block buffers of `ino` (of `size` bytes before this
    /// write) at `offset`. Only a page the write covers in part is read from the
    /// store first.
    fn buffer(&mut self, ino: u64, size: u64, offset: u64, data: &[u8]) -> FsResult<()> {
        let bs = self.bs();
        let mut pos = offset;
        let end = offset + data.len() as u64;
        while pos < end {
            let idx = pos / bs;
            let within = (pos % bs) as usize;
            let n = ((bs - within as u64).min(end - pos)) as usize;
            let chunk = &data[(pos - offset) as usize..][..n];
            pos += n as u64;
            let have = self
                .dirty
                .get(&ino)
                .is_some_and(|d| d.blocks.contains_key(&idx));
            if !have {
                let b = if n as u64 == bs {
                    // A whole block: take the bytes as they are, nothing to merge.
                    DBlock::whole(chunk.to_vec())
                } else {
                    DBlock::empty(bs)
                };
                self.dirty.entry(ino).or_default().blocks.insert(idx, b);
                self.dirty_bytes += bs as usize;
                if n as u64 == bs {
                    continue;
                }
            }
            // Pages the write covers in part take the rest of their bytes from the file.
            let (p0, p1) = (within / PAGE, (within + n).div_ceil(PAGE));
            for p in [p0, p1 - 1] {
                let (ps, pe) = (p * PAGE, ((p + 1) * PAGE).min(bs as usize));
                let covered = within <= ps && within + n >= pe;
                let valid = self.dirty[&ino].blocks[&idx].valid;
                if covered || valid.get(p) {
                    continue;
                }
                let bytes = if idx * bs + (ps as u64) < size {
                    self.stored_range_at(self.store.live_epoch, ino, idx, ps, pe)?
                } else {
                    None
                };
                let b = self
                    .dirty
                    .get_mut(&ino)
                    .and_then(|d| d.blocks.get_mut(&idx))
                    .expect("inserted above");
                b.put_page(p, bytes.as_deref());
            }
            let b = self
                .dirty
                .get_mut(&ino)
                .and_then(|d| d.blocks.get_mut(&idx))
                .expect("inserted above");
            b.put(within, chunk);
        }
        Ok(())
    }

    /// Drops everything buffered for `ino` (it is being deleted).
    pub(super) fn dirty_drop(&mut self, ino: u64) {
        if let Some(d) = self.dirty.remove(&ino) {
            self.dirty_bytes -= d.blocks.len() * self.bs() as usize;
        }
    }

    /// Stores the buffered blocks and attributes of `ino`.
    pub fn flush_inode(&mut self, ino: u64) -> FsResult<()> {
        self.fold_fragmented(ino)?;
        let Some(d) = self.dirty.remove(&ino) else {
            return Ok(());
        };
        let bs = self.bs();
        self.dirty_bytes -= d.blocks.len() * bs as usize;
        let mut res = self.store.write(false, |w| store_dirty(w, ino, &d, bs));
        if matches!(res, Err(FsError::Errno(libc::ENOSPC))) && self.reclaim() {
            res = self.store.write(false, |w| store_dirty(w, ino, &d, bs));
        }
        if res.is_err() {
            // Keep the data buffered so a later flush can retry (e.g. after ENOSPC).
            self.dirty_bytes += d.blocks.len() * bs as usize;
            self.dirty.insert(ino, d);
        }
        self.undurable = true;
        res
    }

    /// On a full disk: makes what is answered durable and compacts segments, so the
    /// space of deleted and overwritten data comes back. Returns whether any did.
    fn reclaim(&mut self) -> bool {
        let freed = self.store.sync().and_then(|()| {
            // Freed extents give their disk back at once, and wholly dead segments go.
            let punched = self.store.punch_freed(true);
            Ok(punched + self.store.compact()?)
        });
        match freed {
            Ok(n) => {
                self.undurable = false;
                tracing::info!(freed = n, "disk full: compacted segments");
                n > 0
            }
            Err(e) => {
                tracing::warn!(error = %e, "disk full, and compaction failed");
                false
            }
        }
    }

    /// Completes from the store each buffered block of `ino` that stored as fragments
    /// would carry more than [`MAX_FRAGS`]: it is then stored whole.
    fn fold_fragmented(&mut self, ino: u64) -> FsResult<()> {
        let Some(d) = self.dirty.get(&ino) else {
            return Ok(());
        };
        let bs = self.bs();
        let size = match &d.attr {
            Some(a) => a.size,
            None => self.inode(ino)?.size,
        };
        let partial: Vec<(u64, Pages)> = self.dirty[&ino]
            .blocks
            .iter()
            .filter(|(idx, b)| !b.valid.all(needed_pages(**idx, bs, size)))
            .map(|(idx, b)| (*idx, b.valid))
            .collect();
        for (idx, valid) in partial {
            let mut frags = match self.block_rec(ino, idx)? {
                Some(r) => r.frags,
                None => Vec::new(),
            };
            for (a, b) in valid.runs(needed_pages(idx, bs, size), true) {
                frags = overlay(&frags, a as u16, (b - a) as u16, [0; 32]);
            }
            if frags.len() > MAX_FRAGS {
                let whole = self.block(ino, idx)?.expect("a buffered block");
                let b = self
                    .dirty
                    .get_mut(&ino)
                    .and_then(|d| d.blocks.get_mut(&idx))
                    .expect("listed above");
                *b = DBlock::whole(whole);
            }
        }
        Ok(())
    }

    /// Stores every buffered block and attribute. One inode failing (a full disk)
    /// does not keep the others buffered; the first error is returned.
    pub fn flush_all(&mut self) -> FsResult<()> {
        let inos: Vec<u64> = self.dirty.keys().copied().collect();
        let mut first = Ok(());
        for ino in inos {
            if let Err(e) = self.flush_inode(ino)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    /// fsync: the data (and with `!datasync`, the metadata) of `ino` is durable on
    /// return. Both amount to a durable commit here.
    pub fn fsync(&mut self, ino: u64, _datasync: bool) -> FsResult<()> {
        self.flush_inode(ino)?;
        self.store.sync()?;
        self.undurable = false;
        Ok(())
    }

    /// Sets the size of `ino`: drops blocks past the end, zeroes the tail of a cut block.
    pub(super) fn truncate(&mut self, ino: u64, size: u64) -> FsResult<()> {
        if size > i64::MAX as u64 {
            return err(libc::EFBIG);
        }
        let mut rec = self.inode(ino)?;
        let bs = self.bs();
        if size < rec.size {
            let keep = size.div_ceil(bs);
            if let Some(d) = self.dirty.get_mut(&ino) {
                let dropped = d.blocks.split_off(&keep);
                self.dirty_bytes -= dropped.len() * bs as usize;
            }
            if !size.is_multiple_of(bs) {
                // Zero the cut block's tail, so growing again reads zeros.
                let idx = size / bs;
                let within = (size % bs) as usize;
                if let Some(mut b) = self.block(ino, idx)? {
                    b[within..].fill(0);
                    if !self
                        .dirty
                        .get(&ino)
                        .is_some_and(|d| d.blocks.contains_key(&idx))
                    {
                        self.dirty_bytes += bs as usize;
                    }
                    let b = DBlock::whole(b);
                    self.dirty.entry(ino).or_default().blocks.insert(idx, b);
                }
            }
            self.store
                .write(false, |w| drop_blocks(w, ino, keep..=u64::MAX))?;
        }
        rec.size = size;
        let now = Ts::now();
        rec.mtime = now;
        rec.ctime = now;
        self.dirty.entry(ino).or_default().attr = Some(rec);
        self.undurable = true;
        Ok(())
    }

    /// fallocate: mode 0 and KEEP_SIZE reserve nothing (extents are written on demand)
    /// but extend the size; PUNCH_HOLE and ZERO_RANGE turn the range into zeros.
    pub fn fallocate(&mut self, ino: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        let ino = self.live(ino)?;
        let flags = self.inode(ino)?.flags;
        let destroys = mode & !libc::FALLOC_FL_KEEP_SIZE != 0;
        if flags & FS_IMMUTABLE_FL != 0 || (flags & FS_APPEND_FL != 0 && destroys) {
            return err(libc::EPERM);
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 || (punch && !keep) || (punch && zero) {
            return err(libc::EOPNOTSUPP);
        }
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        let mut rec = self.inode(ino)?;
        if rec.kind != FileKind::File {
            return err(if rec.kind == FileKind::Dir {
                libc::EISDIR
            } else {
                libc::ENODEV
            });
        }
        if !punch && !zero && end > offset {
            self.check_space(ino, offset, end)?;
            self.preallocate(ino, offset, end)?;
        }
        if punch || zero {
            let zend = end.min(rec.size);
            if offset < zend {
                self.zero_range(ino, &rec, offset, zend)?;
            }
            let now = Ts::now();
            rec.mtime = now;
            rec.ctime = now;
        }
        if !keep && end > rec.size {
            rec.size = end;
            rec.ctime = Ts::now();
        }
        self.dirty.entry(ino).or_default().attr = Some(rec);
        self.undurable = true;
        Ok(())
    }

    /// Marks the blocks of `[start, end)` of live `ino` that hold nothing (stored or
    /// buffered) as allocated: unwritten, reading as zeros and naming no extent, so
    /// that `st_blocks` counts them as it counts preallocated space elsewhere. No disk
    /// space is held for them (see [`Inner::check_space`]).
    fn preallocate(&mut self, ino: u64, start: u64, end: u64) -> FsResult<()> {
        let bs = self.bs();
        let (first, last) = (start / bs, (end - 1) / bs);
        let mut held: std::collections::HashSet<u64> =
            self.stored_indices(ino, first, last)?.into_iter().collect();
        if let Some(d) = self.dirty.get(&ino) {
            held.extend(d.blocks.range(first..=last).map(|(i, _)| *i));
        }
        let todo: Vec<(u64, u32)> = (first..=last)
            .filter(|i| !held.contains(i))
            .map(|i| (i, (end - i * bs).min(bs) as u32))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        self.store.write(false, |w| {
            for (idx, n) in &todo {
                let prev = w.version(RecKey::block(ino, *idx))?;
                w.put_block(ino, *idx, Some(&BlockRec::unwritten(*n)), prev)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// The indices in `[first, last]` of the blocks of live `ino` that have a stored
    /// record.
    fn stored_indices(&mut self, ino: u64, first: u64, last: u64) -> FsResult<Vec<u64>> {
        let mut out = Vec::new();
        let txn = self.store.read_txn()?;
        let live = self.store.live_epoch;
        scan_visible(
            txn.versions(),
            ino,
            KIND_BLOCK,
            first..=last,
            live,
            |idx, _, _| {
                out.push(idx);
                Ok(true)
            },
        )?;
        Ok(out)
    }

    /// Refuses (ENOSPC) an allocation of `[start, end)` of live `ino` whose blocks
    /// that hold nothing yet would take more than the disk under the store has free:
    /// fallocate promises space, and must not promise what is not there. (The space
    /// is not held for the file: a later write elsewhere can still take it.)
    fn check_space(&mut self, ino: u64, start: u64, end: u64) -> FsResult<()> {
        let bs = self.bs();
        let (first, last) = (start / bs, (end - 1) / bs);
        let st = self.statfs()?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        // The whole range fits: nothing to count.
        if (last - first + 1).saturating_mul(bs) <= free {
            return Ok(());
        }
        let mut held = self.stored_indices(ino, first, last)?.len() as u64;
        let dirty: Vec<u64> = self
            .dirty
            .get(&ino)
            .map(|d| d.blocks.range(first..=last).map(|(i, _)| *i).collect())
            .unwrap_or_default();
        for idx in dirty {
            if self.block_rec(ino, idx)?.is_none() {
                held += 1;
            }
        }
        let need = (last - first + 1).saturating_sub(held).saturating_mul(bs);
        if need > free {
            return err(libc::ENOSPC);
        }
        Ok(())
    }

    /// Makes `[start, end)` of `ino` read as zeros: whole blocks become holes.
    fn zero_range(&mut self, ino: u64, rec: &InodeRec, start: u64, end: u64) -> FsResult<()> {
        let bs = self.bs();
        let first_full = start.div_ceil(bs);
        let last_full = end / bs; // exclusive
        if first_full < last_full {
            if let Some(d) = self.dirty.get_mut(&ino) {
                let mut tail = d.blocks.split_off(&first_full);
                let mut after = tail.split_off(&last_full);
                self.dirty_bytes -= tail.len() * bs as usize;
                d.blocks.append(&mut after);
            }
            self.store
                .write(false, |w| drop_blocks(w, ino, first_full..=last_full - 1))?;
        }
        // Partial blocks at either edge.
        let (sb, eb) = (start / bs, (end - 1) / bs);
        let edges: &[u64] = if sb == eb { &[sb] } else { &[sb, eb] };
        for &idx in edges {
            let s = start.max(idx * bs);
            let e = end.min((idx + 1) * bs);
            let whole = s == idx * bs && e == (idx + 1) * bs;
            if !whole && self.block(ino, idx)?.is_some() {
                let zeros = vec![0u8; (e - s) as usize];
                self.buffer(ino, rec.size, s, &zeros)?;
            }
        }
        Ok(())
    }

    /// SEEK_DATA / SEEK_HOLE from `offset`.
    pub fn lseek(&mut self, fino: u64, offset: u64, whence: SeekWhence) -> FsResult<u64> {
        let (epoch, ino) = self.at(fino)?;
        if epoch == self.store.live_epoch {
            self.flush_inode(ino)?;
        }
        let rec = self.inode_at(epoch, ino)?;
        if offset >= rec.size {
            return err(libc::ENXIO);
        }
        let bs = self.bs();
        let first = offset / bs;
        let last = (rec.size - 1) / bs;
        let txn = self.store.read_txn()?;
        let t = txn.versions();
        let mut expect = first;
        let mut found = None;
        scan_visible(
            t,
            ino,
            KIND_BLOCK,
            first..=last,
            epoch,
            |idx, _, payload| match whence {
                // A block fallocate allocated and nothing wrote reads as a hole, as
                // an unwritten extent does on ext4 and XFS.
                _ if BlockRec::decode(payload)?.is_unwritten() => Ok(true),
                SeekWhence::Data => {
                    found = Some(idx);
                    Ok(false)
                }
                SeekWhence::Hole => {
                    if idx != expect {
                        found = Some(expect);
                        return Ok(false);
                    }
                    expect = idx + 1;
                    Ok(true)
                }
            },
        )?;
        match whence {
            SeekWhence::Data => match found {
                Some(idx) => Ok(offset.max(idx * bs)),
                None => err(libc::ENXIO),
            },
            SeekWhence::Hole => {
                let idx = found.unwrap_or(expect);
                Ok(offset.max(idx * bs).min(rec.size))
            }
        }
    }

    /// copy_file_range: block-aligned whole blocks are shared (the destination names
    /// the source's extents, no bytes move); the rest is copied.
    pub fn copy_range(
        &mut self,
        src: u64,
        off_in: u64,
        dst: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        // The source may be a file in a snapshot: restoring from one shares its extents.
        let (sepoch, sino) = self.at(src)?;
        let dst = self.live(dst)?;
        let srec = self.inode_at(sepoch, sino)?;
        let drec = self.inode(dst)?;
        // An append-only file takes bytes at its end only (O_APPEND can be cleared
        // with fcntl: the kernel knows nothing of the flag).
        if drec.flags & FS_IMMUTABLE_FL != 0
            || (drec.flags & FS_APPEND_FL != 0 && off_out < drec.size)
        {
            return err(libc::EPERM);
        }
        if srec.kind != FileKind::File || drec.kind != FileKind::File {
            return err(libc::EINVAL);
        }
        if off_in >= srec.size {
            return Ok(0);
        }
        let len = len.min(srec.size - off_in);
        off_out
            .checked_add(len)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        self.flush_inode(sino)?;
        self.flush_inode(dst)?;
        let bs = self.bs();
        let mut done = 0u64;
        let mut drec = self.inode(dst)?;
        while done < len {
            let (i, o) = (off_in + done, off_out + done);
            let n = (bs - i % bs).min(len - done);
            let whole =
                i % bs == 0 && o % bs == 0 && (n == bs || i + n == srec.size && o + n >= drec.size);
            if whole {
                let (sidx, didx) = (i / bs, o / bs);
                self.store.write(false, |w| -> FsResult<()> {
                    let b = w.visible_at(RecKey::block(sino, sidx), sepoch)?;
                    if let Some(b) = &b {
                        for h in BlockRec::decode(b)?.extents() {
                            w.incref(h)?;
                        }
                    }
                    w.put(RecKey::block(dst, didx), b.as_deref())?;
                    Ok(())
                })?;
                drec.size = drec.size.max(o + n);
            } else {
                let data = self.read(src, i, n as u32)?;
                self.buffer(dst, drec.size, o, &data)?;
                drec.size = drec.size.max(o + n);
                // `buffer` needs the size that includes earlier chunks.
                self.dirty.entry(dst).or_default().attr = Some(drec.clone());
            }
            done += n;
        }
        let now = Ts::now();
        drec.mtime = now;
        drec.ctime = now;
        self.dirty.entry(dst).or_default().attr = Some(drec);
        self.flush_inode(dst)?;
        Ok(len)
    }
}

/// Pages of block `idx` below end of file `size`.
fn needed_pages(idx: u64, bs: u64, size: u64) -> usize {
    (size.saturating_sub(idx * bs).min(bs) as usize).div_ceil(PAGE)
}

/// Where the bytes of a block to store come from.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// A whole block, straight from a write request, with its digest if known.
    Bytes(&'a [u8], Option<Digest>),
    /// A buffer, which may hold some pages only.
    Buf(&'a DBlock),
}

/// What a whole block's content comes to: all zeros (stored as a hole), or its
/// blake3 hash.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Digest {
    Zero,
    Hash([u8; 32]),
}

impl Digest {
    /// The digest of a block's bytes.
    pub fn of(data: &[u8]) -> Digest {
        if data.iter().all(|&b| b == 0) {
            Digest::Zero
        } else {
            Digest::Hash(*blake3::hash(data).as_bytes())
        }
    }
}

/// The digests of the whole blocks of `bs` bytes that a write of `data` at `offset`
/// covers, in order. The request threads compute them before taking the core's lock,
/// so that concurrent writes hash on every CPU.
pub fn digest_blocks(bs: u64, offset: u64, data: &[u8]) -> Vec<Digest> {
    let Some(end) = offset.checked_add(data.len() as u64) else {
        return Vec::new();
    };
    (offset.div_ceil(bs)..end / bs)
        .map(|idx| {
            let at = (idx * bs - offset) as usize;
            Digest::of(&data[at..at + bs as usize])
        })
        .collect()
}

/// Blocks to store: index and bytes.
type BlocksIn<'a> = [(u64, Src<'a>)];

/// What [`Inner::read_planned`] returns: the buffer, and the whole extents still to
/// read into it, each with its offset there.
pub type Planned = (Vec<u8>, Vec<(usize, Fetch)>);

/// Runs the fetches of a [`Planned`] read into its buffer, and returns the buffer.
pub fn finish_read((mut out, fetches): Planned) -> FsResult<Vec<u8>> {
    for (at, f) in fetches {
        f.run(&mut out[at..])?;
    }
    Ok(out)
}

/// Where [`Inner::stored_into`] leaves whole extents for later instead of reading
/// them: the list, and the offset in the caller's buffer of the `dst` it was given.
type Later<'a> = Option<(&'a mut Vec<(usize, Fetch)>, usize)>;

/// Stores the buffered blocks and attributes of `d` inside a write.
fn store_dirty(w: &mut Writer<'_>, ino: u64, d: &Dirty, bs: u64) -> FsResult<()> {
    let blocks: Vec<_> = d
        .blocks
        .iter()
        .map(|(idx, b)| (*idx, Src::Buf(b)))
        .collect();
    store_blocks(w, ino, d.attr.as_ref(), &blocks, bs)
}

/// Stores `blocks` of `ino` and its attributes `attr` (if changed) inside a write.
fn store_blocks<'a>(
    w: &mut Writer<'_>,
    ino: u64,
    attr: Option<&InodeRec>,
    blocks: &BlocksIn<'a>,
    bs: u64,
) -> FsResult<()> {
    let size = match attr {
        Some(a) => a.size,
        None => match w.get(RecKey::inode(ino))? {
            Some(b) => InodeRec::decode(&b)?.size,
            None => return Ok(()), // deleted meanwhile
        },
    };
    enum Plan {
        Hole,
        Keep,
        Rec(BlockRec),
    }
    // Phase 1: decide each block's fate and append the new extents. This is the I/O
    // that can fail (a full disk); it fails before any metadata is written, so the
    // operation is refused cleanly and the buffered data stays for a retry.
    let mut plans = Vec::with_capacity(blocks.len());
    let mut staged = Staged::new();
    let most = blocks.len() as u64 * (bs + crate::store::segment::EXTENT_HEADER);
    if !w
        .segs
        .room_for(most)
        .map_err(|e| FsError::Errno(e.raw_os_error().unwrap_or(libc::EIO)))?
    {
        return err(libc::ENOSPC);
    }
    // New extents are appended together once every block is planned; so are new
    // copies of stored extents found damaged (a write of the same bytes repairs them).
    let mut new: Vec<([u8; 32], &[u8])> = Vec::new();
    let mut repair: Vec<([u8; 32], &[u8])> = Vec::new();
    let mut stage = |w: &mut Writer<'_>, data: &'a [u8], hash: [u8; 32]| -> FsResult<[u8; 32]> {
        if staged.contains_key(&hash) || repair.iter().any(|(h, _)| *h == hash) {
            return Ok(hash);
        }
        match w.extent_row(&hash)? {
            None => {
                staged.insert(hash, (0, 0, data.len() as u32));
                new.push((hash, data));
            }
            // Never take a reference to bytes that are not the ones being written.
            Some(rec) => {
                if !w.extent_holds(&hash, &rec, data)? {
                    repair.push((hash, data));
                }
            }
        }
        Ok(hash)
    };
    for &(idx, src) in blocks {
        let n = (size.saturating_sub(idx * bs).min(bs)) as usize;
        let pages = n.div_ceil(PAGE);
        let prev = w.version(RecKey::block(ino, idx))?;
        let old = match &prev {
            Some((_, Some(v))) => Some(BlockRec::decode(v)?),
            _ => None,
        };
        if let Src::Buf(buf) = src
            && !buf.valid.all(pages)
        {
            // Some pages only: a fragment per run of them over the stored block.
            let mut rec = old.unwrap_or(BlockRec {
                hash: [0; 32],
                len: 0,
                frags: Vec::new(),
            });
            for (a, b) in buf.valid.runs(pages, true) {
                let bytes = buf.bytes(a * PAGE..(b * PAGE).min(n));
                let hash = stage(w, bytes, *blake3::hash(bytes).as_bytes())?;
                rec.frags = overlay(&rec.frags, a as u16, (b - a) as u16, hash);
            }
            plans.push((idx, prev, Plan::Rec(rec)));
            continue;
        }
        let (data, digest) = match src {
            Src::Bytes(b, Some(d)) if n == b.len() => (b, d),
            Src::Bytes(b, _) => (&b[..n], Digest::of(&b[..n])),
            Src::Buf(b) => (b.bytes(0..n), Digest::of(b.bytes(0..n))),
        };
        let Digest::Hash(hash) = digest else {
            plans.push((idx, prev, Plan::Hole));
            continue;
        };
        // Unchanged content: keep the stored record (and its reference) as it is,
        // once the stored bytes are known to be these.
        if old.is_some_and(|o| o == BlockRec::whole(hash, n as u32)) {
            stage(w, data, hash)?;
            plans.push((idx, prev, Plan::Keep));
            continue;
        }
        let hash = stage(w, data, hash)?;
        plans.push((idx, prev, Plan::Rec(BlockRec::whole(hash, n as u32))));
    }
    let at = w
        .segs
        .append_many(&new)
        .map_err(|e| FsError::Errno(e.errno()))?;
    for ((hash, data), (seg, off)) in new.iter().zip(at) {
        staged.insert(*hash, (seg, off, data.len() as u32));
    }
    w.store_again(&repair)?;
    // Phase 2: metadata only. References move for all blocks at once: one block may
    // let go of an extent another takes.
    let mut delta = std::collections::HashMap::new();
    for (_, prev, plan) in &plans {
        match plan {
            Plan::Keep => {}
            Plan::Hole => w.block_refs(prev, None, &mut delta)?,
            Plan::Rec(rec) => w.block_refs(prev, Some(rec), &mut delta)?,
        }
    }
    w.apply_refs(delta, &mut staged)?;
    for (idx, prev, plan) in plans {
        match plan {
            Plan::Keep => {}
            Plan::Hole => w.put_block(ino, idx, None, prev)?,
            Plan::Rec(rec) => w.put_block(ino, idx, Some(&rec), prev)?,
        }
    }
    if let Some(a) = attr {
        put_inode(w, ino, a)?;
    }
    Ok(())
}

/// Deletes the live block records of `ino` with index in `range`.
fn drop_blocks(w: &mut Writer<'_>, ino: u64, range: std::ops::RangeInclusive<u64>) -> FsResult<()> {
    let mut idxs = Vec::new();
    w.scan_live(ino, KIND_BLOCK, range, |idx, _, _| {
        idxs.push(idx);
        Ok(true)
    })?;
    for idx in idxs {
        w.put(RecKey::block(ino, idx), None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(at: u16, n: u16, from: u16, h: u8) -> Frag {
        Frag {
            at,
            n,
            from,
            hash: [h; 32],
        }
    }

    #[test]
    fn digests_cover_the_whole_blocks_of_a_write_only() {
        // Blocks of 4 bytes; a write of 13 bytes at 3 covers blocks 1, 2 and 3 whole
        // (bytes 4..16) and block 0 in part.
        let mut data: Vec<u8> = (1..=13).collect();
        data[5..9].fill(0); // block 2 (file bytes 8..12) is all zeros
        let d = digest_blocks(4, 3, &data);
        assert_eq!(
            d,
            vec![
                Digest::Hash(*blake3::hash(&data[1..5]).as_bytes()),
                Digest::Zero,
                Digest::Hash(*blake3::hash(&data[9..13]).as_bytes()),
            ]
        );
        assert!(digest_blocks(4, 5, &data[..2]).is_empty());
        assert_eq!(digest_blocks(4, 0, &[7; 4]).len(), 1);
        // An offset whose end overflows gets no digests (the write refuses it).
        assert!(digest_blocks(4, u64::MAX - 5, &data).is_empty());
    }

    #[test]
    fn a_fragment_cuts_the_ones_under_it() {
        let old = vec![frag(0, 4, 0, 1), frag(6, 2, 0, 2)];
        let new = overlay(&old, 2, 5, [3; 32]);
        assert_eq!(
            new,
            vec![frag(0, 2, 0, 1), frag(2, 5, 0, 3), frag(7, 1, 1, 2)]
        );
        // Inside one: both ends stay, the far one shifted into its extent.
        let new = overlay(&[frag(0, 8, 0, 1)], 3, 2, [4; 32]);
        assert_eq!(
            new,
            vec![frag(0, 3, 0, 1), frag(3, 2, 0, 4), frag(5, 3, 5, 1)]
        );
        let rec = BlockRec {
            hash: [9; 32],
            len: 65536,
            frags: new,
        };
        // The split extent is named twice, and references count namings.
        assert_eq!(rec.extents().filter(|h| **h == [1; 32]).count(), 2);
        let mut b = Vec::new();
        rec.encode(&mut b);
        assert_eq!(BlockRec::decode(&b).unwrap(), rec);
    }

    #[test]
    fn pieces_name_the_source_of_every_byte() {
        let rec = BlockRec {
            hash: [9; 32],
            len: 65536,
            frags: vec![frag(1, 1, 0, 1), frag(3, 2, 4, 2)],
        };
        let p = rec.pieces(100, 5 * PAGE + 10);
        type Named = (usize, usize, Option<(u8, usize)>);
        let got: Vec<Named> = p
            .iter()
            .map(|(o, l, s)| (*o, *l, s.map(|(h, e)| (h[0], e))))
            .collect();
        assert_eq!(
            got,
            vec![
                (100, PAGE - 100, None),
                (PAGE, PAGE, Some((1, 0))),
                (2 * PAGE, PAGE, None),
                (3 * PAGE, 2 * PAGE, Some((2, 4 * PAGE))),
                (5 * PAGE, 10, None),
            ]
        );
    }

    #[test]
    fn page_sets_find_their_runs() {
        let mut p = Pages::default();
        p.set_range(1, 3);
        p.set_range(70, 72);
        assert_eq!(p.runs(100, true), vec![(1, 3), (70, 72)]);
        assert_eq!(p.runs(4, false), vec![(0, 1), (3, 4)]);
        assert!(!p.all(3));
        p.set_range(0, 1);
        assert!(p.all(3));
        assert_eq!(p.groups(2, 5), vec![(2, 3, true), (3, 5, false)]);
    }
}
