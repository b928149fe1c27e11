//! File data: buffered writes, block reads, flush to extents, truncate, fallocate,
//! SEEK_DATA/SEEK_HOLE and extent-sharing copy_file_range.
//!
//! A file is a sequence of `block_size` logical blocks. Block `i` is stored as the
//! extent of its bytes (a short tail block as a short extent); a block of zeros or a
//! block never written is a hole and stores nothing. Writes land in [`super::Dirty`]
//! buffers of whole blocks and reach the store on flush.

use super::*;
use crate::store::{newest, visible};

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

    /// The bytes of block `idx` of `ino` (dirty or stored), `None` for a hole. A stored
    /// block may be shorter than a block.
    fn block(&mut self, ino: u64, idx: u64) -> FsResult<Option<Vec<u8>>> {
        self.block_at(self.store.live_epoch, ino, idx)
    }

    /// Block `idx` of `ino` in the tree at `epoch` (buffered data only in the live tree).
    fn block_at(&mut self, epoch: u64, ino: u64, idx: u64) -> FsResult<Option<Vec<u8>>> {
        if epoch == self.store.live_epoch
            && let Some(b) = self.dirty.get(&ino).and_then(|d| d.blocks.get(&idx))
        {
            return Ok(Some(b.clone()));
        }
        self.stored_block_at(epoch, ino, idx)
    }

    fn stored_block(&mut self, ino: u64, idx: u64) -> FsResult<Option<Vec<u8>>> {
        self.stored_block_at(self.store.live_epoch, ino, idx)
    }

    fn stored_block_at(&mut self, epoch: u64, ino: u64, idx: u64) -> FsResult<Option<Vec<u8>>> {
        self.stored_range_at(epoch, ino, idx, 0, usize::MAX)
    }

    /// Bytes `[start, end)` of stored block `idx` (fewer if the block is short), `None`
    /// for a hole.
    fn stored_range_at(
        &mut self,
        epoch: u64,
        ino: u64,
        idx: u64,
        start: usize,
        end: usize,
    ) -> FsResult<Option<Vec<u8>>> {
        let (hash, ext) = {
            let txn = self.store.read_txn()?;
            let t = txn.open_table(VERSIONS).map_err(StoreError::from)?;
            let b = match visible(&t, RecKey::block(ino, idx), epoch)? {
                Some(b) => BlockRec::decode(&b)?,
                None => return Ok(None),
            };
            let e = txn.open_table(EXTENTS).map_err(StoreError::from)?;
            let ext = match redb::ReadableTable::get(&e, b.hash).map_err(StoreError::from)? {
                Some(v) => ExtentRec::decode(v.value())?,
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "block {idx} of inode {ino} names a missing extent"
                    ))
                    .into());
                }
            };
            (b.hash, ext)
        };
        Ok(Some(self.store.read_extent_range(&hash, &ext, start, end)?))
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&mut self, fino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (epoch, ino) = self.at(fino)?;
        let rec = self.inode_at(epoch, ino)?;
        if rec.kind == FileKind::Dir {
            return err(libc::EISDIR);
        }
        if offset >= rec.size {
            return Ok(Vec::new());
        }
        let end = rec.size.min(offset + size as u64);
        let bs = self.bs();
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let within = (pos % bs) as usize;
            let n = ((bs - within as u64).min(end - pos)) as usize;
            let dst = &mut out[(pos - offset) as usize..][..n];
            let dirty = (epoch == self.store.live_epoch)
                .then(|| self.dirty.get(&ino).and_then(|d| d.blocks.get(&idx)))
                .flatten();
            if let Some(b) = dirty {
                dst.copy_from_slice(&b[within..within + n]);
            } else if let Some(b) = self.stored_range_at(epoch, ino, idx, within, within + n)? {
                // A short (tail) extent yields fewer bytes; the rest stays zero.
                dst[..b.len()].copy_from_slice(&b);
            }
            pos += n as u64;
        }
        Ok(out)
    }

    /// Writes `data` at `offset` (at the end of file for an O_APPEND handle); returns
    /// the bytes written.
    pub fn write(&mut self, fh: u64, ino: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let ino = live(ino)?;
        let append = matches!(
            self.handles.get(&fh),
            Some(Handle::File { append: true, .. })
        );
        let mut rec = self.inode(ino)?;
        if rec.kind != FileKind::File {
            return err(libc::EINVAL);
        }
        let offset = if append { rec.size } else { offset };
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        self.buffer(ino, &rec, offset, data)?;
        let now = Ts::now();
        rec.size = rec.size.max(end);
        rec.mtime = now;
        rec.ctime = now;
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

    /// Copies `data` into dirty block buffers of `ino` at `offset`.
    fn buffer(&mut self, ino: u64, rec: &InodeRec, offset: u64, data: &[u8]) -> FsResult<()> {
        let bs = self.bs();
        let mut pos = offset;
        let end = offset + data.len() as u64;
        while pos < end {
            let idx = pos / bs;
            let within = (pos % bs) as usize;
            let n = ((bs - within as u64).min(end - pos)) as usize;
            let have = self
                .dirty
                .get(&ino)
                .is_some_and(|d| d.blocks.contains_key(&idx));
            let chunk = &data[(pos - offset) as usize..][..n];
            if !have && n as u64 == bs {
                // A whole block: take the bytes as they are, nothing to merge.
                self.dirty
                    .entry(ino)
                    .or_default()
                    .blocks
                    .insert(idx, chunk.to_vec());
                self.dirty_bytes += bs as usize;
                pos += n as u64;
                continue;
            }
            if !have {
                let mut buf = if idx * bs >= rec.size {
                    Vec::new()
                } else {
                    self.stored_block(ino, idx)?.unwrap_or_default()
                };
                buf.resize(bs as usize, 0);
                self.dirty.entry(ino).or_default().blocks.insert(idx, buf);
                self.dirty_bytes += bs as usize;
            }
            let buf = self
                .dirty
                .get_mut(&ino)
                .and_then(|d| d.blocks.get_mut(&idx))
                .expect("inserted above");
            buf[within..within + n].copy_from_slice(chunk);
            pos += n as u64;
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
        let Some(d) = self.dirty.remove(&ino) else {
            return Ok(());
        };
        let bs = self.bs();
        self.dirty_bytes -= d.blocks.len() * bs as usize;
        let res = self.store.write(false, |w| store_dirty(w, ino, &d, bs));
        if res.is_err() {
            // Keep the data buffered so a later flush can retry (e.g. after ENOSPC).
            self.dirty_bytes += d.blocks.len() * bs as usize;
            self.dirty.insert(ino, d);
        }
        self.undurable = true;
        res
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
                    b.resize(bs as usize, 0);
                    b[within..].fill(0);
                    if !self
                        .dirty
                        .get(&ino)
                        .is_some_and(|d| d.blocks.contains_key(&idx))
                    {
                        self.dirty_bytes += bs as usize;
                    }
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
        let ino = live(ino)?;
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
                self.buffer(ino, rec, s, &zeros)?;
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
        let t = txn.open_table(VERSIONS).map_err(StoreError::from)?;
        let mut expect = first;
        let mut found = None;
        scan_visible(
            &t,
            ino,
            KIND_BLOCK,
            first..=last,
            epoch,
            |idx, _, _| match whence {
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
        let dst = live(dst)?;
        let srec = self.inode_at(sepoch, sino)?;
        let drec = self.inode(dst)?;
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
                self.store.write(false, |w| {
                    let b = visible(&w.versions, RecKey::block(sino, sidx), sepoch)?;
                    if let Some(b) = &b {
                        w.incref(&BlockRec::decode(b)?.hash)?;
                    }
                    w.put(RecKey::block(dst, didx), b.as_deref())?;
                    Ok(())
                })?;
                drec.size = drec.size.max(o + n);
            } else {
                let data = self.read(src, i, n as u32)?;
                self.buffer(dst, &drec, o, &data)?;
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

/// Stores buffered blocks and attributes inside a write.
fn store_dirty(w: &mut Writer<'_>, ino: u64, d: &Dirty, bs: u64) -> FsResult<()> {
    let size = match &d.attr {
        Some(a) => a.size,
        None => match w.get(RecKey::inode(ino))? {
            Some(b) => InodeRec::decode(&b)?.size,
            None => return Ok(()), // deleted meanwhile
        },
    };
    enum Plan {
        Hole,
        Keep,
        Extent([u8; 32], u32),
    }
    // Phase 1: decide each block's fate and append the new extents. This is the I/O
    // that can fail (a full disk); it fails before any metadata is written, so the
    // operation is refused cleanly and the buffered data stays for a retry.
    let mut plans = Vec::with_capacity(d.blocks.len());
    let mut staged = std::collections::HashMap::new();
    let most = d.blocks.len() as u64 * (bs + crate::store::segment::EXTENT_HEADER);
    if !w
        .segs
        .room_for(most)
        .map_err(|e| FsError::Errno(e.raw_os_error().unwrap_or(libc::EIO)))?
    {
        return err(libc::ENOSPC);
    }
    for (&idx, buf) in &d.blocks {
        let start = idx * bs;
        let n = if start >= size {
            0
        } else {
            ((size - start).min(bs)) as usize
        };
        let data = &buf[..n];
        if n == 0 || data.iter().all(|&b| b == 0) {
            plans.push((idx, Plan::Hole));
            continue;
        }
        let hash = *blake3::hash(data).as_bytes();
        // Unchanged content: keep the stored record (and its reference) as it is.
        if let Some(old) =
            newest(&w.versions, RecKey::block(ino, idx), w.live)?.and_then(|(_, v)| v)
        {
            let old = BlockRec::decode(&old)?;
            if old.len as usize == n && old.hash == hash {
                plans.push((idx, Plan::Keep));
                continue;
            }
        }
        if !staged.contains_key(&hash) && redb::ReadableTable::get(w.extents()?, hash)?.is_none() {
            let at = w
                .segs
                .append(&hash, data)
                .map_err(|e| FsError::Errno(e.errno()))?;
            staged.insert(hash, at);
        }
        plans.push((idx, Plan::Extent(hash, n as u32)));
    }
    // Phase 2: metadata only.
    for (idx, plan) in plans {
        match plan {
            Plan::Keep => {}
            Plan::Hole => w.put(RecKey::block(ino, idx), None)?,
            Plan::Extent(hash, len) => {
                let rec = w.put_staged_extent(hash, len, &mut staged)?;
                let mut b = Vec::with_capacity(36);
                rec.encode(&mut b);
                w.put(RecKey::block(ino, idx), Some(&b))?;
            }
        }
    }
    if let Some(a) = &d.attr {
        put_inode(w, ino, a)?;
    }
    Ok(())
}

/// Deletes the live block records of `ino` with index in `range`.
fn drop_blocks(w: &mut Writer<'_>, ino: u64, range: std::ops::RangeInclusive<u64>) -> FsResult<()> {
    let mut idxs = Vec::new();
    scan_visible(&w.versions, ino, KIND_BLOCK, range, w.live, |idx, _, _| {
        idxs.push(idx);
        Ok(true)
    })?;
    for idx in idxs {
        w.put(RecKey::block(ino, idx), None)?;
    }
    Ok(())
}
