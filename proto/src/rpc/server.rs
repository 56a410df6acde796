//! The server: one mio event loop that accepts, reads, and dispatches; handlers answer at
//! once on the loop (cheap calls) or move to a bounded worker pool (anything that blocks).
//!
//! ```text
//!  accept ─> hello (read 1 frame) ─> Service::hello on a worker ─> HELLO_ACK ─> open
//!  open: readable ─> frames ─> REQUEST ─> Service::call(Call) on the loop thread
//!                                 └─> call.reply(..) inline, or call.spawn(|stream| ..)
//! ```
//! Tokens: listeners `0..LISTENERS_MAX`, the waker, then connections from `CONN_BASE`.

use std::any::Any;
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events as MioEvents, Interest, Poll, Token, Waker};
use prost::bytes::Bytes;
use prost::Message;

use super::admission::{AcceptVerdict, Admission, Budgets, CredentialId, Refusal, Source};
use super::conn::{Conn, Events, Limits, RecvBuf, Side};
use super::transport::{SocketTransport, Transport};
use crate::frame::{self, Decoded, Kind};
use crate::gen::wrenn::wire::v1::{Hello, HelloAck};
use crate::limits::WORKER_IDLE;
use crate::pool::Pool;

use crate::gen::wrenn::wire::v1::CredentialKind;
use crate::limits::{
    ACCEPT_BURST_PER_SOURCE_DEFAULT, ACCEPT_RATE_PER_SOURCE_DEFAULT, CONNECTIONS_MAX_DEFAULT,
    CONNECTIONS_PER_CREDENTIAL_DEFAULT, CONN_WINDOW_DEFAULT, DRAIN_TIMEOUT, FRAME_LEN_MAX_DEFAULT,
    FRAME_LEN_MAX_FLOOR, HELLO_TIMEOUT, IDLE_TIMEOUT, PRE_HELLO_MAX_DEFAULT,
    PRE_HELLO_PER_SOURCE_MAX_DEFAULT, RESERVED_CONNECTIONS_DEFAULT, STREAMS_PER_CONN_MAX,
    STREAM_WINDOW_DEFAULT, WORKERS_MAX_DEFAULT,
};
use crate::status::{Code, Status};

/// What a service attaches to an authenticated connection (the principal its
/// [`Service::hello`] decided); every call on it sees it.
pub type Peer = Arc<dyn Any + Send + Sync>;

/// What the server knows about the connection a call came on: the principal the hello
/// decided, where the peer is, and the certificate it presented. Every call carries one;
/// the generated `<Service>Server` traits receive it with each request, so a handler sees
/// who is calling without a channel of its own.
#[derive(Clone)]
pub struct CallCtx {
    /// What [`Service::hello`] returned for the connection.
    pub peer: Peer,
    /// The peer's address as budgets count it (an IPv6 address is its /64); `Local` for a
    /// Unix or vsock peer, and for calls made without a socket of this server (ctl's HTTP
    /// gateway).
    pub source: Source,
    /// The end-entity certificate (DER) the client presented during a TLS handshake that
    /// verified it; None on plain transports or without a client certificate.
    pub client_cert: Option<Bytes>,
}

impl CallCtx {
    /// A context for calls that come from elsewhere than a connection of this server (the
    /// HTTP gateway, tests): a principal and a source, no certificate.
    pub fn new(peer: Peer, source: Source) -> CallCtx {
        CallCtx {
            peer,
            source,
            client_cert: None,
        }
    }
}

impl std::fmt::Debug for CallCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallCtx")
            .field("source", &self.source)
            .field("client_cert", &self.client_cert.as_ref().map(|c| c.len()))
            .finish_non_exhaustive()
    }
}

/// A service: authenticates connections and answers calls.
pub trait Service: Send + Sync + 'static {
    /// Checks a connection's hello (runs on a worker thread: it may query a database).
    fn hello(&self, hello: &Hello) -> Result<Peer, Status>;
    /// [`Service::hello`] with what the transport knows of the peer (its verified client
    /// certificate). The default ignores it; a service authenticating peers by
    /// certificate (ctl's host port) overrides this one instead.
    fn hello_from(&self, hello: &Hello, from: &HelloFrom) -> Result<Peer, Status> {
        let _ = from;
        self.hello(hello)
    }
    /// A new call, on the event-loop thread. It must not block: answer with
    /// [`Call::reply`]/[`Call::fail`] or move the call to a worker with [`Call::spawn`].
    fn call(&self, call: Call);
    /// The credential an accepted hello presented, for the per-credential connection
    /// budget: its class (kind) and identity. The default is the HELLO's kind and a keyed
    /// hash of its secret; a service may name a stabler identity (a key id).
    fn credential(&self, hello: &Hello, _peer: &Peer) -> CredentialId {
        CredentialId::from_hello(hello)
    }
}

/// What the transport knows of a connection's peer when its hello arrives.
#[derive(Clone, Debug, Default)]
pub struct HelloFrom {
    /// Where the connection comes from.
    pub source: Option<Source>,
    /// The peer's certificate as the handshake verified it (DER, end entity): present
    /// only on a TLS listener that asks for client certificates and got one.
    pub peer_certificate: Option<Bytes>,
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Name sent in HELLO_ACK and used for thread names.
    pub name: String,
    pub frame_len_max: u32,
    pub stream_window: u32,
    pub conn_window: u32,
    pub max_streams: u32,
    /// Authenticated connections held at once, reserved ones included.
    pub connections_max: usize,
    /// Connections before their hello (accept to HELLO_ACK) held at once; when full, the
    /// oldest is evicted for a newcomer.
    pub pre_hello_max: usize,
    /// Pre-hello connections one source address holds; its next evicts its own oldest.
    pub pre_hello_per_source_max: usize,
    /// New connections per second per source address, and the burst (token bucket).
    pub accept_rate_per_source: u32,
    pub accept_burst_per_source: u32,
    /// Authenticated connections one credential holds, by `CredentialKind` value.
    pub per_credential_max: [usize; super::admission::CREDENTIAL_KINDS],
    /// The credential kind that alone may use the last `reserved_connections` of
    /// `connections_max` (None: no reservation).
    pub reserved_kind: Option<CredentialKind>,
    pub reserved_connections: usize,
    /// A connection must finish its hello within this (PROTOCOL.md §2).
    pub hello_timeout: Duration,
    pub workers_max: usize,
    /// After [`ServerHandle::shutdown`], how long open calls get to finish.
    pub drain_timeout: Duration,
}

