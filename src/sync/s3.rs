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

mod idxcache;
mod keep;
pub mod mount;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::seal::{self, Seal};
use super::session::{Summary, SyncError, expect, first_namings};
use super::wire::{Frame, FrameReader, FrameWriter, Record, SnapRef, VERSION};
use crate::store::schema::{BlockRec, KIND_BLOCK};

/// A pack is uploaded once it holds this many bytes of extents.
const PACK_BYTES: usize = 32 << 20;

/// A restore reads the extents asked for in spans of a pack: one GET for extents
/// less than this far apart...
const SPAN_GAP: u64 = 1 << 20;
/// ...of at most this many bytes.
const SPAN_MAX: u64 = 16 << 20;

/// The bucket layout this snapfs writes (2: extents in packs may be compressed);
/// it reads 1 and 2.
const LAYOUT: u32 = 2;

/// In a pack index entry's length, the bit that says the extent is stored
/// compressed (a zstd frame of it); the other bits are its stored length.
const IDX_ZSTD: u32 = 1 << 31;

/// The zstd level packs' extents are compressed at by default (`--compress`).
pub const DEFAULT_COMPRESS: i32 = 6;

/// What a compressed manifest starts with (then a zstd frame of its records).
const ZSTD_MAGIC: &[u8; 8] = b"snapfsZ1";

/// The most bytes a manifest may expand to: a bound on a hostile one, and so on
/// what a sync writes (a snapshot whose records pass it is refused).
const MANIFEST_MAX: u64 = 16 << 30;

/// The root object's name under the prefix.
const ROOT: &str = "snapfs-root.json";

/// Under the prefix: the extents the snapshots name that `gc` found in no pack
/// index, for the next sync to ask the source for (32-byte hashes end to end).
const REPAIR: &str = "snapfs-repair";

/// The lock object's name under the prefix: who writes the bucket, until when.
pub const LOCK: &str = "snapfs-lock.json";

/// How long a lock or a reader's mark lasts unless renewed (a task of its holder
/// renews it every [`RENEW_EVERY`] while the holder lives); one whose holder died is
/// taken over after it.
const LOCK_TTL: i64 = 10 * 60;

/// How often a holder renews its lock or mark.
const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A lock or mark whose time is up by its holder's clock is still held if it was
/// written less than this long ago, by the server's clock: its holder, whose clock
/// is behind this machine's, still renews it.
const LOCK_QUIET: i64 = 3 * 60;

/// An empty object written to read the server's clock (its time of writing).
const CLOCK: &str = "snapfs-clock";

/// The longest a request may be retried for (`SNAPFS_S3_RETRY_TIMEOUT`): well under
/// the lock's lifetime, so that a writer that checked its lock before a request
/// still holds it when the request lands.
const RETRY_MAX: u64 = 150;

/// The lock object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LockRec {
    /// Who holds it: host, process, what it does, and a random tag.
    pub owner: String,
    /// Until when (seconds since the Unix epoch).
    pub expires: i64,
    /// The holder's host name.
    #[serde(default)]
    pub host: String,
    /// The holder's process id on that host.
    #[serde(default)]
    pub pid: u32,
    /// What it does: `sync`, `snapshot delete`, `gc` (the writer's lock), or
    /// `restore`, `fsck`, `diff` (a reader's).
    #[serde(default)]
    pub what: String,
}

/// This machine and process namespace: its host name, machine id, boot id and pid
/// namespace (containers may share a host name and a machine id; a pid means a
/// process only within its namespace and boot).
pub fn host_name() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!(
        "{} {} {} {ns}",
        read("/proc/sys/kernel/hostname"),
        read("/etc/machine-id"),
        read("/proc/sys/kernel/random/boot_id"),
    )
}

impl LockRec {
    /// Whether lock object bytes `v` name `owner` as the holder.
    fn held_by(v: &[u8], owner: &str) -> bool {
        serde_json::from_slice::<LockRec>(v).is_ok_and(|r| r.owner == owner)
    }

    /// Until when a live lock or mark holds, as its holder wrote it, for messages.
    fn held_until(&self) -> String {
        if self.expires > now_secs() {
            format!("until {}", crate::policy::utc(self.expires))
        } else {
            format!(
                "(its time ran out at {} by this machine's clock, but its holder still renews it: their clocks differ)",
                crate::policy::utc(self.expires)
            )
        }
    }

    /// Whether the holder was a process of this machine that is no longer running.
    fn gone_here(&self) -> bool {
        self.pid != 0 && !self.host.is_empty() && self.host == host_name() && process_gone(self.pid)
    }
}

/// Warns of `what` once in this process (a command may open a bucket many times).
fn warn_once(what: &str) {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if !said.iter().any(|s| s == what) {
        tracing::warn!("{what}");
        said.push(what.to_string());
    }
}

/// This user's home in the user database (of the effective user): where what this
/// machine keeps of buckets goes when `HOME` is unset, or not beyond other users'
/// reach ([`keep::Dir::buckets`]).
fn passwd_home() -> Option<std::path::PathBuf> {
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes the entry into `pw` and its strings into `buf`,
    // which outlive the read of `pw_dir` below.
    let r = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 || found.is_null() || pw.pw_dir.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string in `buf`.
    let dir = unsafe { std::ffi::CStr::from_ptr(pw.pw_dir) };
    use std::os::unix::ffi::OsStrExt;
    let dir = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()));
    (!dir.as_os_str().is_empty()).then_some(dir)
}

/// Whether no process `pid` runs in this process's pid namespace. Asked of the
/// kernel (signal 0), not of /proc, which hides other users' processes when it is
/// mounted with `hidepid` (or a service runs with `ProtectProc=invisible`): a live
/// writer of another user would look gone.
fn process_gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // SAFETY: kill with signal 0 sends nothing; it only checks that `pid` exists.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// A writer's hold on a bucket prefix, renewed by a task while it lives, released
/// when dropped.
pub struct Lock<'a> {
    b: &'a Bucket,
    owner: String,
    what: String,
    /// Until when the lock object last written says it holds.
    expires: Arc<std::sync::atomic::AtomicI64>,
    renewer: Option<Renewer>,
}

/// The task renewing a lock ([`spawn_renewer`]), and how to stop it.
struct Renewer {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Renewer {
    /// Stops the task, waiting for a renewal under way to land first: one landing
    /// after the lock is deleted would put it back.
    fn stop(self, b: &Bucket) {
        self.stop.notify_one();
        let _ = b.rt.block_on(self.task);
    }
}

fn now_secs() -> i64 {
    crate::store::schema::Ts::now().sec
}

/// The task that renews lock object `key` (the writer's lock, or a reader's mark)
/// every [`RENEW_EVERY`]: while it is still `owner`'s (a writer's lock taken over, or
/// deleted, is never written again). A read or write that fails is tried again at the
/// next turn (the lock holds for [`LOCK_TTL`]). `expires` is kept up to date.
fn spawn_renewer(
    b: &Bucket,
    key: &str,
    mut rec: LockRec,
    expires: Arc<std::sync::atomic::AtomicI64>,
) -> Renewer {
    let (store, path) = (b.store.clone(), b.path(key));
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let task = b.rt.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RENEW_EVERY) => {}
                _ = stopped.notified() => return,
            }
            let read = match store.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            };
            let ours = match read {
                Ok(v) => v.is_some_and(|v| LockRec::held_by(&v, &rec.owner)),
                Err(e) => {
                    tracing::warn!(error = %e, key = %path, "s3: reading a lock to renew it failed; trying again");
                    continue;
                }
            };
            if !ours {
                tracing::warn!(key = %path, "s3: a lock is no longer ours; not renewed");
                return;
            }
            rec.expires = now_secs() + LOCK_TTL;
            let body = serde_json::to_vec(&rec).expect("encodes");
            match store.put(&path, body.into()).await {
                Ok(_) => expires.store(rec.expires, std::sync::atomic::Ordering::SeqCst),
                Err(e) => tracing::warn!(error = %e, "s3: renewing a lock failed; trying again"),
            }
        }
    });
    Renewer { stop, task }
}

impl Lock<'_> {
    /// A time check (a task renews the lock); kept for the writer's steps that may
    /// take long, so that one whose lock lapsed stops early.
    fn renew(&self) -> Result<(), SyncError> {
        if now_secs() >= self.expires.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(self.lost());
        }
        Ok(())
    }

    fn lost(&self) -> SyncError {
        err(format!(
            "{}: this writer lost the bucket's lock (it expired, and another took it over): nothing more is written",
            self.b.url
        ))
    }

    /// Fails unless the lock object is still this writer's, and makes sure it holds
    /// for longer than a request may take: what a writer checks before each step
    /// that publishes or deletes (the root, a manifest or pack gone), so that one
    /// whose lock was taken over stops, and one that goes on is not taken over
    /// before its step lands.
    fn check(&self) -> Result<(), SyncError> {
        let ours = self.b.lock_held_by(&self.owner)?;
        let expires = self.expires.load(std::sync::atomic::Ordering::SeqCst);
        if !ours || now_secs() >= expires {
            return Err(self.lost());
        }
        if expires - now_secs() < 2 * self.b.retry_secs as i64 + 60 {
            let rec = LockRec {
                owner: self.owner.clone(),
                expires: now_secs() + LOCK_TTL,
                host: host_name(),
                pid: std::process::id(),
                what: self.what.clone(),
            };
            self.b
                .put(LOCK, serde_json::to_vec(&rec).expect("encodes"))?;
            self.expires
                .store(rec.expires, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        // Uploads of a writer that failed land (or fail) before its lock goes: a gc
        // that took the lock at once could find a pack without its index, delete
        // it, and then see the index land.
        if let Err(e) = self.b.settle_uploads() {
            tracing::debug!(error = %e, "s3: an upload of a writer that stopped failed");
        }
        if let Some(r) = self.renewer.take() {
            r.stop(self.b);
        }
        // Only a lock still ours goes (an expired one may have been taken over).
        if let Ok(true) = self.b.lock_held_by(&self.owner)
            && let Err(e) = self.b.delete(LOCK)
        {
            tracing::warn!(error = %e, "s3: the bucket's lock stays until it expires");
        }
    }
}

/// A reader's mark on a bucket prefix (`locks/ID.json`), which keeps `gc` away while
/// it reads; removed when dropped.
pub struct ReadLock<'a> {
    b: &'a Bucket,
    /// Its object, if it could be written (not with read-only credentials).
    key: Option<String>,
    /// Until when the mark last written holds.
    expires: Arc<std::sync::atomic::AtomicI64>,
    renewer: Option<Renewer>,
}

impl ReadLock<'_> {
    /// Fails if the mark lapsed (its renewals failed for its whole lifetime): a gc
    /// may since have deleted what this reader reads.
    fn renew(&self) -> Result<(), SyncError> {
        if self.key.is_some()
            && now_secs() >= self.expires.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(err(format!(
                "{}: this reader's mark lapsed (it could not be renewed): stopping",
                self.b.url
            )));
        }
        Ok(())
    }
}

impl Drop for ReadLock<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.stop(self.b);
        }
        if let Some(key) = &self.key
            && let Err(e) = self.b.delete(key)
        {
            tracing::warn!(error = %e, "s3: a reader's mark stays until it expires");
        }
    }
}

/// A bucket prefix holding one volume's snapshots.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    rt: tokio::runtime::Runtime,
    url: String,
    /// The key of an encrypted bucket (`--encrypt-key-file`).
    seal: Option<Seal>,
    /// Requests at once (`--jobs`).
    jobs: usize,
    /// The zstd level new extents are stored at (`--compress`; `None`: as they are).
    compress: Option<i32>,
    /// How long a request is retried for.
    retry_secs: u64,
    /// Pack uploads under way, oldest first: at most `jobs`.
    uploads: std::cell::RefCell<std::collections::VecDeque<Upload>>,
    /// The server's clock less this machine's, in seconds, once read.
    skew: std::cell::OnceCell<i64>,
    /// `s3://BUCKET/PREFIX` as the URL names it, however it is written (a
    /// trailing slash or not): what this machine remembers of it goes by that.
    place: String,
    /// The root object as this handle last read or wrote it: what its next write
    /// of the root is conditional on.
    root_seen: std::cell::RefCell<RootSeen>,
    /// The store answered that it does not implement conditional writes.
    unconditional: std::cell::Cell<bool>,
    /// The endpoint's name, by which this machine keeps the pack indexes of this
    /// prefix (`None`: they are not kept).
    keep_at: Option<String>,
    /// Those kept, once first used (`None` in it: they cannot be kept).
    kept: std::cell::OnceCell<Option<idxcache::IdxCache>>,
    /// `HOME` as the environment gave it.
    home: Option<std::path::PathBuf>,
    /// Where this machine keeps what it knows of buckets, once first used (`None`
    /// in it: nowhere beyond other users' reach).
    keep: std::cell::OnceCell<Option<keep::Dir>>,
}

/// The root object as a handle last saw it ([`Bucket::put_root`]).
#[derive(Clone, Debug, Default)]
enum RootSeen {
    /// Not read yet.
    #[default]
    Unread,
    /// There was none.
    Absent,
    /// This version of it.
    Version(object_store::UpdateVersion),
}

/// A pack (and then its index) being uploaded.
type Upload = tokio::task::JoinHandle<Result<(), SyncError>>;

/// Objects this large or larger are uploaded in parts, `jobs` at a time.
const MULTIPART_FROM: usize = 64 << 20;

/// The size of those parts.
const PART_BYTES: usize = 16 << 20;

/// Requests at once by default.
pub const DEFAULT_JOBS: usize = 8;

/// `--jobs` as given on the command line; else `SNAPFS_S3_JOBS`, else
/// [`DEFAULT_JOBS`].
static JOBS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Makes every bucket this process opens make up to `n` requests at once.
pub fn use_jobs(n: usize) {
    let _ = JOBS.set(n.max(1));
}

/// The key file given on the command line (`--encrypt-key-file`), which every
/// bucket opened by this process then uses; else `SNAPFS_ENCRYPT_KEY_FILE`.
static KEY_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Makes every bucket this process opens use the key in `path` (`--encrypt-key-file`).
pub fn use_key_file(path: &Path) {
    let _ = KEY_FILE.set(path.to_path_buf());
}

/// `--compress` as given on the command line (else `SNAPFS_S3_COMPRESS`, else
/// [`DEFAULT_COMPRESS`]).
static COMPRESS: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();

/// Makes every bucket this process writes store extents compressed at zstd `level`
/// (`None`: as they are).
pub fn use_compression(level: Option<i32>) {
    let _ = COMPRESS.set(level);
}

/// A `--compress` value: `off`, or a zstd level from 1 to 19.
pub fn parse_compression(v: &str) -> Result<Option<i32>, String> {
    match v.trim() {
        "off" | "none" | "0" => Ok(None),
        t => t
            .parse::<i32>()
            .ok()
            .filter(|n| (1..=19).contains(n))
            .map(Some)
            .ok_or_else(|| format!("--compress {v}: give off, or a level from 1 to 19")),
    }
}

/// The root object: the volume and its snapshots, oldest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Root {
    /// Layout version (1, or 2 once compressed extents may be in its packs).
    pub format: u32,
    /// The volume whose snapshots these are (hex).
    pub volume: String,
    /// The volume they are of (hex): the source's origin.
    pub origin: String,
    /// Block size of the volume.
    pub block_size: u32,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<RootSnapshot>,
    /// Counts the root's writes: a root read with a lower one than this machine saw
    /// before was put back (rolled back), and is refused.
    #[serde(default)]
    pub generation: u64,
    /// blake3 (hex) of the root as stored (before sealing) with these 64 digits
    /// written as zeros: checked at every read (absent in roots written before it,
    /// and to be dropped from a root edited by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

/// Where the `check` of root text `b` is, if it has the one given.
fn check_at(b: &[u8], check: &str) -> Option<usize> {
    let field = format!("\"check\": \"{check}\"");
    b.windows(field.len())
        .rposition(|w| w == field.as_bytes())
        .map(|at| at + field.len() - 1 - check.len())
}

