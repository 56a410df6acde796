//! The `wrenn` CLI end to end: the real binary against a ctl replica over PostgreSQL with a
//! fake agent. Needs `target/<profile>/wrenn` (built by `cargo build -p wrenn`; cargo does
//! not build other packages' binaries for this test), else it prints a skip.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::harness::{skip, Ctl};

fn wrenn_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/it-<hash> -> target/<profile>/wrenn
    let bin = exe.parent()?.parent()?.join("wrenn");
    bin.is_file().then_some(bin)
}

struct Cli {
    bin: PathBuf,
    url: String,
    key: String,
}

impl Cli {
    fn run_with(&self, key: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("WRENN_URL", &self.url)
            .env("WRENN_CA", &crate::harness::test_tls().files.ca_cert)
            .env("WRENN_API_KEY", key)
            .env("WRENN_LOG", "error")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("run wrenn");
        if let Some(data) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(data).unwrap();
        }
        child.wait_with_output().unwrap()
    }
    fn run(&self, args: &[&str]) -> Output {
        self.run_with(&self.key, args, None)
    }
    /// Runs, expects success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "wrenn {args:?}: {:?}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
    fn json(&self, args: &[&str]) -> Value {
        // After the command words: for `sandbox exec` everything after CMD belongs to CMD.
        let mut a = args.to_vec();
        a.insert(2, "--json");
        let out = self.ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("wrenn {args:?} --json is not JSON ({e}): {out}"))
    }
}

