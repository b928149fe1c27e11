//! The CLI's side of `snapfs sync`: a source end (this process, sending from a store
//! no daemon holds, or the daemon of a mounted one over its control socket) and a
//! destination end (this process receiving into a store no daemon holds, a
//! `snapfs serve` over TCP, or `snapfs receive` over ssh), joined by a relay that
//! passes every frame on unchanged and watches it go by. The summary, the progress
//! shown and the protocol trace (`SNAPFS_LOG=snapfs::sync=trace`) come from what
//! passed, wherever the two ends run. The relay holds no key: on a keyed session it
//! passes the MACs on for the ends to check.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::session::{Summary, SyncError, first_namings};
use super::wire::{Frame, FrameReader, RawFrame, WireError};

/// The writing half of an end, which can be closed on its own so that the far side
/// reads the end of the stream.
pub enum Sink {
    /// A Unix socket (a daemon's control socket, or a socket pair to a thread here).
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(std::net::TcpStream),
    /// A child's standard input (ssh).
    Child(Option<std::process::ChildStdin>),
    /// This process's standard output (`snapfs receive` relaying to a daemon),
    /// unbuffered; `None` once closed.
    Stdout(Option<std::fs::File>),
}

impl Sink {
    /// Its descriptor, while it is open.
    fn raw_fd(&self) -> Option<RawFd> {
        match self {
            Sink::Unix(s) => Some(s.as_raw_fd()),
            Sink::Tcp(s) => Some(s.as_raw_fd()),
            Sink::Child(c) => c.as_ref().map(|c| c.as_raw_fd()),
            Sink::Stdout(f) => f.as_ref().map(|f| f.as_raw_fd()),
        }
    }

    fn close(&mut self) {
        match self {
            Sink::Unix(s) => {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            Sink::Tcp(s) => {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            Sink::Child(c) => drop(c.take()),
            Sink::Stdout(f) => {
                // The far side reads the end only once every copy of the descriptor
                // is closed: this one, and standard output itself, which now points
                // at /dev/null.
                drop(f.take());
                if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                    // SAFETY: dup2(2) of a descriptor we own onto standard output.
                    unsafe { libc::dup2(null.as_raw_fd(), 1) };
                }
            }
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Unix(s) => s.write(buf),
            Sink::Tcp(s) => s.write(buf),
            Sink::Child(Some(c)) => c.write(buf),
            Sink::Child(None) => Err(std::io::ErrorKind::BrokenPipe.into()),
            Sink::Stdout(Some(f)) => f.write(buf),
            Sink::Stdout(None) => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Unix(s) => s.flush(),
            Sink::Tcp(s) => s.flush(),
            Sink::Child(Some(c)) => c.flush(),
            Sink::Child(None) => Ok(()),
            Sink::Stdout(_) => Ok(()),
        }
    }
}

/// One end of a session, as the relay sees it.
pub struct End {
    /// What the end says.
    pub r: Box<dyn Read + Send>,
    /// `r`'s descriptor, when it is one a relay can splice from: `r` must then read
    /// it with no buffer of its own (the constructors see to it).
    pub(crate) rfd: Option<RawFd>,
    /// What the end is told.
    pub w: Sink,
    /// The thread running the end here, if it runs here.
    pub task: Option<JoinHandle<Result<Summary, SyncError>>>,
    /// The process running the end (ssh), with what its stderr said once it ends.
    pub child: Option<(std::process::Child, std::sync::mpsc::Receiver<String>)>,
}

impl End {
    /// An end run by `f` in a thread here, over one side of a socket pair.
    pub fn spawn(
        name: &str,
        f: impl FnOnce(UnixStream) -> Result<Summary, SyncError> + Send + 'static,
    ) -> Result<End, SyncError> {
        let (a, b) = UnixStream::pair().map_err(WireError::Io)?;
        let task = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(b))
            .map_err(WireError::Io)?;
        let r = a.try_clone().map_err(WireError::Io)?;
        Ok(End {
            rfd: Some(r.as_raw_fd()),
            r: Box::new(r),
            w: Sink::Unix(a),
            task: Some(task),
            child: None,
        })
    }