/// The checksum of root text `b` whose check is at `at` (64 digits).
fn root_check(b: &[u8], at: usize) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&b[..at]);
    h.update(&[b'0'; 64]);
    h.update(&b[at + 64..]);
    h.finalize().to_hex().to_string()
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
    /// The manifest's blake3 hash (hex) as stored before sealing, checked whenever
    /// it is read (absent in manifests an older snapfs wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Deleted while it was the newest (the base of the next incremental): hidden,
    /// and merged into the next snapshot once one lands.
    #[serde(default)]
    pub deleted: bool,
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
        Self::open_with(url, |k| {
            if k == "SNAPFS_ENCRYPT_KEY_FILE"
                && let Some(p) = KEY_FILE.get()
            {
                return Some(p.to_string_lossy().into_owned());
            }
            if k == "SNAPFS_S3_JOBS"
                && let Some(n) = JOBS.get()
            {
                return Some(n.to_string());
            }
            if k == "SNAPFS_S3_COMPRESS"
                && let Some(c) = COMPRESS.get()
            {
                return Some(c.map_or("off".to_string(), |l| l.to_string()));
            }
            std::env::var(k).ok()
        })
    }

    /// [`Bucket::open`] with the settings `env` gives (by the environment variables'
    /// names) instead of the process's environment.
    pub fn open_with(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Bucket, SyncError> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| err(format!("{url}: not an s3:// URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(err(format!("{url}: no bucket named")));
        }
        // Retries with backoff (5xx, throttling, timeouts, a cut connection): at least
        // 6 s of them, so that a short outage is ridden out, within 4 minutes (or
        // SNAPFS_S3_RETRY_TIMEOUT seconds).
        let retry_secs = match env("SNAPFS_S3_RETRY_TIMEOUT") {
            None => 120,
            Some(v) => v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=RETRY_MAX).contains(n))
                .ok_or_else(|| {
                    err(format!(
                        "SNAPFS_S3_RETRY_TIMEOUT={v}: not a number of seconds from 1 to {RETRY_MAX}"
                    ))
                })?,
        };
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: std::time::Duration::from_millis(500),
                max_backoff: std::time::Duration::from_secs(30),
                base: 3.0,
            },
            max_retries: 12,
            retry_timeout: std::time::Duration::from_secs(retry_secs),
        };
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_retry(retry);
        // The shared files first; the environment's variables win over them. Keys
        // come as a set: the environment's, or else the profile's.
        let env_keys = env("AWS_ACCESS_KEY_ID").is_some();
        // Where the bucket is (the endpoint, else AWS's region): what this machine
        // keeps of it goes by that and the URL.
        let mut endpoint = String::new();
        let mut region = String::new();
        for (key, v) in profile_settings(&env).map_err(|e| err(format!("{url}: {e}")))? {
            if env_keys && key.starts_with("aws_") {
                continue;
            }
            match key {
                "endpoint_url" => endpoint = v.clone(),
                "region" => region = v.clone(),
                _ => {}
            }
            b = match key {
                "endpoint_url" => b.with_allow_http(v.starts_with("http://")).with_endpoint(v),
                "region" => b.with_region(v),
                "aws_access_key_id" => b.with_access_key_id(v),
                "aws_secret_access_key" => b.with_secret_access_key(v),
                "aws_session_token" => b.with_token(v),
                _ => b,
            };
        }
        for (var, key) in [
            (
                "AWS_ACCESS_KEY_ID",
                object_store::aws::AmazonS3ConfigKey::AccessKeyId,
            ),
            (
                "AWS_SECRET_ACCESS_KEY",
                object_store::aws::AmazonS3ConfigKey::SecretAccessKey,
            ),
            (
                "AWS_SESSION_TOKEN",
                object_store::aws::AmazonS3ConfigKey::Token,
            ),
            (
                "AWS_DEFAULT_REGION",
                object_store::aws::AmazonS3ConfigKey::Region,
            ),
            ("AWS_REGION", object_store::aws::AmazonS3ConfigKey::Region),
        ] {
            if let Some(v) = env(var) {
                if var.ends_with("REGION") {
                    region = v.clone();
                }
                b = b.with_config(key, v);
            }
        }
        if let Some(ep) = env("AWS_ENDPOINT_URL_S3")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"))
        {
            endpoint = ep.clone();
            b = b
                .with_allow_http(ep.starts_with("http://"))
                .with_endpoint(ep);
        }
        let store = b
            .build()
            .map_err(|e| err(format!("{url}: {}", one_line(&e))))?;
        let seal = match env("SNAPFS_ENCRYPT_KEY_FILE") {
            Some(p) if p.is_empty() => {
                return Err(err(
                    "SNAPFS_ENCRYPT_KEY_FILE is set but empty: name the key file, or unset it",
                ));
            }
            Some(p) => Some(Seal::from_file(Path::new(&p)).map_err(err)?),
            None => None,
        };
        let jobs = match env("SNAPFS_S3_JOBS") {
            None => DEFAULT_JOBS,
            Some(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| err(format!("--jobs {v}: not a number from 1 to 256")))?,
        };
        let compress = match env("SNAPFS_S3_COMPRESS") {
            None => Some(DEFAULT_COMPRESS),
            Some(v) => parse_compression(&v).map_err(err)?,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("snapfs-s3")
            .enable_all()
            .build()
            .map_err(|e| err(format!("cannot start the S3 client: {e}")))?;
        let place = format!("s3://{bucket}/{}", prefix.trim_matches('/'));
        let home = env("HOME")
            .filter(|h| !h.is_empty())
            .map(std::path::PathBuf::from);
        let keep = env("SNAPFS_S3_INDEX_CACHE").map(|v| v.trim().to_ascii_lowercase());
        let keep_at = match keep.as_deref() {
            Some("off" | "0" | "no" | "false") => None,
            _ if endpoint.is_empty() => Some(format!("aws {region}")),
            _ => Some(endpoint),
        };
        Ok(Bucket {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            rt,
            url: url.to_string(),
            seal,
            jobs,
            compress,
            retry_secs,
            uploads: Default::default(),
            skew: Default::default(),
            keep_at,
            kept: Default::default(),
            home,
            keep: Default::default(),
            place,
            root_seen: Default::default(),
            unconditional: Default::default(),
        })
    }

    /// A handle on `store` itself, for tests of what a store's own behaviour decides.
    #[cfg(test)]
    fn over(store: Arc<dyn ObjectStore>, url: &str) -> Bucket {
        Bucket {
            store,
            prefix: "p".into(),
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            url: url.into(),
            seal: None,
            jobs: 2,
            compress: None,
            retry_secs: 6,
            uploads: Default::default(),
            skew: Default::default(),
            place: url.into(),
            root_seen: Default::default(),
            unconditional: Default::default(),
            keep_at: None,
            kept: Default::default(),
            home: None,
            keep: std::cell::OnceCell::from(None),
        }
    }

    /// Starts uploading `objects` (a pack, then its index) in the background, once
    /// fewer than `jobs` uploads are under way ([`Bucket::settle_uploads`] waits for
    /// them all).
    fn put_later(&self, objects: Vec<(String, Vec<u8>)>) -> Result<(), SyncError> {
        // At most `jobs` uploads, and about 256 MiB of packs, under way.
        let most = self.jobs.clamp(1, (256 << 20) / PACK_BYTES);
        loop {
            let oldest = {
                let mut q = self.uploads.borrow_mut();
                if q.len() < most {
                    break;
                }
                q.pop_front()
            };
            if let Some(h) = oldest {
                self.join(h)?;
            }
        }
        let (store, url) = (self.store.clone(), self.url.clone());
        let objects: Vec<(String, ObjPath, Vec<u8>)> = objects
            .into_iter()
            .map(|(k, v)| (k.clone(), self.path(&k), v))
            .collect();
        let h = self.rt.spawn(async move {
            for (key, path, data) in objects {
                put_to(&*store, &path, data, 2)
                    .await
                    .map_err(|e| failure(&url, "writing", &key, e))?;
            }
            Ok(())
        });
        self.uploads.borrow_mut().push_back(h);
        Ok(())
    }

    fn join(&self, h: Upload) -> Result<(), SyncError> {
        self.rt
            .block_on(h)
            .map_err(|e| err(format!("{}: an upload stopped: {e}", self.url)))?
    }

    /// Waits for every upload under way; the first error, if any (the rest are
    /// waited for all the same).
    fn settle_uploads(&self) -> Result<(), SyncError> {
        let mut first = Ok(());
        loop {
            let Some(h) = self.uploads.borrow_mut().pop_front() else {
                break;
            };
            let r = self.join(h);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Metadata object `key` (the root, a manifest, an index), opened if the bucket
    /// is encrypted; `None` when there is none.
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, SyncError> {
        let Some(data) = self.get(key)? else {
            return Ok(None);
        };
        self.open_meta(key, data).map(Some)
    }

    /// Metadata object `key` as read (`data`), opened if the bucket is encrypted.
    fn open_meta(&self, key: &str, data: Vec<u8>) -> Result<Vec<u8>, SyncError> {
        match (&self.seal, seal::is_sealed(&data)) {
            (None, false) => Ok(data),
            (None, true) => Err(err(format!(
                "{}: {key} is encrypted: give the bucket's key with --encrypt-key-file (or SNAPFS_ENCRYPT_KEY_FILE)",
                self.url
            ))),
            (Some(_), false) => Err(err(format!(
                "{}: {key} is not encrypted, but a key was given: this bucket was synced without --encrypt-key-file",
                self.url
            ))),
            (Some(s), true) => s.open_object(key, &data).ok_or_else(|| {
                err(format!(
                    "{}: {key} does not open with this key (another key, or the object is damaged)",
                    self.url
                ))
            }),
        }
    }

    /// Writes metadata object `key`, sealed if the bucket is encrypted.
    fn put_meta(&self, key: &str, data: Vec<u8>) -> Result<(), SyncError> {
        self.put(key, self.meta_bytes(key, data))
    }

    /// Metadata object `key` as stored: sealed if the bucket is encrypted.
    fn meta_bytes(&self, key: &str, data: Vec<u8>) -> Vec<u8> {
        match &self.seal {
            Some(s) => s.seal_object(key, &data),
            None => data,
        }
    }

    /// Extent `hash`, from the bytes `raw` that index entry `place` names: opened if
    /// the bucket is encrypted, and checked against its hash (`None`: damaged).
    fn extent(&self, place: &Place, hash: &[u8; 32], raw: &[u8]) -> Option<Vec<u8>> {
        let stored = match &self.seal {
            Some(s) => s.open_extent(&place.pack, raw)?,
            None => raw.to_vec(),
        };
        let data = if place.zstd { expand(&stored)? } else { stored };
        (blake3::hash(&data).as_bytes() == hash).then_some(data)
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn fail(&self, what: &str, key: &str, e: object_store::Error) -> SyncError {
        failure(&self.url, what, key, e)
    }
}

/// Writes `data` to `path`: in one request, or for large objects in parts, `jobs`
/// of them at a time.
async fn put_to(
    store: &dyn ObjectStore,
    path: &ObjPath,
    data: Vec<u8>,
    jobs: usize,
) -> Result<(), object_store::Error> {
    if data.len() < MULTIPART_FROM {
        return store.put(path, data.into()).await.map(|_| ());
    }
    let upload = store.put_multipart(path).await?;
    let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    for part in data.chunks(PART_BYTES) {
        if let Err(e) = w.wait_for_capacity(jobs).await {
            // The parts sent are not left behind (billed, and invisible).
            let _ = w.abort().await;
            return Err(e);
        }
        w.write(part);
    }
    w.finish().await.map(|_| ())
}

/// Whether a conditional write failed for the condition itself: the client cannot
/// send it, or the server answered that it does not implement it (rather than
/// ignoring it, as some do).
fn cannot_condition(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotImplemented { .. }) || {
        let text = e.to_string();
        text.contains("NotImplemented") || text.contains("Not Implemented")
    }
}

/// An object store error as one line naming the bucket, the operation and the
/// object.
fn failure(url: &str, what: &str, key: &str, e: object_store::Error) -> SyncError {
    {
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
        err(format!("{url}: {what} {key}: {cause}"))
    }
}

impl Bucket {
    /// The object `key`, or `None` when there is none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, SyncError> {
        Ok(self.get_many(&[key])?.pop().flatten())
    }

    /// The objects `keys` (each `None` when there is none), `jobs` requests at once,
    /// in the order asked. Small objects read one after another each wait a round
    /// trip, and some servers' replies (Garage's, for one) a delayed ACK besides: 40
    /// ms an index.
    /// The first failure ends it (the requests still under way are dropped).
    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, SyncError> {
        Ok(self
            .get_many_tagged(keys)?
            .into_iter()
            .map(|got| got.map(|(data, _)| data))
            .collect())
    }

    /// [`Bucket::get_many`], each object with its tag ([`object_tag`]) as read.
    #[allow(clippy::type_complexity)]
    fn get_many_tagged(&self, keys: &[&str]) -> Result<Vec<Option<(Vec<u8>, String)>>, SyncError> {
        use futures_util::StreamExt;
        let gets = keys.iter().map(|key| self.get_async_tagged(key));
        self.rt.block_on(
            futures_util::stream::iter(gets)
                .buffered(self.jobs.max(1))
                .try_collect(),
        )
    }

    /// The object `key` (`None` when there is none), to await (on the bucket's
    /// runtime).
    fn get_async(
        &self,
        key: &str,
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, SyncError>> + Send + use<> {
        let got = self.get_async_tagged(key);
        async move { Ok(got.await?.map(|(data, _)| data)) }
    }

    /// [`Bucket::get_async`], with the object's tag ([`object_tag`]) as read.
    #[allow(clippy::type_complexity)]
    fn get_async_tagged(
        &self,
        key: &str,
    ) -> impl std::future::Future<Output = Result<Option<(Vec<u8>, String)>, SyncError>> + Send + use<>
    {
        let (store, path) = (self.store.clone(), self.path(key));
        let (url, key) = (self.url.clone(), key.to_string());
        async move {
            let got = match store.get(&path).await {
                Ok(r) => {
                    let tag = object_tag(&r.meta);
                    r.bytes().await.map(|b| Some((b.to_vec(), tag)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            };
            got.map_err(|e| failure(&url, "reading", &key, e))
        }
    }

    /// Bytes `range` of object `key`, to await (on the bucket's runtime).
    fn get_range_async(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> impl std::future::Future<Output = Result<bytes::Bytes, SyncError>> + use<> {
        let (store, path) = (self.store.clone(), self.path(key));
        let (url, key) = (self.url.clone(), key.to_string());
        async move {
            store
                .get_range(&path, range)
                .await
                .map_err(|e| failure(&url, "reading", &key, e))
        }
    }

    /// Writes object `key`.
    fn put(&self, key: &str, data: Vec<u8>) -> Result<(), SyncError> {
        self.rt
            .block_on(put_to(&*self.store, &self.path(key), data, self.jobs))
            .map_err(|e| self.fail("writing", key, e))
    }

    /// The keys under `dir` (relative to the prefix).
    pub fn list(&self, dir: &str) -> Result<Vec<String>, SyncError> {
        Ok(self.list_tagged(dir)?.into_iter().map(|(k, _)| k).collect())
    }

    /// The keys under `dir` (relative to the prefix), each with its size and entity
    /// tag as the listing gives them (what changes when an object is replaced).
    fn list_tagged(&self, dir: &str) -> Result<Vec<(String, String)>, SyncError> {
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
                (
                    k.strip_prefix(&strip).unwrap_or(&k).to_string(),
                    object_tag(&m),
                )
            })
            .collect())
    }

    /// Takes the bucket's lock for `what` (a sync, a delete, gc): one writer at a
    /// time. Refused, naming the holder, while another's lock is unexpired.
    pub fn lock(&self, what: &str) -> Result<Lock<'_>, SyncError> {
        let host = host_name();
        let owner = format!(
            "{host} pid {} ({what}) {}",
            std::process::id(),
            &random_id()[..8]
        );
        for _ in 0..3 {
            let rec = LockRec {
                owner: owner.clone(),
                expires: now_secs() + LOCK_TTL,
                host: host.clone(),
                pid: std::process::id(),
                what: what.to_string(),
            };
            let body = serde_json::to_vec(&rec).expect("encodes");
            // Written only if absent (or, taking over a dead writer's, only if still
            // that one) where the store can say so; either way read back after a
            // moment, so that of two writers racing one wins.
            let mut mode = object_store::PutMode::Create;
            if let Some((v, version, modified)) = self.get_versioned(LOCK)? {
                match serde_json::from_slice::<LockRec>(&v) {
                    // Ours: a write whose answer was lost, and retried.
                    Ok(r) if r.owner == owner => mode = object_store::PutMode::Overwrite,
                    // Held by a live writer: refused.
                    Ok(r) if !self.holder_gone(&r, modified)? => {
                        return Err(err(format!(
                            "{} is locked by {} {} (another sync, delete or gc writes to it); try again later, or delete {LOCK} there if that process is gone",
                            self.url,
                            crate::text::printable(&r.owner.replace('\n', " ")),
                            r.held_until()
                        )));
                    }
                    // Its writer is gone: taken over.
                    _ => mode = object_store::PutMode::Update(version),
                }
            }
            let opts = object_store::PutOptions {
                mode: mode.clone(),
                ..Default::default()
            };
            let res = self.rt.block_on(self.store.put_opts(
                &self.path(LOCK),
                body.clone().into(),
                opts,
            ));
            match res {
                Ok(_) => {}
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => continue,
                Err(e) if cannot_condition(&e) => {
                    if matches!(mode, object_store::PutMode::Update(_)) {
                        self.delete(LOCK)?;
                    }
                    self.put(LOCK, body)?
                }
                Err(e) => return Err(self.fail("locking", LOCK, e)),
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            if self.lock_held_by(&owner)? {
                let expires = Arc::new(std::sync::atomic::AtomicI64::new(rec.expires));
                let lock = Lock {
                    b: self,
                    owner,
                    what: what.to_string(),
                    renewer: Some(spawn_renewer(self, LOCK, rec.clone(), expires.clone())),
                    expires,
                };
                // gc deletes what a reader may be about to read: not while one reads.
                if what == "gc" {
                    self.no_readers()?;
                }
                return Ok(lock);
            }
        }
        Err(err(format!("{}: could not take its lock", self.url)))
    }

    /// Marks the bucket as read by this process for `what` (a restore, fsck, diff),
    /// so that `gc`, which deletes, waits; refused while a gc runs. With credentials
    /// that cannot write, reads go on unmarked (a gc meanwhile may fail them, never
    /// falsify them: every extent is checked).
    pub fn read_lock(&self, what: &str) -> Result<ReadLock<'_>, SyncError> {
        let host = host_name();
        let rec = LockRec {
            owner: format!(
                "{host} pid {} ({what}) {}",
                std::process::id(),
                &random_id()[..8]
            ),
            expires: now_secs() + LOCK_TTL,
            host,
            pid: std::process::id(),
            what: what.to_string(),
        };
        let key = format!("locks/{}.json", random_id());
        let key = match self.put(&key, serde_json::to_vec(&rec).expect("encodes")) {
            Ok(()) => Some(key),
            Err(e) if e.to_string().contains("access denied") => {
                tracing::warn!("s3: read-only credentials: reading without a reader's mark");
                None
            }
            Err(e) => return Err(e),
        };
        let expires = Arc::new(std::sync::atomic::AtomicI64::new(rec.expires));
        let renewer = key
            .as_ref()
            .map(|k| spawn_renewer(self, k, rec.clone(), expires.clone()));
        let lock = ReadLock {
            b: self,
            key,
            expires,
            renewer,
        };
        if let Some((v, _, modified)) = self.get_versioned(LOCK)?
            && let Ok(r) = serde_json::from_slice::<LockRec>(&v)
            && r.what == "gc"
            && !self.holder_gone(&r, modified)?
        {
            return Err(err(format!(
                "{} is being collected by {} {} (snapfs gc); try again once it is done",
                self.url,
                crate::text::printable(&r.owner.replace('\n', " ")),
                r.held_until()
            )));
        }
        Ok(lock)
    }

    /// Fails, naming one, while a reader's mark is live; removes marks whose reader
    /// is gone.
    fn no_readers(&self) -> Result<(), SyncError> {
        match self.live_reader()? {
            Some(r) => Err(err(format!(
                "{} is being read by {} {} (a restore, fsck or diff); gc runs once it is done",
                self.url,
                crate::text::printable(&r.owner.replace('\n', " ")),
                r.held_until()
            ))),
            None => Ok(()),
        }
    }

    /// A live reader's mark, if there is one; removes marks whose reader is gone.
    fn live_reader(&self) -> Result<Option<LockRec>, SyncError> {
        for key in self.list("locks")? {
            let Some((v, _, modified)) = self.get_versioned(&key)? else {
                continue;
            };
            match serde_json::from_slice::<LockRec>(&v) {
                Ok(r) if !self.holder_gone(&r, modified)? => return Ok(Some(r)),
                _ => self.delete(&key)?,
            }
        }
        Ok(None)
    }

    /// Whether the holder of a lock or mark (`rec`, written at `modified` by the
    /// server's clock) is gone: it was a process of this
    /// machine that is no longer running; or its time is up, by its holder's word
    /// and this machine's clock, and it has not been renewed for [`LOCK_QUIET`] by
    /// the server's clock. (So a holder whose clock is behind this machine's keeps
    /// what it holds while it lives: a clock ahead would take it over otherwise.)
    fn holder_gone(&self, rec: &LockRec, modified: i64) -> Result<bool, SyncError> {
        if rec.gone_here() {
            return Ok(true);
        }
        if rec.expires > now_secs() {
            return Ok(false);
        }
        Ok(self.server_now()?.saturating_sub(modified) >= LOCK_QUIET)
    }

    /// Whether the bucket's lock object names `owner` as its holder.
    fn lock_held_by(&self, owner: &str) -> Result<bool, SyncError> {
        Ok(self.get(LOCK)?.is_some_and(|v| LockRec::held_by(&v, owner)))
    }

    /// The server's clock now (in seconds): read once, by writing [`CLOCK`] (with
    /// credentials that cannot write, this machine's clock is taken).
    fn server_now(&self) -> Result<i64, SyncError> {
        if let Some(skew) = self.skew.get() {
            return Ok(now_secs().saturating_add(*skew));
        }
        let skew = match self.put(CLOCK, Vec::new()) {
            Ok(()) => {
                // Against this clock once written: the server's then reads early, if
                // anything, and a holder is taken for gone late, not early.
                let after = now_secs();
                let (_, _, at) = self.get_versioned(CLOCK)?.ok_or_else(|| {
                    err(format!("{}: {CLOCK} is gone as soon as written", self.url))
                })?;
                at.saturating_sub(after)
            }
            Err(e) if e.to_string().contains("access denied") => 0,
            Err(e) => return Err(e),
        };
        let _ = self.skew.set(skew);
        Ok(now_secs().saturating_add(skew))
    }

    /// Writes object `key` under the prefix (for tools and tests: snapfs's own
    /// objects are written by its sessions).
    pub fn put_object(&self, key: &str, data: Vec<u8>) -> Result<(), SyncError> {
        self.put(key, data)
    }

    /// Reads object `key` under the prefix (`None`: there is none).
    pub fn get_object(&self, key: &str) -> Result<Option<Vec<u8>>, SyncError> {
        self.get(key)
    }

    /// Bytes of every object under the prefix.
    pub fn bytes(&self) -> Result<u64, SyncError> {
        let p = (!self.prefix.is_empty()).then(|| ObjPath::from(self.prefix.as_str()));
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(p.as_ref()).try_collect())
            .map_err(|e| self.fail("listing", "", e))?;
        Ok(metas.iter().map(|m| m.size).sum())
    }

    /// The root object, if the prefix holds a volume.
    pub fn root(&self) -> Result<Option<Root>, SyncError> {
        let read = self.root_object()?;
        *self.root_seen.borrow_mut() = match &read {
            None => RootSeen::Absent,
            Some((_, v)) => RootSeen::Version(v.clone()),
        };
        match read.map(|(b, _)| b) {
            None => Ok(None),
            Some(b) => {
                let root: Root = serde_json::from_slice(&b)
                    .map_err(|e| err(format!("{}: {ROOT} is damaged: {e}", self.url)))?;
                if let Some(c) = &root.check
                    && (c.len() != 64 || check_at(&b, c).is_none_or(|at| root_check(&b, at) != *c))
                {
                    return Err(err(format!(
                        "{}: {ROOT} is damaged: its checksum does not match (a root edited by hand must drop \"check\")",
                        self.url
                    )));
                }
                if root.block_size == 0 || root.block_size > 1 << 20 {
                    return Err(err(format!(
                        "{}: {ROOT} is damaged: block size {}",
                        self.url, root.block_size
                    )));
                }
                if !(1..=LAYOUT).contains(&root.format) {
                    return Err(err(format!(
                        "{}: layout version {} (this snapfs reads 1 to {LAYOUT}: a newer snapfs wrote it)",
                        self.url, root.format
                    )));
                }
                self.saw_generation(&root)?;
                Ok(Some(root))
            }
        }
    }

    /// The root object (opened) and its version, if there is one.
    fn root_object(&self) -> Result<Option<(Vec<u8>, object_store::UpdateVersion)>, SyncError> {
        match self.get_versioned(ROOT)? {
            None => Ok(None),
            Some((b, v, _)) => Ok(Some((self.open_meta(ROOT, b)?, v))),
        }
    }

    /// Object `key` as stored, its version (for a write conditional on it), and
    /// when it was last written by the server's clock; `None` when there is none.
    #[allow(clippy::type_complexity)]
    fn get_versioned(
        &self,
        key: &str,
    ) -> Result<Option<(Vec<u8>, object_store::UpdateVersion, i64)>, SyncError> {
        let got = self.rt.block_on(async {
            match self.store.get(&self.path(key)).await {
                Ok(r) => {
                    let v = object_store::UpdateVersion {
                        e_tag: r.meta.e_tag.clone(),
                        version: r.meta.version.clone(),
                    };
                    let modified = r.meta.last_modified.timestamp();
                    r.bytes().await.map(|b| Some((b.to_vec(), v, modified)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map_err(|e| self.fail("reading", key, e))
    }

    /// Writes the root, one generation on: only over the root as this handle last
    /// read or wrote it, where the store can make a write conditional (so a writer
    /// whose lock was taken over while it was not looking, which a clock or a
    /// pause can hide from it, cannot put back a root another writer has replaced:
    /// that one's gc could then be deleting what it names).
    fn put_root(&self, root: &mut Root) -> Result<(), SyncError> {
        root.generation += 1;
        // A bucket this snapfs writes may get compressed extents, which a snapfs
        // that reads only layout 1 would take for damage: it is told apart.
        root.format = LAYOUT;
        root.check = Some("0".repeat(64));
        let mut text = serde_json::to_vec_pretty(root).expect("encodes");
        let at = check_at(&text, &"0".repeat(64)).expect("the check is written");
        let check = root_check(&text, at);
        text[at..at + 64].copy_from_slice(check.as_bytes());
        root.check = Some(check);
        self.put_root_text(&text)?;
        self.saw_generation(root)
    }

    fn put_root_text(&self, text: &[u8]) -> Result<(), SyncError> {
        use object_store::PutMode;
        let data = self.meta_bytes(ROOT, text.to_vec());
        let mode = match &*self.root_seen.borrow() {
            _ if self.unconditional.get() => PutMode::Overwrite,
            RootSeen::Absent => PutMode::Create,
            RootSeen::Version(v) if v.e_tag.is_some() => PutMode::Update(v.clone()),
            _ => PutMode::Overwrite,
        };
        let path = self.path(ROOT);
        let put = |mode: PutMode| {
            let opts = object_store::PutOptions {
                mode,
                ..Default::default()
            };
            self.rt
                .block_on(self.store.put_opts(&path, data.clone().into(), opts))
        };
        // The client does not retry a conditional write after a timeout or a cut
        // connection (it is not idempotent): tried again here, 4 times over 15 s (a
        // write that landed is then found, below).
        let mut tries = 0;
        let mut wait = std::time::Duration::from_secs(1);
        let res = loop {
            match put(mode.clone()) {
                // A store that cannot make the write conditional: written as it is,
                // and from then on.
                Err(e) if cannot_condition(&e) => {
                    self.unconditional.set(true);
                    break put(PutMode::Overwrite);
                }
                Err(
                    e @ (object_store::Error::Generic { .. }
                    | object_store::Error::JoinError { .. }),
                ) if tries < 4 => {
                    tracing::warn!(error = %one_line(&e), "s3: writing the root failed; trying again");
                    std::thread::sleep(wait);
                    tries += 1;
                    wait *= 2;
                }
                r => break r,
            }
        };
        match res {
            Ok(r) => {
                *self.root_seen.borrow_mut() = RootSeen::Version(object_store::UpdateVersion {
                    e_tag: r.e_tag,
                    version: r.version,
                });
                Ok(())
            }
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => {
                // This write landed and its answer was lost (the retry then finds
                // the root changed, by itself): taken as written.
                if let Some((now, v)) = self.root_object()?
                    && now == text
                {
                    *self.root_seen.borrow_mut() = RootSeen::Version(v);
                    return Ok(());
                }
                Err(err(format!(
                    "{}: {ROOT} changed since this writer read it (another writer took its lock over meanwhile): nothing more is written",
                    self.url
                )))
            }
            Err(e) => Err(self.fail("writing", ROOT, e)),
        }
    }

    /// Where this machine keeps what it knows of buckets: `HOME/.cache/snapfs/buckets`,
    /// else (`HOME` unset, or not beyond other users' reach: root run with another
    /// user's `HOME`, as `sudo -E` leaves it) the same in the user database's home.
    fn keep_dir(&self) -> Option<&keep::Dir> {
        self.keep
            .get_or_init(|| {
                let passwd = passwd_home();
                if let Some(h) = &self.home {
                    match keep::Dir::buckets(h) {
                        Ok(d) => return Some(d),
                        Err(why) if passwd.as_ref() != Some(h) => warn_once(&format!(
                            "s3: HOME is not beyond other users' reach ({why}): what this machine keeps of buckets goes in the user database's home"
                        )),
                        Err(_) => {}
                    }
                }
                match passwd.ok_or_else(|| "this user has no home directory".to_string()).and_then(|h| keep::Dir::buckets(&h)) {
                    Ok(d) => Some(d),
                    Err(why) => {
                        warn_once(&format!(
                            "s3: nothing is kept of buckets on this machine ({why}): a root put back from an older copy is not noticed, and every pack index is read each time"
                        ));
                        None
                    }
                }
            })
            .as_ref()
    }

    /// The name of the file in [`Bucket::keep_dir`] that holds the highest
    /// generation of the root of `url`'s volume this machine has seen.
    fn generation_name(url: &str, root: &Root) -> String {
        let id = blake3::hash(format!("{url}\n{}", root.volume).as_bytes());
        format!("{}.json", &id.to_hex()[..32])
    }

    /// Refuses a root older than one this machine saw (put back by someone who can
    /// write the bucket: the snapshots after it would vanish, and a gc would delete
    /// their data); remembers a newer one.
    fn saw_generation(&self, root: &Root) -> Result<(), SyncError> {
        let Some(dir) = self.keep_dir() else {
            return Ok(());
        };
        let file = Self::generation_name(&self.place, root);
        // What a file says (0: there is none). One that cannot be read or is damaged
        // stops the command: taking it for 0 would let a rolled-back root through.
        let read = |f: &str| -> Result<u64, SyncError> {
            let damaged = |why: String| {
                err(format!(
                    "{}: {why}: delete it to accept the bucket as it is (or, if root wrote it, give it to this user with chown to keep what it says)",
                    dir.path.join(f).display()
                ))
            };
            let Some(t) = dir.read(f, 64 << 10).map_err(|e| damaged(e.to_string()))? else {
                return Ok(0);
            };
            // Empty: a write torn by a crash before these files were synced.
            if t.is_empty() {
                tracing::warn!(file = %dir.path.join(f).display(), "s3: a generation file is empty (a write cut short): taken for none");
                return Ok(0);
            }
            serde_json::from_slice::<serde_json::Value>(&t)
                .ok()
                .and_then(|v| v["generation"].as_u64())
                .ok_or_else(|| damaged("damaged (no generation in it)".into()))
        };
        // (Before 2026-12-05 the file went by the URL as written: read too.)
        let files: Vec<String> = std::iter::once(file.clone())
            .chain(Some(Self::generation_name(&self.url, root)).filter(|f| *f != file))
            .collect();
        let said = files
            .iter()
            .map(|f| read(f))
            .collect::<Result<Vec<u64>, SyncError>>()?;
        let seen = said.iter().copied().max().unwrap_or(0);
        if root.generation < seen {
            let names: Vec<String> = files
                .iter()
                .zip(&said)
                .filter(|(_, g)| **g > root.generation)
                .map(|(f, _)| dir.path.join(f).display().to_string())
                .collect();
            return Err(err(format!(
                "{}: its root went back from generation {seen} to {} (put back from an older copy, or rolled back by someone who can write the bucket): refused; if that is what you meant, delete {}",
                self.url,
                root.generation,
                names.join(" and ")
            )));
        }
        if root.generation > said[0] {
            let body = serde_json::json!({
                "url": self.url,
                "volume": root.volume,
                "generation": root.generation,
            });
            if let Err(e) = dir.write(&file, &[body.to_string().as_bytes()], true) {
                tracing::warn!(error = %e, file = %dir.path.join(&file).display(),
                    "s3: cannot remember the root's generation");
                return Ok(());
            }
        }
        // The file by the URL as written goes once the one by place holds as much.
        if let Some(legacy) = files.get(1) {
            dir.unlink(legacy);
        }
        Ok(())
    }

    /// Deletes object `key` (gone already is fine).
    pub fn delete(&self, key: &str) -> Result<(), SyncError> {
        match self.rt.block_on(self.store.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail("deleting", key, e)),
        }
    }

    /// The batches of records of manifest `s`, one at a time, from `stored` as
    /// [`Bucket::manifests`] gives it: what is held is the object as stored
    /// (compressed) and one batch, not the whole of its records.
    fn batches(
        &self,
        s: &RootSnapshot,
        stored: std::sync::Arc<[u8]>,
    ) -> Result<ManifestBatches, SyncError> {
        ManifestBatches::over(stored, &self.url, &s.manifest, Some(s.records))
    }

    /// The manifests of `snaps`, as stored (opened if the bucket is encrypted, to
    /// read with [`ManifestBatches::over`] as many times as needed), in order, each
    /// with its snapshot: read ahead of
    /// their use, up to `jobs` at once, so that a long history does not wait a round
    /// trip for each in turn. What is read ahead is bounded (in records, as the root
    /// counts them): at most [`MANIFESTS_AHEAD`] besides the one to use next.
    fn manifests<'s>(&self, snaps: &'s [RootSnapshot]) -> Manifests<'_, 's> {
        Manifests {
            b: self,
            snaps: snaps.iter(),
            ahead: std::collections::VecDeque::new(),
        }
    }

    /// Manifest `s` as read (`data`; `None`: there was none), opened if the bucket is
    /// encrypted and checked against the hash the root names.
    fn checked_manifest(
        &self,
        s: &RootSnapshot,
        data: Option<Vec<u8>>,
    ) -> Result<std::sync::Arc<[u8]>, SyncError> {
        let key = &s.manifest;
        let stored = data
            .map(|d| self.open_meta(key, d))
            .transpose()?
            .ok_or_else(|| err(format!("{}: manifest {key} is missing", self.url)))?;
        if let Some(want) = &s.hash
            && blake3::hash(&stored).to_hex().as_str() != want.as_str()
        {
            return Err(err(format!(
                "{}: manifest {key} is damaged: its hash is not the one the root names",
                self.url
            )));
        }
        Ok(stored.into())
    }

    /// The extents gc found in no pack index, for a sync to ask for (none: no
    /// list; a damaged one is passed over: gc writes it again).
    fn repair_list(&self) -> Result<Vec<[u8; 32]>, SyncError> {
        let b = match self.get_meta(REPAIR) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(Vec::new()),
            Err(e) => {
                tracing::warn!(error = %e, "sync: passed over");
                return Ok(Vec::new());
            }
        };
        if b.len() % 32 != 0 {
            tracing::warn!(url = %self.url, "sync: {REPAIR} is damaged: passed over");
            return Ok(Vec::new());
        }
        Ok(b.chunks_exact(32)
            .map(|h| h.try_into().expect("32 bytes"))
            .collect())
    }

    /// Lays snapshot `s`'s records (from its manifest as stored, `stored`) over `map`
    /// (a later record wins; `None`: absent). A whole snapshot's (no base) replace
    /// what `map` held.
    fn overlay(
        &self,
        s: &RootSnapshot,
        stored: std::sync::Arc<[u8]>,
        map: &mut Overlay,
    ) -> Result<(), SyncError> {
        if s.base.is_none() {
            map.clear();
        }
        for batch in self.batches(s, stored)? {
            for r in batch? {
                map.insert((r.ino, r.kind, r.sub, r.name), r.payload);
            }
        }
        Ok(())
    }

    /// Uploads `records` as a new manifest; its key and hash.
    fn put_manifest(&self, records: Vec<Record>) -> Result<(String, String), SyncError> {
        let key = format!("manifests/{}", random_id());
        let hash = self.put_manifest_at(&key, ManifestWriter::of(records)?)?;
        Ok((key, hash))
    }

    /// Writes manifest `key` of the batches given `w`, sealed if the bucket is
    /// encrypted; its hash, for the root.
    fn put_manifest_at(&self, key: &str, w: ManifestWriter) -> Result<String, SyncError> {
        let data = w.finish()?;
        let hash = blake3::hash(&data).to_hex().to_string();
        self.put_meta(key, data)?;
        Ok(hash)
    }

    /// Merges snapshot `i` (not the newest) into the one after it, whose manifest
    /// then holds the changes from `i`'s base: `i` is gone from `root` (not yet
    /// written). The manifests replaced, to delete once the root is written.
    fn merge_out(&self, root: &mut Root, i: usize) -> Result<Vec<String>, SyncError> {
        let pair = &root.snapshots[i..=i + 1];
        let mut m = Merge::new(&pair[0]);
        for (s, stored) in self.manifests(pair) {
            m.lay(self, s, stored?)?;
        }
        let gone = vec![pair[0].manifest.clone(), pair[1].manifest.clone()];
        let (records, base) = m.finish();
        let count = records.len() as u64;
        let (key, hash) = self.put_manifest(records)?;
        let n = &mut root.snapshots[i + 1];
        n.manifest = key;
        n.hash = Some(hash);
        n.base = base;
        n.records = count;
        root.snapshots.remove(i);
        Ok(gone)
    }

    /// Merges every deleted snapshot that is not the newest into the next, writes
    /// the root, then deletes the manifests replaced. On an error `root` is as it
    /// was, unless the root was written: what fails after that (deleting the
    /// manifests replaced, which gc deletes otherwise) is only warned of.
    fn settle_deleted(&self, root: &mut Root, lock: &Lock<'_>) -> Result<(), SyncError> {
        let mut next = root.clone();
        let mut gone = Vec::new();
        while let Some(i) = next
            .snapshots
            .iter()
            .position(|s| s.deleted)
            .filter(|&i| i + 1 < next.snapshots.len())
        {
            lock.renew()?;
            gone.extend(self.merge_out(&mut next, i)?);
        }
        if gone.is_empty() {
            return Ok(());
        }
        lock.check()?;
        self.put_root(&mut next)?;
        *root = next;
        // A reader that marked the bucket before this root may still read the
        // manifests replaced: they are then left to gc. (One marking after this
        // check reads the new root.)
        let deleted = self.live_reader().and_then(|reader| match reader {
            Some(_) => Ok(()),
            None => gone.iter().try_for_each(|key| self.delete(key)),
        });
        if let Err(e) = deleted {
            tracing::warn!(error = %e, "s3: manifests merged away stay until `snapfs gc`");
        }
        Ok(())
    }

    /// The pack indexes this machine keeps of this prefix, if it keeps them.
    fn kept(&self) -> Option<&idxcache::IdxCache> {
        self.kept
            .get_or_init(|| {
                let at = self.keep_at.as_ref()?;
                idxcache::IdxCache::open(self.keep_dir()?, at, &self.place)
            })
            .as_ref()
    }

    /// Every extent the packs hold: where each is (from the indexes this machine
    /// keeps, reading those it does not).
    fn index(&self) -> Result<HashMap<[u8; 32], Place>, SyncError> {
        Ok(self.index_and_lost(true)?.0)
    }

    /// Every extent the packs hold, and the packs whose index is there but whose
    /// data is not (deleted behind snapfs's back, or lost), with the extents they
    /// held that no other pack does. With `kept`, the indexes this machine keeps
    /// are used while the bucket lists them unchanged (fsck reads them all).
    #[allow(clippy::type_complexity)]
    fn index_and_lost(
        &self,
        kept: bool,
    ) -> Result<(HashMap<[u8; 32], Place>, Vec<(String, Vec<[u8; 32]>)>), SyncError> {
        let listed = self.list_tagged("packs")?;
        let tags: HashMap<&str, &str> = listed
            .iter()
            .map(|(k, t)| (k.as_str(), t.as_str()))
            .collect();
        let present: std::collections::HashSet<&str> = tags
            .keys()
            .copied()
            .filter(|k| k.ends_with(".pack"))
            .collect();
        let kept = if kept { self.kept() } else { None };
        let mut out = HashMap::new();
        let mut lost: Vec<(String, Vec<[u8; 32]>)> = Vec::new();
        self.each_index(
            listed.iter().map(|(k, _)| k.as_str()),
            kept.map(|c| (c, &tags)),
            || Ok(()),
            |key, entries| {
                Self::take_index(key, entries, &present, &mut out, &mut lost);
                Ok(())
            },
        )?;
        if let Some(c) = kept {
            c.retain(&tags.keys().filter_map(|k| idx_id(k)).collect());
        }
        for (_, hashes) in &mut lost {
            hashes.retain(|h| !out.contains_key(h));
        }
        Ok((out, lost))
    }

    /// Lays pack index `key` (its `entries`, if it is there) over `out`, or over
    /// `lost` when its pack is not among the `present` ones.
    fn take_index(
        key: &str,
        entries: Option<Vec<IdxEntry>>,
        present: &std::collections::HashSet<&str>,
        out: &mut HashMap<[u8; 32], Place>,
        lost: &mut Vec<(String, Vec<[u8; 32]>)>,
    ) {
        let id = key.strip_suffix(".idx").expect("an index key");
        let pack: std::sync::Arc<str> = format!("{id}.pack").into();
        let Some(entries) = entries else {
            return;
        };
        let here = present.contains(&*pack);
        let mut gone = Vec::new();
        for (hash, offset, len, zstd) in entries {
            if !here {
                gone.push(hash);
                continue;
            }
            out.insert(
                hash,
                Place {
                    pack: pack.clone(),
                    offset,
                    len,
                    zstd,
                },
            );
        }
        if !here {
            lost.push((pack.to_string(), gone));
        }
    }
}

/// One entry of a pack's index: an extent's hash, its offset and stored length in
/// the pack, and whether it is stored compressed.
type IdxEntry = ([u8; 32], u64, u32, bool);

/// What changes when an object is replaced: its size and entity tag (or, from a
/// store that gives no entity tag, its time of writing).
fn object_tag(m: &object_store::ObjectMeta) -> String {
    match &m.e_tag {
        Some(e) => format!("{} {e}", m.size),
        None => format!("{} {}", m.size, m.last_modified.timestamp_micros()),
    }
}

/// The pack id of index key `packs/ID.idx`, if it is one snapfs writes (letters
/// and digits): what names a kept index on this machine, so never a path.
fn idx_id(key: &str) -> Option<&str> {
    let id = key.strip_prefix("packs/")?.strip_suffix(".idx")?;
    is_pack_id(id).then_some(id)
}

/// Whether `id` has the form of the pack ids snapfs writes: 1 to 64 letters and
/// digits.
fn is_pack_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|c| c.is_ascii_alphanumeric())
}

/// A pack index as stored: per entry, hash, offset, and the length word (the stored
/// length, with [`IDX_ZSTD`] set for a compressed extent); [`Bucket::read_idx`]
/// reads it back.
fn encode_idx(entries: &[IdxEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 44);
    for &(hash, offset, len, zstd) in entries {
        out.extend_from_slice(&hash);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(len | if zstd { IDX_ZSTD } else { 0 }).to_le_bytes());
    }
    out
}

