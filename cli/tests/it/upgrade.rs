//! Upgrading the agent without losing sandboxes (docs/operations.md, "Upgrading the agent"):
//! with a sandbox running, stop only wrenn-agent (what the unit's KillMode=process does on
//! `systemctl restart`), start it again, and the sandbox is re-adopted: same Firecracker
//! process, still running, still usable through ctl (`echo hi` before and after).
//!
//! Needs a host that can run sandboxes: WRENN_FIRECRACKER, a kernel (WRENN_KERNEL or
//! /var/lib/wrenn/kernels) and the base rootfs (WRENN_ROOTFS or /var/lib/wrenn/templates/
//! 0000...0000/rootfs.ext4); WRENN_BOOT_ARGS (as in the agent's own end-to-end test) is passed to the agent's
//! --boot-args-extra (the nested-KVM workarounds of the development machines). Otherwise, or
//! when the agent reports itself unable to host sandboxes, it prints `skipped:` (a failure
//! under WRENN_REQUIRE_E2E=1).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wrenn::up::{self, http_get, https_get, Layout, UpConfig};

use crate::support::{skip, TempDir};
use crate::up::{free_ports, post, prerequisites, processes_under, Down};

const NAME: &str = "upgrade::agent_restart_keeps_sandboxes";
/// This test's agent's own slot names and addresses (see cli/src/up/mod.rs).
const NET_PREFIX: &str = "wtupg";
const NET_SUBNET: &str = "10.232.0.0";
/// Guests on the nested-KVM development machines take 4-6 minutes to boot.
const CREATE_TIMEOUT: Duration = Duration::from_secs(900);

