//! Firecracker for real. Needs root, /dev/kvm and `WRENN_FIRECRACKER`; else `skipped`.
//!
//! - `spawn_configure_kill`: Firecracker in a network namespace, its own mount namespace
//!   (the stable disk path) and a cgroup; API socket, `GET /`, `PUT /machine-config`, a drive
//!   at the stable path; re-adoption from the state file; kill; nothing left.
//! - `boot_snapshot_restore` (in `boot.rs`) needs a kernel and rootfs as well.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_glue::api::ApiError;
use vmm_glue::cgroup::{self, CgroupLimits};
use vmm_glue::net::netns;
use vmm_glue::process::{
    CgroupSpec, ExitKind, SpawnConfig, VmProcess, STABLE_DIR, STABLE_DISK_PATH,
};
use vmm_glue::request::{Action, Drive, LogLevel, Logger, MachineConfig, Metrics, MmdsData};

/// Prints `skipped: <reason>` and returns None, or panics under WRENN_REQUIRE_E2E=1.
pub fn skip<T>(reason: &str) -> Option<T> {
    proto::skip::skip("vmm-glue firecracker test", reason);
    None
}

/// The Firecracker binary, if this host can run it.
pub fn firecracker() -> Option<PathBuf> {
    let Some(fc) = std::env::var_os("WRENN_FIRECRACKER").map(PathBuf::from) else {
        return skip("WRENN_FIRECRACKER not set");
    };
    if !fc.is_file() {
        return skip(&format!("WRENN_FIRECRACKER={} is not a file", fc.display()));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root (namespaces, cgroups)");
    }
    if fs::metadata("/dev/kvm").is_err() {
        return skip("no /dev/kvm");
    }
    Some(fc)
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Short paths: Unix socket paths are limited to 107 bytes.
    pub fn new(tag: &str) -> TempDir {
        let p = PathBuf::from(format!("/tmp/vg-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A named network namespace removed on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Netns {
        netns::create(&name).expect("create netns");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = netns::delete(&self.0);
    }
}

/// Kills the VM if the test panics before it does so itself.
pub struct Guard(pub Option<VmProcess>);

impl Guard {
    pub fn vm(&mut self) -> &mut VmProcess {
        self.0.as_mut().expect("vm still held")
    }
    pub fn take(&mut self) -> VmProcess {
        self.0.take().expect("vm still held")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(vm) = self.0.take() {
            let _ = vm.kill();
        }
    }
}

fn mountinfo(pid: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default()
}

fn stable_mounts(info: &str) -> usize {
    info.lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| m.starts_with(STABLE_DIR))
        })
        .count()
}

