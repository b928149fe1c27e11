//! A volume's role in replication. A replica becomes a volume of its own (`snapfs
//! promote`, failover); a volume its replica has replaced becomes a replica again
//! (`snapfs demote`, failback), and its first session keeps what it had past the
//! snapshot both share under `diverged-<time>`.

use super::schema::{NAME_MAX, SnapshotRec, Ts, meta, read_meta, seal_meta};
use super::{OpError, Store, StoreError};

/// Why a change of role was refused, or the store failing underneath.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The store is not in a role the change applies to, or the snapshot is wrong.
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error(transparent)]
    Op(#[from] OpError),
}

impl From<StoreError> for RoleError {
    fn from(e: StoreError) -> Self {
        RoleError::Op(OpError::Store(e))
    }
}

/// How a replica became a volume of its own: the `promoted` meta row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promotion {
    /// The volume it was a replica of.
    pub from: [u8; 16],
    /// The volume the replica's snapshots were of (its origin): the one it took
    /// over from.
    pub origin: [u8; 16],
    /// When it was promoted (seconds since the Unix epoch).
    pub at: i64,
    /// The snapshot its live tree started from.
    pub snapshot: String,
}

impl Promotion {
    /// The sealed value of the `promoted` row.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(40 + self.snapshot.len());
        b.extend_from_slice(&self.from);
        b.extend_from_slice(&self.origin);
        b.extend_from_slice(&self.at.to_le_bytes());
        b.extend_from_slice(self.snapshot.as_bytes());
        seal_meta(meta::PROMOTED, &b)
    }

    /// Decodes the unsealed value of the `promoted` row.
    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let bad = || StoreError::Corrupt(format!("meta row promoted is {} bytes long", b.len()));
        if b.len() < 40 || b.len() > 40 + NAME_MAX {
            return Err(bad());
        }
        Ok(Promotion {
            from: b[..16].try_into().map_err(|_| bad())?,
            origin: b[16..32].try_into().map_err(|_| bad())?,
            at: i64::from_le_bytes(b[32..40].try_into().map_err(|_| bad())?),
            snapshot: String::from_utf8(b[40..].to_vec())
                .map_err(|_| StoreError::Corrupt("meta row promoted names no snapshot".into()))?,
        })
    }
}

/// What a demoted store kept of its own at its first session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Its snapshots newer than the base: (old name, new name).
    pub renamed: Vec<(String, String)>,
    /// The snapshot its live tree became, if it differed from the base.
    pub live: Option<String>,
}

/// A 16-byte volume id from a `meta` row's value.
fn volume_row(name: &str, b: &[u8]) -> Result<[u8; 16], StoreError> {
    b.try_into()
        .map_err(|_| StoreError::Corrupt(format!("meta row {name} is not 16 bytes")))
}

/// The volume a replica's snapshots are of: its `origin` row, or (a replica made
/// before that row) the volume it receives from; `None` on a store that is no
/// replica (its snapshots are its own).
pub fn origin_of<T: redb::ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
) -> Result<Option<[u8; 16]>, StoreError> {
    Ok(match volume_meta(t, meta::ORIGIN)? {
        Some(v) => Some(v),
        None => volume_meta(t, meta::REPLICA_OF)?,
    })
}

/// The 16-byte `meta` row `name` in `t`, if there is one.
fn volume_meta<T: redb::ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    name: &str,
) -> Result<Option<[u8; 16]>, StoreError> {
    read_meta(t, name)?
        .map(|v| volume_row(name, &v))
        .transpose()
}

/// The `writer` row in `t` (absent: the volume id is the writer).
pub fn writer_of<T: redb::ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
) -> Result<Option<[u8; 16]>, StoreError> {
    volume_meta(t, meta::WRITER)
}

/// The `last_source` row in `t`: the writer a replica last began to take from.
pub fn last_source_of<T: redb::ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
) -> Result<Option<[u8; 16]>, StoreError> {
    volume_meta(t, meta::LAST_SOURCE)
}

/// The promotion recorded in `t`, if any.
pub fn promotion_of<T: redb::ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
) -> Result<Option<Promotion>, StoreError> {
    read_meta(t, meta::PROMOTED)?
        .map(|v| Promotion::decode(&v))
        .transpose()
}

