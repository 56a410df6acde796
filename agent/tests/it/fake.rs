//! Test doubles: a VM layer whose "Firecracker" is a real `sleep` process and whose "guest"
//! is an in-process envd speaking wrenn.envd.v1 on a Unix socket. The manager, the RPC
//! server and the proxies run unchanged on top of it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::statedir::{Chain, ProcRef, SandboxDir, SandboxRecord, TemplateDir};
use agent::vm::{RestoreSource, Started, VmError, Vmm};
use proto::gen::wrenn::envd::v1 as envd;
use proto::rpc::{
    Call, Client, CredentialKind, Hello, Peer, Server, ServerConfig, ServerHandle, ServerStream,
    Service,
};
use proto::Status;
use uffd::header::{BuildId, Diff, DiffExtent, DiffKind, Header};
use vmm_glue::net::Egress;

// ---- fake envd ----

/// A guest's envd: token, files, and output generators.
#[derive(Default)]
pub struct FakeEnvd {
    pub token: Mutex<String>,
    pub files: Mutex<HashMap<String, Vec<u8>>>,
    pub env: Mutex<HashMap<String, String>>,
    /// The default user and directory of the last Init.
    pub defaults: Mutex<(String, String)>,
    /// Bytes the `yes` generator managed to send (flow-control test).
    pub yes_sent: AtomicU64,
    pub inits: AtomicU64,
    pub resumed: AtomicU64,
    /// `stall` starts whose caller cancelled (closed the connection) before the bound.
    pub stalls_seen_cancelled: AtomicU64,
    stdin: Mutex<HashMap<u32, std::sync::mpsc::Sender<Option<Vec<u8>>>>>,
    /// Running processes by pid (what List answers).
    running: Mutex<HashMap<u32, envd::ProcessInfo>>,
    /// What each `cat` echoed, replayed by Connect.
    echoed: Mutex<HashMap<u32, Vec<u8>>>,
    next_pid: AtomicU64,
}

struct EnvdService(Arc<FakeEnvd>);

impl Service for EnvdService {
    fn hello(&self, h: &Hello) -> Result<Peer, Status> {
        let token = self.0.token.lock().unwrap().clone();
        if token.is_empty() && h.credential_kind == CredentialKind::None as i32 {
            return Ok(Arc::new(()));
        }
        if h.credential_kind == CredentialKind::AccessToken as i32 && h.credential == token {
            return Ok(Arc::new(()));
        }
        Err(Status::unauthenticated("fake envd: wrong token"))
    }

    fn call(&self, call: Call) {
        let e = self.0.clone();
        call.spawn(move |s| envd_dispatch(&e, s));
    }
}

fn reply<M: prost::Message>(mut s: ServerStream, m: Result<M, Status>) {
    match m {
        Ok(m) => {
            let r = s.send(&m);
            s.finish(r)
        }
        Err(e) => s.finish(Err(e)),
    }
}

