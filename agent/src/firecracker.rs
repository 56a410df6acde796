//! The VM layer on Firecracker: [`Vmm`] implemented with `vmm-glue` (process, API, vsock,
//! disks, network slots, cgroups) and `uffd` (generations, headers, the page server).
//!
//! Per sandbox directory: `api.sock`, `firecracker.log`, `firecracker.state` (vmm-glue's
//! record for re-adoption), `vsock.sock` (+ `_49984` for envd's readiness push),
//! `uffd.sock`/`uffd.stats` while a page server runs, `snapshot/` with `header`, `vmstate`
//! and `<build id>.layer` files.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{info, warn};
use proto::rpc::{Client, Credential};
use proto::Status;
use uffd::generation::{self, SnapshotKind};
use uffd::header::{BuildId, Header};
use uffd::snapshot;
use vmm_glue::api::ApiClient;
use vmm_glue::cgroup::{self, CgroupLimits, CgroupMode};
use vmm_glue::jail::{self, Access, ChrootEntry, JailCgroups, JailLimits, JailSpec};
use vmm_glue::net::{Egress, NetConfig, Network};
use vmm_glue::page_server::{PageServerConfig, PageServerProcess};
use vmm_glue::process::{CgroupSpec, SpawnConfig, VmProcess, STABLE_DISK_PATH};
use vmm_glue::request::{
    Action, BootSource, Drive, MachineConfig, MemBackend, MmdsConfig, MmdsData, MmdsVersion,
    NetworkInterface, NetworkOverride, SnapshotCreate, SnapshotLoad, SnapshotType, VmState, Vsock,
};
use vmm_glue::vsock::{self, ReadinessListener, ENVD_PORT};

use crate::flags::{DnsUpstream, Flags, RestoreBackend};
use crate::limits::{BOOT_READY_TIMEOUT, ENVD_CALL_TIMEOUT};
use crate::statedir::{Chain, ProcRef, SandboxDir, SandboxRecord, TemplateDir};
use crate::sys;
use crate::vm::{RestoreSource, Started, VmError, Vmm};

/// The guest's network interface and the tap it uses in every slot.
const IFACE_ID: &str = "eth0";
const GUEST_CID: u32 = 3;
/// Time for Firecracker's API socket to appear.
const API_SOCKET_WAIT: Duration = Duration::from_secs(10);
/// Time for wrenn-uffd's socket to appear.
const PAGE_SERVER_WAIT: Duration = Duration::from_secs(10);
/// Longest a template's working set is recorded (wrenn-uffd `--record-seconds`): recording
/// ends with the template's pause (SIGUSR1); this only bounds a recording nobody stops.
const RECORD_SECONDS_MAX: u32 = 600;
/// Memory Firecracker itself needs besides guest memory (cgroup limit headroom); one value
/// for jailed and unjailed Firecrackers.
const VMM_OVERHEAD_BYTES: u64 = vmm_glue::limits::VMM_MEMORY_OVERHEAD_BYTES;
/// cgroup directory holding every sandbox.
const CGROUP_PARENT: &str = "wrenn";

/// Settings of the Firecracker VM layer.
#[derive(Clone, Debug)]
pub struct FcConfig {
    pub firecracker: PathBuf,
    /// Default guest kernel; else the most recent `<state-root>/kernels/vmlinux-*`.
    pub kernel: Option<PathBuf>,
    pub uffd_bin: Option<PathBuf>,
    pub backend: RestoreBackend,
    pub boot_args_extra: String,
    pub state_root: PathBuf,
    /// Serial console into firecracker.log (slow; for debugging).
    pub console: bool,
    /// Slot naming and addresses (two agents on one host need different ones), never_out.
    pub net: NetConfig,
    /// The slots' resolver's upstream.
    pub dns_upstream: DnsUpstream,
    /// Run every Firecracker under Firecracker's jailer (`None`: `--unjailed`).
    pub jail: Option<JailConfig>,
}

/// How Firecrackers are jailed.
#[derive(Clone, Debug)]
pub struct JailConfig {
    pub jailer: PathBuf,
    /// `--chroot-base-dir`: on the sandboxes' filesystem (disks are hard-linked in).
    pub chroot_base: PathBuf,
    /// The uid (and gid) every wrenn-uffd drops to.
    pub uffd_uid: u32,
}

/// Where one sandbox's VM files are, for the agent (host paths) and for Firecracker (the
/// same, or paths inside its chroot when jailed).
#[derive(Clone, Debug)]
struct VmPaths {
    /// `<chroot base>/<exec>/<id>/root` when jailed.
    chroot: Option<PathBuf>,
    api_socket: PathBuf,
    vsock_host: PathBuf,
    vsock_fc: PathBuf,
    uffd_host: PathBuf,
    uffd_fc: PathBuf,
}

impl VmPaths {
    /// Firecracker's view of a host path that is inside the chroot.
    fn fc_view(&self, inside: &str, host: PathBuf) -> PathBuf {
        match &self.chroot {
            Some(_) => PathBuf::from(inside),
            None => host,
        }
    }
}

impl FcConfig {
    pub fn from_flags(f: &Flags) -> FcConfig {
        FcConfig {
            firecracker: f.firecracker.clone(),
            kernel: f.kernel.clone(),
            uffd_bin: f.uffd_bin.clone().or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("wrenn-uffd")))
            }),
            backend: f.restore_backend,
            boot_args_extra: f.boot_args_extra.clone(),
            state_root: f.state_root.clone(),
            console: false,
            net: f.net.clone(),
            dns_upstream: f.dns_upstream,
            jail: (!f.unjailed).then(|| JailConfig {
                jailer: f.jailer.clone(),
                chroot_base: f.chroot_base.clone(),
                uffd_uid: f.uffd_uid,
            }),
        }
    }
}

/// Where a restore's guest memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum MemoryPlan {
    /// File backend, a create from a snapshot template: the template's one memory file,
    /// mapped as it is (no copy).
    TemplateFile(PathBuf),
    /// wrenn-uffd serves faults from the chain (uffd backend; a resume; a recording).
    Uffd,
    /// No wrenn-uffd: the chain materialized into a file of this VM's own.
    Materialize,
}

impl MemoryPlan {
    /// As logged per restore.
    fn name(&self) -> &'static str {
        match self {
            MemoryPlan::TemplateFile(_) => "file-template",
            MemoryPlan::Uffd => "uffd",
            MemoryPlan::Materialize => "file-materialized",
        }
    }
}

/// What runs for one sandbox.
struct Running {
    vm: VmProcess,
    /// Kept so envd's announces after a resume find a listener.
    _ready: Option<ReadinessListener>,
    page_server: Option<PageServerProcess>,
}

/// The Firecracker VM layer.
pub struct FirecrackerVmm {
    cfg: FcConfig,
    net: Network,
    /// Why host networking could not be set up (a problem until fixed).
    net_problem: Option<String>,
    cgroups: Option<CgroupMode>,
    /// The host's cgroups as the jailer needs them.
    jail_cgroups: Option<JailCgroups>,
    running: Mutex<HashMap<PathBuf, Running>>,
}

impl std::fmt::Debug for FirecrackerVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirecrackerVmm")
            .field("cfg", &self.cfg)
            .finish()
    }
}

fn err2<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    action: &'static str,
) -> impl FnOnce(E) -> VmError {
    move |source| VmError::new(action, source)
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// `vmlinux-<version>` -> version.
fn kernel_version(p: &Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinux-"))
        .unwrap_or("")
        .to_owned()
}

/// The end of Firecracker's log (with the serial console on, the guest kernel's last words).
fn tail(p: &Path) -> String {
    let t = fs::read(p).unwrap_or_default();
    String::from_utf8_lossy(&t[t.len().saturating_sub(4000)..])
        .trim()
        .to_owned()
}

/// Starts the slots' DNS resolver. Without it sandboxes still run; allow lists of domain
/// names then resolve nothing, which the log says.
fn start_resolver(net: &Network, upstream: DnsUpstream) {
    let addr = match upstream {
        DnsUpstream::Off => return,
        DnsUpstream::Addr(a) => Some(a),
        DnsUpstream::ResolvConf => fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|t| vmm_glue::net::resolver::upstream_from_resolv_conf(&t)),
    };
    let Some(addr) = addr else {
        warn!("no IPv4 nameserver in /etc/resolv.conf; slots get no resolver (set --dns-upstream)");
        return;
    };
    match net.start_resolver(addr) {
        Ok(()) => log::info!("slot resolver started upstream={addr}"),
        Err(e) => warn!("slot resolver not started upstream={addr} error={e}"),
    }
}

