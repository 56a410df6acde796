//! The test convention for parts a machine may lack (PostgreSQL, root, KVM, Firecracker).
//!
//! A test that cannot run prints `skipped: <reason>` and returns; with
//! `WRENN_REQUIRE_E2E=1` the same call fails the test instead, so CI on a fully equipped
//! host cannot pass by skipping. Only hardware no machine here has (the KVM PTP clock) uses
//! [`hardware`], which never fails.

/// Whether every skip must fail (`WRENN_REQUIRE_E2E=1`).
pub fn required() -> bool {
    std::env::var("WRENN_REQUIRE_E2E").is_ok_and(|v| v == "1")
}

/// Reports that `test` cannot run for `reason`: prints `skipped: ...`, or panics when
/// skips are not allowed.
pub fn skip(test: &str, reason: &str) {
    assert!(!required(), "{test}: WRENN_REQUIRE_E2E=1 but {reason}");
    visible(&format!("skipped: {test}: {reason}"));
}

/// Reports a test, or a part of one, that does not apply to this host for a reason that is
/// no missing part of the product (an input not given, a host without a second
/// filesystem): visible, never a failure.
pub fn note(test: &str, reason: &str) {
    visible(&format!("skipped: {test}: {reason}"));
}

/// Reports a test that needs hardware absent from every machine here; never fails.
pub fn hardware(test: &str, reason: &str) {
    visible(&format!("skipped (hardware): {test}: {reason}"));
}

/// Writes a line to the real stderr: the test harness captures `println!`/`eprintln!`
/// of passing tests, so a skip printed that way would never be seen.
fn visible(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Whether the current process runs as root (tests that create namespaces, devices, mounts).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
