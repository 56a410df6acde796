//! The `wrenn.envd.v1` services on the proto RPC runtime: Process, Filesystem, Init,
//! Health, Metrics; plus the readiness announce (envd as a client of the agent).
//!
//! Authentication: before the first `Init.Init` any hello is accepted and only `Init.Init`
//! and `Health.Check` answer. `Init.Init` sets the access token; from then on a hello must
//! carry it (CREDENTIAL_KIND_ACCESS_TOKEN, compared in constant time) or the connection is
//! refused. Every token has a generation number; a connection remembers the generation it
//! authenticated with, and only the current generation is served. A later `Init` with a new
//! token must come on a connection of the current generation; it bumps the generation,
//! moves its own connection to it and closes every other connection of older generations.
//! The connection that performed the first `Init` is upgraded the same way, so the agent
//! can go on using it.
//!
//! Threading: the runtime calls [`Service::call`] on its event loop; everything that touches
//! the disk, waits for a child or streams runs on the runtime's worker threads
//! (`Call::spawn`). File operations switch the worker thread's filesystem identity for their
//! duration (see [`crate::fs`]).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use log::{info, warn};
use prost::bytes::Bytes;
use prost::Message;
use proto::gen::wrenn::envd::v1 as pb;
use proto::gen::wrenn::wire::v1::{CredentialKind, Hello};
use proto::rpc::{Call, CallCtx, Peer, ServerHandle, ServerStream, Service};
use proto::{Code, Status};

use crate::clock::{Clock, Source, Synced};
use crate::fs::{self, Entry, ErrorKind};
use crate::limits::{LIST_BATCH_BYTES_MAX, LIST_DEPTH_MAX, OUTPUT_CHUNK_LEN};
use crate::passwd::{self, Db, User};
use crate::process::{self, Next, Spec, StreamKind, Table};
use crate::watch::{EventKind, Watch};

/// envd's version as reported to clients.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a streaming handler waits for output before checking for cancellation.
const POLL_SLICE: Duration = Duration::from_millis(250);

/// The PATH a process gets unless the caller or init sets one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a connection carries: the token generation it authenticated with (0 = none: a
/// connection opened before the first init).
pub struct PeerInfo {
    generation: AtomicU64,
}

/// Chunk buffers of one file read, reused once the connection has written them: a new
/// 64 KiB buffer per chunk cost a zero-fill of every byte read. A buffer is reusable when
/// nothing else holds it (the payload slice sent is dropped once written). The connection's
/// flow-control window bounds how many are in flight; at most [`READ_BUFFERS_KEPT`] are
/// kept for reuse.
#[derive(Default)]
struct ReadBuffers {
    kept: std::collections::VecDeque<Bytes>,
}

/// Buffers one read keeps for reuse (1 MiB of 64 KiB chunks).
const READ_BUFFERS_KEPT: usize = 16;

impl ReadBuffers {
    /// A buffer of `OUTPUT_CHUNK_LEN` bytes: a written one back, else a new one.
    fn take(&mut self) -> prost::bytes::BytesMut {
        for i in 0..self.kept.len() {
            if self.kept[i].is_unique() {
                if let Some(b) = self.kept.remove(i) {
                    match b.try_into_mut() {
                        Ok(m) if m.len() == OUTPUT_CHUNK_LEN => return m,
                        Ok(_) => {}
                        Err(b) => self.kept.push_back(b),
                    }
                }
                break;
            }
        }
        prost::bytes::BytesMut::zeroed(OUTPUT_CHUNK_LEN)
    }

    /// Keeps `buf` (the whole chunk buffer) to be taken again once written.
    fn give_back(&mut self, buf: Bytes) {
        if self.kept.len() == READ_BUFFERS_KEPT {
            self.kept.pop_front();
        }
        self.kept.push_back(buf);
    }
}

/// Where the readiness announce goes.
#[derive(Clone, Debug)]
pub enum AnnounceTarget {
    /// vsock CID and port (in a guest: host CID 2, port 49984).
    Vsock { cid: u32, port: u32 },
    /// A Unix socket (tests, development).
    Unix(PathBuf),
}

/// Settings of the service.
#[derive(Clone, Debug)]
pub struct Config {
    /// Root whose etc/passwd and etc/group name the users ("/" in production).
    pub root: PathBuf,
    pub announce: Option<AnnounceTarget>,
    /// The vsock port the API listens on (reported in the announce).
    pub api_port: u32,
    /// Identity from MMDS before the first init.
    pub initial_sandbox_id: String,
    pub initial_template_id: String,
    /// Set the hostname to the sandbox id at init (PID 1 in a guest only).
    pub set_hostname: bool,
}

struct State {
    token: Option<String>,
    generation: u64,
    initialized: bool,
    sandbox_id: String,
    template_id: String,
    env: Vec<(String, String)>,
    /// The default user set by Init; "" = [`passwd::default_user`].
    default_user: String,
    default_cwd: String,
}

/// The envd service.
pub struct Envd {
    cfg: Config,
    table: Table,
    clock: Arc<Clock>,
    state: Mutex<State>,
    handle: OnceLock<ServerHandle>,
    started: Instant,
    instance_id: String,
    accounts: passwd::Cache,
}

