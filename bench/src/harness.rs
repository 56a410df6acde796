//! The benchmark harness: run a case and its baseline in the same process, in the same run,
//! and print one line per case:
//!
//! ```text
//! bench=<name> p50_ns=<n> p99_ns=<n> baseline=<name> ratio=<r> goal=<op><v> ok=<true|false>
//! metric=<name> value=<v> unit=<u> goal=<op><v> ok=<true|false>
//! ```
//! `ratio` is ours divided by the baseline, from medians, in the case's unit: time for
//! latency cases (lower is better), throughput for throughput cases (higher is better; the
//! p50/p99 then describe per-iteration time). Machines here are shared and noisy: only
//! same-run ratios mean anything; absolute times drift.

use std::time::{Duration, Instant};

/// Options every case gets.
#[derive(Clone, Copy, Debug)]
pub struct Opts {
    /// Run every case once with tiny sizes (CI smoke): numbers are printed but meaningless.
    pub quick: bool,
}

impl Opts {
    /// Picks the iteration count: `full` normally, `quick` under `--quick`.
    pub fn iters(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// A benchmark case: a name and a function that prints its lines.
pub struct Case {
    pub name: &'static str,
    pub run: fn(&Opts) -> Result<(), String>,
}

/// What a case must achieve.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    pub fn holds(self, v: f64) -> bool {
        match self {
            Goal::AtMost(g) => v <= g,
            Goal::AtLeast(g) => v >= g,
        }
    }
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Goal::AtMost(g) => write!(f, "<={g}"),
            Goal::AtLeast(g) => write!(f, ">={g}"),
        }
    }
}

/// Per-iteration durations, sorted.
#[derive(Clone, Debug)]
pub struct Samples {
    ns: Vec<u64>,
}

impl Samples {
    pub fn new(mut ns: Vec<u64>) -> Samples {
        assert!(!ns.is_empty(), "a measurement needs at least one sample");
        ns.sort_unstable();
        Samples { ns }
    }

    pub fn from_durations(d: &[Duration]) -> Samples {
        Samples::new(
            d.iter()
                .map(|d| d.as_nanos().min(u64::MAX as u128) as u64)
                .collect(),
        )
    }

    pub fn percentile(&self, p: f64) -> u64 {
        assert!((0.0..=1.0).contains(&p));
        let idx = ((self.ns.len() - 1) as f64 * p).round() as usize;
        self.ns[idx]
    }

    pub fn p50(&self) -> u64 {
        self.percentile(0.5)
    }

    pub fn p99(&self) -> u64 {
        self.percentile(0.99)
    }

    pub fn len(&self) -> usize {
        self.ns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ns.is_empty()
    }
}

/// Times `iters` calls of `f` after `warmup` untimed ones.
pub fn measure(
    iters: usize,
    warmup: usize,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<Samples, String> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ns = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        ns.push(t.elapsed().as_nanos().min(u64::MAX as u128) as u64);
    }
    Ok(Samples::new(ns))
}

/// Times ours and the baseline alternately, one iteration each in turn, so both see the
/// same machine (this machine is shared; load comes and goes within a run).
pub fn measure_interleaved(
    iters: usize,
    mut base: impl FnMut() -> Result<(), String>,
    mut ours: impl FnMut() -> Result<(), String>,
) -> Result<(Samples, Samples), String> {
    for _ in 0..iters / 10 + 1 {
        base()?;
        ours()?;
    }
    let (mut b, mut o) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for _ in 0..iters.max(1) {
        let t = std::time::Instant::now();
        base()?;
        b.push(t.elapsed());
        let t = std::time::Instant::now();
        ours()?;
        o.push(t.elapsed());
    }
    Ok((Samples::from_durations(&b), Samples::from_durations(&o)))
}

/// Formats a latency case (ratio = our p50 / baseline p50; lower is better).
pub fn latency_line(
    name: &str,
    ours: &Samples,
    baseline: &str,
    base: &Samples,
    goal: Goal,
) -> String {
    let ratio = ours.p50() as f64 / base.p50().max(1) as f64;
    line(name, ours, baseline, ratio, goal)
}

/// Formats a throughput case where every iteration moves the same bytes for ours and the
/// baseline (ratio = baseline time / our time = our throughput / baseline throughput).
pub fn throughput_line(
    name: &str,
    ours: &Samples,
    baseline: &str,
    base: &Samples,
    goal: Goal,
) -> String {
    let ratio = base.p50() as f64 / ours.p50().max(1) as f64;
    line(name, ours, baseline, ratio, goal)
}

fn line(name: &str, ours: &Samples, baseline: &str, ratio: f64, goal: Goal) -> String {
    format!(
        "bench={name} p50_ns={} p99_ns={} baseline={baseline} ratio={ratio:.3} goal={goal} ok={}",
        ours.p50(),
        ours.p99(),
        goal.holds(ratio)
    )
}

/// Formats a figure without a same-run baseline (RSS, sizes, counts).
pub fn metric_line(name: &str, value: f64, unit: &str, goal: Goal) -> String {
    format!(
        "metric={name} value={value} unit={unit} goal={goal} ok={}",
        goal.holds(value)
    )
}

/// Formats an informational line (a figure with no goal, e.g. an extra reference point).
pub fn info_line(name: &str, samples: &Samples, note: &str) -> String {
    format!(
        "info={name} p50_ns={} p99_ns={} note={note}",
        samples.p50(),
        samples.p99()
    )
}

/// Resident set size of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_ratios() {
        let s = Samples::new((1..=100).collect());
        assert_eq!(s.p50(), 51);
        assert_eq!(s.p99(), 99);
        let base = Samples::new(vec![10, 10, 10]);
        let ours = Samples::new(vec![15, 15, 15]);
        assert_eq!(
            latency_line("x", &ours, "y", &base, Goal::AtMost(1.5)),
            "bench=x p50_ns=15 p99_ns=15 baseline=y ratio=1.500 goal=<=1.5 ok=true"
        );
        assert!(throughput_line("x", &ours, "y", &base, Goal::AtLeast(0.7))
            .ends_with("ratio=0.667 goal=>=0.7 ok=false"));
        assert_eq!(
            metric_line("rss", 3.5, "MiB", Goal::AtMost(4.0)),
            "metric=rss value=3.5 unit=MiB goal=<=4 ok=true"
        );
    }
}
