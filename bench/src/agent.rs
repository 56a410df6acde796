//! Agent cases (issue 6).
//!
//! - `agent_idle_rss`: starts the `wrenn-agent` binary (next to the bench binary, else the
//!   line is skipped with the reason) with a temporary state root, loopback listeners on
//!   free ports and its own network prefix/subnet (`wrbn`, 10.205.0.0/16: never the
//!   default prefix, another agent may run on this host), waits until `GET /health` answers, reads
//!   VmRSS from /proc and kills it: `metric=agent_idle_rss value=.. unit=MiB goal=<=10`.
//! - `sandbox_lifecycle` (one case, several lines): the real `agent::manager::Manager` with
//!   the real Firecracker layer, every VM-layer call timed by a wrapper (the phases, printed
//!   as `info=<case>_<call>` p50/p99; `manager_rest` = what the manager spends outside the
//!   VM layer, retry sleeps included). The state root `/var/tmp/wrenn-bench-agent`
//!   (`WRENN_LIFECYCLE_ROOT` to choose another) keeps the
//!   snapshot template between runs (made by one cold boot: `metric=sandbox_create_cold`,
//!   reported only on the run that boots; delete the root to measure it again). Then, N times:
//!   `sandbox_create_from_template` (to envd's first answer) with the Uffd backend and with
//!   the File backend (same template snapshot, its recorded working set):
//!   `bench=sandbox_resume_uffd baseline=sandbox_resume_file`, goal <= 1.0; on the Uffd
//!   sandbox `sandbox_pause` (split into Firecracker's `snapshot/create` and our generation
//!   build, from the layer's own `snapshot taken` log line, ms resolution;
//!   `bench=pause_generation_build baseline=sequential_write` writes the layer's size
//!   sequentially and syncs it in the same directory, goal <= 1.2; the build's phases as
//!   `info=sandbox_pause_build_{scan,header,sync,publish}`), `metric=
//!   snapshot_bytes_ratio` (new layer + header bytes over the non-zero pages in the data
//!   extents of Firecracker's Diff file, goal <= 1.01), and `sandbox_resume` (to envd's
//!   first answer). Needs `WRENN_FIRECRACKER`, `WRENN_KERNEL`, `WRENN_ROOTFS`, root and
//!   /dev/kvm, else `bench=<name> skipped=<reason>` for each line; optional `WRENN_BOOT_ARGS`,
//!   `WRENN_UFFD` (else `wrenn-uffd` next to the bench binary; without it only File runs).
//!   Slots are named `wrbl*` in 10.206.0.0/16.
//!
//! What the cases start (the agent process and its state root; the sandboxes, their slots
//! and processes) is removed on the way out, error or not; only the template stays cached.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_glue::net::Egress;

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

/// State root of the lifecycle cases: kept between runs, since the snapshot template in it
/// costs a cold boot (minutes on nested KVM) to make. Delete it to measure the cold boot.
const LIFECYCLE_ROOT: &str = "/var/tmp/wrenn-bench-agent";
/// Slot names/addresses of the lifecycle cases' manager: their own, other agents may run.
const LIFECYCLE_NET_PREFIX: &str = "wrbl";
const LIFECYCLE_NET_SUBNET: &str = "10.206.0.0";
/// The cached snapshot template of the lifecycle cases.
const TEMPLATE: u128 = 0xbe4c_0000_0000_0000_0000_0000_0000_0001;
/// The sandbox cold-booted to make the template, and the first of the measured ones.
const COLD_SANDBOX: u128 = 0xbe4c_0000_0000_0000_0000_0000_0000_0100;
const SANDBOX_BASE: u128 = 0xbe4c_0000_0000_0000_0000_0000_0000_1000;
/// Guest size: the e2e test's (one vCPU: only 1-vCPU guests work under nested KVM).
const GUEST_MIB: u32 = 256;
/// Deadline of one manager call that waits for a guest (the cold boot takes minutes).
const ENVD_CALL: Duration = Duration::from_secs(120);
/// Cold-boot goal, as `vm_restore`'s: the boot deadline of test hosts.
const COLD_GOAL_S: f64 = 900.0;

