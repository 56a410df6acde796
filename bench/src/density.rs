//! Density and create-latency cases on real Firecracker (issue 15 §1, §5).
//!
//! Both drive the real `agent::manager::Manager` with the real Firecracker layer
//! (unjailed: the page sharing is the same jailed, where the template's memory file is
//! hard-linked into each chroot, one inode), from one snapshot template of
//! [`GUEST_MIB`] MiB kept in the state root (`WRENN_DENSITY_ROOT`, default
//! `/var/tmp/wrenn-bench-density`; made by one cold boot, minutes on nested KVM, then
//! reused). Slots are named `wrdn*` in 10.215.0.0/16. Needs `WRENN_FIRECRACKER`,
//! `WRENN_KERNEL`, `WRENN_ROOTFS`, root and /dev/kvm, else `bench=<case> skipped=<reason>`;
//! optional `WRENN_BOOT_ARGS`, `WRENN_UFFD` (else `wrenn-uffd` next to the bench binary;
//! without it only the File backend runs, said so).
//!
//! - `sandbox_density`: for each restore backend (File: the template's one memory file,
//!   mapped `MAP_PRIVATE` by every clone; Uffd: wrenn-uffd serving the template's layers),
//!   one clone is created alone and settles [`SETTLE`], and its Firecracker's Rss is read
//!   from `/proc/PID/smaps_rollup`; then `WRENN_DENSITY_N - 1` more (default 10 in all) are
//!   created, all settle [`SETTLE`], and the Pss of the N Firecracker processes is summed:
//!   `metric=sandbox_density_<backend> value=<sum Pss / (N x Rss alone)> goal=<=0.3`, with
//!   the parts on `info=sandbox_density_<backend>_mem` (and the wrenn-uffd processes' own
//!   Pss, which the ratio leaves out). Each create is timed to its first exec answered
//!   (`envd --version` in the guest: static, fast to start); while the later clones are
//!   created the earlier ones are stopped (`SIGSTOP`: an idle guest keeps a host core busy
//!   here, and creates behind nine of them crawl), and all run again for the settle and
//!   the measurement. `WRENN_DENSITY_BACKENDS=file` (or `uffd`) runs one backend. Capacity: a 2-core host
//!   offers 10 1-vCPU sandboxes only with a vCPU overcommit of 5
//!   ([`DENSITY_VCPU_OVERCOMMIT`]); the case prints what the host offers at that ratio and
//!   fails when N sandboxes would not fit (the manager itself does not refuse: ctl's
//!   scheduler does, from what the agent reports).
//! - `sandbox_create_backends`: `WRENN_CREATE_ROUNDS` rounds (default 6), each one create
//!   per variant, alone, in an order that rotates per round: File, Uffd with the template's
//!   recorded working set prefetched (what the agent does), Uffd without it (the template's
//!   `working_set` file moved aside for that create, put back after, error or not). Each
//!   create is timed to the manager's answer (envd initialized) and to its first exec
//!   answered: `info=` p50/max per variant, `bench=sandbox_create_uffd_exec
//!   baseline=sandbox_create_file_exec` (goal <= 1.0: the default backend must not be
//!   slower to a first exec) and `bench=sandbox_create_uffd_prefetch_exec
//!   baseline=sandbox_create_uffd_noprefetch_exec` (goal <= 1.0), plus wrenn-uffd's stats
//!   (faults, pages prefetched) of each Uffd create at its first exec.
//!
//! What the cases start (sandboxes, slots, processes) is destroyed on the way out, error or
//! not; only the template stays cached.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::firecracker::{FcConfig, FirecrackerVmm};
use agent::flags::RestoreBackend;
use agent::manager::{CreateSpec, Manager};
use agent::statedir::SandboxRecord;
use proto::gen::wrenn::agent::v1 as pb;
use proto::gen::wrenn::envd::v1 as envd;
use proto::id::{self, Uuid};
use proto::sandbox::{SandboxSpec, TemplateKind};

