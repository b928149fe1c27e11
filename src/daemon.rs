//! Mounting: option parsing, checks on the mountpoint, daemonizing, signal handling,
//! the background flusher and the control socket through which the CLI reaches a
//! running daemon.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::control::Request;
use crate::fs::{Fs, Inval};
use crate::fuse::SnapFuse;
use crate::store::StoreConfig;
use crate::text::clip;

/// The control socket inside a store.
pub const SOCKET: &str = "snapfs.sock";

/// The daemon's process id, inside the store, while it runs.
pub const PIDFILE: &str = "snapfs.pid";

/// See [`MountOptions::bdi_max_ratio`]. At the kernel's 1% (about 47 MiB of dirty
/// pages with 24 GiB of memory), a streaming writer is throttled down to the pace of
/// single requests; 10% measured 1.4x faster sequential writes.
pub const DEFAULT_BDI_MAX_RATIO: u32 = 10;

/// Ring entries per CPU queue for FUSE over io_uring, spread over the queue's
/// threads: requests beyond them wait in the kernel's queue.
pub const DEFAULT_URING_DEPTH: usize = 4;

/// Threads per CPU serving its io_uring queue (the queue's entries are spread over
/// them): a request waits for a free thread of its CPU, not behind one that sleeps.
/// With one, a `stat` on the CPU of a process calling `fsync` in a loop waited up to
/// 61-429 ms; with two, a few ms at most (BENCHMARKS.md, `bench/latency.sh`).
pub const DEFAULT_URING_THREADS: usize = 2;

/// See [`MountOptions::threads`]. Every request is a round trip: the caller wakes a
/// request thread, which wakes the caller with the reply. With one request thread,
/// the scheduler keeps the two on different CPUs, and on a virtual machine whose idle
/// CPUs halt, each wake-up costs tens of microseconds. Measured on 2 cores: a `stat`
/// of an uncached file took 68 µs with one thread and 37 with two or four; untar took
/// 6.5 s against 4.0; four threads created files 15% faster than two.
pub const DEFAULT_THREADS: usize = 4;

/// Parsed `-o` options.
#[derive(Debug, Default)]
pub struct MountOptions {
    /// The mount source shown in /proc/mounts (`source=` or `fsname=`).
    pub fsname: Option<String>,
    /// FUSE request threads. Several, by default: a request's round trip costs two
    /// cross-CPU wake-ups when one thread serves them all (see `DEFAULT_THREADS`).
    pub threads: usize,
    /// Kernel flags passed through.
    pub flags: Vec<fuser::MountOption>,
    /// Mount read-only.
    pub read_only: bool,
    /// Leave `.snapshots` out of the root's listing.
    pub hide_snapdir: bool,
    /// When reads move access times (`relatime`, the default; `strictatime`;
    /// `noatime`).
    pub atime: crate::fs::Atime,
    /// Directories keep their access times (`nodiratime`).
    pub nodiratime: bool,
    /// Let the kernel cache writes (FUSE writeback cache; `nowriteback` turns it off).
    pub writeback: bool,
    /// The share, in percent, of the system's dirty-page limit that the kernel may hold
    /// for this mount (`bdi_max_ratio=`; the kernel gives a FUSE mount 1).
    pub bdi_max_ratio: u32,
    /// Entries per CPU queue for FUSE over io_uring (`uring_depth=`; `nouring` or 0:
    /// `/dev/fuse` only). Used when the kernel offers it (`fuse.enable_uring=1`).
    pub uring_depth: usize,
    /// Run the io_uring queue threads under `SCHED_IDLE` (`uring_sched=idle`, the
    /// default) or the normal policy (`uring_sched=normal`).
    pub uring_idle: bool,
    /// Threads per CPU serving its io_uring queue (`uring_threads=`).
    pub uring_threads: usize,
    /// Take a scheduled snapshot this often.
    pub snapshot_every: Option<Duration>,
    /// Retention for scheduled snapshots.
    pub keep: Option<crate::policy::Keep>,
    /// Mount a store whose directory other users may read (`allow_shared_store`).
    pub allow_shared_store: bool,
    /// Let any local user run the control socket's read-only commands (`status`,
    /// `snapshot list`): `control=public`. Default `control=private`: root and the
    /// daemon's user only.
    pub control_public: bool,
    /// Mount as a replica (`replica`): read-only, showing the newest snapshot
    /// received, and receiving `snapfs sync`. A store that is a replica already is
    /// always mounted so.
    pub replica: bool,
    /// Receive `snapfs sync` over TCP here (`listen=ADDR`, `ADDR` or `HOST:PORT`;
    /// loopback unless a host is given). Makes the mount a replica.
    pub listen: Option<String>,
    /// The shared key for `listen` (`key_file=F`).
    pub key_file: Option<PathBuf>,
    /// Sync to these after every scheduled snapshot (`replicate=DEST[+DEST...]`).
    pub replicate: Vec<String>,
    /// The shared key for `tcp://` destinations of `replicate` (`replicate_key_file=F`).
    pub replicate_key_file: Option<PathBuf>,
    /// The volume's size (`size=BYTES`, K/M/G/T suffixes): `statfs` shows it, and
    /// writes that would take the stored data (snapshots' too) past it get ENOSPC.
    pub size: Option<u64>,
    /// The block size a store made by this mount gets (`block_size=`, a power of two
    /// from 4K to 1M; default 64K). A store that holds nothing yet takes it too; one
    /// that holds anything keeps its own, and another value is refused.
    pub block_size: Option<u32>,
}

impl MountOptions {
    /// Parses a list of comma-separated option strings.
    pub fn parse(opts: &[String]) -> anyhow::Result<Self> {
        use fuser::MountOption as M;
        let mut o = MountOptions {
            threads: DEFAULT_THREADS,
            writeback: true,
            bdi_max_ratio: DEFAULT_BDI_MAX_RATIO,
            uring_depth: DEFAULT_URING_DEPTH,
            uring_idle: true,
            uring_threads: DEFAULT_URING_THREADS,
            // Tools that walk a tree (find, du, rsync, backups) would walk every
            // snapshot too: `.snapshots` is reachable by name, not listed.
            hide_snapdir: true,
            ..Default::default()
        };
        for opt in opts
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
        {
            let (key, val) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            match (key, val) {
                ("source" | "fsname" | "subtype", Some("")) => {
                    bail!("mount option {key}= needs a value")
                }
                ("source" | "fsname", Some(v)) => o.fsname = Some(v.to_string()),
                // The type then reads fuse.NAME (default: plain fuse, as xfstests'
                // FSTYP=fuse expects; fuse.snapfs lets mount(8) find our helper on remount).
                ("subtype", Some(v)) => o.flags.push(M::Subtype(v.to_string())),
                ("threads", Some(v)) => o.threads = number_in(key, v, 1..=64, "a number")?,
                ("ro", None) => {
                    o.read_only = true;
                    o.flags.push(M::RO);
                }
                ("rw", None) => o.flags.push(M::RW),
                ("dev", None) => o.flags.push(M::Dev),
                ("nodev", None) => o.flags.push(M::NoDev),
                ("suid", None) => o.flags.push(M::Suid),
                ("nosuid", None) => o.flags.push(M::NoSuid),
                ("exec", None) => o.flags.push(M::Exec),
                ("noexec", None) => o.flags.push(M::NoExec),
                // Linux's: `atime` undoes `noatime`, leaving relatime.
                ("atime" | "relatime", None) => {
                    o.atime = crate::fs::Atime::Relative;
                    o.flags.retain(|f| !matches!(f, M::Atime | M::NoAtime));
                    o.flags.push(M::Atime);
                }
                ("strictatime", None) => {
                    o.atime = crate::fs::Atime::Strict;
                    o.flags.retain(|f| !matches!(f, M::Atime | M::NoAtime));
                    o.flags.push(M::Atime);
                }
                ("noatime", None) => {
                    o.atime = crate::fs::Atime::Never;
                    o.flags.retain(|f| !matches!(f, M::Atime | M::NoAtime));
                    o.flags.push(M::NoAtime);
                }
                ("nodiratime", None) => o.nodiratime = true,
                ("diratime", None) => o.nodiratime = false,
                // Times reach the disk with the next commit of metadata anyway.
                ("lazytime" | "nolazytime", None) => {}
                ("dirsync", None) => o.flags.push(M::DirSync),
                ("sync", None) => o.flags.push(M::Sync),
                ("async", None) => o.flags.push(M::Async),
                ("bdi_max_ratio", Some(v)) => {
                    o.bdi_max_ratio = number_in(key, v, 1..=100, "a percentage")?
                }
                ("uring", None) => o.uring_depth = DEFAULT_URING_DEPTH,
                ("nouring", None) => o.uring_depth = 0,
                ("uring_depth", Some(v)) => o.uring_depth = number_in(key, v, 0..=64, "a number")?,
                ("uring_threads", Some(v)) => {
                    o.uring_threads = number_in(key, v, 1..=16, "a number")?
                }
                ("uring_sched", Some("idle")) => o.uring_idle = true,
                ("uring_sched", Some("normal")) => o.uring_idle = false,
                ("writeback", None) => o.writeback = true,
                ("nowriteback", None) => o.writeback = false,
                ("snapdir", Some("hidden")) => o.hide_snapdir = true,
                ("snapdir", Some("visible")) => o.hide_snapdir = false,
                ("snapshot_every", Some(v)) => {
                    o.snapshot_every =
                        Some(crate::policy::parse_duration(v).map_err(anyhow::Error::msg)?)
                }
                ("keep", Some(v)) => {
                    o.keep = Some(crate::policy::Keep::parse(v).map_err(anyhow::Error::msg)?)
                }
                ("allow_shared_store", None) => o.allow_shared_store = true,
                ("control", Some("public")) => o.control_public = true,
                ("control", Some("private")) => o.control_public = false,
                ("replica", None) => o.replica = true,
                ("listen", Some(v)) if !v.is_empty() => {
                    // A bare port listens on loopback.
                    o.listen = Some(if v.bytes().all(|b| b.is_ascii_digit()) {
                        format!("127.0.0.1:{v}")
                    } else {
                        v.to_string()
                    });
                }
                ("key_file", Some(v)) if !v.is_empty() => o.key_file = Some(PathBuf::from(v)),
                ("replicate", Some(v)) => {
                    o.replicate =
                        crate::replicate::parse_destinations(v).map_err(anyhow::Error::msg)?
                }
                ("replicate_key_file", Some(v)) if !v.is_empty() => {
                    o.replicate_key_file = Some(PathBuf::from(v))
                }
                ("size", Some(v)) => o.size = Some(parse_size(v).map_err(anyhow::Error::msg)?),
                ("block_size", Some(v)) => {
                    o.block_size = Some(parse_block_size(v).map_err(anyhow::Error::msg)?)
                }
                // Always on; accepted for fstab lines that spell them out.
                ("default_permissions" | "allow_other" | "defaults", None) => {}
                _ => bail!("unknown mount option {:?}", clip(opt)),
            }
        }
        if o.listen.is_some() && o.key_file.is_none() {
            bail!("mount option listen= needs key_file= (the key `snapfs sync --key-file` gives)");
        }
        if o.key_file.is_some() && o.listen.is_none() {
            bail!("mount option key_file= is for listen=");
        }
        if o.listen.is_some() {
            o.replica = true;
        }
        if o.replicate.iter().any(|d| d.starts_with("tcp://")) && o.replicate_key_file.is_none() {
            bail!(
                "mount option replicate= to a tcp:// destination needs replicate_key_file= (the key its `snapfs serve` was given)"
            );
        }
        Ok(o)
    }
}

