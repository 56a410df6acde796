//! A bounded pool of worker threads for handlers that block.
//!
//! Threads are started on demand up to `max` and exit after `WORKER_IDLE` without work, so an
//! idle daemon holds none. When every thread is busy and the limit is reached, `spawn`
//! refuses the job instead of queueing it without bound.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use crate::limits::WORKER_IDLE;

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Inner {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

pub(crate) struct Pool {
    name: String,
    max: usize,
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl Pool {
    pub fn new(name: &str, max: usize) -> Arc<Pool> {
        assert!(max > 0);
        Arc::new(Pool {
            name: name.to_owned(),
            max,
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                threads: 0,
                idle: 0,
            }),
            cv: Condvar::new(),
        })
    }

    /// Runs `job` on a worker. Returns the job back when the pool is saturated.
    pub fn spawn(self: &Arc<Self>, job: Job) -> Result<(), Job> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.idle > g.queue.len() {
            g.queue.push_back(job);
            self.cv.notify_one();
            return Ok(());
        }
        if g.threads >= self.max {
            return Err(job);
        }
        g.threads += 1;
        drop(g);
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-worker", self.name))
            .spawn(move || pool.work(Some(job)));
        if spawned.is_err() {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.threads -= 1;
            // The job moved into the failed closure and is gone with it; the caller's
            // call is dropped, whose Drop answers the peer with an error.
            log::error!("could not start a worker thread pool={}", self.name);
        }
        Ok(())
    }

    fn work(self: Arc<Self>, mut job: Option<Job>) {
        loop {
            if let Some(j) = job.take() {
                j();
            }
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.idle += 1;
            loop {
                if let Some(j) = g.queue.pop_front() {
                    g.idle -= 1;
                    job = Some(j);
                    break;
                }
                let (ng, timeout) = self
                    .cv
                    .wait_timeout(g, WORKER_IDLE)
                    .unwrap_or_else(|e| e.into_inner());
                g = ng;
                if timeout.timed_out() && g.queue.is_empty() {
                    g.idle -= 1;
                    g.threads -= 1;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    #[test]
    fn runs_jobs_and_refuses_past_the_limit() {
        let pool = Pool::new("t", 2);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let started = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let rx = release_rx.clone();
            let started = started.clone();
            assert!(pool
                .spawn(Box::new(move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    let _ = rx.lock().unwrap().recv();
                }))
                .is_ok());
        }
        assert!(
            pool.spawn(Box::new(|| {})).is_err(),
            "third job accepted past the limit"
        );
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        let (tx, rx) = mpsc::channel();
        // Once a worker is idle again, a job is accepted.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let tx = tx.clone();
            if pool.spawn(Box::new(move || tx.send(()).unwrap())).is_ok() {
                break;
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }
}
