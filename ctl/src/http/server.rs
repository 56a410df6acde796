//! The gateway's event loop, its bounded queue and its workers.
//!
//! One mio thread accepts connections and does all request I/O that can stall: it reads
//! heads and bodies (edge-triggered, non-blocking) into per-connection buffers under the
//! head, body and idle deadlines, and writes the answers it gives itself (401 without a
//! key, 408, 413, 503, errors of the head). A worker gets only a complete request:
//!
//! 1. head parsed on the loop; `/health` and `/metrics` go to [`OPS_WORKERS`] reserved
//!    threads with their own queue, so they answer when every worker is busy;
//! 2. a `/v1` route without `X-API-Key`, or with a key that is not even shaped like one, is
//!    answered 401 on the loop at once and the connection closed: its body is never read;
//! 3. a request with a body and a key: a worker checks the key first (it needs the
//!    database; see below) and the body is read only if the key is valid;
//! 4. the body is read on the loop, whole (at most `JSON_BODY_MAX`), before the BODY_TIMEOUT
//!    deadline (408 naming it); streamed uploads are handed over once [`STREAM_HANDOFF`]
//!    bytes arrived (stdin at its first byte) and count against [`STREAM_WORKERS_MAX`];
//! 5. the complete request waits in a bounded FIFO queue for a worker ([`QUEUE_MAX`], per
//!    source [`SOURCE_QUEUED_MAX`]; 503 with `Retry-After` beyond), a source holding at
//!    most [`SOURCE_WORKERS_MAX`] workers and an API key at most [`KEY_WORKERS_MAX`];
//! 6. the worker turns the socket blocking (I/O timeouts), serves the request, including
//!    streamed answers of any length, and gives the connection back to the loop for the
//!    next keep-alive or pipelined request.
//!
//! Why the key is checked on a worker and not cached on the loop: checking a key is an
//! indexed SELECT; a cache on the loop would make a revoked key keep working for the
//! cache's lifetime (issue 12 wants revocation immediate). The loop only decides what needs
//! no database: is there a key, is it shaped like one. A bad key thus costs one short worker
//! turn and no body read.
//!
//! Architecture invariant: the loop never blocks, neither on a backend call nor on a
//! client; every wait outside it is in a worker with a timeout, and a worker never waits
//! for a client's request bytes except a streamed body after its hand-off.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use proto::http::{BodyDecoder, BodyError};
use proto::pool::Pool;
use proto::rpc::park::Parking;
use proto::rpc::Peer;

use super::backend::Backend;
use super::handler::{api_key, missing_key, After, Gateway, METRICS};
use super::limits::{
    BODY_RAW_MAX, BODY_TIMEOUT, BUFFER_MAX, CONNECTIONS_MAX, EVENTS, HEAD_MAX, HEAD_TIMEOUT,
    IDLE_TIMEOUT, IO_TIMEOUT, JSON_BODY_MAX, KEY_WORKERS_MAX, LINGER_BYTES, LINGER_TIMEOUT,
    OPEN_BODY_MAX, OPS_QUEUE_MAX, OPS_WORKERS, PROXY_CONNECTIONS_MAX, QUEUE_MAX, READ_CHUNK,
    RETRY_AFTER_SECS, SOURCE_BUFFER_MAX, SOURCE_CONNECTIONS_MAX, SOURCE_QUEUED_MAX,
    SOURCE_WORKERS_MAX, STREAM_HANDOFF, STREAM_WORKERS_MAX, WORKERS_MAX,
};
use super::port_route::{route_host, route_path, PortRoute, RouteError};
use super::proxy;
use super::request::{parse_head, Head, HeadError, Wire};
use super::response::{response_bytes, Response};
use super::routes::{match_route, Call, Match, Method, ROUTES};
use super::stream::HttpStream;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// Longest pause between deadline sweeps (shorter when a configured deadline is short).
const SWEEP_MAX: Duration = Duration::from_millis(250);
/// A worker without work for this long exits, so an idle server holds no threads.
const WORKER_IDLE: Duration = Duration::from_secs(30);

/// Tunables; the defaults are the bounds in `limits.rs`.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub connections_max: usize,
    pub source_connections_max: usize,
    pub workers_max: usize,
    pub source_workers_max: usize,
    pub key_workers_max: usize,
    pub stream_workers_max: usize,
    pub queue_max: usize,
    pub source_queued_max: usize,
    pub buffer_max: usize,
    pub source_buffer_max: usize,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    pub io_timeout: Duration,
    /// TLS (ALPN `http/1.1`) on every connection; `None`: plaintext HTTP.
    pub tls: Option<tls::ServerTls>,
    /// The traffic domain (lower-case, no final dot): requests whose `Host` is
    /// `P-sb-<uuid>.<domain>` go to the traffic proxy. `None`: only the path form
    /// (`/v1/sandboxes/<id>/ports/P/...`) reaches sandbox ports.
    pub traffic_domain: Option<String>,
    /// Proxied connections open at once ([`PROXY_CONNECTIONS_MAX`]).
    pub proxy_connections_max: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            connections_max: CONNECTIONS_MAX,
            source_connections_max: SOURCE_CONNECTIONS_MAX,
            workers_max: WORKERS_MAX,
            source_workers_max: SOURCE_WORKERS_MAX,
            key_workers_max: KEY_WORKERS_MAX,
            stream_workers_max: STREAM_WORKERS_MAX,
            queue_max: QUEUE_MAX,
            source_queued_max: SOURCE_QUEUED_MAX,
            buffer_max: BUFFER_MAX,
            source_buffer_max: SOURCE_BUFFER_MAX,
            head_timeout: HEAD_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
            io_timeout: IO_TIMEOUT,
            tls: None,
            traffic_domain: None,
            proxy_connections_max: PROXY_CONNECTIONS_MAX,
        }
    }
}

#[derive(Debug)]
pub enum HttpError {
    Bind { addr: SocketAddr, source: io::Error },
    Poll(io::Error),
    Spawn(io::Error),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Bind { addr, .. } => write!(f, "bind http listener {addr}"),
            HttpError::Poll(_) => f.write_str("http event loop"),
            HttpError::Spawn(_) => f.write_str("spawn http thread"),
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpError::Bind { source, .. } => Some(source),
            HttpError::Poll(e) | HttpError::Spawn(e) => Some(e),
        }
    }
}