fn envd_dispatch(e: &Arc<FakeEnvd>, mut s: ServerStream) {
    use envd::process_event::Event;
    let method = s.method().to_owned();
    match method.as_str() {
        envd::init_methods::INIT => {
            let r: envd::InitRequest = s.first().unwrap();
            *e.token.lock().unwrap() = r.access_token;
            *e.env.lock().unwrap() = r.env.into_iter().collect();
            *e.defaults.lock().unwrap() = (r.default_user, r.default_cwd);
            e.inits.fetch_add(1, Ordering::SeqCst);
            reply(
                s,
                Ok(envd::InitResponse {
                    envd_version: "fake-1".into(),
                    ..Default::default()
                }),
            )
        }
        envd::init_methods::RESUMED => {
            e.resumed.fetch_add(1, Ordering::SeqCst);
            reply(s, Ok(envd::ResumedResponse::default()))
        }
        envd::health_methods::CHECK => reply(
            s,
            Ok(envd::HealthCheckResponse {
                envd_version: "fake-1".into(),
                initialized: true,
                ..Default::default()
            }),
        ),
        envd::metrics_methods::GET => reply(
            s,
            Ok(envd::GetMetricsResponse {
                cpu_count: 1,
                now_unix_ns: 42,
                ..Default::default()
            }),
        ),
        envd::process_methods::START => {
            let r: envd::StartRequest = s.first().unwrap();
            let p = r.process.unwrap_or_default();
            let pid = 100 + e.next_pid.fetch_add(1, Ordering::SeqCst) as u32;
            if p.cmd == "missing" {
                return s.finish(Err(Status::not_found("fake envd: no such command")));
            }
            if p.cmd == "stall" {
                // A starved guest: the connection stays up, no event comes, until the
                // caller gives up (bounded, so a broken test cannot hang).
                let w = s.watch();
                let end = std::time::Instant::now() + Duration::from_secs(20);
                while !w.is_cancelled() && std::time::Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(20));
                }
                e.stalls_seen_cancelled
                    .fetch_add(w.is_cancelled() as u64, Ordering::SeqCst);
                return s.finish(Err(Status::cancelled("fake envd: stall ended")));
            }
            let (tx, rx) = std::sync::mpsc::channel();
            if p.stdin {
                e.stdin.lock().unwrap().insert(pid, tx);
            }
            let ev = |event| envd::ProcessEvent { event: Some(event) };
            let out = |data: Vec<u8>, stream: envd::OutputStream| {
                ev(Event::Output(envd::ProcessOutput {
                    stream: stream as i32,
                    data: data.into(),
                    offset: 0,
                }))
            };
            if s.send(&ev(Event::Started(envd::ProcessStarted {
                pid,
                tag: p.tag.clone(),
                started_unix_ns: 1,
            })))
            .is_err()
            {
                return;
            }
            e.running.lock().unwrap().insert(
                pid,
                envd::ProcessInfo {
                    pid,
                    tag: p.tag.clone(),
                    config: Some(p.clone()),
                    started_unix_ns: 1,
                    stdin_open: p.stdin,
                },
            );
            let r = match p.cmd.as_str() {
                "echo" => s
                    .send(&out(
                        p.args.join(" ").into_bytes(),
                        envd::OutputStream::Stdout,
                    ))
                    .and_then(|()| s.send(&out(b"warn".to_vec(), envd::OutputStream::Stderr))),
                "yes" => {
                    let chunk = vec![b'y'; 64 * 1024];
                    loop {
                        if s.send(&out(chunk.clone(), envd::OutputStream::Stdout))
                            .is_err()
                        {
                            break Err(Status::cancelled("reader gone"));
                        }
                        e.yes_sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                        if e.yes_sent.load(Ordering::SeqCst) >= 1 << 30 {
                            break Ok(());
                        }
                    }
                }
                "big" => {
                    let n: usize = p.args.first().and_then(|a| a.parse().ok()).unwrap_or(0);
                    let mut r = Ok(());
                    for _ in 0..n.div_ceil(65536) {
                        r = s.send(&out(vec![b'b'; 65536], envd::OutputStream::Stdout));
                        if r.is_err() {
                            break;
                        }
                    }
                    r
                }
                // `cat FILE`: the file from the fake's files, in envd's 64 KiB pipe reads.
                "cat" if !p.args.is_empty() => {
                    let data = e.files.lock().unwrap().get(&p.args[0]).cloned();
                    match data {
                        Some(data) => data.chunks(64 * 1024).try_for_each(|c| {
                            s.send(&ev(Event::Output(envd::ProcessOutput {
                                stream: envd::OutputStream::Stdout as i32,
                                data: c.to_vec().into(),
                                offset: (c.as_ptr() as usize - data.as_ptr() as usize) as u64,
                            })))
                        }),
                        None => Err(Status::not_found("fake envd: cat: no such file")),
                    }
                }
                "cat" => {
                    let mut r = Ok(());
                    while let Ok(Some(d)) = rx.recv_timeout(Duration::from_secs(10)) {
                        e.echoed
                            .lock()
                            .unwrap()
                            .entry(pid)
                            .or_default()
                            .extend_from_slice(&d);
                        // A detached stream still consumes stdin (as the real envd does).
                        if s.send(&out(d, envd::OutputStream::Stdout)).is_err() {
                            r = Err(Status::cancelled("reader gone"));
                        }
                    }
                    r.or(Ok(()))
                }
                "sleep" => {
                    while !s.is_cancelled() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    return;
                }
                _ => Ok(()),
            };
            if r.is_err() {
                return s.finish(r);
            }
            e.running.lock().unwrap().remove(&pid);
            let r = s.send(&ev(Event::Exited(envd::ProcessExited {
                status: Some(envd::process_exited::Status::ExitCode(0)),
                ..Default::default()
            })));
            s.finish(r)
        }
        envd::process_methods::SEND_INPUT => {
            let first: envd::SendInputRequest = s.first().unwrap();
            let pid = match first.process.and_then(|p| p.selector) {
                Some(envd::process_selector::Selector::Pid(p)) => p,
                _ => return s.finish(Err(Status::invalid_argument("no pid"))),
            };
            let Some(tx) = e.stdin.lock().unwrap().get(&pid).cloned() else {
                return s.finish(Err(Status::failed_precondition("no stdin")));
            };
            let mut written = first.data.len() as u64;
            let _ = tx.send(Some(first.data.to_vec()));
            let mut close = first.close;
            while let Ok(Some(m)) = s.recv::<envd::SendInputRequest>() {
                written += m.data.len() as u64;
                let _ = tx.send(Some(m.data.to_vec()));
                close |= m.close;
            }
            if close {
                let _ = tx.send(None);
                e.stdin.lock().unwrap().remove(&pid);
            }
            reply(
                s,
                Ok(envd::SendInputResponse {
                    bytes_written: written,
                }),
            )
        }
        envd::process_methods::LIST => {
            let mut processes: Vec<_> = e.running.lock().unwrap().values().cloned().collect();
            processes.sort_by_key(|p| p.pid);
            reply(s, Ok(envd::ListProcessesResponse { processes }))
        }
        envd::process_methods::CONNECT => {
            let r: envd::ConnectRequest = s.first().unwrap();
            let pid = match r.process.and_then(|p| p.selector) {
                Some(envd::process_selector::Selector::Pid(p)) => p,
                _ => return s.finish(Err(Status::invalid_argument("no pid"))),
            };
            let data = e
                .echoed
                .lock()
                .unwrap()
                .get(&pid)
                .cloned()
                .unwrap_or_default();
            let r = s.send(&envd::ProcessEvent {
                event: Some(Event::Output(envd::ProcessOutput {
                    stream: envd::OutputStream::Stdout as i32,
                    data: data.into(),
                    offset: 0,
                })),
            });
            s.finish(r)
        }
        envd::process_methods::SIGNAL => reply(s, Ok(envd::SignalResponse::default())),
        envd::process_methods::CLOSE_STDIN => reply(s, Ok(envd::CloseStdinResponse::default())),
        envd::process_methods::RESIZE_PTY => reply(s, Ok(envd::ResizePtyResponse::default())),
        envd::filesystem_methods::WRITE => {
            use envd::write_request::Msg;
            let first: envd::WriteRequest = s.first().unwrap();
            let Some(Msg::Header(h)) = first.msg else {
                return s.finish(Err(Status::invalid_argument("header first")));
            };
            let mut data = Vec::new();
            let mut crc = None;
            while let Ok(Some(m)) = s.recv::<envd::WriteRequest>() {
                match m.msg {
                    Some(Msg::Data(d)) => data.extend_from_slice(&d),
                    Some(Msg::Crc32(c)) => crc = Some(c),
                    _ => {}
                }
            }
            // As envd: the end-to-end checksum, when sent, must match what arrived.
            if crc.is_some_and(|c| c != crc32fast::hash(&data)) {
                return s.finish(Err(Status::new(
                    proto::Code::DataLoss,
                    "fake envd: checksum mismatch",
                )));
            }
            let n = data.len() as u64;
            e.files.lock().unwrap().insert(h.path.clone(), data);
            reply(
                s,
                Ok(envd::WriteResponse {
                    entry: Some(envd::EntryInfo {
                        path: h.path,
                        size: n,
                        ..Default::default()
                    }),
                    bytes_written: n,
                }),
            )
        }
        envd::filesystem_methods::READ => {
            let r: envd::ReadRequest = s.first().unwrap();
            let Some(data) = e.files.lock().unwrap().get(&r.path).cloned() else {
                return s.finish(Err(Status::not_found("no such file")));
            };
            let mut res = s.send(&envd::ReadResponse {
                entry: Some(envd::EntryInfo {
                    path: r.path.clone(),
                    size: data.len() as u64,
                    ..Default::default()
                }),
                ..Default::default()
            });
            for (i, c) in data.chunks(65536).enumerate() {
                if res.is_err() {
                    break;
                }
                res = s.send(&envd::ReadResponse {
                    entry: None,
                    data: c.to_vec().into(),
                    offset: (i * 65536) as u64,
                    crc32: None,
                });
            }
            if res.is_ok() {
                res = s.send(&envd::ReadResponse {
                    offset: data.len() as u64,
                    crc32: Some(crc32fast::hash(&data)),
                    ..Default::default()
                });
            }
            s.finish(res)
        }
        envd::filesystem_methods::STAT => {
            let r: envd::StatRequest = s.first().unwrap();
            let size = e.files.lock().unwrap().get(&r.path).map(|d| d.len() as u64);
            reply(
                s,
                size.map(|size| envd::StatResponse {
                    entry: Some(envd::EntryInfo {
                        path: r.path,
                        size,
                        ..Default::default()
                    }),
                })
                .ok_or_else(|| Status::not_found("no such file")),
            )
        }
        // Directories are implicit: a file's directory is the prefix of its path.
        envd::filesystem_methods::MAKE_DIR => {
            let r: envd::MakeDirRequest = s.first().unwrap();
            reply(
                s,
                Ok(envd::MakeDirResponse {
                    entry: Some(envd::EntryInfo {
                        path: r.path,
                        r#type: envd::FileType::Dir as i32,
                        ..Default::default()
                    }),
                    created: true,
                }),
            )
        }
        envd::filesystem_methods::MOVE => {
            let r: envd::MoveRequest = s.first().unwrap();
            let mut files = e.files.lock().unwrap();
            let Some(data) = files.remove(&r.source) else {
                drop(files);
                return s.finish(Err(Status::not_found("no such file")));
            };
            files.insert(r.destination, data);
            drop(files);
            reply(s, Ok(envd::MoveResponse::default()))
        }
        envd::filesystem_methods::REMOVE => {
            let r: envd::RemoveRequest = s.first().unwrap();
            let prefix = format!("{}/", r.path.trim_end_matches('/'));
            e.files
                .lock()
                .unwrap()
                .retain(|p, _| *p != r.path && !p.starts_with(&prefix));
            reply(s, Ok(envd::RemoveResponse::default()))
        }
        envd::filesystem_methods::LIST => {
            let r: envd::ListDirRequest = s.first().unwrap();
            let prefix = format!("{}/", r.path.trim_end_matches('/'));
            let mut entries: Vec<envd::ListEntry> = e
                .files
                .lock()
                .unwrap()
                .iter()
                .filter(|(p, _)| p.starts_with(&prefix) && !p[prefix.len()..].contains('/'))
                .map(|(p, d)| envd::ListEntry {
                    entry: Some(envd::EntryInfo {
                        path: p.clone(),
                        size: d.len() as u64,
                        ..Default::default()
                    }),
                    path: p.clone(),
                    error: String::new(),
                })
                .collect();
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            let r = s.send(&envd::ListDirResponse { entries });
            s.finish(r)
        }
        envd::filesystem_methods::WATCH => {
            let r = s.send(&envd::WatchResponse {
                msg: Some(envd::watch_response::Msg::Started(envd::WatchStarted {})),
            });
            if r.is_err() {
                return s.finish(r);
            }
            // Nothing ever changes: wait to be cancelled.
            while !s.is_cancelled() {
                std::thread::sleep(Duration::from_millis(20));
            }
            e.stdin.lock().unwrap().remove(&u32::MAX);
            WATCH_ENDED.fetch_add(1, Ordering::SeqCst);
        }
        other => s.finish(Err(Status::unimplemented(format!("fake envd: {other}")))),
    }
}

