//! The `wrenn-ctl` server binary: flags, `admin` subcommands and `serve`, end to end.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proto::gen::wrenn::ctl::v1 as c;
use proto::rpc::{Client, Credential};

use crate::harness;

const BIN: &str = env!("CARGO_BIN_EXE_wrenn-ctl");

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn bad_flags_are_refused() {
    for args in [
        &[][..],
        &["nope"],
        &["serve", "--bogus"],
        &["serve", "--listen"],
        &["admin"],
        &["admin", "init"],
        &["serve", "--db-workers", "0", "--database-url", "x"],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("WRENN_DATABASE_URL")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage"),
            "{args:?}"
        );
    }
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
}

#[test]
fn help_and_version_exit_zero() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["admin", "--help"],
        &["admin", "init", "--help"],
        &["-h"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("wrenn-ctl serve"),
            "{args:?}"
        );
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("wrenn-ctl {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn runtime_errors_are_not_followed_by_the_usage() {
    // Well-formed arguments, a database that is not there: an error, exit 1, no usage text.
    let port = free_port();
    let out = Command::new(BIN)
        .args([
            "admin",
            "migrate",
            "--database-url",
            &format!("postgres://nobody@127.0.0.1:{port}/none?connect_timeout=2"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("connect to the database"), "{err}");
    assert!(!err.contains("usage"), "{err}");
}

#[test]
fn admin_create_team_makes_a_second_team() {
    let Some(url) = harness::fresh_db() else {
        return;
    };
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("WRENN_DATABASE_URL", &url)
            .output()
            .unwrap()
    };
    let out = run(&["admin", "init", "--team", "a", "--email", "a@x.test"]);
    assert!(out.status.success());
    // A second init names the way to add teams (the API had no call for it).
    let out = run(&["admin", "init", "--team", "b", "--email", "b@x.test"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("admin create-team"),
        "{err}"
    );
    let out = run(&["admin", "create-team", "--team", "b", "--email", "b@x.test"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = text
        .split_whitespace()
        .find(|w| w.starts_with("wrn_"))
        .expect("a key");
    let db = ctl::db::Db::start(&ctl::db::DbConfig::new(&url)).unwrap();
    let ctx = ctl::auth::lookup_key(&db, key).expect("the new key works");
    assert!(!ctx.platform_admin);
}

#[test]
fn admin_and_serve() {
    let Some(url) = harness::fresh_db() else {
        return;
    };
    let out = Command::new(BIN)
        .args(["admin", "migrate", "--database-url", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args([
            "admin",
            "init",
            "--team",
            "acme",
            "--email",
            "ops@acme.test",
        ])
        .env("WRENN_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let key = |label: &str| {
        text.lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("wrn_")))
            .unwrap_or_else(|| panic!("{label} in {text}"))
            .to_owned()
    };
    let team_key = key("team api key");
    let admin_key = key("platform admin key");
    // A second init is refused.
    let out = Command::new(BIN)
        .args([
            "admin",
            "init",
            "--team",
            "x",
            "--email",
            "x@y.z",
            "--database-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(BIN)
        .args([
            "admin",
            "create-registration-token",
            "--ttl-s",
            "60",
            "--database-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .starts_with("wrr_"));

    let (port, http_port, host_port) = (free_port(), free_port(), free_port());
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--database-url",
            &url,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            &format!("127.0.0.1:{http_port}"),
            "--host-listen",
            &format!("127.0.0.1:{host_port}"),
            // Plaintext, explicitly: the drain check below reads raw frames.
            "--plaintext",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let team = loop {
        let r = Client::connect_tcp(format!("127.0.0.1:{port}"), Credential::api_key(&team_key))
            .and_then(|cl| {
                cl.unary::<_, c::Team>(
                    c::teams_methods::GET,
                    &c::GetTeamRequest::default(),
                    Some(Duration::from_secs(5)),
                )
            });
        match r {
            Ok(t) => break t,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                let _ = child.kill();
                panic!("serve did not answer: {e:?}");
            }
        }
    };
    assert_eq!(team.name, "acme");
    let admin =
        Client::connect_tcp(format!("127.0.0.1:{port}"), Credential::api_key(&admin_key)).unwrap();
    let hosts: c::ListHostsResponse = admin
        .unary(
            c::hosts_methods::LIST,
            &c::ListHostsRequest::default(),
            Some(Duration::from_secs(5)),
        )
        .unwrap();
    assert!(hosts.hosts.is_empty());
    // SIGTERM drains (issue 12 item 14): an open connection gets GOAWAY, then the process
    // exits 0 instead of dying with the signal.
    let mut raw = raw_hello_tcp(port, &team_key);
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(read_kind(&mut raw), Some(proto::frame::Kind::GoAway));
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("wrenn-ctl did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// A raw TCP connection that said hello with an API key, for reading frames by hand.
fn raw_hello_tcp(port: u16, key: &str) -> std::net::TcpStream {
    use prost::Message;
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let hello = proto::rpc::Hello {
        version: proto::PROTOCOL_VERSION,
        credential_kind: proto::rpc::CredentialKind::ApiKey as i32,
        credential: key.into(),
        ..Default::default()
    };
    let mut out = Vec::new();
    proto::frame::put_frame(
        &mut out,
        0,
        proto::frame::Kind::Hello,
        0,
        &hello.encode_to_vec(),
    );
    s.write_all(&out).unwrap();
    assert_eq!(read_kind(&mut s), Some(proto::frame::Kind::HelloAck));
    s
}

/// Reads one frame and returns its kind (None at EOF).
fn read_kind(s: &mut std::net::TcpStream) -> Option<proto::frame::Kind> {
    use std::io::Read;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut rest = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut rest).ok()?;
    proto::frame::Kind::from_u8(rest[4])
}

/// Issue 18: ctl's protobuf port, host port and HTTP gateway survive hostile clients. Each flood runs against the real
/// binary (from loopback sources 127.0.0.2+) while a client with a team key calls from
/// 127.0.0.1, connecting anew every tenth call (the failure was new connections refused):
/// p99 under flood
/// at most 2× unloaded p99 plus [`FLOOD_FLOOR`], and
/// wrenn-ctl's RSS under 256 MiB. A scenario that misses is measured again before it
/// fails (`flood::run_checked`, up to `flood::CHECK_ATTEMPTS` times: the machine is shared). The "one credential" flood holds the platform admin key
/// on as many connections as it is given. The host port (7702) and the gateway of the same
/// process follow ([`host_and_http_floods`]).
/// Noise allowance of a flood's p99 (the bound is 2 x unloaded p99 + this): this test binary
/// runs its other tests (each with a PostgreSQL of its own) beside the floods on 2 cores, and
/// a scheduling hiccup in the loaded phase is not the server's doing (the suites' shared value).
const FLOOD_FLOOR: Duration = proto::rpc::flood::TEST_FLOOR;

#[test]
fn protobuf_port_survives_floods() {
    use proto::rpc::flood::{self, Scenario, Size, Target};
    let Some(url) = harness::fresh_db() else {
        return;
    };
    let out = Command::new(BIN)
        .args([
            "admin",
            "init",
            "--team",
            "acme",
            "--email",
            "ops@acme.test",
        ])
        .args(["--database-url", &url])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = |label: &str| {
        text.lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("wrn_")))
            .unwrap_or_else(|| panic!("{label} in {text}"))
            .to_owned()
    };
    let (team_key, admin_key) = (key("team api key"), key("platform admin key"));
    let out = Command::new(BIN)
        .args(["admin", "create-registration-token", "--ttl-s", "600"])
        .args(["--database-url", &url])
        .output()
        .unwrap();
    assert!(out.status.success());
    let registration = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (port, http_port, host_port) = (free_port(), free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["serve", "--database-url", &url, "--plaintext"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .args(["--host-listen", &format!("127.0.0.1:{host_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let addr = format!("127.0.0.1:{port}");
    // Every tenth call connects anew (the newcomer must get in), the others reuse the
    // connection, as a client with a pool does.
    let mut conn: Option<Client> = None;
    let mut n = 0u32;
    let mut legit = || -> Result<(), String> {
        n += 1;
        if n % 10 == 0 || conn.is_none() {
            if let Some(old) = conn.take() {
                old.close();
            }
            conn = Some(
                Client::connect_tcp(addr.as_str(), Credential::api_key(&team_key))
                    .map_err(|e| format!("connect: {e}"))?,
            );
        }
        let cl = conn.as_ref().expect("connected above");
        cl.unary::<_, c::Team>(
            c::teams_methods::GET,
            &c::GetTeamRequest::default(),
            Some(Duration::from_secs(10)),
        )
        .map_err(|e| format!("Teams/Get: {e}"))?;
        Ok(())
    };
    let start = Instant::now();
    while legit().is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("serve did not answer");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let target = Target::Tcp(addr.parse().unwrap());
    let mut failure = None;
    for scenario in [
        Scenario::IdleUnauthenticated,
        Scenario::SlowHello,
        Scenario::HalfWrittenFrames(None),
        Scenario::HalfWrittenFrames(Some(Credential::api_key(&admin_key))),
        Scenario::OneCredentialMany(Credential::api_key(&admin_key)),
    ] {
        let r = flood::run_checked(
            &target,
            &scenario,
            &Size::quick(),
            Some(pid),
            &mut legit,
            FLOOD_FLOOR,
            256 * 1024,
        );
        match r {
            Ok(r) => eprintln!("ctl {}", r.line()),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() {
        failure = host_and_http_floods(pid, host_port, http_port, &registration, &team_key).err();
    }
    let _ = child.kill();
    let _ = child.wait();
    if let Some(e) = failure {
        panic!("{e}");
    }
}

/// The same floods against the same process's host port (the legitimate peer is an agent's
/// heartbeat; "one credential" holds registering connections, which anyone can open) and its
/// HTTP gateway (idle and slow-header connections; the legitimate peer lists sandboxes with
/// a team key, a new connection every tenth request).
fn host_and_http_floods(
    pid: u32,
    host_port: u16,
    http_port: u16,
    registration: &str,
    team_key: &str,
) -> Result<(), String> {
    use proto::gen::wrenn::agent::v1 as agent;
    use proto::gen::wrenn::host::v1 as host;
    use proto::rpc::flood::{self, Scenario, Size, Target};
    use std::io::{Read, Write};
    let host_addr = format!("127.0.0.1:{host_port}");
    let reg: host::RegisterResponse =
        Client::connect_tcp(host_addr.as_str(), Credential::host_token(""))
            .and_then(|c| {
                c.unary(
                    host::host_methods::REGISTER,
                    &host::RegisterRequest {
                        registration_token: registration.into(),
                        agent_address: "127.0.0.1:1".into(),
                        hostname: "flooded".into(),
                        capacity: Some(agent::Resources {
                            vcpus: 2,
                            memory_mib: 2048,
                            disk_mib: 10_000,
                        }),
                        ..Default::default()
                    },
                    Some(Duration::from_secs(10)),
                )
            })
            .map_err(|e| format!("register: {e}"))?;
    let mut conn: Option<Client> = None;
    let mut n = 0u32;
    let mut heartbeat = || -> Result<(), String> {
        n += 1;
        if n % 10 == 0 || conn.is_none() {
            if let Some(old) = conn.take() {
                old.close();
            }
            conn = Some(
                Client::connect_tcp(host_addr.as_str(), Credential::host_token(&reg.host_token))
                    .map_err(|e| format!("connect: {e}"))?,
            );
        }
        let cl = conn.as_ref().expect("connected above");
        cl.unary::<_, host::HeartbeatResponse>(
            host::host_methods::HEARTBEAT,
            &host::HeartbeatRequest {
                capacity: Some(agent::Resources {
                    vcpus: 2,
                    memory_mib: 2048,
                    disk_mib: 10_000,
                }),
                ..Default::default()
            },
            Some(Duration::from_secs(10)),
        )
        .map_err(|e| format!("Heartbeat: {e}"))?;
        Ok(())
    };
    let target = Target::Tcp(host_addr.parse().unwrap());
    for scenario in [
        Scenario::IdleUnauthenticated,
        Scenario::SlowHello,
        Scenario::HalfWrittenFrames(None),
        Scenario::OneCredentialMany(Credential::host_token("")),
    ] {
        let r = flood::run_checked(
            &target,
            &scenario,
            &Size::quick(),
            Some(pid),
            &mut heartbeat,
            FLOOD_FLOOR,
            256 * 1024,
        )
        .map_err(|e| format!("host port: {e}"))?;
        eprintln!("ctl host port {}", r.line());
    }

    let http_addr: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let mut keep: Option<std::net::TcpStream> = None;
    let mut m = 0u32;
    let mut list = || -> Result<(), String> {
        m += 1;
        if m % 10 == 0 || keep.is_none() {
            let s = std::net::TcpStream::connect(http_addr).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_nodelay(true).unwrap();
            keep = Some(s);
        }
        let s = keep.as_mut().expect("connected above");
        write!(
            s,
            "GET /v1/sandboxes HTTP/1.1\r\nHost: t\r\nX-API-Key: {team_key}\r\n\r\n"
        )
        .map_err(|e| format!("write: {e}"))?;
        // Read one response: head, then Content-Length bytes.
        let mut buf = Vec::new();
        let mut byte = [0u8; 4096];
        loop {
            let n = s.read(&mut byte).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                keep = None;
                return Err("closed".into());
            }
            buf.extend_from_slice(&byte[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    if !head.starts_with("HTTP/1.1 200") {
                        keep = None;
                        return Err(head.lines().next().unwrap_or("").to_owned());
                    }
                    return Ok(());
                }
            }
        }
    };
    let target = Target::Tcp(http_addr);
    for scenario in [Scenario::HttpIdle, Scenario::HttpSlowHeaders] {
        let r = flood::run_checked(
            &target,
            &scenario,
            &Size::quick(),
            Some(pid),
            &mut list,
            FLOOD_FLOOR,
            256 * 1024,
        )
        .map_err(|e| format!("http gateway: {e}"))?;
        eprintln!("ctl http {}", r.line());
    }
    Ok(())
}

/// Issue 14: `admin tls init` makes a CA (key 0600) and a server certificate; `serve` with
/// them speaks TLS on the client port; without certificate flags it refuses to start unless
/// `--plaintext` says so; a plaintext client on the TLS port hears "server speaks TLS".
#[test]
fn serve_speaks_tls_with_the_files_admin_tls_init_makes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("wrenn-ctl-bin-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let init = |names: &str| {
        Command::new(BIN)
            .args(["admin", "tls", "init", "--dir"])
            .arg(&dir)
            .args(["--names", names])
            .output()
            .unwrap()
    };
    let out = init("127.0.0.1,localhost");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("ca sha-256:"), "{text}");
    let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("ca.key"), mode("server.key")), (0o600, 0o600));
    // A second init never replaces the CA.
    let out = init("127.0.0.1");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    // No certificate and no --plaintext: a usage error naming the flags.
    let out = Command::new(BIN)
        .args(["serve", "--database-url", "postgres://x@127.0.0.1:1/x"])
        .env_remove("WRENN_TLS_CERT")
        .env_remove("WRENN_TLS_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-cert") && err.contains("--plaintext"),
        "{err}"
    );

    // The sandbox-port certificate's three flags go together.
    let out = Command::new(BIN)
        .args(["serve", "--database-url", "postgres://x@127.0.0.1:1/x"])
        .arg("--tls-cert")
        .arg(dir.join("server.pem"))
        .arg("--tls-key")
        .arg(dir.join("server.key"))
        .args(["--tls-sandbox-domain", "sbx.example"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-sandbox-cert"));

    // A traffic domain that is not a domain name stops serve before anything starts.
    let out = Command::new(BIN)
        .args(["serve", "--database-url", "postgres://x@127.0.0.1:1/x"])
        .arg("--tls-cert")
        .arg(dir.join("server.pem"))
        .arg("--tls-key")
        .arg(dir.join("server.key"))
        .args(["--traffic-domain", "not a domain"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--traffic-domain"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let Some(url) = harness::fresh_db() else {
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    };
    let out = Command::new(BIN)
        .args([
            "admin",
            "init",
            "--team",
            "acme",
            "--email",
            "ops@acme.test",
        ])
        .env("WRENN_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let team_key = text
        .lines()
        .find(|l| l.starts_with("team api key"))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("wrn_")))
        .unwrap()
        .to_owned();
    let (port, http_port, host_port) = (free_port(), free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["serve", "--database-url", &url, "--no-http"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .args(["--host-listen", &format!("127.0.0.1:{host_port}")])
        .env("WRENN_TLS_CERT", dir.join("server.pem"))
        .env("WRENN_TLS_KEY", dir.join("server.key"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ca = tls::ClientTls::from_ca_file(
        &dir.join("ca.pem"),
        tls::ClientOptions {
            alpn: vec![tls::ALPN_WRENN.to_vec()],
            ..Default::default()
        },
    )
    .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let team = loop {
        let r = tls::connect(
            &addr,
            &ca,
            Credential::api_key(&team_key),
            &Default::default(),
        )
        .and_then(|cl| {
            cl.unary::<_, c::Team>(
                c::teams_methods::GET,
                &c::GetTeamRequest::default(),
                Some(Duration::from_secs(5)),
            )
        });
        match r {
            Ok(t) => break t,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                let _ = child.kill();
                panic!("serve did not answer over TLS: {e:?}");
            }
        }
    };
    assert_eq!(team.name, "acme");
    let e = Client::connect_tcp(addr.as_str(), Credential::api_key(&team_key)).unwrap_err();
    assert!(e.message.contains("server speaks TLS"), "{e:?}");
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `admin adopt-template` records a snapshot template an agent already has as a platform
/// template on that host (visible to every team); unknown hosts, taken names and ids, bad
/// ids, names that look like ids and sizes out of range are refused.
#[test]
fn admin_adopt_template_records_an_existing_agent_template() {
    let Some(ctl) = harness::Ctl::start() else {
        return;
    };
    let (_fa, host) = ctl.add_host(4, 4096, 100_000);
    let tpl = "tpl-57ac0000-0000-0000-0000-0000000000aa";
    let adopt = |host: &str, tpl: &str, name: &str, vcpus: &str| {
        Command::new(BIN)
            .args(["admin", "adopt-template", "--database-url", &ctl.url])
            .args(["--host", host, "--template", tpl, "--name", name])
            .args([
                "--vcpus",
                vcpus,
                "--memory-mib",
                "256",
                "--disk-mib",
                "5120",
            ])
            .output()
            .unwrap()
    };
    let out = adopt(&host, tpl, "adopted", "1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: c::Template = ctl
        .team()
        .unary(
            c::templates_methods::GET,
            &c::GetTemplateRequest {
                template: "adopted".into(),
            },
            Some(Duration::from_secs(10)),
        )
        .unwrap();
    assert_eq!(t.id, tpl);
    assert_eq!((t.vcpus, t.memory_mib, t.disk_mib), (1, 256, 5120));
    assert_eq!(t.host_id, host);
    assert_eq!(t.kind, c::TemplateKind::Snapshot as i32);
    let unknown_host = "host-57ac0000-0000-0000-0000-0000000000bb";
    for (h, id, name, vcpus, why) in [
        (host.as_str(), tpl, "other", "1", "exists"),
        (
            host.as_str(),
            "tpl-57ac0000-0000-0000-0000-0000000000cc",
            "adopted",
            "1",
            "exists",
        ),
        (
            unknown_host,
            "tpl-57ac0000-0000-0000-0000-0000000000cc",
            "x",
            "1",
            "host not found",
        ),
        (host.as_str(), "tpl-nope", "x", "1", "tpl"),
        (
            host.as_str(),
            "tpl-57ac0000-0000-0000-0000-0000000000cc",
            "tpl-x",
            "1",
            "look like ids",
        ),
        (
            host.as_str(),
            "tpl-57ac0000-0000-0000-0000-0000000000cc",
            "x",
            "0",
            "out of range",
        ),
    ] {
        let out = adopt(h, id, name, vcpus);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{id} {name}: {err}");
        assert!(err.contains(why), "{id} {name} {vcpus}: {err}");
    }
    // A missing size is a usage error.
    let out = Command::new(BIN)
        .args(["admin", "adopt-template", "--database-url", &ctl.url])
        .args(["--host", &host, "--template", tpl, "--name", "n"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
