//! envd end to end: the `envd` binary on a Unix socket in a temp dir, driven through the
//! proto client. Tests that need root (user switching) print `skipped:` without it and fail
//! instead when WRENN_REQUIRE_E2E=1.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use proto::gen::wrenn::envd::v1 as pb;
use proto::gen::wrenn::wire::v1::Hello;
use proto::rpc::{
    Call, CallOpts, Client, ClientStream, Credential, Peer, Server, ServerConfig, Service,
};
use proto::{Code, Status};

const TOKEN: &str = "test-token-0123456789";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn skip(reason: &str) {
    proto::skip::skip("envd", reason);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A running envd and its temp dir.
struct Envd {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Envd {
    fn start() -> Envd {
        Envd::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Envd {
        let dir = std::env::temp_dir().join(format!(
            "envd-it-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("envd.sock");
        // WRENN_ENVD_BIN runs the tests against another build (e.g. the static release one).
        let bin = std::env::var("WRENN_ENVD_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_envd").to_string());
        let child = Command::new(bin)
            .arg("--listen-unix")
            .arg(&sock)
            .arg("--no-announce")
            .args(extra)
            .env("WRENN_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "envd did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Envd { child, dir, sock }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn connect(&self, cred: Credential) -> Result<Client, Status> {
        Client::connect_unix(&self.sock, cred)
    }

    /// A client on a fresh envd that has been initialized with TOKEN.
    fn init(&self) -> Client {
        let c = self.connect(Credential::none()).unwrap();
        let r: pb::InitResponse = c
            .unary(
                pb::init_methods::INIT,
                &pb::InitRequest {
                    sandbox_id: "sb-00000000-0000-0000-0000-000000000001".into(),
                    access_token: TOKEN.into(),
                    env: [("WRENN_TEST".to_string(), "1".to_string())].into(),
                    ..Default::default()
                },
                Some(Duration::from_secs(10)),
            )
            .unwrap();
        assert_eq!(r.envd_version, env!("CARGO_PKG_VERSION"));
        c
    }

    fn authed(&self) -> Client {
        self.connect(Credential::access_token(TOKEN)).unwrap()
    }

    fn fd_targets(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.flatten()
                    .map(|f| {
                        std::fs::read_link(f.path())
                            .map(|t| t.display().to_string())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Live children of envd (not zombies).
    fn children(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(rest) = stat.rsplit_once(") ").map(|x| x.1) else {
                continue;
            };
            let f: Vec<&str> = rest.split(' ').collect();
            if f.len() > 1 && f[1] == self.pid().to_string() && f[0] != "Z" {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                _ if start.elapsed() > Duration::from_secs(10) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stream_opts() -> CallOpts {
    CallOpts {
        timeout: None,
        end_stream: true,
    }
}

fn sh(script: &str) -> pb::ProcessConfig {
    pb::ProcessConfig {
        cmd: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Default::default()
    }
}

fn start(c: &Client, cfg: pb::ProcessConfig) -> Result<(u32, ClientStream), Status> {
    let mut s = c.call(
        pb::process_methods::START,
        &pb::StartRequest { process: Some(cfg) },
        stream_opts(),
    )?;
    match next_event(&mut s)? {
        Some(pb::process_event::Event::Started(st)) => Ok((st.pid, s)),
        other => panic!("expected started, got {other:?}"),
    }
}

fn next_event(s: &mut ClientStream) -> Result<Option<pb::process_event::Event>, Status> {
    Ok(s.recv::<pb::ProcessEvent>()?.and_then(|e| e.event))
}

/// Collected output of a process stream until its end.
#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    exited: Option<pb::ProcessExited>,
}

fn drain(s: &mut ClientStream) -> Outcome {
    let mut o = Outcome::default();
    while let Some(ev) = next_event(s).unwrap() {
        match ev {
            pb::process_event::Event::Output(out) => match out.stream {
                1 => o.stdout.extend_from_slice(&out.data),
                2 => o.stderr.extend_from_slice(&out.data),
                _ => o.pty.extend_from_slice(&out.data),
            },
            pb::process_event::Event::Exited(e) => o.exited = Some(e),
            pb::process_event::Event::Started(_) => panic!("second started"),
        }
    }
    o
}

fn exit_code(o: &Outcome) -> Option<i32> {
    match o.exited.as_ref()?.status {
        Some(pb::process_exited::Status::ExitCode(c)) => Some(c),
        _ => None,
    }
}

fn exit_signal(o: &Outcome) -> Option<i32> {
    match o.exited.as_ref()?.status {
        Some(pb::process_exited::Status::Signal(s)) => Some(s),
        _ => None,
    }
}

fn pid_sel(pid: u32) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(pb::process_selector::Selector::Pid(pid)),
    })
}

fn tag_sel(tag: &str) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(pb::process_selector::Selector::Tag(tag.into())),
    })
}

fn send_input(c: &Client, sel: Option<pb::ProcessSelector>, data: &[u8], close: bool) -> u64 {
    let mut s = c
        .call(
            pb::process_methods::SEND_INPUT,
            &pb::SendInputRequest {
                process: sel,
                data: Bytes::copy_from_slice(data),
                close,
            },
            CallOpts::default(),
        )
        .unwrap();
    s.close_send().unwrap();
    let r: pb::SendInputResponse = s.recv().unwrap().unwrap();
    r.bytes_written
}

fn t10() -> Option<Duration> {
    Some(Duration::from_secs(10))
}

// ---- authentication -----------------------------------------------------------------

#[test]
fn before_init_only_init_and_health() {
    let e = Envd::start();
    let c = e.connect(Credential::none()).unwrap();
    let h: pb::HealthCheckResponse = c
        .unary(pb::health_methods::CHECK, &pb::HealthCheckRequest {}, t10())
        .unwrap();
    assert!(!h.initialized);
    let err = c
        .unary::<_, pb::ListProcessesResponse>(
            pb::process_methods::LIST,
            &pb::ListProcessesRequest {},
            t10(),
        )
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    let err = c
        .unary::<_, pb::StatResponse>(
            pb::filesystem_methods::STAT,
            &pb::StatRequest {
                path: "/".into(),
                ..Default::default()
            },
            t10(),
        )
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    // The first Init must set a token.
    let err = c
        .unary::<_, pb::InitResponse>(pb::init_methods::INIT, &pb::InitRequest::default(), t10())
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
}

#[test]
fn tokens_are_required_after_init_and_rotate() {
    let e = Envd::start();
    let first = e.init();
    // The connection that initialized keeps working.
    let _: pb::ListProcessesResponse = first
        .unary(
            pb::process_methods::LIST,
            &pb::ListProcessesRequest {},
            t10(),
        )
        .unwrap();
    assert_eq!(
        e.connect(Credential::none()).unwrap_err().code,
        Code::Unauthenticated
    );
    assert_eq!(
        e.connect(Credential::access_token("wrong"))
            .unwrap_err()
            .code,
        Code::Unauthenticated
    );
    assert_eq!(
        e.connect(Credential::api_key(TOKEN)).unwrap_err().code,
        Code::Unauthenticated
    );
    let a = e.authed();
    let b = e.authed();
    let h: pb::HealthCheckResponse = b
        .unary(pb::health_methods::CHECK, &pb::HealthCheckRequest {}, t10())
        .unwrap();
    assert!(h.initialized);
    assert_eq!(h.sandbox_id, "sb-00000000-0000-0000-0000-000000000001");
    // A rotation on `a` closes `b` (and `first`), keeps `a`.
    let _: pb::InitResponse = a
        .unary(
            pb::init_methods::INIT,
            &pb::InitRequest {
                access_token: "second-token".into(),
                ..Default::default()
            },
            t10(),
        )
        .unwrap();
    let _: pb::ListProcessesResponse = a
        .unary(
            pb::process_methods::LIST,
            &pb::ListProcessesRequest {},
            t10(),
        )
        .unwrap();
    let start = Instant::now();
    loop {
        let r = b.unary::<_, pb::ListProcessesResponse>(
            pb::process_methods::LIST,
            &pb::ListProcessesRequest {},
            t10(),
        );
        if r.is_err() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "old connection still served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(e.authed_with("second-token").is_ok());
    assert_eq!(
        e.authed_with(TOKEN).unwrap_err().code,
        Code::Unauthenticated
    );
}

impl Envd {
    fn authed_with(&self, t: &str) -> Result<Client, Status> {
        self.connect(Credential::access_token(t))
    }
}

// ---- processes ----------------------------------------------------------------------

#[test]
fn output_of_200_mib_is_complete_and_ordered() {
    let e = Envd::start();
    let c = e.init();
    // seq prints 1..N; checking every line proves order and completeness.
    let n: u64 = 25_000_000; // 213,888,898 bytes: over 200 MiB
    let (_, mut s) = start(&c, sh(&format!("seq 1 {n}"))).unwrap();
    let mut expect = 1u64;
    let mut partial = Vec::new();
    let mut total = 0u64;
    let t0 = Instant::now();
    let mut exited = None;
    let mut rss_max = 0u64;
    let mut events = 0u64;
    while let Some(ev) = next_event(&mut s).unwrap() {
        events += 1;
        if events % 256 == 0 {
            rss_max = rss_max.max(e.rss_kib());
            // A slow reader for a while: envd must hold the child back, not buffer.
            if events < 2048 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        match ev {
            pb::process_event::Event::Output(o) => {
                assert_eq!(o.stream, pb::OutputStream::Stdout as i32);
                assert_eq!(o.offset, total, "offsets must be contiguous");
                total += o.data.len() as u64;
                partial.extend_from_slice(&o.data);
                let last_nl = match partial.iter().rposition(|&b| b == b'\n') {
                    Some(i) => i,
                    None => continue,
                };
                for line in partial[..last_nl].split(|&b| b == b'\n') {
                    let v: u64 = std::str::from_utf8(line).unwrap().parse().unwrap();
                    assert_eq!(v, expect);
                    expect += 1;
                }
                partial.drain(..=last_nl);
            }
            pb::process_event::Event::Exited(x) => exited = Some(x),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(expect, n + 1);
    assert!(partial.is_empty());
    assert!(total >= 200 * 1024 * 1024, "{total}");
    assert_eq!(
        exited.unwrap().status,
        Some(pb::process_exited::Status::ExitCode(0))
    );
    println!(
        "200 MiB output: {total} bytes in {:?} ({:.0} MiB/s), envd max RSS {rss_max} KiB",
        t0.elapsed(),
        total as f64 / 1048576.0 / t0.elapsed().as_secs_f64()
    );
    // Bounded: the 1 MiB ring plus the RPC windows, nowhere near the 200 MiB streamed.
    assert!(rss_max < 48 * 1024, "envd RSS grew to {rss_max} KiB");
}

#[test]
fn stdout_stderr_env_and_exit_code() {
    let e = Envd::start();
    let c = e.init();
    let mut cfg = sh("echo out $WRENN_TEST $MINE; echo err >&2; pwd; exit 7");
    cfg.env = [("MINE".to_string(), "x".to_string())].into();
    cfg.cwd = "/tmp".into();
    let (_, mut s) = start(&c, cfg).unwrap();
    let o = drain(&mut s);
    assert_eq!(o.stdout, b"out 1 x\n/tmp\n");
    assert_eq!(o.stderr, b"err\n");
    assert_eq!(exit_code(&o), Some(7));
    // Spawn errors fail the call before any message.
    let mut bad = sh("true");
    bad.cmd = "/no/such/program".into();
    assert_eq!(start(&c, bad).unwrap_err().code, Code::NotFound);
    let mut bad = sh("true");
    bad.user = "no-such-user".into();
    assert_eq!(start(&c, bad).unwrap_err().code, Code::InvalidArgument);
    let mut bad = sh("true");
    bad.pty = Some(pb::PtySize { rows: 0, cols: 80 });
    assert_eq!(start(&c, bad).unwrap_err().code, Code::InvalidArgument);
}

/// Issue 17 §1: Init's env, default user and directory (a template's USER, WORKDIR, ENV)
/// apply to every process that does not say otherwise; a call's cwd and user win, and its
/// env wins per key over Init's, the rest of Init's staying.
#[test]
fn init_defaults_apply_unless_the_call_says_otherwise() {
    let e = Envd::start();
    let c = e.init();
    let (a, b) = (e.dir.join("a"), e.dir.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let user = if is_root() { "nobody" } else { "" };
    let _: pb::InitResponse = c
        .unary(
            pb::init_methods::INIT,
            &pb::InitRequest {
                env: [
                    ("A".to_string(), "init".to_string()),
                    ("B".to_string(), "init".to_string()),
                ]
                .into(),
                default_cwd: a.to_str().unwrap().into(),
                default_user: user.into(),
                ..Default::default()
            },
            t10(),
        )
        .unwrap();
    let script = "echo $A $B $C; pwd; id -u";
    let uid = |u: &str| if u == "nobody" { "65534" } else { "0" };
    let me = if is_root() {
        uid(user).to_string()
    } else {
        // Not root: processes run as this test's own user whatever the default.
        // SAFETY: getuid has no preconditions.
        unsafe { libc::getuid() }.to_string()
    };
    let (_, mut s) = start(&c, sh(script)).unwrap();
    let o = drain(&mut s);
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        format!("init init\n{}\n{me}\n", a.display())
    );
    // The call's own values win: cwd, user, and env per key.
    let mut cfg = sh(script);
    cfg.env = [
        ("B".to_string(), "call".to_string()),
        ("C".to_string(), "3".to_string()),
    ]
    .into();
    cfg.cwd = b.to_str().unwrap().into();
    if is_root() {
        cfg.user = "root".into();
    }
    let (_, mut s) = start(&c, cfg).unwrap();
    let o = drain(&mut s);
    let me = if is_root() { "0".to_string() } else { me };
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        format!("init call 3\n{}\n{me}\n", b.display())
    );
    // A relative cwd is taken from the default directory.
    std::fs::create_dir_all(a.join("sub")).unwrap();
    let mut cfg = sh("pwd");
    cfg.cwd = "sub".into();
    let (_, mut s) = start(&c, cfg).unwrap();
    let o = drain(&mut s);
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        format!("{}\n", a.join("sub").display())
    );
}

#[test]
fn stdin_round_trip() {
    let e = Envd::start();
    let c = e.init();
    let mut cfg = sh("cat; echo done");
    cfg.stdin = true;
    let (pid, mut s) = start(&c, cfg).unwrap();
    // A stream of several messages, the last one closing stdin.
    let mut input = c
        .call(
            pb::process_methods::SEND_INPUT,
            &pb::SendInputRequest {
                process: pid_sel(pid),
                data: Bytes::from_static(b"hello "),
                close: false,
            },
            CallOpts::default(),
        )
        .unwrap();
    let big = vec![b'z'; 3 << 20];
    for chunk in big.chunks(64 * 1024) {
        input
            .send(&pb::SendInputRequest {
                process: None,
                data: Bytes::copy_from_slice(chunk),
                close: false,
            })
            .unwrap();
    }
    input
        .send(&pb::SendInputRequest {
            process: None,
            data: Bytes::from_static(b"\n"),
            close: true,
        })
        .unwrap();
    input.close_send().unwrap();
    let r: pb::SendInputResponse = input.recv().unwrap().unwrap();
    assert_eq!(r.bytes_written, 6 + (3 << 20) + 1);
    let o = drain(&mut s);
    assert_eq!(o.stdout.len(), 6 + (3 << 20) + 1 + 5);
    assert!(o.stdout.starts_with(b"hello zzz"));
    assert!(o.stdout.ends_with(b"z\ndone\n"));
    // Without stdin: FAILED_PRECONDITION.
    let (pid, mut s) = start(&c, sh("sleep 0.2")).unwrap();
    let mut input = c
        .call(
            pb::process_methods::SEND_INPUT,
            &pb::SendInputRequest {
                process: pid_sel(pid),
                data: Bytes::from_static(b"x"),
                close: false,
            },
            CallOpts::default(),
        )
        .unwrap();
    input.close_send().unwrap();
    assert_eq!(
        input.recv::<pb::SendInputResponse>().unwrap_err().code,
        Code::FailedPrecondition
    );
    drain(&mut s);
}

#[test]
fn pty_tty_and_resize() {
    let e = Envd::start();
    let c = e.init();
    let mut cfg = sh("tty; stty size; read x; stty size");
    cfg.pty = Some(pb::PtySize {
        rows: 30,
        cols: 100,
    });
    let (pid, mut s) = start(&c, cfg).unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("30 100") {
        match next_event(&mut s).unwrap() {
            Some(pb::process_event::Event::Output(o)) => {
                assert_eq!(o.stream, pb::OutputStream::Pty as i32);
                seen.extend_from_slice(&o.data);
            }
            other => panic!("{other:?}"),
        }
    }
    let _: pb::ResizePtyResponse = c
        .unary(
            pb::process_methods::RESIZE_PTY,
            &pb::ResizePtyRequest {
                process: pid_sel(pid),
                size: Some(pb::PtySize {
                    rows: 40,
                    cols: 120,
                }),
            },
            t10(),
        )
        .unwrap();
    send_input(&c, pid_sel(pid), b"\n", false);
    let o = drain(&mut s);
    seen.extend_from_slice(&o.pty);
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("40 120"), "{text}");
    assert_eq!(exit_code(&o), Some(0));
    // Resize of a process without a pty.
    let (pid, mut s) = start(&c, sh("sleep 0.2")).unwrap();
    let err = c
        .unary::<_, pb::ResizePtyResponse>(
            pb::process_methods::RESIZE_PTY,
            &pb::ResizePtyRequest {
                process: pid_sel(pid),
                size: Some(pb::PtySize { rows: 1, cols: 1 }),
            },
            t10(),
        )
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    drain(&mut s);
}

fn signal(
    c: &Client,
    sel: Option<pb::ProcessSelector>,
    sig: i32,
    group: bool,
) -> Result<(), Status> {
    c.unary::<_, pb::SignalResponse>(
        pb::process_methods::SIGNAL,
        &pb::SignalRequest {
            process: sel,
            signal: sig,
            group,
        },
        t10(),
    )
    .map(|_| ())
}

#[test]
fn signals_and_timeouts() {
    let e = Envd::start();
    let c = e.init();
    let (pid, mut s) = start(&c, sh("echo up; exec sleep 100")).unwrap();
    assert!(matches!(
        next_event(&mut s).unwrap(),
        Some(pb::process_event::Event::Output(_))
    ));
    signal(&c, pid_sel(pid), libc::SIGTERM, false).unwrap();
    assert_eq!(exit_signal(&drain(&mut s)), Some(libc::SIGTERM));
    // Group signal reaches the background child too (the shell waits for it).
    let (pid, mut s) = start(&c, sh("sleep 100 & wait")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    signal(&c, pid_sel(pid), libc::SIGKILL, true).unwrap();
    assert_eq!(exit_signal(&drain(&mut s)), Some(libc::SIGKILL));
    assert_eq!(
        signal(&c, pid_sel(999_999), libc::SIGTERM, false)
            .unwrap_err()
            .code,
        Code::NotFound
    );
    assert_eq!(
        signal(&c, pid_sel(1), 0, false).unwrap_err().code,
        Code::InvalidArgument
    );
    // Timeout kills the whole group.
    let mut cfg = sh("sleep 100 & sleep 100");
    cfg.timeout_ms = 300;
    let t0 = Instant::now();
    let (_, mut s) = start(&c, cfg).unwrap();
    let o = drain(&mut s);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(o.exited.as_ref().unwrap().timed_out);
    assert_eq!(exit_signal(&o), Some(libc::SIGKILL));
    let start_wait = Instant::now();
    while !e.children().is_empty() {
        assert!(
            start_wait.elapsed() < Duration::from_secs(5),
            "{:?}",
            e.children()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reconnect_replays_recent_output() {
    let e = Envd::start();
    let c = e.init();
    let mut cfg = sh("echo hello; echo world >&2; exec sleep 100");
    cfg.tag = "svc".into();
    let (pid, mut s) = start(&c, cfg.clone()).unwrap();
    let mut got = 0;
    while got < 2 {
        if let Some(pb::process_event::Event::Output(_)) = next_event(&mut s).unwrap() {
            got += 1;
        }
    }
    s.cancel();
    // Tags are unique among running processes.
    assert_eq!(start(&c, cfg).unwrap_err().code, Code::AlreadyExists);
    let list: pb::ListProcessesResponse = c
        .unary(
            pb::process_methods::LIST,
            &pb::ListProcessesRequest {},
            t10(),
        )
        .unwrap();
    let info = list.processes.iter().find(|p| p.pid == pid).unwrap();
    assert_eq!(info.tag, "svc");
    assert_eq!(info.config.as_ref().unwrap().cmd, "/bin/sh");
    // A new connection reattaches by tag and gets the replay.
    let c2 = e.authed();
    let mut s2 = c2
        .call(
            pb::process_methods::CONNECT,
            &pb::ConnectRequest {
                process: tag_sel("svc"),
                skip_replay: false,
            },
            stream_opts(),
        )
        .unwrap();
    assert!(
        matches!(next_event(&mut s2).unwrap(), Some(pb::process_event::Event::Started(st)) if st.pid == pid)
    );
    signal(&c2, tag_sel("svc"), libc::SIGTERM, false).unwrap();
    let o = drain(&mut s2);
    assert_eq!(o.stdout, b"hello\n");
    assert_eq!(o.stderr, b"world\n");
    assert_eq!(exit_signal(&o), Some(libc::SIGTERM));
    let err = c2
        .call(
            pb::process_methods::CONNECT,
            &pb::ConnectRequest {
                process: pid_sel(999_999),
                skip_replay: false,
            },
            stream_opts(),
        )
        .and_then(|mut s| s.recv::<pb::ProcessEvent>())
        .unwrap_err();
    assert_eq!(err.code, Code::NotFound);
}

#[test]
fn runs_as_nobody() {
    if !is_root() {
        return skip("not root: cannot switch users");
    }
    let e = Envd::start();
    let c = e.init();
    let mut cfg = sh("id -u; id -g; echo $HOME $USER");
    cfg.user = "nobody".into();
    let (_, mut s) = start(&c, cfg).unwrap();
    let o = drain(&mut s);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "65534\n65534\n/nonexistent nobody\n"
    );
    // Files: nobody may not write into a root-owned 0755 directory, nor read a 0600 file.
    std::fs::write(e.dir.join("secret"), b"s").unwrap();
    let secret = e.dir.join("secret");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let err = read_file(&c, &secret, "nobody").unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied);
    let err = write_file(&c, &e.dir.join("new"), b"x", "nobody", true).unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied);
    assert_eq!(read_file(&c, &secret, "").unwrap(), b"s");
}

/// An accounts root whose etc/passwd has root, nobody and (when `with_user`) the image's
/// default account `user` (uid 4242 here, home `<root>/home/user` owned by it).
fn accounts_root(name: &str, with_user: bool) -> PathBuf {
    let root = std::env::temp_dir().join(format!("envd-accounts-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let home = root.join("home/user");
    let mut passwd = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        .to_string();
    let mut group = "root:x:0:\nnogroup:x:65534:\n".to_string();
    if with_user {
        passwd.push_str(&format!("user:x:4242:4242::{}:/bin/sh\n", home.display()));
        group.push_str("user:x:4242:\n");
        std::fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(4242), Some(4242)).unwrap();
        // The parents must be searchable by the user.
        for d in [&root, &root.join("home")] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
    }
    std::fs::write(root.join("etc/passwd"), passwd).unwrap();
    std::fs::write(root.join("etc/group"), group).unwrap();
    root
}

fn run_sh(c: &Client, script: &str, user: &str) -> String {
    let mut cfg = sh(script);
    cfg.user = user.into();
    let (_, mut s) = start(c, cfg).unwrap();
    let o = drain(&mut s);
    assert_eq!(exit_code(&o), Some(0), "{o:?}");
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn default_user_is_user_when_the_image_has_it() {
    if !is_root() {
        return skip("not root: cannot switch users");
    }
    let root = accounts_root("with", true);
    let home = root.join("home/user");
    let e = Envd::start_with(&["--accounts-root", root.to_str().unwrap()]);
    let c = e.init();
    // Processes: uid, environment and working directory of `user`.
    assert_eq!(
        run_sh(&c, "id -u; echo $USER $HOME; pwd", ""),
        format!("4242\nuser {0}\n{0}\n", home.display())
    );
    // Files: a relative path lands in the home directory, owned by `user`.
    let mut s = c
        .call(
            pb::filesystem_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    path: "rel.txt".into(),
                    atomic: true,
                    ..Default::default()
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    s.send(&pb::WriteRequest {
        msg: Some(pb::write_request::Msg::Data(Bytes::from_static(b"mine"))),
    })
    .unwrap();
    s.close_send().unwrap();
    let w: pb::WriteResponse = s.recv().unwrap().unwrap();
    let entry = w.entry.unwrap();
    assert_eq!(entry.path, home.join("rel.txt").to_str().unwrap());
    assert_eq!(
        (entry.uid, entry.gid, entry.owner.as_str()),
        (4242, 4242, "user")
    );
    // `user` may not write where only root may.
    let err = write_file(&c, &e.dir.join("rootonly"), b"x", "", true).unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied, "{err}");
    // A call that names another user runs as that user.
    assert_eq!(run_sh(&c, "id -u", "root"), "0\n");
    write_file(&c, &e.dir.join("rootonly"), b"x", "root", true).unwrap();
    // Init can still choose another default.
    let r: pb::InitResponse = c
        .unary(
            pb::init_methods::INIT,
            &pb::InitRequest {
                default_user: "nobody".into(),
                ..Default::default()
            },
            t10(),
        )
        .unwrap();
    assert!(!r.envd_version.is_empty());
    assert_eq!(run_sh(&c, "id -u", ""), "65534\n");
    drop(e);

    // An image without the account (built before it existed): root, as before.
    let old = accounts_root("without", false);
    let e = Envd::start_with(&["--accounts-root", old.to_str().unwrap()]);
    let c = e.init();
    assert_eq!(run_sh(&c, "id -u; echo $USER", ""), "0\nroot\n");
    drop(e);
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&old);
}

// ---- files --------------------------------------------------------------------------

fn read_file(c: &Client, path: &Path, user: &str) -> Result<Vec<u8>, Status> {
    let mut s = c.call(
        pb::filesystem_methods::READ,
        &pb::ReadRequest {
            path: path.to_str().unwrap().into(),
            user: user.into(),
            ..Default::default()
        },
        stream_opts(),
    )?;
    let mut out = Vec::new();
    while let Some(m) = s.recv::<pb::ReadResponse>()? {
        assert_eq!(m.offset, out.len() as u64);
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

fn write_file(
    c: &Client,
    path: &Path,
    data: &[u8],
    user: &str,
    atomic: bool,
) -> Result<pb::WriteResponse, Status> {
    let mut s = c.call(
        pb::filesystem_methods::WRITE,
        &pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                path: path.to_str().unwrap().into(),
                user: user.into(),
                atomic,
                truncate: true,
                ..Default::default()
            })),
        },
        CallOpts::default(),
    )?;
    for chunk in data.chunks(64 * 1024) {
        s.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Data(Bytes::copy_from_slice(chunk))),
        })?;
    }
    s.close_send()?;
    Ok(s.recv::<pb::WriteResponse>()?.unwrap())
}

/// Deterministic bytes: a xorshift stream, 8 bytes per step.
struct Gen(u64);
impl Gen {
    fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            w.copy_from_slice(&b[..w.len()]);
        }
    }
}

/// A cheap order-sensitive checksum over 8-byte words.
#[derive(Default)]
struct Sum(u64, u64);
impl Sum {
    fn add(&mut self, buf: &[u8]) {
        for w in buf.chunks(8) {
            let mut b = [0u8; 8];
            b[..w.len()].copy_from_slice(w);
            self.0 = self.0.wrapping_add(u64::from_le_bytes(b));
            self.1 = self.1.wrapping_add(self.0).rotate_left(1);
        }
    }
}

#[test]
fn file_round_trip_2_gib_with_checksum() {
    let mib: u64 = std::env::var("WRENN_ENVD_BIG_FILE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let len = mib << 20;
    let e = Envd::start();
    let c = e.init();
    let path = e.dir.join("big");
    let t0 = Instant::now();
    let mut s = c
        .call(
            pb::filesystem_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    path: path.to_str().unwrap().into(),
                    atomic: true,
                    mode: Some(0o600),
                    ..Default::default()
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    let mut g = Gen(0x9e3779b97f4a7c15);
    let mut sent = Sum::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        g.fill(&mut buf[..n]);
        sent.add(&buf[..n]);
        s.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Data(Bytes::copy_from_slice(
                &buf[..n],
            ))),
        })
        .unwrap();
        left -= n as u64;
    }
    s.close_send().unwrap();
    let w: pb::WriteResponse = s.recv().unwrap().unwrap();
    assert_eq!(w.bytes_written, len);
    assert_eq!(w.entry.as_ref().unwrap().size, len);
    assert_eq!(w.entry.as_ref().unwrap().mode, 0o600);
    let wrote = t0.elapsed();
    let t1 = Instant::now();
    let mut r = c
        .call(
            pb::filesystem_methods::READ,
            &pb::ReadRequest {
                path: path.to_str().unwrap().into(),
                ..Default::default()
            },
            stream_opts(),
        )
        .unwrap();
    let mut got = Sum::default();
    let mut total = 0u64;
    while let Some(m) = r.recv::<pb::ReadResponse>().unwrap() {
        assert_eq!(m.offset, total);
        total += m.data.len() as u64;
        got.add(&m.data);
    }
    assert_eq!(total, len);
    assert_eq!((got.0, got.1), (sent.0, sent.1));
    println!(
        "{mib} MiB file: write {:?} ({:.0} MiB/s), read {:?} ({:.0} MiB/s)",
        wrote,
        mib as f64 / wrote.as_secs_f64(),
        t1.elapsed(),
        mib as f64 / t1.elapsed().as_secs_f64()
    );
    // Ranged read.
    let mut r = c
        .call(
            pb::filesystem_methods::READ,
            &pb::ReadRequest {
                path: path.to_str().unwrap().into(),
                offset: 1000,
                length: 100_000,
                ..Default::default()
            },
            stream_opts(),
        )
        .unwrap();
    let mut part = Vec::new();
    while let Some(m) = r.recv::<pb::ReadResponse>().unwrap() {
        part.extend_from_slice(&m.data);
    }
    let mut f = std::fs::File::open(&path).unwrap();
    let mut expect = vec![0u8; 101_000];
    f.read_exact(&mut expect).unwrap();
    assert_eq!(part, expect[1000..]);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn concurrent_writers_never_mix() {
    let e = Envd::start();
    let c = e.init();
    let path = e.dir.join("shared");
    let threads: Vec<_> = (0..6u8)
        .map(|i| {
            let c = c.clone();
            let path = path.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let data = vec![b'a' + i; 300_000];
                    write_file(&c, &path, &data, "", true).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len(), 300_000);
    assert!(data.iter().all(|&b| b == data[0]));
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(&e.dir)
        .unwrap()
        .flatten()
        .map(|d| d.file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.to_string_lossy().contains("wrenn-tmp")),
        "{names:?}"
    );
}

