//! Snapshots in S3-compatible object storage, against a real Garage server the test
//! starts on loopback (a single-node layout, a key and a bucket made with Garage's
//! own CLI). The Garage binary: `SNAPFS_GARAGE`, or where `scripts/test-all.sh`
//! caches it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::*;

/// A Garage server for one test, killed when dropped.
struct Garage {
    _dir: tempfile::TempDir,
    server: Child,
    bin: PathBuf,
    config: PathBuf,
    endpoint: String,
    admin: String,
    key_id: String,
    secret: String,
}

fn garage_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SNAPFS_GARAGE") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = Path::new(&home).join(".cache/snapfs/garage-2.3.0/bin/garage");
    assert!(
        p.is_file(),
        "no Garage binary at {} (scripts/test-all.sh builds it; or set SNAPFS_GARAGE)",
        p.display()
    );
    p
}

impl Garage {
    /// A server up, with a key and a bucket. A server that exits while starting (a
    /// port taken by some other process meanwhile) is started again on new ports.
    fn start() -> Garage {
        for _ in 0..2 {
            match Garage::try_start() {
                Ok(g) => return g,
                Err(log) => eprintln!("garage exited while starting; again on new ports:\n{log}"),
            }
        }
        Garage::try_start().unwrap_or_else(|log| panic!("garage exited while starting: {log}"))
    }