/// What a request needs before a worker may take it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Plan {
    /// A sandbox port (traffic proxy): a worker checks the credentials and opens the
    /// stream; the body is the sandbox's to read, never the loop's.
    Proxy(PortRoute),
    /// Looks like port traffic but is not a valid target: answered on the loop.
    BadPort(RouteError),
    /// `/health`, `/metrics`: the reserved ops threads.
    Ops,
    /// No key needed (documents, unknown routes: the handler answers).
    Open,
    /// A `/v1` route: a key, and the body read whole (`stream`: false) or until the
    /// hand-off threshold `handoff` (streamed uploads, stdin).
    Api { stream: bool, handoff: usize },
}

/// A parsed request on the loop.
struct Pending {
    head: Head,
    plan: Plan,
    peer: Option<Peer>,
}

enum Phase {
    /// Waiting for (the rest of) a head.
    Head,
    /// A worker checks the key; nothing is read meanwhile.
    Authing(Pending),
    /// Reading the body: `scanned` raw bytes of `buf` decoded so far.
    Body {
        req: Pending,
        decoder: BodyDecoder,
        scanned: usize,
    },
    /// Complete, waiting in a queue.
    Queued(Pending),
    /// Writing a last answer, then half-close and linger.
    Closing,
    /// Half-closed: reading and dropping until EOF or the linger bound.
    Linger { dropped: usize },
}

struct Conn {
    stream: HttpStream,
    source: IpAddr,
    /// Bytes read and not used yet (after the head: the body's raw bytes, then pipelined
    /// requests).
    buf: Vec<u8>,
    /// Bytes to write from the loop (an answer of its own, a 100 Continue).
    out: Vec<u8>,
    phase: Phase,
    deadline: Instant,
    /// Generation of the slot, so a late auth answer cannot reach a newer connection.
    gen: u64,
    /// A request of this connection has reached a worker. Until then it is the HTTP
    /// analogue of a connection before its hello: when every place is taken, the oldest
    /// such connection still waiting for its first head makes room for a newcomer.
    served: bool,
}

enum ReadOutcome {
    /// Bytes were added to the buffer.
    Got,
    Eof,
    /// Nothing more now (would block), or the phase reads no more.
    Stop,
}

enum Slot {
    Free,
    Open(Box<Conn>),
    /// Relayed by the traffic proxy's threads (no worker): counted until they finish.
    Proxied {
        source: IpAddr,
    },
    /// Held by a worker.
    Busy {
        source: IpAddr,
        stream: bool,
        gen: u64,
        /// The API key it was sent with (its worker budget), if any.
        key: Option<String>,
    },
}

/// What happens to a connection a worker gives back.
enum Then {
    /// Read the next request (`buf` holds any bytes already read).
    Resume,
    /// The client may still be sending: half-close and linger.
    Linger,
}

enum Returned {
    Auth {
        slot: usize,
        gen: u64,
        source: IpAddr,
        result: Result<Peer, Response>,
    },
    Served {
        slot: usize,
        ops: bool,
        conn: Option<(HttpStream, Vec<u8>, Then)>,
    },
    /// The worker handed the connection to the traffic proxy's relay threads.
    Detached { slot: usize },
    /// Those threads finished (the socket is closed).
    ProxyDone { slot: usize },
}

struct Shared {
    returned: Mutex<Vec<Returned>>,
    waker: Waker,
    /// The loop's registry: a worker handing a socket to the traffic proxy takes it off the
    /// loop itself (while it still owns the descriptor, so no later socket can be hit).
    registry: mio::Registry,
    /// The traffic proxy's relay threads (two per proxied connection), reused between
    /// connections: room for every connection the loop lets through
    /// (`proxy_connections_max`) plus those still on a worker.
    relay_pool: Arc<Pool>,
    /// Where relay halves of idle proxied connections wait without a thread.
    parking: Arc<Parking>,
    stop: AtomicBool,
    /// Request bytes the loop holds (see `HttpHandle::buffered`).
    held: AtomicUsize,
}

impl Shared {
    fn give_back(&self, r: Returned) {
        if let Ok(mut v) = self.returned.lock() {
            v.push(r);
        }
        let _ = self.waker.wake();
    }
}

/// Stops a running server.
#[derive(Clone)]
pub struct HttpHandle {
    shared: Arc<Shared>,
}

impl HttpHandle {
    /// Request bytes (heads and bodies) the event loop holds in its buffers now.
    pub fn buffered(&self) -> usize {
        self.shared.held.load(Ordering::Relaxed)
    }

    /// Halves of proxied connections on a relay thread now, and parked (idle, no thread).
    pub fn proxy_relays(&self) -> (usize, usize) {
        let p = &self.shared.parking;
        (p.running_now(), p.parked_now())
    }

    /// Stops accepting and closes idle connections; requests being served finish.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.waker.wake();
    }
}

/// A job waiting for a worker.
struct Job {
    slot: usize,
    gen: u64,
    source: IpAddr,
    /// Some: a key to check (the connection stays on the loop).
    auth: Option<String>,
    stream: bool,
    /// The request's API key: a key holds at most `key_workers_max` workers.
    key: Option<String>,
}

#[derive(Default)]
struct SourceUse {
    conns: usize,
    queued: usize,
    busy: usize,
    /// Request bytes of this source the loop holds.
    held: usize,
}

pub struct HttpServer {
    poll: Poll,
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    gateway: Arc<Gateway>,
    pool: Arc<Pool>,
    ops_pool: Arc<Pool>,
    config: HttpConfig,
    slots: Vec<Slot>,
    free: Vec<usize>,
    next_gen: u64,
    sources: HashMap<IpAddr, SourceUse>,
    queue: VecDeque<Job>,
    ops_queue: VecDeque<Job>,
    busy: usize,
    streams_busy: usize,
    ops_busy: usize,
    /// Workers held per API key.
    key_busy: HashMap<String, usize>,
    /// Request bytes (heads, bodies) the loop holds in connection buffers.
    held: usize,
    /// Connections whose reads wait for buffer room (retried every turn of the loop).
    paused: Vec<usize>,
    /// Connections relayed by the traffic proxy now.
    proxied: usize,
}