impl FirecrackerVmm {
    /// Sets up host networking (when possible: root and nft needed) and detects cgroups.
    pub fn new(cfg: FcConfig) -> FirecrackerVmm {
        let net = Network::new(cfg.net.clone());
        // Host networking is set up only where sandboxes can run at all.
        let net_problem = if !executable(&cfg.firecracker) {
            None
        } else if !running_as_root() {
            Some(
                "wrenn-agent is not running as root (network namespaces, taps, cgroups need it)"
                    .into(),
            )
        } else {
            net.setup_host()
                .err()
                .map(|e| format!("host networking could not be set up: {e}"))
        };
        if net_problem.is_none() && executable(&cfg.firecracker) {
            start_resolver(&net, cfg.dns_upstream);
        }
        let cgroups = match cgroup::detect() {
            Ok(m) => Some(m),
            Err(e) => {
                warn!("no usable cgroups; sandboxes run without limits error={e}");
                None
            }
        };
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let jail_cgroups = cgroups
            .as_ref()
            .map(|m| JailCgroups::from_mode(m, &mountinfo));
        FirecrackerVmm {
            cfg,
            net,
            net_problem,
            cgroups,
            jail_cgroups,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// The guest kernel used for `version` ("" = the default).
    pub fn kernel_path(&self, version: &str) -> Option<PathBuf> {
        let kernels = self.cfg.state_root.join("kernels");
        if !version.is_empty() {
            let p = kernels.join(format!("vmlinux-{version}"));
            return p.exists().then_some(p);
        }
        if let Some(k) = &self.cfg.kernel {
            return k.is_file().then(|| k.clone());
        }
        // The most recently installed kernel (names carry a config hash, not an order).
        fs::read_dir(&kernels)
            .ok()?
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("vmlinux-") && !n.ends_with(".config"))
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .max()
            .map(|(_, p)| p)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The paths of `dir`'s VM files (its directory name is the sandbox id).
    fn paths(&self, dir: &SandboxDir) -> VmPaths {
        let chroot = self.cfg.jail.as_ref().and_then(|j| {
            let id = jail_id(dir)?;
            jail::chroot_dir(&j.chroot_base, &self.cfg.firecracker, &id).ok()
        });
        match chroot {
            Some(c) => VmPaths {
                api_socket: jail::host_path(&c, Path::new(jail::JAIL_API_SOCKET)),
                vsock_host: jail::host_path(&c, Path::new(jail::JAIL_VSOCK_SOCKET)),
                vsock_fc: jail::JAIL_VSOCK_SOCKET.into(),
                uffd_host: jail::host_path(&c, Path::new(jail::JAIL_UFFD_SOCKET)),
                uffd_fc: jail::JAIL_UFFD_SOCKET.into(),
                chroot: Some(c),
            },
            None => VmPaths {
                chroot: None,
                api_socket: dir.api_socket(),
                vsock_host: dir.vsock_socket(),
                vsock_fc: dir.vsock_socket(),
                uffd_host: dir.uffd_socket(),
                uffd_fc: dir.uffd_socket(),
            },
        }
    }

    /// The jail uid of `rec` (held with its slot by the manager).
    fn jail_uid(&self, rec: &SandboxRecord) -> Result<Option<u32>, VmError> {
        match (&self.cfg.jail, rec.jail_uid) {
            (None, _) => Ok(None),
            (Some(_), Some(u)) => Ok(Some(u)),
            (Some(_), None) => Err(VmError::new("start firecracker", "no jail uid assigned")),
        }
    }

    /// Jailed: builds `rec`'s chroot afresh with the kernel (shared), its disk at the stable
    /// path (owned by its uid while it runs), a directory for a pause's files, and `extra`.
    /// Unjailed: nothing.
    fn prepare_chroot(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        kernel: Option<&Path>,
        extra: Vec<ChrootEntry>,
    ) -> Result<(), VmError> {
        let (Some(chroot), Some(uid)) = (self.paths(dir).chroot, self.jail_uid(rec)?) else {
            return Ok(());
        };
        let mut entries = vec![
            ChrootEntry::new(STABLE_DISK_PATH, dir.disk(), Access::Owned),
            ChrootEntry::new(jail::JAIL_SNAPSHOT_DIR, "", Access::WritableDir),
        ];
        if let Some(k) = kernel {
            entries.push(ChrootEntry::new(jail::JAIL_KERNEL, k, Access::Shared));
        }
        entries.extend(extra);
        jail::prepare_chroot(&chroot, &entries, uid, uid).map_err(err2("prepare chroot"))
    }

    /// Makes a socket the agent listens on inside the chroot connectable by the jailed uid.
    fn give_socket(&self, rec: &SandboxRecord, path: &Path) -> Result<(), VmError> {
        match (&self.cfg.jail, rec.jail_uid) {
            (Some(_), Some(uid)) => {
                jail::give_socket(path, uid, uid).map_err(err2("chown socket for the jail"))
            }
            _ => Ok(()),
        }
    }

    /// How the jailer starts the VM in `dir` (`None`: a directory name that is no id). The
    /// chroot it makes is the one [`Self::paths`] names.
    fn jail_spec(
        &self,
        j: &JailConfig,
        dir: &SandboxDir,
        uid: u32,
        netns: Option<String>,
        limits: JailLimits,
    ) -> Option<JailSpec> {
        Some(JailSpec {
            jailer: j.jailer.clone(),
            firecracker: self.cfg.firecracker.clone(),
            id: jail_id(dir)?,
            uid,
            gid: uid,
            chroot_base: j.chroot_base.clone(),
            netns,
            cgroups: self.jail_cgroups.clone(),
            cgroup_parent: CGROUP_PARENT.into(),
            limits,
            firecracker_args: Vec::new(),
        })
    }

    /// Spawns Firecracker (API only) for `rec` in its slot: jailed (its chroot prepared by
    /// [`Self::prepare_chroot`]) or, with `--unjailed`, in its own mount namespace.
    fn spawn(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<VmProcess, VmError> {
        if let (Some(j), Some(uid)) = (&self.cfg.jail, self.jail_uid(rec)?) {
            let index = rec
                .slot
                .ok_or_else(|| VmError::new("start firecracker", "no slot"))?;
            let slot = self
                .net
                .config()
                .slot(index)
                .map_err(|e| VmError::new("start firecracker", e))?;
            let memory_bytes = u64::from(rec.spec.memory_mib) << 20;
            let disk_bytes = fs::metadata(dir.disk()).map(|m| m.len()).unwrap_or(0);
            let limits = JailLimits::for_vm(rec.spec.vcpus, memory_bytes, disk_bytes);
            let spec = self
                .jail_spec(j, dir, uid, Some(slot.netns), limits)
                .ok_or_else(|| VmError::new("start firecracker", "no jail id"))?;
            let mut vm = VmProcess::spawn_jailed(&spec, dir.path(), Vec::new())
                .map_err(|e| VmError::new("start jailed firecracker", e))?;
            if let Err(e) = vm.wait_api_socket(API_SOCKET_WAIT) {
                let _ = vm.kill();
                return Err(VmError::new("firecracker api socket", e));
            }
            return Ok(vm);
        }
        let index = rec
            .slot
            .ok_or_else(|| VmError::new("start firecracker", "no slot"))?;
        let slot = self
            .net
            .config()
            .slot(index)
            .map_err(|e| VmError::new("start firecracker", e))?;
        let id = rec.id.hyphenated().to_string();
        let mut sc = SpawnConfig::new(&self.cfg.firecracker, &id, dir.path());
        sc.netns = Some(slot.netns);
        sc.disk = Some(dir.disk());
        sc.cleanup = vec![
            dir.vsock_socket(),
            vsock::listener_path(&dir.vsock_socket(), vsock::READINESS_PORT),
        ];
        sc.cgroup = self.cgroups.clone().map(|mode| CgroupSpec {
            mode,
            parent: CGROUP_PARENT.into(),
            name: id.clone(),
            limits: CgroupLimits {
                memory_max_bytes: Some((u64::from(rec.spec.memory_mib) << 20) + VMM_OVERHEAD_BYTES),
                cpu_millis: Some(rec.spec.vcpus.max(1) * 1000),
            },
        });
        let mut vm = VmProcess::spawn(&sc).map_err(|e| VmError::new("start firecracker", e))?;
        if let Err(e) = vm.wait_api_socket(API_SOCKET_WAIT) {
            let _ = vm.kill();
            return Err(VmError::new("firecracker api socket", e));
        }
        Ok(vm)
    }

    fn configure_and_start(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        api: &mut ApiClient,
        kernel: &Path,
    ) -> Result<(), VmError> {
        let call = |api: &mut ApiClient, what: &'static str, r: &dyn ToReq| {
            r.send(api).map_err(|e| VmError::new(what, e))
        };
        let mut mc = MachineConfig::new(rec.spec.vcpus.max(1), rec.spec.memory_mib);
        mc.track_dirty_pages = true;
        call(api, "machine-config", &mc)?;
        let paths = self.paths(dir);
        let kernel = paths.fc_view(jail::JAIL_KERNEL, kernel.to_owned());
        let mut boot = BootSource::new(&kernel).arg(vmm_glue::net::slot::GUEST_IP_BOOT_ARG);
        boot.console = self.cfg.console;
        if !self.cfg.boot_args_extra.is_empty() {
            boot = boot.arg(&self.cfg.boot_args_extra);
        }
        call(api, "boot-source", &boot)?;
        call(api, "drive", &Drive::root("rootfs", STABLE_DISK_PATH))?;
        call(
            api,
            "network-interface",
            &NetworkInterface {
                iface_id: IFACE_ID.into(),
                host_dev_name: vmm_glue::net::slot::TAP_NAME.into(),
                guest_mac: None,
            },
        )?;
        call(
            api,
            "vsock",
            &Vsock {
                guest_cid: GUEST_CID,
                uds_path: paths.vsock_fc.clone(),
            },
        )?;
        call(api, "mmds-config", &mmds_config())?;
        call(api, "mmds", &mmds_data(rec))?;
        call(api, "InstanceStart", &Action::InstanceStart)
    }

    /// Starts wrenn-uffd for a restore (vmm-glue's launcher: own session, pidfd, state file
    /// for re-adoption) and waits until its socket accepts.
    fn start_page_server(
        &self,
        dir: &SandboxDir,
        fc_pid: u32,
        jail_uid: Option<u32>,
        src: &RestoreSource<'_>,
    ) -> Result<PageServerProcess, VmError> {
        let binary = self
            .cfg
            .uffd_bin
            .clone()
            .filter(|b| executable(b))
            .ok_or_else(|| VmError::new("start wrenn-uffd", "binary not found"))?;
        let layers = src
            .chain
            .layer_dirs
            .first()
            .ok_or_else(|| VmError::new("start wrenn-uffd", "no layer directory"))?;
        let mut extra_args = Vec::new();
        let mut stats = dir.path().join(UFFD_STATS_NAME);
        let mut record = src.record_working_set.map(Path::to_owned);
        if let (Some(j), Some(uid)) = (&self.cfg.jail, jail_uid) {
            // It drops to the page servers' uid before serving: its socket goes to the
            // jailed Firecracker's uid, its output files to a directory of its own.
            let out = uffd_out_dir(dir);
            make_uffd_out_dir(&out, j.uffd_uid).map_err(err2("start wrenn-uffd"))?;
            stats = out.join(UFFD_STATS_NAME);
            if record.is_some() {
                record = Some(out.join(UFFD_WORKING_SET_NAME));
            }
            extra_args.push("--socket-owner".to_owned());
            extra_args.push(format!("{uid}:{uid}"));
            extra_args.push("--run-as".to_owned());
            extra_args.push(format!("{0}:{0}", j.uffd_uid));
        }
        if let Some(rec) = record {
            extra_args.push("--record".to_owned());
            extra_args.push(rec.display().to_string());
            extra_args.push("--record-seconds".to_owned());
            extra_args.push(RECORD_SECONDS_MAX.to_string());
        }
        let cfg = PageServerConfig {
            binary,
            dir: dir.path().to_owned(),
            socket: self.paths(dir).uffd_host,
            firecracker_pid: fc_pid,
            header: src.chain.header.clone(),
            layers: layers.clone(),
            prefetch: src.working_set.map(Path::to_owned),
            stats: Some(stats),
            extra_args,
        };
        let mut ps =
            PageServerProcess::spawn(&cfg).map_err(|e| VmError::new("start wrenn-uffd", e))?;
        if let Err(e) = ps.wait_listening(PAGE_SERVER_WAIT) {
            let _ = ps.kill();
            return Err(VmError::new("start wrenn-uffd", e));
        }
        Ok(ps)
    }

    /// Reads wrenn-uffd's stats file once the restore settles, for the restore metrics and
    /// its log line (`restore_stats`). Jailed, the file is in the page server's own
    /// directory and read without following a name its uid controls.
    fn watch_restore(&self, rec: &SandboxRecord, dir: &SandboxDir, ps: ProcRef) {
        let jailed = self.cfg.jail.is_some() && rec.jail_uid.is_some();
        let base = if jailed {
            uffd_out_dir(dir)
        } else {
            dir.path().to_owned()
        };
        let read = move || -> Option<String> {
            use std::io::Read;
            let name = Path::new(UFFD_STATS_NAME);
            let f = if jailed {
                jail::open_beneath(&base, name).ok()?
            } else {
                File::open(base.join(name)).ok()?
            };
            let mut text = String::new();
            f.take(crate::limits::UFFD_STATS_FILE_MAX)
                .read_to_string(&mut text)
                .ok()?;
            Some(text)
        };
        let id = proto::id::format_sandbox(rec.id);
        if let Err(e) = crate::restore_stats::watch(id, read, move || sys::alive(ps)) {
            warn!("cannot watch the restore id={} error={e}", rec.id);
        }
    }

    /// How a restore gets its memory (see [`MemoryPlan`]).
    fn memory_plan(&self, src: &RestoreSource<'_>) -> MemoryPlan {
        if self.cfg.backend == RestoreBackend::File && src.record_working_set.is_none() {
            if let Some(m) = src.template_memory {
                return MemoryPlan::TemplateFile(m.to_owned());
            }
        }
        // Recording a working set needs the page server; so does a resume (its own chain)
        // whatever the backend: materializing would copy every page per restore.
        if self.cfg.uffd_bin.as_deref().is_some_and(executable) {
            MemoryPlan::Uffd
        } else {
            MemoryPlan::Materialize
        }
    }

    /// Everything of a restore before Firecracker starts: the chroot when jailed (the VM
    /// state a private copy; the template's memory file hard-linked read-only; a
    /// materialized file written straight into it, readable by the jailed uid only), the
    /// materialized file when that is the plan. Returns the memory file as Firecracker
    /// names it (`None`: wrenn-uffd serves the memory).
    fn prepare_restore(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        paths: &VmPaths,
        src: &RestoreSource<'_>,
        plan: &MemoryPlan,
    ) -> Result<Option<PathBuf>, VmError> {
        let mut extra = vec![ChrootEntry::new(
            jail::JAIL_VMSTATE,
            &src.chain.vmstate,
            Access::Private,
        )];
        if let MemoryPlan::TemplateFile(m) = plan {
            // Root's, 0444: linked (never copied on the chroot's filesystem, which the agent
            // checks is the sandboxes' and the templates').
            extra.push(ChrootEntry::new(jail::JAIL_MEMORY, m, Access::Shared));
        }
        self.prepare_chroot(rec, dir, None, extra)?;
        if let (MemoryPlan::TemplateFile(m), Some(c)) = (plan, &paths.chroot) {
            use std::os::unix::fs::MetadataExt;
            let inode = |p: &Path| fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
            if inode(m) != inode(&jail::host_path(c, Path::new(jail::JAIL_MEMORY))) {
                warn!(
                    "template memory copied into the chroot, not linked (not root's 0444, or \
                     another filesystem) id={} file={}",
                    proto::id::format_sandbox(rec.id),
                    m.display()
                );
            }
        }
        match plan {
            MemoryPlan::Uffd => Ok(None),
            MemoryPlan::TemplateFile(m) => Ok(Some(paths.fc_view(jail::JAIL_MEMORY, m.clone()))),
            MemoryPlan::Materialize => {
                let mem_file = match &paths.chroot {
                    Some(c) => jail::host_path(c, Path::new(jail::JAIL_MEMORY)),
                    None => dir.snapshot().join("memory"),
                };
                self.materialize(src.chain, &mem_file)?;
                if let (Some(_), Some(uid)) = (&paths.chroot, self.jail_uid(rec)?) {
                    use std::os::unix::fs::PermissionsExt;
                    std::os::unix::fs::chown(&mem_file, Some(uid), Some(uid))
                        .and_then(|()| {
                            fs::set_permissions(&mem_file, fs::Permissions::from_mode(0o400))
                        })
                        .map_err(err2("give the memory file to the jail"))?;
                }
                Ok(Some(paths.fc_view(jail::JAIL_MEMORY, mem_file)))
            }
        }
    }

    /// Materializes the full memory file of a chain for the File backend: a sparse file of
    /// the memory's size with every data extent written at its offset (zeros stay holes).
    fn materialize(&self, chain: &Chain, out: &Path) -> Result<(), VmError> {
        let header = read_header(&chain.header)?;
        let _ = fs::remove_file(out);
        let f = File::create(out).map_err(|e| VmError::new("create memory file", e))?;
        snapshot::materialize(&header, &chain.layer_dirs, &f)
            .map_err(|e| VmError::new("write memory file", e))
    }

    fn kill_running(&self, dir: &SandboxDir) {
        let r = self.map().remove(dir.path());
        if let Some(mut r) = r {
            if let Some(ps) = r.page_server.take() {
                let _ = ps.kill();
            }
            if let Err(e) = r.vm.kill() {
                warn!("kill firecracker failed error={e}");
            }
        }
    }

    /// Resumes a paused VM after a failed snapshot step.
    /// After a failed snapshot: resumes the VM if it can, and says whether it runs. Firecracker
    /// may have reset its dirty-page log, so the next snapshot must be Full.
    fn resume_after_failure(&self, api: &mut ApiClient, mut e: VmError) -> VmError {
        e.vm_still_running = api.call(&VmState::Resumed).is_ok();
        e.full_snapshot_needed = true;
        e
    }
}

/// A typed request that can be sent (object-safe wrapper over vmm-glue's trait).
trait ToReq {
    fn send(&self, api: &mut ApiClient) -> Result<(), vmm_glue::api::ApiError>;
}

impl<T: vmm_glue::request::ToApiRequest> ToReq for T {
    fn send(&self, api: &mut ApiClient) -> Result<(), vmm_glue::api::ApiError> {
        api.call(self).map(|_| ())
    }
}

/// Firecracker's MMDS: version 2 (session tokens) on the guest's interface, at the default
/// address envd reads (`envd/src/mmds.rs`).
pub fn mmds_config() -> MmdsConfig {
    MmdsConfig {
        version: MmdsVersion::V2,
        network_interfaces: vec![IFACE_ID.into()],
        ipv4_address: None,
    }
}

/// The guest's MMDS data store: `{"wrenn": {"sandbox_id", "template_id", "metadata": {..}}}`
/// with the wire ids (`sb-…`, `tpl-…`) and the sandbox's metadata labels.
pub fn mmds_data(rec: &SandboxRecord) -> MmdsData {
    use serde_json::{Map, Value};
    let labels: Map<String, Value> = rec
        .spec
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut wrenn = Map::new();
    wrenn.insert(
        "sandbox_id".into(),
        proto::id::format_sandbox(rec.id).into(),
    );
    wrenn.insert(
        "template_id".into(),
        proto::id::format_template(rec.template_id).into(),
    );
    wrenn.insert("metadata".into(), Value::Object(labels));
    let mut root = Map::new();
    root.insert("wrenn".into(), Value::Object(wrenn));
    MmdsData(Value::Object(root))
}

fn new_build_id() -> Result<BuildId, VmError> {
    Ok(BuildId(
        *proto::random::uuid_v4()
            .map_err(err2("make a build id"))?
            .as_bytes(),
    ))
}

fn read_header(p: &Path) -> Result<Header, VmError> {
    let b = fs::read(p).map_err(|e| VmError::new("read header", e))?;
    Header::parse(&b).map_err(|e| VmError::new("parse header", e))
}

impl Vmm for FirecrackerVmm {
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !executable(&self.cfg.firecracker) {
            p.push(format!(
                "firecracker not found at {} (set --firecracker or WRENN_FIRECRACKER)",
                self.cfg.firecracker.display()
            ));
        }
        if self.kernel_path("").is_none() {
            p.push(format!(
                "no guest kernel (set --kernel or WRENN_KERNEL, or put vmlinux-<version> in {})",
                self.cfg.state_root.join("kernels").display()
            ));
        }
        let base = self
            .cfg
            .state_root
            .join("templates/00000000-0000-0000-0000-000000000000/rootfs.ext4");
        if !base.is_file() {
            p.push(format!(
                "no base template rootfs at {} (build one with `wrenn image rootfs`)",
                base.display()
            ));
        }
        if !Path::new("/dev/kvm").exists() {
            p.push("/dev/kvm is missing (enable KVM; load kvm_intel or kvm_amd)".into());
        }
        if self.cfg.backend == RestoreBackend::Uffd
            && !self.cfg.uffd_bin.as_deref().is_some_and(executable)
        {
            p.push(format!(
                "wrenn-uffd not found at {} (install it next to wrenn-agent, set --uffd-bin, or use --restore-backend file)",
                self.cfg
                    .uffd_bin
                    .as_deref()
                    .map_or_else(|| "(none)".into(), |b| b.display().to_string())
            ));
        }
        if let Some(n) = &self.net_problem {
            p.push(n.clone());
        }
        if let Some(j) = &self.cfg.jail {
            if !executable(&j.jailer) {
                p.push(format!(
                    "jailer not found at {} (set --jailer or WRENN_JAILER, or run --unjailed)",
                    j.jailer.display()
                ));
            }
            if let Some(reason) =
                jail_base_problem(&j.chroot_base, &self.cfg.firecracker, &self.cfg.state_root)
            {
                p.push(reason);
            }
        }
        p
    }

    fn firecracker_version(&self) -> String {
        if !executable(&self.cfg.firecracker) {
            return String::new();
        }
        std::process::Command::new(&self.cfg.firecracker)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
            .unwrap_or_default()
    }

    fn restore_backend(&self) -> &'static str {
        match self.cfg.backend {
            RestoreBackend::Uffd => "uffd",
            RestoreBackend::File => "file",
        }
    }

