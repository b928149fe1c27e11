//! `snapfs csi`: a Container Storage Interface (v1.9) driver whose volumes are
//! snapfs stores.
//!
//! Everything lives under the root directory (`--root`):
//!
//! ```text
//! ROOT/volumes/VID/volume.json   the volume: its CSI name, capacity, parameters
//! ROOT/volumes/VID/store/        its snapfs store (size, schedule in snapfs.toml)
//! ROOT/volumes/VID/mnt/          where the node mounts it while it is published
//! ROOT/snapshots/SID.json        a snapshot: its name, volume, and the store that holds it
//! ROOT/retained/VID-T/           a deleted volume's store, kept for its snapshots
//! ```
//!
//! A volume's id and a snapshot's id are derived from their CSI names (a hash), so a
//! repeated CreateVolume or CreateSnapshot finds what the first made. Each JSON file
//! is written last, durably (written aside, synced, renamed): it is the commit point,
//! and a store without one is the leftover of a call cut short, made again.
//! A CSI snapshot is a snapfs snapshot of the volume's store, named after its id.
//!
//! The driver runs `snapfs` itself for the work (mount, snapshot, clone, restore,
//! resize, sync): a published volume's store is served by its daemon, and the same
//! commands reach it through its control socket.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// The CSI messages and services, generated from the CSI definition at build time.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

use proto::*;

/// The driver's name, as Kubernetes' CSIDriver object and StorageClasses name it.
pub const DRIVER_NAME: &str = "snapfs.csi.snapfs.dev";
/// The topology key: volumes live on one node.
pub const TOPOLOGY_KEY: &str = "topology.snapfs.csi.snapfs.dev/node";
/// The size of a volume for which no capacity is asked.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;
/// The smallest volume.
pub const MIN_CAPACITY: u64 = 1 << 20;

/// How `snapfs csi` runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// unix:///PATH or tcp://HOST:PORT.
    pub endpoint: String,
    /// This node's name.
    pub node_id: String,
    /// Where the volumes live.
    pub root: PathBuf,
    /// Serve the controller service.
    pub controller: bool,
    /// Serve the node service.
    pub node: bool,
    /// The snapfs program, run for the work.
    pub snapfs: PathBuf,
}

/// A volume, as `volume.json` keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct VolumeRec {
    name: String,
    id: String,
    capacity: u64,
    parameters: BTreeMap<String, String>,
    /// `snapshot:ID` or `volume:ID` it was made from, if any.
    source: Option<String>,
    created: i64,
}

/// A snapshot, as `SID.json` keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SnapshotRec {
    name: String,
    id: String,
    /// The volume it is of.
    volume: String,
    /// When that volume was made (with its id, which store holds the snapshot: the
    /// volume's while it lives, then `retained/VID-CREATED`).
    volume_created: i64,
    /// Bytes: the volume's capacity when it was taken.
    size: u64,
    created_secs: i64,
    created_nanos: i32,
}

/// The driver's state: its configuration and two locks. Every controller call that
/// changes something holds `lock`, so that calls on the same name never interleave;
/// node calls hold `node_lock`, so that a long restore or sync under `lock` does not
/// keep pods from starting. A call that needs both (DeleteVolume) takes `lock` first.
struct Driver {
    cfg: Config,
    lock: Arc<tokio::sync::Mutex<()>>,
    node_lock: Arc<tokio::sync::Mutex<()>>,
}

type Res<T> = Result<Response<T>, Status>;

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// INVALID_ARGUMENT when a field the call needs is empty.
fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(format!("{field}: none given")));
    }
    Ok(())
}

fn not_found(msg: impl Into<String>) -> Status {
    Status::not_found(msg)
}

fn internal(msg: impl Into<String>) -> Status {
    Status::internal(msg)
}

/// A short id from a name: `PREFIX-` and 20 hex digits of its blake3 hash.
fn id_of(prefix: &str, name: &str) -> String {
    let h = blake3::hash(format!("{prefix}:{name}").as_bytes());
    format!("{prefix}-{}", &h.to_hex()[..20])
}