/// Watches that saw their cancellation (proxy cancel test).
pub static WATCH_ENDED: AtomicU64 = AtomicU64::new(0);

// ---- fake VM layer ----

struct Guest {
    envd: Arc<FakeEnvd>,
    server: ServerHandle,
    child: std::process::Child,
}

/// The fake VM layer.
#[derive(Default)]
pub struct FakeVmm {
    guests: Mutex<HashMap<PathBuf, Guest>>,
    pub slots: Mutex<BTreeSet<u32>>,
    /// The egress policy each slot was given last.
    pub egress: Mutex<HashMap<u32, Egress>>,
    /// Fail the next call of this name ("boot", "restore", "snapshot", "snapshot-keep").
    pub fail_next: Mutex<Option<&'static str>>,
    pub problems: Mutex<Vec<String>>,
    pub working_sets_recorded: AtomicU64,
    /// Time each snapshot takes (to hold an operation open).
    pub snapshot_delay: Mutex<Duration>,
    /// Answer "file" to `restore_backend` (else "uffd").
    pub file_backend: std::sync::atomic::AtomicBool,
    /// The template memory file each restore was given, in order.
    pub template_memory: Mutex<Vec<Option<PathBuf>>>,
}

impl FakeVmm {
    fn should_fail(&self, what: &str) -> bool {
        let mut f = self.fail_next.lock().unwrap();
        if *f == Some(what) {
            *f = None;
            true
        } else {
            false
        }
    }

