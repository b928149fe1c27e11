//! Replication of snapshots to another snapfs store (`snapfs sync`): the layer above
//! the store and its snapshot layer, beside the filesystem core and never through it.
//!
//! Built so far: the wire format ([`wire`]), its frames, their bounds and their
//! authentication. The source and sink that speak it, the transports and the
//! commands come next; `docs/FORMAT.md` ("Sync wire format") is the byte layout.

pub mod session;
pub mod tcp;
pub mod wire;
