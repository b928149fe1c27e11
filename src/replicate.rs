//! Scheduled replication (`-o replicate=DEST[+DEST...]`): a mounted volume syncs
//! itself to each destination after every scheduled snapshot (and once when it is
//! mounted), each destination on a thread of its own, so that one slow or dead
//! destination holds back no other. A failed sync is retried with backoff, from 5 s
//! doubling to 5 minutes, until one completes; a snapshot taken meanwhile goes with
//! the retry. Each destination keeps its own cursor in the store (the `sent_to` row
//! and `sync-DEST` hold of `snapfs sync`), so each gets the incremental from its own
//! base. The sessions are `snapfs sync` sessions: the daemon is the source through
//! its own control socket, from a frozen view.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::store::schema::Ts;
use crate::sync::Options;

/// The first retry after a failure; each next one waits twice as long.
const BACKOFF_FIRST: Duration = Duration::from_secs(5);
/// The longest wait between retries.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Parses `replicate=`: destinations joined by `+` (`,` separates mount options).
pub fn parse_destinations(v: &str) -> Result<Vec<String>, String> {
    let dests: Vec<String> = v.split('+').map(|d| d.trim().to_string()).collect();
    if dests.iter().any(String::is_empty) {
        return Err(format!(
            "replicate={v}: destinations are store paths, tcp://HOST:PORT, ssh://... or s3://... joined by +"
        ));
    }
    for d in &dests {
        if d.contains("://")
            && !["tcp://", "ssh://", "s3://"]
                .iter()
                .any(|t| d.starts_with(t))
        {
            return Err(format!(
                "replicate: {d}: unknown transport (a store path, tcp://, ssh:// or s3://)"
            ));
        }
    }
    Ok(dests)
}

/// The file in the store that remembers each destination's volume id across
/// mounts (for `snapfs status` while a destination is down): `HEX TARGET` lines.
const KNOWN_FILE: &str = "replicate-destinations";

/// Each destination's volume id as the last mount learned it.
pub fn read_known(store: &std::path::Path) -> std::collections::HashMap<String, [u8; 16]> {
    std::fs::read_to_string(store.join(KNOWN_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (hex, target) = l.split_once(' ')?;
            Some((target.to_string(), crate::store::unhex::<16>(hex)?))
        })
        .collect()
}

/// Records that `target` is volume `volume` (the file is rewritten whole, one thread
/// at a time).
fn remember(store: &std::path::Path, target: &str, volume: [u8; 16]) {
    static FILE: Mutex<()> = Mutex::new(());
    let _g = FILE.lock().unwrap_or_else(|p| p.into_inner());
    let mut known: Vec<(String, [u8; 16])> = read_known(store).into_iter().collect();
    known.retain(|(t, _)| t != target);
    known.push((target.to_string(), volume));
    known.sort();
    write_known(store, &known);
}