use crate::agent::{destroy_all, Cleanup};
use crate::harness::{info_line, latency_line, metric_line, Case, Goal, Opts, Samples};

/// Guest memory of the template (issue 15 §1: a 512 MiB template).
const GUEST_MIB: u32 = 512;
/// vCPUs offered per host CPU for the density case: 10 1-vCPU sandboxes on 2 cores.
pub const DENSITY_VCPU_OVERCOMMIT: f64 = 5.0;
/// Sandboxes of the density case (`WRENN_DENSITY_N`): each idle guest keeps a host core
/// busy on these nested-KVM machines, so 10 is the most asked of them.
const DENSITY_N_DEFAULT: usize = 10;
/// Most sandboxes `WRENN_DENSITY_N` may ask for (the slot capacity of the case's manager).
const DENSITY_N_MAX: usize = 64;
/// Time the sandboxes get after their creates before memory is read: envd's start-up
/// work done, wrenn-uffd's background fill (if any) finished or well under way.
const SETTLE: Duration = Duration::from_secs(10);
/// Rounds of the create-latency case (`WRENN_CREATE_ROUNDS`).
const CREATE_ROUNDS_DEFAULT: usize = 6;
/// Deadline of the first exec (a guest on a busy 2-core host can stall for seconds).
const EXEC_TIMEOUT_MS: u64 = 120_000;
/// The static program the first exec runs in the guest (envd itself, `--version`).
const FIRST_EXEC: &str = "/usr/local/bin/envd";
const DEFAULT_ROOT: &str = "/var/tmp/wrenn-bench-density";
const NET_PREFIX: &str = "wrdn";
const NET_SUBNET: &str = "10.215.0.0";
/// The cached snapshot template.
const TEMPLATE: u128 = 0xde45_0000_0000_0000_0000_0000_0000_0001;
/// The sandbox cold-booted to make the template; the measured ones count up from BASE.
const COLD_SANDBOX: u128 = 0xde45_0000_0000_0000_0000_0000_0000_0100;
const SANDBOX_BASE: u128 = 0xde45_0000_0000_0000_0000_0000_0001_0000;
/// Cold-boot deadline (the boot deadline of test hosts).
const COLD_GOAL_S: f64 = 900.0;
/// The density goal of issue 15 §1 for idle sandboxes.
const DENSITY_GOAL: f64 = 0.3;
/// The wrenn-uffd stats file in an unjailed sandbox's directory (agent/src/firecracker.rs).
const UFFD_STATS_NAME: &str = "uffd.stats";

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "sandbox_density",
            run: density,
        },
        Case {
            name: "sandbox_create_backends",
            run: create_backends,
        },
    ]
}

/// Memory figures of one process from `/proc/PID/smaps_rollup`, KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mem {
    pub rss: u64,
    pub pss: u64,
    pub pss_anon: u64,
    pub pss_file: u64,
}

impl Mem {
    /// Parses the text of `/proc/PID/smaps_rollup` (`Rss:` and `Pss:` must be there).
    pub fn parse(text: &str) -> Option<Mem> {
        let kib = |key: &str| -> Option<u64> {
            text.lines().find_map(|l| {
                let v = l.strip_prefix(key)?.strip_prefix(':')?;
                v.split_whitespace().next()?.parse().ok()
            })
        };
        Some(Mem {
            rss: kib("Rss")?,
            pss: kib("Pss")?,
            pss_anon: kib("Pss_Anon").unwrap_or(0),
            pss_file: kib("Pss_File").unwrap_or(0),
        })
    }

    pub fn read(pid: i32) -> Result<Mem, String> {
        let p = format!("/proc/{pid}/smaps_rollup");
        let text = fs::read_to_string(&p).map_err(|e| format!("read {p}: {e}"))?;
        Mem::parse(&text).ok_or_else(|| format!("{p}: no Rss/Pss"))
    }