    fn create_slot(&self, index: u32, egress: &Egress) -> Result<(), VmError> {
        let r = self.net.create_slot(index, egress).map(|_| ());
        r.map_err(|e| {
            let mut e = VmError::new(format!("create network slot {index}"), e);
            e.exhausted = false;
            e
        })
    }

    fn guest_ip(&self, index: u32) -> std::net::Ipv4Addr {
        self.net
            .config()
            .slot(index)
            .map_or(std::net::Ipv4Addr::UNSPECIFIED, |s| s.guest_alias)
    }

    fn set_egress(&self, index: u32, egress: &Egress) -> Result<(), VmError> {
        self.net
            .set_egress(index, egress)
            .map_err(|e| VmError::new(format!("update egress of network slot {index}"), e))
    }

    fn destroy_slot(&self, index: u32) -> Result<(), VmError> {
        self.net
            .destroy_slot(index)
            .map_err(|e| VmError::new(format!("destroy network slot {index}"), e))
    }

    fn cleanup_slots(&self, keep: &[u32]) -> Result<Vec<u32>, VmError> {
        if self.net_problem.is_some() {
            return Ok(Vec::new());
        }
        self.net
            .cleanup_leftovers(keep)
            .map_err(|e| VmError::new("clean up network slots", e))
    }

