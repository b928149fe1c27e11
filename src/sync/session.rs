//! The two ends of a sync session over the wire format: the source, which reads a
//! store no daemon holds and sends the snapshots the destination lacks, and the
//! sink, which receives them into a store no daemon holds.
//!
//! The source sends a snapshot as the records that differ between the base (the
//! newest snapshot both hold) and it, found through the change index (a whole send
//! has no base: every record visible in the snapshot). Records go in batches; the
//! sink answers each with the extents it names that the sink lacks, and the source
//! sends those before its next batch (the pull rides on the push). At the barrier
//! the sink applies what is left and takes the snapshot in one durable commit; only
//! then does it answer `Committed`. An interrupted session leaves no snapshot of what
//! it sent; the replica's live tree may be part-applied, and the next session starts
//! from the base again (rolled back to it), or from an emptied tree.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;

use redb::ReadableTable as _;

use super::wire::{
    Frame, FrameReader, FrameWriter, Record, SnapRef, VERSION, WireError, constant_eq, proof,
    session_key,
};
use crate::store::schema::*;
use crate::store::snapshots::for_each_changed;
use crate::store::{ReadOnlyStore, RecKey, Store, StoreConfig};

/// Records per batch, at most.
const BATCH_RECORDS: usize = 4096;
/// Bytes of records per batch, about (a frame may hold 8 MiB).
const BATCH_BYTES: usize = 1 << 20;
/// Snapshots a dry run may announce, at most.
const MAX_PLANS: u64 = 1 << 16;
/// Bytes of extents a sink receives between durable commits: what an interrupted
/// session may have to receive again.
const RESUME_POINT: u64 = 8 << 20;

/// The store a sink receives into, reached one step at a time: the sink's own, or
/// the one a mounted daemon holds (whose FUSE threads go on between the steps).
pub trait SinkStore {
    /// Runs one step on the store (an error when the store is going away).
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Store) -> Result<T, SyncError>,
    ) -> Result<T, SyncError>;
    /// A snapshot was received: a mounted replica shows it now.
    fn committed(&mut self) {}
    /// Snapshots were renamed (a demoted store's own, kept aside): a mounted
    /// store's kernel forgets the old names.
    fn renamed(&mut self, _old: &[String]) {}
    /// The source has proven the key: the sink may now take what only one session
    /// may hold at a time (an error when it cannot, in time).
    fn admit(&mut self) -> Result<(), SyncError> {
        Ok(())
    }
}

impl SinkStore for Store {
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Store) -> Result<T, SyncError>,
    ) -> Result<T, SyncError> {
        f(self)
    }
}

/// Errors of a sync session.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The stream broke a rule, or the transport failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A store could not be read or written.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The other side said why it stopped.
    #[error("the other side stopped: {0}")]
    Remote(String),
    /// The stream is well formed but not what the protocol allows here.
    #[error("{0}")]
    Protocol(String),
    /// The other side went away without a word: the cause is on its side (or in
    /// the transport), and is not told back.
    #[error("the other side closed the connection")]
    Closed,
}

impl From<crate::store::OpError> for SyncError {
    fn from(e: crate::store::OpError) -> Self {
        SyncError::Store(e.into())
    }
}

impl From<redb::StorageError> for SyncError {
    fn from(e: redb::StorageError) -> Self {
        SyncError::Store(e.into())
    }
}

impl From<redb::TableError> for SyncError {
    fn from(e: redb::TableError) -> Self {
        SyncError::Store(e.into())
    }
}

fn protocol(msg: impl Into<String>) -> SyncError {
    SyncError::Protocol(msg.into())
}

/// What a session moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Snapshots sent (or received) and committed.
    pub snapshots: Vec<String>,
    /// Records sent.
    pub records: u64,
    /// Extents sent.
    pub extents: u64,
    /// Bytes of extent data sent.
    pub payload_bytes: u64,
    /// Bytes on the wire, both directions, headers and MACs included.
    pub wire_bytes: u64,
    /// The destination store's volume id (as it said).
    pub dest_volume: Option<[u8; 16]>,
    /// The newest snapshot both sides hold at the end.
    pub base: Option<String>,
    /// What the source said each snapshot would take (before sending it, or instead
    /// on a dry run): name, records, extents, bytes at most.
    pub planned: Vec<(String, u64, u64, u64)>,
    /// Nothing was sent: the session only said what it would send.
    pub dry_run: bool,
}

impl Summary {
    /// The record of this session, ended now.
    pub fn record(&self) -> SyncRec {
        SyncRec {
            at: Ts::now(),
            snapshots: self.snapshots.len() as u32,
            payload: self.payload_bytes,
            wire: self.wire_bytes,
            base: self.base.clone().unwrap_or_default(),
        }
    }
}

/// Reads the next frame; the end of the stream or an `Error` frame is an error here.
pub(crate) fn expect<R: Read>(r: &mut FrameReader<R>) -> Result<Frame, SyncError> {
    match r.read_frame()? {
        Some(Frame::Error { message }) => Err(SyncError::Remote(message)),
        Some(f) => Ok(f),
        None => Err(SyncError::Closed),
    }
}

fn snap_ref(name: &str, rec: &SnapshotRec) -> SnapRef {
    SnapRef {
        name: name.to_string(),
        created_sec: rec.created.sec,
        created_nsec: rec.created.nsec,
    }
}

/// Sends the snapshots of the store at `src` that the sink lacks (only `only`, if
/// given), oldest first, each as an incremental from the newest one both hold. The
/// destination's cursor is recorded in the store unless `one_off` (or `dry_run`).
pub fn send<R: Read, W: Write>(
    src: &Path,
    only: Option<&str>,
    dry_run: bool,
    one_off: bool,
    key: Option<[u8; 32]>,
    mut r: FrameReader<R>,
    mut w: FrameWriter<W>,
) -> Result<Summary, SyncError> {
    let res = (|| {
        let mut ro = retry_locked(|| ReadOnlyStore::open(src, false))?;
        let txn = ro.begin_read()?;
        send_inner(&txn, &mut ro.segs, None, only, dry_run, key, &mut r, &mut w)
    })();
    tell_peer(&mut w, &res);
    let sum = res?;
    // The destination's cursor and the hold on its base, in the store now free to
    // be written.
    if let Some(dest) = sum.dest_volume.filter(|_| !dry_run && !one_off) {
        let mut store = retry_locked(|| Store::open(src, None))?;
        if let Some(old) = store.record_sent(&dest, &sum.record())?
            && store.is_deleting(old)?
            && !store.is_held(old)?
        {
            store.drop_epoch(old, false)?;
        }
    }
    Ok(sum)
}

/// [`send`] from a frozen view of a mounted store, taken by its daemon; stops when
/// the store is unmounted.
pub fn send_frozen<R: Read, W: Write>(
    view: &mut crate::store::Frozen,
    only: Option<&str>,
    dry_run: bool,
    key: Option<[u8; 32]>,
    mut r: FrameReader<R>,
    mut w: FrameWriter<W>,
) -> Result<Summary, SyncError> {
    let cancel = view.cancel_flag();
    let res = send_inner(
        &view.txn,
        &mut view.segs,
        Some(&cancel),
        only,
        dry_run,
        key,
        &mut r,
        &mut w,
    );
    tell_peer(&mut w, &res);
    res
}

/// The snapshot hold `sync-DEST` keeps after it was deleted here, under the name it
/// had (the `sent_to:` row's base): what a session to that destination may start
/// from.
fn kept_base(
    txn: &redb::ReadTransaction,
    dest_hex: &str,
) -> Result<Option<(String, SnapshotRec)>, SyncError> {
    let meta_t = txn.open_table(META)?;
    let row = format!("{}{dest_hex}", meta::SENT_TO);
    let Some(raw) = read_meta(&meta_t, &row)? else {
        return Ok(None);
    };
    let base = SyncRec::decode(&row, &raw)?.base;
    let hold = format!("sync-{dest_hex}");
    let Some(h) = txn.open_table(HOLDS)?.get(hold.as_str())? else {
        return Ok(None);
    };
    let epoch = HoldRec::decode(&hold, h.value())?.epoch;
    let key = crate::store::snapshots::deleted_key(epoch);
    let Some(v) = txn.open_table(SNAPSHOTS)?.get(key.as_str())? else {
        return Ok(None);
    };
    let rec = SnapshotRec::decode(&key, v.value())?;
    Ok((!base.is_empty()).then_some((base, rec)))
}

