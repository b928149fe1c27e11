//! The `snapfs` command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use snapfs::daemon;
use snapfs::fs::Fs;

/// A copy-on-write, snapshotting FUSE filesystem with deduplicated extents.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount STORE on MOUNTPOINT (creates STORE when missing or empty).
    Mount {
        /// The store directory.
        store: PathBuf,
        /// Where to mount it.
        mountpoint: PathBuf,
        /// Mount options, comma-separated (source=NAME, threads=N, ro, noatime, ...).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Stay in the foreground instead of returning once the mount is live.
        #[arg(short, long)]
        foreground: bool,
    },
    /// Verify a store; exits 1 if anything is damaged.
    Fsck {
        /// A store, or the mountpoint of a mounted one.
        store: PathBuf,
        /// Also reread and rehash every extent.
        #[arg(long)]
        read_data: bool,
    },
    /// Show files, space and dedup figures.
    Status {
        /// A store, or the mountpoint of a mounted one.
        target: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snapfs: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Mount {
            store,
            mountpoint,
            options,
            foreground,
        } => {
            daemon::mount(&store, &mountpoint, &options, foreground)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fsck { store, read_data } => {
            let cmd = if read_data {
                "fsck --read-data"
            } else {
                "fsck"
            };
            with_store(&store, cmd, |fs| {
                let tty = std::io::stderr().is_terminal();
                let mut core = fs.lock();
                let rep = snapfs::check::fsck(core.store(), read_data, &mut |done, total| {
                    if tty {
                        eprint!("\rchecking extents: {done}/{total}");
                    }
                })?;
                if tty {
                    eprintln!();
                }
                Ok((rep.summary(), if rep.clean() { 0 } else { 1 }))
            })
        }
        Cmd::Status { target } => with_store(&target, "status", |fs| {
            let mut core = fs.lock();
            Ok((snapfs::check::status(core.store())?.render(), 0))
        }),
    }
}

/// Runs a command through the daemon serving the store, or on the store opened here.
fn with_store(
    path: &Path,
    cmd: &str,
    local: impl FnOnce(&Fs) -> anyhow::Result<(String, i32)>,
) -> anyhow::Result<ExitCode> {
    let store = daemon::resolve_store(path)?;
    let (out, code) = match daemon::ask_daemon(&store, cmd) {
        Some(answer) => answer,
        None => {
            let fs = Fs::open(&store, None)
                .with_context(|| format!("cannot open store {}", store.display()))?;
            local(&fs)?
        }
    };
    print!("{out}");
    if !out.is_empty() && !out.ends_with('\n') {
        println!();
    }
    Ok(ExitCode::from(code as u8))
}
