//! Per-sandbox usage samples in bounded ring tiers (`Sandboxes/Samples`).
//!
//! The sampler ([`crate::sampler`]) reads each running sandbox's cumulative counters once a
//! second and hands them to [`Store::record`], which turns them into one-second samples and
//! folds those into coarser tiers aligned on the wall clock:
//!
//! | tier | step | kept | samples |
//! |---|---|---|---|
//! | fine | 1 s | 10 min | [`TIER_FINE_LEN`] |
//! | mid | 30 s | 2 h | [`TIER_MID_LEN`] |
//! | coarse | 5 min | 24 h | [`TIER_COARSE_LEN`] |
//!
//! Every ring is allocated once, at its full size, when a sandbox is first seen; nothing
//! grows afterwards. A sandbox whose VM is gone (paused, destroyed) is *frozen*: its rings
//! stay readable for [`FROZEN_RETAIN`] so ctl can store them, at most [`FROZEN_MAX`] of
//! them (the oldest frozen go first). Time comes from the caller, so tests drive a clock.
//!
//! It is not the Prometheus registry ([`crate::metrics`]): there are no per-sandbox labels
//! there, by design.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use proto::gen::wrenn::agent::v1 as pb;
use proto::id::Uuid;
use proto::Status;

use crate::limits::{
    FROZEN_MAX, FROZEN_RETAIN, SAMPLED_SANDBOXES_MAX, TIER_COARSE_LEN, TIER_COARSE_STEP_S,
    TIER_FINE_LEN, TIER_MID_LEN, TIER_MID_STEP_S,
};

const NS: i64 = 1_000_000_000;

/// Cumulative counters of one VM, read at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// CPU time since the VM's process started, microseconds.
    pub cpu_usec: u64,
    /// Resident memory now, bytes.
    pub memory_bytes: u64,
    /// Disk bytes allocated now.
    pub disk_bytes: u64,
    /// Tap byte counters since the tap was created.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// One sample as kept in a ring (the wire form is [`pb::UsageSample`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// End of the interval.
    pub end_unix_ns: i64,
    /// Seconds covered.
    pub step_s: u32,
    pub cpu_usec: u64,
    /// Sum of memory × seconds over the interval (divided by `step_s` on the way out).
    pub memory_byte_s: u64,
    pub disk_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

impl Sample {
    fn absorb(&mut self, s: &Sample) {
        self.end_unix_ns = s.end_unix_ns;
        self.step_s += s.step_s;
        self.cpu_usec += s.cpu_usec;
        self.memory_byte_s += s.memory_byte_s;
        self.disk_bytes = s.disk_bytes;
        self.net_rx_bytes += s.net_rx_bytes;
        self.net_tx_bytes += s.net_tx_bytes;
    }

    fn to_proto(self, step_s: u32) -> pb::UsageSample {
        pb::UsageSample {
            unix_ns: self.end_unix_ns,
            step_s: step_s.min(self.step_s.max(1)),
            cpu_usec: self.cpu_usec,
            memory_bytes: self.memory_byte_s / u64::from(self.step_s.max(1)),
            disk_bytes: self.disk_bytes,
            net_rx_bytes: self.net_rx_bytes,
            net_tx_bytes: self.net_tx_bytes,
        }
    }
}

/// One ring: fixed capacity, the oldest sample dropped for a new one.
#[derive(Debug)]
struct Ring {
    step_s: u32,
    ring: VecDeque<Sample>,
    cap: usize,
    /// The bucket being filled (coarser tiers only), and its index (end time / step).
    open: Option<(i64, Sample)>,
}

impl Ring {
    fn new(step_s: u32, cap: usize) -> Ring {
        Ring {
            step_s,
            ring: VecDeque::with_capacity(cap),
            cap,
            open: None,
        }
    }

    fn push(&mut self, s: Sample) {
        if self.ring.len() == self.cap {
            self.ring.pop_front();
        }
        self.ring.push_back(s);
        debug_assert!(self.ring.len() <= self.cap);
    }

