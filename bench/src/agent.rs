//! Agent cases (issue 6).
//!
//! - `agent_idle_rss`: starts the `wrenn-agent` binary (next to the bench binary, else the
//!   line is skipped with the reason) with a temporary state root, loopback listeners on
//!   free ports and its own network prefix/subnet (`wrbn`, 10.205.0.0/16 given as `10.205.0.0`: never the default
//!   prefix, another agent may run on this host), waits until `GET /health` answers, reads
//!   VmRSS from /proc and kills it: `metric=agent_idle_rss value=.. unit=MiB goal=<=10`.
//! - The sandbox lifecycle cases (`sandbox_create_from_template`, `sandbox_pause`,
//!   `sandbox_resume`, `sandbox_resume_uffd` vs `sandbox_resume_file`,
//!   `pause_generation_build` vs `sequential_write`, `snapshot_bytes_ratio`,
//!   `sandbox_create_cold`) need `WRENN_FIRECRACKER`, `WRENN_KERNEL` and `WRENN_ROOTFS`;
//!   without them each prints `bench=<name> skipped=<reason>`. They are NOT implemented yet:
//!   with the variables set they print `skipped=not_implemented` (the Firecracker restore
//!   phases and the Uffd-vs-File restore of a raw snapshot are measured by `vm_restore`).
//!
//! Everything the case creates (the agent process, its state root) is removed on the way
//! out, error or not.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{info_line, metric_line, rss_kib, Case, Goal, Opts, Samples};

/// How long the agent may take to answer `/health` (it only creates its state root and
/// binds two sockets; a shared, busy machine gets generous room).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between `/health` attempts.
const HEALTH_RETRY: Duration = Duration::from_millis(20);
/// Settle time after the first answer before reading RSS: the idle figure, not the
/// start-up peak of threads being spawned.
const SETTLE: Duration = Duration::from_millis(500);
/// Network names/addresses of the benchmark's agent: never the default `wrenn` prefix.
const NET_PREFIX: &str = "wrbn";
const NET_SUBNET: &str = "10.205.0.0";

/// The lifecycle cases this file owns that are not implemented yet (see the module doc).
const LIFECYCLE: [&str; 7] = [
    "sandbox_create_cold",
    "sandbox_create_from_template",
    "sandbox_pause",
    "sandbox_resume",
    "sandbox_resume_uffd",
    "pause_generation_build",
    "snapshot_bytes_ratio",
];

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "agent_idle_rss",
            run: agent_idle_rss,
        },
        Case {
            name: "sandbox_lifecycle",
            run: sandbox_lifecycle,
        },
    ]
}

/// Why the Firecracker cases cannot run, or `None` when the variables are all set.
fn vm_skip_reason() -> Option<String> {
    let unset: Vec<&str> = ["WRENN_FIRECRACKER", "WRENN_KERNEL", "WRENN_ROOTFS"]
        .into_iter()
        .filter(|k| std::env::var_os(k).is_none_or(|v| v.is_empty()))
        .collect();
    if unset.is_empty() {
        None
    } else {
        Some(format!("{}_not_set", unset.join("/")))
    }
}

fn sandbox_lifecycle(_opts: &Opts) -> Result<(), String> {
    let reason = vm_skip_reason().unwrap_or_else(|| "not_implemented".to_owned());
    for name in LIFECYCLE {
        println!("bench={name} skipped={reason}");
    }
    Ok(())
}

/// Kills (and reaps) the agent and removes its state root on drop.
struct AgentGuard {
    child: Child,
    root: PathBuf,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr().map_err(|e| format!("local addr: {e}"))
}

/// One `GET /health`: `Ok(true)` on a 200 answer, `Ok(false)` when nothing listens yet.
fn health(addr: SocketAddr) -> Result<bool, String> {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(s) => s,
        Err(_) => return Ok(false),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send /health: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| format!("read /health: {e}"))?;
    Ok(resp.starts_with(b"HTTP/1.1 200"))
}

fn agent_idle_rss(_opts: &Opts) -> Result<(), String> {
    let bin = std::env::current_exe()
        .map_err(|e| format!("current exe: {e}"))?
        .with_file_name("wrenn-agent");
    if !bin.is_file() {
        println!(
            "bench=agent_idle_rss skipped=no_{}_(cargo_build_--release_-p_agent)",
            bin.display()
        );
        return Ok(());
    }
    let root = PathBuf::from(format!("/tmp/wrenn-bagent-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
    let listen = free_addr()?;
    let metrics = free_addr()?;
    let log = fs::File::create(root.join("agent.log")).map_err(|e| format!("agent log: {e}"))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--listen")
        .arg(listen.to_string())
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .arg("--state-root")
        .arg(root.join("state"))
        .args(["--net-prefix", NET_PREFIX, "--net-subnet", NET_SUBNET])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let child = cmd
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let mut g = AgentGuard {
        child,
        root: root.clone(),
    };
    let t = Instant::now();
    loop {
        if let Some(st) = g.child.try_wait().map_err(|e| format!("wait agent: {e}"))? {
            let tail = fs::read_to_string(root.join("agent.log")).unwrap_or_default();
            return Err(format!("wrenn-agent exited ({st}) before /health: {tail}"));
        }
        if health(metrics)? {
            break;
        }
        if t.elapsed() > HEALTH_TIMEOUT {
            return Err(format!("wrenn-agent /health silent for {HEALTH_TIMEOUT:?}"));
        }
        std::thread::sleep(HEALTH_RETRY);
    }
    let up = t.elapsed();
    std::thread::sleep(SETTLE);
    let kib = rss_kib(g.child.id())?;
    let mib = (kib as f64 / 1024.0 * 100.0).round() / 100.0;
    println!(
        "{}",
        info_line(
            "agent_start_to_health",
            &Samples::from_durations(&[up]),
            "once,spawn_to_first_200_on_/health",
        )
    );
    println!(
        "{}",
        metric_line("agent_idle_rss", mib, "MiB", Goal::AtMost(10.0))
    );
    drop(g);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_on_a_closed_port_is_not_ready() {
        let addr = free_addr().expect("free addr");
        assert_eq!(health(addr), Ok(false));
    }
}
