//! Snapshots in S3-compatible object storage (`s3://BUCKET/PREFIX`): a sync
//! destination (the sink end of a session, [`receive`]) and the source of a
//! restore ([`send`]). Both speak the session's frames, so the relay, its progress
//! and the local ends are the same as for a store.
//!
//! Layout under PREFIX (docs/FORMAT.md, "Bucket layout"): `snapfs-root.json` names
//! the volume and its snapshots, oldest first, each with its manifest and base;
//! `manifests/ID` holds a snapshot's records as they were sent (the changes from its
//! base, or every record when it has none); `packs/ID.pack` holds extents end to
//! end and `packs/ID.idx` where each is. A pack and its index are written before any
//! manifest names them, and a manifest before the root names it, so a bucket is
//! never seen with a snapshot whose data is not all there.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::session::{Summary, SyncError, first_namings};
use super::wire::{Frame, FrameReader, FrameWriter, Record, SnapRef, VERSION};
use crate::store::schema::{BlockRec, KIND_BLOCK};

/// A pack is uploaded once it holds this many bytes of extents.
const PACK_BYTES: usize = 32 << 20;

/// The root object's name under the prefix.
const ROOT: &str = "snapfs-root.json";

/// A bucket prefix holding one volume's snapshots.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    rt: tokio::runtime::Runtime,
    url: String,
}

/// The root object: the volume and its snapshots, oldest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Root {
    /// Layout version (1).
    pub format: u32,
    /// The volume whose snapshots these are (hex).
    pub volume: String,
    /// The volume they are of (hex): the source's origin.
    pub origin: String,
    /// Block size of the volume.
    pub block_size: u32,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<RootSnapshot>,
}

/// A snapshot in the root object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RootSnapshot {
    /// Its name.
    pub name: String,
    /// Its creation time.
    pub created_sec: i64,
    /// Nanoseconds of it.
    pub created_nsec: u32,
    /// The snapshot its manifest holds the changes from (none: every record).
    pub base: Option<String>,
    /// The manifest's key under the prefix.
    pub manifest: String,
    /// Records in the manifest.
    pub records: u64,
}

impl RootSnapshot {
    fn snap_ref(&self) -> SnapRef {
        SnapRef {
            name: self.name.clone(),
            created_sec: self.created_sec,
            created_nsec: self.created_nsec,
        }
    }
}

fn err(msg: impl Into<String>) -> SyncError {
    SyncError::Protocol(msg.into())
}

/// Random hex for a new object's name.
fn random_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom into a local buffer of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    assert_eq!(n, 16, "getrandom");
    crate::store::hex(&b)
}

