//! Integration tests of the `uffd` crate against the real kernel: a Firecracker-like harness
//! (`harness`), the page server (`page_server`), handshake edge cases (`handshake`), a KVM guest
//! (`kvm`), the `wrenn-uffd` binary (`binary`), real Firecracker (`firecracker`, with
//! `WRENN_FIRECRACKER`), and the fuzz corpus replay (`corpus`).

mod binary;
mod corpus;
mod firecracker;
mod handshake;
mod harness;
mod kvm;
mod page_server;