impl ServerConfig {
    /// Keeps `reserved_connections` of `connections_max` for `kind` alone.
    pub fn reserve_for(mut self, kind: CredentialKind) -> ServerConfig {
        self.reserved_kind = Some(kind);
        self
    }

    fn budgets(&self) -> Budgets {
        Budgets {
            pre_hello_max: self.pre_hello_max,
            pre_hello_per_source_max: self.pre_hello_per_source_max,
            accept_rate_per_source: self.accept_rate_per_source,
            accept_burst_per_source: self.accept_burst_per_source,
            connections_max: self.connections_max,
            per_credential_max: self.per_credential_max,
            reserved_kind: self.reserved_kind,
            reserved_connections: if self.reserved_kind.is_some() {
                self.reserved_connections.min(self.connections_max)
            } else {
                0
            },
        }
    }

    pub fn new(name: &str) -> ServerConfig {
        ServerConfig {
            name: name.to_owned(),
            frame_len_max: FRAME_LEN_MAX_DEFAULT,
            stream_window: STREAM_WINDOW_DEFAULT,
            conn_window: CONN_WINDOW_DEFAULT,
            max_streams: STREAMS_PER_CONN_MAX,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            pre_hello_max: PRE_HELLO_MAX_DEFAULT,
            pre_hello_per_source_max: PRE_HELLO_PER_SOURCE_MAX_DEFAULT,
            accept_rate_per_source: ACCEPT_RATE_PER_SOURCE_DEFAULT,
            accept_burst_per_source: ACCEPT_BURST_PER_SOURCE_DEFAULT,
            per_credential_max: [CONNECTIONS_PER_CREDENTIAL_DEFAULT;
                super::admission::CREDENTIAL_KINDS],
            reserved_kind: None,
            reserved_connections: RESERVED_CONNECTIONS_DEFAULT,
            hello_timeout: HELLO_TIMEOUT,
            workers_max: WORKERS_MAX_DEFAULT,
            drain_timeout: DRAIN_TIMEOUT,
        }
    }
}

const LISTENERS_MAX: usize = 8;
const WAKER: Token = Token(LISTENERS_MAX);
const CONN_BASE: usize = LISTENERS_MAX + 1;
/// Connections accepted per listener before the loop serves other ready connections.
const ACCEPT_BATCH: usize = 16;
/// Events taken from epoll per wait.
const EVENTS_CAPACITY: usize = 256;
/// The loop wakes at least this often to run timers (hello, keepalive, deadlines).
const TICK: Duration = Duration::from_millis(250);

enum Cmd {
    HelloDone {
        slot: usize,
        serial: u64,
        result: Result<(Peer, Hello), Status>,
    },
    CloseWhere(Box<dyn Fn(&Peer) -> bool + Send>),
    Shutdown,
}

struct Shared {
    waker: Waker,
    cmds: Mutex<VecDeque<Cmd>>,
}

impl Shared {
    fn send(&self, cmd: Cmd) {
        self.cmds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(cmd);
        // A failed wake leaves the command for the next tick.
        let _ = self.waker.wake();
    }
}

/// Controls a running server from other threads.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerHandle")
    }
}

impl ServerHandle {
    /// Graceful stop (PROTOCOL.md §5): the listeners close (no new connections), every
    /// connection gets GOAWAY (no new calls on it), connections that have not finished their
    /// hello are closed with `unavailable`, and each connection closes once its open calls
    /// finished; [`Server::run`] returns when none is left or after
    /// [`ServerConfig::drain_timeout`] (default [`DRAIN_TIMEOUT`]), closing the rest.
    pub fn shutdown(&self) {
        self.shared.send(Cmd::Shutdown);
    }

    /// Closes every connection whose peer matches (e.g. a revoked credential).
    pub fn close_connections(&self, pred: impl Fn(&Peer) -> bool + Send + 'static) {
        self.shared.send(Cmd::CloseWhere(Box::new(pred)));
    }
}

enum Phase {
    AwaitHello,
    Authenticating,
    Open,
}

/// Which budget an entry counts against until it is closed.
#[derive(Clone, Copy)]
enum Counted {
    PreHello,
    Credential(CredentialId),
    Nothing,
}

struct Entry {
    source: Source,
    counted: Counted,
    /// The socket until the hello is accepted; then it moves into `conn`.
    pre: Option<Box<dyn Transport>>,
    conn: Option<Arc<Conn>>,
    raw_fd: std::os::fd::RawFd,
    rbuf: RecvBuf,
    phase: Phase,
    ctx: Option<Arc<CallCtx>>,
    since: Instant,
    serial: u64,
}

impl Entry {
    fn io(&self) -> &dyn Transport {
        match (&self.pre, &self.conn) {
            (Some(s), _) => s.as_ref(),
            (None, Some(c)) => c.io.as_ref(),
            (None, None) => unreachable!("an entry always holds its socket"),
        }
    }
}

/// Turns an accepted socket into the transport a listener speaks (e.g. TLS over TCP).
pub type WrapTransport = Arc<dyn Fn(SocketTransport) -> Box<dyn Transport> + Send + Sync>;

/// The server. Build it, add listeners, then [`Server::run`] (or [`Server::spawn`]).
pub struct Server {
    cfg: ServerConfig,
    svc: Arc<dyn Service>,
    poll: Poll,
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    listeners: Vec<(OwnedFd, Option<WrapTransport>)>,
    conns: Vec<Option<Entry>>,
    free: Vec<usize>,
    serial: u64,
    draining: Option<Instant>,
    admission: Admission,
    /// Listeners that had more connections queued than one batch took.
    accept_pending: Vec<usize>,
}

