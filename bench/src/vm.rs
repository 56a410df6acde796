//! Restore cases (issue 5): a real guest restored from a Full snapshot, timed phase by phase.
//!
//! - `vm_restore`: boot ONE guest (a cold boot takes minutes on the nested test hosts, so it
//!   is reported once as `metric=vm_cold_boot`, not benchmarked), `Init` its envd, pause,
//!   take a Full snapshot, then restore it N times with each memory backend (File, and Uffd
//!   served by `wrenn-uffd`), alternating the order. Every restore gets its own copy of the
//!   paused disk (made before the clock starts) and is timed in phases:
//!   spawn → API socket ready → (Uffd: `wrenn-uffd` started and listening) → `snapshot/load`
//!   → `PATCH /vm Resumed` → envd answers `Health/Check` over vsock.
//!   Each phase is printed as an `info=` line (p50/p99). The figure is our overhead: the share
//!   of the total (spawn to envd's answer) spent outside Firecracker's own API calls
//!   (`snapshot/load` + resume) and the guest (resume until envd answers), per restore, p50;
//!   goal <= 10 % for each backend (`metric=vm_restore_{file,uffd}_overhead_share`, and
//!   `metric=vm_restore_overhead_share` = the worse of the two). Then
//!   `bench=vm_restore_uffd ... baseline=vm_restore_file`: total time to envd's first answer,
//!   Uffd over File, goal <= 1.0.
//!
//! Runs only when `WRENN_FIRECRACKER`, `WRENN_KERNEL` and `WRENN_ROOTFS` are set (and as
//! root, with /dev/kvm); otherwise prints `bench=vm_restore skipped=<reason>`. Optional:
//! `WRENN_BOOT_ARGS` (extra kernel arguments, e.g. the nested-hypervisor workarounds of test
//! hosts), `WRENN_BOOT_TIMEOUT_S` (default 900), `WRENN_UFFD` (else `wrenn-uffd` next to the
//! bench binary; without it the Uffd half is skipped with a line saying so). Everything
//! (processes, sockets, disk copies, snapshot files) lives under one directory in /tmp that is
//! removed on the way out, error or not.

use std::fmt::Display;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::gen::wrenn::envd::v1::{
    health_methods, init_methods, HealthCheckRequest, HealthCheckResponse, InitRequest,
    InitResponse, ReadyRequest,
};
use proto::rpc::{Client, Credential};
use uffd::generation::{self, SnapshotKind};
use uffd::header::{BuildId, Header};
use vmm_glue::disk::clone_disk;
use vmm_glue::page_server::{PageServerConfig, PageServerProcess};
use vmm_glue::process::{SpawnConfig, VmProcess, STABLE_DISK_PATH};
use vmm_glue::request::{
    Action, BootSource, Drive, MachineConfig, MemBackend, SnapshotCreate, SnapshotLoad,
    SnapshotType, VmState, Vsock,
};
use vmm_glue::vsock::{self, ReadinessListener, ENVD_PORT};

use crate::harness::{info_line, latency_line, metric_line, Case, Goal, Opts, Samples};

/// Guest size: the size the e2e boot test uses (256 MiB, one vCPU: only 1-vCPU guests work
/// under the nested hypervisor of test hosts).
const GUEST_MIB: u64 = 256;
/// Default deadline for the cold boot to reach envd's readiness push (a guest kernel took
/// 4–6 minutes to reach userspace on test hosts with the serial console on).
const BOOT_TIMEOUT_DEFAULT_S: u64 = 900;
/// Deadline for Firecracker's API socket and for `wrenn-uffd` to listen.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a restored guest's envd to answer (the first answer came 2–6 s after the
/// load on test hosts; this leaves room for a slow, shared machine).
const ENVD_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between attempts to reach envd after a resume: short, so the polling adds little
/// to the guest phase it is part of.
const ENVD_RETRY: Duration = Duration::from_millis(10);
const TOKEN: &str = "bench-vm-restore-token";
const SANDBOX_ID: &str = "sb-00000000-0000-0000-0000-00000000b007";

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "vm_restore",
        run: vm_restore,
    }]
}

