//! `ctl`: wrenn's control plane (`wrenn-ctl`).
//!
//! It holds no state of its own: everything lives in PostgreSQL, so any replica serves any
//! request. It serves the public API (`wrenn.ctl.v1`) twice over one service layer
//! ([`service::Api`]): framed protobuf ([`server`], port 7700) and HTTP/JSON ([`http`], port
//! 7701); agents call the host-facing `wrenn.host.v1` ([`host_service`]) on a listener of
//! their own (port 7702), so clients can never starve their heartbeats. ctl calls agents ([`agents`]) for
//! lifecycle work; background jobs ([`monitor`], [`reconciler`]) run under PostgreSQL
//! advisory locks so N replicas do each job once.
//!
//! It is not the CLI (`wrenn`, in `cli/`) and it runs no VMs.

pub mod admin;
pub mod agents;
pub mod auth;
pub mod config;
pub mod db;
pub mod dispatch;
pub mod host_service;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod migrate;
pub mod monitor;
pub mod pki;
pub mod random;
pub mod reconciler;
pub mod retention;
pub mod revocation;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod sha256;
pub mod testkit;
pub mod usage;
pub mod webhook;
