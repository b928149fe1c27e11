//! The `snapfs` command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use snapfs::control::Request;
use snapfs::daemon;
use snapfs::fs::Fs;

/// A copy-on-write, snapshotting FUSE filesystem with deduplicated extents.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// The key of an encrypted bucket (s3://...): a file of at least 32 bytes only
    /// its owner can read. Given at a bucket's first sync, it encrypts everything
    /// snapfs stores there; every later command on that bucket needs it. Also
    /// SNAPFS_ENCRYPT_KEY_FILE.
    #[arg(long, global = true, value_name = "FILE")]
    encrypt_key_file: Option<PathBuf>,
    /// Requests to a bucket (s3://...) at once: pack uploads, ranged reads of a
    /// restore, parts of a large object (default 8; also SNAPFS_S3_JOBS).
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs: Option<u16>,
    /// How extents a sync stores in a bucket (s3://...) are compressed: a zstd level
    /// from 1 to 19, or off (or 0) (default 6; also SNAPFS_S3_COMPRESS). An extent
    /// that does not shrink by 1/32 is stored as it is; gc repacks at this level.
    #[arg(long, global = true, value_name = "LEVEL|off", value_parser = |v: &str| snapfs::sync::s3::parse_compression(v).map(Compress))]
    compress: Option<Compress>,
}

/// A `--compress` value: a zstd level, or `None` for off.
#[derive(Clone, Copy)]
struct Compress(Option<i32>);

