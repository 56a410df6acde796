//! `wrenn doctor` on this machine and with each check pointed at something broken: every
//! check must be able to fail.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use wrenn::doctor::{run_checks, Check, Config, Status};

use crate::support::{skip, wrenn_bin, TempDir};

fn healthy() -> Config {
    Config::from_env(|k| std::env::var(k).ok())
}

fn check(cfg: &Config, name: &str) -> Check {
    run_checks(cfg)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name}"))
}

fn assert_fails(cfg: &Config, name: &str, why: &str) {
    let c = check(cfg, name);
    assert_eq!(c.status, Status::Fail, "{name} with {why}: {c:?}");
    assert!(!c.fix.is_empty(), "{name} failed without a fix");
}

#[test]
fn this_machine() {
    let cfg = healthy();
    let checks = run_checks(&cfg);
    for c in &checks {
        println!("{:<14} {:<5} {}", c.name, c.status.name(), c.detail);
    }
    if Path::new("/dev/kvm").exists() {
        assert_eq!(check(&cfg, "kvm").status, Status::Ok);
    } else {
        skip("doctor::this_machine kvm", "/dev/kvm is absent");
    }
    if Path::new("/dev/userfaultfd").exists()
        || Path::new("/proc/sys/vm/unprivileged_userfaultfd").exists()
    {
        assert_ne!(check(&cfg, "userfaultfd").status, Status::Fail);
    }
    let forward = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let want = if forward.trim() == "1" {
        Status::Ok
    } else {
        Status::Fail
    };
    assert_eq!(check(&cfg, "ip forwarding").status, want);
    let nft = wrenn::doctor::find_on_path("nft").is_some();
    assert_eq!(check(&cfg, "nft").status == Status::Ok, nft);
    assert_eq!(check(&cfg, "cgroups").status, Status::Ok);
    // FICLONE either works or is reported as unsupported, never as a failure, on a
    // writable state root.
    let state = TempDir::new("doctor-reflink");
    let mut c = cfg.clone();
    c.state_root = state.path().to_path_buf();
    assert_ne!(check(&c, "reflink").status, Status::Fail);
    // The temporary files are gone.
    assert_eq!(fs::read_dir(state.path()).unwrap().count(), 0);
}

#[test]
fn firecracker_present_missing_and_wrong() {
    let mut cfg = healthy();
    match std::env::var("WRENN_FIRECRACKER") {
        Ok(p) if Path::new(&p).exists() => {
            cfg.firecracker = Some(PathBuf::from(&p));
            let c = check(&cfg, "firecracker");
            assert_eq!(c.status, Status::Ok, "{c:?}");
            assert!(c.detail.contains("Firecracker v"), "{}", c.detail);
        }
        _ => skip(
            "doctor::firecracker_present",
            "WRENN_FIRECRACKER is not set to a binary",
        ),
    }
    cfg.firecracker = Some(PathBuf::from("/nonexistent/firecracker"));
    assert_fails(&cfg, "firecracker", "a missing path");
    // An executable that is not Firecracker.
    cfg.firecracker = Some(PathBuf::from("/bin/true"));
    assert_fails(&cfg, "firecracker", "/bin/true");
    cfg.firecracker = Some(PathBuf::from("/bin/false"));
    assert_fails(&cfg, "firecracker", "/bin/false");
}

