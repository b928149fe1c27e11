//! The CSI node service: mounting volumes where pods see them.
//!
//! A published volume's store is mounted once, by its daemon, at the volume's own
//! `mnt` directory (`nosuid,nodev`); each target path is a bind mount of that mount
//! with its own flags (read-only when asked), which is what `snapfs mount` of a
//! mounted store makes. The daemon's mount goes when the last target does.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::controller::statvfs;
use super::*;

/// Mount flags a target takes (per mount point; the rest are the volume's). A
/// volume is always `nosuid,nodev`: those are not undone.
const TARGET_FLAGS: &[&str] = &["ro", "rw", "nosuid", "nodev", "noexec", "exec"];

/// Unmounts `p` (not following a symlink there); with `detach`, lazily (a mount
/// whose daemon is gone).
fn umount(p: &Path, detach: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = libc::UMOUNT_NOFOLLOW | if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The mount on top at `p`, as (filesystem type, source).
fn mount_at(p: &Path) -> Option<(String, String)> {
    crate::daemon::mount_table()
        .into_iter()
        .rfind(|m| m.mp == p)
        .map(|m| (m.fstype, m.source))
}

/// The mount points of every FUSE mount whose source is `store` (a daemon's mount and
/// its bind mounts, live or left by a daemon that died).
fn mounts_of_store(store: &Path) -> Vec<PathBuf> {
    crate::daemon::mount_table()
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse") && Path::new(&m.source) == store)
        .map(|m| m.mp)
        .collect()
}

impl Driver {
    /// Whether `target` is a mount of volume `id`'s store (by its source: also one
    /// left by a daemon that died).
    fn shows(&self, id: &str, target: &Path) -> bool {
        let store = self.volume_dir(id).join("store");
        mount_at(target)
            .is_some_and(|(fstype, src)| fstype.starts_with("fuse") && Path::new(&src) == store)
    }

    /// Publishes volume `id` at `target`. Blocking; under the node lock.
    fn publish(&self, id: &str, target: &Path, flags: &[String]) -> Result<(), Status> {
        let dir = self.volume_dir(id);
        let (store, mnt) = (dir.join("store"), dir.join("mnt"));
        // Checked again under the lock: a volume deleted meanwhile is not mounted
        // (which would make an empty store in its place).
        if self.volume(id)?.is_none() || !crate::store::Store::exists(&store) {
            return Err(not_found(format!("volume {id}: no such volume")));
        }
        // A daemon that died (killed, or its container restarted) leaves its mounts
        // behind, answering ENOTCONN: they go, and the volume is mounted again.
        if !daemon_alive(&store) {
            for m in mounts_of_store(&store).iter().rev() {
                tracing::warn!(volume = %id, mount = %m.display(), "unmounting what a dead daemon left");
                let _ = umount(m, true);
            }
        }
        if !crate::daemon::is_mounted(&mnt) {
            std::fs::create_dir_all(&mnt).map_err(|e| internal(e.to_string()))?;
            self.snapfs(&[
                "mount",
                "-o",
                "nosuid,nodev",
                "--",
                path_str(&store)?,
                path_str(&mnt)?,
            ])?;
        }
        if crate::daemon::is_mounted(target) {
            if self.shows(id, target) {
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{}: something else is mounted there",
                target.display()
            )));
        }
        std::fs::create_dir_all(target)
            .map_err(|e| internal(format!("{}: {e}", target.display())))?;
        let opts = if flags.is_empty() {
            "rw".to_string()
        } else {
            flags.join(",")
        };
        self.snapfs(&[
            "mount",
            "-o",
            &opts,
            "--",
            path_str(&store)?,
            path_str(target)?,
        ])?;
        Ok(())
    }

    /// Unpublishes `target`; the volume's own mount goes with its last target.
    /// Blocking; under the node lock.
    fn unpublish(&self, id: &str, target: &Path) -> Result<(), Status> {
        let store = self.volume_dir(id).join("store");
        let alive = daemon_alive(&store);
        if crate::daemon::is_mounted(target) {
            if !self.shows(id, target) {
                return Err(Status::failed_precondition(format!(
                    "{}: not a mount of volume {id}",
                    target.display()
                )));
            }
            umount(target, !alive).map_err(|e| internal(format!("{}: {e}", target.display())))?;
        }
        match std::fs::remove_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal(format!("{}: {e}", target.display()))),
        }
        let mnt = self.volume_dir(id).join("mnt");
        let left = mounts_of_store(&store);
        if crate::daemon::is_mounted(&mnt) && left.iter().all(|m| *m == mnt) {
            umount(&mnt, !alive).map_err(|e| internal(format!("{}: {e}", mnt.display())))?;
            if !daemon_gone(&store) {
                tracing::warn!(volume = %id, "its daemon is slow to close the store");
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl node_server::Node for Arc<Driver> {
    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Res<NodeStageVolumeResponse> {
        Err(Status::unimplemented("not offered (STAGE_UNSTAGE_VOLUME)"))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Res<NodeUnstageVolumeResponse> {
        Err(Status::unimplemented("not offered (STAGE_UNSTAGE_VOLUME)"))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Res<NodePublishVolumeResponse> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        required("target_path", &r.target_path)?;
        let Some(cap) = r.volume_capability else {
            return Err(invalid("volume_capability: none given"));
        };
        check_capabilities(std::slice::from_ref(&cap)).map_err(invalid)?;
        let mut flags = Vec::new();
        if let Some(volume_capability::AccessType::Mount(m)) = &cap.access_type {
            for f in m.mount_flags.iter().flat_map(|f| f.split(',')) {
                if !TARGET_FLAGS.contains(&f) {
                    return Err(invalid(format!(
                        "mount flag {f:?}: a snapfs volume's target takes ro, nosuid, nodev and noexec (and their opposites)"
                    )));
                }
                flags.push(f.to_string());
            }
        }
        if r.readonly {
            flags.push("ro".to_string());
        }
        if !Path::new(&r.target_path).is_absolute() {
            return Err(invalid(format!(
                "target_path {:?}: not absolute",
                r.target_path
            )));
        }
        if self.volume(&r.volume_id)?.is_none() {
            return Err(not_found(format!("volume {}: no such volume", r.volume_id)));
        }
        let d = self.clone();
        let g = self.node_lock.clone().lock_owned().await;
        locked(g, move || {
            d.publish(&r.volume_id, Path::new(&r.target_path), &flags)
        })
        .await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Res<NodeUnpublishVolumeResponse> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        required("target_path", &r.target_path)?;
        if !Path::new(&r.target_path).is_absolute() {
            return Err(invalid(format!(
                "target_path {:?}: not absolute",
                r.target_path
            )));
        }
        // Not one of ours: nothing of it is mounted by this driver.
        if !valid_id("v", &r.volume_id) {
            return Err(not_found(format!("volume {}: no such volume", r.volume_id)));
        }
        let d = self.clone();
        let g = self.node_lock.clone().lock_owned().await;
        locked(g, move || {
            d.unpublish(&r.volume_id, Path::new(&r.target_path))
        })
        .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Res<NodeGetVolumeStatsResponse> {
        use volume_usage::Unit;
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        if self.volume(&r.volume_id)?.is_none() {
            return Err(not_found(format!("volume {}: no such volume", r.volume_id)));
        }
        let path = PathBuf::from(&r.volume_path);
        if !self.shows(&r.volume_id, &path) {
            return Err(not_found(format!(
                "{}: volume {} is not published there",
                r.volume_path, r.volume_id
            )));
        }
        // statfs reaches the volume's daemon: a busy one must not hold the driver's
        // workers.
        let stat = tokio::task::spawn_blocking(move || statvfs(&path));
        let st = tokio::time::timeout(std::time::Duration::from_secs(10), stat)
            .await
            .map_err(|_| {
                Status::unavailable(format!("{}: statfs did not answer in 10 s", r.volume_path))
            })?
            .map_err(|e| internal(e.to_string()))?
            .map_err(|e| internal(format!("{}: {e}", r.volume_path)))?;
        let unit = st.f_frsize;
        let n = |x: u64| x.min(i64::MAX as u64) as i64;
        let usage = |available: u64, total: u64, unit_kind: Unit| VolumeUsage {
            available: n(available),
            total: n(total),
            used: n(total.saturating_sub(available)),
            unit: unit_kind as i32,
        };
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage: vec![
                VolumeUsage {
                    used: n(st.f_blocks.saturating_sub(st.f_bfree).saturating_mul(unit)),
                    ..usage(
                        st.f_bavail.saturating_mul(unit),
                        st.f_blocks.saturating_mul(unit),
                        Unit::Bytes,
                    )
                },
                usage(st.f_favail, st.f_files, Unit::Inodes),
            ],
            volume_condition: None,
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Res<NodeExpandVolumeResponse> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        let d = self.clone();
        let g = self.lock.clone().lock_owned().await;
        let capacity = locked(g, move || {
            let v = d
                .volume(&r.volume_id)?
                .ok_or_else(|| not_found(format!("volume {}: no such volume", r.volume_id)))?;
            match &r.capacity_range {
                Some(range) => d.expand(&r.volume_id, range),
                None => Ok(v.capacity),
            }
        })
        .await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: capacity as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Res<NodeGetCapabilitiesResponse> {
        use node_service_capability::{Rpc, Type, rpc::Type as R};
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: [R::GetVolumeStats, R::ExpandVolume]
                .into_iter()
                .map(|c| NodeServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: c as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Res<NodeGetInfoResponse> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(self.topology()),
        }))
    }
}
