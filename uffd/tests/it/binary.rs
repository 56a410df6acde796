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
    assert_eq!(
        uffd::stats::value(&text, "state").as_deref(),
        Some("listening")
    );
    fc.kill().unwrap();
    fc.wait().unwrap();
    let status = srv.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&stats).unwrap();
    assert_eq!(
        uffd::stats::value(&text, "state").as_deref(),
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

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on our own child, not yet reaped.
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0);
}

#[test]
fn records_until_sigusr1_and_stops_on_sigterm() {
    if crate::harness::uffd_unavailable() {
        return;
    }
    use crate::harness::{FakeVm, PAGE};
    let memory = 2 << 20;
    let chain = build_chain(42, memory);
    let sock = chain.dir.path().join("rec.sock");
    let ws = chain.dir.path().join("rec.ws");
    let stats = chain.dir.path().join("rec.stats");
    // This test process plays Firecracker.
    let mut srv = Command::new(env!("CARGO_BIN_EXE_wrenn-uffd"))
        .arg("--socket")
        .arg(&sock)
        .args([
            "--firecracker-pid",
            &std::process::id().to_string(),
            "--header",
        ])
        .arg(chain.header_path())
        .arg("--layers")
        .arg(chain.layer_dir())
        .arg("--record")
        .arg(&ws)
        .args(["--record-seconds", "600", "--no-background-fill", "--stats"])
        .arg(&stats)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let vm = FakeVm::new(memory, 1 << 20, 1 << 20);
    let _conn = vm.connect(&sock);
    let touched = [5 * PAGE, 300 * PAGE, 6 * PAGE, 511 * PAGE];
    for off in touched {
        let r = off as usize..(off + PAGE) as usize;
        assert!(vm.read_page(off) == chain.expected[r]);
    }
    signal(&srv, libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ws.exists() {
        assert!(Instant::now() < deadline, "working set never written");
        std::thread::sleep(Duration::from_millis(5));
    }
    let set = uffd::working_set::WorkingSet::parse(&std::fs::read(&ws).unwrap()).unwrap();
    assert_eq!(set.pages, touched.to_vec());
    signal(&srv, libc::SIGTERM);
    let status = srv.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&stats).unwrap();
    assert_eq!(
        uffd::stats::value(&text, "state").as_deref(),
        Some("stopped")
    );
    assert_eq!(
        uffd::stats::value(&text, "pages_recorded").as_deref(),
        Some("4")
    );
}

/// A field of /proc/PID/status.
fn status_field(pid: u32, key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
}

#[test]
fn drops_privileges_before_serving_and_still_serves() {
    use std::os::unix::fs::MetadataExt;
    if crate::harness::uffd_unavailable() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        crate::harness::skip("needs root (wrenn-uffd drops from root to another uid)");
        return;
    }
    use crate::harness::{FakeVm, PAGE};
    const RUN_AS: u32 = 7_340_100;
    const SOCKET_OWNER: u32 = 7_340_001;
    let memory = 2 << 20;
    let chain = build_chain(43, memory);
    let sock = chain.dir.path().join("drop.sock");
    // Output files go to a directory the unprivileged uid may write (the agent makes one).
    let out = chain.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::chown(&out, Some(RUN_AS), Some(RUN_AS)).unwrap();
    let ws = out.join("ws");
    let stats = out.join("stats");
    let mut srv = Command::new(env!("CARGO_BIN_EXE_wrenn-uffd"))
        .arg("--socket")
        .arg(&sock)
        .args([
            "--firecracker-pid",
            &std::process::id().to_string(),
            "--header",
        ])
        .arg(chain.header_path())
        .arg("--layers")
        .arg(chain.layer_dir())
        .arg("--record")
        .arg(&ws)
        .args(["--record-seconds", "600", "--no-background-fill", "--stats"])
        .arg(&stats)
        .args(["--socket-owner", &format!("{SOCKET_OWNER}:{SOCKET_OWNER}")])
        .args(["--run-as", &format!("{RUN_AS}:{RUN_AS}")])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = srv.id();
    let vm = FakeVm::new(memory, 1 << 20, 1 << 20);
    let conn = vm.connect(&sock);
    // The socket appeared already owned by the jailed Firecracker's uid.
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!((m.uid(), m.gid()), (SOCKET_OWNER, SOCKET_OWNER));
    // It drops right after the socket appears, before it accepts: by the first served fault
    // it is unprivileged.
    let first = 7 * PAGE;
    assert!(vm.read_page(first) == chain.expected[first as usize..(first + PAGE) as usize]);
    let uid = status_field(pid, "Uid:").unwrap();
    let want = format!("{RUN_AS}\t{RUN_AS}\t{RUN_AS}\t{RUN_AS}");
    assert_eq!(uid, want, "Uid");
    assert_eq!(status_field(pid, "Gid:").unwrap(), want, "Gid");
    assert_eq!(status_field(pid, "CapEff:").unwrap(), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm:").unwrap(), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd:").unwrap(), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:").unwrap(), "1");
    // Still serves faults, records, and writes its files through the directories it opened.
    let touched = [first, 300 * PAGE, 511 * PAGE];
    for off in &touched[1..] {
        let r = *off as usize..(off + PAGE) as usize;
        assert!(vm.read_page(*off) == chain.expected[r]);
    }
    signal(&srv, libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ws.exists() {
        assert!(Instant::now() < deadline, "working set never written");
        std::thread::sleep(Duration::from_millis(5));
    }
    let set = uffd::working_set::WorkingSet::parse(&std::fs::read(&ws).unwrap()).unwrap();
    assert_eq!(set.pages, touched.to_vec());
    assert_eq!(std::fs::metadata(&ws).unwrap().uid(), RUN_AS);
    signal(&srv, libc::SIGTERM);
    let status = srv.wait().unwrap();
    assert!(status.success(), "{status:?}");
    drop(conn);
    let text = std::fs::read_to_string(&stats).unwrap();
    assert_eq!(
        uffd::stats::value(&text, "state").as_deref(),
        Some("stopped")
    );
}
