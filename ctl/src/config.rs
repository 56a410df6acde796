//! Settings of a ctl replica (from flags and `WRENN_*` variables, parsed in main.rs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::limits;

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    /// Protobuf listener of clients (wrenn.ctl.v1), default 0.0.0.0:7700.
    pub listen: SocketAddr,
    /// Protobuf listener of agents (wrenn.host.v1), default 0.0.0.0:7702: its own port and
    /// server, so clients can never starve agents' heartbeats of connections or workers.
    pub host_listen: SocketAddr,
    /// HTTP/JSON listener, default 0.0.0.0:7701.
    pub http_listen: SocketAddr,
    pub db_workers: usize,
    pub api: ApiConfig,
    pub jobs: JobsConfig,
    /// TLS of the client ports (protobuf and HTTP).
    pub tls: TlsConfig,
    /// The traffic domain of sandbox ports (`--traffic-domain`): `P-sb-<uuid>.<domain>` on
    /// the HTTP listener reaches port P of that sandbox. `None`: only the path form.
    pub traffic_domain: Option<String>,
}

/// TLS of ctl's client ports: the protobuf port (ALPN `wrenn/1`) and the HTTP gateway
/// (ALPN `http/1.1`) use one certificate (`--tls-cert`, `--tls-key`).
#[derive(Clone, Debug, Default)]
pub struct TlsConfig {
    /// PEM files of the certificate chain and its key. `None`: plaintext, which `serve`
    /// allows only with `--plaintext`.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Accept TLS 1.2 as well as 1.3 (`--tls12`).
    pub allow_tls12: bool,
    /// The wildcard certificate of the sandbox ports' domain (`https://P-<id>.<domain>`),
    /// served by the HTTP gateway to clients whose SNI name is under that domain.
    pub sandbox: Option<SandboxCert>,
}

/// `--tls-sandbox-domain`, `--tls-sandbox-cert`, `--tls-sandbox-key`.
#[derive(Clone, Debug)]
pub struct SandboxCert {
    pub domain: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsConfig {
    fn opts(&self, alpn: &[u8], plaintext_reply: Vec<u8>) -> tls::ServerOptions {
        tls::ServerOptions {
            alpn: vec![alpn.to_vec()],
            min_version: if self.allow_tls12 {
                tls::TlsVersion::Tls12
            } else {
                tls::TlsVersion::Tls13
            },
            client_ca_pem: None,
            client_cert_optional: false,
            plaintext_reply: Some(plaintext_reply),
            sni: Vec::new(),
        }
    }

    /// The protobuf port's TLS, or `None` for plaintext. A plaintext client hears "server
    /// speaks TLS" in an ERROR frame it can read.
    pub fn protobuf(&self) -> Result<Option<tls::ServerTls>, tls::TlsError> {
        self.protobuf_saying(
            "server speaks TLS: this wrenn-ctl port needs TLS (ALPN wrenn/1) with its CA \
             trusted (the CLI: set WRENN_CA to the CA certificate file)",
            None,
        )
    }

    /// The host port's TLS (agents, wrenn.host.v1), or `None` for plaintext. With
    /// `client_ca` (the CA that issues host certificates) it asks agents for their
    /// certificate: optional in the handshake (an agent registering has none yet; one it
    /// sends must chain to that CA), required by the hello of every host that has one.
    pub fn host(&self, client_ca: Option<&[u8]>) -> Result<Option<tls::ServerTls>, tls::TlsError> {
        self.protobuf_saying(
            "server speaks TLS: this is wrenn-ctl's host port over TLS; give the agent ctl's \
             CA certificate with --ctl-ca (WRENN_CTL_CA)",
            client_ca,
        )
    }

    fn protobuf_saying(
        &self,
        refusal: &str,
        client_ca: Option<&[u8]>,
    ) -> Result<Option<tls::ServerTls>, tls::TlsError> {
        let Some((cert, key)) = &self.cert else {
            return Ok(None);
        };
        let mut reply = Vec::new();
        proto::frame::put_error(&mut reply, 0, proto::Code::Unavailable, refusal);
        let mut opts = self.opts(tls::ALPN_WRENN, reply);
        if let Some(ca) = client_ca {
            opts.client_ca_pem = Some(ca.to_vec());
            opts.client_cert_optional = true;
        }
        tls::ServerTls::from_pem_files(cert, key, &opts).map(Some)
    }

    /// The HTTP gateway's TLS, or `None` for plaintext. A plaintext HTTP client gets a 400
    /// saying to use https.
    pub fn http(&self) -> Result<Option<tls::ServerTls>, tls::TlsError> {
        let Some((cert, key)) = &self.cert else {
            return Ok(None);
        };
        let body = "this port speaks HTTPS (TLS); use https://\n";
        let reply = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let mut opts = self.opts(tls::ALPN_HTTP, reply.into_bytes());
        if let Some(sb) = &self.sandbox {
            opts.sni.push(tls::SniCert {
                domain: sb.domain.clone(),
                cert_pem: tls::read_pem_file(&sb.cert)?,
                key_pem: tls::read_pem_file(&sb.key)?,
            });
        }
        tls::ServerTls::from_pem_files(cert, key, &opts).map(Some)
    }
}

/// Settings the service layer uses.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Deadline of agent lifecycle calls (create, pause, resume, template create).
    pub agent_lifecycle_timeout: Duration,
    /// Deadline of every other agent call.
    pub agent_call_timeout: Duration,
    /// Heartbeat interval told to agents.
    pub heartbeat_interval: Duration,
    /// How often `last_used` of API keys is flushed.
    pub last_used_flush: Duration,
    /// Webhook delivery settings.
    pub webhooks: WebhookConfig,
    /// The CA that issues host certificates at registration (`--tls-ca-cert`,
    /// `--tls-ca-key`; every replica reads the same files). `None`: ctl issues none (an
    /// operator's own PKI, or plaintext).
    pub issuer: Option<std::sync::Arc<crate::pki::Authority>>,
    /// Most bytes of a template build's context (`--build-context-max-mib`).
    pub build_context_max: u64,
    /// Lifetime of the host certificates ctl issues at registration and renewal
    /// ([`limits::HOST_CERT_LIFETIME`]; tests shorten it to see renewal happen).
    pub host_cert_lifetime: Duration,
}

