//! The gateway's event loop and workers.
//!
//! One mio thread accepts connections and reads request heads (edge-triggered, draining
//! until `WouldBlock`) into fixed slots, enforcing the head bound and the head/idle
//! deadlines there, so slow or idle clients cost no thread. A complete head hands the
//! connection to a bounded worker pool: the worker turns the socket blocking with I/O
//! timeouts, serves the request (bodies and streamed answers of any size), then serves any
//! pipelined request already buffered and gives the connection back to the loop for the
//! next keep-alive request. Architecture invariant: the loop never blocks on a backend call
//! or on a client; every wait is in a worker with a timeout.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::backend::Backend;
use super::handler::{After, Gateway, METRICS};
use super::limits::{
    CONNECTIONS_MAX, EVENTS, HEAD_MAX, HEAD_TIMEOUT, IDLE_TIMEOUT, IO_TIMEOUT, JSON_BODY_TIMEOUT,
    WORKERS_MAX,
};
use super::request::{parse_head, Head, HeadError, Wire};
use super::response::{write_response, Response};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// How often deadlines are checked.
const SWEEP: Duration = Duration::from_millis(250);
/// Lingering close after an error with a body still arriving: at most this long, this many
/// bytes, and this long without a byte.
const LINGER_MAX: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;
const LINGER_READ: Duration = Duration::from_millis(200);
/// A worker without work for this long exits, so an idle server holds no threads.
const WORKER_IDLE: Duration = Duration::from_secs(30);

/// Tunables; the defaults are the bounds in `limits.rs`.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub connections_max: usize,
    pub workers_max: usize,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub io_timeout: Duration,
    pub json_body_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            connections_max: CONNECTIONS_MAX,
            workers_max: WORKERS_MAX,
            head_timeout: HEAD_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            io_timeout: IO_TIMEOUT,
            json_body_timeout: JSON_BODY_TIMEOUT,
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

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    deadline: Instant,
    /// Socket timeouts already set (they survive the blocking/non-blocking switches).
    prepared: bool,
}

enum Slot {
    Free,
    Reading(Conn),
    /// Held by a worker.
    Busy,
}

/// What a worker gives back: the slot and, for keep-alive, the connection and its buffer.
type Returned = (usize, Option<(std::net::TcpStream, Vec<u8>)>);

struct Shared {
    returned: Mutex<Vec<Returned>>,
    waker: Waker,
    stop: AtomicBool,
}

/// Stops a running server.
#[derive(Clone)]
pub struct HttpHandle {
    shared: Arc<Shared>,
}

impl HttpHandle {
    /// Stops accepting and closes idle connections; requests being served finish.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.waker.wake();
    }
}

