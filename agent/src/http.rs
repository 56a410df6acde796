//! The metrics/health listener: `GET /health` and `GET /metrics` (Prometheus text), nothing
//! else, one request per connection.
//!
//! One mio thread accepts and reads request heads (the shared codec, `proto::http`) under a
//! deadline, and writes answers without blocking; one render thread builds the pages (they
//! read the manager's table, which must never stall the loop). A connection costs a slot and
//! a small buffer, never a thread, so idle or slow clients cannot starve a probe:
//!
//! - at most [`HTTP_CONNECTIONS_MAX`] connections, [`HTTP_SOURCE_CONNECTIONS_MAX`] per source
//!   address; a new connection beyond either bound evicts the oldest connection (of that
//!   source, else of all) still sending its request, so a flood of idle or slow connections
//!   churns itself while a probe, whose request arrives with its connection, is answered;
//! - a request head of at most [`HTTP_REQUEST_LEN_MAX`] bytes (431), whole within
//!   [`HTTP_TIMEOUT`] of the accept, and the answer taken within that time too; then the
//!   connection is closed.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use proto::http::{BodyLen, HeadError};

use crate::host::Host;
use crate::limits::{
    HTTP_CONNECTIONS_MAX, HTTP_REQUEST_LEN_MAX, HTTP_SOURCE_CONNECTIONS_MAX, HTTP_TIMEOUT,
};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// The listener's budgets; the defaults are the bounds in `limits.rs` (tests shorten them).
#[derive(Clone, Debug)]
pub struct HttpLimits {
    pub connections_max: usize,
    pub source_connections_max: usize,
    pub timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            connections_max: HTTP_CONNECTIONS_MAX,
            source_connections_max: HTTP_SOURCE_CONNECTIONS_MAX,
            timeout: HTTP_TIMEOUT,
        }
    }
}