impl Bucket {
    /// Opens `s3://BUCKET[/PREFIX]` with the endpoint, region and credentials of
    /// the environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, ...).
    pub fn open(url: &str) -> Result<Bucket, SyncError> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| err(format!("{url}: not an s3:// URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(err(format!("{url}: no bucket named")));
        }
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Ok(ep) = std::env::var("AWS_ENDPOINT_URL") {
            b = b
                .with_allow_http(ep.starts_with("http://"))
                .with_endpoint(ep);
        }
        if let Ok(region) = std::env::var("AWS_REGION") {
            b = b.with_region(region);
        }
        let store = b
            .build()
            .map_err(|e| err(format!("{url}: {}", one_line(&e))))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(format!("cannot start the S3 client: {e}")))?;
        Ok(Bucket {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            rt,
            url: url.to_string(),
        })
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn fail(&self, what: &str, key: &str, e: object_store::Error) -> SyncError {
        let text = one_line(&e);
        let cause = match &e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                "access denied (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and the key's rights on the bucket)".to_string()
            }
            _ if text.contains("NoSuchBucket") => "no such bucket".to_string(),
            // The server's own words, without the XML it may wrap them in.
            _ => text.split(" <?xml").next().unwrap_or(&text).chars().take(300).collect(),
        };
        err(format!("{}: {what} {key}: {cause}", self.url))
    }

    /// The object `key`, or `None` when there is none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, SyncError> {
        let res = self.rt.block_on(async {
            match self.store.get(&self.path(key)).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        res.map(|o| o.map(|b| b.to_vec()))
            .map_err(|e| self.fail("reading", key, e))
    }

    /// Bytes `range` of object `key`.
    fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Vec<u8>, SyncError> {
        self.rt
            .block_on(self.store.get_range(&self.path(key), range))
            .map(|b| b.to_vec())
            .map_err(|e| self.fail("reading", key, e))
    }

    /// Writes object `key`.
    fn put(&self, key: &str, data: Vec<u8>) -> Result<(), SyncError> {
        self.rt
            .block_on(self.store.put(&self.path(key), data.into()))
            .map(|_| ())
            .map_err(|e| self.fail("writing", key, e))
    }

    /// The keys under `dir` (relative to the prefix).
    fn list(&self, dir: &str) -> Result<Vec<String>, SyncError> {
        let p = self.path(dir);
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(&p)).try_collect())
            .map_err(|e| self.fail("listing", dir, e))?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        Ok(metas
            .into_iter()
            .map(|m| {
                let k = m.location.to_string();
                k.strip_prefix(&strip).unwrap_or(&k).to_string()
            })
            .collect())
    }

    /// The root object, if the prefix holds a volume.
    pub fn root(&self) -> Result<Option<Root>, SyncError> {
        match self.get(ROOT)? {
            None => Ok(None),
            Some(b) => {
                let root: Root = serde_json::from_slice(&b)
                    .map_err(|e| err(format!("{}: {ROOT} is damaged: {e}", self.url)))?;
                if root.format != 1 {
                    return Err(err(format!(
                        "{}: layout version {} (this snapfs reads 1)",
                        self.url, root.format
                    )));
                }
                Ok(Some(root))
            }
        }
    }

    fn put_root(&self, root: &Root) -> Result<(), SyncError> {
        self.put(ROOT, serde_json::to_vec_pretty(root).expect("encodes"))
    }

    /// Every extent the packs hold: where each is.
    fn index(&self) -> Result<HashMap<[u8; 32], Place>, SyncError> {
        let mut out = HashMap::new();
        for key in self.list("packs")? {
            let Some(pack) = key.strip_suffix(".idx") else {
                continue;
            };
            let Some(b) = self.get(&key)? else { continue };
            if b.len() % 44 != 0 {
                return Err(err(format!("{}: {key} is damaged", self.url)));
            }
            for e in b.chunks_exact(44) {
                let hash: [u8; 32] = e[..32].try_into().expect("32");
                let offset = u64::from_le_bytes(e[32..40].try_into().expect("8"));
                let len = u32::from_le_bytes(e[40..44].try_into().expect("4"));
                out.insert(
                    hash,
                    Place {
                        pack: format!("{pack}.pack"),
                        offset,
                        len,
                    },
                );
            }
        }
        Ok(out)
    }
}

/// Where an extent is in the bucket.
#[derive(Clone, Debug)]
struct Place {
    pack: String,
    offset: u64,
    len: u32,
}

/// An object store error on one line.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Extents waiting to be uploaded as one pack.
#[derive(Default)]
struct Pack {
    data: Vec<u8>,
    index: Vec<u8>,
    hashes: Vec<([u8; 32], u64, u32)>,
}

impl Pack {
    fn add(&mut self, hash: [u8; 32], data: &[u8]) {
        let offset = self.data.len() as u64;
        self.data.extend_from_slice(data);
        self.index.extend_from_slice(&hash);
        self.index.extend_from_slice(&offset.to_le_bytes());
        self.index
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.hashes.push((hash, offset, data.len() as u32));
    }

    /// Uploads the pack, then its index, and records where its extents are.
    fn flush(&mut self, b: &Bucket, index: &mut HashMap<[u8; 32], Place>) -> Result<(), SyncError> {
        if self.hashes.is_empty() {
            return Ok(());
        }
        let id = random_id();
        let pack = format!("packs/{id}.pack");
        b.put(&pack, std::mem::take(&mut self.data))?;
        b.put(&format!("packs/{id}.idx"), std::mem::take(&mut self.index))?;
        for (hash, offset, len) in self.hashes.drain(..) {
            index.insert(
                hash,
                Place {
                    pack: pack.clone(),
                    offset,
                    len,
                },
            );
        }
        Ok(())
    }
}

