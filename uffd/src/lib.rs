//! `uffd`: guest-memory snapshots for wrenn.
//!
//! - [`header`]: the snapshot header (format in `HEADER.md`): extents mapping each 4 KiB block
//!   of guest memory to a layer file or to zeros; parse, serialize, merge, squash;
//! - [`generation`]: turning a Firecracker memory file into a new generation (layer + diff);
//! - [`handshake`]: Firecracker's UFFD handshake (fd + JSON regions);
//! - [`working_set`]: the recorded order of first-touched pages;
//! - [`page_server`]: the `wrenn-uffd` event loop that serves page faults from layer files;
//! - [`snapshot`]: a snapshot directory: generations published by one rename, recovery;
//! - [`privileges`]: dropping root before serving (uid, gid, capabilities, no new privileges);
//! - [`sys`]: the only module with `unsafe`: ioctls, SCM_RIGHTS, pidfd, mappings.
//!
//! It is not the VMM launcher (that is `vmm-glue`) and it speaks no RPC.

pub mod generation;
pub mod handshake;
pub mod header;
pub mod limits;
pub mod page_server;
pub mod privileges;
pub mod snapshot;
pub mod stats;
pub mod sys;
pub mod working_set;