/// When the store in `t` was demoted, if it waits for its first session since.
pub fn demoted_of<T: redb::ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
) -> Result<Option<i64>, StoreError> {
    read_meta(t, meta::DEMOTED)?
        .map(|v| {
            v.as_slice()
                .try_into()
                .map(i64::from_le_bytes)
                .map_err(|_| StoreError::Corrupt("meta row demoted is not 8 bytes".into()))
        })
        .transpose()
}

/// The prefix of the names a demoted store keeps its own changes under.
pub const DIVERGED: &str = "diverged-";

/// `diverged-YYYY-MM-DDTHH:MM:SSZ`, the name a demoted store's own changes are kept
/// under.
pub fn diverged_name(sec: i64) -> String {
    format!(
        "{DIVERGED}{}",
        crate::policy::auto_name(sec).trim_start_matches(crate::policy::AUTO_PREFIX)
    )
}

impl Store {
    /// How this volume became one, if it was a replica promoted.
    pub fn promotion(&self) -> Result<Option<Promotion>, StoreError> {
        promotion_of(self.read_txn()?.meta())
    }

    /// When this store was demoted, if it waits for its first session since.
    pub fn demoted_at(&self) -> Result<Option<i64>, StoreError> {
        demoted_of(self.read_txn()?.meta())
    }

    /// The volume this store's snapshots are of (see [`origin_of`]): its own id
    /// unless it is a replica.
    pub fn origin(&self) -> Result<[u8; 16], StoreError> {
        Ok(origin_of(self.read_txn()?.meta())?.unwrap_or(self.volume_id))
    }

    /// Makes a replica a volume of its own: its live tree becomes `snapshot` (the
    /// newest if `None`), what interrupted sessions left is freed, and it takes no
    /// more snapshots from its source. With `same_id` it takes the identity of the
    /// volume its snapshots are of, so that the other replicas of that volume take
    /// incrementals from it. It becomes a new writer of its snapshots, and (with
    /// `successor`) records what it took over from, so that the store it replaces
    /// may fail back to it. On a demoted store that has received nothing since, the
    /// demotion is undone instead. Two durable commits: a crash between them leaves a
    /// replica whose live tree is the snapshot, and promoting again finishes.
    pub fn promote(
        &mut self,
        snapshot: Option<&str>,
        same_id: bool,
        successor: bool,
        now: i64,
    ) -> Result<Promotion, RoleError> {
        let Some(from) = self.replica_of()? else {
            if self.demoted_at()?.is_some() {
                if snapshot.is_some() || same_id {
                    return Err(RoleError::Refused(
                        "it is demoted and has received nothing since: promote only undoes the demotion (no --snapshot or --same-id)".into(),
                    ));
                }
                self.write(true, |w| {
                    w.t.meta.remove(meta::DEMOTED)?;
                    Ok(())
                })?;
                return Ok(Promotion {
                    from: self.volume_id,
                    origin: self.volume_id,
                    at: now,
                    snapshot: String::new(),
                });
            }
            return Err(RoleError::Refused(
                "it is not a replica: only a replica (or a demoted store) is promoted".into(),
            ));
        };
        let (name, rec): (String, SnapshotRec) = match snapshot {
            Some(n) => match self.snapshot(n.as_bytes())? {
                Some(r) => (n.to_string(), r),
                None => {
                    return Err(RoleError::Refused(format!(
                        "the replica has no snapshot named {}",
                        crate::text::printable(n)
                    )));
                }
            },
            None => self.snapshot_list(false)?.pop().ok_or_else(|| {
                RoleError::Refused(
                    "the replica holds no snapshot yet: there is nothing to promote".into(),
                )
            })?,
        };
        let origin = self.origin()?;
        self.rollback_to(rec.epoch)?;
        self.free_unreferenced()?;
        let p = Promotion {
            from,
            origin,
            at: now,
            snapshot: name,
        };
        let id = if same_id { origin } else { self.volume_id };
        self.write(true, |w| {
            w.t.meta.remove(meta::REPLICA_OF)?;
            w.t.meta.remove(meta::ORIGIN)?;
            w.t.meta.remove(meta::DEMOTED)?;
            w.t.meta.remove(meta::LAST_RECEIVED)?;
            w.t.meta.remove(meta::LAST_SOURCE)?;
            if successor {
                w.t.meta.insert(meta::PROMOTED, p.encode().as_slice())?;
            }
            let row = seal_meta(meta::WRITER, &super::random_bytes::<16>());
            w.t.meta.insert(meta::WRITER, row.as_slice())?;
            let row = seal_meta(meta::VOLUME_ID, &id);
            w.t.meta.insert(meta::VOLUME_ID, row.as_slice())?;
            Ok(())
        })?;
        self.volume_id = id;
        Ok(p)
    }