    /// The guest of a sandbox directory.
    pub fn envd(&self, dir: &Path) -> Option<Arc<FakeEnvd>> {
        self.guests.lock().unwrap().get(dir).map(|g| g.envd.clone())
    }

    /// Number of guests whose "Firecracker" runs.
    pub fn running(&self) -> usize {
        self.guests.lock().unwrap().len()
    }

    fn start_guest(&self, dir: &SandboxDir, envd: Arc<FakeEnvd>) -> Result<Started, VmError> {
        let child = std::process::Command::new("sleep")
            .arg("100000")
            .spawn()
            .map_err(|e| VmError::new("spawn", e))?;
        let firecracker = agent::sys::proc_ref(child.id() as i32);
        let sock = dir.path().join("envd.sock");
        let mut server = Server::new(
            ServerConfig::new("fake-envd"),
            Arc::new(EnvdService(envd.clone())),
        )
        .map_err(|e| VmError::new("envd", e))?;
        server
            .listen_unix(&sock)
            .map_err(|e| VmError::new("envd", e))?;
        let (handle, _join) = server.spawn().map_err(|e| VmError::new("envd", e))?;
        self.guests.lock().unwrap().insert(
            dir.path().to_owned(),
            Guest {
                envd,
                server: handle,
                child,
            },
        );
        Ok(Started {
            firecracker,
            ..Started::default()
        })
    }

