//! The full path on a real guest: boot, envd's readiness over vsock, exec `echo hi`, pause,
//! Full snapshot, restore into a second sandbox (its own disk copy at the stable path, File
//! backend, vsock override), exec again; then restore into a third sandbox with the Uffd
//! backend served by `wrenn-uffd` (`WRENN_UFFD`, else `target/<profile>/wrenn-uffd` when
//! `cargo build -p uffd` made it; skipped with a message otherwise), exec again.
//!
//! Needs root, /dev/kvm, `WRENN_FIRECRACKER`, `WRENN_KERNEL` and `WRENN_ROOTFS` (an image with
//! envd as /sbin/init); else `skipped`. Optional: `WRENN_BOOT_ARGS` (extra kernel arguments,
//! e.g. the nested-hypervisor workarounds of test hosts), `WRENN_BOOT_CONSOLE=1` (serial
//! console into the Firecracker log), `WRENN_BOOT_TIMEOUT_S` (default 900: a guest kernel
//! takes 4–6 minutes to reach userspace under the nested hypervisor of test hosts).
//!
//! On the nested-KVM test hosts this passed with the patched kernel and
//! `WRENN_BOOT_ARGS="mitigations=off clearcpuid=xsave,cx16,popcnt,rdrand,rdseed,fsgsbase,rdpid,smap
//! initcall_blacklist=ptp_kvm_init"`. `clearcpuid=xsave` stands in for `noxsave`: the 6.1
//! kernel does not know `noxsave` and hands it to init as an argument, which envd refuses.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::gen::wrenn::envd::v1::{
    init_methods, process_event, process_exited, process_methods, InitRequest, InitResponse,
    ProcessConfig, ProcessEvent, ReadyRequest, StartRequest,
};
use proto::rpc::{CallOpts, Client, Credential};
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

use crate::firecracker::{firecracker, skip, Guard, TempDir};

const TOKEN: &str = "boot-test-token";

fn guest_inputs() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let fc = firecracker()?;
    let kernel = std::env::var_os("WRENN_KERNEL").map(PathBuf::from);
    let rootfs = std::env::var_os("WRENN_ROOTFS").map(PathBuf::from);
    match (kernel, rootfs) {
        (Some(k), Some(r)) if k.is_file() && r.is_file() => Some((fc, k, r)),
        (Some(_), Some(_)) => skip("WRENN_KERNEL or WRENN_ROOTFS is not a file"),
        _ => skip("WRENN_KERNEL/WRENN_ROOTFS not set"),
    }
}

fn spawn(fc: &Path, id: &str, dir: &Path, disk: &Path, vsock: &Path) -> Guard {
    let mut cfg = SpawnConfig::new(fc, id, dir);
    cfg.disk = Some(disk.to_owned());
    cfg.cleanup = vec![
        vsock.to_owned(),
        vsock::listener_path(vsock, vsock::READINESS_PORT),
    ];
    let mut vm = VmProcess::spawn(&cfg).expect("spawn firecracker");
    vm.wait_api_socket(Duration::from_secs(10))
        .expect("api socket");
    Guard(Some(vm))
}

fn wait_ready(rx: &Receiver<ReadyRequest>, timeout: Duration, vm: &mut VmProcess) -> ReadyRequest {
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(r) => return r,
            Err(_) if Instant::now() >= deadline => panic!(
                "no readiness within {timeout:?}; log ends: {}",
                tail(vm.log_path())
            ),
            Err(_) => {
                if let Some(e) = vm.try_wait().unwrap() {
                    panic!(
                        "firecracker exited {e:?}; log ends: {}",
                        tail(vm.log_path())
                    );
                }
            }
        }
    }
}

/// The end of a Firecracker log; the whole log is kept in the temp dir (the sandbox dir is
/// removed when the test ends) so a failed boot can be read afterwards.
fn tail(p: &Path) -> String {
    let t = fs::read(p).unwrap_or_default();
    let keep = std::env::temp_dir().join(format!("vmm-glue-boot-{}.log", std::process::id()));
    let _ = fs::write(&keep, &t);
    format!(
        "(whole log kept at {})\n{}",
        keep.display(),
        String::from_utf8_lossy(&t[t.len().saturating_sub(3000)..])
    )
}

