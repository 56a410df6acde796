//! The whole stack on real Firecracker: PostgreSQL (the testkit's throwaway cluster), the
//! `wrenn-ctl` binary, and a real `wrenn-agent` binary (jailed Firecracker) that registers
//! with it. Needs root, /dev/kvm, `WRENN_FIRECRACKER`, `WRENN_KERNEL`, `WRENN_ROOTFS`,
//! PostgreSQL, and the agent binary (`target/<profile>/wrenn-agent`: `cargo build -p agent`);
//! else `skipped` (a failure under `WRENN_REQUIRE_E2E=1`).
//!
//! Optional: `WRENN_JAILER` (unset: `--unjailed`, said visibly), `WRENN_UFFD_BIN`,
//! `WRENN_BOOT_ARGS`, `WRENN_STACK_ROOT` (the agent's state root, default
//! /var/tmp/wrenn-stack; its base snapshot template is kept there between runs),
//! `WRENN_STACK_BASE_TEMPLATE` (a snapshot template directory of another agent, e.g. the
//! agent e2e's cached one, imported as the base instead of a cold boot, which takes minutes
//! on nested KVM). ctl learns of the base with `wrenn-ctl admin adopt-template`.
//! `WRENN_STACK_NO_GUEST=1`: the build and proxy tests only start the stack (registration,
//! adoption) and boot no guest, for checking the wiring while another run holds the guest lock.
//!
//! - [`stack_template_build_on_firecracker`] (issue 17 §1): `Templates/Build` of a recipe
//!   that copies files from the context, runs commands, sets ENV/WORKDIR/USER, STARTs a
//!   server and HEALTHCHECKs it; a sandbox from the result answers on that server, has the
//!   files, and runs its processes as that user in that directory with that environment.
//! - [`stack_proxy_to_guest_server`] (issue 16's "a real guest behind the proxy"): a
//!   sandbox from the base template runs a stdlib-only Python server ([`SERVE_PY`]) reached
//!   only through ctl's HTTP listener (plaintext here, as the other ports; traffic domain
//!   `stack.test`) → the agent's `Ports.Connect` → the guest's port 8080 inside the slot:
//!   502 until it listens, then host form `8080-<sb>.stack.test` and path form
//!   `/v1/sandboxes/<sb>/ports/8080/...` with the traffic token (200, the guest's file from
//!   its Python), without a token (401) and with a wrong one (403) in both forms, envd's port
//!   49983 (403), a port nothing listens on (502), a streamed 4 MiB `POST` whose length and
//!   SHA-256 the guest computes, two requests on one kept-alive connection, and a WebSocket
//!   (RFC 6455 accept value checked) echoing a text and a binary frame and answering a
//!   close. Every check runs and prints its time; the failures are listed at the end. Before
//!   any guest (also under `WRENN_STACK_NO_GUEST=1`): an unknown sandbox is 404. After the
//!   checks, the same GET and upload straight from the slot's namespace are timed (printed,
//!   not checked) to tell the proxy's share from the guest's. The 100 MiB
//!   upload, chunked answers, slow readers, budgets, 409 for a paused sandbox and TLS are
//!   CI's, against a server standing in for the guest (proxy.rs).
//! - [`stack_guest_server_on_the_host`]: the guest's script and the checks' client side on
//!   the host's `python3` (skipped without one), so the script is tested everywhere.
//! - [`stack_create_latency`] (issue 15 §1, opt-in with `WRENN_STACK_LATENCY=1`): creates
//!   from the base template through ctl's API, 1, 4 and 10 at once (`WRENN_STACK_LEVELS`),
//!   `WRENN_STACK_ROUNDS` rounds per level (default 20; one number, or one per level), each
//!   to its first exec answered
//!   (envd's own `--version`, a static binary); p50 and max, with the agent's phases.
//! - [`stack_mmds_identity`] (issue 15 §4): a sandbox created with metadata labels reads
//!   Firecracker's MMDS from the guest (one exec of a bash script, [`MMDS_SH`]): V2 (401
//!   without a token and with a wrong one), and `/wrenn` is exactly its id, its template's id
//!   and its labels. [`stack_mmds_script_on_the_host`] runs the script against a stand-in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::gen::wrenn::ctl::v1 as c;
use proto::gen::wrenn::envd::v1 as envd;
use proto::rpc::{CallOpts, Client, Credential};

use crate::harness::{fresh_db, skip};

const CTL_BIN: &str = env!("CARGO_BIN_EXE_wrenn-ctl");
/// The base snapshot template's id in the stack's state root.
const BASE_TEMPLATE: u128 = 0x57ac_0000_0000_0000_0000_0000_0000_0001;
/// Its platform template name.
const BASE_NAME: &str = "stack-base";
/// Deadline of one call that runs something in a guest (minutes under load here).
const GUEST_CALL: Duration = Duration::from_secs(900);
/// The jail's uids: not the agent's default range, nor the agent e2e's (960000).
const UID_BASE: u32 = 970_000;
const UID_COUNT: u32 = 64;
/// ctl's traffic domain: port P of sandbox S is `P-S.stack.test` on the HTTP listener.
const TRAFFIC_DOMAIN: &str = "stack.test";
/// vCPU overcommit of the stack's host: 10 one-vCPU sandboxes on these 2-core machines.
const VCPU_OVERCOMMIT: &str = "5";

struct Inputs {
    fc: PathBuf,
    kernel: PathBuf,
    agent: PathBuf,
    uffd: Option<PathBuf>,
    jailer: Option<PathBuf>,
    boot_args: String,
    root: PathBuf,
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn inputs() -> Option<Inputs> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let (Some(fc), Some(kernel), Some(rootfs)) = (
        var("WRENN_FIRECRACKER"),
        var("WRENN_KERNEL"),
        var("WRENN_ROOTFS"),
    ) else {
        skip("full stack: WRENN_FIRECRACKER, WRENN_KERNEL and WRENN_ROOTFS must all be set");
        return None;
    };
    for p in [&fc, &kernel, &rootfs] {
        if !p.is_file() {
            skip(&format!("full stack: {} is not a file", p.display()));
            return None;
        }
    }
    if !is_root() {
        skip("full stack: needs root");
        return None;
    }
    if !Path::new("/dev/kvm").exists() {
        skip("full stack: no /dev/kvm");
        return None;
    }
    // target/<profile>/deps/it-<hash> -> target/<profile>/wrenn-agent
    let exe = std::env::current_exe().ok()?;
    let agent = exe.parent()?.parent()?.join("wrenn-agent");
    if !agent.is_file() {
        skip("full stack: the wrenn-agent binary is not built (run `cargo build -p agent`)");
        return None;
    }
    let uffd = var("WRENN_UFFD_BIN").or_else(|| {
        let p = exe.parent()?.parent()?.join("wrenn-uffd");
        p.is_file().then_some(p)
    });
    let jailer = var("WRENN_JAILER").filter(|j| j.is_file());
    if jailer.is_none() {
        println!("stack: WRENN_JAILER not set: the agent runs --unjailed");
    }
    let root = var("WRENN_STACK_ROOT").unwrap_or_else(|| "/var/tmp/wrenn-stack".into());
    let base = root.join("templates/00000000-0000-0000-0000-000000000000");
    std::fs::create_dir_all(&base).unwrap();
    if !base.join("rootfs.ext4").exists() {
        sparse_copy(&rootfs, &base.join("rootfs.ext4"));
    }
    // The base snapshot template: the state root's, else imported before the agent starts
    // (it reads its templates at start).
    if !tpl_dir(&root, BASE_TEMPLATE).join("template.conf").exists() {
        let Some(from) = var("WRENN_STACK_BASE_TEMPLATE") else {
            skip(&format!(
                "full stack: no base snapshot template in {} and WRENN_STACK_BASE_TEMPLATE \
                 unset (a snapshot template directory of another agent, e.g. the agent e2e's)",
                root.display()
            ));
            return None;
        };
        import_template(&from, &root, BASE_TEMPLATE);
        println!("stack: imported the base template from {}", from.display());
    }
    Some(Inputs {
        fc,
        kernel,
        agent,
        uffd,
        jailer,
        boot_args: std::env::var("WRENN_BOOT_ARGS").unwrap_or_default(),
        root,
    })
}

