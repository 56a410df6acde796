//! Guest clock synchronisation without chronyd.
//!
//! Source: the KVM PTP clock (`/dev/ptp0`, CONFIG_PTP_1588_CLOCK_KVM), which reads the
//! host's CLOCK_REALTIME through a hypercall. envd asks it for (system, device, system)
//! sample triples — `PTP_SYS_OFFSET_PRECISE` (one cross-timestamp), else
//! `PTP_SYS_OFFSET_EXTENDED`, else `PTP_SYS_OFFSET` — estimates the offset, then steps the
//! clock (`clock_settime`) when the offset exceeds [`CLOCK_STEP_THRESHOLD`], else slews it
//! (`adjtimex`, single-shot offset). Without the device, the wall time the host sent with
//! init/resumed is used (coarser: it includes the message's transit time).
//!
//! The live PTP path cannot run on the development machines (the driver hangs under their
//! nested hypervisor, so test guests boot without /dev/ptp0); it is exercised on real hosts.
//! The offset math is pure and unit-tested with synthetic samples.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::limits::{CLOCK_SAMPLES, CLOCK_STEP_THRESHOLD};

// ---- linux/ptp_clock.h ------------------------------------------------------------------

const PTP_MAX_SAMPLES: usize = 25;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct PtpClockTime {
    sec: i64,
    nsec: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PtpSysOffset {
    n_samples: u32,
    rsv: [u32; 3],
    /// sys, phc, sys, phc, ..., sys: 2n+1 timestamps.
    ts: [PtpClockTime; 2 * PTP_MAX_SAMPLES + 1],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PtpSysOffsetExtended {
    n_samples: u32,
    rsv: [u32; 3],
    /// [sys before, phc, sys after] per sample.
    ts: [[PtpClockTime; 3]; PTP_MAX_SAMPLES],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PtpSysOffsetPrecise {
    device: PtpClockTime,
    sys_realtime: PtpClockTime,
    sys_monoraw: PtpClockTime,
    rsv: [u32; 4],
}

const _: () = assert!(std::mem::size_of::<PtpClockTime>() == 16);
const _: () = assert!(std::mem::size_of::<PtpSysOffset>() == 832);
const _: () = assert!(std::mem::size_of::<PtpSysOffsetExtended>() == 1216);
const _: () = assert!(std::mem::size_of::<PtpSysOffsetPrecise>() == 64);

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` as in asm-generic/ioctl.h.
const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << 14));
    (dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

const PTP_CLK_MAGIC: u8 = b'=';
const PTP_SYS_OFFSET: u32 = ioc(
    IOC_WRITE,
    PTP_CLK_MAGIC,
    5,
    std::mem::size_of::<PtpSysOffset>(),
);
const PTP_SYS_OFFSET_PRECISE: u32 = ioc(
    IOC_READ | IOC_WRITE,
    PTP_CLK_MAGIC,
    8,
    std::mem::size_of::<PtpSysOffsetPrecise>(),
);
const PTP_SYS_OFFSET_EXTENDED: u32 = ioc(
    IOC_READ | IOC_WRITE,
    PTP_CLK_MAGIC,
    9,
    std::mem::size_of::<PtpSysOffsetExtended>(),
);
// The values the kernel headers produce (checked against linux/ptp_clock.h).
const _: () = assert!(PTP_SYS_OFFSET == 0x4340_3d05);
const _: () = assert!(PTP_SYS_OFFSET_PRECISE == 0xc040_3d08);
const _: () = assert!(PTP_SYS_OFFSET_EXTENDED == 0xc4c0_3d09);

fn ns(t: PtpClockTime) -> i128 {
    t.sec as i128 * 1_000_000_000 + t.nsec as i128
}

// ---- offset math ------------------------------------------------------------------------

/// One cross-timestamp: system time read before and after the device's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub sys_before_ns: i128,
    pub device_ns: i128,
    pub sys_after_ns: i128,
}

/// Result of a sync measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Guest clock minus reference clock.
    pub offset_ns: i64,
    /// Half the narrowest sample window: the measurement's uncertainty.
    pub uncertainty_ns: i64,
    /// Samples that survived outlier rejection.
    pub used: usize,
}

/// A window above this means the system clock moved (was stepped) during the sample or the
/// vCPU was descheduled: the sample says nothing useful.
const SAMPLE_WINDOW_MAX_NS: i128 = 10_000_000;

/// Estimates the offset: drop samples whose window is negative (the clock jumped back) or
/// huge (it jumped forward, or we were preempted); keep those whose window is within twice
/// the narrowest plus 1 µs (the best samples); reject offsets further than 4 MADs (at least
/// the best window) from their median (a clock step between samples makes a cluster of its
/// own); return the median of the rest.
pub fn estimate(samples: &[Sample]) -> Option<Estimate> {
    let good: Vec<(i128, i128)> = samples
        .iter()
        .filter_map(|s| {
            let window = s.sys_after_ns - s.sys_before_ns;
            if !(0..=SAMPLE_WINDOW_MAX_NS).contains(&window) {
                return None;
            }
            let mid = s.sys_before_ns + window / 2;
            Some((window, mid - s.device_ns))
        })
        .collect();
    let best_window = good.iter().map(|g| g.0).min()?;
    let mut offsets: Vec<i128> = good
        .iter()
        .filter(|g| g.0 <= 2 * best_window + 1_000)
        .map(|g| g.1)
        .collect();
    let med = median(&mut offsets);
    let mut dev: Vec<i128> = offsets.iter().map(|o| (o - med).abs()).collect();
    let mad = median(&mut dev);
    let limit = (4 * mad).max(best_window).max(1_000);
    let mut kept: Vec<i128> = offsets
        .into_iter()
        .filter(|o| (o - med).abs() <= limit)
        .collect();
    let used = kept.len();
    let offset = median(&mut kept);
    Some(Estimate {
        offset_ns: offset.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        uncertainty_ns: (best_window / 2) as i64,
        used,
    })
}

/// Median (lower median for even counts); the slice is sorted in place. Empty: 0.
fn median(v: &mut [i128]) -> i128 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

/// What to do about an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// Set the clock back by this many ns (negative: forward).
    Step(i64),
    /// Slew by this many µs (adjtimex single-shot offset, sign as the correction).
    Slew(i64),
}

/// Chooses step or slew for an offset (guest minus reference).
pub fn decide(offset_ns: i64, step_threshold: Duration) -> Action {
    if offset_ns.unsigned_abs() >= step_threshold.as_nanos() as u64 {
        Action::Step(offset_ns)
    } else if offset_ns.unsigned_abs() >= 1_000 {
        Action::Slew(-offset_ns / 1_000)
    } else {
        Action::None
    }
}

// ---- device access ----------------------------------------------------------------------

#[derive(Debug)]
pub enum Error {
    Open {
        path: String,
        source: io::Error,
    },
    Ioctl {
        which: &'static str,
        source: io::Error,
    },
    NoSamples,
    Adjust {
        which: &'static str,
        source: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open { path, .. } => write!(f, "open {path}"),
            Error::Ioctl { which, .. } => write!(f, "ioctl {which}"),
            Error::NoSamples => write!(f, "no usable clock samples"),
            Error::Adjust { which, .. } => write!(f, "{which}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Open { source, .. }
            | Error::Ioctl { source, .. }
            | Error::Adjust { source, .. } => Some(source),
            Error::NoSamples => None,
        }
    }
}

fn ioctl_precise(fd: BorrowedFd<'_>) -> io::Result<Sample> {
    let mut arg = PtpSysOffsetPrecise::default();
    // SAFETY: the request number matches the struct type and size (asserted above); the
    // kernel writes into `arg`, which is valid for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), PTP_SYS_OFFSET_PRECISE as _, &mut arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let sys = ns(arg.sys_realtime);
    Ok(Sample {
        sys_before_ns: sys,
        device_ns: ns(arg.device),
        sys_after_ns: sys,
    })
}

fn ioctl_extended(fd: BorrowedFd<'_>, n: u32) -> io::Result<Vec<Sample>> {
    let mut arg = PtpSysOffsetExtended {
        n_samples: n,
        rsv: [0; 3],
        ts: [[PtpClockTime::default(); 3]; PTP_MAX_SAMPLES],
    };
    // SAFETY: as ioctl_precise; n_samples <= PTP_MAX_SAMPLES (CLOCK_SAMPLES is asserted).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), PTP_SYS_OFFSET_EXTENDED as _, &mut arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(arg.ts[..n as usize]
        .iter()
        .map(|t| Sample {
            sys_before_ns: ns(t[0]),
            device_ns: ns(t[1]),
            sys_after_ns: ns(t[2]),
        })
        .collect())
}

fn ioctl_basic(fd: BorrowedFd<'_>, n: u32) -> io::Result<Vec<Sample>> {
    let mut arg = PtpSysOffset {
        n_samples: n,
        rsv: [0; 3],
        ts: [PtpClockTime::default(); 2 * PTP_MAX_SAMPLES + 1],
    };
    // SAFETY: as ioctl_precise.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), PTP_SYS_OFFSET as _, &mut arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(samples_from_basic(&arg.ts[..2 * n as usize + 1]))
}

/// sys, phc, sys, phc, ..., sys -> triples sharing the system reads between them.
fn samples_from_basic(ts: &[PtpClockTime]) -> Vec<Sample> {
    (0..ts.len() / 2)
        .map(|i| Sample {
            sys_before_ns: ns(ts[2 * i]),
            device_ns: ns(ts[2 * i + 1]),
            sys_after_ns: ns(ts[2 * i + 2]),
        })
        .collect()
}

/// Measures the offset between CLOCK_REALTIME and the PTP clock at `path`.
pub fn measure_ptp(path: &Path) -> Result<Estimate, Error> {
    let f = File::open(path).map_err(|source| Error::Open {
        path: path.display().to_string(),
        source,
    })?;
    let fd = f.as_fd();
    let mut samples = Vec::new();
    // PRECISE needs hardware cross-timestamping; the KVM driver supports it only on some
    // hosts. Take several and let the estimator pick.
    for _ in 0..CLOCK_SAMPLES {
        match ioctl_precise(fd) {
            Ok(s) => samples.push(s),
            Err(_) => break,
        }
    }
    if samples.is_empty() {
        samples = match ioctl_extended(fd, CLOCK_SAMPLES) {
            Ok(s) => s,
            Err(_) => ioctl_basic(fd, CLOCK_SAMPLES).map_err(|source| Error::Ioctl {
                which: "PTP_SYS_OFFSET",
                source,
            })?,
        };
    }
    estimate(&samples).ok_or(Error::NoSamples)
}

/// Applies an action to CLOCK_REALTIME (needs CAP_SYS_TIME).
pub fn apply(action: Action) -> Result<(), Error> {
    match action {
        Action::None => Ok(()),
        Action::Step(offset_ns) => {
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes a timespec into `now`.
            let r = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
            if r < 0 {
                return Err(Error::Adjust {
                    which: "clock_gettime",
                    source: io::Error::last_os_error(),
                });
            }
            let t = now.tv_sec as i128 * 1_000_000_000 + now.tv_nsec as i128 - offset_ns as i128;
            let ts = libc::timespec {
                tv_sec: t.div_euclid(1_000_000_000) as libc::time_t,
                tv_nsec: t.rem_euclid(1_000_000_000) as libc::c_long,
            };
            // SAFETY: clock_settime reads a valid timespec.
            let r = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
            if r < 0 {
                return Err(Error::Adjust {
                    which: "clock_settime",
                    source: io::Error::last_os_error(),
                });
            }
            Ok(())
        }
        Action::Slew(us) => {
            // SAFETY: timex is plain data; zeroed is a valid "change nothing" value.
            let mut tx: libc::timex = unsafe { std::mem::zeroed() };
            tx.modes = libc::ADJ_OFFSET_SINGLESHOT as _;
            tx.offset = us as _;
            // SAFETY: adjtimex reads and writes the timex it is given.
            let r = unsafe { libc::adjtimex(&mut tx) };
            if r < 0 {
                return Err(Error::Adjust {
                    which: "adjtimex",
                    source: io::Error::last_os_error(),
                });
            }
            Ok(())
        }
    }
}

/// The wall clock in ns since the epoch.
pub fn now_unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Where the time came from at the last sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    None,
    Ptp,
    HostWallTime,
}

/// The last sync, for metrics and replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Synced {
    pub offset_ns: i64,
    pub source: Source,
    pub at_unix_ns: i64,
}

/// A host wall time is taken as "now" minus nothing: its transit time (up to a second or
/// more through a freshly restored VM) is unknown, so only larger differences are stepped.
pub const WALL_STEP_THRESHOLD: Duration = Duration::from_secs(2);

/// Clock state shared by the services.
pub struct Clock {
    ptp_path: std::path::PathBuf,
    last: Mutex<Synced>,
    /// Actually change the system clock (off in tests on a shared host).
    adjust: bool,
}

impl Clock {
    pub fn new(ptp_path: &Path, adjust: bool) -> Clock {
        Clock {
            ptp_path: ptp_path.to_path_buf(),
            last: Mutex::new(Synced {
                offset_ns: 0,
                source: Source::None,
                at_unix_ns: 0,
            }),
            adjust,
        }
    }

    pub fn last(&self) -> Synced {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Syncs from the PTP clock if present, else from `host_wall_ns` (0 = none).
    pub fn sync(&self, host_wall_ns: i64) -> Synced {
        let ptp = measure_ptp(&self.ptp_path);
        let (offset_ns, source, action) = match ptp {
            Ok(e) => (
                e.offset_ns,
                Source::Ptp,
                decide(e.offset_ns, CLOCK_STEP_THRESHOLD),
            ),
            Err(e) => {
                if host_wall_ns == 0 {
                    log::debug!("clock not synced error={e}");
                    return self.last();
                }
                let off = now_unix_ns().saturating_sub(host_wall_ns);
                let action = match decide(off, WALL_STEP_THRESHOLD) {
                    Action::Step(s) => Action::Step(s),
                    _ => Action::None,
                };
                (off, Source::HostWallTime, action)
            }
        };
        if self.adjust {
            if let Err(e) = apply(action) {
                log::warn!("clock adjust failed action={action:?} error={e}");
            } else if action != Action::None {
                log::info!(
                    "clock adjusted source={source:?} offset_ns={offset_ns} action={action:?}"
                );
            }
        }
        let s = Synced {
            offset_ns,
            source,
            at_unix_ns: now_unix_ns(),
        };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = s;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small seeded generator (xorshift) so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn range(&mut self, lo: i128, hi: i128) -> i128 {
            lo + (self.next() % (hi - lo) as u64) as i128
        }
    }

    /// Samples of a guest that is `offset` ns ahead, windows of 1–3 µs.
    fn samples(rng: &mut Rng, n: usize, offset: i128) -> Vec<Sample> {
        let mut t: i128 = 1_700_000_000_000_000_000;
        (0..n)
            .map(|_| {
                t += 10_000;
                let w = rng.range(1_000, 3_000);
                let at = rng.range(0, w);
                Sample {
                    sys_before_ns: t,
                    device_ns: t + at - offset,
                    sys_after_ns: t + w,
                }
            })
            .collect()
    }

    #[test]
    fn recovers_the_offset() {
        for seed in 1..50u64 {
            let mut rng = Rng(seed);
            let off = rng.range(-5_000_000_000, 5_000_000_000);
            let e = estimate(&samples(&mut rng, 15, off)).unwrap();
            assert!(
                (e.offset_ns as i128 - off).abs() <= 1_500,
                "seed {seed}: {e:?} vs {off}"
            );
        }
    }

    #[test]
    fn rejects_outliers_and_clock_jumps() {
        let mut rng = Rng(7);
        let off = 3_000_000;
        let mut s = samples(&mut rng, 15, off);
        // A descheduled vCPU: a wide window with a wild midpoint.
        s[3].sys_after_ns += 5_000_000;
        // The clock jumped back inside a sample: negative window.
        s[5].sys_after_ns = s[5].sys_before_ns - 1_000_000_000;
        // The clock was stepped by 2 s before the last four samples: narrow windows but a
        // different offset — a minority cluster the median must ignore.
        for x in &mut s[11..] {
            x.sys_before_ns += 2_000_000_000;
            x.sys_after_ns += 2_000_000_000;
        }
        let e = estimate(&s).unwrap();
        assert!((e.offset_ns as i128 - off).abs() <= 1_500, "{e:?}");
        assert!(e.used <= 11);
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(estimate(&[]), None);
        let back = Sample {
            sys_before_ns: 10,
            device_ns: 5,
            sys_after_ns: 9,
        };
        assert_eq!(estimate(&[back]), None);
        let precise = Sample {
            sys_before_ns: 1_000,
            device_ns: 400,
            sys_after_ns: 1_000,
        };
        let e = estimate(&[precise]).unwrap();
        assert_eq!((e.offset_ns, e.uncertainty_ns, e.used), (600, 0, 1));
    }

    #[test]
    fn basic_layout_shares_system_reads() {
        let t = |s: i64| PtpClockTime {
            sec: s,
            nsec: 0,
            reserved: 0,
        };
        let s = samples_from_basic(&[t(1), t(2), t(3), t(4), t(5)]);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].sys_before_ns, 3_000_000_000);
        assert_eq!(s[1].device_ns, 4_000_000_000);
        assert_eq!(s[1].sys_after_ns, 5_000_000_000);
    }

    #[test]
    fn step_or_slew() {
        let th = CLOCK_STEP_THRESHOLD;
        assert_eq!(decide(500, th), Action::None);
        assert_eq!(decide(50_000, th), Action::Slew(-50));
        assert_eq!(decide(-50_000, th), Action::Slew(50));
        assert_eq!(decide(200_000_000, th), Action::Step(200_000_000));
        assert_eq!(decide(-3_000_000_000, th), Action::Step(-3_000_000_000));
    }

    #[test]
    fn wall_time_fallback_without_a_device() {
        let c = Clock::new(Path::new("/nonexistent/ptp0"), false);
        assert_eq!(c.sync(0).source, Source::None);
        let s = c.sync(now_unix_ns() - 5_000_000_000);
        assert_eq!(s.source, Source::HostWallTime);
        assert!((s.offset_ns - 5_000_000_000).abs() < 1_000_000_000);
    }

    #[test]
    fn live_ptp_clock() {
        let p = Path::new("/dev/ptp0");
        if !p.exists() {
            println!("skipped (hardware): no /dev/ptp0");
            return;
        }
        let e = measure_ptp(p).unwrap();
        assert!(e.used >= 1);
        println!(
            "ptp offset_ns={} uncertainty_ns={}",
            e.offset_ns, e.uncertainty_ns
        );
    }
}