    /// This process's standard input and output (the source, as `snapfs receive`
    /// sees it over ssh).
    pub fn stdio() -> Result<End, SyncError> {
        use std::os::fd::AsFd;
        // Copies of the descriptors, read and written without the standard
        // streams' buffers (a relay splices from and to them).
        let dup = |fd: std::os::fd::BorrowedFd| -> Result<std::fs::File, SyncError> {
            Ok(fd.try_clone_to_owned().map_err(WireError::Io)?.into())
        };
        let r = dup(std::io::stdin().as_fd())?;
        Ok(End {
            rfd: Some(r.as_raw_fd()),
            r: Box::new(r),
            w: Sink::Stdout(Some(dup(std::io::stdout().as_fd())?)),
            task: None,
            child: None,
        })
    }

    /// An end across a connected stream.
    pub fn unix(s: UnixStream) -> Result<End, SyncError> {
        let r = s.try_clone().map_err(WireError::Io)?;
        Ok(End {
            rfd: Some(r.as_raw_fd()),
            r: Box::new(r),
            w: Sink::Unix(s),
            task: None,
            child: None,
        })
    }
}

/// What the relay saw and moved.
#[derive(Default)]
pub struct Observed {
    /// The session's summary, as seen on the wire.
    pub sum: Summary,
    /// The source said `Done`: everything it meant to send was committed.
    pub done: bool,
    /// Why the source stopped, if it said.
    pub source_error: Option<String>,
    /// Why the destination stopped, if it said.
    pub dest_error: Option<String>,
}

/// Counters the relay threads update and the progress display reads.
#[derive(Default)]
struct Live {
    payload: AtomicU64,
    wire: AtomicU64,
    snapshot: Mutex<String>,
    committed: AtomicU64,
    tally: Mutex<Tally>,
}

/// What the progress knows of the bytes the snapshot being sent takes. Bytes are
/// counted as the source's plan counts them ([`first_namings`]: each extent once per
/// batch, by what the records name of it). The destination's acknowledgement of a
/// batch says which of its extents it lacks, and so what the batch takes exactly; the
/// batches not acknowledged yet are estimated at the rate of those that are (all of
/// it, before the first). What it holds is bounded by a few batches.
#[derive(Default)]
struct Tally {
    /// The plan's bytes for this snapshot.
    plan: u64,
    /// Batches sent and not acknowledged: the extents each names, with bytes.
    pending: HashMap<u64, HashMap<[u8; 32], u64>>,
    /// Bytes the acknowledged batches name, and those the destination lacked.
    acked: u64,
    lacked: u64,
    /// Extents asked for and not sent yet, and their bytes.
    owed: HashMap<[u8; 32], u64>,
    owed_bytes: u64,
}

/// Batches the progress follows at once (the source waits for each acknowledgement,
/// so one is usual); a stream with more is shown as an estimate.
const PENDING_MAX: usize = 16;

impl Tally {
    /// The payload the session will have sent at the end of this snapshot, given
    /// `payload` sent so far; and whether that is exact (every batch acknowledged).
    fn total(&self, payload: u64) -> (u64, bool) {
        let rest = self.plan.saturating_sub(self.acked);
        let rest = if self.acked == 0 {
            rest
        } else {
            (rest as u128 * self.lacked as u128 / self.acked as u128).min(u64::MAX as u128) as u64
        };
        let exact = self.pending.is_empty() && self.acked >= self.plan;
        (
            payload.saturating_add(self.owed_bytes).saturating_add(rest),
            exact,
        )
    }
}