fn env_path(k: &str) -> Option<PathBuf> {
    std::env::var(k)
        .ok()
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn sandbox_id(json: &str) -> Option<String> {
    let at = json.find("\"sb-")?;
    let rest = &json[at + 1..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// `echo hi` in the sandbox through ctl; the guests of the development machines now and then
/// kill a new process on its first steps, so it is tried a few times.
fn echo_hi(http: std::net::SocketAddr, ca: &std::path::Path, key: &str, id: &str) {
    let body = "{\"process\": {\"cmd\": \"/bin/echo\", \"args\": [\"hi\"]}}";
    let mut last = String::new();
    for _ in 0..3 {
        let (code, out) = post(
            http,
            ca,
            &format!("/v1/sandboxes/{id}/exec"),
            key,
            body,
            Duration::from_secs(120),
        );
        // stdout is base64 in JSON: "hi\n" = "aGkK".
        if code == 200 && out.contains("aGkK") {
            return;
        }
        last = format!("{code} {out}");
    }
    panic!("echo hi failed: {last}");
}

fn firecracker_pids(agent_root: &Path) -> Vec<String> {
    processes_under(agent_root)
        .into_iter()
        // The executable itself, not any command line that mentions Firecracker (the
        // agent's own has `--firecracker PATH`).
        .filter(|p| {
            let exe = p.split(": ").nth(1).and_then(|c| c.split(' ').next());
            exe.is_some_and(|e| e == "firecracker" || e.ends_with("/firecracker"))
        })
        .map(|p| p.split(':').next().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn agent_restart_keeps_sandboxes() {
    if let Err(reason) = prerequisites() {
        skip(NAME, &reason);
        return;
    }
    let image_root = PathBuf::from(wrenn::doctor::DEFAULT_STATE_ROOT);
    let Some(fc) = env_path("WRENN_FIRECRACKER").filter(|p| p.exists()) else {
        skip(NAME, "WRENN_FIRECRACKER is not set to a Firecracker binary");
        return;
    };
    let Some(kernel) =
        env_path("WRENN_KERNEL").or_else(|| wrenn::doctor::newest_kernel(&image_root))
    else {
        skip(
            NAME,
            "no guest kernel (WRENN_KERNEL or `wrenn image kernel`)",
        );
        return;
    };
    let rootfs =
        env_path("WRENN_ROOTFS").unwrap_or_else(|| wrenn::doctor::minimal_rootfs(&image_root));
    if !rootfs.exists() {
        skip(
            NAME,
            &format!(
                "no base rootfs at {} (`wrenn image rootfs`)",
                rootfs.display()
            ),
        );
        return;
    }
    let state = TempDir::short();
    let base = free_ports();
    let mut agent_args = Vec::new();
    if let Ok(extra) = std::env::var("WRENN_BOOT_ARGS") {
        agent_args.push(format!("--boot-args-extra={extra}"));
    }
    let cfg = UpConfig {
        layout: Layout {
            dir: state.path().join("s"),
        },
        ctl_port: base,
        http_port: base + 1,
        host_port: base + 5,
        agent_port: base + 2,
        pg_port: base + 4,
        image_root,
        firecracker: fc,
        kernel: Some(kernel),
        rootfs,
        bin_dir: None,
        net_prefix: NET_PREFIX.into(),
        net_subnet: NET_SUBNET.into(),
        agent_args,
    };
    let _guard = Down(cfg.layout.clone());
    up::up(&cfg).unwrap_or_else(|e| panic!("wrenn up: {e}"));
    let t = Duration::from_secs(10);
    let agent_http = std::net::SocketAddr::from(([127, 0, 0, 1], cfg.agent_metrics_port()));
    let (_, health) = http_get(agent_http, "/health", &[], t).unwrap();
    if health.contains("cannot host") {
        skip(
            NAME,
            &format!("the agent cannot host sandboxes here: {}", health.trim()),
        );
        return;
    }
    let key = std::fs::read_to_string(cfg.layout.api_key())
        .unwrap()
        .trim()
        .to_owned();
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], cfg.http_port));

    let t0 = Instant::now();
    let (code, body) = post(
        http,
        &cfg.layout.ca_cert(),
        "/v1/sandboxes",
        &key,
        "{\"timeout_s\": 3600}",
        CREATE_TIMEOUT,
    );
    assert_eq!(code, 201, "create: {body}");
    println!("sandbox created in {:?}", t0.elapsed());
    let id = sandbox_id(&body).unwrap_or_else(|| panic!("no sandbox id in {body}"));
    echo_hi(http, &cfg.layout.ca_cert(), &key, &id);
    let before = firecracker_pids(&cfg.layout.agent_root());
    assert_eq!(before.len(), 1, "one Firecracker: {before:?}");

    // Stop only the agent.
    let pid: i32 = std::fs::read_to_string(cfg.layout.pid("agent"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wrenn::doctor::sys::kill(pid, libc::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while up::live_pid(&cfg.layout.pid("agent"), "wrenn-agent").is_some() {
        assert!(Instant::now() < deadline, "agent ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        firecracker_pids(&cfg.layout.agent_root()),
        before,
        "Firecracker must outlive the agent"
    );

    // The new agent re-adopts it.
    up::up(&cfg).unwrap_or_else(|e| panic!("wrenn up after the agent stopped: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = https_get(
            http,
            &cfg.layout.ca_cert(),
            &format!("/v1/sandboxes/{id}"),
            &[("X-API-Key", &key)],
            t,
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        if body.to_lowercase().contains("running") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not running after re-adoption: {body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        firecracker_pids(&cfg.layout.agent_root()),
        before,
        "same Firecracker"
    );

    // Still usable: a process and a lifecycle call go through the new agent.
    echo_hi(http, &cfg.layout.ca_cert(), &key, &id);
    let (code, body) = post(
        http,
        &cfg.layout.ca_cert(),
        &format!("/v1/sandboxes/{id}/ping"),
        &key,
        "{}",
        Duration::from_secs(60),
    );
    assert_eq!(code, 200, "ping after re-adoption: {body}");

    let report = up::stop(&cfg.layout).unwrap_or_else(|e| panic!("wrenn down: {e}"));
    println!("{report}");
    assert!(processes_under(state.path()).is_empty());
}
