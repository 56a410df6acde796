//! Server and client configurations: PEM files in, rustls configurations out.

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::rpc::{Client, ClientConfig, Credential, SocketTransport, Transport, WrapTransport};
use proto::Status;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::limits::PEM_FILE_MAX;
use crate::transport::TlsTransport;

/// Why a TLS configuration could not be built. Each names the file or setting at fault.
#[derive(Debug)]
pub enum TlsError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    TooLarge {
        path: PathBuf,
    },
    NoCertificate {
        what: String,
    },
    BadPem {
        what: String,
        detail: String,
    },
    NoKey {
        what: String,
    },
    BadName {
        name: String,
    },
    Rustls(rustls::Error),
    Verifier(String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Read { path, source } => write!(f, "read {}: {source}", path.display()),
            TlsError::TooLarge { path } => write!(
                f,
                "{} is larger than {PEM_FILE_MAX} bytes; not a PEM file",
                path.display()
            ),
            TlsError::NoCertificate { what } => write!(f, "{what}: no PEM certificate in it"),
            TlsError::BadPem { what, detail } => write!(f, "{what}: bad PEM: {detail}"),
            TlsError::NoKey { what } => write!(
                f,
                "{what}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)"
            ),
            TlsError::BadName { name } => {
                write!(f, "{name:?} is neither a DNS name nor an IP address")
            }
            TlsError::Rustls(e) => write!(f, "TLS configuration: {e}"),
            TlsError::Verifier(e) => write!(f, "client-certificate verifier: {e}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Read { source, .. } => Some(source),
            TlsError::Rustls(e) => Some(e),
            _ => None,
        }
    }
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> TlsError {
        TlsError::Rustls(e)
    }
}

/// Reads a PEM file, refusing anything larger than [`PEM_FILE_MAX`].
pub fn read_pem_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    let f = std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    f.take(PEM_FILE_MAX + 1)
        .read_to_end(&mut out)
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if out.len() as u64 > PEM_FILE_MAX {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(out)
}

/// Every certificate in a PEM text, in order.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what: what.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM text.
pub fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            what: what.to_owned(),
        },
        e => TlsError::BadPem {
            what: what.to_owned(),
            detail: e.to_string(),
        },
    })
}

fn roots_from_pem(pem: &[u8], what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(pem, what)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// Checks that `leaf` chains to the CA certificate `ca` and is valid now for `name`.
pub fn verify_server_cert(
    ca: &CertificateDer<'_>,
    leaf: &CertificateDer<'_>,
    name: &str,
) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone().into_owned())
        .map_err(|e| e.to_string())?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    use rustls::client::danger::ServerCertVerifier;
    verifier
        .verify_server_cert(leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// SHA-256 of a certificate's DER bytes, lower-case hex: the CA pin a registration token
/// carries.
pub fn ca_fingerprint(cert: &CertificateDer<'_>) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The ring provider. rustls 0.23.48 deprecates it because ring has no post-quantum key
/// exchange; the alternative (aws-lc-rs) is a C build with cmake and a far larger footprint,
/// so wrenn stays on ring (X25519, P-256, P-384) until ring or rustls offers one.
/// Cipher suites: AES-128-GCM first (as fast as it gets with AES-NI, and 128-bit keys are
/// the TLS 1.3 mandatory suite), then AES-256-GCM and ChaCha20-Poly1305 for peers without
/// AES hardware.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The lowest TLS version a side accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.3 only (the default everywhere).
    #[default]
    Tls13,
    /// TLS 1.2 too, only when an operator's flag asks for it.
    Tls12,
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS13_AND_12: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

impl TlsVersion {
    fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        match self {
            TlsVersion::Tls13 => TLS13_ONLY,
            TlsVersion::Tls12 => TLS13_AND_12,
        }
    }
}

/// How a server listener speaks TLS.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// ALPN protocols offered (e.g. [`crate::ALPN_WRENN`]). A client that offers ALPN
    /// without one of these is refused; a client that offers none is accepted.
    pub alpn: Vec<Vec<u8>>,
    pub min_version: TlsVersion,
    /// PEM of the CA(s) whose client certificates are required (mutual TLS). `None`: the
    /// listener never asks for a client certificate.
    pub client_ca_pem: Option<Vec<u8>>,
    /// With `client_ca_pem`: a client that sends no certificate is still accepted (one it
    /// sends must verify), and the service decides per connection (ctl's host port: an
    /// agent registering has none yet).
    pub client_cert_optional: bool,
    /// Sent in plaintext to a client whose first byte cannot open a TLS handshake, before
    /// the connection is closed (a wrenn ERROR frame, or an HTTP 400).
    pub plaintext_reply: Option<Vec<u8>>,
    /// More certificates chosen by SNI (e.g. the wildcard certificate of the sandbox ports'
    /// domain); clients naming anything else (or no name, as with an IP address) get the
    /// main certificate.
    pub sni: Vec<SniCert>,
}

