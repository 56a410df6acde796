//! Test harness: a throwaway PostgreSQL 15 cluster (or `DATABASE_URL`), one database per
//! test, a ctl replica started in-process, and the fake agent.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ctl::config::{ApiConfig, Config, JobsConfig};
use ctl::server::{Running, StartOpts};
use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::ctl::v1 as ctlpb;
use proto::gen::wrenn::host::v1 as host;
use proto::rpc::{Client, Credential};

use crate::fake_agent::FakeAgent;

/// Whether end-to-end skips must fail.
pub fn require_e2e() -> bool {
    proto::skip::required()
}

/// Prints the skip (or panics under WRENN_REQUIRE_E2E=1).
pub fn skip(reason: &str) {
    proto::skip::skip("ctl", reason);
}

pub use ctl::testkit::PgCluster as Cluster;

/// The suite's TLS: one CA and one server certificate for 127.0.0.1 per test process
/// (made by the same code as `wrenn-ctl admin tls init`), and a client trusting the CA.
pub struct TestTls {
    pub files: ctl::pki::InitFiles,
    pub client: tls::ClientTls,
    /// The CA as `serve --tls-ca-cert/--tls-ca-key` loads it: every test replica issues
    /// host certificates with it.
    pub authority: std::sync::Arc<ctl::pki::Authority>,
}

pub fn test_tls() -> &'static TestTls {
    static T: OnceLock<TestTls> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("wrenn-ctl-it-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = ctl::pki::init(&dir, &["127.0.0.1".into(), "localhost".into()])
            .expect("admin tls init");
        let client = tls::ClientTls::from_ca_file(
            &files.ca_cert,
            tls::ClientOptions {
                alpn: vec![tls::ALPN_WRENN.to_vec()],
                ..Default::default()
            },
        )
        .expect("client TLS");
        let authority = std::sync::Arc::new(
            ctl::pki::Authority::load(&files.ca_cert, &files.ca_key).expect("load the CA"),
        );
        TestTls {
            files,
            client,
            authority,
        }
    })
}

/// Connects to a client port over TLS (as every client does by default).
pub fn connect(addr: impl ToString, cred: Credential) -> Result<Client, proto::Status> {
    tls::connect(
        &addr.to_string(),
        &test_tls().client,
        cred,
        &proto::rpc::ClientConfig::default(),
    )
}

/// Connects over mutual TLS, presenting `cert_pem` with its key (an agent on the host port).
pub fn connect_as(
    addr: impl ToString,
    cred: Credential,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Client, proto::Status> {
    let t = tls::ClientTls::from_ca_pem(
        test_tls().authority.cert_pem.as_bytes(),
        tls::ClientOptions {
            alpn: vec![tls::ALPN_WRENN.to_vec()],
            identity: Some((
                tls::certs_from_pem(cert_pem.as_bytes(), "host certificate").unwrap(),
                tls::key_from_pem(key_pem.as_bytes(), "host key").unwrap(),
            )),
            ..Default::default()
        },
    )
    .unwrap();
    tls::connect(
        &addr.to_string(),
        &t,
        cred,
        &proto::rpc::ClientConfig::default(),
    )
}

/// The shared cluster (or DATABASE_URL), stopped when the test process exits.
enum Shared {
    Own(Cluster),
    External(String),
}

static SHARED: OnceLock<Result<Mutex<Option<Shared>>, String>> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(Ok(m)) = SHARED.get() {
        // Dropping the cluster stops it.
        m.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn shared() -> Result<&'static Mutex<Option<Shared>>, String> {
    SHARED
        .get_or_init(|| {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return Ok(Mutex::new(Some(Shared::External(url))));
            }
            let c = Cluster::start()?;
            // SAFETY: registers a plain extern "C" function with no arguments; it runs at
            // process exit, after the tests, and only touches the static above.
            let rc = unsafe { libc::atexit(stop_shared) };
            assert_eq!(rc, 0, "atexit");
            Ok(Mutex::new(Some(Shared::Own(c))))
        })
        .as_ref()
        .map_err(|e| e.clone())
}

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A fresh database on the shared cluster; `None` (after printing the skip) when
/// PostgreSQL is absent.
pub fn fresh_db() -> Option<String> {
    let m = match shared() {
        Ok(m) => m,
        Err(e) => {
            skip(&e);
            return None;
        }
    };
    let g = m.lock().unwrap_or_else(|e| e.into_inner());
    let admin_url = match g.as_ref()? {
        Shared::Own(c) => c.url("postgres"),
        Shared::External(u) => u.clone(),
    };
    let name = format!(
        "wrenn_t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let mut c = postgres::Client::connect(&admin_url, postgres::NoTls)
        .expect("connect to the admin database");
    c.batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create database");
    Some(match g.as_ref()? {
        Shared::Own(cl) => cl.url(&name),
        Shared::External(u) => with_dbname(u, &name),
    })
}

fn with_dbname(url: &str, db: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (base, query) = url
            .split_once('?')
            .map(|(b, q)| (b, Some(q)))
            .unwrap_or((url, None));
        let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
        let base = match base[scheme_end..].find('/') {
            Some(i) => &base[..scheme_end + i],
            None => base,
        };
        match query {
            Some(q) => format!("{base}/{db}?{q}"),
            None => format!("{base}/{db}"),
        }
    } else {
        format!("{url} dbname={db}")
    }
}

