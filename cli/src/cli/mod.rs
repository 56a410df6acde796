//! `wrenn <group> <command>`: every `wrenn.ctl.v1` call as a subcommand, over framed protobuf
//! to ctl (`WRENN_URL`, default `127.0.0.1:7700`; `WRENN_API_KEY`). Tables for people,
//! `--json` for scripts (the HTTP gateway's JSON mapping, written by hand in [`json`]);
//! `sandbox exec` streams output live and exits with the remote exit code.
//!
//! Exit status: 0 success; 1 an API or I/O error; 2 a usage error; for `sandbox exec` and
//! `process connect` the process's exit code (128 + N when killed by signal N).

pub mod args;
pub mod commands;
pub mod json;
pub mod port;
pub mod table;
pub mod tty;
pub mod usage;

#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic)]
pub mod gen_json;

use std::fmt;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use proto::gen::wrenn::ctl::v1 as pb;
use proto::gen::wrenn::envd::v1 as envd;
use proto::rpc::{CallOpts, Client, ClientConfig, Credential};
use proto::Status;

use args::{parse, usage, ArgError, Command, Parsed};
use json::{render, ToJson};
use table::{bytes, short_enum, time, Table};

/// Default address of ctl's protobuf port.
pub const DEFAULT_URL: &str = "127.0.0.1:7700";
/// Deadline of lifecycle calls (create, pause, resume, destroy, template create): a cold
/// boot on a slow host takes minutes.
pub const LIFECYCLE_DEADLINE: Duration = Duration::from_secs(600);
/// Deadline of every other unary call.
pub const CALL_DEADLINE: Duration = Duration::from_secs(60);
/// Bytes of file data per upload message (the protocol's bulk chunk size).
const CHUNK: usize = proto::limits::CHUNK_LEN;
/// How often transfer progress is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Everything an API subcommand can fail with.
#[derive(Debug)]
pub enum CliError {
    Args(ArgError),
    /// A flag value the API would refuse, caught early.
    Usage(String),
    NoApiKey,
    /// A failed call (or connection).
    Status(Status),
    Io {
        action: String,
        source: io::Error,
    },
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Args(e) => write!(f, "{e}"),
            CliError::Usage(m) => f.write_str(m),
            CliError::NoApiKey => f.write_str("no API key: set WRENN_API_KEY or pass --api-key"),
            CliError::Status(s) => write!(f, "{}: {}", s.code, s.message),
            CliError::Io { action, .. } => f.write_str(action),
        }
    }
}

impl std::error::Error for CliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CliError::Args(e) => Some(e),
            CliError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Status> for CliError {
    fn from(s: Status) -> CliError {
        CliError::Status(s)
    }
}

impl From<ArgError> for CliError {
    fn from(e: ArgError) -> CliError {
        CliError::Args(e)
    }
}

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> CliError {
    let action = action.into();
    move |source| CliError::Io { action, source }
}

/// Whether `group` is an API command group (`main.rs` dispatches those here).
pub fn is_group(group: &str) -> bool {
    commands::groups().contains(&group)
}

/// Lines for the top-level usage.
pub fn groups_usage() -> String {
    let mut s = String::new();
    for g in commands::groups() {
        let verbs: Vec<&str> = commands::COMMANDS
            .iter()
            .filter(|c| c.path.starts_with(&format!("{g} ")))
            .filter_map(|c| c.path.split(' ').nth(1))
            .collect();
        s.push_str(&format!("  {g:<10} {}\n", verbs.join("|")));
    }
    s
}

/// Runs `wrenn <group> ...` (`argv` starts with the group) and returns the exit status.
pub fn run(argv: &[String]) -> u8 {
    let group = argv.first().map(String::as_str).unwrap_or("");
    let verb = argv.get(1).map(String::as_str);
    let cmd = match verb {
        None | Some("-h" | "--help" | "help") => {
            print!("{}", commands::group_usage(group));
            return if verb.is_some() { 0 } else { 2 };
        }
        Some(v) => match commands::lookup(group, v) {
            Some(c) => c,
            None => {
                eprint!(
                    "wrenn: unknown command \"{group} {v}\"\n\n{}",
                    commands::group_usage(group)
                );
                return 2;
            }
        },
    };
    let parsed = match parse(cmd, &argv[2..]) {
        Ok(p) => p,
        Err(ArgError::Help) => {
            print!("{}", usage(cmd));
            return 0;
        }
        Err(e) => {
            eprintln!("wrenn {}: {e}\n(see wrenn {} --help)", cmd.path, cmd.path);
            return 2;
        }
    };
    match execute(cmd, &parsed) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("wrenn {}: {e}", cmd.path);
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            if parsed.flag("json") {
                // Scripts get the HTTP API's error shape on stderr, with its stable code.
                eprintln!("{}", render(&error_json(&e, &msg), false));
            } else {
                eprintln!("{msg}");
            }
            match e {
                CliError::Args(_) | CliError::Usage(_) => 2,
                _ => 1,
            }
        }
    }
}

/// `{"error":{"code":"...","message":"..."}}` for `--json`.
pub fn error_json(e: &CliError, message: &str) -> json::Value {
    let code = match e {
        CliError::Status(s) => s.code.name(),
        CliError::Args(_) | CliError::Usage(_) => "usage",
        CliError::NoApiKey => "unauthenticated",
        CliError::Io { .. } => "io",
    };
    let message = match e {
        CliError::Status(s) => s.message.clone(),
        _ => message.to_owned(),
    };
    let mut inner = json::Map::new();
    inner.insert("code".into(), json::Value::from(code));
    inner.insert("message".into(), json::Value::String(message));
    let mut outer = json::Map::new();
    outer.insert("error".into(), json::Value::Object(inner));
    json::Value::Object(outer)
}

/// Connects to ctl's protobuf port: over TLS trusting the CA certificate file `ca`
/// (`--ca`, `WRENN_CA`), or in plaintext when asked (`--plaintext`, `WRENN_PLAINTEXT=1`).
/// Errors name the flag or variable that fixes them.
pub fn connect_ctl(
    url: &str,
    cred: Credential,
    ca: Option<&str>,
    plaintext: bool,
) -> Result<Client, CliError> {
    let config = ClientConfig {
        name: format!("wrenn-cli/{}", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    };
    let fail = |s: Status, hint: &str| {
        CliError::Status(Status::new(
            s.code,
            format!("connect to ctl at {url}: {}{hint}", s.message),
        ))
    };
    match (ca, plaintext) {
        (Some(_), true) => Err(CliError::Usage(
            "--plaintext and a CA (--ca, WRENN_CA) exclude each other".into(),
        )),
        (None, true) => Client::connect_tcp_with(url, cred, &config).map_err(|s| {
            let hint = if s.message.contains("server speaks TLS") {
                "; drop --plaintext (WRENN_PLAINTEXT) and set WRENN_CA (or --ca) to ctl's CA \
                 certificate"
            } else {
                ""
            };
            fail(s, hint)
        }),
        (Some(ca), false) => {
            let tls = tls::ClientTls::from_ca_file(
                std::path::Path::new(ca),
                tls::ClientOptions {
                    alpn: vec![tls::ALPN_WRENN.to_vec()],
                    ..Default::default()
                },
            )
            .map_err(|e| CliError::Usage(format!("WRENN_CA / --ca: {e}")))?;
            tls::connect(url, &tls, cred, &config).map_err(|s| {
                let hint = if s.message.contains("server does not speak TLS") {
                    "; for a ctl serving --plaintext, pass --plaintext (WRENN_PLAINTEXT=1)"
                } else if s.message.contains("certificate") {
                    "; WRENN_CA (--ca) must be the CA that signed ctl's certificate, and the \
                     address must be a name the certificate carries"
                } else {
                    ""
                };
                fail(s, hint)
            })
        }
        (None, false) => Err(CliError::Usage(
            "ctl speaks TLS: set WRENN_CA (or --ca) to its CA certificate file (`wrenn up` \
             writes it to its env file; `wrenn-ctl admin tls init` makes one), or pass \
             --plaintext (WRENN_PLAINTEXT=1) for a ctl serving --plaintext"
                .into(),
        )),
    }
}

/// Connection settings from flags and the environment.
pub struct Ctx {
    pub client: Client,
    pub json: bool,
    deadline: Option<Duration>,
    /// The methods the running command's table entry names ([`Command::rpcs`]).
    rpcs: &'static [&'static str],
}