    fn copy_file(&self, src: &Path, dst: &Path, size: Option<u64>) -> Result<(), VmError> {
        let _ = fs::remove_file(dst);
        vmm_glue::disk::clone_disk(src, dst)
            .map_err(|e| VmError::new(format!("copy {}", src.display()), e))?;
        if let Some(n) = size {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(dst)
                .map_err(|e| VmError::new("open copy", e))?;
            let len = f
                .metadata()
                .map_err(|e| VmError::new("stat copy", e))?
                .len();
            if len < n {
                f.set_len(n).map_err(|e| VmError::new("grow copy", e))?;
            }
        }
        Ok(())
    }

    fn boot(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        _template: &TemplateDir,
    ) -> Result<Started, VmError> {
        let kernel = self.kernel_path(&rec.spec.kernel).ok_or_else(|| {
            VmError::new("boot", format!("no guest kernel {:?}", rec.spec.kernel))
        })?;
        self.prepare_chroot(rec, dir, Some(&kernel), Vec::new())?;
        let paths = self.paths(dir);
        let (listener, rx) = ReadinessListener::with_channel(&paths.vsock_host)
            .map_err(|e| VmError::new("readiness listener", e))?;
        self.give_socket(rec, &listener_socket(&paths))?;
        let mut vm = self.spawn(rec, dir)?;
        let mut api = vm.api_client();
        let started = Instant::now();
        let r = self
            .configure_and_start(rec, dir, &mut api, &kernel)
            .and_then(|()| {
                // envd pushes its readiness; watch Firecracker meanwhile.
                let end = Instant::now() + BOOT_READY_TIMEOUT;
                loop {
                    match rx.recv_timeout(Duration::from_secs(1)) {
                        Ok(r) => return Ok(r),
                        Err(_) if Instant::now() >= end => {
                            return Err(VmError::new(
                                "boot",
                                format!("envd not ready within {BOOT_READY_TIMEOUT:?}"),
                            ))
                        }
                        Err(_) => {
                            if let Ok(Some(exit)) = vm.try_wait() {
                                return Err(VmError::new(
                                    "boot",
                                    format!("firecracker exited {exit:?}: {}", tail(&dir.log())),
                                ));
                            }
                        }
                    }
                }
            });
        match r {
            Ok(ready) => {
                info!(
                    "guest ready id={} after_ms={} envd={}",
                    rec.id,
                    started.elapsed().as_millis(),
                    ready.envd_version
                );
                let started = Started {
                    firecracker: sys::proc_ref(vm.pid() as i32),
                    page_server: None,
                    kernel_version: Some(kernel_version(&kernel)),
                    envd_version: Some(ready.envd_version),
                };
                self.map().insert(
                    dir.path().to_owned(),
                    Running {
                        vm,
                        _ready: Some(listener),
                        page_server: None,
                    },
                );
                Ok(started)
            }
            Err(e) => {
                drop(listener);
                let _ = vm.kill();
                Err(e)
            }
        }
    }