/// Writes the destinations' volume ids (replacing the file whole).
fn write_known(store: &std::path::Path, known: &[(String, [u8; 16])]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text: String = known
        .iter()
        .map(|(t, v)| format!("{} {t}\n", crate::store::hex(v)))
        .collect();
    let tmp = store.join(format!("{KNOWN_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let res = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|_| std::fs::rename(&tmp, store.join(KNOWN_FILE)));
    if let Err(e) = res {
        tracing::warn!(error = %e, "cannot record the destinations' volume ids");
    }
}

/// What happened to one destination (for `snapfs status`).
#[derive(Clone, Debug, Default)]
pub struct DestState {
    /// A sync is due (a snapshot was taken, or a retry is waiting).
    pending: bool,
    /// A sync is running now.
    running: bool,
    /// When the last sync completed.
    pub last_ok: Option<Ts>,
    /// The destination's volume id, once a session has said it (its cursor in the
    /// store is the `sent_to` row of that id).
    pub volume: Option<[u8; 16]>,
    /// The last failure since the last success: when, and why.
    pub last_error: Option<(Ts, String)>,
    /// Failures in a row.
    pub failures: u32,
    /// When the next retry is due, after a failure.
    retry_at: Option<Instant>,
    /// Extent bytes sent to it since the mount.
    pub moved: u64,
    /// Snapshots sent to it since the mount.
    pub sent: u64,
}

/// One destination and its thread's state.
pub struct Dest {
    /// As given in `replicate=`.
    pub target: String,
    state: Mutex<DestState>,
    wake: Condvar,
}

/// The destinations of a mounted volume.
pub struct Replicator {
    dests: Vec<Arc<Dest>>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Replicator {
    /// Starts a thread per destination, syncing `store` (this daemon's) to it with
    /// `opts`; each first syncs at once (what was taken while it was unmounted).
    /// `known` gives each destination's volume id as a past mount recorded it.
    pub fn start(
        store: PathBuf,
        targets: Vec<(String, Option<[u8; 16]>)>,
        opts: Options,
    ) -> Arc<Replicator> {
        let stop = Arc::new(AtomicBool::new(false));
        let dests: Vec<Arc<Dest>> = targets
            .into_iter()
            .map(|(target, volume)| {
                Arc::new(Dest {
                    target,
                    state: Mutex::new(DestState {
                        pending: true,
                        volume,
                        ..DestState::default()
                    }),
                    wake: Condvar::new(),
                })
            })
            .collect();
        let mut threads = Vec::new();
        for (i, d) in dests.iter().enumerate() {
            let (d, stop, store, opts) = (d.clone(), stop.clone(), store.clone(), opts.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("replicate-{i}"))
                .spawn(move || run(&d, &stop, &store, &opts));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, "cannot start a replication thread"),
            }
        }
        Arc::new(Replicator {
            dests,
            stop,
            threads: Mutex::new(threads),
        })
    }

    /// Whether a session to some destination is running.
    pub fn busy(&self) -> bool {
        self.dests.iter().any(|d| d.lock().running)
    }

    /// Waits until every thread has ended (after [`Replicator::stop`], once the
    /// sessions in flight were cut), at most until `deadline`; whether they all did.
    pub fn join(&self, deadline: Instant) -> bool {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let mut all = true;
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                all = false;
            }
        }
        all
    }

    /// A snapshot was taken: every destination is due a sync (one waiting out its
    /// backoff after failures takes it with its next retry).
    pub fn kick(&self) {
        for d in &self.dests {
            d.lock().pending = true;
            d.wake.notify_all();
        }
    }

    /// Ends the threads (a sync in progress ends with the daemon's control socket).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for d in &self.dests {
            d.wake.notify_all();
        }
    }

    /// Each destination and a copy of its state.
    pub fn states(&self) -> Vec<(String, DestState)> {
        self.dests
            .iter()
            .map(|d| (d.target.clone(), d.lock().clone()))
            .collect()
    }

    /// The `snapfs status` lines: one per destination. `cursor` gives, for a
    /// destination's volume id, the newest snapshot it holds in common with this
    /// volume and how many of this volume's snapshots are newer.
    pub fn status_lines(
        &self,
        cursor: impl Fn(Option<[u8; 16]>) -> (Option<String>, usize),
    ) -> String {
        let mut out = String::new();
        for (target, st) in self.states() {
            let (base, lag) = cursor(st.volume);
            let mut line = format!("replicate to:     {}: ", crate::text::clip(&target));
            line.push_str(&format!(
                "has {} ({} newer here)",
                base.as_deref().map_or("nothing".into(), crate::text::clip),
                lag
            ));
            match st.last_ok {
                Some(at) => line.push_str(&format!(", last synced {}", ts_text(at))),
                None => line.push_str(", not synced since the mount"),
            }
            line.push_str(&format!(
                ", {} snapshots and {} bytes sent since the mount",
                st.sent, st.moved
            ));
            if st.running {
                line.push_str(", syncing now");
            }
            if let Some((at, why)) = &st.last_error {
                line.push_str(&format!(
                    "; failing since {} ({} tries): {}",
                    ts_text(*at),
                    st.failures,
                    crate::text::clip(why)
                ));
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

impl Dest {
    fn lock(&self) -> std::sync::MutexGuard<'_, DestState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A time as people read it (UTC).
fn ts_text(t: Ts) -> String {
    crate::policy::utc(t.sec)
}

/// One destination's thread: waits until a sync is due, runs it, retries with
/// backoff on failure.
fn run(d: &Dest, stop: &AtomicBool, store: &std::path::Path, opts: &Options) {
    loop {
        {
            let mut st = d.lock();
            loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let due = st.pending && st.retry_at.is_none_or(|at| Instant::now() >= at);
                if due {
                    break;
                }
                let wait = st
                    .retry_at
                    .map(|at| at.saturating_duration_since(Instant::now()))
                    .unwrap_or(Duration::from_secs(1))
                    .clamp(Duration::from_millis(10), Duration::from_secs(1));
                st = d
                    .wake
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            st.pending = false;
            st.running = true;
        }
        let (summary, res) = crate::sync::run(store, &d.target, opts);
        let mut st = d.lock();
        st.running = false;
        st.moved += summary.payload_bytes;
        st.sent += summary.snapshots.len() as u64;
        if let Some(v) = summary.dest_volume
            && st.volume != Some(v)
        {
            st.volume = Some(v);
            remember(store, &d.target, v);
        }
        match res {
            Ok(()) => {
                tracing::info!(dest = %d.target, snapshots = ?summary.snapshots, "replicated");
                st.last_ok = Some(Ts::now());
                st.last_error = None;
                st.failures = 0;
                st.retry_at = None;
            }
            Err(e) => {
                st.failures += 1;
                let backoff = BACKOFF_FIRST
                    .saturating_mul(1 << (st.failures - 1).min(6))
                    .min(BACKOFF_MAX);
                // Warned once per outage; the retries after it are debug lines.
                if st.failures == 1 {
                    tracing::warn!(dest = %d.target, error = %e, retry_in = ?backoff, "replication failed; retrying with backoff");
                } else {
                    tracing::debug!(dest = %d.target, error = %e, failures = st.failures, retry_in = ?backoff, "replication failed again");
                }
                if st.last_error.is_none() {
                    st.last_error = Some((Ts::now(), e.to_string()));
                } else if let Some((_, why)) = st.last_error.as_mut() {
                    *why = e.to_string();
                }
                st.pending = true;
                st.retry_at = Some(Instant::now() + backoff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_joined_by_plus() {
        assert_eq!(
            parse_destinations("/srv/a+tcp://h:7000+ssh://u@h/p+s3://b/p").unwrap(),
            ["/srv/a", "tcp://h:7000", "ssh://u@h/p", "s3://b/p"]
        );
        assert!(parse_destinations("/a++/b").is_err());
        assert!(parse_destinations("ftp://host/x").is_err());
    }
}