impl Ctx {
    fn connect(p: &Parsed, rpcs: &'static [&'static str]) -> Result<Ctx, CliError> {
        let url = p
            .value("url")
            .map(str::to_owned)
            .or_else(|| std::env::var("WRENN_URL").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let key = p
            .value("api-key")
            .map(str::to_owned)
            .or_else(|| {
                std::env::var("WRENN_API_KEY")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .ok_or(CliError::NoApiKey)?;
        let ca = p
            .value("ca")
            .map(str::to_owned)
            .or_else(|| std::env::var("WRENN_CA").ok().filter(|s| !s.is_empty()));
        let plaintext = p.flag("plaintext")
            || std::env::var("WRENN_PLAINTEXT").is_ok_and(|v| v == "1" || v == "true");
        let client = connect_ctl(&url, Credential::api_key(key), ca.as_deref(), plaintext)?;
        let deadline = p.num::<u64>("deadline")?.map(Duration::from_secs);
        Ok(Ctx {
            client,
            json: p.flag("json"),
            deadline,
            rpcs,
        })
    }

    /// A command calls only the methods its table entry names, so the table (checked
    /// against the service descriptors by a test) says what each command reaches.
    fn named(&self, method: &str) {
        debug_assert!(
            self.rpcs.contains(&method),
            "{method} is not among the methods of this command's table entry {:?}",
            self.rpcs
        );
    }

    /// `client.call` of a method the command names.
    fn call<Req: prost::Message>(
        &self,
        method: &str,
        req: &Req,
        opts: CallOpts,
    ) -> Result<proto::rpc::ClientStream, Status> {
        self.named(method);
        self.client.call(method, req, opts)
    }

    fn unary<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        req: &Req,
        lifecycle: bool,
    ) -> Result<Resp, CliError> {
        let d = self.deadline.unwrap_or(if lifecycle {
            LIFECYCLE_DEADLINE
        } else {
            CALL_DEADLINE
        });
        self.named(method);
        Ok(self.client.unary(method, req, Some(d))?)
    }

    fn print<M: ToJson>(&self, m: &M, human: impl FnOnce(&M) -> String) {
        if self.json {
            println!("{}", render(&m.to_json(), true));
        } else {
            print!("{}", human(m));
        }
    }
}

fn network_human(n: Option<&pb::NetworkPolicy>) -> String {
    let Some(n) = n else {
        return "open".into();
    };
    let mut parts = Vec::new();
    if n.allow_internet_access == Some(false) {
        parts.push("no internet".to_owned());
    }
    if !n.deny_out.is_empty() {
        parts.push(format!("deny {}", n.deny_out.join(",")));
    }
    if !n.allow_out.is_empty() {
        parts.push(format!("allow {}", n.allow_out.join(",")));
    }
    if parts.is_empty() {
        "open".into()
    } else {
        parts.join("; ")
    }
}

/// `--no-internet`, `--deny-out`, `--allow-out` as a policy; none given: no policy (open).
fn network_flags(p: &Parsed) -> Option<pb::NetworkPolicy> {
    let deny_out: Vec<String> = p
        .values("deny-out")
        .into_iter()
        .map(str::to_owned)
        .collect();
    let allow_out: Vec<String> = p
        .values("allow-out")
        .into_iter()
        .map(str::to_owned)
        .collect();
    let closed = p.flag("no-internet");
    if !closed && deny_out.is_empty() && allow_out.is_empty() {
        return None;
    }
    Some(pb::NetworkPolicy {
        allow_internet_access: closed.then_some(false),
        deny_out,
        allow_out,
    })
}

fn page_note(token: &str) {
    if !token.is_empty() {
        eprintln!("(more: --page-token {token})");
    }
}

fn kv(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut s = String::new();
    for (k, v) in rows {
        s.push_str(&format!("{k:<w$}  {v}\n"));
    }
    s
}

fn enum_name(v: i32, name: Option<&'static str>, prefix: &str) -> String {
    match name {
        Some(n) => short_enum(n, prefix),
        None => v.to_string(),
    }
}

fn state(v: i32) -> String {
    enum_name(
        v,
        pb::SandboxState::try_from(v).ok().map(|e| e.as_str_name()),
        "SANDBOX_STATE_",
    )
}

fn parse_enum(
    what: &str,
    s: &str,
    prefix: &str,
    by_name: impl Fn(&str) -> Option<i32>,
) -> Result<i32, CliError> {
    let full = format!("{prefix}{}", s.to_ascii_uppercase().replace('-', "_"));
    by_name(&full)
        .or_else(|| by_name(s))
        .filter(|v| *v != 0)
        .ok_or_else(|| CliError::Usage(format!("unknown {what} {s:?}")))
}

fn policy(s: Option<&str>) -> Result<i32, CliError> {
    match s {
        None => Ok(0),
        Some(s) => parse_enum("timeout policy", s, "TIMEOUT_POLICY_", |n| {
            pb::TimeoutPolicy::from_str_name(n).map(|e| e as i32)
        }),
    }
}

fn role(s: Option<&str>) -> Result<i32, CliError> {
    match s {
        None => Ok(0),
        Some(s) => parse_enum("role", s, "TEAM_ROLE_", |n| {
            pb::TeamRole::from_str_name(n).map(|e| e as i32)
        }),
    }
}

fn octal(s: Option<&str>, what: &str) -> Result<Option<u32>, CliError> {
    s.map(|m| {
        u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|v| *v <= 0o7777)
            .ok_or_else(|| CliError::Usage(format!("{what}: {m:?} is not an octal mode")))
    })
    .transpose()
}

fn sandbox_human(s: &pb::Sandbox) -> String {
    let meta: Vec<String> = {
        let mut m: Vec<_> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        m.sort();
        m
    };
    kv(&[
        ("id", s.id.clone()),
        ("state", state(s.state)),
        ("reason", s.state_reason.clone()),
        ("template", s.template_id.clone()),
        ("host", s.host_id.clone()),
        ("vcpus", s.vcpus.to_string()),
        ("memory", format!("{} MiB", s.memory_mib)),
        ("disk", format!("{} MiB", s.disk_mib)),
        (
            "timeout",
            format!(
                "{} s ({})",
                s.timeout_s,
                enum_name(
                    s.on_timeout,
                    pb::TimeoutPolicy::try_from(s.on_timeout)
                        .ok()
                        .map(|e| e.as_str_name()),
                    "TIMEOUT_POLICY_"
                )
            ),
        ),
        ("network", network_human(s.network.as_ref())),
        (
            "ports",
            format!(
                "{}{}",
                if s.allow_public_traffic {
                    "public (no traffic token needed)"
                } else {
                    "traffic token or API key"
                },
                if s.auto_resume {
                    "; a request resumes it when paused"
                } else {
                    ""
                }
            ),
        ),
        ("created", time(s.created_unix_ns)),
        ("expires", time(s.expires_unix_ns)),
        ("metadata", meta.join(" ")),
    ])
}

fn sandboxes_table(list: &[pb::Sandbox]) -> String {
    let mut t = Table::new(&[
        "ID", "STATE", "TEMPLATE", "VCPUS", "MEMORY", "CREATED", "EXPIRES",
    ]);
    for s in list {
        t.row(vec![
            s.id.clone(),
            state(s.state),
            s.template_id.clone(),
            s.vcpus.to_string(),
            format!("{} MiB", s.memory_mib),
            time(s.created_unix_ns),
            time(s.expires_unix_ns),
        ]);
    }
    t.render()
}

fn template_human(t: &pb::Template) -> String {
    kv(&[
        ("id", t.id.clone()),
        ("name", t.name.clone()),
        (
            "kind",
            enum_name(
                t.kind,
                pb::TemplateKind::try_from(t.kind)
                    .ok()
                    .map(|e| e.as_str_name()),
                "TEMPLATE_KIND_",
            ),
        ),
        ("platform", t.platform.to_string()),
        ("vcpus", t.vcpus.to_string()),
        ("memory", format!("{} MiB", t.memory_mib)),
        ("disk", format!("{} MiB", t.disk_mib)),
        ("size", bytes(t.size_bytes)),
        ("host", t.host_id.clone()),
        ("source", t.source_sandbox_id.clone()),
        ("created", time(t.created_unix_ns)),
        ("user", t.default_user.clone()),
        ("workdir", t.default_cwd.clone()),
        ("env", {
            let mut e: Vec<String> = t.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            e.sort();
            e.join(" ")
        }),
    ])
}

fn host_human(h: &pb::Host) -> String {
    let res = |r: &Option<pb::Resources>| {
        r.as_ref()
            .map(|r| {
                format!(
                    "{} vCPU, {} MiB memory, {} MiB disk",
                    r.vcpus, r.memory_mib, r.disk_mib
                )
            })
            .unwrap_or_default()
    };
    kv(&[
        ("id", h.id.clone()),
        ("address", h.address.clone()),
        ("hostname", h.hostname.clone()),
        (
            "status",
            enum_name(
                h.status,
                pb::HostStatus::try_from(h.status)
                    .ok()
                    .map(|e| e.as_str_name()),
                "HOST_STATUS_",
            ),
        ),
        ("capacity", res(&h.capacity)),
        ("physical", res(&h.physical)),
        (
            "overcommit",
            format!(
                "{}x vCPU, {}x memory",
                h.vcpu_overcommit, h.memory_overcommit
            ),
        ),
        ("usage", res(&h.usage)),
        ("sandboxes", h.sandbox_count.to_string()),
        ("can host", h.can_host_sandboxes.to_string()),
        ("problems", h.problems.join("; ")),
        ("agent", h.agent_version.clone()),
        ("firecracker", h.firecracker_version.clone()),
        ("heartbeat", time(h.last_heartbeat_unix_ns)),
        ("created", time(h.created_unix_ns)),
    ])
}

fn entry_row(e: &envd::EntryInfo) -> Vec<String> {
    let ty = enum_name(
        e.r#type,
        envd::FileType::try_from(e.r#type)
            .ok()
            .map(|x| x.as_str_name()),
        "FILE_TYPE_",
    );
    let path = if e.symlink_target.is_empty() {
        e.path.clone()
    } else {
        format!("{} -> {}", e.path, e.symlink_target)
    };
    vec![
        ty,
        format!("{:04o}", e.mode),
        e.owner.clone(),
        e.size.to_string(),
        time(e.modified_unix_ns),
        path,
    ]
}

fn entry_human(e: &envd::EntryInfo) -> String {
    let mut t = Table::new(&["TYPE", "MODE", "OWNER", "SIZE", "MODIFIED", "PATH"]);
    t.row(entry_row(e));
    t.render()
}

fn selector(p: &Parsed) -> Result<envd::ProcessSelector, CliError> {
    use envd::process_selector::Selector;
    let s = match (p.num::<u32>("pid")?, p.value("tag")) {
        (Some(pid), None) => Selector::Pid(pid),
        (None, Some(tag)) => Selector::Tag(tag.to_owned()),
        _ => {
            return Err(CliError::Usage(
                "name the process with exactly one of --pid or --tag".into(),
            ))
        }
    };
    Ok(envd::ProcessSelector { selector: Some(s) })
}

fn signal_number(s: &str) -> Result<i32, CliError> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    envd::Signal::from_str_name(&format!("SIGNAL_SIG{name}"))
        .map(|e| e as i32)
        .ok_or_else(|| CliError::Usage(format!("unknown signal {s:?}")))
}

