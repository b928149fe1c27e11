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

/// The JSON summary of a sync over TCP to `addr` with `key` that must succeed.
fn sync_tcp_ok(src: &str, addr: &str, key: &Path) -> serde_json::Value {
    let out = snapfs(&[
        "sync",
        src,
        &format!("tcp://{addr}"),
        "--key-file",
        key.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
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
        let v = status_line(store, key);
        v.split_whitespace().next().unwrap().to_string()
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

    // A peer that trickles its handshake a byte at a time, for longer than a
    // session may wait: the server closes it once its time to prove the key is up
    // (10 s), and serves the next.
    let trickle = {
        let addr = server.addr.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            let t0 = std::time::Instant::now();
            // A frame of 70 bytes (a Hello's length), then its bytes, slowly.
            c.write_all(&70u32.to_le_bytes()).unwrap();
            while t0.elapsed().as_secs() < 90 {
                if c.write_all(&[1]).is_err() {
                    return t0.elapsed();
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            t0.elapsed()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = to(&key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sum["snapshots"], serde_json::json!(["a", "b"]), "{sum}");
    let held = trickle.join().unwrap();
    assert!(
        held.as_secs() < 30,
        "the trickling peer was served {held:?}"
    );
    drop(server);

    src.mount(&[]);
    let mnt = dir.join("replica-mnt");
    std::fs::create_dir(&mnt).unwrap();
    let dest = Mount::at(replica, mnt, &[]);
    assert_eq!(snapshot_trees(&src), snapshot_trees(&dest));
}

/// An sshd on loopback, for this test only: its own host key, a client key it
/// authorizes for root, and a client config that uses both.
struct Sshd {
    child: std::process::Child,
    /// `ssh -F CONFIG`: the client command for `--ssh`.
    ssh: String,
    port: u16,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("sshd is installed (Debian's openssh-server; scripts/test-all.sh installs it)");
        let d = dir.join("sshd");
        std::fs::create_dir_all(&d).unwrap();
        // sshd's privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        for k in ["host", "client"] {
            let st = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(k))
                .status()
                .unwrap();
            assert!(st.success());
        }
        std::fs::copy(d.join("client.pub"), d.join("authorized_keys")).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = d.join("sshd_config");
        std::fs::write(
            &cfg,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {h}\nAuthorizedKeysFile {a}\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\n\
                 UsePAM no\nPidFile none\nLogLevel ERROR\n",
                h = d.join("host").display(),
                a = d.join("authorized_keys").display(),
            ),
        )
        .unwrap();
        let client = d.join("ssh_config");
        std::fs::write(
            &client,
            format!(
                "Host *\n  Port {port}\n  IdentityFile {k}\n  IdentitiesOnly yes\n  BatchMode yes\n  \
                 StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n",
                k = d.join("client").display(),
            ),
        )
        .unwrap();
        let child = std::process::Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .spawn()
            .unwrap();
        // Ready once it accepts connections.
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed().as_secs() < 10, "sshd did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Sshd {
            child,
            ssh: format!("ssh -F {}", client.display()),
            port,
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A POSIX ACL on `p` (through setfacl, as a user would set one).
fn setfacl(p: &Path, spec: &str) {
    let st = std::process::Command::new("setfacl")
        .args(["-m", spec])
        .arg(p)
        .status()
        .expect("setfacl (Debian's acl)");
    assert!(st.success(), "setfacl -m {spec} {}", p.display());
}

#[test]
fn a_mounted_source_replicates_over_every_transport_into_mounted_replicas() {
    let src = Mount::new();
    let dir = src.dir.path().to_path_buf();
    let key = key_file(&dir, "key", "a shared secret for the tcp replica");
    let sshd = Sshd::start(&dir);
    // Three new stores, mounted as replicas before anything is sent: one reached by
    // its mountpoint, one whose daemon listens on TCP, one over ssh by its store path.
    let port = free_port();
    let listen = format!("listen=127.0.0.1:{port},key_file={}", key.display());
    let replica = |name: &str, opts: &[&str]| {
        Mount::at(dir.join(name), dir.join(format!("{name}-mnt")), opts)
    };
    let by_path = replica("by-path", &["replica"]);
    let by_tcp = replica("by-tcp", &[&listen]);
    let by_ssh = replica("by ssh", &["replica"]);
    let dests: [(String, &Mount); 3] = [
        (by_path.mnt.display().to_string(), &by_path),
        (format!("tcp://127.0.0.1:{port}"), &by_tcp),
        (
            format!(
                "ssh://root@127.0.0.1:{}{}",
                sshd.port,
                by_ssh.store.display()
            ),
            &by_ssh,
        ),
    ];
    // A replica's tree is read-only, and empty before the first snapshot comes.
    for (url, m) in &dests {
        let err = std::fs::write(m.path("x"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{url}");
        assert!(tree_digest(&m.mnt).is_empty(), "{url}");
    }
    populate(&src.mnt, 21);
    setfacl(&src.path("docs/f5"), "u:4321:rw");
    let rounds = ["one", "two", "three"];
    for (round, name) in rounds.iter().enumerate() {
        if round > 0 {
            let r = round as u64 + 21;
            churn(&src.mnt, r);
            std::fs::rename(src.path("docs/deep"), src.path(&format!("deep-{r}"))).unwrap();
            std::fs::create_dir(src.path("docs/deep")).unwrap();
            std::fs::hard_link(src.path(&format!("new-{r}")), src.path(&format!("hl-{r}")))
                .unwrap();
            std::os::unix::fs::symlink(format!("new-{r}"), src.path(&format!("sl-{r}"))).unwrap();
            setfacl(&src.path(&format!("new-{r}")), "g:777:r");
        }
        let out = snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), name]);
        assert!(out.status.success());
        for (url, _) in &dests {
            // The source stays mounted: its daemon sends.
            let out = snapfs(&[
                "sync",
                src.mnt.to_str().unwrap(),
                url,
                "--json",
                "--key-file",
                key.to_str().unwrap(),
                "--ssh",
                &sshd.ssh,
                "--remote-snapfs",
                SNAPFS,
            ]);
            assert!(
                out.status.success(),
                "sync to {url}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let sum: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(sum["snapshots"], serde_json::json!([name]), "{url}: {sum}");
            if round > 0 {
                let payload = sum["payload_bytes"].as_u64().unwrap();
                assert!(
                    payload < 600_000,
                    "{url}: incremental sent {payload}: {sum}"
                );
            }
        }
        // Every destination, still mounted, shows every snapshot as the source does
        // under its `.snapshots/`, and the newest as its tree.
        let want = snapshot_trees(&src);
        assert_eq!(want.len(), round + 1);
        let newest = tree_digest(&src.path(&format!(".snapshots/{name}")));
        for (url, m) in &dests {
            assert_eq!(snapshot_trees(m), want, "{url} after {name}");
            assert_eq!(tree_digest(&m.mnt), newest, "{url}: the tree after {name}");
            let err = std::fs::remove_file(m.path(&format!("hl-{}", round + 21))).unwrap_err();
            assert!(
                matches!(err.raw_os_error(), Some(libc::EROFS | libc::ENOENT)),
                "{url}: {err}"
            );
        }
    }
    // A replica takes no snapshot of its own.
    let out = snapfs(&["snapshot", "create", by_path.mnt.to_str().unwrap(), "mine"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replica"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A far side without snapfs: ssh's own words reach the user.
    let out = snapfs(&[
        "sync",
        src.mnt.to_str().unwrap(),
        &dests[2].0,
        "--ssh",
        &sshd.ssh,
        "--remote-snapfs",
        "/nonexistent/snapfs",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the remote command failed") && err.contains("/nonexistent/snapfs"),
        "{err}"
    );
    // The ACLs travelled (the digest compares xattrs; this says the ACL is one).
    let acl = xattr_names(&src.path(".snapshots/three/docs/f5"));
    assert!(
        acl.iter().any(|n| n == "system.posix_acl_access"),
        "{acl:?}"
    );
    // A volume restored over ssh from the mounted replica (its daemon sends) has
    // every snapshot, and the source keeps no cursor for it.
    let restored = dir.join("restored");
    let out = snapfs_ok(&[
        "restore",
        &dests[2].0,
        restored.to_str().unwrap(),
        "--ssh",
        &sshd.ssh,
        "--remote-snapfs",
        SNAPFS,
    ]);
    assert!(out.contains("3 snapshots"), "{out}");
    let want = snapshot_trees(&src);
    let rm = Mount::at(restored, dir.join("restored-mnt"), &[]);
    assert_eq!(snapshot_trees(&rm), want);
    assert_eq!(
        tree_digest(&rm.mnt),
        tree_digest(&src.path(".snapshots/three"))
    );
    let st = snapfs_ok(&["status", by_ssh.mnt.to_str().unwrap()]);
    assert!(!st.contains("synced to:"), "{st}");
}

#[test]
fn a_mounted_replica_is_not_held_by_an_idle_peer_and_a_failed_receive_says_so() {
    let mut src = Mount::new();
    let dir = src.dir.path().to_path_buf();
    let key = key_file(&dir, "key", "a shared secret for the idle peer");
    let port = free_port();
    let listen = format!("listen=127.0.0.1:{port},key_file={}", key.display());
    let replica = Mount::at(dir.join("replica"), dir.join("replica-mnt"), &[&listen]);
    populate(&src.mnt, 31);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "one"]);
    // A peer that connects to the replica's listener and says nothing: until it has
    // proven the key it holds nothing, so a sync by the mountpoint goes on at once.
    let idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    // The listener takes it at once: give it the time to.
    std::thread::sleep(std::time::Duration::from_millis(500));
    sync_ok(&src.mnt, &replica.mnt);
    // The idle peer is still connected (the listener cuts it off 10 s after it came):
    // the sync did not wait for it.
    idle.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = std::io::Read::read(&mut &idle, &mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the idle peer was cut off before the sync ended: {r:?}"
    );
    assert_eq!(snapshot_names(&replica.store), ["one"]);
    // `snapfs receive` relaying to the daemon: a stream that is not a session fails,
    // with a non-zero exit, and the replica is unchanged.
    let out = receive_from(&replica.store, &[9, 0, 0, 0, 1, 2, 3]);
    assert!(!out.status.success(), "a broken stream was received");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("receive into"), "{err}");
    // A stream the daemon refuses (a source of another protocol version): the
    // daemon's error comes back, and the exit is non-zero.
    let hello = {
        use snapfs::sync::wire::{Frame, FrameWriter};
        let mut w = FrameWriter::new(Vec::new(), None);
        w.send(&Frame::Hello {
            version: 999,
            volume: [1; 16],
            origin: [1; 16],
            succeeds: [0; 16],
            writer: [1; 16],
            block_size: 64 * 1024,
            nonce: [0; 32],
            dry_run: false,
        })
        .unwrap();
        w.into_inner()
    };
    let out = receive_from(&replica.store, &hello);
    assert!(
        !out.status.success(),
        "a stream of another version was received"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("version 999"), "{err}");
    let before = tree_digest(&replica.mnt);
    assert_eq!(before, tree_digest(&src.path(".snapshots/one")));
    // And the replica still receives.
    std::fs::write(src.path("later"), b"later").unwrap();
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "two"]);
    sync_ok(&src.mnt, &replica.mnt);
    assert_eq!(std::fs::read(replica.path("later")).unwrap(), b"later");
    drop(idle);
    src.unmount();
}

/// `snapfs receive STORE` fed `input` on its stdin, to its end.
fn receive_from(store: &Path, input: &[u8]) -> std::process::Output {
    let mut child = std::process::Command::new(SNAPFS)
        .args(["receive", store.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, input).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// The segment files of a store, largest first.
fn segments(store: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(store.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .map(|p| {
            let n = std::fs::metadata(&p).unwrap().len();
            (p, n)
        })
        .collect();
    v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    v
}

#[test]
fn extents_lost_on_the_replica_ride_on_the_next_push() {
    let mut src = Mount::new();
    let dir = src.dir.path().to_path_buf();
    let replica = dir.join("replica");
    populate(&src.mnt, 31);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "one"]);
    src.unmount();
    sync_ok(&src.store, &replica);

    // Behind snapfs's back, the second half of the replica's largest segment goes.
    let (seg, len) = segments(&replica).remove(0);
    assert!(len > 1 << 20, "{seg:?} holds {len} bytes");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let f = snapfs(&["fsck", replica.to_str().unwrap()]);
    assert!(!f.status.success(), "fsck does not see the loss");

    // A new snapshot: the next sync repairs the replica on the one connection.
    src.mount(&[]);
    churn(&src.mnt, 32);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "two"]);
    src.unmount();
    let out = std::process::Command::new(SNAPFS)
        .args([
            "sync",
            src.store.to_str().unwrap(),
            replica.to_str().unwrap(),
        ])
        .arg("--json")
        .env("SNAPFS_LOG", "snapfs::sync=trace")
        .output()
        .unwrap();
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{trace}");
    let sum: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sum["snapshots"], serde_json::json!(["two"]), "{sum}");
    // One handshake, one snapshot; the lost extents were asked for in the
    // acknowledgements and came in the pushes that followed.
    let count = |what: &str| trace.lines().filter(|l| l.contains(what)).count();
    assert_eq!(count("sync: hello"), 1, "{trace}");
    assert_eq!(count("sync: begin"), 1, "{trace}");
    let asked: u64 = trace
        .lines()
        .filter(|l| l.contains("sync: ack"))
        .filter_map(|l| l.split("missing=").nth(1))
        .map(|m| m.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(asked > 0, "{trace}");
    assert!(
        sum["extents_sent"].as_u64().unwrap() >= asked.min(1),
        "{sum}"
    );
    // Lost data far exceeds what the churn changed: it did travel.
    let payload = sum["payload_bytes"].as_u64().unwrap();
    assert!(
        payload > len / 4,
        "{payload} bytes repaired of {len}: {sum}"
    );

    let f = snapfs(&["fsck", replica.to_str().unwrap(), "--read-data"]);
    assert!(
        f.status.success(),
        "{}{}",
        String::from_utf8_lossy(&f.stdout),
        String::from_utf8_lossy(&f.stderr)
    );
    src.mount(&[]);
    let mnt = dir.join("replica-mnt");
    std::fs::create_dir(&mnt).unwrap();
    let dest = Mount::at(replica, mnt, &[]);
    assert_eq!(snapshot_trees(&src), snapshot_trees(&dest));
}