    /// Err(its log) when the server exited before it was up.
    fn try_start() -> Result<Garage, String> {
        let dir = test_dir();
        let bin = garage_bin();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.path().join("garage.toml");
        let secret: String = pattern(7, 32).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\n[admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let server = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("garage.log")).unwrap())
            .spawn()
            .unwrap();
        let mut g = Garage {
            _dir: dir,
            server,
            bin,
            config,
            endpoint: format!("http://127.0.0.1:{s3}"),
            admin: format!("127.0.0.1:{admin}"),
            key_id: String::new(),
            secret: String::new(),
        };
        // Up once its CLI reaches it.
        let t0 = std::time::Instant::now();
        let id = loop {
            let out = g.cli(&["node", "id", "-q"]);
            if out.status.success() {
                let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
                break s.split('@').next().unwrap().to_string();
            }
            if let Some(log) = g.exited() {
                return Err(log);
            }
            assert!(t0.elapsed().as_secs() < 30, "garage did not start");
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        // `node id` reads the node's key from disk; the layout needs the server up,
        // which may take a moment longer.
        loop {
            let out = g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
            if out.status.success() {
                break;
            }
            if let Some(log) = g.exited() {
                return Err(log);
            }
            assert!(
                t0.elapsed().as_secs() < 30,
                "garage layout assign: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        g.ok(&["layout", "apply", "--version", "1"]);
        let out = g.ok(&["key", "create", "snapfs-test"]);
        for line in out.lines() {
            if let Some(v) = line.trim().strip_prefix("Key ID:") {
                g.key_id = v.trim().to_string();
            }
            if let Some(v) = line.trim().strip_prefix("Secret key:") {
                g.secret = v.trim().to_string();
            }
        }
        assert!(!g.key_id.is_empty() && !g.secret.is_empty(), "{out}");
        g.ok(&["bucket", "create", "snapfs"]);
        g.ok(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            "snapfs",
            "--key",
            "snapfs-test",
        ]);
        Ok(g)
    }

    /// The server's exit status and log, once it has exited.
    fn exited(&mut self) -> Option<String> {
        let st = self.server.try_wait().unwrap()?;
        let log = std::fs::read_to_string(self._dir.path().join("garage.log")).unwrap_or_default();
        Some(format!("{st}: {log}"))
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "garage {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `snapfs ARGS` with this server's endpoint and credentials.
    fn snapfs(&self, args: &[&str]) -> Output {
        self.snapfs_with(args, &self.key_id, &self.secret)
    }

    /// `snapfs` with this server's credentials, reaching it at `endpoint` (its own,
    /// or a relay's).
    fn command(&self, endpoint: &str) -> Command {
        let mut c = Command::new(SNAPFS);
        c.env("AWS_ENDPOINT_URL", endpoint)
            .env("HOME", self.home())
            .env("AWS_REGION", "garage")
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret);
        c
    }

    fn snapfs_with(&self, args: &[&str], key_id: &str, secret: &str) -> Output {
        Command::new(SNAPFS)
            .args(args)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("HOME", self.home())
            .env("AWS_REGION", "garage")
            .env("AWS_ACCESS_KEY_ID", key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .output()
            .unwrap()
    }

    fn sync_ok(&self, src: &Path, url: &str) -> serde_json::Value {
        let out = self.snapfs(&["sync", src.to_str().unwrap(), url, "--json"]);
        assert!(
            out.status.success(),
            "sync: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Garage {
    /// A handle on `url` in this server, as snapfs opens one.
    fn bucket(&self, url: &str) -> snapfs::sync::s3::Bucket {
        let env = |k: &str| match k {
            "AWS_ENDPOINT_URL" => Some(self.endpoint.clone()),
            "AWS_REGION" => Some("garage".to_string()),
            "AWS_ACCESS_KEY_ID" => Some(self.key_id.clone()),
            "AWS_SECRET_ACCESS_KEY" => Some(self.secret.clone()),
            "HOME" => Some(self.home().display().to_string()),
            _ => None,
        };
        snapfs::sync::s3::Bucket::open_with(url, env).unwrap()
    }

    /// The home of the snapfs commands run against this server: what they keep of
    /// its buckets (pack indexes, roots' generations) is kept there, not in the
    /// home of whoever runs the tests.
    fn home(&self) -> PathBuf {
        let home = self._dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        // Beyond other users' reach whatever the umask, as snapfs wants it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        home
    }

    /// `snapfs restore URL ...` into a new store in `dir` (which must succeed),
    /// mounted.
    fn restore_ok(&self, url: &str, dir: &Path, name: &str, extra: &[&str]) -> Mount {
        let store = dir.join(name);
        let mut args = vec!["restore", url, store.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.snapfs(&args);
        assert!(
            out.status.success(),
            "restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount::at(store, dir.join(format!("{name}-mnt")), &[])
    }

    /// A volume of one file, `name` holding `bytes`, whose snapshot `s1` is synced
    /// to `url`: the volume, and the bucket.
    fn one_file_synced(
        &self,
        url: &str,
        name: &str,
        bytes: Vec<u8>,
    ) -> (Mount, snapfs::sync::s3::Bucket) {
        let m = Mount::new();
        std::fs::write(m.path(name), bytes).unwrap();
        snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s1"]);
        self.sync_ok(&m.mnt, url);
        (m, self.bucket(url))
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

#[test]
fn snapshots_go_to_a_bucket_incrementally_and_come_back_identical() {
    let g = Garage::start();
    let url = "s3://snapfs/volumes/one";
    let mut a = Mount::new();
    let a_mnt = a.mnt.to_str().unwrap().to_string();
    populate(&a.mnt, 61);
    std::fs::write(a.path("big"), pattern(1, 8 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s1"]);
    let full = g.sync_ok(&a.mnt, url);
    assert_eq!(full["snapshots"], serde_json::json!(["s1"]), "{full}");
    let sent = full["payload_bytes"].as_u64().unwrap();
    assert!(sent >= 8 << 20, "{full}");
    // An incremental carries the change only; data the bucket has (a copy of the
    // big file) travels not at all.
    churn(&a.mnt, 62);
    std::fs::write(a.path("changed"), pattern(2, 1 << 20)).unwrap();
    std::fs::copy(a.path("big"), a.path("big-copy")).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s2"]);
    let inc = g.sync_ok(&a.mnt, url);
    assert_eq!(inc["snapshots"], serde_json::json!(["s2"]), "{inc}");
    let inc_bytes = inc["payload_bytes"].as_u64().unwrap();
    eprintln!("full: {full}\nincremental: {inc}");
    assert!((1 << 20..(1 << 20) + 600_000).contains(&inc_bytes), "{inc}");
    let out = g.snapfs(&["snapshot", "list", url, "--json"]);
    assert_ok(&out);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "s1", "{list}");
    assert_eq!(list[1]["name"], "s2", "{list}");
    assert_eq!(list[1]["base"], "s1", "{list}");
    // Manifests are stored compressed (zstd).
    let b = g.bucket(url);
    let manifests = b.list("manifests").unwrap();
    assert_eq!(manifests.len(), 2);
    for k in manifests {
        let v = b.get_object(&k).unwrap().unwrap();
        assert!(v.starts_with(b"snapfsZ1"), "{k}");
    }
    // Nothing new: nothing sent.
    let again = g.sync_ok(&a.mnt, url);
    assert_eq!(again["snapshots"], serde_json::json!([]), "{again}");
    // The source's base for the bucket is held like any destination's.
    let list = snapfs_ok(&["snapshot", "list", &a_mnt]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("s2") && l.contains("sync-")),
        "{list}"
    );
    let want = snapshot_trees(&a);
    let live = tree_digest(&a.path(".snapshots/s2"));
    a.unmount();
    std::fs::remove_dir_all(&a.store).unwrap();

    // The source is gone: the bucket alone rebuilds it.
    let dir = test_dir();
    let m = g.restore_ok(url, dir.path(), "n", &[]);
    assert_eq!(snapshot_trees(&m), want);
    assert_eq!(tree_digest(&m.mnt), live);
    let n = m.store.clone();
    drop(m);
    // One snapshot alone, whole: the older, then the newer (every manifest up to it).
    for (i, name) in ["s1", "s2"].iter().enumerate() {
        let om = g.restore_ok(url, dir.path(), &format!("only-{name}"), &["--only", name]);
        assert_eq!(snapshot_trees(&om), [want[i].clone()]);
        assert_eq!(tree_digest(&om.mnt), want[i].1);
    }
    let out = snapfs(&["fsck", n.to_str().unwrap(), "--read-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn wrong_credentials_and_a_missing_bucket_say_so_in_one_line() {
    let g = Garage::start();
    let m = Mount::new();
    std::fs::write(m.path("f"), b"data").unwrap();
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s1"]);
    let src = m.mnt.to_str().unwrap();
    let out = g.snapfs_with(&["sync", src, "s3://snapfs/x"], &g.key_id, "not-the-secret");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("wrong secret: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("s3://snapfs/x") && err.contains("access denied"),
        "{err}"
    );
    let out = g.snapfs(&["sync", src, "s3://no-such-bucket/x"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("missing bucket: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("no-such-bucket") && err.contains("no such bucket"),
        "{err}"
    );
    // Restoring from a prefix that holds no volume.
    let dir = test_dir();
    let out = g.snapfs(&[
        "restore",
        "s3://snapfs/empty",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no snapfs volume"));
}

#[test]
fn a_sync_to_a_bucket_cut_short_is_resumed_without_resending_its_packs() {
    let g = Garage::start();
    let url = "s3://snapfs/cut";
    let m = Mount::new();
    for i in 0..6u64 {
        std::fs::write(m.path(&format!("f{i}")), pattern(100 + i, 16 << 20)).unwrap();
    }
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "big"]);
    // Cut once the bucket holds at least one pack and its index.
    let mut child = g
        .command(&g.endpoint)
        .args(["sync", m.mnt.to_str().unwrap(), url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let b = g.bucket(url);
    let indexed = || b.list("packs").unwrap().iter().any(|k| k.ends_with(".idx"));
    while !indexed() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sync ended before the cut"
        );
        assert!(t0.elapsed().as_secs() < 60, "no pack reached the server");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // No snapshot is there yet, but the root is, before any pack: it says the
    // layout the packs are in.
    let root = root_json(&b);
    assert_eq!(root["format"], 2, "{root}");
    assert_eq!(root["snapshots"], serde_json::json!([]), "{root}");
    let early = b.get_object("snapfs-root.json").unwrap().unwrap();
    let out = g.snapfs(&["snapshot", "list", "--json", url]);
    assert_ok(&out);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([]),
        "a snapshot without its barrier"
    );
    let dir = test_dir();
    let out = g.snapfs(&["restore", url, dir.path().join("early").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("holds no snapshot to restore"), "{msg}");
    assert_eq!(msg.trim().lines().count(), 1, "{msg}");
    assert!(
        !dir.path().join("early").exists(),
        "a store made of nothing"
    );
    // The next run sends what no pack holds.
    let rest = g.sync_ok(&m.mnt, url);
    assert_eq!(rest["snapshots"], serde_json::json!(["big"]), "{rest}");
    let sent = rest["payload_bytes"].as_u64().unwrap();
    eprintln!("after the cut: {sent} of {} bytes sent", 96 << 20);
    assert!(sent <= (96 << 20) - (32 << 20), "{rest}");
    let r = g.restore_ok(url, dir.path(), "n", &[]);
    assert_eq!(tree_digest(&r.mnt), tree_digest(&m.path(".snapshots/big")));
    // A root that names no snapshot holds nothing of its volume's: another volume
    // synced there takes it (one that names a snapshot is refused, as before).
    let other_url = "s3://snapfs/cut-other";
    let other = g.bucket(other_url);
    other.put_object("snapfs-root.json", early.clone()).unwrap();
    let m2 = Mount::new();
    std::fs::write(m2.path("g"), pattern(7, 1 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", m2.mnt.to_str().unwrap(), "s"]);
    // Not where a manifest says a snapshot once landed (an old root put back over
    // another volume's snapshots): that is refused, in one line.
    other.put_object("manifests/x", b"x".to_vec()).unwrap();
    let out = g.snapfs(&["sync", m2.mnt.to_str().unwrap(), other_url]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("names no snapshot, but holds manifests"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    other.delete("manifests/x").unwrap();
    let took = g.sync_ok(&m2.mnt, other_url);
    assert_eq!(took["snapshots"], serde_json::json!(["s"]), "{took}");
    // Taken as a new bucket volume.
    let early: serde_json::Value = serde_json::from_slice(&early).unwrap();
    assert_ne!(root_json(&other)["volume"], early["volume"]);
    let out = g.snapfs(&["sync", m.mnt.to_str().unwrap(), other_url]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("holds snapshots of another volume"), "{e}");
}

#[test]
fn snapshots_deleted_from_a_bucket_go_and_gc_frees_what_only_they_held() {
    let g = Garage::start();
    let url = "s3://snapfs/del";
    let mut a = Mount::new();
    let a_mnt = a.mnt.to_str().unwrap().to_string();
    let sync = |m: &Mount| g.sync_ok(&m.mnt, url);
    let list = |all: bool| -> Vec<String> {
        let mut args = vec!["snapshot", "list", url, "--json"];
        if all {
            args.push("--all");
        }
        names_listed(&g.snapfs(&args))
    };
    populate(&a.mnt, 71);
    std::fs::write(a.path("only-in-s1"), pattern(1, 8 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s1"]);
    sync(&a);
    std::fs::remove_file(a.path("only-in-s1")).unwrap();
    churn(&a.mnt, 72);
    std::fs::write(a.path("f2"), pattern(2, 2 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s2"]);
    sync(&a);
    std::fs::write(a.path("f3"), pattern(3, 100_000)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s3"]);
    sync(&a);
    let gc = |dry: bool| {
        let mut args = vec!["gc", url];
        if dry {
            args.push("--dry-run");
        }
        let out = g.snapfs(&args);
        assert_ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Nothing to collect while every snapshot is there.
    assert!(
        gc(true).starts_with("would delete 0 packs (0 bytes)"),
        "{}",
        gc(true)
    );
    // s1 goes: its changes are merged into s2's manifest, and the pack only it
    // needed is collected.
    let out = g.snapfs(&["snapshot", "delete", url, "s1"]);
    assert_ok(&out);
    assert_eq!(list(false), ["s2", "s3"]);
    let report = gc(false);
    // The pack s1 was sent in held some of s2's data too: it is rewritten with
    // that only.
    let freed: u64 = report
        .split(" bytes freed")
        .next()
        .and_then(|r| r.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!(freed >= 8 << 20, "{report}");
    let again = gc(true);
    assert!(
        again.starts_with("would delete 0 packs") && again.contains("would repack 0 packs"),
        "{again}"
    );
    // The newest, deleted, is hidden and still the base of the next sync, which
    // is then an incremental; after it lands the deleted one is gone.
    let out = g.snapfs(&["snapshot", "delete", url, "s3"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hidden"));
    assert_eq!(list(false), ["s2"]);
    assert_eq!(list(true), ["s2", "s3"]);
    std::fs::write(a.path("f4"), pattern(4, 100_000)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s4"]);
    let inc = sync(&a);
    assert_eq!(inc["snapshots"], serde_json::json!(["s4"]), "{inc}");
    assert!(inc["payload_bytes"].as_u64().unwrap() < 400_000, "{inc}");
    assert_eq!(list(true), ["s2", "s4"]);
    // The bucket checks clean, and what is left restores identical.
    for args in [vec!["fsck", url], vec!["fsck", url, "--read-data"]] {
        let out = g.snapfs(&args);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s2 = tree_digest(&a.path(".snapshots/s2"));
    let s4 = tree_digest(&a.path(".snapshots/s4"));
    a.unmount();
    let dir = test_dir();
    let m = g.restore_ok(url, dir.path(), "n", &[]);
    assert_eq!(tree_digest(&m.path(".snapshots/s2")), s2);
    assert_eq!(tree_digest(&m.path(".snapshots/s4")), s4);
    assert_eq!(tree_digest(&m.mnt), s4);
}

#[test]
fn a_pack_deleted_behind_snapfs_is_reported_and_sent_again_by_the_next_sync() {
    let g = Garage::start();
    let url = "s3://snapfs/lost";
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap().to_string();
    std::fs::write(m.path("a"), pattern(1, 4 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", &mnt, "s1"]);
    g.sync_ok(&m.mnt, url);
    // The one pack goes, behind snapfs's back.
    let b = g.bucket(url);
    let packs = keys_ending(&b, ".pack");
    assert_eq!(packs.len(), 1, "{packs:?}");
    let idx = keys_ending(&b, ".idx");
    let idx_bytes = b.get_object(&idx[0]).unwrap().unwrap();
    b.delete(&packs[0]).unwrap();
    // fsck names it and the snapshot that needs it.
    let out = g.snapfs(&["fsck", url]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&packs[0]) && text.contains("snapshot s1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("hurt: s1: /a bytes 0..") && l.ends_with("in no pack")),
        "{text}"
    );
    // gc deletes nothing of it (the index stays to repair from) and says so.
    let out = g.snapfs(&["gc", url]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("1 packs whose extents snapshots need are gone"),
        "{e}"
    );
    assert_eq!(keys_ending(&b, ".idx").len(), 1);
    // The next sync with something to send re-sends what the bucket lost.
    std::fs::write(m.path("b"), b"a little more").unwrap();
    snapfs_ok(&["snapshot", "create", &mnt, "s2"]);
    let sum = g.sync_ok(&m.mnt, url);
    assert!(sum["payload_bytes"].as_u64().unwrap() >= 4 << 20, "{sum}");
    let out = g.snapfs(&["fsck", url, "--read-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_ok(&g.snapfs(&["gc", url]));
    // The lost pack's index back (as one left while an extent it lists was still
    // to send): what it lists is in another pack now, and gc says nothing is lost.
    b.put_object(&idx[0], idx_bytes).unwrap();
    let out = g.snapfs(&["gc", url]);
    assert_ok(&out);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = test_dir();
    let r = g.restore_ok(url, dir.path(), "n", &[]);
    assert_eq!(tree_digest(&r.mnt), tree_digest(&m.path(".snapshots/s2")));
}

#[test]
fn scheduled_replication_to_a_bucket_keeps_it_within_a_snapshot() {
    let g = Garage::start();
    let url = "s3://snapfs/scheduled";
    let dir = test_dir();
    let (store, mnt) = (dir.path().join("store"), dir.path().join("mnt"));
    std::fs::create_dir(&mnt).unwrap();
    let out = g.snapfs(&[
        "mount",
        store.to_str().unwrap(),
        mnt.to_str().unwrap(),
        "-o",
        &format!("snapshot_every=1s,keep=last:3,replicate={url}"),
    ]);
    assert_ok(&out);
    for i in 0..5u64 {
        std::fs::write(mnt.join(format!("f{i}")), pattern(i, 200_000)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(700));
    }
    // The bucket catches up with the source's newest snapshot.
    let newest = || {
        names_listed(&snapfs(&[
            "snapshot",
            "list",
            mnt.to_str().unwrap(),
            "--json",
        ]))
        .pop()
        .unwrap()
    };
    let t0 = std::time::Instant::now();
    let (here, there) = loop {
        let out = g.snapfs(&["snapshot", "list", url, "--json"]);
        // (No root before the first snapshot lands.)
        let there: Vec<String> = if out.status.success() {
            names_listed(&out)
        } else {
            Vec::new()
        };
        let here = newest();
        if there.last() == Some(&here) || t0.elapsed().as_secs() > 30 {
            break (here, there);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(there.last(), Some(&here), "{there:?}");
    assert!(there.len() >= 3, "{there:?}");
    let pid: i32 = std::fs::read_to_string(store.join("snapfs.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    wait_exit(pid);
}

#[test]
fn a_bucket_keeps_dedup_and_an_incremental_uploads_what_changed() {
    // SNAPFS_TEST_S3_MIB: the unique data, stored four times over (64 MiB).
    let mib: u64 = std::env::var("SNAPFS_TEST_S3_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let g = Garage::start();
    let url = "s3://snapfs/dedup";
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap().to_string();
    let unique = pattern(5, (mib << 20) as usize);
    for copy in 0..4 {
        std::fs::write(m.path(&format!("copy{copy}")), &unique).unwrap();
    }
    snapfs_ok(&["snapshot", "create", &mnt, "s1"]);
    g.sync_ok(&m.mnt, url);
    let b = g.bucket(url);
    let full = b.bytes().unwrap();
    eprintln!("{} MiB stored four times: {full} bytes in the bucket", mib);
    assert!(full <= (mib << 20) * 105 / 100, "{full}");
    // 10 MiB changed in one copy: what the bucket gains is those bytes and metadata.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("copy2"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(6, 10 << 20), 4 << 20).unwrap();
    drop(f);
    snapfs_ok(&["snapshot", "create", &mnt, "s2"]);
    g.sync_ok(&m.mnt, url);
    let grew = b.bytes().unwrap() - full;
    eprintln!("10 MiB changed: the bucket grew by {grew} bytes");
    assert!(grew <= (10 << 20) * 105 / 100 + (256 << 10), "{grew}");
}

#[test]
fn one_writer_at_a_time_holds_the_bucket_and_a_dead_ones_lock_expires() {
    let g = Garage::start();
    let url = "s3://snapfs/locked";
    let (m, b) = g.one_file_synced(url, "f", pattern(1, 100_000));
    // Released after the sync.
    assert!(
        !b.list("")
            .unwrap()
            .iter()
            .any(|k| k == snapfs::sync::s3::LOCK)
    );
    let now = snapfs::store::schema::Ts::now().sec;
    let lock = |owner: &str, expires: i64, host: &str, pid: u32| {
        let rec = snapfs::sync::s3::LockRec {
            owner: owner.into(),
            expires,
            host: host.into(),
            pid,
            what: "sync".into(),
        };
        b.put_object(snapfs::sync::s3::LOCK, serde_json::to_vec(&rec).unwrap())
            .unwrap();
    };
    // Another writer's live lock: every writer is refused, naming it; readers go on.
    lock("backup-host pid 42 (sync)", now + 600, "backup-host", 42);
    std::fs::write(m.path("g"), b"more").unwrap();
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s2"]);
    for args in [
        vec!["sync", m.mnt.to_str().unwrap(), url],
        vec!["gc", url],
        vec!["snapshot", "delete", url, "s1"],
    ] {
        let out = g.snapfs(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("locked by backup-host pid 42"),
            "{args:?}: {err}"
        );
    }
    let out = g.snapfs(&["snapshot", "list", url]);
    assert!(out.status.success());
    // One of a process of this machine that is gone is taken over at once.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let host = snapfs::sync::s3::host_name();
    lock("a killed sync", now + 600, &host, dead);
    let sum = g.sync_ok(&m.mnt, url);
    assert_eq!(sum["snapshots"], serde_json::json!(["s2"]), "{sum}");
    lock("a killed sync", now + 600, &host, dead);
    let out = g.snapfs(&["gc", url]);
    assert_ok(&out);
    assert!(
        !b.list("")
            .unwrap()
            .iter()
            .any(|k| k == snapfs::sync::s3::LOCK)
    );
}

#[test]
fn a_lock_whose_time_is_up_is_taken_over_once_its_holder_stops_renewing_it() {
    let g = Garage::start();
    let url = "s3://snapfs/skewed";
    let (m, b) = g.one_file_synced(url, "f", pattern(1, 100_000));
    // A writer on another host, whose clock is 20 minutes behind this one's, has
    // just written its lock: by this machine's clock its time ran out 10 minutes
    // ago. It is held all the same (a gc taking it over would delete the packs that
    // writer is uploading).
    let rec = snapfs::sync::s3::LockRec {
        owner: "behind-host pid 42 (sync)".into(),
        expires: snapfs::store::schema::Ts::now().sec - 600,
        host: "behind-host".into(),
        pid: 42,
        what: "sync".into(),
    };
    b.put_object(snapfs::sync::s3::LOCK, serde_json::to_vec(&rec).unwrap())
        .unwrap();
    std::fs::write(m.path("g"), b"more").unwrap();
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s2"]);
    for args in [vec!["sync", m.mnt.to_str().unwrap(), url], vec!["gc", url]] {
        let out = g.snapfs(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("locked by behind-host pid 42") && e.contains("still renews it"),
            "{args:?}: {e}"
        );
    }
    // Readers see a gc's lock the same way.
    let gc = snapfs::sync::s3::LockRec {
        what: "gc".into(),
        ..rec.clone()
    };
    b.put_object(snapfs::sync::s3::LOCK, serde_json::to_vec(&gc).unwrap())
        .unwrap();
    let dir = test_dir();
    let n = dir.path().join("n");
    let out = g.snapfs(&["restore", url, n.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("being collected by behind-host"));
    // A reader's mark the same: it keeps gc away.
    b.put_object(snapfs::sync::s3::LOCK, serde_json::to_vec(&rec).unwrap())
        .unwrap();
    let mark = snapfs::sync::s3::LockRec {
        what: "restore".into(),
        ..rec.clone()
    };
    b.put_object("locks/behind.json", serde_json::to_vec(&mark).unwrap())
        .unwrap();
    // Once they have not been renewed for three minutes (by the server's clock),
    // their holders are taken for gone.
    std::thread::sleep(std::time::Duration::from_secs(3 * 60 + 2));
    let sum = g.sync_ok(&m.mnt, url);
    assert_eq!(sum["snapshots"], serde_json::json!(["s2"]), "{sum}");
    assert_eq!(b.list("locks").unwrap(), ["locks/behind.json"]);
    assert_ok(&g.snapfs(&["gc", url]));
    assert!(b.list("locks").unwrap().is_empty());
}

#[test]
fn a_damaged_byte_in_a_pack_is_found_and_never_restored() {
    let g = Garage::start();
    let url = "s3://snapfs/damaged";
    let (_m, b) = g.one_file_synced(url, "a", pattern(1, 2 << 20));
    let pack = keys_ending(&b, ".pack").remove(0);
    let mut data = b.get_object(&pack).unwrap().unwrap();
    data[1 << 20] ^= 0x40;
    b.put_object(&pack, data).unwrap();
    // A listing check cannot see it; rereading the data does, and names it.
    let out = g.snapfs(&["fsck", url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = fsck_finds_a_bad_extent_in(&g, url, &pack);
    // ...with the file and bytes it reaches.
    assert!(
        text.lines().any(|l| l.starts_with("hurt: s1: /a bytes ")
            && l.ends_with("is damaged")
            && l.contains(&pack)),
        "{text}"
    );
    // A restore stops at the bad extent, with one line, and leaves no snapshot.
    let dir = test_dir();
    let n = dir.path().join("n");
    let out = g.snapfs(&["restore", url, n.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match its hash"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let out = snapfs(&["snapshot", "list", n.to_str().unwrap(), "--json"]);
    assert_eq!(names_listed(&out), Vec::<String>::new());
}

/// `fsck --read-data` of `url` fails (exit 1) naming an extent of `pack` whose
/// bytes do not match its hash; its report.
fn fsck_finds_a_bad_extent_in(g: &Garage, url: &str, pack: &str) -> String {
    let out = g.snapfs(&["fsck", url, "--read-data"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("does not match its hash") && text.contains(pack),
        "{text}"
    );
    text
}

/// The keys under `packs/` that end with `suffix` (".pack", ".idx").
fn keys_ending(b: &snapfs::sync::s3::Bucket, suffix: &str) -> Vec<String> {
    let mut keys = b.list("packs").unwrap();
    keys.retain(|k| k.ends_with(suffix));
    keys
}

/// The root object, as JSON.
fn root_json(b: &snapfs::sync::s3::Bucket) -> serde_json::Value {
    serde_json::from_slice(&b.get_object("snapfs-root.json").unwrap().unwrap()).unwrap()
}

/// Every object under a prefix, by name.
fn objects(b: &snapfs::sync::s3::Bucket) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["", "manifests", "packs"] {
        for k in b.list(dir).unwrap() {
            if out.iter().any(|(n, _)| n == &k) {
                continue;
            }
            let v = b.get_object(&k).unwrap().unwrap();
            out.push((k, v));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_encrypted_bucket_holds_no_name_content_or_hash_and_needs_its_key() {
    let g = Garage::start();
    let url = "s3://snapfs/sealed";
    let dir = test_dir();
    let key = dir.path().join("key");
    std::fs::write(&key, pattern(99, 32)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let k = key.to_str().unwrap();
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    let name = "confidential-name-7f3a";
    let marker = b"PLAINTEXT-MARKER-0123456789-".repeat(40_000);
    let tiny = b"a tiny secret, smaller than a block";
    std::fs::write(m.path(name), &marker).unwrap();
    std::fs::write(m.path("tiny"), tiny).unwrap();
    std::fs::write(m.path("other"), pattern(5, 3 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "secret-snap-one"]);
    let out = g.snapfs(&["sync", mnt, url, "--encrypt-key-file", k]);
    assert_ok(&out);
    std::fs::write(m.path("tiny"), b"changed").unwrap();
    std::fs::write(m.path("later"), pattern(6, 1 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "secret-snap-two"]);
    let out = g.snapfs(&["--encrypt-key-file", k, "sync", mnt, url]);
    assert_ok(&out);

    // Neither the name, nor the content, nor an extent's hash is in any object.
    let b = g.bucket(url);
    let objs = objects(&b);
    assert!(objs.iter().any(|(n, _)| n.ends_with(".pack")), "{objs:?}");
    let tiny_hash = *blake3::hash(tiny).as_bytes();
    let other_block = *blake3::hash(&pattern(5, 3 << 20)[..4096]).as_bytes();
    for (n, v) in &objs {
        assert!(!contains(v, name.as_bytes()), "the name is in {n}");
        assert!(!contains(v, &marker[..28]), "the content is in {n}");
        assert!(!contains(v, &pattern(5, 3 << 20)[..64]), "content in {n}");
        assert!(!contains(v, &tiny[..]), "the tiny file is in {n}");
        assert!(!contains(v, &tiny_hash), "an extent's hash is in {n}");
        assert!(!contains(v, &other_block), "an extent's hash is in {n}");
        assert!(!contains(v, b"secret-snap-"), "a snapshot's name is in {n}");
        if n.ends_with(".pack") {
            assert_eq!(v.len() % (256 << 10), 0, "{n} is not padded");
        }
    }

    // With its key, everything works; without, or with another, each says so.
    let list = g.snapfs(&["snapshot", "list", url, "--json", "--encrypt-key-file", k]);
    assert_eq!(
        names_listed(&list),
        vec!["secret-snap-one", "secret-snap-two"]
    );
    let out = g.snapfs(&["snapshot", "list", url]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("is encrypted") && e.contains("--encrypt-key-file"),
        "{e}"
    );
    let other = dir.path().join("other-key");
    std::fs::write(&other, pattern(98, 32)).unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = g.snapfs(&[
        "snapshot",
        "list",
        url,
        "--encrypt-key-file",
        other.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("does not open with this key"), "{e}");
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = g.snapfs(&[
        "snapshot",
        "list",
        url,
        "--encrypt-key-file",
        other.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("can be read by other users"), "{e}");
    // A key given to a bucket synced without one is refused, not mixed in.
    // (Stored uncompressed, so that the scan below can see the content as it is.)
    let plain = "s3://snapfs/plain";
    assert_ok(&g.snapfs(&["--compress", "off", "sync", mnt, plain]));
    let out = g.snapfs(&["sync", mnt, plain, "--encrypt-key-file", k]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("is not encrypted"), "{e}");
    // (The scan above finds them where they are: in a bucket without a key.)
    let open = objects(&g.bucket(plain));
    assert!(open.iter().any(|(_, v)| contains(v, name.as_bytes())));
    assert!(open.iter().any(|(_, v)| contains(v, &marker[..28])));
    assert!(open.iter().any(|(_, v)| contains(v, &tiny_hash)));

    let out = g.snapfs(&["fsck", url, "--read-data", "--encrypt-key-file", k]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let r = g.restore_ok(url, dir.path(), "r", &["--encrypt-key-file", k]);
    assert_eq!(
        tree_digest(&r.mnt),
        tree_digest(&m.path(".snapshots/secret-snap-two"))
    );
    assert_eq!(
        tree_digest(&r.path(".snapshots/secret-snap-one")),
        tree_digest(&m.path(".snapshots/secret-snap-one"))
    );
    drop(r);
    // So does a mount of it.
    let view = dir.path().join("view");
    let out = mount_bucket(&g, url, &view, &["--encrypt-key-file", k]);
    assert_ok(&out);
    assert_eq!(
        tree_digest(&view.join(".snapshots/secret-snap-one")),
        tree_digest(&m.path(".snapshots/secret-snap-one"))
    );
    unmount(&view);
    let out = mount_bucket(&g, url, &view, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is encrypted"));
    // Delete and gc work under the key too.
    let out = g.snapfs(&[
        "snapshot",
        "delete",
        url,
        "secret-snap-one",
        "--encrypt-key-file",
        k,
    ]);
    assert_ok(&out);
    let out = g.snapfs(&["gc", url, "--encrypt-key-file", k]);
    assert_ok(&out);

    // A flipped byte in a sealed extent does not open: named, never restored.
    let pack = keys_ending(&b, ".pack").remove(0);
    let mut data = b.get_object(&pack).unwrap().unwrap();
    data[100] ^= 0x01;
    b.put_object(&pack, data).unwrap();
    let out = g.snapfs(&["fsck", url, "--read-data", "--encrypt-key-file", k]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&pack), "{text}");
}

#[test]
fn an_aws_profile_in_the_shared_files_is_used_and_the_environment_wins() {
    let g = Garage::start();
    let url = "s3://snapfs/profile";
    let home = test_dir();
    let aws = home.path().join(".aws");
    std::fs::create_dir(&aws).unwrap();
    std::fs::write(
        aws.join("config"),
        format!(
            "[default]\nregion = nowhere\n\n[profile backup]\nregion = garage\nendpoint_url = {}\n\
             sts =\n  endpoint_url = http://127.0.0.1:1\n\n\
             [profile assumed]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = backup\n",
            g.endpoint
        ),
    )
    .unwrap();
    std::fs::write(
        aws.join("credentials"),
        format!(
            "[default]\naws_access_key_id = GKdefault\naws_secret_access_key = nothing\n\n\
             # the one the bucket takes (key names as the AWS CLI takes them, any case)\n\
             [backup]\nAWS_Access_Key_ID = {}\naws_secret_access_key = {}\n\n\
             [profile backup]\naws_access_key_id = not-this-one\n\n\
             [tokened]\naws_access_key_id = GKother\naws_secret_access_key = other\naws_session_token = bogus\n",
            g.key_id, g.secret
        ),
    )
    .unwrap();
    let m = Mount::new();
    std::fs::write(m.path("f"), pattern(3, 1 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s1"]);
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(SNAPFS);
        c.args(args).env("HOME", home.path());
        for v in [
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
        ] {
            c.env_remove(v);
        }
        c.envs(env.iter().copied());
        c.output().unwrap()
    };
    let out = run(
        &["sync", m.mnt.to_str().unwrap(), url],
        &[("AWS_PROFILE", "backup")],
    );
    assert_ok(&out);
    let out = run(
        &["snapshot", "list", url, "--json"],
        &[("AWS_PROFILE", "backup")],
    );
    assert_eq!(names_listed(&out), vec!["s1"]);
    // The environment's keys win over the profile's.
    let out = run(
        &["snapshot", "list", url],
        &[
            ("AWS_PROFILE", "backup"),
            ("AWS_SECRET_ACCESS_KEY", "wrong"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("access denied"), "{e}");
    // The default profile is read when none is named (and its keys are not these).
    let out = run(
        &["snapshot", "list", url],
        &[("AWS_ENDPOINT_URL", &g.endpoint), ("AWS_REGION", "garage")],
    );
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("access denied"), "{e}");
    // Keys are a set: the environment's (with no token), not mixed with a profile's.
    let out = run(
        &["snapshot", "list", url, "--json"],
        &[
            ("AWS_PROFILE", "tokened"),
            ("AWS_ENDPOINT_URL", &g.endpoint),
            ("AWS_REGION", "garage"),
            ("AWS_ACCESS_KEY_ID", &g.key_id),
            ("AWS_SECRET_ACCESS_KEY", &g.secret),
        ],
    );
    assert_eq!(names_listed(&out), vec!["s1"]);
    // A profile that gets its keys another way (a role, SSO, a process) is named.
    let out = run(&["snapshot", "list", url], &[("AWS_PROFILE", "assumed")]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("role_arn") && e.trim_end().lines().count() == 1,
        "{e}"
    );
    // A profile neither file has is named.
    let out = run(&["snapshot", "list", url], &[("AWS_PROFILE", "nosuch")]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("profile nosuch"), "{e}");
    // Files elsewhere, named by the variables.
    std::fs::rename(&aws, home.path().join("elsewhere")).unwrap();
    let cfg = home.path().join("elsewhere/config");
    let creds = home.path().join("elsewhere/credentials");
    let out = run(
        &["snapshot", "list", url, "--json"],
        &[
            ("AWS_PROFILE", "backup"),
            ("AWS_CONFIG_FILE", cfg.to_str().unwrap()),
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
        ],
    );
    assert_eq!(names_listed(&out), vec!["s1"]);
}

#[test]
fn readers_keep_gc_away_and_gc_keeps_readers_away() {
    let g = Garage::start();
    let url = "s3://snapfs/readers";
    let b = g.bucket(url);
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    for i in 0..12u64 {
        std::fs::write(m.path(&format!("f{i}")), pattern(200 + i, 16 << 20)).unwrap();
    }
    snapfs_ok(&["snapshot", "create", mnt, "s1"]);
    g.sync_ok(&m.mnt, url);
    std::fs::remove_file(m.path("f0")).unwrap();
    std::fs::write(m.path("g"), pattern(300, 1 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s2"]);
    g.sync_ok(&m.mnt, url);
    std::fs::write(m.path("h"), pattern(301, 1 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s3"]);
    g.sync_ok(&m.mnt, url);
    let manifests = || b.list("manifests").unwrap().len();
    assert_eq!(manifests(), 3);

    // A restore under way marks the bucket: gc is refused meanwhile, naming it.
    let dir = test_dir();
    let n = dir.path().join("n");
    let mut restore = g
        .command(&g.endpoint)
        .args(["restore", url, n.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while b.list("locks").unwrap().is_empty() {
        assert!(
            restore.try_wait().unwrap().is_none(),
            "restore ended unmarked"
        );
        assert!(t0.elapsed().as_secs() < 30);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = g.snapfs(&["gc", url]);
    let e = String::from_utf8_lossy(&out.stderr);
    // (Unless the restore was done first: then gc ran, which is what it may do.)
    let refused = out.status.code() == Some(2);
    if refused {
        assert!(
            e.contains("is being read by") && e.contains("(restore)"),
            "{e}"
        );
    }
    // A delete meanwhile leaves the manifests it replaced to gc.
    let out = g.snapfs(&["snapshot", "delete", url, "s2"]);
    assert_ok(&out);
    let status = restore.wait().unwrap();
    assert!(status.success(), "restore beside gc and delete failed");
    eprintln!("gc refused while the restore ran: {refused}");
    assert!(
        b.list("locks").unwrap().is_empty(),
        "the restore's mark stays"
    );
    let r = Mount::at(n, dir.path().join("n-mnt"), &[]);
    assert_eq!(tree_digest(&r.mnt), tree_digest(&m.path(".snapshots/s3")));
    drop(r);

    // A reader's mark (synthetic, live) keeps gc away; its manifests stay.
    let now = snapfs::store::schema::Ts::now().sec;
    let mark = |key: &str, expires: i64, pid: u32, host: &str| {
        let rec = snapfs::sync::s3::LockRec {
            owner: format!("{host} pid {pid} (restore) 1234"),
            expires,
            host: host.into(),
            pid,
            what: "restore".into(),
        };
        b.put_object(key, serde_json::to_vec(&rec).unwrap())
            .unwrap();
    };
    mark("locks/live.json", now + 600, 42, "reader-host");
    let out = g.snapfs(&["gc", url]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("being read by reader-host pid 42"), "{e}");
    // Expired (and not renewed for three minutes: see
    // a_lock_whose_time_is_up_is_taken_over_once_its_holder_stops_renewing_it), or
    // a gone process of this machine: cleared by gc, which then runs.
    b.delete("locks/live.json").unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let host = snapfs::sync::s3::host_name();
    mark("locks/dead.json", now + 600, dead, &host);
    let out = g.snapfs(&["gc", url]);
    assert_ok(&out);
    assert!(b.list("locks").unwrap().is_empty());
    assert_eq!(manifests(), 2, "gc leaves a replaced manifest");

    // gc's lock keeps readers away (a restore, fsck), naming it; a listing goes on.
    let rec = snapfs::sync::s3::LockRec {
        owner: "gc-host pid 7 (gc) abcd".into(),
        expires: now + 600,
        host: "gc-host".into(),
        pid: 7,
        what: "gc".into(),
    };
    b.put_object(snapfs::sync::s3::LOCK, serde_json::to_vec(&rec).unwrap())
        .unwrap();
    for args in [
        vec!["restore", url, dir.path().join("o").to_str().unwrap()],
        vec!["fsck", url],
    ] {
        let args: Vec<&str> = args.iter().map(|s| &**s).collect();
        let out = g.snapfs(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("is being collected by gc-host pid 7"),
            "{args:?}: {e}"
        );
    }
    assert!(
        b.list("locks").unwrap().is_empty(),
        "a refused reader's mark stays"
    );
    assert!(g.snapfs(&["snapshot", "list", url]).status.success());
    // A sync's lock does not keep readers away.
    let rec = snapfs::sync::s3::LockRec {
        what: "sync".into(),
        ..rec
    };
    b.put_object(snapfs::sync::s3::LOCK, serde_json::to_vec(&rec).unwrap())
        .unwrap();
    let out = g.snapfs(&["fsck", url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn diff_of_a_bucket_says_what_diff_of_the_store_says() {
    let g = Garage::start();
    let url = "s3://snapfs/diff";
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    populate(&m.mnt, 81);
    std::fs::create_dir_all(m.path("d/e")).unwrap();
    std::fs::write(m.path("d/e/keep"), b"same").unwrap();
    std::fs::write(m.path("d/grow"), pattern(1, 10_000)).unwrap();
    std::fs::write(m.path("gone"), b"bye").unwrap();
    std::fs::write(m.path("moved"), b"moving").unwrap();
    std::fs::write(m.path("modes"), b"x").unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s1"]);
    g.sync_ok(&m.mnt, url);
    churn(&m.mnt, 82);
    std::fs::remove_file(m.path("gone")).unwrap();
    std::fs::rename(m.path("moved"), m.path("d/e/moved-here")).unwrap();
    std::fs::write(m.path("new file"), b"hello").unwrap();
    std::os::unix::fs::symlink("d/e", m.path("link")).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s2"]);
    g.sync_ok(&m.mnt, url);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.path("d/grow"))
        .unwrap();
    std::io::Write::write_all(&mut f, &pattern(2, 70_000)).unwrap();
    drop(f);
    std::fs::hard_link(m.path("d/e/keep"), m.path("keep-too")).unwrap();
    std::fs::set_permissions(
        m.path("modes"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s3"]);
    g.sync_ok(&m.mnt, url);
    let both = |old: &str, new: &str, extra: &[&str]| {
        let mut args = vec!["diff", mnt, old, new];
        args.extend_from_slice(extra);
        let local = snapfs_ok(&args);
        args[1] = url;
        let out = g.snapfs(&args);
        assert_ok(&out);
        (local, String::from_utf8_lossy(&out.stdout).into_owned())
    };
    for (old, new) in [("s1", "s2"), ("s2", "s3"), ("s1", "s3")] {
        for extra in [&[][..], &["--blocks"], &["--json", "--blocks"]] {
            let (local, bucket) = both(old, new, extra);
            assert_eq!(bucket, local, "diff {old} {new} {extra:?}");
            assert!(
                local.matches("\"/").count() + local.matches("\t/").count() >= 3,
                "{local}"
            );
        }
    }
    let (_, text) = both("s1", "s3", &[]);
    for line in [
        "-\t/gone",
        "R\t/moved\t->\t/d/e/moved-here",
        "+\t/new file",
        "M\t/d/grow",
        "M\t/modes",
        "+\t/keep-too",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    // Once s2 is deleted (merged into s3), s1 to s3 reads the same.
    let (_, before) = both("s1", "s3", &["--json", "--blocks"]);
    let out = g.snapfs(&["snapshot", "delete", url, "s2"]);
    assert!(out.status.success());
    let out = g.snapfs(&["diff", url, "s1", "s3", "--json", "--blocks"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), before);
    // Bad names and order: one line, exit 2.
    for (old, new, says) in [
        ("s1", "nope", "has no snapshot named nope"),
        ("s3", "s1", "is not older than"),
        ("s2", "s3", "has no snapshot named s2"),
    ] {
        let out = g.snapfs(&["diff", url, old, new]);
        assert_eq!(out.status.code(), Some(2));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(says) && e.trim_end().lines().count() == 1, "{e}");
    }
}

#[test]
fn prune_of_a_bucket_deletes_what_the_policy_does_not_keep() {
    let g = Garage::start();
    let url = "s3://snapfs/prune";
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    for i in 1..=4u64 {
        std::fs::write(m.path(&format!("f{i}")), pattern(400 + i, 2 << 20)).unwrap();
        snapfs_ok(&[
            "snapshot",
            "create",
            mnt,
            &format!("auto-20261204-00000{i}"),
        ]);
    }
    snapfs_ok(&["snapshot", "create", mnt, "manual"]);
    g.sync_ok(&m.mnt, url);
    let list = || names_listed(&g.snapfs(&["snapshot", "list", url, "--json"]));
    let out = g.snapfs(&["snapshot", "prune", url, "--keep", "last:2", "--dry-run"]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("would prune auto-20261204-000001")
            && text.contains("would prune auto-20261204-000002")
            && !text.contains("000003"),
        "{text}"
    );
    assert_eq!(list().len(), 5);
    let out = g.snapfs(&["snapshot", "prune", url, "--keep", "last:2"]);
    assert_ok(&out);
    assert_eq!(
        list(),
        vec!["auto-20261204-000003", "auto-20261204-000004", "manual"]
    );
    // Nothing to prune now; a bucket needs --keep, and a bad one is named.
    let out = g.snapfs(&["snapshot", "prune", url, "--keep", "last:2"]);
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let out = g.snapfs(&["snapshot", "prune", url]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("give --keep"));
    let out = g.snapfs(&["snapshot", "prune", url, "--keep", "often:3"]);
    assert_eq!(out.status.code(), Some(2));
    // What is left restores as it was.
    let dir = test_dir();
    let r = g.restore_ok(url, dir.path(), "r", &[]);
    assert_eq!(
        tree_digest(&r.path(".snapshots/auto-20261204-000003")),
        tree_digest(&m.path(".snapshots/auto-20261204-000003"))
    );
    assert_eq!(
        tree_digest(&r.mnt),
        tree_digest(&m.path(".snapshots/manual"))
    );
}

/// A TCP relay to the server that, once the bytes through it (both ways) pass each
/// of its cut points, shuts every connection and refuses new ones for `outage`:
/// the network failing under a client in mid-request.
struct Cutter {
    addr: String,
    passed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cuts_done: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Cutter {
    fn start(to: &str, cuts: Vec<u64>, outage: std::time::Duration) -> Cutter {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let to = to.trim_start_matches("http://").to_string();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let passed = Arc::new(AtomicU64::new(0));
        let cuts_done = Arc::new(AtomicU64::new(0));
        let live: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let down_until: Arc<Mutex<Option<std::time::Instant>>> = Arc::default();
        let cuts = Arc::new(Mutex::new(cuts));
        let (p, d) = (passed.clone(), cuts_done.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                if down_until
                    .lock()
                    .unwrap()
                    .is_some_and(|t| std::time::Instant::now() < t)
                {
                    drop(c);
                    continue;
                }
                let Ok(s) = std::net::TcpStream::connect(&to) else {
                    continue;
                };
                live.lock().unwrap().push(c.try_clone().unwrap());
                live.lock().unwrap().push(s.try_clone().unwrap());
                for (mut from, mut into) in
                    [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)]
                {
                    let (p, d, live, down, cuts) = (
                        p.clone(),
                        d.clone(),
                        live.clone(),
                        down_until.clone(),
                        cuts.clone(),
                    );
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let total = p.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                            let cut = {
                                let mut c = cuts.lock().unwrap();
                                let due = c.first().is_some_and(|&at| total >= at);
                                if due {
                                    c.remove(0);
                                }
                                due
                            };
                            if cut {
                                *down.lock().unwrap() = Some(std::time::Instant::now() + outage);
                                for s in live.lock().unwrap().drain(..) {
                                    let _ = s.shutdown(std::net::Shutdown::Both);
                                }
                                d.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            if std::io::Write::write_all(&mut into, &buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Cutter {
            addr,
            passed,
            cuts_done,
        }
    }
}

/// A seed for this run's random points, printed so that a failure can be replayed
/// (`SNAPFS_TEST_SEED`).
fn seed() -> u64 {
    let s = std::env::var("SNAPFS_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("SNAPFS_TEST_SEED={s}");
    s
}

/// A small PRNG (splitmix64).
fn next(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e3779b97f4a7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

#[test]
fn the_network_cut_at_random_points_of_a_sync_and_a_restore_loses_nothing() {
    let g = Garage::start();
    let url = "s3://snapfs/cuts";
    let mut rng = seed();
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    populate(&m.mnt, 91);
    for i in 0..5u64 {
        std::fs::write(m.path(&format!("big{i}")), pattern(500 + i, 12 << 20)).unwrap();
    }
    snapfs_ok(&["snapshot", "create", mnt, "s1"]);
    churn(&m.mnt, 92);
    std::fs::write(m.path("big9"), pattern(509, 9 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s2"]);
    // About 70 MB go up: three cuts at random points of it, each a 1.5 s outage,
    // which the client's retries ride out.
    let mut cuts: Vec<u64> = (0..3).map(|_| 1 + next(&mut rng) % (60 << 20)).collect();
    cuts.sort_unstable();
    eprintln!("cuts at {cuts:?} bytes");
    let cutter = Cutter::start(&g.endpoint, cuts, std::time::Duration::from_millis(1500));
    let via = |args: &[&str]| g.command(&cutter.addr).args(args).output().unwrap();
    let t0 = std::time::Instant::now();
    let out = via(&["sync", mnt, url]);
    eprintln!("{:?}: synced", t0.elapsed());
    let done = cutter.cuts_done.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "{done} cuts in {} bytes: {}",
        cutter.passed.load(std::sync::atomic::Ordering::SeqCst),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(done >= 1, "no cut happened");
    // The client's retries carry it through the outages.
    assert_ok(&out);
    let out = g.snapfs(&["fsck", url, "--read-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A restore through cuts too.
    let mut cuts: Vec<u64> = (0..2).map(|_| 1 + next(&mut rng) % (60 << 20)).collect();
    cuts.sort_unstable();
    eprintln!("restore: cuts at {cuts:?} bytes");
    let cutter = Cutter::start(&g.endpoint, cuts, std::time::Duration::from_millis(1500));
    let dir = test_dir();
    let n = dir.path().join("n");
    let out = g
        .command(&cutter.addr)
        .args(["restore", url, n.to_str().unwrap()])
        .output()
        .unwrap();
    eprintln!(
        "{:?}: restore: {} cuts: {}",
        t0.elapsed(),
        cutter.cuts_done.load(std::sync::atomic::Ordering::SeqCst),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ok(&out);
    // A longer outage (the network gone for good) stops a sync with one line; the
    // next run completes it.
    std::fs::write(m.path("after"), pattern(510, 4 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s3"]);
    let cutter = Cutter::start(
        &g.endpoint,
        vec![1 << 20],
        std::time::Duration::from_secs(3600),
    );
    let out = Command::new(SNAPFS)
        .args(["sync", mnt, url])
        .env("HOME", g.home())
        .env("SNAPFS_S3_RETRY_TIMEOUT", "10")
        .env("AWS_ENDPOINT_URL", &cutter.addr)
        .env("AWS_REGION", "garage")
        .env("AWS_ACCESS_KEY_ID", &g.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &g.secret)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // One line says why (before it, progress lines, printed while it waited).
    let e = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = e
        .lines()
        .filter(|l| !l.starts_with("snapfs sync: s3: "))
        .collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(errors[0].contains("writing packs/"), "{e}");
    eprintln!("{:?}: the network gone: {}", t0.elapsed(), errors[0]);
    let sum = g.sync_ok(&m.mnt, url);
    assert_eq!(sum["snapshots"], serde_json::json!(["s3"]), "{sum}");
    let r = Mount::at(n, dir.path().join("n-mnt"), &[]);
    assert_eq!(tree_digest(&r.mnt), tree_digest(&m.path(".snapshots/s2")));
    assert_eq!(
        tree_digest(&r.path(".snapshots/s1")),
        tree_digest(&m.path(".snapshots/s1"))
    );
}

#[test]
fn a_sync_killed_at_random_points_resumes_and_loses_nothing() {
    let g = Garage::start();
    let url = "s3://snapfs/kills";
    let mut rng = seed();
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    for i in 0..6u64 {
        std::fs::write(m.path(&format!("f{i}")), pattern(600 + i, 16 << 20)).unwrap();
    }
    snapfs_ok(&["snapshot", "create", mnt, "s1"]);
    std::fs::write(m.path("g"), pattern(700, 8 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s2"]);
    // How long a whole sync takes here, to kill within it (to another prefix).
    let t0 = std::time::Instant::now();
    g.sync_ok(&m.mnt, "s3://snapfs/timing");
    let whole = t0.elapsed().as_millis() as u64;
    for round in 0..4 {
        let at = next(&mut rng) % whole.max(1);
        let mut child = g
            .command(&g.endpoint)
            .args(["sync", mnt, url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(at));
        let _ = child.kill();
        let status = child.wait().unwrap();
        eprintln!("round {round}: killed at {at} of {whole} ms ({status})");
        // Whatever the bucket holds is whole: fsck is clean, a listing works or
        // says there is nothing yet. (A killed writer's lock names a gone process
        // of this machine: the next writer takes it over at once.)
        let out = g.snapfs(&["fsck", url, "--read-data"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || e.contains("holds no snapfs volume"),
            "round {round}: {text}{e}"
        );
    }
    let sum = g.sync_ok(&m.mnt, url);
    eprintln!("the last run: {sum}");
    let out = g.snapfs(&["fsck", url, "--read-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dir = test_dir();
    let r = g.restore_ok(url, dir.path(), "r", &[]);
    assert_eq!(tree_digest(&r.mnt), tree_digest(&m.path(".snapshots/s2")));
    assert_eq!(
        tree_digest(&r.path(".snapshots/s1")),
        tree_digest(&m.path(".snapshots/s1"))
    );
}

#[test]
fn a_large_object_goes_up_in_parts_and_comes_back_whole() {
    let g = Garage::start();
    let b = g.bucket("s3://snapfs/large");
    // Over the 64 MiB from which objects go in parts of 16 MiB (the last shorter).
    let data = pattern(77, (100 << 20) + 12_345);
    b.put_object("manifests/large", data.clone()).unwrap();
    let back = b.get_object("manifests/large").unwrap().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the object read back differs");
    // Garage counts the parts it was sent: 7.
    assert_eq!(g.requests("UploadPart"), 7.0);
}

impl Garage {
    /// How many requests of `kind` (`GetObject`, `UploadPart`, ...) the server has
    /// answered, by its own counters.
    fn requests(&self, kind: &str) -> f64 {
        let mut c = std::net::TcpStream::connect(&self.admin).unwrap();
        std::io::Write::write_all(&mut c, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut c, &mut text).unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with("api_s3_request_counter")
                    && l.contains(&format!("api_endpoint=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

#[test]
fn pack_indexes_kept_on_this_machine_never_say_the_bucket_holds_what_it_does_not() {
    let g = Garage::start();
    let url = "s3://snapfs/kept-indexes";
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    // Six snapshots, six packs: s1's holds extents a and b.
    let (a, b_bytes) = (pattern(11, 64 << 10), pattern(12, 64 << 10));
    std::fs::write(m.path("a"), &a).unwrap();
    std::fs::write(m.path("b"), &b_bytes).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s1"]);
    for i in 2..=6u64 {
        std::fs::write(m.path(&format!("f{i}")), pattern(20 + i, 64 << 10)).unwrap();
        snapfs_ok(&["snapshot", "create", mnt, &format!("s{i}")]);
    }
    g.sync_ok(&m.mnt, url);
    let b = g.bucket(url);
    let idx = keys_ending(&b, ".idx");
    assert_eq!(idx.len(), 6, "{idx:?}");
    // The next sync reads the six indexes and keeps them; the one after reads none.
    let kept_files = || -> Vec<PathBuf> {
        let top = g.home().join(".cache/snapfs/buckets");
        let mut v: Vec<PathBuf> = std::fs::read_dir(&top)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".idx"))
            .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "idx"))
            .collect();
        v.sort();
        v
    };
    let step = |name: &str, cache: &str| -> (f64, serde_json::Value) {
        std::fs::write(m.path(name), pattern(name.len() as u64 * 7, 1000)).unwrap();
        snapfs_ok(&["snapshot", "create", mnt, name]);
        let gets = g.requests("GetObject");
        let out = g
            .command(&g.endpoint)
            .args(["sync", mnt, url, "--json"])
            .env("SNAPFS_S3_INDEX_CACHE", cache)
            .output()
            .unwrap();
        assert_ok(&out);
        (
            g.requests("GetObject") - gets,
            serde_json::from_slice(&out.stdout).unwrap(),
        )
    };
    let (cold, _) = step("t1", "on");
    assert_eq!(kept_files().len(), 6, "{:?}", kept_files());
    let (warm, _) = step("t22", "on");
    let (off, _) = step("t333", "off");
    // t1's sync read the 6 indexes, t22's t1's only, t333's all 8 (a margin of 2
    // for a request retried).
    assert!(
        warm + 3.0 <= cold && warm + 5.0 <= off,
        "GETs of a sync: {cold} reading every index, {warm} with them kept, {off} with keeping off"
    );
    // s1's index in the bucket is replaced by one that no longer lists b's extent
    // (damaged, or written so by someone who can write the bucket), of the same
    // size, so that only its entity tag tells: the copy kept here, whole, is not
    // believed, and a new file holding b's bytes sends them again.
    let s1_idx = idx
        .iter()
        .find(|k| {
            let v = b.get_object(k).unwrap().unwrap();
            idx_entries(&v).len() == 2
        })
        .unwrap()
        .clone();
    let s1_kept = g.home().join(".cache/snapfs/buckets");
    let s1_kept = kept_files()
        .into_iter()
        .find(|f| s1_idx.ends_with(&*f.file_name().unwrap().to_string_lossy()))
        .unwrap_or_else(|| panic!("{s1_idx} is not kept under {}", s1_kept.display()));
    let kept_before = std::fs::read(&s1_kept).unwrap();
    let full = b.get_object(&s1_idx).unwrap().unwrap();
    let b_hash = *blake3::hash(&b_bytes).as_bytes();
    let mut changed = full.clone();
    let at = changed
        .chunks_exact(44)
        .position(|e| e[..32] == b_hash)
        .unwrap();
    changed[at * 44] ^= 0x01;
    assert_eq!(changed.len(), full.len());
    b.put_object(&s1_idx, changed).unwrap();
    // And what else is kept here is damaged, or mixed up: one kept index flipped
    // in a byte, another holding a third's bytes.
    let others: Vec<PathBuf> = kept_files().into_iter().filter(|f| *f != s1_kept).collect();
    let mut flipped = std::fs::read(&others[0]).unwrap();
    let at = flipped.len() - 10;
    flipped[at] ^= 0x40;
    std::fs::write(&others[0], flipped).unwrap();
    std::fs::copy(&others[2], &others[1]).unwrap();
    assert_eq!(std::fs::read(&s1_kept).unwrap(), kept_before);
    std::fs::write(m.path("copy-of-b"), &b_bytes).unwrap();
    let (_, sum) = step("t4444", "on");
    assert!(
        sum["payload_bytes"].as_u64().unwrap() >= 64 << 10,
        "b's extent was not sent again: {sum}"
    );
    assert_ok(&g.snapfs(&["fsck", url]));
    let dir = test_dir();
    let r = g.restore_ok(url, dir.path(), "r", &[]);
    assert_eq!(
        tree_digest(&r.mnt),
        tree_digest(&m.path(".snapshots/t4444"))
    );
    assert_eq!(std::fs::read(r.path("copy-of-b")).unwrap(), b_bytes);
    // A pack gc collects (one a cut sync left: nothing names its extent) is kept
    // here until the first sync after gc, which drops it.
    let stray = "0123456789abcdef0123456789abcdef";
    let junk = pattern(99, 4096);
    let mut entry = blake3::hash(&junk).as_bytes().to_vec();
    entry.extend_from_slice(&0u64.to_le_bytes());
    entry.extend_from_slice(&4096u32.to_le_bytes());
    b.put_object(&format!("packs/{stray}.pack"), junk).unwrap();
    b.put_object(&format!("packs/{stray}.idx"), entry).unwrap();
    let kept_names = || -> Vec<String> {
        kept_files()
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    let _ = step("t55555", "on");
    assert!(kept_names().contains(&format!("{stray}.idx")));
    assert_ok(&g.snapfs(&["gc", url]));
    assert!(!keys_ending(&b, ".idx").contains(&format!("packs/{stray}.idx")));
    let _ = step("t666666", "on");
    assert!(
        !kept_names().contains(&format!("{stray}.idx")),
        "{:?}",
        kept_names()
    );
    // Every index the bucket lists is kept, but the one that sync wrote.
    let listed = keys_ending(&b, ".idx");
    assert!(
        kept_names()
            .iter()
            .all(|k| listed.contains(&format!("packs/{k}")))
    );
    assert_eq!(kept_names().len() + 1, listed.len());
}

/// `snapfs mount s3://... MNT` with this server's settings (and `extra` args).
fn mount_bucket(g: &Garage, url: &str, mnt: &Path, extra: &[&str]) -> Output {
    std::fs::create_dir_all(mnt).unwrap();
    let mut args = vec!["mount", url, mnt.to_str().unwrap()];
    args.extend_from_slice(extra);
    g.snapfs(&args)
}

fn unmount(mnt: &Path) {
    let out = Command::new("umount").arg(mnt).output().unwrap();
    assert_ok(&out);
}

#[test]
fn a_mounted_bucket_shows_every_snapshot_as_it_was_read_only() {
    let g = Garage::start();
    let url = "s3://snapfs/mounted";
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    populate(&m.mnt, 111);
    std::fs::write(m.path("big"), pattern(1, 5 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s1"]);
    g.sync_ok(&m.mnt, url);
    churn(&m.mnt, 112);
    // Small writes into stored blocks (fragments over a base), and a hole.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("big"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"patched!", 5000).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(3, 9000), 3 << 20).unwrap();
    f.set_len(9 << 20).unwrap();
    drop(f);
    snapfs_ok(&["snapshot", "create", mnt, "s2"]);
    g.sync_ok(&m.mnt, url);
    let dir = test_dir();
    let view = dir.path().join("view");
    let out = mount_bucket(&g, url, &view, &["-o", "cache_size=2M"]);
    assert_ok(&out);
    let names: Vec<String> = std::fs::read_dir(view.join(".snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["s1", "s2"]);
    for s in ["s1", "s2"] {
        assert_eq!(
            tree_digest(&view.join(".snapshots").join(s)),
            tree_digest(&m.path(&format!(".snapshots/{s}"))),
            "{s}"
        );
    }
    // Read twice (the second from the cache, or again from the bucket: it holds 2 MiB).
    let big = std::fs::read(view.join(".snapshots/s2/big")).unwrap();
    assert_eq!(big, std::fs::read(m.path(".snapshots/s2/big")).unwrap());
    assert_eq!(&big[5000..5008], b"patched!");
    assert_eq!(std::fs::read(view.join(".snapshots/s2/big")).unwrap(), big);
    // Nothing is written through it.
    let e = std::fs::write(view.join(".snapshots/s2/new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(view.join(".snapshots/s2/big"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    unmount(&view);

    // A damaged extent reads as an error, never as other bytes.
    let b = g.bucket(url);
    for pack in b.list("packs").unwrap() {
        if !pack.ends_with(".pack") {
            continue;
        }
        let mut data = b.get_object(&pack).unwrap().unwrap();
        for i in (0..data.len()).step_by(4096) {
            data[i] ^= 0x5a;
        }
        b.put_object(&pack, data).unwrap();
    }
    let out = mount_bucket(&g, url, &view, &[]);
    assert_ok(&out);
    let mut bad = 0;
    for e in std::fs::read_dir(view.join(".snapshots/s1")).unwrap() {
        let p = e.unwrap().path();
        if !p.is_file() || p.is_symlink() {
            continue;
        }
        match std::fs::read(&p) {
            Ok(d) => {
                let rel = p.file_name().unwrap().to_str().unwrap();
                assert_eq!(
                    d,
                    std::fs::read(m.path(&format!(".snapshots/s1/{rel}"))).unwrap()
                );
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                bad += 1;
            }
        }
    }
    assert!(bad > 0, "no file read the damaged pack");
    unmount(&view);

    // Bad input: an unknown option, a bucket with no volume; one line, exit 2.
    let out = mount_bucket(&g, url, &view, &["-o", "rw"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("takes only cache_size"));
    let out = mount_bucket(&g, "s3://snapfs/none", &view, &[]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("holds no snapfs volume") && e.trim_end().lines().count() == 1,
        "{e}"
    );
    assert!(!is_mountpoint(&view));
}

fn is_mountpoint(p: &Path) -> bool {
    Command::new("mountpoint")
        .arg("-q")
        .arg(p)
        .status()
        .unwrap()
        .success()
}

#[test]
fn a_mounted_bucket_reads_extents_gc_moved_meanwhile() {
    let g = Garage::start();
    let url = "s3://snapfs/moved";
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    std::fs::write(m.path("gone-later"), pattern(1, 6 << 20)).unwrap();
    std::fs::write(m.path("stays"), pattern(2, 2 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s1"]);
    g.sync_ok(&m.mnt, url);
    std::fs::remove_file(m.path("gone-later")).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s2"]);
    g.sync_ok(&m.mnt, url);
    let dir = test_dir();
    let view = dir.path().join("view");
    let out = mount_bucket(&g, url, &view, &[]);
    assert_ok(&out);
    // s1 goes; gc rewrites the pack both files were in (three quarters garbage).
    assert!(
        g.snapfs(&["snapshot", "delete", url, "s1"])
            .status
            .success()
    );
    let out = g.snapfs(&["gc", url]);
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("repacked 1 packs"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        std::fs::read(view.join(".snapshots/s2/stays")).unwrap(),
        pattern(2, 2 << 20)
    );
    unmount(&view);
}

#[test]
fn a_root_put_back_from_an_older_copy_is_refused() {
    let g = Garage::start();
    let url = "s3://snapfs/rollback";
    let (m, b) = g.one_file_synced(url, "f", pattern(1, 1 << 20));
    let mnt = m.mnt.to_str().unwrap();
    let old = b.get_object("snapfs-root.json").unwrap().unwrap();
    std::fs::write(m.path("g"), pattern(2, 1 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s2"]);
    g.sync_ok(&m.mnt, url);
    let list = || g.snapfs(&["snapshot", "list", url, "--json"]);
    assert_eq!(names_listed(&list()), vec!["s1", "s2"]);
    // A service started without HOME remembers it where its user's home is.
    let homeless = || {
        g.command(&g.endpoint)
            .args(["snapshot", "list", url])
            .env_remove("HOME")
            .output()
            .unwrap()
    };
    assert_ok(&homeless());
    // Someone who can write the bucket puts the older root back: s2 would vanish.
    b.put_object("snapfs-root.json", old).unwrap();
    // (Named with a trailing slash, it is the same bucket prefix.)
    let slashed = format!("{url}/");
    for args in [
        vec!["snapshot", "list", url],
        vec!["snapshot", "list", &slashed],
        vec!["sync", mnt, url],
        vec!["gc", url],
    ] {
        let out = g.snapfs(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("its root went back from generation") && e.trim_end().lines().count() == 1,
            "{args:?}: {e}"
        );
    }
    let out = homeless();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(e.contains("its root went back"), "{e}");
    let homeless_file = e.trim_end().rsplit("delete ").next().unwrap().to_string();
    // Meant so (a bucket restored from an old copy): the file it names goes, and the
    // bucket is taken as it is.
    let out = g.snapfs(&["snapshot", "list", url]);
    let e = String::from_utf8_lossy(&out.stderr);
    let file = e.trim_end().rsplit("delete ").next().unwrap().to_string();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(names_listed(&list()), vec!["s1"]);
    // (The service's, if its home is another.)
    let _ = std::fs::remove_file(homeless_file);
    // A file of the guard's that cannot be read is not taken for none (a rolled
    // back root would pass): the command stops, naming it.
    std::fs::write(&file, b"{\"generation\": ").unwrap();
    let out = g.snapfs(&["snapshot", "list", url]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains(&file)
            && e.contains("delete it to accept the bucket as it is")
            && e.trim_end().lines().count() == 1,
        "{e}"
    );
    std::fs::remove_file(&file).unwrap();
    assert_eq!(names_listed(&list()), vec!["s1"]);
}

/// Fails with the command's own error unless it succeeded.
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `len` bytes of log-like text: lines of a counter, a few words and random
/// numbers (zstd at level 6 on 64 KiB pieces saves a little over half of it).
fn text(seed: u64, len: usize) -> Vec<u8> {
    let r = pattern(seed, len / 8 + 64);
    let mut out = Vec::with_capacity(len + 100);
    let users = ["alice", "bob", "carol", "dave"];
    let ops = ["read", "write", "open", "close", "fsync", "rename"];
    let mut i = 0;
    while out.len() < len {
        let b = &r[(i * 6) % (r.len() - 8)..];
        out.extend_from_slice(
            format!(
                "{:08} user={} op={} bytes={} id={:02x}{:02x}{:02x}\n",
                i,
                users[b[0] as usize % 4],
                ops[b[1] as usize % 6],
                u16::from_le_bytes([b[2], b[3]]),
                b[4],
                b[5],
                b[6]
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

/// The entries of a pack index as stored: hash, offset, length word.
fn idx_entries(v: &[u8]) -> Vec<([u8; 32], u64, u32)> {
    assert_eq!(v.len() % 44, 0);
    v.chunks_exact(44)
        .map(|e| {
            (
                e[..32].try_into().unwrap(),
                u64::from_le_bytes(e[32..40].try_into().unwrap()),
                u32::from_le_bytes(e[40..44].try_into().unwrap()),
            )
        })
        .collect()
}

#[test]
fn compressible_data_is_stored_compressed_and_read_back_exactly() {
    let g = Garage::start();
    let (url, plain_url) = ("s3://snapfs/squeezed", "s3://snapfs/plain");
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap().to_string();
    let log = text(7, 12 << 20);
    let random = pattern(8, 2 << 20);
    std::fs::write(m.path("log"), &log).unwrap();
    std::fs::write(m.path("random"), &random).unwrap();
    // 48 blocks of one byte over and over, each numbered (so that dedup does not
    // take them for one).
    let mut same = vec![b'z'; 3 << 20];
    for (i, block) in same.chunks_mut(64 << 10).enumerate() {
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    std::fs::write(m.path("same"), &same).unwrap();
    snapfs_ok(&["snapshot", "create", &mnt, "s1"]);
    g.sync_ok(&m.mnt, url);
    let out = g.snapfs(&["--compress", "off", "sync", &mnt, plain_url]);
    assert_ok(&out);
    let (b, plain) = (g.bucket(url), g.bucket(plain_url));
    let (squeezed, raw) = (b.bytes().unwrap(), plain.bytes().unwrap());
    eprintln!("compressed: {squeezed} bytes; off: {raw} bytes");
    // Off stores every byte as it is; on, the text saves over 40% and the repeated
    // byte nearly all of its (the random data saves nothing).
    assert!(
        raw >= (log.len() + random.len() + same.len()) as u64,
        "{raw}"
    );
    let saved = raw.saturating_sub(squeezed);
    assert!(
        saved > (log.len() * 2 / 5 + (3 << 20) - (256 << 10)) as u64,
        "{squeezed} of {raw}"
    );
    // Stored compressed (the flag in the index) and marked as layout 2 for readers.
    let mut flagged = 0;
    for k in keys_ending(&b, ".idx") {
        let v = b.get_object(&k).unwrap().unwrap();
        flagged += idx_entries(&v).iter().filter(|e| e.2 >> 31 == 1).count();
    }
    assert!(
        flagged >= log.len() / (64 << 10),
        "{flagged} extents flagged"
    );
    let root = root_json(&b);
    assert_eq!(root["format"], 2, "{root}");
    let out = g.snapfs(&["fsck", url, "--read-data"]);
    assert_ok(&out);
    // A layout 1 bucket (what an older snapfs wrote: nothing compressed) is read,
    // and becomes 2 once written; a layout from a newer snapfs is refused.
    let set_format = |n: u64| {
        let mut r = root_json(&plain);
        r["format"] = n.into();
        r.as_object_mut().unwrap().remove("check");
        plain
            .put_object("snapfs-root.json", serde_json::to_vec(&r).unwrap())
            .unwrap();
    };
    set_format(1);
    assert_eq!(
        names_listed(&g.snapfs(&["snapshot", "list", plain_url, "--json"])),
        ["s1"]
    );
    assert_ok(&g.snapfs(&["fsck", plain_url, "--read-data"]));
    set_format(3);
    let out = g.snapfs(&["snapshot", "list", plain_url]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("layout version 3") && e.trim_end().lines().count() == 1,
        "{e}"
    );
    set_format(1);

    // gc repacks compressed extents: the text rewritten and the random file gone
    // leave the pack they were in mostly garbage once s1 is deleted.
    std::fs::write(m.path("log"), text(9, 12 << 20)).unwrap();
    std::fs::remove_file(m.path("random")).unwrap();
    populate(&m.mnt, 73);
    snapfs_ok(&["snapshot", "create", &mnt, "s2"]);
    g.sync_ok(&m.mnt, url);
    g.sync_ok(&m.mnt, plain_url);
    let format = || root_json(&plain)["format"].clone();
    assert_eq!(format(), 2);
    // gc, which may repack into compressed extents, marks the bucket so too.
    set_format(1);
    assert_ok(&g.snapfs(&["gc", plain_url, "--dry-run"]));
    assert_eq!(format(), 1, "a dry run writes nothing");
    assert_ok(&g.snapfs(&["gc", plain_url]));
    assert_eq!(format(), 2);
    let before_gc = b.bytes().unwrap();
    assert_ok(&g.snapfs(&["snapshot", "delete", url, "s1"]));
    let out = g.snapfs(&["gc", url]);
    assert_ok(&out);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("; repacked 1 packs"), "{report}");
    let after_gc = b.bytes().unwrap();
    eprintln!("gc: {report}; {before_gc} -> {after_gc} bytes");
    assert!(
        before_gc - after_gc > (log.len() / 8 + random.len()) as u64,
        "{before_gc} -> {after_gc}"
    );
    let want = tree_digest(&m.path(".snapshots/s2"));

    // Restored, mounted as a bucket, and checked: every byte as written.
    let dir = test_dir();
    let r = g.restore_ok(url, dir.path(), "n", &[]);
    assert_eq!(tree_digest(&r.path(".snapshots/s2")), want);
    assert_eq!(tree_digest(&r.mnt), want);
    drop(r);
    let view = dir.path().join("view");
    assert_ok(&mount_bucket(&g, url, &view, &["-o", "cache_size=2M"]));
    let seen = tree_digest(&view.join(".snapshots/s2"));
    unmount(&view);
    assert_eq!(seen, want);
    let out = g.snapfs(&["fsck", url, "--read-data"]);
    assert_ok(&out);

    // A compressed extent that expands past any block (a hostile bucket) is damage,
    // named as such; nothing is restored from it.
    let idx_key = keys_ending(&b, ".idx")
        .into_iter()
        .find(|k| {
            let v = b.get_object(k).unwrap().unwrap();
            idx_entries(&v).iter().any(|e| e.2 >> 31 == 1)
        })
        .unwrap();
    let pack_key = idx_key.replace(".idx", ".pack");
    let mut pack = b.get_object(&pack_key).unwrap().unwrap();
    let mut idx = b.get_object(&idx_key).unwrap().unwrap();
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let n = idx_entries(&idx)
        .iter()
        .position(|e| e.2 >> 31 == 1)
        .unwrap();
    let at = pack.len() as u64;
    pack.extend_from_slice(&bomb);
    idx[n * 44 + 32..n * 44 + 40].copy_from_slice(&at.to_le_bytes());
    idx[n * 44 + 40..n * 44 + 44].copy_from_slice(&(bomb.len() as u32 | 1 << 31).to_le_bytes());
    b.put_object(&pack_key, pack).unwrap();
    b.put_object(&idx_key, idx).unwrap();
    fsck_finds_a_bad_extent_in(&g, url, &pack_key);
    let out = g.snapfs(&["restore", url, dir.path().join("m").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("does not match its hash") && e.trim_end().lines().count() == 1,
        "{e}"
    );

    // A bad level is one line.
    for bad in [
        &["--compress", "20", "gc", url][..],
        &["--compress", "x", "gc", url],
    ] {
        let out = g.snapfs(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
    let out = g
        .command(&g.endpoint)
        .args(["gc", url, "--dry-run"])
        .env("SNAPFS_S3_COMPRESS", "fast")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--compress fast") && e.trim_end().lines().count() == 1,
        "{e}"
    );
}

#[test]
fn a_damaged_root_or_manifest_is_named_and_never_restored_or_collected_by() {
    let g = Garage::start();
    let url = "s3://snapfs/bad-manifest";
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    populate(&m.mnt, 31);
    // Enough records for a manifest of many batches.
    std::fs::create_dir(m.path("many")).unwrap();
    for i in 0..3000u64 {
        std::fs::write(m.path(&format!("many/{i:05}")), pattern(i, 100)).unwrap();
    }
    snapfs_ok(&["snapshot", "create", mnt, "s1"]);
    g.sync_ok(&m.mnt, url);
    let b = g.bucket(url);
    let key = root_json(&b)["snapshots"][0]["manifest"]
        .as_str()
        .unwrap()
        .to_string();
    let good = b.get_object(&key).unwrap().unwrap();
    let packs = keys_ending(&b, ".pack");
    let root = root_json(&b);
    assert_eq!(
        root["snapshots"][0]["hash"].as_str(),
        Some(blake3::hash(&good).to_hex().as_str()),
        "{root}"
    );
    // fsck names the snapshot and the manifest, wherever one bit flips (a flip in
    // a stretch zstd stores as it is decodes to other records without its hash).
    let named = |what: &str| {
        let out = g.snapfs(&["fsck", url]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {text}");
        assert!(
            text.lines()
                .any(|l| l.contains("snapshot s1") && l.contains(&key) && l.contains("damaged")),
            "{what}: {text}"
        );
    };
    for k in 0..64 {
        let mut bad = good.clone();
        let at = (bad.len() - 1) * k / 63;
        bad[at] ^= 1 << (k % 8);
        b.put_object(&key, bad).unwrap();
        named(&format!("bit {} of byte {at}", k % 8));
    }
    let dir = test_dir();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x08;
    let cut = good[..good.len() / 2].to_vec();
    for (what, bad) in [("a flipped byte", flipped), ("cut short", cut)] {
        b.put_object(&key, bad).unwrap();
        named(what);
        // A restore stops with one line naming it, and makes no store.
        let n = dir.path().join("n");
        let out = g.snapfs(&["restore", url, n.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{what}: {out:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(&key) && e.contains("damaged"), "{what}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{what}: {e}");
        // (What the restore made is a replica cut short: `--resume` goes on.)
        // gc cannot tell what the manifest needs: it deletes nothing.
        let out = g.snapfs(&["gc", url]);
        assert_eq!(out.status.code(), Some(2), "{what}: {out:?}");
        assert_eq!(keys_ending(&b, ".pack"), packs, "{what}");
        let _ = std::fs::remove_dir_all(&n);
    }
    // Put back, it reads whole again; so does a root an older snapfs wrote, which
    // names no hash (its manifests are read unchecked, as they were).
    b.put_object(&key, good).unwrap();
    let out = g.snapfs(&["fsck", url, "--read-data"]);
    assert_ok(&out);
    let mut old = root_json(&b);
    old["snapshots"][0].as_object_mut().unwrap().remove("hash");
    old.as_object_mut().unwrap().remove("check");
    b.put_object("snapfs-root.json", serde_json::to_vec(&old).unwrap())
        .unwrap();
    let out = g.snapfs(&["fsck", url]);
    assert_ok(&out);
    let r = g.restore_ok(url, dir.path(), "r", &[]);
    assert_eq!(tree_digest(&r.mnt), tree_digest(&m.path(".snapshots/s1")));
    drop(r);
    // The root carries its own checksum: a bit flipped anywhere in it is refused
    // as damage, or (a flip in a name of a field no value changes with: "check"
    // itself) leaves what it says as it was.
    std::fs::write(m.path("more"), b"more").unwrap();
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s2"]);
    let sync2 = g.sync_ok(&m.mnt, url);
    assert_eq!(sync2["snapshots"], serde_json::json!(["s2"]), "{sync2}");
    let good_root = b.get_object("snapfs-root.json").unwrap().unwrap();
    assert!(root_json(&b)["check"].is_string());
    let list = || g.snapfs(&["snapshot", "list", url, "--json", "--all"]);
    let want = list();
    assert_ok(&want);
    let mut refused = 0;
    for at in 0..good_root.len() {
        let mut bad = good_root.clone();
        bad[at] ^= 1 << (at % 7);
        b.put_object("snapfs-root.json", bad).unwrap();
        let out = list();
        if out.status.success() {
            assert_eq!(out.stdout, want.stdout, "byte {at}: read as other content");
        } else {
            refused += 1;
            let e = String::from_utf8_lossy(&out.stderr);
            assert!(e.contains("snapfs-root.json is damaged"), "byte {at}: {e}");
            assert_eq!(e.trim().lines().count(), 1, "byte {at}: {e}");
        }
    }
    assert!(refused > good_root.len() * 9 / 10, "{refused} refused");
    b.put_object("snapfs-root.json", good_root).unwrap();
    assert_ok(&g.snapfs(&["fsck", url]));
}

#[test]
fn gc_deletes_nothing_while_a_pack_index_is_damaged_and_the_next_sync_repairs_it() {
    let g = Garage::start();
    let url = "s3://snapfs/bad-index";
    // One extent, in one pack: the pack's index has one entry.
    let (m, b) = g.one_file_synced(url, "a", pattern(5, 64 << 10));
    let mnt = m.mnt.to_str().unwrap();
    let idx = keys_ending(&b, ".idx");
    assert_eq!(idx.len(), 1, "{idx:?}");
    let good = b.get_object(&idx[0]).unwrap().unwrap();
    assert_eq!(good.len(), 44);
    // A manifest no snapshot names: garbage a gc that runs would delete.
    b.put_object("manifests/stray", b"stray".to_vec()).unwrap();
    let objects = || {
        let mut v = b.list("").unwrap();
        v.retain(|k| !k.starts_with("locks/") && k != snapfs::sync::s3::LOCK);
        v.sort();
        v
    };
    let before = objects();
    // One bit of the entry's hash flips: the pack's one extent looks like garbage.
    let mut bad = good.clone();
    bad[3] ^= 0x10;
    b.put_object(&idx[0], bad).unwrap();
    let out = g.snapfs(&["fsck", url]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    for args in [vec!["gc", url, "--dry-run"], vec!["gc", url]] {
        let out = g.snapfs(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("1 extents the snapshots name are in no pack index"),
            "{e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        let mut now = objects();
        // The one thing a refusing gc writes: the list for the next sync.
        now.retain(|k| k != "snapfs-repair");
        assert_eq!(now, before, "{args:?}");
    }
    assert!(objects().iter().any(|k| k == "snapfs-repair"));
    // The next sync that sends a snapshot asks the source for the extent again.
    std::fs::write(m.path("b"), b"b").unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s2"]);
    let sum = g.sync_ok(&m.mnt, url);
    assert!(sum["payload_bytes"].as_u64().unwrap() >= 64 << 10, "{sum}");
    assert!(!objects().iter().any(|k| k == "snapfs-repair"));
    assert_ok(&g.snapfs(&["fsck", url]));
    // Reading the data still finds the damaged entry, in the pack it names.
    let pack = idx[0].replace(".idx", ".pack");
    fsck_finds_a_bad_extent_in(&g, url, &pack);
    // Now gc runs: the stray manifest goes, and the pack whose index lists only
    // the changed hash, garbage indeed now that the extent is elsewhere.
    let out = g.snapfs(&["gc", url]);
    assert_ok(&out);
    let now = objects();
    assert!(!now.iter().any(|k| k == "manifests/stray"), "{now:?}");
    assert!(!now.contains(&idx[0]), "{now:?}");
    assert_ok(&g.snapfs(&["fsck", url, "--read-data"]));
    let dir = test_dir();
    let r = g.restore_ok(url, dir.path(), "r", &[]);
    assert_eq!(tree_digest(&r.mnt), tree_digest(&m.path(".snapshots/s2")));
    assert_eq!(
        tree_digest(&r.path(".snapshots/s1")),
        tree_digest(&m.path(".snapshots/s1"))
    );
}

#[test]
fn a_snapshot_deleted_but_not_yet_merged_is_not_restored() {
    let g = Garage::start();
    let url = "s3://snapfs/unmerged";
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    std::fs::write(m.path("a"), pattern(1, 200_000)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s1"]);
    std::fs::write(m.path("secret"), b"deleted with s2").unwrap();
    std::fs::write(m.path("a"), pattern(2, 300_000)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s2"]);
    std::fs::remove_file(m.path("secret")).unwrap();
    std::fs::write(m.path("c"), pattern(3, 100_000)).unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s3"]);
    g.sync_ok(&m.mnt, url);
    // s2 deleted while it was the newest, then s3 landed and the sync stopped before
    // it merged s2 away: the root the bucket is then left with.
    let b = g.bucket(url);
    let mut root = root_json(&b);
    root["snapshots"][1]["deleted"] = serde_json::json!(true);
    root.as_object_mut().unwrap().remove("check");
    b.put_object("snapfs-root.json", serde_json::to_vec(&root).unwrap())
        .unwrap();
    let out = g.snapfs(&["snapshot", "list", url]);
    assert_ok(&out);
    let list = String::from_utf8_lossy(&out.stdout);
    let listed: Vec<&str> = list
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(listed, ["s1", "s3"], "{list}");
    let dir = test_dir();
    let r = g.restore_ok(url, dir.path(), "r", &[]);
    let names: Vec<String> = std::fs::read_dir(r.path(".snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["s1", "s3"], "the deleted snapshot came back");
    for s in ["s1", "s3"] {
        assert_eq!(
            tree_digest(&r.path(&format!(".snapshots/{s}"))),
            tree_digest(&m.path(&format!(".snapshots/{s}"))),
            "{s}"
        );
    }
    assert_eq!(tree_digest(&r.mnt), tree_digest(&m.path(".snapshots/s3")));
    drop(r);
    // The next sync merges it away.
    std::fs::write(m.path("d"), b"d").unwrap();
    snapfs_ok(&["snapshot", "create", mnt, "s4"]);
    g.sync_ok(&m.mnt, url);
    let names: Vec<String> = root_json(&b)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["s1", "s3", "s4"]);
    assert_ok(&g.snapfs(&["fsck", url, "--read-data"]));
}

#[test]
fn a_manifest_holding_fewer_records_than_its_root_says_is_named_not_restored() {
    let g = Garage::start();
    let url = "s3://snapfs/short-manifest";
    let m = Mount::new();
    std::fs::create_dir(m.path("many")).unwrap();
    for i in 0..3000u64 {
        std::fs::write(m.path(&format!("many/{i:05}")), pattern(i, 100)).unwrap();
    }
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s1"]);
    g.sync_ok(&m.mnt, url);
    let b = g.bucket(url);
    let mut root = root_json(&b);
    let key = root["snapshots"][0]["manifest"]
        .as_str()
        .unwrap()
        .to_string();
    let stored = b.get_object(&key).unwrap().unwrap();
    assert_eq!(&stored[..8], b"snapfsZ1");
    let frames = zstd::decode_all(&stored[8..]).unwrap();
    // Its first batch alone, as frames (a manifest without the magic is read as
    // them): whole frames, so nothing in it reads as cut short.
    let first = 4 + u32::from_le_bytes(frames[..4].try_into().unwrap()) as usize;
    assert!(first < frames.len(), "one batch only");
    b.put_object(&key, frames[..first].to_vec()).unwrap();
    // A root that names no hash (as an older snapfs wrote it): only the count of
    // records tells.
    root["snapshots"][0].as_object_mut().unwrap().remove("hash");
    root.as_object_mut().unwrap().remove("check");
    b.put_object("snapfs-root.json", serde_json::to_vec(&root).unwrap())
        .unwrap();
    let out = g.snapfs(&["fsck", url]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("snapshot s1") && l.contains(&key) && l.contains("records")),
        "{text}"
    );
    let dir = test_dir();
    let n = dir.path().join("n");
    let out = g.snapfs(&["restore", url, n.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains(&key) && e.contains("records"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    // Nor does gc take its word for what is needed.
    let packs = keys_ending(&b, ".pack");
    assert_eq!(g.snapfs(&["gc", url]).status.code(), Some(2));
    assert_eq!(keys_ending(&b, ".pack"), packs);
}