/// A script printing `line` for `--version`.
fn version_script(dir: &Path, name: &str, line: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\necho '{line}'\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn jailer_missing_mismatched_matching_and_unjailed() {
    let dir = TempDir::new("doctor-jailer");
    let mut cfg = healthy();
    cfg.firecracker = Some(version_script(dir.path(), "fc", "Firecracker v1.10.1"));
    cfg.jailer = dir.path().join("no-jailer");
    assert_fails(&cfg, "jailer", "a missing jailer");
    cfg.jailer = PathBuf::from("/bin/true");
    assert_fails(&cfg, "jailer", "/bin/true as the jailer");
    cfg.jailer = version_script(dir.path(), "jailer-old", "Jailer v1.9.0");
    assert_fails(&cfg, "jailer", "a jailer of another release");
    cfg.jailer = version_script(dir.path(), "jailer", "Jailer v1.10.1");
    let c = check(&cfg, "jailer");
    assert_eq!(c.status, Status::Ok, "{c:?}");
    // The same host, with the agent run --unjailed: a failure for production.
    cfg.unjailed = true;
    let c = check(&cfg, "jailer");
    assert_fails(&cfg, "jailer", "--unjailed");
    assert!(c.detail.contains("--unjailed"), "{}", c.detail);
    // A script is no static binary; neither is this dynamically linked test.
    assert_fails(&cfg, "static firecracker", "a shell script");
    if !cfg!(target_feature = "crt-static") {
        cfg.firecracker = Some(std::env::current_exe().unwrap());
        assert_fails(&cfg, "static firecracker", "a dynamically linked binary");
    }
    match std::env::var("WRENN_FIRECRACKER") {
        Ok(p) if Path::new(&p).exists() => {
            cfg.firecracker = Some(PathBuf::from(&p));
            println!("{:?}", check(&cfg, "static firecracker"));
        }
        _ => skip(
            "doctor::static firecracker present",
            "WRENN_FIRECRACKER is not set to a binary",
        ),
    }
    // --unjailed reaches the check from the command line.
    let args: Vec<String> = vec!["--unjailed".into(), "--json".into()];
    assert!(matches!(
        wrenn::doctor::run(&args),
        Err(wrenn::doctor::DoctorError::Failed { .. })
    ));
}

#[test]
fn kvm_device_missing_directory_or_not_kvm() {
    let mut cfg = healthy();
    cfg.kvm_dev = PathBuf::from("/nonexistent/kvm");
    assert_fails(&cfg, "kvm", "a missing device");
    cfg.kvm_dev = PathBuf::from("/");
    assert_fails(&cfg, "kvm", "a directory");
    cfg.kvm_dev = PathBuf::from("/dev/null");
    assert_fails(&cfg, "kvm", "a device that is not KVM");
}

#[test]
fn userfaultfd_device_and_syscall() {
    let mut cfg = healthy();
    cfg.uffd_dev = PathBuf::from("/nonexistent/userfaultfd");
    cfg.uffd_syscall = false;
    assert_fails(&cfg, "userfaultfd", "no device and no system call");
    cfg.uffd_dev = PathBuf::from("/dev/null");
    assert_fails(&cfg, "userfaultfd", "a device that is not userfaultfd");
    // The system call alone is enough (as root, or with the sysctl set).
    cfg.uffd_syscall = true;
    let c = check(&cfg, "userfaultfd");
    if wrenn::doctor::sys::is_root() {
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.contains("system call works"), "{}", c.detail);
    } else {
        println!("userfaultfd via the system call as non-root: {c:?}");
    }
}

#[test]
fn forwarding_reads_the_sysctl() {
    let proc = TempDir::new("doctor-proc");
    let mut cfg = healthy();
    cfg.proc_root = proc.path().to_path_buf();
    assert_fails(&cfg, "ip forwarding", "no sysctl file");
    fs::create_dir_all(proc.path().join("sys/net/ipv4")).unwrap();
    fs::write(proc.path().join("sys/net/ipv4/ip_forward"), "0\n").unwrap();
    assert_fails(&cfg, "ip forwarding", "ip_forward=0");
    fs::write(proc.path().join("sys/net/ipv4/ip_forward"), "1\n").unwrap();
    assert_eq!(check(&cfg, "ip forwarding").status, Status::Ok);
}

#[test]
fn nft_missing_or_broken() {
    let mut cfg = healthy();
    cfg.nft = PathBuf::from("/nonexistent/nft");
    assert_fails(&cfg, "nft", "a missing binary");
    cfg.nft = PathBuf::from("/bin/false");
    assert_fails(&cfg, "nft", "a binary that fails");
    cfg.nft = PathBuf::from("no-such-nft-on-path");
    assert_fails(&cfg, "nft", "a name not on PATH");
}

#[test]
fn cgroups_missing() {
    let root = TempDir::new("doctor-cg");
    let mut cfg = healthy();
    cfg.cgroup_root = root.path().to_path_buf();
    assert_fails(&cfg, "cgroups", "an empty cgroup root");
    cfg.cgroup_root = PathBuf::from("/nonexistent/cgroup");
    assert_fails(&cfg, "cgroups", "a missing cgroup root");
}

#[test]
fn disk_below_the_minimum() {
    let mut cfg = healthy();
    cfg.state_root = std::env::temp_dir();
    assert_eq!(
        check(&cfg, "disk").status,
        Status::Ok,
        "{:?}",
        check(&cfg, "disk")
    );
    cfg.min_free_gib = 1 << 30; // an exbibyte
    assert_fails(&cfg, "disk", "a minimum no disk has");
}

#[test]
fn reflink_on_an_unwritable_state_root() {
    let mut cfg = healthy();
    // /proc/self takes no new files: creating the probe files fails.
    cfg.state_root = PathBuf::from("/proc/self");
    assert_fails(&cfg, "reflink", "a state root that takes no files");
}