/// Exit status for a finished process: its code, or 128 + the signal.
pub fn exit_status(e: &envd::ProcessExited) -> u8 {
    use envd::process_exited::Status as S;
    match e.status {
        Some(S::ExitCode(c)) => u8::try_from(c.clamp(0, 255)).unwrap_or(255),
        Some(S::Signal(s)) => u8::try_from((128 + s).clamp(0, 255)).unwrap_or(255),
        None => 1,
    }
}

/// Prints a process's event stream live; returns its exit status.
fn follow(
    ctx: &Ctx,
    stream: &mut proto::rpc::ClientStream,
    mut on_start: impl FnMut(u32),
) -> Result<u8, CliError> {
    use envd::process_event::Event;
    let mut stdout = io::stdout();
    let mut stderr = io::stderr();
    let mut code = None;
    while let Some(ev) = stream.recv::<envd::ProcessEvent>()? {
        if ctx.json {
            let line = render(&ev.to_json(), false);
            writeln!(stdout, "{line}").map_err(io_err("write stdout"))?;
            stdout.flush().map_err(io_err("write stdout"))?;
        }
        match ev.event {
            Some(Event::Started(s)) => on_start(s.pid),
            Some(Event::Output(o)) if !ctx.json => {
                let err = o.stream == envd::OutputStream::Stderr as i32;
                let w: &mut dyn Write = if err { &mut stderr } else { &mut stdout };
                w.write_all(&o.data).map_err(io_err("write output"))?;
                w.flush().map_err(io_err("write output"))?;
            }
            Some(Event::Exited(e)) => code = Some(exit_status(&e)),
            _ => {}
        }
    }
    code.ok_or_else(|| CliError::Status(Status::internal("the stream ended without an exit event")))
}

/// Forwards this program's stdin to a process until EOF, then closes its stdin.
fn pump_stdin(client: Client, sandbox_id: String, pid: u32) {
    let sel = envd::ProcessSelector {
        selector: Some(envd::process_selector::Selector::Pid(pid)),
    };
    let first = pb::SendInputRequest {
        sandbox_id,
        input: Some(envd::SendInputRequest {
            process: Some(sel),
            data: Default::default(),
            close: false,
        }),
    };
    let Ok(mut s) = client.call(
        pb::processes_methods::SEND_INPUT,
        &first,
        CallOpts::default(),
    ) else {
        return;
    };
    let mut buf = vec![0u8; CHUNK];
    let mut stdin = io::stdin();
    loop {
        let n = stdin.read(&mut buf).unwrap_or(0);
        let msg = pb::SendInputRequest {
            sandbox_id: String::new(),
            input: Some(envd::SendInputRequest {
                process: None,
                data: buf[..n].to_vec().into(),
                close: n == 0,
            }),
        };
        if s.send(&msg).is_err() || n == 0 {
            break;
        }
    }
    let _ = s.close_send();
    let _ = s.recv::<envd::SendInputResponse>();
}

/// Resizes the remote PTY whenever the local terminal changes size (until a call fails).
fn forward_resizes(client: Client, sandbox_id: String, pid: u32) {
    while tty::wait_resize().is_ok() {
        let Some((rows, cols)) = tty::window_size(io::stdout().as_fd()) else {
            continue;
        };
        let req = pb::ResizePtyRequest {
            sandbox_id: sandbox_id.clone(),
            resize: Some(envd::ResizePtyRequest {
                process: Some(envd::ProcessSelector {
                    selector: Some(envd::process_selector::Selector::Pid(pid)),
                }),
                size: Some(envd::PtySize {
                    rows: u32::from(rows),
                    cols: u32::from(cols),
                }),
            }),
        };
        let r: Result<envd::ResizePtyResponse, Status> =
            client.unary(pb::processes_methods::RESIZE_PTY, &req, Some(CALL_DEADLINE));
        if r.is_err() {
            return;
        }
    }
}

/// Progress of a transfer on stderr.
struct Progress {
    on: bool,
    total: Option<u64>,
    done: u64,
    last: Instant,
    start: Instant,
}

impl Progress {
    fn new(p: &Parsed, total: Option<u64>) -> Progress {
        let on = p.flag("progress") || (io::stderr().is_terminal() && !p.flag("json"));
        Progress {
            on,
            total,
            done: 0,
            last: Instant::now(),
            start: Instant::now(),
        }
    }
    fn add(&mut self, n: usize) {
        self.done += n as u64;
        if self.on && self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            self.draw(false);
        }
    }
    fn draw(&self, end: bool) {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = bytes((self.done as f64 / secs) as u64);
        let line = match self.total {
            Some(t) if t > 0 => format!(
                "{} / {} ({}%) {rate}/s",
                bytes(self.done),
                bytes(t),
                self.done * 100 / t
            ),
            _ => format!("{} {rate}/s", bytes(self.done)),
        };
        eprint!("\r{line}\x1b[K{}", if end { "\n" } else { "" });
    }
    fn finish(&self) {
        if self.on {
            self.draw(true);
        }
    }
}

/// A list request whose pages can be followed.
trait PagedReq: prost::Message {
    fn set_page_token(&mut self, t: String);
}

/// A list reply: its items are appended page after page.
trait PagedResp: prost::Message + Default {
    fn next_token(&self) -> &str;
    fn absorb(&mut self, next: Self);
}

macro_rules! paged {
    ($($req:ty, $resp:ty, $items:ident;)*) => {$(
        impl PagedReq for $req {
            fn set_page_token(&mut self, t: String) {
                self.page_token = t;
            }
        }
        impl PagedResp for $resp {
            fn next_token(&self) -> &str {
                &self.next_page_token
            }
            fn absorb(&mut self, next: Self) {
                self.$items.extend(next.$items);
                self.next_page_token = next.next_page_token;
            }
        }
    )*};
}

paged! {
    pb::ListSandboxesRequest, pb::ListSandboxesResponse, sandboxes;
    pb::ListTemplatesRequest, pb::ListTemplatesResponse, templates;
    pb::ListApiKeysRequest, pb::ListApiKeysResponse, keys;
    pb::ListMembersRequest, pb::ListMembersResponse, members;
    pb::ListUsersRequest, pb::ListUsersResponse, users;
    pb::ListHostsRequest, pb::ListHostsResponse, hosts;
    pb::ListAuditLogsRequest, pb::ListAuditLogsResponse, entries;
    pb::ListDeliveriesRequest, pb::ListDeliveriesResponse, deliveries;
    pb::ListBuildsRequest, pb::ListBuildsResponse, builds;
}

/// Lists one page, or with `all` every page from the requested one on.
fn list<Req: PagedReq, Resp: PagedResp>(
    ctx: &Ctx,
    method: &str,
    mut req: Req,
    all: bool,
) -> Result<Resp, CliError> {
    let mut out: Resp = ctx.unary(method, &req, false)?;
    // Bounded by the server: each page moves the keyset forward until the token is empty.
    while all && !out.next_token().is_empty() {
        req.set_page_token(out.next_token().to_owned());
        let next: Resp = ctx.unary(method, &req, false)?;
        out.absorb(next);
    }
    Ok(out)
}

fn page(p: &Parsed) -> Result<(u32, String), CliError> {
    Ok((
        p.num::<u32>("page-size")?.unwrap_or(0),
        p.value("page-token").unwrap_or("").to_owned(),
    ))
}