/// The lifecycle cases this file owns (see the module doc).
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
pub(crate) fn vm_skip_reason() -> Option<String> {
    let unset: Vec<&str> = ["WRENN_FIRECRACKER", "WRENN_KERNEL", "WRENN_ROOTFS"]
        .into_iter()
        .filter(|k| std::env::var_os(k).is_none_or(|v| v.is_empty()))
        .collect();
    if !unset.is_empty() {
        return Some(format!("{}_not_set", unset.join("/")));
    }
    if !proto::skip::is_root() {
        return Some("needs_root".into());
    }
    if fs::metadata("/dev/kvm").is_err() {
        return Some("no_/dev/kvm".into());
    }
    None
}

fn sandbox_lifecycle(opts: &Opts) -> Result<(), String> {
    if let Some(reason) = vm_skip_reason() {
        for name in LIFECYCLE {
            println!("bench={name} skipped={reason}");
        }
        return Ok(());
    }
    lifecycle::run(opts)
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

/// Destroys every sandbox of the manager (best effort; errors are printed).
pub(crate) fn destroy_all(m: &agent::manager::Manager) {
    for s in m.list(&[]) {
        if let Ok(id) = proto::id::parse_sandbox(&s.sandbox_id) {
            if let Err(e) = m.destroy(id) {
                println!("info=cleanup_failed note=destroy_{}:{e}", s.sandbox_id);
            }
        }
    }
}

/// Destroys what is left when a case ends, error or not.
pub(crate) struct Cleanup(pub std::sync::Arc<agent::manager::Manager>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        destroy_all(&self.0);
    }
}

/// The real-VM inputs of the benches that boot guests: `WRENN_FIRECRACKER`, `WRENN_KERNEL`,
/// `WRENN_ROOTFS` (each must be a file), `WRENN_UFFD` (else `wrenn-uffd` next to the bench
/// binary, else none) and `WRENN_BOOT_ARGS`.
pub(crate) struct VmInputs {
    pub fc: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub uffd_bin: Option<PathBuf>,
    pub boot_args: String,
}

impl VmInputs {
    pub fn from_env() -> Result<VmInputs, String> {
        let var = |k: &str| std::env::var_os(k).map(PathBuf::from).unwrap_or_default();
        let (fc, kernel, rootfs) = (
            var("WRENN_FIRECRACKER"),
            var("WRENN_KERNEL"),
            var("WRENN_ROOTFS"),
        );
        for (k, p) in [
            ("WRENN_FIRECRACKER", &fc),
            ("WRENN_KERNEL", &kernel),
            ("WRENN_ROOTFS", &rootfs),
        ] {
            if !p.is_file() {
                return Err(format!("{k}={} is not a file", p.display()));
            }
        }
        let uffd_bin = match std::env::var_os("WRENN_UFFD") {
            Some(p) => Some(PathBuf::from(p)),
            None => std::env::current_exe()
                .ok()
                .map(|me| me.with_file_name("wrenn-uffd"))
                .filter(|p| p.is_file()),
        };
        Ok(VmInputs {
            fc,
            kernel,
            rootfs,
            uffd_bin,
            boot_args: std::env::var("WRENN_BOOT_ARGS").unwrap_or_default(),
        })
    }

    /// Puts the base rootfs under `root` as the nil template's disk (once; a clone).
    pub fn base_template(&self, root: &Path) -> Result<(), String> {
        let base_dir = root
            .join("templates")
            .join(proto::id::Uuid::nil().hyphenated().to_string());
        fs::create_dir_all(&base_dir).map_err(|e| format!("create {}: {e}", base_dir.display()))?;
        let base = base_dir.join("rootfs.ext4");
        if !base.exists() {
            vmm_glue::disk::clone_disk(&self.rootfs, &base)
                .map_err(|e| format!("copy the base rootfs: {e}"))?;
        }
        Ok(())
    }
}

