//! The database: a fixed pool of worker threads, each owning one `postgres::Client`, fed
//! through a bounded queue.
//!
//! Callers (RPC and HTTP worker threads, background jobs) submit a closure and wait for its
//! result with a timeout; no event loop ever runs SQL. Idle workers wait on one condition
//! variable, so a job wakes exactly one of them (with a channel behind a mutex, the worker
//! taking a job would also wake the next idle worker on the mutex, an extra context switch
//! on every call's path). A worker whose connection broke
//! (PostgreSQL restarted) reconnects with exponential backoff; jobs that arrive while it is
//! disconnected fail at once with `unavailable`, so callers never wait for a dead database.
//!
//! The `postgres` crate runs a small tokio runtime inside each client; that runtime is
//! confined to these threads.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::{Client, NoTls};
use proto::Status;

use crate::limits::{
    DB_BACKOFF_MAX, DB_BACKOFF_MIN, DB_CONNECT_TIMEOUT, DB_JOB_TIMEOUT, DB_QUEUE_MAX, LOCK_TIMEOUT,
    STATEMENT_TIMEOUT,
};
use crate::metrics;

type Job = Box<dyn FnOnce(Option<&mut Client>) + Send>;

/// Settings of the pool.
#[derive(Clone, Debug)]
pub struct DbConfig {
    pub url: String,
    pub workers: usize,
    pub queue_max: usize,
    pub job_timeout: Duration,
}

impl DbConfig {
    pub fn new(url: &str) -> DbConfig {
        DbConfig {
            url: url.to_owned(),
            workers: crate::limits::DB_WORKERS_DEFAULT,
            queue_max: DB_QUEUE_MAX,
            job_timeout: DB_JOB_TIMEOUT,
        }
    }
}

/// Why the pool could not start.
#[derive(Debug)]
pub enum DbError {
    /// The URL does not parse.
    BadUrl { source: postgres::Error },
    /// A worker thread could not be spawned.
    Spawn { source: std::io::Error },
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::BadUrl { .. } => f.write_str("parse database url"),
            DbError::Spawn { .. } => f.write_str("spawn database worker"),
        }
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DbError::BadUrl { source } => Some(source),
            DbError::Spawn { source } => Some(source),
        }
    }
}

/// Handle to the pool; cheap to clone. Dropping the last handle stops the workers.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Arc<Queue>,
    job_timeout: Duration,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends every worker's loop once the queued jobs ran.
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

/// The bounded job queue shared by the workers.
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled once per queued job (and to all on close).
    ready: Condvar,
    max: usize,
}

struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next job; `None` once the queue is closed and empty.
    fn next(&self) -> Option<Job> {
        let mut st = self.lock();
        loop {
            if let Some(j) = st.jobs.pop_front() {
                return Some(j);
            }
            if st.closed {
                return None;
            }
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Db {
    /// Starts the workers. They connect lazily (the first job, or right away in the
    /// background), so a database that is down at start-up is not fatal.
    pub fn start(cfg: &DbConfig) -> Result<Db, DbError> {
        let mut pg: postgres::Config = cfg
            .url
            .parse()
            .map_err(|source| DbError::BadUrl { source })?;
        pg.connect_timeout(DB_CONNECT_TIMEOUT);
        if pg.get_application_name().is_none() {
            pg.application_name("wrenn-ctl");
        }
        if pg.get_options().is_none() {
            // A stuck query or lock wait must not hold a worker (and its caller) forever:
            // the server ends it; the caller's own wait is bounded by the job timeout.
            pg.options(&format!(
                "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
                STATEMENT_TIMEOUT.as_millis(),
                LOCK_TIMEOUT.as_millis(),
                STATEMENT_TIMEOUT.as_millis()
            ));
        }
        assert!(cfg.workers > 0, "db workers must be > 0");
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::with_capacity(cfg.queue_max.min(64)),
                closed: false,
            }),
            ready: Condvar::new(),
            max: cfg.queue_max,
        });
        let shared = Arc::new(Health {
            broken: AtomicU64::new(0),
            connects: AtomicU64::new(0),
        });
        let mut workers = Vec::with_capacity(cfg.workers);
        for i in 0..cfg.workers {
            let queue = Arc::clone(&queue);
            let shared = Arc::clone(&shared);
            let pg = pg.clone();
            let h = std::thread::Builder::new()
                .name(format!("ctl-db-{i}"))
                .spawn(move || worker(pg, queue, shared))
                .map_err(|source| DbError::Spawn { source })?;
            workers.push(h);
        }
        Ok(Db {
            inner: Arc::new(Inner {
                queue,
                job_timeout: cfg.job_timeout,
                workers: Mutex::new(workers),
            }),
        })
    }

    /// Runs `f` on a DB worker and waits for its result (at most the job timeout).
    pub fn run<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Client) -> Result<T, Status> + Send + 'static,
    {
        let start = Instant::now();
        let (rtx, rrx) = mpsc::sync_channel::<Result<T, Status>>(1);
        let job: Job = Box::new(move |client| {
            let r = match client {
                Some(c) => f(c),
                None => Err(Status::unavailable("database unavailable")),
            };
            let _ = rtx.send(r);
        });
        {
            let mut st = self.inner.queue.lock();
            if st.closed {
                return Err(Status::unavailable("database pool stopped"));
            }
            if st.jobs.len() >= self.inner.queue.max {
                drop(st);
                metrics::DB_QUEUE_FULL.inc();
                return Err(Status::unavailable("database queue full"));
            }
            st.jobs.push_back(job);
        }
        self.inner.queue.ready.notify_one();
        let r = match rrx.recv_timeout(self.inner.job_timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Status::new(
                proto::Code::DeadlineExceeded,
                "database call timed out",
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(Status::internal("database worker dropped the job"))
            }
        };
        metrics::DB_JOBS.inc();
        metrics::DB_JOB_SECONDS.observe(start.elapsed());
        if let Err(e) = &r {
            if e.code == proto::Code::Unavailable {
                metrics::DB_UNAVAILABLE.inc();
            }
        }
        r
    }

    /// Runs `f` inside one transaction, committed when `f` returns `Ok`.
    pub fn tx<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut postgres::Transaction<'_>) -> Result<T, Status> + Send + 'static,
    {
        self.run(move |c| {
            let mut tx = c.transaction().map_err(pg_err)?;
            let v = f(&mut tx)?;
            tx.commit().map_err(pg_err)?;
            Ok(v)
        })
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.inner
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

thread_local! {
    /// Prepared statements of this DB worker's connection (each worker thread owns exactly
    /// one connection, so a thread-local cache is a per-connection cache). Cleared whenever
    /// the worker connects anew.
    static STATEMENTS: std::cell::RefCell<std::collections::HashMap<&'static str, postgres::Statement>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Bound on cached statements per connection (the hot queries are a handful; a bound keeps
/// a bug from growing the server's per-connection memory without limit).
const STATEMENTS_MAX: usize = 64;

/// A statement prepared once per connection: hot queries then cost one round trip and no
/// parse/plan on the server. Call only inside [`Db::run`]/[`Db::tx`] jobs.
pub fn prepared(
    c: &mut impl postgres::GenericClient,
    sql: &'static str,
    types: &[postgres::types::Type],
) -> Result<postgres::Statement, Status> {
    if let Some(s) = STATEMENTS.with(|m| m.borrow().get(sql).cloned()) {
        return Ok(s);
    }
    let st = c.prepare_typed(sql, types).map_err(pg_err)?;
    STATEMENTS.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() < STATEMENTS_MAX {
            m.insert(sql, st.clone());
        }
    });
    Ok(st)
}

fn forget_statements() {
    STATEMENTS.with(|m| m.borrow_mut().clear());
}

/// What the workers tell each other about the database.
struct Health {
    /// Connection losses seen by any worker: a worker whose connection is older than the
    /// latest loss checks it (one round trip) before its next job, so after a PostgreSQL
    /// restart at most the job that discovered it fails, not one per worker.
    broken: AtomicU64,
    /// Successful connects by any worker: a worker waiting out its backoff tries again at
    /// once when another one got through (the database is back).
    connects: AtomicU64,
}

