//! Support for tests and benchmarks (not used by `wrenn-ctl serve`): a throwaway
//! PostgreSQL 15 cluster started with the system's `initdb`/`pg_ctl`, and an agent that
//! answers every lifecycle call at once (the `ctl_*` benchmarks measure ctl, not VMs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::wire::v1::{CredentialKind, Hello};
use proto::rpc::{Call, Peer, Server, ServerConfig, ServerHandle, Service};
use proto::Status;

/// Where Debian/Ubuntu install PostgreSQL 15's server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A command run as the `postgres` user (the server refuses to run as root).
fn as_postgres(bin: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", &format!("{PG_BIN}/{bin}")]);
    c
}

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// A PostgreSQL cluster in a temporary directory, listening only on a Unix socket there.
/// Stopped and removed on drop.
#[derive(Debug)]
pub struct PgCluster {
    pub dir: PathBuf,
    pub port: u16,
    /// PostgreSQL's default durability (fsync, synchronous commit, full-page writes), as in
    /// production; off for tests, where a crash loses nothing of value.
    pub durable: bool,
}

impl PgCluster {
    /// initdb + start, without durability (tests). Err when the binaries are absent or a
    /// step fails.
    pub fn start() -> Result<PgCluster, String> {
        PgCluster::start_with(false)
    }

    /// initdb + start with PostgreSQL's default durability: benches whose work is commits.
    pub fn start_durable() -> Result<PgCluster, String> {
        PgCluster::start_with(true)
    }

