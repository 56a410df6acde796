//! An in-test agent speaking the real `wrenn.agent.v1` protocol over `proto::rpc`, with
//! in-memory sandboxes, templates and files. Its behaviour is checked by the same
//! conformance suite that runs against the real agent (agent_conformance.rs).

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use proto::gen::wrenn::agent::v1 as agent;
use proto::gen::wrenn::envd::v1 as envd;
use proto::gen::wrenn::wire::v1::{CredentialKind, Hello};
use proto::id::{self, Kind};
use proto::rpc::{Call, Peer, Server, ServerConfig, ServerHandle, ServerStream, Service};
use proto::{Code, Status};

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Test knobs and state.
#[derive(Default)]
pub struct State {
    pub token: String,
    pub sandboxes: HashMap<String, agent::SandboxInfo>,
    pub templates: HashMap<String, agent::TemplateInfo>,
    pub files: HashMap<(String, String), Vec<u8>>,
    /// When set, Create fails with this status.
    pub fail_create: Option<Status>,
    /// Create waits this long before answering.
    pub create_delay: Duration,
    /// Resume waits this long before answering, and the Resume calls seen.
    pub resume_delay: Duration,
    pub resumes: usize,
    /// Test hook: flip one byte of every file upload as it arrives and of every download
    /// after its checksum was computed (a byte corrupted in transit).
    pub corrupt_files: bool,
    /// The network policy each sandbox was last given (Create, UpdateNetwork).
    pub networks: HashMap<String, Option<proto::sandbox::NetworkPolicy>>,
    /// The spec each sandbox was created with (its process defaults, env included).
    pub specs: HashMap<String, proto::sandbox::SandboxSpec>,
    /// Sandboxes/Samples: what the agent's tiers hold per sandbox (every tier's samples;
    /// a call gets those of its `step_s` ending after its `since_unix_ns`).
    pub samples: HashMap<String, Vec<agent::UsageSample>>,
    /// Sandboxes/Samples calls seen.
    pub samples_calls: usize,
    /// Every `/bin/sh -c` process run (Exec and ExecStream), with its sandbox, in order.
    pub shell_runs: Vec<(String, envd::ProcessConfig)>,
    /// Ports.Connect to these sandbox ports reaches a real TCP server (on loopback, as the
    /// real agent reaches the guest's address in the slot); others get the upper-case echo.
    pub tcp_ports: HashMap<u32, SocketAddr>,
}