pub struct HttpServer {
    poll: Poll,
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    gateway: Arc<Gateway>,
    pool: Arc<Pool>,
    config: HttpConfig,
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
        Ok(HttpServer {
            poll,
            listener,
            addr,
            shared: Arc::new(Shared {
                returned: Mutex::new(Vec::new()),
                waker,
                stop: AtomicBool::new(false),
            }),
            gateway: Arc::new(Gateway {
                json_body_timeout: config.json_body_timeout,
                ..Gateway::new(backend)
            }),
            pool: Pool::new(config.workers_max),
            config,
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
        let mut slots: Vec<Slot> = (0..self.config.connections_max)
            .map(|_| Slot::Free)
            .collect();
        let mut free: Vec<usize> = (0..self.config.connections_max).rev().collect();
        let mut next_sweep = Instant::now() + SWEEP;
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
                let open = slots
                    .iter()
                    .filter(|s| matches!(s, Slot::Reading(_)))
                    .count();
                METRICS.connections_open.add(-(open as i64));
                log::info!("http stopped addr={}", self.addr);
                return Ok(());
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(&mut slots, &mut free),
                    WAKER => {}
                    Token(t) => {
                        let i = t - FIRST_CONN;
                        self.readable(&mut slots, &mut free, i);
                    }
                }
            }
            // Connections given back by workers.
            let returned = match self.shared.returned.lock() {
                Ok(mut r) => std::mem::take(&mut *r),
                Err(_) => Vec::new(),
            };
            for (i, conn) in returned {
                match conn {
                    None => release(&mut slots, &mut free, i),
                    Some((std, buf)) => self.resume(&mut slots, &mut free, i, std, buf),
                }
            }
            if Instant::now() >= next_sweep {
                next_sweep = Instant::now() + SWEEP;
                let now = Instant::now();
                for i in 0..slots.len() {
                    if let Slot::Reading(c) = &slots[i] {
                        if now >= c.deadline {
                            if !c.buf.is_empty() {
                                // Best effort on the non-blocking socket; then close.
                                let r = Response::error(
                                    408,
                                    "request_timeout",
                                    "request head not received in time",
                                );
                                let mut out = Vec::new();
                                let _ = write_response(&mut out, &r, false, false);
                                let _ = (&c.stream).write(&out);
                            }
                            self.close(&mut slots, &mut free, i);
                        }
                    }
                }
            }
        }
    }

    fn accept(&mut self, slots: &mut [Slot], free: &mut Vec<usize>) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the backlog until the next event.
                    log::warn!("http accept failed error={e}");
                    return;
                }
            };
            let Some(i) = free.pop() else {
                METRICS.connections_refused.inc();
                let r = Response::error(503, "unavailable", "too many connections");
                let mut buf = Vec::new();
                let _ = write_response(&mut buf, &r, false, false);
                let _ = stream.write(&buf);
                continue;
            };
            if self
                .poll
                .registry()
                .register(
                    &mut SourceFd(&stream.as_raw_fd()),
                    Token(FIRST_CONN + i),
                    Interest::READABLE,
                )
                .is_err()
            {
                free.push(i);
                continue;
            }
            let _ = stream.set_nodelay(true);
            METRICS.connections_open.add(1);
            slots[i] = Slot::Reading(Conn {
                stream,
                buf: Vec::new(),
                deadline: Instant::now() + self.config.idle_timeout,
                prepared: false,
            });
            // Edge-triggered: bytes may already be there.
            self.readable(slots, free, i);
        }
    }

    fn resume(
        &mut self,
        slots: &mut [Slot],
        free: &mut Vec<usize>,
        i: usize,
        std: std::net::TcpStream,
        buf: Vec<u8>,
    ) {
        if std.set_nonblocking(true).is_err() {
            release(slots, free, i);
            return;
        }
        let stream = TcpStream::from_std(std);
        // Still registered (dispatch keeps it so): re-arm instead of a delete and an add.
        if self
            .poll
            .registry()
            .reregister(
                &mut SourceFd(&stream.as_raw_fd()),
                Token(FIRST_CONN + i),
                Interest::READABLE,
            )
            .is_err()
        {
            release(slots, free, i);
            return;
        }
        let timeout = if buf.is_empty() {
            self.config.idle_timeout
        } else {
            self.config.head_timeout
        };
        slots[i] = Slot::Reading(Conn {
            stream,
            buf,
            prepared: true,
            deadline: Instant::now() + timeout,
        });
        self.readable(slots, free, i);
    }

    fn close(&mut self, slots: &mut [Slot], free: &mut Vec<usize>, i: usize) {
        if let Slot::Reading(c) = std::mem::replace(&mut slots[i], Slot::Free) {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&c.stream.as_raw_fd()));
            METRICS.connections_open.add(-1);
            free.push(i);
        }
    }

    fn readable(&mut self, slots: &mut [Slot], free: &mut Vec<usize>, i: usize) {
        let Some(Slot::Reading(c)) = slots.get_mut(i) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let mut eof = false;
        loop {
            if c.buf.len() > HEAD_MAX {
                break;
            }
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    if c.buf.is_empty() {
                        c.deadline = Instant::now() + self.config.head_timeout;
                    }
                    c.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        let parsed = parse_head(&c.buf[..c.buf.len().min(HEAD_MAX)]);
        match parsed {
            Ok(Some((head, n))) => {
                let rest = c.buf.split_off(n);
                self.dispatch(slots, free, i, head, rest);
            }
            Ok(None) if c.buf.len() >= HEAD_MAX => {
                let r = Response::error(431, "invalid_argument", "request head larger than 16 KiB");
                self.fail(slots, free, i, &r);
            }
            Ok(None) => {
                if eof {
                    self.close(slots, free, i);
                }
            }
            Err(e) => {
                let status = if e == HeadError::TooLarge {
                    431
                } else if e == HeadError::UnsupportedVersion {
                    505
                } else {
                    400
                };
                let r = Response::error(status, "invalid_argument", &e.to_string());
                self.fail(slots, free, i, &r);
            }
        }
    }

    /// Answers from the loop (non-blocking, best effort) and closes.
    fn fail(&mut self, slots: &mut [Slot], free: &mut Vec<usize>, i: usize, r: &Response) {
        if let Slot::Reading(c) = &mut slots[i] {
            let mut buf = Vec::new();
            let _ = write_response(&mut buf, r, false, false);
            let _ = c.stream.write(&buf);
        }
        self.close(slots, free, i);
    }

    fn dispatch(
        &mut self,
        slots: &mut [Slot],
        free: &mut Vec<usize>,
        i: usize,
        head: Head,
        rest: Vec<u8>,
    ) {
        if !self.pool.has_capacity() {
            METRICS.connections_refused.inc();
            let r = Response::error(503, "unavailable", "every worker is busy; retry");
            self.fail(slots, free, i, &r);
            return;
        }
        let Slot::Reading(c) = std::mem::replace(&mut slots[i], Slot::Busy) else {
            return;
        };
        // The socket stays registered while a worker holds it: its events are ignored for a
        // busy slot, and `resume` re-arms it (reading at once, since edges may be missed).
        let prepared_before = c.prepared;
        let std: std::net::TcpStream = c.stream.into();
        let mut prepared = std.set_nonblocking(false);
        if !prepared_before {
            prepared = prepared
                .and_then(|()| std.set_read_timeout(Some(self.config.io_timeout)))
                .and_then(|()| std.set_write_timeout(Some(self.config.io_timeout)));
        }
        if prepared.is_err() {
            release(slots, free, i);
            return;
        }
        let gateway = self.gateway.clone();
        let shared = self.shared.clone();
        let job = move || {
            let mut wire = Wire {
                stream: std,
                buf: rest,
            };
            let mut head = head;
            let back = loop {
                match gateway.serve(&head, &mut wire) {
                    After::KeepAlive => {}
                    After::Close => break None,
                    After::CloseUnread => {
                        linger(&wire.stream);
                        break None;
                    }
                }
                // A pipelined request may already be buffered.
                match parse_head(&wire.buf) {
                    Ok(Some((h, n))) => {
                        wire.buf.drain(..n);
                        head = h;
                    }
                    Ok(None) if wire.buf.len() < HEAD_MAX => break Some((wire.stream, wire.buf)),
                    Ok(None) | Err(_) => {
                        let r =
                            Response::error(400, "invalid_argument", "malformed pipelined request");
                        let _ = write_response(&mut wire.stream, &r, false, false);
                        break None;
                    }
                }
            };
            if let Ok(mut r) = shared.returned.lock() {
                r.push((i, back));
            }
            let _ = shared.waker.wake();
        };
        if let Err(job) = self.pool.spawn(Box::new(job)) {
            // Only when a thread could not be created (capacity was checked above): the
            // job and its socket are dropped, so the client sees the connection close.
            drop(job);
            METRICS.connections_refused.inc();
            release(slots, free, i);
        }
    }
}