/// Whether `id` is one this driver could have made (`PREFIX-` and 20 hex digits):
/// anything else is not one of ours, and never reaches a path.
fn valid_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|h| h.len() == 20 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Writes `value` as JSON at `path`, durably (written aside, synced, renamed).
fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let data = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    crate::policy::replace_file(path, &data)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, Status> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| internal(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(internal(format!("{}: {e}", path.display()))),
    }
}

fn now() -> (i64, i32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

/// The StorageClass parameters a volume takes, and the snapfs.toml keys they set.
const VOLUME_PARAMETERS: &[(&str, &str)] = &[
    ("snapshotEvery", "snapshot_every"),
    ("keep", "keep"),
    ("replicate", "replicate"),
    ("replicateKeyFile", "replicate_key_file"),
];

/// Parameters that choose how a volume is made rather than what it keeps.
const MAKE_PARAMETERS: &[&str] = &["restoreFrom", "restoreSnapshot", "blockSize"];

/// Parameters Kubernetes' sidecars add (`csi.storage.k8s.io/...`) are theirs.
fn sidecar_parameter(k: &str) -> bool {
    k.starts_with("csi.storage.k8s.io/")
}

/// The volume's mount options from its parameters, checked as a mount checks them.
fn volume_options(params: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, Status> {
    let mut out = Vec::new();
    for (k, v) in params {
        if k == "blockSize" {
            crate::daemon::parse_block_size(v)
                .map_err(|e| invalid(format!("parameter blockSize: {e}")))?;
            if params.contains_key("restoreFrom") {
                return Err(invalid(
                    "parameter blockSize is for a volume made empty: one made with restoreFrom has its source's",
                ));
            }
        }
        if sidecar_parameter(k) || MAKE_PARAMETERS.contains(&k.as_str()) {
            continue;
        }
        let Some((_, key)) = VOLUME_PARAMETERS.iter().find(|(p, _)| p == k) else {
            return Err(invalid(format!(
                "unknown parameter {k:?}: snapfs takes snapshotEvery, keep, replicate, replicateKeyFile, restoreFrom, restoreSnapshot and blockSize"
            )));
        };
        if v.contains(['\n', '"', ',', '#']) || v.starts_with('-') {
            return Err(invalid(format!(
                "parameter {k}: {v:?} holds a character it may not"
            )));
        }
        out.push((key.to_string(), v.clone()));
    }
    let args: Vec<String> = out.iter().map(|(k, v)| format!("{k}={v}")).collect();
    crate::daemon::MountOptions::parse(&args).map_err(|e| invalid(format!("parameters: {e:#}")))?;
    Ok(out)
}

/// The capacity to give a volume asked for with `range`, or the error the CSI spec
/// names.
fn capacity_for(range: Option<&CapacityRange>, at_least: u64) -> Result<u64, Status> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(invalid("capacity_range: negative bytes"));
    }
    let (req, lim) = (req as u64, lim as u64);
    if lim != 0 && req > lim {
        return Err(invalid(format!(
            "capacity_range: required {req} bytes is more than the limit {lim}"
        )));
    }
    // Nothing asked: the size of what it is made from, or else the default.
    let want = if req != 0 {
        req
    } else if at_least > 0 {
        at_least
    } else if lim != 0 {
        lim.min(DEFAULT_CAPACITY)
    } else {
        DEFAULT_CAPACITY
    };
    let want = want.max(MIN_CAPACITY).max(at_least);
    if lim != 0 && want > lim {
        return Err(Status::out_of_range(format!(
            "capacity_range: the limit {lim} bytes is below what the volume needs ({want})"
        )));
    }
    Ok(want)
}

/// Whether a volume of `capacity` bytes satisfies `range`.
fn capacity_fits(range: Option<&CapacityRange>, capacity: u64) -> bool {
    let Some(r) = range else {
        return true;
    };
    (r.required_bytes <= 0 || capacity >= r.required_bytes as u64)
        && (r.limit_bytes <= 0 || capacity <= r.limit_bytes as u64)
}