/// A running listener; dropping it stops it.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(addr: SocketAddr, host: Arc<Host>) -> io::Result<HttpServer> {
        HttpServer::start_with(addr, host, HttpLimits::default())
    }

    pub fn start_with(
        addr: SocketAddr,
        host: Arc<Host>,
        limits: HttpLimits,
    ) -> io::Result<HttpServer> {
        let mut listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let rendered = Arc::new(Mutex::new(Vec::new()));
        let (jobs, job_rx) = sync_channel::<Render>(limits.connections_max.max(1));
        {
            let rendered = rendered.clone();
            let waker = waker.clone();
            std::thread::Builder::new()
                .name("agent-http-render".into())
                .spawn(move || render_loop(&host, &job_rx, &rendered, &waker))?;
        }
        let mut lp = Loop {
            poll,
            listener,
            limits,
            slots: Vec::new(),
            free: Vec::new(),
            sources: HashMap::new(),
            jobs,
            rendered,
            next_gen: 0,
        };
        lp.slots = (0..lp.limits.connections_max).map(|_| None).collect();
        lp.free = (0..lp.limits.connections_max).rev().collect();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("agent-http".into())
            .spawn(move || lp.run(&stop2))?;
        Ok(HttpServer {
            addr,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers built by the render thread: (slot, generation, bytes).
type Rendered = Mutex<Vec<(usize, u64, Vec<u8>)>>;

/// A page to build: (slot, generation, path, HEAD request).
struct Render {
    slot: usize,
    gen: u64,
    path: String,
    head_only: bool,
}

/// Builds pages until the loop is gone (its sender dropped).
fn render_loop(host: &Host, jobs: &Receiver<Render>, rendered: &Rendered, waker: &Waker) {
    while let Ok(job) = jobs.recv() {
        let (status, ctype, body) = match job.path.as_str() {
            "/health" => {
                let problems = host.problems();
                let body = if problems.is_empty() {
                    "ok\n".to_owned()
                } else {
                    format!("ok (cannot host sandboxes: {})\n", problems.join("; "))
                };
                (200, "text/plain", body)
            }
            "/metrics" => (200, "text/plain; version=0.0.4", host.prometheus()),
            _ => (404, "text/plain", "not found\n".to_owned()),
        };
        let mut out = answer(status, ctype, &body);
        if job.head_only {
            out.truncate(out.len() - body.len());
        }
        if let Ok(mut r) = rendered.lock() {
            r.push((job.slot, job.gen, out));
        }
        let _ = waker.wake();
    }
}

fn answer(status: u16, ctype: &str, body: &str) -> Vec<u8> {
    let mut out = proto::http::response_head(
        status,
        &[("Content-Type", ctype)],
        BodyLen::Length(body.len() as u64),
        true,
    );
    out.extend_from_slice(body.as_bytes());
    out
}

#[derive(PartialEq, Eq)]
enum Phase {
    /// Reading the request head.
    Reading,
    /// The render thread builds the answer.
    Rendering,
    /// Writing the answer, then closing.
    Writing,
}

struct Conn {
    stream: TcpStream,
    source: IpAddr,
    buf: Vec<u8>,
    out: Vec<u8>,
    phase: Phase,
    /// Accept time + the timeout: the whole exchange must be done by then.
    deadline: Instant,
    gen: u64,
}

struct Loop {
    poll: Poll,
    listener: TcpListener,
    limits: HttpLimits,
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    sources: HashMap<IpAddr, usize>,
    jobs: SyncSender<Render>,
    rendered: Arc<Rendered>,
    next_gen: u64,
}

impl Loop {
    fn run(mut self, stop: &AtomicBool) {
        let mut events = Events::with_capacity(256);
        let sweep =
            (self.limits.timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut next_sweep = Instant::now() + sweep;
        loop {
            let timeout = next_sweep.saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("agent http loop stopped error={e}");
                return;
            }
            if stop.load(Ordering::SeqCst) {
                return;
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
            let done = match self.rendered.lock() {
                Ok(mut r) => std::mem::take(&mut *r),
                Err(_) => Vec::new(),
            };
            for (i, gen, out) in done {
                if let Some(c) = self.slots[i].as_mut().filter(|c| c.gen == gen) {
                    c.out = out;
                    c.phase = Phase::Writing;
                    self.flush(i);
                }
            }
            if Instant::now() >= next_sweep {
                next_sweep = Instant::now() + sweep;
                let now = Instant::now();
                for i in 0..self.slots.len() {
                    if self.slots[i].as_ref().is_some_and(|c| now >= c.deadline) {
                        self.close(i);
                    }
                }
            }
        }
    }

    /// The oldest connection still sending its request, of `source` or of anyone.
    fn oldest_reading(&self, source: Option<IpAddr>) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| c.phase == Phase::Reading && source.is_none_or(|s| c.source == s))
            .min_by_key(|(_, c)| c.deadline)
            .map(|(i, _)| i)
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("agent http accept failed error={e}");
                    return;
                }
            };
            let source = peer.ip();
            // Make room: the oldest unanswered connection of this source, else of anyone.
            if self.sources.get(&source).copied().unwrap_or(0) >= self.limits.source_connections_max
            {
                if let Some(old) = self.oldest_reading(Some(source)) {
                    log::debug!("agent http evicts an unanswered connection source={source}");
                    self.close(old);
                }
            }
            if self.free.is_empty() {
                if let Some(old) = self.oldest_reading(None) {
                    log::debug!("agent http evicts an unanswered connection (full)");
                    self.close(old);
                }
            }
            let over_source = self.sources.get(&source).copied().unwrap_or(0)
                >= self.limits.source_connections_max;
            let slot = if over_source { None } else { self.free.pop() };
            let Some(i) = slot else {
                // Every connection is being answered: refuse this one.
                let _ = stream.write(&answer(503, "text/plain", "busy\n"));
                continue;
            };
            if self
                .poll
                .registry()
                .register(
                    &mut stream,
                    Token(FIRST_CONN + i),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                self.free.push(i);
                continue;
            }
            *self.sources.entry(source).or_insert(0) += 1;
            self.next_gen += 1;
            self.slots[i] = Some(Conn {
                stream,
                source,
                buf: Vec::new(),
                out: Vec::new(),
                phase: Phase::Reading,
                deadline: Instant::now() + self.limits.timeout,
                gen: self.next_gen,
            });
            self.readable(i);
        }
    }

    fn close(&mut self, i: usize) {
        if let Some(mut c) = self.slots[i].take() {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.free.push(i);
            if let Some(n) = self.sources.get_mut(&c.source) {
                *n -= 1;
                if *n == 0 {
                    self.sources.remove(&c.source);
                }
            }
        }
    }

    fn readable(&mut self, i: usize) {
        let Some(c) = self.slots[i].as_mut() else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let mut eof = false;
        while c.phase == Phase::Reading && c.buf.len() <= HTTP_REQUEST_LEN_MAX {
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        if c.phase != Phase::Reading {
            return;
        }
        let (status, msg) = match proto::http::parse_request_head(&c.buf, HTTP_REQUEST_LEN_MAX) {
            Ok(None) if eof => return self.close(i),
            Ok(None) => return,
            Ok(Some((head, _))) => {
                if head.method != "GET" && head.method != "HEAD" {
                    (405, "only GET\n")
                } else {
                    let job = Render {
                        slot: i,
                        gen: c.gen,
                        path: head.path,
                        head_only: head.method == "HEAD",
                    };
                    match self.jobs.try_send(job) {
                        Ok(()) => {
                            c.phase = Phase::Rendering;
                            return;
                        }
                        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                            (503, "busy\n")
                        }
                    }
                }
            }
            Err(HeadError::TooLarge) => (431, "request too large\n"),
            Err(HeadError::UnsupportedVersion) => (505, "HTTP/1.x only\n"),
            Err(_) => (400, "bad request\n"),
        };
        c.out = answer(status, "text/plain", msg);
        c.phase = Phase::Writing;
        self.flush(i);
    }

    fn flush(&mut self, i: usize) {
        let Some(c) = self.slots[i].as_mut() else {
            return;
        };
        if c.phase != Phase::Writing {
            return;
        }
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // Answered (or the client is gone): one request per connection.
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        self.close(i);
    }
}