fn err<E: Display>(what: impl Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// What the case needs from the host.
struct Inputs {
    firecracker: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    boot_args: Option<String>,
    boot_timeout: Duration,
    /// `wrenn-uffd`, or why the Uffd half cannot run.
    uffd: Result<PathBuf, String>,
}

/// The inputs, or the reason to skip (`Ok(Err(reason))`). Variables set to something that
/// is not a file are an error, not a skip: the run was meant to happen.
fn inputs() -> Result<Result<Inputs, String>, String> {
    let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let (Some(fc), Some(kernel), Some(rootfs)) = (
        var("WRENN_FIRECRACKER"),
        var("WRENN_KERNEL"),
        var("WRENN_ROOTFS"),
    ) else {
        return Ok(Err(
            "WRENN_FIRECRACKER/WRENN_KERNEL/WRENN_ROOTFS_not_all_set".to_owned(),
        ));
    };
    for (name, p) in [
        ("WRENN_FIRECRACKER", &fc),
        ("WRENN_KERNEL", &kernel),
        ("WRENN_ROOTFS", &rootfs),
    ] {
        if !p.is_file() {
            return Err(format!("{name}={} is not a file", p.display()));
        }
    }
    if !proto::skip::is_root() {
        return Ok(Err(
            "needs_root_(mount_namespace_for_the_stable_disk_path)".into()
        ));
    }
    if fs::metadata("/dev/kvm").is_err() {
        return Ok(Err("no_/dev/kvm".into()));
    }
    let boot_timeout = match std::env::var("WRENN_BOOT_TIMEOUT_S") {
        Ok(s) => s
            .parse()
            .map_err(|_| format!("WRENN_BOOT_TIMEOUT_S={s:?} is not a number of seconds"))?,
        Err(_) => BOOT_TIMEOUT_DEFAULT_S,
    };
    let uffd = match var("WRENN_UFFD") {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => return Err(format!("WRENN_UFFD={} is not a file", p.display())),
        None => std::env::current_exe()
            .map_err(|e| format!("current exe: {e}"))
            .map(|me| me.with_file_name("wrenn-uffd"))
            .and_then(|p| {
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(format!(
                        "{}_not_set_and_no_{}_(cargo_build_--release_-p_uffd)",
                        "WRENN_UFFD",
                        p.display()
                    ))
                }
            }),
    };
    Ok(Ok(Inputs {
        firecracker: fc,
        kernel,
        rootfs,
        boot_args: std::env::var("WRENN_BOOT_ARGS")
            .ok()
            .filter(|s| !s.trim().is_empty()),
        boot_timeout: Duration::from_secs(boot_timeout),
        uffd,
    }))
}

/// A directory removed (with everything in it) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(path: PathBuf) -> Result<TempDir, String> {
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(err(format!("create {}", path.display())))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Kills Firecracker on drop unless it was killed explicitly.
struct VmGuard(Option<VmProcess>);

impl VmGuard {
    fn vm(&mut self) -> Result<&mut VmProcess, String> {
        self.0
            .as_mut()
            .ok_or_else(|| "firecracker already killed".into())
    }

    fn kill(&mut self) -> Result<(), String> {
        match self.0.take() {
            Some(vm) => vm.kill().map(|_| ()).map_err(err("kill firecracker")),
            None => Ok(()),
        }
    }
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Some(vm) = self.0.take() {
            let _ = vm.kill();
        }
    }
}

/// Kills `wrenn-uffd` on drop unless it was killed explicitly.
struct PagerGuard(Option<PageServerProcess>);

impl PagerGuard {
    fn kill(&mut self) -> Result<(), String> {
        match self.0.take() {
            Some(p) => p.kill().map(|_| ()).map_err(err("kill wrenn-uffd")),
            None => Ok(()),
        }
    }
}

impl Drop for PagerGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.kill();
        }
    }
}

