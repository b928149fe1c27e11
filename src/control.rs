//! The control protocol: the commands the CLI sends to a store's daemon (or runs on
//! the store itself) as typed values, and their answers.
//!
//! On the control socket a request is one line of JSON (a [`Request`], at most
//! 64 KiB) and the answer one line of JSON (an [`Outcome`]). Both ends are this
//! crate: the CLI builds requests from its parsed arguments, the daemon decodes them
//! with serde, and a line that does not decode is answered with an error.

use serde::{Deserialize, Serialize};

/// A command against a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Files, space, dedup ratio and snapshots.
    Status,
    /// Verify the store.
    Fsck {
        /// Also reread and rehash every extent.
        read_data: bool,
        /// Repair what can be repaired first (unmounted stores only).
        repair: bool,
        /// Report as JSON.
        json: bool,
    },
    /// Take a snapshot.
    SnapshotCreate {
        /// Its name.
        name: String,
    },
    /// Delete a snapshot.
    SnapshotDelete {
        /// Its name.
        name: String,
    },
    /// Roll the live tree back to a snapshot.
    SnapshotRollback {
        /// Its name.
        name: String,
    },
    /// List snapshots.
    SnapshotList {
        /// As JSON.
        json: bool,
        /// Also deleted snapshots still kept.
        all: bool,
    },
    /// Keep a snapshot under a named hold.
    SnapshotHold {
        /// The snapshot.
        snapshot: String,
        /// The hold's name.
        hold: String,
    },
    /// Release a named hold.
    SnapshotRelease {
        /// The hold's name.
        hold: String,
    },
    /// Delete scheduled snapshots the retention policy does not keep.
    SnapshotPrune {
        /// Only say what would go.
        dry_run: bool,
        /// The policy (default: the mount's).
        keep: Option<String>,
    },
    /// What changed between two snapshots (or a snapshot and `live`).
    Diff {
        /// The older side.
        old: String,
        /// The newer side.
        new: String,
        /// With the changed byte ranges of files.
        blocks: bool,
        /// As JSON.
        json: bool,
    },
    /// Be the source of a sync session: after the answer line, the connection
    /// carries the session's frames (`snapfs sync` of a mounted store).
    Send {
        /// Send this snapshot only.
        snapshot: Option<String>,
        /// Only say what would be sent.
        dry_run: bool,
        /// A one-off session (a restore): no cursor or hold is kept for the
        /// destination.
        #[serde(default)]
        one_off: bool,
        /// The session's shared key, hex, on a keyed session (TCP).
        key: Option<String>,
    },
    /// Be the destination of a sync session (a mounted replica): after the answer
    /// line, the connection carries the session's frames.
    Receive,
    /// The device number (`major:minor`) of the daemon's FUSE mount, so that a second
    /// mount of the store can be a bind mount of it.
    MountDevice,
    /// Set the volume's size (`size=`; `None`: none) on the mounted store.
    SetSize {
        /// Bytes.
        bytes: Option<u64>,
    },
}

impl Request {
    /// Whether the command only looks, at what any user may see (served to other
    /// users with `control=public`): deleted snapshots kept for holds (`--all`) are
    /// not theirs to see.
    pub fn read_only(&self) -> bool {
        matches!(
            self,
            Request::Status | Request::SnapshotList { all: false, .. }
        )
    }

    /// Whether the command changes the live tree or takes a snapshot of it, so that
    /// writes the kernel still caches must reach the daemon first.
    pub fn needs_kernel_flush(&self) -> bool {
        matches!(
            self,
            Request::SnapshotCreate { .. }
                | Request::SnapshotRollback { .. }
                | Request::Diff { .. }
        )
    }

    /// The command's name, for logs and refusals.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Fsck { .. } => "fsck",
            Request::SnapshotCreate { .. } => "snapshot create",
            Request::SnapshotDelete { .. } => "snapshot delete",
            Request::SnapshotRollback { .. } => "snapshot rollback",
            Request::SnapshotList { .. } => "snapshot list",
            Request::SnapshotHold { .. } => "snapshot hold",
            Request::SnapshotRelease { .. } => "snapshot release",
            Request::SnapshotPrune { .. } => "snapshot prune",
            Request::Diff { .. } => "diff",
            Request::Send { .. } => "send",
            Request::Receive => "receive",
            Request::MountDevice => "mount-device",
            Request::SetSize { .. } => "resize",
        }
    }
}

/// A command's result: its output, exit code, and whether the output is an error line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// Text for stdout (or the error line for stderr).
    pub text: String,
    /// Exit code.
    pub code: i32,
    /// `text` is an error message.
    pub error: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_strangers_are_refused() {
        let r = Request::SnapshotHold {
            snapshot: "a\u{1b}[2J".into(),
            hold: "h".into(),
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        for bad in [
            r#"{"snapshot-create":{}}"#,
            r#"{"snapshot-create":{"name":1}}"#,
            r#""format-disk""#,
            r#"{"snapshot-release":{"hold":"h","extra":1}}"#,
            r#"["status"]"#,
            "",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
