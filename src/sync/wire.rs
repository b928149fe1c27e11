//! The sync wire format: versioned, length-prefixed frames, each optionally closed
//! by a MAC, and the codec for them.
//!
//! ```text
//! frame  = len u32 LE | type u8 | body (len - 1 bytes) | mac [16] (keyed sessions only)
//! mac    = blake3::keyed_hash(session key, seq u64 LE | type | body)[..16]
//! ```
//!
//! `seq` counts the frames each side has sent (from 0, per direction), so a frame
//! replayed, dropped or moved fails its MAC. Every length and count read is bounded
//! before anything is allocated for it, and every name is checked the way the
//! receiving store would check it; a frame that breaks a rule is an error naming the
//! rule, never a panic. `docs/FORMAT.md` has the bodies of each frame type.

use std::io::{Read, Write};

/// The protocol version this build speaks.
pub const VERSION: u32 = 3;

/// Opens every `Hello`, so that a peer that is not snapfs is told apart at once.
pub const MAGIC: &[u8; 8] = b"snapfsyn";

/// Largest frame (type and body), bytes.
pub const MAX_FRAME: u32 = 8 << 20;

/// Bytes of a frame's MAC on a keyed session.
pub const MAC_LEN: usize = 16;

/// Largest extent a frame carries (the largest block size a store may have).
pub const MAX_EXTENT: usize = 1 << 20;

/// Largest record payload (an xattr value is at most 64 KiB; a block record is far
/// smaller).
pub const MAX_PAYLOAD: usize = 1 << 17;

pub use crate::store::schema::NAME_MAX;

/// Errors of the codec. Each says what was wrong with what was received.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The transport failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame")]
    Truncated,
    /// A frame longer than allowed, or empty.
    #[error("frame of {0} bytes (at most {MAX_FRAME}, at least 1)")]
    Length(u32),
    /// A frame type this version does not know.
    #[error("unknown frame type {0}")]
    Type(u8),
    /// The MAC does not match: the wrong key, or a frame altered, replayed or moved.
    #[error("frame {seq} fails its authentication (wrong key, or an altered or replayed frame)")]
    Mac {
        /// The frame's sequence number.
        seq: u64,
    },
    /// A body that does not follow its type's layout.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// The frame type.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
}

fn bad(what: &'static str, why: impl Into<String>) -> WireError {
    WireError::Malformed {
        what,
        why: why.into(),
    }
}

/// A snapshot as the two sides name it: its name, and when it was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapRef {
    /// Name (a valid snapshot name).
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_sec: i64,
    /// Nanoseconds.
    pub created_nsec: u32,
}

/// One versioned record of the target snapshot: its identity and its payload there
/// (`None`: absent, deleted since the base).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Inode.
    pub ino: u64,
    /// Record kind (`KIND_*` of the store's schema).
    pub kind: u8,
    /// Block index, parent inode, or 0.
    pub sub: u64,
    /// Entry or xattr name, or empty.
    pub name: Vec<u8>,
    /// The record's payload at the target, or `None` if it is absent there.
    pub payload: Option<Vec<u8>>,
}

