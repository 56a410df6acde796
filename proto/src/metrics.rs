//! Prometheus text exposition (format 0.0.4) from static atomics.
//!
//! Metrics are `static` values registered nowhere: a binary's `/metrics` handler calls
//! [`Counter::render`], [`Gauge::render`] and [`Histogram::render`] on its own statics in a
//! fixed order. Names follow `wrenn_<noun>_<unit>[_total]`. Labels are fixed at compile time
//! (no per-sandbox label explosion).

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Counter {
    fn default() -> Self {
        Counter::new()
    }
}

/// A value that goes up and down.
#[derive(Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Gauge {
    fn default() -> Self {
        Gauge::new()
    }
}

/// Number of finite buckets in a [`Histogram`].
pub const HISTOGRAM_BUCKETS: usize = 16;

/// Bucket upper bounds in seconds, shared by every latency histogram: 100 µs to about 3 min,
/// doubling (sandbox boots on slow hosts take minutes).
pub const LATENCY_BOUNDS_SECONDS: [f64; HISTOGRAM_BUCKETS] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
    180.0,
];

/// A fixed-bucket histogram of durations (observed in microseconds, rendered in seconds).
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; HISTOGRAM_BUCKETS],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub const fn new() -> Histogram {
        // `AtomicU64` is not `Copy`; a const item makes the array initialiser legal.
        #[allow(clippy::declare_interior_mutable_const)]
        const ZERO: AtomicU64 = AtomicU64::new(0);
        Histogram {
            buckets: [ZERO; HISTOGRAM_BUCKETS],
            count: ZERO,
            sum_us: ZERO,
        }
    }

    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in LATENCY_BOUNDS_SECONDS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Renders the bucket, sum and count lines (cumulative buckets, `+Inf` last).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BOUNDS_SECONDS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{}le=\"{bound}\"}} {cumulative}",
                sep(labels)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{}le=\"+Inf\"}} {count}", sep(labels));
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

fn sep(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{labels},")
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample line; `labels` is `k="v",k2="v2"` or empty.
pub fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name}{} {value}", braces(labels));
}

/// Escapes a label value (backslash, quote, newline) as the text format requires.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(1000));
        let mut out = String::new();
        family(&mut out, "wrenn_x_seconds", "histogram", "x");
        h.render(&mut out, "wrenn_x_seconds", "method=\"a\"");
        assert!(out.contains("wrenn_x_seconds_bucket{method=\"a\",le=\"0.0001\"} 1\n"));
        assert!(out.contains("wrenn_x_seconds_bucket{method=\"a\",le=\"0.005\"} 2\n"));
        assert!(out.contains("wrenn_x_seconds_bucket{method=\"a\",le=\"180\"} 2\n"));
        assert!(out.contains("wrenn_x_seconds_bucket{method=\"a\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("wrenn_x_seconds_count{method=\"a\"} 3\n"));
    }

    #[test]
    fn counters_and_escape() {
        static C: Counter = Counter::new();
        C.add(2);
        C.inc();
        let mut out = String::new();
        sample(&mut out, "wrenn_c_total", "", C.get());
        assert_eq!(out, "wrenn_c_total 3\n");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