impl Server {
    pub fn new(cfg: ServerConfig, svc: Arc<dyn Service>) -> io::Result<Server> {
        super::check_announced_limits(cfg.frame_len_max, cfg.stream_window, cfg.conn_window)
            .map_err(|s| io::Error::new(io::ErrorKind::InvalidInput, s.message))?;
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        if cfg.pre_hello_max == 0 || cfg.pre_hello_per_source_max == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "pre_hello_max and pre_hello_per_source_max must be positive",
            ));
        }
        // No queue: a call that finds every worker busy fails at once (resource_exhausted).
        let pool = Pool::new(&cfg.name, cfg.workers_max, 0, WORKER_IDLE);
        Ok(Server {
            admission: Admission::new(cfg.budgets()),
            accept_pending: Vec::new(),
            svc,
            poll,
            shared: Arc::new(Shared {
                waker,
                cmds: Mutex::new(VecDeque::new()),
            }),
            pool,
            listeners: Vec::new(),
            conns: Vec::new(),
            free: Vec::new(),
            serial: 0,
            draining: None,
            cfg,
        })
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
        }
    }

    /// Listens on a Unix socket path (a stale socket file there is replaced). The path
    /// appears only once the socket listens.
    pub fn listen_unix(&mut self, path: impl AsRef<Path>) -> io::Result<()> {
        let path = path.as_ref();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        // bind() makes the path appear before listen() runs, and a connect in between is
        // refused. Bind a temporary name and rename it into place once listening, so that
        // the path existing means the server accepts.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        // sun_path holds 108 bytes with the NUL; a path too long for the suffix binds directly.
        if tmp.as_os_str().len() > 107 {
            return self.listen_fd(UnixListener::bind(path)?.into());
        }
        let _ = std::fs::remove_file(&tmp);
        let l = UnixListener::bind(&tmp)?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.listen_fd(l.into())
    }

    /// Listens on TCP; returns the bound address (port 0 picks one).
    pub fn listen_tcp(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let l = TcpListener::bind(addr)?;
        let local = l.local_addr()?;
        self.listen_fd(l.into())?;
        Ok(local)
    }

    /// Listens on a TCP address and wraps each accepted socket (e.g. in TLS).
    pub fn listen_tcp_with(
        &mut self,
        addr: SocketAddr,
        wrap: WrapTransport,
    ) -> io::Result<SocketAddr> {
        let l = TcpListener::bind(addr)?;
        let local = l.local_addr()?;
        self.listen_fd_with(l.into(), wrap)?;
        Ok(local)
    }

    /// Serves an already listening stream socket of any family (vsock included).
    pub fn listen_fd(&mut self, fd: OwnedFd) -> io::Result<()> {
        self.listen_fd_inner(fd, None)
    }

    /// Like [`Server::listen_fd`], with each accepted socket wrapped in another transport
    /// (TLS would be one) before the hello; the wrapped transport's handshake counts as
    /// pre-hello time (budget and hello deadline start at accept).
    pub fn listen_fd_with(&mut self, fd: OwnedFd, wrap: WrapTransport) -> io::Result<()> {
        self.listen_fd_inner(fd, Some(wrap))
    }

    fn listen_fd_inner(&mut self, fd: OwnedFd, wrap: Option<WrapTransport>) -> io::Result<()> {
        if self.listeners.len() >= LISTENERS_MAX {
            return Err(io::Error::other("too many listeners"));
        }
        super::sys::set_nonblocking(fd.as_fd(), true)?;
        let token = Token(self.listeners.len());
        self.poll
            .registry()
            .register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        self.listeners.push((fd, wrap));
        Ok(())
    }

    /// Runs the loop on a new thread.
    pub fn spawn(self) -> io::Result<(ServerHandle, std::thread::JoinHandle<io::Result<()>>)> {
        let handle = self.handle();
        let name = format!("{}-loop", self.cfg.name);
        let join = std::thread::Builder::new()
            .name(name)
            .spawn(move || self.run())?;
        Ok((handle, join))
    }

    /// Runs the event loop until a graceful shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = MioEvents::with_capacity(EVENTS_CAPACITY);
        let mut last_tick = Instant::now();
        loop {
            // Listeners with connections still queued are served again after this round of
            // events, without waiting.
            let timeout = if self.accept_pending.is_empty() {
                TICK
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    Token(t) if t < LISTENERS_MAX => self.accept(t),
                    Token(t) => {
                        // A peer's close may arrive with its last bytes in one edge: then
                        // read to EOF instead of stopping at a short read.
                        let closing = ev.is_read_closed() || ev.is_error();
                        self.conn_event(
                            t - CONN_BASE,
                            ev.is_readable() || closing,
                            ev.is_writable(),
                            closing,
                        )
                    }
                }
            }
            for idx in std::mem::take(&mut self.accept_pending) {
                self.accept(idx);
            }
            self.run_commands();
            let now = Instant::now();
            if now.duration_since(last_tick) >= TICK {
                last_tick = now;
                self.timers(now);
            }
            if let Some(since) = self.draining {
                let open = self.conns.iter().flatten().count();
                if open == 0 || since.elapsed() >= self.cfg.drain_timeout {
                    for slot in 0..self.conns.len() {
                        self.close(slot, Status::unavailable("server stopped"));
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Accepts up to `ACCEPT_BATCH` connections; with more queued, the listener is served
    /// again after the other ready connections, so a connection flood cannot hold the loop
    /// away from established connections for long.
    fn accept(&mut self, idx: usize) {
        for n in 0.. {
            if self.draining.is_some() || idx >= self.listeners.len() {
                return;
            }
            if n == ACCEPT_BATCH {
                if !self.accept_pending.contains(&idx) {
                    self.accept_pending.push(idx);
                }
                return;
            }
            let (fd, peer) = match super::sys::accept(self.listeners[idx].0.as_fd()) {
                Ok(Some(a)) => a,
                Ok(None) => return,
                Err(e) => {
                    log::warn!("accept failed server={} error={e}", self.cfg.name);
                    return;
                }
            };
            let source = peer.source();
            let conns = &self.conns;
            let live = |slot: usize, serial: u64| {
                conns
                    .get(slot)
                    .and_then(|e| e.as_ref())
                    .is_some_and(|e| e.serial == serial && matches!(e.counted, Counted::PreHello))
            };
            match self.admission.on_accept(source, Instant::now(), live) {
                AcceptVerdict::Admit => {}
                AcceptVerdict::AdmitEvicting(slot, _) => {
                    Refusal::PreHelloEvicted.count();
                    let msg = self.admission.message(Refusal::PreHelloEvicted, None);
                    self.close_with_error(slot, Status::resource_exhausted(msg));
                }
                AcceptVerdict::Refuse(r) => {
                    r.count();
                    let msg = self.admission.message(r, None);
                    let mut out = Vec::new();
                    frame::put_error(&mut out, 0, Code::ResourceExhausted, &msg);
                    let _ = super::sys::send_nb(fd.as_fd(), &out);
                    continue;
                }
            }
            let sock = SocketTransport::accepted(fd, peer);
            let io: Box<dyn Transport> = match &self.listeners[idx].1 {
                Some(wrap) => wrap(sock),
                None => Box::new(sock),
            };
            let slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    self.conns.push(None);
                    self.conns.len() - 1
                }
            };
            let raw = io.fd().as_raw_fd();
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = self.poll.registry().register(
                &mut SourceFd(&raw),
                Token(CONN_BASE + slot),
                interest,
            ) {
                log::warn!("register failed error={e}");
                self.free.push(slot);
                continue;
            }
            self.serial += 1;
            self.admission.admitted(slot, self.serial, source);
            self.conns[slot] = Some(Entry {
                source,
                counted: Counted::PreHello,
                pre: Some(io),
                conn: None,
                raw_fd: raw,
                rbuf: RecvBuf::new(),
                phase: Phase::AwaitHello,
                ctx: None,
                since: Instant::now(),
                serial: self.serial,
            });
            // Bytes may already be there; edge-triggered readiness would not repeat it.
            self.conn_event(slot, true, false, false);
        }
    }

    fn conn_event(&mut self, slot: usize, readable: bool, writable: bool, closing: bool) {
        let Some(entry) = self.conns.get_mut(slot).and_then(|e| e.as_mut()) else {
            return;
        };
        if let (true, Some(conn)) = (writable, &entry.conn) {
            let mut st = conn.lock();
            conn.flush(&mut st);
        } else if let (true, Some(pre)) = (writable, &entry.pre) {
            // A transport's own bytes (TLS handshake records) move on writable readiness
            // before the hello too; a write error shows up on the next read.
            let _ = pre.flush();
        }
        if readable {
            loop {
                let Some(entry) = self.conns[slot].as_mut() else {
                    return;
                };
                let Entry {
                    pre, conn, rbuf, ..
                } = entry;
                let io: &dyn Transport = match (pre.as_ref(), conn.as_ref()) {
                    (Some(s), _) => s.as_ref(),
                    (None, Some(c)) => c.io.as_ref(),
                    (None, None) => return,
                };
                match rbuf.read_from(io, false) {
                    Ok((0, _)) => {
                        self.close(slot, Status::unavailable("connection closed by peer"));
                        return;
                    }
                    Ok((_, filled)) => {
                        if !self.process(slot) {
                            return;
                        }
                        // A short read drained the socket: edge-triggered readiness will
                        // report the next bytes.
                        if !filled && !closing {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.close(slot, Status::unavailable(format!("read failed: {e}")));
                        return;
                    }
                }
            }
        }
        if let Some(entry) = self.conns[slot].as_mut() {
            entry.rbuf.shrink();
        }
        self.reap(slot);
    }

    /// Processes buffered bytes of one connection. Returns false once it is closed.
    fn process(&mut self, slot: usize) -> bool {
        let Some(entry) = self.conns[slot].as_mut() else {
            return false;
        };
        match entry.phase {
            Phase::AwaitHello => self.read_hello(slot),
            Phase::Authenticating => {
                // Clients must wait for HELLO_ACK; a client that does not is broken.
                if !entry.rbuf.pending().is_empty() {
                    self.close_with_error(
                        slot,
                        Status::invalid_argument("protocol error: frame sent before HELLO_ACK"),
                    );
                    return false;
                }
                true
            }
            Phase::Open => {
                let conn = entry.conn.clone().expect("open connections have a Conn");
                let mut ev = Events::default();
                {
                    let mut st = conn.lock();
                    conn.process(&mut st, &mut entry.rbuf, &mut ev);
                }
                if ev.hello.is_some() {
                    self.close_with_error(
                        slot,
                        Status::invalid_argument("protocol error: second HELLO"),
                    );
                    return false;
                }
                let ctx = entry.ctx.clone().expect("open connections have a context");
                for c in ev.calls {
                    let call = Call {
                        conn: conn.clone(),
                        id: c.stream,
                        method: c.method,
                        message: c.message,
                        ctx: ctx.clone(),
                        pool: self.pool.clone(),
                        answered: false,
                    };
                    self.svc.call(call);
                }
                true
            }
        }
    }

    fn read_hello(&mut self, slot: usize) -> bool {
        let Some(entry) = self.conns[slot].as_mut() else {
            return false;
        };
        let hello = match frame::decode(entry.rbuf.pending(), FRAME_LEN_MAX_FLOOR) {
            Ok(Decoded::Incomplete { .. }) => return true,
            Ok(Decoded::Frame(f, n)) if f.kind == Kind::Hello => {
                let h = super::parse_hello(f.body);
                drop(entry.rbuf.take(n));
                h
            }
            Ok(_) => Err(Status::invalid_argument("protocol error: expected HELLO")),
            Err(e) => Err(frame_error_status(&e)),
        };
        let hello = match hello {
            Ok(h) => h,
            Err(status) => {
                self.close_with_error(slot, status);
                return false;
            }
        };
        let Some(entry) = self.conns[slot].as_mut() else {
            return false;
        };
        entry.phase = Phase::Authenticating;
        // A whole HELLO arrived: the peer speaks the protocol and now waits on us, so it
        // leaves the pre-hello budget (and can no longer be evicted). While the service
        // checks it, it holds a worker, bounded by `workers_max`.
        if let Counted::PreHello = entry.counted {
            entry.counted = Counted::Nothing;
            self.admission.pre_done(entry.source);
        }
        let serial = entry.serial;
        let from = HelloFrom {
            source: Some(entry.source),
            peer_certificate: entry.pre.as_ref().and_then(|t| t.peer_certificate()),
        };
        let svc = self.svc.clone();
        let shared = self.shared.clone();
        let job = Box::new(move || {
            let result = svc.hello_from(&hello, &from).map(|p| (p, hello));
            shared.send(Cmd::HelloDone {
                slot,
                serial,
                result,
            });
        });
        if self.pool.spawn(job).is_err() {
            self.close_with_error(slot, Status::resource_exhausted("server is too busy"));
            return false;
        }
        // Anything after the hello must wait for the answer.
        self.process(slot)
    }

    fn hello_done(&mut self, slot: usize, serial: u64, result: Result<(Peer, Hello), Status>) {
        let Some(entry) = self.conns.get_mut(slot).and_then(|e| e.as_mut()) else {
            return;
        };
        if entry.serial != serial || !matches!(entry.phase, Phase::Authenticating) {
            return;
        }
        let (peer, hello) = match result {
            Ok(r) => r,
            Err(status) => {
                self.close_with_error(slot, status);
                return;
            }
        };
        // Into its credential's budget.
        let cred = self.svc.credential(&hello, &peer);
        if let Err(r) = self.admission.on_authenticated(cred) {
            r.count();
            let msg = self.admission.message(r, Some(cred.kind));
            self.close_with_error(slot, Status::resource_exhausted(msg));
            return;
        }
        let Some(entry) = self.conns.get_mut(slot).and_then(|e| e.as_mut()) else {
            return;
        };
        entry.counted = Counted::Credential(cred);
        let limits = Limits {
            recv_frame_len_max: self.cfg.frame_len_max,
            recv_stream_window: self.cfg.stream_window,
            recv_conn_window: self.cfg.conn_window,
            send_frame_len_max: super::client::send_frame_limit(
                hello.frame_len_max,
                hello.stream_window,
            ),
            send_stream_window: super::client::negotiated_window(
                hello.stream_window,
                STREAM_WINDOW_DEFAULT,
            ),
            send_conn_window: super::client::negotiated_window(
                hello.conn_window,
                CONN_WINDOW_DEFAULT,
            ),
            max_streams: self.cfg.max_streams,
        };
        let Some(sock) = entry.pre.take() else { return };
        let ctx = Arc::new(CallCtx {
            peer,
            source: entry.source,
            client_cert: sock.peer_certificate(),
        });
        let conn = match Conn::new(sock, Side::Server, limits) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                log::warn!("socket setup failed error={e}");
                self.close(slot, Status::internal(format!("socket setup: {e}")));
                return;
            }
        };
        let ack = HelloAck {
            version: crate::PROTOCOL_VERSION,
            server: self.cfg.name.clone(),
            frame_len_max: self.cfg.frame_len_max,
            stream_window: self.cfg.stream_window,
            conn_window: self.cfg.conn_window,
            max_streams: self.cfg.max_streams,
        };
        {
            let mut st = conn.lock();
            conn.send_raw(&mut st, Kind::HelloAck, &ack.encode_to_vec());
        }
        entry.conn = Some(conn);
        entry.ctx = Some(ctx);
        entry.phase = Phase::Open;
        entry.since = Instant::now();
        self.reap(slot);
    }

    fn run_commands(&mut self) {
        loop {
            let cmd = self
                .shared
                .cmds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            let Some(cmd) = cmd else { return };
            match cmd {
                Cmd::HelloDone {
                    slot,
                    serial,
                    result,
                } => self.hello_done(slot, serial, result),
                Cmd::CloseWhere(pred) => {
                    for slot in 0..self.conns.len() {
                        let hit = self.conns[slot]
                            .as_ref()
                            .and_then(|e| e.ctx.as_ref())
                            .is_some_and(|c| pred(&c.peer));
                        if hit {
                            self.close_with_error(
                                slot,
                                Status::unauthenticated("credential no longer valid"),
                            );
                        }
                    }
                }
                Cmd::Shutdown => {
                    if self.draining.is_none() {
                        self.draining = Some(Instant::now());
                        for (l, _) in self.listeners.drain(..) {
                            let _ = self
                                .poll
                                .registry()
                                .deregister(&mut SourceFd(&l.as_raw_fd()));
                        }
                        for slot in 0..self.conns.len() {
                            let before_hello = self.conns[slot]
                                .as_ref()
                                .is_some_and(|e| !matches!(e.phase, Phase::Open));
                            if before_hello {
                                self.close_with_error(
                                    slot,
                                    Status::unavailable("server shutting down"),
                                );
                                continue;
                            }
                            if let Some(conn) =
                                self.conns[slot].as_ref().and_then(|e| e.conn.clone())
                            {
                                let mut st = conn.lock();
                                conn.send_goaway(
                                    &mut st,
                                    Code::Unavailable,
                                    "server shutting down",
                                );
                            }
                            self.reap(slot);
                        }
                    }
                }
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        for slot in 0..self.conns.len() {
            let Some(entry) = self.conns[slot].as_ref() else {
                continue;
            };
            let conn = entry.conn.clone();
            match entry.phase {
                Phase::AwaitHello | Phase::Authenticating => {
                    if now.duration_since(entry.since) >= self.cfg.hello_timeout {
                        Refusal::HelloTimeout.count();
                        self.close_with_error(slot, Status::deadline_exceeded("no hello in time"));
                    }
                }
                Phase::Open => {
                    let Some(conn) = conn else { continue };
                    let mut st = conn.lock();
                    conn.expire_deadlines(&mut st, now);
                    conn.keepalive(&mut st, now);
                    let idle = Conn::stream_count(&st) == 0
                        && now.saturating_duration_since(st.last_rx) >= IDLE_TIMEOUT;
                    if idle {
                        conn.send_goaway(&mut st, Code::Unavailable, "idle connection closed");
                        conn.kill(&mut st, Status::unavailable("idle"));
                    }
                    drop(st);
                    self.reap(slot);
                }
            }
        }
    }

    /// Drops a connection that died or finished draining.
    fn reap(&mut self, slot: usize) {
        let Some(entry) = self.conns.get(slot).and_then(|e| e.as_ref()) else {
            return;
        };
        let Some(conn) = &entry.conn else { return };
        let (dead, drained) = {
            let st = conn.lock();
            (
                Conn::dead(&st).is_some(),
                st.goaway && Conn::stream_count(&st) == 0 && self.draining.is_some(),
            )
        };
        if dead || drained {
            self.close(slot, Status::unavailable("connection closed"));
        }
    }

    fn close_with_error(&mut self, slot: usize, status: Status) {
        if let Some(entry) = self.conns.get(slot).and_then(|e| e.as_ref()) {
            if let Some(conn) = &entry.conn {
                let mut st = conn.lock();
                conn.fail_connection(&mut st, status.clone());
            } else {
                // Before the hello: best effort, the socket is non-blocking and nearly empty.
                let mut out = Vec::new();
                frame::put_error(&mut out, 0, status.code, &status.message);
                let _ = entry.io().write(&out);
            }
        }
        self.close(slot, status);
    }

    fn close(&mut self, slot: usize, status: Status) {
        let Some(entry) = self.conns.get_mut(slot).and_then(|e| e.take()) else {
            return;
        };
        match entry.counted {
            Counted::PreHello => self.admission.pre_done(entry.source),
            Counted::Credential(c) => self.admission.auth_done(c),
            Counted::Nothing => {}
        }
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&entry.raw_fd));
        if let Some(conn) = &entry.conn {
            let mut st = conn.lock();
            conn.kill(&mut st, status);
        } else if let Some(s) = &entry.pre {
            s.shutdown();
        }
        self.free.push(slot);
    }
}