/// The last bytes of a log, for error messages.
fn tail(p: &Path) -> String {
    let t = fs::read(p).unwrap_or_default();
    String::from_utf8_lossy(&t[t.len().saturating_sub(1500)..]).into_owned()
}

fn spawn(fc: &Path, id: &str, dir: &Path, disk: &Path, uds: &Path) -> Result<VmGuard, String> {
    let mut cfg = SpawnConfig::new(fc, id, dir);
    cfg.disk = Some(disk.to_owned());
    cfg.cleanup = vec![
        uds.to_owned(),
        vsock::listener_path(uds, vsock::READINESS_PORT),
    ];
    let vm = VmProcess::spawn(&cfg).map_err(err("spawn firecracker"))?;
    Ok(VmGuard(Some(vm)))
}

fn now_unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// Waits for envd's readiness push, failing early if Firecracker exits.
fn wait_ready(
    rx: &Receiver<ReadyRequest>,
    timeout: Duration,
    vm: &mut VmProcess,
) -> Result<ReadyRequest, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(r) => return Ok(r),
            Err(_) if Instant::now() >= deadline => {
                return Err(format!(
                    "no readiness from envd within {timeout:?}; firecracker log ends: {}",
                    tail(vm.log_path())
                ))
            }
            Err(_) => {
                if let Some(e) = vm.try_wait().map_err(err("wait firecracker"))? {
                    return Err(format!(
                        "firecracker exited during boot ({e:?}); log ends: {}",
                        tail(vm.log_path())
                    ));
                }
            }
        }
    }
}

/// envd's answer to `Health/Check` after a resume, and how it came.
struct EnvdAnswer {
    resp: HealthCheckResponse,
    /// Connection attempts (1 = the first one got through).
    attempts: u32,
    /// From the first attempt until the connection that answered was open (vsock CONNECT
    /// and the RPC hello included, failed attempts and pauses too).
    connect: Duration,
}

/// Connects to envd over vsock and calls `Health/Check` until it answers; retries every
/// `ENVD_RETRY` while the guest is not there yet.
fn health(uds: &Path, cred: &Credential, timeout: Duration) -> Result<EnvdAnswer, String> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let mut connect = Duration::ZERO;
        let attempt = vsock::connect_rpc(uds, ENVD_PORT, cred.clone(), left)
            .map_err(|e| format!("connect to envd: {e}"))
            .and_then(|c| {
                connect = start.elapsed();
                let r = c
                    .unary::<_, HealthCheckResponse>(
                        health_methods::CHECK,
                        &HealthCheckRequest {},
                        Some(left.max(Duration::from_millis(1))),
                    )
                    .map_err(|e| format!("Health/Check: {e}"));
                c.close();
                r
            });
        match attempt {
            Ok(resp) => {
                return Ok(EnvdAnswer {
                    resp,
                    attempts,
                    connect,
                })
            }
            Err(e) if Instant::now() + ENVD_RETRY >= deadline => {
                return Err(format!(
                    "envd did not answer within {timeout:?} ({attempts} attempts): {e}"
                ))
            }
            Err(_) => std::thread::sleep(ENVD_RETRY),
        }
    }
}

