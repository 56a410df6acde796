//! `wrenn down`: the local sandboxes destroyed through ctl, then every process of the stack
//! stopped, mounts undone, and the ports checked free.

use super::*;

/// Processes (other than ours) whose command line mentions `needle`.
pub(super) fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if is_stack_process(&cmdline, needle) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push((pid, text.trim().to_owned()));
        }
    }
    found
}

/// Programs a local stack runs. A process counts as the stack's only when it is one of these
/// and its command line names the state directory: a `tail -f` of a log there is not ours
/// to kill.
pub(super) const STACK_PROGRAMS: &[&str] = &[
    "postgres",
    "pg_ctl",
    "wrenn-ctl",
    "wrenn-agent",
    "firecracker",
    "wrenn-uffd",
];

/// Whether a NUL-separated command line is a stack program that mentions `needle`.
pub(super) fn is_stack_process(cmdline: &[u8], needle: &str) -> bool {
    let mut args = cmdline.split(|b| *b == 0);
    let argv0 = String::from_utf8_lossy(args.next().unwrap_or_default());
    // postgres children rename themselves ("postgres: checkpointer"): take the first word.
    let program = argv0.split([' ', ':']).next().unwrap_or("");
    let name = program.rsplit('/').next().unwrap_or("");
    STACK_PROGRAMS.contains(&name) && String::from_utf8_lossy(cmdline).contains(needle)
}