/// Writes `data` with an optional trailing checksum; `flip` changes one byte of what is sent
/// after the checksum was computed (a byte flipped in transit).
fn write_checked(
    c: &Client,
    path: &Path,
    data: &[u8],
    atomic: bool,
    crc: Option<u32>,
    flip: Option<usize>,
) -> Result<pb::WriteResponse, Status> {
    let mut sent = data.to_vec();
    if let Some(i) = flip {
        sent[i] ^= 0x20;
    }
    let mut s = c.call(
        pb::filesystem_methods::WRITE,
        &pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                path: path.to_str().unwrap().into(),
                atomic,
                truncate: true,
                ..Default::default()
            })),
        },
        CallOpts::default(),
    )?;
    for chunk in sent.chunks(64 * 1024) {
        s.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Data(Bytes::copy_from_slice(chunk))),
        })?;
    }
    if let Some(crc) = crc {
        s.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Crc32(crc)),
        })?;
    }
    s.close_send()?;
    Ok(s.recv::<pb::WriteResponse>()?.unwrap())
}

fn temp_files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("wrenn-tmp"))
        .collect()
}

#[test]
fn uploads_are_checked_end_to_end() {
    let e = Envd::start();
    let c = e.init();
    let mut data = vec![0u8; 300_000];
    Gen(7).fill(&mut data);
    let crc = crc32fast::hash(&data);
    let target = e.dir.join("checked");
    // The right checksum: written.
    let w = write_checked(&c, &target, &data, true, Some(crc), None).unwrap();
    assert_eq!(w.bytes_written, data.len() as u64);
    assert_eq!(std::fs::read(&target).unwrap(), data);
    // One byte flipped on the way: DATA_LOSS, the file keeps its old content, no temp file.
    let mut newer = data.clone();
    newer[..5].copy_from_slice(b"newer");
    let err = write_checked(
        &c,
        &target,
        &newer,
        true,
        Some(crc32fast::hash(&newer)),
        Some(123_456),
    )
    .unwrap_err();
    assert_eq!(err.code, Code::DataLoss, "{err}");
    assert!(err.message.contains("checksum mismatch"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), data, "old content kept");
    assert!(
        temp_files_in(&e.dir).is_empty(),
        "{:?}",
        temp_files_in(&e.dir)
    );
    // A new path: nothing appears at it.
    let fresh = e.dir.join("fresh");
    let err = write_checked(&c, &fresh, &data, true, Some(crc), Some(0)).unwrap_err();
    assert_eq!(err.code, Code::DataLoss);
    assert!(!fresh.exists());
    assert!(temp_files_in(&e.dir).is_empty());
    // In place, a mismatch is still reported (the bytes cannot be taken back).
    let err = write_checked(&c, &fresh, &data, false, Some(crc ^ 1), None).unwrap_err();
    assert_eq!(err.code, Code::DataLoss);
    assert!(err.message.contains("not an atomic write"), "{err}");
    // In place with the right checksum, and the old form without one: both written.
    write_checked(
        &c,
        &fresh,
        &newer,
        false,
        Some(crc32fast::hash(&newer)),
        None,
    )
    .unwrap();
    assert_eq!(std::fs::read(&fresh).unwrap(), newer);
    write_checked(&c, &fresh, &data, true, None, None).unwrap();
    assert_eq!(std::fs::read(&fresh).unwrap(), data);
    // Empty file with its checksum (0).
    write_checked(&c, &fresh, b"", true, Some(0), None).unwrap();
    assert_eq!(std::fs::read(&fresh).unwrap(), b"");
    // Nothing may follow the checksum.
    let mut s = c
        .call(
            pb::filesystem_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    path: e.dir.join("late").to_str().unwrap().into(),
                    atomic: true,
                    ..Default::default()
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    for m in [
        pb::write_request::Msg::Crc32(0),
        pb::write_request::Msg::Data(Bytes::from_static(b"late")),
    ] {
        s.send(&pb::WriteRequest { msg: Some(m) }).unwrap();
    }
    let _ = s.close_send();
    let err = s.recv::<pb::WriteResponse>().unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
    assert!(!e.dir.join("late").exists());
}

#[test]
fn interrupted_upload_leaves_no_file() {
    let e = Envd::start();
    let c = e.init();
    let target = e.dir.join("interrupted");
    let mut s = c
        .call(
            pb::filesystem_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    path: target.to_str().unwrap().into(),
                    atomic: true,
                    ..Default::default()
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    for _ in 0..16 {
        s.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Data(Bytes::from(vec![
                7u8;
                64 * 1024
            ]))),
        })
        .unwrap();
    }
    // The temporary file exists while the upload runs...
    let start = Instant::now();
    while temp_files_in(&e.dir).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no temp file seen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // ...and the client vanishes mid-stream: no file at the path, no temporary file.
    drop(s);
    c.close();
    drop(c);
    let start = Instant::now();
    while !temp_files_in(&e.dir).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "temp file left: {:?}",
            temp_files_in(&e.dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!target.exists());
}

