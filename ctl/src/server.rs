//! The protobuf transport: two `proto::rpc::Server`s over the service layer, each with its
//! own listener, connection budget and worker pool — clients on port 7700 (`wrenn.ctl.v1`,
//! hello with an API key) and agents on port 7702 (`wrenn.host.v1`, hello with a host
//! token), so no number of client connections can starve agents' heartbeats. Each port
//! refuses the other's credential with a message naming the right port. Every call runs on
//! the RPC worker pool: the event loop never blocks on SQL.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use proto::gen::wrenn::host::v1 as host;
use proto::gen::wrenn::wire::v1::{CredentialKind, Hello};
use proto::id::Uuid;
use proto::rpc::{Call, HelloFrom, Peer, Service};
use proto::Status;

use crate::dispatch::{ClientCall, HostCall};
use crate::host_service;
use crate::metrics;
use crate::revocation::KeyCheck;
use crate::service::{Api, AuthCtx};

/// Who a connection is, decided once by its hello.
#[derive(Clone, Debug)]
pub enum Caller {
    /// A client with an API key: wrenn.ctl.v1. A revoked key's connections are closed and
    /// its next call refused on every replica as soon as the revocation's notification
    /// arrives; the check on each call is in memory ([`crate::revocation`]).
    Api(AuthCtx, Arc<KeyCheck>),
    /// An agent with an empty host token: may only call Register. Holds one of the host
    /// port's few registering places until the connection closes.
    Registering(Arc<RegisteringPlace>),
    /// An agent with its host token: wrenn.host.v1.
    Host { id: Uuid, name: String },
}

/// Which listener a [`CtlService`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Clients: wrenn.ctl.v1 with an API key.
    Api,
    /// Agents: wrenn.host.v1 with a host token (or an empty one to register).
    Host,
}

/// The `proto::rpc::Service` of ctl (one per listener).
pub struct CtlService {
    api: Api,
    port: Port,
    /// Connections open with an empty host token (registering): anyone can open one, so
    /// they get a small budget of their own and can never fill the agents' port.
    registering: Arc<AtomicUsize>,
}

impl CtlService {
    pub fn new(api: Api, port: Port) -> CtlService {
        CtlService {
            api,
            port,
            registering: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// One of [`crate::limits::REGISTERING_CONNECTIONS_MAX`] places; given back when the
/// connection (its peer) is dropped.
#[derive(Debug)]
pub struct RegisteringPlace(Arc<AtomicUsize>);

impl RegisteringPlace {
    fn take(count: &Arc<AtomicUsize>) -> Result<RegisteringPlace, Status> {
        let max = crate::limits::REGISTERING_CONNECTIONS_MAX;
        let r = count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        });
        match r {
            Ok(_) => Ok(RegisteringPlace(Arc::clone(count))),
            Err(_) => {
                metrics::AUTH_FAILURES.inc();
                Err(Status::resource_exhausted(format!(
                    "too many registering connections (at most {max}); try again shortly"
                )))
            }
        }
    }
}

impl Drop for RegisteringPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Service for CtlService {
    fn hello(&self, hello: &Hello) -> Result<Peer, Status> {
        self.hello_from(hello, &HelloFrom::default())
    }