/// Settings for a test replica: short timeouts, no timers (tests drive the jobs).
pub fn test_config(url: &str) -> Config {
    Config {
        database_url: url.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        host_listen: "127.0.0.1:0".parse().unwrap(),
        db_workers: 4,
        api: ApiConfig {
            agent_lifecycle_timeout: Duration::from_secs(20),
            agent_call_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_millis(500),
            last_used_flush: Duration::from_millis(200),
            webhooks: ctl::config::WebhookConfig::default(),
            issuer: Some(test_tls().authority.clone()),
            build_context_max: 1 << 20,
            host_cert_lifetime: ctl::limits::HOST_CERT_LIFETIME,
        },
        jobs: JobsConfig {
            reconcile_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(2),
            destroy_unknown: true,
            new_grace: Duration::from_millis(0),
            transition_grace: Duration::from_secs(600),
            create_deadline: Duration::from_secs(20),
        },
        tls: ctl::config::TlsConfig {
            cert: Some((
                test_tls().files.server_cert.clone(),
                test_tls().files.server_key.clone(),
            )),
            allow_tls12: false,
            sandbox: None,
        },
        traffic_domain: None,
    }
}

/// A ctl replica with an initialized database.
pub struct Ctl {
    pub url: String,
    pub running: Option<Running>,
    pub team_key: String,
    pub admin_key: String,
    pub team_id: String,
    pub user_id: String,
}

impl Ctl {
    /// Fresh database + `admin init` + a replica. `None` when PostgreSQL is absent.
    pub fn start() -> Option<Ctl> {
        Ctl::start_with(|_| {})
    }

    /// [`Ctl::start`] with settings `edit` changes.
    pub fn start_with(edit: impl FnOnce(&mut Config)) -> Option<Ctl> {
        let url = fresh_db()?;
        let init = ctl::admin::init(&url, "team-a", "a@example.com", "Alice").expect("admin init");
        let mut cfg = test_config(&url);
        edit(&mut cfg);
        let running = ctl::server::start(
            &cfg,
            StartOpts {
                jobs: false,
                http: false,
            },
        )
        .expect("start ctl");
        Some(Ctl {
            url,
            running: Some(running),
            team_key: init.team_key,
            admin_key: init.admin_key,
            team_id: init.team_id,
            user_id: init.user_id,
        })
    }

