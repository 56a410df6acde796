//! End-to-end with a real Firecracker. Needs root, /dev/kvm, `WRENN_FIRECRACKER`,
//! `WRENN_KERNEL` and `WRENN_ROOTFS` (an image with envd as init); else `skipped` (a failure
//! under `WRENN_REQUIRE_E2E=1`). Optional: `WRENN_BOOT_ARGS` (extra kernel arguments, e.g. the
//! nested-hypervisor workarounds of test hosts), `WRENN_UFFD_BIN` (else `wrenn-uffd` next to
//! the test's target directory; without it the File backend is used), `WRENN_E2E_ROOT`
//! (state root, default /var/tmp/wrenn-agent-e2e: the booted base snapshot template is kept
//! there and reused, since a cold boot takes minutes on nested KVM), `WRENN_E2E_PAUSE_S`
//! (default 60), `WRENN_E2E_CYCLES` (pause/resume cycles, default 20), `WRENN_JAILER` (the
//! suite runs jailed, with the checks of `e2e_jail.rs`; unset, unjailed, said visibly),
//! `WRENN_E2E_PREJAIL_TEMPLATE` (a template directory made by an `--unjailed` agent: it is
//! imported and restored jailed), `WRENN_E2E_SECCOMP=1` (Firecracker has seccomp filters),
//! `WRENN_E2E_SELFTEST=0` (leave out the guest copy self-test; `WRENN_E2E_SELFTEST_MIB` and
//! `WRENN_E2E_SELFTEST_ROUNDS` size it).
//!
//! One test runs the whole story in order, since the host has few cores and one guest boot
//! takes minutes: template (cached) -> sandbox from it -> exec, file, background counter ->
//! pause >= 60 s -> resume (file, counter continued, clock) -> three sandboxes from the
//! template in parallel -> N pause/resume cycles with checksums of a disk file and of memory
//! (/dev/shm), including a region zeroed after a resume -> agent kill -9 with two sandboxes
//! running, restart, both re-adopted -> a pause and a resume through the File backend ->
//! destroy all -> nothing left on the host. Jailed, each running sandbox's processes and
//! files are checked along the way (uid, chroot, cgroup, seccomp, what another sandbox's uid
//! can open) and after the destroy no chroot, cgroup, jailed process or mount is left. Right after
//! the first exec, the guest runs `envd selftest` (the image's envd, or `WRENN_ENVD_BIN`
//! uploaded), which says whether user-space or kernel copies corrupt bytes in the guest.
//! Every file written and read through Files carries the end-to-end CRC-32.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent::flags::RestoreBackend;
use agent::host::{Host, IdentityCell};
use agent::statedir::Identity;
use proto::gen::wrenn::agent::v1 as pb;
use proto::gen::wrenn::envd::v1 as envd;
use proto::id::{self, Uuid};
use proto::rpc::{Client, Credential, Server, ServerConfig};

use crate::skip;

const TOKEN: &str = "e2e-agent-token";
/// Deadline of one exec or file transfer in a guest: minutes when the host's two cores are
/// shared by several guests and builds (a 4 MiB write took over 300 s under load 11).
const GUEST_CALL_TIMEOUT: Duration = Duration::from_secs(900);
const TEMPLATE: u128 = 0xe2e0_0000_0000_0000_0000_0000_0000_0001;
/// A template made by an unjailed Firecracker (`WRENN_E2E_PREJAIL_TEMPLATE`), imported.
const PREJAIL_TEMPLATE: u128 = 0xe2e0_0000_0000_0000_0000_0000_0000_0002;

struct Inputs {
    fc: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    uffd: Option<PathBuf>,
    /// `WRENN_JAILER`: the suite runs jailed; unset, unjailed (said so visibly).
    jailer: Option<PathBuf>,
    boot_args: String,
    root: PathBuf,
}

/// The jail's uid range in this suite: not the agent's default (900000 + 4096), which an
/// agent on the same host (a system agent, `wrenn up`, other tests) uses.
const E2E_UID_BASE: u32 = 960_000;
const E2E_UID_COUNT: u32 = 64;
const E2E_UFFD_UID: u32 = E2E_UID_BASE + E2E_UID_COUNT;

