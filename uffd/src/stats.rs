//! The page server's counters, written as a small `key=value` text file (format in HEADER.md)
//! that the agent reads. Written atomically (temporary file + rename) at each phase change,
//! about once a second while serving, and at exit.

use std::path::Path;

/// Counters of one page-server run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// `listening`, `serving`, `recording`, `filling`, `resident`, `firecracker_exited`,
    /// `stopped` or `failed`.
    pub state: &'static str,
    /// Page-fault events served.
    pub faults: u64,
    /// Pages installed because of faults (the faulting pages and their fault-around neighbours).
    pub pages_faulted: u64,
    /// Pages installed from the working set before they were touched.
    pub pages_prefetched: u64,
    /// Pages installed by the background fill.
    pub pages_filled: u64,
    /// Pages installed as zeros (`UFFDIO_ZEROPAGE`), whatever the cause.
    pub zero_pages: u64,
    /// REMOVE events (madvise/balloon discards).
    pub remove_events: u64,
    /// `EEXIST` results (page already present).
    pub eexist: u64,
    /// `EAGAIN` results without progress (memory map changing; retried).
    pub eagain: u64,
    /// Pages in the working set written by record mode.
    pub pages_recorded: u64,
    /// Guest pages covered by the regions.
    pub pages_total: u64,
    /// Guest pages currently resident.
    pub pages_resident: u64,
    /// Microseconds from start to the handshake.
    pub handshake_us: u64,
    /// Milliseconds from the handshake until every page was resident (0 until then).
    pub resident_ms: u64,
    /// Microseconds from the handshake to the first page fault, plus one (0: no fault yet).
    pub first_fault_us: u64,
}

impl Stats {
    /// The file's text in the [`proto::kv`] format: first line [`STATS_MAGIC`], then one
    /// `key=value` per counter.
    pub fn render(&self) -> String {
        let mut w = proto::kv::Writer::new(STATS_MAGIC);
        w.put("state", self.state);
        for (k, v) in [
            ("faults", self.faults),
            ("pages_faulted", self.pages_faulted),
            ("pages_prefetched", self.pages_prefetched),
            ("pages_filled", self.pages_filled),
            ("zero_pages", self.zero_pages),
            ("remove_events", self.remove_events),
            ("eexist", self.eexist),
            ("eagain", self.eagain),
            ("pages_recorded", self.pages_recorded),
            ("pages_total", self.pages_total),
            ("pages_resident", self.pages_resident),
            ("handshake_us", self.handshake_us),
            ("resident_ms", self.resident_ms),
            ("first_fault_us", self.first_fault_us),
        ] {
            w.put_display(k, v);
        }
        w.finish()
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::working_set::write_atomic(path, self.render().as_bytes())
    }
}

/// First line of the stats file.
pub const STATS_MAGIC: &str = "wrenn-uffd-stats 1";

/// Reads one value from a stats file's text (for the agent and tests); `None` when the text
/// is not a stats file or has no such key.
pub fn value(text: &str, key: &str) -> Option<String> {
    let (mut r, _) = proto::kv::Reader::parse(text, &[STATS_MAGIC], 64).ok()?;
    r.take(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_key_values() {
        let s = Stats {
            state: "resident",
            faults: 3,
            resident_ms: 12,
            ..Stats::default()
        };
        let t = s.render();
        assert_eq!(value(&t, "state").as_deref(), Some("resident"));
        assert_eq!(value(&t, "faults").as_deref(), Some("3"));
        assert_eq!(value(&t, "resident_ms").as_deref(), Some("12"));
        assert_eq!(value(&t, "nope"), None);
    }
}