/// `mib` MiB of files of 64 MiB under `dir`, `f0`, `f1`..., from seeds `seed`...
fn write_files(dir: &Path, mib: usize, seed: u64) {
    for i in 0..mib / 64 {
        std::fs::write(
            dir.join(format!("f{i}")),
            pattern(seed + i as u64, 64 << 20),
        )
        .unwrap();
    }
}

/// The number in environment variable `name`, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Bytes in a store's segment files: every extent it was ever sent, kept or not.
fn segment_bytes(store: &Path) -> u64 {
    if !store.join("segments").exists() {
        return 0;
    }
    segments(store).iter().map(|(_, n)| n).sum()
}

/// The snapshots of an unmounted store, by name.
fn snapshot_names(store: &Path) -> Vec<String> {
    names_listed(&snapfs(&[
        "snapshot",
        "list",
        store.to_str().unwrap(),
        "--json",
    ]))
}

#[test]
fn an_interrupted_sync_resumes_without_a_partial_snapshot() {
    // SNAPFS_TEST_SYNC_MIB scales the volume (1 GiB by default) and
    // SNAPFS_TEST_SYNC_CUTS the number of interruptions (20).
    let mib: usize = env_or("SNAPFS_TEST_SYNC_MIB", 1024);
    let cuts: u64 = env_or("SNAPFS_TEST_SYNC_CUTS", 20);
    let mut src = Mount::new();
    let dir = src.dir.path().to_path_buf();
    write_files(&src.mnt, mib, 1000);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "big"]);
    src.unmount();
    let key = key_file(&dir, "key", "a key for the interrupted replica");
    // What a sync that is never cut leaves in the segments.
    let clean = dir.join("clean");
    sync_ok(&src.store, &clean);
    let clean_bytes = segment_bytes(&clean);
    assert!(clean_bytes >= (mib as u64) << 20, "{clean_bytes}");

    let replica = dir.join("replica");
    let mut server = Server::start(&replica, &key);
    let start_sync = |addr: &str| {
        std::process::Command::new(SNAPFS)
            .args(["sync", src.store.to_str().unwrap()])
            .arg(format!("tcp://{addr}"))
            .arg("--key-file")
            .arg(&key)
            .arg("--json")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // Cut k comes once the replica has received about (k + 1) / (cuts + 2) of the
    // volume, give or take a random part of a step: spread over the whole transfer,
    // whatever the machine's speed.
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ std::process::id() as u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let step = clean_bytes / (cuts + 2);
    let mut done_early = false;
    for k in 0..cuts {
        let goal = step * (k + 1) + next() % step;
        let mut client = start_sync(&server.addr);
        let t0 = std::time::Instant::now();
        let mut finished = false;
        while segment_bytes(&replica) < goal {
            if client.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            assert!(t0.elapsed().as_secs() < 120, "cut {k}: no progress");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // Alternately the sending side dies, or the receiving daemon (restarted).
        let _ = client.kill();
        let _ = client.wait();
        if k % 2 == 1 {
            drop(server);
            server = Server::start(&replica, &key);
        }
        // Never a partial snapshot: none, or the whole one.
        let names = snapshot_names(&replica);
        if finished || !names.is_empty() {
            assert_eq!(names, ["big"], "cut {k}");
            done_early = true;
            break;
        }
    }
    assert!(!done_early, "the sync finished before every cut was made");
    // What the cut runs left staged is no damage: fsck finds the replica clean.
    let f = snapfs(&["fsck", replica.to_str().unwrap()]);
    assert!(
        f.status.success(),
        "fsck after the cuts: {}",
        String::from_utf8_lossy(&f.stdout)
    );
    let staged = segment_bytes(&replica);
    let sum = sync_tcp_ok(src.store.to_str().unwrap(), &server.addr, &key);
    assert_eq!(sum["snapshots"], serde_json::json!(["big"]), "{sum}");
    drop(server);
    // Everything received more than once, against what the cut runs had staged.
    let resent = segment_bytes(&replica).saturating_sub(clean_bytes);
    eprintln!(
        "{cuts} cuts: {staged} bytes staged by the cut runs, final run sent {} of {clean_bytes}, {resent} bytes received twice",
        sum["payload_bytes"]
    );
    assert!(
        resent * 10 < staged,
        "{resent} bytes received again of {staged} staged: {sum}"
    );
    let f = snapfs(&["fsck", replica.to_str().unwrap(), "--read-data"]);
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
    src.mount(&[]);
    let mnt = dir.join("replica-mnt");
    std::fs::create_dir(&mnt).unwrap();
    let dest = Mount::at(replica, mnt, &[]);
    assert_eq!(snapshot_trees(&src), snapshot_trees(&dest));
}

#[test]
fn dedup_holds_on_the_wire() {
    // SNAPFS_TEST_DEDUP_MIB: the unique data, written four times over (1 GiB).
    let mib: usize = env_or("SNAPFS_TEST_DEDUP_MIB", 1024);
    let mut src = Mount::new();
    let dir = src.dir.path().to_path_buf();
    for copy in 0..4 {
        let d = src.path(&format!("copy{copy}"));
        std::fs::create_dir(&d).unwrap();
        write_files(&d, mib, 500);
    }
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "one"]);
    // 10 MiB changed: 1 MiB in each of ten files of the first copy.
    for i in 0..10 {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(src.path(&format!("copy0/f{}", i % (mib / 64))))
            .unwrap();
        f.write_all_at(
            &pattern(9000 + i as u64, 1 << 20),
            (i as u64 / 16 + 3) << 20,
        )
        .unwrap();
    }
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "two"]);
    src.unmount();
    let replica = dir.join("replica");
    let full = sync_ok(&src.store, &replica);
    let unique = (mib as u64) << 20;
    let payload = full["payload_bytes"].as_u64().unwrap();
    eprintln!("full: {full}");
    assert_eq!(
        full["snapshots"],
        serde_json::json!(["one", "two"]),
        "{full}"
    );
    // Both snapshots: the unique data once, and the 10 MiB the second changed.
    let changed = 10u64 << 20;
    assert!(payload >= unique + changed, "{payload}: {full}");
    assert!(
        payload as f64 <= 1.05 * unique as f64 + changed as f64,
        "{payload} bytes of payload for {unique} unique: {full}"
    );
    // The incremental alone, to a replica holding the first snapshot only.
    let second = dir.join("second");
    let out = sync(&src.store, &second, &["--snapshot", "one", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inc = sync_ok(&src.store, &second);
    eprintln!("incremental: {inc}");
    assert_eq!(inc["snapshots"], serde_json::json!(["two"]), "{inc}");
    let p = inc["payload_bytes"].as_u64().unwrap();
    assert!(
        p >= changed && p as f64 <= 1.05 * changed as f64,
        "{p} bytes of payload for {changed} changed: {inc}"
    );
    // Metadata: the changed block records, not the volume's.
    let wire = inc["wire_bytes"].as_u64().unwrap();
    assert!(wire < p + (1 << 20), "{wire} bytes on the wire: {inc}");
}

#[test]
fn bwlimit_caps_the_rate() {
    let mut src = Mount::new();
    std::fs::write(src.path("f"), pattern(77, 6 << 20)).unwrap();
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "one"]);
    src.unmount();
    let replica = src.dir.path().join("replica");
    let t0 = std::time::Instant::now();
    let out = sync(&src.store, &replica, &["--bwlimit", "2M", "--json"]);
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let wire = sum["wire_bytes"].as_u64().unwrap() as f64;
    // The source's frames at 2 MiB/s at most (the destination's few answers are not
    // paced): at least 6 MiB / 2 MiB/s, less the first frame's head start.
    assert!(wire > (6 << 20) as f64, "{sum}");
    assert!(
        secs >= 0.9 * wire / (2 << 20) as f64 - 0.5,
        "{secs} s for {wire} bytes"
    );
    let bad = sync(&src.store, &replica, &["--bwlimit", "10"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("at least 128K"));
}