/// Runs a parsed command.
pub fn execute(cmd: &Command, p: &Parsed) -> Result<u8, CliError> {
    use pb::{
        api_keys_methods as keys, audit_logs_methods as audit, files_methods as files,
        hosts_methods as hosts, processes_methods as procs, sandboxes_methods as sb,
        teams_methods as teams, templates_methods as tpl, users_methods as users,
    };
    if cmd.path == "template check" {
        // Local only: no server, no key.
        return usage::check_recipe(p.arg(0).unwrap_or("Wrennfile"));
    }
    let ctx = Ctx::connect(p, cmd.rpcs)?;
    let a = |i: usize| p.arg(i).unwrap_or("").to_owned();
    match cmd.path {
        "sandbox create" => {
            let req = pb::CreateSandboxRequest {
                template: p.value("template").unwrap_or("").to_owned(),
                vcpus: p.num("vcpus")?.unwrap_or(0),
                memory_mib: p.num("memory")?.unwrap_or(0),
                disk_mib: p.num("disk")?.unwrap_or(0),
                timeout_s: p.num("timeout")?.unwrap_or(0),
                on_timeout: policy(p.value("on-timeout"))?,
                metadata: p.pairs("meta")?.into_iter().collect(),
                env: p.pairs("env")?.into_iter().collect(),
                wait: Some(!p.flag("no-wait")),
                network: network_flags(p),
                allow_public_traffic: p.flag("public-traffic"),
                auto_resume: p.flag("auto-resume"),
            };
            let s: pb::Sandbox = ctx.unary(sb::CREATE, &req, true)?;
            ctx.print(&s, sandbox_human);
        }
        "sandbox list" => {
            let (page_size, page_token) = page(p)?;
            let states = p
                .values("state")
                .into_iter()
                .map(|s| {
                    parse_enum("state", s, "SANDBOX_STATE_", |n| {
                        pb::SandboxState::from_str_name(n).map(|e| e as i32)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let req = pb::ListSandboxesRequest {
                states,
                template_id: p.value("template").unwrap_or("").to_owned(),
                metadata: p.pairs("meta")?.into_iter().collect(),
                page_size,
                page_token,
            };
            let r: pb::ListSandboxesResponse = list(&ctx, sb::LIST, req, p.flag("all"))?;
            ctx.print(&r, |r| sandboxes_table(&r.sandboxes));
            if !ctx.json {
                page_note(&r.next_page_token);
            }
        }
        "sandbox get" => {
            let s: pb::Sandbox =
                ctx.unary(sb::GET, &pb::GetSandboxRequest { sandbox_id: a(0) }, false)?;
            ctx.print(&s, sandbox_human);
        }
        "sandbox rm" => {
            let r: pb::DestroySandboxResponse = ctx.unary(
                sb::DESTROY,
                &pb::DestroySandboxRequest {
                    sandbox_id: a(0),
                    force: p.flag("force"),
                },
                true,
            )?;
            ctx.print(&r, |_| format!("destroyed {}\n", a(0)));
        }
        "sandbox pause" => {
            let s: pb::Sandbox = ctx.unary(
                sb::PAUSE,
                &pb::PauseSandboxRequest { sandbox_id: a(0) },
                true,
            )?;
            ctx.print(&s, sandbox_human);
        }
        "sandbox resume" => {
            let req = pb::ResumeSandboxRequest {
                sandbox_id: a(0),
                timeout_s: p.num("timeout")?.unwrap_or(0),
            };
            let s: pb::Sandbox = ctx.unary(sb::RESUME, &req, true)?;
            ctx.print(&s, sandbox_human);
        }
        "sandbox metrics" => {
            let range_s = match p.value("range") {
                Some(r) => usage::parse_range(r).map_err(CliError::Usage)?,
                None => 0,
            };
            let req = pb::SandboxMetricsRequest {
                sandbox_id: a(0),
                range_s,
            };
            loop {
                let r: pb::SandboxMetricsResponse = ctx.unary(sb::METRICS, &req, false)?;
                if p.flag("watch") && !ctx.json && io::stdout().is_terminal() {
                    // Home and clear, then the new picture.
                    print!("\x1b[H\x1b[2J");
                }
                ctx.print(&r, usage::metrics_human);
                let _ = io::stdout().flush();
                if !p.flag("watch") {
                    break;
                }
                std::thread::sleep(Duration::from_secs(u64::from(r.step_s.clamp(2, 30))));
            }
        }
        "sandbox ping" => {
            let s: pb::Sandbox = ctx.unary(
                sb::PING,
                &pb::PingSandboxRequest { sandbox_id: a(0) },
                false,
            )?;
            ctx.print(&s, sandbox_human);
        }
        "sandbox network" => {
            let req = pb::UpdateNetworkRequest {
                sandbox_id: a(0),
                network: network_flags(p),
            };
            let s: pb::Sandbox = ctx.unary(sb::UPDATE_NETWORK, &req, false)?;
            ctx.print(&s, sandbox_human);
        }
        "sandbox traffic-token" => {
            let s: pb::Sandbox = if p.flag("rotate") {
                let req = pb::RotateTrafficTokenRequest { sandbox_id: a(0) };
                ctx.unary(sb::ROTATE_TRAFFIC_TOKEN, &req, false)?
            } else {
                ctx.unary(sb::GET, &pb::GetSandboxRequest { sandbox_id: a(0) }, false)?
            };
            ctx.print(&s, |s| {
                if s.traffic_token.is_empty() {
                    "(no token: created before traffic tokens; run with --rotate)\n".to_owned()
                } else {
                    format!("{}\n", s.traffic_token)
                }
            });
        }
        "sandbox set-timeout" => {
            let secs: u64 = a(1)
                .parse()
                .map_err(|_| CliError::Usage(format!("SECONDS: {:?} is not a number", a(1))))?;
            let req = pb::SetTimeoutRequest {
                sandbox_id: a(0),
                timeout_s: secs,
                on_timeout: policy(p.value("on-timeout"))?,
            };
            let s: pb::Sandbox = ctx.unary(sb::SET_TIMEOUT, &req, false)?;
            ctx.print(&s, sandbox_human);
        }
        "sandbox exec" => {
            let tty = p.flag("tty");
            let stdin_fd = io::stdin();
            let (rows, cols) = if tty {
                tty::window_size(io::stdout().as_fd())
                    .or_else(|| tty::window_size(stdin_fd.as_fd()))
                    .unwrap_or((24, 80))
            } else {
                (0, 0)
            };
            let config = envd::ProcessConfig {
                cmd: p.rest[0].clone(),
                args: p.rest[1..].to_vec(),
                env: p.pairs("env")?.into_iter().collect(),
                cwd: p.value("cwd").unwrap_or("").to_owned(),
                user: p.value("user").unwrap_or("").to_owned(),
                stdin: p.flag("stdin") || tty,
                pty: tty.then_some(envd::PtySize {
                    rows: u32::from(rows),
                    cols: u32::from(cols),
                }),
                tag: p.value("tag").unwrap_or("").to_owned(),
                timeout_ms: p.num("timeout-ms")?.unwrap_or(0),
            };
            if p.flag("background") {
                let req = pb::ExecRequest {
                    sandbox_id: a(0),
                    process: Some(config),
                    background: true,
                    ..Default::default()
                };
                let r: pb::ExecResponse = ctx.unary(procs::EXEC, &req, false)?;
                ctx.print(&r, |r| {
                    format!(
                        "started pid {}{}\n",
                        r.pid,
                        if r.tag.is_empty() {
                            String::new()
                        } else {
                            format!(" tag {}", r.tag)
                        }
                    )
                });
                return Ok(0);
            }
            let with_stdin = config.stdin;
            let req = pb::ExecStreamRequest {
                sandbox_id: a(0),
                process: Some(config),
            };
            let mut s = ctx.call(
                procs::EXEC_STREAM,
                &req,
                CallOpts {
                    timeout: ctx.deadline,
                    end_stream: true,
                },
            )?;
            let client = ctx.client.clone();
            let id = a(0);
            // Raw mode only when stdin is a terminal; restored when `_raw` drops.
            let raw = if tty && stdin_fd.is_terminal() && !ctx.json {
                Some(
                    tty::RawMode::enable(stdin_fd.as_fd())
                        .map_err(io_err("set the terminal to raw mode"))?,
                )
            } else {
                None
            };
            // Window changes follow the local terminal (SIGWINCH, taken by a thread).
            let follow_resizes =
                raw.is_some() && io::stdout().is_terminal() && tty::block_resize_signal().is_ok();
            return follow(&ctx, &mut s, move |pid| {
                if with_stdin {
                    let (c, id) = (client.clone(), id.clone());
                    let _ = std::thread::Builder::new()
                        .name("stdin".into())
                        .spawn(move || pump_stdin(c, id, pid));
                }
                if follow_resizes {
                    let (c, id) = (client.clone(), id.clone());
                    let _ = std::thread::Builder::new()
                        .name("resize".into())
                        .spawn(move || forward_resizes(c, id, pid));
                }
            });
        }
        "process list" => {
            let r: envd::ListProcessesResponse = ctx.unary(
                procs::LIST,
                &pb::ListProcessesRequest { sandbox_id: a(0) },
                false,
            )?;
            ctx.print(&r, |r| {
                let mut t = Table::new(&["PID", "TAG", "STDIN", "STARTED", "COMMAND"]);
                for pr in &r.processes {
                    let c = pr.config.clone().unwrap_or_default();
                    let line = std::iter::once(c.cmd)
                        .chain(c.args)
                        .collect::<Vec<_>>()
                        .join(" ");
                    t.row(vec![
                        pr.pid.to_string(),
                        pr.tag.clone(),
                        if pr.stdin_open {
                            "open".into()
                        } else {
                            "-".into()
                        },
                        time(pr.started_unix_ns),
                        line,
                    ]);
                }
                t.render()
            });
        }
        "process connect" => {
            let req = pb::ConnectRequest {
                sandbox_id: a(0),
                connect: Some(envd::ConnectRequest {
                    process: Some(selector(p)?),
                    skip_replay: p.flag("skip-replay"),
                }),
            };
            let mut s = ctx.call(
                procs::CONNECT,
                &req,
                CallOpts {
                    timeout: ctx.deadline,
                    end_stream: true,
                },
            )?;
            return follow(&ctx, &mut s, |_| {});
        }
        "process kill" => {
            let sig = signal_number(p.value("signal").unwrap_or("TERM"))?;
            let req = pb::SignalRequest {
                sandbox_id: a(0),
                signal: Some(envd::SignalRequest {
                    process: Some(selector(p)?),
                    signal: sig,
                    group: p.flag("group"),
                }),
            };
            let r: envd::SignalResponse = ctx.unary(procs::SIGNAL, &req, false)?;
            ctx.print(&r, |_| format!("sent signal {sig}\n"));
        }
        "process input" => {
            let sel = selector(p)?;
            let data = match p.arg(1) {
                Some(d) => d.as_bytes().to_vec(),
                None => {
                    let mut v = Vec::new();
                    io::stdin()
                        .read_to_end(&mut v)
                        .map_err(io_err("read stdin"))?;
                    v
                }
            };
            let first = pb::SendInputRequest {
                sandbox_id: a(0),
                input: Some(envd::SendInputRequest {
                    process: Some(sel),
                    data: Default::default(),
                    close: false,
                }),
            };
            let d = ctx.deadline.unwrap_or(CALL_DEADLINE);
            let mut s = ctx.call(
                procs::SEND_INPUT,
                &first,
                CallOpts {
                    timeout: Some(d),
                    end_stream: false,
                },
            )?;
            let mut chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
            if chunks.is_empty() {
                chunks.push(&[]);
            }
            let last = chunks.len() - 1;
            for (i, c) in chunks.into_iter().enumerate() {
                let msg = pb::SendInputRequest {
                    sandbox_id: String::new(),
                    input: Some(envd::SendInputRequest {
                        process: None,
                        data: c.to_vec().into(),
                        close: i == last && p.flag("close"),
                    }),
                };
                s.send(&msg)?;
            }
            s.close_send()?;
            let r = s
                .recv::<envd::SendInputResponse>()?
                .ok_or_else(|| Status::internal("no reply"))?;
            ctx.print(&r, |r| format!("wrote {} bytes\n", r.bytes_written));
        }
        "process close-stdin" => {
            let req = pb::CloseStdinRequest {
                sandbox_id: a(0),
                close: Some(envd::CloseStdinRequest {
                    process: Some(selector(p)?),
                }),
            };
            let r: envd::CloseStdinResponse = ctx.unary(procs::CLOSE_STDIN, &req, false)?;
            ctx.print(&r, |_| "stdin closed\n".into());
        }
        "process resize" => {
            let size = envd::PtySize {
                rows: p.num("rows")?.unwrap_or(0),
                cols: p.num("cols")?.unwrap_or(0),
            };
            let req = pb::ResizePtyRequest {
                sandbox_id: a(0),
                resize: Some(envd::ResizePtyRequest {
                    process: Some(selector(p)?),
                    size: Some(size),
                }),
            };
            let r: envd::ResizePtyResponse = ctx.unary(procs::RESIZE_PTY, &req, false)?;
            ctx.print(&r, |_| "resized\n".into());
        }
        "file put" => return file_put(&ctx, p),
        "port forward" => return port::forward(&ctx, p),
        "file get" => return file_get(&ctx, p),
        "file ls" => {
            let req = pb::ListDirRequest {
                sandbox_id: a(0),
                list: Some(envd::ListDirRequest {
                    path: a(1),
                    depth: p.num("depth")?.unwrap_or(0),
                    user: p.value("user").unwrap_or("").to_owned(),
                }),
            };
            let mut s = ctx.call(
                files::LIST,
                &req,
                CallOpts {
                    timeout: Some(ctx.deadline.unwrap_or(CALL_DEADLINE)),
                    end_stream: true,
                },
            )?;
            let mut all = envd::ListDirResponse::default();
            while let Some(batch) = s.recv::<envd::ListDirResponse>()? {
                all.entries.extend(batch.entries);
            }
            ctx.print(&all, |r| {
                let mut t = Table::new(&["TYPE", "MODE", "OWNER", "SIZE", "MODIFIED", "PATH"]);
                for e in &r.entries {
                    match &e.entry {
                        Some(info) if e.error.is_empty() => t.row(entry_row(info)),
                        _ => t.row(vec![
                            "error".into(),
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                            format!("{}: {}", e.path, e.error),
                        ]),
                    }
                }
                t.render()
            });
        }
        "file stat" => {
            let req = pb::StatRequest {
                sandbox_id: a(0),
                stat: Some(envd::StatRequest {
                    path: a(1),
                    user: p.value("user").unwrap_or("").to_owned(),
                    follow_symlinks: p.flag("follow"),
                }),
            };
            let r: envd::StatResponse = ctx.unary(files::STAT, &req, false)?;
            ctx.print(&r, |r| {
                r.entry.as_ref().map(entry_human).unwrap_or_default()
            });
        }
        "file mkdir" => {
            let req = pb::MakeDirRequest {
                sandbox_id: a(0),
                make_dir: Some(envd::MakeDirRequest {
                    path: a(1),
                    mode: octal(p.value("mode"), "--mode")?,
                    user: p.value("user").unwrap_or("").to_owned(),
                }),
            };
            let r: envd::MakeDirResponse = ctx.unary(files::MAKE_DIR, &req, false)?;
            ctx.print(&r, |r| {
                format!(
                    "{} {}\n",
                    if r.created { "created" } else { "exists" },
                    a(1)
                )
            });
        }
        "file mv" => {
            let req = pb::MoveRequest {
                sandbox_id: a(0),
                r#move: Some(envd::MoveRequest {
                    source: a(1),
                    destination: a(2),
                    overwrite: p.flag("overwrite"),
                    user: p.value("user").unwrap_or("").to_owned(),
                }),
            };
            let r: envd::MoveResponse = ctx.unary(files::MOVE, &req, false)?;
            ctx.print(&r, |_| format!("moved {} -> {}\n", a(1), a(2)));
        }
        "file rm" => {
            let req = pb::RemoveRequest {
                sandbox_id: a(0),
                remove: Some(envd::RemoveRequest {
                    path: a(1),
                    recursive: p.flag("recursive"),
                    ignore_missing: p.flag("force"),
                    user: p.value("user").unwrap_or("").to_owned(),
                }),
            };
            let r: envd::RemoveResponse = ctx.unary(files::REMOVE, &req, false)?;
            ctx.print(&r, |_| format!("removed {}\n", a(1)));
        }
        "template create" => {
            let req = pb::CreateTemplateRequest {
                sandbox_id: a(0),
                name: a(1),
                platform: p.flag("platform"),
            };
            let t: pb::Template = ctx.unary(tpl::CREATE, &req, true)?;
            ctx.print(&t, template_human);
        }
        "template list" => {
            let (page_size, page_token) = page(p)?;
            let r: pb::ListTemplatesResponse = list(
                &ctx,
                tpl::LIST,
                pb::ListTemplatesRequest {
                    team_only: p.flag("team-only"),
                    page_size,
                    page_token,
                },
                p.flag("all"),
            )?;
            ctx.print(&r, |r| {
                let mut t = Table::new(&[
                    "ID", "NAME", "KIND", "PLATFORM", "VCPUS", "MEMORY", "SIZE", "CREATED",
                ]);
                for x in &r.templates {
                    t.row(vec![
                        x.id.clone(),
                        x.name.clone(),
                        enum_name(
                            x.kind,
                            pb::TemplateKind::try_from(x.kind)
                                .ok()
                                .map(|e| e.as_str_name()),
                            "TEMPLATE_KIND_",
                        ),
                        x.platform.to_string(),
                        x.vcpus.to_string(),
                        format!("{} MiB", x.memory_mib),
                        bytes(x.size_bytes),
                        time(x.created_unix_ns),
                    ]);
                }
                t.render()
            });
            if !ctx.json {
                page_note(&r.next_page_token);
            }
        }
        "template build" => return build_template(&ctx, p),
        "template attach" => {
            let mut s = ctx.call(
                tpl::ATTACH_BUILD,
                &pb::AttachBuildRequest { build_id: a(0) },
                CallOpts {
                    timeout: ctx.deadline,
                    end_stream: true,
                },
            )?;
            return follow_build(&ctx, &mut s);
        }
        "template builds" => {
            let (page_size, page_token) = page(p)?;
            let r: pb::ListBuildsResponse = list(
                &ctx,
                tpl::LIST_BUILDS,
                pb::ListBuildsRequest {
                    page_size,
                    page_token,
                },
                p.flag("all"),
            )?;
            ctx.print(&r, |r| {
                let mut t = Table::new(&["ID", "NAME", "STATUS", "TEMPLATE", "CREATED", "REASON"]);
                for x in &r.builds {
                    t.row(vec![
                        x.id.clone(),
                        x.name.clone(),
                        build_status(x.status),
                        x.template_id.clone(),
                        time(x.created_unix_ns),
                        x.reason.clone(),
                    ]);
                }
                t.render()
            });
            if !ctx.json {
                page_note(&r.next_page_token);
            }
        }
        "template build-get" => {
            let b: pb::Build = ctx.unary(
                tpl::GET_BUILD,
                &pb::GetBuildRequest { build_id: a(0) },
                false,
            )?;
            ctx.print(&b, build_human);
        }
        "template build-cancel" => {
            let b: pb::Build = ctx.unary(
                tpl::CANCEL_BUILD,
                &pb::CancelBuildRequest { build_id: a(0) },
                false,
            )?;
            ctx.print(&b, build_human);
        }
        "template get" => {
            let t: pb::Template =
                ctx.unary(tpl::GET, &pb::GetTemplateRequest { template: a(0) }, false)?;
            ctx.print(&t, template_human);
        }
        "template rm" => {
            let r: pb::DeleteTemplateResponse = ctx.unary(
                tpl::DELETE,
                &pb::DeleteTemplateRequest { template_id: a(0) },
                true,
            )?;
            ctx.print(&r, |_| format!("deleted {}\n", a(0)));
        }
        "key create" => {
            let r: pb::CreateApiKeyResponse = ctx.unary(
                keys::CREATE,
                &pb::CreateApiKeyRequest {
                    name: a(0),
                    platform_admin: p.flag("admin"),
                },
                false,
            )?;
            ctx.print(&r, |r| {
                let k = r.key.clone().unwrap_or_default();
                format!(
                    "{}key: {}\n(the key is shown only now; export WRENN_API_KEY={})\n",
                    kv(&[("id", k.id), ("name", k.name), ("prefix", k.prefix)]),
                    r.plaintext,
                    r.plaintext
                )
            });
        }
        "key list" => {
            let (page_size, page_token) = page(p)?;
            let r: pb::ListApiKeysResponse = list(
                &ctx,
                keys::LIST,
                pb::ListApiKeysRequest {
                    page_size,
                    page_token,
                },
                p.flag("all"),
            )?;
            ctx.print(&r, |r| {
                let mut t = Table::new(&["ID", "NAME", "PREFIX", "ADMIN", "CREATED", "LAST USED"]);
                for k in &r.keys {
                    t.row(vec![
                        k.id.clone(),
                        k.name.clone(),
                        k.prefix.clone(),
                        k.platform_admin.to_string(),
                        time(k.created_unix_ns),
                        time(k.last_used_unix_ns),
                    ]);
                }
                t.render()
            });
            if !ctx.json {
                page_note(&r.next_page_token);
            }
        }
        "key revoke" => {
            let r: pb::RevokeApiKeyResponse = ctx.unary(
                keys::REVOKE,
                &pb::RevokeApiKeyRequest { key_id: a(0) },
                false,
            )?;
            ctx.print(&r, |_| format!("revoked {}\n", a(0)));
        }
        "team create" => {
            let email = p
                .value("owner-email")
                .ok_or_else(|| CliError::Usage("team create needs --owner-email EMAIL".into()))?;
            let r: pb::CreateTeamResponse = ctx.unary(
                teams::CREATE,
                &pb::CreateTeamRequest {
                    name: a(0),
                    owner_email: email.to_owned(),
                    owner_name: p.value("owner-name").unwrap_or("").to_owned(),
                },
                false,
            )?;
            ctx.print(&r, |r| {
                kv(&[
                    (
                        "team",
                        r.team.as_ref().map(|t| t.id.clone()).unwrap_or_default(),
                    ),
                    (
                        "owner",
                        r.owner.as_ref().map(|u| u.id.clone()).unwrap_or_default(),
                    ),
                    ("api key", r.key_plaintext.clone()),
                    ("note", "the key is shown once; store it now".into()),
                ])
            });
        }
        "team get" => {
            let t: pb::Team =
                ctx.unary(teams::GET, &pb::GetTeamRequest { team_id: a(0) }, false)?;
            ctx.print(&t, |t| {
                kv(&[
                    ("id", t.id.clone()),
                    ("name", t.name.clone()),
                    ("platform", t.platform.to_string()),
                    ("created", time(t.created_unix_ns)),
                ])
            });
        }
        "team usage" => {
            let r: pb::TeamUsageResponse = ctx.unary(
                teams::USAGE,
                &pb::TeamUsageRequest {
                    team_id: a(0),
                    days: p.num("days")?.unwrap_or(0),
                },
                false,
            )?;
            ctx.print(&r, usage::usage_human);
        }
        "webhook create" => {
            let r: pb::CreateWebhookResponse = ctx.unary(
                pb::webhooks_methods::CREATE,
                &pb::CreateWebhookRequest {
                    url: a(0),
                    events: p.values("event").into_iter().map(str::to_owned).collect(),
                },
                false,
            )?;
            ctx.print(&r, usage::webhook_created_human);
        }
        "webhook list" => {
            let r: pb::ListWebhooksResponse = ctx.unary(
                pb::webhooks_methods::LIST,
                &pb::ListWebhooksRequest {},
                false,
            )?;
            ctx.print(&r, |r| usage::webhooks_table(&r.webhooks));
        }
        "webhook rm" => {
            let r: pb::DeleteWebhookResponse = ctx.unary(
                pb::webhooks_methods::DELETE,
                &pb::DeleteWebhookRequest { webhook_id: a(0) },
                false,
            )?;
            ctx.print(&r, |_| format!("removed {}\n", a(0)));
        }
        "webhook deliveries" => {
            let (page_size, page_token) = page(p)?;
            let r: pb::ListDeliveriesResponse = list(
                &ctx,
                pb::webhooks_methods::DELIVERIES,
                pb::ListDeliveriesRequest {
                    webhook_id: a(0),
                    page_size,
                    page_token,
                },
                p.flag("all"),
            )?;
            ctx.print(&r, |r| usage::deliveries_table(&r.deliveries));
            if !ctx.json {
                page_note(&r.next_page_token);
            }
        }
        "team members" => {
            let (page_size, page_token) = page(p)?;
            let r: pb::ListMembersResponse = list(
                &ctx,
                teams::LIST_MEMBERS,
                pb::ListMembersRequest {
                    team_id: a(0),
                    page_size,
                    page_token,
                },
                p.flag("all"),
            )?;
            ctx.print(&r, |r| {
                let mut t = Table::new(&["USER", "EMAIL", "NAME", "ROLE", "ADDED"]);
                for m in &r.members {
                    let u = m.user.clone().unwrap_or_default();
                    t.row(vec![
                        u.id,
                        u.email,
                        u.name,
                        enum_name(
                            m.role,
                            pb::TeamRole::try_from(m.role).ok().map(|e| e.as_str_name()),
                            "TEAM_ROLE_",
                        ),
                        time(m.added_unix_ns),
                    ]);
                }
                t.render()
            });
            if !ctx.json {
                page_note(&r.next_page_token);
            }
        }
        "team add-member" => {
            let req = pb::AddMemberRequest {
                team_id: p.value("team").unwrap_or("").to_owned(),
                user_id: a(0),
                role: role(p.value("role"))?,
            };
            let m: pb::Member = ctx.unary(teams::ADD_MEMBER, &req, false)?;
            ctx.print(&m, |m| {
                format!(
                    "added {} as {}\n",
                    a(0),
                    enum_name(
                        m.role,
                        pb::TeamRole::try_from(m.role).ok().map(|e| e.as_str_name()),
                        "TEAM_ROLE_"
                    )
                )
            });
        }
        "team remove-member" => {
            let req = pb::RemoveMemberRequest {
                team_id: p.value("team").unwrap_or("").to_owned(),
                user_id: a(0),
            };
            let r: pb::RemoveMemberResponse = ctx.unary(teams::REMOVE_MEMBER, &req, false)?;
            ctx.print(&r, |_| format!("removed {}\n", a(0)));
        }
        "user create" => {
            let req = pb::CreateUserRequest {
                email: a(0),
                name: p.value("name").unwrap_or("").to_owned(),
                role: role(p.value("role"))?,
            };
            let u: pb::User = ctx.unary(users::CREATE, &req, false)?;
            ctx.print(&u, user_human);
        }
        "user list" => {
            let (page_size, page_token) = page(p)?;
            let r: pb::ListUsersResponse = list(
                &ctx,
                users::LIST,
                pb::ListUsersRequest {
                    page_size,
                    page_token,
                },
                p.flag("all"),
            )?;
            ctx.print(&r, |r| {
                let mut t = Table::new(&["ID", "EMAIL", "NAME", "CREATED"]);
                for u in &r.users {
                    t.row(vec![
                        u.id.clone(),
                        u.email.clone(),
                        u.name.clone(),
                        time(u.created_unix_ns),
                    ]);
                }
                t.render()
            });
            if !ctx.json {
                page_note(&r.next_page_token);
            }
        }
        "user get" => {
            let u: pb::User =
                ctx.unary(users::GET, &pb::GetUserRequest { user_id: a(0) }, false)?;
            ctx.print(&u, user_human);
        }
        "host token" => {
            let r: pb::CreateRegistrationTokenResponse = ctx.unary(
                hosts::CREATE_REGISTRATION_TOKEN,
                &pb::CreateRegistrationTokenRequest {
                    ttl_s: p.num("ttl")?.unwrap_or(0),
                },
                false,
            )?;
            ctx.print(&r, |r| {
                format!("token: {}\nexpires: {}\n", r.token, time(r.expires_unix_ns))
            });
        }
        "host list" => {
            let (page_size, page_token) = page(p)?;
            let statuses = p
                .values("status")
                .into_iter()
                .map(|s| {
                    parse_enum("status", s, "HOST_STATUS_", |n| {
                        pb::HostStatus::from_str_name(n).map(|e| e as i32)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let r: pb::ListHostsResponse = list(
                &ctx,
                hosts::LIST,
                pb::ListHostsRequest {
                    statuses,
                    page_size,
                    page_token,
                },
                p.flag("all"),
            )?;
            ctx.print(&r, |r| {
                let mut t = Table::new(&[
                    "ID",
                    "HOSTNAME",
                    "ADDRESS",
                    "STATUS",
                    "SANDBOXES",
                    "CAN HOST",
                    "HEARTBEAT",
                ]);
                for h in &r.hosts {
                    t.row(vec![
                        h.id.clone(),
                        h.hostname.clone(),
                        h.address.clone(),
                        enum_name(
                            h.status,
                            pb::HostStatus::try_from(h.status)
                                .ok()
                                .map(|e| e.as_str_name()),
                            "HOST_STATUS_",
                        ),
                        h.sandbox_count.to_string(),
                        h.can_host_sandboxes.to_string(),
                        time(h.last_heartbeat_unix_ns),
                    ]);
                }
                t.render()
            });
            if !ctx.json {
                page_note(&r.next_page_token);
            }
        }
        "host get" => {
            let h: pb::Host =
                ctx.unary(hosts::GET, &pb::GetHostRequest { host_id: a(0) }, false)?;
            ctx.print(&h, host_human);
        }
        "host drain" => {
            let r: pb::DrainHostResponse =
                ctx.unary(hosts::DRAIN, &pb::DrainHostRequest { host_id: a(0) }, false)?;
            ctx.print(&r, |r| {
                let mut s = r.host.as_ref().map(host_human).unwrap_or_default();
                s.push_str(&format!(
                    "remaining sandboxes: {}\n",
                    if r.remaining_sandbox_ids.is_empty() {
                        "none".into()
                    } else {
                        r.remaining_sandbox_ids.join(" ")
                    }
                ));
                s
            });
        }
        "host rm" => {
            let r: pb::DeleteHostResponse = ctx.unary(
                hosts::DELETE,
                &pb::DeleteHostRequest {
                    host_id: a(0),
                    force: p.flag("force"),
                },
                false,
            )?;
            ctx.print(&r, |r| {
                let mut s = format!("deleted {}\n", a(0));
                for sb in &r.stopped_sandbox_ids {
                    s.push_str(&format!("recorded stopped: {sb}\n"));
                }
                for t in &r.deleted_template_ids {
                    s.push_str(&format!("template deleted: {t}\n"));
                }
                s
            });
        }
        "host undrain" => {
            let h: pb::Host = ctx.unary(
                hosts::UNDRAIN,
                &pb::UndrainHostRequest { host_id: a(0) },
                false,
            )?;
            ctx.print(&h, host_human);
        }
        "audit list" => {
            let (page_size, page_token) = page(p)?;
            let req = pb::ListAuditLogsRequest {
                actor_id: p.value("actor").unwrap_or("").to_owned(),
                resource_type: p.value("resource-type").unwrap_or("").to_owned(),
                resource_id: p.value("resource").unwrap_or("").to_owned(),
                action: p.value("action").unwrap_or("").to_owned(),
                since_unix_ns: p.num("since")?.unwrap_or(0),
                until_unix_ns: p.num("until")?.unwrap_or(0),
                page_size,
                page_token,
            };
            let r: pb::ListAuditLogsResponse = list(&ctx, audit::LIST, req, p.flag("all"))?;
            ctx.print(&r, |r| {
                let mut t = Table::new(&["TIME", "ACTOR", "ACTION", "RESOURCE", "STATUS"]);
                for e in &r.entries {
                    let actor = if e.actor_name.is_empty() {
                        e.actor_id.clone()
                    } else {
                        format!("{} ({})", e.actor_name, e.actor_id)
                    };
                    t.row(vec![
                        time(e.created_unix_ns),
                        actor,
                        e.action.clone(),
                        e.resource_id.clone(),
                        e.status.clone(),
                    ]);
                }
                t.render()
            });
            if !ctx.json {
                page_note(&r.next_page_token);
            }
        }
        other => return Err(CliError::Usage(format!("no implementation for {other:?}"))),
    }
    Ok(0)
}

fn user_human(u: &pb::User) -> String {
    kv(&[
        ("id", u.id.clone()),
        ("email", u.email.clone()),
        ("name", u.name.clone()),
        ("created", time(u.created_unix_ns)),
    ])
}

fn file_put(ctx: &Ctx, p: &Parsed) -> Result<u8, CliError> {
    let local = p.arg(1).unwrap_or("");
    let mut input: Box<dyn Read> = if local == "-" {
        Box::new(io::stdin())
    } else {
        Box::new(File::open(local).map_err(io_err(format!("open {local}")))?)
    };
    let total = if local == "-" {
        None
    } else {
        std::fs::metadata(local).ok().map(|m| m.len())
    };
    let header = pb::UploadHeader {
        sandbox_id: p.arg(0).unwrap_or("").to_owned(),
        file: Some(envd::WriteHeader {
            path: p.arg(2).unwrap_or("").to_owned(),
            user: p.value("user").unwrap_or("").to_owned(),
            mode: octal(p.value("mode"), "--mode")?,
            truncate: true,
            // A temporary file renamed into place once envd checked the checksum: a failed
            // or corrupted upload leaves the path as it was.
            atomic: !p.flag("in-place"),
            make_parents: p.flag("parents"),
            ..Default::default()
        }),
    };
    let first = pb::UploadRequest {
        msg: Some(pb::upload_request::Msg::Header(header)),
    };
    let mut s = ctx.call(
        pb::files_methods::UPLOAD,
        &first,
        CallOpts {
            timeout: ctx.deadline,
            end_stream: false,
        },
    )?;
    let mut progress = Progress::new(p, total);
    let mut buf = vec![0u8; CHUNK];
    let mut crc = crc32fast::Hasher::new();
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                s.cancel();
                return Err(CliError::Io {
                    action: format!("read {local}"),
                    source: e,
                });
            }
        };
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        s.send(&pb::UploadRequest {
            msg: Some(pb::upload_request::Msg::Data(buf[..n].to_vec().into())),
        })?;
        progress.add(n);
    }
    // The end-to-end checksum: envd compares it with what it received and stored.
    s.send(&pb::UploadRequest {
        msg: Some(pb::upload_request::Msg::Crc32(crc.finalize())),
    })?;
    s.close_send()?;
    let r = s
        .recv::<envd::WriteResponse>()?
        .ok_or_else(|| Status::internal("no reply to the upload"))?;
    progress.finish();
    ctx.print(&r, |r| {
        format!(
            "wrote {} ({} bytes)\n",
            r.entry.as_ref().map(|e| e.path.clone()).unwrap_or_default(),
            r.bytes_written
        )
    });
    Ok(0)
}

/// A download's temporary file, removed on drop unless committed (renamed into place).
struct Partial {
    path: std::path::PathBuf,
    target: std::path::PathBuf,
    done: bool,
}

impl Partial {
    fn new(target: &str) -> Partial {
        let target = std::path::PathBuf::from(target);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = target.with_file_name(format!(".{name}.wrenn-partial-{}", std::process::id()));
        Partial {
            path,
            target,
            done: false,
        }
    }

    fn commit(mut self) -> Result<(), CliError> {
        std::fs::rename(&self.path, &self.target)
            .map_err(io_err(format!("rename into {}", self.target.display())))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_get(ctx: &Ctx, p: &Parsed) -> Result<u8, CliError> {
    let local = p.arg(2).unwrap_or("");
    let req = pb::DownloadRequest {
        sandbox_id: p.arg(0).unwrap_or("").to_owned(),
        read: Some(envd::ReadRequest {
            path: p.arg(1).unwrap_or("").to_owned(),
            offset: p.num("offset")?.unwrap_or(0),
            length: p.num("length")?.unwrap_or(0),
            user: p.value("user").unwrap_or("").to_owned(),
        }),
    };
    let mut s = ctx.call(
        pb::files_methods::DOWNLOAD,
        &req,
        CallOpts {
            timeout: ctx.deadline,
            end_stream: true,
        },
    )?;
    // Open the destination only once the file is known to exist (first message), as a
    // temporary file beside it renamed over it at the end: a failed download leaves no
    // truncated file behind and an existing one untouched.
    let mut partial: Option<Partial> = None;
    let mut out: Option<Box<dyn Write>> = None;
    let mut progress: Option<Progress> = None;
    let mut written = 0u64;
    let mut crc = crc32fast::Hasher::new();
    let mut checked = false;
    while let Some(m) = s.recv::<envd::ReadResponse>()? {
        if let Some(want) = m.crc32 {
            // envd's checksum of every byte it sent, after the last one.
            let got = crc.clone().finalize();
            if got != want {
                return Err(Status::new(
                    proto::Code::DataLoss,
                    format!(
                        "download checksum mismatch: the {written} bytes received have \
                         CRC-32 {got:08x}, the sandbox sent {want:08x}{}",
                        if local == "-" {
                            ""
                        } else {
                            "; nothing was written"
                        }
                    ),
                )
                .into());
            }
            checked = true;
        }
        crc.update(&m.data);
        if out.is_none() {
            let total = m.entry.as_ref().map(|e| {
                e.size
                    .saturating_sub(req.read.as_ref().map_or(0, |r| r.offset))
            });
            progress = Some(Progress::new(p, total));
            out = Some(if local == "-" {
                Box::new(io::stdout())
            } else {
                let tmp = Partial::new(local);
                let f = File::create(&tmp.path)
                    .map_err(io_err(format!("create {}", tmp.path.display())))?;
                partial = Some(tmp);
                Box::new(io::BufWriter::new(f))
            });
        }
        if let Some(w) = out.as_mut() {
            w.write_all(&m.data)
                .map_err(io_err(format!("write {local}")))?;
        }
        written += m.data.len() as u64;
        if let Some(pr) = progress.as_mut() {
            pr.add(m.data.len());
        }
    }
    if let Some(mut w) = out {
        w.flush().map_err(io_err(format!("write {local}")))?;
    }
    if !checked {
        eprintln!("warning: the sandbox's envd sent no checksum (an older version): not verified");
    }
    match partial {
        Some(tmp) => tmp.commit()?,
        // An empty stream: an empty file.
        None if local != "-" => {
            File::create(local).map_err(io_err(format!("create {local}")))?;
        }
        None => {}
    }
    if let Some(pr) = progress {
        pr.finish();
    }
    if local != "-" && !ctx.json {
        eprintln!("read {written} bytes into {local}");
    } else if ctx.json && local != "-" {
        println!(
            "{{\"bytes_read\":\"{written}\",\"path\":{}}}",
            render(&json::Value::String(local.to_owned()), false)
        );
    }
    Ok(0)
}

fn build_status(s: i32) -> String {
    enum_name(
        s,
        pb::BuildStatus::try_from(s).ok().map(|e| e.as_str_name()),
        "BUILD_STATUS_",
    )
}

fn build_human(b: &pb::Build) -> String {
    let mut out = format!("{} {} {}", b.id, b.name, build_status(b.status));
    if !b.template_id.is_empty() {
        out.push_str(&format!(" -> {}", b.template_id));
    }
    if !b.reason.is_empty() {
        out.push_str(&format!(": {}", b.reason));
    }
    out.push('\n');
    for st in &b.steps {
        let code = st
            .exit_code
            .map(|c| format!(" (exit {c})"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {:>3}. line {}: {} [{}{code}]\n",
            st.n + 1,
            st.line,
            st.instruction,
            st.status
        ));
    }
    out
}

/// Files of the context that the recipe's COPY sources name (all of DIR for a source
/// "."), as (relative path, full path, mode), in a stable order.
fn context_files(
    dir: &std::path::Path,
    recipe: &proto::recipe::Recipe,
) -> Result<Vec<(String, std::path::PathBuf, u32)>, CliError> {
    use std::os::unix::fs::PermissionsExt;
    let sources: Vec<String> = recipe
        .steps
        .iter()
        .flat_map(|s| match s {
            proto::recipe::Step::Copy { sources, .. } => sources.clone(),
            _ => Vec::new(),
        })
        .map(|s| s.trim_end_matches('/').to_owned())
        .collect();
    let wanted = |rel: &str| {
        sources
            .iter()
            .any(|s| s == "." || s.is_empty() || rel == s || rel.starts_with(&format!("{s}/")))
    };
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let rd = std::fs::read_dir(&path).map_err(io_err(&format!("read {}", path.display())))?;
        for e in rd {
            let e = e.map_err(io_err(&format!("read {}", path.display())))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            // Symlinks are not followed (they could leave DIR).
            let md = std::fs::symlink_metadata(e.path())
                .map_err(io_err(&format!("stat {}", e.path().display())))?;
            if md.is_dir() {
                stack.push((e.path(), r));
            } else if md.is_file() && wanted(&r) {
                out.push((r, e.path(), md.permissions().mode() & 0o7777));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `wrenn template build`: header, context, then the events until the build ends.
fn build_template(ctx: &Ctx, p: &Parsed) -> Result<u8, CliError> {
    let dir = std::path::PathBuf::from(p.arg(0).unwrap_or("."));
    let file = p
        .value("file")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.join("Wrennfile"));
    let mut bytes = Vec::new();
    std::fs::File::open(&file)
        .and_then(|f| {
            f.take(proto::recipe::RECIPE_LEN_MAX as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(io_err(&format!("read {}", file.display())))?;
    let recipe = match proto::recipe::parse(&bytes) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}:{}:{}: {}", file.display(), e.line, e.column, e.kind);
            return Ok(1);
        }
    };
    let name = match p.value("name") {
        Some(n) => n.to_owned(),
        None => std::fs::canonicalize(&dir)
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| CliError::Usage("--name is needed (DIR has no name)".into()))?,
    };
    let files = context_files(&dir, &recipe)?;
    let mut s = ctx.call(
        pb::templates_methods::BUILD,
        &pb::BuildRequest {
            msg: Some(pb::build_request::Msg::Header(pb::BuildHeader {
                recipe: String::from_utf8_lossy(&bytes).into_owned(),
                name,
            })),
        },
        CallOpts {
            timeout: ctx.deadline,
            end_stream: false,
        },
    )?;
    // The context; a send fails when the server ended the call early (its answer says why).
    let chunk = proto::limits::CHUNK_LEN.min(s.max_message_len().saturating_sub(4096).max(1));
    let mut buf = vec![0u8; chunk];
    'files: for (rel, path, mode) in &files {
        let mut f =
            std::fs::File::open(path).map_err(io_err(&format!("read {}", path.display())))?;
        let mut first = true;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(io_err(&format!("read {}", path.display())))?;
            if n == 0 && !first {
                break;
            }
            first = false;
            let m = pb::BuildRequest {
                msg: Some(pb::build_request::Msg::Context(pb::BuildContextChunk {
                    path: rel.clone(),
                    mode: *mode,
                    data: buf[..n].to_vec().into(),
                })),
            };
            if s.send(&m).is_err() {
                break 'files;
            }
            if n == 0 {
                break;
            }
        }
    }
    let _ = s.close_send();
    follow_build(ctx, &mut s)
}

/// Prints a build's events until it ends; 0 when it succeeded, else 1.
fn follow_build(ctx: &Ctx, s: &mut proto::rpc::ClientStream) -> Result<u8, CliError> {
    use pb::build_event::Event;
    let mut out = io::stdout();
    let mut code = 1;
    while let Some(e) = s.recv::<pb::BuildEvent>()? {
        if ctx.json {
            println!("{}", render(&e.to_json(), false));
        }
        match e.event {
            Some(Event::BuildId(id)) if !ctx.json => eprintln!("build {id}"),
            Some(Event::StepStarted(st)) if !ctx.json => {
                let _ = writeln!(
                    out,
                    "==> step {} (line {}): {}",
                    st.n + 1,
                    st.line,
                    st.instruction
                );
            }
            Some(Event::Output(o)) if !ctx.json => {
                let _ = out.write_all(&o.data);
                let _ = out.flush();
            }
            Some(Event::StepFinished(f)) if !ctx.json && !f.ok => {
                let _ = writeln!(
                    out,
                    "==> step {} failed: exit code {}",
                    f.n + 1,
                    f.exit_code
                );
            }
            Some(Event::Finished(b)) => {
                if b.status == pb::BuildStatus::Succeeded as i32 {
                    code = 0;
                }
                if !ctx.json {
                    let _ = out.flush();
                    if code == 0 {
                        println!("built {} ({})", b.template_id, b.name);
                    } else {
                        eprintln!("build {} {}: {}", b.id, build_status(b.status), b.reason);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_downloads_vanish_unless_committed() {
        let dir = std::env::temp_dir().join(format!("wrenn-partial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("out.bin");
        std::fs::write(&target, b"old").unwrap();
        {
            let p = Partial::new(target.to_str().unwrap());
            std::fs::write(&p.path, b"half").unwrap();
            assert!(p.path.starts_with(&dir) && p.path != target);
        }
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"old",
            "failed download leaves the old file"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "temporary removed"
        );
        let p = Partial::new(target.to_str().unwrap());
        std::fs::write(&p.path, b"new").unwrap();
        p.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_errors_carry_stable_codes() {
        let e = CliError::Status(Status::not_found("no such sandbox"));
        assert_eq!(
            render(&error_json(&e, "ignored"), false),
            r#"{"error":{"code":"not_found","message":"no such sandbox"}}"#
        );
        let e = CliError::Usage("bad".into());
        assert_eq!(
            render(&error_json(&e, "wrenn x: bad"), false),
            r#"{"error":{"code":"usage","message":"wrenn x: bad"}}"#
        );
    }

    #[test]
    fn exit_status_of_codes_and_signals() {
        use envd::process_exited::Status as S;
        let e = |s| envd::ProcessExited {
            status: Some(s),
            ..Default::default()
        };
        assert_eq!(exit_status(&e(S::ExitCode(0))), 0);
        assert_eq!(exit_status(&e(S::ExitCode(42))), 42);
        assert_eq!(exit_status(&e(S::ExitCode(300))), 255);
        assert_eq!(exit_status(&e(S::Signal(9))), 137);
        assert_eq!(exit_status(&envd::ProcessExited::default()), 1);
    }

    #[test]
    fn enum_and_value_parsers() {
        assert_eq!(
            policy(Some("pause")).unwrap(),
            pb::TimeoutPolicy::Pause as i32
        );
        assert_eq!(
            policy(Some("TIMEOUT_POLICY_DESTROY")).unwrap(),
            pb::TimeoutPolicy::Destroy as i32
        );
        assert!(policy(Some("unspecified")).is_err());
        assert!(policy(Some("nap")).is_err());
        assert_eq!(role(Some("admin")).unwrap(), pb::TeamRole::Admin as i32);
        assert_eq!(signal_number("kill").unwrap(), 9);
        assert_eq!(signal_number("SIGTERM").unwrap(), 15);
        assert_eq!(signal_number("12").unwrap(), 12);
        assert!(signal_number("0").is_err() && signal_number("FOO").is_err());
        assert_eq!(octal(Some("644"), "m").unwrap(), Some(0o644));
        assert_eq!(octal(Some("0o755"), "m").unwrap(), Some(0o755));
        assert!(octal(Some("9"), "m").is_err() && octal(Some("77777"), "m").is_err());
    }

    #[test]
    fn human_renderings() {
        let mut s = pb::Sandbox {
            id: "sb-1".into(),
            state: pb::SandboxState::Running as i32,
            memory_mib: 512,
            ..Default::default()
        };
        s.metadata.insert("b".into(), "2".into());
        s.metadata.insert("a".into(), "1".into());
        let h = sandbox_human(&s);
        assert!(h.contains("state     running\n"), "{h}");
        assert!(h.contains("metadata  a=1 b=2\n"), "{h}");
        let t = sandboxes_table(&[s]);
        assert!(
            t.starts_with("ID    STATE    TEMPLATE  VCPUS  MEMORY   CREATED  EXPIRES\n"),
            "{t}"
        );
        assert!(
            t.contains("sb-1  running            0      512 MiB  -        -\n"),
            "{t}"
        );
        let e = envd::EntryInfo {
            path: "/l".into(),
            r#type: 3,
            mode: 0o777,
            symlink_target: "/t".into(),
            ..Default::default()
        };
        assert_eq!(entry_row(&e)[0], "symlink");
        assert_eq!(entry_row(&e)[5], "/l -> /t");
        assert!(groups_usage().contains(
            "  sandbox    create|list|get|rm|pause|resume|metrics|ping|network|traffic-token|set-timeout|exec\n"
        ));
    }
}
