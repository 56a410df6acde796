//! Shared helpers: visible skips, the `wrenn` binary, temporary directories.

use std::path::PathBuf;

/// Whether every end-to-end skip must fail instead (`WRENN_REQUIRE_E2E=1`).
pub fn require_e2e() -> bool {
    proto::skip::required()
}

/// Prints `skipped: <reason>`, or panics under `WRENN_REQUIRE_E2E=1`.
pub fn skip(test: &str, reason: &str) {
    proto::skip::skip(test, reason);
}

/// The `wrenn` binary under test.
pub fn wrenn_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wrenn"))
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "wrenn-it-{tag}-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    /// A directory with a short path (`/tmp/wr…`), for a `wrenn up` state directory: the
    /// agent's Unix sockets live under it and must fit in a socket address.
    pub fn short() -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = PathBuf::from(format!("/tmp/wr{:x}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