fn tpl_dir(root: &Path, id: u128) -> PathBuf {
    root.join("templates")
        .join(proto::id::Uuid::from_u128(id).hyphenated().to_string())
}

/// Copies a snapshot template directory of another agent into `root` under `id` (its
/// snapshot files, a clone of its disk, its template.conf with the new id).
fn import_template(from: &Path, root: &Path, id: u128) {
    let to = tpl_dir(root, id);
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(to.join("snapshot")).unwrap();
    for e in std::fs::read_dir(from.join("snapshot")).unwrap().flatten() {
        std::fs::copy(e.path(), to.join("snapshot").join(e.file_name())).unwrap();
    }
    sparse_copy(&from.join("rootfs.ext4"), &to.join("rootfs.ext4"));
    let conf = std::fs::read_to_string(from.join("template.conf")).unwrap();
    let conf: String = conf
        .lines()
        .map(|l| {
            if l.starts_with("id=") {
                format!("id={}\n", proto::id::Uuid::from_u128(id).hyphenated())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    // Written last: a template without its conf is not one.
    std::fs::write(to.join("template.conf"), conf).unwrap();
}

/// Copies a disk image keeping its holes (the images are 5 GiB, mostly holes).
fn sparse_copy(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp {} {}", from.display(), to.display());
}

/// A `key=value` of a template.conf.
fn conf_value(dir: &Path, key: &str) -> String {
    std::fs::read_to_string(dir.join("template.conf"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
        .unwrap_or_else(|| panic!("{key} in {}", dir.display()))
}

/// The running stack; dropping it destroys every sandbox through ctl, then stops the agent
/// and ctl (the throwaway PostgreSQL stops with the test process).
struct Stack {
    root: PathBuf,
    ctl: Child,
    agent: Child,
    addr: String,
    /// ctl's HTTP listener (plaintext, like the other ports here): the API and the traffic
    /// proxy, with the traffic domain [`TRAFFIC_DOMAIN`].
    http_addr: std::net::SocketAddr,
    team_key: String,
    host_id: String,
    agent_log: PathBuf,
}

impl Stack {
    fn start(inp: &Inputs) -> Option<Stack> {
        let url = fresh_db()?;
        let init = ctl::admin::init(&url, "stack", "stack@example.com", "").unwrap();
        let (port, http_port, host_port, agent_port) = (
            crate::ctl_bin::free_port(),
            crate::ctl_bin::free_port(),
            crate::ctl_bin::free_port(),
            crate::ctl_bin::free_port(),
        );
        let ctl = Command::new(CTL_BIN)
            .args(["serve", "--database-url", &url, "--plaintext"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(["--host-listen", &format!("127.0.0.1:{host_port}")])
            .args(["--traffic-domain", TRAFFIC_DOMAIN])
            // Creates, template snapshots and healthchecks in guests take minutes here.
            .args(["--lifecycle-timeout-s", "900"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(inp.root.join("ctl.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let (token, _) = ctl::admin::create_registration_token(&url, 600).unwrap();
        // A fresh registration every run (the database is new).
        let _ = std::fs::remove_file(inp.root.join("agent/identity.conf"));
        let agent_log = inp.root.join("agent.log");
        let mut cmd = Command::new(&inp.agent);
        cmd.args(["--listen", &format!("127.0.0.1:{agent_port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--state-root")
            .arg(&inp.root)
            .args([
                "--ctl",
                &format!("127.0.0.1:{host_port}"),
                "--ctl-plaintext",
            ])
            .args(["--advertise", &format!("127.0.0.1:{agent_port}")])
            .arg("--firecracker")
            .arg(&inp.fc)
            .arg("--kernel")
            .arg(&inp.kernel)
            .args(["--net-prefix", "wrstk", "--net-subnet", "10.217.0.0"])
            .args(["--vcpu-overcommit", VCPU_OVERCOMMIT])
            .arg(format!("--boot-args-extra={}", inp.boot_args))
            .env("WRENN_REGISTRATION_TOKEN", &token)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&agent_log).unwrap()));
        match &inp.uffd {
            Some(u) => cmd.arg("--uffd-bin").arg(u),
            None => cmd.args(["--restore-backend", "file"]),
        };
        match &inp.jailer {
            Some(j) => cmd
                .arg("--jailer")
                .arg(j)
                .arg("--chroot-base-dir")
                .arg(inp.root.join("jail"))
                .args(["--uid-base", &UID_BASE.to_string()])
                .args(["--uid-count", &UID_COUNT.to_string()])
                // One uid per slot: no more slots than uids.
                .args(["--slots", &UID_COUNT.to_string()]),
            None => cmd.arg("--unjailed"),
        };
        let agent = cmd.spawn().unwrap();
        let mut st = Stack {
            root: inp.root.clone(),
            ctl,
            agent,
            addr: format!("127.0.0.1:{port}"),
            http_addr: std::net::SocketAddr::from(([127, 0, 0, 1], http_port)),
            team_key: init.team_key.clone(),
            host_id: String::new(),
            agent_log,
        };
        // The host shows up once the agent registered and heartbeats.
        let admin = st.connect(&init.admin_key);
        let t = Instant::now();
        st.host_id = loop {
            let hosts: Result<c::ListHostsResponse, _> = admin.unary(
                c::hosts_methods::LIST,
                &c::ListHostsRequest::default(),
                Some(Duration::from_secs(10)),
            );
            if let Some(h) = hosts.ok().and_then(|h| h.hosts.into_iter().next()) {
                println!("stack: host registered {h:?}");
                break h.id;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the agent did not register; see {}",
                st.agent_log.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        st.adopt_base(inp, &url, &admin);
        Some(st)
    }

    fn connect(&self, key: &str) -> Client {
        let t = Instant::now();
        loop {
            match Client::connect_tcp(self.addr.as_str(), Credential::api_key(key)) {
                Ok(cl) => return cl,
                Err(e) if t.elapsed() < Duration::from_secs(60) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("wrenn-ctl did not come up: {e}"),
            }
        }
    }

    fn team(&self) -> Client {
        self.connect(&self.team_key)
    }

    /// Makes the state root's base snapshot template known to ctl, as an operator does:
    /// `wrenn-ctl admin adopt-template` with the sizes of its template.conf.
    fn adopt_base(&self, inp: &Inputs, url: &str, admin: &Client) {
        let dir = tpl_dir(&inp.root, BASE_TEMPLATE);
        let tpl = proto::id::format_template(proto::id::Uuid::from_u128(BASE_TEMPLATE));
        let out = Command::new(CTL_BIN)
            .args(["admin", "adopt-template", "--database-url", url])
            .args(["--host", &self.host_id, "--template", &tpl])
            .args(["--name", BASE_NAME])
            .args(["--vcpus", &conf_value(&dir, "vcpus")])
            .args(["--memory-mib", &conf_value(&dir, "memory_mib")])
            .args(["--disk-mib", &conf_value(&dir, "disk_mib")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "adopt-template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t: c::Template = admin
            .unary(
                c::templates_methods::GET,
                &c::GetTemplateRequest {
                    template: BASE_NAME.into(),
                },
                Some(Duration::from_secs(10)),
            )
            .unwrap();
        assert_eq!(t.id, tpl);
        println!("stack: base template {tpl} adopted as {BASE_NAME:?}");
    }

    fn create(&self, cl: &Client, template: &str) -> c::Sandbox {
        cl.unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                template: template.into(),
                timeout_s: 3600,
                ..Default::default()
            },
            Some(GUEST_CALL),
        )
        .unwrap_or_else(|e| panic!("create from {template}: {e}"))
    }

    fn destroy_all(&self) {
        let Ok(cl) = Client::connect_tcp(self.addr.as_str(), Credential::api_key(&self.team_key))
        else {
            return;
        };
        let Ok(l) = cl.unary::<_, c::ListSandboxesResponse>(
            c::sandboxes_methods::LIST,
            &c::ListSandboxesRequest::default(),
            Some(Duration::from_secs(30)),
        ) else {
            return;
        };
        for s in l.sandboxes {
            if let Err(e) = cl.unary::<_, c::DestroySandboxResponse>(
                c::sandboxes_methods::DESTROY,
                &c::DestroySandboxRequest {
                    force: false,
                    sandbox_id: s.id.clone(),
                },
                Some(Duration::from_secs(120)),
            ) {
                println!("stack: destroy {}: {e}", s.id);
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.destroy_all();
        // SIGTERM: the agent leaves no sandbox behind (all destroyed above); ctl drains.
        for p in [&mut self.agent, &mut self.ctl] {
            // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
            unsafe { libc::kill(p.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(30);
            while p.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
        println!("stack: stopped (logs in {})", self.root.display());
    }
}

/// Runs `cmd args` through ctl's `Processes/Exec` with the sandbox's defaults; (exit code,
/// stdout, stderr).
fn exec(cl: &Client, sb: &str, cmd: &str, args: &[&str]) -> (i32, String, String) {
    let r: c::ExecResponse = cl
        .unary(
            c::processes_methods::EXEC,
            &c::ExecRequest {
                sandbox_id: sb.into(),
                process: Some(envd::ProcessConfig {
                    cmd: cmd.into(),
                    args: args.iter().map(|a| a.to_string()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Some(GUEST_CALL),
        )
        .unwrap_or_else(|e| panic!("exec {cmd} {args:?} in {sb}: {e}"));
    let code = match r.exited.and_then(|e| e.status) {
        Some(envd::process_exited::Status::ExitCode(c)) => c,
        Some(envd::process_exited::Status::Signal(s)) => 128 + s,
        None => -1,
    };
    (
        code,
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

/// The recipe of the build test. Guest programs are few: every dynamically linked program
/// takes 10-60 s of guest CPU to start on these machines, so the checks use shell builtins
/// and the server is the one Python process.
const RECIPE: &str = "FROM stack-base
ENV GREETING=hello-from-recipe
WORKDIR /srv/site
COPY index.html notes/ ./
RUN echo \"built with $GREETING\" > built.txt
USER app
RUN echo \"$GREETING\" > /home/app/greeting.txt
START exec python3 -m http.server 8080 --bind 127.0.0.1
HEALTHCHECK --interval=5s --timeout=300s --start-period=10s --retries=60 exec bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080'
";

/// The guest's server (Python's standard library only, nothing installed): the files of its
/// directory; `POST /sum`: the body's length and SHA-256 once all of it arrived; `GET /ws`: a
/// WebSocket (RFC 6455 handshake) echoing every frame back unmasked until a close frame.
/// No request log: nothing reads the background process's output.
const SERVE_PY: &str = r#"import base64, hashlib, http.server, sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        if self.path != "/sum":
            self.send_error(404)
            return
        left = int(self.headers.get("Content-Length", "0"))
        h, got = hashlib.sha256(), 0
        while left > 0:
            b = self.rfile.read(min(left, 1 << 16))
            if not b:
                break
            h.update(b)
            got += len(b)
            left -= len(b)
        out = ("%d %s" % (got, h.hexdigest())).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        if self.path != "/ws":
            return super().do_GET()
        key = self.headers.get("Sec-WebSocket-Key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.close_connection = True
        r, w = self.rfile, self.wfile
        while True:
            h = r.read(2)
            if len(h) < 2:
                return
            op, n = h[0] & 15, h[1] & 127
            if n == 126:
                n = int.from_bytes(r.read(2), "big")
            elif n == 127:
                n = int.from_bytes(r.read(8), "big")
            m = r.read(4) if h[1] & 128 else bytes(4)
            p = bytes(x ^ m[i & 3] for i, x in enumerate(r.read(n)))
            if n < 126:
                head = bytes([0x80 | op, n])
            elif n < 65536:
                head = bytes([0x80 | op, 126]) + n.to_bytes(2, "big")
            else:
                head = bytes([0x80 | op, 127]) + n.to_bytes(8, "big")
            w.write(head + p)
            if op == 8:
                return


port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
"#;

/// The guest server's port, and envd's (never exposed).
const WEB_PORT: u16 = 8080;
const ENVD_PORT: u16 = 49983;
/// What the guest serves as /index.html (from the build context).
const INDEX_HTML: &[u8] = b"<h1>wrenn stack</h1>\n";
/// The streamed upload's size: a few MiB. Guest I/O is slow here (4 MiB into the guest's
/// Python took 68-120 s through the proxy and 98 s sent straight from the slot); the
/// 100 MiB case runs in CI against a server standing in for the guest.
const UPLOAD_LEN: usize = 4 << 20;
/// How long the guest's Python may take to listen (dynamic programs start slowly here).
const SERVER_START_MAX: Duration = Duration::from_secs(1200);
/// Socket timeout of one request through the proxy into the guest.
const PROXY_IO: Duration = Duration::from_secs(180);

/// An answer through ctl's traffic proxy: status, headers (lower-case names), body.
type Answer = (u16, Vec<(String, String)>, Vec<u8>);

fn proxy_conn(addr: std::net::SocketAddr) -> Result<std::net::TcpStream, String> {
    let s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(PROXY_IO)).unwrap();
    s.set_write_timeout(Some(PROXY_IO)).unwrap();
    Ok(s)
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Sends `head` (request line and headers, without the blank line) with `Connection:
/// close`, then `body` in 64 KiB writes; reads the answer to the close.
fn proxy_request(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> Result<Answer, String> {
    timed_request(addr, head, body).map(|(a, _)| a)
}

/// [`proxy_request`], also saying when the last byte of the body was written.
fn timed_request(
    addr: std::net::SocketAddr,
    head: &str,
    body: &[u8],
) -> Result<(Answer, Duration), String> {
    use std::io::{Read, Write};
    let t = Instant::now();
    let mut s = proxy_conn(addr)?;
    s.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("write head: {e}"))?;
    for part in body.chunks(64 << 10) {
        s.write_all(part).map_err(|e| format!("write body: {e}"))?;
    }
    let written = t.elapsed();
    let mut a = crate::harness::read_http_head(&mut s)?;
    s.read_to_end(&mut a.2)
        .map_err(|e| format!("read body: {e}"))?;
    Ok((a, written))
}

/// A client WebSocket frame: FIN, `op`, masked (RFC 6455 §5.3) with a fixed key.
fn ws_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | op];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one server frame (unmasked): its first byte and payload; `carry` holds bytes read
/// past the previous frame.
fn ws_read(s: &mut std::net::TcpStream, carry: &mut Vec<u8>) -> Result<(u8, Vec<u8>), String> {
    use std::io::Read;
    let mut fill = |carry: &mut Vec<u8>, n: usize| -> Result<(), String> {
        let mut b = [0u8; 16384];
        while carry.len() < n {
            match s.read(&mut b) {
                Ok(0) => return Err(format!("closed inside a frame ({} bytes)", carry.len())),
                Ok(k) => carry.extend_from_slice(&b[..k]),
                Err(e) => return Err(format!("reading a frame: {e}")),
            }
        }
        Ok(())
    };
    fill(carry, 2)?;
    if carry[1] & 0x80 != 0 {
        return Err("a server frame is masked".into());
    }
    let (len, at) = match carry[1] & 0x7f {
        126 => {
            fill(carry, 4)?;
            (u16::from_be_bytes([carry[2], carry[3]]) as usize, 4)
        }
        127 => {
            fill(carry, 10)?;
            let mut l = [0u8; 8];
            l.copy_from_slice(&carry[2..10]);
            (u64::from_be_bytes(l) as usize, 10)
        }
        n => (n as usize, 2),
    };
    fill(carry, at + len)?;
    let first = carry[0];
    let payload = carry[at..at + len].to_vec();
    carry.drain(..at + len);
    Ok((first, payload))
}

/// The answer is the context's index.html, from the guest's Python (not ctl or the agent).
fn index_check(a: &Answer) -> Result<String, String> {
    if a.0 != 200 {
        return Err(format!(
            "status {}: {:?}",
            a.0,
            String::from_utf8_lossy(&a.2[..a.2.len().min(300)])
        ));
    }
    if a.2 != INDEX_HTML {
        return Err(format!("body {:?}", String::from_utf8_lossy(&a.2)));
    }
    let server = header(a, "server").unwrap_or_default();
    if !server.starts_with("SimpleHTTP/") {
        return Err(format!("server {server:?}"));
    }
    Ok(format!(
        "200 {:?} from {server:?}",
        String::from_utf8_lossy(&a.2)
    ))
}

/// `POST /sum` of [`UPLOAD_LEN`] bytes, written in 64 KiB pieces as one streamed body: the
/// server's length and SHA-256 must be the client's.
fn sum_check(addr: std::net::SocketAddr, host: &str, extra: &str) -> Result<String, String> {
    let body: Vec<u8> = (0..UPLOAD_LEN as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let mut h = proto::sha256::Sha256::new();
    h.update(&body);
    let want = format!("{UPLOAD_LEN} {}", h.finish_hex());
    let t = Instant::now();
    let (a, written) = timed_request(
        addr,
        &format!("POST /sum HTTP/1.1\r\nHost: {host}{extra}\r\nContent-Length: {UPLOAD_LEN}"),
        &body,
    )?;
    let answered = t.elapsed();
    if a.0 != 200 {
        return Err(format!(
            "status {}: {:?}",
            a.0,
            String::from_utf8_lossy(&a.2)
        ));
    }
    let got = String::from_utf8_lossy(&a.2).into_owned();
    if got != want {
        return Err(format!("the server says {got:?}, the client sent {want:?}"));
    }
    Ok(format!(
        "{got} (body written after {} ms, answer after {} ms)",
        written.as_millis(),
        answered.as_millis()
    ))
}

/// A WebSocket upgrade to `GET /ws` (RFC 6455 §1.3's example key, so the accept value is
/// known), a text and a binary frame echoed, then a close answered with a close and the end.
fn ws_check(addr: std::net::SocketAddr, host: &str, extra: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = proxy_conn(addr)?;
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {host}{extra}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .map_err(|e| format!("write upgrade: {e}"))?;
    let (status, headers, mut carry) = crate::harness::read_http_head(&mut s)?;
    let a = (status, headers, Vec::new());
    if status != 101 {
        return Err(format!("status {status}: {:?}", a.1));
    }
    let accept = header(&a, "sec-websocket-accept").unwrap_or_default();
    if accept != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
        return Err(format!("Sec-WebSocket-Accept {accept:?}"));
    }
    let text = b"hello through ctl, the agent and the slot".to_vec();
    let binary: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    for (op, p) in [(1u8, &text), (2, &binary)] {
        s.write_all(&ws_frame(op, p))
            .map_err(|e| format!("write frame: {e}"))?;
        let (first, got) = ws_read(&mut s, &mut carry)?;
        if first != 0x80 | op || &got != p {
            return Err(format!(
                "echo of a {}-byte frame op {op}: first byte {first:#x}, {} bytes",
                p.len(),
                got.len()
            ));
        }
    }
    s.write_all(&ws_frame(8, &1000u16.to_be_bytes()))
        .map_err(|e| format!("write close: {e}"))?;
    let (first, _) = ws_read(&mut s, &mut carry)?;
    if first != 0x88 {
        return Err(format!("answer to the close: first byte {first:#x}"));
    }
    let mut tail = Vec::new();
    s.read_to_end(&mut tail)
        .map_err(|e| format!("after the close: {e}"))?;
    if !tail.is_empty() || !carry.is_empty() {
        return Err(format!(
            "{} bytes after the close",
            tail.len() + carry.len()
        ));
    }
    Ok(format!(
        "101, accept {accept}, text {} and binary {} bytes echoed, closed",
        text.len(),
        binary.len()
    ))
}

/// The traffic proxy in front of the real guest's server: ctl's HTTP listener → the
/// agent's `Ports.Connect` → the guest's port 8080 inside the slot. Every check runs (a
/// failed one is reported and the next tried); the list of failures is the result.
fn proxy_checks(http: std::net::SocketAddr, sb: &c::Sandbox) -> Vec<String> {
    use std::io::{Read, Write};
    let tok = &sb.traffic_token;
    assert!(
        tok.starts_with("wtt_"),
        "no traffic token at create: {tok:?}"
    );
    // A token of the right shape that is not this sandbox's.
    let wrong = format!(
        "{}{}",
        &tok[..tok.len() - 1],
        if tok.ends_with('0') { '1' } else { '0' }
    );
    let host = |p: u16| format!("{p}-{}.{TRAFFIC_DOMAIN}", sb.id);
    let path = |p: u16, rest: &str| format!("/v1/sandboxes/{}/ports/{p}{rest}", sb.id);
    let mut failures = Vec::new();
    let mut check = |name: &str, f: &mut dyn FnMut() -> Result<String, String>| {
        let t = Instant::now();
        let r = f();
        let ms = t.elapsed().as_millis();
        match r {
            Ok(what) => println!("proxy: {name}: ok ({ms} ms): {what}"),
            Err(e) => {
                println!("proxy: {name}: FAILED ({ms} ms): {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    };
    let expect = |a: &Answer, status: u16| -> Result<(), String> {
        if a.0 == status {
            Ok(())
        } else {
            Err(format!(
                "status {} (wanted {status}): {:?}",
                a.0,
                String::from_utf8_lossy(&a.2[..a.2.len().min(300)])
            ))
        }
    };
    let index = index_check;
    let get = |host: &str, target: &str, extra: &str| {
        proxy_request(
            http,
            &format!("GET {target} HTTP/1.1\r\nHost: {host}{extra}"),
            &[],
        )
    };
    let with = |t: &str| format!("\r\nwrenn-traffic-access-token: {t}");
    let api_host = http.to_string();

    check("host form GET /index.html with the token", &mut || {
        index(&get(&host(WEB_PORT), "/index.html", &with(tok))?)
    });
    check("path form GET /index.html with the token", &mut || {
        index(&get(&api_host, &path(WEB_PORT, "/index.html"), &with(tok))?)
    });
    for (form, h, target) in [
        ("host form", host(WEB_PORT), "/index.html".to_owned()),
        ("path form", api_host.clone(), path(WEB_PORT, "/index.html")),
    ] {
        check(&format!("{form} without a token"), &mut || {
            let a = get(&h, &target, "")?;
            expect(&a, 401).map(|()| "401".into())
        });
        check(&format!("{form} with a wrong token"), &mut || {
            let a = get(&h, &target, &with(&wrong))?;
            expect(&a, 403).map(|()| "403".into())
        });
    }
    check("envd's port with the token (host form)", &mut || {
        let a = get(&host(ENVD_PORT), "/", &with(tok))?;
        expect(&a, 403).map(|()| "403".into())
    });
    check("envd's port with the token (path form)", &mut || {
        let a = get(&api_host, &path(ENVD_PORT, "/"), &with(tok))?;
        expect(&a, 403).map(|()| "403".into())
    });
    check("a port nothing listens on", &mut || {
        let a = get(&host(WEB_PORT + 1), "/", &with(tok))?;
        expect(&a, 502).map(|()| "502".into())
    });
    check(
        "POST /sum, a streamed body checksummed in the guest",
        &mut || sum_check(http, &host(WEB_PORT), &with(tok)),
    );
    check(
        "keep-alive: two GETs on one connection (path form)",
        &mut || {
            let mut s = proxy_conn(http)?;
            let mut carry = Vec::new();
            let mut said = Vec::new();
            for i in 0..2 {
                s.write_all(
                    format!(
                        "GET {} HTTP/1.1\r\nHost: {api_host}{}\r\n\r\n",
                        path(WEB_PORT, "/index.html"),
                        with(tok)
                    )
                    .as_bytes(),
                )
                .map_err(|e| format!("write request {i}: {e}"))?;
                let mut a = if carry.is_empty() {
                    crate::harness::read_http_head(&mut s)?
                } else {
                    return Err(format!("{} bytes after answer {}", carry.len(), i - 1));
                };
                let len: usize = header(&a, "content-length")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("answer {i} without Content-Length: {:?}", a.1))?;
                let mut b = [0u8; 4096];
                while a.2.len() < len {
                    let k = s.read(&mut b).map_err(|e| format!("read body {i}: {e}"))?;
                    if k == 0 {
                        return Err(format!("closed inside answer {i}"));
                    }
                    a.2.extend_from_slice(&b[..k]);
                }
                carry = a.2.split_off(len);
                said.push(index(&a)?);
            }
            Ok(said.join("; "))
        },
    );
    check("WebSocket echo (host form)", &mut || {
        ws_check(http, &host(WEB_PORT), &with(tok))
    });
    failures
}

/// `WRENN_STACK_NO_GUEST=1` (registration only): says which guest part is left out.
fn no_guest(what: &str) -> bool {
    let skip = std::env::var("WRENN_STACK_NO_GUEST").as_deref() == Ok("1");
    if skip {
        println!("skipped: {what} (WRENN_STACK_NO_GUEST=1: registration only)");
    }
    skip
}

#[test]
fn stack_template_build_on_firecracker() {
    let Some(inp) = inputs() else { return };
    let Some(st) = Stack::start(&inp) else { return };
    if no_guest("the build on a guest") {
        return;
    }
    let cl = st.team();
    let t0 = Instant::now();
    let mut s = cl
        .call(
            c::templates_methods::BUILD,
            &c::BuildRequest {
                msg: Some(c::build_request::Msg::Header(c::BuildHeader {
                    recipe: RECIPE.into(),
                    name: "stack-web".into(),
                })),
            },
            CallOpts {
                timeout: Some(Duration::from_secs(1500)),
                end_stream: false,
            },
        )
        .unwrap();
    for (path, data) in [
        ("index.html", &b"<h1>wrenn stack</h1>\n"[..]),
        ("notes/readme.txt", b"from the build context\n"),
    ] {
        s.send(&c::BuildRequest {
            msg: Some(c::build_request::Msg::Context(c::BuildContextChunk {
                path: path.into(),
                mode: 0o644,
                data: data.to_vec().into(),
            })),
        })
        .unwrap();
    }
    s.close_send().unwrap();
    let mut finished = None;
    while let Some(ev) = s.recv::<c::BuildEvent>().unwrap() {
        let el = t0.elapsed().as_secs();
        match ev.event {
            Some(c::build_event::Event::BuildId(id)) => println!("[{el:4} s] build {id}"),
            Some(c::build_event::Event::StepStarted(x)) => {
                println!(
                    "[{el:4} s] step {} (line {}): {}",
                    x.n, x.line, x.instruction
                )
            }
            Some(c::build_event::Event::Output(o)) => {
                print!("[{el:4} s]   | {}", String::from_utf8_lossy(&o.data))
            }
            Some(c::build_event::Event::StepFinished(x)) => println!(
                "[{el:4} s] step {} finished: exit {} ok {}",
                x.n, x.exit_code, x.ok
            ),
            Some(c::build_event::Event::Finished(b)) => finished = Some(b),
            None => {}
        }
    }
    let b = finished.expect("the build's Finished event");
    println!("build finished after {:?}: {b:?}", t0.elapsed());
    assert_eq!(
        b.status,
        c::BuildStatus::Succeeded as i32,
        "build failed: {}",
        b.reason
    );
    let tpl: c::Template = cl
        .unary(
            c::templates_methods::GET,
            &c::GetTemplateRequest {
                template: "stack-web".into(),
            },
            Some(Duration::from_secs(10)),
        )
        .unwrap();
    assert_eq!(tpl.id, b.template_id);
    println!("template {tpl:?}");

    // A sandbox from the result: restored with the server running in it.
    let t = Instant::now();
    let sb = st.create(&cl, "stack-web");
    println!("create from the built template took {:?}", t.elapsed());
    // The server answers (bash's /dev/tcp and builtins: one guest program).
    let (code, out, err) = exec(
        &cl,
        &sb.id,
        "/bin/bash",
        &[
            "-c",
            "exec 3<>/dev/tcp/127.0.0.1/8080; printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' >&3; \
             while IFS= read -r l <&3; do printf '%s\\n' \"$l\"; done",
        ],
    );
    println!("GET /index.html: exit {code}\n{out}{err}");
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(out.contains("<h1>wrenn stack</h1>"), "{out}");
    // Files, user, directory and environment of a process with the template's defaults,
    // and the server's user and directory: dash and its builtins only.
    let (code, out, err) = exec(
        &cl,
        &sb.id,
        "/bin/sh",
        &[
            "-c",
            "echo \"cwd=$(pwd)\"; echo \"greeting=$GREETING\"; \
             while read k v r; do [ \"$k\" = Uid: ] && echo \"uid=$v\"; done < /proc/self/status; \
             while IFS=: read n x u r; do [ \"$n\" = app ] && echo \"app_uid=$u\"; done < /etc/passwd; \
             read l < built.txt; echo \"built=$l\"; read l < notes/readme.txt; echo \"notes=$l\"; \
             read l < /home/app/greeting.txt; echo \"home=$l\"; \
             for d in /proc/[0-9]*; do n=; read n < $d/comm 2>/dev/null; \
               if [ \"$n\" = python3 ]; then \
                 while read k v r; do [ \"$k\" = Uid: ] && echo \"server_uid=$v\"; done < $d/status; \
                 echo \"server_cwd=$(cd $d/cwd && pwd -P)\"; fi; done",
        ],
    );
    println!("defaults: exit {code}\n{out}{err}");
    assert_eq!(code, 0, "{err}");
    let kv: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(kv.get("cwd"), Some(&"/srv/site"), "{out}");
    assert_eq!(kv.get("greeting"), Some(&"hello-from-recipe"), "{out}");
    let app_uid = kv.get("app_uid").copied().expect("user app exists");
    assert_ne!(app_uid, "0");
    assert_eq!(kv.get("uid"), Some(&app_uid), "{out}");
    assert_eq!(
        kv.get("built"),
        Some(&"built with hello-from-recipe"),
        "{out}"
    );
    assert_eq!(kv.get("notes"), Some(&"from the build context"), "{out}");
    assert_eq!(kv.get("home"), Some(&"hello-from-recipe"), "{out}");
    assert_eq!(kv.get("server_uid"), Some(&app_uid), "{out}");
    assert_eq!(kv.get("server_cwd"), Some(&"/srv/site"), "{out}");

    // The template goes with the stack (its files on the agent too).
    let _: c::DestroySandboxResponse = cl
        .unary(
            c::sandboxes_methods::DESTROY,
            &c::DestroySandboxRequest {
                force: false,
                sandbox_id: sb.id.clone(),
            },
            Some(Duration::from_secs(120)),
        )
        .unwrap();
    let _: c::DeleteTemplateResponse = cl
        .unary(
            c::templates_methods::DELETE,
            &c::DeleteTemplateRequest {
                template_id: tpl.id.clone(),
            },
            Some(Duration::from_secs(120)),
        )
        .unwrap();
    drop(st);
}

/// Issue 16's "a real guest behind the proxy": a sandbox from the base template starts the
/// guest server ([`SERVE_PY`], on the guest's Python, written to /tmp by dash builtins: one
/// background exec, no other guest program), and every request reaches it only through
/// ctl's HTTP listener → the agent's `Ports.Connect` → the guest's port inside the slot.
/// Until Python listens (minutes here) the proxy answers 502; then [`proxy_checks`].
#[test]
fn stack_proxy_to_guest_server() {
    let Some(inp) = inputs() else { return };
    let Some(st) = Stack::start(&inp) else { return };
    // ctl's traffic proxy is wired (its domain, the HTTP listener): an unknown sandbox is 404.
    let unknown = format!(
        "GET / HTTP/1.1\r\nHost: {WEB_PORT}-sb-00000000-0000-4000-8000-000000000000.\
         {TRAFFIC_DOMAIN}\r\nwrenn-traffic-access-token: wtt_{}",
        "0".repeat(64)
    );
    let a = proxy_request(st.http_addr, &unknown, &[]).unwrap();
    assert_eq!(a.0, 404, "{:?}", String::from_utf8_lossy(&a.2));
    println!(
        "proxy: an unknown sandbox: {} {}",
        a.0,
        String::from_utf8_lossy(&a.2)
    );
    if no_guest("the proxy to a guest") {
        return;
    }
    let cl = st.team();
    let t0 = Instant::now();
    let sb = st.create(&cl, BASE_NAME);
    println!(
        "[{:4} s] created {} from {BASE_NAME}",
        t0.elapsed().as_secs(),
        sb.id
    );
    let r: c::ExecResponse = cl
        .unary(
            c::processes_methods::EXEC,
            &c::ExecRequest {
                sandbox_id: sb.id.clone(),
                process: Some(envd::ProcessConfig {
                    cmd: "/bin/sh".into(),
                    args: vec![
                        "-c".into(),
                        "cd /tmp && printf %s \"$1\" > wrenn-serve.py && \
                         printf %s \"$2\" > index.html && exec python3 wrenn-serve.py"
                            .into(),
                        "sh".into(),
                        SERVE_PY.into(),
                        String::from_utf8(INDEX_HTML.to_vec()).unwrap(),
                    ],
                    tag: "wrenn-stack-serve".into(),
                    ..Default::default()
                }),
                background: true,
                ..Default::default()
            },
            Some(GUEST_CALL),
        )
        .unwrap_or_else(|e| panic!("start the server in {}: {e}", sb.id));
    println!(
        "[{:4} s] server started in the background, pid {}",
        t0.elapsed().as_secs(),
        r.pid
    );
    // Ready when the proxy's GET is 200; 502 (nothing accepts on the port) until then.
    let target = format!("/v1/sandboxes/{}/ports/{WEB_PORT}/index.html", sb.id);
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nwrenn-traffic-access-token: {}",
        st.http_addr, sb.traffic_token
    );
    let mut seen = BTreeMap::new();
    loop {
        let el = t0.elapsed();
        assert!(
            el < SERVER_START_MAX,
            "the guest's server did not answer through the proxy in {SERVER_START_MAX:?} \
             (answers so far {seen:?})"
        );
        let status = match proxy_request(st.http_addr, &head, &[]) {
            Ok(a) => a.0,
            Err(e) => panic!("[{:4} s] proxy request while waiting: {e}", el.as_secs()),
        };
        if !seen.contains_key(&status) {
            println!("[{:4} s] first {status} while waiting", el.as_secs());
        }
        *seen.entry(status).or_insert(0u32) += 1;
        match status {
            200 => break,
            502 => std::thread::sleep(Duration::from_secs(5)),
            s => panic!("status {s} while waiting for the server (502 or 200 expected)"),
        }
    }
    assert!(
        seen.contains_key(&502),
        "the port answered before the server could have started: {seen:?}"
    );
    println!(
        "[{:4} s] the server answers through the proxy (answers while waiting {seen:?})",
        t0.elapsed().as_secs()
    );
    let t = Instant::now();
    let failures = proxy_checks(st.http_addr, &sb);
    println!(
        "[{:4} s] proxy checks took {:?}",
        t0.elapsed().as_secs(),
        t.elapsed()
    );
    // For comparison (measured, not a check): the same GET and upload sent straight to the
    // guest from inside the slot's namespace, as the agent's end of the proxy does.
    direct_baseline();
    assert!(
        failures.is_empty(),
        "through the traffic proxy: {failures:#?}"
    );
    drop(st);
}

/// The guest's server reached directly from the slot's network namespace (the stack's only
/// `wrstk-*` namespace; a thread of its own enters it), without ctl or the agent: a GET and
/// the upload, timed. Prints; a measurement, not a check.
fn direct_baseline() {
    use std::os::fd::AsRawFd;
    let names: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("wrstk-"))
                .collect()
        })
        .unwrap_or_default();
    let [ns] = &names[..] else {
        println!("direct: not measured (the stack's namespaces: {names:?})");
        return;
    };
    let path = format!("/var/run/netns/{ns}");
    let ns = ns.clone();
    let out = std::thread::spawn(move || -> Result<String, String> {
        let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns(2) on an open namespace file; it moves only this thread, which
        // exits when the measurement ends.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
        let guest = std::net::SocketAddr::from(([169, 254, 0, 21], WEB_PORT));
        let t = Instant::now();
        let a = proxy_request(guest, "GET /index.html HTTP/1.1\r\nHost: guest", &[])?;
        let get = format!("GET {} in {} ms", a.0, t.elapsed().as_millis());
        Ok(format!(
            "{get}; POST /sum {}",
            sum_check(guest, "guest", "")?
        ))
    })
    .join();
    match out {
        Ok(Ok(m)) => println!("direct from {ns}: {m}"),
        Ok(Err(e)) => println!("direct from {ns}: not measured: {e}"),
        Err(_) => println!("direct from {ns}: the measuring thread panicked"),
    }
}

/// One create's numbers: the client's, and the agent's phases from its log.
#[derive(Clone, Debug, Default)]
struct Sample {
    sandbox: String,
    create: Duration,
    first_exec: Duration,
    /// `create phases` and `restore phases` of the agent's log (microseconds).
    phases: BTreeMap<String, u64>,
}

/// The agent's `create phases` / `restore phases` lines, per sandbox id.
fn agent_phases(log: &Path) -> BTreeMap<String, BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for l in text.lines() {
        let Some(rest) = l
            .split_once("create phases ")
            .or_else(|| l.split_once("restore phases "))
            .map(|(_, r)| r)
        else {
            continue;
        };
        let mut id = None;
        let mut m = BTreeMap::new();
        for kv in rest.split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            if k == "id" {
                id = Some(v.to_owned());
            } else if let Ok(n) = v.parse::<u64>() {
                m.insert(k.to_owned(), n);
            }
        }
        if let Some(id) = id {
            out.entry(id).or_default().extend(m);
        }
    }
    out
}

fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

#[test]
fn stack_create_latency() {
    if std::env::var("WRENN_STACK_LATENCY").as_deref() != Ok("1") {
        println!("skipped: create latency under concurrency (opt-in: WRENN_STACK_LATENCY=1)");
        return;
    }
    let Some(inp) = inputs() else { return };
    let Some(st) = Stack::start(&inp) else { return };
    let list = |k: &str, d: &str| -> Vec<usize> {
        std::env::var(k)
            .unwrap_or_else(|_| d.into())
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .collect()
    };
    let levels = list("WRENN_STACK_LEVELS", "1,4,10");
    // One number for every level, or one per level.
    let rounds_of = list("WRENN_STACK_ROUNDS", "20");
    let rounds_at = |i: usize| rounds_of.get(i).or(rounds_of.last()).copied().unwrap_or(20);
    println!(
        "stack latency: levels {levels:?}, rounds {rounds_of:?}, vCPU overcommit {VCPU_OVERCOMMIT}x, \
         jailed {}, restore backend file (the agent's default; wrenn-uffd {} for resumes)",
        inp.jailer.is_some(),
        if inp.uffd.is_some() { "given" } else { "absent" }
    );
    let addr = st.addr.clone();
    let key = st.team_key.clone();
    for (li, &level) in levels.iter().enumerate() {
        let rounds = rounds_at(li);
        let mut samples: Vec<Sample> = Vec::new();
        let t_level = Instant::now();
        for round in 0..rounds {
            let threads: Vec<_> = (0..level)
                .map(|_| {
                    let (addr, key) = (addr.clone(), key.clone());
                    std::thread::spawn(move || {
                        let cl =
                            Client::connect_tcp(addr.as_str(), Credential::api_key(&key)).unwrap();
                        let t = Instant::now();
                        let sb: c::Sandbox = cl
                            .unary(
                                c::sandboxes_methods::CREATE,
                                &c::CreateSandboxRequest {
                                    template: BASE_NAME.into(),
                                    timeout_s: 1800,
                                    ..Default::default()
                                },
                                Some(GUEST_CALL),
                            )
                            .unwrap_or_else(|e| panic!("create: {e}"));
                        let create = t.elapsed();
                        let t = Instant::now();
                        let (code, out, err) =
                            exec(&cl, &sb.id, "/usr/local/bin/envd", &["--version"]);
                        let first_exec = t.elapsed();
                        assert!(
                            out.contains("envd ") || err.contains("envd "),
                            "envd --version: exit {code}: {out}{err}"
                        );
                        Sample {
                            sandbox: sb.id,
                            create,
                            first_exec,
                            phases: BTreeMap::new(),
                        }
                    })
                })
                .collect();
            let got: Vec<Sample> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let worst = got
                .iter()
                .map(|s| s.create + s.first_exec)
                .max()
                .unwrap_or_default();
            println!("level {level} round {round}: slowest create+exec {worst:?}");
            st.destroy_all();
            samples.extend(got);
        }
        let phases = agent_phases(&st.agent_log);
        for s in &mut samples {
            if let Some(p) = phases.get(&s.sandbox) {
                s.phases = p.clone();
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut rows: Vec<(&str, Vec<f64>)> = vec![
            (
                "total (create -> first exec answered)",
                samples
                    .iter()
                    .map(|s| ms(s.create + s.first_exec))
                    .collect(),
            ),
            (
                "create call (client)",
                samples.iter().map(|s| ms(s.create)).collect(),
            ),
            (
                "ctl (create call - agent total)",
                samples
                    .iter()
                    .filter_map(|s| {
                        let a = *s.phases.get("total_us")? as f64 / 1e3;
                        Some(ms(s.create) - a)
                    })
                    .collect(),
            ),
        ];
        for (k, label) in [
            ("total_us", "agent create"),
            ("turn_wait_us", "  agent: wait for a create turn"),
            ("disk_clone_us", "  agent: disk clone"),
            ("slot_us", "  agent: network slot"),
            ("chain_us", "  agent: template chain/memory"),
            ("vm_us", "  agent: restore (below)"),
            ("files_us", "    restore files/chroot"),
            ("firecracker_start_us", "    Firecracker start"),
            ("page_server_us", "    page server start"),
            ("load_resume_us", "    snapshot load + resume"),
            ("mmds_us", "    MMDS"),
            ("envd_us", "  agent: envd ready (init)"),
        ] {
            rows.push((
                label,
                samples
                    .iter()
                    .filter_map(|s| s.phases.get(k).map(|v| *v as f64 / 1e3))
                    .collect(),
            ));
        }
        rows.push((
            "first exec (envd --version)",
            samples.iter().map(|s| ms(s.first_exec)).collect(),
        ));
        println!(
            "== level {level}: {} creates in {rounds} rounds, {:?}; ms",
            samples.len(),
            t_level.elapsed()
        );
        for (label, v) in rows {
            println!(
                "{label:<40} n={:<4} p50 {:>9.1}  max {:>9.1}",
                v.len(),
                pct(v.clone(), 0.5),
                pct(v, 1.0)
            );
        }
    }
    drop(st);
}

/// The guest's server ([`SERVE_PY`]) and the e2e's client side of it, on the host's Python
/// (no guest, no proxy): the file, the checksummed upload and the WebSocket echo work, so a
/// failure of the e2e's proxy checks is the path through ctl and the agent, not the script.
#[test]
fn stack_guest_server_on_the_host() {
    let dir = std::env::temp_dir().join(format!("wrenn-stack-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), INDEX_HTML).unwrap();
    std::fs::write(dir.join("serve.py"), SERVE_PY).unwrap();
    struct Kill(Option<Child>, PathBuf);
    impl Drop for Kill {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let mut kill = Kill(None, dir.clone());
    // A port free a moment ago may be some other test's outgoing connection's by the time
    // the server binds it (the server then exits at once): up to three ports are tried.
    let mut addr = None;
    for _ in 0..3 {
        let port = crate::ctl_bin::free_port();
        let child = Command::new("python3")
            .arg("serve.py")
            .arg(port.to_string())
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            skip("the guest server on the host: no python3");
            return;
        };
        let child = kill.0.insert(child);
        let a = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let t = Instant::now();
        while std::net::TcpStream::connect(a).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                println!("serve.py exited ({st}) before listening on {a}; another port");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "serve.py did not listen on {a} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if child.try_wait().ok().flatten().is_none() {
            addr = Some(a);
            break;
        }
    }
    let addr = addr.expect("serve.py exited before listening, on three ports");
    let a = proxy_request(addr, "GET /index.html HTTP/1.1\r\nHost: localhost", &[]).unwrap();
    println!("{}", index_check(&a).unwrap());
    println!("{}", sum_check(addr, "localhost", "").unwrap());
    println!("{}", ws_check(addr, "localhost", "").unwrap());
    let a = proxy_request(addr, "GET /missing HTTP/1.1\r\nHost: localhost", &[]).unwrap();
    assert_eq!(a.0, 404);
}

/// The build test's recipe parses to what the checks expect (no guest needed).
#[test]
fn stack_recipe_parses() {
    let r = proto::recipe::parse(RECIPE.as_bytes()).unwrap();
    assert_eq!(r.from, BASE_NAME);
    assert_eq!(r.user.as_deref(), Some("app"));
    assert_eq!(r.workdir.as_deref(), Some("/srv/site"));
    assert_eq!(
        r.env.get("GREETING").map(String::as_str),
        Some("hello-from-recipe")
    );
    assert_eq!(r.steps.len(), 6);
    assert!(r.start.is_some());
    let h = r.healthcheck.unwrap();
    assert_eq!(h.value.retries, 60);
}

/// The guest's MMDS client for [`stack_mmds_identity`]: bash and its builtins only (one
/// dynamically linked program, started once; `/dev/tcp` for the connections), MMDS V2 as
/// envd talks to it (`envd/src/mmds.rs`). `$1`, `$2`: MMDS's address and port. It prints
/// the routes (`/proc/net/route`, for when MMDS cannot be reached), then one line per
/// exchange: the token `PUT`, `GET /wrenn` without a token, with a wrong one, and with the
/// token (`Accept: application/json`), whose body it prints between `json-begin` and
/// `json-end` lines. Every read waits at most 20 s; one request per connection.
const MMDS_SH: &str = r#"LC_ALL=C
A=$1 P=$2
# Microseconds (bash 5's EPOCHREALTIME; 0 without it): how long the exchanges took, apart
# from bash's own start.
us() { local t=${EPOCHREALTIME:-0}; US=${t//[.,]/}; }
us; S=$US
while read -r i d g f r; do
  [ "$i" = Iface ] || echo "route $i dst=$d gw=$g flags=$f"
done < /proc/net/route
req() {
  STATUS= BODY=
  local m=$1 p=$2 line len=0 h= x t0 tc tl
  us; t0=$US
  shift 2
  for x in "$@"; do h+="$x"$'\r\n'; done
  exec 3<>"/dev/tcp/$A/$P" || { echo "$m $p: connect $A:$P failed"; return 1; }
  us; tc=$US
  printf '%s %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n' "$m" "$p" "$A" "$h" >&3
  if ! IFS= read -r -t 20 line <&3; then echo "$m $p: no answer"; exec 3<&-; return 1; fi
  us; tl=$US
  line=${line%$'\r'}
  STATUS=${line#* }
  STATUS=${STATUS%% *}
  while IFS= read -r -t 20 line <&3; do
    line=${line%$'\r'}
    [ -z "$line" ] && break
    case ${line,,} in content-length:*) len=${line#*:}; len=${len//[!0-9]/} ;; esac
  done
  [ "${len:-0}" -gt 0 ] && IFS= read -r -t 20 -N "$len" BODY <&3
  exec 3<&-
  us
  echo "$m $p: status $STATUS, ${#BODY} of ${len:-0} bytes in $((US - t0)) us" \
    "(connected after $((tc - t0)), status line after $((tl - tc)), rest $((US - tl)))"
}
req PUT /latest/api/token 'X-metadata-token-ttl-seconds: 60' 'Content-Length: 0' || exit 2
[ "$STATUS" = 200 ] || { echo "token refused: $BODY"; exit 3; }
T=${BODY%%[$'\r\n']*}
req GET /wrenn 'Accept: application/json' || exit 4
echo "no token: $STATUS"
req GET /wrenn 'Accept: application/json' "X-metadata-token: ${T}x" || exit 4
echo "wrong token: $STATUS"
req GET /wrenn 'Accept: application/json' "X-metadata-token: $T" || exit 5
echo "with token: $STATUS"
printf 'json-begin\n%s\njson-end\n' "$BODY"
us
echo "script: $((US - S)) us after its first line"
"#;

/// What [`MMDS_SH`] saw: the statuses without a token, with a wrong one and with the token,
/// and the JSON the last one returned.
#[derive(Debug)]
struct MmdsSeen {
    no_token: String,
    wrong_token: String,
    with_token: String,
    json: serde_json::Value,
}

/// Reads [`MMDS_SH`]'s output; the reason when a part is missing or not JSON.
fn mmds_seen(out: &str) -> Result<MmdsSeen, String> {
    let after = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| format!("no {k:?} line"))
    };
    let (_, rest) = out.split_once("json-begin\n").ok_or("no json-begin line")?;
    let (body, _) = rest.rsplit_once("\njson-end").ok_or("no json-end line")?;
    Ok(MmdsSeen {
        no_token: after("no token: ")?,
        wrong_token: after("wrong token: ")?,
        with_token: after("with token: ")?,
        json: serde_json::from_str(body).map_err(|e| format!("body {body:?}: {e}"))?,
    })
}

/// The checks of [`stack_mmds_identity`] on what the script saw: V2 (no token and a wrong
/// token are 401), and `/wrenn` is exactly the sandbox's id, its template's id and the
/// labels given at create.
fn mmds_check(
    seen: &MmdsSeen,
    sandbox_id: &str,
    template_id: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), String> {
    let mut bad = Vec::new();
    for (what, got, want) in [
        ("GET without a token", &seen.no_token, "401"),
        ("GET with a wrong token", &seen.wrong_token, "401"),
        ("GET with the token", &seen.with_token, "200"),
    ] {
        if got != want {
            bad.push(format!("{what}: status {got} (wanted {want})"));
        }
    }
    // `GET /wrenn` answers the value under that key of the agent's data store
    // (`{"wrenn": {...}}`, `mmds_data`), not the whole store.
    let want = serde_json::json!({
        "sandbox_id": sandbox_id,
        "template_id": template_id,
        "metadata": labels,
    });
    if seen.json != want {
        bad.push(format!("/wrenn is {} (wanted {want})", seen.json));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

/// Issue 15 §4: a sandbox created through ctl with metadata labels reads its identity from
/// Firecracker's MMDS (V2, configured by the agent at every restore): one exec of
/// [`MMDS_SH`] in the guest gets a session token, is refused without it (401, so V2 is on)
/// and with a wrong one, and with it reads `/wrenn`: the sandbox's id, its template's id and
/// exactly the labels given.
#[test]
fn stack_mmds_identity() {
    let Some(inp) = inputs() else { return };
    let Some(st) = Stack::start(&inp) else { return };
    if no_guest("MMDS in a guest") {
        return;
    }
    let cl = st.team();
    let labels: BTreeMap<String, String> = [
        ("purpose".to_owned(), "mmds-e2e".to_owned()),
        ("n".to_owned(), proto::random::hex(8).unwrap()),
    ]
    .into();
    let t0 = Instant::now();
    let sb: c::Sandbox = cl
        .unary(
            c::sandboxes_methods::CREATE,
            &c::CreateSandboxRequest {
                template: BASE_NAME.into(),
                timeout_s: 3600,
                metadata: labels.clone().into_iter().collect(),
                ..Default::default()
            },
            Some(GUEST_CALL),
        )
        .unwrap_or_else(|e| panic!("create from {BASE_NAME}: {e}"));
    let create = t0.elapsed();
    println!("mmds: created {} from {BASE_NAME} in {create:?}", sb.id);
    let tpl = proto::id::format_template(proto::id::Uuid::from_u128(BASE_TEMPLATE));
    assert_eq!(sb.template_id, tpl);
    assert_eq!(
        sb.metadata.clone().into_iter().collect::<BTreeMap<_, _>>(),
        labels
    );
    let t = Instant::now();
    let r: c::ExecResponse = cl
        .unary(
            c::processes_methods::EXEC,
            &c::ExecRequest {
                sandbox_id: sb.id.clone(),
                process: Some(envd::ProcessConfig {
                    cmd: "/bin/bash".into(),
                    args: vec![
                        "-c".into(),
                        MMDS_SH.into(),
                        "mmds".into(),
                        "169.254.169.254".into(),
                        "80".into(),
                    ],
                    // bash's start (10-60 s of guest CPU here) and five reads of 20 s at most.
                    timeout_ms: 300_000,
                    ..Default::default()
                }),
                ..Default::default()
            },
            Some(GUEST_CALL),
        )
        .unwrap_or_else(|e| panic!("exec the MMDS script in {}: {e}", sb.id));
    let code = match r.exited.and_then(|e| e.status) {
        Some(envd::process_exited::Status::ExitCode(c)) => c,
        Some(envd::process_exited::Status::Signal(s)) => 128 + s,
        None => -1,
    };
    let (out, err) = (
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr),
    );
    println!(
        "mmds: the guest's script: exit {code} after {:?} (the guest's own time {} ms)\n{out}{err}",
        t.elapsed(),
        r.duration_ns / 1_000_000
    );
    let result = if code == 0 {
        mmds_seen(&out).and_then(|seen| mmds_check(&seen, &sb.id, &tpl, &labels))
    } else {
        Err(format!("the script exited {code}"))
    };
    if let Err(e) = result {
        // The agent's side: its MMDS lines for this sandbox (a failed data store is logged).
        let log = std::fs::read_to_string(&st.agent_log).unwrap_or_default();
        for l in log
            .lines()
            .filter(|l| l.contains("mmds") && l.contains(&sb.id))
        {
            println!("agent: {l}");
        }
        panic!("MMDS in the guest of {}: {e}\n{out}{err}", sb.id);
    }
    println!(
        "mmds: ok: /wrenn has {} and {tpl} with labels {labels:?}; 401 without a token and \
         with a wrong one; create {create:?}, exec {:?}",
        sb.id,
        t.elapsed()
    );
    drop(st);
}

/// [`MMDS_SH`] and its checks on the host's bash against a stand-in for Firecracker's MMDS
/// V2 (tokens, 401 without one, JSON with `Accept: application/json`), so the script and the
/// parsing are tested everywhere; and a wrong identity or a V1 service fails the checks.
#[test]
fn stack_mmds_script_on_the_host() {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let labels: BTreeMap<String, String> =
        [("purpose".to_owned(), "mmds-e2e \"q\"".to_owned())].into();
    // As Firecracker answers `GET /wrenn`: the object under the store's "wrenn" key.
    let body = serde_json::json!({
        "sandbox_id": "sb-1",
        "template_id": "tpl-2",
        "metadata": labels,
    })
    .to_string();
    let served = body.clone();
    let server = std::thread::spawn(move || {
        let mut heads = Vec::new();
        // The script's four requests, one per connection.
        for _ in 0..4 {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(s.read(&mut b).unwrap(), 1, "closed inside a request head");
                head.push(b[0]);
            }
            let head = String::from_utf8(head).unwrap();
            let (status, body) = if head.starts_with("PUT /latest/api/token HTTP/1.1\r\n")
                && head.contains("\r\nX-metadata-token-ttl-seconds: 60\r\n")
            {
                (200, "tok-123".to_owned())
            } else if !head.contains("\r\nX-metadata-token: tok-123\r\n") {
                (401, "No MMDS token provided.".to_owned())
            } else if head.starts_with("GET /wrenn HTTP/1.1\r\n")
                && head.contains("\r\nAccept: application/json\r\n")
            {
                (200, served.clone())
            } else {
                (404, String::new())
            };
            write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            heads.push(head);
        }
        heads
    });
    let out = match Command::new("bash")
        .args(["-c", MMDS_SH, "mmds", "127.0.0.1", &port.to_string()])
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            skip(&format!("the MMDS script on the host: no bash ({e})"));
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{:?}", out.status);
    let heads = server.join().unwrap();
    assert_eq!(heads.len(), 4);
    let seen = mmds_seen(&text).unwrap();
    mmds_check(&seen, "sb-1", "tpl-2", &labels).unwrap();
    // The checks fail on another sandbox, other labels, and a service without tokens.
    assert!(mmds_check(&seen, "sb-9", "tpl-2", &labels).is_err());
    let mut more = labels.clone();
    more.insert("extra".into(), "x".into());
    assert!(mmds_check(&seen, "sb-1", "tpl-2", &more).is_err());
    let nested = MmdsSeen {
        json: serde_json::json!({"wrenn": seen.json.clone()}),
        no_token: seen.no_token.clone(),
        wrong_token: seen.wrong_token.clone(),
        with_token: seen.with_token.clone(),
    };
    assert!(mmds_check(&nested, "sb-1", "tpl-2", &labels).is_err());
    let v1 = MmdsSeen {
        no_token: "200".into(),
        ..seen
    };
    assert!(mmds_check(&v1, "sb-1", "tpl-2", &labels).is_err());
    // Nothing listening: the script says so and fails, it does not hang.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    let t = Instant::now();
    let out = Command::new("bash")
        .args(["-c", MMDS_SH, "mmds", "127.0.0.1", &dead.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("connect 127.0.0.1"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(mmds_seen(&text).is_err());
}