/// Records by key (inode, kind, sub, name), as manifests laid over one another leave
/// them (`None`: absent).
type Overlay = std::collections::BTreeMap<RecordKey, Option<Vec<u8>>>;

/// The records of manifests laid over one another (`map`), as one manifest: of
/// changes, or when `whole` (the first of them had no base) of every record, so
/// only present ones.
fn merged(map: Overlay, whole: bool) -> Vec<Record> {
    map.into_iter()
        .filter(|(_, p)| !whole || p.is_some())
        .map(|((ino, kind, sub, name), payload)| Record {
            ino,
            kind,
            sub,
            name,
            payload,
        })
        .collect()
}

/// The manifests of snapshots in a row laid over one another, as one manifest from
/// the first one's base: what deleting all but the last of them leaves
/// ([`Bucket::merge_out`], and a restore passing over snapshots deleted but not yet
/// merged away).
struct Merge {
    map: Overlay,
    /// The first one's base; none once one of them has none (a whole snapshot
    /// replaces all before it).
    base: Option<String>,
}

impl Merge {
    fn new(first: &RootSnapshot) -> Merge {
        Merge {
            map: Overlay::new(),
            base: first.base.clone(),
        }
    }

    /// Lays snapshot `s`'s manifest (as stored, `stored`) over the others.
    fn lay(
        &mut self,
        b: &Bucket,
        s: &RootSnapshot,
        stored: std::sync::Arc<[u8]>,
    ) -> Result<(), SyncError> {
        if s.base.is_none() {
            self.base = None;
        }
        b.overlay(s, stored, &mut self.map)
    }