/// Checks capabilities: mount volumes (any filesystem type snapfs can stand for), on
/// one node.
fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), String> {
    use volume_capability::access_mode::Mode;
    if caps.is_empty() {
        return Err("volume_capabilities: none given".into());
    }
    for c in caps {
        match &c.access_type {
            Some(volume_capability::AccessType::Mount(m)) => {
                if !matches!(m.fs_type.as_str(), "" | "snapfs" | "fuse" | "fuse.snapfs") {
                    return Err(format!(
                        "filesystem type {:?}: a snapfs volume is snapfs",
                        m.fs_type
                    ));
                }
            }
            Some(volume_capability::AccessType::Block(_)) => {
                return Err("block volumes: a snapfs volume is a filesystem".into());
            }
            None => return Err("volume capability without an access type".into()),
        }
        let mode = c
            .access_mode
            .as_ref()
            .map(|m| m.mode)
            .ok_or("volume capability without an access mode")?;
        match Mode::try_from(mode) {
            Ok(
                Mode::SingleNodeWriter
                | Mode::SingleNodeReaderOnly
                | Mode::SingleNodeSingleWriter
                | Mode::SingleNodeMultiWriter,
            ) => {}
            _ => {
                return Err(format!(
                    "access mode {mode}: a snapfs volume lives on one node"
                ));
            }
        }
    }
    Ok(())
}

impl Driver {
    fn volumes(&self) -> PathBuf {
        self.cfg.root.join("volumes")
    }

    fn volume_dir(&self, id: &str) -> PathBuf {
        self.volumes().join(id)
    }

    fn snapshots(&self) -> PathBuf {
        self.cfg.root.join("snapshots")
    }

    /// Where the store of volume `vid` made at `created` is kept once the volume is
    /// deleted and snapshots of it are left.
    fn retained(&self, vid: &str, created: i64) -> PathBuf {
        self.cfg
            .root
            .join("retained")
            .join(format!("{vid}-{created}"))
    }

    /// The store holding snapshot `s`: its volume's while that lives (and has not
    /// moved its store aside yet), else the retained one.
    fn snapshot_store(&self, s: &SnapshotRec) -> Result<PathBuf, Status> {
        let own = self.volume_dir(&s.volume).join("store");
        if let Some(v) = self.volume(&s.volume)?
            && v.created == s.volume_created
            && own.exists()
        {
            return Ok(own);
        }
        Ok(self.retained(&s.volume, s.volume_created))
    }

    /// Deletes retained stores no snapshot names (left by a deletion cut short).
    fn sweep_retained(&self) -> Result<(), Status> {
        let snaps = self.all_snapshots()?;
        for name in list_dir(&self.cfg.root.join("retained"))? {
            let held = snaps
                .iter()
                .any(|s| format!("{}-{}", s.volume, s.volume_created) == name);
            if !held {
                let p = self.cfg.root.join("retained").join(&name);
                tracing::info!(store = %p.display(), "deleting a retained store no snapshot names");
                std::fs::remove_dir_all(&p)
                    .map_err(|e| internal(format!("{}: {e}", p.display())))?;
            }
        }
        Ok(())
    }