/// `v` in bytes: a number, or a number with one of `units` (of K, M, G, T: powers
/// of 1024) after it; `None` for anything else or what overflows.
fn suffixed_bytes(v: &str, units: &[u8]) -> Option<u64> {
    let unit = v.as_bytes().last().map(|b| b.to_ascii_uppercase());
    let (num, shift) = match unit {
        Some(u) if units.contains(&u) => {
            let shift = match u {
                b'K' => 10,
                b'M' => 20,
                b'G' => 30,
                _ => 40,
            };
            (&v[..v.len() - 1], shift)
        }
        _ => (v, 0),
    };
    let n: u64 = num.parse().ok()?;
    n.checked_shl(shift).filter(|b| b >> shift == n)
}

/// A size: bytes, or a number with K, M, G or T (powers of 1024), at least 1 MiB.
pub fn parse_size(v: &str) -> Result<u64, String> {
    suffixed_bytes(v, b"KMGT")
        .filter(|&b| b >= 1 << 20)
        .ok_or_else(|| {
            format!("size {v:?}: want bytes, or a number with K, M, G or T, at least 1M")
        })
}

/// A block size: a power of two from 4K to 1M, in bytes or with a K or M suffix.
pub fn parse_block_size(v: &str) -> Result<u32, String> {
    suffixed_bytes(v, b"KM")
        .and_then(|b| u32::try_from(b).ok())
        .filter(|&b| crate::store::valid_block_size(b))
        .ok_or_else(|| {
            format!("block_size {v:?}: want a power of two from 4K to 1M (4K, 8K, ... 1M)")
        })
}

/// Block sizes as people write them: 64K, 1M, or bytes.
pub fn show_block_size(b: u64) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}M", b >> 20)
    } else if b >= 1024 && b.is_multiple_of(1024) {
        format!("{}K", b >> 10)
    } else {
        b.to_string()
    }
}

/// The value `v` of mount option `key`, a number in `range` (`what` names it).
fn number_in<T>(
    key: &str,
    v: &str,
    range: std::ops::RangeInclusive<T>,
    what: &str,
) -> anyhow::Result<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    v.parse()
        .ok()
        .filter(|n| range.contains(n))
        .with_context(|| {
            format!(
                "mount option {key}={v}: want {what} from {} to {}",
                range.start(),
                range.end()
            )
        })
}

/// Whether `path` is a mount point, from /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    mounts().iter().any(|(_, mp)| mp == path)
}

/// One mount, as /proc/self/mountinfo describes it.
pub(crate) struct MountEntry {
    /// The device number, `major:minor`.
    pub dev: String,
    /// The directory of the filesystem the mount shows (`/`: all of it).
    pub root: String,
    /// The mount point.
    pub mp: PathBuf,
    /// The filesystem type (`fuse`, `fuse.snapfs`, ...).
    pub fstype: String,
    /// The mount's source (for a snapfs mount: its store, unless `source=` named it).
    pub source: String,
}

/// Every mount, from /proc/self/mountinfo, in its order (a later mount on a path
/// hides an earlier one).
pub(crate) fn mount_table() -> Vec<MountEntry> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    // Fields: id, parent, major:minor, root, mount point, options, optional fields,
    // "-", filesystem type, source, super options.
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let after = f.iter().position(|x| *x == "-").map(|i| &f[i + 1..]);
            let field = |i: usize| {
                after
                    .and_then(|a| a.get(i))
                    .map_or(String::new(), |x| unescape_mount(x))
            };
            Some(MountEntry {
                dev: f.get(2)?.to_string(),
                root: unescape_mount(f.get(3)?),
                mp: PathBuf::from(unescape_mount(f.get(4)?)),
                fstype: field(0),
                source: field(1),
            })
        })
        .collect()
}

/// Every mount as (device number `major:minor`, mount point), in mount order.
pub(crate) fn mounts() -> Vec<(String, PathBuf)> {
    mount_table().into_iter().map(|m| (m.dev, m.mp)).collect()
}

/// The mount points that show the whole filesystem of device `dev` (`major:minor`):
/// a daemon's own mount and bind mounts of it, in mount order.
fn mounts_of(dev: &str) -> Vec<PathBuf> {
    mount_table()
        .into_iter()
        .filter(|m| m.dev == dev && m.root == "/")
        .map(|m| m.mp)
        .collect()
}

/// The type of the filesystem mounted at `mp` (the last mount there).
fn fstype_at(mp: &Path) -> Option<String> {
    mount_table()
        .into_iter()
        .rfind(|m| m.mp == mp)
        .map(|m| m.fstype)
}

/// The device number of the filesystem mounted at `mp` (the last mount there).
pub(crate) fn device_at(mp: &Path) -> Option<String> {
    mounts().into_iter().rfind(|(_, p)| p == mp).map(|(d, _)| d)
}

/// Scheduled replication of this daemon's volume (`replicate=`), once started.
static REPLICATOR: std::sync::OnceLock<Arc<crate::replicate::Replicator>> =
    std::sync::OnceLock::new();

/// The device number of this daemon's FUSE mount, once it is mounted.
static MOUNT_DEVICE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// Set when the FUSE session has ended: the device number may be another
/// filesystem's from then on.
static SESSION_OVER: AtomicBool = AtomicBool::new(false);

/// Where the filesystem of device `dev` is mounted now: `mp` while it still is, else
/// another mount of it (a bind mount that outlived the first).
fn live_mountpoint(dev: Option<&str>, mp: &Path) -> PathBuf {
    let Some(dev) = dev else {
        return mp.to_path_buf();
    };
    let all = mounts_of(dev);
    if all.iter().any(|p| p == mp) {
        return mp.to_path_buf();
    }
    all.into_iter().next().unwrap_or_else(|| mp.to_path_buf())
}