/// The value after `key` on the line of `snapfs status TARGET` that starts with it.
fn status_line(target: &Path, key: &str) -> String {
    let out = snapfs(&["status", target.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in {text}"))
        .trim()
        .to_string()
}

#[test]
fn the_base_is_held_and_a_deleted_base_still_serves_an_incremental() {
    let src = Mount::new();
    let replica = src.dir.path().join("replica");
    populate(&src.mnt, 41);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "one"]);
    let first = sync_ok(&src.mnt, &replica);
    assert_eq!(first["snapshots"], serde_json::json!(["one"]));
    // Both sides name the relationship and the base.
    let dest_volume = status_line(&replica, "volume:");
    let sent = status_line(&src.mnt, "synced to:");
    assert!(sent.starts_with(&dest_volume), "{sent}");
    assert!(sent.contains("base one"), "{sent}");
    assert!(status_line(&replica, "last received:").contains("base one"));
    let list = |all: bool| {
        let mut a = vec!["snapshot", "list", src.mnt.to_str().unwrap(), "--json"];
        if all {
            a.push("--all");
        }
        let out = snapfs(&a);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let held_by = |v: &serde_json::Value| v[0]["holds"].to_string();
    assert!(
        held_by(&list(false)).contains(&dest_volume),
        "{}",
        list(false)
    );

    // Deleting the base hides it at once and keeps it, held.
    let out = snapfs(&["snapshot", "delete", src.mnt.to_str().unwrap(), "one"]);
    assert!(out.status.success());
    assert_eq!(list(false), serde_json::json!([]));
    assert_eq!(list(true).as_array().unwrap().len(), 1, "{}", list(true));
    // The next snapshot goes as an incremental from it, and only then is it freed.
    churn(&src.mnt, 42);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "two"]);
    let inc = sync_ok(&src.mnt, &replica);
    assert_eq!(inc["snapshots"], serde_json::json!(["two"]), "{inc}");
    let payload = inc["payload_bytes"].as_u64().unwrap();
    assert!(payload < 600_000, "a whole send ({payload} bytes): {inc}");
    let all = list(true);
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    assert_eq!(all[0]["name"], "two", "{all}");
    assert!(held_by(&all).contains(&dest_volume), "{all}");
    assert!(status_line(&src.mnt, "synced to:").contains("base two"));
    let mnt = src.dir.path().join("replica-mnt");
    std::fs::create_dir(&mnt).unwrap();
    let dest = Mount::at(replica, mnt, &[]);
    let two = snapshot_trees(&dest)
        .into_iter()
        .find(|(n, _)| n == "two")
        .unwrap()
        .1;
    assert_eq!(two, tree_digest(&src.path(".snapshots/two")));
}

#[test]
fn a_dry_run_says_what_would_go_and_changes_nothing() {
    let mut src = Mount::new();
    let replica = src.dir.path().join("replica");
    populate(&src.mnt, 51);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "one"]);
    // To a destination that does not exist yet: it still does not, after.
    let out = sync(&src.mnt, &replica, &["--dry-run", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dry["would_send"][0]["snapshot"], "one", "{dry}");
    assert!(!replica.exists());
    sync_ok(&src.mnt, &replica);
    churn(&src.mnt, 52);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "two"]);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "three"]);
    let before = status_line(&src.mnt, "synced to:");
    let out = sync(&src.mnt, &replica, &["--dry-run", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plan = dry["would_send"].as_array().unwrap();
    assert_eq!(plan.len(), 2, "{dry}");
    assert_eq!(plan[0]["snapshot"], "two");
    assert_eq!(plan[1]["snapshot"], "three");
    assert!(plan[0]["records"].as_u64().unwrap() > 0, "{dry}");
    // three has nothing two lacks.
    assert_eq!(plan[1]["records"], 0, "{dry}");
    assert_eq!(dry["payload_bytes"], 0, "{dry}");
    // Nothing changed on either side.
    assert_eq!(snapshot_names(&replica), ["one"]);
    assert_eq!(status_line(&src.mnt, "synced to:"), before);
    // The real run sends what the dry run announced, at most.
    let real = sync_ok(&src.mnt, &replica);
    assert_eq!(
        real["snapshots"],
        serde_json::json!(["two", "three"]),
        "{real}"
    );
    assert_eq!(real["records"], plan[0]["records"], "{real}");
    assert!(
        real["payload_bytes"].as_u64().unwrap() <= plan[0]["bytes_at_most"].as_u64().unwrap(),
        "{real} {dry}"
    );
    // With nothing to send, from the store unmounted this time: nothing recorded on
    // either side.
    src.unmount();
    let (sent, received) = (
        status_line(&src.store, "synced to:"),
        status_line(&replica, "last received:"),
    );
    let out = sync(&src.store, &replica, &["--dry-run", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dry["would_send"], serde_json::json!([]), "{dry}");
    assert_eq!(status_line(&src.store, "synced to:"), sent);
    assert_eq!(status_line(&replica, "last received:"), received);
}

/// A hand-made source for a `snapfs serve` at `addr`: the keyed handshake done, the
/// destination's `Holding` read. Returns the two halves.
fn crafted_session(
    addr: &str,
    secret: &str,
    volume: [u8; 16],
) -> (
    snapfs::sync::wire::FrameReader<std::net::TcpStream>,
    snapfs::sync::wire::FrameWriter<std::net::TcpStream>,
) {
    use snapfs::sync::wire::*;
    let key = key_from_file_bytes(secret.as_bytes()).unwrap();
    let conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut r = FrameReader::new(conn.try_clone().unwrap(), None);
    let mut w = FrameWriter::new(conn, None);
    let nonce = [7u8; 32];
    let hello = Frame::Hello {
        version: VERSION,
        volume,
        origin: volume,
        succeeds: [0; 16],
        writer: volume,
        block_size: 64 * 1024,
        nonce,
        dry_run: false,
    };
    let hello_body = hello.encode().1;
    w.send(&hello).unwrap();
    let their = match r.read_frame().unwrap() {
        Some(Frame::Welcome {
            proof: p, nonce, ..
        }) => {
            assert_eq!(p, proof(&key, &[7u8; 32], "sink", &hello_body));
            nonce
        }
        f => panic!("{f:?}"),
    };
    w.send(&Frame::Proof {
        proof: proof(&key, &their, "source", &hello_body),
    })
    .unwrap();
    let sk = session_key(&key, &nonce, &their);
    w.set_key(sk);
    r.set_key(sk);
    match r.read_frame().unwrap() {
        Some(Frame::Holding { .. }) => {}
        f => panic!("{f:?}"),
    }
    (r, w)
}

#[test]
fn a_live_receiver_refuses_crafted_streams_and_keeps_serving() {
    use snapfs::sync::wire::{Frame, Record, SnapRef};
    let mut src = Mount::new();
    let dir = src.dir.path().to_path_buf();
    populate(&src.mnt, 61);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "one"]);
    let secret = "the key of the crafted streams test";
    let key = key_file(&dir, "key", secret);
    let replica = dir.join("replica");
    let server = Server::start(&replica, &key);
    let url = format!("tcp://{}", server.addr);
    let sync_tcp = || {
        snapfs(&[
            "sync",
            src.mnt.to_str().unwrap(),
            &url,
            "--key-file",
            key.to_str().unwrap(),
            "--json",
        ])
    };
    assert!(sync_tcp().status.success());
    let volume: [u8; 16] = snapfs::store::unhex(&status_line(&src.mnt, "volume:")).unwrap();
    let begin = |base: &str| Frame::Begin {
        snapshot: SnapRef {
            name: "evil".into(),
            created_sec: 1,
            created_nsec: 0,
        },
        base: Some(base.into()),
    };
    let data = vec![9u8; 4096];
    let hash = *blake3::hash(&data).as_bytes();
    // A block record naming the extent of `data` (a whole block).
    let mut block = Vec::new();
    snapfs::store::schema::BlockRec::whole(hash, 4096).encode(&mut block);
    let rec = |kind: u8, name: &[u8], payload: Option<Vec<u8>>| Record {
        ino: 5,
        kind,
        sub: 0,
        name: name.to_vec(),
        payload,
    };
    // Each case: frames after the handshake (None: raw bytes instead), and what the
    // receiver's Error frame must say.
    type Case = (Vec<Frame>, Option<Vec<u8>>, &'static str);
    let mut cases: Vec<Case> = vec![
        (
            vec![Frame::Hello {
                version: 2,
                volume,
                origin: volume,
                succeeds: [0; 16],
                writer: volume,
                block_size: 65536,
                nonce: [0; 32],
                dry_run: false,
            }],
            None,
            "expected begin or done",
        ),
        (vec![begin("no-such-base")], None, "lacks the base snapshot"),
        (
            vec![
                begin("one"),
                Frame::Records {
                    batch: 0,
                    records: vec![rec(2, b"", Some(block.clone()))],
                },
            ],
            None,
            "",
        ),
        (
            vec![
                begin("one"),
                Frame::Records {
                    batch: 0,
                    records: vec![],
                },
                Frame::Records {
                    batch: 1,
                    records: vec![],
                },
            ],
            None,
            "an empty batch",
        ),
        (
            (0..100)
                .map(|i| Frame::Plan {
                    snapshot: SnapRef {
                        name: format!("p{i}"),
                        created_sec: 1,
                        created_nsec: 0,
                    },
                    records: 0,
                    extents: 0,
                    bytes: 0,
                })
                .collect(),
            None,
            "plans without the snapshots",
        ),
        (vec![], Some(vec![0xff; 5]), "frame of 4294967295 bytes"),
        (vec![], Some(vec![9, 0, 0, 0, 5, 1, 2]), ""),
    ];
    // Bad names, each in an entry record (one over 255 bytes no encoder writes: the
    // decoder's own test has it).
    for name in [&b"."[..], b"..", b"a/b", b"a\0b"] {
        cases.push((
            vec![
                begin("one"),
                Frame::Records {
                    batch: 0,
                    records: vec![rec(1, name, None)],
                },
            ],
            None,
            "name",
        ));
    }
    for (i, (frames, raw, want)) in cases.into_iter().enumerate() {
        let (mut r, mut w) = crafted_session(&server.addr, secret, volume);
        for f in &frames {
            w.send(f).unwrap();
        }
        if let Some(b) = &raw {
            use std::io::Write;
            w.flush().unwrap();
            let mut c = w.into_inner();
            c.write_all(b).unwrap();
            if want.is_empty() {
                // Cut short, then gone.
                drop(c);
                continue;
            }
            let said = match r.read_frame() {
                Ok(Some(Frame::Error { message })) => message,
                other => panic!("case {i}: {other:?}"),
            };
            assert!(said.contains(want), "case {i}: {said}");
            continue;
        }
        w.flush().unwrap();
        if want.is_empty() {
            // The extent named is asked for; the bytes sent are not its own.
            match r.read_frame().unwrap() {
                Some(Frame::Ack { missing, .. }) => assert_eq!(missing, vec![hash]),
                f => panic!("case {i}: {f:?}"),
            }
            w.send(&Frame::Extent {
                hash,
                data: vec![8u8; 4096],
            })
            .unwrap();
            w.flush().unwrap();
            match r.read_frame() {
                Ok(Some(Frame::Error { message })) => {
                    assert!(message.contains("does not match its hash"), "{message}")
                }
                other => panic!("case {i}: {other:?}"),
            }
            continue;
        }
        let said = loop {
            match r.read_frame() {
                Ok(Some(Frame::Error { message })) => break message,
                Ok(Some(Frame::Ack { .. })) => continue,
                other => panic!("case {i}: {other:?}"),
            }
        };
        assert!(said.contains(want), "case {i}: {said}");
    }
    // Unchanged, and still serving.
    assert_eq!(snapshot_names(&replica), ["one"]);
    churn(&src.mnt, 62);
    snapfs(&["snapshot", "create", src.mnt.to_str().unwrap(), "two"]);
    let out = sync_tcp();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshot_names(&replica), ["one", "two"]);
    src.unmount();
}

