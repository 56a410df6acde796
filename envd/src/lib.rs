//! `envd`: the daemon inside every wrenn sandbox. It is the guest's PID 1 (mounts, hostname,
//! reaping, shutdown) and serves `wrenn.envd.v1` (processes, files, init, health, metrics)
//! over vsock, a Unix socket or TCP.
//!
//! It is not a general init system: it starts no services of its own besides the port
//! forwarder, and it reads no configuration files beyond /etc/passwd and /etc/group (a static
//! glibc binary has no NSS).
//!
//! Code map: [`passwd`] users and groups; [`process`] + [`spawn`] + [`pty`] + [`reaper`] child
//! processes;
//! [`fs`] file operations as a user; [`watch`] inotify; [`clock`] KVM PTP clock sync;
//! [`init`] PID 1 duties; [`vsock`] AF_VSOCK sockets; [`mmds`] Firecracker's metadata service;
//! [`ports`] loopback port forwarding; [`selftest`] the copy self-test (`envd selftest`);
//! [`limits`] every bound with its reason.

pub mod clock;
pub mod daemon;
pub mod fs;
pub mod init;
pub mod limits;
pub mod metrics;
pub mod mmds;
pub mod passwd;
pub mod ports;
pub mod process;
pub mod pty;
pub mod reaper;
pub mod selftest;
pub mod service;
pub mod spawn;
pub mod vsock;
pub mod watch;

/// Test support shared by the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// Reports a test part that cannot run here; with WRENN_REQUIRE_E2E=1 it fails instead.
    pub fn skip(reason: &str) {
        proto::skip::skip("envd", reason);
    }
}