/// The options a second mount of a mounted store may take: those of one mount point
/// (a bind mount of the first); the rest belong to the volume and are the first's.
/// Returns the `MS_*` flags for the bind mount.
fn second_mount_flags(opts: &[String]) -> anyhow::Result<libc::c_ulong> {
    let mut ro = false;
    let (mut nosuid, mut nodev, mut noexec) = (true, true, false);
    for opt in opts
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let key = opt.split_once('=').map_or(opt, |(k, _)| k);
        match key {
            "ro" => ro = true,
            "rw" => ro = false,
            "suid" => nosuid = false,
            "nosuid" => nosuid = true,
            "dev" => nodev = false,
            "nodev" => nodev = true,
            "exec" => noexec = false,
            "noexec" => noexec = true,
            // Names only: the mount shows the first's source.
            "source"
            | "fsname"
            | "subtype"
            | "defaults"
            | "default_permissions"
            | "allow_other" => {}
            _ => bail!(
                "mount option {:?} is the volume's, set by its first mount: a second mount of a mounted store takes only ro/rw, nosuid/suid, nodev/dev and noexec/exec",
                clip(opt)
            ),
        }
    }
    let mut flags = libc::MS_RELATIME;
    for (on, f) in [
        (ro, libc::MS_RDONLY),
        (nosuid, libc::MS_NOSUID),
        (nodev, libc::MS_NODEV),
        (noexec, libc::MS_NOEXEC),
    ] {
        if on {
            flags |= f;
        }
    }
    Ok(flags)
}

/// Mounts `store`, which the daemon whose FUSE mount is device `dev` serves already,
/// at `mp` as well: a bind mount of that mount, with its own per-mount flags (root
/// only, as any bind mount). `false` when that daemon has no mount left (it is
/// going away, and the store is to be waited for).
fn second_mount(store: &Path, mp: &Path, opts: &[String], dev: &str) -> anyhow::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let flags = second_mount_flags(opts)?;
    let fuse = |p: &PathBuf| fstype_at(p).is_some_and(|t| t == "fuse" || t.starts_with("fuse."));
    let Some(first) = mounts_of(dev).into_iter().find(fuse) else {
        return Ok(false);
    };
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).context("a path with NUL");
    let (src, dst) = (c(&first)?, c(mp)?);
    // SAFETY: NUL-terminated paths; no filesystem type or data for a bind mount.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            bail!(
                "store {} is mounted at {} already; a second mount is a bind mount of it, which needs root",
                store.display(),
                first.display()
            );
        }
        bail!("cannot bind {} at {}: {e}", first.display(), mp.display());
    }
    // The bind took the first mount's flags; it gets its own.
    // SAFETY: as above; MS_REMOUNT|MS_BIND changes the flags of this mount only.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: unmounting the bind just made.
        unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
        bail!("cannot set the flags of the mount at {}: {e}", mp.display());
    }
    tracing::info!(store = %store.display(), first = %first.display(), mountpoint = %mp.display(), "mounted again (bind)");
    Ok(true)
}

/// A mountinfo path with its octal escapes (`\040` for a space) decoded.
pub(crate) fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = (b[i] == b'\\')
            .then(|| b.get(i + 1..i + 4))
            .flatten()
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| {
                u16::from(d[0] - b'0') * 64 + u16::from(d[1] - b'0') * 8 + u16::from(d[2] - b'0')
            })
            .and_then(|c| u8::try_from(c).ok());
        if let Some(c) = code {
            out.push(c);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sets up tracing, filtered by `SNAPFS_LOG` (EnvFilter syntax, default `warn`).
pub fn init_logging(to_file: Option<&Path>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SNAPFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let file = to_file.and_then(|p| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .ok()
    });
    let _ = match file {
        Some(f) => builder.with_ansi(false).with_writer(Arc::new(f)).try_init(),
        None => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .try_init()
        }
    };
}