#[test]
fn downloads_end_with_a_checksum() {
    let e = Envd::start();
    let c = e.init();
    let mut data = vec![0u8; 200_000];
    Gen(11).fill(&mut data);
    let path = e.dir.join("down");
    std::fs::write(&path, &data).unwrap();
    std::fs::write(e.dir.join("empty"), b"").unwrap();
    for (file, offset, length, expect) in [
        ("down", 0u64, 0u64, &data[..]),
        ("down", 1000, 70_000, &data[1000..71_000]),
        ("down", 500_000, 0, &data[..0]),
        ("empty", 0, 0, &data[..0]),
    ] {
        let mut s = c
            .call(
                pb::filesystem_methods::READ,
                &pb::ReadRequest {
                    path: e.dir.join(file).to_str().unwrap().into(),
                    offset,
                    length,
                    ..Default::default()
                },
                stream_opts(),
            )
            .unwrap();
        let mut got = Vec::new();
        let mut crc = None;
        while let Some(m) = s.recv::<pb::ReadResponse>().unwrap() {
            assert!(crc.is_none(), "a message after the checksum");
            got.extend_from_slice(&m.data);
            if m.crc32.is_some() {
                assert!(m.data.is_empty(), "the checksum message carries no data");
                crc = m.crc32;
            }
        }
        assert_eq!(got, expect, "{file} {offset} {length}");
        assert_eq!(
            crc,
            Some(crc32fast::hash(expect)),
            "{file} {offset} {length}"
        );
    }
}

