//! `agent`: wrenn-agent, the per-host daemon that runs sandboxes (ARCHITECTURE.md, `agent/`).
//!
//! - [`state`]: the sandbox state machine as a table;
//! - [`statedir`]: records under the state root, written atomically;
//! - [`ttl`]: timeouts with an injectable clock, and the reaper loop;
//! - [`manager`]: lifecycle operations, slots, disks, re-adoption after a restart;
//! - [`uid_pool`]: the unprivileged uids jailed Firecrackers run as, one per running sandbox;
//! - [`vm`]: the VM layer the manager drives, as a trait;
//! - [`metrics`]: counters and Prometheus text;
//! - [`restore_stats`]: wrenn-uffd's stats file after a restore, as metrics and a log line;
//! - [`sys`]: pidfds, statvfs, random bytes;
//! - [`rpc`]: the wrenn.agent.v1 server and the proxies to envd;
//! - [`ports`]: `Ports.Connect`, raw TCP to a port of a running sandbox;
//! - [`ctl`]: registration, heartbeats and reports to ctl (wrenn.host.v1);
//! - [`firecracker`]: the VM layer on Firecracker;
//! - [`host`], [`http`], [`flags`], [`daemon`]: host info, /health and /metrics, the
//!   command line, start-up;
//! - [`limits`]: every bound, with its reason.
//!
//! It is not the VMM layer (Firecracker's API, processes, vsock, network slots live in
//! `vmm-glue`) nor the page server (`uffd`).

pub mod ctl;
pub mod daemon;
pub mod firecracker;
pub mod flags;
pub mod host;
pub mod http;
pub mod limits;
pub mod manager;
pub mod metrics;
pub mod ports;
pub mod restore_stats;
pub mod rpc;
pub mod rpc_tls;
pub mod sampler;
pub mod samples;
pub mod state;
pub mod statedir;
pub mod sys;
pub mod ttl;
pub mod uid_pool;
pub mod vm;
