//! Firecracker under its jailer for real (no guest). Needs root, /dev/kvm, `WRENN_FIRECRACKER`
//! (a static binary) and `WRENN_JAILER`; else `skipped`.
//!
//! `jailed_spawn_adopt_kill`: the jailed Firecracker runs as the given uid/gid, its root is
//! its chroot, its cgroup limits are set, the chroot holds only what was put in plus the
//! jailer's devices, the API answers on the chroot's socket, a second handle re-adopts it
//! from the state file, and kill leaves no chroot, cgroup or process.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_glue::jail::{self, Access, ChrootEntry, JailCgroups, JailLimits, JailSpec};
use vmm_glue::process::{VmProcess, STABLE_DISK_PATH};
use vmm_glue::request::{Drive, MachineConfig};

use crate::firecracker::{firecracker, skip, TempDir};

fn jailer() -> Option<PathBuf> {
    let Some(j) = std::env::var_os("WRENN_JAILER").map(PathBuf::from) else {
        return skip("WRENN_JAILER not set");
    };
    if !j.is_file() {
        return skip(&format!("WRENN_JAILER={} is not a file", j.display()));
    }
    Some(j)
}

fn status_field(pid: u32, key: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

#[test]
fn jailed_spawn_adopt_kill() {
    let Some(fc) = firecracker() else { return };
    let Some(jailer) = jailer() else { return };
    let tmp = TempDir::new("jail");
    let dir = tmp.0.join("sb");
    fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("rootfs.ext4");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let id = format!("vgjail-{}", std::process::id());
    let cgroups = JailCgroups::detect().ok();
    let spec = JailSpec {
        jailer,
        firecracker: fc,
        id: id.clone(),
        uid: 912_345,
        gid: 912_345,
        chroot_base: tmp.0.join("j"),
        netns: None,
        cgroups: cgroups.clone(),
        cgroup_parent: "wrenn-test".into(),
        limits: JailLimits::for_vm(1, 128 << 20, 1 << 20),
        firecracker_args: vec![],
    };
    let chroot = spec.chroot_dir().unwrap();
    jail::prepare_chroot(
        &chroot,
        &[ChrootEntry::new(STABLE_DISK_PATH, &disk, Access::Owned)],
        spec.uid,
        spec.gid,
    )
    .unwrap();
    let mut vm = VmProcess::spawn_jailed(&spec, &dir, vec![]).unwrap();
    let pid = vm.pid();
    let dirs = spec.cgroup_dirs();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vm.wait_api_socket(Duration::from_secs(10)).unwrap();
        assert_eq!(vm.chroot().as_deref(), Some(chroot.as_path()));
        let uid = status_field(pid, "Uid:");
        let gid = status_field(pid, "Gid:");
        assert!(uid.split_whitespace().all(|u| u == "912345"), "Uid: {uid}");
        assert!(gid.split_whitespace().all(|g| g == "912345"), "Gid: {gid}");
        assert!(vmm_glue::process::root_is(pid, &chroot));
        // Its own PID namespace: it is pid 1 there.
        let nspid = status_field(pid, "NSpid:");
        assert!(
            nspid.ends_with(" 1") || nspid.ends_with("\t1"),
            "NSpid: {nspid}"
        );
        println!(
            "jailed firecracker Seccomp: {}",
            status_field(pid, "Seccomp:")
        );
        // Cgroup limits as asked.
        match &cgroups {
            Some(JailCgroups::V1 { memory, .. }) => {
                let m = fs::read_to_string(
                    memory
                        .join("wrenn-test")
                        .join(&id)
                        .join("memory.limit_in_bytes"),
                )
                .unwrap();
                assert_eq!(m.trim(), spec.limits.memory_max_bytes.to_string());
            }
            Some(JailCgroups::V2 { root }) => {
                let m = fs::read_to_string(root.join("wrenn-test").join(&id).join("memory.max"))
                    .unwrap();
                assert_eq!(m.trim(), spec.limits.memory_max_bytes.to_string());
            }
            None => println!("no cgroups on this host: limits not checked"),
        }
        for d in &dirs {
            let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|l| l.trim() == pid.to_string()),
                "{}",
                d.display()
            );
        }
        // The API answers through the chroot's socket; the disk is there at the stable path.
        let mut api = vm.api_client();
        assert_eq!(api.describe_instance().unwrap().state, "Not started");
        api.call(&MachineConfig::new(1, 128)).unwrap();
        api.call(&Drive::root("rootfs", STABLE_DISK_PATH)).unwrap();
        // Only what we put in, the jailer's devices and its own files.
        let mut top: Vec<String> = fs::read_dir(&chroot)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(top, ["dev", "firecracker", "firecracker.pid", "run"]);
        let d = fs::metadata(&disk).unwrap();
        assert_eq!((d.uid(), d.mode() & 0o777), (912_345, 0o600));
        // Re-adoption from the state file, as a restarted agent does.
        let again = VmProcess::adopt(&dir).unwrap();
        assert_eq!(again.pid(), pid);
    }));
    let exit = vm.kill();
    jail::release_owned(&disk).unwrap();
    r.unwrap();
    exit.unwrap();
    assert!(!chroot.exists() && !chroot.parent().unwrap().exists());
    for d in &dirs {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || status_field(pid, "State:").starts_with('Z')
    );
    assert_eq!(fs::metadata(&disk).unwrap().uid(), 0);
}