/// The connection error for a frame that cannot be decoded: too long is
/// `resource_exhausted` (PROTOCOL.md §1), before and after the hello alike; anything else
/// malformed is `invalid_argument`.
pub(crate) fn frame_error_status(e: &frame::FrameError) -> Status {
    let code = match e {
        frame::FrameError::TooLong { .. } => Code::ResourceExhausted,
        _ => Code::InvalidArgument,
    };
    Status::new(code, format!("protocol error: {e}"))
}

/// A call, handed to [`Service::call`] on the event-loop thread.
pub struct Call {
    conn: Arc<Conn>,
    id: u32,
    method: String,
    message: Bytes,
    ctx: Arc<CallCtx>,
    pool: Arc<Pool>,
    answered: bool,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("id", &self.id)
            .field("method", &self.method)
            .finish()
    }
}

impl Call {
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The principal the connection's hello decided.
    pub fn peer(&self) -> &Peer {
        &self.ctx.peer
    }

    /// Everything the server knows about the call's connection.
    pub fn ctx(&self) -> &Arc<CallCtx> {
        &self.ctx
    }

    /// The request message, undecoded.
    pub fn message(&self) -> &[u8] {
        &self.message
    }

    /// Decodes the request message; a malformed one is the caller's error.
    pub fn decode<M: Message + Default>(&self) -> Result<M, Status> {
        M::decode(self.message.clone()).map_err(|e| {
            Status::invalid_argument(format!("{}: malformed request: {e}", self.method))
        })
    }