impl HttpServer {
    pub fn bind(
        addr: SocketAddr,
        backend: Arc<dyn Backend>,
        config: HttpConfig,
    ) -> Result<HttpServer, HttpError> {
        assert!(config.connections_max > 0 && config.workers_max > 0);
        let poll = Poll::new().map_err(HttpError::Poll)?;
        let mut listener =
            TcpListener::bind(addr).map_err(|source| HttpError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| HttpError::Bind { addr, source })?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(HttpError::Poll)?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(HttpError::Poll)?;
        let registry = poll.registry().try_clone().map_err(HttpError::Poll)?;
        let relay_pool = Pool::new(
            "http-proxy",
            2 * (config.proxy_connections_max + config.workers_max),
            0,
            WORKER_IDLE,
        );
        let parking = Parking::start("http-park", relay_pool.clone(), &METRICS.relays)
            .map_err(HttpError::Poll)?;
        Ok(HttpServer {
            poll,
            listener,
            addr,
            shared: Arc::new(Shared {
                returned: Mutex::new(Vec::new()),
                waker,
                registry,
                relay_pool,
                parking,
                stop: AtomicBool::new(false),
                held: AtomicUsize::new(0),
            }),
            gateway: Arc::new(Gateway {
                io_timeout: config.io_timeout,
                tls: config.tls.is_some(),
                ..Gateway::new(backend)
            }),
            // The loop never hands a pool more jobs than it has threads (it counts them),
            // so a queue as long as the pool only holds a job until a thread finishing its
            // previous one takes it.
            pool: Pool::new("http", config.workers_max, config.workers_max, WORKER_IDLE),
            ops_pool: Pool::new("http-ops", OPS_WORKERS, OPS_WORKERS, WORKER_IDLE),
            slots: (0..config.connections_max).map(|_| Slot::Free).collect(),
            free: (0..config.connections_max).rev().collect(),
            config,
            next_gen: 0,
            sources: HashMap::new(),
            queue: VecDeque::new(),
            ops_queue: VecDeque::new(),
            busy: 0,
            streams_busy: 0,
            ops_busy: 0,
            key_busy: HashMap::new(),
            held: 0,
            paused: Vec::new(),
            proxied: 0,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn handle(&self) -> HttpHandle {
        HttpHandle {
            shared: self.shared.clone(),
        }
    }

    /// Runs the loop on a new thread.
    pub fn spawn(self) -> Result<(HttpHandle, JoinHandle<Result<(), HttpError>>), HttpError> {
        let h = self.handle();
        let j = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || self.run())
            .map_err(HttpError::Spawn)?;
        Ok((h, j))
    }

    /// Runs the loop until [`HttpHandle::shutdown`].
    pub fn run(mut self) -> Result<(), HttpError> {
        let mut events = Events::with_capacity(EVENTS);
        let shortest = self
            .config
            .head_timeout
            .min(self.config.body_timeout)
            .min(self.config.idle_timeout);
        let sweep = (shortest / 4).clamp(Duration::from_millis(10), SWEEP_MAX);
        let mut next_sweep = Instant::now() + sweep;
        log::info!("http listening addr={}", self.addr);
        loop {
            let timeout = next_sweep.saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(HttpError::Poll(e));
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                let open = self
                    .slots
                    .iter()
                    .filter(|s| matches!(s, Slot::Open(_)))
                    .count();
                METRICS.connections_open.add(-(open as i64));
                METRICS.queued.add(-(self.queue.len() as i64));
                METRICS.buffered.add(-(self.held as i64));
                // Idle proxied connections close; those moving bytes finish on their threads.
                self.shared.parking.stop();
                log::info!("http stopped addr={}", self.addr);
                return Ok(());
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => {
                        let i = t - FIRST_CONN;
                        if ev.is_writable() {
                            self.flush(i);
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.readable(i);
                        }
                    }
                }
            }
            let returned = match self.shared.returned.lock() {
                Ok(mut r) => std::mem::take(&mut *r),
                Err(_) => Vec::new(),
            };
            for r in returned {
                self.on_returned(r);
            }
            self.pump();
            if !self.paused.is_empty() {
                for i in std::mem::take(&mut self.paused) {
                    self.readable(i);
                }
            }
            if Instant::now() >= next_sweep {
                next_sweep = Instant::now() + sweep;
                self.sweep();
            }
        }
    }

    /// Counts `n` more (or fewer) request bytes held for `source`.
    fn hold(&mut self, source: IpAddr, n: isize) {
        self.held = self.held.saturating_add_signed(n);
        self.shared.held.store(self.held, Ordering::Relaxed);
        METRICS.buffered.add(n as i64);
        let u = self.source_use(source);
        u.held = u.held.saturating_add_signed(n);
    }

    fn source_use(&mut self, ip: IpAddr) -> &mut SourceUse {
        self.sources.entry(ip).or_default()
    }

    fn forget_source_if_unused(&mut self, ip: IpAddr) {
        if self
            .sources
            .get(&ip)
            .is_some_and(|u| u.conns == 0 && u.queued == 0 && u.busy == 0 && u.held == 0)
        {
            self.sources.remove(&ip);
        }
    }

