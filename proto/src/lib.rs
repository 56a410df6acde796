//! `proto`: what every wrenn link and binary shares.
//!
//! - [`frame`]: the length-prefixed frame codec (pure, no I/O), described in PROTOCOL.md;
//! - [`rpc`] (feature `rpc`): the multiplexed RPC runtime on mio — client, server, flow control;
//! - [`gen`] (feature `rpc`): protobuf messages generated from `schema/` (checked in);
//! - [`id`]: wire IDs (`sb-{uuid}` ...), parsed strictly at every boundary;
//! - [`status`]: error codes; [`logger`]: the `log` backend; [`metrics`]: Prometheus text;
//! - [`skip`]: the `skipped: <reason>` convention of tests (`WRENN_REQUIRE_E2E=1`).
//!
//! It is not a place for service logic: each service lives in the crate that serves it.
//! wrenn-uffd links this crate without the `rpc` feature, so it pulls neither mio nor prost.

pub mod frame;
pub mod id;
pub mod limits;
pub mod logger;
pub mod metrics;
pub mod sandbox_limits;
pub mod sha256;
pub mod skip;
pub mod status;

#[cfg(feature = "rpc")]
pub mod gen;
#[cfg(feature = "rpc")]
pub mod rpc;

pub use status::{Code, Status};

/// Version of the wire protocol spoken by this build (the hello carries it).
pub const PROTOCOL_VERSION: u32 = 1;