    /// Kills a guest's "Firecracker" behind the manager's back (VM death).
    pub fn kill_firecracker(&self, dir: &Path) {
        if let Some(mut g) = self.guests.lock().unwrap().remove(dir) {
            let _ = g.child.kill();
            let _ = g.child.wait();
            g.server.shutdown();
        }
    }
}

impl Vmm for FakeVmm {
    fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap().clone()
    }
    fn firecracker_version(&self) -> String {
        "Firecracker fake".into()
    }
    fn restore_backend(&self) -> &'static str {
        if self.file_backend.load(Ordering::SeqCst) {
            "file"
        } else {
            "uffd"
        }
    }
    fn create_slot(&self, index: u32, egress: &Egress) -> Result<(), VmError> {
        assert!(
            self.slots.lock().unwrap().insert(index),
            "slot {index} created twice"
        );
        self.egress.lock().unwrap().insert(index, egress.clone());
        Ok(())
    }
    /// Fake guests' servers listen on loopback.
    fn guest_ip(&self, _index: u32) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::LOCALHOST
    }
    fn set_egress(&self, index: u32, egress: &Egress) -> Result<(), VmError> {
        if !self.slots.lock().unwrap().contains(&index) {
            return Err(VmError::new("set egress", format!("no slot {index}")));
        }
        self.egress.lock().unwrap().insert(index, egress.clone());
        Ok(())
    }
    fn destroy_slot(&self, index: u32) -> Result<(), VmError> {
        self.slots.lock().unwrap().remove(&index);
        Ok(())
    }
    fn cleanup_slots(&self, keep: &[u32]) -> Result<Vec<u32>, VmError> {
        let mut s = self.slots.lock().unwrap();
        let gone: Vec<u32> = s.iter().copied().filter(|i| !keep.contains(i)).collect();
        for i in &gone {
            s.remove(i);
        }
        Ok(gone)
    }
    fn copy_file(&self, src: &Path, dst: &Path, size: Option<u64>) -> Result<(), VmError> {
        std::fs::copy(src, dst).map_err(|e| VmError::new(format!("copy {}", src.display()), e))?;
        if let Some(n) = size {
            let f = std::fs::OpenOptions::new().write(true).open(dst).unwrap();
            if f.metadata().unwrap().len() < n {
                f.set_len(n).unwrap();
            }
        }
        Ok(())
    }
    fn boot(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        _t: &TemplateDir,
    ) -> Result<Started, VmError> {
        assert!(rec.slot.is_some(), "boot without a slot");
        assert!(dir.disk().exists(), "boot without a disk");
        if self.should_fail("boot") {
            return Err(VmError::new("boot", "injected failure"));
        }
        let started = self.start_guest(dir, Arc::new(FakeEnvd::default()))?;
        Ok(Started {
            kernel_version: Some("6.1-fake".into()),
            ..started
        })
    }
    fn restore(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        src: &RestoreSource<'_>,
    ) -> Result<Started, VmError> {
        assert!(rec.slot.is_some(), "restore without a slot");
        self.template_memory
            .lock()
            .unwrap()
            .push(src.template_memory.map(Path::to_owned));
        if self.should_fail("restore") {
            return Err(VmError::new("restore", "injected failure"));
        }
        // The "memory": the token and files, as the vmstate file holds them.
        let text = std::fs::read_to_string(&src.chain.vmstate)
            .map_err(|e| VmError::new("read vmstate", e))?;
        let header =
            std::fs::read(&src.chain.header).map_err(|e| VmError::new("read header", e))?;
        let h = Header::parse(&header).map_err(|e| VmError::new("parse header", e))?;
        for l in &h.layers {
            let name = l.build_id.layer_file_name();
            if !src.chain.layer_dirs.iter().any(|d| d.join(&name).exists()) {
                return Err(VmError::new("restore", format!("layer {name} missing")));
            }
        }
        let envd = Arc::new(FakeEnvd::default());
        let mut lines = text.lines();
        *envd.token.lock().unwrap() = lines.next().unwrap_or("").to_owned();
        for l in lines {
            if let Some((k, v)) = l.split_once('=') {
                envd.files
                    .lock()
                    .unwrap()
                    .insert(k.to_owned(), v.as_bytes().to_vec());
            }
        }
        if let Some(ws) = src.record_working_set {
            let set = uffd::working_set::WorkingSet {
                memory_size: h.memory_size,
                build_id: h.build_id,
                pages: vec![0, 4096, 8192],
            };
            uffd::working_set::write_atomic(ws, &set.serialize()).unwrap();
            self.working_sets_recorded.fetch_add(1, Ordering::SeqCst);
        }
        self.start_guest(dir, envd)
    }
    fn snapshot(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<Chain, VmError> {
        let delay = *self.snapshot_delay.lock().unwrap();
        std::thread::sleep(delay);
        if self.should_fail("snapshot-keep") {
            // As Firecracker's: the VM resumed, its dirty-page log maybe reset.
            let mut e = VmError::new("snapshot/create", "injected failure");
            e.vm_still_running = true;
            e.full_snapshot_needed = true;
            return Err(e);
        }
        if self.should_fail("snapshot") {
            return Err(VmError::new("snapshot/create", "injected failure"));
        }
        let envd = self
            .envd(dir.path())
            .ok_or_else(|| VmError::new("snapshot", "no guest"))?;
        let mut text = format!("{}\n", envd.token.lock().unwrap());
        for (k, v) in envd.files.lock().unwrap().iter() {
            text.push_str(&format!("{k}={}\n", String::from_utf8_lossy(v)));
        }
        let snap = dir.snapshot();
        let build = BuildId(*proto::random::uuid_v4().unwrap().as_bytes());
        // Each generation writes a different page, so older layers stay referenced.
        let page = rec.chain.as_ref().map_or(0, |c| c.generation + 1) % 16;
        let diff = Diff {
            extents: vec![DiffExtent {
                offset: page * 4096,
                length: 4096,
                kind: DiffKind::Data { storage_offset: 0 },
            }],
            layer_size: 4096,
        };
        let (header, generation) = match &rec.chain {
            Some(c) => {
                let old = Header::parse(&std::fs::read(&c.header).unwrap()).unwrap();
                (old.merge(&diff, build).unwrap(), c.generation + 1)
            }
            None => (Header::from_base(16 * 4096, build, &diff).unwrap(), 1),
        };
        // Published as the real one does: one generation directory, renamed into place.
        use uffd::snapshot::{self, no_hook};
        let mut p = snapshot::Publish::begin(&snap, &mut no_hook).unwrap();
        let mut w = p.layer_writer(build).unwrap();
        std::io::Write::write_all(&mut w, &[7u8; 4096]).unwrap();
        p.layer_done(w, &mut no_hook).unwrap();
        let parents = rec
            .chain
            .as_ref()
            .map_or_else(Vec::new, |c| c.layer_dirs.clone());
        for l in &header.layers {
            if l.build_id != build {
                p.link_layer(&parents, l.build_id, &mut no_hook).unwrap();
            }
        }
        std::fs::write(p.dir().join(snapshot::VMSTATE_NAME), text).unwrap();
        p.vmstate_written(&mut no_hook).unwrap();
        let g = p.finish(&header, &mut no_hook).unwrap();
        if !self.should_fail("keep-old-generations") {
            snapshot::remove_others(&snap, &g, &mut no_hook).unwrap();
        }
        Ok(Chain {
            header: g.header(),
            vmstate: g.vmstate(),
            layer_dirs: vec![g.dir.clone()],
            generation,
        })
    }
    fn finish_recording(
        &self,
        _: &SandboxRecord,
        _: &SandboxDir,
        path: &Path,
    ) -> Result<(), VmError> {
        assert!(path.exists(), "the fake writes the working set at restore");
        Ok(())
    }
    fn stop(&self, _rec: &SandboxRecord, dir: &SandboxDir) {
        self.kill_firecracker(dir.path());
    }
    fn alive(&self, p: ProcRef) -> bool {
        agent::sys::alive(p)
    }
    fn readopt(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<(), VmError> {
        if self.guests.lock().unwrap().contains_key(dir.path()) {
            if let Some(index) = rec.slot {
                self.egress.lock().unwrap().insert(
                    index,
                    agent::manager::egress_of(rec.spec.network.as_ref()).unwrap(),
                );
            }
            Ok(())
        } else {
            Err(VmError::new("re-adopt", "no guest"))
        }
    }
    fn resume_vm(&self, _rec: &SandboxRecord, _dir: &SandboxDir) -> Result<(), VmError> {
        Ok(())
    }
    fn connect_envd(&self, dir: &SandboxDir, token: &str) -> Result<Client, Status> {
        let cred = if token.is_empty() {
            proto::rpc::Credential::none()
        } else {
            proto::rpc::Credential::access_token(token)
        };
        Client::connect_unix(dir.path().join("envd.sock"), cred)
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        let dirs: Vec<PathBuf> = self.guests.lock().unwrap().keys().cloned().collect();
        for d in dirs {
            self.kill_firecracker(&d);
        }
    }
}