/// `snapfs mount`: opens (or creates) the store, mounts it, and serves until
/// unmounted or signalled. Without `foreground`, returns in the parent once the
/// mount is live while a child serves it.
pub fn mount(
    store: &Path,
    mountpoint: &Path,
    opts: &[String],
    foreground: bool,
) -> anyhow::Result<()> {
    // Refuse a bad option before anything is opened.
    let cli_options = MountOptions::parse(opts)?;
    let dead = |p: &Path| {
        anyhow::anyhow!(
            "mountpoint {} is a dead FUSE mount (its daemon is gone): clear it with `umount -l {}`, then mount again",
            p.display(),
            p.display()
        )
    };
    // What the kernel answers on a mount whose daemon is gone: ENOTCONN, or while it
    // tears down an io_uring connection, ECONNABORTED or ECANCELED.
    let gone = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
        )
    };
    let mp = match std::fs::canonicalize(mountpoint) {
        Ok(p) => p,
        Err(e) if gone(&e) => return Err(dead(mountpoint)),
        Err(e) => bail!("mountpoint {}: {e}", mountpoint.display()),
    };
    match std::fs::metadata(&mp) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("mountpoint {} is not a directory", mp.display()),
        Err(e) if gone(&e) => return Err(dead(&mp)),
        Err(e) => bail!("mountpoint {}: {e}", mp.display()),
    }
    if is_mounted(&mp) {
        bail!("{} is already a mount point", mp.display());
    }
    let store = absolute(store)?;
    if store.starts_with(&mp) {
        bail!(
            "the store {} may not lie inside the mountpoint {}",
            store.display(),
            mp.display()
        );
    }
    // The daemon would serve its own writes (statfs, segment files) through the mount
    // it serves: the first write would wait for itself forever.
    if mp.starts_with(&store) {
        bail!(
            "the mountpoint {} may not lie inside the store {}",
            mp.display(),
            store.display()
        );
    }
    // Earlier options are overridden by later ones; snapfs.toml is read once the store
    // is known to be private, so only -o can allow a shared one.
    check_private(&store, cli_options.allow_shared_store)?;
    // A store its daemon serves already is mounted again as a bind mount of that
    // mount: one daemon, one superblock, every mount point alike.
    if let Some(out) = ask_daemon(&store, &Request::MountDevice) {
        if out.error {
            bail!(
                "store {} is in use: {}",
                store.display(),
                out.text.trim_end()
            );
        }
        if second_mount(&store, &mp, opts, out.text.trim())? {
            return Ok(());
        }
        // Its daemon has no mount left: it is going away; wait for the store below.
    }
    if foreground {
        init_logging(None);
    }
    let create = StoreConfig {
        block_size: cli_options
            .block_size
            .unwrap_or(StoreConfig::default().block_size),
    };
    let fs = Arc::new(
        open_waiting(&store, &create)
            .with_context(|| format!("cannot open store {}", store.display()))?,
    );
    // STORE/snapfs.toml gives defaults; -o options, parsed after them, win.
    let file_opts =
        crate::policy::read_config(&store.join("snapfs.toml")).map_err(anyhow::Error::msg)?;
    let mut args: Vec<String> = file_opts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    MountOptions::parse(&args).context("snapfs.toml")?;
    args.extend(opts.iter().cloned());
    let mut options = MountOptions::parse(&args)?;
    // A store that holds nothing yet takes the size asked (not through a read-only
    // mount, which writes nothing).
    if let Some(want) = options.block_size
        && u64::from(want) != fs.block_size()
        && (options.read_only || !fs.retake_block_size(want)?)
    {
        bail!(
            "store {} has block size {}, fixed once it holds anything: block_size={} is only for a store being made",
            store.display(),
            show_block_size(fs.block_size()),
            show_block_size(want.into())
        );
    }
    {
        let mut core = fs.lock();
        core.hide_snapdir = options.hide_snapdir;
        core.atime = if options.read_only {
            crate::fs::Atime::Never
        } else {
            options.atime
        };
        core.nodiratime = options.nodiratime;
        core.keep = options.keep.clone();
        core.set_size_limit(options.size);
    }
    check_destinations(&store, &mp, &options)?;
    let key = options
        .key_file
        .as_deref()
        .map(crate::sync::tcp::read_key_file)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if replica_mode(&fs, &store, &options)? {
        if options.snapshot_every.is_some() {
            bail!("a replica takes no snapshots of its own: snapshot_every is for its source");
        }
        // A replica's tree is its newest snapshot: nothing is written through the
        // mount, and the kernel caches no writes.
        options.read_only = true;
        options.flags.retain(|f| *f != fuser::MountOption::RW);
        options.flags.push(fuser::MountOption::RO);
        // What a source sends is not to be trusted as a setuid program or a device
        // for every local user.
        options
            .flags
            .retain(|f| !matches!(f, fuser::MountOption::Suid | fuser::MountOption::Dev));
        options.flags.push(fuser::MountOption::NoSuid);
        options.flags.push(fuser::MountOption::NoDev);
        options.writeback = false;
        fs.lock()
            .show_replica()
            .context("showing the replica's newest snapshot")?;
    }
    // Bound before mounting, so that a busy address fails the mount.
    let listener = match (&options.listen, key) {
        (Some(addr), Some(key)) => Some((
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr} (listen=)"))?,
            key,
        )),
        _ => None,
    };
    let mut config = fuser::Config::default();
    config.mount_options = options.flags.clone();
    config
        .mount_options
        .push(fuser::MountOption::DefaultPermissions);
    config.mount_options.push(fuser::MountOption::FSName(
        options
            .fsname
            .clone()
            .unwrap_or_else(|| store.display().to_string()),
    ));
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(options.threads);
    config.clone_fd = options.threads > 1;
    config.uring_depth = Some(options.uring_depth);
    config.uring_idle_priority = options.uring_idle;
    config.uring_threads = options.uring_threads;
    let fuse = SnapFuse::new(fs.clone(), options.writeback, options.uring_depth > 0);
    let mut session = fuser::Session::new(fuse, &mp, &config)
        .with_context(|| format!("cannot mount on {}", mp.display()))?;
    if let Some(dev) = device_at(&mp) {
        let _ = MOUNT_DEVICE.set(dev);
    }
    if options.writeback
        && let Err(e) = set_bdi_max_ratio(&mp, options.bdi_max_ratio)
    {
        tracing::warn!(error = %e, "cannot raise the mount's share of dirty pages");
    }
    let ready = if foreground {
        None
    } else {
        Some(daemonize(&store)?)
    };
    tracing::info!(store = %store.display(), mountpoint = %mp.display(), "mounted");
    let pidfile = store.join(PIDFILE);
    write_private(&pidfile, format!("{}\n", std::process::id()).as_bytes())
        .context("writing the pid file")?;

    // Signals: block them before any thread starts, so every thread inherits the mask
    // (one that did not would die of SIGTERM and take the process with it, unmounting
    // nothing); one thread waits for them and unmounts; the session then ends and we
    // flush below.
    let signals = block_signals();
    // Served before the mount is reported up, so commands work as soon as it is.
    let access = ControlAccess {
        // SAFETY: geteuid cannot fail.
        owner: unsafe { libc::geteuid() },
        public: options.control_public,
    };
    let control = serve_control(&store, Arc::downgrade(&fs), options.uring_depth > 0, access);
    if !options.replicate.is_empty() {
        let opts = crate::sync::Options {
            key_file: options.replicate_key_file.clone(),
            // Batch mode: no password prompt a daemon could never answer, and a dead
            // network noticed within a minute.
            ssh: "ssh -o BatchMode=yes -o ConnectTimeout=20 -o ServerAliveInterval=15 -o ServerAliveCountMax=4".into(),
            remote_snapfs: "snapfs".into(),
            in_daemon: true,
            one_off: false,
            ..Default::default()
        };
        let canon = std::fs::canonicalize(&store).unwrap_or_else(|_| store.clone());
        let known = crate::replicate::read_known(&canon);
        let targets = options
            .replicate
            .iter()
            .map(|t| (t.clone(), known.get(t).copied()))
            .collect();
        let r = crate::replicate::Replicator::start(canon, targets, opts);
        if REPLICATOR.set(r).is_err() {
            tracing::error!("replication was started twice; the second is ignored");
        }
    }
    if let Some((l, key)) = listener {
        listen(l, key, Arc::downgrade(&fs))?;
    }
    if let Some(fd) = ready {
        // Tell the waiting parent that the daemon is up; it exits 0 on this byte.
        // SAFETY: `fd` is the write end of the pipe made in `daemonize`, owned here.
        unsafe {
            libc::write(fd, b"1".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }

    let mut unmounter = session.unmount_callable();
    let mp2 = mp.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `signals` is an initialised set and `sig` a valid out pointer.
            unsafe { libc::sigwait(&signals, &mut sig) };
            tracing::info!(sig, "signal received, unmounting");
            // Every mount of our filesystem goes: bind mounts of it first (the
            // filesystem lives while any does), then our own.
            let dev = MOUNT_DEVICE.get().map(String::as_str);
            let others: Vec<PathBuf> = dev
                .map(mounts_of)
                .unwrap_or_default()
                .into_iter()
                .filter(|p| *p != mp2)
                .collect();
            for p in others.iter().rev() {
                unmount_ours(p, dev);
            }
            // Our first mount point, if it still shows our filesystem (it may have been
            // unmounted, and something else mounted there since).
            let ours = dev.is_some() && device_at(&mp2).as_deref() == dev;
            if !ours || unmounter.unmount().is_err() {
                // Whatever is left of ours, found by device, never by path.
                for p in dev.map(mounts_of).unwrap_or_default().iter().rev() {
                    unmount_ours(p, dev);
                }
            }
        })?;
    let notifier = session.notifier();
    fs.set_invalidator(Box::new(move |i| {
        use std::os::unix::ffi::OsStrExt;
        // The kernel may not hold what we name; that is fine.
        let _ = match i {
            Inval::Inode(ino) => notifier.inval_inode(fuser::INodeNo(*ino), 0, 0),
            // A negative offset: the attributes, and no page.
            Inval::Attr(ino) => notifier.inval_inode(fuser::INodeNo(*ino), -1, 0),
            Inval::Entry(dir, name) => {
                notifier.inval_entry(fuser::INodeNo(*dir), std::ffi::OsStr::from_bytes(name))
            }
        };
    }));
    if options.writeback {
        let mp = mp.clone();
        fs.set_kernel_flush(Box::new(move |open: &[Vec<u8>]| {
            use std::os::unix::ffi::OsStrExt;
            use std::os::unix::fs::OpenOptionsExt;
            let t = std::time::Instant::now();
            // Our first mount point may be gone while a bind mount of it lives on.
            let mp = live_mountpoint(MOUNT_DEVICE.get().map(String::as_str), &mp);
            if let Err(e) = syncfs(&mp) {
                tracing::warn!(error = %e, "could not write back the kernel's cached writes");
            }
            // The kernel may end its write-back before we have seen the data (it
            // queues it as requests); closing a file waits for that file's writes.
            for rel in open {
                let path = mp.join(std::ffi::OsStr::from_bytes(rel));
                let open = |flags| {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | flags)
                        .open(&path)
                };
                // O_NOATIME is for the owner (or root) only.
                if let Err(e) = open(libc::O_NOATIME).or_else(|_| open(0)) {
                    tracing::warn!(path = %path.display(), error = %e,
                        "cannot wait for the kernel's cached writes to this file");
                }
            }
            tracing::debug!(took = ?t.elapsed(), files = open.len(), "kernel wrote back its cached writes");
        }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = spawn_flusher(fs.clone(), stop.clone());
    let scheduler = options
        .snapshot_every
        .map(|every| spawn_scheduler(Arc::downgrade(&fs), every, stop.clone()));

    let res = session.run();
    SESSION_OVER.store(true, Ordering::SeqCst);
    if let Some(r) = REPLICATOR.get() {
        r.stop();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = flusher.join();
    if let Some(s) = scheduler {
        let _ = s.join();
    }
    if let Some(path) = control {
        let _ = std::fs::remove_file(path);
    }
    // Long reads beside the core (fsck, status) stop and let go of the store first:
    // compaction and closing the database wait for no one then.
    let (readers, cancel) = fs.lock().store().view_handles();
    if !crate::store::Store::stop_views(&readers, &cancel, Duration::from_secs(10)) {
        tracing::warn!("a long read of the store did not stop within 10 s");
    }
    // Replication sessions end with the views they send from: their threads are
    // waited for, so that none is cut by the process's exit.
    if let Some(r) = REPLICATOR.get()
        && !r.join(std::time::Instant::now() + Duration::from_secs(10))
    {
        tracing::warn!("a replication session did not end within 10 s");
    }
    let flushed = {
        let mut core = fs.lock();
        core.sync_all().and_then(|_| {
            core.store().compact()?;
            Ok(core.store().compact_metadata()?)
        })
    };
    // Close the database before the pid file goes, so a waiter that sees it gone can
    // open the store. A control connection still answering holds the core a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&fs) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if Arc::try_unwrap(fs).is_err() {
        tracing::warn!("the core is still shared at exit");
    }
    let _ = std::fs::remove_file(&pidfile);
    flushed.context("final flush")?;
    tracing::info!("unmounted cleanly");
    res.context("FUSE session failed")
}

/// Refuses, at mount, `replicate=` destinations that cannot work: the volume itself
/// (its store, or a path inside its mount point, whose copies would be in every next
/// snapshot), the same destination twice, a `tcp://` one without a readable key, an
/// ssh URL that does not parse.
fn check_destinations(store: &Path, mp: &Path, options: &MountOptions) -> anyhow::Result<()> {
    if options.replicate_key_file.is_some()
        && !options.replicate.iter().any(|d| d.starts_with("tcp://"))
    {
        bail!("mount option replicate_key_file= is for tcp:// destinations of replicate=");
    }
    let store = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
    let mut seen = std::collections::HashSet::new();
    for d in &options.replicate {
        let key = if d.starts_with("tcp://") {
            if let Some(k) = &options.replicate_key_file {
                crate::sync::tcp::read_key_file(k).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            d.trim_end_matches('/').to_string()
        } else if d.starts_with("ssh://") {
            crate::sync::ssh::parse(d).map_err(|e| anyhow::anyhow!("replicate: {e}"))?;
            d.clone()
        } else if d.starts_with("s3://") {
            // The URL and the settings (the daemon's environment, as at mount).
            crate::sync::s3::Bucket::open(d).map_err(|e| anyhow::anyhow!("replicate: {e}"))?;
            d.trim_end_matches('/').to_string()
        } else {
            let p = absolute(Path::new(d))?;
            // The deepest existing ancestor, resolved: the path itself may not exist.
            let mut real = p.clone();
            let mut rest = Vec::new();
            while !real.exists() {
                match (real.parent(), real.file_name()) {
                    (Some(parent), Some(name)) => {
                        rest.push(name.to_os_string());
                        real = parent.to_path_buf();
                    }
                    _ => break,
                }
            }
            let mut real = std::fs::canonicalize(&real).unwrap_or(real);
            for r in rest.iter().rev() {
                real.push(r);
            }
            if real == store || real.starts_with(mp) || real.starts_with(&store) {
                bail!(
                    "replicate: {d} is this volume itself (its store, or inside it or its mount point)"
                );
            }
            real.display().to_string()
        };
        if !seen.insert(key) {
            bail!("replicate: {d} is given twice");
        }
    }
    Ok(())
}

/// Whether the store is mounted as a replica: it is one, or `-o replica` (or
/// `listen=`) asks for one, which a store holding files or snapshots of its own
/// cannot be.
fn replica_mode(fs: &Fs, store: &Path, options: &MountOptions) -> anyhow::Result<bool> {
    let mut core = fs.lock();
    let st = core.store();
    // A demoted store waits, read-only, for its first session from the volume that
    // replaced it.
    if st.replica_of()?.is_some() || st.demoted_at()?.is_some() {
        return Ok(true);
    }
    if !options.replica {
        return Ok(false);
    }
    let empty = st.snapshot_list(true)?.is_empty() && st.live_is_empty()?;
    if !empty {
        bail!(
            "store {} holds files or snapshots of its own: only a new store or a replica mounts as a replica (-o replica, listen=)",
            store.display()
        );
    }
    Ok(true)
}

/// Only one session at a time receives into the store this daemon holds; it is
/// taken once the source has proven the key.
static RECEIVING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long a session that has proven the key waits for the one receiving before it.
const RECEIVE_WAIT: Duration = Duration::from_secs(60);

/// A sync sink into the store this daemon holds: each step under the core lock (the
/// FUSE threads go on between steps), each snapshot shown as it commits. Ends the
/// session once the store is being unmounted.
struct DaemonSink<'a> {
    fs: &'a Fs,
    cancel: Arc<AtomicBool>,
    /// [`RECEIVING`], once admitted.
    one: Option<std::sync::MutexGuard<'static, ()>>,
}

impl<'a> DaemonSink<'a> {
    fn new(fs: &'a Fs) -> Self {
        let cancel = fs.lock().store().view_handles().1;
        DaemonSink {
            fs,
            cancel,
            one: None,
        }
    }
}

impl crate::sync::session::SinkStore for DaemonSink<'_> {
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut crate::store::Store) -> Result<T, crate::sync::session::SyncError>,
    ) -> Result<T, crate::sync::session::SyncError> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(crate::sync::session::SyncError::Protocol(
                "the destination is being unmounted".into(),
            ));
        }
        let mut core = self.fs.lock();
        let res = f(core.store());
        // The first session into a store made empty may have given it its source's
        // block size.
        self.fs.note_block_size(&core);
        res
    }

    fn admit(&mut self) -> Result<(), crate::sync::session::SyncError> {
        let until = std::time::Instant::now() + RECEIVE_WAIT;
        loop {
            match RECEIVING.try_lock() {
                Ok(g) => {
                    self.one = Some(g);
                    return Ok(());
                }
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    self.one = Some(p.into_inner());
                    return Ok(());
                }
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if self.cancel.load(Ordering::SeqCst) || std::time::Instant::now() >= until {
                return Err(crate::sync::session::SyncError::Protocol(
                    "another session is receiving into this replica: try again later".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn renamed(&mut self, old: &[String]) {
        let mut invals = vec![crate::fs::Inval::Inode(crate::fs::SNAPDIR_INO)];
        for name in old {
            invals.push(crate::fs::Inval::Entry(
                crate::fs::SNAPDIR_INO,
                name.as_bytes().to_vec(),
            ));
        }
        self.fs.invalidate(&invals);
    }

    fn committed(&mut self) {
        let invals = self.fs.lock().refresh_view();
        match invals {
            // Told to the kernel without the core lock: it may ask us to answer.
            Ok(invals) => self.fs.invalidate(&invals),
            Err(e) => {
                tracing::warn!(error = %e, "sync: the replica cannot show its newest snapshot")
            }
        }
    }
}

/// Receives one session into the store this daemon holds (a replica's), over a
/// connection whose frames follow.
fn receive_here<R: std::io::Read, W: std::io::Write>(
    fs: &Fs,
    key: Option<[u8; 32]>,
    r: crate::sync::wire::FrameReader<R>,
    w: crate::sync::wire::FrameWriter<W>,
    proven: Option<&AtomicBool>,
) -> Result<crate::sync::session::Summary, crate::sync::session::SyncError> {
    let sum = crate::sync::session::receive_into(&mut DaemonSink::new(fs), key, r, w, proven)?;
    if !sum.snapshots.is_empty() {
        after_receive(fs);
    }
    Ok(sum)
}

/// After snapshots came into this mounted replica: its own retention (`keep=`)
/// prunes its `auto-` snapshots (never one held as a base), and its own destinations
/// (`replicate=`) are due the news.
fn after_receive(fs: &Fs) {
    if fs.lock().keep.is_some() {
        let req = Request::SnapshotPrune {
            dry_run: false,
            keep: None,
        };
        let out = crate::commands::run(fs, &req, false);
        if out.error {
            tracing::error!(
                error = out.text.trim_end(),
                "pruning received snapshots failed"
            );
        }
    }
    if let Some(r) = REPLICATOR.get() {
        r.kick();
    }
}

/// Serves `snapfs sync` into this mounted replica from the CLI on the control socket.
fn serve_receive(conn: UnixStream, fs: &Fs) -> anyhow::Result<()> {
    let (replica, promoted) = {
        let mut core = fs.lock();
        (core.is_replica(), core.store().promotion().ok().flatten())
    };
    if let Some(p) = promoted.filter(|_| !replica) {
        return answer(
            &conn,
            &crate::commands::fail(format!(
                "the destination was promoted on {} (from snapshot {}) and is a volume of its own: \
                 to fail back, demote the old source's store (snapfs demote) and sync from the destination to it",
                crate::policy::utc(p.at),
                crate::text::printable(&p.snapshot)
            )),
        );
    }
    if !replica {
        return answer(
            &conn,
            &crate::commands::fail(
                "the destination is mounted as a volume of its own: only a replica's mount receives (unmount it, or mount a new store with -o replica)".into(),
            ),
        );
    }
    let (r, w) = session_conn(&conn, Some(crate::sync::tcp::IDLE))?;
    // A panic ends this session only: the mount goes on.
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        receive_here(fs, None, r, w, None)
    }))
    .unwrap_or_else(|_| {
        Err(crate::sync::session::SyncError::Protocol(
            "the receiving thread panicked".into(),
        ))
    });
    match res {
        Ok(sum) => tracing::info!(snapshots = ?sum.snapshots, "sync: received"),
        Err(e) => tracing::warn!(error = %e, "sync: receive failed"),
    }
    Ok(())
}

/// Receives `snapfs sync` over TCP on `l` (`-o listen=`), one session at a time,
/// into this daemon's store, until it is unmounted.
fn listen(l: std::net::TcpListener, key: [u8; 32], fs: std::sync::Weak<Fs>) -> anyhow::Result<()> {
    tracing::info!(addr = %l.local_addr()?, "listening for sync sessions");
    std::thread::Builder::new()
        .name("sync-listen".into())
        .spawn(move || {
            let res = crate::sync::tcp::serve_on(l, |r, w, proven| {
                let Some(fs) = fs.upgrade() else {
                    return Err(crate::sync::session::SyncError::Protocol(
                        "the destination is being unmounted".into(),
                    ));
                };
                receive_here(&fs, Some(key), r, w, Some(proven))
            });
            if let Err(e) = res {
                tracing::error!(error = %e, "sync: the listener stopped");
            }
        })?;
    Ok(())
}

/// Writes `data` to a new file at `path` (replacing one there), readable by its
/// owner only.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(data)
}