    /// The merged manifest's records, and its base.
    fn finish(self) -> (Vec<Record>, Option<String>) {
        let whole = self.base.is_none();
        (merged(self.map, whole), self.base)
    }
}

/// A manifest being written: its batches of records as frames, compressed (zstd)
/// as they come, so what is held is the compressed manifest, not its records.
struct ManifestWriter {
    frames: FrameWriter<zstd::stream::write::Encoder<'static, Vec<u8>>>,
    batches: u64,
}

/// A reader that fails, rather than ends, where what it reads passes `left` bytes
/// (a manifest expanding past [`MANIFEST_MAX`]: its end, cut there, might fall
/// between two batches and read as whole).
struct Capped<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            let mut one = [0u8; 1];
            return match self.inner.read(&mut one)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(format!(
                    "it expands past {} GiB",
                    MANIFEST_MAX >> 30
                ))),
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

impl ManifestWriter {
    fn new() -> Result<Self, SyncError> {
        let mut z = zstd::stream::write::Encoder::new(ZSTD_MAGIC.to_vec(), 3)
            .map_err(|e| err(format!("compressing a manifest: {e}")))?;
        // The frame checks itself too (for a root that lost the manifest's hash).
        z.include_checksum(true)
            .map_err(|e| err(format!("compressing a manifest: {e}")))?;
        Ok(ManifestWriter {
            frames: FrameWriter::new(z, None),
            batches: 0,
        })
    }

    /// A manifest of `records`, cut into batches.
    fn of(records: Vec<Record>) -> Result<Self, SyncError> {
        let mut w = ManifestWriter::new()?;
        for chunk in super::session::batches(records) {
            w.push(chunk)?;
        }
        Ok(w)
    }

    fn push(&mut self, records: Vec<Record>) -> Result<(), SyncError> {
        self.frames.send(&Frame::Records {
            batch: self.batches,
            records,
        })?;
        self.batches += 1;
        if self.frames.wire_bytes > MANIFEST_MAX {
            return Err(err(format!(
                "a snapshot's records pass {} GiB, more than a bucket's manifest holds",
                MANIFEST_MAX >> 30
            )));
        }
        Ok(())
    }

    /// The manifest as stored (before sealing): the magic, then one zstd frame.
    fn finish(self) -> Result<Vec<u8>, SyncError> {
        self.frames
            .into_inner()
            .finish()
            .map_err(|e| err(format!("compressing a manifest: {e}")))
    }
}

/// Records of manifests [`Bucket::manifests`] may hold read ahead of their use.
const MANIFESTS_AHEAD: u64 = 1 << 20;