/// `snapfs status` of a mount once its replication line for `dest` holds `needle`
/// (waits at most `secs`).
fn replication_line(m: &Mount, dest: &str, needle: &str, secs: u64) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let text = snapfs_ok(&["status", m.mnt.to_str().unwrap()]);
        let line = text
            .lines()
            .find(|l| l.starts_with("replicate to:") && l.contains(dest))
            .unwrap_or_else(|| panic!("no replication line for {dest} in:\n{text}"))
            .to_string();
        if line.contains(needle) {
            return line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{dest} never showed {needle:?}: {line}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// How many snapshots a replication line says the destination lacks, once it has
/// one.
fn lag_of(line: &str) -> Option<usize> {
    line.split_once(" (")
        .and_then(|(_, r)| r.split_once(" newer here"))
        .and_then(|(n, _)| n.parse().ok())
}

/// The replication line for `dest` once it is at most `lag` snapshots behind.
fn within(m: &Mount, dest: &str, lag: usize, secs: u64) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let line = replication_line(m, dest, "newer here", 5);
        let n = lag_of(&line).unwrap_or_else(|| panic!("no lag in {line}"));
        if n <= lag && !line.contains("failing") {
            return line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{dest} never came within {lag}: {line}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn scheduled_replication_keeps_every_destination_close_and_prunes_on_both_sides() {
    let dir = test_dir();
    // One destination a plain store, the other a mounted replica with a retention
    // of its own.
    let d1 = dir.path().join("d1");
    let mut r = Mount::at(
        dir.path().join("d2"),
        dir.path().join("d2mnt"),
        &["replica", "keep=last:2"],
    );
    let d2 = r.mnt.to_str().unwrap().to_string();
    // SNAPFS_TEST_SCHEDULE_SECS: how long the writes go on (60 s), a snapshot every
    // SNAPFS_TEST_SCHEDULE_EVERY (5s).
    let secs: u64 = env_or("SNAPFS_TEST_SCHEDULE_SECS", 60);
    let every: String = env_or("SNAPFS_TEST_SCHEDULE_EVERY", "5s".to_string());
    let opt = format!(
        "snapshot_every={every},keep=last:4,replicate={}+{d2}",
        d1.display()
    );
    let mut m = Mount::with_options(&[&opt]);
    let dests = [d1.to_str().unwrap().to_string(), d2.clone()];
    // Every destination stays within one snapshot of the source the whole time:
    // sampled every second once each has had its first session.
    let t0 = std::time::Instant::now();
    let (mut i, mut samples, mut worst) = (0u64, 0u32, 0usize);
    while t0.elapsed().as_secs() < secs {
        std::fs::write(m.path(&format!("f{}", i % 24)), pattern(i, 100_000)).unwrap();
        i += 1;
        std::thread::sleep(std::time::Duration::from_secs(1));
        let text = snapfs_ok(&["status", m.mnt.to_str().unwrap()]);
        for dest in &dests {
            let line = text
                .lines()
                .find(|l| l.starts_with("replicate to:") && l.contains(dest.as_str()))
                .unwrap_or_else(|| panic!("no line for {dest}: {text}"));
            if let Some(lag) = lag_of(line) {
                samples += 1;
                worst = worst.max(lag);
                assert!(lag <= 1, "{dest} fell behind: {line}");
                assert!(!line.contains("failing"), "{line}");
            }
        }
    }
    assert!(samples as u64 >= secs, "{samples} samples in {secs} s");
    eprintln!("{samples} samples, the most a destination lagged: {worst}");
    // Both catch up with the newest snapshot ("0 newer here").
    let newest = |m: &Mount| {
        let out = snapfs_ok(&["snapshot", "list", m.mnt.to_str().unwrap(), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array().unwrap().last().unwrap()["name"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Every destination stays within one snapshot of the source.
    for dest in [d1.to_str().unwrap(), d2.as_str()] {
        within(&m, dest, 1, 30);
    }
    let here = newest(&m);
    m.unmount();
    // The source kept its last 4; each destination has the source's newest as it was
    // when it last synced (within a snapshot of the end), and the mounted replica
    // pruned to its own last 2.
    let src = snapshot_names(&m.store);
    assert_eq!(src.len(), 4, "{src:?}");
    let got1 = snapshot_names(&d1);
    let last1 = got1.last().unwrap().clone();
    assert!(src.contains(&last1) || last1 == here, "{got1:?} vs {src:?}");
    r.unmount();
    // (A session the source's unmount cut may have committed one more first.)
    let got2 = snapshot_names(&r.store);
    assert!(
        (2..=3).contains(&got2.len()),
        "the replica's keep=last:2: {got2:?}"
    );
    // What reached the destinations is the source's data, byte for byte.
    let (s, d) = (m.store.clone(), d1.clone());
    m.mount(&[]);
    let tree = tree_digest(&m.path(&format!(".snapshots/{last1}")));
    m.unmount();
    let mut dm = Mount::at(d, dir.path().join("d1mnt"), &[]);
    assert_eq!(tree_digest(&dm.path(&format!(".snapshots/{last1}"))), tree);
    dm.unmount();
    drop(s);
}

#[test]
fn a_destination_that_is_down_catches_up_one_incremental_per_snapshot() {
    let dir = test_dir();
    let key = key_file(dir.path(), "key", "a shared secret for replication tests");
    let dest = dir.path().join("dest");
    // Bind the port first so that it is known, then close it: nothing listens yet.
    let port = free_port();
    let target = format!("tcp://127.0.0.1:{port}");
    let opt = format!(
        "snapshot_every=1s,replicate={target},replicate_key_file={}",
        key.display()
    );
    let mut m = Mount::with_options(&[&opt]);
    std::fs::write(m.path("a"), pattern(1, 50_000)).unwrap();
    // Down: it fails and says so, and retries.
    let line = replication_line(&m, &target, "failing since", 20);
    assert!(line.contains("tries)"), "{line}");
    std::thread::sleep(std::time::Duration::from_secs(3));
    // Up: a server on that port. The next scheduled snapshot (or the retry) sends
    // every snapshot taken meanwhile, oldest first, each as an incremental.
    let server = std::process::Command::new(SNAPFS)
        .args(["serve", dest.to_str().unwrap(), "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--key-file")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(server);
    within(&m, &target, 1, 60);
    m.unmount();
    drop(_server);
    let src = snapshot_names(&m.store);
    let got = snapshot_names(&dest);
    // Every snapshot the source took up to the destination's newest arrived, each
    // of them (not just the newest): the ones taken while it was down too.
    let last = got.last().expect("something arrived");
    let upto: Vec<String> = src
        .iter()
        .take_while(|s| *s != last)
        .chain(std::iter::once(last))
        .cloned()
        .collect();
    assert_eq!(got, upto);
    assert!(
        got.len() >= 4,
        "caught up on the snapshots taken while down: {got:?}"
    );
}

#[test]
fn replicate_destinations_that_cannot_work_are_refused_at_mount() {
    let dir = test_dir();
    let (store, mnt) = (dir.path().join("s"), dir.path().join("m"));
    std::fs::create_dir_all(&mnt).unwrap();
    let other = dir.path().join("other");
    let key = key_file(dir.path(), "key", "a shared secret for replication tests");
    for (opt, needle) in [
        (
            format!("replicate={}", store.display()),
            "is this volume itself",
        ),
        (
            format!("replicate={}/copy", mnt.display()),
            "is this volume itself",
        ),
        (
            format!("replicate={}+{}/", other.display(), other.display()),
            "is given twice",
        ),
        (
            "replicate=tcp://127.0.0.1:9".into(),
            "needs replicate_key_file=",
        ),
        (
            format!(
                "replicate={},replicate_key_file={}",
                other.display(),
                key.display()
            ),
            "is for tcp:// destinations",
        ),
        ("replicate=ftp://host/x".into(), "unknown transport"),
        ("replicate=s3://".into(), "no bucket named"),
    ] {
        let out = snapfs(&[
            "mount",
            store.to_str().unwrap(),
            mnt.to_str().unwrap(),
            "-o",
            &opt,
        ]);
        assert!(!out.status.success(), "{opt} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{opt}: {err}");
        assert!(!snapfs::daemon::is_mounted(&mnt));
    }
}

#[test]
fn scheduled_replication_survives_a_kill_9_of_either_side_mid_session() {
    // SNAPFS_TEST_REPLICATE_MIB scales each of the two snapshots' new data (256 MiB).
    let mib: usize = env_or("SNAPFS_TEST_REPLICATE_MIB", 256);
    let dir = test_dir();
    let key = key_file(dir.path(), "key", "a key for the replication that is cut");
    let dest = dir.path().join("dest");
    let server = Server::start(&dest, &key);
    let addr = server.addr.clone();
    let target = format!("tcp://{addr}");
    // No scheduled snapshot during the test: the manual ones wake the replicator.
    let opt = format!(
        "snapshot_every=1h,replicate={target},replicate_key_file={}",
        key.display()
    );
    let mut m = Mount::with_options(&[&opt]);
    let restart = |store: &Path| {
        std::process::Command::new(SNAPFS)
            .args(["serve", store.to_str().unwrap(), "--listen", &addr])
            .arg("--key-file")
            .arg(&key)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_for_bytes = |at_least: u64| {
        let t0 = std::time::Instant::now();
        while segment_bytes(&dest) < at_least {
            assert!(
                t0.elapsed().as_secs() < 120,
                "no progress into {}",
                dest.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    };
    // 1. The destination's daemon is killed mid-session, then comes back.
    write_files(&m.mnt, mib, 3000);
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s1"]);
    wait_for_bytes((mib as u64) << 18);
    drop(server); // kill -9 (SIGKILL) and reaped
    let line = replication_line(&m, &target, "failing since", 30);
    assert!(line.contains("tries)"), "{line}");
    let mut server = restart(&dest);
    within(&m, &target, 0, 120);
    // 2. The source's daemon is killed mid-session; the next mount resumes.
    write_files(&m.mnt, mib, 4000);
    std::fs::rename(m.path("f0"), m.path("moved")).unwrap();
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s2"]);
    let before = segment_bytes(&dest);
    wait_for_bytes(before + ((mib as u64) << 18));
    m.kill9();
    let at_kill = segment_bytes(&dest);
    m.mount(&[&opt]);
    within(&m, &target, 0, 120);
    assert!(
        segment_bytes(&dest) > at_kill,
        "the session was cut: the rest came after the remount"
    );
    let tree = tree_digest(&m.path(".snapshots/s2"));
    m.unmount();
    m.assert_fsck_clean();
    let _ = server.kill();
    let _ = server.wait();
    // Both stores are clean, and the replica's s2 is the source's.
    let out = snapfs(&["fsck", dest.to_str().unwrap(), "--read-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(snapshot_names(&dest), ["s1", "s2"]);
    let r = Mount::at(dest.clone(), dir.path().join("rmnt"), &[]);
    assert_eq!(tree_digest(&r.path(".snapshots/s2")), tree);
}

/// Whether writing a new file under `m` is refused as on a read-only mount.
fn refuses_writes(m: &Mount) -> bool {
    matches!(
        std::fs::write(m.path("refused"), b"x"),
        Err(e) if e.raw_os_error() == Some(libc::EROFS)
    )
}

/// The payload bytes of a sync summary.
fn payload(v: &serde_json::Value) -> u64 {
    v["payload_bytes"].as_u64().unwrap()
}

#[test]
fn failover_then_failback_moves_only_what_changed_and_keeps_what_diverged() {
    let dir = test_dir();
    let mut a = Mount::at(dir.path().join("a"), dir.path().join("amnt"), &[]);
    let b_store = dir.path().join("b");
    let a_mnt = a.mnt.to_str().unwrap().to_string();
    std::fs::write(a.path("common"), pattern(1, 4 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s1"]);
    let first = sync_ok(&a.mnt, &b_store);
    assert!(payload(&first) >= 4 << 20, "{first}");
    let s1 = tree_digest(&a.path(".snapshots/s1"));
    // The source goes on after its last sync: a snapshot and live changes that
    // never reach the replica. Its snapshot has the name the promoted replica's
    // next one will have.
    std::fs::write(a.path("a-snap"), pattern(2, 300_000)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "next"]);
    snapfs_ok(&["snapshot", "create", &a_mnt, "extra"]);
    std::fs::write(a.path("a-live"), pattern(3, 200_000)).unwrap();
    std::fs::remove_file(a.path("common")).unwrap();
    let a_next = tree_digest(&a.path(".snapshots/next"));
    let a_live = tree_digest(&a.mnt);
    a.unmount();

    // Failover: the replica is promoted, and its live tree is its newest snapshot.
    let out = snapfs_ok(&["promote", b_store.to_str().unwrap()]);
    assert!(
        out.contains("promoted") && out.contains("snapshot s1"),
        "{out}"
    );
    let mut b = Mount::at(b_store.clone(), dir.path().join("bmnt"), &[]);
    let b_mnt = b.mnt.to_str().unwrap().to_string();
    assert_eq!(tree_digest(&b.mnt), s1);
    assert!(status_line(&b.mnt, "promoted:").contains("from snapshot s1"));
    std::fs::write(b.path("b-new"), pattern(4, 500_000)).unwrap();
    snapfs_ok(&["snapshot", "create", &b_mnt, "next"]);
    let b_next = tree_digest(&b.path(".snapshots/next"));

    // The old source is refused by the promoted volume, which says why and what to
    // do; nothing changes there.
    let out = sync(&a.store, &b.mnt, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("promoted") && err.contains("demote"), "{err}");
    assert_eq!(tree_digest(&b.path(".snapshots/next")), b_next);

    // Failback: the old source is demoted and the promoted volume syncs to it: only
    // what changed since the snapshot both hold moves. The old source is mounted
    // and receives over TCP; what it shows of its own snapshot before is forgotten.
    snapfs_ok(&["demote", a.store.to_str().unwrap()]);
    assert!(status_line(&a.store, "demoted:").contains("read-only"));
    let key = key_file(dir.path(), "key", "the key of a failback");
    let port = free_port();
    a.mount(&[&format!(
        "listen=127.0.0.1:{port},key_file={}",
        key.display()
    )]);
    assert!(refuses_writes(&a), "demoted, so read-only");
    assert_eq!(tree_digest(&a.path(".snapshots/next")), a_next);
    assert_eq!(tree_digest(&a.path(".snapshots/extra")), a_next);
    let back = sync_tcp_ok(&b_mnt, &format!("127.0.0.1:{port}"), &key);
    assert_eq!(back["snapshots"], serde_json::json!(["next"]), "{back}");
    assert_eq!(tree_digest(&a.path(".snapshots/next")), b_next);
    // Its own snapshot kept aside is shown under its new name only.
    assert!(!a.path(".snapshots/extra").exists());
    a.unmount();
    assert!(
        (500_000..600_000).contains(&payload(&back)),
        "not only the promoted side's changes: {back}"
    );
    // What the old source had past s1 is kept, under diverged-<time> names.
    let names = snapshot_names(&a.store);
    let diverged: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("diverged-"))
        .collect();
    assert_eq!(diverged.len(), 3, "{names:?}");
    let kept_snap = diverged.iter().find(|n| n.ends_with("-next")).unwrap();
    assert!(diverged.iter().any(|n| n.ends_with("-extra")), "{names:?}");
    let kept_live = diverged
        .iter()
        .find(|n| !n.ends_with("-next") && !n.ends_with("-extra"))
        .unwrap();
    a.mount(&[]);
    assert!(refuses_writes(&a), "a replica again, so read-only");
    assert_eq!(
        tree_digest(&a.path(&format!(".snapshots/{kept_snap}"))),
        a_next
    );
    assert_eq!(
        tree_digest(&a.path(&format!(".snapshots/{kept_live}"))),
        a_live
    );
    assert_eq!(tree_digest(&a.path(".snapshots/next")), b_next);
    assert_eq!(tree_digest(&a.mnt), b_next);
    a.unmount();

    // And back the other way: the old source promoted again, the other demoted;
    // again only what changed goes, and the side that changed nothing past the
    // shared snapshot keeps nothing aside.
    b.unmount();
    snapfs_ok(&["promote", a.store.to_str().unwrap()]);
    snapfs_ok(&["demote", b_store.to_str().unwrap()]);
    a.mount(&[]);
    std::fs::write(a.path("a-after"), pattern(5, 100_000)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "after"]);
    let again = sync_ok(&a.mnt, &b_store);
    assert_eq!(again["snapshots"], serde_json::json!(["after"]), "{again}");
    assert!(
        (100_000..200_000).contains(&payload(&again)),
        "not only the failed-back side's changes: {again}"
    );
    let b_names = snapshot_names(&b_store);
    assert!(
        !b_names.iter().any(|n| n.starts_with("diverged-")),
        "{b_names:?}"
    );
    let after = tree_digest(&a.path(".snapshots/after"));
    a.unmount();
    a.assert_fsck_clean();
    b.mount(&[]);
    assert_eq!(tree_digest(&b.mnt), after);
    b.unmount();
    b.assert_fsck_clean();
}

#[test]
fn promote_and_demote_refuse_what_they_cannot_do() {
    let dir = test_dir();
    let mut m = Mount::at(dir.path().join("v"), dir.path().join("mnt"), &[]);
    let store = m.store.to_str().unwrap().to_string();
    // Mounted: refused, naming why.
    let out = snapfs(&["promote", &store]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unmount it first"));
    m.unmount();
    // A volume of its own is no replica to promote; one without a snapshot shares
    // nothing to fail back from.
    for (cmd, says) in [("promote", "not a replica"), ("demote", "no snapshot")] {
        let out = snapfs(&[cmd, &store]);
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(says) && err.lines().count() == 1,
            "{cmd}: {err}"
        );
    }
    // A replica: promote of a snapshot it lacks is refused.
    m.mount(&[]);
    std::fs::write(m.path("f"), b"data").unwrap();
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "one"]);
    let r = dir.path().join("r");
    sync_ok(&m.mnt, &r);
    let rs = r.to_str().unwrap();
    let out = snapfs(&["promote", rs, "--snapshot", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot named"));
    assert!(status_line(&r, "replica of:").contains("receives"));
    // Demote, then promote again before any session: the demotion is undone, and
    // the store mounts writable with its files as they were.
    m.unmount();
    snapfs_ok(&["demote", &store]);
    m.mount(&[]);
    assert!(refuses_writes(&m));
    m.unmount();
    let out = snapfs(&["promote", &store, "--same-id"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only undoes"));
    let out = snapfs_ok(&["promote", &store]);
    assert!(out.contains("undone"), "{out}");
    m.mount(&[]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"data");
    std::fs::write(m.path("g"), b"writable").unwrap();
    // A demoted store takes nothing from a volume it shares no snapshot with.
    let mut other = Mount::at(dir.path().join("o"), dir.path().join("omnt"), &[]);
    std::fs::write(other.path("x"), b"other").unwrap();
    snapfs_ok(&["snapshot", "create", other.mnt.to_str().unwrap(), "x1"]);
    m.unmount();
    snapfs_ok(&["demote", &store]);
    // A demoted store waits for the volume that took over from it, not any other.
    let out = sync(&other.mnt, &m.store, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not take over from it"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One that took over from it (its replica, promoted with its identity) but
    // shares no snapshot with it any more: a whole send is refused.
    snapfs_ok(&["promote", rs, "--same-id"]);
    snapfs_ok(&["snapshot", "delete", rs, "one"]);
    let mut rm = Mount::at(r.clone(), dir.path().join("rmnt"), &[]);
    std::fs::write(rm.path("g"), b"after").unwrap();
    snapfs_ok(&["snapshot", "create", rm.mnt.to_str().unwrap(), "two"]);
    rm.unmount();
    let out = sync(&r, &m.store, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shares no snapshot"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshot_names(&m.store), ["one"]);
    other.unmount();
    m.assert_fsck_clean();
}

#[test]
fn restore_after_the_source_is_gone_rebuilds_every_snapshot() {
    let dir = test_dir();
    let mut a = Mount::at(dir.path().join("a"), dir.path().join("amnt"), &[]);
    let a_mnt = a.mnt.to_str().unwrap().to_string();
    let r = dir.path().join("replica");
    populate(&a.mnt, 51);
    snapfs_ok(&["snapshot", "create", &a_mnt, "s1"]);
    churn(&a.mnt, 52);
    snapfs_ok(&["snapshot", "create", &a_mnt, "s2"]);
    sync_ok(&a.mnt, &r);
    let trees = snapshot_trees(&a);
    let volume = status_line(&a.mnt, "volume:");
    a.unmount();
    std::fs::remove_dir_all(&a.store).unwrap();

    // Every snapshot comes back, and the live tree is the newest, writable.
    let n = dir.path().join("n");
    let out = snapfs_ok(&["restore", r.to_str().unwrap(), n.to_str().unwrap()]);
    assert!(
        out.contains("2 snapshots") && out.contains("snapshot s2"),
        "{out}"
    );
    let mut nm = Mount::at(n.clone(), dir.path().join("nmnt"), &[]);
    assert_eq!(snapshot_trees(&nm), trees);
    assert_eq!(tree_digest(&nm.mnt), trees[1].1);
    std::fs::write(nm.path("new-file"), b"written after the restore").unwrap();
    assert_ne!(status_line(&nm.mnt, "volume:"), volume, "a new volume id");
    nm.unmount();
    nm.assert_fsck_clean();
    // A store that is a volume already is not restored into.
    let out = snapfs(&["restore", r.to_str().unwrap(), n.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a volume already"));
    // Nor is a replica in service, unless a restore cut short is to be resumed.
    let out = snapfs(&["restore", n.to_str().unwrap(), r.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));

    // One snapshot, keeping the original volume's identity: the replica then takes
    // the restored volume's next snapshot as an incremental.
    let k = dir.path().join("k");
    snapfs_ok(&[
        "restore",
        r.to_str().unwrap(),
        k.to_str().unwrap(),
        "--only",
        "s2",
        "--same-id",
    ]);
    assert_eq!(snapshot_names(&k), ["s2"]);
    let mut km = Mount::at(k.clone(), dir.path().join("kmnt"), &[]);
    assert_eq!(status_line(&km.mnt, "volume:"), volume);
    assert_eq!(tree_digest(&km.mnt), trees[1].1);
    std::fs::write(km.path("later"), pattern(9, 100_000)).unwrap();
    snapfs_ok(&["snapshot", "create", km.mnt.to_str().unwrap(), "s3"]);
    let inc = sync_ok(&km.mnt, &r);
    assert_eq!(inc["snapshots"], serde_json::json!(["s3"]), "{inc}");
    assert!(payload(&inc) < 200_000, "{inc}");
    km.unmount();
    // A second writer with that identity, from s1: its history forks from the
    // replica's, which refuses it rather than interleave the two, until demoted.
    let f = dir.path().join("f");
    let fs = f.to_str().unwrap();
    snapfs_ok(&[
        "restore",
        r.to_str().unwrap(),
        fs,
        "--only",
        "s1",
        "--same-id",
    ]);
    let mut fm = Mount::at(f.clone(), dir.path().join("fmnt"), &[]);
    std::fs::write(fm.path("fork"), pattern(10, 50_000)).unwrap();
    snapfs_ok(&["snapshot", "create", fm.mnt.to_str().unwrap(), "t2"]);
    let out = sync(&fm.mnt, &r, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forked") && err.contains("s2, s3"), "{err}");
    assert_eq!(snapshot_names(&r), ["s1", "s2", "s3"]);
    snapfs_ok(&["demote", r.to_str().unwrap()]);
    let inc = sync_ok(&fm.mnt, &r);
    assert_eq!(inc["snapshots"], serde_json::json!(["t2"]), "{inc}");
    let names = snapshot_names(&r);
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(
        names[1].starts_with("diverged-") && names[1].ends_with("-s2"),
        "{names:?}"
    );
    assert!(
        names[2].starts_with("diverged-") && names[2].ends_with("-s3"),
        "{names:?}"
    );
    fm.unmount();

    // A clone: one snapshot, a new volume of its own.
    let c = dir.path().join("c");
    snapfs_ok(&["clone", n.to_str().unwrap(), "s1", c.to_str().unwrap()]);
    let mut cm = Mount::at(c, dir.path().join("cmnt"), &[]);
    assert_eq!(tree_digest(&cm.mnt), trees[0].1);
    assert_ne!(status_line(&cm.mnt, "volume:"), volume);
    std::fs::write(cm.path("own"), b"the clone's own").unwrap();
    cm.unmount();
    cm.assert_fsck_clean();
    // Wrong input: one clear line and a non-zero exit.
    let x = dir.path().join("x");
    let x = x.to_str().unwrap();
    for (args, says) in [
        (vec!["restore", "/nonexistent/store", x], "nonexistent"),
        (vec!["restore", "tcp://127.0.0.1:1", x], "ssh://"),
        (
            vec!["clone", n.to_str().unwrap(), "nope", x],
            "no snapshot named",
        ),
    ] {
        let out = snapfs(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// A tiny xorshift generator for random cut points, seeded per run (the seed is
/// printed, to replay a failure).
struct Cuts(u64);

impl Cuts {
    fn new() -> Cuts {
        let seed = std::env::var("SNAPFS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("cut points: SNAPFS_TEST_SEED={seed}");
        Cuts(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Runs `snapfs ARGS` and kills it with SIGKILL once `store`'s segments hold
/// `goal` bytes (or it ended first), or, with a goal of 0, after `after`. Whether
/// it was cut.
fn cut_at_bytes(args: &[&str], store: &Path, goal: u64, after: std::time::Duration) -> bool {
    let mut child = std::process::Command::new(SNAPFS)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    if goal == 0 {
        std::thread::sleep(after);
        let ended = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        return !ended;
    }
    while segment_bytes(store) < goal {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(t0.elapsed().as_secs() < 120, "{args:?}: no progress");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

#[test]
fn each_step_of_failover_failback_and_restore_survives_a_kill_9_at_a_random_point() {
    // SNAPFS_TEST_FAILOVER_MIB scales the data each step moves (128 MiB).
    let mib: usize = env_or("SNAPFS_TEST_FAILOVER_MIB", 128);
    let mut cuts = Cuts::new();
    let dir = test_dir();
    let mut a = Mount::at(dir.path().join("a"), dir.path().join("amnt"), &[]);
    let a_mnt = a.mnt.to_str().unwrap().to_string();
    let b = dir.path().join("b");
    let bs = b.to_str().unwrap().to_string();
    std::fs::write(a.path("small"), b"before the failure").unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s1"]);
    sync_ok(&a.mnt, &b);
    // The old source's divergence: a live change that never reached the replica.
    std::fs::write(a.path("a-only"), pattern(7, 300_000)).unwrap();
    let a_live = tree_digest(&a.mnt);
    a.unmount();

    // Promote, killed again and again, each time a little later (from a random
    // start), until one run completes: the kills sweep its whole run, its two
    // commits included. After each the store is whole, and the run after goes on.
    let mut delay = cuts.below(300);
    let mut kills = 0;
    loop {
        let mut child = std::process::Command::new(SNAPFS)
            .args(["promote", &bs])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_micros(delay));
        let ended = child.try_wait().unwrap();
        let _ = child.kill();
        let status = child.wait().unwrap();
        let out = snapfs(&["fsck", &bs]);
        assert!(
            out.status.success(),
            "after a kill at {delay} us: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        if ended.is_some() || status.success() {
            break;
        }
        kills += 1;
        if !snapfs_ok(&["status", &bs]).contains("replica of:") {
            // Killed after its last commit.
            break;
        }
        delay += 300;
        assert!(kills < 2000, "promote never completed");
    }
    eprintln!("promote killed {kills} times before it completed");
    assert!(kills > 0, "no promote was killed");
    assert!(snapfs_ok(&["status", &bs]).contains("promoted:"));

    // The promoted volume takes new data; the failback session into the demoted
    // old source is cut at random points, then completes.
    let mut bm = Mount::at(b.clone(), dir.path().join("bmnt"), &[]);
    write_files(&bm.mnt, mib, 8000);
    snapfs_ok(&["snapshot", "create", bm.mnt.to_str().unwrap(), "b2"]);
    let b2 = tree_digest(&bm.path(".snapshots/b2"));
    snapfs_ok(&["demote", a.store.to_str().unwrap()]);
    let start = segment_bytes(&a.store);
    let whole = (mib as u64) << 20;
    let a_store = a.store.to_str().unwrap().to_string();
    let b_mnt = bm.mnt.to_str().unwrap().to_string();
    let args = ["sync", &b_mnt, &a_store];
    let mut made = 0;
    // The CLI (both ends' connections) killed at a random instant of the session's
    // start (before, during or after the demoted store's settle), then once the
    // first extent is in, then at a random point of the data.
    for k in 0..3u64 {
        let goal = match k {
            0 => 0,
            1 => start + 1,
            _ => start + whole / 4 + cuts.below(whole / 8),
        };
        let after = std::time::Duration::from_micros(cuts.below(60_000));
        let cut = cut_at_bytes(&args, &a.store, goal, after);
        eprintln!("failback cut {k} at {goal}: {cut}");
        made += cut as u32;
        let out = snapfs(&["fsck", &a_store]);
        assert!(
            out.status.success(),
            "cut {k}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Waits until the session has brought `a` to `goal` bytes.
    let a_path = a.store.clone();
    let wait_for = |goal: u64, sync: &mut std::process::Child| {
        let t0 = std::time::Instant::now();
        while segment_bytes(&a_path) < goal {
            assert!(sync.try_wait().unwrap().is_none(), "the sync ended early");
            assert!(t0.elapsed().as_secs() < 120, "no progress");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    };
    let spawn = |dest: &str| {
        std::process::Command::new(SNAPFS)
            .args(["sync", &b_mnt, dest])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // The source's daemon killed mid-session, then mounted again.
    let goal = start + whole / 2 + cuts.below(whole / 8);
    let mut sync = spawn(&a_store);
    wait_for(goal, &mut sync);
    bm.kill9();
    let _ = sync.wait();
    bm.mount(&[]);
    eprintln!("failback: the source's daemon killed at {goal}");
    // The destination mounted (it receives through its daemon), whose daemon is
    // killed mid-session.
    a.mount(&[]);
    let a_mnt2 = a.mnt.to_str().unwrap().to_string();
    let goal = start + whole * 3 / 4 + cuts.below(whole / 8);
    let mut sync = spawn(&a_mnt2);
    wait_for(goal, &mut sync);
    a.kill9();
    let _ = sync.wait();
    eprintln!("failback: the destination's daemon killed at {goal}");
    for store in [&a_store, &bs] {
        let out = snapfs(&["fsck", store]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(made > 0, "no failback session was cut");
    sync_ok(&bm.mnt, &a.store);
    // What the old source had is kept once, however many times the session began.
    let names = snapshot_names(&a.store);
    let diverged: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("diverged-"))
        .collect();
    assert_eq!(diverged.len(), 1, "{names:?}");
    assert_eq!(names.last().unwrap(), "b2", "{names:?}");
    a.mount(&[]);
    assert_eq!(
        tree_digest(&a.path(&format!(".snapshots/{}", diverged[0]))),
        a_live
    );
    assert_eq!(tree_digest(&a.mnt), b2);
    a.unmount();
    a.assert_fsck_clean();

    // Restore from the promoted volume, cut at random points, then completed.
    let n = dir.path().join("n");
    let args = ["restore", &bs, n.to_str().unwrap(), "--resume"];
    let mut made = 0;
    for k in 0..3u64 {
        let goal = whole * (k + 1) / 4 + cuts.below(whole / 8);
        let cut = cut_at_bytes(&args, &n, goal, std::time::Duration::ZERO);
        eprintln!("restore cut {k} at {goal}: {cut}");
        made += cut as u32;
        let out = snapfs(&["fsck", n.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "cut {k}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(made > 0, "no restore was cut");
    let out = snapfs_ok(&args);
    assert!(out.contains("the live tree is snapshot b2"), "{out}");
    bm.unmount();
    let nm = Mount::at(n, dir.path().join("nmnt"), &[]);
    assert_eq!(tree_digest(&nm.mnt), b2);
    assert_eq!(tree_digest(&nm.path(".snapshots/b2")), b2);
}

#[test]
fn destinations_at_different_bases_each_get_only_what_they_lack() {
    let dir = test_dir();
    let m = Mount::at(dir.path().join("src"), dir.path().join("mnt"), &[]);
    let mnt = m.mnt.to_str().unwrap().to_string();
    let (d1, d2) = (dir.path().join("d1"), dir.path().join("d2"));
    std::fs::write(m.path("base"), pattern(1, 1 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", &mnt, "s1"]);
    for d in [&d1, &d2] {
        sync_ok(&m.mnt, d);
    }
    // d1 goes on to s2; d2 stays at s1.
    std::fs::write(m.path("second"), pattern(2, 400_000)).unwrap();
    snapfs_ok(&["snapshot", "create", &mnt, "s2"]);
    let to_d1 = sync_ok(&m.mnt, &d1);
    assert!((400_000..450_000).contains(&payload(&to_d1)), "{to_d1}");
    std::fs::write(m.path("third"), pattern(3, 700_000)).unwrap();
    snapfs_ok(&["snapshot", "create", &mnt, "s3"]);
    // Each gets the incrementals from its own base: d1 the third file's bytes, d2
    // the second's and the third's, each snapshot once, none of the first file's.
    let to_d1 = sync_ok(&m.mnt, &d1);
    assert_eq!(to_d1["snapshots"], serde_json::json!(["s3"]));
    assert!((700_000..750_000).contains(&payload(&to_d1)), "{to_d1}");
    let to_d2 = sync_ok(&m.mnt, &d2);
    assert_eq!(to_d2["snapshots"], serde_json::json!(["s2", "s3"]));
    assert!((1_100_000..1_200_000).contains(&payload(&to_d2)), "{to_d2}");
    for d in [&d1, &d2] {
        assert_eq!(snapshot_names(d), ["s1", "s2", "s3"]);
    }
}

#[test]
fn a_replica_promoted_with_the_same_id_feeds_the_other_replicas() {
    let dir = test_dir();
    let a = Mount::at(dir.path().join("a"), dir.path().join("amnt"), &[]);
    let (b, c, d) = (
        dir.path().join("b"),
        dir.path().join("c"),
        dir.path().join("d"),
    );
    std::fs::write(a.path("f"), pattern(1, 1 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", a.mnt.to_str().unwrap(), "s1"]);
    // b and c replicate a; d replicates b (a cascade).
    sync_ok(&a.mnt, &b);
    sync_ok(&a.mnt, &c);
    sync_ok(&b, &d);
    // c got one more from a before a was lost; b never did.
    snapfs_ok(&["snapshot", "create", a.mnt.to_str().unwrap(), "a-last"]);
    sync_ok(&a.mnt, &c);
    let volume = status_line(&a.mnt, "volume:");
    drop(a);
    // a is lost: b takes its place and its identity, and both other replicas go on
    // with incrementals from it.
    snapfs_ok(&["promote", b.to_str().unwrap(), "--same-id"]);
    assert_eq!(status_line(&b, "volume:"), volume);
    let mut bm = Mount::at(b.clone(), dir.path().join("bmnt"), &[]);
    std::fs::write(bm.path("g"), pattern(2, 200_000)).unwrap();
    snapfs_ok(&["snapshot", "create", bm.mnt.to_str().unwrap(), "s2"]);
    // c holds a snapshot b lacks: their histories forked, and c refuses b until it
    // is demoted, which keeps that snapshot aside.
    let out = sync(&bm.mnt, &c, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forked") && err.contains("a-last"), "{err}");
    snapfs_ok(&["demote", c.to_str().unwrap()]);
    for r in [&c, &d] {
        let inc = sync_ok(&bm.mnt, r);
        assert_eq!(inc["snapshots"], serde_json::json!(["s2"]), "{inc}");
        assert!((200_000..300_000).contains(&payload(&inc)), "{inc}");
    }
    let names = snapshot_names(&c);
    assert!(
        names[1].starts_with("diverged-") && names[1].ends_with("-a-last"),
        "{names:?}"
    );
    // A volume of another origin is still refused.
    let other = Mount::at(dir.path().join("o"), dir.path().join("omnt"), &[]);
    std::fs::write(other.path("x"), b"x").unwrap();
    snapfs_ok(&["snapshot", "create", other.mnt.to_str().unwrap(), "x1"]);
    let out = sync(&other.mnt, &c, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("replica of another volume"));
    bm.unmount();
    for r in [&c, &d] {
        let out = snapfs(&["fsck", r.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let names = snapshot_names(r);
        assert_eq!(
            (names[0].as_str(), names.last().unwrap().as_str()),
            ("s1", "s2")
        );
    }
}

/// A filesystem image with reflink (XFS), loop-mounted for one test, unmounted
/// when dropped.
struct ReflinkFs {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
}

impl ReflinkFs {
    fn new() -> ReflinkFs {
        let dir = test_dir();
        let img = dir.path().join("xfs.img");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new(cmd)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("{cmd} (xfsprogs, util-linux): {e}"));
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(
            "mkfs.xfs",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                img.as_os_str(),
            ],
        );
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                img.as_os_str(),
                root.as_os_str(),
            ],
        );
        ReflinkFs { _dir: dir, root }
    }

    /// Bytes in use on it.
    fn used(&self) -> u64 {
        let c = std::ffi::CString::new(self.root.to_str().unwrap()).unwrap();
        // SAFETY: statvfs into a zeroed struct.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        (s.f_blocks - s.f_bfree) * s.f_frsize
    }
}

impl Drop for ReflinkFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.root)
            .status();
    }
}

#[test]
fn a_clone_on_a_reflink_filesystem_shares_its_blocks_and_elsewhere_copies_them() {
    let fs = ReflinkFs::new();
    let mut a = Mount::at(fs.root.join("a"), fs.root.join("amnt"), &[]);
    let a_mnt = a.mnt.to_str().unwrap().to_string();
    std::fs::write(a.path("big"), pattern(1, 64 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s1"]);
    std::fs::write(a.path("later"), pattern(2, 16 << 20)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s2"]);
    let s1 = tree_digest(&a.path(".snapshots/s1"));
    a.unmount();

    // On the same reflink filesystem: the blocks are shared, not copied.
    let before = fs.used();
    let c = fs.root.join("c");
    let out = snapfs_ok(&[
        "clone",
        a.store.to_str().unwrap(),
        "s1",
        c.to_str().unwrap(),
    ]);
    assert!(out.contains("reflink"), "{out}");
    let grew = fs.used() - before;
    assert!(grew < 8 << 20, "the clone took {grew} bytes");
    assert_eq!(snapshot_names(&c), ["s1"]);
    // A volume of its own: its writes leave the source as it was.
    let mut cm = Mount::at(c.clone(), fs.root.join("cmnt"), &[]);
    assert_eq!(tree_digest(&cm.mnt), s1);
    assert!(!cm.path("later").exists());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(cm.path("big"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(3, 1 << 20), 4 << 20).unwrap();
    drop(f);
    assert_ne!(
        status_line(&cm.mnt, "volume:"),
        status_line(&a.store, "volume:")
    );
    cm.unmount();
    for store in [&a.store, &c] {
        let out = snapfs(&["fsck", store.to_str().unwrap(), "--read-data"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    a.mount(&[]);
    assert_eq!(tree_digest(&a.path(".snapshots/s1")), s1);
    // Mounted, or onto another filesystem: a copy by sync.
    let elsewhere = test_dir();
    let e = elsewhere.path().join("e");
    let out = snapfs_ok(&["clone", &a_mnt, "s2", e.to_str().unwrap()]);
    assert!(
        !out.contains("reflink") && out.contains("1 snapshots"),
        "{out}"
    );
    a.unmount();
    let out = snapfs_ok(&[
        "clone",
        a.store.to_str().unwrap(),
        "s1",
        elsewhere.path().join("x").to_str().unwrap(),
    ]);
    assert!(!out.contains("reflink"), "{out}");
    assert_eq!(snapshot_names(&e), ["s2"]);
    assert_eq!(snapshot_names(&elsewhere.path().join("x")), ["s1"]);
    // A snapshot that is not there: nothing is left behind.
    let out = snapfs(&[
        "clone",
        a.store.to_str().unwrap(),
        "nope",
        fs.root.join("n").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot named"));
    assert!(!fs.root.join("n").exists());
}

#[test]
fn a_writer_that_lost_its_record_goes_on_and_a_demoted_store_waits_for_its_successor() {
    let dir = test_dir();
    let mut a = Mount::at(dir.path().join("a"), dir.path().join("amnt"), &[]);
    let a_mnt = a.mnt.to_str().unwrap().to_string();
    let r = dir.path().join("r");
    std::fs::write(a.path("f"), pattern(1, 300_000)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s1"]);
    sync_ok(&a.mnt, &r);
    a.unmount();
    // The source's store is later put back from a copy taken now: it forgets s2,
    // which reached the replica meanwhile.
    let copy = dir.path().join("a-copy");
    let st = std::process::Command::new("cp")
        .args(["-a", a.store.to_str().unwrap(), copy.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    a.mount(&[]);
    std::fs::write(a.path("g"), pattern(2, 200_000)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s2"]);
    sync_ok(&a.mnt, &r);
    a.unmount();
    std::fs::remove_dir_all(&a.store).unwrap();
    std::fs::rename(&copy, &a.store).unwrap();
    a.mount(&[]);
    std::fs::write(a.path("h"), pattern(3, 100_000)).unwrap();
    snapfs_ok(&["snapshot", "create", &a_mnt, "s3"]);
    // The same writer: its s2 on the replica is its own history, not a fork.
    let inc = sync_ok(&a.mnt, &r);
    assert_eq!(inc["snapshots"], serde_json::json!(["s3"]), "{inc}");
    assert_eq!(snapshot_names(&r), ["s1", "s2", "s3"]);
    a.unmount();

    // Demoted, the source takes its first session only from the volume that took
    // over from it, not from any replica of itself.
    let r2 = dir.path().join("r2");
    sync_ok(&a.store, &r2);
    snapfs_ok(&["demote", a.store.to_str().unwrap()]);
    let out = sync(&r2, &a.store, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not take over from it"), "{err}");
    // r, promoted (with a new identity), did.
    snapfs_ok(&["promote", r.to_str().unwrap()]);
    let mut rm = Mount::at(r.clone(), dir.path().join("rmnt"), &[]);
    std::fs::write(rm.path("i"), pattern(4, 100_000)).unwrap();
    snapfs_ok(&["snapshot", "create", rm.mnt.to_str().unwrap(), "r4"]);
    let inc = sync_ok(&rm.mnt, &a.store);
    assert_eq!(inc["snapshots"], serde_json::json!(["r4"]), "{inc}");
    rm.unmount();
    a.assert_fsck_clean();
}

/// A volume of 1 MiB blocks replicates as such: the replica is made with the
/// source's block size, its snapshots are identical, an extent travels per block (a
/// 64K volume would send 16 times as many), an incremental after a 1 MiB change
/// sends one block, and a restore keeps the size. Replicas mounted before the first
/// sync (made with the default size) take the source's; a replica that has received
/// from a volume of another block size refuses it in one line.
#[test]
fn a_volume_of_large_blocks_replicates_and_restores_with_its_block_size() {
    let mut src = Mount::with_options(&["block_size=1M"]);
    std::fs::write(src.path("big"), pattern(7, 8 << 20)).unwrap();
    populate(&src.mnt, 3);
    snapfs_ok(&["snapshot", "create", src.mnt.to_str().unwrap(), "one"]);
    src.unmount();
    let replica = src.dir.path().join("replica");
    let first = sync_ok(&src.store, &replica);
    assert_eq!(status_line(&replica, "block size:"), "1048576");
    let extents = first["extents_sent"].as_u64().unwrap();
    // 8 blocks of `big`, and populate's files (each under a block: one extent each).
    assert!((8..200).contains(&extents), "{first}");

    src.mount(&[]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(src.path("big"))
            .unwrap();
        f.write_all_at(&pattern(8, 1 << 20), 3 << 20).unwrap();
        f.sync_all().unwrap();
    }
    snapfs_ok(&["snapshot", "create", src.mnt.to_str().unwrap(), "two"]);
    src.unmount();
    let inc = sync_ok(&src.store, &replica);
    // One block; or, if a background flush caught the block half written, its
    // pieces (fragments over the old block, which the replica holds): at most the
    // megabyte written, in up to 8 pieces and a whole block, never the file's
    // other 7 MiB.
    let (extents, payload) = (
        inc["extents_sent"].as_u64().unwrap(),
        inc["payload_bytes"].as_u64().unwrap(),
    );
    assert!((1..=9).contains(&extents), "{inc}");
    assert!(((1 << 20)..=(2 << 20)).contains(&payload), "{inc}");

    let restored = src.dir.path().join("restored");
    snapfs_ok(&[
        "restore",
        replica.to_str().unwrap(),
        restored.to_str().unwrap(),
    ]);
    assert_eq!(status_line(&restored, "block size:"), "1048576");
    src.mount(&[]);
    let want = snapshot_trees(&src);
    assert_eq!(want.len(), 2);
    let mut r = Mount::at(restored, src.dir.path().join("restored-mnt"), &[]);
    assert_eq!(snapshot_trees(&r), want);
    r.unmount();

    // Replicas mounted (and so made, with the default 64K) before anything is sent,
    // as the README sets one up: one by path, one whose daemon listens on TCP. Each
    // takes the source's block size with its first session and shows the snapshot.
    let dir = src.dir.path().to_path_buf();
    let key = key_file(&dir, "key", "a shared secret for the tcp replica");
    let port = free_port();
    let listen = format!("listen=127.0.0.1:{port},key_file={}", key.display());
    let mut by_path = Mount::at(dir.join("by-path"), dir.join("by-path-mnt"), &["replica"]);
    let mut by_tcp = Mount::at(dir.join("by-tcp"), dir.join("by-tcp-mnt"), &[&listen]);
    assert_eq!(status_line(&by_tcp.mnt, "block size:"), "65536");
    // A replica of the replica, made before it holds anything (as its own
    // replicate= would at mount): a session with nothing to send makes it, at 64K.
    let chained = dir.join("chained");
    let none = sync_ok(&by_path.mnt, &chained);
    assert_eq!(none["snapshots_sent"], 0, "{none}");
    assert_eq!(status_line(&chained, "block size:"), "65536");
    sync_ok(&src.store, &by_path.mnt);
    sync_tcp_ok(
        src.mnt.to_str().unwrap(),
        &format!("127.0.0.1:{port}"),
        &key,
    );
    let newest = &want.iter().find(|(n, _)| n == "two").unwrap().1;
    for m in [&by_path, &by_tcp] {
        assert_eq!(status_line(&m.mnt, "block size:"), "1048576");
        assert_eq!(snapshot_trees(m), want);
        assert_eq!(&tree_digest(&m.mnt), newest);
    }
    // The replica of the replica holds no data yet: it takes the size too.
    sync_ok(&by_path.mnt, &chained);
    assert_eq!(status_line(&chained, "block size:"), "1048576");
    by_path.unmount();
    by_tcp.unmount();
    let mut c = Mount::at(chained, dir.join("chained-mnt"), &[]);
    assert_eq!(snapshot_trees(&c), want);
    c.unmount();
    let f = snapfs(&["fsck", dir.join("by-tcp").to_str().unwrap(), "--read-data"]);
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));

    // A replica that has received from a 64K volume keeps 64K: the 1M source is
    // refused in one line, and the replica is left as it was.
    let mut small = Mount::new();
    std::fs::write(small.path("f"), b"small blocks").unwrap();
    snapfs_ok(&["snapshot", "create", small.mnt.to_str().unwrap(), "s"]);
    small.unmount();
    let other = dir.join("other");
    sync_ok(&small.store, &other);
    let out = sync(&src.mnt, &other, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("the destination's block size is 65536, the source's 1048576: a store that holds data keeps its block size"),
        "{err}"
    );
    assert_eq!(status_line(&other, "snapshots:"), "1 (s)");
    assert_eq!(status_line(&other, "block size:"), "65536");
    src.unmount();
}