/// Refuses a store directory that is not the daemon's user's alone. Its segments hold
/// the content of every file and its metadata every name, and the daemon (often root)
/// opens, writes and serves what it finds there: a directory another user owns or may
/// write could be swapped or salted under it. `shared` (`-o allow_shared_store`) lets
/// others enter and read an existing store; it never lets them own or write it.
fn check_private(store: &Path, shared: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(store) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => bail!("store {}: {e}", store.display()),
    };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        bail!(
            "store {} belongs to uid {}, not to uid {me} who mounts it: its owner could change it under the daemon; `chown -R {me} {}` if it is yours",
            store.display(),
            meta.uid(),
            store.display()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "store {} may be written by other users (mode {mode:04o}): `chmod 700 {}`",
            store.display(),
            store.display()
        );
    }
    if mode & 0o077 != 0 && !shared && crate::store::Store::exists(store) {
        bail!(
            "store {} is open to other users (mode {mode:04o}); its files hold the content of every file: `chmod 700 {}`, or mount with -o allow_shared_store",
            store.display(),
            store.display()
        );
    }
    Ok(())
}

/// Opens (or creates) the store; while it is locked by a daemon that is still exiting
/// after an unmount (its pid file present), waits up to five seconds for it.
fn open_waiting(store: &Path, create: &StoreConfig) -> Result<Fs, crate::fs::FsError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Fs::open(store, Some(create)) {
            Err(crate::fs::FsError::Store(crate::store::StoreError::Locked))
                if store.join(PIDFILE).exists() && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            res => return res,
        }
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.exists() {
        return Ok(std::fs::canonicalize(p)?);
    }
    let parent = p
        .parent()
        .filter(|x| !x.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let parent = std::fs::canonicalize(parent).with_context(|| {
        format!(
            "store {}: parent directory {}",
            p.display(),
            parent.display()
        )
    })?;
    Ok(parent.join(p.file_name().context("store path has no name")?))
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset operations on a zeroed, then emptied, set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Forks: the child carries on detached and returns the write end of a pipe on which
/// it reports readiness; the parent waits for that byte and exits 0 (1 if the child
/// died first; its error is in `STORE/snapfs.log`).
fn daemonize(store: &Path) -> anyhow::Result<i32> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid out array of two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: no other thread exists yet (the session's threads start in `run`), so
    // the child is a faithful copy; the parent leaves with `_exit`, running no
    // destructors that would unmount.
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {}
        _ => unsafe {
            libc::close(fds[1]);
            let mut b = 0u8;
            let n = libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
            if n != 1 {
                eprintln!(
                    "snapfs: the daemon exited during start-up; see {}",
                    store.join("snapfs.log").display()
                );
                libc::_exit(1);
            }
            libc::_exit(0)
        },
    }
    // SAFETY: plain syscalls on descriptors we own.
    unsafe {
        libc::close(fds[0]);
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            if null > 2 {
                libc::close(null);
            }
        }
    }
    init_logging(Some(&store.join("snapfs.log")));
    Ok(fds[1])
}