#[test]
fn selftest_subcommand_reports_a_clean_machine() {
    let dir = std::env::temp_dir().join(format!("envd-it-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin =
        std::env::var("WRENN_ENVD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_envd").to_string());
    let out = Command::new(&bin)
        .args(["selftest", "--mib", "2", "--rounds", "1", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.ends_with("selftest verdict=clean\n"), "{text}");
    assert!(
        text.contains("case=kernel-copy stage=sendfile bytes=2097152 runs=0"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "test files removed"
    );
    let bad = Command::new(&bin)
        .args(["selftest", "--mib", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn file_operations_and_bad_paths() {
    let e = Envd::start();
    let c = e.init();
    let d = e.dir.to_str().unwrap().to_string();
    let mk: pb::MakeDirResponse = c
        .unary(
            pb::filesystem_methods::MAKE_DIR,
            &pb::MakeDirRequest {
                path: format!("{d}/a/b/c"),
                ..Default::default()
            },
            t10(),
        )
        .unwrap();
    assert!(mk.created);
    assert_eq!(mk.entry.unwrap().r#type, pb::FileType::Dir as i32);
    write_file(&c, &e.dir.join("a/f"), b"12345", "", false).unwrap();
    let st: pb::StatResponse = c
        .unary(
            pb::filesystem_methods::STAT,
            &pb::StatRequest {
                path: format!("{d}/a/f"),
                ..Default::default()
            },
            t10(),
        )
        .unwrap();
    let entry = st.entry.unwrap();
    assert_eq!(
        (entry.size, entry.name.as_str(), entry.owner.as_str()),
        (5, "f", "root")
    );
    // List with depth, including a non-UTF-8 name (raw bytes reported).
    let raw = e.dir.join(std::ffi::OsStr::from_bytes(b"a/\xff\xfe"));
    std::fs::write(&raw, b"").unwrap();
    let mut s = c
        .call(
            pb::filesystem_methods::LIST,
            &pb::ListDirRequest {
                path: format!("{d}/a"),
                depth: 3,
                ..Default::default()
            },
            stream_opts(),
        )
        .unwrap();
    let mut entries = Vec::new();
    while let Some(b) = s.recv::<pb::ListDirResponse>().unwrap() {
        entries.extend(b.entries);
    }
    assert_eq!(entries.len(), 4, "{entries:?}");
    let odd = entries
        .iter()
        .find(|x| !x.entry.as_ref().unwrap().name_raw.is_empty())
        .unwrap();
    assert_eq!(&odd.entry.as_ref().unwrap().name_raw[..], b"\xff\xfe");
    // Move without and with overwrite.
    write_file(&c, &e.dir.join("g"), b"old", "", true).unwrap();
    let mv = |overwrite| {
        c.unary::<_, pb::MoveResponse>(
            pb::filesystem_methods::MOVE,
            &pb::MoveRequest {
                source: format!("{d}/a/f"),
                destination: format!("{d}/g"),
                overwrite,
                ..Default::default()
            },
            t10(),
        )
    };
    assert_eq!(mv(false).unwrap_err().code, Code::AlreadyExists);
    mv(true).unwrap();
    assert_eq!(read_file(&c, &e.dir.join("g"), "").unwrap(), b"12345");
    // Errors.
    let stat = |p: &str| {
        c.unary::<_, pb::StatResponse>(
            pb::filesystem_methods::STAT,
            &pb::StatRequest {
                path: p.into(),
                ..Default::default()
            },
            t10(),
        )
        .unwrap_err()
        .code
    };
    assert_eq!(stat(&format!("{d}/missing")), Code::NotFound);
    assert_eq!(stat(&format!("{d}/a\0b")), Code::InvalidArgument);
    assert_eq!(stat(""), Code::InvalidArgument);
    assert_eq!(
        read_file(&c, &e.dir, "").unwrap_err().code,
        Code::FailedPrecondition
    );
    assert_eq!(
        read_file(&c, &e.dir.join("g/x"), "").unwrap_err().code,
        Code::FailedPrecondition
    );
    let mut s = c
        .call(
            pb::filesystem_methods::LIST,
            &pb::ListDirRequest {
                path: format!("{d}/g"),
                ..Default::default()
            },
            stream_opts(),
        )
        .unwrap();
    assert_eq!(
        s.recv::<pb::ListDirResponse>().unwrap_err().code,
        Code::FailedPrecondition
    );
    let rm = |p: String, recursive, ignore_missing| {
        c.unary::<_, pb::RemoveResponse>(
            pb::filesystem_methods::REMOVE,
            &pb::RemoveRequest {
                path: p,
                recursive,
                ignore_missing,
                ..Default::default()
            },
            t10(),
        )
    };
    assert_eq!(
        rm(format!("{d}/a"), false, false).unwrap_err().code,
        Code::FailedPrecondition
    );
    rm(format!("{d}/a"), true, false).unwrap();
    assert_eq!(
        rm(format!("{d}/a"), true, false).unwrap_err().code,
        Code::NotFound
    );
    rm(format!("{d}/a"), true, true).unwrap();
    // Invalid UTF-8 in a string field: the request does not decode.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawStat {
        #[prost(bytes = "vec", tag = "1")]
        path: Vec<u8>,
    }
    let err = c
        .unary::<_, pb::StatResponse>(
            pb::filesystem_methods::STAT,
            &RawStat {
                path: b"/tmp/\xff".to_vec(),
            },
            t10(),
        )
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
    // A write whose first message is not a header.
    let mut s = c
        .call(
            pb::filesystem_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Data(Bytes::from_static(b"x"))),
            },
            CallOpts::default(),
        )
        .unwrap();
    let _ = s.close_send();
    assert_eq!(
        s.recv::<pb::WriteResponse>().unwrap_err().code,
        Code::InvalidArgument
    );
}

#[test]
fn watch_reports_changes() {
    let e = Envd::start();
    let c = e.init();
    std::fs::create_dir(e.dir.join("w")).unwrap();
    let mut s = c
        .call(
            pb::filesystem_methods::WATCH,
            &pb::WatchRequest {
                path: e.dir.join("w").to_str().unwrap().into(),
                recursive: true,
                ..Default::default()
            },
            stream_opts(),
        )
        .unwrap();
    match s.recv::<pb::WatchResponse>().unwrap().unwrap().msg {
        Some(pb::watch_response::Msg::Started(_)) => {}
        other => panic!("{other:?}"),
    }
    std::fs::create_dir(e.dir.join("w/sub")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    write_file(&c, &e.dir.join("w/sub/file"), b"data", "", false).unwrap();
    let want = e.dir.join("w/sub/file").to_str().unwrap().to_string();
    let mut seen = HashSet::new();
    let t0 = Instant::now();
    while !(seen.contains(&(pb::FsEventKind::Create as i32, want.clone()))
        && seen.contains(&(pb::FsEventKind::CloseWrite as i32, want.clone())))
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "{seen:?}");
        if let Some(pb::watch_response::Msg::Events(b)) =
            s.recv::<pb::WatchResponse>().unwrap().unwrap().msg
        {
            for ev in b.events {
                seen.insert((ev.kind, ev.path));
            }
        }
    }
    s.cancel();
    let mut s = c
        .call(
            pb::filesystem_methods::WATCH,
            &pb::WatchRequest {
                path: "/no/such/dir".into(),
                ..Default::default()
            },
            stream_opts(),
        )
        .unwrap();
    assert_eq!(
        s.recv::<pb::WatchResponse>().unwrap_err().code,
        Code::NotFound
    );
}

// ---- robustness ---------------------------------------------------------------------

#[test]
fn oversized_frames_are_refused_and_envd_survives() {
    let e = Envd::start();
    let c = e.init();
    // A message above the 1 MiB message limit.
    let huge = vec![0u8; 3 << 20];
    let r = write_file(&c, &e.dir.join("huge"), &[], "", false).map(|_| ());
    assert!(r.is_ok());
    let mut s = c
        .call(
            pb::filesystem_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    path: e.dir.join("huge2").to_str().unwrap().into(),
                    ..Default::default()
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    let sent = s.send(&pb::WriteRequest {
        msg: Some(pb::write_request::Msg::Data(Bytes::from(huge))),
    });
    let outcome = sent
        .and_then(|_| s.close_send())
        .and_then(|_| s.recv::<pb::WriteResponse>());
    assert!(outcome.is_err(), "an oversized message was accepted");
    // Raw frames: after a valid hello, a REQUEST whose length prefix is far above the
    // frame limit. The server must refuse it (GOAWAY/ERROR, then close) without reading
    // the body, and go on serving others.
    {
        use prost::Message;
        use proto::frame::{self, Kind};
        use std::io::Write;
        let mut raw = std::os::unix::net::UnixStream::connect(&e.sock).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let hello = Hello {
            version: proto::PROTOCOL_VERSION,
            credential_kind: proto::gen::wrenn::wire::v1::CredentialKind::AccessToken as i32,
            credential: TOKEN.into(),
            client: "raw-test".into(),
            ..Default::default()
        };
        let mut out = Vec::new();
        frame::put_frame(&mut out, 0, Kind::Hello, 0, &hello.encode_to_vec());
        raw.write_all(&out).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let mut acked = false;
        let t0 = Instant::now();
        while !acked {
            assert!(t0.elapsed() < Duration::from_secs(5), "no HELLO_ACK");
            let n = raw.read(&mut buf).unwrap();
            assert!(n > 0, "closed before HELLO_ACK");
            got.extend_from_slice(&buf[..n]);
            if let Ok(frame::Decoded::Frame(f, _)) = frame::decode(&got, u32::MAX >> 1) {
                assert_eq!(f.kind, Kind::HelloAck);
                acked = true;
            }
        }
        out.clear();
        frame::put_header(&mut out, 1, Kind::Request, 0, 8 << 20);
        raw.write_all(&out).unwrap();
        let _ = raw.write_all(&[0u8; 1024]);
        // The server answers and closes: read to EOF (or a reset), never a timeout.
        let t0 = Instant::now();
        loop {
            match raw.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("oversized frame not refused: {e} after {:?}", t0.elapsed()),
            }
        }
        // Garbage before any hello: refused too.
        let mut raw = std::os::unix::net::UnixStream::connect(&e.sock).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = raw.write_all(&u32::MAX.to_be_bytes());
        let _ = raw.write_all(&[0u8; 64]);
        loop {
            match raw.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("garbage before hello not refused: {e}"),
            }
        }
    }
    let c2 = e.authed();
    let _: pb::HealthCheckResponse = c2
        .unary(pb::health_methods::CHECK, &pb::HealthCheckRequest {}, t10())
        .unwrap();
}

#[test]
fn vanishing_clients_leak_nothing() {
    let e = Envd::start();
    let c = e.init();
    // Warm up worker threads and lazily opened files so the baseline is stable.
    let (_, mut s) = start(&c, sh("true")).unwrap();
    drain(&mut s);
    std::thread::sleep(Duration::from_millis(300));
    let baseline = e.fd_count();
    for round in 0..3 {
        let c = e.authed();
        // A process with far more output than the ring, a half-written file, a watch.
        let (_, mut s) = start(&c, sh("head -c 50000000 /dev/zero")).unwrap();
        let _ = next_event(&mut s).unwrap();
        let mut w = c
            .call(
                pb::filesystem_methods::WRITE,
                &pb::WriteRequest {
                    msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                        path: e
                            .dir
                            .join(format!("partial{round}"))
                            .to_str()
                            .unwrap()
                            .into(),
                        atomic: true,
                        ..Default::default()
                    })),
                },
                CallOpts::default(),
            )
            .unwrap();
        w.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Data(Bytes::from(vec![
                1u8;
                100_000
            ]))),
        })
        .unwrap();
        let mut wa = c
            .call(
                pb::filesystem_methods::WATCH,
                &pb::WatchRequest {
                    path: e.dir.to_str().unwrap().into(),
                    ..Default::default()
                },
                stream_opts(),
            )
            .unwrap();
        let _ = wa.recv::<pb::WatchResponse>();
        // Vanish: close the connection without finishing anything.
        c.close();
        drop((s, w, wa));
    }
    let t0 = Instant::now();
    loop {
        let fds = e.fd_count();
        let kids = e.children();
        let temps: Vec<_> = std::fs::read_dir(&e.dir)
            .unwrap()
            .flatten()
            .filter(|d| d.file_name().to_string_lossy().contains("wrenn-tmp"))
            .collect();
        if fds <= baseline && kids.is_empty() && temps.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "leaked: fds {fds} (baseline {baseline}): {:?}, children {kids:?}, temp files {}",
            e.fd_targets(),
            temps.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let list: pb::ListProcessesResponse = e
        .authed()
        .unary(
            pb::process_methods::LIST,
            &pb::ListProcessesRequest {},
            t10(),
        )
        .unwrap();
    assert!(list.processes.is_empty());
}

