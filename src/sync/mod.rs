//! Replication of snapshots to another snapfs store (`snapfs sync`): the layer above
//! the store and its snapshot layer, beside the filesystem core and never through it.
//!
//! - [`wire`]: the frames, their bounds and their authentication (`docs/FORMAT.md`,
//!   "Sync wire format");
//! - [`session`]: the source and the sink that speak it;
//! - [`relay`]: the CLI's join of a source end and a destination end, which watches
//!   the frames go by (summary, progress, trace);
//! - [`tcp`], [`ssh`]: the transports to another machine.

pub mod relay;
pub mod s3;
pub mod seal;
pub mod session;
pub mod ssh;
pub mod tcp;
pub mod wire;

use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use relay::End;
use session::{Summary, SyncError};
use wire::{FrameReader, FrameWriter, WireError};

/// How `snapfs sync` reaches the destination and what it sends.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Send this snapshot only.
    pub snapshot: Option<String>,
    /// The shared key file (tcp:// only).
    pub key_file: Option<PathBuf>,
    /// The ssh client and its options (ssh:// only), split on whitespace.
    pub ssh: String,
    /// The snapfs program on the far side of ssh.
    pub remote_snapfs: String,
    /// Show progress on stderr.
    pub progress: bool,
    /// Bytes per second the session may send, at most.
    pub bwlimit: Option<u64>,
    /// Only say what would be sent.
    pub dry_run: bool,
    /// Run by the daemon serving the source (scheduled replication): the source is
    /// its own control socket, never the store opened directly.
    pub in_daemon: bool,
    /// A one-off session (a restore or a clone): the source keeps no cursor or hold
    /// for the destination.
    pub one_off: bool,
}

/// Parses a rate for `--bwlimit`: bytes per second, with an optional K, M or G
/// (powers of 1024), at least 128K (slower, one frame would outlast the peer's
/// patience).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("{s:?}: a rate is a number with K, M or G")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: a rate is a number with K, M or G"))?;
    let rate = n * mult as f64;
    if !rate.is_finite() || rate < (128 << 10) as f64 || rate > u64::MAX as f64 {
        return Err(format!(
            "{s:?}: the rate must be at least 128K (bytes per second)"
        ));
    }
    Ok(rate as u64)
}

/// Sends the snapshots `dest` lacks from the store at `src` (mounted or not): `dest`
/// is a store path, `tcp://HOST:PORT` or `ssh://[USER@]HOST[:PORT]/PATH`. What was
/// sent (also when the session failed), and whether it completed.
pub fn run(src: &Path, dest: &str, opts: &Options) -> (Summary, Result<(), SyncError>) {
    match ends(src, dest, opts) {
        Ok((source, dst, keyed)) => relay::relay(source, dst, keyed, opts.progress, opts.bwlimit),
        Err(e) => (Summary::default(), Err(e)),
    }
}

/// The two ends of a session, and whether it is keyed.
fn ends(src: &Path, dest: &str, opts: &Options) -> Result<(End, End, bool), SyncError> {
    let mut key = None;
    let dst = if let Some(addr) = dest.strip_prefix("tcp://") {
        let kf = opts.key_file.as_deref().ok_or_else(|| {
            SyncError::Protocol(
                "sync over tcp:// needs --key-file (the key `snapfs serve` was given)".into(),
            )
        })?;
        key = Some(tcp::read_key_file(kf)?);
        tcp::connect(addr.trim_end_matches('/'))?
    } else if dest.starts_with("ssh://") {
        ssh::connect(&ssh::parse(dest)?, &opts.ssh, &opts.remote_snapfs)?
    } else if dest.starts_with("s3://") {
        let url = dest.to_string();
        End::spawn("s3-sink", move |s| {
            let (r, w) = framed(s)?;
            s3::receive(&url, r, w)
        })?
    } else if dest.contains("://") {
        return Err(SyncError::Protocol(format!(
            "{dest}: unknown transport (a store path, tcp://, ssh:// or s3://)"
        )));
    } else {
        // A mountpoint names its store.
        let d = dest_store(Path::new(dest))?;
        if std::fs::canonicalize(&d).is_ok_and(|d| d == src) {
            return Err(SyncError::Protocol(format!("{dest} is the source itself")));
        }
        match relay::daemon_sink(&d)? {
            Some(end) => end,
            None => End::spawn("sync-sink", move |s| {
                let (r, w) = framed(s)?;
                session::receive(&d, None, r, w)
            })?,
        }
    };
    let only = opts.snapshot.as_deref();
    let dry_run = opts.dry_run;
    let one_off = opts.one_off;
    let source = match relay::daemon_source(src, only, dry_run, one_off, key)? {
        Some(end) => end,
        None if opts.in_daemon => {
            return Err(SyncError::Protocol(
                "the daemon's control socket is gone (it is being unmounted)".into(),
            ));
        }
        None => {
            let (src, only) = (src.to_path_buf(), opts.snapshot.clone());
            End::spawn("sync-source", move |s| {
                let (r, w) = framed(s)?;
                session::send(&src, only.as_deref(), dry_run, one_off, key, r, w)
            })?
        }
    };
    Ok((source, dst, key.is_some()))
}

