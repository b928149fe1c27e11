//! A volume is its owner's: other local users read nothing of it through its store and
//! change nothing through its control socket, and bad input to the socket or to
//! snapshot names cannot hurt the daemon or the terminal.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// The daemons these tests start inherit a umask that hides nothing.
fn no_umask() {
    // SAFETY: umask(2) has no preconditions.
    unsafe { libc::umask(0) };
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn q(p: &Path) -> String {
    format!("'{}'", p.display())
}

#[test]
fn the_store_is_its_owners_alone() {
    no_umask();
    let m = Mount::new();
    fs::write(m.path("secret"), b"TOPSECRET-4711").unwrap();
    chmod(&m.path("secret"), 0o600);
    let st = snapfs(&["snapshot", "create", m.mnt.to_str().unwrap(), "s"]);
    assert!(st.status.success(), "{}", text(&st));
    assert_eq!(mode(&m.store), 0o700, "store directory");
    assert_eq!(mode(&m.store.join("segments")), 0o700, "segments directory");
    let mut seen = 0;
    for dir in [m.store.clone(), m.store.join("segments")] {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                continue;
            }
            assert_eq!(mode(&p) & 0o077, 0, "{} is open to others", p.display());
            seen += 1;
        }
    }
    // The metadata, a segment, the log, the pid file and the socket at least.
    assert!(seen >= 5, "only {seen} files looked at");
    // Another user, even one who can reach the store's directory, reads nothing.
    chmod(m.dir.path(), 0o755);
    let out = as_nobody(&format!("grep -ra TOPSECRET {}", q(&m.store)));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("TOPSECRET"),
        "another user read a file's content out of the store"
    );
    let out = as_nobody(&format!("cat {}/snapfs.log", q(&m.store)));
    assert!(!out.status.success(), "another user read the log");
}

#[test]
fn a_store_open_to_others_is_refused_unless_allowed() {
    no_umask();
    let mut m = Mount::new();
    m.unmount();
    chmod(&m.store, 0o755);
    let (store, mnt) = (m.store.display().to_string(), m.mnt.display().to_string());
    let (store, mnt) = (store.as_str(), mnt.as_str());
    let out = snapfs(&["mount", store, mnt]);
    assert!(!out.status.success(), "a store open to others was mounted");
    let msg = text(&out);
    assert!(
        msg.contains("allow_shared_store") && msg.contains(store) && msg.contains("0755"),
        "{msg}"
    );
    assert_eq!(msg.trim().lines().count(), 1, "one line: {msg}");
    m.mount(&["allow_shared_store"]);
    assert!(m.path(".snapshots").is_dir());
    m.unmount();
    // Never one others may write, nor one another user owns (they could change it
    // under the daemon), whatever the options.
    chmod(&m.store, 0o775);
    let out = snapfs(&["mount", store, mnt, "-o", "allow_shared_store"]);
    assert!(
        !out.status.success(),
        "a store others may write was mounted"
    );
    assert!(
        text(&out).contains("may be written by other users"),
        "{}",
        text(&out)
    );
    chmod(&m.store, 0o700);
    std::os::unix::fs::chown(&m.store, Some(65534), None).unwrap();
    let out = snapfs(&["mount", store, mnt]);
    assert!(!out.status.success(), "a store of another user was mounted");
    assert!(
        text(&out).contains("belongs to uid 65534"),
        "{}",
        text(&out)
    );
    std::os::unix::fs::chown(&m.store, Some(0), None).unwrap();

    // A mountpoint inside the store would have the daemon wait on itself.
    chmod(&m.store, 0o700);
    let inner = m.store.join("segments");
    let out = snapfs(&["mount", store, inner.to_str().unwrap()]);
    assert!(!out.status.success(), "mounted inside its own store");
    assert!(text(&out).contains("inside the store"), "{}", text(&out));
    m.mount(&[]);
}

/// Runs `snapfs ARGS` as user nobody; the binary lies under directories it may enter.
fn snapfs_as_nobody(args: &[&str]) -> std::process::Output {
    let mut cmd = q(Path::new(SNAPFS));
    for a in args {
        cmd.push(' ');
        cmd.push_str(&q(Path::new(a)));
    }
    as_nobody(&cmd)
}