/// Mount points at or under `dir` (deepest first).
pub(super) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; true when the process is gone.
pub(super) fn terminate(pid: i32) -> bool {
    if !sys::kill(pid, libc::SIGTERM).unwrap_or(false) {
        return true;
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if !process_exists(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = sys::kill(pid, libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(200));
    !process_exists(pid)
}

/// Alive and not a zombie (a zombie child of someone else's shell is gone for us).
pub(super) fn process_exists(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

pub(super) fn stop_pidfile(
    layout: &Layout,
    name: &str,
    report: &mut String,
    left: &mut Vec<String>,
) {
    let path = layout.pid(name);
    match live_pid(&path, &format!("wrenn-{name}")) {
        Some(pid) => {
            if terminate(pid) {
                report.push_str(&format!("stopped {name} (pid {pid})\n"));
                let _ = fs::remove_file(&path);
            } else {
                left.push(format!("{name} pid {pid} did not exit"));
            }
        }
        None => {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Destroys the local team's sandboxes through ctl's protobuf API (the generated
/// `SandboxesClient`), so that the agent tears down their VMs, network slots and disks itself
/// (a stopped agent leaves them running on purpose).
pub(super) fn destroy_sandboxes(
    layout: &Layout,
    ctl: SocketAddr,
    report: &mut String,
    left: &mut Vec<String>,
) {
    use proto::gen::wrenn::ctl::v1 as pb;
    let (Some(key), Some(_)) = (
        read_trim(&layout.api_key()),
        live_pid(&layout.pid("ctl"), "wrenn-ctl"),
    ) else {
        return;
    };
    let ca = layout.ca_cert();
    let ca = ca.exists().then(|| ca.display().to_string());
    let plaintext = ca.is_none();
    let client = match crate::cli::connect_ctl(
        &ctl.to_string(),
        proto::rpc::Credential::api_key(key),
        ca.as_deref(),
        plaintext,
    ) {
        Ok(c) => c,
        Err(e) => {
            report.push_str(&format!("could not reach ctl to list sandboxes: {e}\n"));
            return;
        }
    };
    let list_client = pb::SandboxesClient::new(&client).with_timeout(Duration::from_secs(10));
    let destroy_client = pb::SandboxesClient::new(&client).with_timeout(STOP_TIMEOUT * 8);
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = match list_client.list(&pb::ListSandboxesRequest {
            page_size: 1000,
            page_token: std::mem::take(&mut page_token),
            ..Default::default()
        }) {
            Ok(p) => p,
            Err(e) => {
                report.push_str(&format!("could not list sandboxes: {e}\n"));
                return;
            }
        };
        ids.extend(page.sandboxes.into_iter().map(|sb| sb.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    for id in ids {
        let req = pb::DestroySandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        };
        match destroy_client.destroy(&req) {
            Ok(_) => report.push_str(&format!("destroyed {id}\n")),
            Err(e) if e.code == proto::Code::NotFound => {
                report.push_str(&format!("destroyed {id}\n"))
            }
            Err(e) => left.push(format!("sandbox {id}: destroy failed: {e}")),
        }
    }
    client.close();
}

/// Stops the stack in `layout`; returns what was done, or what was left behind.
pub fn stop(layout: &Layout) -> Result<String, UpError> {
    let mut report = String::new();
    let mut left = Vec::new();
    if !layout.dir.exists() {
        return Ok(format!(
            "nothing to stop: {} does not exist\n",
            layout.dir.display()
        ));
    }
    let _lock = lock(layout)?;
    let conf = read_conf(&layout.stack());
    let root = sys::is_root();

    if let Some(port) = conf.get("ctl_port").and_then(|p| p.parse::<u16>().ok()) {
        destroy_sandboxes(layout, loopback(port), &mut report, &mut left);
    }
    stop_pidfile(layout, "agent", &mut report, &mut left);
    // The agent leaves Firecracker and wrenn-uffd running on purpose (a restarted agent
    // re-adopts them); `down` means nothing keeps running.
    let agent_root = layout.agent_root().display().to_string();
    for (pid, cmd) in processes_mentioning(&agent_root) {
        if terminate(pid) {
            report.push_str(&format!("stopped pid {pid}: {cmd}\n"));
        } else {
            left.push(format!("pid {pid} did not exit: {cmd}"));
        }
    }
    for m in mounts_under(&layout.dir) {
        let ok = sys::umount_detach(&m).is_ok();
        if ok {
            report.push_str(&format!("unmounted {}\n", m.display()));
        } else {
            left.push(format!("mount {}", m.display()));
        }
    }
    stop_pidfile(layout, "ctl", &mut report, &mut left);

    if layout.pg_data().join("PG_VERSION").exists() {
        let bin = conf
            .get("pg_bin")
            .map(PathBuf::from)
            .map_or_else(find_pg_bin, Ok)?;
        let running = pg_command(&bin, "pg_ctl", root)
            .arg("status")
            .arg("-D")
            .arg(layout.pg_data())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if running {
            match run_cmd(
                "pg_ctl stop",
                pg_command(&bin, "pg_ctl", root)
                    .arg("stop")
                    .arg("-D")
                    .arg(layout.pg_data())
                    .args(["-m", "fast", "-w", "-t", "60"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
            ) {
                Ok(_) => report.push_str("stopped PostgreSQL\n"),
                Err(e) => left.push(format!("PostgreSQL: {e}")),
            }
        }
    }

    for key in [
        "ctl_port",
        "http_port",
        "host_port",
        "agent_port",
        "agent_metrics_port",
        "pg_port",
    ] {
        if let Some(p) = conf.get(key).and_then(|v| v.parse::<u16>().ok()) {
            // TIME_WAIT does not block a bind with SO_REUSEADDR, which std sets.
            if !wait_port_free(p, PORT_RELEASE_WAIT) {
                left.push(format!("port {p} ({key}) still in use"));
            }
        }
    }
    // `pg_ctl stop -w` returns once the pid file is gone, a moment before the postmaster
    // has exited; anything else still running from the state directory is a leftover.
    let dir = layout.dir.display().to_string();
    let deadline = Instant::now() + PORT_RELEASE_WAIT;
    let mut still = processes_mentioning(&dir);
    while !still.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        still = processes_mentioning(&dir);
    }
    for (pid, cmd) in still {
        left.push(format!("pid {pid} still running: {cmd}"));
    }
    if !left.is_empty() {
        return Err(UpError::Leftovers(left));
    }
    if report.is_empty() {
        report.push_str("nothing was running\n");
    }
    report.push_str(&format!(
        "wrenn is down; data kept in {} (remove it for a fresh start)\n",
        layout.dir.display()
    ));
    Ok(report)
}