/// Receives the snapshots of `source` (a store or the mount point of one, or
/// `ssh://[USER@]HOST[:PORT]/PATH`, where `snapfs send PATH` runs) into the store at
/// `dest`, made when missing (a replica of the source until promoted): every
/// snapshot, or `opts.snapshot` alone. What `snapfs restore` and `clone` build on;
/// the source keeps no cursor for it.
pub fn pull(source: &str, dest: &Path, opts: &Options) -> (Summary, Result<(), SyncError>) {
    let ends = (|| {
        let only = opts.snapshot.clone();
        let src = if source.starts_with("ssh://") {
            ssh::connect_source(
                &ssh::parse(source)?,
                &opts.ssh,
                &opts.remote_snapfs,
                only.as_deref(),
            )?
        } else if source.starts_with("s3://") {
            let url = source.to_string();
            End::spawn("s3-source", move |s| {
                let (r, w) = framed(s)?;
                s3::send(&url, only.as_deref(), r, w)
            })?
        } else if source.contains("://") {
            return Err(SyncError::Protocol(format!(
                "{source}: a restore reads a store path, ssh:// or s3:// (tcp:// serves destinations only)"
            )));
        } else {
            let src = crate::daemon::resolve_store(Path::new(source))
                .map_err(|e| SyncError::Protocol(format!("{e:#}")))?;
            if std::fs::canonicalize(dest).is_ok_and(|d| d == src) {
                return Err(SyncError::Protocol(format!(
                    "{} is the source itself",
                    dest.display()
                )));
            }
            match relay::daemon_source(&src, only.as_deref(), false, true, None)? {
                Some(end) => end,
                None => End::spawn("sync-source", move |s| {
                    let (r, w) = framed(s)?;
                    session::send(&src, only.as_deref(), false, true, None, r, w)
                })?,
            }
        };
        let d = dest.to_path_buf();
        let dst = End::spawn("sync-sink", move |s| {
            let (r, w) = framed(s)?;
            session::receive(&d, None, r, w)
        })?;
        Ok((src, dst))
    })();
    match ends {
        Ok((src, dst)) => relay::relay(src, dst, false, opts.progress, opts.bwlimit),
        Err(e) => (Summary::default(), Err(e)),
    }
}

/// The store a destination path names: itself, or the store mounted there.
pub fn dest_store(dest: &Path) -> Result<PathBuf, SyncError> {
    let mounted = std::fs::canonicalize(dest).is_ok_and(|c| crate::daemon::is_mounted(&c));
    if mounted && !crate::store::Store::exists(dest) {
        // A snapfs mount names its store; any other mount point (an empty disk, say)
        // is where a new store is made.
        if let Ok(store) = crate::daemon::resolve_store(dest) {
            return Ok(store);
        }
    }
    Ok(dest.to_path_buf())
}

type Framed = (
    FrameReader<BufReader<std::os::unix::net::UnixStream>>,
    FrameWriter<BufWriter<std::os::unix::net::UnixStream>>,
);

/// The two halves of one side of a socket pair, buffered.
fn framed(s: std::os::unix::net::UnixStream) -> Result<Framed, SyncError> {
    let w = s.try_clone().map_err(WireError::Io)?;
    Ok((
        FrameReader::new(BufReader::with_capacity(1 << 20, s), None),
        FrameWriter::new(BufWriter::with_capacity(1 << 20, w), None),
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_parse_with_binary_suffixes_and_a_floor() {
        assert_eq!(parse_rate("128K"), Ok(128 << 10));
        assert_eq!(parse_rate("2.5m"), Ok(5 << 19));
        assert_eq!(parse_rate("1G"), Ok(1 << 30));
        assert_eq!(parse_rate("1000000"), Ok(1_000_000));
        for bad in ["", "M", "10X", "-1M", "100K", "nanM", "infG", "1e400"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