/// Connects to envd (retrying) for the `Init` after the cold boot.
fn envd_client(uds: &Path, cred: &Credential, timeout: Duration) -> Result<Client, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match vsock::connect_rpc(uds, ENVD_PORT, cred.clone(), Duration::from_secs(10)) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(format!("connect to envd: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The snapshot every restore starts from.
struct Snapshot {
    state: PathBuf,
    mem: PathBuf,
    /// The disk as it was when the VM was paused.
    disk: PathBuf,
    /// Header and layer directory for `wrenn-uffd` (when it can run).
    uffd: Option<(PathBuf, PathBuf)>,
}

/// Boots a guest, inits envd, pauses, takes a Full snapshot and copies the disk; prints the
/// cold boot and the snapshot time. The booted VM is gone when this returns.
fn boot_and_snapshot(inp: &Inputs, root: &Path) -> Result<Snapshot, String> {
    let boot = TempDir::new(root.join("boot"))?;
    let disk = boot.0.join("rootfs.ext4");
    clone_disk(&inp.rootfs, &disk).map_err(err("copy the template rootfs"))?;
    let uds = boot.0.join("v.sock");
    let (ready, rx) = ReadinessListener::with_channel(&uds).map_err(err("readiness listener"))?;
    let mut vm = spawn(&inp.firecracker, "bench-boot", &boot.0, &disk, &uds)?;
    vm.vm()?
        .wait_api_socket(SOCKET_TIMEOUT)
        .map_err(err("firecracker api socket"))?;
    let mut api = vm.vm()?.api_client();
    api.call(&MachineConfig::new(1, GUEST_MIB as u32))
        .map_err(err("machine-config"))?;
    let mut src = BootSource::new(&inp.kernel);
    if let Some(extra) = &inp.boot_args {
        src = src.arg(extra);
    }
    api.call(&src).map_err(err("boot-source"))?;
    api.call(&Drive::root("rootfs", STABLE_DISK_PATH))
        .map_err(err("drive"))?;
    api.call(&Vsock {
        guest_cid: 3,
        uds_path: uds.clone(),
    })
    .map_err(err("vsock"))?;
    let t = Instant::now();
    api.call(&Action::InstanceStart)
        .map_err(err("InstanceStart"))?;
    let r = wait_ready(&rx, inp.boot_timeout, vm.vm()?)?;
    let cold = t.elapsed();
    if r.api_port != ENVD_PORT {
        return Err(format!(
            "envd announced port {}, not {ENVD_PORT}",
            r.api_port
        ));
    }
    // Reported once, never benchmarked: the goal is the boot deadline of this case.
    println!(
        "{}",
        metric_line(
            "vm_cold_boot",
            (cold.as_secs_f64() * 10.0).round() / 10.0,
            "s",
            Goal::AtMost(inp.boot_timeout.as_secs() as f64),
        )
    );

    // Init (no credential before the first Init), as the agent does after a cold boot, so
    // restored guests answer to the token like a real sandbox's.
    let c = envd_client(&uds, &Credential::none(), Duration::from_secs(60))?;
    let _: InitResponse = c
        .unary(
            init_methods::INIT,
            &InitRequest {
                sandbox_id: SANDBOX_ID.into(),
                access_token: TOKEN.into(),
                wall_time_unix_ns: now_unix_ns(),
                ..Default::default()
            },
            Some(Duration::from_secs(60)),
        )
        .map_err(err("Init"))?;
    c.close();

    api.call(&VmState::Paused).map_err(err("pause"))?;
    let snap = root.join("snap");
    fs::create_dir(&snap).map_err(err("create the snapshot dir"))?;
    let state = snap.join("state");
    let mem = snap.join("mem");
    let t = Instant::now();
    api.call(&SnapshotCreate {
        snapshot_type: SnapshotType::Full,
        snapshot_path: state.clone(),
        mem_file_path: mem.clone(),
    })
    .map_err(err("snapshot/create"))?;
    let took = t.elapsed();
    println!(
        "{}",
        info_line(
            "vm_snapshot_create_full",
            &Samples::from_durations(&[took]),
            &format!("once,{GUEST_MIB}MiB_guest"),
        )
    );
    let snap_disk = snap.join("rootfs.ext4");
    clone_disk(&disk, &snap_disk).map_err(err("copy the paused disk"))?;
    vm.kill()?;
    ready.shutdown();
    drop(boot);

    let uffd = match &inp.uffd {
        Ok(_) => Some(build_layer(&snap, &mem)?),
        Err(_) => None,
    };
    Ok(Snapshot {
        state,
        mem,
        disk: snap_disk,
        uffd,
    })
}

/// Turns the Full memory file into a header and one layer for `wrenn-uffd`.
fn build_layer(snap: &Path, mem: &Path) -> Result<(PathBuf, PathBuf), String> {
    let f = fs::File::open(mem).map_err(err("open the memory file"))?;
    let size = f.metadata().map_err(err("stat the memory file"))?.len();
    let layers = snap.join("layers");
    fs::create_dir(&layers).map_err(err("create the layer dir"))?;
    let mut id = [0u8; 16];
    std::io::Read::read_exact(
        &mut fs::File::open("/dev/urandom").map_err(err("open /dev/urandom"))?,
        &mut id,
    )
    .map_err(err("read /dev/urandom"))?;
    id[0] |= 1; // never the nil id
    let id = BuildId(id);
    let out = fs::File::create(layers.join(id.layer_file_name())).map_err(err("create layer"))?;
    let mut w = BufWriter::new(out);
    let (diff, _) =
        generation::build(&f, size, SnapshotKind::Full, &mut w).map_err(err("build the layer"))?;
    w.flush().map_err(err("write the layer"))?;
    drop(w);
    let header = Header::from_base(size, id, &diff).map_err(err("header"))?;
    let hp = snap.join("header");
    fs::write(&hp, header.serialize()).map_err(err("write the header"))?;
    Ok((hp, layers))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    File,
    Uffd,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::File => "file",
            Backend::Uffd => "uffd",
        }
    }
}