/// A certificate for the names under one domain, chosen by SNI.
#[derive(Clone, Debug)]
pub struct SniCert {
    /// `example.com`: used for `example.com` and every `*.example.com`.
    pub domain: String,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// Picks the certificate by the client's SNI name.
#[derive(Debug)]
struct SniResolver {
    default: Arc<rustls::sign::CertifiedKey>,
    /// (lower-case domain, certificate)
    extra: Vec<(String, Arc<rustls::sign::CertifiedKey>)>,
}

impl SniResolver {
    fn pick(&self, name: Option<&str>) -> Arc<rustls::sign::CertifiedKey> {
        if let Some(name) = name {
            let name = name.to_ascii_lowercase();
            for (domain, ck) in &self.extra {
                let under = name
                    .strip_suffix(domain.as_str())
                    .is_some_and(|head| head.is_empty() || head.ends_with('.'));
                if under {
                    return ck.clone();
                }
            }
        }
        self.default.clone()
    }
}

impl rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// A server's TLS configuration: certificate chain, key, options.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    plaintext_reply: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// From PEM texts: `cert_pem` the chain (leaf first), `key_pem` its private key.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        opts: &ServerOptions,
    ) -> Result<ServerTls, TlsError> {
        let chain = certs_from_pem(cert_pem, "server certificate")?;
        let key = key_from_pem(key_pem, "server key")?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(opts.min_version.versions())?;
        let builder = match &opts.client_ca_pem {
            Some(pem) => {
                let roots = roots_from_pem(pem, "client CA")?;
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                if opts.client_cert_optional {
                    verifier = verifier.allow_unauthenticated();
                }
                let verifier = verifier
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = if opts.sni.is_empty() {
            builder.with_single_cert(chain, key)?
        } else {
            let p = provider();
            let default = Arc::new(rustls::sign::CertifiedKey::from_der(chain, key, &p)?);
            let mut extra = Vec::new();
            for c in &opts.sni {
                let what = format!("certificate for {}", c.domain);
                let ck = rustls::sign::CertifiedKey::from_der(
                    certs_from_pem(&c.cert_pem, &what)?,
                    key_from_pem(&c.key_pem, &what)?,
                    &p,
                )?;
                extra.push((
                    c.domain.trim_start_matches("*.").to_ascii_lowercase(),
                    Arc::new(ck),
                ));
            }
            builder.with_cert_resolver(Arc::new(SniResolver { default, extra }))
        };
        config.alpn_protocols = opts.alpn.clone();
        ServerTls::from_config(Arc::new(config), opts.plaintext_reply.clone())
    }

    /// From PEM files (`--tls-cert`, `--tls-key`).
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        opts: &ServerOptions,
    ) -> Result<ServerTls, TlsError> {
        let cert_pem = read_pem_file(cert)?;
        let key_pem = read_pem_file(key)?;
        ServerTls::from_pem(&cert_pem, &key_pem, opts).map_err(|e| match e {
            TlsError::BadPem { what, detail } if what == "server key" => TlsError::BadPem {
                what: key.display().to_string(),
                detail,
            },
            TlsError::NoKey { .. } => TlsError::NoKey {
                what: key.display().to_string(),
            },
            TlsError::NoCertificate { .. } => TlsError::NoCertificate {
                what: cert.display().to_string(),
            },
            e => e,
        })
    }

    /// From a rustls configuration built elsewhere (a custom client verifier).
    pub fn from_config(
        config: Arc<rustls::ServerConfig>,
        plaintext_reply: Option<Vec<u8>>,
    ) -> Result<ServerTls, TlsError> {
        // Fail now, not per connection, if rustls refuses the configuration.
        rustls::server::UnbufferedServerConnection::new(config.clone())?;
        Ok(ServerTls {
            config,
            plaintext_reply: plaintext_reply.map(Into::into),
        })
    }

    /// Wraps one accepted socket.
    pub fn accept(&self, sock: SocketTransport) -> Result<TlsTransport, TlsError> {
        let conn = rustls::server::UnbufferedServerConnection::new(self.config.clone())?;
        Ok(TlsTransport::new_server(
            sock,
            conn,
            self.plaintext_reply.clone(),
        ))
    }

    /// What [`proto::rpc::Server::listen_fd_with`] takes.
    pub fn wrap(&self) -> WrapTransport {
        let tls = self.clone();
        Arc::new(move |sock| {
            match rustls::server::UnbufferedServerConnection::new(tls.config.clone()) {
                Ok(conn) => Box::new(TlsTransport::new_server(
                    sock,
                    conn,
                    tls.plaintext_reply.clone(),
                )) as Box<dyn Transport>,
                // Checked in `from_config`; should rustls still refuse, the connection is
                // closed as a plain socket.
                Err(e) => {
                    log::warn!("tls: cannot start a server connection error={e}");
                    sock.shutdown();
                    Box::new(sock)
                }
            }
        })
    }
}