    /// Answers with one message and ends the call (never blocks the loop).
    pub fn reply<M: Message>(mut self, msg: &M) {
        self.answered = true;
        let body = msg.encode_to_vec();
        let conn = self.conn.clone();
        let id = self.id;
        let sent = conn.send_data(id, body.len(), true, None, false, |out| {
            out.extend_from_slice(&body)
        });
        match sent {
            Ok(true) => {
                let mut st = conn.lock();
                conn.release_stream(&mut st, id, false);
            }
            Ok(false) => {
                // No credit right now: finish on a worker, which may wait for it.
                let c2 = conn.clone();
                let job = Box::new(move || {
                    let r = c2.send_data(id, body.len(), true, None, true, |out| {
                        out.extend_from_slice(&body)
                    });
                    let mut st = c2.lock();
                    if let Err(e) = r {
                        c2.send_error(&mut st, id, &e);
                    }
                    c2.release_stream(&mut st, id, false);
                });
                if self.pool.spawn(job).is_err() {
                    let mut st = conn.lock();
                    conn.send_error(
                        &mut st,
                        id,
                        &Status::resource_exhausted("server is too busy"),
                    );
                    conn.release_stream(&mut st, id, false);
                }
            }
            Err(e) => {
                let mut st = conn.lock();
                conn.send_error(
                    &mut st,
                    id,
                    &Status::internal(format!("response not sent: {e}")),
                );
                conn.release_stream(&mut st, id, false);
            }
        }
    }

