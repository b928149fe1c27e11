//! The CSI controller service: volumes and snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::*;

/// Parameters of a VolumeSnapshotClass.
const SNAPSHOT_PARAMETERS: &[&str] = &["replicate", "replicateKeyFile"];

impl Driver {
    /// Makes the store of new volume `id` at `store` from `source` (or the
    /// `restoreFrom` parameter), empty otherwise. Blocking.
    fn make_store(
        &self,
        id: &str,
        store: &Path,
        source: Option<&str>,
        params: &BTreeMap<String, String>,
    ) -> Result<(), Status> {
        let dest = path_str(store)?;
        match source {
            Some(s) if s.starts_with("snapshot:") => {
                let snap = self
                    .snapshot(&s["snapshot:".len()..])?
                    .ok_or_else(|| not_found(format!("snapshot {s}: no such snapshot")))?;
                let from = self.snapshot_store(&snap)?;
                self.snapfs(&["clone", "--", path_str(&from)?, &snap.id, dest])?;
                // The clone's own copy of the snapshot is not a CSI snapshot of it.
                self.snapfs(&["snapshot", "delete", "--", dest, &snap.id])?;
            }
            Some(s) if s.starts_with("volume:") => {
                let vid = &s["volume:".len()..];
                let from = self.volume_dir(vid).join("store");
                let from = path_str(&from)?;
                let tmp = format!("csi-clone-{id}");
                // A clone cut short may have left its snapshot behind.
                if self.has_snapshot(from, &tmp)? {
                    self.snapfs(&["snapshot", "delete", "--", from, &tmp])?;
                }
                self.snapfs(&["snapshot", "create", "--", from, &tmp])?;
                let res = self
                    .snapfs(&["clone", "--", from, &tmp, dest])
                    .and_then(|_| self.snapfs(&["snapshot", "delete", "--", dest, &tmp]));
                let _ = self.snapfs(&["snapshot", "delete", "--", from, &tmp]);
                res?;
            }
            _ => {
                if let Some(url) = params.get("restoreFrom") {
                    let mut args = vec!["restore"];
                    if let Some(s) = params.get("restoreSnapshot") {
                        args.extend(["--snapshot", s.as_str()]);
                    }
                    args.extend(["--", url.as_str(), dest]);
                    self.snapfs(&args)?;
                } else {
                    // Checked by volume_options already.
                    let block_size = params
                        .get("blockSize")
                        .map(|v| crate::daemon::parse_block_size(v).map_err(invalid))
                        .transpose()?;
                    let mut cfg = crate::store::StoreConfig::default();
                    cfg.block_size = block_size.unwrap_or(cfg.block_size);
                    crate::fs::Fs::open(store, Some(&cfg))
                        .map_err(|e| internal(format!("cannot make store: {e}")))?;
                }
            }
        }
        Ok(())
    }

    /// Sets the volume's size and parameters in its store's snapfs.toml. Blocking.
    fn configure(
        &self,
        store: &Path,
        capacity: u64,
        options: &[(String, String)],
    ) -> Result<(), Status> {
        let toml = store.join("snapfs.toml");
        let set =
            |k: &str, v: Option<&str>| crate::policy::set_config(&toml, k, v).map_err(internal);
        set("size", Some(&capacity.to_string()))?;
        for (k, v) in options {
            set(k, Some(v))?;
        }
        Ok(())
    }

    /// Whether the store at `store` holds a snapshot named `name`. Blocking.
    fn has_snapshot(&self, store: &str, name: &str) -> Result<bool, Status> {
        let out = self.snapfs(&["snapshot", "list", "--json", "--", store])?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out)
            .map_err(|e| internal(format!("snapshot list of {store}: {e}")))?;
        Ok(rows
            .iter()
            .any(|r| r.get("name").and_then(|n| n.as_str()) == Some(name)))
    }

    /// Whether the volume is mounted by this node now.
    fn published(&self, id: &str) -> bool {
        crate::daemon::is_mounted(&self.volume_dir(id).join("mnt"))
    }
}