    /// Makes a volume a replica again, of the volume that replaced it (its promoted
    /// replica): it mounts read-only from now on, and its first session (from a
    /// volume of its origin or one that took over from it, sharing a snapshot) keeps
    /// what it had past that snapshot under `diverged-<time>` before taking the
    /// source's snapshots. A replica is demoted to follow a source whose history
    /// forked from its own (a replica promoted in its source's place): its snapshots
    /// past the fork are kept aside the same way.
    pub fn demote(&mut self, now: i64) -> Result<(), RoleError> {
        if self.snapshot_list(false)?.is_empty() {
            return Err(RoleError::Refused(
                "it has no snapshot: a demoted store takes incrementals from a snapshot it shares with the new source, and this one shares none"
                    .into(),
            ));
        }
        self.write(true, |w| {
            let row = seal_meta(meta::DEMOTED, &now.to_le_bytes());
            w.t.meta.insert(meta::DEMOTED, row.as_slice())?;
            w.t.meta.remove(meta::PROMOTED)?;
            Ok(())
        })?;
        Ok(())
    }

    /// The first session into a demoted store, once it knows the base (`base`, a
    /// snapshot both hold): what the store has past the base is kept, in one durable
    /// commit with the store becoming a replica of `source`. Its own snapshots newer
    /// than the base are renamed `diverged-<time>-<name>` (so that they neither clash
    /// with the source's names nor fall to a retention policy), and a live tree that
    /// differs from the base is kept as snapshot `diverged-<time>`. Returns what was
    /// kept, and how.
    pub fn settle_demoted(
        &mut self,
        base: u64,
        source: &[u8; 16],
        origin: &[u8; 16],
        writer: &[u8; 16],
        now: Ts,
    ) -> Result<Settled, OpError> {
        let stamp = diverged_name(now.sec);
        let mut taken: std::collections::HashSet<String> = self
            .snapshot_list(true)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut unique = |want: String| {
            let mut name = want.clone();
            let mut i = 2;
            while taken.contains(&name) {
                name = format!("{want}-{i}");
                i += 1;
            }
            taken.insert(name.clone());
            name
        };
        let mut renames = Vec::new();
        for (name, rec) in self.snapshot_list(false)? {
            if rec.epoch > base {
                let mut new = format!("{stamp}-{name}");
                if new.len() > NAME_MAX - 8 {
                    new = format!("{stamp}-epoch-{}", rec.epoch);
                }
                renames.push((name, unique(new), rec));
            }
        }
        let live = self.live_epoch;
        // A replica's live tree is where its sessions stage, not anyone's data.
        let changed = self.replica_of()?.is_none() && !self.changes_between(base, live)?.is_empty();
        let keep_live = changed.then(|| unique(stamp.clone()));
        if live >= (1 << (64 - super::schema::EPOCH_SHIFT)) - 1 {
            return Err(OpError::Errno(libc::EOVERFLOW));
        }
        self.write(true, |w| {
            for (old, new, rec) in &renames {
                w.t.snapshots.remove(old.as_str())?;
                w.t.snapshots
                    .insert(new.as_str(), rec.encode(new).as_slice())?;
            }
            if let Some(name) = &keep_live {
                let rec = SnapshotRec {
                    epoch: live,
                    created: now,
                    flags: 0,
                };
                w.t.snapshots
                    .insert(name.as_str(), rec.encode(name).as_slice())?;
                let row = seal_meta(meta::LIVE_EPOCH, &(live + 1).to_le_bytes());
                w.t.meta.insert(meta::LIVE_EPOCH, row.as_slice())?;
            }
            w.t.meta.remove(meta::DEMOTED)?;
            w.set_replica_of(source)?;
            let row = seal_meta(meta::ORIGIN, origin);
            w.t.meta.insert(meta::ORIGIN, row.as_slice())?;
            let row = seal_meta(meta::LAST_SOURCE, writer);
            w.t.meta.insert(meta::LAST_SOURCE, row.as_slice())?;
            Ok(())
        })?;
        if keep_live.is_some() {
            self.live_epoch = live + 1;
            self.snapshot_epochs.insert(live);
            self.changed.clear();
        }
        Ok(Settled {
            renamed: renames.into_iter().map(|(o, n, _)| (o, n)).collect(),
            live: keep_live,
        })
    }
}