/// Flushes buffered data every second and commits durably every five.
fn spawn_flusher(fs: Arc<Fs>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("flusher".into())
        .spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                n += 1;
                let durable = n.is_multiple_of(25);
                if durable {
                    // The bulk of the fdatasync happens without the lock, so requests
                    // go on meanwhile.
                    fs.presync(None);
                }
                if n.is_multiple_of(5)
                    && let Err(e) = fs.lock().tick(durable)
                {
                    tracing::error!(error = %e, "background flush failed");
                }
            }
        })
        .expect("spawning the flusher thread")
}

/// Sets the `max_ratio` of the kernel's writeback accounting (its "bdi") for the mount
/// at `mp`: how much of the system's dirty-page limit its cached writes may take. The
/// mount's device number comes from /proc/self/mountinfo, since a `stat` of the mount
/// would wait for a session that is not running yet.
fn set_bdi_max_ratio(mp: &Path, ratio: u32) -> anyhow::Result<()> {
    let (dev, _) = mounts()
        .into_iter()
        .rfind(|(_, p)| p == mp)
        .with_context(|| format!("{} is not in /proc/self/mountinfo", mp.display()))?;
    let knob = format!("/sys/class/bdi/{dev}/max_ratio");
    std::fs::write(&knob, format!("{ratio}\n")).with_context(|| format!("writing {knob}"))?;
    tracing::debug!(knob, ratio, "mount's share of dirty pages set");
    Ok(())
}

/// Unmounts `p` if it still shows the filesystem of device `dev` (looked at again
/// just before), detaching it if it is busy; a symlink at `p` is not followed.
fn unmount_ours(p: &Path, dev: Option<&str>) {
    use std::os::unix::ffi::OsStrExt;
    if dev.is_none() || device_at(p).as_deref() != dev {
        return;
    }
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::UMOUNT_NOFOLLOW) } != 0 {
        // SAFETY: as above.
        unsafe { libc::umount2(c.as_ptr(), libc::UMOUNT_NOFOLLOW | libc::MNT_DETACH) };
    }
}

/// `syncfs(2)` on the filesystem mounted at `mp`: the kernel writes back its dirty
/// pages (to us, as write requests) and waits for them.
fn syncfs(mp: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    // O_NOATIME: the daemon's own flush is no access to the root directory (which
    // would move its access time after a snapshot had been taken).
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | flags)
            .open(mp)
    };
    let dir = open(libc::O_NOATIME).or_else(|_| open(0))?;
    // SAFETY: syncfs on an open descriptor.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Takes `auto-<UTC time>` snapshots every `every` and prunes by the mount's policy.
fn spawn_scheduler(
    fs: std::sync::Weak<Fs>,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            let mut next = std::time::Instant::now() + every;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if std::time::Instant::now() < next {
                    continue;
                }
                next += every;
                let Some(fs) = fs.upgrade() else { return };
                let name = crate::policy::auto_name(crate::store::schema::Ts::now().sec);
                // The same paths as the CLI's, which also tell the kernel what changed.
                let mut steps = vec![Request::SnapshotCreate { name }];
                // Not while a replication session runs: it may be sending what the
                // policy would prune (the next round prunes it).
                let busy = REPLICATOR.get().is_some_and(|r| r.busy());
                if fs.lock().keep.is_some() && !busy {
                    steps.push(Request::SnapshotPrune {
                        dry_run: false,
                        keep: None,
                    });
                }
                let mut taken = false;
                for req in steps {
                    let out = crate::commands::run(&fs, &req, false);
                    if out.error {
                        tracing::error!(command = ?req, error = out.text.trim_end(), "scheduled work failed");
                    } else if matches!(req, Request::SnapshotCreate { .. }) {
                        taken = true;
                    }
                }
                // After the pruning: what goes out is what is kept.
                if taken && let Some(r) = REPLICATOR.get() {
                    r.kick();
                }
            }
        })
        .expect("spawning the scheduler thread")
}

/// Control connections of root and the daemon's user served at once; more are
/// answered "busy".
const CONTROL_CONNS: usize = 8;
/// The same for other users (`control=public`).
const CONTROL_PUBLIC_CONNS: usize = 2;
/// The longest request line the control socket reads.
const CONTROL_REQUEST_MAX: u64 = 64 << 10;
/// How long a control connection may take to send its whole request.
const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may use the control socket.
#[derive(Clone, Copy, Debug)]
pub struct ControlAccess {
    /// The daemon's effective user (as well as root) may run every command.
    pub owner: u32,
    /// Any other user may run the read-only commands (`control=public`).
    pub public: bool,
}

/// Listens on `STORE/snapfs.sock` for CLI commands; returns the socket path. `uring`:
/// the mount asked for FUSE over io_uring (for `status`).
fn serve_control(
    store: &Path,
    fs: std::sync::Weak<Fs>,
    uring: bool,
    access: ControlAccess,
) -> Option<PathBuf> {
    let path = store.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    // The credential check below is what decides; the mode keeps others from even
    // connecting unless the read-only commands are opened to them. It is set by the
    // umask at bind (no thread that makes files runs yet), never by a chmod of the
    // path afterwards, which a swapped path would redirect.
    let mask = if access.public { 0o111 } else { 0o177 };
    // SAFETY: umask(2) has no preconditions.
    let old = unsafe { libc::umask(mask) };
    let bound = UnixListener::bind(&path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "no control socket; CLI commands need the store unmounted");
            return None;
        }
    };
    // Root and the owner, and everyone else (`control=public`), have separate slots:
    // strangers can never keep the owner out.
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let busy_public = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let mut backoff = Duration::ZERO;
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => {
                        backoff = Duration::ZERO;
                        c
                    }
                    Err(e) => {
                        // Out of descriptors or memory: back off instead of spinning.
                        backoff =
                            (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                        tracing::warn!(error = %e, "control socket: accept failed");
                        std::thread::sleep(backoff);
                        continue;
                    }
                };
                let Some(fs) = fs.upgrade() else { break };
                // Answers written on this thread are short; never wait long to send one.
                let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                // Strangers are answered here, without a thread of their own.
                let uid = match peer_uid(&conn) {
                    Ok(uid) => uid,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: no peer credentials");
                        continue;
                    }
                };
                let trusted = uid == 0 || uid == access.owner;
                if !trusted && !access.public {
                    tracing::warn!(
                        uid,
                        "control socket: refused a connection from another user"
                    );
                    let _ = answer(&conn, &refusal(access));
                    continue;
                }
                let (pool, most) = if trusted {
                    (&busy, CONTROL_CONNS)
                } else {
                    (&busy_public, CONTROL_PUBLIC_CONNS)
                };
                if pool.fetch_add(1, Ordering::SeqCst) >= most {
                    pool.fetch_sub(1, Ordering::SeqCst);
                    let _ = answer(
                        &conn,
                        &crate::commands::fail(format!(
                            "the daemon is busy with {most} commands; try again"
                        )),
                    );
                    continue;
                }
                let busy2 = pool.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle_control(conn, &fs, uring, access, trusted) {
                            tracing::debug!(error = %e, "control connection failed");
                        }
                        busy2.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    pool.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(error = %e, "control socket: cannot start a thread");
                }
            }
        })
        .ok()?;
    Some(path)
}

