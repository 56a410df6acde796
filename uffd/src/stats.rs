//! The page server's counters, written as a small `key=value` text file (format in HEADER.md)
//! that the agent reads. Written atomically (temporary file + rename) at each phase change,
//! about once a second while serving, and at exit.

use std::fmt::Write as _;
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
}

impl Stats {
    /// The file's text: one `key=value` per line.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(512);
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "version=1\nstate={}\nfaults={}\npages_faulted={}\npages_prefetched={}\npages_filled={}\n\
             zero_pages={}\nremove_events={}\neexist={}\neagain={}\npages_recorded={}\npages_total={}\n\
             pages_resident={}\nhandshake_us={}\nresident_ms={}\n",
            self.state,
            self.faults,
            self.pages_faulted,
            self.pages_prefetched,
            self.pages_filled,
            self.zero_pages,
            self.remove_events,
            self.eexist,
            self.eagain,
            self.pages_recorded,
            self.pages_total,
            self.pages_resident,
            self.handshake_us,
            self.resident_ms,
        );
        s
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::working_set::write_atomic(path, self.render().as_bytes())
    }
}

/// Reads one value from a stats file's text (for the agent and tests).
pub fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
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
        assert_eq!(value(&t, "state"), Some("resident"));
        assert_eq!(value(&t, "faults"), Some("3"));
        assert_eq!(value(&t, "resident_ms"), Some("12"));
        assert_eq!(value(&t, "nope"), None);
    }
}