/// One restore's phases.
#[derive(Clone, Copy, Debug, Default)]
struct Phases {
    spawn_api: Duration,
    uffd_start: Duration,
    load: Duration,
    resume: Duration,
    guest: Duration,
    /// The part of `guest` until the connection that answered was open.
    guest_connect: Duration,
    /// Connection attempts until envd answered.
    attempts: u32,
    total: Duration,
}

impl Phases {
    /// Everything that is neither Firecracker's API calls nor the guest.
    fn overhead(&self) -> Duration {
        self.total
            .saturating_sub(self.load + self.resume)
            .saturating_sub(self.guest)
    }

    fn overhead_share_percent(&self) -> f64 {
        100.0 * self.overhead().as_secs_f64() / self.total.as_secs_f64().max(1e-9)
    }
}

/// Restores the snapshot into a fresh sandbox dir and times it; cleans up before returning.
fn restore_once(
    inp: &Inputs,
    snap: &Snapshot,
    root: &Path,
    backend: Backend,
    i: usize,
) -> Result<(Phases, Duration), String> {
    let dir = TempDir::new(root.join(format!("r{}{i}", backend.name())))?;
    let disk = dir.0.join("rootfs.ext4");
    let t = Instant::now();
    clone_disk(&snap.disk, &disk).map_err(err("copy the snapshot disk"))?;
    let disk_copy = t.elapsed();
    let uds = dir.0.join("v.sock");
    // envd may announce itself after a resume; the agent listens for it like after a boot.
    let (ready, _rx) = ReadinessListener::with_channel(&uds).map_err(err("readiness listener"))?;
    let mut p = Phases::default();

    let t0 = Instant::now();
    let mut vm = spawn(
        &inp.firecracker,
        &format!("bench-{}-{i}", backend.name()),
        &dir.0,
        &disk,
        &uds,
    )?;
    vm.vm()?
        .wait_api_socket(SOCKET_TIMEOUT)
        .map_err(err("firecracker api socket"))?;
    let t1 = Instant::now();
    p.spawn_api = t1 - t0;

    let mut pager = PagerGuard(None);
    let mem = match backend {
        Backend::File => MemBackend::File(snap.mem.clone()),
        Backend::Uffd => {
            let (Ok(bin), Some((header, layers))) = (&inp.uffd, &snap.uffd) else {
                return Err("uffd restore without wrenn-uffd".into());
            };
            let socket = dir.0.join("uffd.sock");
            let ps = PageServerProcess::spawn(&PageServerConfig {
                binary: bin.clone(),
                dir: dir.0.clone(),
                socket: socket.clone(),
                firecracker_pid: vm.vm()?.pid(),
                header: header.clone(),
                layers: layers.clone(),
                prefetch: None,
                stats: None,
                extra_args: vec![],
            })
            .map_err(err("spawn wrenn-uffd"))?;
            let ps = pager.0.insert(ps);
            ps.wait_listening(SOCKET_TIMEOUT)
                .map_err(err("wrenn-uffd listening"))?;
            MemBackend::Uffd(socket)
        }
    };
    let t2 = Instant::now();
    p.uffd_start = t2 - t1;

    let mut api = vm.vm()?.api_client();
    let mut load = SnapshotLoad::new(&snap.state, mem);
    // As the agent loads (agent/src/firecracker.rs): dirty tracking on for the next Diff, vsock override.
    load.track_dirty_pages = true;
    load.resume_vm = false;
    load.vsock_override = Some(uds.clone());
    let load_res = api.call(&load);
    let t3 = Instant::now();
    load_res.map_err(|e| {
        format!(
            "snapshot/load ({}): {e}; firecracker log ends: {}",
            backend.name(),
            tail(&dir.0.join(vmm_glue::process::LOG_NAME))
        )
    })?;
    p.load = t3 - t2;
    api.call(&VmState::Resumed).map_err(err("resume"))?;
    let t4 = Instant::now();
    p.resume = t4 - t3;

    let h = health(&uds, &Credential::access_token(TOKEN), ENVD_TIMEOUT).map_err(|e| {
        format!(
            "{} restore {i}: {e}; firecracker log ends: {}",
            backend.name(),
            tail(&dir.0.join(vmm_glue::process::LOG_NAME))
        )
    })?;
    let t5 = Instant::now();
    p.guest = t5 - t4;
    p.guest_connect = h.connect;
    p.attempts = h.attempts;
    let h = h.resp;
    p.total = t5 - t0;
    // The answer comes from the snapshotted guest, not some other envd.
    if !h.initialized || h.sandbox_id != SANDBOX_ID {
        return Err(format!(
            "restored envd answered initialized={} sandbox_id={:?}, expected {SANDBOX_ID}",
            h.initialized, h.sandbox_id
        ));
    }

    drop(api);
    vm.kill()?;
    pager.kill()?;
    ready.shutdown();
    drop(dir);
    Ok((p, disk_copy))
}

