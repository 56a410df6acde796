//! Handshake edge cases: wrong peer, no fd, two fds, malformed JSON, bad regions, Firecracker
//! exiting, and the kill of Firecracker on a fatal error.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use uffd::handshake::{self as hs, Region};
use uffd::page_server::{Error, Outcome};
use uffd::sys;

use crate::harness::{build_chain, connect_when_ready, uffd_unavailable, FakeVm, Running, PAGE};

const MIB: u64 = 1 << 20;

fn expect_handshake_error(send: impl FnOnce(&Path, &FakeVm)) -> hs::Error {
    let chain = build_chain(21, MIB);
    let vm = FakeVm::new(MIB, MIB / 2, 0);
    let srv = Running::start(&chain, |_| {});
    send(&srv.socket, &vm);
    match srv.join() {
        Err(Error::Handshake { source }) => source,
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

#[test]
fn no_fd() {
    if uffd_unavailable() {
        return;
    }
    let e = expect_handshake_error(|sock, vm| {
        let s = connect_when_ready(sock);
        sys::send_with_fds(s.as_fd(), hs::to_json(&vm.regions).as_bytes(), &[]).unwrap();
        std::mem::forget(s);
    });
    assert!(matches!(e, hs::Error::NoFd), "{e}");
}

#[test]
fn two_fds() {
    if uffd_unavailable() {
        return;
    }
    let e = expect_handshake_error(|sock, vm| {
        let s = connect_when_ready(sock);
        let extra = std::fs::File::open("/dev/null").unwrap();
        sys::send_with_fds(
            s.as_fd(),
            hs::to_json(&vm.regions).as_bytes(),
            &[vm.uffd.as_fd(), extra.as_fd()],
        )
        .unwrap();
        std::mem::forget(s);
    });
    assert!(matches!(e, hs::Error::TooManyFds { .. }), "{e}");
}

#[test]
fn malformed_json() {
    if uffd_unavailable() {
        return;
    }
    let e = expect_handshake_error(|sock, vm| {
        let s = connect_when_ready(sock);
        sys::send_with_fds(s.as_fd(), b"[{\"size\":4096,,}]", &[vm.uffd.as_fd()]).unwrap();
        std::mem::forget(s);
    });
    assert!(matches!(e, hs::Error::Json { .. }), "{e}");
}

#[test]
fn json_cut_short_by_a_closed_connection() {
    if uffd_unavailable() {
        return;
    }
    let e = expect_handshake_error(|sock, vm| {
        let s = connect_when_ready(sock);
        sys::send_with_fds(s.as_fd(), b"[{\"size\":4096", &[vm.uffd.as_fd()]).unwrap();
        drop(s);
    });
    assert!(matches!(e, hs::Error::Incomplete), "{e}");
}

#[test]
fn overlapping_regions() {
    if uffd_unavailable() {
        return;
    }
    let e = expect_handshake_error(|sock, vm| {
        let mut regions = vm.regions.clone();
        regions[1].offset = regions[0].offset + PAGE;
        let s = connect_when_ready(sock);
        sys::send_with_fds(
            s.as_fd(),
            hs::to_json(&regions).as_bytes(),
            &[vm.uffd.as_fd()],
        )
        .unwrap();
        std::mem::forget(s);
    });
    assert!(matches!(e, hs::Error::Overlap { .. }), "{e}");
}

#[test]
fn regions_past_the_snapshot() {
    if uffd_unavailable() {
        return;
    }
    let e = expect_handshake_error(|sock, vm| {
        let mut regions: Vec<Region> = vm.regions.clone();
        regions[1].size += 16 * PAGE;
        let s = connect_when_ready(sock);
        sys::send_with_fds(
            s.as_fd(),
            hs::to_json(&regions).as_bytes(),
            &[vm.uffd.as_fd()],
        )
        .unwrap();
        std::mem::forget(s);
    });
    assert!(matches!(e, hs::Error::PastMemory { .. }), "{e}");
}

fn sleeper() -> std::process::Child {
    Command::new("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_wrong_peer_is_turned_away_and_the_server_keeps_listening() {
    let chain = build_chain(22, MIB);
    let mut fc = sleeper();
    let pid = fc.id() as i32;
    let srv = Running::start(&chain, |c| c.firecracker_pid = pid);
    let mut s = connect_when_ready(&srv.socket);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        s.read(&mut b).unwrap(),
        0,
        "the server closes a stranger's connection"
    );
    // Still listening.
    let _again = connect_when_ready(&srv.socket);
    let (outcome, _) = srv.stop().unwrap();
    assert_eq!(outcome, Outcome::Stopped);
    fc.kill().unwrap();
    fc.wait().unwrap();
}

#[test]
fn firecracker_exiting_ends_the_server() {
    let chain = build_chain(23, MIB);
    let mut fc = sleeper();
    let pid = fc.id() as i32;
    let srv = Running::start(&chain, |c| c.firecracker_pid = pid);
    fc.kill().unwrap();
    fc.wait().unwrap();
    let (outcome, stats) = srv.join().unwrap();
    assert_eq!(outcome, Outcome::FirecrackerExited);
    assert_eq!(stats.state, "firecracker_exited");
}

/// Child side of `a_fatal_error_kills_firecracker`: plays a Firecracker that sends garbage.
#[test]
fn child_sends_garbage() {
    let Ok(sock) = std::env::var("UFFD_IT_CHILD_SOCKET") else {
        return;
    };
    let mut s = connect_when_ready(Path::new(&sock));
    s.write_all(b"[{\"base_host_virt_addr\":oops}]").unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_fatal_error_kills_firecracker() {
    let chain = build_chain(24, MIB);
    let sock = chain.dir.path().join("fatal.sock");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "handshake::child_sends_garbage",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("UFFD_IT_CHILD_SOCKET", &sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let s2 = sock.clone();
    let srv = Running::start(&chain, move |c| {
        c.firecracker_pid = pid;
        c.socket_path = s2;
        c.kill_on_fatal = true;
    });
    let err = srv.join().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Handshake {
                source: hs::Error::Json { .. }
            }
        ),
        "{err}"
    );
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "firecracker was killed: {status:?}"
    );
}

/// Child side of the tests below: a Firecracker that hands over its memory, then exits.
#[test]
fn child_hands_over_memory_then_exits() {
    let Ok(sock) = std::env::var("UFFD_IT_CHILD_HANDOVER") else {
        return;
    };
    let memory: u64 = std::env::var("UFFD_IT_CHILD_MEMORY")
        .unwrap()
        .parse()
        .unwrap();
    let vm = FakeVm::new(memory, memory / 2, MIB);
    let _conn = vm.connect(Path::new(&sock));
    let ms: u64 = std::env::var("UFFD_IT_CHILD_SLEEP_MS")
        .unwrap()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    std::process::exit(0);
}

fn firecracker_exits_after_handover(
    memory: u64,
    fill: bool,
    sleep_ms: u64,
) -> Result<(Outcome, uffd::stats::Stats), Error> {
    let chain = build_chain(25, memory);
    let sock = chain.dir.path().join("handover.sock");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "handshake::child_hands_over_memory_then_exits",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("UFFD_IT_CHILD_HANDOVER", &sock)
        .env("UFFD_IT_CHILD_MEMORY", memory.to_string())
        .env("UFFD_IT_CHILD_SLEEP_MS", sleep_ms.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let s2 = sock.clone();
    let srv = Running::start(&chain, move |c| {
        c.firecracker_pid = pid;
        c.socket_path = s2;
        c.background_fill = fill;
        c.kill_on_fatal = true;
    });
    let out = srv.join();
    let status = child.wait().unwrap();
    assert!(status.success(), "the child exited by itself: {status:?}");
    out
}

#[test]
fn firecracker_exiting_after_the_handshake_ends_the_server() {
    if uffd_unavailable() {
        return;
    }
    let (outcome, stats) = firecracker_exits_after_handover(MIB, false, 100).unwrap();
    assert_eq!(outcome, Outcome::FirecrackerExited);
    assert!(stats.handshake_us > 0);
}

#[test]
fn firecracker_exiting_during_the_fill_is_not_an_error() {
    if uffd_unavailable() {
        return;
    }
    // The fill races the exit: either it finishes first or its copies find the address space
    // gone (ESRCH); neither is a failure.
    let (outcome, stats) = firecracker_exits_after_handover(64 * MIB, true, 15).unwrap();
    eprintln!("outcome {outcome:?} filled {}", stats.pages_filled);
    assert!(
        matches!(outcome, Outcome::FirecrackerExited | Outcome::Resident),
        "{outcome:?}"
    );
}
