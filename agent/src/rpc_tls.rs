//! TLS of the agent's protobuf port (7710): mutual TLS with the certificate ctl issued this
//! host at registration (`host.pem`, `host.key`), requiring ctl's client certificate from
//! ctl's CA (`ctl-ca.pem`). Until the host has a certificate (before registration, or when
//! ctl issues none) the port stays plaintext with agent tokens, as before.
//!
//! The listener is made before registration, so the TLS configuration is looked up at each
//! accept: registration installs it without a restart and running sandboxes are untouched.

use std::path::Path;
use std::sync::{Arc, RwLock};

use proto::rpc::{SocketTransport, Transport, WrapTransport};

/// The current TLS configuration of the port, if any.
#[derive(Default)]
pub struct RpcTls {
    current: RwLock<Option<tls::ServerTls>>,
}

impl std::fmt::Debug for RpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcTls")
            .field("tls", &self.is_tls())
            .finish()
    }
}

/// The server configuration from the host certificate, its key and ctl's CA (PEM texts).
pub fn server_tls(cert: &[u8], key: &[u8], ctl_ca: &[u8]) -> Result<tls::ServerTls, tls::TlsError> {
    let mut reply = Vec::new();
    proto::frame::put_error(
        &mut reply,
        0,
        proto::Code::Unavailable,
        "server speaks TLS: this agent's port requires mutual TLS with ctl's client certificate",
    );
    tls::ServerTls::from_pem(
        cert,
        key,
        &tls::ServerOptions {
            alpn: vec![tls::ALPN_WRENN.to_vec()],
            client_ca_pem: Some(ctl_ca.to_vec()),
            plaintext_reply: Some(reply),
            ..Default::default()
        },
    )
}

impl RpcTls {
    /// Loads `host.pem`, `host.key` and `ctl-ca.pem` when all three exist.
    pub fn load(cert: &Path, key: &Path, ctl_ca: &Path) -> Result<RpcTls, String> {
        let t = RpcTls::default();
        if cert.exists() && key.exists() && ctl_ca.exists() {
            let read = |p: &Path| tls::read_pem_file(p).map_err(|e| e.to_string());
            t.set(
                server_tls(&read(cert)?, &read(key)?, &read(ctl_ca)?).map_err(|e| e.to_string())?,
            );
        }
        Ok(t)
    }

    pub fn set(&self, t: tls::ServerTls) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }

    pub fn is_tls(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// What the listener takes: TLS when the host has its certificate, else the socket.
    pub fn wrap(self: &Arc<Self>) -> WrapTransport {
        let me = self.clone();
        Arc::new(move |sock: SocketTransport| {
            let cur = me.current.read().unwrap_or_else(|e| e.into_inner()).clone();
            match cur {
                Some(t) => (t.wrap())(sock),
                None => Box::new(sock) as Box<dyn Transport>,
            }
        })
    }
}