/// The lifecycle cases: the real manager with the real Firecracker layer, wrapped in a VM
/// layer that times every call (the phases), with the layer's own log lines captured for
/// the split of a pause into `snapshot/create` and the generation build.
mod lifecycle {
    use super::{destroy_all, Cleanup};
    use std::collections::BTreeMap;
    use std::fs;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use agent::firecracker::{FcConfig, FirecrackerVmm};
    use agent::flags::RestoreBackend;
    use agent::manager::{CreateSpec, Manager};
    use agent::statedir::{Chain, ProcRef, SandboxDir, SandboxRecord, TemplateDir};
    use agent::vm::{RestoreSource, Started, VmError, Vmm};
    use proto::gen::wrenn::envd::v1::{health_methods, HealthCheckRequest, HealthCheckResponse};
    use proto::id::{self, Uuid};
    use proto::rpc::Client;
    use proto::sandbox::SandboxSpec;
    use proto::Status;

    use super::*;
    use crate::harness::latency_line;

    /// One VM-layer call and how long it took.
    type Phase = (&'static str, Duration);

    /// The real VM layer (one instance per restore backend), timing every call. Which
    /// instance serves is switched only between sandboxes, so one sandbox's calls all go
    /// to the instance that started it (each keeps its own running-process table).
    struct Timed {
        uffd: FirecrackerVmm,
        file: FirecrackerVmm,
        use_file: AtomicBool,
        phases: Mutex<Vec<Phase>>,
    }

    impl Timed {
        fn v(&self) -> &FirecrackerVmm {
            if self.use_file.load(Ordering::SeqCst) {
                &self.file
            } else {
                &self.uffd
            }
        }

        fn time<T>(&self, name: &'static str, f: impl FnOnce(&FirecrackerVmm) -> T) -> T {
            let t = Instant::now();
            let r = f(self.v());
            let d = t.elapsed();
            if let Ok(mut p) = self.phases.lock() {
                p.push((name, d));
            }
            r
        }

        fn take(&self) -> Vec<Phase> {
            self.phases
                .lock()
                .map(|mut p| std::mem::take(&mut *p))
                .unwrap_or_default()
        }
    }

    impl Vmm for Timed {
        fn problems(&self) -> Vec<String> {
            self.v().problems()
        }
        fn firecracker_version(&self) -> String {
            self.v().firecracker_version()
        }
        fn restore_backend(&self) -> &'static str {
            self.v().restore_backend()
        }
        fn create_slot(&self, index: u32, egress: &Egress) -> Result<(), VmError> {
            self.time("create_slot", |v| v.create_slot(index, egress))
        }
        fn guest_ip(&self, index: u32) -> std::net::Ipv4Addr {
            self.v().guest_ip(index)
        }
        fn set_egress(&self, index: u32, egress: &Egress) -> Result<(), VmError> {
            self.time("set_egress", |v| v.set_egress(index, egress))
        }
        fn destroy_slot(&self, index: u32) -> Result<(), VmError> {
            self.time("destroy_slot", |v| v.destroy_slot(index))
        }
        fn cleanup_slots(&self, keep: &[u32]) -> Result<Vec<u32>, VmError> {
            self.time("cleanup_slots", |v| v.cleanup_slots(keep))
        }
        fn copy_file(
            &self,
            src: &Path,
            dst: &Path,
            size_bytes: Option<u64>,
        ) -> Result<(), VmError> {
            self.time("copy_file", |v| v.copy_file(src, dst, size_bytes))
        }
        fn boot(
            &self,
            rec: &SandboxRecord,
            dir: &SandboxDir,
            template: &TemplateDir,
        ) -> Result<Started, VmError> {
            self.time("boot", |v| v.boot(rec, dir, template))
        }
        fn restore(
            &self,
            rec: &SandboxRecord,
            dir: &SandboxDir,
            src: &RestoreSource<'_>,
        ) -> Result<Started, VmError> {
            self.time("restore", |v| v.restore(rec, dir, src))
        }
        fn snapshot(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<Chain, VmError> {
            self.time("snapshot", |v| v.snapshot(rec, dir))
        }
        fn finish_recording(
            &self,
            rec: &SandboxRecord,
            dir: &SandboxDir,
            path: &Path,
        ) -> Result<(), VmError> {
            self.time("finish_recording", |v| v.finish_recording(rec, dir, path))
        }
        fn stop(&self, rec: &SandboxRecord, dir: &SandboxDir) {
            self.time("stop", |v| v.stop(rec, dir))
        }
        fn alive(&self, p: ProcRef) -> bool {
            self.v().alive(p)
        }
        fn readopt(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<(), VmError> {
            self.time("readopt", |v| v.readopt(rec, dir))
        }
        fn resume_vm(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<(), VmError> {
            self.time("resume_vm", |v| v.resume_vm(rec, dir))
        }
        fn connect_envd(&self, dir: &SandboxDir, token: &str) -> Result<Client, Status> {
            self.time("connect_envd", |v| v.connect_envd(dir, token))
        }
    }

    /// Keeps the Firecracker layer's "snapshot taken"/"generation built" log lines.
    struct Capture(Mutex<Vec<String>>);

    impl log::Log for Capture {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.level() <= log::Level::Info
        }
        fn log(&self, r: &log::Record<'_>) {
            let msg = r.args().to_string();
            if msg.starts_with("snapshot taken") || msg.starts_with("generation built") {
                if let Ok(mut v) = self.0.lock() {
                    v.push(msg);
                }
            }
        }
        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

    /// The number after `key=` in the last captured line that has it.
    fn logged(lines: &[String], key: &str) -> Option<u64> {
        let k = format!("{key}=");
        lines.iter().rev().find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k.as_str()))
                .and_then(|v| v.parse().ok())
        })
    }

    fn sb(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn spec(
        n: u128,
        template: Uuid,
        kind: proto::sandbox::TemplateKind,
    ) -> Result<SandboxSpec, String> {
        let spec = SandboxSpec {
            sandbox_id: id::format_sandbox(sb(n)),
            template_id: id::format_template(template),
            template_kind: kind as i32,
            memory_mib: GUEST_MIB,
            timeout_s: 3600,
            ..Default::default()
        };
        // Checked here, so a bad spec fails the bench before it times anything.
        CreateSpec::from_request(&spec).map_err(|e| format!("create spec: {e}"))?;
        Ok(spec)
    }

    /// envd's first answer through the manager's own connection.
    fn first_answer(m: &Manager, id: Uuid) -> Result<(), String> {
        let c = m.envd(id).map_err(|e| format!("envd client: {e}"))?;
        let _: HealthCheckResponse = c
            .unary(
                health_methods::CHECK,
                &HealthCheckRequest::default(),
                Some(ENVD_CALL),
            )
            .map_err(|e| format!("envd Health/Check: {e}"))?;
        c.close();
        Ok(())
    }

    /// Phase durations by name over many runs (a phase called twice in a run is summed).
    #[derive(Default)]
    struct PhaseRuns {
        by_name: BTreeMap<&'static str, Vec<Duration>>,
        total: Vec<Duration>,
    }

    impl PhaseRuns {
        fn push(&mut self, phases: &[Phase], total: Duration) {
            let mut sum: BTreeMap<&'static str, Duration> = BTreeMap::new();
            for (n, d) in phases {
                *sum.entry(n).or_default() += *d;
            }
            let inside: Duration = sum.values().sum();
            sum.insert("manager_rest", total.saturating_sub(inside));
            for (n, d) in sum {
                self.by_name.entry(n).or_default().push(d);
            }
            self.total.push(total);
        }

        fn print(&self, case: &str, total_note: &str) {
            let n = self.total.len();
            for (phase, d) in &self.by_name {
                println!(
                    "{}",
                    info_line(
                        &format!("{case}_{phase}"),
                        &Samples::from_durations(d),
                        &format!("vmm_call_time,n={n}(runs_without_the_call_not_counted)"),
                    )
                );
            }
            println!(
                "{}",
                info_line(
                    &format!("{case}_total"),
                    &Samples::from_durations(&self.total),
                    &format!("{total_note},n={n}"),
                )
            );
        }
    }

    /// The newest `*.layer` file in `dir` and its size.
    fn newest_layer(dir: &Path) -> Option<(PathBuf, u64)> {
        fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".layer"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, e.path(), m.len()))
            })
            .max_by_key(|(t, _, _)| *t)
            .map(|(_, p, l)| (p, l))
    }

    /// Writes `len` bytes sequentially to a new file in `dir`, fdatasyncs it and fsyncs the
    /// directory, the syncs the generation build does for its layer: the baseline of
    /// `pause_generation_build` (without the syncs it would not be the same work).
    fn sequential_write(dir: &Path, len: u64) -> Result<Duration, String> {
        let p = dir.join("bench-seq.tmp");
        let chunk = vec![0xa5u8; 1 << 20];
        let t = Instant::now();
        let mut f = fs::File::create(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])
                .map_err(|e| format!("write {}: {e}", p.display()))?;
            left -= n as u64;
        }
        // The same syncs as the build: the file's data, then its directory.
        f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("fsync {}: {e}", dir.display()))?;
        let d = t.elapsed();
        drop(f);
        let _ = fs::remove_file(&p);
        Ok(d)
    }

    pub(super) fn run(opts: &Opts) -> Result<(), String> {
        let inputs = super::VmInputs::from_env()?;
        let root = std::env::var_os("WRENN_LIFECYCLE_ROOT")
            .map_or_else(|| PathBuf::from(LIFECYCLE_ROOT), PathBuf::from);
        inputs.base_template(&root)?;
        let super::VmInputs {
            fc,
            kernel,
            uffd_bin,
            boot_args,
            ..
        } = inputs;
        if log::set_logger(&CAPTURE).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
        let net = vmm_glue::net::NetConfig::new(
            LIFECYCLE_NET_PREFIX,
            LIFECYCLE_NET_SUBNET
                .parse()
                .map_err(|e| format!("subnet: {e}"))?,
        )
        .map_err(|e| format!("net config: {e}"))?;
        let fc_cfg = |backend| FcConfig {
            firecracker: fc.clone(),
            kernel: Some(kernel.clone()),
            uffd_bin: uffd_bin.clone(),
            backend,
            boot_args_extra: boot_args.clone(),
            state_root: root.clone(),
            console: false,
            net: net.clone(),
            dns_upstream: agent::flags::DnsUpstream::Off,
            // Unjailed: the bench measures the lifecycle's own costs.
            jail: None,
        };
        let timed = Arc::new(Timed {
            uffd: FirecrackerVmm::new(fc_cfg(if uffd_bin.is_some() {
                RestoreBackend::Uffd
            } else {
                RestoreBackend::File
            })),
            file: FirecrackerVmm::new(fc_cfg(RestoreBackend::File)),
            use_file: AtomicBool::new(false),
            phases: Mutex::new(Vec::new()),
        });
        let mut cfg = agent::manager::Config::new(&root);
        cfg.slot_capacity = 8;
        let m = Manager::new(
            cfg,
            timed.clone(),
            Arc::new(agent::ttl::SystemClock),
            Arc::new(agent::manager::NoEvents),
        )
        .map_err(|e| format!("manager: {e}"))?;
        m.recover();
        let cleanup = Cleanup(m.clone());
        destroy_all(&m);
        let problems = m.vmm().problems();
        if !problems.is_empty() {
            return Err(format!("host problems: {}", problems.join("; ")));
        }

        // The template: cold boot once, then cached in the state root.
        let tpl = Uuid::from_u128(TEMPLATE);
        if m.template(tpl).is_none() {
            timed.take();
            let t = Instant::now();
            m.create(spec(
                COLD_SANDBOX,
                Uuid::nil(),
                proto::sandbox::TemplateKind::Base,
            )?)
            .map_err(|e| format!("cold create: {e}"))?;
            first_answer(&m, sb(COLD_SANDBOX))?;
            let cold = t.elapsed();
            let phases = timed.take();
            for (n, d) in &phases {
                println!(
                    "{}",
                    info_line(
                        &format!("sandbox_create_cold_{n}"),
                        &Samples::from_durations(&[*d]),
                        "once",
                    )
                );
            }
            println!(
                "{}",
                metric_line(
                    "sandbox_create_cold",
                    (cold.as_secs_f64() * 10.0).round() / 10.0,
                    "s",
                    Goal::AtMost(COLD_GOAL_S),
                )
            );
            let t = Instant::now();
            m.create_template(sb(COLD_SANDBOX), tpl)
                .map_err(|e| format!("create template: {e}"))?;
            println!(
                "{}",
                info_line(
                    "template_create",
                    &Samples::from_durations(&[t.elapsed()]),
                    "once",
                )
            );
            m.destroy(sb(COLD_SANDBOX))
                .map_err(|e| format!("destroy the cold sandbox: {e}"))?;
        } else {
            println!(
                "bench=sandbox_create_cold skipped=template_cached_in_{}_(remove_it_to_measure_a_cold_boot)",
                root.display()
            );
        }

        let n = opts.iters(5, 1);
        let mut backends = vec![false];
        if uffd_bin.is_some() {
            backends.push(true);
        } else {
            println!("bench=sandbox_resume_uffd skipped=no_wrenn-uffd_next_to_the_bench_binary_and_WRENN_UFFD_unset");
        }
        let mut create: [PhaseRuns; 2] = Default::default(); // [uffd-or-default, file]
        let mut pause = PhaseRuns::default();
        let mut resume = PhaseRuns::default();
        let (mut fc_part, mut build_part, mut seq) = (Vec::new(), Vec::new(), Vec::new());
        // The build's phases, from the same log line (µs).
        const BUILD_PHASES: [&str; 4] = ["scan_us", "header_us", "sync_us", "publish_us"];
        let mut build_phases: [Vec<Duration>; 4] = Default::default();
        let mut ratios = Vec::new();
        let mut k = 0u128;
        for i in 0..n {
            let mut order = backends.clone();
            if i % 2 == 1 {
                order.reverse();
            }
            for use_file in order {
                k += 1;
                let id = sb(SANDBOX_BASE + k);
                timed.use_file.store(use_file, Ordering::SeqCst);
                timed.take();
                let t = Instant::now();
                m.create(spec(
                    SANDBOX_BASE + k,
                    tpl,
                    proto::sandbox::TemplateKind::Snapshot,
                )?)
                .map_err(|e| format!("create from template: {e}"))?;
                first_answer(&m, id)?;
                create[usize::from(use_file)].push(&timed.take(), t.elapsed());
                if !use_file {
                    // Pause and resume on the default backend's sandbox.
                    if let Ok(mut l) = CAPTURE.0.lock() {
                        l.clear();
                    }
                    let t = Instant::now();
                    m.pause(id).map_err(|e| format!("pause: {e}"))?;
                    pause.push(&timed.take(), t.elapsed());
                    let lines = CAPTURE.0.lock().map(|l| l.clone()).unwrap_or_default();
                    // The pause's files are in its generation directory.
                    let root = m.layout().sandbox(id).snapshot();
                    let snap = uffd::snapshot::newest(&root)
                        .ok()
                        .flatten()
                        .map_or(root, |g| g.dir);
                    if let (Some(f), Some(b)) = (
                        logged(&lines, "snapshot_create_ms"),
                        logged(&lines, "build_ms"),
                    ) {
                        fc_part.push(Duration::from_millis(f));
                        build_part.push(Duration::from_millis(b));
                        for (k, v) in BUILD_PHASES.iter().zip(build_phases.iter_mut()) {
                            if let Some(us) = logged(&lines, k) {
                                v.push(Duration::from_micros(us));
                            }
                        }
                        if let Some((_, len)) = newest_layer(&snap) {
                            seq.push(sequential_write(&snap, len)?);
                            // Written: the new layer and the (rewritten) header. Dirty:
                            // the pages in the data extents of Firecracker's Diff file
                            // that are not all zeros.
                            let header = fs::metadata(snap.join("header"))
                                .map(|m| m.len())
                                .unwrap_or(0);
                            if let (Some(sc), Some(z)) =
                                (logged(&lines, "scanned"), logged(&lines, "zero_pages"))
                            {
                                let dirty = sc.saturating_sub(z) * 4096;
                                println!(
                                    "info=sandbox_pause_bytes layer={len} header={header} dirty_pages={sc} zero_pages={z} dirty_nonzero_bytes={dirty}"
                                );
                                if dirty > 0 {
                                    ratios.push((len + header) as f64 / dirty as f64);
                                }
                            }
                        }
                    }
                    let t = Instant::now();
                    m.resume(id, 3600).map_err(|e| format!("resume: {e}"))?;
                    first_answer(&m, id)?;
                    resume.push(&timed.take(), t.elapsed());
                }
                m.destroy(id).map_err(|e| format!("destroy: {e}"))?;
                timed.take();
            }
        }
        timed.use_file.store(false, Ordering::SeqCst);
        let to_answer = "manager_call_to_envd_first_Health/Check_answer";
        create[0].print("sandbox_create_from_template", to_answer);
        pause.print("sandbox_pause", "manager_pause_call");
        resume.print("sandbox_resume", to_answer);
        if backends.len() == 2 {
            create[1].print("sandbox_create_from_template_file", to_answer);
            println!(
                "{}",
                latency_line(
                    "sandbox_resume_uffd",
                    &Samples::from_durations(&create[0].total),
                    "sandbox_resume_file",
                    &Samples::from_durations(&create[1].total),
                    Goal::AtMost(1.0),
                )
            );
        }
        if fc_part.is_empty() || seq.is_empty() {
            println!("bench=pause_generation_build skipped=no_snapshot_taken_log_line_captured");
        } else {
            println!(
                "{}",
                info_line(
                    "sandbox_pause_snapshot_create",
                    &Samples::from_durations(&fc_part),
                    "firecracker_snapshot/create(ms_resolution)",
                )
            );
            for (k, v) in BUILD_PHASES.iter().zip(build_phases.iter()) {
                if !v.is_empty() {
                    let name = format!("sandbox_pause_build_{}", k.trim_end_matches("_us"));
                    println!(
                        "{}",
                        info_line(&name, &Samples::from_durations(v), "ours(us_resolution)")
                    );
                }
            }
            let build = Samples::from_durations(&build_part);
            println!(
                "{}",
                info_line(
                    "sandbox_pause_generation_build",
                    &build,
                    "ours(ms_resolution)"
                )
            );
            println!(
                "{}",
                latency_line(
                    "pause_generation_build",
                    &build,
                    "sequential_write",
                    &Samples::from_durations(&seq),
                    Goal::AtMost(1.2),
                )
            );
        }
        if ratios.is_empty() {
            println!("bench=snapshot_bytes_ratio skipped=no_generation_built_log_line_captured");
        } else {
            ratios.sort_by(f64::total_cmp);
            let r = ratios[ratios.len() / 2];
            println!(
                "{}",
                metric_line(
                    "snapshot_bytes_ratio",
                    (r * 1000.0).round() / 1000.0,
                    "x",
                    Goal::AtMost(1.01),
                )
            );
        }
        drop(cleanup);
        Ok(())
    }
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