#[test]
fn spawn_configure_kill() {
    let Some(fc) = firecracker() else { return };
    let pid_tag = std::process::id();
    let dir = TempDir::new("fc");
    let ns = Netns::new(format!("wrnfc-{pid_tag}"));
    let disk = dir.0.join("disk.ext4");
    fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let mode = cgroup::detect().expect("cgroup layout");
    println!("cgroup layout: {mode:?}");
    let mut cfg = SpawnConfig::new(&fc, "sb-test-1", &dir.0);
    cfg.netns = Some(ns.0.clone());
    cfg.disk = Some(disk.clone());
    cfg.cgroup = Some(CgroupSpec {
        mode,
        parent: format!("wrenn-it-{pid_tag}"),
        name: "sb-test-1".into(),
        limits: CgroupLimits {
            memory_max_bytes: Some(512 << 20),
            cpu_millis: Some(1000),
        },
    });
    let vsock_leftover = dir.0.join("v.sock");
    cfg.cleanup = vec![vsock_leftover.clone()];
    // Another sandbox's namespace, deleted while this Firecracker runs: its mount must not
    // linger in Firecracker's mount namespace (that would keep the namespace alive).
    let other = Netns::new(format!("wrnfo-{pid_tag}"));

    let t0 = Instant::now();
    let mut guard = Guard(Some(VmProcess::spawn(&cfg).expect("spawn")));
    let vm = guard.vm();
    vm.wait_api_socket(Duration::from_secs(10))
        .expect("api socket");
    println!("spawn to api socket: {:?}", t0.elapsed());
    let pid = vm.pid();
    let cg_dirs: Vec<PathBuf> = vm.cgroup().unwrap().dirs().to_vec();

    // Namespaces, session and cgroup as asked.
    let ns_ino = fs::metadata(netns::path(&ns.0).unwrap()).unwrap().ino();
    let fc_net = fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    assert_eq!(fc_net, ns_ino, "firecracker is in the sandbox netns");
    let own_mnt = fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_ne!(
        fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        own_mnt
    );
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    let session: u32 = after.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(session, pid, "firecracker leads its own session");
    for d in &cg_dirs {
        let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "{} has {procs:?}",
            d.display()
        );
    }
    // The stable path exists only in Firecracker's mount namespace.
    assert!(stable_mounts(&mountinfo(&pid.to_string())) >= 2);
    assert_eq!(stable_mounts(&mountinfo("self")), 0);
    assert!(!Path::new(STABLE_DISK_PATH).exists());
    let other_name = other.0.clone();
    let mentions_other = |info: &str| info.lines().any(|l| l.contains(&format!("/{other_name} ")));
    assert!(mentions_other(&mountinfo(&pid.to_string())));
    drop(other);
    assert!(
        !mentions_other(&mountinfo(&pid.to_string())),
        "a deleted netns is unmounted in firecracker's mount namespace too"
    );

    // The API.
    let mut api = vm.api_client();
    let info = api.describe_instance().expect("GET /");
    assert_eq!(info.id, "sb-test-1");
    assert_eq!(info.state, "Not started");
    api.call(&MachineConfig::new(1, 128))
        .expect("PUT /machine-config");
    // Firecracker opens the drive at the stable path: only the bind mount makes it exist.
    api.call(&Drive::root("rootfs", STABLE_DISK_PATH))
        .expect("PUT /drives/rootfs at the stable path");
    let fc_fds: Vec<PathBuf> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .collect();
    assert!(
        fc_fds.iter().any(|p| p == Path::new(STABLE_DISK_PATH)),
        "firecracker holds the disk at the stable path: {fc_fds:?}"
    );
    let disk_ino = fs::metadata(&disk).unwrap().ino();
    let held = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::metadata(e.ok()?.path()).ok())
        .any(|m| m.ino() == disk_ino);
    assert!(held, "the stable path is this sandbox's disk");
    // More of the typed requests, accepted by this Firecracker before boot.
    let mut mc = MachineConfig::new(1, 256);
    mc.track_dirty_pages = true;
    api.call(&mc)
        .expect("PUT /machine-config with dirty page tracking");
    let fc_log = dir.0.join("fc-logger.log");
    let fc_metrics = dir.0.join("fc-metrics.json");
    fs::write(&fc_log, b"").unwrap();
    fs::write(&fc_metrics, b"").unwrap();
    api.call(&Logger {
        log_path: fc_log.clone(),
        level: LogLevel::Info,
        show_level: true,
        show_log_origin: false,
    })
    .expect("PUT /logger");
    api.call(&Metrics {
        metrics_path: fc_metrics.clone(),
    })
    .expect("PUT /metrics");
    api.call(&MmdsData(
        serde_json::json!({"wrenn": {"sandbox": "sb-test-1"}}),
    ))
    .expect("PUT /mmds");
    // FlushMetrics is refused before the VM starts: a typed fault, not a hang.
    let err = api.call(&Action::FlushMetrics).unwrap_err();
    assert!(matches!(err, ApiError::Fault { status: 400, .. }), "{err}");
    // A bad request comes back as a fault with Firecracker's message.
    let err = api
        .call(&Drive::root("rootfs2", "/nonexistent/disk"))
        .unwrap_err();
    println!("expected fault: {err}");

    // Re-adoption by a "restarted agent".
    let adopted = VmProcess::adopt(&dir.0).expect("adopt");
    assert_eq!(adopted.pid(), pid);
    assert!(adopted.is_running());
    assert_eq!(
        adopted.api_client().describe_instance().unwrap().id,
        "sb-test-1"
    );
    drop(adopted);

    fs::write(&vsock_leftover, b"").unwrap();
    let exit = guard.take().kill().expect("kill");
    assert_eq!(exit, ExitKind::Signal(libc::SIGKILL));

    // Nothing left.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process reaped"
    );
    for d in &cg_dirs {
        assert!(!d.exists(), "cgroup {} removed", d.display());
    }
    assert!(!dir.0.join("api.sock").exists());
    assert!(!dir.0.join("firecracker.state").exists());
    assert!(!vsock_leftover.exists());
    assert!(
        dir.0.join("firecracker.log").exists(),
        "the log stays for post-mortems"
    );
    assert_eq!(stable_mounts(&mountinfo("self")), 0);
    assert!(matches!(
        VmProcess::adopt(&dir.0),
        Err(vmm_glue::process::ProcessError::State { .. })
    ));
    for d in &cg_dirs {
        let _ = fs::remove_dir(d.parent().unwrap());
    }
}

#[test]
fn exits_early_with_log() {
    let Some(fc) = firecracker() else { return };
    let dir = TempDir::new("fcbad");
    let mut cfg = SpawnConfig::new(&fc, "sb-bad", &dir.0);
    cfg.extra_args = vec!["--no-such-flag".into()];
    let mut vm = VmProcess::spawn(&cfg).expect("spawn");
    let t0 = Instant::now();
    match vm.wait_api_socket(Duration::from_secs(10)) {
        Err(e @ vmm_glue::process::ProcessError::Exited { .. }) => {
            println!("{e}");
            assert!(e.to_string().contains("no-such-flag"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    vm.kill().expect("clean up an exited firecracker");
}
