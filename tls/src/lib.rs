//! TLS for wrenn's network links: rustls (TLS 1.3, the ring provider) as an implementation
//! of [`proto::rpc::Transport`], so frame handling never learns whether bytes are encrypted.
//!
//! - [`ServerTls`]: a server configuration from PEM files (certificate chain and key), with
//!   ALPN (`wrenn/1` on the protobuf ports), optionally requiring a client certificate
//!   signed by a given CA (mutual TLS, the agents' host port). [`ServerTls::wrap`] is what
//!   [`proto::rpc::Server::listen_fd_with`] takes.
//! - [`ClientTls`]: a client configuration trusting one CA bundle (`WRENN_CA`), optionally
//!   with a client certificate; [`connect`] opens a [`proto::rpc::Client`] over it.
//! - [`TlsTransport`]: one connection; sans-I/O rustls driven by the socket's readiness
//!   (`read_tls`/`write_tls` on non-blocking sockets), see `transport.rs`.
//!
//! envd and wrenn-uffd never link this crate: vsock and Unix sockets stay inside a host.

mod config;
pub mod hostkey;
pub mod limits;
pub mod peer;
mod transport;

pub use config::{
    ca_fingerprint, certs_from_pem, connect, host_of, key_from_pem, read_pem_file,
    verify_server_cert, ClientOptions, ClientTls, ServerOptions, ServerTls, SniCert, TlsError,
    TlsVersion,
};
pub use hostkey::{HostKey, KeyError};
pub use transport::{BlockingStream, TlsTransport};

/// Re-exported so users name certificate types without their own rustls dependency.
pub use rustls;
pub use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol name of the protobuf ports (wrenn.ctl.v1 on 7700, wrenn.host.v1 on 7702).
pub const ALPN_WRENN: &[u8] = b"wrenn/1";
/// ALPN protocol name of the HTTP/JSON gateway.
pub const ALPN_HTTP: &[u8] = b"http/1.1";

/// The first byte of a TLS handshake record (a ClientHello opens with it).
pub const RECORD_HANDSHAKE: u8 = 0x16;
/// The first byte of a TLS alert record.
pub const RECORD_ALERT: u8 = 0x15;

/// Whether `bytes` (the first a peer sent) look like the start of a TLS record: content
/// type 20..=23 and major version 3.
pub fn looks_like_tls(bytes: &[u8]) -> bool {
    match bytes {
        [t, rest @ ..] if (0x14..=0x17).contains(t) => rest.first().is_none_or(|&v| v == 3),
        _ => false,
    }
}

/// Fuzz entry point (`fuzz/fuzz_targets/tls_first_bytes.rs`): the code of ours that reads a
/// peer's first bytes before rustls does, on both sides: the TLS-record check and the
/// description of a plaintext answer (which decodes a wrenn ERROR frame or an HTTP status).
pub fn fuzz_first_bytes(data: &[u8]) {
    let _ = looks_like_tls(data);
    let msg = transport::describe_plaintext_answer(data);
    assert!(msg.starts_with("server does not speak TLS"));
}