/// Joins `src` and `dst` until both are done; `keyed`: the two ends share a key (TCP),
/// so frames after the handshake carry MACs. `progress`: show progress on stderr (a
/// bar on a terminal, a line every 10 s otherwise). `bwlimit`: bytes per second the
/// source's frames may take, at most. What went by, and whether the session
/// completed.
pub fn relay(
    mut src: End,
    mut dst: End,
    keyed: bool,
    progress: bool,
    bwlimit: Option<u64>,
) -> (Summary, Result<(), SyncError>) {
    let t0 = Instant::now();
    let live = Live::default();
    let seen = Mutex::new(Observed::default());
    // Dropped when the session is over: the progress display stops at once.
    let (finished, stop) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let (sr, dr) = ((&mut src.r, src.rfd), (&mut dst.r, dst.rfd));
        let (sw, dw) = (&mut src.w, &mut dst.w);
        let (live, seen) = (&live, &seen);
        let shown = progress.then(|| s.spawn(move || show(live, stop)));
        let up = s.spawn(move || pump(sr, dw, keyed, true, bwlimit, live, seen));
        pump(dr, sw, keyed, false, None, live, seen);
        let _ = up.join();
        drop(finished);
        if let Some(h) = shown {
            let _ = h.join();
        }
    });
    let mut seen = seen.into_inner().unwrap_or_else(|p| p.into_inner());
    seen.sum.wire_bytes = live.wire.load(Ordering::Relaxed);
    let results = [finish(&mut src), finish(&mut dst)];
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "sync: relay done");
    let res = if let Some(m) = seen.dest_error {
        Err(SyncError::Remote(format!("the destination: {m}")))
    } else if let Some(m) = seen.source_error {
        Err(SyncError::Remote(format!("the source: {m}")))
    } else if let Some(e) = worst(results) {
        Err(e)
    } else if !seen.done {
        Err(SyncError::Protocol(
            "the connection ended before the sync was complete".into(),
        ))
    } else {
        Ok(())
    };
    (seen.sum, res)
}

/// The error to show of the ends' own: one that says why before one that only says
/// the other side went.
fn worst(results: [Result<(), SyncError>; 2]) -> Option<SyncError> {
    let mut errs: Vec<SyncError> = results.into_iter().filter_map(Result::err).collect();
    let i = errs
        .iter()
        .position(|e| !matches!(e, SyncError::Closed))
        .unwrap_or(0);
    (!errs.is_empty()).then(|| errs.swap_remove(i))
}

/// Waits for an end that runs here or in a child: its error, if it failed without
/// saying so on the wire.
fn finish(end: &mut End) -> Result<(), SyncError> {
    if let Some(t) = end.task.take() {
        match t.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(SyncError::Protocol("a sync thread panicked".into())),
        }
    }
    if let Some((mut child, err)) = end.child.take() {
        let status = child.wait().map_err(WireError::Io)?;
        // Its stderr ends with it, unless something it started keeps the pipe open
        // (an ssh ControlPersist master): then what was said so far will do.
        let text = err
            .recv_timeout(Duration::from_millis(500))
            .unwrap_or_default();
        if !status.success() {
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(SyncError::Protocol(format!(
                "the remote command failed ({status}){}{last}",
                if last.is_empty() { "" } else { ": " }
            )));
        }
    }
    Ok(())
}

