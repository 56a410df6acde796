//! `wrenn up`'s processes: finding the binaries, starting ctl and the agent detached (own
//! session, pid file, log), waiting until each answers, and the small HTTP client for that.

use super::*;

/// `name` in `bin_dir`, else next to the running executable, else on PATH.
pub fn find_binary(name: &str, bin_dir: Option<&Path>) -> Result<PathBuf, UpError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = bin_dir {
        dirs.push(d.to_path_buf());
    }
    if let Some(d) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(d.clone());
        // An integration test runs from target/<profile>/deps; the binaries are one up.
        if d.ends_with("deps") {
            if let Some(up) = d.parent() {
                dirs.push(up.to_path_buf());
            }
        }
    }
    for d in dirs {
        let p = d.join(name);
        if fs::metadata(&p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0) {
            return Ok(p);
        }
    }
    doctor::find_on_path(name).ok_or_else(|| UpError::Missing {
        what: name.to_owned(),
        hint: format!(
            "build it (`cargo build --release -p {}`) or put it on PATH or in --bin-dir",
            if name == "wrenn-ctl" { "ctl" } else { "agent" }
        ),
    })
}

/// Runs `cmd` to completion; an error carries its output.
pub(super) fn run_cmd(what: &str, cmd: &mut Command) -> Result<String, UpError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| UpError::Spawn {
            program: PathBuf::from(cmd.get_program()),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(UpError::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(stdout)
}

pub(super) fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut s = lines[from..].join("\n");
    if s.is_empty() {
        s = format!("({} is empty)", path.display());
    }
    s
}

/// The pid in `path` if that process is alive and its command line mentions `name` (a
/// recycled pid is not ours).
pub fn live_pid(path: &Path, name: &str) -> Option<i32> {
    let pid: i32 = read_trim(path)?.parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if !String::from_utf8_lossy(&cmdline).contains(name) {
        return None;
    }
    match sys::kill(pid, 0) {
        Ok(true) => {
            // A zombie or a recycled pid is not ours: check it is not a zombie.
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit(')').next()?.split_whitespace().next()?;
            (state != "Z").then_some(pid)
        }
        _ => None,
    }
}

pub(super) fn port_free(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
}

/// Waits up to `limit` for `port` to become free.
pub(super) fn wait_port_free(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !port_free(port) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

pub(super) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A plain HTTP/1.1 GET on loopback: (status, body). Decodes chunked bodies.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<(u16, String)> {
    http_request(addr, "GET", path, headers, "", timeout)
}

/// One HTTP/1.1 request with a JSON body (empty: none) on a fresh connection.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let req = request_bytes(addr, method, path, headers, body)?;
    (&s).write_all(&req)?;
    read_http_response(&mut proto::http::Wire::new(s, Vec::new()))
}

/// [`http_get`] over TLS (ALPN http/1.1), trusting the CA certificate file `ca`: ctl's
/// gateway under `wrenn up`.
pub fn https_get(
    addr: SocketAddr,
    ca: &Path,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<(u16, String)> {
    https_request(addr, ca, "GET", path, headers, "", timeout)
}

/// [`http_request`] over TLS trusting the CA certificate file `ca`.
pub fn https_request(
    addr: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let client = tls::ClientTls::from_ca_file(
        ca,
        tls::ClientOptions {
            alpn: vec![tls::ALPN_HTTP.to_vec()],
            ..Default::default()
        },
    )
    .map_err(io::Error::other)?;
    let mut s = client.connect_blocking(addr, &addr.ip().to_string(), timeout)?;
    let req = request_bytes(addr, method, path, headers, body)?;
    s.write_all(&req)?;
    read_http_response(&mut proto::http::Wire::new(s, Vec::new()))
}

fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<Vec<u8>> {
    let host = addr.to_string();
    let mut all = vec![("Host", host.as_str()), ("Connection", "close")];
    all.extend_from_slice(headers);
    let with_body = !body.is_empty() || method != "GET";
    if with_body {
        all.push(("Content-Type", "application/json"));
    }
    let mut req =
        proto::http::request_head(method, path, &all, with_body.then_some(body.len() as u64))
            .map_err(|e| bad(&e.to_string()))?;
    req.extend_from_slice(body.as_bytes());
    Ok(req)
}

pub(super) fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// (status, body) of one response (the shared codec: Content-Length, chunked, or to EOF).
pub(super) fn read_http_response<S: Read>(
    wire: &mut proto::http::Wire<S>,
) -> io::Result<(u16, String)> {
    match proto::http::read_response(
        wire,
        proto::http::HTTP_HEAD_LEN_MAX,
        HTTP_RESPONSE_MAX as u64,
        false,
    ) {
        Ok(r) => Ok((r.head.status, String::from_utf8_lossy(&r.body).into_owned())),
        Err(proto::http::ResponseError::Io(e)) => Err(e),
        Err(e) => Err(bad(&e.to_string())),
    }
}

/// (status, body) of a complete HTTP/1.1 response read to EOF.
pub fn parse_http_response(raw: &[u8]) -> io::Result<(u16, String)> {
    read_http_response(&mut proto::http::Wire::new(raw, Vec::new()))
}

/// Starts `program args` detached (new session, stdin null, stdout/stderr appended to
/// `log`), writes its pid to `pid_file`, and returns the pid.
pub(super) fn spawn_detached(
    program: &Path,
    args: &[String],
    envs: &[(&str, String)],
    log: &Path,
    pid_file: &Path,
) -> Result<i32, UpError> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err("open", log))?;
    let err = out.try_clone().map_err(io_err("open", log))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .current_dir("/");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    sys::detach(&mut cmd);
    let child = cmd.spawn().map_err(|source| UpError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    let pid = child.id() as i32;
    // The child is detached; nobody waits for it but init once we exit.
    drop(child);
    fs::write(pid_file, format!("{pid}\n")).map_err(io_err("write", pid_file))?;
    Ok(pid)
}