/// Connects to envd (retrying: right after a restore the guest takes a moment).
fn envd(uds: &Path, cred: &Credential, timeout: Duration) -> Client {
    let deadline = Instant::now() + timeout;
    loop {
        match vsock::connect_rpc(uds, ENVD_PORT, cred.clone(), Duration::from_secs(10)) {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                println!("envd not reachable yet: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("connect to envd: {e}"),
        }
    }
}

/// Runs `echo hi` and returns its stdout (retrying once: guest processes on test hosts now
/// and then die on their first steps).
fn echo_hi(c: &Client) -> String {
    for attempt in 0..3 {
        let req = StartRequest {
            process: Some(ProcessConfig {
                cmd: "/bin/echo".into(),
                args: vec!["hi".into()],
                ..Default::default()
            }),
        };
        let mut s = c
            .call(
                process_methods::START,
                &req,
                CallOpts {
                    timeout: Some(Duration::from_secs(120)),
                    end_stream: true,
                },
            )
            .expect("Process/Start");
        let mut out = Vec::new();
        let mut exit = None;
        while let Some(ev) = s.recv::<ProcessEvent>().expect("process events") {
            match ev.event {
                Some(process_event::Event::Output(o)) => out.extend_from_slice(&o.data),
                Some(process_event::Event::Exited(e)) => exit = e.status,
                _ => {}
            }
        }
        if exit == Some(process_exited::Status::ExitCode(0)) {
            return String::from_utf8_lossy(&out).into_owned();
        }
        println!("echo attempt {attempt} ended {exit:?}");
    }
    panic!("echo hi never succeeded");
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[test]
fn boot_snapshot_restore() {
    let Some((fc, kernel, rootfs)) = guest_inputs() else {
        return;
    };
    let boot_timeout = Duration::from_secs(
        std::env::var("WRENN_BOOT_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(900),
    );
    let d1 = TempDir::new("boot1");
    let disk1 = d1.0.join("rootfs.ext4");
    let method = clone_disk(&rootfs, &disk1).expect("clone rootfs");
    println!("disk: {method:?}");
    let uds1 = d1.0.join("v.sock");
    let (ready1, rx1) = ReadinessListener::with_channel(&uds1).expect("readiness listener");
    let mut vm1 = spawn(&fc, "boot-1", &d1.0, &disk1, &uds1);
    let mut api = vm1.vm().api_client();
    api.call(&MachineConfig::new(1, 256))
        .expect("machine-config");
    let mut boot = BootSource::new(&kernel);
    boot.console = std::env::var("WRENN_BOOT_CONSOLE").as_deref() == Ok("1");
    if let Ok(extra) = std::env::var("WRENN_BOOT_ARGS") {
        boot = boot.arg(&extra);
    }
    println!("boot args: {}", boot.boot_args().unwrap());
    api.call(&boot).expect("boot-source");
    api.call(&Drive::root("rootfs", STABLE_DISK_PATH))
        .expect("drive");
    api.call(&Vsock {
        guest_cid: 3,
        uds_path: uds1.clone(),
    })
    .expect("vsock");
    let t0 = Instant::now();
    api.call(&Action::InstanceStart).expect("InstanceStart");
    let ready = wait_ready(&rx1, boot_timeout, vm1.vm());
    println!("ready after {:?}: {ready:?}", t0.elapsed());
    assert!(!ready.resumed);
    assert_eq!(ready.api_port, ENVD_PORT);

    // Init over vsock (no credential before the first Init), then exec with the token.
    let c = envd(&uds1, &Credential::none(), Duration::from_secs(60));
    let init: InitResponse = c
        .unary(
            init_methods::INIT,
            &InitRequest {
                sandbox_id: "sb-00000000-0000-0000-0000-000000000001".into(),
                access_token: TOKEN.into(),
                wall_time_unix_ns: now_ns(),
                ..Default::default()
            },
            Some(Duration::from_secs(60)),
        )
        .expect("Init");
    println!("init: {init:?}");
    c.close();
    let c = envd(
        &uds1,
        &Credential::access_token(TOKEN),
        Duration::from_secs(60),
    );
    assert_eq!(echo_hi(&c), "hi\n");
    c.close();

    // Pause, Full snapshot, and a copy of the disk as it is at the snapshot.
    api.call(&VmState::Paused).expect("pause");
    let snap = d1.0.join("snap");
    fs::create_dir(&snap).unwrap();
    let t = Instant::now();
    api.call(&SnapshotCreate {
        snapshot_type: SnapshotType::Full,
        snapshot_path: snap.join("state"),
        mem_file_path: snap.join("mem"),
    })
    .expect("snapshot/create");
    println!("Full snapshot took {:?}", t.elapsed());
    let d2 = TempDir::new("boot2");
    let disk2 = d2.0.join("rootfs.ext4");
    clone_disk(&disk1, &disk2).expect("copy the paused disk");
    let d3 = TempDir::new("boot3");
    let disk3 = d3.0.join("rootfs.ext4");
    clone_disk(&disk1, &disk3).expect("copy the paused disk again");
    vm1.take().kill().expect("kill the first vm");
    drop(ready1);

    // Restore into a second sandbox: its own disk at the same stable path, a new vsock path.
    let uds2 = d2.0.join("v.sock");
    let (_ready2, _rx2) = ReadinessListener::with_channel(&uds2).expect("readiness listener 2");
    let mut vm2 = spawn(&fc, "boot-2", &d2.0, &disk2, &uds2);
    let mut api2 = vm2.vm().api_client();
    let mut load = SnapshotLoad::new(snap.join("state"), MemBackend::File(snap.join("mem")));
    load.resume_vm = true;
    load.vsock_override = Some(uds2.clone());
    let t = Instant::now();
    api2.call(&load).expect("snapshot/load");
    println!("snapshot/load + resume took {:?}", t.elapsed());
    assert_eq!(api2.describe_instance().unwrap().state, "Running");
    let t = Instant::now();
    let c = envd(
        &uds2,
        &Credential::access_token(TOKEN),
        Duration::from_secs(120),
    );
    println!("envd reachable {:?} after restore", t.elapsed());
    assert_eq!(echo_hi(&c), "hi\n");
    c.close();
    vm2.take().kill().expect("kill the restored vm");

    restore_uffd(&fc, &snap, &d3.0, &disk3);
}

/// `wrenn-uffd`: `WRENN_UFFD`, else next to the test binary's target directory.
fn uffd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WRENN_UFFD").map(PathBuf::from) {
        return Some(p);
    }
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/it-<hash> -> target/<profile>/wrenn-uffd
    let p = exe.parent()?.parent()?.join("wrenn-uffd");
    p.is_file().then_some(p)
}

fn random_build_id() -> BuildId {
    let mut b = [0u8; 16];
    let f = fs::File::open("/dev/urandom").expect("open /dev/urandom");
    std::io::Read::read_exact(&mut &f, &mut b).expect("read /dev/urandom");
    b[0] |= 1; // never nil
    BuildId(b)
}

/// Restores the Full snapshot in `snap` into a third sandbox through `wrenn-uffd`.
fn restore_uffd(fc: &Path, snap: &Path, dir: &Path, disk: &Path) {
    let Some(bin) = uffd_binary() else {
        return skip(
            "uffd restore: WRENN_UFFD not set and wrenn-uffd not built (cargo build -p uffd)",
        )
        .unwrap_or(());
    };
    // The page server reads a header and layer files, not Firecracker's memory file.
    let mem = fs::File::open(snap.join("mem")).unwrap();
    let size = mem.metadata().unwrap().len();
    let layers = snap.join("layers");
    fs::create_dir(&layers).unwrap();
    let id = random_build_id();
    let t = Instant::now();
    let mut layer =
        std::io::BufWriter::new(fs::File::create(layers.join(id.layer_file_name())).unwrap());
    let (diff, stats) =
        generation::build(&mem, size, SnapshotKind::Full, &mut layer).expect("build layer");
    std::io::Write::flush(&mut layer).unwrap();
    drop(layer);
    let header = Header::from_base(size, id, &diff).expect("header");
    fs::write(snap.join("header"), header.serialize()).unwrap();
    println!("layer built in {:?}: {stats:?}", t.elapsed());

    let uds = dir.join("v.sock");
    let (_ready, _rx) = ReadinessListener::with_channel(&uds).expect("readiness listener 3");
    let mut vm = spawn(fc, "boot-3", dir, disk, &uds);
    let mut ps = PageServerProcess::spawn(&PageServerConfig {
        binary: bin,
        dir: dir.to_owned(),
        socket: dir.join("uffd.sock"),
        firecracker_pid: vm.vm().pid(),
        header: snap.join("header"),
        layers,
        prefetch: None,
        stats: None,
        extra_args: vec![],
    })
    .expect("spawn wrenn-uffd");
    ps.wait_listening(Duration::from_secs(10))
        .expect("wrenn-uffd listening");
    let mut api = vm.vm().api_client();
    let mut load = SnapshotLoad::new(snap.join("state"), MemBackend::Uffd(ps.socket().to_owned()));
    load.resume_vm = true;
    load.vsock_override = Some(uds.clone());
    let t = Instant::now();
    api.call(&load).expect("snapshot/load (Uffd)");
    println!("snapshot/load (Uffd) + resume took {:?}", t.elapsed());
    let t = Instant::now();
    let c = envd(
        &uds,
        &Credential::access_token(TOKEN),
        Duration::from_secs(120),
    );
    println!("envd reachable {:?} after the Uffd restore", t.elapsed());
    assert_eq!(echo_hi(&c), "hi\n");
    c.close();
    vm.take().kill().expect("kill the uffd-restored vm");
    let exit = ps.kill().expect("stop wrenn-uffd");
    let log = fs::read(dir.join("wrenn-uffd.log")).unwrap_or_default();
    println!(
        "wrenn-uffd ended {exit:?}; log ends: {}",
        String::from_utf8_lossy(&log[log.len().saturating_sub(1000)..])
    );
}
