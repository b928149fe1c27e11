//! The commands the CLI runs against a store, the same whether the store is mounted
//! (they arrive through the daemon's control socket) or opened by the CLI itself.

pub use crate::control::{Outcome, Request};
use crate::fs::{Fs, FsError, Inval, SNAPDIR_INO, SnapshotInfo, check_snapshot_name};
use crate::policy::{self, Keep};
use crate::store::schema::Ts;
use crate::text::{clip, printable};

fn ok(text: String) -> Outcome {
    Outcome {
        text,
        code: 0,
        error: false,
    }
}

/// An error outcome: `text` on stderr, exit code 2.
pub fn fail(text: String) -> Outcome {
    Outcome {
        text,
        code: 2,
        error: true,
    }
}

/// Prints fsck's progress on a terminal.
fn fsck_progress(progress: bool) -> impl FnMut(u64, u64) {
    move |done, total| {
        if progress {
            eprint!("\rchecking extents: {done}/{total}");
            if done == total {
                eprintln!();
            }
        }
    }
}

fn fsck_outcome(
    res: Result<crate::check::Report, crate::store::StoreError>,
    json: bool,
) -> Outcome {
    match res {
        Ok(rep) => Outcome {
            text: if json { rep.json() } else { rep.summary() },
            code: if rep.clean() { 0 } else { 1 },
            error: false,
        },
        Err(e) => fail(format!("{e:#}")),
    }
}

