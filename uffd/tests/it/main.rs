//! Integration tests of the `uffd` crate against the real kernel: a Firecracker-like harness
//! (`harness`), the page server (`page_server`), handshake edge cases (`handshake`), a KVM guest
//! (`kvm`), the `wrenn-uffd` binary (`binary`), and the fuzz corpus replay (`corpus`).

mod binary;
mod corpus;
mod handshake;
mod harness;
mod kvm;
mod page_server;