#[tonic::async_trait]
impl controller_server::Controller for Arc<Driver> {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Res<CreateVolumeResponse> {
        let r = req.into_inner();
        required("name", &r.name)?;
        check_capabilities(&r.volume_capabilities).map_err(invalid)?;
        let params: BTreeMap<String, String> = r.parameters.clone().into_iter().collect();
        let options = volume_options(&params)?;
        let source = match r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            Some(volume_content_source::Type::Snapshot(s)) => {
                Some(format!("snapshot:{}", s.snapshot_id))
            }
            Some(volume_content_source::Type::Volume(v)) => Some(format!("volume:{}", v.volume_id)),
            None => None,
        };
        if source.is_some() && params.contains_key("restoreFrom") {
            return Err(invalid(
                "restoreFrom and a volume content source: a volume comes from one of them",
            ));
        }
        let d = self.clone();
        let g = self.lock.clone().lock_owned().await;
        let resp = locked(g, move || {
            let id = id_of("v", &r.name);
            if let Some(v) = d.volume(&id)? {
                if !capacity_fits(r.capacity_range.as_ref(), v.capacity) {
                    return Err(Status::already_exists(format!(
                        "volume {:?} exists with {} bytes",
                        r.name, v.capacity
                    )));
                }
                if v.source != source || v.parameters != params {
                    return Err(Status::already_exists(format!(
                        "volume {:?} exists, made otherwise",
                        r.name
                    )));
                }
                return Ok(d.volume_msg(&v));
            }
            let at_least = match source.as_deref() {
                Some(s) if s.starts_with("snapshot:") => {
                    d.snapshot(&s["snapshot:".len()..])?
                        .ok_or_else(|| not_found(format!("{s}: no such snapshot")))?
                        .size
                }
                Some(s) => {
                    d.volume(&s["volume:".len()..])?
                        .ok_or_else(|| not_found(format!("{s}: no such volume")))?
                        .capacity
                }
                None => 0,
            };
            let capacity = capacity_for(r.capacity_range.as_ref(), at_least)?;
            let dir = d.volume_dir(&id);
            // Left by a call cut short: made again.
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| internal(format!("{}: {e}", dir.display())))?;
            }
            std::fs::create_dir_all(dir.join("mnt"))
                .map_err(|e| internal(format!("{}: {e}", dir.display())))?;
            let store = dir.join("store");
            let made = d
                .make_store(&id, &store, source.as_deref(), &params)
                .and_then(|()| d.configure(&store, capacity, &options));
            if let Err(e) = made {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            let rec = VolumeRec {
                name: r.name.clone(),
                id: id.clone(),
                capacity,
                parameters: params,
                source,
                created: now().0,
            };
            write_json(&dir.join("volume.json"), &rec)
                .map_err(|e| internal(format!("{}: {e}", dir.display())))?;
            tracing::info!(volume = %id, name = %rec.name, capacity, "volume created");
            Ok(d.volume_msg(&rec))
        })
        .await?;
        Ok(Response::new(CreateVolumeResponse { volume: Some(resp) }))
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Res<DeleteVolumeResponse> {
        let id = req.into_inner().volume_id;
        required("volume_id", &id)?;
        let d = self.clone();
        let g = self.lock.clone().lock_owned().await;
        // No publish may start meanwhile.
        let ng = self.node_lock.clone().lock_owned().await;
        locked(g, move || {
            let _ng = ng;
            if !valid_id("v", &id) {
                return Ok(());
            }
            let dir = d.volume_dir(&id);
            if !dir.exists() {
                return Ok(());
            }
            if d.published(&id) {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is published: unpublish it first"
                )));
            }
            let store = dir.join("store");
            if !daemon_gone(&store) {
                return Err(Status::unavailable(format!(
                    "volume {id}: its daemon is still closing the store; try again"
                )));
            }
            let json = dir.join("volume.json");
            if let Some(v) = d.volume(&id)? {
                let snaps = d
                    .all_snapshots()?
                    .into_iter()
                    .any(|s| s.volume == id && s.volume_created == v.created);
                // Its snapshots outlive it: the store is moved aside for them first
                // (one rename), so that whatever is cut short after, they find it.
                if snaps && store.exists() {
                    let kept = d.retained(&id, v.created);
                    std::fs::rename(&store, &kept)
                        .map_err(|e| internal(format!("{}: {e}", kept.display())))?;
                    sync_dir(&d.cfg.root.join("retained"))
                        .and_then(|()| sync_dir(&dir))
                        .map_err(|e| internal(e.to_string()))?;
                }
                // Then the record: from here on the volume is deleted.
                std::fs::remove_file(&json)
                    .and_then(|()| sync_dir(&dir))
                    .map_err(|e| internal(format!("{}: {e}", json.display())))?;
            }
            std::fs::remove_dir_all(&dir)
                .map_err(|e| internal(format!("{}: {e}", dir.display())))?;
            tracing::info!(volume = %id, "volume deleted");
            Ok(())
        })
        .await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Res<ControllerPublishVolumeResponse> {
        Err(Status::unimplemented("a snapfs volume needs no attaching"))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Res<ControllerUnpublishVolumeResponse> {
        Err(Status::unimplemented("a snapfs volume needs no attaching"))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Res<ValidateVolumeCapabilitiesResponse> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities: none given"));
        }
        if self.volume(&r.volume_id)?.is_none() {
            return Err(not_found(format!("volume {}: no such volume", r.volume_id)));
        }
        Ok(Response::new(
            match check_capabilities(&r.volume_capabilities) {
                Ok(()) => ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(validate_volume_capabilities_response::Confirmed {
                        volume_context: r.volume_context,
                        volume_capabilities: r.volume_capabilities,
                        parameters: r.parameters,
                        mutable_parameters: r.mutable_parameters,
                    }),
                    message: String::new(),
                },
                Err(why) => ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: why,
                },
            },
        ))
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Res<ListVolumesResponse> {
        let r = req.into_inner();
        let all = self.all_volumes()?;
        let (vols, next_token) = page(&all, &r.starting_token, r.max_entries)?;
        Ok(Response::new(ListVolumesResponse {
            entries: vols
                .iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(self.volume_msg(v)),
                    status: None,
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_capacity(&self, _: Request<GetCapacityRequest>) -> Res<GetCapacityResponse> {
        let st = statvfs(&self.cfg.root).map_err(|e| internal(e.to_string()))?;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: st.f_bavail.saturating_mul(st.f_frsize).min(i64::MAX as u64) as i64,
            maximum_volume_size: None,
            minimum_volume_size: Some(MIN_CAPACITY as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Res<ControllerGetCapabilitiesResponse> {
        use controller_service_capability::{Rpc, Type, rpc::Type as R};
        let caps = [
            R::CreateDeleteVolume,
            R::CreateDeleteSnapshot,
            R::ListSnapshots,
            R::ListVolumes,
            R::CloneVolume,
            R::ExpandVolume,
            R::GetCapacity,
        ];
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|c| ControllerServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: c as i32 })),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Res<CreateSnapshotResponse> {
        let r = req.into_inner();
        required("name", &r.name)?;
        required("source_volume_id", &r.source_volume_id)?;
        for k in r.parameters.keys() {
            if !sidecar_parameter(k) && !SNAPSHOT_PARAMETERS.contains(&k.as_str()) {
                return Err(invalid(format!(
                    "unknown parameter {k:?}: a snapshot takes replicate and replicateKeyFile"
                )));
            }
        }
        let d = self.clone();
        let g = self.lock.clone().lock_owned().await;
        let snap = locked(g, move || {
            let sid = id_of("s", &r.name);
            if let Some(s) = d.snapshot(&sid)? {
                if s.volume != r.source_volume_id {
                    return Err(Status::already_exists(format!(
                        "snapshot {:?} exists, of volume {}",
                        r.name, s.volume
                    )));
                }
                return Ok(s);
            }
            let v = d.volume(&r.source_volume_id)?.ok_or_else(|| {
                not_found(format!("volume {}: no such volume", r.source_volume_id))
            })?;
            let store = d.volume_dir(&v.id).join("store");
            let store_s = path_str(&store)?;
            // Taken already by a call cut short before its record was written.
            if !d.has_snapshot(store_s, &sid)? {
                d.snapfs(&["snapshot", "create", "--", store_s, &sid])?;
            }
            if let Some(dest) = r.parameters.get("replicate") {
                let mut args = vec!["sync", "--snapshot", &sid];
                if let Some(k) = r.parameters.get("replicateKeyFile") {
                    args.extend(["--key-file", k.as_str()]);
                }
                args.extend(["--", store_s, dest.as_str()]);
                if let Err(e) = d.snapfs(&args) {
                    // Not a snapshot of Kubernetes' until it is replicated: none left
                    // behind, holding space nobody can free.
                    let _ = d.snapfs(&["snapshot", "delete", "--", store_s, &sid]);
                    return Err(e);
                }
            }
            let (secs, nanos) = now();
            let rec = SnapshotRec {
                name: r.name.clone(),
                id: sid.clone(),
                volume: v.id.clone(),
                volume_created: v.created,
                size: v.capacity,
                created_secs: secs,
                created_nanos: nanos,
            };
            write_json(&d.snapshots().join(format!("{sid}.json")), &rec)
                .map_err(|e| internal(e.to_string()))?;
            tracing::info!(snapshot = %sid, volume = %v.id, name = %rec.name, "snapshot created");
            Ok(rec)
        })
        .await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshot_msg(&snap)),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Res<DeleteSnapshotResponse> {
        let sid = req.into_inner().snapshot_id;
        required("snapshot_id", &sid)?;
        let d = self.clone();
        let g = self.lock.clone().lock_owned().await;
        locked(g, move || {
            let Some(s) = d.snapshot(&sid)? else {
                return Ok(());
            };
            let store = d.snapshot_store(&s)?;
            let store_s = path_str(&store)?;
            if store.exists() && d.has_snapshot(store_s, &sid)? {
                d.snapfs(&["snapshot", "delete", "--", store_s, &sid])?;
            }
            let json = d.snapshots().join(format!("{sid}.json"));
            std::fs::remove_file(&json)
                .map_err(|e| internal(format!("{}: {e}", json.display())))?;
            sync_dir(&d.snapshots()).map_err(|e| internal(e.to_string()))?;
            // A deleted volume's store goes with its last snapshot.
            d.sweep_retained()?;
            tracing::info!(snapshot = %sid, "snapshot deleted");
            Ok(())
        })
        .await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Res<ListSnapshotsResponse> {
        let r = req.into_inner();
        let all: Vec<SnapshotRec> = self
            .all_snapshots()?
            .into_iter()
            .filter(|s| r.snapshot_id.is_empty() || s.id == r.snapshot_id)
            .filter(|s| r.source_volume_id.is_empty() || s.volume == r.source_volume_id)
            .collect();
        let (snaps, next_token) = page(&all, &r.starting_token, r.max_entries)?;
        Ok(Response::new(ListSnapshotsResponse {
            entries: snaps
                .iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(snapshot_msg(s)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Res<ControllerExpandVolumeResponse> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        let Some(range) = r.capacity_range else {
            return Err(invalid("capacity_range: none given"));
        };
        let d = self.clone();
        let g = self.lock.clone().lock_owned().await;
        let (capacity, on_node) = locked(g, move || {
            // Volumes live on their nodes, and one resizer serves the cluster: a
            // volume of another node's driver grows when that node expands it.
            if valid_id("v", &r.volume_id) && d.volume(&r.volume_id)?.is_none() {
                return Ok((capacity_for(Some(&range), 0)?, true));
            }
            d.expand(&r.volume_id, &range).map(|c| (c, false))
        })
        .await?;
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: capacity as i64,
            node_expansion_required: on_node,
        }))
    }

    async fn controller_get_volume(
        &self,
        _: Request<ControllerGetVolumeRequest>,
    ) -> Res<ControllerGetVolumeResponse> {
        Err(Status::unimplemented("not offered (GET_VOLUME)"))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Res<ControllerModifyVolumeResponse> {
        Err(Status::unimplemented("not offered (MODIFY_VOLUME)"))
    }
}

impl Driver {
    /// Grows volume `id` to what `range` asks (never shrinks it): its record, its
    /// store's snapfs.toml, and its daemon when mounted. Blocking.
    pub(super) fn expand(&self, id: &str, range: &CapacityRange) -> Result<u64, Status> {
        let mut v = self
            .volume(id)?
            .ok_or_else(|| not_found(format!("volume {id}: no such volume")))?;
        let want = capacity_for(Some(range), 0)?;
        if want <= v.capacity {
            return Ok(v.capacity);
        }
        let store = self.volume_dir(id).join("store");
        self.snapfs(&["resize", "--", path_str(&store)?, &want.to_string()])?;
        v.capacity = want;
        write_json(&self.volume_dir(id).join("volume.json"), &v)
            .map_err(|e| internal(e.to_string()))?;
        tracing::info!(volume = %id, capacity = want, "volume expanded");
        Ok(want)
    }
}

fn snapshot_msg(s: &SnapshotRec) -> Snapshot {
    Snapshot {
        size_bytes: s.size as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.volume.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_secs,
            nanos: s.created_nanos,
        }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// `statvfs` of `path`.
pub(super) fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: all-zero is a valid statvfs; the kernel fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}
