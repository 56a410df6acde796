//! The `wrenn` CLI's library: everything `main.rs` dispatches to, reachable from tests.
//!
//! `image`: builds guest kernels and root filesystem images (`wrenn image kernel|rootfs`).

pub mod image;