    fn restore(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        src: &RestoreSource<'_>,
    ) -> Result<Started, VmError> {
        let paths = self.paths(dir);
        let plan = self.memory_plan(src);
        info!(
            "restore id={} backend={} template={}",
            proto::id::format_sandbox(rec.id),
            plan.name(),
            proto::id::format_template(rec.template_id)
        );
        // Phases, in microseconds: the restore's files (chroot links, the memory plan),
        // Firecracker's start, the page server's, the snapshot load (which resumes the VM:
        // one API call), MMDS.
        let mut phase_us = [0u128; 5];
        let t = Instant::now();
        let backend = self.prepare_restore(rec, dir, &paths, src, &plan)?;
        // Announces after Resumed go here; nobody has to wait for them.
        let ready = ReadinessListener::start(&paths.vsock_host, |_| {}).ok();
        if ready.is_some() {
            self.give_socket(rec, &listener_socket(&paths))?;
        }
        phase_us[0] = t.elapsed().as_micros();
        let t = Instant::now();
        let vm = self.spawn(rec, dir)?;
        phase_us[1] = t.elapsed().as_micros();
        let mut page_server = None;
        let r = (|| -> Result<(), VmError> {
            let t = Instant::now();
            let mem_backend = match backend {
                Some(file) => MemBackend::File(file),
                None => {
                    let ps = self.start_page_server(dir, vm.pid(), rec.jail_uid, src)?;
                    page_server = Some(ps);
                    // wrenn-uffd made it as root: the jailed uid must be able to connect.
                    self.give_socket(rec, &paths.uffd_host)?;
                    MemBackend::Uffd(paths.uffd_fc.clone())
                }
            };
            phase_us[2] = t.elapsed().as_micros();
            let vmstate = paths.fc_view(jail::JAIL_VMSTATE, src.chain.vmstate.clone());
            let mut load = SnapshotLoad::new(&vmstate, mem_backend);
            load.track_dirty_pages = true;
            load.resume_vm = true;
            load.clock_realtime = true;
            load.network_overrides = vec![NetworkOverride {
                iface_id: IFACE_ID.into(),
                host_dev_name: vmm_glue::net::slot::TAP_NAME.into(),
            }];
            load.vsock_override = Some(paths.vsock_fc.clone());
            let mut api = vm.api_client();
            let t = Instant::now();
            api.call(&load).map(|_| ()).map_err(err2("snapshot/load"))?;
            phase_us[3] = t.elapsed().as_micros();
            let t = Instant::now();
            // The MMDS configuration is part of the VM state, its data store is not: the
            // restored guest gets its own identity. A snapshot taken before the agent
            // configured MMDS has none: logged, the restore goes on (envd learns its
            // identity from init).
            if let Err(e) = api.call(&mmds_data(rec)) {
                warn!("mmds not set after restore id={} error={e}", rec.id);
            }
            phase_us[4] = t.elapsed().as_micros();
            Ok(())
        })();
        match r {
            Ok(()) => {
                info!(
                    "restore phases id={} backend={} files_us={} firecracker_start_us={} \
                     page_server_us={} load_resume_us={} mmds_us={}",
                    proto::id::format_sandbox(rec.id),
                    plan.name(),
                    phase_us[0],
                    phase_us[1],
                    phase_us[2],
                    phase_us[3],
                    phase_us[4]
                );
                let started = Started {
                    firecracker: sys::proc_ref(vm.pid() as i32),
                    page_server: page_server
                        .as_ref()
                        .and_then(|ps| sys::proc_ref(ps.pid() as i32)),
                    kernel_version: None,
                    envd_version: None,
                };
                if let Some(ps) = started.page_server {
                    self.watch_restore(rec, dir, ps);
                }
                self.map().insert(
                    dir.path().to_owned(),
                    Running {
                        vm,
                        _ready: ready,
                        page_server,
                    },
                );
                Ok(started)
            }
            Err(mut e) => {
                if let Some(ps) = page_server {
                    let _ = ps.kill();
                }
                let _ = vm.kill();
                e.log_tail = tail(&dir.log());
                Err(e)
            }
        }
    }