/// The user id of the process at the other end of `conn` (`SO_PEERCRED`).
fn peer_uid(conn: &UnixStream) -> std::io::Result<u32> {
    use std::os::unix::io::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid out pointers of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// The answer to a user the control socket does not serve.
fn refusal(access: ControlAccess) -> crate::commands::Outcome {
    crate::commands::fail(format!(
        "permission denied: only root and the daemon's user (uid {}) may {}",
        access.owner,
        if access.public {
            "run commands that change the volume or read its files"
        } else {
            "use this volume's control socket (mount with -o control=public to let others run status and snapshot list)"
        }
    ))
}

/// Serves one control connection; `trusted`: its peer is root or the daemon's user.
fn handle_control(
    conn: UnixStream,
    fs: &Fs,
    uring: bool,
    access: ControlAccess,
    trusted: bool,
) -> anyhow::Result<()> {
    use std::io::Read;
    // A client that stops reading must not hold the thread for ever.
    conn.set_write_timeout(Some(Duration::from_secs(60)))?;
    // The whole request within one deadline (a byte now and then does not extend it).
    let deadline = std::time::Instant::now() + CONTROL_READ_TIMEOUT;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    while !line.contains(&b'\n') && (line.len() as u64) < CONTROL_REQUEST_MAX {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        conn.set_read_timeout(Some(left))?;
        match (&conn).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(end) = line.iter().position(|&b| b == b'\n') {
        line.truncate(end + 1);
    }
    if line.last() != Some(&b'\n') || line.len() as u64 > CONTROL_REQUEST_MAX {
        return answer(
            &conn,
            &crate::commands::fail(format!(
                "control request longer than {CONTROL_REQUEST_MAX} bytes, cut short, or not sent within {} s",
                CONTROL_READ_TIMEOUT.as_secs()
            )),
        );
    }
    // Not trusted, a stranger learns nothing from the parser either.
    if !trusted && !access.public {
        tracing::warn!("control socket: refused a connection from another user");
        return answer(&conn, &refusal(access));
    }
    let req: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %clip(&e.to_string()), "control socket: a request that does not decode");
            return answer(
                &conn,
                &crate::commands::fail(format!(
                    "control request does not decode ({}): is the snapfs CLI the same version as the daemon?",
                    clip(&e.to_string())
                )),
            );
        }
    };
    if !trusted && !req.read_only() {
        tracing::warn!(
            command = req.name(),
            "control socket: refused a command from another user"
        );
        return answer(&conn, &refusal(access));
    }
    if let Request::Send {
        snapshot,
        dry_run,
        one_off,
        key,
    } = &req
    {
        return serve_send(
            conn,
            fs,
            snapshot.as_deref(),
            *dry_run || *one_off,
            *dry_run,
            key.as_deref(),
        );
    }
    if req == Request::Receive {
        return serve_receive(conn, fs);
    }
    if req == Request::MountDevice {
        // A daemon whose session is over is going away: no answer, and the new mount
        // waits for the store as it would for any daemon leaving (its device number
        // may be another filesystem's by now).
        if SESSION_OVER.load(Ordering::SeqCst) {
            return Ok(());
        }
        let out = match MOUNT_DEVICE.get() {
            Some(dev) => crate::commands::Outcome {
                text: format!("{dev}\n"),
                code: 0,
                error: false,
            },
            None => crate::commands::fail("the daemon's mount is not known".into()),
        };
        return answer(&conn, &out);
    }
    let mut out = if matches!(req, Request::Fsck { repair: true, .. }) {
        crate::commands::fail("fsck --repair needs the store unmounted: unmount it first".into())
    } else {
        crate::commands::run(fs, &req, false)
    };
    if matches!(req, Request::SnapshotCreate { .. })
        && !out.error
        && let Some(r) = REPLICATOR.get()
    {
        r.kick();
    }
    if req == Request::Status && !out.error {
        // Destinations and their errors are for root and the owner only.
        if let Some(r) = REPLICATOR.get().filter(|_| trusted) {
            // Each destination's cursor (its `sent_to` row), and how many of this
            // volume's snapshots are newer than it (all of them when it has none).
            let (snaps, sent, holds) = {
                let mut core = fs.lock();
                let store = core.store();
                (
                    store.snapshot_list(false).unwrap_or_default(),
                    store.sent_to().unwrap_or_default(),
                    store.holds().unwrap_or_default(),
                )
            };
            out.text.push_str(&r.status_lines(|volume| {
                let Some(v) = volume else {
                    return (None, snaps.len());
                };
                let base = sent
                    .iter()
                    .find(|(id, _)| *id == v)
                    .map(|(_, rec)| rec.base.clone())
                    .filter(|b| !b.is_empty());
                // The base by the epoch its hold keeps (it may have been deleted
                // since, and be kept by the hold alone).
                let hold = format!("sync-{}", crate::store::hex(&v));
                let epoch = holds.iter().find(|(n, _)| *n == hold).map(|(_, h)| h.epoch);
                let newer = snaps
                    .iter()
                    .filter(|(_, rec)| epoch.is_none_or(|e| rec.epoch > e))
                    .count();
                (base, newer)
            }));
        }
        out.text.push_str(&requests_line(uring));
    }
    answer(&conn, &out)
}

/// Serves `snapfs sync` of this mounted store: answers, then sends over `conn` what
/// the destination at its other end lacks, from a frozen view read off the FUSE
/// threads and without the core lock.
fn serve_send(
    conn: UnixStream,
    fs: &Fs,
    only: Option<&str>,
    one_off: bool,
    dry_run: bool,
    key: Option<&str>,
) -> anyhow::Result<()> {
    let key = match key.map(crate::store::unhex::<32>) {
        Some(None) => {
            return answer(
                &conn,
                &crate::commands::fail("send: the key is not 64 hex digits".into()),
            );
        }
        Some(k) => k,
        None => None,
    };
    let view = fs.lock().store().frozen();
    let mut view = match view {
        Ok(v) => v,
        Err(e) => return answer(&conn, &crate::commands::fail(format!("send: {e}"))),
    };
    let (r, w) = session_conn(&conn, None)?;
    let sum = match crate::sync::session::send_frozen(&mut view, only, dry_run, key, r, w) {
        Ok(sum) => sum,
        Err(e) => {
            tracing::warn!(error = %e, "sync: send failed");
            return Ok(());
        }
    };
    drop(view);
    tracing::info!(snapshots = ?sum.snapshots, "sync: sent");
    // The destination's cursor, and the hold on its base.
    if let Some(dest) = sum.dest_volume.filter(|_| !one_off) {
        let mut core = fs.lock();
        let moved = core.store().record_sent(&dest, &sum.record());
        match moved {
            Ok(Some(old)) => {
                if let Err(e) = core.forget_if_unkept(old) {
                    tracing::warn!(error = %e, "sync: a snapshot the old base hold kept");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "sync: the destination's cursor is not recorded"),
        }
    }
    Ok(())
}

/// Answers a `send` or `receive` request with success and frames the connection,
/// which carries the session from then on. A CLI that stops reading lets go of this
/// thread after 10 minutes. `idle`: how long the other end may say nothing. A source
/// waits for no limit: the destination may think for long (reading its store back).
/// A destination waits as `snapfs serve` does, so a dead link (ssh's, say) does not
/// hold the one receiving slot.
#[allow(clippy::type_complexity)]
fn session_conn(
    conn: &UnixStream,
    idle: Option<Duration>,
) -> anyhow::Result<(
    crate::sync::wire::FrameReader<BufReader<UnixStream>>,
    crate::sync::wire::FrameWriter<std::io::BufWriter<&UnixStream>>,
)> {
    answer(
        conn,
        &crate::control::Outcome {
            text: String::new(),
            code: 0,
            error: false,
        },
    )?;
    conn.set_read_timeout(idle)?;
    conn.set_write_timeout(Some(Duration::from_secs(600)))?;
    Ok((
        crate::sync::wire::FrameReader::new(
            BufReader::with_capacity(1 << 20, conn.try_clone()?),
            None,
        ),
        crate::sync::wire::FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, conn), None),
    ))
}

/// Sends `out` on `conn`: one line of JSON.
fn answer(conn: &UnixStream, out: &crate::commands::Outcome) -> anyhow::Result<()> {
    let mut w = conn;
    let mut line = serde_json::to_vec(out)?;
    line.push(b'\n');
    w.write_all(&line)?;
    Ok(())
}

