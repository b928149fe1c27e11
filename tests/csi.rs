//! The CSI driver (`snapfs csi`), driven through its gRPC services as Kubernetes'
//! sidecars drive it: volumes published as real mounts, written through them,
//! snapshotted, cloned, expanded, filled, replicated to a second driver and deleted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::*;

/// The driver is built in: without the CSI definition at build time `snapfs csi`
/// only says it is missing, and everything below would be skipped.
#[test]
fn the_driver_is_built_in() {
    let out = Command::new(SNAPFS)
        .args(["csi", "--endpoint", "bogus://x", "--node-id", "n", "--root"])
        .arg(test_dir().path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("built without"), "{err}");
    assert!(err.contains("want unix:///PATH or tcp://IP:PORT"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[cfg(snapfs_csi)]
mod driver {
    use super::*;
    use snapfs::csi::proto::*;
    use tonic::transport::Channel;

    /// A `snapfs csi` child serving on loopback TCP, killed when dropped.
    pub struct Driver {
        child: Child,
        pub root: PathBuf,
        pub rt: tokio::runtime::Runtime,
        pub ctl: controller_client::ControllerClient<Channel>,
        pub node: node_client::NodeClient<Channel>,
        /// Targets published, unmounted when dropped (after a failure).
        targets: Vec<PathBuf>,
    }

    impl Driver {
        pub fn start(root: &Path, node_id: &str) -> Driver {
            let port = free_port();
            let child = Command::new(SNAPFS)
                .args(["csi", "--endpoint", &format!("tcp://127.0.0.1:{port}")])
                .args(["--node-id", node_id, "--root"])
                .arg(root)
                .spawn()
                .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let url = format!("http://127.0.0.1:{port}");
            let t0 = std::time::Instant::now();
            let channel = loop {
                match rt.block_on(Channel::from_shared(url.clone()).unwrap().connect()) {
                    Ok(c) => break c,
                    Err(e) => {
                        assert!(t0.elapsed().as_secs() < 20, "driver did not start: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            };
            Driver {
                child,
                root: root.to_path_buf(),
                ctl: controller_client::ControllerClient::new(channel.clone()),
                node: node_client::NodeClient::new(channel),
                targets: Vec::new(),
                rt,
            }
        }

        pub fn create_volume(
            &mut self,
            name: &str,
            bytes: i64,
            params: &[(&str, &str)],
            source: Option<volume_content_source::Type>,
        ) -> Result<Volume, tonic::Status> {
            let req = CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![mount_cap()],
                parameters: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
                ..Default::default()
            };
            let r = self.rt.block_on(self.ctl.create_volume(req))?;
            Ok(r.into_inner().volume.unwrap())
        }

        pub fn publish(&mut self, vid: &str, target: &Path, readonly: bool) {
            let req = NodePublishVolumeRequest {
                volume_id: vid.into(),
                target_path: target.to_str().unwrap().into(),
                volume_capability: Some(mount_cap()),
                readonly,
                ..Default::default()
            };
            self.rt
                .block_on(self.node.node_publish_volume(req))
                .unwrap_or_else(|e| panic!("publish {vid}: {e}"));
            self.targets.push(target.to_path_buf());
        }

        pub fn unpublish(&mut self, vid: &str, target: &Path) {
            let req = NodeUnpublishVolumeRequest {
                volume_id: vid.into(),
                target_path: target.to_str().unwrap().into(),
            };
            self.rt
                .block_on(self.node.node_unpublish_volume(req))
                .unwrap_or_else(|e| panic!("unpublish {vid}: {e}"));
        }

        pub fn snapshot(&mut self, name: &str, vid: &str, params: &[(&str, &str)]) -> Snapshot {
            let req = CreateSnapshotRequest {
                source_volume_id: vid.into(),
                name: name.into(),
                parameters: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            };
            self.rt
                .block_on(self.ctl.create_snapshot(req))
                .unwrap_or_else(|e| panic!("snapshot {name}: {e}"))
                .into_inner()
                .snapshot
                .unwrap()
        }

        pub fn delete_volume(&mut self, vid: &str) {
            let req = DeleteVolumeRequest {
                volume_id: vid.into(),
                ..Default::default()
            };
            self.rt
                .block_on(self.ctl.delete_volume(req))
                .unwrap_or_else(|e| panic!("delete {vid}: {e}"));
        }

        pub fn delete_snapshot(&mut self, sid: &str) {
            let req = DeleteSnapshotRequest {
                snapshot_id: sid.into(),
                ..Default::default()
            };
            self.rt
                .block_on(self.ctl.delete_snapshot(req))
                .unwrap_or_else(|e| panic!("delete {sid}: {e}"));
        }

        pub fn expand(&mut self, vid: &str, bytes: i64) -> i64 {
            let req = ControllerExpandVolumeRequest {
                volume_id: vid.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            };
            let r = self
                .rt
                .block_on(self.ctl.controller_expand_volume(req))
                .unwrap_or_else(|e| panic!("expand {vid}: {e}"))
                .into_inner();
            assert!(!r.node_expansion_required);
            r.capacity_bytes
        }

        pub fn stats(&mut self, vid: &str, path: &Path) -> Vec<VolumeUsage> {
            let req = NodeGetVolumeStatsRequest {
                volume_id: vid.into(),
                volume_path: path.to_str().unwrap().into(),
                ..Default::default()
            };
            self.rt
                .block_on(self.node.node_get_volume_stats(req))
                .unwrap_or_else(|e| panic!("stats {vid}: {e}"))
                .into_inner()
                .usage
        }
    }

    impl Drop for Driver {
        fn drop(&mut self) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
            // Mounts a failed test left behind, so its directory can go.
            if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
                let root = self.root.to_string_lossy().into_owned();
                let mut mps: Vec<String> = info
                    .lines()
                    .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
                    .filter(|mp| {
                        mp.starts_with(&root)
                            || self.targets.iter().any(|t| t.to_str() == Some(mp.as_str()))
                    })
                    .collect();
                mps.reverse();
                for mp in mps {
                    let _ = Command::new("umount").arg("-l").arg(&mp).status();
                }
            }
        }
    }

    pub fn mount_cap() -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume::default(),
            )),
        }
    }

    pub use super::nix_statvfs as space;

    /// Every path under `dir`, recursively.
    pub fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                out.push(e.path());
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.extend(entries(&e.path()));
                }
            }
        }
        out
    }
}

