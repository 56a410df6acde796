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
//! `WRENN_STACK_NO_GUEST=1`: the build test only starts the stack (registration, adoption)
//! and boots no guest, for checking the wiring while another run holds the guest lock.
//!
//! - [`stack_template_build_on_firecracker`] (issue 17 §1): `Templates/Build` of a recipe
//!   that copies files from the context, runs commands, sets ENV/WORKDIR/USER, STARTs a
//!   server and HEALTHCHECKs it; a sandbox from the result answers on that server, has the
//!   files, and runs its processes as that user in that directory with that environment.
//! - [`stack_create_latency`] (issue 15 §1, opt-in with `WRENN_STACK_LATENCY=1`): creates
//!   from the base template through ctl's API, 1, 4 and 10 at once (`WRENN_STACK_LEVELS`),
//!   `WRENN_STACK_ROUNDS` rounds per level (default 20; one number, or one per level), each
//!   to its first exec answered
//!   (envd's own `--version`, a static binary); p50 and max, with the agent's phases.

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

#[test]
fn stack_template_build_on_firecracker() {
    let Some(inp) = inputs() else { return };
    let Some(st) = Stack::start(&inp) else { return };
    if std::env::var("WRENN_STACK_NO_GUEST").as_deref() == Ok("1") {
        println!("skipped: the build on a guest (WRENN_STACK_NO_GUEST=1: registration only)");
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
         jailed {}, backend {}",
        inp.jailer.is_some(),
        if inp.uffd.is_some() { "uffd" } else { "file" }
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
