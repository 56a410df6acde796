//! What wrenn-uffd did for one restore: its stats file (`uffd/HEADER.md`, "Stats file"),
//! read once the restore settles, becomes the agent's restore metrics and one log line.
//!
//! A restore settles when its page server reports a final state (`resident`: every page is
//! in; `firecracker_exited`, `stopped`, `failed`). A watcher thread per restore reads the
//! file every [`RESTORE_STATS_POLL`] until then; it gives up when the page server is gone
//! without a final report (the sandbox was paused or destroyed first) or after
//! [`RESTORE_SETTLE_MAX`].

use std::time::{Duration, Instant};

use log::{info, warn};

use crate::limits::{RESTORE_SETTLE_MAX, RESTORE_STATS_POLL};
use crate::metrics;

/// The counters of one page-server run that the agent exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub state: String,
    pub faults: u64,
    pub pages_prefetched: u64,
    pub pages_filled: u64,
    pub pages_total: u64,
    /// Milliseconds from the handshake until every page was resident (0: not reached).
    pub resident_ms: u64,
    /// Microseconds from the handshake to the first fault, plus one (0: no fault).
    pub first_fault_us: u64,
}

impl RestoreReport {
    /// Parses a stats file's text; `None` when it is not one or lacks a counter.
    pub fn parse(text: &str) -> Option<RestoreReport> {
        let num = |k: &str| -> Option<u64> { uffd::stats::value(text, k)?.parse().ok() };
        Some(RestoreReport {
            state: uffd::stats::value(text, "state")?,
            faults: num("faults")?,
            pages_prefetched: num("pages_prefetched")?,
            pages_filled: num("pages_filled")?,
            pages_total: num("pages_total")?,
            resident_ms: num("resident_ms")?,
            // Written by page servers since this key exists; an older one's file lacks it.
            first_fault_us: num("first_fault_us").unwrap_or(0),
        })
    }

    /// Whether the page server reported a final state.
    pub fn settled(&self) -> bool {
        matches!(
            self.state.as_str(),
            "resident" | "firecracker_exited" | "stopped" | "failed"
        )
    }

    /// Adds this restore to the metrics and logs its line.
    pub fn record(&self, sandbox: &str) {
        metrics::RESTORES_SETTLED.inc();
        metrics::RESTORE_FAULTS.add(self.faults);
        metrics::RESTORE_PAGES_PREFETCHED.add(self.pages_prefetched);
        metrics::RESTORE_PAGES_FILLED.add(self.pages_filled);
        if self.state == "resident" {
            metrics::RESTORE_RESIDENT_SECONDS.observe(Duration::from_millis(self.resident_ms));
        }
        if self.first_fault_us > 0 {
            metrics::RESTORE_FIRST_FAULT_SECONDS
                .observe(Duration::from_micros(self.first_fault_us - 1));
        }
        info!(
            "restore settled id={sandbox} state={} faults={} pages_prefetched={} pages_filled={} \
             pages_total={} resident_ms={} first_fault_us={}",
            self.state,
            self.faults,
            self.pages_prefetched,
            self.pages_filled,
            self.pages_total,
            self.resident_ms,
            self.first_fault_us.saturating_sub(1),
        );
    }
}

/// Watches one restore on a thread of its own: `read` returns the stats file's text (or
/// `None` while it is unreadable), `alive` whether the page server still runs. Records the
/// report once settled; returns the thread (tests join it).
pub fn watch(
    sandbox: String,
    read: impl Fn() -> Option<String> + Send + 'static,
    alive: impl Fn() -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Option<RestoreReport>>> {
    std::thread::Builder::new()
        .name("restore-stats".into())
        .spawn(move || watch_loop(&sandbox, &read, &alive, RESTORE_STATS_POLL))
}

fn watch_loop(
    sandbox: &str,
    read: &dyn Fn() -> Option<String>,
    alive: &dyn Fn() -> bool,
    poll: Duration,
) -> Option<RestoreReport> {
    let end = Instant::now() + RESTORE_SETTLE_MAX;
    loop {
        // Whether it ran before the read: a server that wrote its last report and exited
        // is read once more.
        let running = alive();
        let report = read().as_deref().and_then(RestoreReport::parse);
        if let Some(r) = report.as_ref().filter(|r| r.settled()) {
            r.record(sandbox);
            return report;
        }
        if !running || Instant::now() >= end {
            warn!(
                "restore ended without a final page-server report id={sandbox} last_state={}",
                report.as_ref().map_or("none", |r| r.state.as_str())
            );
            return None;
        }
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn stats(state: &'static str, faults: u64) -> String {
        uffd::stats::Stats {
            state,
            faults,
            pages_prefetched: 7,
            pages_filled: 100,
            pages_total: 131072,
            resident_ms: 42,
            first_fault_us: 301,
            ..Default::default()
        }
        .render()
    }

    #[test]
    fn a_settled_restore_is_recorded_once_with_its_counters() {
        let reads = Arc::new(AtomicUsize::new(0));
        let r2 = reads.clone();
        let before = (
            metrics::RESTORES_SETTLED.get(),
            metrics::RESTORE_FAULTS.get(),
            metrics::RESTORE_RESIDENT_SECONDS.count(),
            metrics::RESTORE_FIRST_FAULT_SECONDS.count(),
        );
        // Serving for three reads, then resident.
        let read = move || {
            let n = r2.fetch_add(1, Ordering::SeqCst);
            Some(if n < 3 {
                stats("serving", n as u64)
            } else {
                stats("resident", 9)
            })
        };
        let got = watch_loop("sb", &read, &|| true, Duration::from_millis(1)).unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 4);
        assert_eq!(got.faults, 9);
        assert_eq!(got.pages_prefetched, 7);
        assert_eq!(got.pages_filled, 100);
        assert_eq!(got.resident_ms, 42);
        assert_eq!(got.first_fault_us, 301);
        // Other tests may record restores concurrently: at least ours.
        assert!(metrics::RESTORES_SETTLED.get() > before.0);
        assert!(metrics::RESTORE_FAULTS.get() >= before.1 + 9);
        assert!(metrics::RESTORE_RESIDENT_SECONDS.count() > before.2);
        assert!(metrics::RESTORE_FIRST_FAULT_SECONDS.count() > before.3);
        let text = metrics::render(&[]);
        for name in [
            "wrenn_agent_restores_settled_total",
            "wrenn_agent_restore_faults_total",
            "wrenn_agent_restore_pages_prefetched_total",
            "wrenn_agent_restore_pages_filled_total",
            "wrenn_agent_restore_resident_seconds_bucket",
            "wrenn_agent_restore_first_fault_seconds_count",
        ] {
            assert!(text.contains(name), "{name} missing from /metrics");
        }
    }

    #[test]
    fn a_page_server_gone_without_a_final_report_ends_the_watch() {
        let read = || Some(stats("serving", 1));
        assert_eq!(
            watch_loop("sb", &read, &|| false, Duration::from_millis(1)),
            None
        );
        // Unreadable or foreign text is no report.
        assert_eq!(RestoreReport::parse("not a stats file\n"), None);
        let old = "wrenn-uffd-stats 1\nstate=resident\nfaults=1\npages_prefetched=0\n\
                   pages_filled=0\npages_total=1\nresident_ms=1\n";
        assert_eq!(RestoreReport::parse(old).unwrap().first_fault_us, 0);
    }
}