/// A frame, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Source to destination, first: who speaks, and a challenge.
    Hello {
        /// Protocol version.
        version: u32,
        /// The source volume's identity.
        volume: [u8; 16],
        /// The volume the source's snapshots are of: its own identity, or, on a
        /// replica, the origin recorded when it first received (what `snapfs promote
        /// --same-id` and `restore --same-id` take on).
        origin: [u8; 16],
        /// The origin of the replica the source was before it was promoted (the
        /// volume it took over from), zeros if it never was: a demoted store takes
        /// its first session only from a volume of its own origin or one that took
        /// over from it.
        succeeds: [u8; 16],
        /// Who writes the source's snapshots (its `writer` row): a destination
        /// checks a new writer's history against its own.
        writer: [u8; 16],
        /// The source's block size (the destination's must match).
        block_size: u32,
        /// Random bytes the destination answers with a proof of the key.
        nonce: [u8; 32],
        /// Only plans follow: the destination changes nothing (made, if missing,
        /// neither).
        dry_run: bool,
    },
    /// Destination to source: its answer to `Hello`.
    Welcome {
        /// Protocol version.
        version: u32,
        /// Proof of the key over the source's nonce (zero on an unkeyed session).
        proof: [u8; 32],
        /// Random bytes the source answers with its own proof.
        nonce: [u8; 32],
    },
    /// Destination, once the source has proven the key: its own volume id (the
    /// source keeps a cursor per destination) and the snapshots of the source's
    /// volume it holds, oldest first.
    Holding {
        /// The destination store's own volume id.
        volume: [u8; 16],
        /// The snapshots.
        snapshots: Vec<SnapRef>,
    },
    /// Source to destination: its proof of the key over the destination's nonce.
    Proof {
        /// The proof (zero on an unkeyed session).
        proof: [u8; 32],
    },
    /// Source, before a snapshot's `Begin` (or instead of it, on a dry run): what
    /// sending it takes.
    Plan {
        /// The snapshot.
        snapshot: SnapRef,
        /// Records that differ from the base.
        records: u64,
        /// Extents those records name: each once on a dry run, each once per
        /// batch otherwise.
        extents: u64,
        /// Their bytes: on a dry run, the extents' lengths; otherwise what the
        /// records name of each (a base its length, a fragment its pages), which is
        /// what the relay counts of the batches as they go.
        bytes: u64,
    },
    /// Source: a snapshot follows, as an incremental from `base` (or whole).
    Begin {
        /// The snapshot sent.
        snapshot: SnapRef,
        /// The snapshot it is sent relative to, which the destination holds.
        base: Option<String>,
    },
    /// Source: a batch of records.
    Records {
        /// Batch number, from 0 within a snapshot.
        batch: u64,
        /// The records.
        records: Vec<Record>,
    },
    /// Source: the bytes of one extent.
    Extent {
        /// Its blake3 hash (the receiver rehashes).
        hash: [u8; 32],
        /// The bytes.
        data: Vec<u8>,
    },
    /// Destination: a batch is staged; these extents it names are still missing.
    Ack {
        /// The batch acknowledged.
        batch: u64,
        /// Hashes the destination lacks.
        missing: Vec<[u8; 32]>,
    },
    /// Source: every record and extent of the snapshot has been sent.
    Barrier,
    /// Destination: the snapshot is committed and durable.
    Committed {
        /// Its name.
        name: String,
    },
    /// Either side: the session ends with this error.
    Error {
        /// What went wrong, for the other side's user.
        message: String,
    },
    /// Source: nothing more to send.
    Done,
}

const T_HELLO: u8 = 1;
/// The type byte of `Welcome` (the destination's last frame without a MAC).
pub const T_WELCOME: u8 = 2;
/// The type byte of `Proof` (the source's last frame without a MAC).
pub const T_PROOF: u8 = 3;
const T_BEGIN: u8 = 4;
const T_RECORDS: u8 = 5;
/// An extent frame's type (a relay passes its bytes on without reading them).
pub const T_EXTENT: u8 = 6;
const T_ACK: u8 = 7;
const T_BARRIER: u8 = 8;
const T_COMMITTED: u8 = 9;
const T_ERROR: u8 = 10;
const T_DONE: u8 = 11;
const T_HOLDING: u8 = 12;
const T_PLAN: u8 = 13;

/// Longest error message carried.
const MESSAGE_MAX: usize = 4096;

impl Frame {
    fn type_byte(&self) -> u8 {
        match self {
            Frame::Hello { .. } => T_HELLO,
            Frame::Welcome { .. } => T_WELCOME,
            Frame::Proof { .. } => T_PROOF,
            Frame::Begin { .. } => T_BEGIN,
            Frame::Records { .. } => T_RECORDS,
            Frame::Extent { .. } => T_EXTENT,
            Frame::Ack { .. } => T_ACK,
            Frame::Barrier => T_BARRIER,
            Frame::Committed { .. } => T_COMMITTED,
            Frame::Error { .. } => T_ERROR,
            Frame::Done => T_DONE,
            Frame::Holding { .. } => T_HOLDING,
            Frame::Plan { .. } => T_PLAN,
        }
    }