    fn hello_from(&self, hello: &Hello, from: &HelloFrom) -> Result<Peer, Status> {
        let kind = CredentialKind::try_from(hello.credential_kind);
        match (self.port, kind) {
            (Port::Api, Ok(CredentialKind::HostToken)) => {
                metrics::AUTH_FAILURES.inc();
                return Err(Status::unauthenticated(
                    "this is wrenn-ctl's client port (wrenn.ctl.v1, API keys); agents connect to \
                     its host port (wrenn.host.v1, default 7702, --host-listen)",
                ));
            }
            (Port::Host, Ok(CredentialKind::ApiKey)) => {
                metrics::AUTH_FAILURES.inc();
                return Err(Status::unauthenticated(
                    "this is wrenn-ctl's host port (wrenn.host.v1, host tokens); clients connect \
                     to its client port (wrenn.ctl.v1, default 7700)",
                ));
            }
            _ => {}
        }
        let caller = match kind {
            Ok(CredentialKind::ApiKey) => {
                // The generation before the lookup: a change during it forces a re-check.
                let generation = self.api.revocations().generation();
                Caller::Api(
                    self.api.authenticate(&hello.credential)?,
                    Arc::new(KeyCheck::at(generation)),
                )
            }
            Ok(CredentialKind::HostToken) if hello.credential.is_empty() => {
                Caller::Registering(Arc::new(RegisteringPlace::take(&self.registering)?))
            }
            Ok(CredentialKind::HostToken) => {
                let host = crate::auth::lookup_host(self.api.db(), &hello.credential)
                    .and_then(|h| {
                        let presented =
                            check_host_certificate(&h, from.peer_certificate.as_deref())?;
                        if let Some(s) = &presented {
                            check_not_revoked(&self.api, s, h.id)?;
                        }
                        Ok(h)
                    })
                    .inspect_err(|_| metrics::AUTH_FAILURES.inc())?;
                Caller::Host {
                    id: host.id,
                    name: host.name,
                }
            }
            _ => {
                metrics::AUTH_FAILURES.inc();
                return Err(Status::unauthenticated(
                    "wrenn-ctl accepts an API key (wrenn.ctl.v1) or a host token (wrenn.host.v1)",
                ));
            }
        };
        Ok(Arc::new(caller))
    }

    fn call(&self, call: Call) {
        let Some(caller) = call.peer().downcast_ref::<Caller>().cloned() else {
            call.fail(Status::internal("connection without a caller"));
            return;
        };
        let api = self.api.clone();
        match caller {
            Caller::Api(ctx, checked) => {
                if !call.method().starts_with("wrenn.ctl.v1.") {
                    call.fail(Status::permission_denied(
                        "an API key may call wrenn.ctl.v1 only",
                    ));
                    return;
                }
                call.spawn(move |stream| {
                    let start = Instant::now();
                    if let Err(e) = recheck(&api, &ctx, &checked) {
                        metrics::AUTH_FAILURES.inc();
                        stream.finish(Err(e));
                        return;
                    }
                    metrics::API_CALLS.inc();
                    let ok = ClientCall {
                        api: &api,
                        auth: &ctx,
                    }
                    .serve(stream);
                    if !ok {
                        metrics::API_ERRORS.inc();
                    }
                    metrics::API_CALL_SECONDS.observe(start.elapsed());
                });
            }
            Caller::Registering(_) => {
                if call.method() != host::host_methods::REGISTER {
                    call.fail(host_service::registering_only());
                    return;
                }
                call.spawn(move |stream| {
                    metrics::HOST_CALLS.inc();
                    HostCall {
                        api: &api,
                        host: None,
                    }
                    .serve(stream);
                });
            }
            Caller::Host { id, name } => {
                call.spawn(move |stream| {
                    metrics::HOST_CALLS.inc();
                    HostCall {
                        api: &api,
                        host: Some((id, &name)),
                    }
                    .serve(stream);
                });
            }
        }
    }
}

/// The host port's second factor: a host that ctl issued a certificate must present that
/// certificate (mutual TLS; the handshake already checked it chains to ctl's CA), naming
/// its host id, with the serial ctl recorded for it. A host registered without a key (an
/// older agent, or ctl without a CA) has none on record and authenticates by token alone.
/// Returns the serial presented (None for a host without a certificate).
fn check_host_certificate(
    host: &crate::auth::HostRow,
    cert: Option<&[u8]>,
) -> Result<Option<Vec<u8>>, Status> {
    let Some(serial) = &host.cert_serial else {
        return Ok(None);
    };
    let host_id = proto::id::format(proto::id::Kind::Host, host.id);
    let Some(der) = cert else {
        return Err(Status::unauthenticated(format!(
            "{host_id} has a certificate: the host port requires it (mutual TLS with the \
             host.pem and host.key registration saved); a host token alone is refused"
        )));
    };
    if !tls::peer::cert_names(der, &host_id) {
        return Err(Status::unauthenticated(format!(
            "the client certificate is not {host_id}'s: it does not name the host of this host token"
        )));
    }
    // The current certificate, or the one the last renewal replaced (the handshake already
    // refused it if expired).
    let presented = tls::peer::cert_serial(der);
    if presented.as_ref() != Some(serial) && presented != host.prev_cert_serial {
        return Err(Status::unauthenticated(format!(
            "the client certificate is not one ctl issued {host_id}"
        )));
    }
    Ok(presented)
}

/// Refuses a revoked certificate: from this replica's memory (kept by LISTEN/NOTIFY), or
/// from the database while that cannot tell (this runs on a worker, never the event loop).
fn check_not_revoked(api: &Api, serial: &[u8], host: Uuid) -> Result<(), Status> {
    let revoked = match api.revocations().cert_revoked(serial) {
        Some(r) => r,
        None => crate::revocation::cert_revoked_in_db(api.db(), serial)?,
    };
    if revoked {
        return Err(Status::unauthenticated(format!(
            "the certificate of {} was revoked",
            proto::id::format(proto::id::Kind::Host, host)
        )));
    }
    Ok(())
}

/// Whether the connection's key may still call: in memory while the revocation listener is
/// up and nothing was missed since the key was checked; else one indexed SELECT.
fn recheck(api: &Api, ctx: &AuthCtx, check: &KeyCheck) -> Result<(), Status> {
    let rev = api.revocations();
    if rev.fresh(ctx.key_id, check)? {
        return Ok(());
    }
    let generation = rev.generation();
    if !crate::auth::key_active(api.db(), ctx.key_id)? {
        return Err(Status::unauthenticated("api key revoked"));
    }
    rev.checked(check, generation);
    Ok(())
}

/// Why a ctl replica could not start.
#[derive(Debug)]
pub enum StartError {
    Db(crate::db::DbError),
    Connect {
        source: postgres::Error,
    },
    Migrate(crate::migrate::MigrateError),
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    Spawn {
        source: std::io::Error,
    },
    /// The revocation listener could not start.
    Revocations(crate::revocation::ListenError),
    /// The certificate or key files could not be used.
    Tls(tls::TlsError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Db(_) => f.write_str("start database pool"),
            StartError::Connect { .. } => f.write_str("connect to the database"),
            StartError::Migrate(e) => write!(f, "{e}"),
            StartError::Listen { addr, .. } => write!(f, "listen on {addr}"),
            StartError::Spawn { .. } => f.write_str("spawn server thread"),
            StartError::Revocations(e) => write!(f, "{e}"),
            StartError::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Db(e) => Some(e),
            StartError::Connect { source } => Some(source),
            StartError::Migrate(e) => std::error::Error::source(e),
            StartError::Listen { source, .. } | StartError::Spawn { source } => Some(source),
            StartError::Revocations(e) => std::error::Error::source(e),
            StartError::Tls(_) => None,
        }
    }
}

