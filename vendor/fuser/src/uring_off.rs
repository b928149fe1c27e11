//! Built without the `uring` feature: the same interface as `uring.rs`, but no ring
//! is ever set up, so INIT declines FUSE over io_uring and every request goes through
//! `/dev/fuse`.

use std::io;
use std::io::IoSlice;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use log::error;

use crate::Filesystem;
use crate::dev_fuse::DevFuse;
use crate::session::SessionEventLoop;

/// Never made: no request comes through a ring.
#[derive(Clone, Debug)]
pub(crate) enum RingReply {}

impl RingReply {
    pub(crate) fn dev(&self) -> &Arc<DevFuse> {
        match *self {}
    }

    pub(crate) fn send(&self, _bufs: &[IoSlice<'_>]) -> io::Result<()> {
        match *self {}
    }
}

/// Never made: [`Rings::new`] always fails.
#[derive(Debug)]
pub(crate) enum Rings {}

impl Rings {
    pub(crate) fn new(
        _dev: &Arc<DevFuse>,
        _depth: usize,
        _threads: usize,
        _payload_len: usize,
        _idle: bool,
    ) -> io::Result<Self> {
        Err(io::Error::other(
            "snapfs was built without the uring feature",
        ))
    }

    pub(crate) fn spawn<FS: Filesystem>(
        &self,
        _make_loop: impl Fn(String) -> SessionEventLoop<FS>,
        _mountpoint: Option<PathBuf>,
    ) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>> {
        match *self {}
    }

    pub(crate) fn stop(&self) {
        match *self {}
    }
}

/// Nothing to abort through a ring; logged so that the caller's intent shows.
pub(crate) fn abort_connection(mountpoint: &Path) {
    error!(
        "no io_uring support built in; not aborting {}",
        mountpoint.display()
    );
}