#[test]
fn kernel_and_rootfs_missing_wrong_and_present() {
    let root = TempDir::new("doctor-images");
    let mut cfg = healthy();
    cfg.state_root = root.path().to_path_buf();
    cfg.kernel = None;
    cfg.rootfs = None;
    assert_fails(&cfg, "kernel", "no kernels directory");
    assert_fails(&cfg, "rootfs", "no template");

    fs::create_dir_all(root.path().join("kernels")).unwrap();
    fs::write(
        root.path().join("kernels/vmlinux-6.1-x"),
        b"MZ compressed bzImage",
    )
    .unwrap();
    assert_fails(&cfg, "kernel", "a file that is not ELF");
    fs::write(
        root.path().join("kernels/vmlinux-6.1-x"),
        b"\x7fELF\x02\x01\x01",
    )
    .unwrap();
    assert_eq!(check(&cfg, "kernel").status, Status::Ok);

    let rootfs = wrenn::doctor::minimal_rootfs(root.path());
    fs::create_dir_all(rootfs.parent().unwrap()).unwrap();
    fs::write(&rootfs, vec![0u8; 4096]).unwrap();
    assert_fails(&cfg, "rootfs", "a file without an ext4 superblock");
    let mut img = vec![0u8; 4096];
    img[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
    fs::write(&rootfs, &img).unwrap();
    assert_eq!(check(&cfg, "rootfs").status, Status::Ok);

    cfg.kernel = Some(root.path().join("nope"));
    assert_fails(&cfg, "kernel", "an explicit missing kernel");
    cfg.rootfs = Some(root.path().join("nope"));
    assert_fails(&cfg, "rootfs", "an explicit missing rootfs");
}

#[test]
fn run_reports_failure_as_an_error() {
    let args: Vec<String> = ["--kvm-dev", "/nonexistent/kvm", "--json"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    match wrenn::doctor::run(&args) {
        Err(wrenn::doctor::DoctorError::Failed { failed }) => assert!(failed >= 1),
        other => panic!("expected a failure, got {other:?}"),
    }
    let bad: Vec<String> = vec!["--no-such-flag".into()];
    assert!(matches!(
        wrenn::doctor::run(&bad),
        Err(wrenn::doctor::DoctorError::Args(_))
    ));
}

/// The binary: exit status and JSON output (needs main.rs to dispatch `doctor`).
#[test]
fn binary_exit_status_and_json() {
    let help = Command::new(wrenn_bin())
        .args(["doctor", "--help"])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&help.stderr).contains("unknown command") {
        skip(
            "doctor::binary_exit_status_and_json",
            "main.rs does not dispatch `doctor` yet",
        );
        return;
    }
    if !help.status.success() {
        panic!(
            "wrenn doctor --help failed: {}",
            String::from_utf8_lossy(&help.stderr)
        );
    }
    let missing = TempDir::new("doctor-bin");
    let out = Command::new(wrenn_bin())
        .args(["doctor", "--json", "--kvm-dev"])
        .arg(missing.path().join("kvm"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.trim_start().starts_with('[') && text.trim_end().ends_with(']'),
        "{text}"
    );
    assert!(
        text.contains("\"check\": \"kvm\", \"status\": \"fail\""),
        "{text}"
    );
    // Every check appears once.
    for name in [
        "root",
        "kvm",
        "userfaultfd",
        "firecracker",
        "kernel",
        "rootfs",
        "ip forwarding",
        "nft",
        "cgroups",
        "disk",
        "reflink",
        "jailer",
        "static firecracker",
    ] {
        assert_eq!(
            text.matches(&format!("\"check\": \"{name}\"")).count(),
            1,
            "{name} in {text}"
        );
    }
    // A passing configuration exits 0: point every image/binary check at good inputs.
    let root = TempDir::new("doctor-pass");
    fs::create_dir_all(root.path().join("kernels")).unwrap();
    fs::write(root.path().join("kernels/vmlinux-t"), b"\x7fELF").unwrap();
    let rootfs = wrenn::doctor::minimal_rootfs(root.path());
    fs::create_dir_all(rootfs.parent().unwrap()).unwrap();
    let mut img = vec![0u8; 4096];
    img[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
    fs::write(&rootfs, &img).unwrap();
    let Some(fc) = std::env::var("WRENN_FIRECRACKER")
        .ok()
        .filter(|p| Path::new(p).exists())
    else {
        skip(
            "doctor::binary_exit_status passing run",
            "WRENN_FIRECRACKER is not set to a binary",
        );
        return;
    };
    let jailer =
        std::env::var("WRENN_JAILER").unwrap_or_else(|_| wrenn::doctor::DEFAULT_JAILER.to_owned());
    if !Path::new(&jailer).exists() {
        skip(
            "doctor::binary_exit_status passing run",
            "no jailer (WRENN_JAILER or /usr/local/bin/jailer)",
        );
        return;
    }
    if !Path::new("/dev/kvm").exists() || wrenn::doctor::find_on_path("nft").is_none() {
        skip(
            "doctor::binary_exit_status passing run",
            "no /dev/kvm or no nft on this host",
        );
        return;
    }
    let out = Command::new(wrenn_bin())
        .args(["doctor", "--min-free-gib", "1", "--state-root"])
        .arg(root.path())
        .args(["--firecracker", &fc])
        .args(["--jailer", &jailer])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    let forwarding = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    if forwarding.trim() == "1" {
        assert_eq!(out.status.code(), Some(0), "{text}");
        assert!(text.contains("this host can run wrenn sandboxes"), "{text}");
    }
}