    /// Ends the call with an error.
    pub fn fail(mut self, status: Status) {
        self.answered = true;
        let mut st = self.conn.lock();
        self.conn.send_error(&mut st, self.id, &status);
        self.conn.release_stream(&mut st, self.id, false);
    }

    /// Answers with a message or an error.
    pub fn respond<M: Message>(self, r: Result<M, Status>) {
        match r {
            Ok(m) => self.reply(&m),
            Err(s) => self.fail(s),
        }
    }

    /// Moves the call to a worker thread, where `f` may block. A saturated pool fails the
    /// call with `resource_exhausted`.
    pub fn spawn(mut self, f: impl FnOnce(ServerStream) + Send + 'static) {
        self.answered = true;
        let stream = ServerStream {
            conn: self.conn.clone(),
            id: self.id,
            method: std::mem::take(&mut self.method),
            message: std::mem::take(&mut self.message),
            ctx: self.ctx.clone(),
            finished: false,
        };
        let pool = self.pool.clone();
        if let Err(job) = pool.spawn(Box::new(move || f(stream))) {
            // Dropping the job drops the ServerStream unfinished, which would answer
            // "internal"; answer the truth first.
            let mut st = self.conn.lock();
            self.conn.send_error(
                &mut st,
                self.id,
                &Status::resource_exhausted("server is too busy"),
            );
            drop(st);
            drop(job);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.answered {
            let mut st = self.conn.lock();
            let s = Status::internal(format!(
                "{}: the server dropped the call unanswered",
                self.method
            ));
            self.conn.send_error(&mut st, self.id, &s);
            self.conn.release_stream(&mut st, self.id, false);
        }
    }
}

/// A call on a worker thread, with blocking receive and send.
pub struct ServerStream {
    conn: Arc<Conn>,
    id: u32,
    method: String,
    message: Bytes,
    ctx: Arc<CallCtx>,
    finished: bool,
}

/// The sending half of a call, for a second thread: a bidirectional call receives on its
/// worker ([`ServerStream::recv`]) while this sends (flow control applies as for
/// [`ServerStream::send`]). Sends after the call ended fail.
#[derive(Clone)]
pub struct ServerSender {
    conn: Arc<Conn>,
    id: u32,
}

impl std::fmt::Debug for ServerSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSender")
            .field("id", &self.id)
            .finish()
    }
}