/// A fake shell: `/bin/sh -c SCRIPT` prints `ran: SCRIPT`; `exit N` in it exits N; `block`
/// in it runs until its sandbox is destroyed or the call is cancelled.
fn fake_shell_exit(script: &str) -> i32 {
    script
        .split("exit ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub struct FakeAgent {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    pub creates: Arc<AtomicUsize>,
    handle: ServerHandle,
    host_token: Mutex<Option<(String, String)>>,
    /// The host certificate and key (PEM) it presents to ctl's host port, once issued.
    host_identity: Mutex<Option<(String, String)>>,
    next_pid: Arc<AtomicU32>,
    /// Mutual TLS of the port once set (as the real agent after registration).
    tls: Arc<std::sync::RwLock<Option<tls::ServerTls>>>,
    /// Connections accepted over TLS (each costs one handshake).
    pub tls_accepts: Arc<AtomicUsize>,
}

struct Svc {
    state: Arc<Mutex<State>>,
    creates: Arc<AtomicUsize>,
    next_pid: Arc<AtomicU32>,
}

impl FakeAgent {
    pub fn start() -> Arc<FakeAgent> {
        let state = Arc::new(Mutex::new(State {
            token: "unset".into(),
            ..Default::default()
        }));
        let creates = Arc::new(AtomicUsize::new(0));
        let next_pid = Arc::new(AtomicU32::new(100));
        let svc = Svc {
            state: state.clone(),
            creates: creates.clone(),
            next_pid: next_pid.clone(),
        };
        let mut server = Server::new(ServerConfig::new("fake-agent"), Arc::new(svc)).unwrap();
        let tls: Arc<std::sync::RwLock<Option<tls::ServerTls>>> = Default::default();
        let t = tls.clone();
        let tls_accepts = Arc::new(AtomicUsize::new(0));
        let n = tls_accepts.clone();
        let wrap: proto::rpc::WrapTransport =
            Arc::new(move |sock| match t.read().unwrap().clone() {
                Some(st) => {
                    n.fetch_add(1, Ordering::SeqCst);
                    (st.wrap())(sock)
                }
                None => Box::new(sock),
            });
        let addr = server
            .listen_tcp_with("127.0.0.1:0".parse().unwrap(), wrap)
            .unwrap();
        let handle = server.handle();
        let _ = server.spawn().unwrap();
        Arc::new(FakeAgent {
            addr,
            state,
            creates,
            handle,
            host_token: Mutex::new(None),
            host_identity: Mutex::new(None),
            next_pid,
            tls,
            tls_accepts,
        })
    }

    /// Serves mutual TLS from now on: this certificate and key, requiring a client
    /// certificate from `ca_pem` (what the agent does with what registration issued).
    pub fn serve_tls(&self, cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) {
        let st = tls::ServerTls::from_pem(
            cert_pem,
            key_pem,
            &tls::ServerOptions {
                alpn: vec![tls::ALPN_WRENN.to_vec()],
                client_ca_pem: Some(ca_pem.to_vec()),
                ..Default::default()
            },
        )
        .unwrap();
        *self.tls.write().unwrap() = Some(st);
    }

    pub fn set_token(&self, t: &str) {
        self.state.lock().unwrap().token = t.to_owned();
    }

    /// Remembers the host token (to send heartbeats/reports like a real agent).
    pub fn set_host_token(&self, t: &str, ctl_addr: &str) {
        *self.host_token.lock().unwrap() = Some((t.to_owned(), ctl_addr.to_owned()));
    }

    /// Presents this certificate and key (PEM) to ctl's host port from now on.
    pub fn set_host_identity(&self, cert_pem: &str, key_pem: &str) {
        *self.host_identity.lock().unwrap() = Some((cert_pem.to_owned(), key_pem.to_owned()));
    }

    /// The host key (PEM) it presents to ctl's host port.
    pub fn host_identity_key(&self) -> String {
        self.host_identity
            .lock()
            .unwrap()
            .clone()
            .expect("a host identity")
            .1
    }

    /// A client of ctl's wrenn.host.v1 with this agent's host token (and its certificate,
    /// once it has one, as the real agent).
    pub fn host_client(&self) -> proto::rpc::Client {
        let (t, a) = self.host_token.lock().unwrap().clone().expect("registered");
        let cred = proto::rpc::Credential::host_token(t);
        match self.host_identity.lock().unwrap().clone() {
            Some((cert, key)) => crate::harness::connect_as(a, cred, &cert, &key),
            None => crate::harness::connect(a, cred),
        }
        .expect("connect host client")
    }

    pub fn sandbox_state(&self, sb: &str) -> Option<i32> {
        self.state
            .lock()
            .unwrap()
            .sandboxes
            .get(sb)
            .map(|s| s.state)
    }

    /// Stops serving and returns once the stop took effect (the listener refuses new
    /// connections; open connections got GOAWAY in the same step, so a call ctl makes after
    /// this is refused). The shutdown itself is only a command to the server's loop: a call
    /// right after it could still be served under load (a test expecting `unavailable` then
    /// saw a success).
    pub fn stop(&self) {
        self.handle.shutdown();
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
            assert!(
                std::time::Instant::now() < end,
                "the fake agent still accepts 10 s after its shutdown"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

impl Service for Svc {
    fn hello(&self, hello: &Hello) -> Result<Peer, Status> {
        let tok = self.state.lock().unwrap().token.clone();
        if hello.credential_kind != CredentialKind::AgentToken as i32 || hello.credential != tok {
            return Err(Status::unauthenticated("agent token required"));
        }
        Ok(Arc::new(()))
    }

    fn call(&self, call: Call) {
        let state = self.state.clone();
        let creates = self.creates.clone();
        let next_pid = self.next_pid.clone();
        call.spawn(move |stream| dispatch(&state, &creates, &next_pid, stream));
    }
}

fn unary<Req: Message + Default, Resp: Message>(
    mut s: ServerStream,
    f: impl FnOnce(Req) -> Result<Resp, Status>,
) {
    match s.first::<Req>().and_then(f) {
        Ok(m) => {
            let r = s.send(&m);
            s.finish(r);
        }
        Err(e) => s.finish(Err(e)),
    }
}

fn sb_id(s: &str) -> Result<String, Status> {
    id::parse(Kind::Sandbox, s).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(s.to_owned())
}

fn running_sb(state: &Mutex<State>, s: &str) -> Result<String, Status> {
    let id = sb_id(s)?;
    let st = state.lock().unwrap();
    let sb = st
        .sandboxes
        .get(&id)
        .ok_or_else(|| Status::not_found("sandbox not found"))?;
    if sb.state != proto::sandbox::SandboxState::Running as i32 {
        return Err(Status::failed_precondition("sandbox not running"));
    }
    Ok(id)
}

fn entry(path: &str, size: u64) -> envd::EntryInfo {
    envd::EntryInfo {
        name: path.rsplit('/').next().unwrap_or("").to_owned(),
        path: path.to_owned(),
        size,
        ..Default::default()
    }
}

fn dispatch(
    state: &Arc<Mutex<State>>,
    creates: &AtomicUsize,
    next_pid: &AtomicU32,
    mut s: ServerStream,
) {
    use agent::{
        files_methods as f, host_methods as h, processes_methods as p, sandboxes_methods as sm,
        templates_methods as t,
    };
    let method = s.method().to_owned();
    match method.as_str() {
        sm::CREATE => {
            let (delay, fail) = {
                let st = state.lock().unwrap();
                (st.create_delay, st.fail_create.clone())
            };
            unary(s, |r: proto::sandbox::SandboxSpec| {
                let id = sb_id(&r.sandbox_id)?;
                creates.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(delay);
                if let Some(e) = fail {
                    return Err(e);
                }
                let mut st = state.lock().unwrap();
                st.networks.insert(id.clone(), r.network.clone());
                st.specs.insert(id.clone(), r.clone());
                if st.sandboxes.contains_key(&id) {
                    return Err(Status::new(Code::AlreadyExists, "sandbox exists"));
                }
                let timeout = if r.timeout_s == 0 { 300 } else { r.timeout_s };
                let info = agent::SandboxInfo {
                    sandbox_id: id.clone(),
                    team_id: r.team_id,
                    template_id: r.template_id,
                    state: proto::sandbox::SandboxState::Running as i32,
                    vcpus: r.vcpus.max(1),
                    memory_mib: r.memory_mib.max(128),
                    disk_mib: r.disk_mib,
                    timeout_s: timeout,
                    on_timeout: r.on_timeout,
                    expires_unix_ns: now_ns() + (timeout as i64) * 1_000_000_000,
                    created_unix_ns: now_ns(),
                    updated_unix_ns: now_ns(),
                    metadata: r.metadata,
                    envd_version: "fake".into(),
                    ..Default::default()
                };
                st.sandboxes.insert(id, info.clone());
                Ok(info)
            })
        }
        sm::GET => unary(s, |r: agent::GetSandboxRequest| {
            let id = sb_id(&r.sandbox_id)?;
            state
                .lock()
                .unwrap()
                .sandboxes
                .get(&id)
                .cloned()
                .ok_or_else(|| Status::not_found("sandbox not found"))
        }),
        sm::LIST => unary(s, |r: agent::ListSandboxesRequest| {
            let st = state.lock().unwrap();
            Ok(agent::ListSandboxesResponse {
                sandboxes: st
                    .sandboxes
                    .values()
                    .filter(|s| r.states.is_empty() || r.states.contains(&s.state))
                    .cloned()
                    .collect(),
            })
        }),
        sm::DESTROY => unary(s, |r: agent::DestroySandboxRequest| {
            let id = sb_id(&r.sandbox_id)?;
            state
                .lock()
                .unwrap()
                .sandboxes
                .remove(&id)
                .map(|_| agent::DestroySandboxResponse {})
                .ok_or_else(|| Status::not_found("sandbox not found"))
        }),
        sm::SAMPLES => unary(s, |r: agent::SandboxSamplesRequest| {
            let id = sb_id(&r.sandbox_id)?;
            let mut st = state.lock().unwrap();
            st.samples_calls += 1;
            let all = st
                .samples
                .get(&id)
                .ok_or_else(|| Status::not_found("no samples for this sandbox on this host"))?;
            let step = if r.step_s == 0 { 300 } else { r.step_s };
            Ok(agent::SandboxSamplesResponse {
                samples: all
                    .iter()
                    .filter(|x| x.unix_ns > r.since_unix_ns && x.step_s == step)
                    .cloned()
                    .collect(),
                step_s: step,
                live: true,
            })
        }),
        sm::UPDATE_NETWORK => unary(s, |r: agent::UpdateNetworkRequest| {
            let id = sb_id(&r.sandbox_id)?;
            let mut st = state.lock().unwrap();
            let info = st
                .sandboxes
                .get(&id)
                .cloned()
                .ok_or_else(|| Status::not_found("sandbox not found"))?;
            st.networks.insert(id, r.network);
            Ok(info)
        }),
        sm::PAUSE | sm::RESUME | sm::PING | sm::SET_TIMEOUT => {
            let m = method.clone();
            // All four requests start with sandbox_id (tag 1); decode by method.
            let r: Result<(String, u64), Status> = match m.as_str() {
                sm::PAUSE => s
                    .first::<agent::PauseSandboxRequest>()
                    .map(|r| (r.sandbox_id, 0)),
                sm::RESUME => s
                    .first::<agent::ResumeSandboxRequest>()
                    .map(|r| (r.sandbox_id, r.timeout_s)),
                sm::PING => s
                    .first::<agent::PingSandboxRequest>()
                    .map(|r| (r.sandbox_id, 0)),
                _ => s
                    .first::<agent::SetTimeoutRequest>()
                    .map(|r| (r.sandbox_id, r.timeout_s)),
            };
            if m == sm::RESUME {
                let delay = {
                    let mut st = state.lock().unwrap();
                    st.resumes += 1;
                    st.resume_delay
                };
                std::thread::sleep(delay);
            }
            let r = r.and_then(|(sid, t)| {
                let id = sb_id(&sid)?;
                let mut st = state.lock().unwrap();
                let sb = st
                    .sandboxes
                    .get_mut(&id)
                    .ok_or_else(|| Status::not_found("sandbox not found"))?;
                let running = proto::sandbox::SandboxState::Running as i32;
                let paused = proto::sandbox::SandboxState::Paused as i32;
                match m.as_str() {
                    sm::PAUSE if sb.state == running => {
                        sb.state = paused;
                        sb.expires_unix_ns = 0;
                    }
                    sm::RESUME if sb.state == paused => {
                        if t > 0 {
                            sb.timeout_s = t;
                        }
                        sb.state = running;
                        sb.expires_unix_ns = now_ns() + sb.timeout_s as i64 * 1_000_000_000;
                    }
                    sm::PING if sb.state == running => {
                        sb.expires_unix_ns = now_ns() + sb.timeout_s as i64 * 1_000_000_000;
                    }
                    sm::SET_TIMEOUT if t > 0 => {
                        sb.timeout_s = t;
                        if sb.state == running {
                            sb.expires_unix_ns = now_ns() + t as i64 * 1_000_000_000;
                        }
                    }
                    sm::SET_TIMEOUT => {
                        return Err(Status::invalid_argument("timeout_s must be > 0"))
                    }
                    _ => return Err(Status::failed_precondition("wrong state")),
                }
                sb.updated_unix_ns = now_ns();
                Ok(sb.clone())
            });
            match r {
                Ok(m) => {
                    let r = s.send(&m);
                    s.finish(r);
                }
                Err(e) => s.finish(Err(e)),
            }
        }
        p::EXEC => unary(s, |r: agent::ExecRequest| {
            running_sb(state, &r.sandbox_id)?;
            let cfg = r
                .process
                .ok_or_else(|| Status::invalid_argument("process required"))?;
            let pid = next_pid.fetch_add(1, Ordering::Relaxed);
            if cfg.cmd == "/bin/sh" {
                let script = cfg.args.get(1).cloned().unwrap_or_default();
                state
                    .lock()
                    .unwrap()
                    .shell_runs
                    .push((r.sandbox_id.clone(), cfg.clone()));
                return Ok(agent::ExecResponse {
                    pid,
                    tag: cfg.tag,
                    exited: (!r.background).then(|| envd::ProcessExited {
                        status: Some(envd::process_exited::Status::ExitCode(fake_shell_exit(
                            &script,
                        ))),
                        exited_unix_ns: now_ns(),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            if r.background {
                return Ok(agent::ExecResponse {
                    pid,
                    tag: cfg.tag,
                    ..Default::default()
                });
            }
            // "echo": stdout = args joined plus stdin; "fail": exit code 3 with stderr.
            let (out, err, code) = match cfg.cmd.as_str() {
                "echo" => {
                    let mut o = cfg.args.join(" ").into_bytes();
                    o.extend_from_slice(&r.stdin);
                    (o, Vec::new(), 0)
                }
                "fail" => (Vec::new(), b"failed".to_vec(), 3),
                _ => return Err(Status::not_found("no such command")),
            };
            Ok(agent::ExecResponse {
                pid,
                tag: cfg.tag,
                stdout: out.into(),
                stderr: err.into(),
                exited: Some(envd::ProcessExited {
                    status: Some(envd::process_exited::Status::ExitCode(code)),
                    exited_unix_ns: now_ns(),
                    ..Default::default()
                }),
                duration_ns: 1000,
                ..Default::default()
            })
        }),
        p::EXEC_STREAM => {
            let r = s
                .first::<agent::ExecStreamRequest>()
                .and_then(|r| running_sb(state, &r.sandbox_id).map(|_| r));
            let r = r.and_then(|r| {
                let cfg = r.process.unwrap_or_default();
                let pid = next_pid.fetch_add(1, Ordering::Relaxed);
                s.send(&envd::ProcessEvent {
                    event: Some(envd::process_event::Event::Started(envd::ProcessStarted {
                        pid,
                        tag: cfg.tag.clone(),
                        started_unix_ns: now_ns(),
                    })),
                })?;
                if cfg.cmd == "/bin/sh" {
                    let script = cfg.args.get(1).cloned().unwrap_or_default();
                    state
                        .lock()
                        .unwrap()
                        .shell_runs
                        .push((r.sandbox_id.clone(), cfg.clone()));
                    s.send(&envd::ProcessEvent {
                        event: Some(envd::process_event::Event::Output(envd::ProcessOutput {
                            stream: envd::OutputStream::Stdout as i32,
                            data: format!("ran: {script}\n").into_bytes().into(),
                            offset: 0,
                        })),
                    })?;
                    if script.contains("block") {
                        let id = sb_id(&r.sandbox_id)?;
                        loop {
                            std::thread::sleep(Duration::from_millis(20));
                            if s.is_cancelled() {
                                return Err(Status::cancelled("cancelled"));
                            }
                            if !state.lock().unwrap().sandboxes.contains_key(&id) {
                                return Err(Status::unavailable("the sandbox is gone"));
                            }
                        }
                    }
                    return s.send(&envd::ProcessEvent {
                        event: Some(envd::process_event::Event::Exited(envd::ProcessExited {
                            status: Some(envd::process_exited::Status::ExitCode(fake_shell_exit(
                                &script,
                            ))),
                            ..Default::default()
                        })),
                    });
                }
                for (i, a) in cfg.args.iter().enumerate() {
                    s.send(&envd::ProcessEvent {
                        event: Some(envd::process_event::Event::Output(envd::ProcessOutput {
                            stream: envd::OutputStream::Stdout as i32,
                            data: a.clone().into_bytes().into(),
                            offset: i as u64,
                        })),
                    })?;
                }
                s.send(&envd::ProcessEvent {
                    event: Some(envd::process_event::Event::Exited(envd::ProcessExited {
                        status: Some(envd::process_exited::Status::ExitCode(0)),
                        ..Default::default()
                    })),
                })
            });
            s.finish(r);
        }
        p::SEND_INPUT => {
            let r = s.first::<agent::SendInputRequest>().and_then(|first| {
                running_sb(state, &first.sandbox_id)?;
                let mut n = first.input.map(|i| i.data.len() as u64).unwrap_or(0);
                while let Some(m) = s.recv::<agent::SendInputRequest>()? {
                    n += m.input.map(|i| i.data.len() as u64).unwrap_or(0);
                }
                Ok(envd::SendInputResponse { bytes_written: n })
            });
            match r {
                Ok(m) => {
                    let r = s.send(&m);
                    s.finish(r);
                }
                Err(e) => s.finish(Err(e)),
            }
        }
        p::CLOSE_STDIN => unary(s, |r: agent::CloseStdinRequest| {
            running_sb(state, &r.sandbox_id).map(|_| envd::CloseStdinResponse {})
        }),
        p::SIGNAL => unary(s, |r: agent::SignalRequest| {
            running_sb(state, &r.sandbox_id).map(|_| envd::SignalResponse {})
        }),
        p::RESIZE_PTY => unary(s, |r: agent::ResizePtyRequest| {
            running_sb(state, &r.sandbox_id).map(|_| envd::ResizePtyResponse {})
        }),
        p::LIST => unary(s, |r: agent::ListProcessesRequest| {
            running_sb(state, &r.sandbox_id)
                .map(|_| envd::ListProcessesResponse { processes: vec![] })
        }),
        p::CONNECT => {
            let r = s
                .first::<agent::ConnectRequest>()
                .and_then(|r| running_sb(state, &r.sandbox_id))
                .and_then(|_| Err(Status::not_found("no such process")));
            s.finish(r);
        }
        f::WRITE => {
            let r = s.first::<agent::WriteRequest>().and_then(|first| {
                let Some(agent::write_request::Msg::Header(h)) = first.msg else {
                    return Err(Status::invalid_argument("header first"));
                };
                let sb = running_sb(state, &h.sandbox_id)?;
                let path = h.file.map(|f| f.path).unwrap_or_default();
                let mut data = Vec::new();
                let mut crc = None;
                while let Some(m) = s.recv::<agent::WriteRequest>()? {
                    match m.msg {
                        Some(agent::write_request::Msg::Data(d)) => data.extend_from_slice(&d),
                        Some(agent::write_request::Msg::Crc32(c)) => crc = Some(c),
                        _ => {}
                    }
                }
                if state.lock().unwrap().corrupt_files && !data.is_empty() {
                    let mid = data.len() / 2;
                    data[mid] ^= 0x01;
                }
                // As envd: a checksum that does not match what arrived is DATA_LOSS.
                if crc.is_some_and(|c| c != crc32fast::hash(&data)) {
                    return Err(Status::new(Code::DataLoss, "checksum mismatch"));
                }
                let n = data.len() as u64;
                state.lock().unwrap().files.insert((sb, path.clone()), data);
                Ok(envd::WriteResponse {
                    entry: Some(entry(&path, n)),
                    bytes_written: n,
                })
            });
            match r {
                Ok(m) => {
                    let r = s.send(&m);
                    s.finish(r);
                }
                Err(e) => s.finish(Err(e)),
            }
        }
        f::READ => {
            let r = s.first::<agent::ReadRequest>().and_then(|r| {
                let sb = running_sb(state, &r.sandbox_id)?;
                let path = r.read.map(|x| x.path).unwrap_or_default();
                let data = state
                    .lock()
                    .unwrap()
                    .files
                    .get(&(sb, path.clone()))
                    .cloned()
                    .ok_or_else(|| Status::not_found("no such file"))?;
                let crc = crc32fast::hash(&data);
                let mut data = data;
                if state.lock().unwrap().corrupt_files && !data.is_empty() {
                    let mid = data.len() / 2;
                    data[mid] ^= 0x01;
                }
                s.send(&envd::ReadResponse {
                    entry: Some(entry(&path, data.len() as u64)),
                    data: Default::default(),
                    offset: 0,
                    crc32: None,
                })?;
                for (i, c) in data.chunks(proto::limits::CHUNK_LEN).enumerate() {
                    s.send(&envd::ReadResponse {
                        entry: None,
                        data: c.to_vec().into(),
                        offset: (i * proto::limits::CHUNK_LEN) as u64,
                        crc32: None,
                    })?;
                }
                s.send(&envd::ReadResponse {
                    offset: data.len() as u64,
                    crc32: Some(crc),
                    ..Default::default()
                })?;
                Ok(())
            });
            s.finish(r);
        }
        f::STAT => unary(s, |r: agent::StatRequest| {
            let sb = running_sb(state, &r.sandbox_id)?;
            let path = r.stat.map(|x| x.path).unwrap_or_default();
            let st = state.lock().unwrap();
            let d = st
                .files
                .get(&(sb, path.clone()))
                .ok_or_else(|| Status::not_found("no such file"))?;
            Ok(envd::StatResponse {
                entry: Some(entry(&path, d.len() as u64)),
            })
        }),
        f::LIST => {
            let r = s.first::<agent::ListDirRequest>().and_then(|r| {
                let sb = running_sb(state, &r.sandbox_id)?;
                let dir = r.list.map(|x| x.path).unwrap_or_default();
                let entries: Vec<envd::ListEntry> = state
                    .lock()
                    .unwrap()
                    .files
                    .iter()
                    .filter(|((s2, p), _)| *s2 == sb && p.starts_with(&dir))
                    .map(|((_, p), d)| envd::ListEntry {
                        entry: Some(entry(p, d.len() as u64)),
                        path: p.clone(),
                        error: String::new(),
                    })
                    .collect();
                s.send(&envd::ListDirResponse { entries })
            });
            s.finish(r);
        }
        f::MAKE_DIR => unary(s, |r: agent::MakeDirRequest| {
            running_sb(state, &r.sandbox_id)?;
            let p = r.make_dir.map(|m| m.path).unwrap_or_default();
            Ok(envd::MakeDirResponse {
                entry: Some(entry(&p, 0)),
                created: true,
            })
        }),
        f::MOVE => unary(s, |r: agent::MoveRequest| {
            let sb = running_sb(state, &r.sandbox_id)?;
            let m = r.r#move.unwrap_or_default();
            let mut st = state.lock().unwrap();
            let d = st
                .files
                .remove(&(sb.clone(), m.source.clone()))
                .ok_or_else(|| Status::not_found("no such file"))?;
            let n = d.len() as u64;
            st.files.insert((sb, m.destination.clone()), d);
            Ok(envd::MoveResponse {
                entry: Some(entry(&m.destination, n)),
            })
        }),
        f::REMOVE => unary(s, |r: agent::RemoveRequest| {
            let sb = running_sb(state, &r.sandbox_id)?;
            let p = r.remove.unwrap_or_default();
            let gone = state
                .lock()
                .unwrap()
                .files
                .remove(&(sb, p.path.clone()))
                .is_some();
            if !gone && !p.ignore_missing {
                return Err(Status::not_found("no such file"));
            }
            Ok(envd::RemoveResponse {})
        }),
        t::CREATE => unary(s, |r: agent::CreateTemplateRequest| {
            let sb = sb_id(&r.sandbox_id)?;
            id::parse(Kind::Template, &r.template_id)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let mut st = state.lock().unwrap();
            let info = st
                .sandboxes
                .get_mut(&sb)
                .ok_or_else(|| Status::not_found("sandbox not found"))?;
            info.state = proto::sandbox::SandboxState::Paused as i32;
            let (v, m, d) = (info.vcpus, info.memory_mib, info.disk_mib);
            let ti = agent::TemplateInfo {
                template_id: r.template_id.clone(),
                kind: proto::sandbox::TemplateKind::Snapshot as i32,
                source_sandbox_id: sb,
                vcpus: v,
                memory_mib: m,
                disk_mib: d,
                size_bytes: 4096,
                ..Default::default()
            };
            st.templates.insert(r.template_id, ti.clone());
            Ok(ti)
        }),
        t::DELETE => unary(s, |r: agent::DeleteTemplateRequest| {
            state
                .lock()
                .unwrap()
                .templates
                .remove(&r.template_id)
                .map(|_| agent::DeleteTemplateResponse {})
                .ok_or_else(|| Status::not_found("template not found"))
        }),
        t::LIST => unary(s, |_: agent::ListTemplatesRequest| {
            Ok(agent::ListTemplatesResponse {
                templates: state.lock().unwrap().templates.values().cloned().collect(),
            })
        }),
        h::INFO => unary(s, |_: agent::HostInfoRequest| {
            Ok(agent::HostInfo {
                hostname: "fake".into(),
                agent_version: "fake".into(),
                can_host_sandboxes: true,
                now_unix_ns: now_ns(),
                ..Default::default()
            })
        }),
        agent::ports_methods::CONNECT => {
            let r = fake_port(state, &mut s);
            s.finish(r);
        }
        m => s.finish(Err(Status::unimplemented(format!("unknown method {m}")))),
    }
}

/// Ports.Connect against a pretend server on the port: it answers each data message with the
/// same bytes upper-cased, and "bye" after the caller's END; on port 2 it says "hello" and
/// closes.
fn fake_port(state: &Mutex<State>, s: &mut ServerStream) -> Result<(), Status> {
    use agent::port_connect_request::Kind as Up;
    use agent::port_connect_response::Kind as Down;
    let first: agent::PortConnectRequest = s.first()?;
    let Some(Up::Open(open)) = first.kind else {
        return Err(Status::invalid_argument("open first"));
    };
    running_sb(state, &open.sandbox_id)?;
    let tcp = state.lock().unwrap().tcp_ports.get(&open.port).copied();
    if let Some(addr) = tcp {
        return tcp_port(s, addr);
    }
    if open.port == 1 {
        return Err(Status::unavailable("nothing listens on port 1"));
    }
    s.send(&agent::PortConnectResponse {
        kind: Some(Down::Opened(true)),
    })?;
    if open.port == 2 {
        // A server that says hello and closes at once, whatever the caller does.
        return s.send(&agent::PortConnectResponse {
            kind: Some(Down::Data(b"hello".to_vec().into())),
        });
    }
    while let Some(m) = s.recv::<agent::PortConnectRequest>()? {
        if let Some(Up::Data(d)) = m.kind {
            s.send(&agent::PortConnectResponse {
                kind: Some(Down::Data(d.to_ascii_uppercase().into())),
            })?;
        }
    }
    s.send(&agent::PortConnectResponse {
        kind: Some(Down::Data(b"bye".to_vec().into())),
    })
}

/// Ports.Connect to a real TCP server: bytes both ways, the caller's END as a half-close,
/// the server's close as the end of the call (what the real agent does with the guest).
fn tcp_port(s: &mut ServerStream, addr: SocketAddr) -> Result<(), Status> {
    use agent::port_connect_request::Kind as Up;
    use agent::port_connect_response::Kind as Down;
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(addr)
        .map_err(|e| Status::unavailable(format!("connect {addr}: {e}")))?;
    s.send(&agent::PortConnectResponse {
        kind: Some(Down::Opened(true)),
    })?;
    let down = s.sender();
    let mut rd = sock
        .try_clone()
        .map_err(|e| Status::internal(e.to_string()))?;
    let reader = std::thread::spawn(move || {
        let mut b = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let m = agent::PortConnectResponse {
                        kind: Some(Down::Data(b[..n].to_vec().into())),
                    };
                    if down.send(&m).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut r = Ok(());
    loop {
        match s.recv_timeout(Duration::from_millis(100)) {
            Err(e) => {
                r = Err(e);
                break;
            }
            Ok(Err(())) => {
                if reader.is_finished() {
                    break;
                }
            }
            Ok(Ok(None)) => {
                let _ = sock.shutdown(std::net::Shutdown::Write);
                break;
            }
            Ok(Ok(Some(b))) => {
                let m = agent::PortConnectRequest::decode(b)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                if let Some(Up::Data(d)) = m.kind {
                    if sock.write_all(&d).is_err() {
                        break;
                    }
                }
            }
        }
    }
    if r.is_err() {
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
    let _ = reader.join();
    r
}