/// Passes frames from `r` to `w` until `r` ends, watching them; `up`: from the
/// source to the destination. When `w` fails, what `r` still says is read and
/// dropped, so the end writing it is never left blocked. Where both ends are
/// descriptors, the bytes of each extent past its hash go from one to the other
/// through a pipe (splice(2)), never through this process's memory.
fn pump(
    (r, rfd): (&mut Box<dyn Read + Send>, Option<RawFd>),
    w: &mut Sink,
    keyed: bool,
    up: bool,
    limit: Option<u64>,
    live: &Live,
    seen: &Mutex<Observed>,
) {
    // Pacing: `passed` bytes may not go before `passed / limit` seconds from `t0`.
    let t0 = Instant::now();
    let mut passed = 0u64;
    // SNAPFS_SYNC_SPLICE=0 copies instead (to measure what splicing saves).
    let splice = std::env::var_os("SNAPFS_SYNC_SPLICE").is_none_or(|v| v != "0");
    let mut pipe = rfd
        .zip(w.raw_fd())
        .filter(|_| splice)
        .and_then(|fds| Pipe::new(fds).ok());
    {
        // Spliced, the reader holds little ahead (what it holds is copied): an
        // extent's header and hash, or a MAC, the next header and hash. Bodies
        // longer than that are read past the buffer.
        let cap = if pipe.is_some() {
            5 + 32 + super::wire::MAC_LEN
        } else {
            1 << 20
        };
        let mut fr = FrameReader::new(BufReader::with_capacity(cap, r), None);
        let mut out = Some(BufWriter::with_capacity(1 << 20, &mut *w));
        loop {
            let res = match fr.read_head() {
                Ok(Some((t, n)))
                    if t == super::wire::T_EXTENT && n >= 32 + SPLICE_MIN && out.is_some() =>
                {
                    match &mut pipe {
                        Some(p) => pass_extent(&mut fr, n, p, &mut out, live, seen),
                        None => fr.read_body(t, n).map(|raw| {
                            watch(&raw, up, live, seen);
                            Passing::Frame(raw)
                        }),
                    }
                }
                Ok(Some((t, n))) => fr.read_body(t, n).map(|raw| {
                    watch(&raw, up, live, seen);
                    Passing::Frame(raw)
                }),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            let passing = match res {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(up, error = %e, "sync: relay read ended");
                    // What the end still writes is read and dropped, so that it is
                    // never left blocked.
                    let _ = std::io::copy(fr.get_mut(), &mut std::io::sink());
                    break;
                }
            };
            if let Passing::Frame(raw) = &passing {
                // After the handshake, frames carry MACs (the source's after its
                // Proof, the destination's after its Welcome).
                if keyed && raw.t == handshake_end(up) {
                    fr.pass_macs();
                }
            }
            if let Some(o) = &mut out {
                let res = match &passing {
                    Passing::Frame(raw) => raw.write_to(o),
                    Passing::Spliced(n) => Ok(*n),
                    Passing::Broken(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                }
                .and_then(|n| {
                    live.wire.fetch_add(n, Ordering::Relaxed);
                    passed += n;
                    let due = limit.map(|l| Duration::from_secs_f64(passed as f64 / l as f64));
                    let early = due.and_then(|d| d.checked_sub(t0.elapsed()));
                    if fr.get_ref().buffer().is_empty() || early.is_some() {
                        o.flush()?;
                    }
                    if let Some(wait) = early {
                        std::thread::sleep(wait);
                    }
                    Ok(())
                });
                if let Err(e) = res {
                    tracing::debug!(up, error = %e, "sync: relay write ended");
                    out = None;
                }
            }
            if matches!(passing, Passing::Broken(_)) || pipe.as_ref().is_some_and(|p| p.failed) {
                // The pipe may hold bytes of a frame that did not go, or cannot be
                // used: never used again.
                pipe = None;
            }
        }
        if let Some(mut o) = out {
            let _ = o.flush();
        }
    }
    w.close();
}

/// The smallest extent whose bytes are spliced: below it, the calls splicing takes
/// cost more than the copy they save.
const SPLICE_MIN: usize = 16 << 10;

/// What became of a frame read.
enum Passing {
    /// Read whole, to be written.
    Frame(RawFrame),
    /// An extent passed on already: its bytes on the wire.
    Spliced(u64),
    /// An extent whose writing failed (what of it was read has been read).
    Broken(std::io::Error),
}

/// Passes on an extent frame whose header `fr` has read (`n` bytes of body follow):
/// its header, hash and what `fr` holds of its bytes through `out`, the rest by
/// splice from `fr`'s descriptor to `out`'s, then its MAC.
fn pass_extent<R: Read>(
    fr: &mut FrameReader<BufReader<R>>,
    n: usize,
    pipe: &mut Pipe,
    out: &mut Option<BufWriter<&mut Sink>>,
    live: &Live,
    seen: &Mutex<Observed>,
) -> Result<Passing, WireError> {
    let mut hash = [0u8; 32];
    fr.get_mut()
        .read_exact(&mut hash)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
            _ => WireError::Io(e),
        })?;
    let rest = n - 32;
    let held = rest.min(fr.get_ref().buffer().len());
    saw_extent(&hash, rest as u64, live, seen);
    let o = out.as_mut().expect("called with a writer");
    let head = {
        let mut h = Vec::with_capacity(37);
        h.extend_from_slice(&(n as u32 + 1).to_le_bytes());
        h.push(super::wire::T_EXTENT);
        h.extend_from_slice(&hash);
        h
    };
    let wrote = o
        .write_all(&head)
        .and_then(|()| o.write_all(&fr.get_ref().buffer()[..held]))
        .and_then(|()| o.flush());
    fr.get_mut().consume(held);
    if let Err(e) = wrote {
        // The rest is read and dropped by the caller's drain... but only after
        // this frame: read it here so the stream stays in step.
        skip(fr, rest - held)?;
        fr.read_passed_mac()?;
        return Ok(Passing::Broken(e));
    }
    // The reader's buffer is empty now (or the whole body was in it): what is left
    // of the body is next in the descriptor.
    let (pulled, res) = pipe.splice(rest - held);
    match res {
        Ok(()) => {}
        // A descriptor that cannot be spliced from: this extent's bytes, and every
        // later one's, go through memory.
        Err(SpliceError::Read(e)) if pulled == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
            pipe.failed = true;
            let mut body = vec![0u8; rest - held];
            fr.get_mut()
                .read_exact(&mut body)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
                    _ => WireError::Io(e),
                })?;
            if let Err(e) = o.write_all(&body) {
                fr.read_passed_mac()?;
                return Ok(Passing::Broken(e));
            }
        }
        Err(SpliceError::Read(e)) => return Err(WireError::Io(e)),
        Err(SpliceError::Write(e)) => {
            skip(fr, rest - held - pulled)?;
            fr.read_passed_mac()?;
            return Ok(Passing::Broken(e));
        }
    }
    let mut wire = 4 + 1 + n as u64;
    if let Some(mac) = fr.read_passed_mac()? {
        wire += mac.len() as u64;
        if let Err(e) = o.write_all(&mac) {
            return Ok(Passing::Broken(e));
        }
    }
    Ok(Passing::Spliced(wire))
}