/// The manifests of some snapshots, read ahead ([`Bucket::manifests`]).
struct Manifests<'b, 's> {
    b: &'b Bucket,
    /// Those not yet asked for.
    snaps: std::slice::Iter<'s, RootSnapshot>,
    /// Those asked for, in order, and their reads.
    ahead: std::collections::VecDeque<(&'s RootSnapshot, ObjectRead)>,
}

/// A read of an object under way.
type ObjectRead = tokio::task::JoinHandle<Result<Option<Vec<u8>>, SyncError>>;

impl<'s> Iterator for Manifests<'_, 's> {
    type Item = (&'s RootSnapshot, Result<std::sync::Arc<[u8]>, SyncError>);

    fn next(&mut self) -> Option<Self::Item> {
        // The next one's read, and more while the bound allows.
        while self.ahead.len() < self.b.jobs.max(1) {
            let Some(s) = self.snaps.as_slice().first() else {
                break;
            };
            let held = (self.ahead.iter()).fold(0u64, |n, (a, _)| n.saturating_add(a.records));
            if !self.ahead.is_empty() && held.saturating_add(s.records) > MANIFESTS_AHEAD {
                break;
            }
            self.snaps.next();
            let read = self.b.rt.spawn(self.b.get_async(&s.manifest));
            self.ahead.push_back((s, read));
        }
        let (s, read) = self.ahead.pop_front()?;
        let data = match self.b.rt.block_on(read) {
            Ok(got) => got,
            Err(e) => Err(err(format!("{}: reading {}: {e}", self.b.url, s.manifest))),
        };
        Some((s, data.and_then(|d| self.b.checked_manifest(s, d))))
    }
}

impl Drop for Manifests<'_, '_> {
    fn drop(&mut self) {
        // Reads no one will use: stopped.
        for (_, read) in &self.ahead {
            read.abort();
        }
    }
}

/// The batches of records of a manifest, read one at a time
/// ([`Bucket::batches`]).
pub(crate) struct ManifestBatches {
    frames: FrameReader<Box<dyn Read + Send>>,
    /// The URL and key, for errors.
    what: String,
    done: bool,
    /// The records it holds, as its root says (`None`: not known).
    records: Option<u64>,
    /// The records read so far.
    seen: u64,
}

impl ManifestBatches {
    /// The batches of manifest `key` of bucket `url` from `stored`, as
    /// [`Bucket::manifests`] gives it.
    /// `records`: how many it holds (as the root says; `None`: not known), checked
    /// as it is read, so that one cut short or run on is named, not taken as whole.
    fn over(
        stored: std::sync::Arc<[u8]>,
        url: &str,
        key: &str,
        records: Option<u64>,
    ) -> Result<Self, SyncError> {
        let what = format!("{url}: manifest {key}");
        let zstd = stored.starts_with(ZSTD_MAGIC);
        let mut c = std::io::Cursor::new(stored);
        let bytes: Box<dyn Read + Send> = if zstd {
            c.set_position(ZSTD_MAGIC.len() as u64);
            Box::new(Capped {
                inner: zstd::stream::read::Decoder::new(c)
                    .map_err(|e| err(format!("{what} is damaged: {e}")))?,
                left: MANIFEST_MAX,
            })
        } else {
            Box::new(c)
        };
        Ok(ManifestBatches {
            frames: FrameReader::new(bytes, None),
            what,
            done: false,
            records,
            seen: 0,
        })
    }
}

impl Iterator for ManifestBatches {
    type Item = Result<Vec<Record>, SyncError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let res = match self.frames.read_frame() {
            Ok(None) => match self.records {
                Some(n) if n != self.seen => Some(Err(err(format!(
                    "{} is damaged: it holds {} records, and its root says {n}",
                    self.what, self.seen
                )))),
                _ => None,
            },
            Ok(Some(Frame::Records { records, .. })) => {
                self.seen = self.seen.saturating_add(records.len() as u64);
                match self.records {
                    Some(n) if self.seen > n => Some(Err(err(format!(
                        "{} is damaged: it holds more records than the {n} its root says",
                        self.what
                    )))),
                    _ => Some(Ok(records)),
                }
            }
            Ok(Some(f)) => Some(Err(err(format!(
                "{} is damaged: {}",
                self.what,
                super::wire::type_name(f.encode().0)
            )))),
            Err(e) => Some(Err(err(format!("{} is damaged: {e}", self.what)))),
        };
        self.done = !matches!(res, Some(Ok(_)));
        res
    }
}

impl Bucket {
    /// The entries of pack index `key` (`None`: it is gone).
    fn read_idx(&self, key: &str) -> Result<Option<Vec<IdxEntry>>, SyncError> {
        let Some(b) = self.get_meta(key)? else {
            return Ok(None);
        };
        self.decode_idx(key, b).map(Some)
    }

    /// Calls `each` with every pack index among `keys` (a listing of `packs/`), in
    /// order, `None` for one gone meanwhile. They are read a few hundred at a time
    /// (`jobs` at once), so that what is held undecoded stays small, and `between`
    /// runs before each few hundred. With `kept` (the indexes this machine keeps,
    /// and the listing's tags), those kept under the tag listed are not read again,
    /// and those read are kept.
    fn each_index<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k str>,
        kept: Option<(&idxcache::IdxCache, &HashMap<&str, &str>)>,
        mut between: impl FnMut() -> Result<(), SyncError>,
        mut each: impl FnMut(&'k str, Option<Vec<IdxEntry>>) -> Result<(), SyncError>,
    ) -> Result<(), SyncError> {
        let idx_keys: Vec<&str> = keys.into_iter().filter(|k| k.ends_with(".idx")).collect();
        for chunk in idx_keys.chunks(256) {
            between()?;
            for (key, entries) in chunk.iter().zip(self.read_idxs(chunk, kept)?) {
                each(key, entries)?;
            }
        }
        Ok(())
    }

    /// The pack indexes `keys` (each `None` when there is none), read `jobs` at a
    /// time, in the order asked; with `kept`, as [`Bucket::each_index`] says.
    fn read_idxs(
        &self,
        keys: &[&str],
        kept: Option<(&idxcache::IdxCache, &HashMap<&str, &str>)>,
    ) -> Result<Vec<Option<Vec<IdxEntry>>>, SyncError> {
        let open = |key: &str, data: Vec<u8>| {
            self.open_meta(key, data)
                .and_then(|b| self.decode_idx(key, b))
        };
        // Where indexes are kept: the cache, and the pack id and the bucket's tag of
        // `key` as listed.
        fn listed<'a>(
            kept: Option<(&'a idxcache::IdxCache, &HashMap<&str, &'a str>)>,
            key: &'a str,
        ) -> Option<(&'a idxcache::IdxCache, &'a str, &'a str)> {
            let (cache, tags) = kept?;
            Some((cache, idx_id(key)?, *tags.get(key)?))
        }
        // Those kept under the tag listed, opened and decoded; a kept copy that does
        // not open or decode is dropped, and read again.
        let mut out: Vec<Option<Option<Vec<IdxEntry>>>> = keys
            .iter()
            .map(|key| {
                let (cache, id, tag) = listed(kept, key)?;
                match open(key, cache.get(id, tag)?) {
                    Ok(entries) => Some(Some(entries)),
                    Err(_) => {
                        cache.drop_kept(id);
                        None
                    }
                }
            })
            .collect();
        let ask: Vec<&str> = keys
            .iter()
            .zip(&out)
            .filter(|(_, o)| o.is_none())
            .map(|(key, _)| *key)
            .collect();
        let mut read = self.get_many_tagged(&ask)?.into_iter().zip(&ask);
        for slot in out.iter_mut().filter(|o| o.is_none()) {
            let (got, key) = read.next().expect("one read for each not kept");
            let Some((data, got_tag)) = got else {
                *slot = Some(None);
                continue;
            };
            // Kept as read under the tag listed (not one replaced between the listing
            // and the read); dropped again if it does not open and decode.
            let keep = listed(kept, key).filter(|(_, _, tag)| *tag == got_tag);
            if let Some((cache, id, tag)) = keep {
                cache.put(id, tag, &data);
            }
            let entries = open(key, data).inspect_err(|_| {
                if let Some((cache, id, _)) = keep {
                    cache.drop_kept(id);
                }
            })?;
            *slot = Some(Some(entries));
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("every index read or kept"))
            .collect())
    }

    /// Pack index `key` as stored (opened), decoded.
    fn decode_idx(&self, key: &str, b: Vec<u8>) -> Result<Vec<IdxEntry>, SyncError> {
        if !b.len().is_multiple_of(44) {
            return Err(err(format!("{}: {key} is damaged", self.url)));
        }
        Ok(b.chunks_exact(44)
            .map(|e| {
                let len = u32::from_le_bytes(e[40..44].try_into().expect("4"));
                (
                    e[..32].try_into().expect("32"),
                    u64::from_le_bytes(e[32..40].try_into().expect("8")),
                    len & !IDX_ZSTD,
                    len & IDX_ZSTD != 0,
                )
            })
            .collect())
    }
}

/// The bytes a compressed extent's zstd frame holds (`None`: it does not expand, or
/// to more than the largest block, as a hostile bucket's might).
fn expand(frame: &[u8]) -> Option<Vec<u8>> {
    zstd::bulk::decompress(frame, crate::store::schema::MAX_BLOCK_SIZE as usize).ok()
}

/// Where an extent is in the bucket.
#[derive(Clone, Debug)]
struct Place {
    /// Its pack's key, shared by every extent of the pack.
    pack: std::sync::Arc<str>,
    offset: u64,
    /// Its stored length.
    len: u32,
    /// Stored as a zstd frame of its bytes.
    zstd: bool,
}

/// The settings of the AWS profile in force (`AWS_PROFILE`, else `default`) from the
/// shared files (`AWS_CONFIG_FILE` or `~/.aws/config`, then
/// `AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`, which wins), as (key,
/// value): `region`, `endpoint_url`, `aws_access_key_id`, `aws_secret_access_key`,
/// `aws_session_token`. A profile named by `AWS_PROFILE` that neither file has is an
/// error; missing files are not.
fn profile_settings(
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<(&'static str, String)>, String> {
    const KEYS: [&str; 5] = [
        "region",
        "endpoint_url",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    ];
    let named = env("AWS_PROFILE").filter(|p| !p.is_empty());
    let profile = named.clone().unwrap_or_else(|| "default".to_string());
    let home = env("HOME").unwrap_or_default();
    let file = |var: &str, name: &str| {
        env(var)
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| format!("{home}/.aws/{name}"))
    };
    let mut out: Vec<(&'static str, String)> = Vec::new();
    let mut found = false;
    let mut unsupported: Option<String> = None;
    for (path, section, config) in [
        (
            file("AWS_CONFIG_FILE", "config"),
            if profile == "default" {
                "default".to_string()
            } else {
                format!("profile {profile}")
            },
            true,
        ),
        (
            file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            profile.clone(),
            false,
        ),
    ] {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{path}: {}", e.kind())),
        };
        let mut inside = false;
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                let h = h.split_whitespace().collect::<Vec<_>>().join(" ");
                inside = h == section || (config && profile == "default" && h == "profile default");
                found |= inside;
                continue;
            }
            // Indented lines belong to a nested block (`s3 =`, `sts =`): not ours.
            if !inside || raw.starts_with([' ', '\t']) {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let k = k.trim().to_ascii_lowercase();
            if let Some(key) = KEYS.iter().find(|x| **x == k) {
                out.retain(|(o, _)| o != key);
                out.push((key, v.trim().to_string()));
            } else if ["role_arn", "credential_process", "web_identity_token_file"]
                .contains(&k.as_str())
                || k.starts_with("sso_")
            {
                unsupported = Some(k);
            }
        }
    }
    if let Some(k) = unsupported
        && !out.iter().any(|(o, _)| *o == "aws_access_key_id")
    {
        return Err(format!(
            "profile {profile} gets its keys by {k}, which snapfs does not do: give it aws_access_key_id and aws_secret_access_key, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ));
    }
    if let Some(p) = named
        && !found
    {
        return Err(format!(
            "AWS_PROFILE names profile {p}, which neither {} nor {} has",
            file("AWS_CONFIG_FILE", "config"),
            file("AWS_SHARED_CREDENTIALS_FILE", "credentials")
        ));
    }
    Ok(out)
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
    /// Its name's random part, chosen with its first extent (an encrypted extent is
    /// sealed to the pack's name).
    id: String,
    data: Vec<u8>,
    /// Its index's entries, in the order of its bytes.
    hashes: Vec<IdxEntry>,
    /// Every extent given to it: placed, or still being compressed.
    members: std::collections::HashSet<[u8; 32]>,
    /// The threads compressing its extents, started with the first.
    squeezer: Option<Squeezer>,
}

/// An extent compressed (or not: it did not shrink enough) by a [`Squeezer`].
type Squeezed = ([u8; 32], Vec<u8>, Option<Vec<u8>>);

/// Threads compressing extents, so that a sync is not held to one core's pace.
struct Squeezer {
    jobs: Option<std::sync::mpsc::SyncSender<([u8; 32], Vec<u8>)>>,
    done: std::sync::mpsc::Receiver<Squeezed>,
    /// Extents sent to the threads and not yet back.
    out: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Squeezer {
    /// Threads compressing at `level` (`None`: none could be started).
    fn start(level: i32) -> Option<Squeezer> {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        let (jobs, rx) = std::sync::mpsc::sync_channel::<([u8; 32], Vec<u8>)>(4 * n);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let (tx, done) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for _ in 0..n {
            let (rx, tx) = (rx.clone(), tx.clone());
            let t = std::thread::Builder::new()
                .name("snapfs-zstd".into())
                .spawn(move || {
                    let mut z = zstd::bulk::Compressor::new(level).ok();
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok((hash, data)) = job else {
                            return;
                        };
                        // Worth it when it saves at least 1/32 of the extent. Every
                        // extent taken comes back, compressed or not.
                        let worth = data.len() - data.len() / 32;
                        let c = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            z.as_mut().and_then(|z| z.compress(&data).ok())
                        }))
                        .unwrap_or_else(|_| {
                            z = None;
                            None
                        })
                        .filter(|c| c.len() < worth);
                        if tx.send((hash, data, c)).is_err() {
                            return;
                        }
                    }
                });
            if let Ok(t) = t {
                threads.push(t);
            }
        }
        (!threads.is_empty()).then_some(Squeezer {
            jobs: Some(jobs),
            done,
            out: 0,
            threads,
        })
    }
}