/// Runs the commands that only look (`fsck`, `status`) on a store no daemon holds,
/// without changing it; `None` for every other command.
pub fn run_read_only(path: &std::path::Path, req: &Request, progress: bool) -> Option<Outcome> {
    // A repair writes: it opens the store as any writing command does.
    let (fsck, read_data, json) = match *req {
        Request::Status => (false, false, false),
        Request::Fsck {
            read_data,
            repair: false,
            json,
        } => (true, read_data, json),
        _ => return None,
    };
    // A daemon that stopped serving may still be closing the store: wait for it.
    let mut opened = crate::store::ReadOnlyStore::open(path, fsck);
    for _ in 0..100 {
        if !matches!(opened, Err(crate::store::StoreError::Locked)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        opened = crate::store::ReadOnlyStore::open(path, fsck);
    }
    let mut ro = match opened {
        Ok(ro) => ro,
        // Damage found before anything else could be: fsck's finding, not its failure.
        Err(e @ crate::store::StoreError::Corrupt(_)) if fsck => {
            let rep = crate::check::Report {
                problems: vec![e.to_string()],
                ..Default::default()
            };
            return Some(fsck_outcome(Ok(rep), json));
        }
        Err(e) => return Some(fail(format!("cannot open store {}: {e}", path.display()))),
    };
    Some(if !fsck {
        match crate::check::status_offline(&mut ro, path) {
            Ok(st) => ok(st.render()),
            Err(e) => fail(format!("{e:#}")),
        }
    } else {
        fsck_outcome(
            crate::check::fsck_offline(&mut ro, read_data, &mut fsck_progress(progress)),
            json,
        )
    })
}

fn snap_error(e: FsError, name: &str) -> Outcome {
    // Quoted as Rust quotes (control characters escaped), and not echoed whole.
    let shown = clip(name);
    let msg = match e.errno() {
        libc::EEXIST => format!("a snapshot named {shown:?} already exists"),
        libc::ENOENT => format!("no snapshot named {shown:?}"),
        libc::EBUSY => format!(
            "cannot roll back to {shown:?}: files it would change are open; close them and retry"
        ),
        libc::EINVAL | libc::ENAMETOOLONG => match check_snapshot_name(name.as_bytes()) {
            Err((_, rule)) => format!("invalid snapshot name {shown:?}: {rule}"),
            Ok(_) => format!("{shown:?}: {e}"),
        },
        _ => format!("{shown:?}: {e}"),
    };
    fail(msg)
}

fn fmt_time(t: Ts) -> String {
    policy::utc(t.sec)
}

/// What the kernel must forget when a snapshot appears or goes outside its view.
fn snapdir_invals(name: &str) -> [Inval; 2] {
    [
        Inval::Entry(SNAPDIR_INO, name.as_bytes().to_vec()),
        Inval::Inode(SNAPDIR_INO),
    ]
}

/// Runs `req` against `fs`. `progress` draws progress on the terminal for long work.
pub fn run(fs: &Fs, req: &Request, progress: bool) -> Outcome {
    // Writes the kernel still caches belong to the live tree a command looks at.
    if req.needs_kernel_flush() {
        fs.flush_kernel();
    }
    let mut core = fs.lock();
    match req {
        // A session on the control connection itself, served by the daemon.
        Request::Send { .. } => fail("send is served by a mounted store's daemon".into()),
        Request::Receive => fail("receive is served by a mounted store's daemon".into()),
        Request::MountDevice => fail("the store is not mounted".into()),
        &Request::SetSize { bytes } => {
            core.set_size_limit(bytes);
            let st = core.statfs();
            drop(core);
            match st {
                Ok(st) => ok(format!(
                    "size {}: {} bytes in all, {} free\n",
                    bytes.map_or("unlimited".to_string(), |b| b.to_string()),
                    st.f_blocks * st.f_frsize,
                    st.f_bavail * st.f_frsize
                )),
                Err(e) => fail(format!("{e}")),
            }
        }
        Request::Status => {
            // Buffered data is counted if it can be stored; a full disk must not stop
            // status from showing the rest.
            if let Err(e) = core.flush_all() {
                tracing::warn!(error = %e, "status: buffered data not stored yet");
            }
            // Gathered from a frozen view, without the core lock.
            let view = core.store().frozen();
            drop(core);
            match view.and_then(|v| crate::check::status_frozen(&v)) {
                Ok(st) => ok(st.render()),
                Err(e) => fail(format!("{e:#}")),
            }
        }
        &Request::Fsck {
            read_data,
            repair,
            json,
        } => {
            // fsck checks what is committed; storing buffered data first is best effort
            // (on a full disk it cannot be, and fsck must still run).
            if let Err(e) = core.flush_all() {
                tracing::warn!(error = %e, "fsck: buffered data not stored yet");
            }
            let mut repaired = Vec::new();
            if repair {
                match crate::check::repair(core.store()) {
                    Ok(done) => repaired = done,
                    Err(e) => return fail(format!("repair stopped: {e:#}")),
                }
            }
            // Checked from a frozen view, without the core lock: the filesystem goes on
            // while the extents are read.
            let view = core.store().frozen();
            drop(core);
            let res = view.and_then(|mut v| {
                crate::check::fsck_frozen(&mut v, read_data, &mut fsck_progress(progress))
            });
            let mut out = fsck_outcome(res, json);
            if !out.error && !json {
                let mut text: String = repaired
                    .iter()
                    .map(|l| format!("repaired: {l}\n"))
                    .collect();
                if repair && repaired.is_empty() {
                    text.push_str("repaired: nothing needed repair\n");
                }
                out.text = text + &out.text;
            }
            out
        }
        Request::SnapshotCreate { .. } | Request::SnapshotRollback { .. }
            if core.is_replica() || matches!(core.store().replica_of(), Ok(Some(_))) =>
        {
            fail(format!(
                "{}: this store is a replica: its tree and its snapshots come from its source (snapfs sync)",
                req.name()
            ))
        }
        Request::SnapshotCreate { name } | Request::SnapshotDelete { name } => {
            let res = if matches!(req, Request::SnapshotCreate { .. }) {
                core.snapshot_create(name.as_bytes(), Ts::now())
                    .map(|epoch| format!("created snapshot {} (epoch {epoch})", printable(name)))
            } else {
                core.snapshot_delete(name.as_bytes())
                    .map(|()| format!("deleted snapshot {}", printable(name)))
            };
            drop(core);
            match res {
                Ok(msg) => {
                    fs.invalidate(&snapdir_invals(name));
                    ok(msg)
                }
                Err(e) => snap_error(e, name),
            }
        }
        Request::SnapshotRollback { name } => {
            let res = core.rollback(name.as_bytes());
            drop(core);
            match res {
                Ok(invals) => {
                    fs.invalidate(&invals);
                    ok(format!(
                        "rolled back to snapshot {} ({} records restored)",
                        printable(name),
                        invals.len()
                    ))
                }
                Err(e) => snap_error(e, name),
            }
        }
        &Request::SnapshotList { json, all } => {
            let res = core
                .snapshot_listing(all)
                .and_then(|mut s| core.snapshot_sizes(&mut s).map(|_| s));
            let holds = match core.holds() {
                Ok(h) => h,
                Err(e) => return fail(format!("{e}")),
            };
            // The holds on a snapshot, by name.
            let held_by = |epoch: u64| -> Vec<&str> {
                holds
                    .iter()
                    .filter(|(_, h)| h.epoch == epoch)
                    .map(|(n, _)| n.as_str())
                    .collect()
            };
            // A deleted snapshot still kept (listed with --all) has no name.
            let shown = |s: &SnapshotInfo| match s.deleted {
                true => format!("(deleted, epoch {})", s.epoch),
                false => s.name.clone(),
            };
            match res {
                Ok(snaps) if json => {
                    let rows: Vec<serde_json::Value> = snaps
                        .iter()
                        .map(|s| {
                            serde_json::json!({
                                "name": (!s.deleted).then_some(&s.name),
                                "created": s.created.sec,
                                "epoch": s.epoch,
                                "referenced": s.referenced,
                                "exclusive": s.exclusive,
                                "deleted": s.deleted,
                                "holds": held_by(s.epoch),
                            })
                        })
                        .collect();
                    ok(serde_json::Value::Array(rows).to_string())
                }
                Ok(snaps) => {
                    let mut t = format!(
                        "{:<32} {:<24} {:>14} {:>14}  {}\n",
                        "NAME", "CREATED", "REFERENCED", "EXCLUSIVE", "HELD BY"
                    );
                    for s in &snaps {
                        let h = held_by(s.epoch);
                        t.push_str(&format!(
                            "{:<32} {:<24} {:>14} {:>14}  {}\n",
                            printable(&shown(s)),
                            fmt_time(s.created),
                            s.referenced,
                            s.exclusive,
                            if h.is_empty() {
                                "-".to_string()
                            } else {
                                printable(&h.join(",")).into_owned()
                            }
                        ));
                    }
                    ok(t)
                }
                Err(e) => fail(format!("{e}")),
            }
        }
        Request::SnapshotHold {
            snapshot: snap,
            hold,
        } => {
            let res = core.hold(hold.as_bytes(), snap.as_bytes(), Ts::now());
            drop(core);
            match res {
                Ok(epoch) => ok(format!(
                    "hold {} keeps snapshot {} (epoch {epoch})",
                    printable(hold),
                    printable(snap)
                )),
                Err(e) if e.errno() == libc::EEXIST => fail(format!(
                    "a hold named {:?} keeps another snapshot; release it first",
                    clip(hold)
                )),
                Err(e) if matches!(e.errno(), libc::EINVAL | libc::ENAMETOOLONG) => {
                    match check_snapshot_name(hold.as_bytes()) {
                        Err((_, rule)) => fail(format!(
                            "invalid hold name {:?}: {}",
                            clip(hold),
                            rule.replace("snapshot", "hold")
                        )),
                        Ok(_) => fail(format!("{:?}: {e}", clip(hold))),
                    }
                }
                Err(e) => snap_error(e, snap),
            }
        }
        Request::SnapshotRelease { hold } => {
            let res = core.hold_release(hold.as_bytes());
            drop(core);
            match res {
                Ok(()) => ok(format!("released hold {}", printable(hold))),
                Err(e) if e.errno() == libc::ENOENT => {
                    fail(format!("no hold named {:?}", clip(hold)))
                }
                Err(e) => fail(format!("{:?}: {e}", clip(hold))),
            }
        }
        Request::SnapshotPrune { dry_run, keep } => {
            let keep = match keep.as_deref().map(Keep::parse).or_else(|| core.keep.clone().map(Ok)) {
                Some(Ok(k)) => k,
                Some(Err(e)) => return fail(e),
                None => return fail("no retention policy: pass --keep, mount with -o keep=..., or set keep in snapfs.toml".into()),
            };
            let snaps = match core.snapshots() {
                Ok(s) => s,
                Err(e) => return fail(e.to_string()),
            };
            let list: Vec<(String, i64)> = snaps
                .iter()
                .map(|s| (s.name.clone(), s.created.sec))
                .collect();
            let doomed = policy::plan_prune(&list, &keep);
            let mut text = String::new();
            let mut invals = Vec::new();
            for name in &doomed {
                if !dry_run {
                    if let Err(e) = core.snapshot_delete(name.as_bytes()) {
                        return snap_error(e, name);
                    }
                    invals.extend(snapdir_invals(name));
                    text.push_str(&format!("pruned {}\n", printable(name)));
                } else {
                    text.push_str(&format!("would prune {}\n", printable(name)));
                }
            }
            text.push_str(&format!(
                "{} of {} snapshots pruned by the policy",
                doomed.len(),
                snaps.len()
            ));
            drop(core);
            fs.invalidate(&invals);
            ok(text)
        }
        &Request::Diff {
            ref old,
            ref new,
            blocks,
            json,
        } => {
            // The epochs and a frozen view are taken under the lock; the diff is read
            // without it.
            let view = core.diff_view(old, new);
            let missing = match &view {
                Err(e) if e.errno() == libc::ENOENT => {
                    if core.snapshot_named(old.as_bytes()).ok().flatten().is_none() {
                        old
                    } else {
                        new
                    }
                }
                _ => old,
            };
            drop(core);
            let res = view.and_then(|d| d.run(blocks)).map_err(|e| (e, missing));
            match res {
                Ok(changes) => ok(render_changes(&changes, json, blocks)),
                Err((e, _)) if e.errno() == libc::EINVAL => fail(format!(
                    "{} is not older than {}",
                    printable(&clip(old)),
                    printable(&clip(new))
                )),
                Err((e, missing)) if e.errno() == libc::ENOENT => {
                    fail(format!("no snapshot named {:?}", clip(missing)))
                }
                Err((e, _)) => fail(e.to_string()),
            }
        }
    }
}

/// A diff as `snapfs diff` prints it: a line per change (`+`, `-`, `M` and the path;
/// `R`, the path, `->` and the new one), with the changed byte ranges under a modified
/// file when `blocks`; or, with `json`, an array of objects.
pub fn render_changes(changes: &[crate::fs::Change], json: bool, blocks: bool) -> String {
    if json {
        let rows: Vec<serde_json::Value> = changes
            .iter()
            .map(|c| {
                let mut r = serde_json::json!({
                    "change": c.kind.to_string(),
                    "path": c.path,
                });
                if let Some(n) = &c.new_path {
                    r["new_path"] = n.as_str().into();
                }
                if blocks && c.kind == 'M' {
                    r["ranges"] = serde_json::json!(c.ranges);
                }
                r
            })
            .collect();
        return serde_json::Value::Array(rows).to_string();
    }
    let mut t = String::new();
    for c in changes {
        match &c.new_path {
            Some(n) => t.push_str(&format!(
                "R\t{}\t->\t{}\n",
                printable(&c.path),
                printable(n)
            )),
            None => t.push_str(&format!("{}\t{}\n", c.kind, printable(&c.path))),
        }
        for (s, e) in &c.ranges {
            t.push_str(&format!("\t\t{s}-{e}\n"));
        }
    }
    t
}