/// Reads and drops `n` bytes of `fr`'s stream.
fn skip<R: Read>(fr: &mut FrameReader<BufReader<R>>, n: usize) -> Result<(), WireError> {
    let got = std::io::copy(&mut fr.get_mut().take(n as u64), &mut std::io::sink())
        .map_err(WireError::Io)?;
    if got < n as u64 {
        return Err(WireError::Truncated);
    }
    Ok(())
}

/// A pipe between a relay's two descriptors, for splice(2).
struct Pipe {
    from: RawFd,
    to: RawFd,
    r: OwnedFd,
    w: OwnedFd,
    /// `from` could not be spliced from: use the pipe no more.
    failed: bool,
}

/// Which side of a splice failed.
enum SpliceError {
    Read(std::io::Error),
    Write(std::io::Error),
}

impl Pipe {
    /// A pipe from `from` to `to`, as large as the system lets it be (1 MiB asked).
    fn new((from, to): (RawFd, RawFd)) -> std::io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) writes two descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and ours alone.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl(2) on a pipe we own; a smaller pipe only costs more calls.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        Ok(Pipe {
            from,
            to,
            r,
            w,
            failed: false,
        })
    }

    /// Moves `n` bytes from `from` to `to`: how many were taken from `from`, and
    /// which side failed, if one did. Neither side's bytes pass through memory here.
    fn splice(&mut self, mut n: usize) -> (usize, Result<(), SpliceError>) {
        let mut pulled = 0;
        while n > 0 {
            let got = match splice_some(self.from, self.w.as_raw_fd(), n) {
                Ok(0) => {
                    let e = std::io::ErrorKind::UnexpectedEof.into();
                    return (pulled, Err(SpliceError::Read(e)));
                }
                Ok(got) => got,
                Err(e) => return (pulled, Err(SpliceError::Read(e))),
            };
            pulled += got;
            n -= got;
            let mut left = got;
            while left > 0 {
                match splice_some(self.r.as_raw_fd(), self.to, left) {
                    Ok(0) => {
                        let e = std::io::ErrorKind::WriteZero.into();
                        return (pulled, Err(SpliceError::Write(e)));
                    }
                    Ok(put) => left -= put,
                    Err(e) => return (pulled, Err(SpliceError::Write(e))),
                }
            }
        }
        (pulled, Ok(()))
    }
}