    /// The frame's type byte and body.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut b = Vec::new();
        match self {
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
                b.extend_from_slice(MAGIC);
                b.extend_from_slice(&version.to_le_bytes());
                b.extend_from_slice(volume);
                b.extend_from_slice(origin);
                b.extend_from_slice(succeeds);
                b.extend_from_slice(writer);
                b.extend_from_slice(&block_size.to_le_bytes());
                b.extend_from_slice(nonce);
                b.push(*dry_run as u8);
            }
            Frame::Welcome {
                version,
                proof,
                nonce,
            } => {
                b.extend_from_slice(&version.to_le_bytes());
                b.extend_from_slice(proof);
                b.extend_from_slice(nonce);
            }
            Frame::Holding { volume, snapshots } => {
                b.extend_from_slice(volume);
                b.extend_from_slice(&(snapshots.len() as u32).to_le_bytes());
                for s in snapshots {
                    put_snap(&mut b, s);
                }
            }
            Frame::Proof { proof } => b.extend_from_slice(proof),
            Frame::Plan {
                snapshot,
                records,
                extents,
                bytes,
            } => {
                put_snap(&mut b, snapshot);
                b.extend_from_slice(&records.to_le_bytes());
                b.extend_from_slice(&extents.to_le_bytes());
                b.extend_from_slice(&bytes.to_le_bytes());
            }
            Frame::Begin { snapshot, base } => {
                put_snap(&mut b, snapshot);
                match base {
                    Some(n) => {
                        b.push(1);
                        put_bytes8(&mut b, n.as_bytes());
                    }
                    None => b.push(0),
                }
            }
            Frame::Records { batch, records } => {
                b.extend_from_slice(&batch.to_le_bytes());
                b.extend_from_slice(&(records.len() as u32).to_le_bytes());
                for r in records {
                    b.extend_from_slice(&r.ino.to_le_bytes());
                    b.push(r.kind);
                    b.extend_from_slice(&r.sub.to_le_bytes());
                    put_bytes8(&mut b, &r.name);
                    match &r.payload {
                        Some(p) => {
                            b.push(1);
                            b.extend_from_slice(&(p.len() as u32).to_le_bytes());
                            b.extend_from_slice(p);
                        }
                        None => b.push(0),
                    }
                }
            }
            Frame::Extent { hash, data } => {
                b.extend_from_slice(hash);
                b.extend_from_slice(data);
            }
            Frame::Ack { batch, missing } => {
                b.extend_from_slice(&batch.to_le_bytes());
                b.extend_from_slice(&(missing.len() as u32).to_le_bytes());
                for h in missing {
                    b.extend_from_slice(h);
                }
            }
            Frame::Barrier | Frame::Done => {}
            Frame::Committed { name } => put_bytes8(&mut b, name.as_bytes()),
            Frame::Error { message } => {
                let m = message.as_bytes();
                let mut end = m.len().min(MESSAGE_MAX);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                b.extend_from_slice(&m[..end]);
            }
        }
        (self.type_byte(), b)
    }

    /// Decodes a body of type `t`.
    pub fn decode(t: u8, body: &[u8]) -> Result<Frame, WireError> {
        let mut r = Body { b: body };
        let f = match t {
            T_HELLO => {
                const W: &str = "hello";
                if r.take(8, W)? != MAGIC {
                    return Err(bad(W, "not a snapfs sync stream"));
                }
                Frame::Hello {
                    version: r.u32(W)?,
                    volume: r.array(W)?,
                    origin: r.array(W)?,
                    succeeds: r.array(W)?,
                    writer: r.array(W)?,
                    block_size: r.u32(W)?,
                    nonce: r.array(W)?,
                    dry_run: match r.u8(W)? {
                        0 => false,
                        1 => true,
                        x => return Err(bad(W, format!("dry-run flag {x}"))),
                    },
                }
            }
            T_WELCOME => {
                const W: &str = "welcome";
                Frame::Welcome {
                    version: r.u32(W)?,
                    proof: r.array(W)?,
                    nonce: r.array(W)?,
                }
            }
            T_HOLDING => {
                const W: &str = "holding";
                let volume = r.array(W)?;
                // A snapshot takes at least 13 bytes: the count is bounded by the body.
                let n = r.count(13, W)?;
                let mut snapshots = Vec::with_capacity(n);
                for _ in 0..n {
                    snapshots.push(r.snap(W)?);
                }
                Frame::Holding { volume, snapshots }
            }
            T_PROOF => Frame::Proof {
                proof: r.array("proof")?,
            },
            T_BEGIN => {
                const W: &str = "begin";
                let snapshot = r.snap(W)?;
                let base = match r.u8(W)? {
                    0 => None,
                    1 => Some(r.snap_name(W)?),
                    x => return Err(bad(W, format!("base flag {x}"))),
                };
                Frame::Begin { snapshot, base }
            }
            T_RECORDS => {
                const W: &str = "records";
                let batch = r.u64(W)?;
                // A record takes at least 19 bytes.
                let n = r.count(19, W)?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(r.record(W)?);
                }
                Frame::Records { batch, records }
            }
            T_EXTENT => {
                const W: &str = "extent";
                let hash = r.array(W)?;
                let data = r.rest();
                if data.is_empty() || data.len() > MAX_EXTENT {
                    return Err(bad(W, format!("{} bytes of data", data.len())));
                }
                Frame::Extent {
                    hash,
                    data: data.to_vec(),
                }
            }
            T_ACK => {
                const W: &str = "ack";
                let batch = r.u64(W)?;
                let n = r.count(32, W)?;
                let mut missing = Vec::with_capacity(n);
                for _ in 0..n {
                    missing.push(r.array(W)?);
                }
                Frame::Ack { batch, missing }
            }
            T_BARRIER => Frame::Barrier,
            T_COMMITTED => Frame::Committed {
                name: r.snap_name("committed")?,
            },
            T_ERROR => {
                let m = r.rest();
                if m.len() > MESSAGE_MAX {
                    return Err(bad("error", "a message over 4 KiB"));
                }
                Frame::Error {
                    message: String::from_utf8_lossy(m).into_owned(),
                }
            }
            T_DONE => Frame::Done,
            T_PLAN => {
                const W: &str = "plan";
                Frame::Plan {
                    snapshot: r.snap(W)?,
                    records: r.u64(W)?,
                    extents: r.u64(W)?,
                    bytes: r.u64(W)?,
                }
            }
            t => return Err(WireError::Type(t)),
        };
        if !r.b.is_empty() {
            return Err(bad(
                type_name(t),
                format!("{} bytes after the end", r.b.len()),
            ));
        }
        Ok(f)
    }
}