/// A running replica: protobuf servers, HTTP gateway (when configured), background jobs.
pub struct Running {
    pub api: Api,
    /// Bound protobuf address of clients.
    pub addr: std::net::SocketAddr,
    /// Bound protobuf address of agents.
    pub host_addr: std::net::SocketAddr,
    /// The agents' server.
    pub host_handle: proto::rpc::ServerHandle,
    host_join: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    /// Bound HTTP address (None when not started).
    pub http_addr: Option<std::net::SocketAddr>,
    pub handle: proto::rpc::ServerHandle,
    join: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    jobs: Option<crate::monitor::Jobs>,
}

impl Running {
    /// Blocks until the protobuf server stops.
    pub fn wait(mut self) -> std::io::Result<()> {
        match self.join.take() {
            Some(j) => j
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("server thread panicked"))),
            None => Ok(()),
        }
    }

    /// Stops the protobuf server and the jobs (the HTTP gateway runs until the process ends).
    pub fn shutdown(mut self) {
        if let Some(mut j) = self.jobs.take() {
            j.stop();
        }
        self.api.revocations().stop();
        self.handle.shutdown();
        self.host_handle.shutdown();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        if let Some(j) = self.host_join.take() {
            let _ = j.join();
        }
    }
}

/// Options of [`start`] beyond the config.
#[derive(Clone, Copy, Debug)]
pub struct StartOpts {
    /// Run the monitor and reconciler timers (tests drive them by hand).
    pub jobs: bool,
    /// Start the HTTP gateway.
    pub http: bool,
}