impl Drop for Squeezer {
    fn drop(&mut self) {
        // The threads finish what they took, find the queue closed, and end.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Pack {
    /// Whether extent `hash` was given to this pack.
    fn holds(&self, hash: &[u8; 32]) -> bool {
        self.members.contains(hash)
    }

    /// Adds extent `hash` of bytes `data`: compressed when the bucket compresses
    /// and that saves at least 1/32 of it (on other threads: it is placed later),
    /// then sealed when the bucket is encrypted.
    fn add(&mut self, b: &Bucket, hash: [u8; 32], data: Vec<u8>) -> Result<(), SyncError> {
        if self.id.is_empty() {
            self.id = random_id();
        }
        if !self.members.insert(hash) {
            return Ok(());
        }
        let level = b.compress.filter(|_| data.len() >= 64);
        if let (Some(level), None) = (level, &self.squeezer) {
            self.squeezer = Squeezer::start(level);
        }
        let job = match (level, &mut self.squeezer) {
            (None, _) | (_, None) => Some((hash, data)),
            (Some(_), Some(z)) => {
                match &z.jobs {
                    Some(j) => match j.send((hash, data)) {
                        Ok(()) => {
                            z.out += 1;
                            None
                        }
                        // No thread left to take it: stored as it is.
                        Err(std::sync::mpsc::SendError(job)) => Some(job),
                    },
                    None => Some((hash, data)),
                }
            }
        };
        if let Some((hash, data)) = job {
            self.place(b, hash, &data, None)?;
        }
        self.collect(b, false)
    }

    /// Places the extents the threads have compressed; with `all`, waits for every
    /// one (an extent given to the pack is never left out of it).
    fn collect(&mut self, b: &Bucket, all: bool) -> Result<(), SyncError> {
        let Some(z) = &mut self.squeezer else {
            return Ok(());
        };
        let mut back = Vec::new();
        let mut gone = false;
        while z.out > 0 {
            let r = if all {
                z.done.recv().map_err(|_| ())
            } else {
                match z.done.try_recv() {
                    Ok(r) => Ok(r),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(()),
                }
            };
            let Ok(r) = r else {
                gone = true;
                break;
            };
            z.out -= 1;
            back.push(r);
        }
        for (hash, data, c) in back {
            self.place(b, hash, &data, c.as_deref())?;
        }
        if gone {
            return Err(err(
                "the threads compressing extents stopped: nothing was stored",
            ));
        }
        Ok(())
    }

    /// Appends extent `hash` (bytes `data`, or `squeezed`: a zstd frame of them),
    /// sealed when the bucket is encrypted, and its index entry.
    fn place(
        &mut self,
        b: &Bucket,
        hash: [u8; 32],
        data: &[u8],
        squeezed: Option<&[u8]>,
    ) -> Result<(), SyncError> {
        let stored = squeezed.unwrap_or(data);
        let sealed = b
            .seal
            .as_ref()
            .map(|s| s.seal_extent(&format!("packs/{}.pack", self.id), stored));
        let stored = sealed.as_deref().unwrap_or(stored);
        // The length word's top bit is the flag: no extent comes near it (they are
        // at most a block, 1 MiB), and none is let past it.
        let len = u32::try_from(stored.len())
            .ok()
            .filter(|&l| l < IDX_ZSTD)
            .ok_or_else(|| {
                err(format!(
                    "extent {} is too large to store ({} bytes)",
                    crate::store::hex(&hash),
                    stored.len()
                ))
            })?;
        let offset = self.data.len() as u64;
        self.data.extend_from_slice(stored);
        self.hashes.push((hash, offset, len, squeezed.is_some()));
        Ok(())
    }

    /// Uploads the pack, then its index, and records where its extents are.
    fn flush(&mut self, b: &Bucket, index: &mut HashMap<[u8; 32], Place>) -> Result<(), SyncError> {
        self.collect(b, true)?;
        self.members.clear();
        if self.hashes.is_empty() {
            return Ok(());
        }
        let id = std::mem::take(&mut self.id);
        let pack = format!("packs/{id}.pack");
        if b.seal.is_some() {
            // Random bytes to the grain: the pack's size says little of its extents'.
            let to = self.data.len().div_ceil(seal::PACK_GRAIN) * seal::PACK_GRAIN;
            let mut pad = vec![0u8; to - self.data.len()];
            for chunk in pad.chunks_mut(4096) {
                let r = seal::random::<4096>();
                chunk.copy_from_slice(&r[..chunk.len()]);
            }
            self.data.extend_from_slice(&pad);
        }
        // Uploaded in the background (a few at a time): the pack, then its index.
        // A manifest naming its extents is written only once it is done
        // (`Bucket::settle_uploads`).
        let idx = format!("packs/{id}.idx");
        let index_bytes = b.meta_bytes(&idx, encode_idx(&self.hashes));
        b.put_later(vec![
            (pack.clone(), std::mem::take(&mut self.data)),
            (idx, index_bytes),
        ])?;
        let shared: std::sync::Arc<str> = pack.as_str().into();
        for (hash, offset, len, zstd) in self.hashes.drain(..) {
            index.insert(
                hash,
                Place {
                    pack: shared.clone(),
                    offset,
                    len,
                    zstd,
                },
            );
        }
        Ok(())
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
    super::session::tell_peer(&mut w, &res);
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
        f => {
            return Err(err(format!(
                "expected hello, got {}",
                super::wire::type_name(f.encode().0)
            )));
        }
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
        f => {
            return Err(err(format!(
                "expected proof, got {}",
                super::wire::type_name(f.encode().0)
            )));
        }
    }
    let lock = b.lock("sync")?;
    let mut root = match b.root()? {
        // A root that names no snapshot yet (a first sync cut short) holds nothing
        // to keep: the volume that syncs now takes it, as a new bucket volume, unless
        // manifests say a snapshot once landed there (an old root put back).
        Some(mut root) if root.snapshots.is_empty() => {
            let ours = crate::store::hex(&origin);
            if root.origin != ours {
                if !b.list("manifests")?.is_empty() {
                    return Err(err(format!(
                        "{} names no snapshot, but holds manifests (of volume {}?): refused; delete {ROOT} there to start the prefix over",
                        b.url, root.origin
                    )));
                }
                root.origin = ours;
                root.volume = random_id();
            }
            root.block_size = block_size;
            lock.check()?;
            b.put_root(&mut root)?;
            root
        }
        Some(mut root) => {
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
            raise_layout(b, &mut root, &lock)?;
            root
        }
        None => {
            // The root goes up before the first pack: a pack may hold compressed
            // extents, and a bucket whose first sync is cut must still say which
            // layout its packs are (a snapfs that reads only layout 1 then refuses
            // it instead of starting it as layout 1 over them).
            let mut root = Root {
                format: LAYOUT,
                volume: random_id(),
                origin: crate::store::hex(&origin),
                block_size,
                snapshots: Vec::new(),
                generation: 0,
                check: None,
            };
            lock.check()?;
            b.put_root(&mut root)?;
            root
        }
    };
    let bucket_volume = crate::store::unhex::<16>(&root.volume)
        .ok_or_else(|| err(format!("{}: {ROOT} names no volume", b.url)))?;
    w.send(&Frame::Holding {
        volume: bucket_volume,
        snapshots: root.snapshots.iter().map(RootSnapshot::snap_ref).collect(),
    })?;
    w.flush()?;
    let (mut index, mut lost) = b.index_and_lost(true)?;
    // Extents whose pack is gone: asked of the source with the first
    // acknowledgement, to ride on the push (it sends those it has).
    let mut unasked: Vec<[u8; 32]> = lost.iter().flat_map(|(_, h)| h.iter().copied()).collect();
    // And those gc found in no index (an index damaged or deleted).
    let mut repair = b.repair_list()?;
    unasked.extend(repair.iter().filter(|h| !index.contains_key(*h)));
    unasked.sort_unstable();
    unasked.dedup();
    if !unasked.is_empty() {
        tracing::warn!(
            extents = unasked.len(),
            "sync: extents whose pack is gone from the bucket; asking the source for them"
        );
    }
    let mut repair_asked: std::collections::HashSet<[u8; 32]> = Default::default();
    let mut sum = Summary::default();
    loop {
        let (snapshot, base) = match expect(r)? {
            Frame::Done => break,
            Frame::Plan { .. } => continue,
            Frame::Begin { snapshot, base } => (snapshot, base),
            f => {
                return Err(err(format!(
                    "expected begin or done, got {}",
                    super::wire::type_name(f.encode().0)
                )));
            }
        };
        // Deleted snapshots after the base the source starts from (it lacks them:
        // they were deleted there too) are dropped here; their manifests go at gc.
        if let Some(b_at) = base
            .as_ref()
            .and_then(|n| root.snapshots.iter().position(|s| &s.name == n))
            && b_at + 1 < root.snapshots.len()
            && root.snapshots[b_at + 1..].iter().all(|s| s.deleted)
        {
            root.snapshots.truncate(b_at + 1);
        }
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
        let mut manifest = ManifestWriter::new()?;
        let mut pack = Pack::default();
        let mut wanted: std::collections::HashSet<[u8; 32]> = Default::default();
        let mut records = 0u64;
        loop {
            let frame = expect(r)?;
            lock.renew()?;
            match frame {
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
                    let mut missing: Vec<[u8; 32]> = named(&recs)?
                        .into_iter()
                        .filter(|h| !index.contains_key(h) && !pack.holds(h))
                        .collect();
                    wanted.extend(missing.iter().copied());
                    // A bounded share per acknowledgement (a frame has a size limit).
                    let n = unasked.len().min(100_000);
                    for h in unasked.drain(..n) {
                        if !wanted.contains(&h) {
                            repair_asked.insert(h);
                            missing.push(h);
                        }
                    }
                    records += recs.len() as u64;
                    manifest.push(recs)?;
                    w.send(&Frame::Ack { batch, missing })?;
                    w.flush()?;
                }
                Frame::Extent { hash, data } => {
                    if !wanted.remove(&hash) && !repair_asked.remove(&hash) {
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
                    pack.add(b, hash, data)?;
                    if pack.data.len() >= PACK_BYTES {
                        lock.renew()?;
                        pack.flush(b, &mut index)?;
                    }
                }
                Frame::Barrier => break,
                f => {
                    return Err(err(format!(
                        "expected records, extents or barrier, got {}",
                        super::wire::type_name(f.encode().0)
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
        lock.renew()?;
        pack.flush(b, &mut index)?;
        b.settle_uploads()?;
        // The index of a lost pack goes once every extent it listed is elsewhere;
        // so does gc's list of extents to ask for, once every one is in a pack.
        lock.check()?;
        lost.retain(|(pack, hashes)| {
            if hashes.iter().all(|h| index.contains_key(h)) {
                let idx = format!("{}.idx", pack.trim_end_matches(".pack"));
                if let Err(e) = b.delete(&idx) {
                    tracing::warn!(error = %e, "sync: the index of a lost pack stays");
                }
                return false;
            }
            true
        });
        if !repair.is_empty() && repair.iter().all(|h| index.contains_key(h)) {
            // (Left, it is read again by the next sync, which finds nothing to ask.)
            match b.delete(REPAIR) {
                Ok(()) => repair.clear(),
                Err(e) => tracing::warn!(error = %e, "sync: {REPAIR} stays"),
            }
        }
        let key = format!("manifests/{}", random_id());
        let hash = b.put_manifest_at(&key, manifest)?;
        root.snapshots.push(RootSnapshot {
            name: snapshot.name.clone(),
            created_sec: snapshot.created_sec,
            created_nsec: snapshot.created_nsec,
            base,
            manifest: key,
            records,
            hash: Some(hash),
            deleted: false,
        });
        lock.check()?;
        b.put_root(&mut root)?;
        // Snapshots deleted while they were the newest go now that one is newer.
        // (The snapshot has landed: a failure here is for the next sync to settle.)
        if let Err(e) = b.settle_deleted(&mut root, &lock) {
            tracing::warn!(error = %e, "sync: snapshots deleted before this one are merged by the next sync");
        }
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
    super::session::tell_peer(&mut w, &res);
    res
}

fn send_from<R: Read, W: Write>(
    b: &Bucket,
    only: Option<&str>,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
) -> Result<Summary, SyncError> {
    let reading = b.read_lock("restore")?;
    let root = b
        .root()?
        .ok_or_else(|| err(format!("{} holds no snapfs volume", b.url)))?;
    if root.snapshots.iter().all(|s| s.deleted) {
        return Err(err(format!("{} holds no snapshot to restore", b.url)));
    }
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
        f => {
            return Err(err(format!(
                "expected welcome, got {}",
                super::wire::type_name(f.encode().0)
            )));
        }
    }
    w.send(&Frame::Proof { proof: [0; 32] })?;
    w.flush()?;
    let held = match expect(r)? {
        Frame::Holding { snapshots, .. } => snapshots,
        f => {
            return Err(err(format!(
                "expected the destination's snapshots, got {}",
                super::wire::type_name(f.encode().0)
            )));
        }
    };
    let index = b.index()?;
    let mut sum = Summary::default();
    // What goes: each snapshot after the newest one the destination holds, as
    // stored (changes from the one before); or `only`, whole (every manifest up to
    // it, the later record winning), unless the destination has it.
    // (Stored manifests are read ahead of their turn; `only`'s whole one is kept
    // as a manifest is, compressed, and read like one.)
    type Stored = std::sync::Arc<[u8]>;
    type Todo<'r> = Box<dyn Iterator<Item = (&'r RootSnapshot, Result<Stored, SyncError>)> + 'r>;
    let todo: Todo<'_> = match only {
        Some(name) => {
            let k = root
                .snapshots
                .iter()
                .position(|s| s.name == name && !s.deleted)
                .ok_or_else(|| err(format!("{} has no snapshot named {name}", b.url)))?;
            let s = &root.snapshots[k];
            if !held.contains(&s.snap_ref()) {
                let mut map = Overlay::new();
                for (earlier, stored) in b.manifests(&root.snapshots[..=k]) {
                    b.overlay(earlier, stored?, &mut map)?;
                }
                let whole: Stored = ManifestWriter::of(merged(map, true))?.finish()?.into();
                Box::new(std::iter::once((s, Ok(whole))))
            } else {
                Box::new(std::iter::empty())
            }
        }
        None => {
            let start = root
                .snapshots
                .iter()
                .rposition(|s| held.contains(&s.snap_ref()))
                .map_or(0, |i| i + 1);
            // A deleted newest snapshot (kept only as the next sync's base) is
            // not restored.
            let end = root.snapshots.len()
                - usize::from(root.snapshots.last().is_some_and(|s| s.deleted));
            Box::new(b.manifests(root.snapshots.get(start..end).unwrap_or_default()))
        }
    };
    // Snapshots deleted but not yet merged into the next (a sync landed a newer one
    // and stopped before it merged them) are not restored: their records go with
    // the next one's, as the merge would have left them.
    let mut deleted: Option<Merge> = None;
    for (s, stored) in todo {
        let stored = stored?;
        if only.is_none() && s.deleted {
            deleted
                .get_or_insert_with(|| Merge::new(s))
                .lay(b, s, stored)?;
            continue;
        }
        // `only`'s goes whole; the others as stored, from their bases. (`only`'s
        // whole manifest and a merged one, made here, hold what they were made of;
        // a stored one holds what the root says.)
        let (stored, base, records) = match deleted.take() {
            Some(mut m) => {
                m.lay(b, s, stored)?;
                let (records, base) = m.finish();
                let merged: Stored = ManifestWriter::of(records)?.finish()?.into();
                (merged, base, None)
            }
            None if only.is_some() => (stored, None, None),
            None => (stored, s.base.clone(), Some(s.records)),
        };
        // Read twice, one batch at a time: once for the plan, once to send.
        let batches = || ManifestBatches::over(stored.clone(), &b.url, &s.manifest, records);
        let (mut n, mut bytes_named) = (0u64, 0u64);
        let mut count = 0u64;
        for recs in batches()? {
            let recs = recs?;
            count += recs.len() as u64;
            let mut seen = std::collections::HashSet::new();
            for rec in &recs {
                first_namings(rec, &mut seen, |_, len| {
                    n += 1;
                    bytes_named += len;
                })?;
            }
        }
        w.send(&Frame::Plan {
            snapshot: s.snap_ref(),
            records: count,
            extents: n,
            bytes: bytes_named,
        })?;
        w.send(&Frame::Begin {
            snapshot: s.snap_ref(),
            base,
        })?;
        for (batch, records) in batches()?.enumerate() {
            let records = records?;
            reading.renew()?;
            let batch = batch as u64;
            sum.records += records.len() as u64;
            w.send(&Frame::Records { batch, records })?;
            w.flush()?;
            let missing = match expect(r)? {
                Frame::Ack { batch: a, missing } if a == batch => missing,
                f => {
                    return Err(err(format!(
                        "expected ack of batch {batch}, got {}",
                        super::wire::type_name(f.encode().0)
                    )));
                }
            };
            // The extents asked for, read by spans of their packs: extents stored
            // together (most of a batch's) come in one ranged GET.
            let mut places: Vec<(&Place, [u8; 32])> = Vec::with_capacity(missing.len());
            for hash in missing {
                let Some(p) = index.get(&hash) else {
                    return Err(err(format!(
                        "{}: extent {} of snapshot {} is in no pack",
                        b.url,
                        crate::store::hex(&hash),
                        s.name
                    )));
                };
                places.push((p, hash));
            }
            places.sort_by(|a, b| (&a.0.pack, a.0.offset).cmp(&(&b.0.pack, b.0.offset)));
            // The spans: [from, to) of `places`, and the bytes of their pack.
            let mut spans: Vec<(usize, usize, std::ops::Range<u64>)> = Vec::new();
            let mut at = 0;
            while at < places.len() {
                let (first, _) = places[at];
                let start = first.offset;
                let mut end = start.saturating_add(first.len as u64);
                let mut upto = at + 1;
                while let Some((p, _)) = places.get(upto)
                    && p.pack == first.pack
                    && p.offset < end.saturating_add(SPAN_GAP)
                    && p.offset.saturating_add(p.len as u64) - start <= SPAN_MAX
                {
                    end = end.max(p.offset.saturating_add(p.len as u64));
                    upto += 1;
                }
                spans.push((at, upto, start..end));
                at = upto;
            }
            // Read `jobs` spans at a time (and at most 128 MiB), sent on in order.
            for window in spans.chunks(b.jobs.min((128 << 20) / SPAN_MAX as usize).max(1)) {
                reading.renew()?;
                let reads = window.iter().map(|(from, _, range)| {
                    b.get_range_async(&places[*from].0.pack, range.clone())
                });
                let bufs = b.rt.block_on(futures_util::future::try_join_all(reads))?;
                for ((from, upto, range), span) in window.iter().zip(bufs) {
                    for (p, hash) in &places[*from..*upto] {
                        let at = (p.offset - range.start) as usize;
                        let data = span
                            .get(at..at.saturating_add(p.len as usize))
                            .and_then(|raw| b.extent(p, hash, raw))
                            .ok_or_else(|| {
                                err(format!(
                                    "{}: extent {} in {} does not match its hash",
                                    b.url,
                                    crate::store::hex(hash),
                                    p.pack
                                ))
                            })?;
                        sum.extents += 1;
                        sum.payload_bytes += data.len() as u64;
                        w.send(&Frame::Extent { hash: *hash, data })?;
                    }
                }
            }
        }
        super::session::barrier(r, w, &s.name)?;
        sum.snapshots.push(s.name.clone());
    }
    w.send(&Frame::Done)?;
    w.flush()?;
    Ok(sum)
}

/// `snapfs snapshot delete s3://... NAME`: the snapshot goes from the bucket (its
/// changes merged into the next one's manifest); the newest, which the next
/// incremental starts from, is hidden until a newer one lands. What it alone held
/// is freed by [`gc`].
pub fn delete(url: &str, name: &str) -> Result<String, SyncError> {
    let b = Bucket::open(url)?;
    let lock = b.lock("snapshot delete")?;
    let mut root = b
        .root()?
        .ok_or_else(|| err(format!("{url} holds no snapfs volume")))?;
    let Some(i) = root
        .snapshots
        .iter()
        .position(|s| s.name == name && !s.deleted)
    else {
        return Err(err(format!("{url} has no snapshot named {name}")));
    };
    root.snapshots[i].deleted = true;
    if i + 1 == root.snapshots.len() {
        lock.check()?;
        b.put_root(&mut root)?;
        return Ok(format!(
            "{name} is hidden; it is the base of the next sync, and goes when a newer snapshot lands"
        ));
    }
    b.settle_deleted(&mut root, &lock)?;
    Ok(format!(
        "deleted {name}; `snapfs gc {url}` frees the data only it held"
    ))
}

/// What [`gc`] found and did.
#[derive(Debug, Default)]
pub struct GcReport {
    /// Packs no snapshot needs, deleted (or, on a dry run, to delete).
    pub packs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Manifests no snapshot names.
    pub manifests: u64,
    /// Packs mostly (half or more) of extents no snapshot needs, rewritten with
    /// the rest only, and the bytes that freed.
    pub repacked: (u64, u64),
    /// Packs kept that hold some extents no snapshot needs (under half of theirs),
    /// and those extents' bytes.
    pub partial: (u64, u64),
    /// Packs gone whose index is there and lists extents a snapshot needs that no
    /// pack there holds (lost, or deleted behind snapfs's back): the next sync asks
    /// the source for them.
    pub lost: u64,
}

/// The extents the bucket's snapshots name: every manifest's (restoring the
/// newest applies them all in turn).
fn referenced(b: &Bucket, root: &Root) -> Result<std::collections::HashSet<[u8; 32]>, SyncError> {
    let mut out = std::collections::HashSet::new();
    for (s, stored) in b.manifests(&root.snapshots) {
        for batch in b.batches(s, stored?)? {
            out.extend(named(&batch?)?);
        }
    }
    Ok(out)
}

/// Marks a bucket of an older layout as this snapfs's before a pack that may hold
/// compressed extents goes up, so that a snapfs that reads only the older layout
/// refuses the bucket from then on instead of misreading its indexes.
fn raise_layout(b: &Bucket, root: &mut Root, lock: &Lock<'_>) -> Result<(), SyncError> {
    if root.format < LAYOUT {
        lock.check()?;
        b.put_root(root)?;
    }
    Ok(())
}

/// `snapfs gc s3://...`: deletes the packs and manifests no snapshot needs, under
/// the bucket's lock (a sync's packs before its barrier are needed by nothing yet,
/// so gc never runs beside one).
pub fn gc(url: &str, dry_run: bool) -> Result<GcReport, SyncError> {
    let b = Bucket::open(url)?;
    let lock = b.lock("gc")?;
    let mut root = b
        .root()?
        .ok_or_else(|| err(format!("{url} holds no snapfs volume")))?;
    if !dry_run {
        // The root written once more before anything is decided: a writer whose
        // lock this gc took over without that writer knowing can then no longer
        // publish a snapshot this gc does not see (its write of the root is
        // refused), and one it published since the read above fails this write.
        // (It raises the layout too, before a repack may write compressed extents.)
        lock.check()?;
        b.put_root(&mut root)?;
    }
    // Every extent a snapshot names, and where an index lists it: nowhere (0), in
    // lost packs only (1: their index is there, the pack not), in a pack (2).
    let mut used: HashMap<[u8; 32], u8> =
        referenced(&b, &root)?.into_iter().map(|h| (h, 0)).collect();
    let keys = b.list("packs")?;
    let listed: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
    // The lost packs' indexes, with the extents they list that a snapshot needs.
    let mut lost: Vec<Vec<[u8; 32]>> = Vec::new();
    // Every index, read first, with the bytes of its pack still needed and not:
    // gc decides from them only if they account for every extent a snapshot names.
    // One no index lists (not even a lost pack's) means an index is damaged (a hash
    // in it changed) or deleted, and the pack it describes would look like garbage:
    // then nothing is deleted, and the next sync asks the source for those extents.
    let mut indexes: Vec<(&str, u64, u64)> = Vec::new();
    b.each_index(
        keys.iter().map(String::as_str),
        None,
        || lock.renew(),
        |key, idx| {
            let Some(idx) = idx else {
                return Ok(());
            };
            let id = key.strip_suffix(".idx").expect("an index key");
            let here = listed.contains(format!("{id}.pack").as_str());
            let (mut live, mut dead) = (0u64, 0u64);
            let mut needed = Vec::new();
            for (hash, _, len, _) in idx {
                match used.get_mut(&hash) {
                    Some(found) => {
                        *found = (*found).max(if here { 2 } else { 1 });
                        live += len as u64;
                        needed.push(hash);
                    }
                    None => dead += len as u64,
                }
            }
            if !here {
                lost.push(needed);
            }
            indexes.push((key, live, dead));
            Ok(())
        },
    )?;
    let unlisted: Vec<[u8; 32]> = used
        .iter()
        .filter(|(_, found)| **found == 0)
        .map(|(h, _)| *h)
        .collect();
    if !unlisted.is_empty() {
        if !dry_run {
            lock.check()?;
            b.put_meta(REPAIR, unlisted.concat())?;
        }
        return Err(err(format!(
            "{url}: {} extents the snapshots name are in no pack index (one was damaged or deleted): gc {} nothing{} (fsck names the files they hold)",
            unlisted.len(),
            if dry_run { "would delete" } else { "deleted" },
            if dry_run {
                ""
            } else {
                ", and the next sync that sends a snapshot asks the source for them"
            }
        )));
    }
    let mut rep = GcReport {
        // Those holding an extent a snapshot needs that no pack there holds.
        lost: lost
            .iter()
            .filter(|needed| needed.iter().any(|h| used.get(h) == Some(&1)))
            .count() as u64,
        ..Default::default()
    };
    let named: std::collections::HashSet<&str> =
        root.snapshots.iter().map(|s| s.manifest.as_str()).collect();
    for key in b.list("manifests")? {
        if !named.contains(key.as_str()) {
            rep.manifests += 1;
            if !dry_run {
                lock.renew()?;
                lock.check()?;
                b.delete(&key)?;
            }
        }
    }
    for key in &keys {
        lock.renew()?;
        // A pack whose index never landed (a writer stopped between the two): no
        // snapshot can name what is in it.
        if let Some(id) = key.strip_suffix(".pack")
            && !listed.contains(format!("{id}.idx").as_str())
        {
            rep.packs += 1;
            if !dry_run {
                lock.check()?;
                b.delete(key)?;
            }
        }
    }
    for (key, live, dead) in indexes {
        lock.renew()?;
        let id = key.strip_suffix(".idx").expect("an index key");
        // A lost pack's index stays for the next sync to repair from.
        if !listed.contains(format!("{id}.pack").as_str()) {
            continue;
        }
        if live == 0 {
            rep.packs += 1;
            rep.bytes += dead;
            if !dry_run {
                // The index first: a pack left without one is collected next time.
                lock.check()?;
                b.delete(key)?;
                b.delete(&format!("{id}.pack"))?;
            }
        } else if dead >= live {
            rep.repacked.0 += 1;
            rep.repacked.1 += dead;
            if !dry_run {
                // The extents still needed go to a new pack, uploaded (with its
                // index) before the old one goes: an extent is in one pack or two
                // meanwhile, never in none.
                let old = format!("{id}.pack");
                let data = b
                    .get(&old)?
                    .ok_or_else(|| err(format!("{url}: {old} is missing")))?;
                // Read again (gc holds the lock: it is as it was).
                let idx = b
                    .read_idx(key)?
                    .ok_or_else(|| err(format!("{url}: {key} is missing")))?;
                let mut pack = Pack::default();
                let from: std::sync::Arc<str> = old.as_str().into();
                for &(hash, off, len, zstd) in &idx {
                    if !used.contains_key(&hash) {
                        continue;
                    }
                    let place = Place {
                        pack: from.clone(),
                        offset: off,
                        len,
                        zstd,
                    };
                    let (off, len) = (off as usize, len as usize);
                    let bytes = data
                        .get(off..off.saturating_add(len))
                        .and_then(|raw| b.extent(&place, &hash, raw))
                        .ok_or_else(|| {
                            err(format!(
                                "{url}: extent {} in {old} is damaged: not repacked (fsck --read-data says more)",
                                crate::store::hex(&hash)
                            ))
                        })?;
                    pack.add(&b, hash, bytes)?;
                }
                pack.flush(&b, &mut HashMap::new())?;
                b.settle_uploads()?;
                lock.check()?;
                b.delete(key)?;
                b.delete(&old)?;
            }
        } else if dead > 0 {
            rep.partial.0 += 1;
            rep.partial.1 += dead;
        }
    }
    Ok(rep)
}

/// `snapfs fsck s3://... [--read-data]`: every snapshot's manifest is there and
/// decodes, and every extent it names is in a pack whose index lists it; with
/// `read_data`, every pack is read and every extent in it rehashed. The problems,
/// each naming what it affects.
pub fn fsck(url: &str, read_data: bool) -> Result<Vec<String>, SyncError> {
    let b = Bucket::open(url)?;
    let reading = b.read_lock("fsck")?;
    let root = b
        .root()?
        .ok_or_else(|| err(format!("{url} holds no snapfs volume")))?;
    let (index, lost) = b.index_and_lost(false)?;
    let mut problems = Vec::new();
    // Extents that cannot be read, and why: named with every path they reach.
    let mut bad: HashMap<[u8; 32], String> = HashMap::new();
    for (pack, hashes) in lost.iter().filter(|(_, h)| !h.is_empty()) {
        problems.push(format!(
            "{pack} is missing: {} extents its index lists are in no other pack",
            hashes.len()
        ));
    }
    for (s, stored) in b.manifests(&root.snapshots) {
        let batches = match stored.and_then(|m| b.batches(s, m)) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("snapshot {}: {e}", s.name));
                continue;
            }
        };
        let mut missing = 0u64;
        for batch in batches {
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    problems.push(format!("snapshot {}: {e}", s.name));
                    break;
                }
            };
            let hashes = match named(&batch) {
                Ok(h) => h,
                Err(e) => {
                    problems.push(format!("snapshot {}: manifest {}: {e}", s.name, s.manifest));
                    break;
                }
            };
            for h in hashes {
                if !index.contains_key(&h) {
                    missing += 1;
                    bad.entry(h)
                        .or_insert_with(|| "the extent is in no pack".to_string());
                }
            }
        }
        if missing > 0 {
            problems.push(format!(
                "snapshot {} (and every later one): {missing} extents it names are in no pack",
                s.name
            ));
        }
    }
    if read_data {
        // Each pack's extents, packs in order; the packs are read a few at a time.
        let mut packs: std::collections::BTreeMap<&str, Vec<(&[u8; 32], &Place)>> =
            Default::default();
        for (h, place) in &index {
            packs.entry(&*place.pack).or_default().push((h, place));
        }
        let packs: Vec<_> = packs.into_iter().collect();
        let at_once = b.jobs.clamp(1, (128 << 20) / PACK_BYTES);
        for window in packs.chunks(at_once) {
            reading.renew()?;
            let keys: Vec<&str> = window.iter().map(|(p, _)| *p).collect();
            for ((p, extents), data) in window.iter().zip(b.get_many(&keys)?) {
                check_pack(&b, p, extents, data, &mut problems, &mut bad);
            }
        }
    }
    if !bad.is_empty() {
        // (What was found stands if naming the files it reaches fails.)
        match hurt(&b, &root, &bad) {
            Ok(lines) => problems.extend(lines),
            Err(e) => problems.push(format!("naming the files the damage reaches stopped: {e}")),
        }
    }
    Ok(problems)
}

