//! The `wrenn` CLI's library: everything `main.rs` dispatches to, reachable from tests.
//!
//! `image`: builds guest kernels and root filesystem images (`wrenn image kernel|rootfs`).
//! `doctor`: host checks (`wrenn doctor`).

pub mod doctor;
pub mod image;
