//! The `wrenn` CLI's library: everything `main.rs` dispatches to, reachable from tests.
//!
//! `image`: builds guest kernels and root filesystem images (`wrenn image kernel|rootfs`).
//! `doctor`: host checks (`wrenn doctor`).
//! `up`: the local stack (`wrenn up`, `wrenn down`).
//! `cli`: the API client (`wrenn sandbox|process|file|template|key|team|user|host|audit ...`).

pub mod cli;
pub mod doctor;
pub mod image;
pub mod up;
