//! The one bounded pool of worker threads for work that blocks (RPC handlers, ctl's HTTP
//! requests).
//!
//! Threads are started on demand up to `threads_max` and exit after `idle` without work, so
//! an idle daemon holds none. When every thread is busy and the limit is reached, a job waits
//! in a queue of at most `queue_max` jobs; past that, `spawn` gives the job back instead of
//! queueing it without bound. The RPC server refuses at once (`queue_max` 0: the call fails
//! with `resource_exhausted`); ctl's HTTP loop, which never hands out more jobs than it has
//! threads by its own count, lets a job wait for a thread that is finishing the previous one.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A job for a worker.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

struct Inner {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

/// A bounded pool of worker threads (see the module documentation).
pub struct Pool {
    name: String,
    threads_max: usize,
    queue_max: usize,
    idle_timeout: Duration,
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("threads_max", &self.threads_max)
            .field("queue_max", &self.queue_max)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool of at most `threads_max` threads (named `<name>-worker`) and `queue_max`
    /// waiting jobs; a thread exits after `idle_timeout` without work.
    pub fn new(
        name: &str,
        threads_max: usize,
        queue_max: usize,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        assert!(threads_max > 0);
        Arc::new(Pool {
            name: name.to_owned(),
            threads_max,
            queue_max,
            idle_timeout,
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                threads: 0,
                idle: 0,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Jobs run outside the lock, so a poisoned lock only means a panic between two
        // counter updates here; the counters are still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `job` on a worker. Gives the job back when every thread is busy and the queue
    /// is full, or when no thread runs and none could be started.
    pub fn spawn(self: &Arc<Self>, job: Job) -> Result<(), Job> {
        let mut g = self.lock();
        if g.idle > g.queue.len() {
            // An idle thread takes it.
            g.queue.push_back(job);
            self.cv.notify_one();
            return Ok(());
        }
        if g.threads >= self.threads_max {
            if g.queue.len() >= self.queue_max {
                return Err(job);
            }
            g.queue.push_back(job);
            return Ok(());
        }
        g.threads += 1;
        g.queue.push_back(job);
        drop(g);
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-worker", self.name))
            .spawn(move || pool.work());
        if spawned.is_err() {
            log::error!("could not start a worker thread pool={}", self.name);
            let mut g = self.lock();
            g.threads -= 1;
            // With no thread left to take it, give the job back (the last one queued: it
            // is ours unless another caller queued after it, whose job then goes instead —
            // either way the caller hears of a job that will not run). Otherwise a live
            // thread takes it.
            if g.threads == 0 {
                if let Some(job) = g.queue.pop_back() {
                    return Err(job);
                }
            }
        }
        Ok(())
    }

    fn work(self: Arc<Self>) {
        loop {
            let job = {
                let mut g = self.lock();
                loop {
                    if let Some(j) = g.queue.pop_front() {
                        break j;
                    }
                    g.idle += 1;
                    let (ng, t) = self
                        .cv
                        .wait_timeout(g, self.idle_timeout)
                        .unwrap_or_else(|e| e.into_inner());
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

    /// Threads running now (busy or idle).
    pub fn threads(&self) -> usize {
        self.lock().threads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    const IDLE: Duration = Duration::from_secs(10);

    #[test]
    fn without_a_queue_it_refuses_past_the_limit() {
        let pool = Pool::new("t", 2, 0, IDLE);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let started = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let (rx, tx, started) = (release_rx.clone(), started_tx.clone(), started.clone());
            assert!(pool
                .spawn(Box::new(move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    tx.send(()).unwrap();
                    let _ = rx.lock().unwrap().recv();
                }))
                .is_ok());
        }
        // Both run (each holds a thread), so a third has neither a thread nor a queue.
        for _ in 0..2 {
            started_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("job started");
        }
        assert!(
            pool.spawn(Box::new(|| {})).is_err(),
            "third job accepted past the limit"
        );
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        let (tx, rx) = mpsc::channel();
        // Once a worker is idle again, a job is accepted.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let tx = tx.clone();
            if pool.spawn(Box::new(move || tx.send(()).unwrap())).is_ok() {
                break;
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert!(pool.threads() <= 2);
    }

    #[test]
    fn with_a_queue_jobs_wait_for_a_thread_up_to_its_length() {
        let pool = Pool::new("t", 2, 2, IDLE);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        for i in 0..4u32 {
            let (rx, tx, started) = (release_rx.clone(), done_tx.clone(), started_tx.clone());
            assert!(pool
                .spawn(Box::new(move || {
                    let _ = started.send(());
                    let _ = rx.lock().map(|r| r.recv());
                    let _ = tx.send(i);
                }))
                .is_ok());
            if i < 2 {
                // The first two hold the two threads before the next ones queue.
                started_rx
                    .recv_timeout(Duration::from_secs(5))
                    .expect("job started");
            }
        }
        // Two threads, two jobs waiting; a fifth finds the queue full.
        assert_eq!(pool.threads(), 2);
        assert!(
            pool.spawn(Box::new(|| {})).is_err(),
            "queue past its length"
        );
        for _ in 0..4 {
            release_tx.send(()).unwrap();
        }
        let mut got: Vec<u32> = (0..4)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2, 3]);
        assert!(pool.threads() <= 2);
    }
}
