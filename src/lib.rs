//! snapfs: a FUSE-mounted, copy-on-write, snapshotting filesystem.
//!
//! Layers, top to bottom (see `docs/ARCHITECTURE.md`):
//! - [`daemon`]: mounting, daemonizing, signals, the control socket;
//! - [`fuse`]: the thin fuser adapter;
//! - [`fs`]: POSIX semantics over the versioned store (no FUSE types);
//! - [`control`]: the typed commands and answers of the control protocol;
//! - [`check`]: fsck and status;
//! - [`sync`]: replication of snapshots to another store (its wire format so far);
//! - [`replicate`]: scheduled replication of a mounted volume (`replicate=`);
//! - [`store`]: the redb schema, extent segments and reference counts;
//! - [`text`]: how user-given names and arguments are printed.

pub mod check;
pub mod commands;
pub mod control;
#[cfg(snapfs_csi)]
pub mod csi;
pub mod daemon;
pub mod fs;
pub mod fuse;
pub mod policy;
pub mod replicate;
pub mod store;
pub mod sync;
pub mod text;