/// The name of frame type `t`, for messages and traces.
pub fn type_name(t: u8) -> &'static str {
    match t {
        T_HELLO => "hello",
        T_WELCOME => "welcome",
        T_PROOF => "proof",
        T_BEGIN => "begin",
        T_RECORDS => "records",
        T_EXTENT => "extent",
        T_ACK => "ack",
        T_BARRIER => "barrier",
        T_COMMITTED => "committed",
        T_ERROR => "error",
        T_HOLDING => "holding",
        T_PLAN => "plan",
        _ => "done",
    }
}

fn put_bytes8(b: &mut Vec<u8>, s: &[u8]) {
    debug_assert!(s.len() <= NAME_MAX);
    b.push(s.len() as u8);
    b.extend_from_slice(s);
}

fn put_snap(b: &mut Vec<u8>, s: &SnapRef) {
    put_bytes8(b, s.name.as_bytes());
    b.extend_from_slice(&s.created_sec.to_le_bytes());
    b.extend_from_slice(&s.created_nsec.to_le_bytes());
}

/// A cursor over a body; every read checks what is left.
struct Body<'a> {
    b: &'a [u8],
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(bad(what, "ends early"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    /// A count of items of at least `min` bytes each, no more than the body can hold.
    fn count(&mut self, min: usize, what: &'static str) -> Result<usize, WireError> {
        let n = self.u32(what)? as usize;
        if n > self.b.len() / min {
            return Err(bad(
                what,
                format!("a count of {n} in {} bytes", self.b.len()),
            ));
        }
        Ok(n)
    }
    fn bytes8(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u8(what)? as usize;
        self.take(n, what)
    }
    fn snap_name(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.bytes8(what)?;
        let name = crate::store::snapshots::check_name(n).map_err(|(_, rule)| bad(what, rule))?;
        Ok(name.to_string())
    }
    fn snap(&mut self, what: &'static str) -> Result<SnapRef, WireError> {
        let name = self.snap_name(what)?;
        let created_sec = self.u64(what)? as i64;
        let created_nsec = self.u32(what)?;
        if created_nsec >= 1_000_000_000 {
            return Err(bad(what, format!("{created_nsec} nanoseconds")));
        }
        Ok(SnapRef {
            name,
            created_sec,
            created_nsec,
        })
    }
    fn record(&mut self, what: &'static str) -> Result<Record, WireError> {
        use crate::store::schema::{KIND_BLOCK, KIND_DIRENT, KIND_INODE, KIND_PARENT, KIND_XATTR};
        let ino = self.u64(what)?;
        let kind = self.u8(what)?;
        let sub = self.u64(what)?;
        let name = self.bytes8(what)?.to_vec();
        match kind {
            KIND_DIRENT | KIND_PARENT => crate::store::schema::check_entry_name(&name)
                .map_err(|(_, rule)| bad(what, format!("entry with {rule}")))?,
            KIND_XATTR if name.is_empty() || name.contains(&0) => {
                return Err(bad(what, "an xattr name empty or with NUL"));
            }
            KIND_XATTR => {}
            KIND_INODE | KIND_BLOCK if !name.is_empty() => {
                return Err(bad(what, "a name on an inode or block record"));
            }
            KIND_INODE | KIND_BLOCK => {}
            k => return Err(bad(what, format!("record kind {k}"))),
        }
        let payload = match self.u8(what)? {
            0 => None,
            1 => {
                let n = self.u32(what)? as usize;
                if n > MAX_PAYLOAD {
                    return Err(bad(what, format!("a payload of {n} bytes")));
                }
                Some(self.take(n, what)?.to_vec())
            }
            x => return Err(bad(what, format!("payload flag {x}"))),
        };
        Ok(Record {
            ino,
            kind,
            sub,
            name,
            payload,
        })
    }
}

/// The MAC of frame `seq` of type `t` with `body`.
fn mac(key: &[u8; 32], seq: u64, t: u8, body: &[u8]) -> [u8; MAC_LEN] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&seq.to_le_bytes());
    h.update(&[t]);
    h.update(body);
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..MAC_LEN]);
    out
}