fn expect<R: Read>(r: &mut FrameReader<R>) -> Result<Frame, SyncError> {
    match r.read_frame()? {
        Some(Frame::Error { message }) => Err(SyncError::Remote(message)),
        Some(f) => Ok(f),
        None => Err(SyncError::Closed),
    }
}

/// The extents a batch's records name.
fn named(records: &[Record]) -> Result<Vec<[u8; 32]>, SyncError> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for rec in records {
        if let (KIND_BLOCK, Some(p)) = (rec.kind, &rec.payload) {
            for h in BlockRec::decode(p)?.extents() {
                if seen.insert(*h) {
                    out.push(*h);
                }
            }
        }
    }
    Ok(out)
}

/// Receives a session's snapshots into the bucket at `url` (the sink end of `snapfs
/// sync SOURCE s3://...`): only extents the bucket lacks travel.
pub fn receive<R: Read, W: Write>(
    url: &str,
    mut r: FrameReader<R>,
    mut w: FrameWriter<W>,
) -> Result<Summary, SyncError> {
    let res = (|| {
        let b = Bucket::open(url)?;
        receive_into(&b, &mut r, &mut w)
    })();
    if let Err(e) = &res
        && !matches!(e, SyncError::Remote(_) | SyncError::Closed)
    {
        let _ = w.send(&Frame::Error {
            message: e.to_string(),
        });
        let _ = w.flush();
    }
    res
}