#[test]
fn metrics_and_health() {
    let e = Envd::start();
    let c = e.init();
    let (_, mut s) = start(&c, sh("sleep 0.5")).unwrap();
    let m: pb::GetMetricsResponse = c
        .unary(pb::metrics_methods::GET, &pb::GetMetricsRequest {}, t10())
        .unwrap();
    assert!(m.cpu_count >= 1);
    assert!(m.memory_total_bytes > 0 && m.disk_total_bytes > 0);
    assert_eq!(m.api_process_count, 1);
    assert!(m.now_unix_ns > 0);
    drain(&mut s);
}

// ---- announce -----------------------------------------------------------------------

struct AnnounceSink(Arc<Mutex<Vec<pb::ReadyRequest>>>);

impl Service for AnnounceSink {
    fn hello(&self, _: &Hello) -> Result<Peer, Status> {
        Ok(Arc::new(()))
    }
    fn call(&self, call: Call) {
        if call.method() != pb::announce_methods::READY {
            return call.fail(Status::unimplemented("no"));
        }
        match call.decode::<pb::ReadyRequest>() {
            Ok(r) => {
                self.0.lock().unwrap().push(r);
                call.reply(&pb::ReadyResponse {})
            }
            Err(e) => call.fail(e),
        }
    }
}