    /// Folds a one-second sample into the bucket its end time falls in; a bucket closes
    /// when a sample of a later bucket arrives.
    fn fold(&mut self, s: &Sample) {
        let step_ns = i64::from(self.step_s) * NS;
        // Bucket k covers (k*step, (k+1)*step]: a sample ending exactly on a boundary
        // belongs to the bucket it closes.
        let k = (s.end_unix_ns - 1).div_euclid(step_ns);
        match &mut self.open {
            // The same bucket, or an earlier one after the clock stepped back.
            Some((open_k, acc)) if *open_k >= k => acc.absorb(s),
            open => {
                let done = open.replace((k, *s));
                if let Some((_, done)) = done {
                    self.push(done);
                }
            }
        }
    }

    /// Closes the open bucket (the VM is gone: no more samples will fill it). It stays a
    /// sample shorter than the step; a bucket the next VM opens at the same boundary is a
    /// separate sample, so no second is counted twice.
    fn close(&mut self) {
        if let Some((_, s)) = self.open.take() {
            self.push(s);
        }
    }

    /// Closed samples ending after `since` (an open bucket is not returned: it would be
    /// returned again, larger, once closed, and a reader that stores samples would count
    /// its seconds twice).
    fn collect(&self, since_unix_ns: i64) -> Vec<pb::UsageSample> {
        self.ring
            .iter()
            .filter(|s| s.end_unix_ns > since_unix_ns)
            .map(|s| s.to_proto(self.step_s))
            .collect()
    }

    /// The time the oldest kept sample starts.
    fn covers_from(&self) -> Option<i64> {
        self.ring
            .front()
            .or(self.open.as_ref().map(|(_, s)| s))
            .map(|s| s.end_unix_ns - i64::from(s.step_s) * NS)
    }
}

/// Identity of the VM process the previous reading came from, so a new VM (after a resume)
/// starts its counters from zero instead of producing a negative delta.
pub type VmKey = (i32, u64);

/// Everything kept for one sandbox.
#[derive(Debug)]
struct Series {
    fine: Ring,
    mid: Ring,
    coarse: Ring,
    last: Option<(VmKey, i64, Reading)>,
    /// When the VM was last seen gone (None while sampled).
    frozen_at_unix_ns: Option<i64>,
}

impl Series {
    fn new() -> Series {
        Series {
            fine: Ring::new(1, TIER_FINE_LEN),
            mid: Ring::new(TIER_MID_STEP_S, TIER_MID_LEN),
            coarse: Ring::new(TIER_COARSE_STEP_S, TIER_COARSE_LEN),
            last: None,
            frozen_at_unix_ns: None,
        }
    }

    fn record(&mut self, vm: VmKey, now_unix_ns: i64, r: Reading) {
        self.frozen_at_unix_ns = None;
        let (base, secs) = match self.last {
            Some((k, t, prev)) if k == vm && now_unix_ns > t => {
                // Whole seconds since the last reading (at least 1: the sampler's tick).
                let secs = ((now_unix_ns - t + NS / 2) / NS).max(1);
                (prev, secs)
            }
            // Same VM but the clock did not move: nothing to add.
            Some((k, _, _)) if k == vm => return,
            // A new VM: its counters start at zero (CPU and traffic since its start).
            _ => (Reading::default(), 1),
        };
        self.last = Some((vm, now_unix_ns, r));
        let secs = u32::try_from(secs).unwrap_or(u32::MAX);
        let s = Sample {
            end_unix_ns: now_unix_ns,
            step_s: secs,
            cpu_usec: r.cpu_usec.saturating_sub(base.cpu_usec),
            memory_byte_s: r.memory_bytes.saturating_mul(u64::from(secs)),
            disk_bytes: r.disk_bytes,
            net_rx_bytes: r.net_rx_bytes.saturating_sub(base.net_rx_bytes),
            net_tx_bytes: r.net_tx_bytes.saturating_sub(base.net_tx_bytes),
        };
        self.fine.push(s);
        self.mid.fold(&s);
        self.coarse.fold(&s);
    }

    fn freeze(&mut self, now_unix_ns: i64) {
        if self.frozen_at_unix_ns.is_none() {
            self.frozen_at_unix_ns = Some(now_unix_ns);
            // The next reading (after a resume) is a new VM.
            self.last = None;
            self.mid.close();
            self.coarse.close();
        }
    }

