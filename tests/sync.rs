//! `snapfs sync` between two local stores: every snapshot arrives identical, an
//! incremental sends only what changed, and a destination that is not a replica of
//! the source is refused and left unchanged.

mod common;

use std::path::Path;

use common::*;

fn sync(src: &Path, dest: &Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec!["sync", src.to_str().unwrap(), dest.to_str().unwrap()];
    a.extend_from_slice(extra);
    snapfs(&a)
}

/// The JSON summary of a sync that must succeed.
fn sync_ok(src: &Path, dest: &Path) -> serde_json::Value {
    let out = sync(src, dest, &["--json"]);
    assert!(
        out.status.success(),
        "sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Each snapshot of `a` and `b`, by name, as `tree_digest` sees it.
fn snapshot_trees(m: &Mount) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    let mut names: Vec<String> = std::fs::read_dir(m.path(".snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = tree_digest(&m.path(&format!(".snapshots/{n}")));
            (n, t)
        })
        .collect()
}

#[test]
fn a_full_sync_then_incrementals_make_identical_snapshots() {
    let mut src = Mount::new();
    let dest_store = src.dir.path().join("replica");
    let dest_mnt = src.dir.path().join("replica-mnt");
    std::fs::create_dir(&dest_mnt).unwrap();
    populate(&src.mnt, 1);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "one"]);
    src.unmount();
    let first = sync_ok(&src.store, &dest_store);
    assert_eq!(first["snapshots"], serde_json::json!(["one"]));
    let full_payload = first["payload_bytes"].as_u64().unwrap();
    assert!(full_payload > 3 << 20, "{first}");

    // Two incrementals, with creates, overwrites, truncates, deletes, renames, a
    // moved directory and a new hard link.
    for (round, name) in [(2u64, "two"), (3, "three")] {
        src.mount(&[]);
        churn(&src.mnt, round);
        std::fs::rename(src.path("docs/deep"), src.path(&format!("deep-{round}"))).unwrap();
        std::fs::create_dir(src.path("docs/deep")).unwrap();
        std::fs::hard_link(
            src.path(&format!("new-{round}")),
            src.path(&format!("hl-{round}")),
        )
        .unwrap();
        snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), name]);
        src.unmount();
        let inc = sync_ok(&src.store, &dest_store);
        assert_eq!(inc["snapshots"], serde_json::json!([name]), "{inc}");
        // Only what changed travels: far less than the whole volume.
        let payload = inc["payload_bytes"].as_u64().unwrap();
        assert!(payload < 600_000, "incremental sent {payload} bytes: {inc}");
    }
    // Nothing new: nothing sent.
    let none = sync_ok(&src.store, &dest_store);
    assert_eq!(none["snapshots_sent"], 0, "{none}");
    assert_eq!(none["records"], 0, "{none}");

    src.mount(&[]);
    let mut dest = Mount::at(dest_store.clone(), dest_mnt, &[]);
    let (a, b) = (snapshot_trees(&src), snapshot_trees(&dest));
    assert_eq!(a.len(), 3);
    assert_eq!(a, b);
    // The replica's live view is the newest snapshot.
    let three = &a.iter().find(|(n, _)| n == "three").unwrap().1;
    assert_eq!(&tree_digest(&dest.mnt), three);
    dest.unmount();
    src.unmount();
    // status names the relationship: the replica's source is the source's volume.
    let line = |store: &Path, key: &str| -> String {
        let out = snapfs(&["status", store.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} in {text}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        line(&dest_store, "replica of:"),
        line(&src.store, "volume:")
    );
    let f = snapfs(&["fsck", dest_store.to_str().unwrap(), "--read-data"]);
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
}

#[test]
fn a_destination_that_is_not_a_replica_is_refused_and_left_alone() {
    let mut src = Mount::new();
    populate(&src.mnt, 5);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "s"]);
    src.unmount();
    // Another volume with snapshots of its own.
    let mut other = Mount::new();
    std::fs::write(other.path("mine"), b"mine").unwrap();
    snapfs(&["snapshot", "create", other.mnt.to_str().unwrap(), "own"]);
    other.unmount();
    let before = segment_bytes(&other.store);
    let out = sync(&src.store, &other.store, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("of its own"), "{err}");
    assert_eq!(segment_bytes(&other.store), before);
    other.mount(&[]);
    assert_eq!(std::fs::read(other.path("mine")).unwrap(), b"mine");
    // Syncing a store into itself is refused too.
    other.unmount();
    let out = sync(&src.store, &src.store, &[]);
    assert!(!out.status.success());
    // A missing snapshot is named.
    let out = sync(
        &src.store,
        &src.dir.path().join("r2"),
        &["--snapshot", "nope"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no snapshot named \"nope\""), "{err}");
}

/// A `snapfs serve` child, killed when dropped.
struct Server {
    child: std::process::Child,
    addr: String,
}

impl Server {
    fn start(store: &Path, key: &Path) -> Server {
        use std::io::BufRead;
        let mut child = std::process::Command::new(SNAPFS)
            .args(["serve", store.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .arg("--key-file")
            .arg(key)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{line:?}"))
            .to_string();
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key_file(dir: &Path, name: &str, secret: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, secret).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
fn over_tcp_the_key_is_proven_and_the_server_survives_bad_peers() {
    let mut src = Mount::new();
    populate(&src.mnt, 9);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "a"]);
    churn(&src.mnt, 10);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "b"]);
    src.unmount();
    let dir = src.dir.path().to_path_buf();
    let key = key_file(&dir, "key", "correct horse battery staple 1234");
    let wrong = key_file(&dir, "wrong", "an entirely different secret 5678");
    let replica = dir.join("replica");
    let server = Server::start(&replica, &key);
    let url = format!("tcp://{}", server.addr);
    let to = |k: &Path| {
        snapfs(&[
            "sync",
            src.store.to_str().unwrap(),
            &url,
            "--key-file",
            k.to_str().unwrap(),
            "--json",
        ])
    };

    // A wrong key: refused before anything is said of the store.
    let out = to(&wrong);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not prove the key"), "{err}");
    // Garbage, a cut handshake and a silent peer: the server goes on.
    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0xff; 64][..], b""] {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(&server.addr).unwrap();
        let _ = c.write_all(junk);
    }
    // A key file others may read is refused.
    use std::os::unix::fs::PermissionsExt;
    let open = key_file(&dir, "open", "correct horse battery staple 1234");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = to(&open);
    assert!(String::from_utf8_lossy(&out.stderr).contains("lets others read it"));

    let out = to(&key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sum["snapshots"], serde_json::json!(["a", "b"]), "{sum}");
    drop(server);

    src.mount(&[]);
    let mnt = dir.join("replica-mnt");
    std::fs::create_dir(&mnt).unwrap();
    let dest = Mount::at(replica, mnt, &[]);
    assert_eq!(snapshot_trees(&src), snapshot_trees(&dest));
}