/// The proof of a key over a nonce (challenge-response of the handshake); `side`
/// is who proves (`source` or `sink`), so that one side's proof is never the other's.
/// The proof also covers `hello` (the source's `Hello` body), so that what it
/// announced (volume, block size) cannot be changed on the way unnoticed.
pub fn proof(key: &[u8; 32], nonce: &[u8; 32], side: &str, hello: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"snapfs sync proof ");
    h.update(side.as_bytes());
    h.update(nonce);
    h.update(hello);
    *h.finalize().as_bytes()
}

/// The key of a session's MACs, from the shared key and both nonces: fresh per
/// session, so that frames of one session cannot be replayed into another.
pub fn session_key(key: &[u8; 32], source_nonce: &[u8; 32], sink_nonce: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"snapfs sync session ");
    h.update(source_nonce);
    h.update(sink_nonce);
    *h.finalize().as_bytes()
}

/// The shared key from the contents of a key file (at least 16 bytes of secret).
pub fn key_from_file_bytes(contents: &[u8]) -> Option<[u8; 32]> {
    let secret = contents.trim_ascii();
    (secret.len() >= 16).then(|| blake3::derive_key("snapfs sync key file", secret))
}

/// Writes frames, numbering (and with a key, authenticating) them.
pub struct FrameWriter<W: Write> {
    w: W,
    key: Option<[u8; 32]>,
    seq: u64,
    /// Bytes written, frames' headers and MACs included.
    pub wire_bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    /// A writer over `w`; with `key`, every frame carries a MAC.
    pub fn new(w: W, key: Option<[u8; 32]>) -> Self {
        FrameWriter {
            w,
            key,
            seq: 0,
            wire_bytes: 0,
        }
    }

    /// Writes `f` (not flushed).
    pub fn send(&mut self, f: &Frame) -> Result<(), WireError> {
        let (t, body) = f.encode();
        let len = u32::try_from(body.len() + 1)
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or(WireError::Length(u32::MAX))?;
        self.w.write_all(&len.to_le_bytes())?;
        self.w.write_all(&[t])?;
        self.w.write_all(&body)?;
        self.wire_bytes += 5 + body.len() as u64;
        if let Some(k) = &self.key {
            self.w.write_all(&mac(k, self.seq, t, &body))?;
            self.wire_bytes += MAC_LEN as u64;
        }
        self.seq += 1;
        Ok(())
    }

    /// Flushes the transport.
    pub fn flush(&mut self) -> Result<(), WireError> {
        Ok(self.w.flush()?)
    }

    /// From now on, frames carry a MAC under `key` (after the handshake).
    pub fn set_key(&mut self, key: [u8; 32]) {
        self.key = Some(key);
    }

    /// The transport, back.
    pub fn into_inner(self) -> W {
        self.w
    }
}

/// Reads frames, checking their lengths, order and (with a key) MACs.
pub struct FrameReader<R: Read> {
    r: R,
    key: Option<[u8; 32]>,
    macs_unchecked: bool,
    seq: u64,
    /// Bytes read, frames' headers and MACs included.
    pub wire_bytes: u64,
}