/// One splice(2) of at most `n` bytes from `from` to `to` (one of them a pipe),
/// retried when a signal interrupts it: how many moved (0 at the end of `from`).
fn splice_some(from: RawFd, to: RawFd, n: usize) -> std::io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE;
    loop {
        // SAFETY: splice(2) between descriptors the relay holds open, with no offsets.
        let got = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                n,
                flags,
            )
        };
        if got >= 0 {
            return Ok(got as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The type of the last frame a side sends without a MAC.
fn handshake_end(up: bool) -> u8 {
    if up {
        super::wire::T_PROOF
    } else {
        super::wire::T_WELCOME
    }
}

/// Notes what a frame says: the summary, the progress and the protocol trace.
fn watch(raw: &RawFrame, up: bool, live: &Live, seen: &Mutex<Observed>) {
    let dir = if up { "push" } else { "reply" };
    if raw.is_extent() {
        // The hash, then the bytes: not decoded (that would copy them).
        if let Some(hash) = raw.body.first_chunk::<32>() {
            saw_extent(hash, raw.body.len() as u64 - 32, live, seen);
        }
        return;
    }
    let Ok(f) = raw.decode() else {
        tracing::trace!(dir, t = raw.t, "sync: a frame that does not decode");
        return;
    };
    let mut o = seen.lock().unwrap_or_else(|p| p.into_inner());
    match f {
        Frame::Plan {
            snapshot,
            records,
            extents,
            bytes,
        } => {
            tracing::trace!(dir, snapshot = %snapshot.name, records, extents, bytes, "sync: plan");
            *live.tally.lock().unwrap_or_else(|p| p.into_inner()) = Tally {
                plan: bytes,
                ..Tally::default()
            };
            o.sum.planned.push((snapshot.name, records, extents, bytes));
        }
        Frame::Hello { dry_run, .. } => {
            tracing::trace!(dir, dry_run, "sync: hello");
            o.sum.dry_run = dry_run;
        }
        Frame::Holding { volume, .. } => {
            tracing::trace!(dir, "sync: holding");
            o.sum.dest_volume = Some(volume);
        }
        Frame::Begin { snapshot, base } => {
            tracing::trace!(dir, snapshot = %snapshot.name, base = ?base, "sync: begin");
            *live.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = snapshot.name;
        }
        Frame::Records { batch, records } => {
            tracing::trace!(dir, batch, records = records.len(), "sync: records");
            o.sum.records += records.len() as u64;
            let mut named = HashMap::new();
            let mut seen = HashSet::new();
            for rec in &records {
                // A record that does not decode is the destination's to refuse.
                let _ = first_namings(rec, &mut seen, |h, len| {
                    named.insert(*h, len);
                });
            }
            let mut t = live.tally.lock().unwrap_or_else(|p| p.into_inner());
            if t.pending.len() < PENDING_MAX {
                t.pending.insert(batch, named);
            }
        }
        Frame::Ack { batch, missing } => {
            tracing::trace!(dir, batch, missing = missing.len(), "sync: ack");
            let mut t = live.tally.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(mut named) = t.pending.remove(&batch) {
                let named_bytes = named.values().fold(0u64, |a, b| a.saturating_add(*b));
                t.acked = t.acked.saturating_add(named_bytes);
                for h in missing {
                    if let Some(len) = named.remove(&h) {
                        t.lacked = t.lacked.saturating_add(len);
                        t.owed_bytes = t.owed_bytes.saturating_add(len);
                        t.owed.insert(h, len);
                    }
                }
            }
        }
        Frame::Committed { name } => {
            tracing::trace!(dir, snapshot = %name, "sync: committed");
            live.committed.fetch_add(1, Ordering::Relaxed);
            o.sum.snapshots.push(name);
        }
        Frame::Done => {
            tracing::trace!(dir, "sync: done");
            o.done = up;
        }
        Frame::Error { message } => {
            tracing::trace!(dir, message = %message, "sync: error");
            let slot = if up {
                &mut o.source_error
            } else {
                &mut o.dest_error
            };
            slot.get_or_insert(message);
        }
        _ => tracing::trace!(dir, frame = super::wire::type_name(raw.t), "sync: frame"),
    }
}

/// Notes an extent going by: `hash`, and `n` bytes.
fn saw_extent(hash: &[u8; 32], n: u64, live: &Live, seen: &Mutex<Observed>) {
    let mut t = live.tally.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = t.owed.remove(hash) {
        t.owed_bytes = t.owed_bytes.saturating_sub(b);
    }
    drop(t);
    live.payload.fetch_add(n, Ordering::Relaxed);
    let mut o = seen.lock().unwrap_or_else(|p| p.into_inner());
    o.sum.extents += 1;
    o.sum.payload_bytes += n;
}

/// Shows progress until `stop` is dropped: a bar on a terminal, a line every 10 s
/// otherwise.
fn show(live: &Live, stop: std::sync::mpsc::Receiver<()>) {
    let tick = || {
        !matches!(
            stop.recv_timeout(Duration::from_millis(100)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        )
    };
    use std::io::IsTerminal;
    // What is sent, what it will be at the end of this snapshot, whether that is
    // exact, and what to say beside the bar.
    let now = |live: &Live| {
        let payload = live.payload.load(Ordering::Relaxed);
        let (total, exact) = live
            .tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total(payload);
        let msg = format!(
            "{}: {} snapshots committed, {} on the wire",
            live.snapshot.lock().unwrap_or_else(|p| p.into_inner()),
            live.committed.load(Ordering::Relaxed),
            indicatif::HumanBytes(live.wire.load(Ordering::Relaxed)),
        );
        (payload, total, exact, msg)
    };
    // Nothing is shown before the first snapshot: ssh may still be asking for a
    // password or a host key on the terminal.
    let started = |live: &Live| {
        !live
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    };
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg}\n[{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}, {eta} left",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let mut shown = false;
        loop {
            if shown || started(live) {
                shown = true;
                let (payload, total, _, msg) = now(live);
                bar.set_length(total);
                bar.set_position(payload);
                bar.set_message(msg);
            }
            if tick() {
                break;
            }
        }
        bar.finish_and_clear();
    } else {
        let t0 = Instant::now();
        let mut next = Instant::now() + Duration::from_secs(10);
        while !tick() {
            if Instant::now() >= next && started(live) {
                let (payload, total, exact, msg) = now(live);
                let rate = payload as f64 / t0.elapsed().as_secs_f64().max(1e-3);
                let left = if rate > 0.0 && total > payload {
                    format!(", {:.0} s left", (total - payload) as f64 / rate)
                } else {
                    String::new()
                };
                eprintln!(
                    "snapfs sync: {msg}; {} of {}{} sent ({}/s{left})",
                    indicatif::HumanBytes(payload),
                    if exact { "" } else { "about " },
                    indicatif::HumanBytes(total),
                    indicatif::HumanBytes(rate as u64),
                );
                next += Duration::from_secs(10);
            }
        }
    }
}

/// Asks the daemon serving `store` to be the source end (with `key` on a keyed
/// session); `Ok(None)` when no daemon serves it (the store is not mounted).
pub fn daemon_source(
    store: &Path,
    only: Option<&str>,
    dry_run: bool,
    one_off: bool,
    key: Option<[u8; 32]>,
) -> Result<Option<End>, SyncError> {
    let req = crate::control::Request::Send {
        snapshot: only.map(str::to_string),
        dry_run,
        one_off,
        key: key.map(|k| crate::store::hex(&k)),
    };
    daemon_conn(store, &req)?.map(End::unix).transpose()
}

/// Asks the daemon serving `store` to be the destination end (a mounted replica);
/// `Ok(None)` when no daemon serves it.
pub fn daemon_sink(store: &Path) -> Result<Option<End>, SyncError> {
    daemon_conn(store, &crate::control::Request::Receive)?
        .map(End::unix)
        .transpose()
}

/// Sends `req` to the daemon serving `store` and reads its answer: the connection,
/// which carries the session's frames from then on, or `None` when no daemon serves
/// the store (or it is going away).
pub fn daemon_conn(
    store: &Path,
    req: &crate::control::Request,
) -> Result<Option<UnixStream>, SyncError> {
    let Some(conn) = crate::daemon::connect_control(store) else {
        return Ok(None);
    };
    let mut conn = conn.map_err(SyncError::Protocol)?;
    let mut line = serde_json::to_vec(req).expect("a request always encodes");
    line.push(b'\n');
    conn.write_all(&line).map_err(WireError::Io)?;
    // The answer line, byte by byte: the frames after it are the relay's to read.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.len() < 1 << 16 {
        match (&conn).read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => answer.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e).into()),
        }
    }
    if answer.is_empty() {
        // The daemon is going away: the store is about to be free.
        return Ok(None);
    }
    let out: crate::control::Outcome = serde_json::from_slice(&answer).map_err(|e| {
        SyncError::Protocol(format!(
            "the daemon's answer does not decode ({e}): is the snapfs CLI the same version as the daemon?"
        ))
    })?;
    if out.error {
        return Err(SyncError::Protocol(out.text.trim_end().to_string()));
    }
    Ok(Some(conn))
}