    fn topology(&self) -> Topology {
        Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_string(), self.cfg.node_id.clone())]),
        }
    }

    /// The volume `id`, if it exists.
    fn volume(&self, id: &str) -> Result<Option<VolumeRec>, Status> {
        if !valid_id("v", id) {
            return Ok(None);
        }
        read_json(&self.volume_dir(id).join("volume.json"))
    }

    /// The snapshot `id`, if it exists.
    fn snapshot(&self, id: &str) -> Result<Option<SnapshotRec>, Status> {
        if !valid_id("s", id) {
            return Ok(None);
        }
        read_json(&self.snapshots().join(format!("{id}.json")))
    }

    fn all_volumes(&self) -> Result<Vec<VolumeRec>, Status> {
        let mut out = Vec::new();
        for id in list_dir(&self.volumes())? {
            if let Some(v) = self.volume(&id)? {
                out.push(v);
            }
        }
        Ok(out)
    }

    fn all_snapshots(&self) -> Result<Vec<SnapshotRec>, Status> {
        let mut out = Vec::new();
        for f in list_dir(&self.snapshots())? {
            if let Some(id) = f.strip_suffix(".json")
                && let Some(s) = self.snapshot(id)?
            {
                out.push(s);
            }
        }
        Ok(out)
    }

    fn volume_msg(&self, v: &VolumeRec) -> Volume {
        Volume {
            capacity_bytes: v.capacity as i64,
            volume_id: v.id.clone(),
            volume_context: HashMap::new(),
            content_source: v.source.as_deref().and_then(content_source),
            accessible_topology: vec![self.topology()],
        }
    }

    /// Runs `snapfs ARGS` (blocking; call from a blocking task): its standard output,
    /// or its error line.
    fn snapfs(&self, args: &[&str]) -> Result<String, Status> {
        let out = std::process::Command::new(&self.cfg.snapfs)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| internal(format!("{}: {e}", self.cfg.snapfs.display())))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("failed")
            .trim();
        tracing::warn!(?args, error = line, "snapfs failed");
        Err(internal(format!("snapfs {}: {line}", args[0])))
    }
}

/// Whether a daemon serves `store`: its control socket answers, or the process its
/// pid file names lives (a daemon whose last mount went closes the store after its
/// socket; one that was killed left its pid file behind, naming no process).
fn daemon_alive(store: &Path) -> bool {
    if crate::daemon::connect_control(store).is_some() {
        return true;
    }
    let Ok(text) = std::fs::read_to_string(store.join(crate::daemon::PIDFILE)) else {
        return false;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return false;
    };
    // The process is there and is snapfs (not another that took the number).
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"mount".as_slice()))
}

/// Waits (up to 30 s) until no daemon serves `store`: the store may not move or go
/// before the daemon that held it has closed it.
fn daemon_gone(store: &Path) -> bool {
    for _ in 0..300 {
        if !daemon_alive(store) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// The names in `dir` (none when it does not exist).
fn list_dir(dir: &Path) -> Result<Vec<String>, Status> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(internal(format!("{}: {e}", dir.display()))),
    };
    let mut out: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    Ok(out)
}

fn content_source(s: &str) -> Option<VolumeContentSource> {
    use volume_content_source::{SnapshotSource, Type, VolumeSource};
    let t = match s.split_once(':')? {
        ("snapshot", id) => Type::Snapshot(SnapshotSource {
            snapshot_id: id.to_string(),
        }),
        ("volume", id) => Type::Volume(VolumeSource {
            volume_id: id.to_string(),
        }),
        _ => return None,
    };
    Some(VolumeContentSource { r#type: Some(t) })
}

fn path_str(p: &Path) -> Result<&str, Status> {
    p.to_str()
        .ok_or_else(|| internal(format!("{}: not a UTF-8 path", p.display())))
}

/// Runs blocking work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(format!("a task failed: {e}")))?
}

/// Runs blocking work that changes something, holding the driver's lock `g` until
/// it is done: a call the client gave up on (a sidecar's timeout) still runs to its
/// end, and its retry waits for it rather than running beside it.
async fn locked<T: Send + 'static>(
    g: tokio::sync::OwnedMutexGuard<()>,
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    blocking(move || {
        let _g = g;
        f()
    })
    .await
}

/// A page of `items` from `token` (an index; empty: the start), at most `max` (0:
/// all), and the token of the next page (empty: none).
fn page<T: Clone>(items: &[T], token: &str, max: i32) -> Result<(Vec<T>, String), Status> {
    let start: usize = if token.is_empty() {
        0
    } else {
        token
            .parse()
            .ok()
            .filter(|&n| n <= items.len())
            .ok_or_else(|| Status::aborted(format!("starting_token {token:?}: not one of ours")))?
    };
    if max < 0 {
        return Err(invalid("max_entries: negative"));
    }
    let end = if max == 0 {
        items.len()
    } else {
        (start + max as usize).min(items.len())
    };
    let next = if end < items.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((items[start..end].to_vec(), next))
}

