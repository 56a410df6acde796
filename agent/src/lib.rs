//! `agent`: wrenn-agent, the per-host daemon that runs sandboxes (DESIGN.md §1, §3).
//!
//! - [`state`]: the sandbox state machine as a table;
//! - [`statedir`]: records under the state root, written atomically;
//! - [`ttl`]: timeouts with an injectable clock;
//! - [`limits`]: every bound, with its reason.
//!
//! It is not the VMM layer (Firecracker's API, processes, vsock, network slots live in
//! `vmm-glue`) nor the page server (`uffd`).

pub mod limits;
pub mod state;
pub mod statedir;
pub mod ttl;