impl ServerSender {
    /// Sends a message; blocks while the client's window is exhausted.
    pub fn send<M: Message>(&self, msg: &M) -> Result<(), Status> {
        let len = msg.encoded_len();
        self.conn
            .send_data(self.id, len, false, None, true, |out| {
                let _ = msg.encode(out);
            })
            .map(|_| ())
    }

    /// Wakes the call's worker if it waits in [`ServerStream::recv_timeout_or`], to look at
    /// its stop condition again (set that before calling this).
    pub fn wake(&self) {
        let st = self.conn.lock();
        self.conn.wake_all(&st);
    }

    /// Sends `msg` with its bytes field `tag` set to `payload`, without copying the payload
    /// (as [`ServerStream::send_payload`]); blocks under flow control like
    /// [`ServerSender::send`].
    pub fn send_payload<M: Message>(
        &self,
        msg: &M,
        tag: u32,
        payload: Bytes,
    ) -> Result<(), Status> {
        let prefix = super::payload_prefix(msg, tag, payload.len());
        self.conn
            .send_data_payload(self.id, &prefix, payload, false, None)
            .map(|_| ())
    }
}

/// See [`ServerStream::watch`].
#[derive(Clone)]
pub struct CallWatch {
    conn: Arc<Conn>,
    id: u32,
}

impl std::fmt::Debug for CallWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallWatch").field("id", &self.id).finish()
    }
}

impl CallWatch {
    /// Whether the client cancelled, the deadline passed, the connection died, or the call
    /// already ended.
    pub fn is_cancelled(&self) -> bool {
        let st = self.conn.lock();
        Conn::is_cancelled(&st, self.id)
    }
}

impl std::fmt::Debug for ServerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerStream")
            .field("id", &self.id)
            .field("method", &self.method)
            .finish()
    }
}

impl ServerStream {
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The principal the connection's hello decided.
    pub fn peer(&self) -> &Peer {
        &self.ctx.peer
    }

    /// Everything the server knows about the call's connection.
    pub fn ctx(&self) -> &Arc<CallCtx> {
        &self.ctx
    }

    /// Decodes the request message (the first message of the call).
    pub fn first<M: Message + Default>(&self) -> Result<M, Status> {
        M::decode(self.message.clone()).map_err(|e| {
            Status::invalid_argument(format!("{}: malformed request: {e}", self.method))
        })
    }