/// Checks that pack `p` as read (`data`; `None`: it is gone) holds `extents`
/// (hashes and index entries) undamaged, noting what is not in `problems`, and
/// each extent damaged in `bad` with why.
fn check_pack(
    b: &Bucket,
    p: &str,
    extents: &[(&[u8; 32], &Place)],
    data: Option<Vec<u8>>,
    problems: &mut Vec<String>,
    bad: &mut HashMap<[u8; 32], String>,
) {
    let Some(data) = data else {
        problems.push(format!(
            "{p} is gone since its index was read (a gc meanwhile?): run fsck again"
        ));
        return;
    };
    for &(h, place) in extents {
        let ok = (place.offset as usize)
            .checked_add(place.len as usize)
            .and_then(|end| data.get(place.offset as usize..end))
            .is_some_and(|d| b.extent(place, h, d).is_some());
        if !ok {
            problems.push(format!(
                "extent {} in {p} does not match its hash",
                crate::store::hex(h)
            ));
            bad.insert(
                *h,
                format!("extent {} in {p} is damaged", crate::store::hex(h)),
            );
        }
    }
}

/// Most lines [`hurt`] prints.
const HURT_LINES: usize = 1000;

/// Every file of every snapshot that extents `bad` reach, a line each:
/// `hurt: SNAPSHOT: PATH bytes A..B: CAUSE` (at most [`HURT_LINES`]).
fn hurt(
    b: &Bucket,
    root: &Root,
    bad: &HashMap<[u8; 32], String>,
) -> Result<Vec<String>, SyncError> {
    let bs = root.block_size as u64;
    let mut map = Overlay::new();
    // The block records, as the overlay stands, that name a bad extent, and why:
    // kept as records are laid over, so a snapshot costs what it changed and what
    // is hurt, not a walk of every record.
    let mut hit: std::collections::BTreeMap<RecordKey, &String> = Default::default();
    let mut out = Vec::new();
    let mut more = 0usize;
    for (s, stored) in b.manifests(&root.snapshots) {
        if s.base.is_none() {
            map.clear();
            hit.clear();
        }
        for batch in b.batches(s, stored?)? {
            for r in batch? {
                let key = (r.ino, r.kind, r.sub, r.name);
                let cause = (r.kind == KIND_BLOCK)
                    .then_some(r.payload.as_deref())
                    .flatten()
                    .and_then(|p| BlockRec::decode(p).ok())
                    .and_then(|block| block.extents().find_map(|h| bad.get(h)));
                match cause {
                    Some(c) => hit.insert(key.clone(), c),
                    None => hit.remove(&key),
                };
                map.insert(key, r.payload);
            }
        }
        if s.deleted {
            continue;
        }
        for ((ino, _, idx, _), cause) in &hit {
            if out.len() >= HURT_LINES {
                more += 1;
                continue;
            }
            let at = idx.saturating_mul(bs);
            for path in paths(&map, *ino).unwrap_or_else(|e| vec![format!("(inode {ino}: {e})")]) {
                if out.len() >= HURT_LINES {
                    more += 1;
                    break;
                }
                out.push(format!(
                    "hurt: {}: {path} bytes {at}..{}: {cause}",
                    s.name,
                    at.saturating_add(bs)
                ));
            }
        }
    }
    if more > 0 {
        out.push(format!("hurt: and {more} more damaged blocks"));
    }
    Ok(out)
}

/// A record's place: inode, kind, sub, name.
type RecordKey = (u64, u8, u64, Vec<u8>);

/// `snapfs diff s3://... OLD NEW`: what changed from snapshot `old` to `new` of the
/// bucket, as `snapfs diff` says it of a store, from the manifests alone (no extent
/// is read).
pub fn diff(
    url: &str,
    old: &str,
    new: &str,
    blocks: bool,
) -> Result<Vec<crate::fs::Change>, SyncError> {
    use crate::store::schema::{InodeRec, KIND_INODE, KIND_PARENT};
    use std::collections::BTreeMap;
    let b = Bucket::open(url)?;
    let _reading = b.read_lock("diff")?;
    let root = b
        .root()?
        .ok_or_else(|| err(format!("{url} holds no snapfs volume")))?;
    let find = |n: &str| {
        root.snapshots
            .iter()
            .position(|s| s.name == n && !s.deleted)
            .ok_or_else(|| err(format!("{url} has no snapshot named {n}")))
    };
    let (i, j) = (find(old)?, find(new)?);
    if i >= j {
        return Err(err(format!("{old} is not older than {new}")));
    }
    let overlay = |map: &mut Overlay,
                   (s, stored): (&RootSnapshot, Result<std::sync::Arc<[u8]>, SyncError>),
                   touched: &mut Option<std::collections::BTreeSet<RecordKey>>|
     -> Result<(), SyncError> {
        // A whole snapshot's manifest is all there is: nothing before it counts.
        if s.base.is_none() {
            if let Some(t) = touched.as_mut() {
                t.extend(map.keys().cloned());
            }
            map.values_mut().for_each(|v| *v = None);
        }
        for batch in b.batches(s, stored?)? {
            for r in batch? {
                let k = (r.ino, r.kind, r.sub, r.name);
                if let Some(t) = touched.as_mut() {
                    t.insert(k.clone());
                }
                map.insert(k, r.payload);
            }
        }
        Ok(())
    };
    let mut manifests = b.manifests(&root.snapshots[..=j]);
    let mut at_old = BTreeMap::new();
    for m in manifests.by_ref().take(i + 1) {
        overlay(&mut at_old, m, &mut None)?;
    }
    let mut at_new = at_old.clone();
    let mut touched = Some(std::collections::BTreeSet::new());
    for m in manifests {
        overlay(&mut at_new, m, &mut touched)?;
    }
    let mut by_ino: BTreeMap<u64, Vec<(u8, u64)>> = BTreeMap::new();
    for k in touched.unwrap_or_default() {
        let (a, n) = (
            at_old.get(&k).cloned().flatten(),
            at_new.get(&k).cloned().flatten(),
        );
        if a != n {
            by_ino.entry(k.0).or_default().push((k.1, k.2));
        }
    }
    let damaged = |e: crate::store::StoreError| err(format!("{url}: a damaged record: {e}"));
    let inode = |m: &Overlay, ino: u64| {
        m.get(&(ino, KIND_INODE, 0, Vec::new()))
            .and_then(Option::as_ref)
            .map(|p| InodeRec::decode(p))
            .transpose()
            .map_err(damaged)
    };
    let mut out = Vec::new();
    for (ino, rows) in by_ino {
        let (a, n) = (inode(&at_old, ino)?, inode(&at_new, ino)?);
        let pa = paths(&at_old, ino).map_err(|e| err(format!("{url}: {old}: {e}")))?;
        let pb = paths(&at_new, ino).map_err(|e| err(format!("{url}: {new}: {e}")))?;
        let data = rows
            .iter()
            .filter(|(kind, _)| *kind != KIND_INODE && *kind != KIND_PARENT);
        let changed_rows = data.clone().next().is_some();
        let block_idx: Vec<u64> = data
            .filter(|(kind, _)| *kind == KIND_BLOCK)
            .map(|(_, sub)| *sub)
            .collect();
        crate::fs::inode_changes(
            a.as_ref(),
            n.as_ref(),
            &pa,
            &pb,
            changed_rows,
            &block_idx,
            blocks,
            root.block_size as u64,
            &mut out,
        );
    }
    out.sort_by(|x, y| x.path.cmp(&y.path).then(x.kind.cmp(&y.kind)));
    Ok(out)
}