fn inputs() -> Option<Inputs> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let (Some(fc), Some(kernel), Some(rootfs)) = (
        var("WRENN_FIRECRACKER"),
        var("WRENN_KERNEL"),
        var("WRENN_ROOTFS"),
    ) else {
        skip("WRENN_FIRECRACKER, WRENN_KERNEL and WRENN_ROOTFS must all be set");
        return None;
    };
    for p in [&fc, &kernel, &rootfs] {
        if !p.is_file() {
            skip(&format!("{} is not a file", p.display()));
            return None;
        }
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !uid {
        skip("needs root");
        return None;
    }
    if !Path::new("/dev/kvm").exists() {
        skip("no /dev/kvm");
        return None;
    }
    let uffd = var("WRENN_UFFD_BIN").or_else(|| {
        let exe = std::env::current_exe().ok()?;
        let p = exe.parent()?.parent()?.join("wrenn-uffd");
        p.is_file().then_some(p)
    });
    let jailer = var("WRENN_JAILER").filter(|j| j.is_file());
    if jailer.is_none() {
        println!("e2e: WRENN_JAILER not set: Firecracker runs unjailed and the jail checks skip");
    }
    Some(Inputs {
        fc,
        kernel,
        rootfs,
        uffd,
        jailer,
        boot_args: std::env::var("WRENN_BOOT_ARGS").unwrap_or_default(),
        root: var("WRENN_E2E_ROOT").unwrap_or_else(|| "/var/tmp/wrenn-agent-e2e".into()),
    })
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn sb(n: u128) -> String {
    id::format_sandbox(Uuid::from_u128(n))
}

/// Runs `sh -c script` in a sandbox through the agent; retries a crash at start (a quirk of
/// guests on nested KVM), never a wrong answer.
fn sh(c: &Client, n: u128, script: &str) -> (i32, String) {
    for attempt in 0..4 {
        let r = c.unary::<_, pb::ExecResponse>(
            pb::processes_methods::EXEC,
            &pb::ExecRequest {
                sandbox_id: sb(n),
                process: Some(envd::ProcessConfig {
                    cmd: "/bin/sh".into(),
                    args: vec!["-c".into(), script.into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
            Some(GUEST_CALL_TIMEOUT),
        );
        match r {
            Ok(resp) => {
                let status = resp.exited.and_then(|e| e.status);
                match status {
                    Some(envd::process_exited::Status::ExitCode(code)) => {
                        return (code, String::from_utf8_lossy(&resp.stdout).into_owned())
                    }
                    Some(envd::process_exited::Status::Signal(sig)) => {
                        println!("attempt {attempt}: {script:?} killed by signal {sig}; retrying")
                    }
                    None => println!("attempt {attempt}: no exit status"),
                }
            }
            Err(e) => println!("attempt {attempt}: exec failed: {e}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("{script:?} never ran in sandbox {n}");
}

/// The background counter's value. Its writer truncates the file before writing the new
/// number, so a read can land in between and see nothing: read again then.
fn read_counter(c: &Client, n: u128) -> u64 {
    for _ in 0..5 {
        let out = sh_ok(c, n, "cat /tmp/counter");
        if let Ok(v) = out.trim().parse() {
            return v;
        }
        println!("counter read {out:?} (between the writer's truncate and write); again");
    }
    panic!("the counter file never held a number");
}

fn sh_ok(c: &Client, n: u128, script: &str) -> String {
    let (code, out) = sh(c, n, script);
    assert_eq!(code, 0, "{script:?} exited {code}: {out}");
    out
}

fn call<Req: prost::Message, Resp: prost::Message + Default>(
    c: &Client,
    method: &str,
    req: &Req,
) -> Resp {
    c.unary(method, req, Some(Duration::from_secs(900)))
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

fn create_from(
    c: &Client,
    n: u128,
    tpl: u128,
    kind: proto::sandbox::TemplateKind,
) -> pb::SandboxInfo {
    call(
        c,
        pb::sandboxes_methods::CREATE,
        &proto::sandbox::SandboxSpec {
            sandbox_id: sb(n),
            template_id: id::format_template(Uuid::from_u128(tpl)),
            template_kind: kind as i32,
            memory_mib: 256,
            timeout_s: 3600,
            // The story writes under /root: root, whether or not the image has `user`.
            default_user: "root".into(),
            ..Default::default()
        },
    )
}

/// An agent in this process (library, real Firecracker VM layer) serving RPC on TCP.
struct InProcess {
    addr: std::net::SocketAddr,
    handle: proto::rpc::ServerHandle,
    manager: Arc<agent::manager::Manager>,
    join: std::thread::JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    /// What a kill -9 leaves: the server stops and everything the agent held in memory
    /// (its slot resolver's sockets included) is released, with no cleanup of sandboxes,
    /// slots or files (Firecracker and wrenn-uffd run in their own sessions).
    fn die(self) {
        self.handle.shutdown();
        let _ = self.join.join();
        let weak = Arc::downgrade(&self.manager);
        drop(self.manager);
        let end = Instant::now() + Duration::from_secs(30);
        while weak.strong_count() > 0 {
            assert!(
                Instant::now() < end,
                "the stopped agent's manager is still referenced ({} holders)",
                weak.strong_count()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn start_in_process(inp: &Inputs) -> InProcess {
    let identity = Arc::new(IdentityCell::new(Some(Identity {
        host_id: Uuid::from_u128(1),
        host_token: "h".into(),
        agent_token: TOKEN.into(),
    })));
    let vmm = Arc::new(agent::firecracker::FirecrackerVmm::new(
        agent::firecracker::FcConfig {
            firecracker: inp.fc.clone(),
            kernel: Some(inp.kernel.clone()),
            uffd_bin: inp.uffd.clone(),
            backend: if inp.uffd.is_some() {
                RestoreBackend::Uffd
            } else {
                RestoreBackend::File
            },
            boot_args_extra: inp.boot_args.clone(),
            state_root: inp.root.clone(),
            console: std::env::var("WRENN_BOOT_CONSOLE").as_deref() == Ok("1"),
            // Its own slot names and addresses: other agents may run on this host.
            net: vmm_glue::net::NetConfig::new("wre2e", "10.213.0.0".parse().unwrap()).unwrap(),
            dns_upstream: agent::flags::DnsUpstream::ResolvConf,
            jail: inp.jailer.as_ref().map(|j| agent::firecracker::JailConfig {
                jailer: j.clone(),
                chroot_base: inp.root.join("jail"),
                uffd_uid: E2E_UFFD_UID,
            }),
        },
    ));
    let mut cfg = agent::manager::Config::new(&inp.root);
    cfg.slot_capacity = 64;
    if inp.jailer.is_some() {
        cfg.jail_uids = Some(agent::uid_pool::UidRange {
            base: E2E_UID_BASE,
            count: E2E_UID_COUNT,
        });
        cfg.jail_chroot_base = Some(inp.root.join("jail"));
    }
    let m = agent::manager::Manager::new(
        cfg,
        vmm,
        Arc::new(agent::ttl::SystemClock),
        Arc::new(agent::manager::NoEvents),
    )
    .unwrap();
    let decisions = m.recover();
    println!("recovered: {decisions:?}");
    let host = Arc::new(Host {
        manager: m.clone(),
        identity: identity.clone(),
        extra_problems: Vec::new(),
        overcommit: Default::default(),
    });
    let problems = host.problems();
    assert!(problems.is_empty(), "host problems: {problems:?}");
    let svc = agent::rpc::AgentService::new(m.clone(), host, identity).unwrap();
    let mut server = Server::new(ServerConfig::new("wrenn-agent"), Arc::new(svc)).unwrap();
    let addr = server.listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let (handle, join) = server.spawn().unwrap();
    InProcess {
        addr,
        handle,
        manager: m,
        join,
    }
}

/// The base snapshot template, booted once and kept in the state root.
fn ensure_template(inp: &Inputs, c: &Client) {
    let tdir = inp
        .root
        .join("templates")
        .join(Uuid::from_u128(TEMPLATE).hyphenated().to_string());
    if tdir.join("template.conf").exists() {
        println!("reusing the snapshot template in {}", tdir.display());
        return;
    }
    // A guest's PID 1 now and then dies on its first steps on nested KVM (the kernel then
    // panics and Firecracker exits): the cold boot may be retried, nothing after it.
    let mut attempt = 0;
    let info = loop {
        attempt += 1;
        let t0 = Instant::now();
        let r = c.unary::<_, pb::SandboxInfo>(
            pb::sandboxes_methods::CREATE,
            &proto::sandbox::SandboxSpec {
                sandbox_id: sb(1),
                template_id: id::format_template(Uuid::nil()),
                template_kind: proto::sandbox::TemplateKind::Base as i32,
                memory_mib: 256,
                timeout_s: 3600,
                default_user: "root".into(),
                ..Default::default()
            },
            Some(Duration::from_secs(900)),
        );
        match r {
            Ok(info) => {
                println!("cold boot took {:?}: {info:?}", t0.elapsed());
                break info;
            }
            Err(e) if attempt < 3 => println!("cold boot attempt {attempt} failed: {e}"),
            Err(e) => panic!("cold boot failed {attempt} times; last: {e}"),
        }
    };
    assert_eq!(info.state, proto::sandbox::SandboxState::Running as i32);
    assert_eq!(sh_ok(c, 1, "echo hi").trim(), "hi");
    let t1 = Instant::now();
    let t: pb::TemplateInfo = call(
        c,
        pb::templates_methods::CREATE,
        &pb::CreateTemplateRequest {
            sandbox_id: sb(1),
            template_id: id::format_template(Uuid::from_u128(TEMPLATE)),
        },
    );
    println!("template took {:?}: {t:?}", t1.elapsed());
    let _: pb::DestroySandboxResponse = call(
        c,
        pb::sandboxes_methods::DESTROY,
        &pb::DestroySandboxRequest { sandbox_id: sb(1) },
    );
}

/// A template made before the jail (by an unjailed Firecracker: `WRENN_E2E_PREJAIL_TEMPLATE`,
/// a template directory of such an agent) restores under the jail: its VM state names the
/// same disk path, and its sockets are overridden at load.
fn prejail_template_restores_jailed(
    inp: &Inputs,
    c: &Client,
    jail: Option<&crate::e2e_jail::Jail>,
) {
    let Some(j) = jail else { return };
    let Some(from) = std::env::var_os("WRENN_E2E_PREJAIL_TEMPLATE").map(PathBuf::from) else {
        println!(
            "skipped: restoring a pre-jail template jailed (set WRENN_E2E_PREJAIL_TEMPLATE to \
             a template directory made by an --unjailed agent)"
        );
        return;
    };
    crate::e2e_jail::import_template(&from, &inp.root, PREJAIL_TEMPLATE);
    let t = Instant::now();
    let info = create_from(
        c,
        30,
        PREJAIL_TEMPLATE,
        proto::sandbox::TemplateKind::Snapshot,
    );
    println!("create from the pre-jail template took {:?}", t.elapsed());
    assert_eq!(info.state, proto::sandbox::SandboxState::Running as i32);
    j.check_running(30, 1, 256);
    assert_eq!(sh_ok(c, 30, "echo prejail").trim(), "prejail");
    let _: pb::DestroySandboxResponse = call(
        c,
        pb::sandboxes_methods::DESTROY,
        &pb::DestroySandboxRequest { sandbox_id: sb(30) },
    );
    assert!(!j.chroot(30).exists(), "chroot of a destroyed sandbox left");
}

/// Issue 15 §1 on real Firecracker: an agent with `--restore-backend file` creates two clones
/// of the snapshot template; both Firecrackers map the template's one memory file (its inode
/// in their /proc/<pid>/maps), which is root's and 0444; no clone has a memory file of its
/// own; jailed, the chroot's /restore/memory is that inode. (The template was published by
/// the uffd agent above, so the first create writes the file, once.)
fn file_backend_clones_map_the_template_file(
    inp: &Inputs,
    c: &Client,
    jail: Option<&crate::e2e_jail::Jail>,
) {
    use std::os::unix::fs::MetadataExt;
    let clones = [40u128, 41];
    for n in clones {
        create_from(c, n, TEMPLATE, proto::sandbox::TemplateKind::Snapshot);
        assert_eq!(sh_ok(c, n, "echo clone").trim(), "clone");
    }
    let tmem = inp
        .root
        .join("templates")
        .join(Uuid::from_u128(TEMPLATE).hyphenated().to_string())
        .join("memory");
    let m = std::fs::metadata(&tmem).expect("the template's memory file");
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o444));
    let ino = m.ino().to_string();
    let mut mapping = 0;
    for n in clones {
        let dir = inp
            .root
            .join("sandboxes")
            .join(Uuid::from_u128(n).hyphenated().to_string());
        assert!(!dir.join("snapshot/memory").exists(), "a copy for sb {n}");
        if let Some(j) = jail {
            let linked = std::fs::metadata(j.chroot(n).join("restore/memory")).unwrap();
            assert_eq!(linked.ino(), m.ino(), "linked into the chroot of sb {n}");
        }
        // Jailed Firecrackers are found through their chroots; unjailed, through the
        // sandbox directory they name.
        let pids = match jail {
            Some(j) => vec![j.firecracker_pid(n) as i32],
            None => firecrackers_under(&dir),
        };
        let maps_it = pids.into_iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/maps"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.split_whitespace().nth(4) == Some(ino.as_str()))
        });
        mapping += usize::from(maps_it);
    }
    assert_eq!(
        mapping,
        clones.len(),
        "Firecrackers mapping the template's inode"
    );
    println!("file backend: {mapping} clone Firecrackers map the template's memory inode {ino}");
}

fn firecrackers_under(dir: &Path) -> Vec<i32> {
    agent::manager::stray_processes(dir, &[])
        .into_iter()
        .map(|p| p.pid)
        .collect()
}

/// Writes `data` at `offset` of a guest file through the agent's Files.Write (envd only: no
/// guest process starts, which is slow on nested KVM).
fn write_file(c: &Client, n: u128, path: &str, offset: u64, truncate: bool, data: &[u8]) {
    use proto::rpc::CallOpts;
    let mut w = c
        .call(
            pb::files_methods::WRITE,
            &pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                    sandbox_id: sb(n),
                    file: Some(envd::WriteHeader {
                        path: path.into(),
                        offset,
                        truncate,
                        ..Default::default()
                    }),
                })),
            },
            CallOpts {
                timeout: Some(GUEST_CALL_TIMEOUT),
                end_stream: false,
            },
        )
        .unwrap();
    for chunk in data.chunks(64 * 1024) {
        w.send(&pb::WriteRequest {
            msg: Some(pb::write_request::Msg::Data(chunk.to_vec().into())),
        })
        .unwrap();
    }
    // End to end: envd checks the bytes it got (DATA_LOSS otherwise).
    w.send(&pb::WriteRequest {
        msg: Some(pb::write_request::Msg::Crc32(crc32fast::hash(data))),
    })
    .unwrap();
    w.close_send().unwrap();
    let r: envd::WriteResponse = w.recv().unwrap().unwrap();
    assert_eq!(r.bytes_written, data.len() as u64);
}

/// Reads a whole guest file through Files.Read.
fn read_file(c: &Client, n: u128, path: &str) -> Vec<u8> {
    use proto::rpc::CallOpts;
    let mut r = c
        .call(
            pb::files_methods::READ,
            &pb::ReadRequest {
                sandbox_id: sb(n),
                read: Some(envd::ReadRequest {
                    path: path.into(),
                    ..Default::default()
                }),
            },
            CallOpts {
                timeout: Some(GUEST_CALL_TIMEOUT),
                end_stream: true,
            },
        )
        .unwrap();
    let mut out = Vec::new();
    let mut crc = None;
    while let Some(m) = r.recv::<envd::ReadResponse>().unwrap() {
        out.extend_from_slice(&m.data);
        crc = crc.or(m.crc32);
    }
    // End to end: the bytes are those envd read (a changed byte on the way shows here).
    if let Some(crc) = crc {
        assert_eq!(
            crc,
            crc32fast::hash(&out),
            "{path}: download checksum mismatch"
        );
    }
    out
}

/// Destroys every sandbox the agent has.
fn destroy_all(c: &Client) {
    let all: pb::ListSandboxesResponse = call(
        c,
        pb::sandboxes_methods::LIST,
        &pb::ListSandboxesRequest { states: vec![] },
    );
    for s in all.sandboxes {
        let _: pb::DestroySandboxResponse = call(
            c,
            pb::sandboxes_methods::DESTROY,
            &pb::DestroySandboxRequest {
                sandbox_id: s.sandbox_id,
            },
        );
    }
}

/// The copy self-test (`envd selftest`) in a real guest: user-space copies the way envd
/// makes them, and kernel-only copies, compared with their source. Uses the image's envd,
/// or `WRENN_ENVD_BIN` (a static build) uploaded into the guest first. Prints the report;
/// fails, naming the corrupting kind of copy, when any corrupted.
fn selftest_in_guest(c: &Client, n: u128) {
    use proto::rpc::CallOpts;
    let bin = match std::env::var_os("WRENN_ENVD_BIN") {
        Some(local) => {
            let bytes = std::fs::read(&local).unwrap();
            let mut w = c
                .call(
                    pb::files_methods::WRITE,
                    &pb::WriteRequest {
                        msg: Some(pb::write_request::Msg::Header(pb::WriteHeader {
                            sandbox_id: sb(n),
                            file: Some(envd::WriteHeader {
                                path: "/root/envd-selftest".into(),
                                user: "root".into(),
                                mode: Some(0o755),
                                atomic: true,
                                ..Default::default()
                            }),
                        })),
                    },
                    CallOpts {
                        timeout: Some(GUEST_CALL_TIMEOUT),
                        end_stream: false,
                    },
                )
                .unwrap();
            for chunk in bytes.chunks(64 * 1024) {
                w.send(&pb::WriteRequest {
                    msg: Some(pb::write_request::Msg::Data(chunk.to_vec().into())),
                })
                .unwrap();
            }
            w.send(&pb::WriteRequest {
                msg: Some(pb::write_request::Msg::Crc32(crc32fast::hash(&bytes))),
            })
            .unwrap();
            w.close_send().unwrap();
            let _: envd::WriteResponse = w.recv().unwrap().unwrap();
            "/root/envd-selftest"
        }
        None => "/usr/local/bin/envd",
    };
    // On the guest's disk (where the corrupted upload was found) and in its memory (tmpfs:
    // its files take guest memory too, so fewer bytes; the guest has 256 MiB, the test holds
    // about three copies of a round's bytes).
    // Sizes: `WRENN_E2E_SELFTEST_MIB` per round (default 4) and `WRENN_E2E_SELFTEST_ROUNDS`
    // (default 2): on nested KVM a guest moves a few MiB a minute through its disk, so the
    // defaults are small; real hosts can ask for more.
    let env_u32 = |k: &str, d: u32| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mib = env_u32("WRENN_E2E_SELFTEST_MIB", 4);
    let rounds = env_u32("WRENN_E2E_SELFTEST_ROUNDS", 2);
    for dir in ["/root", "/dev/shm"] {
        let t = Instant::now();
        let (code, out) = sh(
            c,
            n,
            &format!("{bin} selftest --dir {dir} --mib {mib} --rounds {rounds} --threads 2 2>&1"),
        );
        println!(
            "envd selftest in {dir} took {:?}, exit {code}:\n{out}",
            t.elapsed()
        );
        let verdict = out
            .lines()
            .find(|l| l.starts_with("selftest verdict="))
            .unwrap_or("no verdict (an envd without the selftest subcommand?)");
        assert_eq!(code, 0, "guest copy self-test in {dir}: {verdict}");
    }
}

/// A small deterministic generator (xorshift), seeded per cycle.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn e2e_lifecycle_on_firecracker() {
    let Some(inp) = inputs() else { return };
    // The in-process agent's log on stderr (level from WRENN_LOG, default info).
    proto::logger::init();
    std::fs::create_dir_all(
        inp.root
            .join("templates/00000000-0000-0000-0000-000000000000"),
    )
    .unwrap();
    let base = inp
        .root
        .join("templates/00000000-0000-0000-0000-000000000000/rootfs.ext4");
    if !base.exists() {
        vmm_glue::disk::clone_disk(&inp.rootfs, &base).unwrap();
    }
    // Sandboxes of an earlier, interrupted run are cleaned up by recovery + destroy below.
    let agent = start_in_process(&inp);
    let c = Client::connect_tcp(agent.addr, Credential::agent_token(TOKEN)).unwrap();
    for s in agent.manager.list(&[]) {
        let _ = agent
            .manager
            .destroy(id::parse_sandbox(&s.sandbox_id).unwrap());
    }
    ensure_template(&inp, &c);
    let jail = inp.jailer.as_ref().map(|_| crate::e2e_jail::Jail {
        root: inp.root.clone(),
        firecracker: inp.fc.clone(),
        uid_base: E2E_UID_BASE,
        uid_count: E2E_UID_COUNT,
        uffd_uid: E2E_UFFD_UID,
    });
    prejail_template_restores_jailed(&inp, &c, jail.as_ref());

    // A sandbox from the template: exec, a file, a background counter in memory.
    let t0 = Instant::now();
    let info = create_from(&c, 10, TEMPLATE, proto::sandbox::TemplateKind::Snapshot);
    println!("create from template took {:?}", t0.elapsed());
    assert_eq!(info.state, proto::sandbox::SandboxState::Running as i32);
    if let Some(j) = &jail {
        j.check_running(10, 1, 256);
        if inp.uffd.is_some() {
            j.check_page_server(10);
        }
    }
    assert_eq!(sh_ok(&c, 10, "echo hi").trim(), "hi");
    sh_ok(&c, 10, "echo persisted > /root/file.txt && sync");
    sh_ok(
        &c,
        10,
        // Shell builtins only (bash's `read -t` on a FIFO nobody writes is the sleep): a
        // dynamically linked `sleep` takes 10-30 s of guest CPU to start on these machines,
        // and one a second would leave envd no CPU at all.
        "mkfifo /tmp/tick && nohup bash -c 'exec 3<>/tmp/tick; i=0; while :; do i=$((i+1)); \
         echo $i > /tmp/counter; read -t 1 -u 3; done' >/dev/null 2>&1 &",
    );
    // The background shell starts slowly on nested KVM (seconds for a dynamic binary): wait in
    // the guest for its first count rather than a fixed time.
    let before: u64 = sh_ok(
        &c,
        10,
        "exec bash -c 'exec 3<>/tmp/tick; i=0; while [ ! -s /tmp/counter ] && [ $i -lt 300 ]; \
         do read -t 1 -u 3; i=$((i+1)); done; echo $(< /tmp/counter)'",
    )
    .trim()
    .parse()
    .unwrap();
    assert!(before >= 1);

    let pause_s: u64 = std::env::var("WRENN_E2E_PAUSE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let t = Instant::now();
    let _: pb::SandboxInfo = call(
        &c,
        pb::sandboxes_methods::PAUSE,
        &pb::PauseSandboxRequest { sandbox_id: sb(10) },
    );
    println!("pause took {:?}", t.elapsed());
    std::thread::sleep(Duration::from_secs(pause_s));
    let t = Instant::now();
    let _: pb::SandboxInfo = call(
        &c,
        pb::sandboxes_methods::RESUME,
        &pb::ResumeSandboxRequest {
            sandbox_id: sb(10),
            timeout_s: 0,
        },
    );
    println!("resume took {:?}", t.elapsed());
    if let Some(j) = &jail {
        // A resume takes a uid (and a chroot) again.
        j.check_running(10, 1, 256);
    }
    assert_eq!(sh_ok(&c, 10, "cat /root/file.txt").trim(), "persisted");
    let after1 = read_counter(&c, 10);
    std::thread::sleep(Duration::from_secs(3));
    let after2 = read_counter(&c, 10);
    println!("counter before pause {before}, after resume {after1} then {after2}");
    assert!(after1 >= before, "the counter went back");
    assert!(after2 > after1, "the background process is not running");
    // The guest's clock: between host times taken around the exec, widened by 1 s.
    let h0 = now_ns();
    let guest: i64 = sh_ok(&c, 10, "date +%s%N").trim().parse().unwrap();
    let h1 = now_ns();
    println!("clock: host {h0}..{h1}, guest {guest}");
    assert!(
        guest >= h0 - 1_000_000_000 && guest <= h1 + 1_000_000_000,
        "guest clock off by {} ms",
        (guest - h0) / 1_000_000
    );

    // Three sandboxes from the template in parallel, each independent.
    let t = Instant::now();
    let threads: Vec<_> = (20..23u128)
        .map(|n| {
            let addr = agent.addr;
            std::thread::spawn(move || {
                let c = Client::connect_tcp(addr, Credential::agent_token(TOKEN)).unwrap();
                create_from(&c, n, TEMPLATE, proto::sandbox::TemplateKind::Snapshot)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(
            t.join().unwrap().state,
            proto::sandbox::SandboxState::Running as i32
        );
    }
    println!("three creates in parallel took {:?}", t.elapsed());
    for n in 20..23u128 {
        write_file(&c, n, "/root/own", 0, true, n.to_string().as_bytes());
    }
    for n in 20..23u128 {
        assert_eq!(read_file(&c, n, "/root/own"), n.to_string().as_bytes());
        let st = c.unary::<_, envd::StatResponse>(
            pb::files_methods::STAT,
            &pb::StatRequest {
                sandbox_id: sb(n),
                stat: Some(envd::StatRequest {
                    path: "/root/file.txt".into(),
                    ..Default::default()
                }),
            },
            Some(Duration::from_secs(120)),
        );
        assert_eq!(
            st.unwrap_err().code,
            proto::Code::NotFound,
            "sandbox {n} sees another sandbox's file"
        );
    }

    // Pause/resume cycles: a disk file and a memory region (/dev/shm is tmpfs, i.e. guest
    // memory) written with known bytes, compared byte for byte after each resume; every
    // other cycle part of the memory region is zeroed after the resume, and must read back
    // as zeros after the next cycle, never as the parent generation's bytes.
    let cycles: u32 = std::env::var("WRENN_E2E_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut corruptions = 0;
    let t = Instant::now();
    let mut mem_expect = pseudo_random(1, 4 << 20);
    write_file(&c, 21, "/dev/shm/mem.bin", 0, true, &mem_expect);
    for i in 0..cycles {
        let disk = pseudo_random(1000 + u64::from(i), 1 << 20);
        write_file(&c, 21, "/root/disk.bin", 0, true, &disk);
        // New bytes over the first MiB of the memory region.
        let fresh = pseudo_random(2000 + u64::from(i), 1 << 20);
        write_file(&c, 21, "/dev/shm/mem.bin", 0, false, &fresh);
        mem_expect[..1 << 20].copy_from_slice(&fresh);
        let _: pb::SandboxInfo = call(
            &c,
            pb::sandboxes_methods::PAUSE,
            &pb::PauseSandboxRequest { sandbox_id: sb(21) },
        );
        let _: pb::SandboxInfo = call(
            &c,
            pb::sandboxes_methods::RESUME,
            &pb::ResumeSandboxRequest {
                sandbox_id: sb(21),
                timeout_s: 0,
            },
        );
        if read_file(&c, 21, "/root/disk.bin") != disk {
            corruptions += 1;
            println!("cycle {i}: disk file differs");
        }
        if read_file(&c, 21, "/dev/shm/mem.bin") != mem_expect {
            corruptions += 1;
            println!("cycle {i}: memory region differs");
        }
        if i % 2 == 0 {
            // Zero 2 MiB in the middle after this resume; the next cycle checks it.
            let zeros = vec![0u8; 2 << 20];
            write_file(&c, 21, "/dev/shm/mem.bin", 1 << 20, false, &zeros);
            mem_expect[1 << 20..3 << 20].fill(0);
        }
        println!(
            "cycle {i}: corruptions so far {corruptions} ({:?} in)",
            t.elapsed()
        );
    }
    assert_eq!(corruptions, 0, "corruptions in {cycles} cycles");
    if let Some(j) = &jail {
        for n in [20u128, 21, 22] {
            j.check_running(n, 1, 256);
        }
        // 21 has paused: its chain is on disk. 10 is another tenant's sandbox.
        j.check_cross_access(10, 21, TEMPLATE);
        j.check_cross_access(21, 10, TEMPLATE);
    }

    // kill -9 of the agent with two sandboxes running: here the in-process agent stops
    // and releases what it held, without cleaning up.
    drop(c);
    agent.die();
    let agent2 = start_in_process(&inp);
    let c = Client::connect_tcp(agent2.addr, Credential::agent_token(TOKEN)).unwrap();
    for n in [10u128, 21] {
        let info: pb::SandboxInfo = call(
            &c,
            pb::sandboxes_methods::GET,
            &pb::GetSandboxRequest { sandbox_id: sb(n) },
        );
        assert_eq!(
            info.state,
            proto::sandbox::SandboxState::Running as i32,
            "{info:?}"
        );
        write_file(&c, n, "/tmp/alive", 0, true, b"alive");
        assert_eq!(read_file(&c, n, "/tmp/alive"), b"alive");
    }

    // A real kill -9 of a wrenn-agent process: the binary takes over the state root (the
    // in-process agent stops and lets go of its sockets), is killed with SIGKILL, and a new
    // one re-adopts.
    drop(c);
    agent2.die();
    Identity {
        host_id: Uuid::from_u128(1),
        host_token: "h".into(),
        agent_token: TOKEN.into(),
    }
    .save(&inp.root.join("agent/identity.conf"))
    .unwrap();
    // `file_backend`: restores through a materialized memory file (the File backend).
    let spawn_agent = |port: u16, file_backend: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wrenn-agent"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--state-root")
            .arg(&inp.root)
            .arg("--firecracker")
            .arg(&inp.fc)
            .arg("--kernel")
            .arg(&inp.kernel)
            .args(["--net-prefix", "wre2e", "--net-subnet", "10.213.0.0"])
            .arg(format!("--boot-args-extra={}", inp.boot_args))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(inp.root.join(format!("agent-{port}.log"))).unwrap(),
            ));
        match &inp.uffd {
            Some(u) if !file_backend => cmd
                .arg("--uffd-bin")
                .arg(u)
                .args(["--restore-backend", "uffd"]),
            Some(u) => cmd
                .arg("--uffd-bin")
                .arg(u)
                .args(["--restore-backend", "file"]),
            None => cmd.args(["--restore-backend", "file"]),
        };
        match &inp.jailer {
            Some(j) => cmd
                .arg("--jailer")
                .arg(j)
                .arg("--chroot-base-dir")
                .arg(inp.root.join("jail"))
                .args(["--uid-base", &E2E_UID_BASE.to_string()])
                .args(["--uid-count", &E2E_UID_COUNT.to_string()])
                .args(["--slots", "64"]),
            None => cmd.arg("--unjailed"),
        };
        cmd.spawn().unwrap()
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let connect = || {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            match Client::connect_tcp(("127.0.0.1", port), Credential::agent_token(TOKEN)) {
                Ok(c) => return c,
                Err(e) if Instant::now() < end => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("agent binary did not come up: {e}"),
            }
        }
    };
    let mut first = spawn_agent(port, false);
    let c = connect();
    write_file(&c, 21, "/tmp/via-binary", 0, true, b"1");
    assert_eq!(read_file(&c, 21, "/tmp/via-binary"), b"1");
    drop(c);
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let mut second = spawn_agent(port, true);
    let c = connect();
    for n in [10u128, 21] {
        let info: pb::SandboxInfo = call(
            &c,
            pb::sandboxes_methods::GET,
            &pb::GetSandboxRequest { sandbox_id: sb(n) },
        );
        assert_eq!(
            info.state,
            proto::sandbox::SandboxState::Running as i32,
            "after kill -9: {info:?}"
        );
        assert_eq!(sh_ok(&c, n, "echo after-kill").trim(), "after-kill");
    }
    // The second agent restores through the File backend: a pause and resume of its own
    // chain (a Diff generation on top of the cycles' chain).
    write_file(&c, 21, "/dev/shm/file-backend", 0, true, b"file backend");
    let _: pb::SandboxInfo = call(
        &c,
        pb::sandboxes_methods::PAUSE,
        &pb::PauseSandboxRequest { sandbox_id: sb(21) },
    );
    let _: pb::SandboxInfo = call(
        &c,
        pb::sandboxes_methods::RESUME,
        &pb::ResumeSandboxRequest {
            sandbox_id: sb(21),
            timeout_s: 0,
        },
    );
    assert_eq!(read_file(&c, 21, "/dev/shm/file-backend"), b"file backend");
    if let Some(j) = &jail {
        j.check_running(21, 1, 256);
    }
    if inp.uffd.is_some() {
        file_backend_clones_map_the_template_file(&inp, &c, jail.as_ref());
    }

    // Which copies (if any) corrupt bytes in a guest: issue 12, item 17. Minutes of guest
    // CPU on nested KVM, so it runs last, alone, in a fresh sandbox (every guest here keeps
    // a host core busy; the others are destroyed first). `WRENN_E2E_SELFTEST=0` leaves it
    // out (said visibly).
    if std::env::var("WRENN_E2E_SELFTEST").as_deref() == Ok("0") {
        println!("skipped: envd selftest in the guest (WRENN_E2E_SELFTEST=0)");
    } else {
        destroy_all(&c);
        let info = create_from(&c, 30, TEMPLATE, proto::sandbox::TemplateKind::Snapshot);
        assert_eq!(info.state, proto::sandbox::SandboxState::Running as i32);
        selftest_in_guest(&c, 30);
    }

    // Destroy all: nothing left.
    destroy_all(&c);
    let sandboxes = inp.root.join("sandboxes");
    let left: Vec<_> = std::fs::read_dir(&sandboxes).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in {}: {left:?}", sandboxes.display());
    assert!(firecrackers_under(&sandboxes).is_empty(), "processes left");
    second.kill().unwrap();
    second.wait().unwrap();
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        !netns.contains("wre2e-"),
        "network namespaces left: {netns}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        !mounts.contains(&*sandboxes.to_string_lossy()),
        "mounts left"
    );
    if let Some(j) = &jail {
        j.check_nothing_left();
    }
}
