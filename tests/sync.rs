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
    assert!(err.contains("not a replica"), "{err}");
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
