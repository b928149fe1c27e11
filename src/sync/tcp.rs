//! The TCP transport: `snapfs serve STORE --listen ADDR --key-file F` receives
//! snapshots, and `snapfs sync SOURCE tcp://HOST:PORT --key-file F` connects to it. Both
//! ends prove the shared key (challenge and response) before anything else is said,
//! and every frame after that carries a MAC under a key fresh to the session.

use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::relay::{End, Sink};
use super::session::{SyncError, receive_watched};
use super::wire::{FrameReader, FrameWriter, WireError, key_from_file_bytes};

/// How long a peer may stay silent before its session ends.
pub const IDLE: Duration = Duration::from_secs(120);

/// How long a peer has to prove the key before its connection is closed: sessions
/// are served one at a time, so a peer that trickles its handshake must not hold
/// the others off.
pub const HANDSHAKE: Duration = Duration::from_secs(10);

/// The address `serve` listens on unless told: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7870";

/// Reads the shared key from `path`: a file only its owner may read, holding at
/// least 16 bytes of secret.
pub fn read_key_file(path: &Path) -> Result<[u8; 32], SyncError> {
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| SyncError::Protocol(format!("key file {}: {why}", path.display()));
    let md = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if md.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o} lets others read it; `chmod 600 {}`",
            md.mode() & 0o777,
            path.display()
        )));
    }
    let contents = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    key_from_file_bytes(&contents).ok_or_else(|| bad("holds less than 16 bytes of secret".into()))
}

fn io(e: std::io::Error) -> SyncError {
    SyncError::Wire(WireError::Io(e))
}

/// Receives into `store` every session that connects to `listen`, one at a time, for
/// ever; `ready` is told the address bound (a port of 0 picks one). A session that
/// fails is logged and the next one served.
pub fn serve(
    store: &Path,
    listen: &str,
    key: [u8; 32],
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), SyncError> {
    let l = TcpListener::bind(listen)
        .map_err(|e| SyncError::Protocol(format!("cannot listen on {listen}: {e}")))?;
    ready(l.local_addr().map_err(io)?);
    serve_on(l, |r, w, proven| {
        receive_watched(store, Some(key), r, w, Some(proven))
    })
}

/// Serves every session that connects to `l` with `session`, one at a time, for
/// ever; `session` sets the flag once the peer has proven the key, and a peer that has
/// not within [`HANDSHAKE`] is cut off. A session that fails is logged and the next
/// one served.
pub fn serve_on(
    l: TcpListener,
    mut session: impl FnMut(
        FrameReader<BufReader<TcpStream>>,
        FrameWriter<BufWriter<TcpStream>>,
        &AtomicBool,
    ) -> Result<super::session::Summary, SyncError>,
) -> Result<(), SyncError> {
    // The connection being served, its deadline to prove the key, and whether it
    // has: one watchdog closes it when the deadline passes first.
    type Watched = Option<(TcpStream, std::time::Instant, Arc<AtomicBool>)>;
    let watched: Arc<Mutex<Watched>> = Arc::new(Mutex::new(None));
    {
        let watched = watched.clone();
        std::thread::Builder::new()
            .name("serve-watchdog".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(250));
                    let mut w = watched.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some((conn, deadline, proven)) = w.as_ref()
                        && !proven.load(Ordering::SeqCst)
                        && std::time::Instant::now() >= *deadline
                    {
                        tracing::warn!("sync: a peer did not prove the key in time");
                        let _ = conn.shutdown(std::net::Shutdown::Both);
                        *w = None;
                    }
                }
            })
            .map_err(io)?;
    }
    let mut backoff = Duration::from_millis(10);
    loop {
        let (conn, peer) = match l.accept() {
            Ok(c) => {
                backoff = Duration::from_millis(10);
                c
            }
            Err(e) => {
                // Out of descriptors, say: wait, rather than spin.
                tracing::warn!(error = %e, "sync: accept failed");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let proven = Arc::new(AtomicBool::new(false));
        if let Ok(c) = conn.try_clone() {
            *watched.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((c, std::time::Instant::now() + HANDSHAKE, proven.clone()));
        }
        // A panic ends this session only: the next one is served.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            framed(conn).and_then(|(r, w)| session(r, w, &proven))
        }))
        .unwrap_or_else(|_| Err(SyncError::Protocol("the session's thread panicked".into())));
        *watched.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match res {
            Ok(sum) => tracing::info!(%peer, snapshots = ?sum.snapshots, "sync: received"),
            Err(e) => tracing::warn!(%peer, error = %e, "sync: session failed"),
        }
    }
}

/// Connects to the `snapfs serve` at `addr`: the destination end of a session.
pub fn connect(addr: &str) -> Result<End, SyncError> {
    let target = addr
        .to_socket_addrs()
        .map_err(|e| SyncError::Protocol(format!("{addr}: {e}")))?
        .next()
        .ok_or_else(|| SyncError::Protocol(format!("{addr}: no address")))?;
    let conn = TcpStream::connect_timeout(&target, Duration::from_secs(10))
        .map_err(|e| SyncError::Protocol(format!("cannot connect to {addr}: {e}")))?;
    // No idle limit here: the destination may think for long (reading back what it
    // has) while the source waits. A peer that is gone is found by keepalive.
    let _ = conn.set_nodelay(true);
    keepalive(&conn);
    let r = conn.try_clone().map_err(io)?;
    Ok(End {
        rfd: Some(std::os::fd::AsRawFd::as_raw_fd(&r)),
        r: Box::new(r),
        w: Sink::Tcp(conn),
        task: None,
        child: None,
    })
}

/// Probes an idle connection after 60 s, every 10 s, 6 times: a peer that went away
/// without a word is noticed in about two minutes.
fn keepalive(conn: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = conn.as_raw_fd();
    for (level, opt, v) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
    ] {
        // SAFETY: setsockopt(2) on a socket this process owns, with an int value.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
    }
}

type Framed = (
    FrameReader<BufReader<TcpStream>>,
    FrameWriter<BufWriter<TcpStream>>,
);

/// The two halves of a connection, buffered, with the idle limit set.
fn framed(conn: TcpStream) -> Result<Framed, SyncError> {
    conn.set_read_timeout(Some(IDLE)).map_err(io)?;
    conn.set_write_timeout(Some(IDLE)).map_err(io)?;
    let _ = conn.set_nodelay(true);
    let w = conn.try_clone().map_err(io)?;
    Ok((
        FrameReader::new(BufReader::with_capacity(1 << 20, conn), None),
        FrameWriter::new(BufWriter::with_capacity(1 << 20, w), None),
    ))
}