    fn accept(&mut self) {
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the backlog until the next event.
                    log::warn!("http accept failed error={e}");
                    return;
                }
            };
            let source = peer.ip();
            let per_source = self.sources.get(&source).map_or(0, |u| u.conns);
            let refusal = if per_source >= self.config.source_connections_max {
                Some("too many connections from this address")
            } else if self.free.is_empty() && !self.evict_oldest_unserved() {
                Some("too many connections")
            } else {
                None
            };
            if let Some(why) = refusal {
                METRICS.connections_refused.inc();
                // A TLS client could not read a plaintext answer: it sees the close.
                if self.config.tls.is_none() {
                    let mut stream = stream;
                    let _ = stream.write(&response_bytes(&unavailable(why), false));
                }
                continue;
            }
            let stream = match HttpStream::accepted(stream.into(), self.config.tls.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("http accept failed error={e}");
                    continue;
                }
            };
            let Some(i) = self.free.pop() else { continue };
            if self
                .poll
                .registry()
                .register(
                    &mut SourceFd(&stream.as_raw_fd()),
                    Token(FIRST_CONN + i),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                self.free.push(i);
                continue;
            }
            METRICS.connections_open.add(1);
            self.source_use(source).conns += 1;
            self.next_gen += 1;
            self.slots[i] = Slot::Open(Box::new(Conn {
                stream,
                source,
                buf: Vec::new(),
                out: Vec::new(),
                phase: Phase::Head,
                // A new connection must send its request head within the head deadline;
                // the longer idle deadline is for keep-alive connections between requests.
                deadline: Instant::now() + self.config.head_timeout,
                gen: self.next_gen,
                served: false,
            }));
            // Edge-triggered: bytes may already be there.
            self.readable(i);
        }
    }

    fn conn(&mut self, i: usize) -> Option<&mut Conn> {
        match self.slots.get_mut(i) {
            Some(Slot::Open(c)) => Some(c),
            _ => None,
        }
    }

    /// Closes an open connection and frees its slot.
    /// With every place taken: closes the oldest connection that has not yet had a request
    /// served and is still waiting for (the rest of) its first head, so that idle or
    /// slow-header connections cannot lock newcomers out (keep-alive clients that were
    /// served keep their connections). False when there is none.
    fn evict_oldest_unserved(&mut self) -> bool {
        let oldest = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Open(c) if !c.served && matches!(c.phase, Phase::Head) => Some((c.gen, i)),
                _ => None,
            })
            .min();
        match oldest {
            Some((_, i)) => {
                METRICS.connections_evicted.inc();
                self.close(i);
                true
            }
            None => false,
        }
    }

    fn close(&mut self, i: usize) {
        if let Slot::Open(c) = std::mem::replace(&mut self.slots[i], Slot::Free) {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&c.stream.as_raw_fd()));
            METRICS.connections_open.add(-1);
            self.free.push(i);
            self.source_use(c.source).conns -= 1;
            self.hold(c.source, -(c.buf.len() as isize));
            if matches!(c.phase, Phase::Queued(_)) {
                self.unqueue(i, c.gen, c.source);
            }
            self.forget_source_if_unused(c.source);
        }
    }

    fn unqueue(&mut self, i: usize, gen: u64, source: IpAddr) {
        let before = self.queue.len() + self.ops_queue.len();
        self.queue.retain(|j| !(j.slot == i && j.gen == gen));
        self.ops_queue.retain(|j| !(j.slot == i && j.gen == gen));
        let removed = before - self.queue.len() - self.ops_queue.len();
        if removed > 0 {
            METRICS.queued.add(-(removed as i64));
            self.source_use(source).queued -= removed;
        }
    }

    /// Answers from the loop, then closes (half-close and linger, so the answer is not lost
    /// to a reset while the client is still sending).
    fn answer_and_close(&mut self, i: usize, r: &Response) {
        METRICS.count_gateway(r.status);
        let Some(c) = self.conn(i) else { return };
        c.out.extend_from_slice(&response_bytes(r, false));
        c.phase = Phase::Closing;
        c.deadline = Instant::now() + LINGER_TIMEOUT;
        self.flush(i);
    }

    /// Writes pending output; after a last answer, half-closes and lingers.
    fn flush(&mut self, i: usize) {
        let Some(c) = self.conn(i) else { return };
        let mut failed = false;
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        // TLS records the socket did not take yet: the next writable event goes on.
        match c.stream.flush_pending() {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => failed = true,
        }
        if failed {
            self.close(i);
            return;
        }
        if matches!(c.phase, Phase::Closing) {
            c.stream.shutdown_write();
            c.phase = Phase::Linger { dropped: 0 };
            self.readable(i);
        }
    }

    /// Reads what the connection's phase wants, one chunk at a time, acting on each (a
    /// complete head, body progress), until the socket is drained or the phase reads no more.
    fn readable(&mut self, i: usize) {
        loop {
            match self.read_once(i) {
                ReadOutcome::Got => self.process(i, false),
                ReadOutcome::Eof => return self.process(i, true),
                ReadOutcome::Stop => return,
            }
        }
    }

    fn process(&mut self, i: usize, eof: bool) {
        let Some(c) = self.conn(i) else { return };
        match c.phase {
            Phase::Head => self.advance_head(i, eof),
            Phase::Body { .. } => self.advance_body(i, eof),
            Phase::Linger { .. } if eof => self.close(i),
            _ => {}
        }
    }

    fn read_once(&mut self, i: usize) -> ReadOutcome {
        let head_timeout = self.config.head_timeout;
        let (held, buffer_max, source_buffer_max) = (
            self.held,
            self.config.buffer_max,
            self.config.source_buffer_max,
        );
        let source = match self.conn(i) {
            Some(c) => c.source,
            None => return ReadOutcome::Stop,
        };
        let source_held = self.sources.get(&source).map_or(0, |u| u.held);
        let Some(c) = self.conn(i) else {
            return ReadOutcome::Stop;
        };
        // Memory: the loop holds at most buffer_max body bytes (plus heads), a source at most
        // source_buffer_max; beyond, reads wait (the kernel's window pushes back on the
        // client) and are retried as room frees up. Heads are not paused (at most HEAD_MAX
        // per connection), so `/health` is always read.
        let buffering = matches!(c.phase, Phase::Body { .. });
        if buffering
            && (held + READ_CHUNK > buffer_max || source_held + READ_CHUNK > source_buffer_max)
        {
            self.paused.push(i);
            return ReadOutcome::Stop;
        }
        let room = match &c.phase {
            Phase::Head => HEAD_MAX + 1 > c.buf.len(),
            Phase::Body { .. } => BODY_RAW_MAX + 1 > c.buf.len(),
            Phase::Linger { .. } => true,
            Phase::Authing(_) | Phase::Queued(_) | Phase::Closing => false,
        };
        if !room {
            return ReadOutcome::Stop;
        }
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            return match c.stream.read(&mut chunk) {
                Ok(0) => ReadOutcome::Eof,
                Ok(n) => {
                    if let Phase::Linger { dropped } = &mut c.phase {
                        *dropped += n;
                        if *dropped > LINGER_BYTES {
                            return ReadOutcome::Eof;
                        }
                        continue;
                    }
                    if c.buf.is_empty() && matches!(c.phase, Phase::Head) {
                        c.deadline = Instant::now() + head_timeout;
                    }
                    c.buf.extend_from_slice(&chunk[..n]);
                    self.hold(source, n as isize);
                    ReadOutcome::Got
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadOutcome::Stop,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => ReadOutcome::Eof,
            };
        }
    }

    fn advance_head(&mut self, i: usize, eof: bool) {
        let Some(c) = self.conn(i) else { return };
        match parse_head(&c.buf) {
            Ok(Some((head, n))) => {
                c.buf.drain(..n);
                let source = c.source;
                self.hold(source, -(n as isize));
                self.on_head(i, head);
            }
            Ok(None) => {
                if eof {
                    self.close(i);
                }
            }
            Err(e) => {
                let status = match e {
                    HeadError::TooLarge => 431,
                    HeadError::UnsupportedVersion => 505,
                    _ => 400,
                };
                let msg = if e == HeadError::TooLarge {
                    format!("request head larger than {} KiB", HEAD_MAX / 1024)
                } else {
                    format!("request {e}")
                };
                self.answer_and_close(i, &Response::error(status, "invalid_argument", &msg));
            }
        }
    }

    fn on_head(&mut self, i: usize, head: Head) {
        let plan = plan_of(&head, self.config.traffic_domain.as_deref());
        match &plan {
            Plan::BadPort(e) => {
                let status = match e {
                    RouteError::BadPort => 400,
                    RouteError::EnvdPort => 403,
                    RouteError::BadSandboxId => 404,
                };
                let code = match status {
                    400 => "invalid_argument",
                    403 => "permission_denied",
                    _ => "not_found",
                };
                return self.answer_and_close(i, &Response::error(status, code, &e.to_string()));
            }
            Plan::Proxy(_) if self.proxied >= self.config.proxy_connections_max => {
                METRICS.connections_refused.inc();
                return self.answer_and_close(
                    i,
                    &unavailable("too many proxied sandbox connections on this gateway; retry"),
                );
            }
            // Straight to a worker: credentials first, and the body is the sandbox's.
            Plan::Proxy(_) => {
                let req = Pending {
                    head,
                    plan,
                    peer: None,
                };
                return self.ready(i, req);
            }
            _ => {}
        }
        let mut req = Pending {
            head,
            plan,
            peer: None,
        };
        if let Plan::Api { .. } = req.plan {
            let key = api_key(&req.head).map(str::to_owned);
            match key {
                None => return self.answer_and_close(i, &missing_key()),
                Some(k) if !self.gateway.backend.key_well_formed(&k) => {
                    let r = Response::error(
                        401,
                        proto::Code::Unauthenticated.name(),
                        "malformed api key",
                    );
                    return self.answer_and_close(i, &r);
                }
                // Checked before the body is read (a worker: it needs the database).
                Some(k) if req.head.has_body() => {
                    let Some(c) = self.conn(i) else { return };
                    let (gen, source) = (c.gen, c.source);
                    c.phase = Phase::Authing(req);
                    self.enqueue(
                        i,
                        Job {
                            slot: i,
                            gen,
                            source,
                            auth: Some(k),
                            stream: false,
                            key: None,
                        },
                    );
                    return;
                }
                // No body to protect: the worker checks the key as it serves.
                Some(_) => {}
            }
        }
        if !req.head.has_body() {
            return self.ready(i, req);
        }
        self.start_body(i, &mut req);
        let Some(c) = self.conn(i) else { return };
        let decoder = BodyDecoder::new(req.head.framing()).with_limit(match req.plan {
            Plan::Api { stream: true, .. } => u64::MAX,
            Plan::Api { .. } => JSON_BODY_MAX as u64,
            // No handler reads it (documents, 404, 405): a little, to keep the connection.
            Plan::Ops | Plan::Open | Plan::Proxy(_) | Plan::BadPort(_) => OPEN_BODY_MAX as u64,
        });
        c.phase = Phase::Body {
            req,
            decoder,
            scanned: 0,
        };
        self.advance_body(i, false);
    }

    /// Entering the body: its deadline, and `100 Continue` when the client waits for it.
    fn start_body(&mut self, i: usize, req: &mut Pending) {
        let body_timeout = self.config.body_timeout;
        let Some(c) = self.conn(i) else { return };
        c.deadline = Instant::now() + body_timeout;
        if req.head.expect_continue {
            req.head.expect_continue = false;
            c.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            self.flush(i);
        }
    }

    fn advance_body(&mut self, i: usize, eof: bool) {
        let Some(c) = self.conn(i) else { return };
        let Phase::Body {
            req,
            decoder,
            scanned,
        } = &mut c.phase
        else {
            return;
        };
        // A Content-Length over the limit fails before any body byte arrives.
        let mut failure = decoder.advance(&[], 0).err();
        while failure.is_none() && *scanned < c.buf.len() && !decoder.is_done() {
            match decoder.advance(&c.buf[*scanned..], usize::MAX) {
                Ok(p) if p.consumed == 0 => break,
                Ok(p) => *scanned += p.consumed,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() && !decoder.is_done() && eof {
            failure = Some(BodyError::Truncated);
        }
        if let Some(e) = failure {
            let r = match e {
                BodyError::TooLarge { limit } => Response::error(
                    413,
                    "payload_too_large",
                    &format!("request body larger than {limit} bytes"),
                ),
                BodyError::Truncated => {
                    // The client went away mid-body: nobody to answer.
                    return self.close(i);
                }
                e => Response::error(400, "invalid_argument", &format!("request body: {e}")),
            };
            return self.answer_and_close(i, &r);
        }
        let ready = match req.plan {
            _ if decoder.is_done() => true,
            Plan::Api {
                stream: true,
                handoff,
            } => decoder.decoded() >= handoff as u64 || c.buf.len() >= BODY_RAW_MAX,
            _ => false,
        };
        if ready {
            let Phase::Body { req, .. } = std::mem::replace(&mut c.phase, Phase::Head) else {
                return;
            };
            return self.ready(i, req);
        }
        if c.buf.len() > BODY_RAW_MAX {
            let r = Response::error(
                413,
                "payload_too_large",
                &format!("request body framing over {BODY_RAW_MAX} bytes"),
            );
            self.answer_and_close(i, &r);
        }
    }

    /// A complete request (or a streamed one at its hand-off): into a queue.
    fn ready(&mut self, i: usize, req: Pending) {
        let ops = req.plan == Plan::Ops;
        let stream = matches!(req.plan, Plan::Api { stream: true, .. });
        let key = match req.plan {
            Plan::Api { .. } => api_key(&req.head).map(str::to_owned),
            Plan::Ops | Plan::Open | Plan::Proxy(_) | Plan::BadPort(_) => None,
        };
        let Some(c) = self.conn(i) else { return };
        let (gen, source) = (c.gen, c.source);
        c.phase = Phase::Queued(req);
        if ops {
            if self.ops_queue.len() >= OPS_QUEUE_MAX {
                METRICS.connections_refused.inc();
                return self.answer_and_close(i, &unavailable("health and metrics are busy"));
            }
            self.source_use(source).queued += 1;
            METRICS.queued.add(1);
            self.ops_queue.push_back(Job {
                slot: i,
                gen,
                source,
                auth: None,
                stream: false,
                key: None,
            });
            self.pump();
            return;
        }
        self.enqueue(
            i,
            Job {
                slot: i,
                gen,
                source,
                auth: None,
                stream,
                key,
            },
        );
    }

    fn enqueue(&mut self, i: usize, job: Job) {
        let source = job.source;
        let queued = self.sources.get(&source).map_or(0, |u| u.queued);
        if self.queue.len() >= self.config.queue_max {
            METRICS.connections_refused.inc();
            return self.answer_and_close(i, &unavailable("too many requests waiting; retry"));
        }
        if queued >= self.config.source_queued_max {
            METRICS.connections_refused.inc();
            return self.answer_and_close(
                i,
                &unavailable("too many requests waiting from this address; retry"),
            );
        }
        self.source_use(source).queued += 1;
        METRICS.queued.add(1);
        self.queue.push_back(job);
        // Start it now if a worker is free: the queue holds only what must wait.
        self.pump();
    }

    /// Gives queued jobs to free workers, in order, skipping a job whose source or kind is
    /// at its worker bound (it keeps its place).
    fn pump(&mut self) {
        while self.ops_busy < OPS_WORKERS {
            let Some(job) = self.ops_queue.pop_front() else {
                break;
            };
            self.dequeued(&job);
            self.start(job, true);
        }
        let mut k = 0;
        while self.busy < self.config.workers_max && k < self.queue.len() {
            let job = &self.queue[k];
            let source_busy = self.sources.get(&job.source).map_or(0, |u| u.busy);
            let key_busy = job
                .key
                .as_ref()
                .and_then(|k| self.key_busy.get(k))
                .copied()
                .unwrap_or(0);
            let blocked = job.auth.is_none()
                && (source_busy >= self.config.source_workers_max
                    || key_busy >= self.config.key_workers_max
                    || (job.stream && self.streams_busy >= self.config.stream_workers_max));
            if blocked {
                k += 1;
                continue;
            }
            let Some(job) = self.queue.remove(k) else {
                break;
            };
            self.dequeued(&job);
            self.start(job, false);
        }
    }

    fn dequeued(&mut self, job: &Job) {
        METRICS.queued.add(-1);
        self.source_use(job.source).queued -= 1;
    }

    /// Starts a job on a worker (`ops`: an ops thread).
    fn start(&mut self, job: Job, ops: bool) {
        let i = job.slot;
        let live = matches!(&self.slots[i], Slot::Open(c) if c.gen == job.gen);
        if !live {
            self.forget_source_if_unused(job.source);
            return;
        }
        if let Some(key) = job.auth {
            // The connection stays on the loop; only the key goes to the worker.
            let backend = self.gateway.backend.clone();
            let shared = self.shared.clone();
            let (gen, source) = (job.gen, job.source);
            self.busy += 1;
            self.source_use(job.source).busy += 1;
            let run = move || {
                let result = backend
                    .authenticate(&key)
                    .map_err(|s| Response::from_status(&s));
                shared.give_back(Returned::Auth {
                    slot: i,
                    gen,
                    source,
                    result,
                });
            };
            if self.pool.spawn(Box::new(run)).is_err() {
                self.busy -= 1;
                self.source_use(job.source).busy -= 1;
                self.answer_and_close(i, &unavailable("no worker thread could be started"));
            }
            return;
        }
        let Slot::Open(c) = std::mem::replace(
            &mut self.slots[i],
            Slot::Busy {
                source: job.source,
                stream: job.stream,
                gen: job.gen,
                key: job.key.clone(),
            },
        ) else {
            return;
        };
        let Conn {
            stream,
            buf,
            out,
            phase,
            source,
            ..
        } = *c;
        // The worker holds these bytes now (a bounded request, or a stream's prefix).
        self.hold(source, -(buf.len() as isize));
        let Phase::Queued(req) = phase else {
            // Not a request: put it back as it was (cannot happen: only queued requests
            // are jobs without a key).
            self.release(i);
            return;
        };
        // The socket stays registered while a worker holds it: its events are ignored for
        // a busy slot, and `resume` re-arms it (reading at once, since edges may be missed).
        let mut std = stream;
        if std.set_blocking(self.config.io_timeout).is_err() {
            self.release(i);
            return;
        }
        if ops {
            self.ops_busy += 1;
        } else {
            self.busy += 1;
            if job.stream {
                self.streams_busy += 1;
            }
        }
        self.source_use(source).busy += 1;
        if let Some(k) = job.key {
            *self.key_busy.entry(k).or_insert(0) += 1;
        }
        let gateway = self.gateway.clone();
        let shared = self.shared.clone();
        let io_timeout = self.config.io_timeout;
        let run = move || {
            if let Plan::Proxy(route) = &req.plan {
                return proxy_worker(&gateway, &shared, i, &req.head, route, std, buf, io_timeout);
            }
            let mut std = std;
            if !out.is_empty() && std.write_all(&out).is_err() {
                shared.give_back(Returned::Served {
                    slot: i,
                    ops,
                    conn: None,
                });
                return;
            }
            let mut wire = Wire::new(std, buf);
            let after = gateway.serve(&req.head, req.peer, &mut wire);
            let (std, rest) = wire.into_parts();
            let conn = match after {
                After::KeepAlive => Some((std, rest, Then::Resume)),
                After::CloseUnread => Some((std, Vec::new(), Then::Linger)),
                After::Close => None,
            };
            shared.give_back(Returned::Served { slot: i, ops, conn });
        };
        let pool = if ops { &self.ops_pool } else { &self.pool };
        if pool.spawn(Box::new(run)).is_err() {
            // Only when a thread could not be created: the job and its socket are
            // dropped, so the client sees the connection close.
            METRICS.connections_refused.inc();
            self.on_returned(Returned::Served {
                slot: i,
                ops,
                conn: None,
            });
        }
    }

    fn on_returned(&mut self, r: Returned) {
        match r {
            Returned::Auth {
                slot,
                gen,
                source,
                result,
            } => {
                self.busy -= 1;
                self.source_use(source).busy -= 1;
                let live = matches!(&self.slots[slot], Slot::Open(c) if c.gen == gen);
                if !live {
                    // The client went away while its key was checked.
                    self.forget_source_if_unused(source);
                    return;
                }
                match result {
                    Err(resp) => self.answer_and_close(slot, &resp),
                    Ok(peer) => {
                        let Some(c) = self.conn(slot) else { return };
                        let Phase::Authing(mut req) = std::mem::replace(&mut c.phase, Phase::Head)
                        else {
                            return;
                        };
                        req.peer = Some(peer);
                        self.start_body(slot, &mut req);
                        let Some(c) = self.conn(slot) else { return };
                        let decoder =
                            BodyDecoder::new(req.head.framing()).with_limit(match req.plan {
                                Plan::Api { stream: true, .. } => u64::MAX,
                                _ => JSON_BODY_MAX as u64,
                            });
                        c.phase = Phase::Body {
                            req,
                            decoder,
                            scanned: 0,
                        };
                        // Bytes may have arrived (and been left in the kernel) meanwhile.
                        self.advance_body(slot, false);
                        self.readable(slot);
                    }
                }
            }
            Returned::Detached { slot } => {
                let Some(source) = self.worker_done(slot, false) else {
                    return;
                };
                self.slots[slot] = Slot::Proxied { source };
                self.proxied += 1;
                METRICS.proxied.add(1);
            }
            Returned::ProxyDone { slot } => {
                if let Slot::Proxied { source } = self.slots[slot] {
                    self.proxied -= 1;
                    METRICS.proxied.add(-1);
                    self.slots[slot] = Slot::Free;
                    METRICS.connections_open.add(-1);
                    self.free.push(slot);
                    self.source_use(source).conns -= 1;
                    self.forget_source_if_unused(source);
                }
            }
            Returned::Served { slot, ops, conn } => {
                if self.worker_done(slot, ops).is_none() {
                    return;
                }
                match conn {
                    None => self.release(slot),
                    Some((std, buf, then)) => self.resume(slot, std, buf, then),
                }
            }
        }
    }

    /// A worker gave a busy slot back: its counts go down. The slot's source, `None` when
    /// the slot was not busy.
    fn worker_done(&mut self, slot: usize, ops: bool) -> Option<IpAddr> {
        {
            {
                let (source, stream, key) = match &self.slots[slot] {
                    Slot::Busy {
                        source,
                        stream,
                        key,
                        ..
                    } => (*source, *stream, key.clone()),
                    _ => return None,
                };
                if let Some(k) = key {
                    if let Some(n) = self.key_busy.get_mut(&k) {
                        *n -= 1;
                        if *n == 0 {
                            self.key_busy.remove(&k);
                        }
                    }
                }
                if ops {
                    self.ops_busy -= 1;
                } else {
                    self.busy -= 1;
                    if stream {
                        self.streams_busy -= 1;
                    }
                }
                self.source_use(source).busy -= 1;
                Some(source)
            }
        }
    }

    /// Frees the slot of a connection a worker held (its socket is already closed).
    fn release(&mut self, i: usize) {
        if let Slot::Busy { source, .. } = self.slots[i] {
            self.slots[i] = Slot::Free;
            METRICS.connections_open.add(-1);
            self.free.push(i);
            self.source_use(source).conns -= 1;
            self.forget_source_if_unused(source);
        }
    }

    fn resume(&mut self, i: usize, mut std: HttpStream, buf: Vec<u8>, then: Then) {
        let (source, gen) = match self.slots[i] {
            Slot::Busy { source, gen, .. } => (source, gen),
            _ => return,
        };
        if std.set_nonblocking().is_err() {
            return self.release(i);
        }
        let stream = std;
        // Still registered (start keeps it so): re-arm instead of a delete and an add.
        if self
            .poll
            .registry()
            .reregister(
                &mut SourceFd(&stream.as_raw_fd()),
                Token(FIRST_CONN + i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return self.release(i);
        }
        self.hold(source, buf.len() as isize);
        let now = Instant::now();
        let (phase, deadline) = match then {
            Then::Resume if buf.is_empty() => (Phase::Head, now + self.config.idle_timeout),
            Then::Resume => (Phase::Head, now + self.config.head_timeout),
            Then::Linger => (Phase::Closing, now + LINGER_TIMEOUT),
        };
        self.slots[i] = Slot::Open(Box::new(Conn {
            stream,
            source,
            buf,
            out: Vec::new(),
            phase,
            deadline,
            gen,
            served: true,
        }));
        match then {
            Then::Resume => {
                // A pipelined request may be buffered already; then read what waits.
                self.advance_head(i, false);
                self.readable(i);
            }
            Then::Linger => self.flush(i),
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let Slot::Open(c) = &self.slots[i] else {
                continue;
            };
            if now < c.deadline {
                continue;
            }
            match &c.phase {
                Phase::Head if c.buf.is_empty() => self.close(i),
                Phase::Head => {
                    let r = Response::error(
                        408,
                        "request_timeout",
                        &format!(
                            "request head not received within the {} s head deadline",
                            secs(self.config.head_timeout)
                        ),
                    );
                    self.answer_and_close(i, &r);
                }
                Phase::Body { .. } => {
                    let r = Response::error(
                        408,
                        "request_timeout",
                        &format!(
                            "request body not received within the {} s body deadline",
                            secs(self.config.body_timeout)
                        ),
                    );
                    self.answer_and_close(i, &r);
                }
                Phase::Closing | Phase::Linger { .. } => self.close(i),
                // Waiting for a worker: the queue bounds this, not a clock.
                Phase::Authing(_) | Phase::Queued(_) => {}
            }
        }
    }
}

/// Seconds as a short decimal ("30", "0.3").
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}

fn unavailable(why: &str) -> Response {
    let mut r = Response::error(503, "unavailable", why);
    r.extra.push(("Retry-After", RETRY_AFTER_SECS.to_string()));
    r
}

/// What the loop must do with a request before a worker takes it. `domain`: the traffic
/// domain (host-form port traffic).
fn plan_of(head: &Head, domain: Option<&str>) -> Plan {
    let target = if head.query.is_empty() {
        head.path.clone()
    } else {
        format!("{}?{}", head.path, head.query)
    };
    let by_host = match (domain, head.header("host")) {
        (Some(d), Some(h)) => route_host(h, d, &target),
        _ => None,
    };
    match by_host.or_else(|| route_path(&target)) {
        Some(Ok(route)) => return Plan::Proxy(route),
        Some(Err(e)) => return Plan::BadPort(e),
        None => {}
    }
    match head.path.as_str() {
        "/health" | "/metrics" => return Plan::Ops,
        "/openapi.yaml" | "/docs" | "/docs/" => return Plan::Open,
        _ => {}
    }
    let Some(method) = Method::parse(&head.method) else {
        return Plan::Open;
    };
    match match_route(&ROUTES, method, &head.path) {
        Match::Found { route, .. } => match route.call {
            Call::Upload { .. } => Plan::Api {
                stream: true,
                handoff: STREAM_HANDOFF,
            },
            // Interactive input: a worker takes it at its first byte.
            Call::Stdin => Plan::Api {
                stream: true,
                handoff: 1,
            },
            Call::Unary { .. } | Call::Ndjson { .. } | Call::ListDir | Call::Download => {
                Plan::Api {
                    stream: false,
                    handoff: 0,
                }
            }
        },
        Match::MethodNotAllowed(_) | Match::NotFound => Plan::Open,
    }
}

/// A worker's part of a proxied request: credentials checked and the stream opened (or the
/// refusal written), then the connection leaves the loop for the relay threads.
#[allow(clippy::too_many_arguments)]
fn proxy_worker(
    gateway: &Gateway,
    shared: &Arc<Shared>,
    slot: usize,
    head: &Head,
    route: &PortRoute,
    mut std: HttpStream,
    buf: Vec<u8>,
    io_timeout: Duration,
) {
    let head_only = head.method == "HEAD";
    let opened = proxy::open(&*gateway.backend, head, route, gateway.tls)
        .and_then(|c| proxy::first_bytes(head, route).map(|f| (c, f)));
    let (conn, first) = match opened {
        Ok(x) => x,
        Err(resp) => {
            METRICS.count_gateway(resp.status);
            let written = super::response::write_response(&mut std, &resp, false, head_only);
            // A body the client may still be sending: linger so it reads the answer.
            let conn =
                (written.is_ok() && head.has_body()).then(|| (std, Vec::new(), Then::Linger));
            shared.give_back(Returned::Served {
                slot,
                ops: false,
                conn,
            });
            return;
        }
    };
    let _ = shared.registry.deregister(&mut SourceFd(&std.as_raw_fd()));
    let (io, leftover) = std.into_parts();
    let mut rest = buf;
    rest.extend_from_slice(&leftover);
    let next = proxy::Next {
        backend: gateway.backend.clone(),
        route: route.clone(),
        host: head.header("host").unwrap_or("").trim().to_owned(),
        keep_alive: super::proxy_head::keeps_alive(head),
        framing: head.framing(),
        websocket: super::proxy_head::is_websocket(head),
        head_request: head_only,
    };
    // Before the relay starts, so the loop sees Detached before ProxyDone.
    shared.give_back(Returned::Detached { slot });
    let done = shared.clone();
    let parking = shared.parking.clone();
    let spawned = shared.relay_pool.spawn(Box::new(move || {
        let on_end = Box::new(move || done.give_back(Returned::ProxyDone { slot }));
        proxy::relay(&parking, io, first, rest, conn, io_timeout, next, on_end);
    }));
    if spawned.is_err() {
        // The closure (and the socket) is gone: the client sees the close.
        shared.give_back(Returned::ProxyDone { slot });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let head = |t: &str| parse_head(t.as_bytes()).unwrap().unwrap().0;
        let plan_of = |h: &Head| plan_of(h, Some("sbx.test"));
        assert_eq!(plan_of(&head("GET /health HTTP/1.1\r\n\r\n")), Plan::Ops);
        assert_eq!(plan_of(&head("GET /nope HTTP/1.1\r\n\r\n")), Plan::Open);
        assert_eq!(
            plan_of(&head("POST /v1/sandboxes HTTP/1.1\r\n\r\n")),
            Plan::Api {
                stream: false,
                handoff: 0
            }
        );
    }
}
