//! Where the halves of a byte relay (ctl's traffic proxy, the agent's port streams) wait
//! while their side is quiet, so an idle relayed connection (a kept-alive one between
//! requests, a WebSocket nobody talks on) holds no thread.
//!
//! A half parks in one of two ways: until a socket is readable (or a deadline: an idle
//! bound, a linger), or until something calls the [`Wake`] it armed (a stream's receiver:
//! [`super::StreamReceiver::park`], [`super::ServerStream::park`]: a message, its end or
//! error). One thread per [`Parking`] runs a mio poll for the sockets and the deadlines;
//! when a parked half is due it goes back to the pool as a job and carries on where it
//! stopped. Nothing is read on this thread: it only watches.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::Wake;
use crate::metrics::Gauge;
use crate::pool::{Job, Pool};

const WAKER: Token = Token(0);
/// Readiness events handled per poll.
const EVENTS: usize = 256;
/// The longest the loop sleeps without a deadline (it re-reads its stop flag).
const TICK: Duration = Duration::from_secs(1);

struct Entry {
    job: Job,
    /// Registered for readability (the upward half's client socket).
    fd: Option<RawFd>,
    deadline: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<usize, Entry>,
    next: usize,
}

/// Gauges a [`Parking`] keeps up to date: halves on a thread, halves parked.
pub struct ParkGauges {
    pub running: Gauge,
    pub parked: Gauge,
}

impl ParkGauges {
    pub const fn new() -> ParkGauges {
        ParkGauges {
            running: Gauge::new(),
            parked: Gauge::new(),
        }
    }
}

impl Default for ParkGauges {
    fn default() -> Self {
        Self::new()
    }
}

/// The parking place of one daemon's relay halves (see the module documentation).
pub struct Parking {
    registry: mio::Registry,
    waker: Waker,
    pool: Arc<Pool>,
    inner: Mutex<Inner>,
    /// Tokens woken from outside the loop (port streams, changed deadlines).
    ready: Mutex<Vec<usize>>,
    stop: AtomicBool,
    running: AtomicUsize,
    gauges: &'static ParkGauges,
}

/// Counts a relay half running on a thread while it lives.
pub struct Running(Arc<Parking>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        self.0.gauges.running.add(-1);
    }
}