impl Envd {
    pub fn new(cfg: Config, table: Table, clock: Arc<Clock>) -> Arc<Envd> {
        let state = State {
            token: None,
            generation: 0,
            initialized: false,
            sandbox_id: cfg.initial_sandbox_id.clone(),
            template_id: cfg.initial_template_id.clone(),
            env: Vec::new(),
            // "": chosen per call by passwd::default_user (`user` if the image has it).
            default_user: String::new(),
            default_cwd: String::new(),
        };
        Arc::new(Envd {
            cfg,
            table,
            clock,
            state: Mutex::new(state),
            handle: OnceLock::new(),
            started: Instant::now(),
            // Not a secret; a failed getrandom (not expected with GRND_INSECURE) leaves an
            // id that still changes with every envd start.
            instance_id: proto::random::hex_early(16)
                .unwrap_or_else(|_| format!("{:x}", std::process::id())),
            accounts: passwd::Cache::default(),
        })
    }

    /// Gives the service the server's handle (needed to close connections on token change).
    pub fn set_server_handle(&self, h: ServerHandle) {
        let _ = self.handle.set(h);
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Announces readiness on a background thread (no-op without a target).
    pub fn announce(self: &Arc<Self>, resumed: bool) {
        let Some(target) = self.cfg.announce.clone() else {
            return;
        };
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || this.announce_blocking(&target, resumed));
        if let Err(e) = spawned {
            warn!("announce thread failed error={e}");
        }
    }