/// How a client speaks TLS.
#[derive(Debug, Default)]
pub struct ClientOptions {
    /// ALPN protocols offered, e.g. [`crate::ALPN_WRENN`].
    pub alpn: Vec<Vec<u8>>,
    pub min_version: TlsVersion,
    /// The name the server's certificate must carry; default: the host part of the address.
    pub server_name: Option<String>,
    /// A client certificate chain and key (mutual TLS).
    pub identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

/// A client's TLS configuration: the trusted CA and options.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Trusting the CA certificate(s) in `ca_pem`.
    pub fn from_ca_pem(ca_pem: &[u8], opts: ClientOptions) -> Result<ClientTls, TlsError> {
        let roots = roots_from_pem(ca_pem, "CA bundle")?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(opts.min_version.versions())?
            .with_root_certificates(roots);
        let mut config = match opts.identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = opts.alpn;
        Ok(ClientTls {
            config: Arc::new(config),
            server_name: opts.server_name,
        })
    }

    /// Trusting the CA bundle in a PEM file (`WRENN_CA`).
    pub fn from_ca_file(path: &Path, opts: ClientOptions) -> Result<ClientTls, TlsError> {
        let pem = read_pem_file(path)?;
        ClientTls::from_ca_pem(&pem, opts).map_err(|e| match e {
            TlsError::NoCertificate { .. } => TlsError::NoCertificate {
                what: path.display().to_string(),
            },
            TlsError::BadPem { detail, .. } => TlsError::BadPem {
                what: path.display().to_string(),
                detail,
            },
            e => e,
        })
    }

    /// From a rustls configuration built elsewhere (a pinning verifier).
    pub fn from_config(config: Arc<rustls::ClientConfig>, server_name: Option<String>) -> Self {
        ClientTls {
            config,
            server_name,
        }
    }

    /// The same configuration, requiring the server's certificate to carry `name` whatever
    /// address is dialled (ctl → agent: the host id).
    pub fn with_server_name(&self, name: String) -> ClientTls {
        ClientTls {
            config: self.config.clone(),
            server_name: Some(name),
        }
    }

    /// Starts the handshake on a connected socket; `host` is the name the certificate must
    /// carry unless the options named one.
    pub fn start(&self, sock: SocketTransport, host: &str) -> Result<TlsTransport, TlsError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned()).map_err(|_| TlsError::BadName {
            name: name.to_owned(),
        })?;
        let conn =
            rustls::client::UnbufferedClientConnection::new(self.config.clone(), server_name)?;
        Ok(TlsTransport::new_client(sock, conn))
    }
}

impl ClientTls {
    /// Connects, starts the handshake and returns a blocking stream (HTTPS clients).
    pub fn connect_blocking(
        &self,
        addr: std::net::SocketAddr,
        host: &str,
        timeout: std::time::Duration,
    ) -> std::io::Result<crate::BlockingStream> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        let t = self
            .start(SocketTransport::new(tcp.into()), host)
            .map_err(std::io::Error::other)?;
        crate::BlockingStream::new(t, timeout)
    }
}

/// The host part of `host:port` or `[v6]:port`.
pub fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    }
}

/// Connects over TCP, does the TLS handshake and says hello: a [`Client`] over TLS. The
/// handshake falls inside the hello's deadline ([`ClientConfig::hello_timeout`]).
pub fn connect(
    addr: &str,
    tls: &ClientTls,
    cred: Credential,
    cfg: &ClientConfig,
) -> Result<Client, Status> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| Status::invalid_argument(format!("bad address {addr}: {e}")))?
        .collect();
    let mut last = Status::invalid_argument(format!("{addr} resolved to nothing"));
    for a in addrs {
        match TcpStream::connect_timeout(&a, cfg.connect_timeout) {
            Ok(s) => {
                let sock = SocketTransport::new(s.into());
                let t = tls
                    .start(sock, host_of(addr))
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                return Client::from_transport(Box::new(t), cred, cfg);
            }
            Err(e) => last = Status::unavailable(format!("connect {a}: {e}")),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7700"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7700"), "::1");
        assert_eq!(host_of("ctl.example:7700"), "ctl.example");
        assert_eq!(host_of("ctl.example"), "ctl.example");
    }
}