fn snapshots(m: &Mount) -> String {
    let out = snapfs(&["snapshot", "list", m.mnt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_control_socket_serves_root_and_the_owner_only() {
    no_umask();
    let m = Mount::new();
    let sock = m.store.join("snapfs.sock");
    assert_eq!(mode(&sock), 0o600, "control socket mode");
    let store = m.store.to_str().unwrap();
    assert!(
        snapfs(&["snapshot", "create", store, "kept"])
            .status
            .success()
    );
    fs::write(m.path("precious"), b"root's").unwrap();
    chmod(&m.path("precious"), 0o600);

    // Open every door but the credential check: another user reaches the socket.
    chmod(m.dir.path(), 0o755);
    chmod(&m.store, 0o711);
    chmod(&sock, 0o666);
    for args in [
        &["snapshot", "create", store, "evil"][..],
        &["snapshot", "delete", store, "kept"],
        &["snapshot", "rollback", store, "kept"],
        &["status", store],
    ] {
        let out = snapfs_as_nobody(args);
        assert!(!out.status.success(), "nobody ran {args:?}");
        assert!(
            text(&out).contains("permission denied"),
            "{args:?}: {}",
            text(&out)
        );
    }
    let list = snapshots(&m);
    assert!(list.contains("kept") && !list.contains("evil"), "{list}");
    assert_eq!(fs::read(m.path("precious")).unwrap(), b"root's");

    // With the socket closed to others, as it is made, the answer is as clear.
    chmod(&sock, 0o600);
    let out = snapfs_as_nobody(&["snapshot", "create", store, "evil"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("permission denied"), "{}", text(&out));
}

#[test]
fn control_public_opens_the_read_only_commands_only() {
    no_umask();
    let m = Mount::with_options(&["control=public", "allow_shared_store"]);
    chmod(m.dir.path(), 0o755);
    chmod(&m.store, 0o711);
    assert_eq!(mode(&m.store.join("snapfs.sock")), 0o666);
    let store = m.store.to_str().unwrap();
    let out = snapfs_as_nobody(&["status", store]);
    assert!(out.status.success(), "status: {}", text(&out));
    let out = snapfs_as_nobody(&["snapshot", "list", store]);
    assert!(out.status.success(), "list: {}", text(&out));
    for args in [
        &["snapshot", "create", store, "evil"][..],
        &["diff", store, "a", "live"],
        &["fsck", store],
    ] {
        let out = snapfs_as_nobody(args);
        assert!(!out.status.success(), "nobody ran {args:?}");
        assert!(text(&out).contains("permission denied"), "{}", text(&out));
    }
    assert!(!snapshots(&m).contains("evil"));
}

#[test]
fn snapshot_names_with_control_characters_are_refused() {
    let m = Mount::new();
    let mnt = m.mnt.to_str().unwrap();
    for name in [
        "a\x1b[2Jb",
        "tab\there",
        "c1\u{9b}31m",
        "del\x7f",
        "gpj.\u{202e}exe",
    ] {
        let out = snapfs(&["snapshot", "create", mnt, name]);
        assert!(!out.status.success(), "{name:?} was accepted");
        let msg = text(&out);
        assert!(msg.contains("control characters"), "{msg}");
        assert!(
            !msg.contains('\x1b') && !msg.contains('\t'),
            "echoed raw: {msg:?}"
        );
        let err = fs::create_dir(m.path(".snapshots").join(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "mkdir {name:?}");
    }
    assert!(!snapshots(&m).contains('\x1b'));
}

#[test]
fn others_make_and_remove_no_snapshots_even_in_a_root_open_to_all() {
    let m = Mount::new();
    chmod(m.dir.path(), 0o755);
    chmod(&m.mnt, 0o1777);
    fs::create_dir(m.path(".snapshots/kept")).unwrap();
    let snaps = m.path(".snapshots");
    let out = as_nobody(&format!("mkdir {}/evil", q(&snaps)));
    assert!(!out.status.success(), "nobody made a snapshot");
    let out = as_nobody(&format!("rmdir {}/kept", q(&snaps)));
    assert!(!out.status.success(), "nobody removed a snapshot");
    assert!(snaps.join("kept").is_dir());
    assert!(!snaps.join("evil").exists());
}

/// Reads the daemon's answer: one line of JSON.
fn answer(mut c: UnixStream) -> String {
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut s = String::new();
    let _ = c.read_to_string(&mut s);
    s
}

#[test]
fn the_control_socket_bounds_requests_and_connections() {
    let m = Mount::new();
    let sock = m.store.join("snapfs.sock");
    // A request without end is cut off, not read into memory for ever.
    let mut c = UnixStream::connect(&sock).unwrap();
    let _ = c.write_all(&vec![b'x'; 100 << 10]);
    let a = answer(c);
    assert!(
        a.contains("longer than") && a.contains("\"code\":2"),
        "{a:?}"
    );
    // A request that is not one of the protocol's is answered, not obeyed.
    for bad in [
        &b"{\"format-disk\":{}}\n"[..],
        b"snapshot\0delete\0x\n",
        b"\xff\xfe\n",
    ] {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(bad).unwrap();
        let a = answer(c);
        assert!(
            a.contains("does not decode") && a.contains("\"code\":2"),
            "{a:?}"
        );
    }

    // Silent connections take at most a bounded number of threads; the next is told.
    let idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut c = UnixStream::connect(&sock).unwrap();
    c.write_all(b"\"status\"\n").unwrap();
    let a = answer(c);
    assert!(a.contains("busy"), "{a:?}");
    drop(idle);
    // Their threads end with their connections: commands are served again.
    let t = Instant::now();
    loop {
        let out = snapfs(&["status", m.mnt.to_str().unwrap()]);
        if out.status.success() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{}", text(&out));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CPU ticks (user + system) the process has used.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn accept_failures_do_not_spin() {
    let m = Mount::new();
    let pid = m.pid();
    let limit = |n: String| {
        let out = std::process::Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={n}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "prlimit {n}: {}", text(&out));
    };
    let soft = std::process::Command::new("prlimit")
        .args([
            &format!("--pid={pid}"),
            "--nofile",
            "-o",
            "SOFT",
            "--noheadings",
        ])
        .output()
        .unwrap();
    let soft = String::from_utf8_lossy(&soft.stdout).trim().to_string();
    assert!(soft.parse::<u64>().is_ok(), "soft limit {soft:?}");
    // No descriptor left for accept (none may be made at all): the connection
    // waits in the backlog.
    limit("0:".into());
    // The accept already waiting took its descriptor before the limit: this
    // connection gets it, and every accept after it fails.
    let first = UnixStream::connect(m.store.join("snapfs.sock")).unwrap();
    let mut c = UnixStream::connect(m.store.join("snapfs.sock")).unwrap();
    c.write_all(b"\"status\"\n").unwrap();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    limit(format!("{soft}:"));
    // A spinning accept loop burns a core (about 200 ticks in 2 s).
    assert!(
        used < 40,
        "the daemon used {used} ticks while accept failed"
    );
    drop(first);
    let a = answer(c);
    assert!(
        a.contains("\"code\":0,\"error\":false"),
        "served once descriptors were back: {a:?}"
    );
}