    fn tier(&self, step_s: u32) -> Option<&Ring> {
        match step_s {
            1 => Some(&self.fine),
            TIER_MID_STEP_S => Some(&self.mid),
            TIER_COARSE_STEP_S => Some(&self.coarse),
            _ => None,
        }
    }

    /// The finest tier whose oldest sample reaches back to `since` (the coarsest when none
    /// does).
    fn best_tier(&self, since_unix_ns: i64) -> &Ring {
        if since_unix_ns == 0 {
            return &self.coarse;
        }
        [&self.fine, &self.mid]
            .into_iter()
            .find(|r| r.covers_from().is_some_and(|t| t <= since_unix_ns))
            .unwrap_or(&self.coarse)
    }
}

/// The samples of every sandbox on this host.
#[derive(Debug, Default)]
pub struct Store {
    series: Mutex<HashMap<Uuid, Series>>,
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Series>> {
        self.series.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one reading of sandbox `id`'s VM `vm` at `now`. A sandbox beyond
    /// [`SAMPLED_SANDBOXES_MAX`] makes room by dropping the oldest frozen one; when none is
    /// frozen the reading is dropped (logged once per call by the caller's count).
    pub fn record(&self, id: Uuid, vm: VmKey, now_unix_ns: i64, r: Reading) -> bool {
        let mut m = self.map();
        if !m.contains_key(&id) {
            if m.len() >= SAMPLED_SANDBOXES_MAX && !evict_oldest_frozen(&mut m) {
                return false;
            }
            m.insert(id, Series::new());
        }
        if let Some(s) = m.get_mut(&id) {
            s.record(vm, now_unix_ns, r);
        }
        true
    }

    /// Freezes every sandbox not in `live` (its VM is gone), and forgets frozen ones older
    /// than [`FROZEN_RETAIN`] or beyond [`FROZEN_MAX`].
    pub fn sweep(&self, live: &[Uuid], now_unix_ns: i64) {
        let mut m = self.map();
        for (id, s) in m.iter_mut() {
            if !live.contains(id) {
                s.freeze(now_unix_ns);
            }
        }
        let retain_ns = i64::try_from(FROZEN_RETAIN.as_nanos()).unwrap_or(i64::MAX);
        m.retain(|_, s| {
            s.frozen_at_unix_ns
                .is_none_or(|t| now_unix_ns.saturating_sub(t) < retain_ns)
        });
        while m.values().filter(|s| s.frozen_at_unix_ns.is_some()).count() > FROZEN_MAX {
            evict_oldest_frozen(&mut m);
        }
    }

    /// Freezes `id` now (its VM is gone: paused, destroyed), closing its open buckets, so a
    /// reader right after a pause sees every second up to it.
    pub fn freeze(&self, id: Uuid, now_unix_ns: i64) {
        if let Some(s) = self.map().get_mut(&id) {
            s.freeze(now_unix_ns);
        }
    }

    /// Samples of `id` ending after `since` from tier `step_s` (0 = the best tier).
    pub fn samples(
        &self,
        id: Uuid,
        since_unix_ns: i64,
        step_s: u32,
    ) -> Result<pb::SandboxSamplesResponse, Status> {
        let m = self.map();
        let s = m
            .get(&id)
            .ok_or_else(|| Status::not_found("no samples for this sandbox on this host"))?;
        let ring = match step_s {
            0 => s.best_tier(since_unix_ns),
            n => s.tier(n).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "step_s={n}: the tiers are 1, {TIER_MID_STEP_S} and {TIER_COARSE_STEP_S}"
                ))
            })?,
        };
        Ok(pb::SandboxSamplesResponse {
            samples: ring.collect(since_unix_ns),
            step_s: ring.step_s,
            live: s.frozen_at_unix_ns.is_none(),
        })
    }

    /// Sandboxes with samples (tests, the agent's gauge).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn evict_oldest_frozen(m: &mut HashMap<Uuid, Series>) -> bool {
    let oldest = m
        .iter()
        .filter_map(|(id, s)| s.frozen_at_unix_ns.map(|t| (t, *id)))
        .min();
    match oldest {
        Some((_, id)) => {
            m.remove(&id);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_100 * NS; // a multiple of 300 s
    const _: () = assert!(T0 % (300 * NS) == 0);
    const VM: VmKey = (100, 7);

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// One reading a second for `secs` seconds from `t0`: 0.5 CPU-seconds a second, memory
    /// 100 MiB (200 MiB in odd seconds), disk growing 1 KiB a second, 10/20 bytes of
    /// traffic a second.
    fn feed(st: &Store, sb: Uuid, t0: i64, from_s: u64, secs: u64) {
        for i in from_s..from_s + secs {
            let mem = if i % 2 == 1 { 200 << 20 } else { 100 << 20 };
            let r = Reading {
                cpu_usec: (i + 1) * 500_000,
                memory_bytes: mem,
                disk_bytes: (i + 1) * 1024,
                net_rx_bytes: (i + 1) * 10,
                net_tx_bytes: (i + 1) * 20,
            };
            assert!(st.record(sb, VM, t0 + (i as i64 + 1) * NS, r));
        }
    }

    #[test]
    fn fine_tier_keeps_ten_minutes_of_one_second_samples() {
        let st = Store::new();
        feed(&st, id(1), T0, 0, 700);
        let r = st.samples(id(1), 0, 1).unwrap();
        assert_eq!(r.step_s, 1);
        assert_eq!(r.samples.len(), TIER_FINE_LEN);
        assert_eq!(TIER_FINE_LEN, 600);
        let first = &r.samples[0];
        assert_eq!(first.unix_ns, T0 + 101 * NS, "the oldest 100 were dropped");
        assert!(r
            .samples
            .iter()
            .all(|s| s.cpu_usec == 500_000 && s.step_s == 1));
        assert!(r
            .samples
            .iter()
            .all(|s| s.net_rx_bytes == 10 && s.net_tx_bytes == 20));
        assert!(r.live);
    }

    #[test]
    fn mid_and_coarse_tiers_sum_counters_and_average_memory() {
        let st = Store::new();
        // Three hours.
        feed(&st, id(1), T0, 0, 3 * 3600);
        let mid = st.samples(id(1), 0, 30).unwrap();
        // 2 h of closed buckets; the open one (full: the last sample ends on a boundary,
        // but no later sample closed it yet) is not returned.
        assert_eq!(mid.samples.len(), TIER_MID_LEN);
        let s = &mid.samples[5];
        assert_eq!(s.step_s, 30);
        assert_eq!(s.cpu_usec, 15_000_000);
        assert_eq!(s.memory_bytes, 150 << 20, "mean of 100 and 200 MiB");
        assert_eq!(s.net_rx_bytes, 300);
        assert_eq!((s.unix_ns - T0) % (30 * NS), 0, "aligned on the wall clock");
        let last = mid.samples.last().unwrap();
        assert_eq!(last.unix_ns, T0 + (3 * 3600 - 30) * NS);
        assert_eq!(last.disk_bytes, (3 * 3600 - 30) * 1024);
        let coarse = st.samples(id(1), 0, 300).unwrap();
        assert_eq!(
            coarse.samples.len(),
            35,
            "3 h of 5-minute samples but the open one"
        );
        assert!(coarse
            .samples
            .iter()
            .all(|s| s.cpu_usec == 150_000_000 && s.step_s == 300));
        // Frozen (paused): the open buckets close and are returned.
        st.freeze(id(1), T0 + (3 * 3600 + 1) * NS);
        let mid = st.samples(id(1), 0, 30).unwrap();
        assert_eq!(mid.samples.last().unwrap().unix_ns, T0 + 3 * 3600 * NS);
        assert_eq!(st.samples(id(1), 0, 300).unwrap().samples.len(), 36);
        // 24 h bound.
        let st = Store::new();
        feed(&st, id(2), T0, 0, 25 * 3600);
        let coarse = st.samples(id(2), 0, 300).unwrap();
        assert_eq!(coarse.samples.len(), TIER_COARSE_LEN);
        assert_eq!(TIER_COARSE_LEN * 300, 24 * 3600);
        assert_eq!(TIER_MID_LEN * 30, 2 * 3600);
    }

    #[test]
    fn best_tier_is_the_finest_covering_the_range() {
        let st = Store::new();
        feed(&st, id(1), T0, 0, 3 * 3600);
        let end = T0 + 3 * 3600 * NS;
        assert_eq!(st.samples(id(1), end - 600 * NS, 0).unwrap().step_s, 1);
        let r = st.samples(id(1), end - 601 * NS, 0).unwrap();
        assert_eq!(r.step_s, 30);
        assert_eq!(
            st.samples(id(1), end - 3 * 3600 * NS, 0).unwrap().step_s,
            300
        );
        assert_eq!(st.samples(id(1), 0, 0).unwrap().step_s, 300);
        // `since` filters.
        let r = st.samples(id(1), end - 10 * NS, 1).unwrap();
        assert_eq!(r.samples.len(), 10);
        assert_eq!(
            st.samples(id(1), 0, 7).unwrap_err().code,
            proto::Code::InvalidArgument
        );
        assert_eq!(
            st.samples(id(9), 0, 0).unwrap_err().code,
            proto::Code::NotFound
        );
    }

    #[test]
    fn a_new_vm_counts_from_zero_and_a_frozen_series_stays_readable() {
        let st = Store::new();
        feed(&st, id(1), T0, 0, 10);
        st.sweep(&[], T0 + 11 * NS);
        let r = st.samples(id(1), 0, 1).unwrap();
        assert!(!r.live);
        assert_eq!(r.samples.len(), 10);
        // Resumed: a new process whose counters restarted below the old ones.
        let r2 = Reading {
            cpu_usec: 300_000,
            memory_bytes: 1 << 20,
            disk_bytes: 4096,
            net_rx_bytes: 5,
            net_tx_bytes: 6,
        };
        st.record(id(1), (101, 9), T0 + 100 * NS, r2);
        let r = st.samples(id(1), 0, 1).unwrap();
        assert!(r.live);
        let last = r.samples.last().unwrap();
        assert_eq!(
            (last.cpu_usec, last.net_rx_bytes, last.step_s),
            (300_000, 5, 1)
        );
        // Frozen ones expire.
        st.sweep(&[], T0 + 200 * NS);
        let retain = i64::try_from(FROZEN_RETAIN.as_nanos()).unwrap();
        st.sweep(&[], T0 + 200 * NS + retain);
        assert!(st.is_empty());
    }

    #[test]
    fn a_pause_mid_bucket_and_a_resume_count_each_second_once() {
        let st = Store::new();
        // 45 s, paused, then resumed 100 s later for 20 s: the 30-s tier must hold exactly
        // 65 seconds and 65 × 0.5 CPU-seconds.
        feed(&st, id(1), T0, 0, 45);
        st.freeze(id(1), T0 + 46 * NS);
        for i in 0..20u64 {
            let r = Reading {
                cpu_usec: (i + 1) * 500_000,
                ..Reading::default()
            };
            st.record(id(1), (200, 1), T0 + (145 + i as i64 + 1) * NS, r);
        }
        st.freeze(id(1), T0 + 170 * NS);
        let mid = st.samples(id(1), 0, 30).unwrap().samples;
        let secs: u32 = mid.iter().map(|s| s.step_s).sum();
        let cpu: u64 = mid.iter().map(|s| s.cpu_usec).sum();
        assert_eq!((secs, cpu), (65, 65 * 500_000), "{mid:?}");
    }

    #[test]
    fn the_number_of_series_is_bounded() {
        let st = Store::new();
        for n in 0..SAMPLED_SANDBOXES_MAX as u128 {
            assert!(st.record(id(n), VM, T0, Reading::default()));
        }
        assert!(
            !st.record(id(1 << 64), VM, T0, Reading::default()),
            "full, none frozen"
        );
        let live: Vec<Uuid> = (1..SAMPLED_SANDBOXES_MAX as u128).map(id).collect();
        st.sweep(&live, T0 + NS);
        assert!(st.record(id(1 << 64), VM, T0 + 2 * NS, Reading::default()));
        assert!(st.samples(id(0), 0, 0).is_err(), "the frozen one made room");
        assert_eq!(st.len(), SAMPLED_SANDBOXES_MAX);
    }
}