    fn start_with(durable: bool) -> Result<PgCluster, String> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            return Err(format!("PostgreSQL 15 binaries not found in {PG_BIN}"));
        }
        let n = NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wrenn-ctl-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {dir:?}: {e}"))?;
        run(Command::new("chown").args(["postgres:postgres"]).arg(&dir))?;
        run(as_postgres("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(dir.join("data")))?;
        let c = PgCluster {
            dir,
            port: 5432,
            durable,
        };
        c.start_again()?;
        Ok(c)
    }

    /// Starts the (stopped) cluster.
    pub fn start_again(&self) -> Result<(), String> {
        let durability = if self.durable {
            ""
        } else {
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        let opts = format!(
            "-p {} -k {} -c listen_addresses='' {durability} -c max_connections=200",
            self.port,
            self.dir.display()
        );
        run(as_postgres("pg_ctl")
            .args(["-w", "-t", "60", "-o", &opts, "-l"])
            .arg(self.dir.join("log"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("start"))
    }

    /// Stops the cluster (fast shutdown: connections are closed).
    pub fn stop(&self) -> Result<(), String> {
        run(as_postgres("pg_ctl")
            .args(["-w", "-m", "fast", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop"))
    }

    /// Connection string of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.display(),
            self.port
        )
    }

    /// Creates database `name` and returns its URL.
    pub fn create_db(&self, name: &str) -> Result<String, String> {
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .map_err(|e| e.to_string())?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(|e| e.to_string())?;
        Ok(self.url(name))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = run(as_postgres("pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop"));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A wrenn.agent.v1 server whose sandboxes exist only in memory and whose lifecycle calls
/// answer at once.
pub struct InstantAgent {
    pub addr: SocketAddr,
    pub token: Arc<Mutex<String>>,
    port_target: Arc<Mutex<Option<SocketAddr>>>,
    handle: ServerHandle,
    /// Mutual TLS of its port once [`InstantAgent::serve_tls`] set it (as a real agent
    /// after registration); plaintext before.
    tls: Arc<RwLock<Option<tls::ServerTls>>>,
    tls_accepts: Arc<AtomicUsize>,
}

struct Instant {
    token: Arc<Mutex<String>>,
    sandboxes: Mutex<HashMap<String, agent::SandboxInfo>>,
    /// Where `Ports.Connect` connects, whatever the sandbox and port (a loopback server
    /// standing in for the guest's).
    port_target: Arc<Mutex<Option<SocketAddr>>>,
}

impl InstantAgent {
    pub fn start() -> std::io::Result<InstantAgent> {
        let token = Arc::new(Mutex::new(String::new()));
        let port_target = Arc::new(Mutex::new(None));
        let svc = Instant {
            token: token.clone(),
            sandboxes: Mutex::new(HashMap::new()),
            port_target: port_target.clone(),
        };
        let mut server = Server::new(ServerConfig::new("instant-agent"), Arc::new(svc))?;
        let tls: Arc<RwLock<Option<tls::ServerTls>>> = Arc::default();
        let tls_accepts = Arc::new(AtomicUsize::new(0));
        let (t, n) = (tls.clone(), tls_accepts.clone());
        let wrap: proto::rpc::WrapTransport =
            Arc::new(
                move |sock| match t.read().unwrap_or_else(|e| e.into_inner()).clone() {
                    Some(st) => {
                        n.fetch_add(1, Ordering::SeqCst);
                        (st.wrap())(sock)
                    }
                    None => Box::new(sock),
                },
            );
        let addr = server.listen_tcp_with(SocketAddr::from(([127, 0, 0, 1], 0)), wrap)?;
        let handle = server.handle();
        let _ = server.spawn()?;
        Ok(InstantAgent {
            addr,
            token,
            port_target,
            handle,
            tls,
            tls_accepts,
        })
    }

    /// Serves mutual TLS from now on, as a real agent does with what registration issued:
    /// this certificate and key, requiring a client certificate signed by `ca_pem`.
    pub fn serve_tls(
        &self,
        cert_pem: &[u8],
        key_pem: &[u8],
        ca_pem: &[u8],
    ) -> Result<(), tls::TlsError> {
        let st = tls::ServerTls::from_pem(
            cert_pem,
            key_pem,
            &tls::ServerOptions {
                alpn: vec![tls::ALPN_WRENN.to_vec()],
                client_ca_pem: Some(ca_pem.to_vec()),
                ..Default::default()
            },
        )?;
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Some(st);
        Ok(())
    }

    /// TLS handshakes its port has served: connections accepted since
    /// [`InstantAgent::serve_tls`] (each one's first act is the handshake).
    pub fn tls_handshakes(&self) -> usize {
        self.tls_accepts.load(Ordering::SeqCst)
    }

    /// `Ports.Connect` to any port of any running sandbox reaches `addr` from now on.
    pub fn set_port_target(&self, addr: SocketAddr) {
        *self.port_target.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }

    pub fn set_token(&self, t: &str) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = t.to_owned();
    }
}

impl Drop for InstantAgent {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

impl Service for Instant {
    fn hello(&self, hello: &Hello) -> Result<Peer, Status> {
        let tok = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if hello.credential_kind != CredentialKind::AgentToken as i32
            || tok.is_empty()
            || hello.credential != tok
        {
            return Err(Status::unauthenticated("agent token required"));
        }
        Ok(Arc::new(()))
    }

    fn call(&self, call: Call) {
        use agent::sandboxes_methods as sm;
        match call.method() {
            sm::CREATE => {
                let r = call.decode::<proto::sandbox::SandboxSpec>().map(|r| {
                    let info = agent::SandboxInfo {
                        sandbox_id: r.sandbox_id.clone(),
                        team_id: r.team_id,
                        template_id: r.template_id,
                        state: proto::sandbox::SandboxState::Running as i32,
                        vcpus: r.vcpus,
                        memory_mib: r.memory_mib,
                        disk_mib: r.disk_mib,
                        timeout_s: r.timeout_s,
                        on_timeout: r.on_timeout,
                        ..Default::default()
                    };
                    self.sandboxes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(r.sandbox_id, info.clone());
                    info
                });
                call.respond(r)
            }
            sm::DESTROY => {
                let r = call.decode::<agent::DestroySandboxRequest>().and_then(|r| {
                    self.sandboxes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&r.sandbox_id)
                        .map(|_| agent::DestroySandboxResponse {})
                        .ok_or_else(|| Status::not_found("sandbox not found"))
                });
                call.respond(r)
            }
            sm::LIST => {
                let l = agent::ListSandboxesResponse {
                    sandboxes: self
                        .sandboxes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .values()
                        .cloned()
                        .collect(),
                };
                call.reply(&l)
            }
            agent::ports_methods::CONNECT => {
                let target = *self.port_target.lock().unwrap_or_else(|e| e.into_inner());
                call.spawn(move |mut s| {
                    let r = match target {
                        Some(a) => port_relay(&mut s, a),
                        None => Err(Status::unavailable("instant agent: no port target")),
                    };
                    s.finish(r);
                });
            }
            m => {
                let s = Status::unimplemented(format!("instant agent: {m}"));
                call.fail(s)
            }
        }
    }
}

/// `Ports.Connect` as the agent serves it, to `addr`: the `open` message, `opened`, then bytes
/// both ways (a thread per direction), the caller's END as a half-close, the server's close as
/// the end of the call.
fn port_relay(s: &mut proto::rpc::ServerStream, addr: SocketAddr) -> Result<(), Status> {
    use agent::port_connect_request::Kind as Up;
    use agent::port_connect_response::Kind as Down;
    use std::io::Write;
    let first: agent::PortConnectRequest = s.first()?;
    if !matches!(first.kind, Some(Up::Open(_))) {
        return Err(Status::invalid_argument("open first"));
    }
    let mut sock = std::net::TcpStream::connect(addr)
        .map_err(|e| Status::unavailable(format!("connect {addr}: {e}")))?;
    let _ = sock.set_nodelay(true);
    s.send(&agent::PortConnectResponse {
        kind: Some(Down::Opened(true)),
    })?;
    let down = s.sender();
    let rd = sock
        .try_clone()
        .map_err(|e| Status::internal(e.to_string()))?;
    let reader = std::thread::Builder::new()
        .name("instant-port".into())
        .spawn(move || {
            // As the agent reads the guest (agent/src/ports.rs): messages of the protocol's
            // port size, read into their own buffers and sent without a copy.
            use std::os::fd::AsFd;
            let mut buf = proto::rpc::BytesMut::new();
            let max = proto::limits::PORT_CHUNK_LEN;
            while let Ok(Some(data)) = proto::rpc::recv_payload(rd.as_fd(), &mut buf, max) {
                let empty = agent::PortConnectResponse { kind: None };
                if down.send_payload(&empty, 2, data).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| Status::internal(e.to_string()))?;
    // The server's close ends the call even while the caller still sends nothing.
    let r = loop {
        match s.recv_timeout(std::time::Duration::from_millis(20)) {
            Err(e) => break Err(e),
            Ok(Err(())) if reader.is_finished() => break Ok(()),
            Ok(Err(())) => {}
            Ok(Ok(None)) => {
                let _ = sock.shutdown(std::net::Shutdown::Write);
                break Ok(());
            }
            Ok(Ok(Some(b))) => {
                let m = <agent::PortConnectRequest as prost::Message>::decode(b)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                if let Some(Up::Data(d)) = m.kind {
                    if sock.write_all(&d).is_err() {
                        break Ok(());
                    }
                }
            }
        }
    };
    if r.is_err() {
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
    let _ = reader.join();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handshake count the bench reports: one per connection accepted over TLS, none
    /// for calls on an open connection, none while the port is plaintext.
    #[test]
    fn instant_agent_counts_one_tls_handshake_per_connection() {
        let agent = InstantAgent::start().unwrap();
        agent.set_token("tok");
        let list = |c: &proto::rpc::Client| {
            c.unary::<_, agent::ListSandboxesResponse>(
                agent::sandboxes_methods::LIST,
                &agent::ListSandboxesRequest::default(),
                Some(std::time::Duration::from_secs(10)),
            )
            .unwrap()
        };
        let cred = || proto::rpc::Credential::agent_token("tok".to_owned());
        let plain =
            proto::rpc::Client::connect_tcp(agent.addr.to_string().as_str(), cred()).unwrap();
        list(&plain);
        assert_eq!(
            agent.tls_handshakes(),
            0,
            "a plaintext connection is no handshake"
        );

        let (ca, _) = crate::pki::Authority::generate().unwrap();
        let key = tls::HostKey::generate().unwrap();
        let host_id = proto::id::format(proto::id::Kind::Host, proto::id::Uuid::from_u128(7));
        let cert = ca
            .issue_host(
                &host_id,
                key.public_key(),
                std::time::Duration::from_secs(600),
            )
            .unwrap();
        agent
            .serve_tls(
                cert.cert_pem.as_bytes(),
                key.to_pem().as_bytes(),
                ca.cert_pem.as_bytes(),
            )
            .unwrap();
        let client_tls = ca.agent_client().unwrap().with_server_name(host_id);
        let connect = || {
            tls::connect(
                &agent.addr.to_string(),
                &client_tls,
                cred(),
                &proto::rpc::ClientConfig::default(),
            )
            .unwrap()
        };
        let c = connect();
        for _ in 0..5 {
            list(&c);
        }
        assert_eq!(agent.tls_handshakes(), 1);
        list(&connect());
        assert_eq!(agent.tls_handshakes(), 2);
    }
}