/// Migrates the database, then starts the pool, the protobuf server, the HTTP gateway and
/// the background jobs.
pub fn start(cfg: &crate::config::Config, opts: StartOpts) -> Result<Running, StartError> {
    {
        let mut pg: postgres::Config = cfg
            .database_url
            .parse()
            .map_err(|source| StartError::Connect { source })?;
        pg.connect_timeout(crate::limits::DB_CONNECT_TIMEOUT);
        let mut c = pg
            .connect(postgres::NoTls)
            .map_err(|source| StartError::Connect { source })?;
        crate::migrate::run(&mut c).map_err(StartError::Migrate)?;
    }
    let mut dbc = crate::db::DbConfig::new(&cfg.database_url);
    dbc.workers = cfg.db_workers;
    let db = crate::db::Db::start(&dbc).map_err(StartError::Db)?;
    let api = Api::new(db, cfg.api.clone(), cfg.jobs.clone());
    let mut server = proto::rpc::Server::new(
        proto::rpc::ServerConfig::new("wrenn-ctl"),
        Arc::new(CtlService::new(api.clone(), Port::Api)),
    )
    .map_err(|source| StartError::Spawn { source })?;
    // Agents: a server of their own (own connection budget and workers).
    let mut host_server = proto::rpc::Server::new(
        proto::rpc::ServerConfig::new("wrenn-ctl-host"),
        Arc::new(CtlService::new(api.clone(), Port::Host)),
    )
    .map_err(|source| StartError::Spawn { source })?;
    let client_ca = cfg.api.issuer.as_ref().map(|ca| ca.cert_pem.as_bytes());
    let host_listened = match cfg.tls.host(client_ca).map_err(StartError::Tls)? {
        Some(t) => host_server.listen_tcp_with(cfg.host_listen, t.wrap()),
        None => host_server.listen_tcp(cfg.host_listen),
    };
    let host_addr = host_listened.map_err(|source| StartError::Listen {
        addr: cfg.host_listen,
        source,
    })?;
    let host_handle = host_server.handle();
    let (_, host_join) = host_server
        .spawn()
        .map_err(|source| StartError::Spawn { source })?;
    let listened = match cfg.tls.protobuf().map_err(StartError::Tls)? {
        Some(t) => server.listen_tcp_with(cfg.listen, t.wrap()),
        None => server.listen_tcp(cfg.listen),
    };
    let addr = listened.map_err(|source| StartError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let handle = server.handle();
    let closer = handle.clone();
    api.revocations().on_revoke(move |key| {
        closer.close_connections(move |peer| {
            matches!(peer.downcast_ref::<Caller>(), Some(Caller::Api(ctx, _)) if ctx.key_id == key)
        })
    });
    // A host's revoked certificate closes its connections here at once: agents on the host
    // port, and this replica's clients of its agent.
    let host_closer = host_handle.clone();
    // Weak: the pool holds the revocations that hold this hook.
    let agents = api.agents_weak();
    api.revocations().on_host_revoked(move |host| {
        host_closer.close_connections(move |peer| {
            matches!(peer.downcast_ref::<Caller>(), Some(Caller::Host { id, .. }) if *id == host)
        });
        if let Some(a) = agents.upgrade() {
            a.forget(host);
        }
    });
    api.revocations()
        .listen(&cfg.database_url)
        .map_err(StartError::Revocations)?;
    let (_, join) = server
        .spawn()
        .map_err(|source| StartError::Spawn { source })?;
    let http_addr = if opts.http {
        let tls = cfg.tls.http().map_err(StartError::Tls)?;
        let (a, _) = crate::http::spawn(
            api.clone(),
            cfg.http_listen,
            tls,
            cfg.traffic_domain.clone(),
        )
        .map_err(|source| StartError::Listen {
            addr: cfg.http_listen,
            source,
        })?;
        Some(a)
    } else {
        None
    };
    let jobs = if opts.jobs {
        Some(
            crate::monitor::Jobs::start(api.clone(), cfg.jobs.clone())
                .map_err(|source| StartError::Spawn { source })?,
        )
    } else {
        None
    };
    log::info!("wrenn-ctl serving addr={addr} host_addr={host_addr} http={http_addr:?}");
    Ok(Running {
        api,
        addr,
        host_addr,
        host_handle,
        host_join: Some(host_join),
        http_addr,
        handle,
        join: Some(join),
        jobs,
    })
}