fn receive_into<R: Read, W: Write>(
    b: &Bucket,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
) -> Result<Summary, SyncError> {
    let (origin, block_size) = match expect(r)? {
        Frame::Hello {
            version,
            origin,
            block_size,
            dry_run,
            ..
        } => {
            if version != VERSION {
                return Err(err(format!(
                    "the source speaks sync version {version}, this snapfs {VERSION}"
                )));
            }
            if dry_run {
                return Err(err("a dry run to a bucket is not supported yet"));
            }
            (origin, block_size)
        }
        f => return Err(err(format!("expected hello, got {f:?}"))),
    };
    // An unkeyed session: no proof either way.
    w.send(&Frame::Welcome {
        version: VERSION,
        proof: [0; 32],
        nonce: [0; 32],
    })?;
    w.flush()?;
    match expect(r)? {
        Frame::Proof { .. } => {}
        f => return Err(err(format!("expected proof, got {f:?}"))),
    }
    let mut root = match b.root()? {
        Some(root) => {
            if root.origin != crate::store::hex(&origin) {
                return Err(err(format!(
                    "{} holds snapshots of another volume ({})",
                    b.url, root.origin
                )));
            }
            if root.block_size != block_size {
                return Err(err(format!(
                    "{} holds a volume of block size {}, the source's is {block_size}",
                    b.url, root.block_size
                )));
            }
            root
        }
        None => Root {
            format: 1,
            volume: random_id(),
            origin: crate::store::hex(&origin),
            block_size,
            snapshots: Vec::new(),
        },
    };
    let bucket_volume = crate::store::unhex::<16>(&root.volume)
        .ok_or_else(|| err(format!("{}: {ROOT} names no volume", b.url)))?;
    w.send(&Frame::Holding {
        volume: bucket_volume,
        snapshots: root.snapshots.iter().map(RootSnapshot::snap_ref).collect(),
    })?;
    w.flush()?;
    let mut index = b.index()?;
    let mut sum = Summary::default();
    loop {
        let (snapshot, base) = match expect(r)? {
            Frame::Done => break,
            Frame::Plan { .. } => continue,
            Frame::Begin { snapshot, base } => (snapshot, base),
            f => return Err(err(format!("expected begin or done, got {f:?}"))),
        };
        let newest = root.snapshots.last().map(|s| s.name.clone());
        if base != newest {
            return Err(err(format!(
                "{} holds {} as its newest snapshot; the source sends {} from {}",
                b.url,
                newest.as_deref().unwrap_or("none"),
                snapshot.name,
                base.as_deref().unwrap_or("nothing")
            )));
        }
        if root.snapshots.iter().any(|s| s.name == snapshot.name) {
            return Err(err(format!(
                "{} already has a snapshot named {}",
                b.url, snapshot.name
            )));
        }
        let mut manifest = FrameWriter::new(Vec::new(), None);
        let mut pack = Pack::default();
        let mut wanted: std::collections::HashSet<[u8; 32]> = Default::default();
        let mut records = 0u64;
        loop {
            match expect(r)? {
                Frame::Records {
                    batch,
                    records: recs,
                } => {
                    if let Some(h) = wanted.iter().next() {
                        return Err(err(format!(
                            "extent {} was asked for and not sent",
                            crate::store::hex(h)
                        )));
                    }
                    let missing: Vec<[u8; 32]> = named(&recs)?
                        .into_iter()
                        .filter(|h| {
                            !index.contains_key(h) && !pack.hashes.iter().any(|p| p.0 == *h)
                        })
                        .collect();
                    wanted.extend(missing.iter().copied());
                    records += recs.len() as u64;
                    manifest.send(&Frame::Records {
                        batch,
                        records: recs,
                    })?;
                    w.send(&Frame::Ack { batch, missing })?;
                    w.flush()?;
                }
                Frame::Extent { hash, data } => {
                    if !wanted.remove(&hash) {
                        return Err(err(format!(
                            "extent {} was not asked for",
                            crate::store::hex(&hash)
                        )));
                    }
                    if *blake3::hash(&data).as_bytes() != hash {
                        return Err(err(format!(
                            "extent {} does not match its hash",
                            crate::store::hex(&hash)
                        )));
                    }
                    sum.extents += 1;
                    sum.payload_bytes += data.len() as u64;
                    pack.add(hash, &data);
                    if pack.data.len() >= PACK_BYTES {
                        pack.flush(b, &mut index)?;
                    }
                }
                Frame::Barrier => break,
                f => {
                    return Err(err(format!(
                        "expected records, extents or barrier, got {f:?}"
                    )));
                }
            }
        }
        if let Some(h) = wanted.iter().next() {
            return Err(err(format!(
                "extent {} was asked for and not sent",
                crate::store::hex(h)
            )));
        }
        // The barrier: the packs, then the manifest, then the root that names it.
        pack.flush(b, &mut index)?;
        manifest.flush()?;
        let key = format!("manifests/{}", random_id());
        b.put(&key, manifest.into_inner())?;
        root.snapshots.push(RootSnapshot {
            name: snapshot.name.clone(),
            created_sec: snapshot.created_sec,
            created_nsec: snapshot.created_nsec,
            base,
            manifest: key,
            records,
        });
        b.put_root(&root)?;
        sum.records += records;
        sum.snapshots.push(snapshot.name.clone());
        w.send(&Frame::Committed {
            name: snapshot.name,
        })?;
        w.flush()?;
    }
    sum.base = root.snapshots.last().map(|s| s.name.clone());
    Ok(sum)
}

/// Sends the bucket's snapshots the destination lacks (the source end of `snapfs
/// restore s3://... NEWSTORE`), oldest first, each as it was stored: the changes
/// from the snapshot before it.
pub fn send<R: Read, W: Write>(
    url: &str,
    only: Option<&str>,
    mut r: FrameReader<R>,
    mut w: FrameWriter<W>,
) -> Result<Summary, SyncError> {
    let res = (|| {
        let b = Bucket::open(url)?;
        send_from(&b, only, &mut r, &mut w)
    })();
    if let Err(e) = &res
        && !matches!(e, SyncError::Remote(_) | SyncError::Closed)
    {
        let _ = w.send(&Frame::Error {
            message: e.to_string(),
        });
        let _ = w.flush();
    }
    res
}