    /// A second replica on the same database.
    pub fn replica(&self) -> Running {
        ctl::server::start(
            &test_config(&self.url),
            StartOpts {
                jobs: false,
                http: false,
            },
        )
        .expect("start replica")
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    pub fn api(&self) -> &ctl::service::Api {
        &self.running().api
    }

    pub fn addr(&self) -> String {
        self.running().addr.to_string()
    }

    /// The agents' port (wrenn.host.v1).
    pub fn host_addr(&self) -> String {
        self.running().host_addr.to_string()
    }

    pub fn client(&self, key: &str) -> Client {
        connect(self.addr(), Credential::api_key(key)).expect("connect with api key")
    }

    pub fn team(&self) -> Client {
        self.client(&self.team_key)
    }

    pub fn admin(&self) -> Client {
        self.client(&self.admin_key)
    }

    /// Makes a second team (with its own key) through the database, as `admin init` does.
    pub fn other_team(&self, name: &str, email: &str) -> (String, String) {
        let mut c = postgres::Client::connect(&self.url, postgres::NoTls).unwrap();
        let mut tx = c.transaction().unwrap();
        let (team, _, _, key) =
            ctl::service::create_team_with_owner(&mut tx, name, email, "").unwrap();
        tx.commit().unwrap();
        (proto::id::format(proto::id::Kind::Team, team), key)
    }

    /// Starts a fake agent and registers it as a host with the given capacity.
    pub fn add_host(&self, vcpus: u32, memory_mib: u64, disk_mib: u64) -> (Arc<FakeAgent>, String) {
        self.add_host_with(vcpus, memory_mib, disk_mib, vec![])
    }

    /// Registers a fake agent; with `problems`, one that says it cannot host sandboxes.
    pub fn add_host_with(
        &self,
        vcpus: u32,
        memory_mib: u64,
        disk_mib: u64,
        problems: Vec<String>,
    ) -> (Arc<FakeAgent>, String) {
        self.register_host(vcpus, memory_mib, disk_mib, problems, |_| {})
            .expect("register")
    }

    /// Registers a fake agent with a request `edit` may change (host settings).
    pub fn register_host(
        &self,
        vcpus: u32,
        memory_mib: u64,
        disk_mib: u64,
        problems: Vec<String>,
        edit: impl FnOnce(&mut host::RegisterRequest),
    ) -> Result<(Arc<FakeAgent>, String), proto::Status> {
        self.register_host_full(vcpus, memory_mib, disk_mib, problems, edit)
            .map(|(fa, r)| (fa, r.host_id))
    }

    /// [`Ctl::register_host`] returning ctl's whole answer.
    pub fn register_host_full(
        &self,
        vcpus: u32,
        memory_mib: u64,
        disk_mib: u64,
        problems: Vec<String>,
        edit: impl FnOnce(&mut host::RegisterRequest),
    ) -> Result<(Arc<FakeAgent>, host::RegisterResponse), proto::Status> {
        let fa = FakeAgent::start();
        let tok: ctlpb::CreateRegistrationTokenResponse = self
            .admin()
            .unary(
                ctlpb::hosts_methods::CREATE_REGISTRATION_TOKEN,
                &ctlpb::CreateRegistrationTokenRequest { ttl_s: 60 },
                None,
            )
            .expect("registration token");
        let reg =
            connect(self.host_addr(), Credential::host_token("")).expect("connect to register");
        let mut req = host::RegisterRequest {
            registration_token: tok.token,
            agent_address: fa.addr.to_string(),
            hostname: format!("fake-{}", fa.addr.port()),
            capacity: Some(agent::Resources {
                vcpus,
                memory_mib,
                disk_mib,
            }),
            agent_version: "fake".into(),
            firecracker_version: "fake".into(),
            can_host_sandboxes: problems.is_empty(),
            problems,
            ..Default::default()
        };
        edit(&mut req);
        let r: host::RegisterResponse = reg.unary(host::host_methods::REGISTER, &req, None)?;
        fa.set_token(&r.agent_token);
        fa.set_host_token(&r.host_token, &self.host_addr());
        Ok((fa, r))
    }
}

impl Ctl {
    /// Registers a fake agent as a real one does (a host key, a signature over the token)
    /// and has it serve mutual TLS with the certificate ctl issued.
    pub fn add_host_tls(&self) -> (Arc<FakeAgent>, host::RegisterResponse, tls::HostKey) {
        let key = tls::HostKey::generate().unwrap();
        let (fa, r) = self
            .register_host_full(4, 4096, 100_000, vec![], |req| {
                let (secret, _) = tls::hostkey::split_pin(&req.registration_token).unwrap();
                req.token_signature = key.sign_token(secret).into();
                req.host_public_key = key.public_key().to_vec().into();
            })
            .expect("register");
        assert!(!r.host_certificate_pem.is_empty());
        fa.serve_tls(
            r.host_certificate_pem.as_bytes(),
            key.to_pem().as_bytes(),
            r.ca_certificate_pem.as_bytes(),
        );
        fa.set_host_identity(&r.host_certificate_pem, &key.to_pem());
        (fa, r, key)
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
        }
    }
}

/// Unwraps a status error's code.
pub fn code<T: std::fmt::Debug>(r: Result<T, proto::Status>) -> proto::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code,
    }
}

/// The audit rows with `action` that `cl`'s team can see (first page).
pub fn audit(cl: &Client, action: &str) -> Vec<ctlpb::AuditLog> {
    let a: ctlpb::ListAuditLogsResponse = cl
        .unary(
            ctlpb::audit_logs_methods::LIST,
            &ctlpb::ListAuditLogsRequest {
                action: action.into(),
                ..Default::default()
            },
            Some(Duration::from_secs(30)),
        )
        .expect("list audit logs");
    a.entries
}

/// Pauses one of `cl`'s team's sandboxes (it must succeed).
pub fn pause(cl: &Client, id: &str) -> ctlpb::Sandbox {
    cl.unary(
        ctlpb::sandboxes_methods::PAUSE,
        &ctlpb::PauseSandboxRequest {
            sandbox_id: id.to_owned(),
        },
        Some(Duration::from_secs(30)),
    )
    .expect("pause")
}

/// One of `cl`'s team's sandboxes as Get answers it (it must exist).
pub fn get_sandbox(cl: &Client, id: &str) -> ctlpb::Sandbox {
    cl.unary(
        ctlpb::sandboxes_methods::GET,
        &ctlpb::GetSandboxRequest {
            sandbox_id: id.to_owned(),
        },
        Some(Duration::from_secs(30)),
    )
    .expect("get")
}

/// An HTTP response head: status, headers (lower-case names), the bytes read after it.
pub type HttpHead = (u16, Vec<(String, String)>, Vec<u8>);

/// Reads an HTTP response head from `s`: status, headers (lower-case names), and the bytes
/// already read after it.
pub fn read_http_head(s: &mut std::net::TcpStream) -> Result<HttpHead, String> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut b = [0u8; 16384];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..p]).into_owned();
            let mut lines = text.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.get(9..12))
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("bad status line in {text:?}"))?;
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            return Ok((status, headers, buf[p + 4..].to_vec()));
        }
        match s.read(&mut b) {
            Ok(0) => {
                return Err(format!(
                    "closed before a head: {:?}",
                    String::from_utf8_lossy(&buf)
                ))
            }
            Ok(k) => buf.extend_from_slice(&b[..k]),
            Err(e) => return Err(format!("reading a head: {e}")),
        }
    }
}