/// Closes gracefully after an answer sent while the client may still be sending a body:
/// half-close, then read and drop what arrives for a short, bounded while. Closing with
/// unread bytes queued makes the kernel send RST, which can destroy the answer before the
/// client reads it.
fn linger(stream: &std::net::TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(LINGER_READ));
    let start = Instant::now();
    let mut sink = [0u8; 8192];
    let mut total = 0usize;
    let mut s = stream;
    while start.elapsed() < LINGER_MAX && total < LINGER_BYTES {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

fn release(slots: &mut [Slot], free: &mut Vec<usize>, i: usize) {
    if matches!(slots[i], Slot::Busy) {
        slots[i] = Slot::Free;
        METRICS.connections_open.add(-1);
        free.push(i);
    }
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A bounded pool: threads start on demand up to `max` and exit when idle; when all are busy
/// a job is refused rather than queued without bound.
struct Pool {
    max: usize,
    inner: Mutex<PoolInner>,
    cv: Condvar,
}

struct PoolInner {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

impl Pool {
    fn new(max: usize) -> Arc<Pool> {
        Arc::new(Pool {
            max,
            inner: Mutex::new(PoolInner {
                queue: VecDeque::new(),
                threads: 0,
                idle: 0,
            }),
            cv: Condvar::new(),
        })
    }

    /// Whether `spawn` would take a job now. Only the loop thread spawns, and workers only
    /// lower `idle` by taking queued jobs or by exiting (which lowers `threads` too), so a
    /// true answer holds until the loop's next `spawn`.
    fn has_capacity(&self) -> bool {
        self.inner
            .lock()
            .map(|g| g.idle > g.queue.len() || g.threads < self.max)
            .unwrap_or(false)
    }

    fn spawn(self: &Arc<Pool>, job: Job) -> Result<(), Job> {
        let Ok(mut g) = self.inner.lock() else {
            return Err(job);
        };
        if g.idle > g.queue.len() {
            g.queue.push_back(job);
            self.cv.notify_one();
            return Ok(());
        }
        if g.threads >= self.max {
            return Err(job);
        }
        g.threads += 1;
        g.queue.push_back(job);
        drop(g);
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name("http-worker".into())
            .spawn(move || pool.work());
        if spawned.is_err() {
            let Ok(mut g) = self.inner.lock() else {
                return Ok(());
            };
            g.threads -= 1;
            // Give the job back (the caller answers 503) unless a live thread took it; only
            // the loop thread calls spawn, so the last queued job is this one.
            if let Some(job) = g.queue.pop_back() {
                return Err(job);
            }
        }
        Ok(())
    }

    fn work(self: Arc<Pool>) {
        loop {
            let job = {
                let Ok(mut g) = self.inner.lock() else {
                    return;
                };
                loop {
                    if let Some(j) = g.queue.pop_front() {
                        break j;
                    }
                    g.idle += 1;
                    let (ng, t) = match self.cv.wait_timeout(g, WORKER_IDLE) {
                        Ok(x) => x,
                        Err(_) => return,
                    };
                    g = ng;
                    g.idle -= 1;
                    if t.timed_out() && g.queue.is_empty() {
                        g.threads -= 1;
                        return;
                    }
                }
            };
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn pool_is_bounded_and_reuses_idle_threads() {
        let pool = Pool::new(2);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        for i in 0..2u32 {
            let (rx, tx) = (release_rx.clone(), done_tx.clone());
            assert!(pool
                .spawn(Box::new(move || {
                    let _ = rx.lock().map(|r| r.recv());
                    let _ = tx.send(i);
                }))
                .is_ok());
        }
        // Both threads are busy: a third job is refused, not queued.
        assert!(pool.spawn(Box::new(|| {})).is_err());
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        let mut got = [done_rx.recv().unwrap(), done_rx.recv().unwrap()];
        got.sort_unstable();
        assert_eq!(got, [0, 1]);
        // Idle threads take new work without growing past the bound.
        std::thread::sleep(Duration::from_millis(50));
        let (tx, rx) = mpsc::channel();
        assert!(pool.spawn(Box::new(move || tx.send(7).unwrap())).is_ok());
        assert_eq!(rx.recv().unwrap(), 7);
        assert!(pool.inner.lock().unwrap().threads <= 2);
    }
}