fn send_from<R: Read, W: Write>(
    b: &Bucket,
    only: Option<&str>,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
) -> Result<Summary, SyncError> {
    if only.is_some() {
        return Err(err(
            "restoring one snapshot from a bucket is not supported yet: restore them all",
        ));
    }
    let root = b
        .root()?
        .ok_or_else(|| err(format!("{} holds no snapfs volume", b.url)))?;
    let volume = crate::store::unhex::<16>(&root.volume)
        .ok_or_else(|| err(format!("{}: {ROOT} names no volume", b.url)))?;
    let origin = crate::store::unhex::<16>(&root.origin)
        .ok_or_else(|| err(format!("{}: {ROOT} names no origin", b.url)))?;
    w.send(&Frame::Hello {
        version: VERSION,
        volume,
        origin,
        succeeds: [0; 16],
        writer: volume,
        block_size: root.block_size,
        nonce: [0; 32],
        dry_run: false,
    })?;
    w.flush()?;
    match expect(r)? {
        Frame::Welcome { version, .. } if version == VERSION => {}
        f => return Err(err(format!("expected welcome, got {f:?}"))),
    }
    w.send(&Frame::Proof { proof: [0; 32] })?;
    w.flush()?;
    let held = match expect(r)? {
        Frame::Holding { snapshots, .. } => snapshots,
        f => {
            return Err(err(format!(
                "expected the destination's snapshots, got {f:?}"
            )));
        }
    };
    // From the snapshot after the newest one the destination holds.
    let start = root
        .snapshots
        .iter()
        .rposition(|s| held.contains(&s.snap_ref()))
        .map_or(0, |i| i + 1);
    let index = b.index()?;
    let mut sum = Summary::default();
    for s in &root.snapshots[start..] {
        let bytes = b
            .get(&s.manifest)?
            .ok_or_else(|| err(format!("{}: the manifest of {} is missing", b.url, s.name)))?;
        let mut m = FrameReader::new(bytes.as_slice(), None);
        let mut batches = Vec::new();
        while let Some(f) = m.read_frame()? {
            match f {
                Frame::Records { batch, records } => batches.push((batch, records)),
                f => return Err(err(format!("{}: manifest of {}: {f:?}", b.url, s.name))),
            }
        }
        let (mut n, mut bytes_named) = (0u64, 0u64);
        for (_, recs) in &batches {
            let mut seen = std::collections::HashSet::new();
            for rec in recs {
                first_namings(rec, &mut seen, |_, len| {
                    n += 1;
                    bytes_named += len;
                })?;
            }
        }
        w.send(&Frame::Plan {
            snapshot: s.snap_ref(),
            records: s.records,
            extents: n,
            bytes: bytes_named,
        })?;
        w.send(&Frame::Begin {
            snapshot: s.snap_ref(),
            base: s.base.clone(),
        })?;
        for (batch, records) in batches {
            sum.records += records.len() as u64;
            w.send(&Frame::Records { batch, records })?;
            w.flush()?;
            let missing = match expect(r)? {
                Frame::Ack { batch: a, missing } if a == batch => missing,
                f => return Err(err(format!("expected ack of batch {batch}, got {f:?}"))),
            };
            for hash in missing {
                let Some(p) = index.get(&hash) else {
                    return Err(err(format!(
                        "{}: extent {} of snapshot {} is in no pack",
                        b.url,
                        crate::store::hex(&hash),
                        s.name
                    )));
                };
                let data = b.get_range(&p.pack, p.offset..p.offset + p.len as u64)?;
                if *blake3::hash(&data).as_bytes() != hash {
                    return Err(err(format!(
                        "{}: extent {} in {} does not match its hash",
                        b.url,
                        crate::store::hex(&hash),
                        p.pack
                    )));
                }
                sum.extents += 1;
                sum.payload_bytes += data.len() as u64;
                w.send(&Frame::Extent { hash, data })?;
            }
        }
        w.send(&Frame::Barrier)?;
        w.flush()?;
        match expect(r)? {
            Frame::Committed { name } if name == s.name => {}
            f => return Err(err(format!("expected the commit of {}, got {f:?}", s.name))),
        }
        sum.snapshots.push(s.name.clone());
    }
    w.send(&Frame::Done)?;
    w.flush()?;
    Ok(sum)
}