/// `snapfs snapshot prune s3://... --keep POLICY`: deletes the scheduled (`auto-…`)
/// snapshots the policy does not keep, as [`delete`] does each, under one lock (the
/// newest, if pruned, is hidden until a newer one lands). The names pruned, oldest
/// first.
pub fn prune(
    url: &str,
    keep: &crate::policy::Keep,
    dry_run: bool,
) -> Result<Vec<String>, SyncError> {
    let b = Bucket::open(url)?;
    let lock = b.lock("snapshot prune")?;
    let mut root = b
        .root()?
        .ok_or_else(|| err(format!("{url} holds no snapfs volume")))?;
    let shown: Vec<(String, i64)> = root
        .snapshots
        .iter()
        .filter(|s| !s.deleted)
        .map(|s| (s.name.clone(), s.created_sec))
        .collect();
    let gone = crate::policy::plan_prune(&shown, keep);
    let mut pruned = Vec::new();
    for s in root.snapshots.iter_mut() {
        if gone.contains(&s.name) {
            s.deleted = true;
            pruned.push(s.name.clone());
        }
    }
    if dry_run || pruned.is_empty() {
        return Ok(pruned);
    }
    if root.snapshots.last().is_some_and(|s| s.deleted) {
        lock.check()?;
        b.put_root(&mut root)?;
    }
    b.settle_deleted(&mut root, &lock)?;
    Ok(pruned)
}

/// The paths of inode `ino` in records `m`, from the back pointers; the root's is
/// empty (its children print as `/name`).
fn paths(m: &Overlay, ino: u64) -> Result<Vec<String>, String> {
    use crate::store::schema::{KIND_PARENT, ROOT_INO};
    /// The walk so far. A damaged or crafted graph of parents (cycles, or a lattice
    /// of hard links that never reaches the root) must not be walked again from
    /// every branch into it: inodes found not to reach the root are not walked
    /// again, an inode is not walked again inside its own walk (a cycle), and the
    /// steps are bounded.
    struct Walk {
        dead: std::collections::HashSet<u64>,
        on_path: std::collections::HashSet<u64>,
        steps: u32,
        /// Bytes of paths found.
        bytes: usize,
    }
    /// Walks up from `ino`; whether a parent was passed over for being on the path
    /// walked (then what was not found from here may be found by another way in).
    fn up(
        m: &Overlay,
        ino: u64,
        suffix: &str,
        out: &mut Vec<String>,
        walk: &mut Walk,
    ) -> Result<bool, String> {
        if ino == ROOT_INO {
            walk.bytes += suffix.len();
            if walk.bytes > 16 << 20 {
                return Err("its paths pass 16 MiB".to_string());
            }
            out.push(suffix.to_string());
            return Ok(false);
        }
        if walk.dead.contains(&ino) {
            return Ok(false);
        }
        if walk.on_path.contains(&ino) {
            return Ok(true);
        }
        if walk.on_path.len() > 4096 {
            return Err(format!("the path of inode {ino} does not reach the root"));
        }
        // (Each level holds its own copy of the path so far.)
        if suffix.len() > 64 << 10 {
            return Err(format!("a path of inode {ino} is longer than 64 KiB"));
        }
        // Hard links multiply paths; a crafted graph of them must not explode.
        if out.len() > 65_536 {
            return Err(format!("inode {ino} has more than 65536 paths"));
        }
        walk.steps = walk
            .steps
            .checked_sub(1)
            .ok_or_else(|| format!("the paths of inode {ino} take too long to walk"))?;
        let found = out.len();
        let mut cut = false;
        walk.on_path.insert(ino);
        let range = (ino, KIND_PARENT, 0, Vec::new())..(ino, KIND_PARENT + 1, 0, Vec::new());
        for ((_, _, dir, name), v) in m.range(range) {
            if v.is_some() {
                let name = String::from_utf8_lossy(name);
                cut |= up(m, *dir, &format!("/{name}{suffix}"), out, walk)?;
            }
        }
        walk.on_path.remove(&ino);
        if out.len() == found && !cut {
            walk.dead.insert(ino);
        }
        Ok(cut)
    }
    let mut out = Vec::new();
    let mut walk = Walk {
        dead: Default::default(),
        on_path: Default::default(),
        steps: 1 << 20,
        bytes: 0,
    };
    up(m, ino, "", &mut out, &mut walk)?;
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::MAX_BLOCK_SIZE;

    #[test]
    fn an_index_replaced_between_the_listing_and_its_read_is_not_kept() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let mut b = Bucket::over(store, "s3://mem/p");
        let home = std::env::temp_dir().join(format!("snapfs-relist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        b.keep = std::cell::OnceCell::from(Some(keep::Dir::buckets(&home).unwrap()));
        b.keep_at = Some("mem".into());
        let id = "0123456789abcdef0123456789abcdef";
        let key = format!("packs/{id}.idx");
        let entry = |h: u8| encode_idx(&[([h; 32], 0, 10, false)]);
        b.put_object(&key, entry(1)).unwrap();
        let tags_now = || {
            b.list_tagged("packs")
                .unwrap()
                .into_iter()
                .collect::<HashMap<String, String>>()
        };
        let listed = tags_now();
        // Replaced after the listing, before the read: what is read is the new one,
        // and it is not kept under the tag the listing gave the old one.
        b.put_object(&key, entry(2)).unwrap();
        let tags: HashMap<&str, &str> = listed
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let cache = b.kept().expect("kept");
        let got = b.read_idxs(&[key.as_str()], Some((cache, &tags))).unwrap();
        assert_eq!(got[0].as_ref().unwrap()[0].0, [2; 32]);
        assert_eq!(cache.get(id, &listed[&key]), None);
        // Read under the listing that gives its own tag, it is kept.
        let listed = tags_now();
        let tags: HashMap<&str, &str> = listed
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        b.read_idxs(&[key.as_str()], Some((cache, &tags))).unwrap();
        assert!(cache.get(id, &listed[&key]).is_some());
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn only_pack_ids_snapfs_writes_name_a_kept_index() {
        assert_eq!(
            idx_id("packs/0123456789abcdef0123456789abcdef.idx"),
            Some("0123456789abcdef0123456789abcdef")
        );
        for hostile in [
            "packs/../../etc/x.idx",
            "packs/a/b.idx",
            "packs/.idx",
            "packs/.hidden.idx",
            "packs/a b.idx",
            "packs/x.pack",
            "manifests/x.idx",
        ] {
            assert_eq!(idx_id(hostile), None, "{hostile}");
        }
    }

    #[test]
    fn a_root_another_writer_replaced_is_not_written_over() {
        // A store that makes writes conditional, as AWS S3, MinIO, R2 and Ceph do
        // (Garage, which the other tests run against, does not).
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let url = format!("s3://unit-test-{}/p", random_id());
        let (a, b) = (Bucket::over(store.clone(), &url), Bucket::over(store, &url));
        let root = Root {
            format: LAYOUT,
            block_size: 65536,
            volume: "11".repeat(16),
            origin: "11".repeat(16),
            ..Default::default()
        };
        // Two first writers (of two volumes): the second's is refused.
        assert!(a.root().unwrap().is_none());
        assert!(b.root().unwrap().is_none());
        a.put_root(&mut root.clone()).unwrap();
        let other = Root {
            volume: "22".repeat(16),
            ..root.clone()
        };
        let e = b.put_root(&mut other.clone()).unwrap_err().to_string();
        assert!(e.contains("changed since this writer read it"), "{e}");
        // A writes on over its own write; then B, having read it, writes (as a gc
        // that took A's lock over does first): A's next write is refused, and the
        // root stays B's.
        let mut ra = a.root().unwrap().unwrap();
        a.put_root(&mut ra).unwrap();
        let mut rb = b.root().unwrap().unwrap();
        rb.snapshots.push(RootSnapshot {
            name: "b".into(),
            created_sec: 1,
            created_nsec: 0,
            base: None,
            manifest: "manifests/b".into(),
            records: 0,
            hash: None,
            deleted: false,
        });
        b.put_root(&mut rb).unwrap();
        let e = a.put_root(&mut ra).unwrap_err().to_string();
        assert!(e.contains("changed since this writer read it"), "{e}");
        assert_eq!(a.root().unwrap().unwrap().snapshots.len(), 1);
        // A write that landed though its answer was lost (its retry finds the root
        // changed, by itself): the root holds what was written, and it stands.
        let mut ra = a.root().unwrap().unwrap();
        let mut same = b.root().unwrap().unwrap();
        b.put_root(&mut same).unwrap();
        a.put_root(&mut ra).unwrap();
        assert_eq!(ra.generation, same.generation);
    }

    #[test]
    fn paths_are_found_through_cycles_and_lattices_of_parents_quickly() {
        use crate::store::schema::{KIND_PARENT, ROOT_INO};
        let mut m = Overlay::new();
        let parent = |m: &mut Overlay, ino: u64, dir: u64, name: &str| {
            m.insert(
                (ino, KIND_PARENT, dir, name.as_bytes().to_vec()),
                Some(vec![]),
            );
        };
        // A cycle: 10 is in the root and in 11, and 11 is in 10.
        parent(&mut m, 10, ROOT_INO, "a");
        parent(&mut m, 10, 11, "x");
        parent(&mut m, 11, 10, "b");
        assert_eq!(paths(&m, 11).unwrap(), ["/a/b"]);
        // 200 levels of two inodes each in both of the next level's, the last in
        // nothing: 2^200 ways up, none to the root. Then 20, in the lattice and in
        // 11: its one path is through 11.
        for level in 0..200u64 {
            let (a, b) = (100 + 2 * level, 101 + 2 * level);
            if level < 199 {
                for ino in [a, b] {
                    parent(&mut m, ino, a + 2, "l");
                    parent(&mut m, ino, b + 2, "r");
                }
            }
        }
        let t = std::time::Instant::now();
        assert_eq!(paths(&m, 100).unwrap(), Vec::<String>::new());
        parent(&mut m, 20, 100, "up");
        parent(&mut m, 20, 11, "c");
        assert_eq!(paths(&m, 20).unwrap(), ["/a/b/c"]);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_live_process_is_not_taken_for_gone_where_proc_hides_it() {
        assert!(!process_gone(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(process_gone(pid));
        // A user other than root, where /proc is mounted with hidepid=2: pid 1 (root's)
        // is hidden there, and still not gone. (Set up as root, in a child process
        // with a mount namespace of its own: a mount of /proc there has options of
        // its own since Linux 5.8; before, it would change the machine's /proc.)
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut v = release
            .split(['.', '-'])
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        if unsafe { libc::geteuid() } != 0 || (major, minor) < (5, 8) {
            eprintln!("hidepid case skipped: needs root and Linux 5.8 or later");
            return;
        }
        // SAFETY: the child makes system calls and exits; it returns to nothing.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = unsafe {
                let c = |s: &str| std::ffi::CString::new(s).unwrap();
                let (proc_, none) = (c("/proc"), c("none"));
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    9
                } else if libc::mount(
                    none.as_ptr(),
                    c("/").as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                    || libc::mount(
                        c("proc").as_ptr(),
                        proc_.as_ptr(),
                        c("proc").as_ptr(),
                        0,
                        c("hidepid=2").as_ptr().cast(),
                    ) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    10
                } else if Path::new("/proc/1").exists() {
                    11
                } else if process_gone(1) {
                    12
                } else {
                    0
                }
            };
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "{status}");
        match libc::WEXITSTATUS(status) {
            // No namespaces here (a container without CAP_SYS_ADMIN).
            9 => eprintln!("hidepid case skipped: cannot make a mount namespace"),
            code => assert_eq!(
                code, 0,
                "10: set-up failed, 11: pid 1 not hidden, 12: taken for gone"
            ),
        }
    }

    #[test]
    fn a_frame_expands_to_a_block_at_most() {
        let block = vec![7u8; MAX_BLOCK_SIZE as usize];
        let frame = zstd::bulk::compress(&block, 6).unwrap();
        assert_eq!(expand(&frame).as_deref(), Some(&block[..]));
        // One byte more than the largest block, and a frame of 64 MiB (small
        // itself): neither is expanded.
        let over = zstd::bulk::compress(&vec![7u8; MAX_BLOCK_SIZE as usize + 1], 6).unwrap();
        assert_eq!(expand(&over), None);
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 6).unwrap();
        assert!(bomb.len() < 64 << 10);
        assert_eq!(expand(&bomb), None);
        // Not a frame at all, or cut short.
        assert_eq!(expand(b"not zstd"), None);
        assert_eq!(expand(&frame[..frame.len() - 1]), None);
    }

    #[test]
    fn compression_levels_parse_or_say_what_is_wrong() {
        assert_eq!(parse_compression("off"), Ok(None));
        assert_eq!(parse_compression("0"), Ok(None));
        assert_eq!(parse_compression(" 6 "), Ok(Some(6)));
        assert_eq!(parse_compression("19"), Ok(Some(19)));
        for bad in ["20", "-1", "fast", "", "6x"] {
            let e = parse_compression(bad).unwrap_err();
            assert!(e.starts_with(&format!("--compress {bad}:")), "{e}");
        }
    }

    #[test]
    fn a_pack_places_every_extent_it_is_given_compressed_or_not() {
        let env = |k: &str| match k {
            "AWS_ENDPOINT_URL" => Some("http://127.0.0.1:9".to_string()),
            "AWS_REGION" => Some("x".to_string()),
            "AWS_ACCESS_KEY_ID" => Some("x".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("x".to_string()),
            _ => None,
        };
        let b = Bucket::open_with("s3://b/p", env).unwrap();
        let mut pack = Pack::default();
        let mut want = HashMap::new();
        for i in 0..300u32 {
            // Text-like extents (they compress), random-like ones (they do not),
            // and a small one.
            let data: Vec<u8> = match i % 3 {
                0 => format!("line {i} ").repeat(8000).into_bytes(),
                1 => {
                    let mut r = vec![0u8; 65536];
                    let mut h = blake3::Hasher::new();
                    h.update(&i.to_le_bytes()).finalize_xof().fill(&mut r);
                    r
                }
                _ => vec![i as u8; 40],
            };
            let hash = *blake3::hash(&data).as_bytes();
            pack.add(&b, hash, data.clone()).unwrap();
            want.insert(hash, data);
        }
        pack.collect(&b, true).unwrap();
        assert_eq!(pack.hashes.len(), want.len());
        let mut zstd = 0;
        for &(hash, offset, len, z) in &pack.hashes {
            let place = Place {
                pack: "packs/x.pack".into(),
                offset,
                len,
                zstd: z,
            };
            let raw = &pack.data[offset as usize..(offset + len as u64) as usize];
            assert_eq!(b.extent(&place, &hash, raw).as_ref(), want.get(&hash));
            zstd += usize::from(z);
        }
        assert_eq!(zstd, 100, "the text-like extents, and only they");
    }
}