#[cfg(snapfs_csi)]
use driver::*;

#[cfg(snapfs_csi)]
#[test]
fn a_volume_is_published_written_snapshotted_cloned_expanded_filled_and_deleted() {
    use snapfs::csi::proto::volume_content_source::{SnapshotSource, Type, VolumeSource};
    use snapfs::csi::proto::{CapacityRange, VolumeContentSource};
    const MIB: i64 = 1 << 20;
    let dir = test_dir();
    let root = dir.path().join("root");
    let mut d = Driver::start(&root, "node-a");

    // A volume of 64 MiB, published, written through the mount.
    let vol = d.create_volume("pvc-a", 64 * MIB, &[], None).unwrap();
    assert_eq!(vol.capacity_bytes, 64 * MIB);
    let target = dir.path().join("pods/a/volume");
    d.publish(&vol.volume_id, &target, false);
    populate(&target, 5);
    let written = tree_digest(&target);
    assert!(written.len() > 5, "{written:?}");
    let (total, _) = space(&target);
    assert_eq!(total, 64 << 20, "statfs shows the volume's size");
    let usage = d.stats(&vol.volume_id, &target);
    assert_eq!(usage[0].total, 64 * MIB);
    assert!(
        usage[0].used > 0 && usage[0].used < usage[0].total,
        "{usage:?}"
    );

    // A snapshot, then changes after it.
    let snap = d.snapshot("snap-a", &vol.volume_id, &[]);
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, vol.volume_id);
    churn(&target, 6);
    let changed = tree_digest(&target);
    assert_ne!(changed, written);

    // A volume from the snapshot holds what the snapshot held; one cloned from the
    // volume holds what the volume holds now.
    let from_snap = d
        .create_volume(
            "pvc-from-snap",
            64 * MIB,
            &[],
            Some(Type::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        )
        .unwrap();
    let t2 = dir.path().join("pods/b/volume");
    d.publish(&from_snap.volume_id, &t2, false);
    assert_eq!(tree_digest(&t2), written, "the volume from the snapshot");
    let cloned = d
        .create_volume(
            "pvc-clone",
            64 * MIB,
            &[],
            Some(Type::Volume(VolumeSource {
                volume_id: vol.volume_id.clone(),
            })),
        )
        .unwrap();
    let t3 = dir.path().join("pods/c/volume");
    d.publish(&cloned.volume_id, &t3, true);
    assert_eq!(tree_digest(&t3), changed, "the clone");
    let err = std::fs::write(t3.join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "published read-only");
    // No size asked: the snapshot's; a limit below it is out of range.
    let unsized_vol = d
        .create_volume(
            "pvc-unsized",
            0,
            &[],
            Some(Type::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        )
        .unwrap();
    assert_eq!(unsized_vol.capacity_bytes, 64 * MIB);
    let req = snapfs::csi::proto::CreateVolumeRequest {
        name: "pvc-small".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 0,
            limit_bytes: 32 * MIB,
        }),
        volume_capabilities: vec![mount_cap()],
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(Type::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        }),
        ..Default::default()
    };
    let err = d.rt.block_on(d.ctl.create_volume(req)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");

    // Expanded while published: statfs shows the new size at once.
    assert_eq!(d.expand(&vol.volume_id, 128 * MIB), 128 * MIB);
    assert_eq!(space(&target).0, 128 << 20);
    assert_eq!(d.stats(&vol.volume_id, &target)[0].total, 128 * MIB);

    // Filled past its size with data that does not dedup: ENOSPC, and nothing
    // already written is lost.
    let before = tree_digest(&target);
    let chunk = |i: u64| pattern(1000 + i, 1 << 20);
    let fill = target.join("fill");
    let mut f = std::fs::File::create(&fill).unwrap();
    let mut stored = 0u64;
    let err = loop {
        use std::io::Write;
        match f
            .write_all(&chunk(stored >> 20))
            .and_then(|()| f.sync_data())
        {
            Ok(()) => stored += 1 << 20,
            Err(e) => break e,
        }
        assert!(
            stored < 256 << 20,
            "wrote {stored} bytes into a 128 MiB volume"
        );
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(
        (64 << 20..=128 << 20).contains(&stored),
        "{stored} bytes went in before ENOSPC"
    );
    let left = space(&target).1;
    assert!(
        left < 2 << 20,
        "statfs shows {left} bytes free: less than the write that failed"
    );
    drop(f);
    // What was synced before the error reads back whole.
    let back = std::fs::read(&fill).unwrap();
    assert!(back.len() as u64 >= stored);
    for (i, c) in back[..stored as usize].chunks(1 << 20).enumerate() {
        assert!(
            c == &chunk(i as u64)[..],
            "MiB {i} of the fill reads back otherwise"
        );
    }
    std::fs::remove_file(&fill).unwrap();
    assert_eq!(tree_digest(&target), before, "the rest is as it was");
    // The space of the removed file comes back (given back by the daemon's next
    // durable tick).
    let t0 = std::time::Instant::now();
    while space(&target).1 < (stored / 2) {
        assert!(
            t0.elapsed().as_secs() < 30,
            "{} bytes free 30 s after removing {stored}",
            space(&target).1
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Space comes back: a write fits again.
    std::fs::write(target.join("after"), chunk(9999)).unwrap();
    std::fs::File::open(target.join("after"))
        .unwrap()
        .sync_all()
        .unwrap();

    // Everything deleted: the snapshot outlives its volume until it goes too.
    for (v, t) in [(&vol, &target), (&from_snap, &t2), (&cloned, &t3)] {
        d.unpublish(&v.volume_id, t);
        assert!(!t.exists(), "{} left behind", t.display());
    }
    d.delete_volume(&vol.volume_id);
    let listed =
        d.rt.block_on(
            d.ctl
                .list_snapshots(snapfs::csi::proto::ListSnapshotsRequest::default()),
        )
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1, "the snapshot outlives its volume");
    // ... and still makes volumes.
    let late = d
        .create_volume(
            "pvc-late",
            64 * MIB,
            &[],
            Some(Type::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        )
        .unwrap();
    let t4 = dir.path().join("pods/d/volume");
    d.publish(&late.volume_id, &t4, false);
    assert_eq!(tree_digest(&t4), written);
    d.unpublish(&late.volume_id, &t4);
    for v in [&from_snap, &cloned, &late, &unsized_vol] {
        d.delete_volume(&v.volume_id);
    }
    d.delete_snapshot(&snap.snapshot_id);
    let left: Vec<PathBuf> = entries(&root).into_iter().filter(|p| p.is_file()).collect();
    assert!(left.is_empty(), "left under the root: {left:?}");
    for sub in ["volumes", "snapshots", "retained"] {
        assert_eq!(
            std::fs::read_dir(root.join(sub)).unwrap().count(),
            0,
            "{sub} not empty"
        );
    }
}

#[cfg(snapfs_csi)]
#[test]
fn a_volume_replicates_to_another_cluster_and_is_restored_there() {
    const MIB: i64 = 1 << 20;
    let dir = test_dir();
    // The second cluster's node: a `snapfs serve` receiving into its store.
    let key = dir.path().join("key");
    std::fs::write(&key, "a secret the two clusters share").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let replica = dir.path().join("replica");
    let serve = Server::start(&replica, &key);
    let dest = format!("tcp://{}", serve.addr);

    let mut a = Driver::start(&dir.path().join("root-a"), "node-a");
    // The first cluster: a StorageClass that snapshots every second and replicates
    // each scheduled snapshot there.
    let params = [
        ("snapshotEvery", "1s"),
        ("replicate", dest.as_str()),
        ("replicateKeyFile", key.to_str().unwrap()),
        ("csi.storage.k8s.io/pvc/name", "data"),
    ];
    let vol = a
        .create_volume("pvc-data", 64 * MIB, &params, None)
        .unwrap();
    let target = dir.path().join("pods/a/volume");
    a.publish(&vol.volume_id, &target, false);
    populate(&target, 21);
    let snap1 = tree_digest(&target);
    // A VolumeSnapshotClass that replicates on creation.
    let class = [
        ("replicate", dest.as_str()),
        ("replicateKeyFile", key.to_str().unwrap()),
    ];
    a.snapshot("snap-1", &vol.volume_id, &class);
    churn(&target, 22);
    let snap2 = tree_digest(&target);
    // A plain snapshot after the last write; the schedule carries it (or a newer
    // one, the same) over: wait until the replica has this volume's newest.
    let snap2_id = a.snapshot("snap-2", &vol.volume_id, &[]).snapshot_id;
    let store_a = dir
        .path()
        .join(format!("root-a/volumes/{}/store", vol.volume_id));
    let t0 = std::time::Instant::now();
    loop {
        let st = snapfs_ok(&["status", store_a.to_str().unwrap()]);
        let line = st
            .lines()
            .find(|l| l.starts_with("replicate to:"))
            .unwrap_or("");
        if line.contains("(0 newer here)") && !line.contains("has nothing") {
            break;
        }
        assert!(t0.elapsed().as_secs() < 60, "not replicated in 60 s: {st}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    a.unpublish(&vol.volume_id, &target);
    // The first cluster goes away.
    drop(a);
    drop(serve);

    // The second cluster restores it as a volume of its own.
    let mut b = Driver::start(&dir.path().join("root-b"), "node-b");
    let restored = b
        .create_volume(
            "pvc-moved",
            64 * MIB,
            &[("restoreFrom", replica.to_str().unwrap())],
            None,
        )
        .unwrap();
    let t = dir.path().join("pods/b/volume");
    b.publish(&restored.volume_id, &t, false);
    assert_eq!(
        tree_digest(&t),
        snap2,
        "the live tree is the newest snapshot"
    );
    // Every replicated snapshot came along.
    let snaps = t.join(".snapshots");
    let names: Vec<String> = std::fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.len() >= 2, "{names:?}");
    // snap-2 was taken without the class's replicate: the StorageClass's schedule
    // carried it.
    assert!(names.contains(&snap2_id), "{names:?}");
    let digests: Vec<_> = names.iter().map(|n| tree_digest(&snaps.join(n))).collect();
    assert!(digests.contains(&snap1) && digests.contains(&snap2));
    // It is writable, and its size is the one asked for.
    std::fs::write(t.join("new"), b"written on the second cluster").unwrap();
    assert_eq!(space(&t).0, 64 << 20);
    // A bad source is one clear error, and leaves nothing behind.
    let err = b
        .create_volume(
            "pvc-bad",
            64 * MIB,
            &[("restoreFrom", dir.path().join("nothing").to_str().unwrap())],
            None,
        )
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "{err}");
    assert!(err.message().contains("restore"), "{err}");
    let err = b
        .create_volume("pvc-bad2", 64 * MIB, &[("colour", "blue")], None)
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    b.unpublish(&restored.volume_id, &t);
    b.delete_volume(&restored.volume_id);
    assert_eq!(
        std::fs::read_dir(dir.path().join("root-b/volumes"))
            .unwrap()
            .count(),
        0
    );
}

/// `size=` and `snapfs resize` on a volume mounted by hand, as the driver uses them.
#[test]
fn a_size_shows_in_statfs_stops_writes_and_grows_while_mounted() {
    let space = nix_statvfs;
    let mut m = Mount::with_options(&["size=16M"]);
    assert_eq!(space(&m.mnt).0, 16 << 20);
    // Unique data until the size stops it.
    let mut stored = 0u64;
    let err = loop {
        let p = m.path(&format!("f{stored}"));
        match std::fs::write(&p, pattern(500 + stored, 1 << 20))
            .and_then(|()| std::fs::File::open(&p)?.sync_all())
        {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 64, "64 MiB went into a 16 MiB volume");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!((8..=16).contains(&stored), "{stored} MiB before ENOSPC");
    for i in 0..stored {
        assert!(std::fs::read(m.path(&format!("f{i}"))).unwrap() == pattern(500 + i, 1 << 20));
    }
    // Grown while mounted: room at once, and kept for the next mount.
    let out = snapfs_ok(&["resize", m.mnt.to_str().unwrap(), "64M"]);
    assert!(out.contains("67108864 bytes in all"), "{out}");
    assert_eq!(space(&m.mnt).0, 64 << 20);
    std::fs::write(m.path("more"), pattern(999, 4 << 20)).unwrap();
    std::fs::File::open(m.path("more"))
        .unwrap()
        .sync_all()
        .unwrap();
    m.unmount();
    let toml = std::fs::read_to_string(m.store.join("snapfs.toml")).unwrap();
    assert!(toml.contains("size = \"67108864\""), "{toml}");
    m.mount(&[]);
    assert_eq!(space(&m.mnt).0, 64 << 20);
    assert!(std::fs::read(m.path("more")).unwrap() == pattern(999, 4 << 20));
    // Bad sizes: one line, non-zero.
    for bad in ["abc", "1k", "5.5", "99999999999T"] {
        let out = snapfs(&["resize", m.mnt.to_str().unwrap(), bad]);
        assert!(!out.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{bad}: {err}");
        assert!(err.contains("size"), "{err}");
    }
    let out = Command::new(SNAPFS)
        .args(["mount", "-o", "size=12x"])
        .arg(test_dir().path().join("s"))
        .arg(test_dir().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("size \"12x\""));
    // No size of its own: the disk's again.
    snapfs_ok(&["resize", m.mnt.to_str().unwrap(), "none"]);
    assert!(space(&m.mnt).0 > 64 << 20);
}

/// statfs of `p`: (total bytes, available bytes).
pub fn nix_statvfs(p: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: all-zero is a valid statvfs; the kernel fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path, valid out pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    (st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)
}

#[cfg(snapfs_csi)]
#[test]
fn retries_strangers_and_a_dead_daemon_are_answered_as_kubernetes_expects() {
    use snapfs::csi::proto::*;
    use tonic::Code;
    const MIB: i64 = 1 << 20;
    let dir = test_dir();
    let root = dir.path().join("root");
    let mut d = Driver::start(&root, "node-a");
    // A retried CreateVolume answers the same volume; one asking for another size or
    // other parameters is ALREADY_EXISTS.
    let v = d.create_volume("pvc-r", 32 * MIB, &[], None).unwrap();
    let again = d.create_volume("pvc-r", 32 * MIB, &[], None).unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    let err = d.create_volume("pvc-r", 64 * MIB, &[], None).unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    let err = d
        .create_volume("pvc-r", 32 * MIB, &[("keep", "last:3")], None)
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    // Parameter values that could pass as options or cut a line are refused.
    for bad in ["-o", "a#b", "x,y", "a\nb"] {
        let err = d
            .create_volume("pvc-bad", 32 * MIB, &[("replicate", bad)], None)
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err}");
    }
    // blockSize: a volume made empty has it; a size snapfs cannot make is refused.
    for bad in ["3K", "2M", "big"] {
        let err = d
            .create_volume("pvc-bad", 32 * MIB, &[("blockSize", bad)], None)
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err}");
        assert!(err.message().contains("blockSize"), "{err}");
    }
    let err = d
        .create_volume(
            "pvc-bad",
            32 * MIB,
            &[("blockSize", "1M"), ("restoreFrom", "/nowhere")],
            None,
        )
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("has its source's"), "{err}");
    let big = d
        .create_volume("pvc-1m", 32 * MIB, &[("blockSize", "1M")], None)
        .unwrap();
    let status = snapfs_ok(&[
        "status",
        root.join(format!("volumes/{}/store", big.volume_id))
            .to_str()
            .unwrap(),
    ]);
    assert!(status.contains("block size:       1048576\n"), "{status}");
    d.delete_volume(&big.volume_id);
    // Strangers: ids this driver never made, relative paths.
    let target = dir.path().join("pods/r/volume");
    let unpublish = |d: &mut Driver, vid: &str, t: &str| {
        let req = NodeUnpublishVolumeRequest {
            volume_id: vid.into(),
            target_path: t.into(),
        };
        d.rt.block_on(d.node.node_unpublish_volume(req)).map(|_| ())
    };
    let err = unpublish(&mut d, "/", "/mnt").unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let err = unpublish(&mut d, &v.volume_id, "relative/path").unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // Unpublishing what was never published is OK (Kubernetes' cleanup does it).
    unpublish(&mut d, &v.volume_id, target.to_str().unwrap()).unwrap();
    // Publishing twice at one target is one mount.
    d.publish(&v.volume_id, &target, false);
    d.publish(&v.volume_id, &target, false);
    let on_target = |p: &Path| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == p.to_str())
            .count()
    };
    assert_eq!(on_target(&target), 1);
    let kept_text = b"written before the daemon died";
    std::fs::write(target.join("kept"), kept_text).unwrap();
    std::fs::File::open(target.join("kept"))
        .unwrap()
        .sync_all()
        .unwrap();
    // The volume's daemon dies (as when its container restarts): its mounts are
    // left answering ENOTCONN (or, over io_uring, ECANCELED or ECONNABORTED for a
    // request that meets the ring while the kernel tears it down). Unpublish still
    // works, and a new publish serves the volume again with what was synced.
    let store = root.join(format!("volumes/{}/store", v.volume_id));
    let kill_daemon = || {
        let pid: i32 = std::fs::read_to_string(store.join("snapfs.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: killing the daemon this test's driver started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        wait_exit(pid);
    };
    kill_daemon();
    let err = std::fs::read_dir(&target).unwrap_err();
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
        ),
        "{err}"
    );
    d.unpublish(&v.volume_id, &target);
    assert!(!target.exists());
    d.publish(&v.volume_id, &target, false);
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), kept_text);
    // Killed again, then published at a second target with the first still there.
    kill_daemon();
    let t2 = dir.path().join("pods/r2/volume");
    d.publish(&v.volume_id, &t2, false);
    assert_eq!(std::fs::read(t2.join("kept")).unwrap(), kept_text);
    d.unpublish(&v.volume_id, &target);
    d.unpublish(&v.volume_id, &t2);
    // Expansion: on the node, and for a volume another node holds.
    let req = NodeExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        volume_path: target.to_str().unwrap().into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 48 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let got = d.rt.block_on(d.node.node_expand_volume(req)).unwrap();
    assert_eq!(got.into_inner().capacity_bytes, 48 * MIB);
    let toml = std::fs::read_to_string(store.join("snapfs.toml")).unwrap();
    assert!(toml.contains(&format!("size = \"{}\"", 48 * MIB)), "{toml}");
    let req = ControllerExpandVolumeRequest {
        volume_id: "v-0123456789abcdef0123".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 48 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let got = d.rt.block_on(d.ctl.controller_expand_volume(req)).unwrap();
    assert!(got.into_inner().node_expansion_required);
    // A deletion cut short once the store was moved aside for a snapshot: the retry
    // completes it, and the snapshot still makes volumes.
    let snap = d.snapshot("snap-r", &v.volume_id, &[]);
    let rec =
        std::fs::read_to_string(root.join(format!("volumes/{}/volume.json", v.volume_id))).unwrap();
    let rec: serde_json::Value = serde_json::from_str(&rec).unwrap();
    let kept = root.join(format!("retained/{}-{}", v.volume_id, rec["created"]));
    std::fs::rename(&store, &kept).unwrap();
    d.delete_volume(&v.volume_id);
    assert!(kept.exists());
    let late = d
        .create_volume(
            "pvc-late",
            32 * MIB,
            &[],
            Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        )
        .unwrap();
    d.publish(&late.volume_id, &target, false);
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), kept_text);
    d.unpublish(&late.volume_id, &target);
    d.delete_volume(&late.volume_id);
    d.delete_snapshot(&snap.snapshot_id);
    assert!(
        !kept.exists(),
        "the retained store goes with its last snapshot"
    );
    assert_eq!(std::fs::read_dir(root.join("volumes")).unwrap().count(), 0);
}