/// The `status` line that says how the kernel's requests reach this daemon, read off
/// the threads that serve them (`fuser-ring-Q.N` per io_uring queue, `fuser-N` on
/// `/dev/fuse`), so that it shows what the kernel and the daemon agreed on. `uring`:
/// the mount asked for io_uring.
fn requests_line(uring: bool) -> String {
    let (mut ring, mut dev) = (0, 0);
    let mut queues = std::collections::BTreeSet::new();
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if let Some(q) = comm.strip_prefix("fuser-ring-") {
            ring += 1;
            queues.insert(q.split('.').next().unwrap_or("").to_string());
        } else if comm
            .strip_prefix("fuser-")
            .is_some_and(|n| n.parse::<u32>().is_ok())
        {
            dev += 1;
        }
    }
    if ring > 0 {
        return format!(
            "requests:         FUSE over io_uring, {ring} threads on {} CPU queues ({dev} on /dev/fuse for the rest)\n",
            queues.len()
        );
    }
    if dev == 0 {
        // Not serving yet (the control socket answers before the session's threads
        // start) or any more (the daemon on its way out).
        return String::new();
    }
    let why = if !cfg!(feature = "uring") {
        " (this snapfs was built without the uring feature)".to_string()
    } else if !uring {
        " (-o nouring)".to_string()
    } else {
        match std::fs::read_to_string(URING_PARAM).map(|v| v.trim() == "Y") {
            Ok(false) => format!(
                " (the kernel has FUSE over io_uring, switched off: `echo Y > {URING_PARAM}` and mount again for faster metadata)"
            ),
            Ok(true) => " (FUSE over io_uring was off in the kernel at mount time, or its queues could not be set up, which the log says)".to_string(),
            Err(_) => " (the kernel has no FUSE over io_uring)".to_string(),
        }
    };
    format!("requests:         /dev/fuse, {dev} threads{why}\n")
}

const URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sends `req` to the daemon serving `store`, if one is listening.
pub fn ask_daemon(store: &Path, req: &Request) -> Option<crate::commands::Outcome> {
    let mut conn = match connect_control(store)? {
        Ok(c) => c,
        Err(e) => return Some(crate::commands::fail(e)),
    };
    // The daemon may answer (a refusal) and close before reading the request.
    let mut line = serde_json::to_vec(req).expect("a request always encodes");
    line.push(b'\n');
    let _ = conn.write_all(&line);
    // A daemon that refused without reading the request closes with it unread, and
    // the end of its answer may read as a reset: the answer line before it counts.
    let mut answer = Vec::new();
    let _ = BufReader::new(conn).read_until(b'\n', &mut answer);
    // No answer: the daemon is going away (it stops serving before it exits), and the
    // caller opens the store itself once it can.
    if answer.is_empty() {
        return None;
    }
    Some(serde_json::from_slice(&answer).unwrap_or_else(|e| {
        crate::commands::fail(format!(
            "the daemon's answer does not decode ({e}): is the snapfs CLI the same version as the daemon?"
        ))
    }))
}

/// A connection to the control socket of the daemon serving `store`: `None` when no
/// daemon serves it, an error line when the caller may not reach it.
pub fn connect_control(store: &Path) -> Option<Result<UnixStream, String>> {
    match UnixStream::connect(store.join(SOCKET)) {
        Ok(c) => Some(Ok(c)),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(Err(format!(
            "store {}: permission denied: a store and its daemon's control socket are for root and the store's owner",
            store.display()
        ))),
        Err(_) => None,
    }
}

/// Whether `path` holds a store the caller may not look into (its metadata file is
/// there, but unreadable to it).
fn store_hidden(path: &Path) -> bool {
    matches!(std::fs::metadata(path.join(crate::store::DB_FILE)),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied)
}

/// The store of the snapfs daemon that serves mountpoint `mp` (canonical, or a bind
/// mount of its mount point), from
/// the command lines of running processes of the mount's user `user` (`snapfs
/// mount STORE MP ...`, relative paths taken from the process's working
/// directory): another user's process, which could say anything, is not asked.
/// What it names is checked by the caller like any mount's source: the store must
/// belong to the mount's user.
fn daemon_store(mp: &Path, user: u32) -> Option<PathBuf> {
    // A bind mount of a daemon's mount (a second mount of its store) is served by
    // that daemon, started on the first mount point.
    let dev = device_at(mp);
    let mut same = dev.as_deref().map(mounts_of).unwrap_or_default();
    same.push(mp.to_path_buf());
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let proc_dir = entry.path();
        if std::fs::metadata(&proc_dir).map(|m| m.uid()).ok() != Some(user) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_snapfs = args
            .first()
            .and_then(|a| a.rsplit(|b| *b == b'/').next())
            .is_some_and(|name| name == b"snapfs");
        let Some(i) = args.iter().position(|a| *a == b"mount") else {
            continue;
        };
        if !is_snapfs || args.len() < i + 3 {
            continue;
        }
        let Ok(cwd) = std::fs::read_link(proc_dir.join("cwd")) else {
            continue;
        };
        let at =
            |a: &[u8]| cwd.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a));
        let Ok(store) = std::fs::canonicalize(at(args[i + 1])) else {
            continue;
        };
        if std::fs::canonicalize(at(args[i + 2]))
            .ok()
            .is_some_and(|p| same.contains(&p))
        {
            return Some(store);
        }
        // Its first mount point may be gone while a bind mount of it lives on: the
        // daemon of that store says which device it serves.
        if let Some(dev) = &dev
            && ask_daemon(&store, &Request::MountDevice)
                .is_some_and(|out| !out.error && out.text.trim() == dev)
        {
            return Some(store);
        }
    }
    None
}

/// Finds the store behind a path that is either a store or a snapfs mountpoint.
pub fn resolve_store(path: &Path) -> anyhow::Result<PathBuf> {
    if crate::store::Store::exists(path) {
        return Ok(std::fs::canonicalize(path)?);
    }
    if store_hidden(path) {
        bail!(
            "{}: permission denied: a store is for root and its owner",
            path.display()
        );
    }
    let canon = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
    // The last mount on the path is the one in use. Its source names the store unless
    // `source=` renamed it (then the daemon's socket is not findable from here), and
    // whoever mounted a FUSE filesystem chose its source: only a store that belongs to
    // the mount's user (`user_id=`) is taken, so that a user's mount cannot point a
    // command run by root at someone else's store.
    let mut found = None;
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        for l in info.lines() {
            let fields: Vec<&str> = l.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            if fields.len() > sep + 3
                && Path::new(&unescape_mount(fields[4])) == canon
                && fields[sep + 1].starts_with("fuse")
            {
                let src = PathBuf::from(unescape_mount(fields[sep + 2]));
                let user = fields[sep + 3]
                    .split(',')
                    .find_map(|o| o.strip_prefix("user_id="))
                    .and_then(|u| u.parse::<u32>().ok());
                found = Some((src, user));
            }
        }
    }
    if let Some((mut src, user)) = found {
        use std::os::unix::fs::MetadataExt;
        // `source=NAME` renamed the mount's source: the store is the one the daemon
        // serving this mountpoint was started on.
        if !crate::store::Store::exists(&src)
            && !store_hidden(&src)
            && let Some(store) = user.and_then(|u| daemon_store(&canon, u))
        {
            src = store;
        }
        let owner = std::fs::metadata(&src).map(|m| m.uid());
        // A store another user may not look into is still the store.
        if crate::store::Store::exists(&src) || store_hidden(&src) {
            match (owner, user) {
                (Ok(o), Some(u)) if o == u => return Ok(src),
                (Ok(o), Some(u)) => bail!(
                    "{}: the mount's user (uid {u}) does not own the store it names ({}, uid {o}); not trusting it",
                    path.display(),
                    src.display()
                ),
                _ => bail!(
                    "{}: cannot tell who owns the store {}",
                    path.display(),
                    src.display()
                ),
            }
        }
    }
    bail!(
        "{} is neither a snapfs store nor a mounted snapfs volume",
        path.display()
    )
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn sizes_and_block_sizes_parse_as_written_and_nothing_else() {
        for (v, want) in [
            ("1M", 1 << 20),
            ("1048576", 1 << 20),
            ("3g", 3 << 30),
            ("2T", 2 << 40),
            ("1536K", 1536 << 10),
        ] {
            assert_eq!(parse_size(v), Ok(want), "{v}");
        }
        for v in [
            "",
            "M",
            "1",
            "1023K",
            "1X",
            "-1M",
            "1.5G",
            "99999999999T",
            "1M ",
        ] {
            assert!(parse_size(v).is_err(), "{v}");
        }
        for (v, want) in [
            ("4K", 4096),
            ("4096", 4096),
            ("64k", 65536),
            ("1M", 1 << 20),
        ] {
            assert_eq!(parse_block_size(v), Ok(want), "{v}");
        }
        for v in [
            "",
            "K",
            "3K",
            "2K",
            "2M",
            "1G",
            "0",
            "4294967296",
            "8193",
            "64KB",
        ] {
            assert!(parse_block_size(v).is_err(), "{v}");
        }
        assert_eq!(show_block_size(4096), "4K");
        assert_eq!(show_block_size(1 << 20), "1M");
        assert_eq!(show_block_size(1000), "1000");
    }
}