#[test]
fn cli_end_to_end() {
    let Some(bin) = wrenn_binary() else {
        skip("the wrenn binary is not built (run `cargo build -p wrenn` first)");
        return;
    };
    let Some(ctl) = Ctl::start() else { return };
    let (agent, host_id) = ctl.add_host(8, 16384, 100_000);
    let cli = Cli {
        bin,
        url: ctl.addr(),
        key: ctl.team_key.clone(),
    };

    // Sandboxes.
    let sb = cli.json(&[
        "sandbox",
        "create",
        "--memory",
        "256",
        "--meta",
        "suite=cli",
        "--timeout",
        "120",
    ]);
    let id = sb["id"].as_str().unwrap().to_owned();
    assert_eq!(sb["state"], "SANDBOX_STATE_RUNNING");
    assert_eq!(sb["memory_mib"], 256);
    assert_eq!(sb["timeout_s"], "120");
    let table = cli.ok(&["sandbox", "list", "--meta", "suite=cli"]);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("running")),
        "{table}"
    );
    let one = cli.ok(&["sandbox", "get", &id]);
    assert!(
        one.contains("state     running") && one.contains("metadata  suite=cli"),
        "{one}"
    );
    assert!(cli.ok(&["sandbox", "ping", &id]).contains("running"));
    assert_eq!(
        cli.json(&[
            "sandbox",
            "set-timeout",
            &id,
            "600",
            "--on-timeout",
            "pause"
        ])["on_timeout"],
        "TIMEOUT_POLICY_PAUSE"
    );

    // Exec: output streamed, exit code passed through; --json gives NDJSON events.
    let o = cli.run(&["sandbox", "exec", &id, "echo", "hi", "-n", "there"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi-nthere");
    // --tty without a terminal: a remote PTY, stdin forwarded (EOF at once), no raw mode.
    let o = cli.run(&["sandbox", "exec", "--tty", &id, "sh", "tty"]);
    assert_eq!(
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned()
        ),
        (Some(0), "tty".to_owned())
    );
    let nd = cli.ok(&["sandbox", "exec", "--json", &id, "x", "a"]);
    let events: Vec<Value> = nd
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{nd}");
    assert_eq!(events[1]["output"]["data"], "YQ==");
    assert!(events[2]["exited"].is_object());
    let bg = cli.json(&[
        "sandbox",
        "exec",
        "--background",
        "--tag",
        "job",
        &id,
        "sleep",
        "9",
    ]);
    assert!(bg["pid"].as_u64().unwrap() > 0);
    assert_eq!(
        cli.json(&["process", "list", &id])["processes"],
        serde_json::json!([])
    );
    assert!(cli
        .ok(&["process", "kill", &id, "--pid", "1", "--signal", "KILL"])
        .contains("signal 9"));
    let o = cli.run_with(
        &cli.key,
        &["process", "input", &id, "--pid", "1"],
        Some(b"hello"),
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("wrote 5 bytes"),
        "{o:?}"
    );
    let o = cli.run(&["process", "connect", &id, "--pid", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not_found"));

    // Files: a 3 MiB round trip through put/get, and the small operations.
    let dir = std::env::temp_dir().join(format!("wrenn-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("src.bin");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let put = cli.json(&[
        "file",
        "put",
        &id,
        src.to_str().unwrap(),
        "/data/big.bin",
        "--mode",
        "600",
    ]);
    assert_eq!(put["bytes_written"], data.len().to_string());
    let dst = dir.join("dst.bin");
    let o = cli.run(&[
        "file",
        "get",
        &id,
        "/data/big.bin",
        dst.to_str().unwrap(),
        "--progress",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("MiB"),
        "progress on stderr: {o:?}"
    );
    assert!(
        std::fs::read(&dst).unwrap() == data,
        "downloaded bytes differ"
    );
    // A byte flipped between ctl and envd (the fake agent's test hook): both directions
    // fail with data_loss, nothing appears at either end.
    agent.state.lock().unwrap().corrupt_files = true;
    let o = cli.run(&["file", "put", &id, src.to_str().unwrap(), "/data/bad.bin"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("data_loss"),
        "{o:?}"
    );
    let bad = dir.join("bad.bin");
    let o = cli.run(&["file", "get", &id, "/data/big.bin", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("data_loss"),
        "{o:?}"
    );
    assert!(!bad.exists(), "no local file after a corrupted download");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 2, "only src.bin and dst.bin: {left:?}");
    agent.state.lock().unwrap().corrupt_files = false;
    let o = cli.run(&["file", "stat", &id, "/data/bad.bin"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the corrupted upload stored nothing: {o:?}"
    );
    let o = cli.run_with(
        &cli.key,
        &["file", "put", &id, "-", "/data/s.txt"],
        Some(b"from stdin"),
    );
    assert!(o.status.success());
    assert_eq!(
        cli.ok(&["file", "get", &id, "/data/s.txt", "-"]),
        "from stdin"
    );
    let ls = cli.ok(&["file", "ls", &id, "/data"]);
    assert!(
        ls.contains("/data/big.bin") && ls.contains("/data/s.txt"),
        "{ls}"
    );
    assert_eq!(
        cli.json(&["file", "stat", &id, "/data/s.txt"])["entry"]["size"],
        "10"
    );
    cli.ok(&["file", "mkdir", &id, "/data/d"]);
    cli.ok(&["file", "mv", &id, "/data/s.txt", "/data/t.txt"]);
    cli.ok(&["file", "rm", &id, "/data/t.txt"]);
    let o = cli.run(&[
        "file",
        "get",
        &id,
        "/data/t.txt",
        dir.join("none").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        !dir.join("none").exists(),
        "no local file for a missing remote one"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // Pause, resume, templates.
    assert!(cli.ok(&["sandbox", "pause", &id]).contains("paused"));
    assert!(cli.ok(&["sandbox", "resume", &id]).contains("running"));
    let tpl = cli.json(&["template", "create", &id, "snap"]);
    let tpl_id = tpl["id"].as_str().unwrap().to_owned();
    let tl = cli.ok(&["template", "list"]);
    assert!(tl.contains("snap") && tl.contains("minimal"), "{tl}");
    assert!(cli.ok(&["template", "get", "snap"]).contains(&tpl_id));
    cli.ok(&["template", "rm", &tpl_id]);

    // Keys, users, teams.
    let key = cli.json(&["key", "create", "ci"]);
    let secret = key["plaintext"].as_str().unwrap().to_owned();
    let kid = key["key"]["id"].as_str().unwrap().to_owned();
    assert!(cli
        .run_with(&secret, &["team", "get"], None)
        .status
        .success());
    assert!(cli.ok(&["key", "list"]).contains("ci"));
    cli.ok(&["key", "revoke", &kid]);
    let o = cli.run_with(&secret, &["team", "get"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unauthenticated"));
    let u = cli.json(&[
        "user",
        "create",
        "d@example.com",
        "--name",
        "Dan",
        "--role",
        "admin",
    ]);
    let uid = u["id"].as_str().unwrap().to_owned();
    assert!(cli.ok(&["user", "get", &uid]).contains("d@example.com"));
    assert!(cli.ok(&["user", "list"]).contains("d@example.com"));
    let members = cli.ok(&["team", "members"]);
    assert!(
        members
            .lines()
            .any(|l| l.starts_with(&uid) && l.contains("admin")),
        "{members}"
    );
    cli.ok(&["team", "remove-member", &uid]);
    cli.ok(&["team", "add-member", &uid, "--role", "member"]);
    assert!(cli.ok(&["team", "get"]).contains(&ctl.team_id));

    // Hosts need the platform-admin key.
    let o = cli.run(&["host", "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("permission_denied"));
    let admin = |args: &[&str]| {
        let o = cli.run_with(&ctl.admin_key, args, None);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    assert!(admin(&["host", "list"]).contains(&host_id));
    assert!(admin(&["host", "get", &host_id]).contains("online"));
    assert!(admin(&["host", "token", "--ttl", "60"]).starts_with("token: "));
    let drained = admin(&["host", "drain", &host_id]);
    assert!(
        drained.contains("draining") && drained.contains(&id),
        "{drained}"
    );

    // Audit, then destroy.
    let audit = cli.ok(&["audit", "list", "--resource", &id]);
    assert!(
        audit.contains("sandbox.create") && audit.contains("sandbox.pause"),
        "{audit}"
    );
    // Paging: one page of 2 leaves a token; --all follows it to the end.
    let one = cli.json(&["audit", "list", "--page-size", "2"]);
    assert_eq!(one["entries"].as_array().unwrap().len(), 2);
    assert_ne!(one["next_page_token"], "");
    let every = cli.json(&["audit", "list", "--page-size", "2", "--all"]);
    assert!(every["entries"].as_array().unwrap().len() > 4, "{every}");
    assert_eq!(every["next_page_token"], "");
    cli.ok(&["sandbox", "rm", &id]);
    assert!(cli.ok(&["sandbox", "get", &id]).contains("stopped"));

    // Errors: bad ids, usage, missing key, unreachable ctl.
    let o = cli.run(&["sandbox", "get", "sb-nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("invalid_argument"),
        "{o:?}"
    );
    assert_eq!(cli.run(&["sandbox", "get"]).status.code(), Some(2));
    assert_eq!(cli.run(&["sandbox", "bogus"]).status.code(), Some(2));
    assert_eq!(
        cli.run(&["sandbox", "create", "--on-timeout", "nap"])
            .status
            .code(),
        Some(2)
    );
    let o = cli.run_with("", &["sandbox", "list"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("WRENN_API_KEY"));
    let o = cli.run(&["sandbox", "list", "--url", "127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unavailable"));
    assert!(cli
        .ok(&["sandbox", "create", "--help"])
        .contains("--on-timeout pause|destroy"));
}

/// The words added for dead hosts and teams: `team create`, `host undrain`,
/// `sandbox rm --force`, `host rm --force`.
#[test]
fn cli_teams_and_dead_hosts() {
    let Some(bin) = wrenn_binary() else {
        skip("the wrenn binary is not built (run `cargo build -p wrenn` first)");
        return;
    };
    let Some(ctl) = Ctl::start() else { return };
    let (agent, host_id) = ctl.add_host(8, 16384, 100_000);
    let cli = Cli {
        bin,
        url: ctl.addr(),
        key: ctl.team_key.clone(),
    };
    let admin = |args: &[&str]| {
        let o = cli.run_with(&ctl.admin_key, args, None);
        assert!(
            o.status.success(),
            "wrenn {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let out = admin(&["team", "create", "team-z", "--owner-email", "z@example.com"]);
    let key = out
        .split_whitespace()
        .find(|w| w.starts_with("wrn_"))
        .unwrap_or_else(|| panic!("no key in {out}"));
    let o = cli.run_with(key, &["team", "get"], None);
    assert!(String::from_utf8_lossy(&o.stdout).contains("team-z"));
    // Missing --owner-email is a usage error.
    assert_eq!(
        cli.run_with(&ctl.admin_key, &["team", "create", "x"], None)
            .status
            .code(),
        Some(2)
    );

    admin(&["host", "drain", &host_id]);
    assert!(admin(&["host", "undrain", &host_id]).contains("online"));

    let sb = cli.json(&["sandbox", "create"]);
    let id = sb["id"].as_str().unwrap().to_owned();
    let _other = cli.json(&["sandbox", "create"]);
    agent.stop();
    assert!(!cli.run(&["sandbox", "rm", &id]).status.success());
    cli.ok(&["sandbox", "rm", "--force", &id]);
    assert_eq!(
        cli.json(&["sandbox", "get", &id])["state"],
        "SANDBOX_STATE_STOPPED"
    );
    postgres::Client::connect(&ctl.url, postgres::NoTls)
        .unwrap()
        .execute("UPDATE hosts SET status = 'unreachable'", &[])
        .unwrap();
    let out = admin(&["host", "rm", "--force", &host_id]);
    assert!(out.contains("recorded stopped: sb-"), "{out}");
}

#[test]
fn cli_metrics_usage_and_webhooks() {
    let Some(bin) = wrenn_binary() else {
        skip("the wrenn binary is not built (run `cargo build -p wrenn` first)");
        return;
    };
    let Some(ctl) = Ctl::start() else { return };
    let (agent, _host) = ctl.add_host(8, 16384, 100_000);
    let cli = Cli {
        bin,
        url: ctl.addr(),
        key: ctl.team_key.clone(),
    };
    let sb = cli.json(&["sandbox", "create"]);
    let id = sb["id"].as_str().unwrap().to_owned();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    agent.state.lock().unwrap().samples.insert(
        id.clone(),
        (1..=5)
            .map(|i| proto::gen::wrenn::agent::v1::UsageSample {
                unix_ns: now - (6 - i) * 1_000_000_000,
                step_s: 1,
                cpu_usec: 250_000 * i as u64,
                memory_bytes: 64 << 20,
                ..Default::default()
            })
            .collect(),
    );
    let out = cli.ok(&["sandbox", "metrics", &id, "--range", "5m"]);
    assert!(
        out.starts_with("5 samples, 1 s each, from the agent"),
        "{out}"
    );
    assert!(
        out.contains("cpu %     125.0") && out.contains("▂▄▅▇█"),
        "{out}"
    );
    assert!(out.contains("64.0 MiB"), "{out}");
    let j = cli.json(&["sandbox", "metrics", &id]);
    assert_eq!(j["samples"].as_array().unwrap().len(), 5);
    let bad = cli.run(&["sandbox", "metrics", &id, "--range", "3d"]);
    assert_eq!(bad.status.code(), Some(2), "a usage error");

    let u = cli.ok(&["team", "usage", "--days", "2"]);
    assert!(u.starts_with("DAY "), "{u}");
    assert_eq!(u.lines().count(), 3, "{u}");

    let w = cli.ok(&[
        "webhook",
        "create",
        "http://192.0.2.1/hook",
        "--event",
        "sandbox.paused",
    ]);
    assert!(
        w.contains("secret   whsec_") && w.contains("events   sandbox.paused"),
        "{w}"
    );
    let wid = w
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_owned();
    assert!(cli.ok(&["webhook", "list"]).contains(&wid));
    cli.ok(&["sandbox", "pause", &id]);
    let d = cli.ok(&["webhook", "deliveries", &wid]);
    assert!(d.contains("sandbox.paused") && d.contains("pending"), "{d}");
    assert!(cli.ok(&["webhook", "rm", &wid]).contains("removed"));
    let o = cli.run(&["webhook", "create", "https://example.com/"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("TLS client"));
}

/// `wrenn port forward`: a local connection through ctl and the (fake) agent to the
/// sandbox's port and back; the local EOF reaches the sandbox, whose answer comes back.
#[test]
fn cli_port_forward() {
    use std::io::{BufRead, BufReader, Read, Write};
    let Some(bin) = wrenn_binary() else {
        skip("the wrenn binary is not built (run `cargo build -p wrenn` first)");
        return;
    };
    let Some(ctl) = Ctl::start() else { return };
    let _agent = ctl.add_host(8, 16384, 100_000);
    let cli = Cli {
        bin: bin.clone(),
        url: ctl.addr(),
        key: ctl.team_key.clone(),
    };
    let sb = cli.json(&["sandbox", "create"]);
    let id = sb["id"].as_str().unwrap().to_owned();
    let mut child = Command::new(&bin)
        .args(["port", "forward", &id, "0:8080", "--connections", "2"])
        .env("WRENN_URL", &cli.url)
        .env("WRENN_CA", &crate::harness::test_tls().files.ca_cert)
        .env("WRENN_API_KEY", &cli.key)
        .env("WRENN_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    // "forwarding 127.0.0.1:PORT -> sb-...:8080"
    let addr = line.split_whitespace().nth(1).unwrap().to_owned();
    assert!(line.contains(&format!("{id}:8080")), "{line}");
    for _ in 0..2 {
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let data = "port forward ".repeat(20_000);
        conn.write_all(data.as_bytes()).unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        let mut want = data.to_uppercase().into_bytes();
        want.extend_from_slice(b"bye");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes differ");
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?} {err}");
}

/// 1 GiB through `wrenn port forward` both ways at once (ctl, the fake agent's Ports.Connect
/// to a real echo server on loopback), checksummed on both sides of the tunnel.
#[test]
fn cli_port_forward_one_gib() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::time::{Duration, Instant};
    const TOTAL: usize = 1 << 30;
    const BLOCK: usize = 1 << 20;
    let Some(bin) = wrenn_binary() else {
        skip("the wrenn binary is not built (run `cargo build -p wrenn` first)");
        return;
    };
    let Some(ctl) = Ctl::start() else { return };
    let (agent, _) = ctl.add_host(8, 16384, 100_000);
    // The sandbox's server: echoes every byte until the client half-closes.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    agent
        .state
        .lock()
        .unwrap()
        .tcp_ports
        .insert(9000, echo.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut s, _) = echo.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut b = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    });
    let cli = Cli {
        bin: bin.clone(),
        url: ctl.addr(),
        key: ctl.team_key.clone(),
    };
    let sb = cli.json(&["sandbox", "create"]);
    let id = sb["id"].as_str().unwrap().to_owned();
    let mut child = Command::new(&bin)
        .args(["port", "forward", &id, "0:9000", "--connections", "1"])
        .env("WRENN_URL", &cli.url)
        .env("WRENN_CA", &crate::harness::test_tls().files.ca_cert)
        .env("WRENN_API_KEY", &cli.key)
        .env("WRENN_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line.split_whitespace().nth(1).unwrap().to_owned();
    let conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // A checksum of 8-byte words (blocks are whole words), and a generator of the data.
    fn fold(h: u64, block: &[u8]) -> u64 {
        block.chunks_exact(8).fold(h, |h, w| {
            (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0100_0000_01b3)
        })
    }
    let start = Instant::now();
    let mut w = conn.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut h = 0xcbf2_9ce4_8422_2325;
        let mut block = vec![0u8; BLOCK];
        for _ in 0..TOTAL / BLOCK {
            for word in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            h = fold(h, &block);
            w.write_all(&block).unwrap();
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
        h
    });
    let mut r = conn;
    let mut h = 0xcbf2_9ce4_8422_2325;
    let mut block = vec![0u8; BLOCK];
    let mut got = 0usize;
    while got < TOTAL {
        r.read_exact(&mut block).unwrap();
        h = fold(h, &block);
        got += BLOCK;
    }
    let mut tail = Vec::new();
    r.read_to_end(&mut tail).unwrap();
    let sent = writer.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "1 GiB each way through wrenn port forward in {secs:.1} s ({:.0} MiB/s each way, debug build)",
        1024.0 / secs
    );
    assert!(tail.is_empty(), "{} bytes beyond 1 GiB", tail.len());
    assert_eq!(h, sent, "checksums differ");
    let _ = child.wait();
}

/// `wrenn sandbox create --public-traffic` and `wrenn sandbox traffic-token SB [--rotate]`.
#[test]
fn cli_traffic_token() {
    let Some(bin) = wrenn_binary() else {
        skip("the wrenn binary is not built (run `cargo build -p wrenn` first)");
        return;
    };
    let Some(ctl) = Ctl::start() else { return };
    let _agent = ctl.add_host(8, 16384, 100_000);
    let cli = Cli {
        bin,
        url: ctl.addr(),
        key: ctl.team_key.clone(),
    };
    let sb = cli.json(&["sandbox", "create"]);
    let id = sb["id"].as_str().unwrap().to_owned();
    let created = sb["traffic_token"].as_str().unwrap().to_owned();
    assert!(created.starts_with("wtt_"), "{sb}");
    assert_eq!(sb["allow_public_traffic"], false);
    let shown = cli.ok(&["sandbox", "traffic-token", &id]);
    assert_eq!(shown.trim(), created);
    let rotated = cli.ok(&["sandbox", "traffic-token", &id, "--rotate"]);
    assert!(rotated.trim().starts_with("wtt_") && rotated.trim() != created);
    assert_eq!(
        cli.ok(&["sandbox", "traffic-token", &id]).trim(),
        rotated.trim()
    );
    let public = cli.json(&["sandbox", "create", "--public-traffic"]);
    assert_eq!(public["allow_public_traffic"], true);
    let human = cli.ok(&["sandbox", "get", public["id"].as_str().unwrap()]);
    assert!(
        human.contains("public (no traffic token needed)"),
        "{human}"
    );
}

#[test]
fn cli_template_build() {
    let Some(bin) = wrenn_binary() else {
        skip("the wrenn binary is not built (run `cargo build -p wrenn` first)");
        return;
    };
    let Some(ctl) = Ctl::start() else { return };
    let (agent, _host) = ctl.add_host(8, 16384, 100_000);
    let cli = Cli {
        bin,
        url: ctl.addr(),
        key: ctl.team_key.clone(),
    };
    let dir = std::env::temp_dir().join(format!("wrenn-cli-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("site/sub")).unwrap();
    std::fs::write(dir.join("site/index.html"), b"<h1>hi</h1>").unwrap();
    std::fs::write(dir.join("site/sub/a.css"), b"body{}").unwrap();
    std::fs::write(dir.join("unused.bin"), b"not sent").unwrap();
    let recipe = dir.join("Wrennfile");
    std::fs::write(&recipe, "COPY site /srv/site\nRUN echo built\n").unwrap();
    let d = dir.to_str().unwrap();
    let r = recipe.to_str().unwrap();
    let out = cli.ok(&["template", "build", "-f", r, "--name", "site", d]);
    assert!(
        out.contains("==> step 2 (line 2): RUN echo built\nran: echo built\n"),
        "{out}"
    );
    assert!(out.contains("built tpl-"), "{out}");
    // Only what COPY names went into the sandbox, under the context directory.
    let files: Vec<String> = agent
        .state
        .lock()
        .unwrap()
        .files
        .keys()
        .map(|(_, p)| p.clone())
        .collect();
    let mut files = files;
    files.sort();
    assert_eq!(
        files,
        vec![
            "/tmp/wrenn-build-context/site/index.html".to_owned(),
            "/tmp/wrenn-build-context/site/sub/a.css".to_owned()
        ]
    );
    let list = cli.json(&["template", "builds"]);
    let b = &list["builds"][0];
    assert_eq!(b["status"], "BUILD_STATUS_SUCCEEDED");
    let id = b["id"].as_str().unwrap().to_owned();
    let got = cli.ok(&["template", "build-get", &id]);
    assert!(
        got.contains("2. line 2: RUN echo built [succeeded (exit 0)]"),
        "{got}"
    );
    let att = cli.ok(&["template", "attach", &id]);
    assert!(att.contains("ran: echo built"), "{att}");
    // A failing step: exit 1, its exit code said.
    std::fs::write(&recipe, "RUN exit 9\n").unwrap();
    let o = cli.run(&["template", "build", "-f", r, "--name", "bad", d]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("failed: step 1 (line 1): exit code 9"),
        "{err}"
    );
    // A recipe error is reported locally with line and column, nothing sent.
    std::fs::write(&recipe, "RUN ok\nNOPE x\n").unwrap();
    let o = cli.run(&["template", "build", "-f", r, "--name", "bad2", d]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("{r}:2:1:")));
    let _ = std::fs::remove_dir_all(&dir);
}