// ---------------------------------------------------------------- identity

#[tonic::async_trait]
impl identity_server::Identity for Arc<Driver> {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Res<GetPluginInfoResponse> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Res<GetPluginCapabilitiesResponse> {
        use plugin_capability::{Type, VolumeExpansion, service, volume_expansion};
        let mut caps = vec![
            Type::Service(plugin_capability::Service {
                r#type: service::Type::VolumeAccessibilityConstraints as i32,
            }),
            Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            }),
        ];
        if self.cfg.controller {
            caps.push(Type::Service(plugin_capability::Service {
                r#type: service::Type::ControllerService as i32,
            }));
        }
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|t| PluginCapability { r#type: Some(t) })
                .collect(),
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Res<ProbeResponse> {
        let ok = self.cfg.root.is_dir();
        if !ok {
            return Err(Status::failed_precondition(format!(
                "{}: the root is gone",
                self.cfg.root.display()
            )));
        }
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

// ---------------------------------------------------------------- controller

mod controller;
mod node;

/// Serves the driver on `cfg.endpoint` until SIGTERM or SIGINT.
pub fn serve(cfg: &Config) -> anyhow::Result<()> {
    use anyhow::Context;
    for d in ["volumes", "snapshots", "retained"] {
        std::fs::create_dir_all(cfg.root.join(d))
            .with_context(|| format!("cannot make {}", cfg.root.join(d).display()))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Mounts name their store by its path: one spelling of it, the canonical one.
    let mut cfg = cfg.clone();
    cfg.root =
        std::fs::canonicalize(&cfg.root).with_context(|| format!("{}", cfg.root.display()))?;
    let cfg = &cfg;
    let driver = Arc::new(Driver {
        cfg: cfg.clone(),
        lock: Arc::new(tokio::sync::Mutex::new(())),
        node_lock: Arc::new(tokio::sync::Mutex::new(())),
    });
    driver
        .sweep_retained()
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stopping");
        };
        let mut router = tonic::transport::Server::builder()
            .add_service(identity_server::IdentityServer::new(driver.clone()));
        if driver.cfg.controller {
            router = router.add_service(controller_server::ControllerServer::new(driver.clone()));
        }
        if driver.cfg.node {
            router = router.add_service(node_server::NodeServer::new(driver.clone()));
        }
        if let Some(path) = cfg.endpoint.strip_prefix("unix://") {
            let path = Path::new(path);
            // A socket left by a driver that is gone is in the way.
            if path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            tracing::info!(endpoint = %cfg.endpoint, node = %cfg.node_id, "serving CSI");
            // Stopped at once, not gracefully: a sidecar keeps its connection open for
            // good, and would hold a graceful stop forever.
            tokio::select! {
                r = router.serve_with_incoming(futures_util::stream::unfold(listener, |l| async move {
                    let conn = l.accept().await.map(|(s, _)| s);
                    Some((conn, l))
                })) => r?,
                () = shutdown => {}
            }
            let _ = std::fs::remove_file(path);
        } else if let Some(addr) = cfg.endpoint.strip_prefix("tcp://") {
            let addr: std::net::SocketAddr = addr
                .parse()
                .with_context(|| format!("endpoint {}: want tcp://IP:PORT", cfg.endpoint))?;
            tracing::info!(endpoint = %cfg.endpoint, node = %cfg.node_id, "serving CSI");
            tokio::select! {
                r = router.serve(addr) => r?,
                () = shutdown => {}
            }
        } else {
            anyhow::bail!(
                "endpoint {}: want unix:///PATH or tcp://IP:PORT",
                cfg.endpoint
            );
        }
        Ok(())
    })
}
