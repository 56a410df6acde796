//! `wrenn up` / `wrenn down` without Firecracker: PostgreSQL, ctl and the agent start, the API
//! answers, an API key works, `/metrics` of both parse and move, `down` leaves nothing.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use wrenn::up::{self, http_get, https_get, Layout, UpConfig};

use crate::metrics;
use crate::support::{require_e2e, skip, wrenn_bin, TempDir};

const T: Duration = Duration::from_secs(10);
/// Slot names and addresses of this test's agent: its own, so that it never touches the
/// slots of another agent on this machine (nor of the upgrade test running beside it).
const NET_PREFIX: &str = "wtup";
const NET_SUBNET: &str = "10.231.0.0";

fn free(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
}

/// A base port p with p..p+5 free (ctl, http, agent, agent metrics, postgres).
pub fn free_ports() -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
    for i in 0..200u64 {
        let base = 20000 + ((seed.wrapping_mul(2654435761).wrapping_add(i * 977)) % 40000) as u16;
        if (0..6).all(|k| free(base + k)) {
            return base;
        }
    }
    panic!("no six free consecutive ports");
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The pieces `wrenn up` needs, or the reason they are missing.
pub fn prerequisites() -> Result<(), String> {
    if !wrenn::doctor::sys::is_root() {
        return Err("not root (wrenn-agent needs root)".into());
    }
    up::find_pg_bin().map_err(|e| e.to_string())?;
    for b in ["wrenn-ctl", "wrenn-agent"] {
        up::find_binary(b, None).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Processes whose command line mentions `dir`.
pub fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(&needle) {
                v.push(format!("{pid}: {c}"));
            }
        }
    }
    v
}

/// Stops the stack when the test ends, whatever happened.
pub struct Down(pub Layout);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = up::stop(&self.0);
    }
}

/// /metrics of a listener; with `ca`, over TLS (ctl's gateway under `wrenn up`).
fn metrics_of(addr: SocketAddr, ca: Option<&Path>) -> metrics::Exposition {
    let (code, body) = match ca {
        Some(ca) => https_get(addr, ca, "/metrics", &[], T),
        None => http_get(addr, "/metrics", &[], T),
    }
    .unwrap();
    assert_eq!(code, 200, "{body}");
    metrics::parse(&body).unwrap_or_else(|e| panic!("{addr}/metrics does not parse: {e}\n{body}"))
}