    fn ready_request(&self, resumed: bool) -> pb::ReadyRequest {
        let st = self.state();
        pb::ReadyRequest {
            envd_version: VERSION.into(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            instance_id: self.instance_id.clone(),
            resumed,
            hostname: crate::init::hostname(),
            sandbox_id: st.sandbox_id.clone(),
            initialized: st.initialized,
            api_port: self.cfg.api_port,
        }
    }

    /// Connects to the agent's readiness listener and calls Announce.Ready, retrying for a
    /// while (the agent listens before it boots the VM, but a restore races its listener).
    pub fn announce_blocking(&self, target: &AnnounceTarget, resumed: bool) -> bool {
        use proto::rpc::{Client, ClientConfig, Credential};
        let req = self.ready_request(resumed);
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=ANNOUNCE_ATTEMPTS {
            let client = match target {
                AnnounceTarget::Unix(p) => Client::connect_unix(p, Credential::none()),
                AnnounceTarget::Vsock { cid, port } => {
                    match crate::vsock::connect(*cid, *port, Duration::from_secs(2)) {
                        Ok(fd) => {
                            Client::from_stream(fd, Credential::none(), &ClientConfig::default())
                        }
                        Err(e) => Err(Status::unavailable(format!("vsock connect: {e}"))),
                    }
                }
            };
            let r = client.and_then(|c| {
                let r = c.unary::<_, pb::ReadyResponse>(
                    pb::announce_methods::READY,
                    &req,
                    Some(Duration::from_secs(5)),
                );
                c.close();
                r
            });
            match r {
                Ok(_) => {
                    info!("announced readiness resumed={resumed} attempt={attempt}");
                    return true;
                }
                Err(e) => {
                    warn!("announce failed attempt={attempt} error={e}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        false
    }

    fn user(&self, name: &str) -> Result<User, Status> {
        let chosen = if name.is_empty() {
            self.state().default_user.clone()
        } else {
            name.to_string()
        };
        let db = self
            .accounts
            .load(&self.cfg.root)
            .map_err(|e| Status::internal(e.to_string()))?;
        let name = if chosen.is_empty() {
            passwd::default_user(&db)
        } else {
            &chosen
        };
        db.user(name)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// Resolves a request path: absolute as is; relative against the default cwd, else the
    /// user's home.
    fn path(&self, p: &str, user: &User) -> Result<PathBuf, Status> {
        if p.is_empty() {
            return Err(Status::invalid_argument("empty path"));
        }
        let full: Vec<u8> = if p.starts_with('/') {
            p.as_bytes().to_vec()
        } else {
            let cwd = self.state().default_cwd.clone();
            let base = if cwd.is_empty() {
                user.home.clone()
            } else {
                PathBuf::from(cwd)
            };
            base.join(p).into_os_string().into_vec()
        };
        fs::check_path(&full).map_err(fs_status)
    }

    fn entry_info(&self, e: &Entry, db: &Db) -> pb::EntryInfo {
        let name = fs::file_name_bytes(&e.path);
        let utf8 = e.path.to_str().is_some();
        pb::EntryInfo {
            name: String::from_utf8_lossy(name).into_owned(),
            path: e.path.to_string_lossy().into_owned(),
            r#type: match e.file_type {
                fs::FileType::File => pb::FileType::File,
                fs::FileType::Dir => pb::FileType::Dir,
                fs::FileType::Symlink => pb::FileType::Symlink,
                fs::FileType::Other => pb::FileType::Other,
            } as i32,
            size: e.size,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            owner: db.user_name(e.uid).unwrap_or("").to_string(),
            group: db.group_name(e.gid).unwrap_or("").to_string(),
            modified_unix_ns: e.mtime_ns.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
            symlink_target: e
                .symlink_target
                .as_ref()
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default(),
            name_raw: if utf8 {
                Bytes::new()
            } else {
                Bytes::copy_from_slice(name)
            },
        }
    }

    fn db(&self) -> Arc<Db> {
        self.accounts.load(&self.cfg.root).unwrap_or_default()
    }

    /// Is this peer allowed `method`?
    fn authorize(&self, peer: &Peer, method: &str) -> Result<(), Status> {
        let gen = peer_generation(peer);
        let st = self.state();
        if st.generation > 0 && gen == st.generation {
            return Ok(());
        }
        if method == pb::health_methods::CHECK || method == pb::init_methods::INIT {
            return Ok(());
        }
        if st.generation == 0 {
            Err(Status::failed_precondition(format!(
                "{method}: envd is not initialized (call {} first)",
                pb::init_methods::INIT
            )))
        } else {
            Err(Status::unauthenticated(format!(
                "{method}: this connection does not carry the current access token"
            )))
        }
    }

    // ---- process ------------------------------------------------------------------------

    fn spec(&self, c: pb::ProcessConfig) -> Result<Spec, Status> {
        if c.cmd.is_empty() {
            return Err(Status::invalid_argument("empty cmd"));
        }
        let user = self.user(&c.user)?;
        let st = self.state();
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            ("HOME".into(), user.home.to_string_lossy().into_owned()),
            ("USER".into(), user.name.clone()),
            ("LOGNAME".into(), user.name.clone()),
            ("SHELL".into(), user.shell.to_string_lossy().into_owned()),
        ];
        if c.pty.is_some() {
            env.push(("TERM".into(), "xterm-256color".into()));
        }
        let mut set = |k: &str, v: &str| match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v.to_string(),
            None => env.push((k.to_string(), v.to_string())),
        };
        for (k, v) in &st.env {
            set(k, v);
        }
        let mut caller: Vec<(&String, &String)> = c.env.iter().collect();
        caller.sort();
        for (k, v) in &caller {
            set(k, v);
        }
        let cwd = if !c.cwd.is_empty() {
            Some(self.path_with_cwd(&c.cwd, &st.default_cwd, &user)?)
        } else if !st.default_cwd.is_empty() {
            Some(PathBuf::from(&st.default_cwd))
        } else if user.home.is_dir() {
            Some(user.home.clone())
        } else {
            Some(PathBuf::from("/"))
        };
        drop(st);
        let pty = match c.pty {
            Some(p) => Some(winsize(p)?),
            None => None,
        };
        Ok(Spec {
            cmd: c.cmd.into(),
            args: c.args.into_iter().map(OsString::from).collect(),
            env: env
                .into_iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
            cwd,
            user,
            stdin: c.stdin,
            pty,
            tag: if c.tag.is_empty() { None } else { Some(c.tag) },
            timeout: if c.timeout_ms == 0 {
                None
            } else {
                Some(Duration::from_millis(c.timeout_ms))
            },
            caller_env: caller
                .into_iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
        })
    }

    fn path_with_cwd(&self, p: &str, cwd: &str, user: &User) -> Result<PathBuf, Status> {
        if p.starts_with('/') {
            return fs::check_path(p.as_bytes()).map_err(fs_status);
        }
        let base = if cwd.is_empty() {
            user.home.clone()
        } else {
            PathBuf::from(cwd)
        };
        fs::check_path(base.join(p).as_os_str().as_bytes()).map_err(fs_status)
    }

    fn find(&self, sel: Option<pb::ProcessSelector>) -> Result<Arc<process::Process>, Status> {
        use pb::process_selector::Selector;
        let found = match sel.and_then(|s| s.selector) {
            Some(Selector::Pid(pid)) => self.table.get(pid as i32),
            Some(Selector::Tag(tag)) => self.table.by_tag(&tag),
            None => return Err(Status::invalid_argument("no process selector (pid or tag)")),
        };
        found.ok_or_else(|| Status::not_found("no such process"))
    }

    fn send_input_stream(
        &self,
        first: pb::SendInputRequest,
        s: &mut ServerStream,
    ) -> Result<pb::SendInputResponse, Status> {
        let p = self.find(first.process.clone())?;
        let mut written = 0u64;
        let mut msg = Some(first);
        loop {
            if let Some(m) = msg.take() {
                if !m.data.is_empty() {
                    p.write_input(&m.data).map_err(process_status)?;
                    written += m.data.len() as u64;
                }
                if m.close {
                    p.close_input().map_err(process_status)?;
                }
            }
            match s.recv::<pb::SendInputRequest>()? {
                Some(m) => msg = Some(m),
                None => break,
            }
        }
        Ok(pb::SendInputResponse {
            bytes_written: written,
        })
    }

    fn list_processes(&self) -> pb::ListProcessesResponse {
        let processes = self
            .table
            .list()
            .into_iter()
            .filter_map(|i| {
                let p = self.table.get(i.pid)?;
                if p.finished().is_some() {
                    return None;
                }
                let lossy = |s: &OsString| s.to_string_lossy().into_owned();
                Some(pb::ProcessInfo {
                    pid: i.pid as u32,
                    tag: i.tag.clone().unwrap_or_default(),
                    config: Some(pb::ProcessConfig {
                        cmd: lossy(&i.cmd),
                        args: i.args.iter().map(lossy).collect(),
                        env: i
                            .caller_env
                            .iter()
                            .map(|(k, v)| (lossy(k), lossy(v)))
                            .collect::<HashMap<_, _>>(),
                        cwd: i
                            .cwd
                            .as_ref()
                            .map(|c| c.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        user: i.user.clone(),
                        stdin: i.stdin,
                        pty: i.pty_size.map(|s| pb::PtySize {
                            rows: s.rows as u32,
                            cols: s.cols as u32,
                        }),
                        tag: i.tag.clone().unwrap_or_default(),
                        timeout_ms: i.timeout.map_or(0, |t| t.as_millis() as u64),
                    }),
                    started_unix_ns: i.started_unix_ns,
                    stdin_open: p.stdin_open(),
                })
            })
            .collect();
        pb::ListProcessesResponse { processes }
    }

    // ---- filesystem ---------------------------------------------------------------------

    fn fs_stat(&self, r: pb::StatRequest) -> Result<pb::StatResponse, Status> {
        let user = self.user(&r.user)?;
        let path = self.path(&r.path, &user)?;
        let e = fs::stat(&user, &path, r.follow_symlinks).map_err(fs_status)?;
        Ok(pb::StatResponse {
            entry: Some(self.entry_info(&e, &self.db())),
        })
    }

    fn fs_list(&self, r: pb::ListDirRequest, s: &mut ServerStream) -> Result<(), Status> {
        let user = self.user(&r.user)?;
        let path = self.path(&r.path, &user)?;
        let depth = r.depth.clamp(1, LIST_DEPTH_MAX);
        let entries = fs::list(&user, &path, depth).map_err(fs_status)?;
        let db = self.db();
        let mut batch = pb::ListDirResponse::default();
        let mut batch_len = 0usize;
        for e in &entries {
            let item = match &e.error {
                Some(err) => pb::ListEntry {
                    entry: None,
                    path: e.path.to_string_lossy().into_owned(),
                    error: err.clone(),
                },
                None => pb::ListEntry {
                    entry: Some(self.entry_info(e, &db)),
                    path: e.path.to_string_lossy().into_owned(),
                    error: String::new(),
                },
            };
            batch_len += item.encoded_len() + 4;
            batch.entries.push(item);
            if batch_len >= LIST_BATCH_BYTES_MAX {
                s.send(&batch)?;
                batch.entries.clear();
                batch_len = 0;
            }
        }
        if !batch.entries.is_empty() || entries.is_empty() {
            s.send(&batch)?;
        }
        Ok(())
    }

    fn fs_make_dir(&self, r: pb::MakeDirRequest) -> Result<pb::MakeDirResponse, Status> {
        let user = self.user(&r.user)?;
        let path = self.path(&r.path, &user)?;
        let created = fs::mkdir_all(&user, &path, r.mode.unwrap_or(0o755)).map_err(fs_status)?;
        let e = fs::stat(&user, &path, false).map_err(fs_status)?;
        Ok(pb::MakeDirResponse {
            entry: Some(self.entry_info(&e, &self.db())),
            created,
        })
    }

    fn fs_move(&self, r: pb::MoveRequest) -> Result<pb::MoveResponse, Status> {
        let user = self.user(&r.user)?;
        let from = self.path(&r.source, &user)?;
        let to = self.path(&r.destination, &user)?;
        fs::rename(&user, &from, &to, r.overwrite).map_err(fs_status)?;
        let e = fs::stat(&user, &to, false).map_err(fs_status)?;
        Ok(pb::MoveResponse {
            entry: Some(self.entry_info(&e, &self.db())),
        })
    }

    fn fs_remove(&self, r: pb::RemoveRequest) -> Result<pb::RemoveResponse, Status> {
        let user = self.user(&r.user)?;
        let path = self.path(&r.path, &user)?;
        match fs::remove(&user, &path, r.recursive) {
            Ok(()) => Ok(pb::RemoveResponse {}),
            Err(e) if e.kind == ErrorKind::NotFound && r.ignore_missing => {
                Ok(pb::RemoveResponse {})
            }
            Err(e) => Err(fs_status(e)),
        }
    }

    fn fs_read(&self, r: pb::ReadRequest, s: &mut ServerStream) -> Result<(), Status> {
        let user = self.user(&r.user)?;
        let path = self.path(&r.path, &user)?;
        let length = if r.length == 0 { None } else { Some(r.length) };
        let mut reader = fs::open_read(&user, &path, r.offset, length).map_err(fs_status)?;
        let e = fs::stat(&user, &path, true).map_err(fs_status)?;
        let mut msg = pb::ReadResponse {
            entry: Some(self.entry_info(&e, &self.db())),
            data: Bytes::new(),
            offset: r.offset,
            crc32: None,
        };
        let mut offset = r.offset;
        let mut buffers = ReadBuffers::default();
        let mut crc = crc32fast::Hasher::new();
        loop {
            let mut buf = buffers.take();
            let n = reader.read_chunk(&mut buf).map_err(fs_status)?;
            let buf = buf.freeze();
            msg.offset = offset;
            let first = msg.entry.is_some();
            if n > 0 || first {
                crc.update(&buf[..n]);
                // The data goes out as the payload of field 2 (`data`), written to the
                // socket from this buffer: no encode copy.
                s.send_payload(&msg, 2, buf.slice(..n))?;
            }
            buffers.give_back(buf);
            msg.entry = None;
            offset += n as u64;
            if n == 0 {
                // The end-to-end checksum of every byte sent, in a message of its own.
                let last = pb::ReadResponse {
                    entry: None,
                    data: Bytes::new(),
                    offset,
                    crc32: Some(crc.finalize()),
                };
                return s.send(&last);
            }
        }
    }

    fn fs_write(
        &self,
        first: pb::WriteRequest,
        s: &mut ServerStream,
    ) -> Result<pb::WriteResponse, Status> {
        use pb::write_request::Msg;
        let h = match first.msg {
            Some(Msg::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a header",
                ))
            }
        };
        let user = self.user(&h.user)?;
        let path = self.path(&h.path, &user)?;
        let owner = match (h.uid, h.gid) {
            (None, None) => None,
            (u, g) => Some((u.unwrap_or(user.uid), g.unwrap_or(user.gid))),
        };
        enum Sink {
            Atomic(fs::AtomicWriter),
            InPlace(std::fs::File),
        }
        let mut sink = if h.atomic {
            if h.offset != 0 {
                return Err(Status::invalid_argument(
                    "an atomic write must start at offset 0",
                ));
            }
            let opts = fs::WriteOptions {
                mode: h.mode,
                owner,
                make_parents: h.make_parents,
                exclusive: h.exclusive,
            };
            Sink::Atomic(fs::AtomicWriter::create(&user, &path, opts).map_err(fs_status)?)
        } else {
            let opts = fs::InPlace {
                offset: h.offset,
                truncate: h.truncate,
                mode: h.mode,
                owner,
                make_parents: h.make_parents,
                exclusive: h.exclusive,
            };
            Sink::InPlace(fs::open_write(&user, &path, opts).map_err(fs_status)?)
        };
        let mut written = 0u64;
        let mut received = crc32fast::Hasher::new();
        let mut expected: Option<u32> = None;
        while let Some(m) = s.recv::<pb::WriteRequest>()? {
            if expected.is_some() {
                return Err(Status::invalid_argument(
                    "a message after the checksum (crc32 must be the last message)",
                ));
            }
            let data = match m.msg {
                Some(Msg::Data(d)) => d,
                Some(Msg::Crc32(c)) => {
                    expected = Some(c);
                    continue;
                }
                Some(Msg::Header(_)) => {
                    return Err(Status::invalid_argument("a second header"));
                }
                None => continue,
            };
            received.update(&data);
            match &mut sink {
                Sink::Atomic(w) => w.write(&data).map_err(fs_status)?,
                Sink::InPlace(f) => f
                    .write_all(&data)
                    .map_err(|e| fs_status(fs::Error::from_io("write", &path, e)))?,
            }
            written += data.len() as u64;
        }
        if let Some(want) = expected {
            let got = received.finalize();
            if got != want {
                warn!(
                    "write checksum mismatch path={} bytes={written} received={got:08x} sent={want:08x}",
                    path.display()
                );
                let outcome = match sink {
                    Sink::Atomic(_) => "nothing was written",
                    Sink::InPlace(_) => "the bytes are written (not an atomic write)",
                };
                return Err(Status::new(
                    Code::DataLoss,
                    format!(
                        "write {}: checksum mismatch: the {written} bytes received have \
                         CRC-32 {got:08x}, the sender's is {want:08x}; {outcome}",
                        path.display()
                    ),
                ));
            }
            if let Sink::Atomic(w) = &sink {
                let mut buf = vec![0u8; OUTPUT_CHUNK_LEN];
                let stored = w.stored_crc32(&mut buf).map_err(fs_status)?;
                if stored != want {
                    warn!(
                        "write read-back mismatch path={} bytes={written} stored={stored:08x} sent={want:08x}",
                        path.display()
                    );
                    return Err(Status::new(
                        Code::DataLoss,
                        format!(
                            "write {}: the {written} bytes read back from the temporary \
                             file have CRC-32 {stored:08x}, the bytes received {want:08x}: \
                             they changed on the way to the file; nothing was written",
                            path.display()
                        ),
                    ));
                }
            }
        }
        match sink {
            Sink::Atomic(w) => {
                w.commit().map_err(fs_status)?;
            }
            Sink::InPlace(f) => f
                .sync_data()
                .map_err(|e| fs_status(fs::Error::from_io("fsync", &path, e)))?,
        }
        let e = fs::stat(&user, &path, false).map_err(fs_status)?;
        Ok(pb::WriteResponse {
            entry: Some(self.entry_info(&e, &self.db())),
            bytes_written: written,
        })
    }

    fn fs_watch(&self, r: pb::WatchRequest, s: &mut ServerStream) -> Result<(), Status> {
        let user = self.user(&r.user)?;
        let path = self.path(&r.path, &user)?;
        let mut w = Watch::new(&user, &path, r.recursive).map_err(fs_status)?;
        s.send(&pb::WatchResponse {
            msg: Some(pb::watch_response::Msg::Started(pb::WatchStarted {})),
        })?;
        loop {
            if s.is_cancelled() {
                return Err(Status::cancelled("watch cancelled"));
            }
            let evs = w.read(POLL_SLICE).map_err(fs_status)?;
            if evs.is_empty() {
                continue;
            }
            let events = evs
                .into_iter()
                .map(|e| pb::FsEvent {
                    kind: match e.kind {
                        EventKind::Create => pb::FsEventKind::Create,
                        EventKind::Write => pb::FsEventKind::Write,
                        EventKind::CloseWrite => pb::FsEventKind::CloseWrite,
                        EventKind::Remove => pb::FsEventKind::Remove,
                        EventKind::RenameFrom => pb::FsEventKind::RenameFrom,
                        EventKind::RenameTo => pb::FsEventKind::RenameTo,
                        EventKind::Chmod => pb::FsEventKind::Chmod,
                        EventKind::Overflow => pb::FsEventKind::Overflow,
                    } as i32,
                    path: e.path.to_string_lossy().into_owned(),
                    is_dir: e.is_dir,
                    cookie: e.cookie,
                })
                .collect();
            s.send(&pb::WatchResponse {
                msg: Some(pb::watch_response::Msg::Events(pb::FsEventBatch { events })),
            })?;
        }
    }

    // ---- init ---------------------------------------------------------------------------

    fn init_envd(&self, peer: &Peer, r: pb::InitRequest) -> Result<pb::InitResponse, Status> {
        let gen = peer_generation(peer);
        if !r.default_user.is_empty() {
            let db = self
                .accounts
                .load(&self.cfg.root)
                .map_err(|e| Status::internal(e.to_string()))?;
            db.user(&r.default_user)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        if !r.default_cwd.is_empty() && !r.default_cwd.starts_with('/') {
            return Err(Status::invalid_argument("default_cwd must be absolute"));
        }
        for k in r.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(Status::invalid_argument(format!(
                    "environment variable {k:?}"
                )));
            }
        }
        let (new_gen, rotated) = {
            let mut st = self.state();
            if st.initialized && gen != st.generation {
                return Err(Status::unauthenticated(
                    "envd is initialized: a new Init needs a connection with the current token",
                ));
            }
            if !st.initialized && r.access_token.is_empty() {
                return Err(Status::invalid_argument(
                    "the first Init must set an access token",
                ));
            }
            let rotated = !r.access_token.is_empty()
                && st
                    .token
                    .as_deref()
                    .is_none_or(|t| !ct_eq(t.as_bytes(), r.access_token.as_bytes()));
            if rotated {
                st.token = Some(r.access_token.clone());
                st.generation += 1;
            }
            st.initialized = true;
            if !r.sandbox_id.is_empty() {
                st.sandbox_id = r.sandbox_id.clone();
            }
            if !r.template_id.is_empty() {
                st.template_id = r.template_id.clone();
            }
            let mut env: Vec<(String, String)> = r.env.into_iter().collect();
            env.sort();
            st.env = env;
            st.default_user = r.default_user.clone();
            st.default_cwd = r.default_cwd.clone();
            (st.generation, rotated)
        };
        if let Some(p) = peer.downcast_ref::<PeerInfo>() {
            p.generation.store(new_gen, Ordering::SeqCst);
        }
        if rotated && new_gen > 1 {
            if let Some(h) = self.handle.get() {
                h.close_connections(move |p| {
                    let g = peer_generation(p);
                    g != 0 && g < new_gen
                });
            }
        }
        if self.cfg.set_hostname && !r.sandbox_id.is_empty() {
            if let Err(e) = crate::init::set_hostname(&r.sandbox_id) {
                warn!("set hostname failed error={e}");
            }
        }
        let synced = self.clock.sync(r.wall_time_unix_ns);
        info!(
            "initialized sandbox_id={} generation={new_gen} rotated={rotated}",
            r.sandbox_id
        );
        Ok(pb::InitResponse {
            envd_version: VERSION.into(),
            clock_offset_ns: synced.offset_ns,
            clock_source: clock_source(&synced) as i32,
        })
    }

    fn resumed_at(self: &Arc<Self>, r: pb::ResumedRequest) -> pb::ResumedResponse {
        let synced = self.clock.sync(r.host_wall_time_unix_ns);
        self.announce(true);
        pb::ResumedResponse {
            clock_offset_ns: synced.offset_ns,
            clock_source: clock_source(&synced) as i32,
        }
    }

    fn health(&self) -> pb::HealthCheckResponse {
        let st = self.state();
        pb::HealthCheckResponse {
            envd_version: VERSION.into(),
            initialized: st.initialized,
            sandbox_id: st.sandbox_id.clone(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    fn metrics(&self) -> pb::GetMetricsResponse {
        let mut m = crate::metrics::sample();
        m.api_process_count = self
            .table
            .list()
            .iter()
            .filter(|i| {
                self.table
                    .get(i.pid)
                    .is_some_and(|p| p.finished().is_none())
            })
            .count() as u32;
        let c = self.clock.last();
        m.clock_offset_ns = c.offset_ns;
        m.clock_source = clock_source(&c) as i32;
        m.clock_synced_unix_ns = c.at_unix_ns;
        m
    }
}

/// Attempts of the readiness announce before giving up (about 30 s with the backoff).
const ANNOUNCE_ATTEMPTS: u32 = 20;

fn clock_source(s: &Synced) -> pb::ClockSource {
    match s.source {
        Source::None => pb::ClockSource::None,
        Source::Ptp => pb::ClockSource::Ptp,
        Source::HostWallTime => pb::ClockSource::HostWallTime,
    }
}

fn peer_generation(peer: &Peer) -> u64 {
    peer.downcast_ref::<PeerInfo>()
        .map_or(0, |p| p.generation.load(Ordering::SeqCst))
}

/// Constant-time equality of two secrets (the length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    proto::sha256::constant_time_eq(a, b)
}

fn winsize(p: pb::PtySize) -> Result<crate::pty::WinSize, Status> {
    if p.rows == 0 || p.cols == 0 || p.rows > u16::MAX as u32 || p.cols > u16::MAX as u32 {
        return Err(Status::invalid_argument(format!(
            "pty size {}x{}",
            p.rows, p.cols
        )));
    }
    Ok(crate::pty::WinSize {
        rows: p.rows as u16,
        cols: p.cols as u16,
    })
}

/// Streams a process's events to a client until the process ends or the client leaves
/// (which detaches; the process keeps running).
fn stream_process(
    s: &mut ServerStream,
    p: &Arc<process::Process>,
    mut sub: process::Subscription,
) -> Result<(), Status> {
    let info = p.info();
    let started = pb::ProcessEvent {
        event: Some(pb::process_event::Event::Started(pb::ProcessStarted {
            pid: info.pid as u32,
            tag: info.tag.clone().unwrap_or_default(),
            started_unix_ns: info.started_unix_ns,
        })),
    };
    s.send(&started)?;
    loop {
        match sub.next(POLL_SLICE) {
            Next::Output(c) => {
                let ev = pb::ProcessEvent {
                    event: Some(pb::process_event::Event::Output(pb::ProcessOutput {
                        stream: match c.kind {
                            StreamKind::Stdout => pb::OutputStream::Stdout,
                            StreamKind::Stderr => pb::OutputStream::Stderr,
                            StreamKind::Pty => pb::OutputStream::Pty,
                        } as i32,
                        data: c.data,
                        offset: c.offset,
                    })),
                };
                s.send(&ev)?;
            }
            Next::Finished(f) => {
                use crate::reaper::ExitStatus;
                use pb::process_exited::Status as St;
                let (status, core_dumped) = match f.status {
                    ExitStatus::Code(c) => (St::ExitCode(c), false),
                    ExitStatus::Signal(sig) => (St::Signal(sig), false),
                    ExitStatus::Dumped(sig) => (St::Signal(sig), true),
                };
                let ev = pb::ProcessEvent {
                    event: Some(pb::process_event::Event::Exited(pb::ProcessExited {
                        timed_out: f.timed_out,
                        core_dumped,
                        exited_unix_ns: f.exited_unix_ns,
                        status: Some(status),
                    })),
                };
                return s.send(&ev);
            }
            Next::Pending => {
                if s.is_cancelled() {
                    return Err(Status::cancelled("detached"));
                }
            }
        }
    }
}

/// Maps a file-operation error to the API's status code.
pub fn fs_status(e: fs::Error) -> Status {
    let code = match e.kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::NotADirectory | ErrorKind::IsADirectory | ErrorKind::DirectoryNotEmpty => {
            Code::FailedPrecondition
        }
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NoSpace | ErrorKind::TooMany => Code::ResourceExhausted,
        ErrorKind::Other => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// Maps a process error to the API's status code.
pub fn process_status(e: process::Error) -> Status {
    use process::Error as E;
    let code = match &e {
        E::InvalidArgument(_) => Code::InvalidArgument,
        E::TooManyProcesses | E::TooManySubscribers => Code::ResourceExhausted,
        E::TagInUse(_) => Code::AlreadyExists,
        E::Spawn { source, .. } => match source.raw_os_error() {
            Some(libc::ENOENT) => Code::NotFound,
            Some(libc::EACCES) | Some(libc::EPERM) => Code::PermissionDenied,
            Some(libc::ENOTDIR) | Some(libc::ENOEXEC) => Code::InvalidArgument,
            _ => Code::Internal,
        },
        E::NotFound => Code::NotFound,
        E::NoStdin | E::NotAPty => Code::FailedPrecondition,
        // The reading end is gone: the process exited or closed its stdin.
        E::Io { source, .. } if source.raw_os_error() == Some(libc::EPIPE) => {
            Code::FailedPrecondition
        }
        E::Io { .. } => Code::Internal,
    };
    let msg = match &e {
        E::Io { source, .. } => format!("{e}: {source}"),
        _ => e.to_string(),
    };
    Status::new(code, msg)
}

/// The [`Service`] the runtime drives.
pub struct EnvdService(pub Arc<Envd>);

impl Service for EnvdService {
    fn hello(&self, hello: &Hello) -> Result<Peer, Status> {
        let st = self.0.state();
        let generation = match &st.token {
            None => 0,
            Some(token) => {
                let kind_ok = hello.credential_kind == CredentialKind::AccessToken as i32;
                // Compare even when the kind is wrong, so the time does not tell which.
                let token_ok = ct_eq(token.as_bytes(), hello.credential.as_bytes());
                if !(kind_ok && token_ok) {
                    return Err(Status::unauthenticated("wrong or missing access token"));
                }
                st.generation
            }
        };
        Ok(Arc::new(PeerInfo {
            generation: AtomicU64::new(generation),
        }))
    }

    fn call(&self, call: Call) {
        if let Err(e) = self.0.authorize(call.peer(), call.method()) {
            return call.fail(e);
        }
        // Cheap answers that never block stay on the event loop.
        match call.method() {
            pb::health_methods::CHECK => return call.reply(&self.0.health()),
            pb::process_methods::LIST => return call.reply(&self.0.list_processes()),
            _ => {}
        }
        let envd = EnvdService(self.0.clone());
        call.spawn(move |s| {
            let envd = &envd;
            // Not dispatch_package: Announce is the agent's side (envd calls it).
            let _ = pb::dispatch_process(envd, s)
                .or_else(|s| pb::dispatch_filesystem(envd, s))
                .or_else(|s| pb::dispatch_init(envd, s))
                .or_else(|s| pb::dispatch_metrics(envd, s))
                .or_else(|s| pb::dispatch_health(envd, s))
                .unwrap_or_else(proto::rpc::serve::unknown);
        });
    }
}

// ---- the generated service traits, each method a thin adaptor over Envd's own (on the
// service wrapper, since a resume re-announces from an `Arc<Envd>`) --------------

impl pb::ProcessServer for EnvdService {
    fn start(
        &self,
        _: &CallCtx,
        req: pb::StartRequest,
        s: &mut ServerStream,
    ) -> Result<(), Status> {
        let cfg = req
            .process
            .ok_or_else(|| Status::invalid_argument("no process config"))?;
        let spec = self.0.spec(cfg)?;
        let (p, sub) = self.0.table.start(spec).map_err(process_status)?;
        stream_process(s, &p, sub)
    }

    fn connect(
        &self,
        _: &CallCtx,
        req: pb::ConnectRequest,
        s: &mut ServerStream,
    ) -> Result<(), Status> {
        let p = self.0.find(req.process)?;
        let sub = if req.skip_replay {
            p.subscribe_live()
        } else {
            p.subscribe()
        }
        .map_err(process_status)?;
        stream_process(s, &p, sub)
    }

    fn send_input(
        &self,
        _: &CallCtx,
        first: pb::SendInputRequest,
        s: &mut ServerStream,
    ) -> Result<pb::SendInputResponse, Status> {
        self.0.send_input_stream(first, s)
    }

    fn close_stdin(
        &self,
        _: &CallCtx,
        r: pb::CloseStdinRequest,
    ) -> Result<pb::CloseStdinResponse, Status> {
        let p = self.0.find(r.process)?;
        match p.close_input() {
            Ok(()) => Ok(pb::CloseStdinResponse {}),
            // Idempotent: a stdin that was open once may be closed again.
            Err(process::Error::NoStdin) if p.info().stdin => Ok(pb::CloseStdinResponse {}),
            Err(e) => Err(process_status(e)),
        }
    }

    fn signal(&self, _: &CallCtx, r: pb::SignalRequest) -> Result<pb::SignalResponse, Status> {
        if r.signal == 0 {
            return Err(Status::invalid_argument("no signal"));
        }
        let p = self.0.find(r.process)?;
        p.signal_to(r.signal, r.group).map_err(process_status)?;
        Ok(pb::SignalResponse {})
    }

    fn resize_pty(
        &self,
        _: &CallCtx,
        r: pb::ResizePtyRequest,
    ) -> Result<pb::ResizePtyResponse, Status> {
        let p = self.0.find(r.process)?;
        let size = r
            .size
            .ok_or_else(|| Status::invalid_argument("no size"))
            .and_then(winsize)?;
        p.resize(size).map_err(process_status)?;
        Ok(pb::ResizePtyResponse {})
    }

    fn list(
        &self,
        _: &CallCtx,
        _: pb::ListProcessesRequest,
    ) -> Result<pb::ListProcessesResponse, Status> {
        Ok(self.0.list_processes())
    }
}

impl pb::FilesystemServer for EnvdService {
    fn stat(&self, _: &CallCtx, r: pb::StatRequest) -> Result<pb::StatResponse, Status> {
        self.0.fs_stat(r)
    }

    fn list(&self, _: &CallCtx, r: pb::ListDirRequest, s: &mut ServerStream) -> Result<(), Status> {
        self.0.fs_list(r, s)
    }

    fn make_dir(&self, _: &CallCtx, r: pb::MakeDirRequest) -> Result<pb::MakeDirResponse, Status> {
        self.0.fs_make_dir(r)
    }

    fn r#move(&self, _: &CallCtx, r: pb::MoveRequest) -> Result<pb::MoveResponse, Status> {
        self.0.fs_move(r)
    }

    fn remove(&self, _: &CallCtx, r: pb::RemoveRequest) -> Result<pb::RemoveResponse, Status> {
        self.0.fs_remove(r)
    }

    fn read(&self, _: &CallCtx, r: pb::ReadRequest, s: &mut ServerStream) -> Result<(), Status> {
        self.0.fs_read(r, s)
    }

    fn write(
        &self,
        _: &CallCtx,
        first: pb::WriteRequest,
        s: &mut ServerStream,
    ) -> Result<pb::WriteResponse, Status> {
        self.0.fs_write(first, s)
    }

    fn watch(&self, _: &CallCtx, r: pb::WatchRequest, s: &mut ServerStream) -> Result<(), Status> {
        self.0.fs_watch(r, s)
    }
}

impl pb::InitServer for EnvdService {
    fn init(&self, ctx: &CallCtx, r: pb::InitRequest) -> Result<pb::InitResponse, Status> {
        self.0.init_envd(&ctx.peer, r)
    }

    fn resumed(&self, _: &CallCtx, r: pb::ResumedRequest) -> Result<pb::ResumedResponse, Status> {
        Ok(self.0.resumed_at(r))
    }
}

impl pb::MetricsServer for EnvdService {
    fn get(&self, _: &CallCtx, _: pb::GetMetricsRequest) -> Result<pb::GetMetricsResponse, Status> {
        Ok(self.0.metrics())
    }
}

impl pb::HealthServer for EnvdService {
    fn check(
        &self,
        _: &CallCtx,
        _: pb::HealthCheckRequest,
    ) -> Result<pb::HealthCheckResponse, Status> {
        Ok(self.0.health())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffers_are_reused_once_written_and_never_while_held() {
        let mut rb = ReadBuffers::default();
        let mut a = rb.take();
        assert_eq!(a.len(), OUTPUT_CHUNK_LEN);
        a[0] = 7;
        let a = a.freeze();
        let a_ptr = a.as_ptr();
        let in_flight = a.slice(..10);
        rb.give_back(a);
        // Still held by the connection: a new buffer.
        let b = rb.take();
        assert_ne!(b.as_ptr(), a_ptr);
        drop(in_flight);
        // Written: the same memory again, whole, without a zero-fill.
        let again = rb.take();
        assert_eq!(again.as_ptr(), a_ptr);
        assert_eq!((again.len(), again[0]), (OUTPUT_CHUNK_LEN, 7));
        // The kept list is bounded, however many are in flight.
        let mut held = Vec::new();
        for _ in 0..READ_BUFFERS_KEPT + 5 {
            let x = rb.take().freeze();
            held.push(x.clone());
            rb.give_back(x);
        }
        assert_eq!(rb.kept.len(), READ_BUFFERS_KEPT);
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret2"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn status_mapping() {
        let e = fs::check_path(b"rel").unwrap_err();
        assert_eq!(fs_status(e).code, Code::InvalidArgument);
        let e = process::Error::Spawn {
            cmd: "x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(process_status(e).code, Code::NotFound);
        assert_eq!(
            process_status(process::Error::NoStdin).code,
            Code::FailedPrecondition
        );
    }
}