fn worker(pg: postgres::Config, queue: Arc<Queue>, h: Arc<Health>) {
    let mut client: Option<Client> = None;
    let mut conn_gen = h.broken.load(Ordering::Acquire);
    let mut backoff = DB_BACKOFF_MIN;
    let mut next_attempt = Instant::now();
    let mut seen_connects = h.connects.load(Ordering::Acquire);
    // Connect eagerly so the first requests find a warm pool.
    try_connect(&pg, &mut client, &mut backoff, &mut next_attempt, &h);
    loop {
        let Some(job) = queue.next() else {
            return; // queue closed: the pool was dropped
        };
        let gen = h.broken.load(Ordering::Acquire);
        if gen != conn_gen {
            if let Some(c) = client.as_mut() {
                if c.is_valid(DB_CONNECT_TIMEOUT).is_err() {
                    client = None;
                }
            }
            conn_gen = gen;
        }
        if client.as_ref().is_some_and(|c| c.is_closed()) {
            log::warn!("database connection lost; reconnecting");
            client = None;
        }
        let others_connected = h.connects.load(Ordering::Acquire) != seen_connects;
        if client.is_none() && (Instant::now() >= next_attempt || others_connected) {
            try_connect(&pg, &mut client, &mut backoff, &mut next_attempt, &h);
            conn_gen = h.broken.load(Ordering::Acquire);
        }
        seen_connects = h.connects.load(Ordering::Acquire);
        job(client.as_mut());
        if client.as_ref().is_some_and(|c| c.is_closed()) {
            client = None;
            next_attempt = Instant::now();
            conn_gen = h.broken.fetch_add(1, Ordering::AcqRel) + 1;
        }
    }
}

fn try_connect(
    pg: &postgres::Config,
    client: &mut Option<Client>,
    backoff: &mut Duration,
    next_attempt: &mut Instant,
    h: &Health,
) {
    forget_statements();
    match pg.connect(NoTls) {
        Ok(c) => {
            *client = Some(c);
            h.connects.fetch_add(1, Ordering::AcqRel);
            *backoff = DB_BACKOFF_MIN;
        }
        Err(e) => {
            log::warn!(
                "database connect failed: {e} retry_in_ms={}",
                backoff.as_millis()
            );
            *next_attempt = Instant::now() + *backoff;
            *backoff = (*backoff * 2).min(DB_BACKOFF_MAX);
        }
    }
}

/// Maps a PostgreSQL error to a call status: lost connections are `unavailable`, constraint
/// violations the caller did not expect are `failed_precondition`, the rest `internal`.
pub fn pg_err(e: postgres::Error) -> Status {
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io {
        return Status::unavailable(format!("database: {e}"));
    }
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
            Status::new(proto::Code::AlreadyExists, "already exists")
        }
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => {
            Status::failed_precondition("referenced by or referencing another entity")
        }
        Some(c) if *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CANNOT_CONNECT_NOW => {
            Status::unavailable("database shutting down")
        }
        _ => {
            log_cause(&e);
            Status::internal("database error")
        }
    }
}

/// Logs what PostgreSQL said (see [`describe`]), not only the driver's summary (`db error`),
/// so an `internal: database error` can be traced to its cause.
fn log_cause(e: &postgres::Error) {
    log::error!("database error: {}", describe(e));
}

/// What PostgreSQL said about a failed statement: SQLSTATE, message, detail, hint and
/// where; for errors that are not the server's, the driver's error with its sources.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "code={} severity={} message={:?} detail={:?} hint={:?} where={:?}",
            d.code().code(),
            d.severity(),
            d.message(),
            d.detail().unwrap_or(""),
            d.hint().unwrap_or(""),
            d.where_().unwrap_or(""),
        ),
        None => chain(e),
    }
}

/// `e` with its sources, joined by ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `value` made storable in `text`/`jsonb` for text ctl did not get from a caller and must
/// keep anyway (an agent's state reason, an error message in an audit row): NUL characters
/// become U+FFFD. Caller input is refused instead ([`check_text`]).
pub fn storable(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains('\0') {
        std::borrow::Cow::Owned(value.replace('\0', "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(value)
    }
}

/// Checks that `value` can be stored in a PostgreSQL `text` or `jsonb` column: neither
/// holds a NUL character (`text` refuses the byte, `jsonb` the `\u0000` escape), and the
/// statement would fail with an internal error. Every caller-supplied string that reaches
/// SQL goes through here first; `field` names it in the `invalid_argument` answer.
pub fn check_text(field: &str, value: &str) -> Result<(), Status> {
    if value.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "{field} contains a NUL character, which cannot be stored"
        )));
    }
    Ok(())
}

/// Whether `e` is a unique violation (for callers that map it to their own message).
pub fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_checks() {
        assert!(check_text("f", "plain").is_ok());
        let e = check_text("metadata[\"k\"]", "a\0b").unwrap_err();
        assert_eq!(e.code, proto::Code::InvalidArgument);
        assert!(e.message.contains("metadata[\"k\"]"), "{e}");
        assert_eq!(storable("a\0b"), "a\u{fffd}b");
        assert!(matches!(storable("ab"), std::borrow::Cow::Borrowed("ab")));
    }
}