/// Ends the sending of snapshot `name`: the barrier, then the destination's word
/// that it committed it.
pub(crate) fn barrier<R: Read, W: Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    name: &str,
) -> Result<(), SyncError> {
    w.send(&Frame::Barrier)?;
    w.flush()?;
    match expect(r)? {
        Frame::Committed { name: n } if n == name => Ok(()),
        f => Err(protocol(format!(
            "expected the commit of {name}, got {}",
            super::wire::type_name(f.encode().0)
        ))),
    }
}

/// Tells the other side why this side stopped, if it still listens.
pub(crate) fn tell_peer<W: Write>(w: &mut FrameWriter<W>, res: &Result<Summary, SyncError>) {
    if let Err(e) = res
        && !matches!(
            e,
            SyncError::Remote(_) | SyncError::Closed | SyncError::Wire(WireError::Io(_))
        )
    {
        let _ = w.send(&Frame::Error {
            message: e.to_string(),
        });
        let _ = w.flush();
    }
}

#[allow(clippy::too_many_arguments)]
fn send_inner<R: Read, W: Write>(
    txn: &redb::ReadTransaction,
    segs: &mut crate::store::segment::Segments,
    cancel: Option<&std::sync::atomic::AtomicBool>,
    only: Option<&str>,
    dry_run: bool,
    key: Option<[u8; 32]>,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
) -> Result<Summary, SyncError> {
    let stopped = || cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed));
    let meta_t = txn.open_table(META)?;
    let volume: [u8; 16] = read_meta_as(&meta_t, meta::VOLUME_ID, |b| {
        b.try_into()
            .map_err(|_| crate::store::StoreError::Corrupt("volume id".into()))
    })?;
    let block_size = read_meta_as(&meta_t, meta::BLOCK_SIZE, le_u32)?;
    let origin = crate::store::role::origin_of(&meta_t)?.unwrap_or(volume);
    let succeeds = crate::store::role::promotion_of(&meta_t)?.map_or([0; 16], |p| p.origin);
    let writer = crate::store::role::writer_of(&meta_t)?.unwrap_or(volume);
    let mut snaps: Vec<(String, SnapshotRec)> = Vec::new();
    for row in txn.open_table(SNAPSHOTS)?.iter()? {
        let (k, v) = row?;
        let rec = SnapshotRec::decode(k.value(), v.value())?;
        if rec.flags & SNAP_DELETED == 0 {
            snaps.push((k.value().to_string(), rec));
        }
    }
    snaps.sort_by_key(|(_, r)| r.epoch);
    if let Some(name) = only
        && !snaps.iter().any(|(n, _)| n == name)
    {
        return Err(protocol(format!(
            "the source has no snapshot named {name:?}"
        )));
    }
    let nonce = random_nonce();
    let hello = Frame::Hello {
        version: VERSION,
        volume,
        origin,
        succeeds,
        writer,
        block_size,
        nonce,
        dry_run,
    };
    let hello_body = hello.encode().1;
    w.send(&hello)?;
    w.flush()?;
    let (their_proof, their_nonce) = match expect(r)? {
        Frame::Welcome {
            version,
            proof,
            nonce: n,
        } => {
            if version != VERSION {
                return Err(protocol(format!(
                    "the destination speaks sync version {version}, this snapfs {VERSION}"
                )));
            }
            (proof, n)
        }
        f => return Err(protocol(format!("expected welcome, got {f:?}"))),
    };
    match key {
        Some(k) => {
            if !constant_eq(&their_proof, &proof(&k, &nonce, "sink", &hello_body)) {
                return Err(protocol(
                    "the destination does not prove the key: a wrong key, or not the server meant",
                ));
            }
            w.send(&Frame::Proof {
                proof: proof(&k, &their_nonce, "source", &hello_body),
            })?;
            w.flush()?;
            let sk = session_key(&k, &nonce, &their_nonce);
            w.set_key(sk);
            r.set_key(sk);
        }
        None => {
            w.send(&Frame::Proof { proof: [0; 32] })?;
            w.flush()?;
        }
    }
    let mut sum = Summary::default();
    let held = match expect(r)? {
        Frame::Holding { volume, snapshots } => {
            sum.dest_volume = Some(volume);
            snapshots
        }
        f => {
            return Err(protocol(format!(
                "expected the destination's snapshots, got {f:?}"
            )));
        }
    };
    // A snapshot deleted here while it was this destination's base is kept (by the
    // destination's hold) under a hidden name: under its own name again, it may be
    // the base, and it is never sent.
    let dest_hex = crate::store::hex(sum.dest_volume.as_ref().expect("set above"));
    let kept_base = kept_base(txn, &dest_hex)?;
    if let Some((name, rec)) = &kept_base
        && !snaps.iter().any(|(n, _)| n == name)
    {
        let at = snaps.partition_point(|(_, r)| r.epoch < rec.epoch);
        snaps.insert(at, (name.clone(), *rec));
    }
    let deleted = |rec: &SnapshotRec| rec.flags & SNAP_DELETED != 0;
    // The base: the newest snapshot both hold (same name, same creation time).
    let holds = |n: &str, rec: &SnapshotRec| held.iter().any(|h| *h == snap_ref(n, rec));
    let mut base = snaps.iter().rposition(|(n, rec)| holds(n, rec));
    let versions = txn.open_table(VERSIONS)?;
    let changes = txn.open_table(CHANGES)?;
    let extents = txn.open_table(EXTENTS)?;
    if let Some(name) = only
        && let Some(i) = snaps.iter().position(|(n, _)| n == name)
        && base.is_some_and(|b| i <= b)
        && !holds(name, &snaps[i].1)
    {
        return Err(protocol(format!(
            "{name:?} is older than {:?}, the newest snapshot the destination holds: a replica only receives newer snapshots",
            snaps[base.expect("checked")].0
        )));
    }
    // Extents the destination lost, sent so far.
    let mut repaired: HashSet<[u8; 32]> = HashSet::new();
    let todo: Vec<usize> = (base.map_or(0, |b| b + 1)..snaps.len())
        .filter(|&i| only.is_none_or(|n| snaps[i].0 == n) && !deleted(&snaps[i].1))
        .collect();
    for i in todo {
        let (name, rec) = &snaps[i];
        // The records that differ between the base and this snapshot, in batches,
        // made twice from this read transaction (once for the plan, once to send)
        // and never all held at once: a whole volume's records need not fit in
        // memory (an incremental holds the identities written since the base).
        let from = base.map(|b| snaps[b].1.epoch);
        let each_batch = |f: &mut dyn FnMut(Vec<Record>) -> Result<(), SyncError>| {
            let mut batcher = Batcher::default();
            // The walk calls back with each record; a batch it closes goes to `f`,
            // whose error (or an unmount) stops the walk and is the one returned.
            let mut failed: Option<SyncError> = None;
            let mut take = |rec: Record| {
                let Some(full) = batcher.push(rec) else {
                    return Ok(());
                };
                let res = if stopped() {
                    Err(protocol("the source store is being unmounted"))
                } else {
                    f(full)
                };
                res.map_err(|e| {
                    failed = Some(e);
                    crate::store::StoreError::Corrupt(String::new())
                })
            };
            let res = match from {
                Some(from) => for_each_changed(&changes, &versions, from, rec.epoch, |c| {
                    take(Record {
                        ino: c.ino,
                        kind: c.kind,
                        sub: c.sub,
                        name: c.name,
                        payload: c.after,
                    })
                }),
                None => crate::store::for_each_visible(
                    &versions,
                    rec.epoch,
                    |ino, kind, sub, name, p| {
                        take(Record {
                            ino,
                            kind,
                            sub,
                            name: name.to_vec(),
                            payload: Some(p.to_vec()),
                        })
                    },
                ),
            };
            if let Some(e) = failed {
                return Err(e);
            }
            res?;
            f(batcher.finish())
        };
        // What it takes: the plan comes first (the progress shown), or alone. A dry
        // run counts each extent once and looks up its length; a real one counts
        // each extent once per batch, by what the records name of it, as the relay
        // counts the batches and their acknowledgements.
        let mut count = 0u64;
        let (mut n, mut bytes) = (0u64, 0u64);
        if dry_run {
            let mut named: HashSet<[u8; 32]> = HashSet::new();
            each_batch(&mut |chunk| {
                count += chunk.len() as u64;
                for rec in &chunk {
                    if let (KIND_BLOCK, Some(p)) = (rec.kind, &rec.payload) {
                        named.extend(BlockRec::decode(p)?.extents().copied());
                    }
                }
                Ok(())
            })?;
            for h in &named {
                if let Some(row) = extents.get(*h)? {
                    bytes += ExtentRec::decode(h, row.value())?.len as u64;
                }
            }
            n = named.len() as u64;
        } else {
            each_batch(&mut |chunk| {
                count += chunk.len() as u64;
                let mut seen = HashSet::new();
                for rec in &chunk {
                    first_namings(rec, &mut seen, |_, len| {
                        n += 1;
                        bytes += len;
                    })?;
                }
                Ok(())
            })?;
        }
        w.send(&Frame::Plan {
            snapshot: snap_ref(name, rec),
            records: count,
            extents: n,
            bytes,
        })?;
        if dry_run {
            sum.planned.push((name.clone(), count, n, bytes));
            base = Some(i);
            continue;
        }
        w.send(&Frame::Begin {
            snapshot: snap_ref(name, rec),
            base: base.map(|b| snaps[b].0.clone()),
        })?;
        sum.records += count;
        let mut next_batch = 0u64;
        each_batch(&mut |chunk| {
            if stopped() {
                return Err(protocol("the source store is being unmounted"));
            }
            let batch = next_batch;
            next_batch += 1;
            // What the sink may ask for: the extents this batch names, nothing else.
            let mut named: HashSet<[u8; 32]> = HashSet::new();
            for rec in &chunk {
                if let (KIND_BLOCK, Some(p)) = (rec.kind, &rec.payload) {
                    named.extend(BlockRec::decode(p)?.extents().copied());
                }
            }
            w.send(&Frame::Records {
                batch,
                records: chunk,
            })?;
            w.flush()?;
            let missing = match expect(r)? {
                Frame::Ack { batch: b, missing } if b == batch => missing,
                f => {
                    return Err(protocol(format!(
                        "expected ack of batch {batch}, got {f:?}"
                    )));
                }
            };
            for hash in missing {
                if stopped() {
                    return Err(protocol("the source store is being unmounted"));
                }
                // An extent the batch names must be here; one it does not name is
                // one the destination lost (a replica may have any of the volume's
                // data), sent if this store has it, once.
                let row = if named.remove(&hash) {
                    extents.get(hash)?.ok_or_else(|| {
                        protocol(format!(
                            "the destination asks for extent {} that this store does not have",
                            crate::store::hex(&hash)
                        ))
                    })?
                } else if !repaired.insert(hash) {
                    return Err(protocol(format!(
                        "the destination asks for extent {} twice",
                        crate::store::hex(&hash)
                    )));
                } else {
                    match extents.get(hash)? {
                        Some(row) => row,
                        None => {
                            tracing::debug!(extent = %crate::store::hex(&hash), "sync: a lost extent this store lacks too");
                            continue;
                        }
                    }
                };
                let ext = ExtentRec::decode(&hash, row.value())?;
                let data = match segs.read(ext.segment, ext.offset, ext.len) {
                    Ok(d) => d,
                    // A lost extent this store cannot read either: not this
                    // session's to fail for.
                    Err(e) if repaired.contains(&hash) => {
                        tracing::warn!(extent = %crate::store::hex(&hash), error = %e, "sync: a lost extent the destination asks for cannot be read here");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                // Never send bytes that are not the extent's.
                if *blake3::hash(&data).as_bytes() != hash {
                    if repaired.contains(&hash) {
                        tracing::warn!(extent = %crate::store::hex(&hash), "sync: a lost extent the destination asks for is damaged here too");
                        continue;
                    }
                    return Err(SyncError::Store(crate::store::StoreError::Corrupt(
                        format!(
                            "extent {} in segment {} at {} does not match its hash",
                            crate::store::hex(&hash),
                            ext.segment,
                            ext.offset
                        ),
                    )));
                }
                sum.extents += 1;
                sum.payload_bytes += data.len() as u64;
                w.send(&Frame::Extent { hash, data })?;
            }
            Ok(())
        })?;
        barrier(r, w, name)?;
        tracing::info!(snapshot = %name, "snapshot sent");
        sum.snapshots.push(name.clone());
        base = Some(i);
    }
    w.send(&Frame::Done)?;
    w.flush()?;
    sum.wire_bytes = w.wire_bytes + r.wire_bytes;
    sum.base = base.map(|b| snaps[b].0.clone());
    Ok(sum)
}

/// Receives snapshots into the store at `dest` (made when missing), which must be
/// empty or a replica of the sending volume.
pub fn receive<R: Read, W: Write>(
    dest: &Path,
    key: Option<[u8; 32]>,
    r: FrameReader<R>,
    w: FrameWriter<W>,
) -> Result<Summary, SyncError> {
    receive_watched(dest, key, r, w, None)
}

/// [`receive`], setting `proven` once the source has proven the key (a watchdog
/// ends a connection that has not done so in time).
pub fn receive_watched<R: Read, W: Write>(
    dest: &Path,
    key: Option<[u8; 32]>,
    mut r: FrameReader<R>,
    mut w: FrameWriter<W>,
    proven: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Summary, SyncError> {
    let res = receive_inner(dest, key, &mut r, &mut w, proven);
    tell_peer(&mut w, &res);
    res
}

fn receive_inner<R: Read, W: Write>(
    dest: &Path,
    key: Option<[u8; 32]>,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    proven: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Summary, SyncError> {
    let hello = handshake(key, r, w, proven)?;
    let cfg = StoreConfig {
        block_size: hello.block_size,
    };
    let fresh = !Store::exists(dest);
    if hello.dry_run && fresh {
        // Nothing is made for a dry run: a destination to be holds nothing.
        w.send(&Frame::Holding {
            volume: [0; 16],
            snapshots: Vec::new(),
        })?;
        w.flush()?;
        return dry_session(r);
    }
    let mut store = retry_locked(|| Store::open(dest, Some(&cfg)))?;
    accept(&mut store, fresh, &hello, r, w)
}

/// `records` in batches of a bounded count and size (one, empty, for none).
pub(crate) fn batches(records: Vec<Record>) -> Vec<Vec<Record>> {
    let mut out = Vec::new();
    let mut batcher = Batcher::default();
    for rec in records {
        out.extend(batcher.push(rec));
    }
    out.push(batcher.finish());
    out
}

/// Records cut into batches of a bounded count and size as they come.
#[derive(Default)]
pub(crate) struct Batcher {
    batch: Vec<Record>,
    bytes: usize,
}

impl Batcher {
    /// Adds `rec`; the batch it closed, if it did.
    pub(crate) fn push(&mut self, rec: Record) -> Option<Vec<Record>> {
        let n = 32 + rec.name.len() + rec.payload.as_ref().map_or(0, Vec::len);
        let full = (!self.batch.is_empty()
            && (self.batch.len() >= BATCH_RECORDS || self.bytes + n > BATCH_BYTES))
            .then(|| {
                self.bytes = 0;
                std::mem::take(&mut self.batch)
            });
        self.bytes += n;
        self.batch.push(rec);
        full
    }

    /// The last batch (empty if no record came).
    pub(crate) fn finish(self) -> Vec<Record> {
        self.batch
    }
}

/// The extents `rec` (a block record; others name none) names that are not in
/// `seen` yet, each with the bytes the record names of it (a base its length, a
/// fragment its pages), added to `seen`: how the source's plan and the relay's
/// progress count a batch's extents, each once, the same way.
pub fn first_namings(
    rec: &Record,
    seen: &mut HashSet<[u8; 32]>,
    mut f: impl FnMut(&[u8; 32], u64),
) -> Result<(), crate::store::StoreError> {
    let (KIND_BLOCK, Some(p)) = (rec.kind, &rec.payload) else {
        return Ok(());
    };
    let b = BlockRec::decode(p)?;
    let base = b.base_extent().map(|(h, n)| (h, n as u64));
    let frags = b
        .frags
        .iter()
        .map(|fr| (&fr.hash, fr.n as u64 * PAGE as u64));
    for (h, len) in base.into_iter().chain(frags) {
        if seen.insert(*h) {
            f(h, len);
        }
    }
    Ok(())
}

/// Receives into the store a mounted daemon holds (`st`), over a connection whose
/// first frame is the source's `Hello`.
pub fn receive_into<S: SinkStore, R: Read, W: Write>(
    st: &mut S,
    key: Option<[u8; 32]>,
    mut r: FrameReader<R>,
    mut w: FrameWriter<W>,
    proven: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Summary, SyncError> {
    let res = handshake(key, &mut r, &mut w, proven).and_then(|h| {
        st.admit()?;
        accept(st, false, &h, &mut r, &mut w)
    });
    tell_peer(&mut w, &res);
    res
}

/// What the source's `Hello` announced.
struct Hello {
    volume: [u8; 16],
    origin: [u8; 16],
    succeeds: [u8; 16],
    writer: [u8; 16],
    block_size: u32,
    dry_run: bool,
}

/// The sink's side of the handshake: the source proves the key (on a keyed
/// session) before anything is said of the store.
fn handshake<R: Read, W: Write>(
    key: Option<[u8; 32]>,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    proven: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Hello, SyncError> {
    let hello = expect(r)?;
    let hello_body = hello.encode().1;
    let (volume, origin, succeeds, writer, block_size, their_nonce, dry_run) = match hello {
        Frame::Hello {
            version,
            volume,
            origin,
            succeeds,
            writer,
            block_size,
            nonce,
            dry_run,
        } => {
            if version != VERSION {
                return Err(protocol(format!(
                    "the source speaks sync version {version}, this snapfs {VERSION}"
                )));
            }
            (volume, origin, succeeds, writer, block_size, nonce, dry_run)
        }
        f => return Err(protocol(format!("expected hello, got {f:?}"))),
    };
    let nonce = random_nonce();
    w.send(&Frame::Welcome {
        version: VERSION,
        proof: key.map_or([0; 32], |k| proof(&k, &their_nonce, "sink", &hello_body)),
        nonce,
    })?;
    w.flush()?;
    let their_proof = match expect(r)? {
        Frame::Proof { proof } => proof,
        f => return Err(protocol(format!("expected proof, got {f:?}"))),
    };
    if let Some(k) = key {
        if !constant_eq(&their_proof, &proof(&k, &nonce, "source", &hello_body)) {
            return Err(protocol("the source does not prove the key: a wrong key"));
        }
        let sk = session_key(&k, &their_nonce, &nonce);
        w.set_key(sk);
        r.set_key(sk);
    }
    if let Some(p) = proven {
        p.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    if !crate::store::valid_block_size(block_size) {
        return Err(protocol(format!(
            "the source announces a block size of {block_size}"
        )));
    }
    Ok(Hello {
        volume,
        origin,
        succeeds,
        writer,
        block_size,
        dry_run,
    })
}

/// The sink's side after the handshake: checks that `st` may take the volume
/// (`fresh`: made for this session), then receives.
fn accept<S: SinkStore, R: Read, W: Write>(
    st: &mut S,
    fresh: bool,
    hello: &Hello,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
) -> Result<Summary, SyncError> {
    let (volume, block_size, dry_run) = (hello.volume, hello.block_size, hello.dry_run);
    st.with(|store| {
        let promoted = store.promotion()?;
        let replica_of = store.replica_of()?;
        // A store that holds no data yet (made empty by `mount -o replica` or
        // `listen=` with the default size, or made a replica by a session that had
        // nothing to send) takes the source's block size, below; any other keeps its
        // own, and a source of another is refused.
        if store.block_size != block_size && !store.holds_no_data()? {
            return Err(protocol(format!(
                "the destination's block size is {}, the source's {block_size}: a store that holds data keeps its block size",
                store.block_size
            )));
        }
        let origin = store.origin()?;
        if store.demoted_at()?.is_some() {
            // Settled at the first snapshot (which must have a base), and only from
            // the volume that took over from it: promoted in its place (with its
            // identity, or recording it as what it succeeds), or its own source.
            if volume != origin && hello.succeeds != origin && replica_of != Some(volume) {
                return Err(protocol(format!(
                    "the destination was demoted and waits for the volume that took over from it; \
                     this source ({}) did not take over from it, and its snapshots are of another volume",
                    crate::store::hex(&volume)
                )));
            }
            return Ok(());
        }
        match replica_of {
            // Its source, or another source of the same volume's snapshots: a replica
            // of it, or the replica promoted in its place with its identity
            // (`--same-id`). Whether their histories agree is checked at each
            // snapshot's base.
            Some(v) if v == volume || origin == hello.origin => {}
            Some(_) => {
                return Err(protocol(
                    "the destination is a replica of another volume".to_string(),
                ));
            }
            None if promoted.as_ref().is_some_and(|p| p.from == volume) => {
                let p = promoted.expect("matched");
                return Err(protocol(format!(
                    "the destination was promoted on {} (from snapshot {}) and is a volume of its own: \
                     to fail back, demote this volume's store (snapfs demote) and sync from the destination to it",
                    crate::policy::utc(p.at),
                    crate::text::printable(&p.snapshot)
                )));
            }
            None if !fresh && !store.live_is_empty()? => {
                return Err(protocol(
                    "the destination holds files of its own: it is not an empty store or a replica",
                ));
            }
            None if store.volume_id == volume => {
                return Err(protocol("the destination is the source volume itself"));
            }
            None => {
                if !fresh && !store.snapshot_list(true)?.is_empty() {
                    return Err(protocol(
                        "the destination has snapshots of its own: it is not a replica",
                    ));
                }
                if !dry_run {
                    store.write(true, |w| {
                        w.set_replica_of(&volume)?;
                        let row = crate::store::schema::seal_meta(meta::ORIGIN, &hello.origin);
                        w.t.meta.insert(meta::ORIGIN, row.as_slice())?;
                        Ok(())
                    })?;
                }
            }
        }
        if !dry_run && store.block_size != block_size {
            // It holds no data (checked above): nothing stored is laid out by size.
            store.take_block_size(block_size)?;
        }
        Ok(())
    })?;
    if !dry_run {
        // Every way past the checks above has the source's block size (or took it).
        st.with(|s| {
            if s.block_size != block_size {
                return Err(protocol(format!(
                    "the destination's block size is {}, the source's {block_size}",
                    s.block_size
                )));
            }
            Ok(())
        })?;
    }
    if dry_run {
        let held = st.with(|s| Ok::<_, SyncError>((s.volume_id, held_snapshots(s)?)))?;
        w.send(&Frame::Holding {
            volume: held.0,
            snapshots: held.1,
        })?;
        w.flush()?;
        return dry_session(r);
    }
    // What a rollback to the base takes out of a part-applied live tree stays, for
    // this session to take again instead of receiving it again.
    st.with(|s| {
        s.keep_unreferenced = true;
        Ok(())
    })?;
    let res = receive_snapshots(st, hello, r, w);
    let after = st.with(|s| {
        s.keep_unreferenced = false;
        if res.is_err() {
            // What arrived before the failure is kept, durably, for the session that
            // resumes this one.
            s.sync()?;
        }
        Ok(())
    });
    if let Err(e) = after {
        tracing::warn!(error = %e, "sync: what was received could not be made durable");
    }
    res
}

/// The snapshots of a session, after its handshake, into `store`.
fn receive_snapshots<S: SinkStore, R: Read, W: Write>(
    st: &mut S,
    hello: &Hello,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
) -> Result<Summary, SyncError> {
    // Extents this store has lost (their segment gone or cut short, or found
    // damaged): asked for with the first acknowledgement, to ride on the pushes.
    // Looked for once a snapshot comes (a session with nothing to send has no
    // acknowledgement to carry them).
    let mut lost: HashSet<[u8; 32]> = HashSet::new();
    let mut unasked: Vec<[u8; 32]> = Vec::new();
    let mut looked = false;
    // Lost extents asked for that the batches do not name (the source may lack them).
    let mut repair_asked: HashSet<[u8; 32]> = HashSet::new();
    // Stored extents the batches named whose copy was read back and found good.
    let mut verified: HashSet<[u8; 32]> = HashSet::new();
    let (volume, held) = st.with(|s| Ok::<_, SyncError>((s.volume_id, held_snapshots(s)?)))?;
    w.send(&Frame::Holding {
        volume,
        snapshots: held,
    })?;
    w.flush()?;
    let mut sum = Summary::default();
    let mut since_durable = 0u64;
    let mut plans = 0u64;
    loop {
        let (snapshot, base) = match expect(r)? {
            Frame::Done => {
                // Received extents no snapshot took (kept by interrupted sessions for
                // snapshots that never came) go now.
                sum.wire_bytes = w.wire_bytes + r.wire_bytes;
                st.with(|store| {
                    store.keep_unreferenced = false;
                    let freed = store.free_unreferenced()?;
                    if freed > 0 {
                        tracing::info!(
                            extents = freed,
                            "sync: freed received extents no snapshot took"
                        );
                    }
                    sum.base = store.snapshot_list(false)?.pop().map(|(n, _)| n);
                    let rec = sum.record();
                    // What the session received is durable already (each barrier);
                    // this row only reports it, and need not cost a durable commit of
                    // its own: it becomes durable with the next one, or at close.
                    store.write(false, |w| {
                        let row = rec.encode(meta::LAST_RECEIVED);
                        w.t.meta.insert(meta::LAST_RECEIVED, row.as_slice())?;
                        Ok(())
                    })?;
                    store.commit_group(false)?;
                    Ok(())
                })?;
                break;
            }
            Frame::Begin { snapshot, base } => {
                plans = 0;
                (snapshot, base)
            }
            // What the next snapshot takes: nothing to do, but one per snapshot, so
            // that a stream of them cannot hold the session.
            Frame::Plan { .. } => {
                plans += 1;
                if plans > 1 {
                    return Err(protocol("plans without the snapshots they announce"));
                }
                continue;
            }
            f => return Err(protocol(format!("expected begin or done, got {f:?}"))),
        };
        if !looked {
            looked = true;
            lost = st.with(|s| Ok(s.lost_extents()?))?;
            unasked = lost.iter().copied().collect();
            if !lost.is_empty() {
                tracing::warn!(
                    extents = lost.len(),
                    "sync: extents lost here; asking the source for them"
                );
            }
        }
        let renamed = st.with(|store| {
            if store.demoted_at()?.is_none() {
                return Ok(Vec::new());
            }
            // A demoted store's first snapshot: what it has past the base is kept
            // aside, and it becomes a replica of the source.
            let Some(b) = &base else {
                return Err(protocol(
                    "the destination was demoted and shares no snapshot with the source: \
                     it takes only incrementals from a snapshot both hold (restore into a new store instead)",
                ));
            };
            let rec = store.snapshot(b.as_bytes())?.ok_or_else(|| {
                protocol(format!("the destination lacks the base snapshot {b:?}"))
            })?;
            let kept = store.settle_demoted(
                rec.epoch,
                &hello.volume,
                &hello.origin,
                &hello.writer,
                Ts::now(),
            )?;
            tracing::info!(kept = ?kept, base = %b, "sync: a demoted store became a replica; what it had past the base is kept");
            Ok(kept.renamed.into_iter().map(|(old, _)| old).collect::<Vec<_>>())
        })?;
        if !renamed.is_empty() {
            st.renamed(&renamed);
        }
        st.with(|store| {
            if store.snapshot(snapshot.name.as_bytes())?.is_some() {
                return Err(protocol(format!(
                    "the destination already has a snapshot named {:?}",
                    snapshot.name
                )));
            }
            let last = crate::store::role::last_source_of(store.read_txn()?.meta())?;
            let same_writer = match last {
                Some(w) => w == hello.writer,
                // A replica from before the row: its own source is the writer it
                // knows.
                None => store.replica_of()? == Some(hello.volume),
            };
            // The live tree starts as the base: anything done to the replica since goes.
            match &base {
                Some(b) => {
                    let rec = store.snapshot(b.as_bytes())?.ok_or_else(|| {
                        protocol(format!("the destination lacks the base snapshot {b:?}"))
                    })?;
                    // A writer this replica has not taken snapshots from yet (a
                    // replica promoted in its source's place, or the old source
                    // back after one was) starts from this replica's newest
                    // snapshot: a newer one it lacks means the two histories forked,
                    // and interleaving them would be neither. (The same writer may
                    // start further back: it lost its record of what it sent, or
                    // pruned it since; those snapshots are its own.)
                    let newer: Vec<String> = if same_writer {
                        Vec::new()
                    } else {
                        store
                            .snapshot_list(false)?
                            .into_iter()
                            .filter(|(_, r)| r.epoch > rec.epoch)
                            .map(|(n, _)| crate::text::printable(&n).into_owned())
                            .collect()
                    };
                    if !newer.is_empty() {
                        return Err(protocol(format!(
                            "the destination holds snapshots newer than the base {} that the source lacks ({}): \
                             its history and the source's forked; to follow the source, demote the destination \
                             (snapfs demote, unmounted: they are kept as diverged-*) or delete them there",
                            crate::text::printable(b),
                            newer.join(", ")
                        )));
                    }
                    store.rollback_to(rec.epoch)?;
                }
                None if !store.snapshot_list(true)?.is_empty() => {
                    return Err(protocol(
                        "a whole send to a destination that holds snapshots already",
                    ));
                }
                // A whole send starts from an empty tree: what an earlier, failed
                // session left goes.
                None => clear_live(store)?,
            }
            let no_origin = read_meta(store.read_txn()?.meta(), meta::ORIGIN)?.is_none();
            if !same_writer || last.is_none() || no_origin {
                // Whose snapshots these are from now on (and, on a replica made
                // before the `origin` row, whose volume they are of).
                store.write(true, |w| {
                    let row = seal_meta(meta::LAST_SOURCE, &hello.writer);
                    w.t.meta.insert(meta::LAST_SOURCE, row.as_slice())?;
                    if no_origin {
                        let row = seal_meta(meta::ORIGIN, &hello.origin);
                        w.t.meta.insert(meta::ORIGIN, row.as_slice())?;
                    }
                    Ok(())
                })?;
            }
            Ok(())
        })?;
        // The batch waiting for its missing extents, and the extents still due.
        let mut pending: Option<Vec<Record>> = None;
        let mut wanted: HashSet<[u8; 32]> = HashSet::new();
        let mut next_batch = 0u64;
        // The inodes the entries this snapshot changed point at: each must exist.
        let mut named_inodes: HashSet<u64> = HashSet::new();
        loop {
            let next = match expect(r)? {
                Frame::Extent { hash, data } => {
                    let named = wanted.remove(&hash);
                    if !named && !repair_asked.remove(&hash) {
                        return Err(protocol(format!(
                            "extent {} was not asked for",
                            crate::store::hex(&hash)
                        )));
                    }
                    if *blake3::hash(&data).as_bytes() != hash {
                        return Err(protocol(format!(
                            "extent {} does not match its hash",
                            crate::store::hex(&hash)
                        )));
                    }
                    // Arrived as itself: no read-back when a later batch names it.
                    verified.insert(hash);
                    let again = lost.remove(&hash);
                    st.with(|store| {
                        if again {
                            // A lost copy, stored again and its extent repointed.
                            store.write(false, |wr| wr.store_again(&[(hash, &data)]))?;
                        } else {
                            // Stored and indexed at once, with no reference yet: a
                            // batch's extents need not fit in memory, and an
                            // interrupted session's stay for the next one.
                            store.write(false, |wr| wr.append_received(&[(hash, &data)]))?;
                        }
                        Ok(())
                    })?;
                    sum.extents += 1;
                    sum.payload_bytes += data.len() as u64;
                    since_durable += data.len() as u64;
                    if since_durable >= RESUME_POINT {
                        // What arrived survives a crash or a cut from here on.
                        st.with(|s| Ok(s.sync()?))?;
                        since_durable = 0;
                    }
                    continue;
                }
                Frame::Records { batch, records } => Some((batch, records)),
                Frame::Barrier => None,
                f => {
                    return Err(protocol(format!(
                        "expected records, extents or barrier, got {f:?}"
                    )));
                }
            };
            // The batch before is complete now: apply it.
            if let Some(recs) = pending.take() {
                if let Some(h) = wanted.iter().next() {
                    return Err(protocol(format!(
                        "extent {} was asked for and not sent",
                        crate::store::hex(h)
                    )));
                }
                // Every extent a record names is here: nothing in the write below
                // can be refused, so a hostile stream never fails a write group.
                st.with(|store| {
                    let txn = store.read_txn()?;
                    for rec in &recs {
                        if let (KIND_BLOCK, Some(p)) = (rec.kind, &rec.payload) {
                            for h in BlockRec::decode(p)?.extents() {
                                if txn.extents().get(*h)?.is_none() {
                                    return Err(protocol(format!(
                                        "the source sent block {} of inode {} naming extent {} it never sent",
                                        rec.sub,
                                        rec.ino,
                                        crate::store::hex(h)
                                    )));
                                }
                            }
                        }
                    }
                    drop(txn);
                    store.write(false, |wr| {
                        for rec in &recs {
                            let key = RecKey {
                                ino: rec.ino,
                                kind: rec.kind,
                                sub: rec.sub,
                                name: &rec.name,
                            };
                            wr.put_received(key, rec.payload.as_deref())?;
                        }
                        Ok(())
                    })?;
                    Ok(())
                })?;
                sum.records += recs.len() as u64;
                for rec in &recs {
                    if let (KIND_DIRENT, Some(p)) = (rec.kind, &rec.payload) {
                        named_inodes.insert(DirentRec::decode(p)?.ino);
                    }
                }
            }
            let Some((batch, records)) = next else {
                break;
            };
            if batch != next_batch {
                return Err(protocol(format!(
                    "batch {batch} came where {next_batch} was due"
                )));
            }
            // Only a snapshot with no change has an empty batch, its only one: a
            // stream of empty batches would hold the session for nothing.
            if records.is_empty() && batch != 0 {
                return Err(protocol(format!(
                    "an empty batch ({batch}) after the first"
                )));
            }
            next_batch += 1;
            for rec in &records {
                check_record(rec).map_err(|why| {
                    protocol(format!(
                        "the source sent a bad record (inode {}, kind {}): {why}",
                        rec.ino, rec.kind
                    ))
                })?;
            }
            // The extents this batch names that the destination has nowhere, or
            // whose stored copy is lost or does not read back as itself.
            let mut missing = Vec::new();
            st.with(|store| {
                let mut stored: Vec<([u8; 32], ExtentRec)> = Vec::new();
                {
                    let txn = store.read_txn()?;
                    for rec in &records {
                        if let (KIND_BLOCK, Some(p)) = (rec.kind, &rec.payload) {
                            for h in BlockRec::decode(p)?.extents() {
                                if wanted.contains(h) || verified.contains(h) {
                                    continue;
                                }
                                match txn.extents().get(*h)? {
                                    Some(_) if lost.contains(h) => {}
                                    Some(row) => {
                                        stored.push((*h, ExtentRec::decode(h, row.value())?));
                                        verified.insert(*h);
                                        continue;
                                    }
                                    None => {}
                                }
                                repair_asked.remove(h);
                                wanted.insert(*h);
                                missing.push(*h);
                            }
                        }
                    }
                }
                // Dedup hits are read back: a replica never takes a reference to a
                // copy it cannot return. (In the same step as the rows were read: a
                // compaction between would move them.)
                stored.sort_unstable_by_key(|(_, r)| (r.segment, r.offset));
                for (h, r) in stored {
                    let good = store
                        .segs
                        .read(r.segment, r.offset, r.len)
                        .is_ok_and(|d| *blake3::hash(&d).as_bytes() == h);
                    if !good {
                        tracing::warn!(extent = %crate::store::hex(&h), "sync: a stored extent does not read back; asking the source for it");
                        verified.remove(&h);
                        lost.insert(h);
                        wanted.insert(h);
                        missing.push(h);
                    }
                }
                Ok(())
            })?;
            // Lost extents no batch has named yet ride on this acknowledgement.
            while missing.len() < 100_000
                && let Some(h) = unasked.pop()
            {
                if lost.contains(&h) && !wanted.contains(&h) && repair_asked.insert(h) {
                    missing.push(h);
                }
            }
            w.send(&Frame::Ack { batch, missing })?;
            w.flush()?;
            pending = Some(records);
        }
        st.with(|store| {
            // A snapshot without a root directory would not mount.
            let root = store
                .live_inode(ROOT_INO)?
                .map(|p| InodeRec::decode(&p))
                .transpose()?;
            if !root.is_some_and(|r| r.kind == FileKind::Dir) {
                return Err(protocol(format!(
                    "snapshot {:?} has no root directory",
                    snapshot.name
                )));
            }
            // No entry the snapshot changed may point at an inode it lacks (one it
            // left alone pointed at one the base had).
            for &ino in &named_inodes {
                if store.live_inode(ino)?.is_none() {
                    return Err(protocol(format!(
                        "snapshot {:?} has an entry naming inode {ino}, which it lacks",
                        snapshot.name
                    )));
                }
            }
            // The barrier: everything the snapshot names is stored; one durable
            // commit takes it (segments are synced first).
            store.snapshot_take(
                &snapshot.name,
                Ts {
                    sec: snapshot.created_sec,
                    nsec: snapshot.created_nsec,
                },
            )?;
            Ok(())
        })?;
        st.committed();
        w.send(&Frame::Committed {
            name: snapshot.name.clone(),
        })?;
        w.flush()?;
        tracing::info!(snapshot = %snapshot.name, "snapshot received");
        sum.snapshots.push(snapshot.name);
    }
    sum.wire_bytes = w.wire_bytes + r.wire_bytes;
    Ok(sum)
}

/// The snapshots of the source's volume `store` holds, as `Holding` names them.
fn held_snapshots(store: &Store) -> Result<Vec<SnapRef>, SyncError> {
    Ok(store
        .snapshot_list(false)?
        .iter()
        .map(|(n, rec)| snap_ref(n, rec))
        .collect())
}

/// The rest of a dry run, after `Holding`: plans, then `Done`; nothing changes.
fn dry_session<R: Read>(r: &mut FrameReader<R>) -> Result<Summary, SyncError> {
    let mut plans = 0u64;
    loop {
        match expect(r)? {
            Frame::Plan { .. } if plans < MAX_PLANS => plans += 1,
            Frame::Plan { .. } => return Err(protocol("more plans than a dry run may have")),
            Frame::Done => break,
            f => return Err(protocol(format!("a dry run sends plans only, not {f:?}"))),
        }
    }
    Ok(Summary {
        dry_run: true,
        ..Summary::default()
    })
}

/// Checks a received record as the store will read it: its key in range and its
/// payload decoding as its kind's must, naming inodes in range.
fn check_record(rec: &Record) -> Result<(), String> {
    // Live inode numbers: 1 (the root) up to, not including, the `.snapshots` number.
    let ino_ok = |i: u64| (1..MAX_LIVE_INO - 1).contains(&i);
    if !ino_ok(rec.ino) {
        return Err(format!("inode number {}", rec.ino));
    }
    if matches!(rec.kind, KIND_INODE | KIND_DIRENT | KIND_XATTR) && rec.sub != 0 {
        return Err(format!("sub {} on a record that has none", rec.sub));
    }
    if rec.kind == KIND_PARENT && !ino_ok(rec.sub) {
        return Err(format!("a back pointer to directory {}", rec.sub));
    }
    let Some(p) = &rec.payload else {
        return Ok(());
    };
    let e = |e: crate::store::StoreError| e.to_string();
    match rec.kind {
        KIND_INODE => {
            InodeRec::decode(p).map_err(e)?;
        }
        KIND_DIRENT => {
            let d = DirentRec::decode(p).map_err(e)?;
            if !ino_ok(d.ino) {
                return Err(format!("an entry naming inode {}", d.ino));
            }
        }
        KIND_BLOCK => {
            BlockRec::decode(p).map_err(e)?;
        }
        KIND_XATTR if p.len() > 64 * 1024 => {
            return Err(format!("an xattr value of {} bytes", p.len()));
        }
        KIND_PARENT if !p.is_empty() => return Err("a back pointer with a payload".into()),
        _ => {}
    }
    Ok(())
}

/// Deletes every live record (a whole send into a replica an earlier session left
/// half written).
fn clear_live(store: &mut Store) -> Result<(), SyncError> {
    let mut keys: Vec<(u64, u8, u64, Vec<u8>)> = Vec::new();
    {
        let txn = store.read_txn()?;
        crate::store::for_each_visible(
            txn.versions(),
            store.live_epoch,
            |ino, kind, sub, name, _| {
                keys.push((ino, kind, sub, name.to_vec()));
                Ok(())
            },
        )?;
    }
    for chunk in keys.chunks(4096) {
        store.write(false, |w| {
            for id in chunk {
                w.put(crate::store::snapshots::ident_key(id), None)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Opens a store, waiting up to 10 s for a daemon that is going away (unmounted just
/// now) to let go of it; a mounted store stays an error ("in use").
fn retry_locked<T>(open: impl Fn() -> Result<T, crate::store::StoreError>) -> Result<T, SyncError> {
    let mut res = open();
    for _ in 0..100 {
        if !matches!(res, Err(crate::store::StoreError::Locked)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        res = open();
    }
    Ok(res?)
}

fn random_nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    // SAFETY: getrandom(2) into a buffer of the length given.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    if got != n.len() as isize {
        // Not a secret yet (no key exchange is built): a time-based value will do.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        n = *blake3::hash(&t.as_nanos().to_le_bytes()).as_bytes();
    }
    n
}

/// A sink fed crafted streams: each is refused with a clear error, and the
/// destination is left as it was.
#[cfg(test)]
mod hostile_tests {
    use super::*;

    /// `snapfs sync SRC DEST` between two stores here, as the CLI runs it.
    fn local(src: &Path, dest: &Path) -> Result<Summary, SyncError> {
        let (sum, res) = crate::sync::run(
            src,
            dest.to_str().unwrap(),
            &crate::sync::Options::default(),
        );
        res.map(|()| sum)
    }

    /// A source's side of the handshake (no key), for `volume`.
    fn hello(volume: [u8; 16]) -> [Frame; 2] {
        [
            Frame::Hello {
                version: VERSION,
                volume,
                origin: volume,
                succeeds: [0; 16],
                writer: volume,
                block_size: 64 * 1024,
                nonce: [1; 32],
                dry_run: false,
            },
            Frame::Proof { proof: [0; 32] },
        ]
    }

    fn begin(name: &str, base: Option<&str>) -> Frame {
        Frame::Begin {
            snapshot: SnapRef {
                name: name.into(),
                created_sec: 1,
                created_nsec: 0,
            },
            base: base.map(str::to_string),
        }
    }

    /// A block record of inode 1 naming the extent of `data`.
    fn block_of(data: &[u8]) -> Record {
        let mut p = Vec::new();
        BlockRec::whole(*blake3::hash(data).as_bytes(), data.len() as u32).encode(&mut p);
        Record {
            ino: 1,
            kind: KIND_BLOCK,
            sub: 0,
            name: vec![],
            payload: Some(p),
        }
    }

    /// Runs a sink on the handshake for `volume` then `frames`, into `dest`; returns
    /// its error text.
    fn feed(dest: &Path, volume: [u8; 16], frames: &[Frame]) -> Result<Summary, String> {
        let mut w = FrameWriter::new(Vec::new(), None);
        for f in hello(volume).iter().chain(frames) {
            w.send(f).unwrap();
        }
        let bytes = w.into_inner();
        receive(
            dest,
            None,
            FrameReader::new(&bytes[..], None),
            FrameWriter::new(Vec::new(), None),
        )
        .map_err(|e| e.to_string())
    }

    fn snapshots(dest: &Path) -> Vec<String> {
        let s = Store::open(dest, None).unwrap();
        s.snapshot_list(true)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// A replica holding snapshot "base" of a new volume (just its root), made by a
    /// real sync; and that volume's id.
    fn replica() -> (tempfile::TempDir, std::path::PathBuf, [u8; 16]) {
        let dir = tempfile::tempdir().unwrap();
        let (src, dest) = (dir.path().join("s"), dir.path().join("r"));
        let vol = {
            let fs = crate::fs::Fs::open(&src, Some(&StoreConfig::default())).unwrap();
            let mut core = fs.lock();
            core.snapshot_create(b"base", Ts::now()).unwrap();
            core.store().volume_id
        };
        let sum = local(&src, &dest).unwrap();
        assert_eq!(sum.snapshots, ["base"]);
        (dir, dest, vol)
    }

    #[test]
    fn a_snapshot_without_a_root_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r");
        let e = feed(&dest, [7; 16], &[begin("s", None), Frame::Barrier]).unwrap_err();
        assert!(e.contains("no root directory"), "{e}");
        assert!(snapshots(&dest).is_empty());
    }

    #[test]
    fn an_entry_naming_an_inode_the_snapshot_lacks_is_refused() {
        let (_d, dest, vol) = replica();
        let mut p = Vec::new();
        DirentRec {
            ino: 77,
            kind: FileKind::File,
        }
        .encode(&mut p);
        let dangling = Record {
            ino: ROOT_INO,
            kind: KIND_DIRENT,
            sub: 0,
            name: b"x".to_vec(),
            payload: Some(p),
        };
        let e = feed(
            &dest,
            vol,
            &[
                begin("s2", Some("base")),
                Frame::Records {
                    batch: 0,
                    records: vec![dangling],
                },
                Frame::Barrier,
            ],
        )
        .unwrap_err();
        assert!(e.contains("naming inode 77, which it lacks"), "{e}");
        assert_eq!(snapshots(&dest), ["base"]);
    }

    #[test]
    fn a_stream_of_another_volume_or_an_unknown_base_is_refused() {
        let (_d, dest, vol) = replica();
        let e = feed(&dest, [9; 16], &[]).unwrap_err();
        assert!(e.contains("replica of another volume"), "{e}");
        let e = feed(&dest, vol, &[begin("s2", Some("nope"))]).unwrap_err();
        assert!(e.contains("lacks the base snapshot"), "{e}");
        let e = feed(&dest, vol, &[begin("base", Some("base"))]).unwrap_err();
        assert!(e.contains("already has a snapshot"), "{e}");
        assert_eq!(snapshots(&dest), ["base"]);
    }

    #[test]
    fn bad_extents_leave_no_snapshot() {
        let (_d, dest, vol) = replica();
        let data = vec![5u8; 4096];
        let head = [
            begin("s2", Some("base")),
            Frame::Records {
                batch: 0,
                records: vec![block_of(&data)],
            },
        ];
        let hash = *blake3::hash(&data).as_bytes();
        let cases: Vec<(Vec<Frame>, &str)> = vec![
            // Bytes that are not the extent's.
            (
                vec![Frame::Extent {
                    hash,
                    data: vec![6u8; 4096],
                }],
                "does not match its hash",
            ),
            // An extent nobody asked for.
            (
                vec![Frame::Extent {
                    hash: [3; 32],
                    data: vec![1],
                }],
                "was not asked for",
            ),
            // The barrier before the extent the batch needs.
            (vec![Frame::Barrier], "asked for and not sent"),
            // The stream ends inside the snapshot.
            (vec![], "closed the connection"),
            // A batch out of order.
            (
                vec![
                    Frame::Extent {
                        hash,
                        data: data.clone(),
                    },
                    Frame::Records {
                        batch: 5,
                        records: vec![],
                    },
                ],
                "batch 5 came where 1 was due",
            ),
        ];
        for (tail, want) in cases {
            let frames: Vec<Frame> = head.iter().cloned().chain(tail).collect();
            let e = feed(&dest, vol, &frames).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
            assert_eq!(snapshots(&dest), ["base"], "{want}");
        }
        // The same snapshot sent right is taken. The last refused stream delivered
        // the extent before it broke a rule: it was kept for this session, which
        // does not ask for it again (the stream would be refused if it sent it).
        let frames: Vec<Frame> = head
            .iter()
            .cloned()
            .chain([Frame::Barrier, Frame::Done])
            .collect();
        feed(&dest, vol, &frames).unwrap();
        assert_eq!(snapshots(&dest), ["base", "s2"]);
        let mut s = Store::open(&dest, None).unwrap();
        let rep = crate::check::fsck(&mut s, true, &mut |_, _| {}).unwrap();
        assert!(rep.clean(), "{}", rep.summary());
    }

    #[test]
    fn records_that_do_not_decode_as_their_kind_are_refused() {
        let (_d, dest, vol) = replica();
        for (rec, want) in [
            (
                Record {
                    ino: 1,
                    kind: KIND_INODE,
                    sub: 0,
                    name: vec![],
                    payload: Some(vec![1, 2, 3]),
                },
                "inode record of 3 bytes",
            ),
            (
                Record {
                    ino: 1,
                    kind: KIND_DIRENT,
                    sub: 0,
                    name: b"x".to_vec(),
                    payload: Some(vec![0; 4]),
                },
                "dirent of 4 bytes",
            ),
            (
                Record {
                    ino: crate::store::schema::MAX_LIVE_INO,
                    kind: KIND_XATTR,
                    sub: 0,
                    name: b"user.x".to_vec(),
                    payload: Some(vec![]),
                },
                "inode number",
            ),
        ] {
            let e = feed(
                &dest,
                vol,
                &[
                    begin("s2", Some("base")),
                    Frame::Records {
                        batch: 0,
                        records: vec![rec],
                    },
                    Frame::Barrier,
                ],
            )
            .unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
            assert_eq!(snapshots(&dest), ["base"]);
        }
    }

    #[test]
    fn a_store_with_files_of_its_own_is_not_a_destination() {
        let (dir, _dest, vol) = replica();
        let other = dir.path().join("o");
        {
            let fs = crate::fs::Fs::open(&other, Some(&StoreConfig::default())).unwrap();
            crate::fs::tests::put_file(&mut fs.lock(), b"mine", b"mine");
        }
        let e = feed(&other, vol, &[]).unwrap_err();
        assert!(e.contains("holds files of its own"), "{e}");
    }

    #[test]
    fn a_whole_send_after_a_failed_one_leaves_nothing_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dest) = (dir.path().join("s"), dir.path().join("r"));
        let vol = {
            let fs = crate::fs::Fs::open(&src, Some(&StoreConfig::default())).unwrap();
            let mut core = fs.lock();
            crate::fs::tests::put_file(&mut core, b"f", b"data");
            core.snapshot_create(b"s", Ts::now()).unwrap();
            core.store().volume_id
        };
        // A first session writes a record the source never had, then breaks off.
        let junk = Record {
            ino: ROOT_INO,
            kind: KIND_XATTR,
            sub: 0,
            name: b"user.junk".to_vec(),
            payload: Some(b"x".to_vec()),
        };
        let e = feed(
            &dest,
            vol,
            &[
                begin("s", None),
                Frame::Records {
                    batch: 0,
                    records: vec![junk],
                },
                Frame::Barrier,
            ],
        )
        .unwrap_err();
        assert!(e.contains("no root directory"), "{e}");
        // As a session that failed after committed groups leaves it: durable.
        {
            let mut store = Store::open(&dest, None).unwrap();
            store
                .write(true, |w| {
                    w.put(RecKey::xattr(ROOT_INO, b"user.junk"), Some(b"x"))?;
                    Ok(())
                })
                .unwrap();
        }
        local(&src, &dest).unwrap();
        let store = Store::open(&dest, None).unwrap();
        let epoch = store.snapshot(b"s").unwrap().unwrap().epoch;
        let txn = store.read_txn().unwrap();
        let key = RecKey::xattr(ROOT_INO, b"user.junk");
        assert_eq!(
            crate::store::visible(txn.versions(), key, epoch).unwrap(),
            None
        );
        let mut names = Vec::new();
        crate::store::scan_visible(
            txn.versions(),
            ROOT_INO,
            KIND_DIRENT,
            0..=0,
            epoch,
            |_, n, _| {
                names.push(n.to_vec());
                Ok(true)
            },
        )
        .unwrap();
        assert_eq!(names, [b"f".to_vec()]);
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    fn rec(i: u64, payload: usize) -> Record {
        Record {
            ino: i,
            kind: 1,
            sub: 0,
            name: Vec::new(),
            payload: Some(vec![7; payload]),
        }
    }

    /// Each batch within the limits (a record over the byte limit alone), none
    /// empty unless it is the only one, and together the records in their order.
    fn check(records: Vec<Record>) -> Vec<Vec<Record>> {
        let out = batches(records.clone());
        assert!(!out.is_empty());
        for b in &out {
            assert!(b.len() <= BATCH_RECORDS);
            let bytes: usize = b
                .iter()
                .map(|r| 32 + r.name.len() + r.payload.as_ref().map_or(0, Vec::len))
                .sum();
            assert!(bytes <= BATCH_BYTES || b.len() == 1, "{bytes} bytes");
            assert!(!b.is_empty() || out.len() == 1);
        }
        assert_eq!(out.concat(), records);
        out
    }

    #[test]
    fn batches_are_cut_at_the_limits() {
        // None: one empty batch, as a snapshot's only batch.
        assert_eq!(check(Vec::new()), vec![Vec::<Record>::new()]);
        // By count.
        let lens = |v: Vec<Vec<Record>>| v.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(lens(check((0..4096).map(|i| rec(i, 1)).collect())), [4096]);
        assert_eq!(
            lens(check((0..4097).map(|i| rec(i, 1)).collect())),
            [4096, 1]
        );
        // By bytes: one over the limit goes alone, between the others.
        let v = vec![rec(1, 10), rec(2, 2 << 20), rec(3, 10)];
        assert_eq!(lens(check(v)), [1, 1, 1]);
        // A run filling a batch to the byte: the next starts a new one.
        let exact = BATCH_BYTES / 2 - 32;
        assert_eq!(lens(check((0..3).map(|i| rec(i, exact)).collect())), [2, 1]);
        // A mixed run.
        let mixed: Vec<Record> = (0..20_000u64)
            .map(|i| rec(i, (i as usize * 7919) % 3000))
            .collect();
        check(mixed);
    }
}