/// Per-backend results.
#[derive(Default)]
struct Runs {
    phases: Vec<Phases>,
    disk_copy: Vec<Duration>,
}

impl Runs {
    fn samples(&self, f: impl Fn(&Phases) -> Duration) -> Samples {
        Samples::from_durations(&self.phases.iter().map(f).collect::<Vec<_>>())
    }

    /// Median of the per-restore overhead shares, in percent.
    fn overhead_share(&self) -> f64 {
        let mut v: Vec<f64> = self
            .phases
            .iter()
            .map(Phases::overhead_share_percent)
            .collect();
        v.sort_by(f64::total_cmp);
        let idx = ((v.len().saturating_sub(1)) as f64 * 0.5).round() as usize;
        v.get(idx).copied().unwrap_or(f64::NAN)
    }

    fn print(&self, backend: Backend) {
        let b = backend.name();
        let n = self.phases.len();
        let mut lines = vec![
            (
                "disk_copy",
                Samples::from_durations(&self.disk_copy),
                "untimed_prep:copy_of_the_paused_disk",
            ),
            (
                "spawn_api",
                self.samples(|p| p.spawn_api),
                "spawn_to_API_socket_ready(ours)",
            ),
        ];
        if backend == Backend::Uffd {
            lines.push((
                "uffd_start",
                self.samples(|p| p.uffd_start),
                "wrenn-uffd_spawn_to_listening(ours)",
            ));
        }
        lines.extend([
            (
                "load",
                self.samples(|p| p.load),
                "PUT_/snapshot/load(firecracker)",
            ),
            (
                "resume",
                self.samples(|p| p.resume),
                "PATCH_/vm_Resumed(firecracker)",
            ),
            (
                "guest",
                self.samples(|p| p.guest),
                "resume_to_envd_Health/Check_answer(guest)",
            ),
            (
                "guest_connect",
                self.samples(|p| p.guest_connect),
                "resume_to_envd_connection_open(vsock_CONNECT+hello,retries_included)",
            ),
            (
                "overhead",
                self.samples(|p| p.overhead()),
                "total-(load+resume)-guest",
            ),
            (
                "total",
                self.samples(|p| p.total),
                "spawn_to_envd_Health/Check_answer",
            ),
        ]);
        let attempts_max = self.phases.iter().map(|p| p.attempts).max().unwrap_or(0);
        for (phase, s, note) in lines {
            let more = if phase == "guest" {
                format!(",envd_connect_attempts_max={attempts_max}")
            } else {
                String::new()
            };
            println!(
                "{}",
                info_line(
                    &format!("vm_restore_{b}_{phase}"),
                    &s,
                    &format!("{note}{more},n={n}")
                )
            );
        }
        println!(
            "{}",
            metric_line(
                &format!("vm_restore_{b}_overhead_share"),
                round2(self.overhead_share()),
                "percent",
                Goal::AtMost(10.0),
            )
        );
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn vm_restore(opts: &Opts) -> Result<(), String> {
    let inp = match inputs()? {
        Ok(i) => i,
        Err(reason) => {
            println!("bench=vm_restore skipped={reason}");
            return Ok(());
        }
    };
    let n = opts.iters(10, 2);
    // Short: Unix socket paths are limited to 107 bytes.
    let root = TempDir::new(PathBuf::from(format!(
        "/tmp/wrenn-bvm-{}",
        std::process::id()
    )))?;
    let snap = boot_and_snapshot(&inp, &root.0)?;
    let mut backends = vec![Backend::File];
    match &inp.uffd {
        Ok(_) => backends.push(Backend::Uffd),
        Err(reason) => println!("bench=vm_restore_uffd skipped={reason}"),
    }
    let mut file = Runs::default();
    let mut uffd = Runs::default();
    for i in 0..n {
        // Alternate which backend goes first: drift on a shared machine hits both alike.
        let mut order = backends.clone();
        if i % 2 == 1 {
            order.reverse();
        }
        for b in order {
            let (p, copy) = restore_once(&inp, &snap, &root.0, b, i)?;
            let runs = match b {
                Backend::File => &mut file,
                Backend::Uffd => &mut uffd,
            };
            runs.phases.push(p);
            runs.disk_copy.push(copy);
        }
    }
    file.print(Backend::File);
    let mut worst = file.overhead_share();
    if !uffd.phases.is_empty() {
        uffd.print(Backend::Uffd);
        worst = worst.max(uffd.overhead_share());
        println!(
            "{}",
            latency_line(
                "vm_restore_uffd",
                &uffd.samples(|p| p.total),
                "vm_restore_file",
                &file.samples(|p| p.total),
                Goal::AtMost(1.0),
            )
        );
    }
    println!(
        "{}",
        metric_line(
            "vm_restore_overhead_share",
            round2(worst),
            "percent",
            Goal::AtMost(10.0),
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_what_is_left() {
        let ms = Duration::from_millis;
        let p = Phases {
            spawn_api: ms(40),
            uffd_start: ms(10),
            load: ms(20),
            resume: ms(5),
            guest: ms(925),
            guest_connect: ms(900),
            attempts: 1,
            total: ms(1000),
        };
        assert_eq!(p.overhead(), ms(50));
        assert!((p.overhead_share_percent() - 5.0).abs() < 1e-9);
        let runs = Runs {
            phases: vec![
                p,
                Phases {
                    total: ms(1100),
                    ..p
                },
                Phases {
                    total: ms(950),
                    ..p
                },
            ],
            disk_copy: vec![ms(1); 3],
        };
        // Shares 5 %, ~13.6 %, 0 % (saturating): the median is 5 %.
        assert!((runs.overhead_share() - 5.0).abs() < 1e-9);
    }
}
