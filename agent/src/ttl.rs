//! Sandbox timeouts: a schedule of deadlines, a clock that tests can drive, and the reaper
//! loop that hands expired sandboxes to the manager (which pauses or destroys them per
//! their policy and reports the change to ctl).
//!
//! Deadlines are wall-clock nanoseconds since the Unix epoch, because they are persisted
//! in sandbox records and reported to ctl (`expires_unix_ns`) and must survive an agent
//! restart. A wall-clock step therefore moves expiries with it; the reaper wakes at least
//! every [`TTL_TICK_MAX`] so a step forward is noticed.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::id::Uuid;

use crate::limits::{TTL_RETRY, TTL_TICK_MAX};

/// The source of "now".
pub trait Clock: Send + Sync {
    fn now_unix_ns(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ns(&self) -> i64 {
        unix_ns(SystemTime::now())
    }
}

/// Nanoseconds since the epoch (negative before it; saturating far from it).
pub fn unix_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct TestClock(AtomicI64);

impl TestClock {
    pub fn new(start_unix_ns: i64) -> TestClock {
        TestClock(AtomicI64::new(start_unix_ns))
    }
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(dur_ns(d), Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now_unix_ns(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn dur_ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// The deadline `timeout` after `now`.
pub fn deadline(now_unix_ns: i64, timeout: Duration) -> i64 {
    now_unix_ns.saturating_add(dur_ns(timeout))
}

/// Deadlines by sandbox, ordered by time.
#[derive(Debug, Default)]
pub struct Schedule {
    by_time: BTreeSet<(i64, Uuid)>,
    by_id: HashMap<Uuid, i64>,
}

impl Schedule {
    /// Sets (or moves) the deadline of `id`.
    pub fn set(&mut self, id: Uuid, at_unix_ns: i64) {
        if let Some(old) = self.by_id.insert(id, at_unix_ns) {
            self.by_time.remove(&(old, id));
        }
        self.by_time.insert((at_unix_ns, id));
        debug_assert_eq!(self.by_time.len(), self.by_id.len());
    }

    /// Removes the deadline of `id` (paused, destroyed); true if there was one.
    pub fn clear(&mut self, id: Uuid) -> bool {
        match self.by_id.remove(&id) {
            Some(at) => {
                self.by_time.remove(&(at, id));
                true
            }
            None => false,
        }
    }

    pub fn get(&self, id: Uuid) -> Option<i64> {
        self.by_id.get(&id).copied()
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<i64> {
        self.by_time.first().map(|(t, _)| *t)
    }

    /// Removes and returns every sandbox whose deadline is at or before `now`, earliest
    /// first.
    pub fn pop_due(&mut self, now_unix_ns: i64) -> Vec<Uuid> {
        let mut due = Vec::new();
        while let Some(&(t, id)) = self.by_time.first() {
            if t > now_unix_ns {
                break;
            }
            self.by_time.pop_first();
            self.by_id.remove(&id);
            due.push(id);
        }
        due
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// What the manager did with an expired sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Paused, destroyed, or no longer subject to a timeout.
    Done,
    /// Busy with another operation: try again after [`TTL_RETRY`].
    Busy,
}

/// The schedule shared between the manager (set/clear) and the reaper thread.
#[derive(Debug, Default)]
pub struct Reaper {
    schedule: Mutex<Schedule>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Reaper {
    pub fn new() -> Reaper {
        Reaper::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, id: Uuid, at_unix_ns: i64) {
        self.lock().set(id, at_unix_ns);
        self.changed.notify_all();
    }

    pub fn clear(&self, id: Uuid) {
        self.lock().clear(id);
    }

    pub fn get(&self, id: Uuid) -> Option<i64> {
        self.lock().get(id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// One pass: hands every due sandbox to `expire`; a busy one is retried later.
    /// Returns the sandboxes handed over.
    pub fn tick(&self, clock: &dyn Clock, expire: &dyn Fn(Uuid) -> Outcome) -> Vec<Uuid> {
        let now = clock.now_unix_ns();
        let due = self.lock().pop_due(now);
        for &id in &due {
            if expire(id) == Outcome::Busy {
                let mut s = self.lock();
                // A new deadline set meanwhile (ping) wins over the retry.
                if s.get(id).is_none() {
                    s.set(id, deadline(now, TTL_RETRY));
                }
            }
        }
        due
    }

    /// Runs until [`Reaper::stop`]: sleeps until the next deadline (at most
    /// [`TTL_TICK_MAX`]) or a change, then ticks.
    pub fn run(&self, clock: &dyn Clock, expire: &dyn Fn(Uuid) -> Outcome) {
        while !self.stop.load(Ordering::SeqCst) {
            self.tick(clock, expire);
            let s = self.lock();
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let now = clock.now_unix_ns();
            let wait = match s.next() {
                Some(t) if t <= now => continue,
                Some(t) => Duration::from_nanos((t - now) as u64).min(TTL_TICK_MAX),
                None => TTL_TICK_MAX,
            };
            // Spurious wake-ups only cause an early tick.
            let _ = self.changed.wait_timeout(s, wait);
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _g = self.lock();
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const S: i64 = 1_000_000_000;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn schedule_orders_moves_and_clears() {
        let mut s = Schedule::default();
        s.set(id(1), 30 * S);
        s.set(id(2), 10 * S);
        s.set(id(3), 20 * S);
        assert_eq!(s.next(), Some(10 * S));
        s.set(id(2), 40 * S); // ping moves it later
        assert_eq!(s.next(), Some(20 * S));
        assert!(s.clear(id(3)));
        assert!(!s.clear(id(3)));
        assert_eq!(s.pop_due(29 * S), Vec::<Uuid>::new());
        assert_eq!(s.pop_due(40 * S), vec![id(1), id(2)]);
        assert!(s.is_empty());
        assert_eq!(s.next(), None);
    }

    #[test]
    fn equal_deadlines_all_fire() {
        let mut s = Schedule::default();
        for n in 0..5 {
            s.set(id(n), S);
        }
        assert_eq!(s.pop_due(S).len(), 5);
    }

    #[test]
    fn reaper_expires_with_the_test_clock_and_ping_extends() {
        let clock = TestClock::new(1000 * S);
        let r = Reaper::new();
        let now = clock.now_unix_ns();
        r.set(id(1), deadline(now, Duration::from_secs(60)));
        r.set(id(2), deadline(now, Duration::from_secs(120)));
        let fired = Mutex::new(Vec::new());
        let expire = |u| {
            fired.lock().unwrap().push(u);
            Outcome::Done
        };
        clock.advance(Duration::from_secs(59));
        assert!(r.tick(&clock, &expire).is_empty());
        // Ping of 1 at t=59s with its 60 s timeout: now expires at 119 s.
        r.set(
            id(1),
            deadline(clock.now_unix_ns(), Duration::from_secs(60)),
        );
        clock.advance(Duration::from_secs(2));
        assert!(r.tick(&clock, &expire).is_empty());
        clock.advance(Duration::from_secs(58)); // t = 119 s
        assert_eq!(r.tick(&clock, &expire), vec![id(1)]);
        clock.advance(Duration::from_secs(1)); // t = 120 s
        assert_eq!(r.tick(&clock, &expire), vec![id(2)]);
        assert_eq!(*fired.lock().unwrap(), vec![id(1), id(2)]);
        assert!(r.is_empty());
    }

    #[test]
    fn busy_sandbox_is_retried_unless_pinged_meanwhile() {
        let clock = TestClock::new(0);
        let r = Reaper::new();
        r.set(id(1), S);
        clock.advance(Duration::from_secs(1));
        assert_eq!(r.tick(&clock, &|_| Outcome::Busy), vec![id(1)]);
        assert_eq!(r.get(id(1)), Some(S + TTL_RETRY.as_nanos() as i64));
        // Pinged while busy: the ping's deadline stays.
        r.set(id(2), S);
        let r2 = &r;
        let expire = move |u: Uuid| {
            r2.set(u, 500 * S);
            Outcome::Busy
        };
        clock.advance(Duration::from_secs(10));
        let fired = r.tick(&clock, &expire);
        assert_eq!(fired.len(), 2);
        assert_eq!(r.get(id(2)), Some(500 * S));
    }

    #[test]
    fn run_loop_fires_on_the_system_clock_and_stops() {
        let r = Arc::new(Reaper::new());
        let clock = SystemClock;
        let (tx, rx) = std::sync::mpsc::channel();
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            r2.run(&SystemClock, &move |u| {
                let _ = tx.send(u);
                Outcome::Done
            })
        });
        // Set after the loop sleeps: the condvar wakes it.
        std::thread::sleep(Duration::from_millis(50));
        r.set(
            id(7),
            deadline(clock.now_unix_ns(), Duration::from_millis(100)),
        );
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, id(7));
        r.stop();
        t.join().unwrap();
    }

    #[test]
    fn deadline_saturates() {
        assert_eq!(deadline(i64::MAX - 1, Duration::from_secs(1)), i64::MAX);
        assert_eq!(unix_ns(UNIX_EPOCH), 0);
    }
}
