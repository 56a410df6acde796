//! `proto`: what every wrenn link and binary shares.
//!
//! - [`frame`]: the length-prefixed frame codec (pure, no I/O), described in PROTOCOL.md;
//! - [`rpc`] (feature `rpc`): the multiplexed RPC runtime on mio — client, server, flow control;
//! - [`http`] (feature `http`): the one HTTP/1.1 codec (heads, bounded bodies, chunked);
//! - [`gen`] (feature `rpc`): protobuf messages generated from `schema/` (checked in);
//! - [`id`]: wire IDs (`sb-{uuid}` ...), parsed strictly at every boundary;
//! - [`status`]: error codes; [`logger`]: the `log` backend; [`metrics`]: Prometheus text;
//! - [`kv`]: the `key=value` format of every small state file;
//! - [`pool`]: the one bounded pool of worker threads for work that blocks;
//! - [`process`]: pidfds and process start times (a live process, never a recycled pid);
//! - [`random`]: secrets and random ids from `getrandom(2)`; [`base64`]: RFC 4648;
//! - [`skip`]: the `skipped: <reason>` convention of tests (`WRENN_REQUIRE_E2E=1`);
//! - [`signal`]: waiting for SIGTERM/SIGINT, so daemons drain their servers;
//! - [`sandbox_limits`]: the bounds of one sandbox that ctl and the agent must agree on;
//! - [`sandbox`] (feature `rpc`): the shared sandbox spec, state, timeout policy and template
//!   kind, with their stored names.
//! - [`recipe`]: template recipes (`Wrennfile`), parsed with line and column in every error;
//! - [`hmac`]: HMAC-SHA256 and the webhook signature.
//!
//! It is not a place for service logic: each service lives in the crate that serves it.
//! wrenn-uffd links this crate without the `rpc` feature, so it pulls neither mio nor prost.

pub mod base64;
pub mod frame;
pub mod hmac;
pub mod id;
pub mod kv;
pub mod limits;
pub mod logger;
pub mod metrics;
pub mod network;
pub mod pool;
pub mod process;
pub mod random;
pub mod recipe;
pub mod sandbox_limits;
pub mod sha256;
pub mod signal;
pub mod skip;
pub mod status;

#[cfg(feature = "rpc")]
pub mod gen;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "rpc")]
pub mod rpc;
#[cfg(feature = "rpc")]
pub mod sandbox;

pub use status::{Code, Status};

/// Version of the wire protocol spoken by this build (the hello carries it).
pub const PROTOCOL_VERSION: u32 = 1;