impl Parking {
    /// Starts the parking thread (named `name`); halves resume as jobs on `pool`.
    pub fn start(
        name: &str,
        pool: Arc<Pool>,
        gauges: &'static ParkGauges,
    ) -> io::Result<Arc<Parking>> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let p = Arc::new(Parking {
            registry: poll.registry().try_clone()?,
            waker,
            pool,
            inner: Mutex::new(Inner {
                next: 1,
                ..Inner::default()
            }),
            ready: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            gauges,
        });
        let weak = Arc::downgrade(&p);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(poll, weak))?;
        Ok(p)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a half as running on a thread until the guard drops.
    pub fn running(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::SeqCst);
        self.gauges.running.add(1);
        Running(self.clone())
    }

    /// Relay halves on a thread now.
    pub fn running_now(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Relay halves parked now.
    pub fn parked_now(&self) -> usize {
        self.lock().entries.len()
    }

    /// The books, locked, and the token the next entry gets; `None` once stopped.
    fn begin(&self) -> Option<(std::sync::MutexGuard<'_, Inner>, usize)> {
        if self.stop.load(Ordering::SeqCst) {
            return None;
        }
        let g = self.lock();
        let token = g.next;
        Some((g, token))
    }

    fn insert(&self, inner: &mut Inner, entry: Entry) -> usize {
        let token = inner.next;
        inner.next += 1;
        inner.entries.insert(token, entry);
        self.gauges.parked.add(1);
        token
    }

    /// Parks `half` until `fd` is readable or `deadline` passes, then `resume(half)` runs
    /// on the pool; its token (to move the deadline), or `half` back when it cannot park
    /// (it carries on on its thread).
    pub fn park_readable<H: Send + 'static>(
        &self,
        fd: RawFd,
        deadline: Instant,
        half: H,
        resume: fn(H),
    ) -> Result<usize, H> {
        let Some((mut g, token)) = self.begin() else {
            return Err(half);
        };
        // Registered while the lock is held: an event for it waits for the entry. An fd
        // already readable is reported at once (epoll checks it when it is added).
        if self
            .registry
            .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
            .is_err()
        {
            return Err(half);
        }
        self.insert(
            &mut g,
            Entry {
                job: Box::new(move || resume(half)),
                fd: Some(fd),
                deadline: Some(deadline),
            },
        );
        drop(g);
        // The loop may be asleep past this deadline.
        let _ = self.waker.wake();
        Ok(token)
    }

    /// The pool parked halves resume on.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Parks `half` until the [`Wake`] that `arm` hands on runs (or [`Parking::hurry`]):
    /// `arm` gives it to whatever will call it (a stream's receiver) or gives it back when
    /// there is something to do now, and then `half` is given back too. Once woken,
    /// `resume(half)` runs on the pool. Its token, for [`Parking::hurry`].
    pub fn park_woken<H: Send + 'static>(
        self: &Arc<Self>,
        mut half: H,
        arm: impl FnOnce(&mut H, Wake) -> Result<(), Wake>,
        resume: fn(H),
    ) -> Result<usize, H> {
        let Some((mut g, token)) = self.begin() else {
            return Err(half);
        };
        let weak = Arc::downgrade(self);
        // Runs under the port stream's connection lock: it only queues the token.
        let wake: Wake = Box::new(move || {
            if let Some(p) = weak.upgrade() {
                p.ready
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(token);
                let _ = p.waker.wake();
            }
        });
        if arm(&mut half, wake).is_err() {
            return Err(half);
        }
        // Woken before this point, the loop waits for the lock and then finds the entry.
        Ok(self.insert(
            &mut g,
            Entry {
                job: Box::new(move || resume(half)),
                fd: None,
                deadline: None,
            },
        ))
    }

    /// Brings a parked half's deadline forward to `when` (no-op once it resumed); a half
    /// parked for a wake resumes then too.
    pub fn hurry(&self, token: usize, when: Instant) {
        let mut g = self.lock();
        if let Some(e) = g.entries.get_mut(&token) {
            e.deadline = Some(e.deadline.map_or(when, |d| d.min(when)));
            drop(g);
            let _ = self.waker.wake();
        }
    }

    /// Stops the thread; parked halves are dropped (their connections close).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Takes the entries of `tokens` (and every one past its deadline) off the books.
    fn take_due(&self, tokens: &[usize], now: Instant) -> Vec<Job> {
        let mut g = self.lock();
        let mut due: Vec<usize> = tokens.to_vec();
        due.extend(
            g.entries
                .iter()
                .filter(|(_, e)| e.deadline.is_some_and(|d| d <= now))
                .map(|(t, _)| *t),
        );
        let mut jobs = Vec::new();
        for t in due {
            if let Some(e) = g.entries.remove(&t) {
                if let Some(fd) = e.fd {
                    let _ = self.registry.deregister(&mut SourceFd(&fd));
                }
                self.gauges.parked.add(-1);
                jobs.push(e.job);
            }
        }
        jobs
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.lock()
            .entries
            .values()
            .filter_map(|e| e.deadline)
            .min()
    }
}

fn run(mut poll: Poll, weak: Weak<Parking>) {
    let mut events = Events::with_capacity(EVENTS);
    loop {
        let timeout = {
            let Some(p) = weak.upgrade() else { return };
            if p.stop.load(Ordering::SeqCst) {
                let all: Vec<usize> = p.lock().entries.keys().copied().collect();
                // Dropped, not resumed: the server is going away.
                drop(p.take_due(&all, Instant::now()));
                return;
            }
            let now = Instant::now();
            p.next_deadline()
                .map_or(TICK, |d| d.saturating_duration_since(now).min(TICK))
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                log::error!("parking poll failed error={e}");
                std::thread::sleep(TICK);
            }
            continue;
        }
        let Some(p) = weak.upgrade() else { return };
        let mut tokens: Vec<usize> = events
            .iter()
            .map(|e| e.token())
            .filter(|t| *t != WAKER)
            .map(|t| t.0)
            .collect();
        tokens.append(&mut p.ready.lock().unwrap_or_else(|e| e.into_inner()));
        for job in p.take_due(&tokens, Instant::now()) {
            // No thread for it: dropping the half closes its connection.
            let _ = p.pool.spawn(job);
        }
    }
}