/// Polls `ready` until it returns true, the process `pid` dies, or the deadline passes.
pub(super) fn wait_ready(
    what: &str,
    pid: i32,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<(), UpError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        let alive = sys::kill(pid, 0).unwrap_or(false)
            && fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    !s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(false);
        if !alive || Instant::now() > deadline {
            return Err(UpError::NotReady {
                what: format!(
                    "{what} (pid {pid}, {})",
                    if alive { "still running" } else { "exited" }
                ),
                log_tail: tail(log),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Migrations, then `admin init` once; returns (team key, platform-admin key).
pub(super) fn init_ctl(
    cfg: &UpConfig,
    ctl: &Path,
    db_url: &str,
) -> Result<(String, String), UpError> {
    let l = &cfg.layout;
    let env = [("WRENN_DATABASE_URL", db_url.to_owned())];
    let mut migrate = Command::new(ctl);
    migrate.args(["admin", "migrate"]);
    for (k, v) in &env {
        migrate.env(k, v);
    }
    run_cmd("wrenn-ctl admin migrate", &mut migrate)?;
    if let (Some(team), Some(admin)) = (read_trim(&l.api_key()), read_trim(&l.admin_key())) {
        return Ok((team, admin));
    }
    let mut init = Command::new(ctl);
    init.args([
        "admin",
        "init",
        "--team",
        "local",
        "--email",
        "admin@localhost",
    ])
    .args(["--name", "local admin"]);
    for (k, v) in &env {
        init.env(k, v);
    }
    let out = match run_cmd("wrenn-ctl admin init", &mut init) {
        Ok(out) => out,
        Err(UpError::Command { output, .. }) if output.contains("already initialized") => {
            return Err(UpError::LostKey { path: l.api_key() })
        }
        Err(e) => return Err(e),
    };
    let (team, admin) = parse_init_keys(&out).ok_or_else(|| UpError::Command {
        what: "wrenn-ctl admin init".into(),
        status: "no keys in its output".into(),
        output: String::new(),
    })?;
    write_secret(&l.api_key(), &team)?;
    write_secret(&l.admin_key(), &admin)?;
    Ok((team, admin))
}

/// `wrenn-ctl admin tls init` once: a local CA and ctl's certificate for the loopback
/// addresses (certificate making stays in ctl; the CLI links no rcgen).
pub(super) fn init_tls(cfg: &UpConfig, ctl: &Path) -> Result<(), UpError> {
    let l = &cfg.layout;
    if l.ca_cert().exists() && l.tls_dir().join("server.key").exists() {
        return Ok(());
    }
    let mut init = Command::new(ctl);
    init.args(["admin", "tls", "init", "--dir"])
        .arg(l.tls_dir())
        .args(["--names", "127.0.0.1,localhost,::1"]);
    run_cmd("wrenn-ctl admin tls init", &mut init)?;
    Ok(())
}

/// (team key, platform-admin key) from `wrenn-ctl admin init`'s output.
pub fn parse_init_keys(out: &str) -> Option<(String, String)> {
    let key_on = |label: &str| -> Option<String> {
        let line = out.lines().find(|l| l.trim_start().starts_with(label))?;
        line.split_whitespace()
            .find(|w| w.starts_with("wrn_"))
            .map(str::to_owned)
    };
    Some((key_on("team api key")?, key_on("platform admin key")?))
}

pub(super) fn start_ctl(
    cfg: &UpConfig,
    ctl: &Path,
    db_url: &str,
    running: Option<i32>,
) -> Result<(), UpError> {
    let l = &cfg.layout;
    let pid = match running {
        Some(pid) => pid,
        None => spawn_detached(
            ctl,
            &[
                "serve".into(),
                "--listen".into(),
                loopback(cfg.ctl_port).to_string(),
                "--http-listen".into(),
                loopback(cfg.http_port).to_string(),
                "--host-listen".into(),
                loopback(cfg.host_port).to_string(),
            ],
            &[
                ("WRENN_DATABASE_URL", db_url.to_owned()),
                (
                    "WRENN_TLS_CERT",
                    l.tls_dir().join("server.pem").display().to_string(),
                ),
                (
                    "WRENN_TLS_KEY",
                    l.tls_dir().join("server.key").display().to_string(),
                ),
                // The stack's CA issues the agent its host certificate at registration.
                ("WRENN_TLS_CA_CERT", l.ca_cert().display().to_string()),
                (
                    "WRENN_TLS_CA_KEY",
                    l.tls_dir().join("ca.key").display().to_string(),
                ),
            ],
            &l.log("ctl"),
            &l.pid("ctl"),
        )?,
    };
    let http = loopback(cfg.http_port);
    let rpc = loopback(cfg.ctl_port);
    wait_ready("wrenn-ctl", pid, &l.log("ctl"), || {
        TcpStream::connect_timeout(&rpc, Duration::from_secs(1)).is_ok()
            && matches!(
                https_get(http, &l.ca_cert(), "/health", &[], Duration::from_secs(2)),
                Ok((200, _))
            )
    })
}

/// Starts the agent (registering it on its first start); returns its /health answer.
pub(super) fn start_agent(
    cfg: &UpConfig,
    ctl: &Path,
    agent: &Path,
    db_url: &str,
    running: Option<i32>,
) -> Result<String, UpError> {
    let l = &cfg.layout;
    let root = l.agent_root();
    let identity = root.join("agent").join("identity.conf");
    // The base template: a link to the image built by `wrenn image rootfs`, so this stack's
    // agent keeps its own state root (its identity belongs to this stack's database).
    let tdir = root.join("templates").join(doctor::MINIMAL_TEMPLATE);
    let link = tdir.join("rootfs.ext4");
    if cfg.rootfs.exists() && fs::symlink_metadata(&link).is_err() {
        mkdir(&tdir, 0o755)?;
        std::os::unix::fs::symlink(&cfg.rootfs, &link).map_err(io_err("link", &link))?;
    }
    let pid = match running {
        Some(pid) => pid,
        None => {
            let mut args = vec![
                "--listen".into(),
                loopback(cfg.agent_port).to_string(),
                "--metrics-listen".into(),
                loopback(cfg.agent_metrics_port()).to_string(),
                "--state-root".into(),
                root.display().to_string(),
                "--ctl".into(),
                loopback(cfg.host_port).to_string(),
                "--firecracker".into(),
                cfg.firecracker.display().to_string(),
                "--net-prefix".into(),
                cfg.net_prefix.clone(),
                "--net-subnet".into(),
                cfg.net_subnet.clone(),
                // Jail uids apart from a system agent's (900000 + 4096 and its page-server
                // uid), like the slots.
                "--uid-base".into(),
                super::UP_JAIL_UID_BASE.to_string(),
            ];
            if let Some(k) = &cfg.kernel {
                args.extend(["--kernel".into(), k.display().to_string()]);
            }
            // ctl's host port speaks TLS: the agent trusts the stack's CA.
            let mut env = vec![("WRENN_CTL_CA", l.ca_cert().display().to_string())];
            if !identity.exists() {
                let mut tok = Command::new(ctl);
                tok.args(["admin", "create-registration-token"])
                    .env("WRENN_DATABASE_URL", db_url)
                    // The token carries the CA's SHA-256: the agent pins it.
                    .env("WRENN_TLS_CA_CERT", l.ca_cert());
                let out = run_cmd("wrenn-ctl admin create-registration-token", &mut tok)?;
                let token = out
                    .split_whitespace()
                    .find(|w| w.starts_with("wrr_"))
                    .ok_or_else(|| UpError::Command {
                        what: "wrenn-ctl admin create-registration-token".into(),
                        status: "no token in its output".into(),
                        output: out.clone(),
                    })?;
                // By environment, never on the command line (/proc/*/cmdline).
                env.push(("WRENN_REGISTRATION_TOKEN", token.to_owned()));
            }
            args.extend(cfg.agent_args.iter().cloned());
            spawn_detached(agent, &args, &env, &l.log("agent"), &l.pid("agent"))?
        }
    };
    let metrics = loopback(cfg.agent_metrics_port());
    let mut health = String::new();
    wait_ready("wrenn-agent", pid, &l.log("agent"), || {
        if !identity.exists() {
            return false;
        }
        match http_get(metrics, "/health", &[], Duration::from_secs(2)) {
            Ok((200, body)) => {
                health = body;
                true
            }
            _ => false,
        }
    })?;
    Ok(health)
}