    fn snapshot(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<Chain, VmError> {
        let paths = self.paths(dir);
        let mut api = ApiClient::new(&paths.api_socket);
        api.call(&VmState::Paused)
            .map_err(|e| VmError::new("pause vm", e))
            .map_err(|mut e| {
                e.vm_still_running = true;
                e
            })?;
        let snap = dir.snapshot();
        let kind = if rec.full_snapshot_taken && rec.chain.is_some() {
            SnapshotKind::Diff
        } else {
            SnapshotKind::Full
        };
        let mem = snap.join("memory.snap");
        let vmstate_new = snap.join("vmstate.new");
        let _ = fs::remove_file(&mem);
        let _ = fs::remove_file(&vmstate_new);
        remove_discarded(&snap);
        let t0 = Instant::now();
        let create = SnapshotCreate {
            snapshot_type: match kind {
                SnapshotKind::Full => SnapshotType::Full,
                SnapshotKind::Diff => SnapshotType::Diff,
            },
            snapshot_path: paths.fc_view(JAIL_VMSTATE_NEW, vmstate_new.clone()),
            mem_file_path: paths.fc_view(JAIL_MEMORY_SNAP, mem.clone()),
        };
        // From here on Firecracker may have reset its dirty-page log: if this pause fails,
        // the next snapshot must be Full, or the pages dirtied before it would be lost.
        if let Err(e) = api.call(&create) {
            let e = VmError::new("snapshot/create", e);
            return Err(self.resume_after_failure(&mut api, e));
        }
        let fc_ms = t0.elapsed().as_millis();
        let t1 = Instant::now();
        // Phases of the build, in µs, for the log line (the bench breaks the build down).
        let mut phase_us = [0u128; 4];
        let mut publish = match snapshot::Publish::begin(&snap, &mut snapshot::no_hook) {
            Ok(p) => p,
            Err(e) => {
                let e = VmError::new("start the generation", e);
                return Err(self.resume_after_failure(&mut api, e));
            }
        };
        let built = (|| -> Result<Header, VmError> {
            let memory_size = u64::from(rec.spec.memory_mib) << 20;
            let build = new_build_id()?;
            // Jailed: what Firecracker wrote is read without following any name the jailed
            // uid controls, and its VM state copied into the generation (root's from here on).
            let memf = match &paths.chroot {
                Some(c) => {
                    let mut v = jail::open_beneath(c, Path::new(JAIL_VMSTATE_NEW))
                        .map_err(err2("open the jail's vm state"))?;
                    let mut out = File::create(publish.dir().join(snapshot::VMSTATE_NAME))
                        .map_err(err2("create the vm state copy"))?;
                    std::io::copy(&mut v, &mut out).map_err(err2("copy the vm state"))?;
                    publish
                        .vmstate_written(&mut snapshot::no_hook)
                        .map_err(err2("copy the vm state"))?;
                    jail::open_beneath(c, Path::new(JAIL_MEMORY_SNAP))
                        .map_err(err2("open the jail's memory file"))?
                }
                None => {
                    publish
                        .place_vmstate(&vmstate_new, &mut snapshot::no_hook)
                        .map_err(err2("move the vm state"))?;
                    File::open(&mem).map_err(err2("open the memory file"))?
                }
            };
            let mut out = publish
                .layer_writer(build)
                .map_err(err2("create the layer file"))?;
            let (diff, stats) = generation::build(&memf, memory_size, kind, &mut out)
                .map_err(err2("build the generation"))?;
            publish
                .layer_done(out, &mut snapshot::no_hook)
                .map_err(err2("write the layer file"))?;
            phase_us[0] = t1.elapsed().as_micros();
            let mut header = match (&rec.chain, kind) {
                (Some(c), SnapshotKind::Diff) => {
                    let old = read_header(&c.header)?;
                    old.merge(&diff, build).map_err(err2("merge the header"))?
                }
                _ => {
                    Header::from_base(memory_size, build, &diff).map_err(err2("make the header"))?
                }
            };
            // The parent's layers still referenced are linked in: a generation directory
            // holds every layer its header names.
            let parent_dirs = rec
                .chain
                .as_ref()
                .map_or_else(Vec::new, |c| c.layer_dirs.clone());
            for l in &header.layers {
                if l.build_id != build {
                    publish
                        .link_layer(&parent_dirs, l.build_id, &mut snapshot::no_hook)
                        .map_err(err2("link a parent layer"))?;
                }
            }
            info!(
                "generation built id={} kind={kind:?} pages_written={} zero_pages={} scanned={}",
                rec.id, stats.pages_written, stats.zero_pages, stats.pages_scanned
            );
            if header.needs_squash() {
                // Streams through the mapped layers: bounded memory whatever their sizes.
                header = publish
                    .squash(&header, new_build_id()?, &mut snapshot::no_hook)
                    .map_err(err2("squash the layers"))?;
            }
            phase_us[1] = t1.elapsed().as_micros();
            Ok(header)
        })();
        let header = match built {
            Ok(h) => h,
            Err(e) => {
                publish.abandon();
                return Err(self.resume_after_failure(&mut api, e));
            }
        };
        // One durability point for the whole generation, then one rename: a crash leaves the
        // old generation or the new one, never new memory with old CPU state.
        let mut hook = |s: snapshot::Step| match s {
            snapshot::Step::Synced => phase_us[2] = t1.elapsed().as_micros(),
            snapshot::Step::Published => phase_us[3] = t1.elapsed().as_micros(),
            _ => {}
        };
        let g = match publish.finish(&header, &mut hook) {
            Ok(g) => g,
            Err(e) => {
                let e = VmError::new("publish the generation", e);
                return Err(self.resume_after_failure(&mut api, e));
            }
        };
        let generation = header.generation;
        let build_ms = t1.elapsed().as_millis();
        if paths.chroot.is_none() {
            // Jailed, it goes with the chroot when the VM stops.
            discard_in_background(&mem);
        }
        // Older generations (and the layout before generations) go; their layers still
        // referenced are linked into the new one.
        if let Err(e) = snapshot::remove_others(&snap, &g, &mut snapshot::no_hook) {
            warn!("removing old generations failed id={} error={e}", rec.id);
        }
        info!(
            "snapshot taken id={} snapshot_create_ms={fc_ms} build_ms={} scan_us={} header_us={} \
             sync_us={} publish_us={}",
            rec.id,
            build_ms,
            phase_us[0],
            phase_us[1].saturating_sub(phase_us[0]),
            phase_us[2].saturating_sub(phase_us[1]),
            phase_us[3].saturating_sub(phase_us[2]),
        );
        Ok(Chain {
            header: g.header(),
            vmstate: g.vmstate(),
            layer_dirs: vec![g.dir.clone()],
            generation,
        })
    }

    fn finish_recording(
        &self,
        rec: &SandboxRecord,
        dir: &SandboxDir,
        path: &Path,
    ) -> Result<(), VmError> {
        let Some(p) = rec.page_server else {
            // Restored through the File backend: nothing was recorded.
            return Ok(());
        };
        // Jailed, wrenn-uffd writes into its own directory; the agent copies the set out
        // without following a name that uid controls.
        let jailed = self.cfg.jail.is_some() && rec.jail_uid.is_some();
        let out = uffd_out_dir(dir);
        let written = if jailed {
            out.join(UFFD_WORKING_SET_NAME)
        } else {
            path.to_owned()
        };
        sys::signal(p, libc::SIGUSR1);
        let end = Instant::now() + ENVD_CALL_TIMEOUT;
        while !written.exists() {
            if Instant::now() >= end {
                return Err(VmError::new("record working set", "file not written"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if jailed {
            let mut from = jail::open_beneath(&out, Path::new(UFFD_WORKING_SET_NAME))
                .map_err(err2("read the recorded working set"))?;
            let mut to = File::create(path).map_err(err2("write the working set"))?;
            std::io::copy(&mut from, &mut to).map_err(err2("write the working set"))?;
            to.sync_all().map_err(err2("write the working set"))?;
        }
        Ok(())
    }

    fn stop(&self, rec: &SandboxRecord, dir: &SandboxDir) {
        self.kill_running(dir);
        // Processes of an earlier agent run (re-adopted or not).
        if let Ok(vm) = VmProcess::adopt(dir.path()) {
            let _ = vm.kill();
        }
        for p in [rec.firecracker, rec.page_server].into_iter().flatten() {
            sys::kill_and_reap(p, Duration::from_secs(10));
        }
        if let (Some(j), Some(chroot)) = (&self.cfg.jail, self.paths(dir).chroot) {
            // Whatever a failed start or a lost process left: the chroot, the jailer's cgroup
            // directories; and the disk goes back to root (its uid goes to the next sandbox).
            if let Some(instance) = chroot.parent() {
                if let Err(e) = jail::remove_chroot(instance) {
                    warn!("remove chroot failed error={e}");
                }
            }
            let spec_dirs = self
                .jail_spec(j, dir, 1, None, JailLimits::for_vm(1, 0, 0))
                .map(|s| s.cgroup_dirs())
                .unwrap_or_default();
            if let Err(e) = cgroup::Cgroup::from_dirs(spec_dirs).remove(Duration::from_millis(200))
            {
                warn!("remove jail cgroup failed error={e}");
            }
            if let Err(e) = jail::release_owned(&dir.disk()) {
                warn!("give the disk back to root failed error={e}");
            }
            let _ = fs::remove_dir_all(uffd_out_dir(dir));
        }
        for f in [
            dir.uffd_socket(),
            dir.path()
                .join(vmm_glue::page_server::PAGE_SERVER_STATE_NAME),
            dir.vsock_socket(),
            vsock::listener_path(&dir.vsock_socket(), vsock::READINESS_PORT),
            dir.snapshot().join("memory"),
            dir.snapshot().join("memory.snap"),
        ] {
            let _ = fs::remove_file(f);
        }
    }

    fn alive(&self, p: ProcRef) -> bool {
        sys::alive(p)
    }

    fn readopt(&self, rec: &SandboxRecord, dir: &SandboxDir) -> Result<(), VmError> {
        let vm = VmProcess::adopt(dir.path()).map_err(|e| VmError::new("re-adopt", e))?;
        if let Some(index) = rec.slot {
            // The slot's table is still in place; its resolver is not (it ran in the old
            // agent).
            self.net
                .adopt_slot(
                    index,
                    &crate::manager::egress_of(rec.spec.network.as_ref())
                        .unwrap_or_else(|_| Egress::none()),
                )
                .map_err(|e| VmError::new("re-adopt: slot resolver", e))?;
        }
        let mut api = vm.api_client();
        let info = api
            .describe_instance()
            .map_err(|e| VmError::new("re-adopt: firecracker api", e))?;
        info!(
            "re-adopted firecracker dir={} state={}",
            dir.path().display(),
            info.state
        );
        let paths = self.paths(dir);
        let ready = ReadinessListener::start(&paths.vsock_host, |_| {}).ok();
        if ready.is_some() {
            self.give_socket(rec, &listener_socket(&paths))?;
        }
        // A page server still filling memory is adopted too (it exits by itself once every
        // page is resident; gone is the usual case).
        let page_server = PageServerProcess::adopt(dir.path()).ok();
        self.map().insert(
            dir.path().to_owned(),
            Running {
                vm,
                _ready: ready,
                page_server,
            },
        );
        Ok(())
    }

    fn resume_vm(&self, _rec: &SandboxRecord, dir: &SandboxDir) -> Result<(), VmError> {
        let mut api = ApiClient::new(self.paths(dir).api_socket);
        api.call(&VmState::Resumed)
            .map(|_| ())
            .map_err(|e| VmError::new("resume vm", e))
    }

    fn connect_envd(&self, dir: &SandboxDir, token: &str) -> Result<Client, Status> {
        let cred = if token.is_empty() {
            Credential::none()
        } else {
            Credential::access_token(token)
        };
        vsock::connect_rpc(
            &self.paths(dir).vsock_host,
            ENVD_PORT,
            cred,
            ENVD_CALL_TIMEOUT,
        )
        .map_err(|e| match e {
            vsock::VsockError::Rpc(s) => s,
            other => Status::unavailable(format!("connect to envd: {other}")),
        })
    }
}

/// Why `chroot_base` cannot hold chroots for sandboxes under `state_root`: the deepest
/// socket in a chroot must fit a socket address, and disks are hard-linked in, so both must
/// be on one filesystem. Creates the base (root's, 0700).
fn jail_base_problem(chroot_base: &Path, firecracker: &Path, state_root: &Path) -> Option<String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(why) = chroot_sockets_too_long(chroot_base, firecracker) {
        return Some(why);
    }
    let sandboxes = state_root.join("sandboxes");
    if let Err(e) = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(chroot_base)
    {
        return Some(format!(
            "cannot create the chroot base {}: {e}",
            chroot_base.display()
        ));
    }
    match (fs::metadata(chroot_base), fs::metadata(&sandboxes)) {
        (Ok(a), Ok(b)) if a.dev() != b.dev() => Some(format!(
            "chroot base {} is not on the filesystem of {} (disks are hard-linked into chroots)",
            chroot_base.display(),
            sandboxes.display()
        )),
        _ => None,
    }
}

/// The jailer's `--id` of the VM in `dir` (which names its chroot and cgroups): the directory's
/// name, a sandbox id, without the leading `.` of a template's scratch VM (`.ws-<uuid>`),
/// since the jailer takes only letters, digits and `-`.
fn jail_id(dir: &SandboxDir) -> Option<String> {
    let name = dir.path().file_name()?.to_str()?;
    Some(name.strip_prefix('.').unwrap_or(name).to_owned())
}

/// Why sockets in chroots under `chroot_base` cannot be bound: the deepest,
/// `<base>/<exec>/<uuid>/root/run/vsock.sock_49984`, must fit a socket address.
fn chroot_sockets_too_long(chroot_base: &Path, firecracker: &Path) -> Option<String> {
    let uuid = "00000000-0000-0000-0000-000000000000";
    let chroot = jail::chroot_dir(chroot_base, firecracker, uuid).ok()?;
    let deepest = vsock::listener_path(
        &jail::host_path(&chroot, Path::new(jail::JAIL_VSOCK_SOCKET)),
        vsock::READINESS_PORT,
    );
    let len = deepest.as_os_str().len();
    let max = vmm_glue::limits::UNIX_SOCKET_PATH_LEN_MAX;
    (len > max).then(|| {
        format!(
            "chroot base {} is {} bytes too long: the sockets in a chroot ({}) must fit {max} \
             bytes (set a shorter --chroot-base-dir on the sandboxes' filesystem)",
            chroot_base.display(),
            len - max,
            deepest.display(),
        )
    })
}

/// Where a jailed Firecracker writes a pause's files (in its writable snapshot directory).
const JAIL_VMSTATE_NEW: &str = "/snapshot/vmstate.new";
const JAIL_MEMORY_SNAP: &str = "/snapshot/memory.snap";
const _: () = assert!(JAIL_VMSTATE_NEW.len() > jail::JAIL_SNAPSHOT_DIR.len());

/// Directory of a jailed restore's wrenn-uffd output files (stats, recorded working set),
/// owned by the page servers' uid: it can write nothing else once it dropped root.
fn uffd_out_dir(dir: &SandboxDir) -> PathBuf {
    dir.path().join("uffd-out")
}
const UFFD_WORKING_SET_NAME: &str = "working_set";
/// wrenn-uffd's stats file, in the sandbox directory or (jailed) its own.
const UFFD_STATS_NAME: &str = "uffd.stats";

/// (Re)creates [`uffd_out_dir`] empty, owned by `uid`, mode 0700.
fn make_uffd_out_dir(out: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match fs::remove_dir_all(out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::create_dir(out)?;
    std::os::unix::fs::chown(out, Some(uid), Some(uid))?;
    fs::set_permissions(out, fs::Permissions::from_mode(0o700))
}

/// The readiness listener's socket for `paths`' vsock.
fn listener_socket(paths: &VmPaths) -> PathBuf {
    vsock::listener_path(&paths.vsock_host, vsock::READINESS_PORT)
}

/// Suffix of files renamed away to be deleted by a background thread.
const DISCARD_SUFFIX: &str = ".discard";

/// Deletes Firecracker's memory file off the pause's path. Unlinking a large file whose
/// pages are still being written back waits for that writeback (seen here: hundreds of
/// milliseconds on a busy host), and nothing needs it once the generation is published.
/// It is renamed first, so a new snapshot never meets it; a leftover (the agent stopped
/// first) is removed by the next pause or with the sandbox's directory.
fn discard_in_background(path: &Path) {
    let mut name = path.as_os_str().to_owned();
    name.push(DISCARD_SUFFIX);
    let doomed = PathBuf::from(name);
    if fs::rename(path, &doomed).is_err() {
        let _ = fs::remove_file(path);
        return;
    }
    let p = doomed.clone();
    let spawned = std::thread::Builder::new()
        .name("discard".into())
        .spawn(move || {
            let _ = fs::remove_file(&p);
        });
    if spawned.is_err() {
        let _ = fs::remove_file(&doomed);
    }
}

/// Removes what an earlier [`discard_in_background`] left in `dir`.
fn remove_discarded(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().ends_with(DISCARD_SUFFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake Firecracker API socket: answers `n` requests with 204 and returns them.
    fn fake_api(path: &Path, n: usize) -> std::thread::JoinHandle<Vec<String>> {
        use std::io::{Read, Write};
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < n {
                let (mut s, _) = l.accept().unwrap();
                while got.len() < n {
                    let mut buf = Vec::new();
                    let mut b = [0u8; 1];
                    while !buf.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).unwrap() == 0 {
                            break;
                        }
                        buf.push(b[0]);
                    }
                    if buf.is_empty() {
                        break;
                    }
                    let head = String::from_utf8(buf).unwrap();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    let mut body = vec![0u8; len];
                    s.read_exact(&mut body).unwrap();
                    got.push(format!("{head}{}", String::from_utf8(body).unwrap()));
                    s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
                }
            }
            got
        })
    }

    #[test]
    fn mmds_is_configured_with_the_sandbox_identity_and_labels() {
        let dir = std::env::temp_dir().join(format!("wrenn-agent-mmds-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let server = fake_api(&sock, 2);
        let mut rec = SandboxRecord::new(
            proto::id::Uuid::from_u128(0xab),
            proto::id::Uuid::from_u128(0xcd),
            crate::statedir::TemplateKind::Snapshot,
            0,
        );
        rec.spec.metadata.insert("team".into(), "blue \"x\"".into());
        let mut api = ApiClient::new(&sock);
        api.call(&mmds_config()).unwrap();
        api.call(&mmds_data(&rec)).unwrap();
        let got = server.join().unwrap();
        assert!(
            got[0].starts_with("PUT /mmds/config HTTP/1.1\r\n"),
            "{}",
            got[0]
        );
        let body = |r: &str| -> serde_json::Value {
            serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap()
        };
        assert_eq!(
            body(&got[0]),
            serde_json::json!({"version": "V2", "network_interfaces": [IFACE_ID]})
        );
        assert!(got[1].starts_with("PUT /mmds HTTP/1.1\r\n"), "{}", got[1]);
        // The layout envd reads (`/wrenn/sandbox_id`, `/wrenn/template_id`), wire ids.
        assert_eq!(
            body(&got[1]),
            serde_json::json!({"wrenn": {
                "sandbox_id": proto::id::format_sandbox(rec.id),
                "template_id": proto::id::format_template(rec.template_id),
                "metadata": {"team": "blue \"x\""},
            }})
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chroot_base_too_long_for_its_sockets() {
        let fc = Path::new("/usr/local/bin/firecracker");
        // `<base>/firecracker/<uuid>/root/run/vsock.sock_49984` is the base plus 75 bytes.
        let fits = PathBuf::from("/".to_owned() + &"b".repeat(31));
        let long = PathBuf::from("/".to_owned() + &"b".repeat(32));
        assert_eq!(chroot_sockets_too_long(&fits, fc), None);
        let why = chroot_sockets_too_long(&long, fc).unwrap();
        assert!(why.contains("1 bytes too long"), "{why}");
        // The default under /var/lib/wrenn and `wrenn up`'s agent root fit.
        for base in ["/var/lib/wrenn/jail", "/var/lib/wrenn/local/agent/jail"] {
            assert_eq!(chroot_sockets_too_long(Path::new(base), fc), None, "{base}");
        }
    }

    /// The jailer makes its chroot where the agent prepared it, for sandboxes and for a
    /// template's scratch VM (`.ws-<uuid>`, whose `.` the jailer refuses in an id).
    #[test]
    fn jail_spec_chroot_is_the_prepared_one() {
        let root = PathBuf::from("/var/lib/wrenn-test");
        let j = JailConfig {
            jailer: "/usr/local/bin/jailer".into(),
            chroot_base: root.join("jail"),
            uffd_uid: 900_064,
        };
        let vmm = FirecrackerVmm::new(FcConfig {
            firecracker: "/nonexistent/firecracker".into(),
            kernel: None,
            uffd_bin: None,
            backend: RestoreBackend::Uffd,
            boot_args_extra: String::new(),
            state_root: root.clone(),
            console: false,
            net: NetConfig::new("wrtest", "10.214.0.0".parse().unwrap()).unwrap(),
            dns_upstream: DnsUpstream::Off,
            jail: Some(j.clone()),
        });
        let uuid = "0b6c2a52-3f5e-4f3a-9a51-000000000001";
        for name in [uuid.to_owned(), format!(".ws-{uuid}")] {
            let dir = SandboxDir(root.join("sandboxes").join(&name));
            let spec = vmm
                .jail_spec(&j, &dir, 900_001, None, JailLimits::for_vm(1, 256 << 20, 0))
                .unwrap();
            assert!(
                spec.args().is_ok(),
                "{name}: the jailer refuses {:?}",
                spec.id
            );
            assert_eq!(
                vmm.paths(&dir).chroot,
                Some(spec.chroot_dir().unwrap()),
                "{name}"
            );
        }
    }

    #[test]
    fn discarded_files_go_in_the_background_and_leftovers_at_the_next_pause() {
        let dir = std::env::temp_dir().join(format!("wrenn-agent-discard-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mem = dir.join("memory.snap");
        fs::write(&mem, vec![1u8; 1 << 20]).unwrap();
        discard_in_background(&mem);
        assert!(!mem.exists(), "the name is free at once");
        let t0 = Instant::now();
        while fs::read_dir(&dir).unwrap().next().is_some() {
            assert!(t0.elapsed() < Duration::from_secs(10), "never deleted");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A missing file is no error.
        discard_in_background(&mem);
        fs::write(dir.join("memory.snap.discard"), b"x").unwrap();
        fs::write(dir.join("keep.layer"), b"x").unwrap();
        remove_discarded(&dir);
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("keep.layer")]);
        fs::remove_dir_all(&dir).unwrap();
    }

    // ---- the template's one memory file (issue 15 §1) ----

    const MEM_PAGES: u64 = 1024;
    const PAGE: u64 = 4096;
    /// Pages of the template chain that hold data (the rest is zeros).
    const DATA_PAGES: [u64; 2] = [1, 700];

    fn page_byte(p: u64) -> u8 {
        0x10 + (p % 200) as u8
    }

    /// A snapshot template's files on disk as a publish leaves them (flat layout: header,
    /// one layer, VM state) under `root/templates/<id>`, and a sandbox directory.
    fn template_fixture(root: &Path) -> (TemplateDir, SandboxDir, Chain) {
        use uffd::header::{BuildId, Diff, DiffExtent, DiffKind, Header};
        let tdir = TemplateDir(root.join("templates/0b6c2a52-3f5e-4f3a-9a51-0000000000aa"));
        let snap = tdir.snapshot();
        fs::create_dir_all(&snap).unwrap();
        let build = BuildId([7; 16]);
        let diff = Diff {
            extents: DATA_PAGES
                .iter()
                .enumerate()
                .map(|(i, &p)| DiffExtent {
                    offset: p * PAGE,
                    length: PAGE,
                    kind: DiffKind::Data {
                        storage_offset: i as u64 * PAGE,
                    },
                })
                .collect(),
            layer_size: DATA_PAGES.len() as u64 * PAGE,
        };
        let header = Header::from_base(MEM_PAGES * PAGE, build, &diff).unwrap();
        let mut layer = Vec::new();
        for &p in &DATA_PAGES {
            layer.extend(std::iter::repeat_n(page_byte(p), PAGE as usize));
        }
        fs::write(snap.join(build.layer_file_name()), layer).unwrap();
        fs::write(snap.join("header"), header.serialize()).unwrap();
        fs::write(snap.join("vmstate"), b"state").unwrap();
        let sb = SandboxDir(root.join("sandboxes/0b6c2a52-3f5e-4f3a-9a51-000000000001"));
        fs::create_dir_all(sb.snapshot()).unwrap();
        fs::write(sb.disk(), b"disk").unwrap();
        let chain = Chain {
            header: snap.join("header"),
            vmstate: snap.join("vmstate"),
            layer_dirs: vec![snap],
            generation: 1,
        };
        (tdir, sb, chain)
    }

    fn test_vmm(root: &Path, backend: RestoreBackend, uffd: bool, jail: bool) -> FirecrackerVmm {
        FirecrackerVmm::new(FcConfig {
            firecracker: "/nonexistent/firecracker".into(),
            kernel: None,
            // Any executable stands for wrenn-uffd: nothing is started here.
            uffd_bin: uffd.then(|| PathBuf::from("/bin/sh")),
            backend,
            boot_args_extra: String::new(),
            state_root: root.to_owned(),
            console: false,
            net: NetConfig::new("wrtest", "10.214.0.0".parse().unwrap()).unwrap(),
            dns_upstream: DnsUpstream::Off,
            jail: jail.then(|| JailConfig {
                jailer: "/nonexistent/jailer".into(),
                chroot_base: root.join("jail"),
                uffd_uid: 900_064,
            }),
        })
    }

    fn fixture_root(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wrenn-fc-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Offsets where data starts and holes start, walking the file with SEEK_DATA/SEEK_HOLE.
    fn data_ranges(p: &Path) -> Vec<(u64, u64)> {
        use std::os::fd::AsRawFd;
        let f = File::open(p).unwrap();
        let len = f.metadata().unwrap().len() as i64;
        let mut out = Vec::new();
        let mut at = 0i64;
        while at < len {
            // SAFETY: lseek on a descriptor this function owns; no memory is passed.
            let data = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
            out.push((data as u64, hole as u64));
            at = hole;
        }
        out
    }

    #[test]
    fn the_template_memory_file_is_whole_sparse_read_only_and_the_agents() {
        use std::os::unix::fs::MetadataExt;
        let root = fixture_root("tmem");
        let (tdir, _, _) = template_fixture(&root);
        // What an agent killed mid-write left behind.
        fs::write(tdir.path().join(".memory.tmp-0123456789abcdef"), b"partial").unwrap();
        let allocated = crate::manager::write_template_memory(&tdir).unwrap();
        let m = fs::metadata(tdir.memory()).unwrap();
        assert_eq!(m.len(), MEM_PAGES * PAGE);
        assert_eq!(m.mode() & 0o7777, 0o444, "read-only for everyone");
        // SAFETY: geteuid has no preconditions.
        assert_eq!(m.uid(), unsafe { libc::geteuid() }, "the agent's (root's)");
        // Zero pages stay holes: only the data pages are allocated (a file system may
        // round an extent up, never to the whole file).
        assert_eq!(allocated, m.blocks() * 512);
        assert!(
            allocated <= 8 * DATA_PAGES.len() as u64 * PAGE,
            "{allocated} bytes allocated for {} data pages",
            DATA_PAGES.len()
        );
        let ranges = data_ranges(&tdir.memory());
        for (start, end) in &ranges {
            assert!(
                DATA_PAGES
                    .iter()
                    .any(|p| *start <= p * PAGE && p * PAGE < *end && end - start <= 16 * PAGE),
                "data range {start}..{end} holds no data page: {ranges:?}"
            );
        }
        let bytes = fs::read(tdir.memory()).unwrap();
        for p in 0..MEM_PAGES {
            let want = if DATA_PAGES.contains(&p) {
                page_byte(p)
            } else {
                0
            };
            let page = &bytes[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
            assert!(page.iter().all(|&b| b == want), "page {p}");
        }
        // Published by a rename: no temporary left beside it (nor an older one).
        let names: Vec<String> = fs::read_dir(tdir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.contains("tmp")), "{names:?}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_file_backed_restore_from_a_template_maps_its_file_and_copies_nothing() {
        use std::os::unix::fs::MetadataExt;
        let root = fixture_root("tplan");
        let (tdir, sb, chain) = template_fixture(&root);
        crate::manager::write_template_memory(&tdir).unwrap();
        let mem = tdir.memory();
        let ino = fs::metadata(&mem).unwrap().ino();
        let rec = SandboxRecord::new(
            proto::id::Uuid::from_u128(1),
            proto::id::Uuid::from_u128(0xaa),
            crate::statedir::TemplateKind::Snapshot,
            0,
        );
        let from_template = RestoreSource {
            chain: &chain,
            record_working_set: None,
            working_set: None,
            template_memory: Some(&mem),
        };
        let resume = RestoreSource {
            template_memory: None,
            ..from_template
        };
        let recording = RestoreSource {
            record_working_set: Some(Path::new("/nonexistent/ws")),
            ..from_template
        };
        // File backend: the template's file as it is, whether or not wrenn-uffd exists.
        for uffd in [true, false] {
            let vmm = test_vmm(&root, RestoreBackend::File, uffd, false);
            let plan = vmm.memory_plan(&from_template);
            assert_eq!(plan, MemoryPlan::TemplateFile(mem.clone()));
            assert_eq!(plan.name(), "file-template");
            let fc = vmm
                .prepare_restore(&rec, &sb, &vmm.paths(&sb), &from_template, &plan)
                .unwrap()
                .unwrap();
            assert_eq!(
                fs::metadata(&fc).unwrap().ino(),
                ino,
                "the template's inode"
            );
            assert!(!sb.snapshot().join("memory").exists(), "no copy of its own");
            assert_eq!(
                crate::manager::allocated_bytes(sb.path()),
                fs::metadata(sb.disk()).unwrap().blocks() * 512,
                "nothing but the disk was written for the sandbox"
            );
        }
        // A resume (its own chain) and a recording go through wrenn-uffd.
        let vmm = test_vmm(&root, RestoreBackend::File, true, false);
        assert_eq!(vmm.memory_plan(&resume), MemoryPlan::Uffd);
        assert_eq!(vmm.memory_plan(&recording), MemoryPlan::Uffd);
        // The uffd backend ignores the file.
        let vmm = test_vmm(&root, RestoreBackend::Uffd, true, false);
        assert_eq!(vmm.memory_plan(&from_template), MemoryPlan::Uffd);
        // Without wrenn-uffd a resume materializes its chain: a copy of its own (what the
        // template restore above does not make).
        let vmm = test_vmm(&root, RestoreBackend::File, false, false);
        let plan = vmm.memory_plan(&resume);
        assert_eq!(plan, MemoryPlan::Materialize);
        let fc = vmm
            .prepare_restore(&rec, &sb, &vmm.paths(&sb), &resume, &plan)
            .unwrap()
            .unwrap();
        assert_eq!(fc, sb.snapshot().join("memory"));
        assert_ne!(fs::metadata(&fc).unwrap().ino(), ino);
        assert!(
            fs::read(&fc).unwrap() == fs::read(&mem).unwrap(),
            "the same bytes as the template's file"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn jailed_the_template_memory_file_is_linked_read_only_into_the_chroot() {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipped: not root (a chroot's files are chowned to the jailed uid)");
            return;
        }
        let root = fixture_root("tjail");
        let (tdir, sb, chain) = template_fixture(&root);
        crate::manager::write_template_memory(&tdir).unwrap();
        let mem = tdir.memory();
        let mut rec = SandboxRecord::new(
            proto::id::Uuid::from_u128(1),
            proto::id::Uuid::from_u128(0xaa),
            crate::statedir::TemplateKind::Snapshot,
            0,
        );
        rec.jail_uid = Some(900_123);
        let src = RestoreSource {
            chain: &chain,
            record_working_set: None,
            working_set: None,
            template_memory: Some(&mem),
        };
        let vmm = test_vmm(&root, RestoreBackend::File, true, true);
        let paths = vmm.paths(&sb);
        let chroot = paths.chroot.clone().unwrap();
        let plan = vmm.memory_plan(&src);
        let fc = vmm
            .prepare_restore(&rec, &sb, &paths, &src, &plan)
            .unwrap()
            .unwrap();
        assert_eq!(fc, Path::new(jail::JAIL_MEMORY), "Firecracker's view");
        let linked = fs::metadata(jail::host_path(&chroot, &fc)).unwrap();
        let orig = fs::metadata(&mem).unwrap();
        assert_eq!(
            (linked.dev(), linked.ino()),
            (orig.dev(), orig.ino()),
            "hard-linked, not copied"
        );
        assert_eq!((linked.uid(), linked.mode() & 0o7777), (0, 0o444));
        assert_eq!(linked.nlink(), 2);
        // The VM state is the jailed uid's private copy, as before.
        let v = fs::metadata(jail::host_path(&chroot, Path::new(jail::JAIL_VMSTATE))).unwrap();
        assert_eq!((v.uid(), v.mode() & 0o777), (900_123, 0o400));
        // Removing the chroot leaves the template's file whole and unchanged.
        jail::remove_chroot(chroot.parent().unwrap()).unwrap();
        let after = fs::metadata(&mem).unwrap();
        assert_eq!(
            (
                after.ino(),
                after.uid(),
                after.mode() & 0o7777,
                after.nlink()
            ),
            (orig.ino(), 0, 0o444, 1)
        );
        jail::release_owned(&sb.disk()).unwrap();
        fs::remove_dir_all(&root).unwrap();
    }
}