/// Webhook deliveries (`webhook/`).
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Deliver to loopback, private, link-local and other special addresses
    /// (`--webhook-allow-private`): for tests and receivers on a trusted network only.
    pub allow_private: bool,
    /// Backoff after failed attempt n: base × 2^(n-1), at most `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// One attempt's deadline.
    pub attempt_timeout: Duration,
    /// A claimed delivery's lease (it is attempted again after it if no outcome was
    /// recorded: the replica died).
    pub lease: Duration,
    /// How often the delivery job looks for due deliveries.
    pub poll: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allow_private: false,
            backoff_base: limits::WEBHOOK_BACKOFF_BASE,
            backoff_max: limits::WEBHOOK_BACKOFF_MAX,
            attempt_timeout: limits::WEBHOOK_ATTEMPT_TIMEOUT,
            lease: limits::WEBHOOK_LEASE,
            poll: limits::WEBHOOK_POLL,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            agent_lifecycle_timeout: limits::AGENT_LIFECYCLE_TIMEOUT_DEFAULT,
            agent_call_timeout: limits::AGENT_CALL_TIMEOUT_DEFAULT,
            heartbeat_interval: limits::HEARTBEAT_INTERVAL_DEFAULT,
            last_used_flush: limits::LAST_USED_FLUSH_INTERVAL,
            webhooks: WebhookConfig::default(),
            issuer: None,
            build_context_max: limits::BUILD_CONTEXT_LEN_MAX,
            host_cert_lifetime: limits::HOST_CERT_LIFETIME,
        }
    }
}

/// Settings of the background jobs.
#[derive(Clone, Debug)]
pub struct JobsConfig {
    /// Reconciler period.
    pub reconcile_interval: Duration,
    /// A host whose last heartbeat is older than this becomes unreachable.
    pub heartbeat_timeout: Duration,
    /// Destroy sandboxes an agent runs that the database does not know (else only report).
    pub destroy_unknown: bool,
    /// Grace before a new sandbox missing on its host counts as missing.
    pub new_grace: Duration,
    /// Grace for sandboxes in transition.
    pub transition_grace: Duration,
    /// The deadline of a create's agent call (the replicas' agent lifecycle timeout): a
    /// sandbox `starting` for longer than this plus [`limits::CREATE_DEADLINE_GRACE`] is no
    /// longer being created by any ctl.
    pub create_deadline: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            reconcile_interval: limits::RECONCILE_INTERVAL_DEFAULT,
            heartbeat_timeout: limits::HEARTBEAT_INTERVAL_DEFAULT * limits::HEARTBEAT_MISSES,
            destroy_unknown: true,
            new_grace: limits::RECONCILE_NEW_GRACE,
            transition_grace: limits::RECONCILE_TRANSITION_GRACE,
            create_deadline: limits::AGENT_LIFECYCLE_TIMEOUT_DEFAULT,
        }
    }
}

/// Checks a traffic domain (`--traffic-domain`) and gives it in the form routing compares
/// against: lower-case, no final dot. At least two labels of letters, digits and hyphens.
pub fn traffic_domain(d: &str) -> Result<String, String> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = d.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if d.len() > 200 || labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(format!(
            "--traffic-domain {d:?}: not a domain name (e.g. wrenn-sandboxes.example)"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod traffic_domain_tests {
    #[test]
    fn traffic_domains() {
        assert_eq!(
            super::traffic_domain("Sbx.Example.COM.").unwrap(),
            "sbx.example.com"
        );
        for bad in ["", "localhost", "a..b", "-a.b", "a b.c", "x.*.c"] {
            assert!(super::traffic_domain(bad).is_err(), "{bad}");
        }
    }
}