impl<R: Read> FrameReader<R> {
    /// A reader over `r`; with `key`, every frame must carry a valid MAC.
    pub fn new(r: R, key: Option<[u8; 32]>) -> Self {
        FrameReader {
            r,
            key,
            macs_unchecked: false,
            seq: 0,
            wire_bytes: 0,
        }
    }

    /// From now on, frames must carry a MAC under `key`.
    pub fn set_key(&mut self, key: [u8; 32]) {
        self.key = Some(key);
    }

    /// The transport.
    pub fn get_ref(&self) -> &R {
        &self.r
    }

    /// The transport, back.
    pub fn into_inner(self) -> R {
        self.r
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
            _ => WireError::Io(e),
        })
    }

    /// The next frame; `Ok(None)` at a clean end of the stream (between frames).
    pub fn read_frame(&mut self) -> Result<Option<Frame>, WireError> {
        match self.read_raw()? {
            Some(raw) => Frame::decode(raw.t, &raw.body).map(Some),
            None => Ok(None),
        }
    }

    /// The next frame undecoded, its length bounded and (with a key) its MAC checked;
    /// `Ok(None)` at a clean end of the stream.
    pub fn read_raw(&mut self) -> Result<Option<RawFrame>, WireError> {
        match self.read_head()? {
            Some((t, n)) => self.read_body(t, n).map(Some),
            None => Ok(None),
        }
    }

    /// The next frame's type and body length, its header read and its length
    /// bounded; `Ok(None)` at a clean end of the stream. What follows is the body:
    /// [`Self::read_body`] reads it, or a relay passes it on and then reads the MAC
    /// with [`Self::read_passed_mac`].
    pub fn read_head(&mut self) -> Result<Option<(u8, usize)>, WireError> {
        let mut head = [0u8; 5];
        // A clean end comes before the first byte of a frame.
        loop {
            match self.r.read(&mut head[..1]) {
                Ok(0) => return Ok(None),
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        self.fill(&mut head[1..])?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        if len == 0 || len > MAX_FRAME {
            return Err(WireError::Length(len));
        }
        self.wire_bytes += 4 + len as u64;
        Ok(Some((head[4], len as usize - 1)))
    }

    /// The body and MAC of a frame whose header [`Self::read_head`] read.
    pub fn read_body(&mut self, t: u8, n: usize) -> Result<RawFrame, WireError> {
        let mut body = vec![0u8; n];
        self.fill(&mut body)?;
        let mut tag = None;
        if self.key.is_some() || self.macs_unchecked {
            let mut got = [0u8; MAC_LEN];
            self.fill(&mut got)?;
            self.wire_bytes += MAC_LEN as u64;
            if let Some(k) = self.key {
                let want = mac(&k, self.seq, t, &body);
                // Constant time: the MAC is a secret until it matches.
                if !constant_eq(&got, &want) {
                    return Err(WireError::Mac { seq: self.seq });
                }
            }
            tag = Some(got);
        }
        self.seq += 1;
        Ok(RawFrame { t, body, mac: tag })
    }

    /// The MAC of a frame whose body the caller passed on itself, unchecked (a relay
    /// holds no key; the end it passes it to checks it); `None` before the handshake
    /// ends. A reader with a key refuses: it must check what it reads.
    pub fn read_passed_mac(&mut self) -> Result<Option<[u8; MAC_LEN]>, WireError> {
        if self.key.is_some() {
            return Err(WireError::Io(std::io::Error::other(
                "a keyed reader passes no body unchecked",
            )));
        }
        self.seq += 1;
        if !self.macs_unchecked {
            return Ok(None);
        }
        let mut got = [0u8; MAC_LEN];
        self.fill(&mut got)?;
        self.wire_bytes += MAC_LEN as u64;
        Ok(Some(got))
    }

    /// The stream read from, for a relay that passes a body on itself.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// From now on, frames carry a MAC this reader cannot check (it has no key) and
    /// passes on: a relay between two ends that share a key it does not know.
    pub fn pass_macs(&mut self) {
        self.macs_unchecked = true;
    }
}

/// A frame as read, undecoded: what a relay passes on byte for byte.
pub struct RawFrame {
    /// Its type.
    pub t: u8,
    /// Its body.
    pub body: Vec<u8>,
    /// Its MAC, on a keyed session.
    pub mac: Option<[u8; MAC_LEN]>,
}

impl RawFrame {
    /// The frame decoded.
    pub fn decode(&self) -> Result<Frame, WireError> {
        Frame::decode(self.t, &self.body)
    }

    /// Whether it is a frame of type `Extent`.
    pub fn is_extent(&self) -> bool {
        self.t == T_EXTENT
    }

    /// Writes it as it was read.
    pub fn write_to<W: Write>(&self, w: &mut W) -> std::io::Result<u64> {
        let len = self.body.len() as u32 + 1;
        w.write_all(&len.to_le_bytes())?;
        w.write_all(&[self.t])?;
        w.write_all(&self.body)?;
        let mut n = 4 + len as u64;
        if let Some(m) = &self.mac {
            w.write_all(m)?;
            n += MAC_LEN as u64;
        }
        Ok(n)
    }
}

/// Whether `a` and `b` are equal, in time that does not depend on where they differ.
pub fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers (xorshift64*), so the test needs no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
        fn array<const N: usize>(&mut self) -> [u8; N] {
            let mut a = [0u8; N];
            for b in &mut a {
                *b = self.next() as u8;
            }
            a
        }
        fn name(&mut self) -> String {
            let n = 1 + self.below(20) as usize;
            (0..n)
                .map(|_| (b'a' + self.below(26) as u8) as char)
                .collect()
        }
        fn snap(&mut self) -> SnapRef {
            SnapRef {
                name: self.name(),
                created_sec: self.next() as i64,
                created_nsec: self.below(1_000_000_000) as u32,
            }
        }
    }

    /// A random valid frame.
    fn frame(r: &mut Rng) -> Frame {
        match r.below(12) {
            0 => Frame::Hello {
                version: r.next() as u32,
                volume: r.array(),
                origin: r.array(),
                succeeds: r.array(),
                writer: r.array(),
                block_size: r.next() as u32,
                nonce: r.array(),
                dry_run: r.below(2) == 0,
            },
            1 if r.below(2) == 0 => Frame::Welcome {
                version: 1,
                proof: r.array(),
                nonce: r.array(),
            },
            1 => Frame::Holding {
                volume: r.array(),
                snapshots: (0..r.below(5)).map(|_| r.snap()).collect(),
            },
            2 => Frame::Proof { proof: r.array() },
            3 => Frame::Begin {
                snapshot: r.snap(),
                base: (r.below(2) == 0).then(|| r.name()),
            },
            4 => Frame::Records {
                batch: r.next(),
                records: (0..r.below(6))
                    .map(|_| {
                        let kind = r.below(5) as u8;
                        Record {
                            ino: r.next(),
                            kind,
                            sub: r.next(),
                            name: if kind == 0 || kind == 2 {
                                vec![]
                            } else {
                                r.name().into_bytes()
                            },
                            payload: (r.below(3) > 0).then(|| {
                                let n = r.below(300) as usize;
                                r.bytes(n)
                            }),
                        }
                    })
                    .collect(),
            },
            5 => Frame::Extent {
                hash: r.array(),
                data: {
                    let n = 1 + r.below(5000) as usize;
                    r.bytes(n)
                },
            },
            6 => Frame::Ack {
                batch: r.next(),
                missing: (0..r.below(4)).map(|_| r.array()).collect(),
            },
            7 => Frame::Barrier,
            8 => Frame::Committed { name: r.name() },
            9 => Frame::Error { message: r.name() },
            10 => Frame::Plan {
                snapshot: r.snap(),
                records: r.next(),
                extents: r.next(),
                bytes: r.next(),
            },
            _ => Frame::Done,
        }
    }

    fn stream(frames: &[Frame], key: Option<[u8; 32]>) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), key);
        for f in frames {
            w.send(f).unwrap();
        }
        w.w
    }

    fn read_all(bytes: &[u8], key: Option<[u8; 32]>) -> Result<Vec<Frame>, WireError> {
        let mut r = FrameReader::new(bytes, key);
        let mut out = Vec::new();
        while let Some(f) = r.read_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn frames_round_trip_with_and_without_a_key() {
        let mut r = Rng(0x5eed);
        for key in [None, Some([7u8; 32])] {
            let frames: Vec<Frame> = (0..500).map(|_| frame(&mut r)).collect();
            assert_eq!(read_all(&stream(&frames, key), key).unwrap(), frames);
        }
    }

    #[test]
    fn a_wrong_key_a_replayed_or_an_altered_frame_is_refused() {
        let frames = vec![
            Frame::Barrier,
            Frame::Committed { name: "s".into() },
            Frame::Done,
        ];
        let good = stream(&frames, Some([1; 32]));
        assert!(matches!(
            read_all(&good, Some([2; 32])),
            Err(WireError::Mac { seq: 0 })
        ));
        // The second frame sent again in place of the third: its MAC was for seq 1.
        let one = stream(&frames[..2], Some([1; 32]));
        let second = &one[one.len() - (5 + 2 + MAC_LEN)..];
        let mut replayed = one.clone();
        replayed.extend_from_slice(second);
        assert!(matches!(
            read_all(&replayed, Some([1; 32])),
            Err(WireError::Mac { seq: 2 })
        ));
        let mut altered = good.clone();
        altered[10] ^= 1;
        assert!(read_all(&altered, Some([1; 32])).is_err());
        // Unkeyed frames on a keyed session: refused.
        assert!(read_all(&stream(&frames, None), Some([1; 32])).is_err());
    }

    #[test]
    fn lengths_and_counts_are_bounded_before_allocation() {
        // A length near u32::MAX: refused from the header alone.
        let mut s = u32::MAX.to_le_bytes().to_vec();
        s.push(T_EXTENT);
        assert!(matches!(
            read_all(&s, None),
            Err(WireError::Length(u32::MAX))
        ));
        // A count of 4 billion records in a 16-byte body.
        let mut body = 0u64.to_le_bytes().to_vec();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        body.extend_from_slice(&[0; 4]);
        assert!(matches!(
            Frame::decode(T_RECORDS, &body),
            Err(WireError::Malformed { .. })
        ));
        // Truncated frames.
        let good = stream(
            &[Frame::Committed {
                name: "snap".into(),
            }],
            None,
        );
        for cut in 1..good.len() {
            assert!(
                matches!(read_all(&good[..cut], None), Err(WireError::Truncated)),
                "{cut}"
            );
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let rec = |name: &[u8], kind: u8| Frame::Records {
            batch: 0,
            records: vec![Record {
                ino: 2,
                kind,
                sub: 1,
                name: name.to_vec(),
                payload: None,
            }],
        };
        for name in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 255]] {
            let (t, body) = rec(name, crate::store::schema::KIND_DIRENT).encode();
            let res = Frame::decode(t, &body);
            assert_eq!(res.is_ok(), name.len() == 255, "{name:?}: {res:?}");
        }
        // An inode record has no name; an unknown kind is refused.
        let (t, body) = rec(b"x", crate::store::schema::KIND_INODE).encode();
        assert!(Frame::decode(t, &body).is_err());
        let (t, body) = rec(b"", 9).encode();
        assert!(Frame::decode(t, &body).is_err());
        // Snapshot names follow the store's rules.
        let (t, body) = Frame::Committed {
            name: "a\u{1b}[2J".into(),
        }
        .encode();
        assert!(Frame::decode(t, &body).is_err());
    }

    /// Random and mutated input never panics the decoder (a bounded fuzz run; CI runs
    /// it on stable Rust with every `cargo test`).
    #[test]
    fn random_and_mutated_streams_never_panic() {
        let mut r = Rng(0xf00d);
        let mut decoded = 0;
        for i in 0..20_000u32 {
            let key = (i % 3 == 0).then_some([3u8; 32]);
            let mut s = if i % 4 == 0 {
                let n = r.below(200) as usize;
                r.bytes(n)
            } else {
                let frames: Vec<Frame> = (0..1 + r.below(3)).map(|_| frame(&mut r)).collect();
                stream(&frames, key)
            };
            // Flip, cut, repeat or insert bytes.
            for _ in 0..r.below(4) {
                if s.is_empty() {
                    break;
                }
                let at = r.below(s.len() as u64) as usize;
                match r.below(4) {
                    0 => s[at] ^= 1 << r.below(8),
                    1 => s.truncate(at),
                    2 => s.insert(at, r.next() as u8),
                    _ => s[at] = 0xff,
                }
            }
            if read_all(&s, key).is_ok() {
                decoded += 1;
            }
            // Bodies straight into the decoder, for every type.
            let n = r.below(64) as usize;
            let body = r.bytes(n);
            let _ = Frame::decode(r.below(13) as u8, &body);
        }
        // Unchanged streams decode: the test exercises the decoders, not only errors.
        assert!(decoded > 1000, "{decoded}");
    }
}