#[test]
fn announces_readiness_and_again_after_resumed() {
    let dir = std::env::temp_dir().join(format!("envd-ann-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("ready.sock");
    let got = Arc::new(Mutex::new(Vec::new()));
    let mut server = Server::new(
        ServerConfig::new("agent-test"),
        Arc::new(AnnounceSink(got.clone())),
    )
    .unwrap();
    server.listen_unix(&sock).unwrap();
    let (handle, _join) = server.spawn().unwrap();
    let e = Envd::start_with(&["--announce-unix", sock.to_str().unwrap()]);
    let wait_for = |n: usize| {
        let t0 = Instant::now();
        while got.lock().unwrap().len() < n {
            assert!(t0.elapsed() < Duration::from_secs(10), "no announce");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(1);
    {
        let g = got.lock().unwrap();
        assert!(!g[0].resumed && !g[0].initialized);
        assert_eq!(g[0].envd_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(g[0].instance_id.len(), 32);
    }
    let c = e.init();
    let r: pb::ResumedResponse = c
        .unary(
            pb::init_methods::RESUMED,
            &pb::ResumedRequest {
                host_wall_time_unix_ns: 0,
            },
            t10(),
        )
        .unwrap();
    assert_eq!(r.clock_source, pb::ClockSource::None as i32);
    wait_for(2);
    {
        let g = got.lock().unwrap();
        assert!(g[1].resumed && g[1].initialized);
        assert_eq!(g[1].instance_id, g[0].instance_id);
        assert_eq!(g[1].sandbox_id, "sb-00000000-0000-0000-0000-000000000001");
    }
    handle.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- PID 1 --------------------------------------------------------------------------

/// Host pid of the first child of `parent`.
fn first_child(parent: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// envd as PID 1 of new pid, mount, network and UTS namespaces (so its mounts, hostname
/// and `kill(-1)` stay inside): mounts, hostname, orphan reaping, shutdown.
#[test]
fn pid1_duties_in_namespaces() {
    if !is_root() {
        return skip("not root: cannot create namespaces for a PID 1 test");
    }
    if !Path::new("/usr/bin/unshare").exists() {
        return skip("no /usr/bin/unshare");
    }
    // Not under /tmp or /run: envd mounts tmpfs there.
    let dir = PathBuf::from(format!("/var/tmp/envd-pid1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("envd.sock");
    let bin =
        std::env::var("WRENN_ENVD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_envd").to_string());
    // /proc/<pid>/comm holds at most 15 bytes of the executable's name.
    let comm: String = Path::new(&bin)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .chars()
        .take(15)
        .collect();
    let unshare = Command::new("/usr/bin/unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--net",
            "--uts",
            "--propagation",
            "private",
            "--",
        ])
        .arg(&bin)
        .arg("--listen-unix")
        .arg(&sock)
        .arg("--no-announce")
        .env("WRENN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Ends the namespace (and removes the dir) however the test ends.
    struct Ns {
        unshare: Child,
        dir: PathBuf,
    }
    impl Drop for Ns {
        fn drop(&mut self) {
            if let Ok(None) = self.unshare.try_wait() {
                if let Some(pid) = first_child(self.unshare.id()) {
                    // SAFETY: killing the namespace's PID 1, which this test started, ends
                    // the whole namespace.
                    unsafe {
                        libc::kill(pid as i32, libc::SIGKILL);
                    }
                }
                let _ = self.unshare.kill();
                let _ = self.unshare.wait();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
    let mut ns = Ns {
        unshare,
        dir: dir.clone(),
    };
    let t0 = Instant::now();
    while !sock.exists() {
        if t0.elapsed() > Duration::from_secs(10) || ns.unshare.try_wait().unwrap().is_some() {
            return skip("unshare could not start envd in new namespaces");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let envd_pid = first_child(ns.unshare.id()).unwrap();
    let c = Client::connect_unix(&sock, Credential::none()).unwrap();
    let sandbox = "sb-00000000-0000-0000-0000-0000000000aa";
    let _: pb::InitResponse = c
        .unary(
            pb::init_methods::INIT,
            &pb::InitRequest {
                sandbox_id: sandbox.into(),
                access_token: TOKEN.into(),
                ..Default::default()
            },
            t10(),
        )
        .unwrap();
    let run = |script: &str| {
        let (_, mut s) = start(&c, sh(script)).unwrap();
        let o = drain(&mut s);
        assert_eq!(
            exit_code(&o),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let out = run("cat /proc/1/comm; hostname; cut -d' ' -f2,3 /proc/mounts");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(comm.as_str()));
    assert_eq!(lines.next(), Some(sandbox));
    let mounts: HashSet<&str> = lines.collect();
    for m in [
        "/proc proc",
        "/sys sysfs",
        "/dev devtmpfs",
        "/dev/pts devpts",
        "/dev/shm tmpfs",
        "/run tmpfs",
        "/tmp tmpfs",
        "/sys/fs/cgroup cgroup2",
    ] {
        assert!(mounts.contains(m), "missing mount {m}: {mounts:?}");
    }
    // An orphan (its parent exits at once) is re-parented to envd and reaped.
    run("(sleep 0.3 &) ; exit 0");
    std::thread::sleep(Duration::from_millis(800));
    let zombies = run("cat /proc/[0-9]*/stat | awk '$3 == \"Z\"' ; true");
    assert_eq!(zombies, "", "zombies left");
    // Many short-lived orphans and API processes at once: statuses go to the right owners.
    let out = run("for i in $(seq 1 50); do (true &); done; echo ok");
    assert_eq!(out, "ok\n");
    for code in [0, 3, 42] {
        let (_, mut s) = start(&c, sh(&format!("(sleep 0.05 &); exit {code}"))).unwrap();
        assert_eq!(exit_code(&drain(&mut s)), Some(code));
    }
    // SIGTERM: envd terminates everything and ends its namespace.
    let (_, _sleeper) = start(&c, sh("sleep 100")).unwrap();
    // SAFETY: signalling a process this test started (through unshare).
    unsafe {
        libc::kill(envd_pid as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    loop {
        if ns.unshare.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "envd as PID 1 did not shut down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(ns);
    // envd (PID 1, root cgroup of the hierarchy) made a "processes" cgroup; now empty.
    if let Some(mp) = cgroup2_mount() {
        let _ = std::fs::remove_dir(mp.join("processes"));
    }
}

fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split(' ').next() != Some("cgroup2") {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}

#[test]
fn shutdown_kills_leftovers_and_removes_its_cgroup() {
    let mut e = Envd::start();
    let c = e.init();
    // The shell exits at once; its background sleep outlives it, unknown to the table.
    let (_, mut s) = start(&c, sh("sleep 100 & echo $!")).unwrap();
    let o = drain(&mut s);
    let orphan: i32 = String::from_utf8(o.stdout).unwrap().trim().parse().unwrap();
    let cgroup = cgroup2_mount().map(|m| m.join(format!("envd-{}", e.pid())));
    let has_cgroup = cgroup.as_ref().is_some_and(|c| c.exists());
    // SAFETY: signalling the envd this test started.
    unsafe {
        libc::kill(e.pid() as i32, libc::SIGTERM);
    }
    let status = e.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    if !has_cgroup {
        // Without a cgroup envd cannot find processes it did not start.
        // SAFETY: killing the orphan this test made.
        unsafe {
            libc::kill(orphan, libc::SIGKILL);
        }
        return skip("cgroup2 not writable: leftover processes are not tracked");
    }
    let t0 = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "orphan survived envd: {stat}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!cgroup.unwrap().exists(), "envd left its cgroup behind");
}

/// Children of `parent` in any state, zombies included.
fn all_children(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(") ").map(|x| x.1) else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        if f.len() > 1 && f[1] == parent.to_string() {
            out.push((pid, f[0].to_string()));
        }
    }
    out
}

#[test]
fn exec_failures_are_typed_quick_and_reaped() {
    let e = Envd::start();
    let c = e.init();
    let bin = e.dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let plain = bin.join("not-executable");
    std::fs::write(&plain, "echo hi\n").unwrap();
    let cases = [
        ("/no/such/program".to_string(), Code::NotFound),
        ("no-such-program-on-the-path".to_string(), Code::NotFound),
        (plain.display().to_string(), Code::PermissionDenied),
        (bin.display().to_string(), Code::PermissionDenied),
        (format!("{}/x", plain.display()), Code::InvalidArgument),
    ];
    for (cmd, code) in cases {
        let t = Instant::now();
        let r = start(
            &c,
            pb::ProcessConfig {
                cmd: cmd.clone(),
                ..Default::default()
            },
        );
        let err = match r {
            Ok((pid, _)) => panic!("{cmd} started as pid {pid}"),
            Err(err) => err,
        };
        assert_eq!(err.code, code, "{cmd}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{cmd}: took {:?}",
            t.elapsed()
        );
    }
    // A nonexistent working directory fails the start too.
    let mut cfg = sh("true");
    cfg.cwd = "/no/such/dir".into();
    assert_eq!(start(&c, cfg).err().unwrap().code, Code::NotFound);
    // envd still starts processes, and the children that failed were reaped (no zombies).
    let (_, mut s) = start(&c, sh("echo ok")).unwrap();
    let o = drain(&mut s);
    assert_eq!(o.stdout, b"ok\n");
    assert_eq!(exit_code(&o), Some(0));
    let t0 = Instant::now();
    loop {
        let left = all_children(e.pid());
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "children left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn processes_run_in_envds_cgroup() {
    let e = Envd::start();
    let c = e.init();
    let Some(mount) = cgroup2_mount() else {
        return skip("no cgroup2 mount");
    };
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", e.pid())).unwrap();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_string();
    let rel = format!("{}/envd-{}", own.trim_end_matches('/'), e.pid());
    let dir = mount.join(rel.trim_start_matches('/'));
    if !dir.exists() {
        return skip("cgroup2 not writable: processes stay in envd's cgroup");
    }
    let (pid, mut s) = start(&c, sh("grep '^0::' /proc/self/cgroup; exec sleep 30")).unwrap();
    let line = match next_event(&mut s).unwrap() {
        Some(pb::process_event::Event::Output(o)) => String::from_utf8(o.data.to_vec()).unwrap(),
        other => panic!("expected output, got {other:?}"),
    };
    assert_eq!(line.trim(), format!("0::{rel}"));
    // Seen from outside too: the running process is listed in the cgroup.
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l.trim() == pid.to_string()),
        "{pid} not in {procs}"
    );
    signal(&c, pid_sel(pid), libc::SIGKILL, true).unwrap();
    assert_eq!(exit_signal(&drain(&mut s)), Some(libc::SIGKILL));
}

#[test]
fn many_small_writes_keep_envds_memory_small() {
    let e = Envd::start();
    let c = e.init();
    // Warm up (first process, thread stacks), then measure.
    let (_, mut s) = start(&c, sh("echo warm")).unwrap();
    drain(&mut s);
    let before = e.rss_kib();
    // 20,000 writes of 2 bytes, read by the pump as they come: thousands of tiny chunks,
    // all kept in the replay ring (40 kB of output). Each chunk must cost its size, not
    // the 64 KiB read buffer (that was 16 MiB more here).
    let (_, mut s) = start(
        &c,
        sh("i=0; while [ $i -lt 20000 ]; do echo x; i=$((i+1)); done"),
    )
    .unwrap();
    let o = drain(&mut s);
    assert_eq!(o.stdout.len(), 40_000);
    let grown = e.rss_kib().saturating_sub(before);
    assert!(grown < 4096, "envd grew by {grown} KiB for 40 kB of output");
}

// ---- measurements (opt-in: `cargo test --release -p envd --test it -- --ignored`) ----

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Exec round trip of `true` through envd vs spawn+wait of the same command (goal ≤ 1.3).
#[test]
#[ignore]
fn measure_exec_round_trip() {
    let e = Envd::start();
    let c = e.init();
    let n = 300;
    let mut via = Vec::with_capacity(n);
    let mut direct = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (_, mut s) = start(
            &c,
            pb::ProcessConfig {
                cmd: "/bin/true".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(exit_code(&drain(&mut s)), Some(0));
        via.push(t.elapsed());
        let t = Instant::now();
        assert!(Command::new("/bin/true").status().unwrap().success());
        direct.push(t.elapsed());
    }
    let (v50, v99) = (percentile(&mut via, 0.5), percentile(&mut via, 0.99));
    let (d50, d99) = (percentile(&mut direct, 0.5), percentile(&mut direct, 0.99));
    println!(
        "envd_exec p50={v50:?} p99={v99:?} direct p50={d50:?} p99={d99:?} ratio_p50={:.2}",
        v50.as_secs_f64() / d50.as_secs_f64()
    );
}

/// 1 GiB written and read through envd vs a local copy of the same file (goal ≥ 0.7).
#[test]
#[ignore]
fn measure_file_throughput() {
    let e = Envd::start();
    let c = e.init();
    let len: usize = 1 << 30;
    let path = e.dir.join("f");
    let chunk = vec![7u8; 64 * 1024];
    let t = Instant::now();
    let mut s = c
        .call(
            pb::filesystem_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    path: path.to_str().unwrap().into(),
                    atomic: true,
                    ..Default::default()
                })),
            },
            CallOpts::default(),
        )
        .unwrap();
    let data = Bytes::from(chunk);
    for _ in 0..len / data.len() {
        s.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Data(data.clone())),
        })
        .unwrap();
    }
    s.close_send().unwrap();
    let _: pb::WriteResponse = s.recv().unwrap().unwrap();
    let write = t.elapsed();
    let t = Instant::now();
    let mut r = c
        .call(
            pb::filesystem_methods::READ,
            &pb::ReadRequest {
                path: path.to_str().unwrap().into(),
                ..Default::default()
            },
            stream_opts(),
        )
        .unwrap();
    let mut total = 0;
    while let Some(m) = r.recv::<pb::ReadResponse>().unwrap() {
        total += m.data.len();
    }
    assert_eq!(total, len);
    let read = t.elapsed();
    let t = Instant::now();
    std::fs::copy(&path, e.dir.join("copy")).unwrap();
    let copy = t.elapsed();
    let mib = (len >> 20) as f64;
    println!(
        "envd_file write={:.0} MiB/s read={:.0} MiB/s local copy={:.0} MiB/s ratio write={:.2} read={:.2}",
        mib / write.as_secs_f64(),
        mib / read.as_secs_f64(),
        mib / copy.as_secs_f64(),
        copy.as_secs_f64() / write.as_secs_f64(),
        copy.as_secs_f64() / read.as_secs_f64()
    );
}

/// Issue 18: envd's listener survives hostile clients on its socket. The agent's part is
/// played by a client holding an initialized connection (every Unix-socket peer is one
/// source, so new connections share the flood's accept rate: envd's socket is reachable
/// only by the host's agent, and it is the per-connection budgets that must hold). p99 of a
/// Health/Check under flood at most 2× unloaded p99 plus `flood::TEST_FLOOR` (an absolute floor, so a
/// sub-millisecond baseline on a shared machine is not flaky); envd's RSS under 64 MiB. A
/// scenario that misses is measured again before it fails (`flood::run_checked`: the machine is shared).
#[test]
fn listener_survives_floods() {
    use proto::rpc::flood::{self, Scenario, Size, Target};
    let e = Envd::start();
    let _ = e.init();
    let c = e.authed();
    let mut legit = || -> Result<(), String> {
        let _: pb::HealthCheckResponse = c
            .unary(pb::health_methods::CHECK, &pb::HealthCheckRequest {}, t10())
            .map_err(|e| format!("Health/Check: {e}"))?;
        Ok(())
    };
    let target = Target::Unix(e.sock.clone());
    for scenario in [
        Scenario::IdleUnauthenticated,
        Scenario::SlowHello,
        Scenario::HalfWrittenFrames(None),
        Scenario::HalfWrittenFrames(Some(Credential::access_token(TOKEN))),
        Scenario::OneCredentialMany(Credential::access_token(TOKEN)),
    ] {
        let r = flood::run_checked(
            &target,
            &scenario,
            &Size::quick(),
            Some(e.pid()),
            &mut legit,
            flood::TEST_FLOOR,
            64 * 1024,
        )
        .unwrap();
        eprintln!("envd {}", r.line());
    }
}

/// envd's only peer is the host's agent, and a starved guest reads the agent's hello late by
/// its own clock: a hello that arrives after the network default (10 s) but within
/// `GUEST_HELLO_TIMEOUT` is served (before, envd closed the link with "no hello in time",
/// which failed a first exec with 10 creates at once on a 2-core host).
#[test]
fn a_late_hello_within_the_guest_budget_is_served() {
    let e = Envd::start();
    let late = proto::limits::HELLO_TIMEOUT + Duration::from_secs(2);
    assert!(late < proto::limits::GUEST_HELLO_TIMEOUT);
    let s = std::os::unix::net::UnixStream::connect(&e.sock).unwrap();
    std::thread::sleep(late);
    let io = proto::rpc::SocketTransport::new(std::os::fd::OwnedFd::from(s));
    let c = Client::from_transport(
        Box::new(io),
        Credential::none(),
        &proto::rpc::ClientConfig::default(),
    )
    .unwrap_or_else(|e| panic!("a hello {late:?} after connecting: {e}"));
    let h: pb::HealthCheckResponse = c
        .unary(
            pb::health_methods::CHECK,
            &pb::HealthCheckRequest {},
            Some(Duration::from_secs(10)),
        )
        .unwrap();
    assert!(!h.envd_version.is_empty());
}