/// Reads a child's stderr to its end, passing it on (ssh's prompts and warnings);
/// its last lines come on the channel returned, once it ends.
pub fn collect_stderr(r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = std::collections::VecDeque::new();
        let mut br = BufReader::new(r);
        let mut l = Vec::new();
        while br.read_until(b'\n', &mut l).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&l).into_owned();
            eprint!("{text}");
            kept.push_back(text);
            if kept.len() > 50 {
                kept.pop_front();
            }
            l.clear();
        }
        let _ = tx.send(kept.into_iter().collect());
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::{BlockRec, KIND_BLOCK, PAGE};
    use crate::sync::wire::{Record, SnapRef};

    fn see(f: Frame, up: bool, live: &Live) {
        let (t, body) = f.encode();
        let seen = Mutex::new(Observed::default());
        watch(&RawFrame { t, body, mac: None }, up, live, &seen);
    }

    /// A block record naming `hash` whole (`len` bytes).
    fn block(ino: u64, sub: u64, hash: u8, len: u32) -> Record {
        let mut payload = Vec::new();
        BlockRec::whole([hash; 32], len).encode(&mut payload);
        Record {
            ino,
            kind: KIND_BLOCK,
            sub,
            name: Vec::new(),
            payload: Some(payload),
        }
    }

    fn total(live: &Live) -> (u64, bool) {
        let payload = live.payload.load(Ordering::Relaxed);
        live.tally.lock().unwrap().total(payload)
    }

    #[test]
    fn the_total_is_exact_once_every_batch_is_acknowledged() {
        let live = Live::default();
        let snap = SnapRef {
            name: "s".into(),
            created_sec: 0,
            created_nsec: 0,
        };
        // Two batches of 4 extents of 64 KiB, one named in both (counted once per
        // batch, as the plan counts): the plan says 8 extents. (Hashes from 10: a
        // base hash of zeros is an unwritten block, which names no extent.)
        let len = 16 * PAGE as u32;
        let b0: Vec<Record> = (0..4).map(|i| block(2, i, 10 + i as u8, len)).collect();
        let mut b1: Vec<Record> = (4..7).map(|i| block(2, i, 10 + i as u8, len)).collect();
        b1.push(block(3, 0, 10, len));
        let plan = 8 * len as u64;
        see(
            Frame::Plan {
                snapshot: snap.clone(),
                records: 8,
                extents: 8,
                bytes: plan,
            },
            true,
            &live,
        );
        assert_eq!(total(&live), (plan, false), "before any ack: the plan");
        see(
            Frame::Records {
                batch: 0,
                records: b0,
            },
            true,
            &live,
        );
        // The destination lacks one of batch 0's four.
        see(
            Frame::Ack {
                batch: 0,
                missing: vec![[12; 32]],
            },
            false,
            &live,
        );
        // One extent owed, and the 4 not acknowledged at a quarter: one more.
        assert_eq!(total(&live), (2 * len as u64, false));
        see(
            Frame::Extent {
                hash: [12; 32],
                data: vec![7; len as usize],
            },
            true,
            &live,
        );
        assert_eq!(total(&live), (2 * len as u64, false));
        see(
            Frame::Records {
                batch: 1,
                records: b1,
            },
            true,
            &live,
        );
        // A batch in flight: not exact, though the first lacked nothing more.
        assert_eq!(total(&live), (2 * len as u64, false));
        // Batch 1 lacks two of its three new extents (and has 10 already); a lost
        // extent no batch names rides along and is not counted ahead.
        see(
            Frame::Ack {
                batch: 1,
                missing: vec![[14; 32], [16; 32], [9; 32]],
            },
            false,
            &live,
        );
        assert_eq!(total(&live), (3 * len as u64, true), "exact");
        for h in [14u8, 16] {
            see(
                Frame::Extent {
                    hash: [h; 32],
                    data: vec![h; len as usize],
                },
                true,
                &live,
            );
        }
        assert_eq!(total(&live), (3 * len as u64, true));
        assert_eq!(live.payload.load(Ordering::Relaxed), 3 * len as u64);
        // A plan that claims every byte there is does not overflow the total.
        see(
            Frame::Plan {
                snapshot: snap,
                records: 1,
                extents: 1,
                bytes: u64::MAX,
            },
            true,
            &live,
        );
        assert_eq!(total(&live), (u64::MAX, false));
    }
}