#[test]
fn up_then_down_without_firecracker() {
    if let Err(reason) = prerequisites() {
        skip("up::up_then_down_without_firecracker", &reason);
        return;
    }
    // `down` must leave no process or port: a crashed earlier run could hide that.
    let state = TempDir::short();
    let base = free_ports();
    let cfg = UpConfig {
        layout: Layout {
            dir: state.path().join("s"),
        },
        ctl_port: base,
        http_port: base + 1,
        host_port: base + 5,
        agent_port: base + 2,
        pg_port: base + 4,
        image_root: state.path().join("images"),
        firecracker: state.path().join("no/firecracker"),
        kernel: None,
        rootfs: state.path().join("images/no-rootfs.ext4"),
        bin_dir: None,
        net_prefix: NET_PREFIX.into(),
        net_subnet: NET_SUBNET.into(),
        agent_args: Vec::new(),
    };
    let _guard = Down(cfg.layout.clone());
    let t0 = std::time::Instant::now();
    let summary = up::up(&cfg).unwrap_or_else(|e| panic!("wrenn up: {e}"));
    println!("wrenn up took {:?}\n{summary}", t0.elapsed());
    assert!(summary.contains("export WRENN_URL=127.0.0.1:"), "{summary}");
    assert!(summary.contains(" WRENN_API_KEY=wrn_"), "{summary}");
    assert!(summary.contains("; wrenn sandbox create"), "{summary}");
    assert!(summary.contains("Firecracker is not at"), "{summary}");
    assert!(summary.contains("wrenn image kernel"), "{summary}");
    assert!(summary.contains("wrenn image rootfs"), "{summary}");
    let key = std::fs::read_to_string(cfg.layout.api_key())
        .unwrap()
        .trim()
        .to_owned();
    let admin = std::fs::read_to_string(cfg.layout.admin_key())
        .unwrap()
        .trim()
        .to_owned();
    assert!(key.starts_with("wrn_") && admin.starts_with("wrn_") && key != admin);
    use std::os::unix::fs::PermissionsExt;
    for secret in [
        cfg.layout.api_key(),
        cfg.layout.admin_key(),
        cfg.layout.pg_password(),
    ] {
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", secret.display());
    }

    // Issue 14: the CLI reaches ctl over TLS with only the env file's variables, and no
    // secret is on a process's command line.
    let envs: Vec<(String, String)> = std::fs::read_to_string(cfg.layout.env_file())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert!(envs.iter().any(|(k, _)| k == "WRENN_CA"), "{envs:?}");
    let out = std::process::Command::new(wrenn_bin())
        .args(["sandbox", "list"])
        .env_clear()
        .envs(envs.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wrenn sandbox list over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(wrenn_bin())
        .args(["sandbox", "list", "--plaintext"])
        .env_clear()
        .envs(envs.iter().filter(|(k, _)| k != "WRENN_CA").cloned())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("server speaks TLS") && err.contains("WRENN_CA"),
        "{err}"
    );
    for name in ["agent", "ctl"] {
        let pid = std::fs::read_to_string(cfg.layout.pid(name)).unwrap();
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains("wrr_") && !cmdline.contains("wrn_"),
            "{name}: {cmdline}"
        );
    }

    // Issue 14: the agent made its host key (0600, never sent) and holds the certificate
    // ctl issued for its host id, chaining to the stack's CA (the CA the token pinned).
    let agent_dir = cfg.layout.agent_root().join("agent");
    let key_mode = std::fs::metadata(agent_dir.join("host.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let ident = std::fs::read_to_string(agent_dir.join("identity.conf")).unwrap();
    let host_id = ident
        .lines()
        .find_map(|l| l.strip_prefix("host_id="))
        .map(|u| format!("host-{}", u.trim()))
        .unwrap_or_else(|| panic!("no host_id in {ident}"));
    let ca_pem = std::fs::read(cfg.layout.ca_cert()).unwrap();
    assert_eq!(std::fs::read(agent_dir.join("ctl-ca.pem")).unwrap(), ca_pem);
    let ca = tls::certs_from_pem(&ca_pem, "ca").unwrap();
    let leaf =
        tls::certs_from_pem(&std::fs::read(agent_dir.join("host.pem")).unwrap(), "host").unwrap();
    tls::verify_server_cert(&ca[0], &leaf[0], &host_id).unwrap();
    // The agent's own port now requires mutual TLS: a plaintext client hears that it
    // speaks TLS; a TLS client trusting the CA, dialling the host id but without ctl's client
    // certificate, is refused.
    let agent_rpc = loopback(cfg.agent_port).to_string();
    let e = proto::rpc::Client::connect_tcp(
        agent_rpc.as_str(),
        proto::rpc::Credential::agent_token("x"),
    )
    .unwrap_err();
    assert!(e.message.contains("server speaks TLS"), "{e}");
    let no_cert = tls::ClientTls::from_ca_pem(
        &ca_pem,
        tls::ClientOptions {
            alpn: vec![tls::ALPN_WRENN.to_vec()],
            server_name: Some(host_id.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let e = tls::connect(
        &agent_rpc,
        &no_cert,
        proto::rpc::Credential::agent_token("x"),
        &proto::rpc::ClientConfig::default(),
    )
    .and_then(|c| {
        c.unary::<_, proto::gen::wrenn::agent::v1::ListSandboxesResponse>(
            proto::gen::wrenn::agent::v1::sandboxes_methods::LIST,
            &proto::gen::wrenn::agent::v1::ListSandboxesRequest::default(),
            Some(T),
        )
    })
    .unwrap_err();
    assert!(e.message.to_lowercase().contains("certificate"), "{e}");

    // The agent says why it cannot host sandboxes, naming Firecracker.
    let agent_http = loopback(cfg.agent_metrics_port());
    let (code, health) = http_get(agent_http, "/health", &[], T).unwrap();
    assert_eq!(code, 200);
    assert!(health.contains("cannot host sandboxes"), "{health}");
    assert!(health.to_lowercase().contains("firecracker"), "{health}");

    // The API answers; the key works and a wrong key does not.
    let http = loopback(cfg.http_port);
    let ca = cfg.layout.ca_cert();
    // The gateway speaks TLS only: a plaintext request gets a 400 naming HTTPS.
    let (code, body) = http_get(http, "/health", &[], T).unwrap();
    assert!(code == 400 && body.contains("HTTPS"), "{code} {body}");
    assert_eq!(https_get(http, &ca, "/health", &[], T).unwrap().0, 200);
    let (code, body) = https_get(http, &ca, "/v1/sandboxes", &[("X-API-Key", &key)], T).unwrap();
    assert_eq!(code, 200, "{body}");
    let wrong = format!("wrn_{}", "0".repeat(64));
    let (code, body) = https_get(http, &ca, "/v1/sandboxes", &[("X-API-Key", &wrong)], T).unwrap();
    assert_eq!(code, 401, "{body}");
    // The registered agent is a host ctl knows (platform-admin key).
    let (code, hosts) = https_get(http, &ca, "/v1/hosts", &[("X-API-Key", &admin)], T).unwrap();
    assert_eq!(code, 200, "{hosts}");
    assert!(
        hosts.contains(&format!("127.0.0.1:{}", cfg.agent_port)),
        "{hosts}"
    );

    // /metrics of both parse strictly, and ctl's counters move after API calls.
    let before = metrics_of(http, Some(&ca));
    let agent_before = metrics_of(agent_http, None);
    // Without Firecracker the agent says so in its gauges too, and runs nothing.
    assert_eq!(
        agent_before.value("wrenn_agent_can_host_sandboxes"),
        Some(0.0)
    );
    assert_eq!(agent_before.sum("wrenn_agent_sandboxes"), 0.0);
    assert!(agent_before
        .samples
        .iter()
        .any(|s| s.name == "wrenn_agent_sandboxes" && s.labels.iter().any(|(k, _)| k == "state")));
    // HTTP calls are counted by operation and status (the protobuf transport counts into
    // wrenn_ctl_api_calls_total); refused keys into wrenn_ctl_auth_failures_total.
    let list_ok = |e: &metrics::Exposition| -> f64 {
        e.samples
            .iter()
            .filter(|s| s.name == "wrenn_http_requests_total")
            .filter(|s| s.labels.iter().any(|(_, v)| v == "sandboxes.list"))
            .filter(|s| s.labels.iter().any(|(_, v)| v == "200"))
            .map(|s| s.value)
            .sum()
    };
    let auth_before = before.sum("wrenn_ctl_auth_failures_total");
    for _ in 0..5 {
        assert_eq!(
            https_get(http, &ca, "/v1/sandboxes", &[("X-API-Key", &key)], T)
                .unwrap()
                .0,
            200
        );
    }
    assert_eq!(
        https_get(http, &ca, "/v1/sandboxes", &[("X-API-Key", &wrong)], T)
            .unwrap()
            .0,
        401
    );
    let after = metrics_of(http, Some(&ca));
    let (b, a) = (list_ok(&before), list_ok(&after));
    assert!(a >= b + 5.0, "sandboxes.list 200 {b} -> {a}");
    assert!(after.sum("wrenn_ctl_auth_failures_total") > auth_before);
    // The latency histogram counts the calls too.
    let hist = "wrenn_http_request_duration_seconds_count";
    assert!(after.sum(hist) >= before.sum(hist) + 6.0, "{hist}");
    // The agent's RPC counters move as ctl calls it (heartbeats, host info); at least the
    // page is stable and parseable a second time.
    let agent_after = metrics_of(agent_http, None);
    for (who, e) in [("ctl", &after), ("agent", &agent_after)] {
        let families: Vec<String> = e.types.iter().map(|(n, t)| format!("{n} ({t})")).collect();
        println!(
            "{who} /metrics: {} families: {}",
            families.len(),
            families.join(", ")
        );
    }
    assert!(agent_after.types.len() >= agent_before.types.len());

    // A sandbox create fails with an error naming the missing part.
    let (code, body) = post(
        http,
        &ca,
        "/v1/sandboxes",
        &key,
        "{}",
        Duration::from_secs(120),
    );
    println!("create without Firecracker: {code} {body}");
    assert!(code >= 400, "{code} {body}");
    assert!(
        body.to_lowercase().contains("firecracker") || body.contains("no host"),
        "{body}"
    );

    // ctl's host-facing counter moves with the agent's heartbeats.
    let host_calls = after.sum("wrenn_ctl_host_calls_total");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metrics_of(http, Some(&ca)).sum("wrenn_ctl_host_calls_total") <= host_calls {
        assert!(
            std::time::Instant::now() < deadline,
            "no heartbeat reached ctl in 20 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Upgrading the agent: stop only wrenn-agent (what KillMode=process does), start it
    // again. It keeps its identity: no new registration, still one host in ctl.
    let agent_pid: i32 = std::fs::read_to_string(cfg.layout.pid("agent"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let identity = cfg.layout.agent_root().join("agent/identity.conf");
    let identity_before = std::fs::read(&identity).unwrap();
    wrenn::doctor::sys::kill(agent_pid, libc::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::path::Path::new(&format!("/proc/{agent_pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{agent_pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "agent ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let restarted = up::up(&cfg).unwrap_or_else(|e| panic!("wrenn up after agent stop: {e}"));
    assert!(restarted.contains(&key));
    assert_ne!(
        std::fs::read_to_string(cfg.layout.pid("agent"))
            .unwrap()
            .trim(),
        agent_pid.to_string()
    );
    assert_eq!(std::fs::read(&identity).unwrap(), identity_before);
    let (code, hosts) = https_get(http, &ca, "/v1/hosts", &[("X-API-Key", &admin)], T).unwrap();
    assert_eq!(code, 200, "{hosts}");
    assert_eq!(
        hosts
            .matches(&format!("127.0.0.1:{}", cfg.agent_port))
            .count(),
        1,
        "one host after the restart: {hosts}"
    );

    // A second `up` is a no-op that reuses everything (same key, same processes).
    let ctl_pid = std::fs::read_to_string(cfg.layout.pid("ctl")).unwrap();
    let again = up::up(&cfg).unwrap_or_else(|e| panic!("second wrenn up: {e}"));
    assert!(again.contains(&key), "{again}");
    assert_eq!(
        std::fs::read_to_string(cfg.layout.pid("ctl")).unwrap(),
        ctl_pid
    );

    // down: nothing left running or listening.
    let report = up::stop(&cfg.layout).unwrap_or_else(|e| panic!("wrenn down: {e}"));
    println!("{report}");
    assert!(
        report.contains("stopped agent") && report.contains("stopped ctl"),
        "{report}"
    );
    assert!(report.contains("stopped PostgreSQL"), "{report}");
    let left = processes_under(state.path());
    assert!(left.is_empty(), "still running: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let needle = state.path().display().to_string();
    assert!(!mounts.contains(&needle), "still mounted under {needle}");
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{NET_PREFIX}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(netns.is_empty(), "network namespaces left: {netns:?}");
    for p in base..base + 6 {
        assert!(free(p), "port {p} still in use");
    }
    assert!(!cfg.layout.pid("ctl").exists() && !cfg.layout.pid("agent").exists());

    // Restart on the same state: the data and the key survive; the agent keeps its identity.
    let summary = up::up(&cfg).unwrap_or_else(|e| panic!("wrenn up after down: {e}"));
    assert!(summary.contains(&key), "{summary}");
    let (code, body) = https_get(http, &ca, "/v1/sandboxes", &[("X-API-Key", &key)], T).unwrap();
    assert_eq!(code, 200, "{body}");
    up::stop(&cfg.layout).unwrap_or_else(|e| panic!("second wrenn down: {e}"));
    assert!(processes_under(state.path()).is_empty());
}

/// A POST with a JSON body to ctl's gateway over TLS (trusting `ca`).
pub fn post(
    addr: SocketAddr,
    ca: &Path,
    path: &str,
    key: &str,
    body: &str,
    timeout: Duration,
) -> (u16, String) {
    up::https_request(addr, ca, "POST", path, &[("X-API-Key", key)], body, timeout).unwrap()
}

/// The binary: `wrenn up --help` and `wrenn down` on an empty state directory.
#[test]
fn binary_up_down_dispatch() {
    let out = Command::new(wrenn_bin())
        .args(["up", "--help"])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&out.stderr).contains("unknown command") {
        skip(
            "up::binary_up_down_dispatch",
            "main.rs does not dispatch `up` yet",
        );
        return;
    }
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--state-dir"));
    let d = TempDir::new("down-empty");
    let out = Command::new(wrenn_bin())
        .args(["down", "--state-dir"])
        .arg(d.path().join("none"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to stop"));
    let out = Command::new(wrenn_bin())
        .args(["up", "--ctl-port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "port 0 accepted: {out:?}");
    let _ = (require_e2e(), PathBuf::new());
}

/// A port taken by someone else is a typed error before anything starts.
#[test]
fn busy_port_is_refused_before_starting_anything() {
    if let Err(reason) = prerequisites() {
        skip("up::busy_port_is_refused_before_starting_anything", &reason);
        return;
    }
    let base = free_ports();
    let _taken = TcpListener::bind(loopback(base + 1)).unwrap();
    let d = TempDir::short();
    let out = Command::new(wrenn_bin())
        .args(["up", "--state-dir"])
        .arg(d.path().join("stack"))
        .args([
            "--ctl-port",
            &base.to_string(),
            "--http-port",
            &(base + 1).to_string(),
            "--host-port",
            &(base + 5).to_string(),
        ])
        .args([
            "--agent-port",
            &(base + 2).to_string(),
            "--pg-port",
            &(base + 4).to_string(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains(&format!("port {}", base + 1)), "{err}");
    assert!(processes_under(d.path()).is_empty(), "something started");
    assert!(
        !d.path().join("stack/postgres/data").exists(),
        "PostgreSQL was initialized"
    );
}

/// Two `up`/`down` on one state directory never run at once.
#[test]
fn one_up_or_down_at_a_time() {
    let d = TempDir::new("lock");
    let layout = Layout {
        dir: d.path().to_path_buf(),
    };
    let held = std::fs::File::create(d.path().join("lock")).unwrap();
    assert!(wrenn::doctor::sys::try_lock_exclusive(std::os::fd::AsFd::as_fd(&held)).unwrap());
    match up::stop(&layout) {
        Err(up::UpError::Busy { dir }) => assert_eq!(dir, d.path()),
        other => panic!("down ran beside another: {other:?}"),
    }
    drop(held);
    let report = up::stop(&layout).unwrap();
    assert!(report.contains("nothing was running"), "{report}");
}

/// A state directory too deep for the agent's Unix sockets is refused up front.
#[test]
fn too_long_state_dir_is_refused() {
    let d = TempDir::new("long");
    let dir = d.path().join("x".repeat(up::AGENT_ROOT_LEN_MAX));
    let cfg = UpConfig {
        layout: Layout { dir: dir.clone() },
        ctl_port: 1,
        http_port: 2,
        host_port: 6,
        agent_port: 3,
        pg_port: 5,
        image_root: d.path().to_path_buf(),
        firecracker: d.path().join("fc"),
        kernel: None,
        rootfs: d.path().join("rootfs"),
        bin_dir: None,
        net_prefix: NET_PREFIX.into(),
        net_subnet: NET_SUBNET.into(),
        agent_args: Vec::new(),
    };
    match up::up(&cfg) {
        Err(up::UpError::PathTooLong { max, .. }) => assert_eq!(max, up::AGENT_ROOT_LEN_MAX),
        other => panic!("expected PathTooLong, got {other:?}"),
    }
    assert!(!dir.exists(), "nothing is created");
}