    /// As [`Mem::read`], `None` when the process is gone (wrenn-uffd exits once every page
    /// is resident: it holds no memory then), including a zombie its parent (the in-process
    /// agent) has not reaped yet: its `/proc/PID` is still there, its memory is not (ESRCH).
    pub fn read_if_alive(pid: i32) -> Result<Option<Mem>, String> {
        let gone = || {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| exited_state(&s))
                .unwrap_or(true)
        };
        if gone() {
            return Ok(None);
        }
        match Mem::read(pid) {
            Ok(m) => Ok(Some(m)),
            Err(_) if gone() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn add(self, o: Mem) -> Mem {
        Mem {
            rss: self.rss + o.rss,
            pss: self.pss + o.pss,
            pss_anon: self.pss_anon + o.pss_anon,
            pss_file: self.pss_file + o.pss_file,
        }
    }
}

/// The density ratio: the summed Pss of `n` clones over `n` times one clone's Rss alone.
pub fn density_ratio(pss_sum_kib: u64, alone_rss_kib: u64, n: usize) -> f64 {
    pss_sum_kib as f64 / (alone_rss_kib.max(1) as f64 * n.max(1) as f64)
}

fn env_usize(k: &str, default: usize) -> Result<usize, String> {
    match std::env::var(k) {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{k}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// What both cases share: the inputs, the state root, the cached template.
struct Setup {
    fc: PathBuf,
    kernel: PathBuf,
    uffd_bin: Option<PathBuf>,
    boot_args: String,
    root: PathBuf,
}

impl Setup {
    fn new() -> Result<Setup, String> {
        let inputs = crate::agent::VmInputs::from_env()?;
        let root = std::env::var_os("WRENN_DENSITY_ROOT")
            .map_or_else(|| PathBuf::from(DEFAULT_ROOT), PathBuf::from);
        inputs.base_template(&root)?;
        // The agent's own log lines (which backend each restore used, the template memory
        // file written) on stderr; WRENN_LOG sets the level.
        proto::logger::init();
        Ok(Setup {
            fc: inputs.fc,
            kernel: inputs.kernel,
            uffd_bin: inputs.uffd_bin,
            boot_args: inputs.boot_args,
            root,
        })
    }

    /// A manager over the state root whose VM layer restores through `backend`, recovered,
    /// with nothing left running. One at a time: the previous one's sandboxes are gone.
    fn manager(&self, backend: RestoreBackend) -> Result<Arc<Manager>, String> {
        let net = vmm_glue::net::NetConfig::new(
            NET_PREFIX,
            NET_SUBNET.parse().map_err(|e| format!("subnet: {e}"))?,
        )
        .map_err(|e| format!("net config: {e}"))?;
        let vmm = FirecrackerVmm::new(FcConfig {
            firecracker: self.fc.clone(),
            kernel: Some(self.kernel.clone()),
            uffd_bin: self.uffd_bin.clone(),
            backend,
            boot_args_extra: self.boot_args.clone(),
            state_root: self.root.clone(),
            console: false,
            net,
            dns_upstream: agent::flags::DnsUpstream::Off,
            jail: None,
        });
        let mut cfg = agent::manager::Config::new(&self.root);
        cfg.slot_capacity = DENSITY_N_MAX as u32;
        let m = Manager::new(
            cfg,
            Arc::new(vmm),
            Arc::new(agent::ttl::SystemClock),
            Arc::new(agent::manager::NoEvents),
        )
        .map_err(|e| format!("manager: {e}"))?;
        m.recover();
        destroy_all(&m);
        let problems = m.vmm().problems();
        if !problems.is_empty() {
            return Err(format!("host problems: {}", problems.join("; ")));
        }
        Ok(m)
    }

    /// The snapshot template: cold-booted once, then cached in the state root.
    fn ensure_template(&self) -> Result<(), String> {
        let backend = if self.uffd_bin.is_some() {
            RestoreBackend::Uffd
        } else {
            RestoreBackend::File
        };
        let m = self.manager(backend)?;
        let _cleanup = Cleanup(m.clone());
        let tpl = Uuid::from_u128(TEMPLATE);
        if m.template(tpl).is_some() {
            println!(
                "info=sandbox_density_template cached_in={} memory_mib={GUEST_MIB}",
                self.root.display()
            );
            return Ok(());
        }
        let t = Instant::now();
        m.create(spec(COLD_SANDBOX, Uuid::nil(), TemplateKind::Base)?)
            .map_err(|e| format!("cold create: {e}"))?;
        println!(
            "{}",
            metric_line(
                "sandbox_density_cold_boot",
                (t.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                "s",
                Goal::AtMost(COLD_GOAL_S),
            )
        );
        let t = Instant::now();
        let info = m
            .create_template(sb(COLD_SANDBOX), tpl)
            .map_err(|e| format!("create template: {e}"))?;
        println!(
            "{}",
            info_line(
                "sandbox_density_template_create",
                &Samples::from_durations(&[t.elapsed()]),
                &format!(
                    "once,memory_mib={},working_set_pages={},size_bytes={}",
                    info.memory_mib, info.working_set_pages, info.size_bytes
                ),
            )
        );
        m.destroy(sb(COLD_SANDBOX))
            .map_err(|e| format!("destroy the cold sandbox: {e}"))?;
        Ok(())
    }

    fn backends(&self) -> Vec<RestoreBackend> {
        if self.uffd_bin.is_some() {
            vec![RestoreBackend::File, RestoreBackend::Uffd]
        } else {
            println!("info=sandbox_density note=no_wrenn-uffd_next_to_the_bench_binary_and_WRENN_UFFD_unset:_File_only");
            vec![RestoreBackend::File]
        }
    }
}

fn sb(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn spec(n: u128, template: Uuid, kind: TemplateKind) -> Result<SandboxSpec, String> {
    let spec = SandboxSpec {
        sandbox_id: id::format_sandbox(sb(n)),
        template_id: id::format_template(template),
        template_kind: kind as i32,
        vcpus: 1,
        memory_mib: GUEST_MIB,
        timeout_s: 3600,
        default_user: "root".into(),
        ..Default::default()
    };
    CreateSpec::from_request(&spec).map_err(|e| format!("create spec: {e}"))?;
    Ok(spec)
}

/// One create's times: to the manager's answer (envd initialized) and on to the first
/// exec answered.
#[derive(Clone, Copy, Debug)]
struct CreateTimes {
    create: Duration,
    exec: Duration,
}

/// Creates sandbox `n` from the template and runs the first exec in it.
fn create_and_exec(m: &Manager, n: u128) -> Result<CreateTimes, String> {
    let t = Instant::now();
    m.create(spec(n, Uuid::from_u128(TEMPLATE), TemplateKind::Snapshot)?)
        .map_err(|e| format!("create from template: {e}"))?;
    let create = t.elapsed();
    let r = agent::rpc::exec(
        m,
        pb::ExecRequest {
            sandbox_id: id::format_sandbox(sb(n)),
            process: Some(envd::ProcessConfig {
                cmd: FIRST_EXEC.into(),
                args: vec!["--version".into()],
                timeout_ms: EXEC_TIMEOUT_MS,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .map_err(|e| format!("first exec: {e}"))?;
    if r.exited.is_none() {
        return Err(format!("first exec: no exit reported: {r:?}"));
    }
    Ok(CreateTimes {
        create,
        exec: t.elapsed(),
    })
}

/// The Firecracker process of each running sandbox.
fn firecrackers(m: &Manager) -> Vec<(Uuid, i32)> {
    m.vm_processes()
        .into_iter()
        .map(|(id, p, _)| (id, p.pid))
        .collect()
}

/// Firecracker processes stopped (`SIGSTOP`) while later clones are created, so that the
/// creates do not crawl behind the idle guests (each keeps a host core busy here);
/// continued (`SIGCONT`) on drop, error or not, before anything is measured or destroyed.
struct Stopped(Vec<i32>);

impl Stopped {
    fn stop(&mut self, pid: i32) -> Result<(), String> {
        // SAFETY: kill(2) with a pid of a Firecracker this case started (from the
        // manager's table) and a constant signal; no memory is passed.
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            return Err(format!(
                "SIGSTOP {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        self.0.push(pid);
        Ok(())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: as in `stop`; a process gone meanwhile only makes it fail (ESRCH).
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// Whether a `/proc/PID/stat` line is of a process that has exited (zombie `Z` or dead `X`).
fn exited_state(stat: &str) -> bool {
    // The state follows the command name, which is in parentheses and may hold anything.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    matches!(state, Some('Z' | 'X') | None)
}

/// The wrenn-uffd process of a sandbox, from its record.
fn page_server(m: &Manager, id: Uuid) -> Option<i32> {
    SandboxRecord::load(&m.layout().sandbox(id))
        .ok()?
        .page_server
        .map(|p| p.pid)
}

fn backend_name(b: RestoreBackend) -> &'static str {
    match b {
        RestoreBackend::File => "file",
        RestoreBackend::Uffd => "uffd",
    }
}

fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

fn density(opts: &Opts) -> Result<(), String> {
    if let Some(reason) = crate::agent::vm_skip_reason() {
        println!("bench=sandbox_density skipped={reason}");
        return Ok(());
    }
    let n = if opts.quick {
        2
    } else {
        env_usize("WRENN_DENSITY_N", DENSITY_N_DEFAULT)?
    };
    if !(1..=DENSITY_N_MAX).contains(&n) {
        return Err(format!("WRENN_DENSITY_N={n} is not in 1..={DENSITY_N_MAX}"));
    }
    // What the agent would report to ctl at the case's ratio: N 1-vCPU sandboxes must fit.
    let physical = pb::Resources {
        vcpus: std::thread::available_parallelism().map_or(1, |c| c.get() as u32),
        memory_mib: agent::host::mem_total_mib(),
        disk_mib: 0,
    };
    let offered = agent::host::Overcommit {
        vcpu: DENSITY_VCPU_OVERCOMMIT,
        memory: proto::sandbox_limits::MEMORY_OVERCOMMIT_DEFAULT,
    }
    .apply(&physical);
    println!(
        "info=sandbox_density_capacity vcpu_overcommit={DENSITY_VCPU_OVERCOMMIT} host_vcpus={} offered_vcpus={} offered_memory_mib={} needed_vcpus={n} needed_memory_mib={}",
        physical.vcpus,
        offered.vcpus,
        offered.memory_mib,
        n as u64 * u64::from(GUEST_MIB)
    );
    if (offered.vcpus as usize) < n || offered.memory_mib < n as u64 * u64::from(GUEST_MIB) {
        return Err(format!(
            "{n} sandboxes of 1 vCPU and {GUEST_MIB} MiB do not fit this host at vCPU overcommit {DENSITY_VCPU_OVERCOMMIT}"
        ));
    }
    let s = Setup::new()?;
    s.ensure_template()?;
    let mut k = 0u128;
    let only = std::env::var("WRENN_DENSITY_BACKENDS").unwrap_or_default();
    for backend in s.backends() {
        let b = backend_name(backend);
        if !only.is_empty() && !only.split(',').any(|w| w.trim() == b) {
            println!("info=sandbox_density_{b} note=left_out_by_WRENN_DENSITY_BACKENDS={only}");
            continue;
        }
        let m = s.manager(backend)?;
        let _cleanup = Cleanup(m.clone());
        // Untimed warm-up: the File backend's first create writes the template's memory
        // file (once); both read the template into the page cache.
        k += 1;
        create_and_exec(&m, SANDBOX_BASE + k)?;
        destroy_all(&m);

        let mut times = Vec::new();
        let mut stopped = Stopped(Vec::new());
        k += 1;
        times.push(create_and_exec(&m, SANDBOX_BASE + k)?);
        std::thread::sleep(SETTLE);
        let fcs = firecrackers(&m);
        let [(alone_id, alone_pid)] = fcs[..] else {
            return Err(format!("{} Firecrackers running, expected 1", fcs.len()));
        };
        let alone = Mem::read(alone_pid)?;
        let alone_ps = match page_server(&m, alone_id) {
            Some(p) => Mem::read_if_alive(p)?,
            None => None,
        };
        println!(
            "info=sandbox_density_{b}_alone rss_mib={} pss_mib={} pss_anon_mib={} pss_file_mib={} page_server_pss_mib={}",
            mib(alone.rss),
            mib(alone.pss),
            mib(alone.pss_anon),
            mib(alone.pss_file),
            alone_ps.map_or(0.0, |p| mib(p.pss))
        );
        stopped.stop(alone_pid)?;
        for _ in 1..n {
            k += 1;
            times.push(create_and_exec(&m, SANDBOX_BASE + k)?);
            for (_, pid) in firecrackers(&m) {
                if !stopped.0.contains(&pid) {
                    stopped.stop(pid)?;
                }
            }
        }
        // All of them run again, settle, and are measured running.
        drop(stopped);
        std::thread::sleep(SETTLE);
        let fcs = firecrackers(&m);
        if fcs.len() != n {
            return Err(format!("{} Firecrackers running, expected {n}", fcs.len()));
        }
        let mut sum = Mem::default();
        let mut ps_sum = Mem::default();
        let mut ps_alive = 0;
        for (id, pid) in &fcs {
            sum = sum.add(Mem::read(*pid)?);
            if let Some(p) = page_server(&m, *id) {
                if let Some(pm) = Mem::read_if_alive(p)? {
                    ps_sum = ps_sum.add(pm);
                    ps_alive += 1;
                }
            }
        }
        println!(
            "info=sandbox_density_{b}_mem n={n} sum_pss_mib={} sum_rss_mib={} sum_pss_anon_mib={} sum_pss_file_mib={} alone_rss_mib={} n_x_alone_rss_mib={} page_servers_running={ps_alive} page_servers_sum_pss_mib={}",
            mib(sum.pss),
            mib(sum.rss),
            mib(sum.pss_anon),
            mib(sum.pss_file),
            mib(alone.rss),
            mib(alone.rss * n as u64),
            mib(ps_sum.pss)
        );
        let create: Vec<Duration> = times.iter().map(|t| t.create).collect();
        let exec: Vec<Duration> = times.iter().map(|t| t.exec).collect();
        println!(
            "{}",
            info_line(
                &format!("sandbox_density_{b}_create"),
                &Samples::from_durations(&create),
                &format!("create_to_manager_answer,one_after_another,earlier_clones_stopped,n={n}"),
            )
        );
        println!(
            "{}",
            info_line(
                &format!("sandbox_density_{b}_first_exec"),
                &Samples::from_durations(&exec),
                &format!(
                    "create_to_first_exec_answered,one_after_another,earlier_clones_stopped,n={n}"
                ),
            )
        );
        let ratio = density_ratio(sum.pss, alone.rss, n);
        println!(
            "{}",
            metric_line(
                &format!("sandbox_density_{b}"),
                (ratio * 1000.0).round() / 1000.0,
                "x",
                Goal::AtMost(DENSITY_GOAL),
            )
        );
        destroy_all(&m);
    }
    Ok(())
}

/// One variant of the create-latency case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    File,
    UffdPrefetch,
    UffdNoPrefetch,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::File => "file",
            Variant::UffdPrefetch => "uffd_prefetch",
            Variant::UffdNoPrefetch => "uffd_noprefetch",
        }
    }
}

/// Moves the template's working set aside while alive; puts it back on drop.
struct WorkingSetAside {
    path: PathBuf,
    aside: PathBuf,
}

impl WorkingSetAside {
    fn new(path: PathBuf) -> Result<WorkingSetAside, String> {
        let aside = path.with_extension("aside");
        fs::rename(&path, &aside).map_err(|e| format!("move {} aside: {e}", path.display()))?;
        Ok(WorkingSetAside { path, aside })
    }
}

impl Drop for WorkingSetAside {
    fn drop(&mut self) {
        if let Err(e) = fs::rename(&self.aside, &self.path) {
            println!(
                "info=cleanup_failed note=put_back_{}:{e}",
                self.path.display()
            );
        }
    }
}

/// wrenn-uffd's counters for an unjailed sandbox, as its stats file says now.
fn uffd_stats(m: &Manager, id: Uuid) -> Option<agent::restore_stats::RestoreReport> {
    let text = fs::read_to_string(m.layout().sandbox(id).path().join(UFFD_STATS_NAME)).ok()?;
    agent::restore_stats::RestoreReport::parse(&text)
}

fn create_backends(opts: &Opts) -> Result<(), String> {
    if let Some(reason) = crate::agent::vm_skip_reason() {
        println!("bench=sandbox_create_backends skipped={reason}");
        return Ok(());
    }
    let rounds = if opts.quick {
        1
    } else {
        env_usize("WRENN_CREATE_ROUNDS", CREATE_ROUNDS_DEFAULT)?
    };
    let s = Setup::new()?;
    s.ensure_template()?;
    let mut variants = vec![Variant::File];
    if s.uffd_bin.is_some() {
        variants.extend([Variant::UffdPrefetch, Variant::UffdNoPrefetch]);
    } else {
        println!("bench=sandbox_create_uffd_exec skipped=no_wrenn-uffd_next_to_the_bench_binary_and_WRENN_UFFD_unset");
    }
    let ws = s
        .root
        .join("templates")
        .join(Uuid::from_u128(TEMPLATE).hyphenated().to_string())
        .join("snapshot/working_set");
    if s.uffd_bin.is_some() && !ws.is_file() {
        return Err(format!(
            "the template has no working set at {}",
            ws.display()
        ));
    }
    let file = s.manager(RestoreBackend::File)?;
    let _cf = Cleanup(file.clone());
    let uffd = if s.uffd_bin.is_some() {
        Some(s.manager(RestoreBackend::Uffd)?)
    } else {
        None
    };
    let _cu = uffd.clone().map(Cleanup);
    let mut k = 0x100u128;
    // Untimed warm-up per manager (the template memory file, the page cache).
    for m in std::iter::once(&file).chain(uffd.as_ref()) {
        k += 1;
        create_and_exec(m, SANDBOX_BASE + k)?;
        destroy_all(m);
    }
    let mut times: Vec<Vec<CreateTimes>> = vec![Vec::new(); variants.len()];
    let mut stats: Vec<Vec<agent::restore_stats::RestoreReport>> = vec![Vec::new(); 3];
    for r in 0..rounds {
        for j in 0..variants.len() {
            let vi = (j + r) % variants.len();
            let v = variants[vi];
            k += 1;
            let (m, aside) = match (v, &uffd) {
                (Variant::File, _) => (&file, None),
                (Variant::UffdPrefetch, Some(u)) => (u, None),
                (Variant::UffdNoPrefetch, Some(u)) => (u, Some(WorkingSetAside::new(ws.clone())?)),
                (_, None) => return Err("uffd variant without wrenn-uffd".into()),
            };
            let t = create_and_exec(m, SANDBOX_BASE + k)?;
            drop(aside);
            if v != Variant::File {
                if let Some(st) = uffd_stats(m, sb(SANDBOX_BASE + k)) {
                    stats[vi].push(st);
                }
            }
            times[vi].push(t);
            destroy_all(m);
        }
    }
    let samples = |vi: usize, f: fn(&CreateTimes) -> Duration| {
        Samples::from_durations(&times[vi].iter().map(f).collect::<Vec<_>>())
    };
    for (vi, v) in variants.iter().enumerate() {
        for (what, f, note) in [
            (
                "create",
                (|t: &CreateTimes| t.create) as fn(&CreateTimes) -> Duration,
                "create_to_manager_answer(envd_initialized)",
            ),
            ("exec", |t| t.exec, "create_to_first_exec_answered"),
        ] {
            let sm = samples(vi, f);
            println!(
                "{} max_ns={}",
                info_line(
                    &format!("sandbox_create_{}_{what}", v.name()),
                    &sm,
                    &format!("{note},alone,n={}", sm.len()),
                ),
                sm.percentile(1.0)
            );
        }
        for st in &stats[vi] {
            println!(
                "info=sandbox_create_{}_uffd_stats state={} faults={} pages_prefetched={} pages_filled={} pages_total={} first_fault_us={}",
                v.name(),
                st.state,
                st.faults,
                st.pages_prefetched,
                st.pages_filled,
                st.pages_total,
                st.first_fault_us.saturating_sub(1)
            );
        }
    }
    if variants.len() == 3 {
        let exec = |vi| samples(vi, |t| t.exec);
        println!(
            "{}",
            latency_line(
                "sandbox_create_uffd_exec",
                &exec(1),
                "sandbox_create_file_exec",
                &exec(0),
                Goal::AtMost(1.0),
            )
        );
        println!(
            "{}",
            latency_line(
                "sandbox_create_uffd_prefetch_exec",
                &exec(1),
                "sandbox_create_uffd_noprefetch_exec",
                &exec(2),
                Goal::AtMost(1.0),
            )
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exited_processes_are_told_from_live_ones() {
        assert!(!exited_state("4233 (wrenn-uffd) S 4216 4233 1 0 -1"));
        assert!(!exited_state("4233 (a) b) R 1 2"));
        assert!(exited_state("4233 (wrenn-uffd) Z 4216 4233 1 0 -1"));
        assert!(exited_state("4233 (x) X 1"));
        assert!(exited_state("garbage"));
    }

    #[test]
    fn smaps_rollup_is_read() {
        let text =
            "55d4c0000000-7ffc9b5fe000 ---p 00000000 00:00 0                          [rollup]\n\
                    Rss:              524800 kB\n\
                    Pss:               60123 kB\n\
                    Pss_Dirty:          1000 kB\n\
                    Pss_Anon:           4000 kB\n\
                    Pss_File:          56123 kB\n\
                    Pss_Shmem:             0 kB\n";
        assert_eq!(
            Mem::parse(text),
            Some(Mem {
                rss: 524_800,
                pss: 60_123,
                pss_anon: 4000,
                pss_file: 56_123,
            })
        );
        // Pss_Dirty must not be taken for Pss, nor a missing Pss be zero.
        assert_eq!(Mem::parse("Rss: 1 kB\nPss_Dirty: 5 kB\n"), None);
    }

    #[test]
    fn ratio_is_summed_pss_over_n_alone() {
        assert!((density_ratio(300, 100, 10) - 0.3).abs() < 1e-12);
        assert!((density_ratio(1000, 100, 10) - 1.0).abs() < 1e-12);
        assert!(density_ratio(5, 0, 0).is_finite());
    }

    #[test]
    fn ten_fit_two_cores_at_the_case_ratio() {
        let offered = agent::host::Overcommit {
            vcpu: DENSITY_VCPU_OVERCOMMIT,
            memory: 1.0,
        }
        .apply(&pb::Resources {
            vcpus: 2,
            memory_mib: 16 << 10,
            disk_mib: 0,
        });
        assert!(offered.vcpus as usize >= DENSITY_N_DEFAULT);
    }

    #[test]
    fn the_cases_skip_without_inputs() {
        // Only meaningful where the variables are unset (CI); a host with them runs VMs.
        if crate::agent::vm_skip_reason().is_some() {
            for c in cases() {
                assert!(["sandbox_density", "sandbox_create_backends"].contains(&c.name));
                (c.run)(&Opts { quick: true }).unwrap();
            }
        }
    }
}