#[derive(Subcommand)]
enum Cmd {
    /// Mount STORE on MOUNTPOINT (creates STORE when missing or empty); or a bucket's
    /// snapshots, read-only (s3://BUCKET/PREFIX; -o cache_size=256M).
    Mount {
        /// The store directory, or a bucket.
        store: PathBuf,
        /// Where to mount it.
        mountpoint: PathBuf,
        /// Mount options, comma-separated: source=NAME, threads=N, snapdir=visible,
        /// snapshot_every=15m, keep=hourly:24+daily:7, ro, noatime, block_size=64K (of
        /// a store being made), ...
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Stay in the foreground instead of returning once the mount is live.
        #[arg(short, long)]
        foreground: bool,
    },
    /// Create, list, delete, roll back to, or prune snapshots.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapCmd,
    },
    /// What changed between snapshot OLD and NEW (a snapshot or `live`).
    Diff {
        /// A store, the mountpoint of a mounted one, or a bucket (s3://BUCKET/PREFIX).
        target: PathBuf,
        /// The older snapshot.
        old: String,
        /// The newer snapshot, or `live`.
        new: String,
        /// Also print the changed byte ranges of modified files.
        #[arg(long)]
        blocks: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify a store; exits 1 if anything is damaged.
    Fsck {
        /// A store, or the mountpoint of a mounted one.
        store: PathBuf,
        /// Also reread and rehash every extent.
        #[arg(long)]
        read_data: bool,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Repair what can be repaired without guessing (reference counts, leaked
        /// versions, unindexed leftovers) and say what was done; the store must not be
        /// mounted.
        #[arg(long)]
        repair: bool,
    },
    /// Delete from a bucket (s3://BUCKET/PREFIX) the data no snapshot there needs.
    Gc {
        /// The bucket and prefix.
        target: String,
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show files, space, dedup ratio and snapshots.
    Status {
        /// A store, or the mountpoint of a mounted one.
        target: PathBuf,
    },
    /// Send the snapshots DEST lacks from SOURCE, each as an incremental from the
    /// newest snapshot both hold.
    Sync {
        /// The source: a store, or the mountpoint of a mounted one.
        source: PathBuf,
        /// The destination: a store path (unmounted; made when missing),
        /// tcp://HOST:PORT of a `snapfs serve`, or ssh://[USER@]HOST[:PORT]/PATH (runs
        /// `snapfs receive PATH` there).
        dest: String,
        /// Send this snapshot only.
        #[arg(long)]
        snapshot: Option<String>,
        /// The shared key, for tcp:// (a file only its owner may read).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Print a machine-readable summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        link: Link,
        /// Only say what would be sent (snapshots, records, extents, bytes at most);
        /// nothing changes on either side.
        #[arg(long)]
        dry_run: bool,
    },
    /// Make a replica a writable volume of its own (failover): its live tree starts
    /// from its newest snapshot, and it takes no more snapshots from its source.
    Promote {
        /// The replica's store (unmounted).
        store: PathBuf,
        /// Start the live tree from this snapshot instead of the newest.
        #[arg(long)]
        snapshot: Option<String>,
        /// Take the identity of the volume the replica's snapshots are of, so that
        /// the other replicas of that volume take incrementals from this one.
        #[arg(long)]
        same_id: bool,
    },
    /// Make a volume a replica of the volume that replaced it (failback): it mounts
    /// read-only, and the first sync into it keeps what it has past the snapshot both
    /// share as snapshots named diverged-<time>.
    Demote {
        /// The store (unmounted).
        store: PathBuf,
    },
    /// Build a new writable volume from a replica or any store, local or over ssh:
    /// every snapshot it holds (or one), the live tree from the newest.
    Restore {
        /// A store, the mount point of one, or ssh://[USER@]HOST[:PORT]/PATH.
        source: String,
        /// The new store (made; or a restore that was cut short, resumed).
        newstore: PathBuf,
        /// Start the live tree from this snapshot instead of the newest.
        #[arg(long)]
        snapshot: Option<String>,
        /// Bring this snapshot only.
        #[arg(long)]
        only: Option<String>,
        /// Keep the identity of the volume the snapshots are of (the original
        /// volume, when restoring from its replica), so that its other replicas
        /// take incrementals from the new one.
        #[arg(long)]
        same_id: bool,
        /// Go on with a restore into NEWSTORE that was cut short (it is a replica
        /// until the restore completes), or start one.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        link: Link,
    },
    /// Set a volume's size (kept in STORE/snapfs.toml as `size`; a mounted volume
    /// takes it at once): statfs shows it, and writes past it get ENOSPC.
    Resize {
        /// A store, or the mountpoint of a mounted one.
        target: PathBuf,
        /// Bytes, or a number with K, M, G or T; `none` for no size of its own.
        size: String,
    },
    /// Serve the Container Storage Interface (CSI v1.9) for Kubernetes: volumes are
    /// stores under ROOT.
    Csi {
        /// Where to listen: unix:///PATH (or tcp://HOST:PORT).
        #[arg(long)]
        endpoint: String,
        /// This node's name, as Kubernetes knows it.
        #[arg(long)]
        node_id: String,
        /// The directory the volumes live in.
        #[arg(long, default_value = "/var/lib/snapfs-csi")]
        root: PathBuf,
        /// Serve the controller service (volumes and snapshots).
        #[arg(long)]
        controller: bool,
        /// Serve the node service (mounts).
        #[arg(long)]
        node: bool,
    },
    /// A new writable volume (with a new identity) from one snapshot of a store.
    Clone {
        /// The store, or the mount point of a mounted one.
        store: PathBuf,
        /// The snapshot.
        snapshot: String,
        /// The new store (made).
        newstore: PathBuf,
        /// Go on with a clone into NEWSTORE that was cut short, or start one.
        #[arg(long)]
        resume: bool,
    },
    /// Send a store's snapshots on standard input and output: what `restore` runs on
    /// the far side of ssh.
    #[command(hide = true)]
    Send {
        /// The store.
        store: PathBuf,
        /// Send this snapshot only.
        #[arg(long)]
        snapshot: Option<String>,
    },
    /// Receive snapshots into STORE (unmounted; made when missing) from `snapfs sync`
    /// on standard input and output: what `sync` runs on the far side of ssh.
    Receive {
        /// The store.
        store: PathBuf,
    },
    /// Receive snapshots into STORE (unmounted) from `snapfs sync` over TCP, one
    /// session at a time, until killed.
    Serve {
        /// The store (made when missing; a replica of what is sent to it).
        store: PathBuf,
        /// Where to listen (loopback unless an address is given).
        #[arg(long, default_value = snapfs::sync::tcp::DEFAULT_LISTEN)]
        listen: String,
        /// The shared key (a file only its owner may read).
        #[arg(long)]
        key_file: PathBuf,
    },
}

/// How a session reaches the far side, and how fast it may go.
#[derive(clap::Args)]
struct Link {
    /// The ssh client and its options, for ssh:// (split on whitespace).
    #[arg(long, default_value = "ssh")]
    ssh: String,
    /// The snapfs program on the far side, for ssh://.
    #[arg(long, default_value = "snapfs")]
    remote_snapfs: String,
    /// Move at most RATE bytes per second (K, M, G: powers of 1024; at least 128K).
    #[arg(long, value_name = "RATE", value_parser = snapfs::sync::parse_rate)]
    bwlimit: Option<u64>,
}

#[derive(Subcommand)]
enum SnapCmd {
    /// Take a snapshot of the live tree.
    Create {
        /// A store, or the mountpoint of a mounted one.
        target: PathBuf,
        /// The snapshot's name.
        name: String,
    },
    /// List snapshots with their creation time, referenced and exclusive bytes, and
    /// the holds that keep them.
    List {
        /// A store, or the mountpoint of a mounted one.
        target: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Also list deleted snapshots that a hold or an open file still keeps.
        #[arg(long)]
        all: bool,
    },
    /// Keep a snapshot (and what changed after it) under a named hold until released:
    /// deleting a held snapshot only hides it.
    Hold {
        /// A store, or the mountpoint of a mounted one.
        target: PathBuf,
        /// The snapshot to keep.
        snapshot: String,
        /// The hold's name.
        hold: String,
    },
    /// Release a named hold; a deleted snapshot nothing else keeps is then freed.
    Release {
        /// A store, or the mountpoint of a mounted one.
        target: PathBuf,
        /// The hold's name.
        hold: String,
    },
    /// Delete a snapshot; the space only it held comes back.
    Delete {
        /// A store, or the mountpoint of a mounted one.
        target: PathBuf,
        /// The snapshot's name.
        name: String,
    },
    /// Make the live tree equal to a snapshot (newer snapshots are kept).
    Rollback {
        /// A store, or the mountpoint of a mounted one.
        target: PathBuf,
        /// The snapshot's name.
        name: String,
    },
    /// Delete scheduled (`auto-…`) snapshots the retention policy does not keep.
    Prune {
        /// A store, the mountpoint of a mounted one, or a bucket (s3://BUCKET/PREFIX,
        /// with --keep).
        target: PathBuf,
        /// Only print what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// The policy, e.g. hourly:24+daily:7+weekly:4 (default: the mount's or snapfs.toml's).
        #[arg(long)]
        keep: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(k) = &cli.encrypt_key_file {
        snapfs::sync::s3::use_key_file(k);
    }
    if let Some(n) = cli.jobs {
        snapfs::sync::s3::use_jobs(n as usize);
    }
    if let Some(Compress(c)) = cli.compress {
        snapfs::sync::s3::use_compression(c);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snapfs: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // A mount logs to its store once it knows it; every other command to stderr.
    if !matches!(cli.cmd, Cmd::Mount { .. }) {
        daemon::init_logging(None);
    }
    let (target, req) = match cli.cmd {
        Cmd::Mount {
            store,
            mountpoint,
            options,
            foreground,
        } if is_bucket(&store) => {
            snapfs::sync::s3::mount::mount(
                &store.to_string_lossy(),
                &mountpoint,
                &options,
                foreground,
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Mount {
            store,
            mountpoint,
            options,
            foreground,
        } => {
            daemon::mount(&store, &mountpoint, &options, foreground)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Fsck {
            store, read_data, ..
        } if is_bucket(&store) => return bucket_fsck(&store, read_data),
        Cmd::Gc { target, dry_run } => {
            let r = snapfs::sync::s3::gc(&target, dry_run).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "{}{} packs ({} bytes) and {} manifests no snapshot needs; {} {} packs mostly of such data ({} bytes freed){}",
                if dry_run { "would delete " } else { "deleted " },
                r.packs,
                r.bytes,
                r.manifests,
                if dry_run { "would repack" } else { "repacked" },
                r.repacked.0,
                r.repacked.1,
                if r.partial.0 > 0 {
                    format!(
                        "; {} packs kept hold {} bytes no snapshot needs (under half of theirs)",
                        r.partial.0, r.partial.1
                    )
                } else {
                    String::new()
                }
            );
            if r.lost > 0 {
                eprintln!(
                    "snapfs: gc {target}: {} packs whose extents snapshots need are gone (lost, or deleted behind snapfs): the next sync asks the source for those no other pack holds; `snapfs fsck {target}` names the files they reach",
                    r.lost
                );
                return Ok(ExitCode::from(1));
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Fsck {
            store,
            read_data,
            json,
            repair,
        } => (
            store,
            Request::Fsck {
                read_data,
                repair,
                json,
            },
        ),
        Cmd::Status { target } => (target, Request::Status),
        Cmd::Sync {
            source,
            dest,
            snapshot,
            key_file,
            json,
            link,
            dry_run,
        } => {
            let opts = snapfs::sync::Options {
                dry_run,
                snapshot,
                key_file,
                ssh: link.ssh,
                remote_snapfs: link.remote_snapfs,
                progress: true,
                bwlimit: link.bwlimit,
                in_daemon: false,
                one_off: false,
            };
            return sync(&source, &dest, &opts, json);
        }
        Cmd::Receive { store } => return receive(&store),
        Cmd::Send { store, snapshot } => return send(&store, snapshot.as_deref()),
        Cmd::Promote {
            store,
            snapshot,
            same_id,
        } => return promote(&store, snapshot.as_deref(), same_id),
        Cmd::Demote { store } => return demote(&store),
        Cmd::Restore {
            source,
            newstore,
            snapshot,
            only,
            same_id,
            resume,
            link,
        } => {
            let opts = snapfs::sync::Options {
                snapshot: only,
                ssh: link.ssh,
                remote_snapfs: link.remote_snapfs,
                progress: true,
                bwlimit: link.bwlimit,
                one_off: true,
                ..Default::default()
            };
            return restore(
                &source,
                &newstore,
                snapshot.as_deref(),
                same_id,
                resume,
                &opts,
                "restored",
            );
        }
        Cmd::Clone {
            store,
            snapshot,
            newstore,
            resume,
        } => {
            let opts = snapfs::sync::Options {
                snapshot: Some(snapshot.clone()),
                progress: true,
                one_off: true,
                ..Default::default()
            };
            let Some(source) = store.to_str() else {
                anyhow::bail!("{}: not a UTF-8 path", store.display());
            };
            if !resume && reflink_clone(&store, &snapshot, &newstore)? {
                return Ok(ExitCode::SUCCESS);
            }
            return restore(
                source,
                &newstore,
                Some(&snapshot),
                false,
                resume,
                &opts,
                "cloned",
            );
        }
        Cmd::Resize { target, size } => return resize(&target, &size),
        Cmd::Csi {
            endpoint,
            node_id,
            root,
            controller,
            node,
        } => {
            return csi(&endpoint, &node_id, &root, controller, node);
        }
        Cmd::Serve {
            store,
            listen,
            key_file,
        } => {
            let key = snapfs::sync::tcp::read_key_file(&key_file)?;
            snapfs::sync::tcp::serve(&store, &listen, key, |addr| {
                println!("listening on {addr}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Diff {
            target,
            old,
            new,
            blocks,
            json,
        } => {
            if is_bucket(&target) {
                let changes = snapfs::sync::s3::diff(&target.to_string_lossy(), &old, &new, blocks)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let text = snapfs::commands::render_changes(&changes, json, blocks);
                if json {
                    println!("{text}");
                } else {
                    print!("{text}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let req = Request::Diff {
                old,
                new,
                blocks,
                json,
            };
            (target, req)
        }
        Cmd::Snapshot { cmd } => match cmd {
            SnapCmd::Create { target, name } => (target, Request::SnapshotCreate { name }),
            SnapCmd::Delete { target, name } if is_bucket(&target) => {
                let msg = snapfs::sync::s3::delete(&target.to_string_lossy(), &name)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                println!("{msg}");
                return Ok(ExitCode::SUCCESS);
            }
            SnapCmd::Delete { target, name } => (target, Request::SnapshotDelete { name }),
            SnapCmd::Rollback { target, name } => (target, Request::SnapshotRollback { name }),
            SnapCmd::List { target, json, all } if is_bucket(&target) => {
                return bucket_list(&target, json, all);
            }
            SnapCmd::List { target, json, all } => (target, Request::SnapshotList { json, all }),
            SnapCmd::Hold {
                target,
                snapshot,
                hold,
            } => (target, Request::SnapshotHold { snapshot, hold }),
            SnapCmd::Release { target, hold } => (target, Request::SnapshotRelease { hold }),
            SnapCmd::Prune {
                target,
                dry_run,
                keep,
            } if is_bucket(&target) => {
                let url = target.to_string_lossy();
                let keep = keep.ok_or_else(|| {
                    anyhow::anyhow!("{url}: a bucket has no policy of its own: give --keep")
                })?;
                let keep = snapfs::policy::Keep::parse(&keep)
                    .map_err(|e| anyhow::anyhow!("--keep {keep}: {e}"))?;
                let pruned = snapfs::sync::s3::prune(&url, &keep, dry_run)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let verb = if dry_run { "would prune" } else { "pruned" };
                for name in &pruned {
                    println!("{verb} {name}");
                }
                if !dry_run && !pruned.is_empty() {
                    println!("`snapfs gc {url}` frees the data only they held");
                }
                return Ok(ExitCode::SUCCESS);
            }
            SnapCmd::Prune {
                target,
                dry_run,
                keep,
            } => (target, Request::SnapshotPrune { dry_run, keep }),
        },
    };
    with_store(&target, &req)
}

/// `snapfs sync`: sends what `dest` lacks, and says what went.
fn sync(
    source: &Path,
    dest: &str,
    opts: &snapfs::sync::Options,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let src = daemon::resolve_store(source)?;
    let t = std::time::Instant::now();
    let (sum, res) = snapfs::sync::run(&src, dest, opts);
    let secs = t.elapsed().as_secs_f64();
    if json {
        // Also when the session failed: what went before it stopped.
        let mut out = serde_json::json!({
            "snapshots_sent": sum.snapshots.len(),
            "snapshots": sum.snapshots,
            "records": sum.records,
            "extents_sent": sum.extents,
            "payload_bytes": sum.payload_bytes,
            "wire_bytes": sum.wire_bytes,
            "seconds": secs,
        });
        if opts.dry_run {
            out["dry_run"] = true.into();
            out["would_send"] = sum
                .planned
                .iter()
                .map(|(n, r, e, b)| {
                    serde_json::json!({"snapshot": n, "records": r, "extents": e, "bytes_at_most": b})
                })
                .collect::<Vec<_>>()
                .into();
        }
        if let Err(e) = &res {
            out["error"] = e.to_string().into();
        }
        println!("{out}");
    }
    res.map_err(|e| anyhow::anyhow!("sync {} -> {dest}: {e}", source.display()))?;
    if !json && opts.dry_run {
        if sum.planned.is_empty() {
            println!("nothing to send: {dest} has every snapshot");
        }
        for (n, r, e, b) in &sum.planned {
            println!(
                "would send {}: {r} records, {e} extents, at most {b} bytes of them",
                snapfs::text::printable(n)
            );
        }
    } else if !json && sum.snapshots.is_empty() {
        println!("nothing to send: {dest} has every snapshot");
    } else if !json {
        println!(
            "sent {} snapshots ({}): {} records, {} extents, {} payload bytes, {} bytes on the wire, {secs:.2} s",
            sum.snapshots.len(),
            name_list(&sum.snapshots),
            sum.records,
            sum.extents,
            sum.payload_bytes,
            sum.wire_bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Snapshot names for a line of output, made printable: all of them when they are
/// few, else the first and last few around how many were left out.
fn name_list(names: &[String]) -> String {
    let shown: Vec<String> = if names.len() <= 8 {
        names
            .iter()
            .map(|n| snapfs::text::printable(n).into_owned())
            .collect()
    } else {
        let (head, tail) = (&names[..3], &names[names.len() - 2..]);
        head.iter()
            .map(|n| snapfs::text::printable(n).into_owned())
            .chain(std::iter::once(format!("... {} more ...", names.len() - 5)))
            .chain(tail.iter().map(|n| snapfs::text::printable(n).into_owned()))
            .collect()
    };
    shown.join(", ")
}

/// `snapfs fsck s3://...`: exit 0 clean, 1 damaged (each problem on a line).
fn bucket_fsck(target: &Path, read_data: bool) -> anyhow::Result<ExitCode> {
    let url = target.to_string_lossy();
    let problems = snapfs::sync::s3::fsck(&url, read_data).map_err(|e| anyhow::anyhow!("{e}"))?;
    for p in &problems {
        println!("{p}");
    }
    println!(
        "fsck {url}: {} problems: {}",
        problems.len(),
        if problems.is_empty() {
            "clean"
        } else {
            "damaged"
        }
    );
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Whether a target names a bucket (`s3://...`).
fn is_bucket(target: &Path) -> bool {
    target.to_string_lossy().starts_with("s3://")
}

/// `snapfs snapshot list s3://...`: the snapshots the bucket holds, oldest first
/// (with `all`, also those deleted that the next sync still starts from).
fn bucket_list(target: &Path, json: bool, all: bool) -> anyhow::Result<ExitCode> {
    let url = target.to_string_lossy();
    let b = snapfs::sync::s3::Bucket::open(&url).map_err(|e| anyhow::anyhow!("{e}"))?;
    let root = b
        .root()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .ok_or_else(|| anyhow::anyhow!("{url} holds no snapfs volume"))?;
    let shown: Vec<&snapfs::sync::s3::RootSnapshot> = root
        .snapshots
        .iter()
        .filter(|s| all || !s.deleted)
        .collect();
    if json {
        let list: Vec<serde_json::Value> = shown
            .iter()
            .map(|s| serde_json::json!({"name": s.name, "created": s.created_sec, "base": s.base, "records": s.records, "deleted": s.deleted}))
            .collect();
        println!("{}", serde_json::Value::from(list));
    } else {
        println!("{:<32} {:<28} BASE", "NAME", "CREATED");
        for s in shown {
            println!(
                "{:<32} {:<28} {}{}",
                snapfs::text::printable(&s.name),
                snapfs::policy::utc(s.created_sec),
                s.base
                    .as_deref()
                    .map_or("-".into(), snapfs::text::printable),
                if s.deleted {
                    "  (deleted; the base of the next sync)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the unmounted store at `path` for a change of role.
fn open_unmounted(path: &Path) -> anyhow::Result<snapfs::store::Store> {
    let store = daemon::resolve_store(path)?;
    match snapfs::store::Store::open(&store, None) {
        Err(snapfs::store::StoreError::Locked) => anyhow::bail!(
            "store {} is in use (mounted, or in a sync session): unmount it first",
            store.display()
        ),
        r => r.with_context(|| format!("cannot open store {}", store.display())),
    }
}

/// Seconds since the Unix epoch, now.
fn now_secs() -> i64 {
    snapfs::store::schema::Ts::now().sec
}

/// `snapfs promote`: a replica becomes a volume of its own.
fn promote(path: &Path, snapshot: Option<&str>, same_id: bool) -> anyhow::Result<ExitCode> {
    let mut st = open_unmounted(path)?;
    let p = st
        .promote(snapshot, same_id, true, now_secs())
        .map_err(|e| anyhow::anyhow!("promote {}: {e}", path.display()))?;
    if p.snapshot.is_empty() {
        println!(
            "{}: the demotion is undone; it is a volume of its own again",
            path.display()
        );
    } else {
        println!(
            "{}: promoted; a writable volume ({}) whose live tree is snapshot {}; it was a replica of {}",
            path.display(),
            snapfs::store::hex(&st.volume_id),
            snapfs::text::printable(&p.snapshot),
            snapfs::store::hex(&p.from)
        );
    }
    drop(st);
    Ok(ExitCode::SUCCESS)
}

/// `snapfs demote`: a volume waits, read-only, to become a replica of the volume
/// that replaced it.
fn demote(path: &Path) -> anyhow::Result<ExitCode> {
    let mut st = open_unmounted(path)?;
    st.demote(now_secs())
        .map_err(|e| anyhow::anyhow!("demote {}: {e}", path.display()))?;
    println!(
        "{}: demoted; it mounts read-only, and the next sync into it keeps what it has past the snapshot both share as diverged-<time> snapshots",
        path.display()
    );
    drop(st);
    Ok(ExitCode::SUCCESS)
}

/// `snapfs restore` and `clone`: every snapshot of `source` (or `opts.snapshot`)
/// into a new store, then promoted.
fn restore(
    source: &str,
    newstore: &Path,
    live: Option<&str>,
    same_id: bool,
    resume: bool,
    opts: &snapfs::sync::Options,
    verb: &str,
) -> anyhow::Result<ExitCode> {
    if let (Some(only), Some(l)) = (&opts.snapshot, live)
        && only != l
    {
        anyhow::bail!("--snapshot {l} is not the one snapshot --only brings ({only})");
    }
    // A snapfs mount point names its store.
    let newstore = &snapfs::sync::dest_store(newstore).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cmd = if verb == "cloned" { "clone" } else { "restore" };
    if snapfs::store::Store::exists(newstore) {
        // A restore cut short is resumed when asked; a replica in service is not
        // taken over by mistake.
        let replica = open_unmounted(newstore)?.replica_of()?.is_some();
        if !replica {
            anyhow::bail!(
                "{} is a volume already: {cmd} makes a new store",
                newstore.display()
            );
        }
        if !resume {
            anyhow::bail!(
                "{} is a replica already: {cmd} makes a new store (--resume goes on with one that was cut short)",
                newstore.display()
            );
        }
    }
    let t = std::time::Instant::now();
    let (sum, res) = snapfs::sync::pull(source, newstore, opts);
    res.map_err(|e| anyhow::anyhow!("{cmd} {source} -> {}: {e}", newstore.display()))?;
    let mut st = open_unmounted(newstore)?;
    let p = st
        .promote(live, same_id, verb != "cloned", now_secs())
        .map_err(|e| anyhow::anyhow!("{cmd} {source} -> {}: {e}", newstore.display()))?;
    let all = st.snapshot_list(false)?.len();
    println!(
        "{verb} {} into {} (volume {}): {all} snapshots ({} received now, {} payload bytes, {:.2} s); the live tree is snapshot {}",
        source,
        newstore.display(),
        snapfs::store::hex(&st.volume_id),
        sum.snapshots.len(),
        sum.payload_bytes,
        t.elapsed().as_secs_f64(),
        snapfs::text::printable(&p.snapshot)
    );
    drop(st);
    Ok(ExitCode::SUCCESS)
}

/// `snapfs clone` of an unmounted store on a filesystem that shares blocks between
/// files: the store's files are cloned and the copy keeps the one snapshot. False
/// when that cannot be done here (mounted, another filesystem, no reflink), for a
/// clone by sync instead.
fn reflink_clone(store: &Path, snapshot: &str, newstore: &Path) -> anyhow::Result<bool> {
    let t = std::time::Instant::now();
    let src = daemon::resolve_store(store)?;
    let dest = snapfs::sync::dest_store(newstore).map_err(|e| anyhow::anyhow!("{e}"))?;
    if snapfs::store::Store::exists(&dest) {
        anyhow::bail!(
            "{} is a store already: clone makes a new one",
            dest.display()
        );
    }
    let id = snapfs::store::clone::reflink_clone(&src, snapshot, &dest)
        .map_err(|e| anyhow::anyhow!("clone {} -> {}: {e}", store.display(), dest.display()))?;
    let Some(id) = id else {
        return Ok(false);
    };
    println!(
        "cloned {} into {} (volume {}): snapshot {}, its blocks shared with the source (reflink), {:.2} s; the live tree is that snapshot",
        store.display(),
        dest.display(),
        snapfs::store::hex(&id),
        snapfs::text::printable(snapshot),
        t.elapsed().as_secs_f64()
    );
    Ok(true)
}

/// `snapfs send STORE`: the source of a restore on stdin and stdout (over ssh).
fn send(store: &Path, only: Option<&str>) -> anyhow::Result<ExitCode> {
    let store = daemon::resolve_store(store)?;
    if let Some(end) = snapfs::sync::relay::daemon_source(&store, only, false, true, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        use snapfs::sync::relay::{End, relay};
        let here = End::stdio().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (_, res) = relay(end, here, false, false, None);
        res.map_err(|e| anyhow::anyhow!("send from {}: {e}", store.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let (r, w) = stdio_framed();
    snapfs::sync::session::send(&store, only, false, true, None, r, w)
        .map_err(|e| anyhow::anyhow!("send from {}: {e}", store.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// A session's frames on standard input and output (no key: ssh carries them).
fn stdio_framed() -> (
    snapfs::sync::wire::FrameReader<std::io::BufReader<std::io::StdinLock<'static>>>,
    snapfs::sync::wire::FrameWriter<std::io::BufWriter<std::io::StdoutLock<'static>>>,
) {
    use snapfs::sync::wire::{FrameReader, FrameWriter};
    (
        FrameReader::new(
            std::io::BufReader::with_capacity(1 << 20, std::io::stdin().lock()),
            None,
        ),
        FrameWriter::new(
            std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock()),
            None,
        ),
    )
}

/// `snapfs receive STORE`: the far end of `snapfs sync` over ssh, on stdin and stdout.
fn receive(store: &Path) -> anyhow::Result<ExitCode> {
    let store = &snapfs::sync::dest_store(store)?;
    // A mounted store is received by its daemon: the frames pass through, and what
    // they say decides how this ends.
    if let Some(conn) = snapfs::sync::relay::daemon_conn(store, &Request::Receive)? {
        use snapfs::sync::relay::{End, relay};
        let daemon = End::unix(conn).map_err(|e| anyhow::anyhow!("{e}"))?;
        let here = End::stdio().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (sum, res) = relay(here, daemon, false, false, None);
        res.map_err(|e| anyhow::anyhow!("receive into {}: {e}", store.display()))?;
        tracing::info!(snapshots = ?sum.snapshots, "received");
        return Ok(ExitCode::SUCCESS);
    }
    let (r, w) = stdio_framed();
    let sum = snapfs::sync::session::receive(store, None, r, w)
        .map_err(|e| anyhow::anyhow!("receive into {}: {e}", store.display()))?;
    tracing::info!(snapshots = ?sum.snapshots, "received");
    Ok(ExitCode::SUCCESS)
}

/// Runs a command through the daemon serving the store, or on the store opened here.
/// `snapfs resize`: the size goes into the store's snapfs.toml, and to its daemon.
fn resize(target: &Path, size: &str) -> anyhow::Result<ExitCode> {
    let bytes = match size {
        "none" => None,
        s => Some(daemon::parse_size(s).map_err(anyhow::Error::msg)?),
    };
    let store = daemon::resolve_store(target)?;
    anyhow::ensure!(
        snapfs::store::Store::exists(&store),
        "{}: not a snapfs store",
        store.display()
    );
    snapfs::policy::set_config(
        &store.join("snapfs.toml"),
        "size",
        bytes.map(|b| b.to_string()).as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    match daemon::ask_daemon(&store, &Request::SetSize { bytes }) {
        Some(out) if out.error => anyhow::bail!("{}", out.text.trim_end()),
        Some(out) => print!("{}", out.text),
        None => println!(
            "size {size} set; it applies when {} is next mounted",
            store.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// `snapfs csi`: serves until SIGTERM or SIGINT.
#[cfg(snapfs_csi)]
fn csi(
    endpoint: &str,
    node_id: &str,
    root: &Path,
    controller: bool,
    node: bool,
) -> anyhow::Result<ExitCode> {
    daemon::init_logging(None);
    snapfs::csi::serve(&snapfs::csi::Config {
        endpoint: endpoint.to_string(),
        node_id: node_id.to_string(),
        root: root.to_path_buf(),
        controller: controller || !node,
        node: node || !controller,
        snapfs: std::env::current_exe().context("cannot find the snapfs program itself")?,
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(snapfs_csi))]
fn csi(_: &str, _: &str, _: &Path, _: bool, _: bool) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "this snapfs was built without its CSI driver: the CSI definition (csi.proto) was not found at build time (SNAPFS_CSI_PROTO)"
    )
}

fn with_store(path: &Path, req: &Request) -> anyhow::Result<ExitCode> {
    let store = daemon::resolve_store(path)?;
    let out = match daemon::ask_daemon(&store, req) {
        Some(answer) => answer,
        None => {
            match snapfs::commands::run_read_only(&store, req, std::io::stderr().is_terminal()) {
                Some(out) => out,
                None => {
                    // A sync session or a daemon that stopped serving may still be
                    // closing the store: wait for it, a while.
                    let mut fs = Fs::open(&store, None);
                    for _ in 0..100 {
                        if !matches!(
                            fs,
                            Err(snapfs::fs::FsError::Store(
                                snapfs::store::StoreError::Locked
                            ))
                        ) {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        fs = Fs::open(&store, None);
                    }
                    let fs =
                        fs.with_context(|| format!("cannot open store {}", store.display()))?;
                    snapfs::commands::run(&fs, req, std::io::stderr().is_terminal())
                }
            }
        }
    };
    if out.error {
        eprintln!("snapfs: {}", out.text.trim_end());
    } else {
        print!("{}", out.text);
        if !out.text.is_empty() && !out.text.ends_with('\n') {
            println!();
        }
    }
    Ok(ExitCode::from(out.code as u8))
}
