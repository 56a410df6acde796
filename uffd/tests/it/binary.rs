//! The `wrenn-uffd` binary: flags, socket creation, exit when Firecracker exits.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::build_chain;

#[test]
fn exits_cleanly_when_firecracker_exits() {
    let chain = build_chain(41, 1 << 20);
    let mut fc = Command::new("sleep").arg("60").spawn().unwrap();
    let sock = chain.dir.path().join("bin.sock");
    let stats = chain.dir.path().join("bin.stats");
    let mut srv = Command::new(env!("CARGO_BIN_EXE_wrenn-uffd"))
        .arg("--socket")
        .arg(&sock)
        .args(["--firecracker-pid", &fc.id().to_string(), "--header"])
        .arg(chain.header_path())
        .arg("--layers")
        .arg(chain.layer_dir())
        .arg("--stats")
        .arg(&stats)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    let text = std::fs::read_to_string(&stats).unwrap();
    assert_eq!(uffd::stats::value(&text, "state"), Some("listening"));
    fc.kill().unwrap();
    fc.wait().unwrap();
    let status = srv.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&stats).unwrap();
    assert_eq!(
        uffd::stats::value(&text, "state"),
        Some("firecracker_exited")
    );
    assert!(!sock.exists(), "socket removed at exit");
}

#[test]
fn bad_flags_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_wrenn-uffd"))
        .arg("--socket")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}