    /// Receives the client's next message; `Ok(None)` once the client closed its side.
    pub fn recv<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        match self.recv_bytes()? {
            Some(b) => M::decode(b).map(Some).map_err(|e| {
                Status::invalid_argument(format!("{}: malformed message: {e}", self.method))
            }),
            None => Ok(None),
        }
    }

    pub fn recv_bytes(&mut self) -> Result<Option<Bytes>, Status> {
        let id = self.id;
        let conn = self.conn.clone();
        let r = conn
            .wait(None, |st| conn.take_message(st, id))
            .map(|(_, m)| m);
        r
    }

    /// Like `recv_bytes`, but gives up after `timeout` with `Ok(Err(()))`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Result<Option<Bytes>, ()>, Status> {
        let id = self.id;
        let conn = self.conn.clone();
        let r = conn
            .wait(Some(Instant::now() + timeout), |st| {
                conn.take_message(st, id)
            })
            .map(|(_, m)| m);
        match r {
            Ok(m) => Ok(Ok(m)),
            Err(s) if s.code == Code::DeadlineExceeded && !self.is_cancelled() => Ok(Err(())),
            Err(s) => Err(s),
        }
    }

    /// Runs `wake` once the call has something to receive (a message, ctl's end, a
    /// cancellation, the deadline, the connection's death), so the worker can return while
    /// the call stays open (the stream lives on in whatever `wake` resumes); `Err(wake)`
    /// when it has something now. The event loop reads as always.
    pub fn park(&self, wake: super::Wake) -> Result<(), super::Wake> {
        self.conn.park(self.id, wake)
    }

    /// Takes back a [`ServerStream::park`]'s `wake` that has not run (the half resumed
    /// for another reason); whether it was still there.
    pub fn unpark(&self) -> bool {
        self.conn.unpark(self.id)
    }

    /// Like [`ServerStream::recv_timeout`], but also gives up (`Ok(Err(()))`) as soon as
    /// `stop()` holds: another thread that makes it hold calls [`ServerSender::wake`], so
    /// the worker learns at once instead of at its next timeout (a relay whose other half
    /// ended).
    pub fn recv_timeout_or(
        &mut self,
        timeout: Duration,
        stop: &dyn Fn() -> bool,
    ) -> Result<Result<Option<Bytes>, ()>, Status> {
        let id = self.id;
        let conn = self.conn.clone();
        let r = conn
            .wait(Some(Instant::now() + timeout), |st| {
                if stop() {
                    return Ok(Some(Err(())));
                }
                Ok(conn.take_message(st, id)?.map(Ok))
            })
            .map(|(_, m)| m);
        match r {
            Ok(m) => Ok(m),
            Err(s) if s.code == Code::DeadlineExceeded && !self.is_cancelled() => Ok(Err(())),
            Err(s) => Err(s),
        }
    }

    /// Sends a message; blocks while the client's window is exhausted.
    pub fn send<M: Message>(&mut self, msg: &M) -> Result<(), Status> {
        let len = msg.encoded_len();
        self.conn
            .send_data(self.id, len, false, None, true, |out| {
                let _ = msg.encode(out);
            })
            .map(|_| ())
    }

    /// Sends `msg` with its bytes field `tag` set to `payload`, without copying the payload
    /// (it is written to the socket from `payload` itself). `msg` must leave that field
    /// empty. Blocks under flow control like [`ServerStream::send`].
    pub fn send_payload<M: Message>(
        &mut self,
        msg: &M,
        tag: u32,
        payload: Bytes,
    ) -> Result<(), Status> {
        let prefix = super::payload_prefix(msg, tag, payload.len());
        self.conn
            .send_data_payload(self.id, &prefix, payload, false, None)
            .map(|_| ())
    }

    /// The request message (the first message of the call), undecoded.
    pub fn first_bytes(&self) -> Bytes {
        self.message.clone()
    }

    /// Sends an encoded message as is (forwarding). Blocks under flow control like
    /// [`ServerStream::send`]; fails when it exceeds [`ServerStream::max_message_len`].
    pub fn send_bytes(&mut self, msg: Bytes) -> Result<(), Status> {
        self.conn
            .send_data_payload(self.id, &[], msg, false, None)
            .map(|_| ())
    }

    /// Ends a call with an encoded response, as [`ServerStream::reply`] does.
    pub fn reply_bytes(mut self, msg: Bytes) -> bool {
        self.finished = true;
        let sent = self.conn.send_data_payload(self.id, &[], msg, true, None);
        let mut st = self.conn.lock();
        if let Err(e) = &sent {
            self.conn.send_error(&mut st, self.id, e);
        }
        self.conn.release_stream(&mut st, self.id, false);
        sent.is_ok()
    }

    /// Largest message the client accepts in one DATA frame (its `frame_len_max`, PROTOCOL.md
    /// §2, less the frame header).
    pub fn max_message_len(&self) -> usize {
        self.conn.max_data_len()
    }

    /// A sender for another thread (bidirectional calls).
    pub fn sender(&self) -> ServerSender {
        ServerSender {
            conn: self.conn.clone(),
            id: self.id,
        }
    }

    /// A handle that tells, from another thread, whether this call was cancelled (a
    /// forwarder's watcher uses it while the stream itself waits on the upstream).
    pub fn watch(&self) -> CallWatch {
        CallWatch {
            conn: self.conn.clone(),
            id: self.id,
        }
    }

    /// Whether the client cancelled, the deadline passed, or the connection died.
    pub fn is_cancelled(&self) -> bool {
        let st = self.conn.lock();
        Conn::is_cancelled(&st, self.id)
    }

    /// Ends a call with its one response: a single DATA frame with END_STREAM, the form
    /// PROTOCOL.md §3 documents for unary replies (one frame less than DATA then END).
    /// Blocks under flow control like [`ServerStream::send`]; a failed send ends the call
    /// with that error instead. Returns whether the response was sent.
    pub fn reply<M: Message>(mut self, msg: &M) -> bool {
        self.finished = true;
        let len = msg.encoded_len();
        let sent = self.conn.send_data(self.id, len, true, None, true, |out| {
            let _ = msg.encode(out);
        });
        let mut st = self.conn.lock();
        if let Err(e) = &sent {
            self.conn.send_error(&mut st, self.id, e);
        }
        self.conn.release_stream(&mut st, self.id, false);
        sent.is_ok()
    }

    /// Answers with a message ([`ServerStream::reply`]) or an error. Returns whether the
    /// call succeeded.
    pub fn respond<M: Message>(self, r: Result<M, Status>) -> bool {
        match r {
            Ok(m) => self.reply(&m),
            Err(s) => {
                self.finish(Err(s));
                false
            }
        }
    }

    /// Ends the call: success (END) or an error.
    pub fn finish(mut self, r: Result<(), Status>) {
        self.finished = true;
        let mut st = self.conn.lock();
        match r {
            Ok(()) => self.conn.send_end(&mut st, self.id),
            Err(s) => self.conn.send_error(&mut st, self.id, &s),
        }
        self.conn.release_stream(&mut st, self.id, false);
    }
}

impl Drop for ServerStream {
    fn drop(&mut self) {
        if !self.finished {
            let mut st = self.conn.lock();
            let s = Status::internal(format!(
                "{}: the handler ended without an answer",
                self.method
            ));
            self.conn.send_error(&mut st, self.id, &s);
            self.conn.release_stream(&mut st, self.id, false);
        }
    }
}
