//! `wrenn doctor`: checks that this host can run sandboxes and prints a table with a fix for
//! every failure. Exit status is non-zero when any check fails (warnings do not count).
//!
//! Checks: /dev/kvm opens and creates a VM; userfaultfd (the device, else the system call,
//! with `vm.unprivileged_userfaultfd`); the Firecracker binary and its version; Firecracker's
//! jailer (present, the same version as Firecracker, which must be a static binary since the
//! jailer execs it inside a chroot; an agent run `--unjailed` is a failure); a guest kernel
//! and the base rootfs; IPv4 forwarding; `nft`; usable cgroups (v2 with cpu and memory
//! controllers, else v1 cpu and memory hierarchies); free disk in the state root; reflink
//! (FICLONE) support of the state root's file system.
//!
//! Every device and system path can be redirected (flags, or `WRENN_DOCTOR_*` variables) so
//! that tests can make each check fail on a healthy machine.

pub mod sys;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::image::args::{self, Flag};

/// Default state root (the agent's default, `agent/src/statedir.rs`).
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/wrenn";
/// Template id of the base (`minimal`) template whose rootfs `wrenn image rootfs` builds.
pub const MINIMAL_TEMPLATE: &str = "00000000-0000-0000-0000-000000000000";
/// Where the agent looks for Firecracker when neither `--firecracker` nor
/// `WRENN_FIRECRACKER` is given (wrenn-agent's own default).
pub const DEFAULT_FIRECRACKER: &str = "/usr/local/bin/firecracker";
/// Where the agent looks for Firecracker's jailer (wrenn-agent's `--jailer` default).
pub const DEFAULT_JAILER: &str = "/usr/local/bin/jailer";
/// Bytes of an ELF file read to find its program headers (a header table further in is
/// reported as unreadable, never searched for).
const ELF_HEAD_LEN_MAX: usize = 64 * 1024;
/// Free disk below which the disk check fails: two `minimal` sandboxes (5 GiB disks each)
/// plus room for one snapshot of a 512 MiB guest.
pub const MIN_FREE_GIB_DEFAULT: u64 = 11;
/// How long an external `--version` may take before it counts as hung.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a `--version` answer we read (it is one short line).
const VERSION_OUTPUT_MAX: u64 = 4096;

pub const USAGE: &str = "\
usage: wrenn doctor [--json] [--state-root /var/lib/wrenn] [--firecracker PATH] [--kernel PATH]
                    [--jailer /usr/local/bin/jailer] [--unjailed]
                    [--rootfs PATH] [--min-free-gib 11] [--kvm-dev /dev/kvm]
                    [--uffd-dev /dev/userfaultfd] [--proc /proc] [--cgroup-root /sys/fs/cgroup]
                    [--nft nft]

Checks this host for running wrenn sandboxes; prints a fix for every failure and exits 1
when a check fails. --unjailed: the agent runs with --unjailed (reported as a failure: not
for production). Environment: WRENN_FIRECRACKER, WRENN_KERNEL, WRENN_ROOTFS, WRENN_JAILER
(defaults of --firecracker, --kernel, --rootfs, --jailer); WRENN_DOCTOR_KVM_DEV, WRENN_DOCTOR_UFFD_DEV,
WRENN_DOCTOR_PROC, WRENN_DOCTOR_CGROUP_ROOT, WRENN_DOCTOR_NFT (defaults of the device and
system paths, for tests); WRENN_DOCTOR_UFFD_SYSCALL=0 skips the userfaultfd system call (as
on a kernel built without it).
";

const FLAGS: &[Flag] = &[
    Flag::switch("json"),
    Flag::switch("help"),
    Flag::value("state-root"),
    Flag::value("firecracker"),
    Flag::value("jailer"),
    Flag::switch("unjailed"),
    Flag::value("kernel"),
    Flag::value("rootfs"),
    Flag::value("min-free-gib"),
    Flag::value("kvm-dev"),
    Flag::value("uffd-dev"),
    Flag::value("proc"),
    Flag::value("cgroup-root"),
    Flag::value("nft"),
];

/// What `wrenn doctor` can fail with (a failing check is [`DoctorError::Failed`]).
#[derive(Debug)]
pub enum DoctorError {
    Args(args::ArgError),
    Output(io::Error),
    /// At least one check failed; the table says which.
    Failed {
        failed: usize,
    },
}

impl fmt::Display for DoctorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DoctorError::Args(_) => f.write_str("bad arguments (wrenn doctor --help)"),
            DoctorError::Output(_) => f.write_str("write the report"),
            DoctorError::Failed { failed } => write!(f, "{failed} check(s) failed"),
        }
    }
}

impl std::error::Error for DoctorError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DoctorError::Args(e) => Some(e),
            DoctorError::Output(e) => Some(e),
            DoctorError::Failed { .. } => None,
        }
    }
}

/// Where each check looks.
#[derive(Clone, Debug)]
pub struct Config {
    pub state_root: PathBuf,
    /// `None`: `WRENN_FIRECRACKER`, else the agent's default path, else `firecracker` on PATH.
    pub firecracker: Option<PathBuf>,
    /// Firecracker's jailer (`WRENN_JAILER`, else [`DEFAULT_JAILER`]).
    pub jailer: PathBuf,
    /// The agent runs `--unjailed` (Firecracker and wrenn-uffd as root): a failure.
    pub unjailed: bool,
    /// `None`: the newest `<state-root>/kernels/vmlinux-*`.
    pub kernel: Option<PathBuf>,
    /// `None`: `<state-root>/templates/<minimal>/rootfs.ext4`.
    pub rootfs: Option<PathBuf>,
    pub min_free_gib: u64,
    pub kvm_dev: PathBuf,
    pub uffd_dev: PathBuf,
    /// Try the `userfaultfd(2)` system call when the device fails.
    pub uffd_syscall: bool,
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub nft: PathBuf,
}

impl Config {
    /// Defaults from the environment (`env` looks a variable up).
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Config {
        let var = |k: &str| env(k).filter(|v| !v.is_empty());
        let path = |k: &str, d: &str| PathBuf::from(var(k).unwrap_or_else(|| d.to_owned()));
        Config {
            state_root: PathBuf::from(DEFAULT_STATE_ROOT),
            firecracker: var("WRENN_FIRECRACKER").map(PathBuf::from),
            jailer: path("WRENN_JAILER", DEFAULT_JAILER),
            unjailed: false,
            kernel: var("WRENN_KERNEL").map(PathBuf::from),
            rootfs: var("WRENN_ROOTFS").map(PathBuf::from),
            min_free_gib: MIN_FREE_GIB_DEFAULT,
            kvm_dev: path("WRENN_DOCTOR_KVM_DEV", "/dev/kvm"),
            uffd_dev: path("WRENN_DOCTOR_UFFD_DEV", "/dev/userfaultfd"),
            uffd_syscall: var("WRENN_DOCTOR_UFFD_SYSCALL").as_deref() != Some("0"),
            proc_root: path("WRENN_DOCTOR_PROC", "/proc"),
            cgroup_root: path("WRENN_DOCTOR_CGROUP_ROOT", "/sys/fs/cgroup"),
            nft: path("WRENN_DOCTOR_NFT", "nft"),
        }
    }
}

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but not the best way (e.g. no reflink: copies fall back to sparse copies).
    Warn,
    Fail,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One row of the report.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about a failure or warning (empty when ok).
    pub fix: String,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: String::new(),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

/// `wrenn doctor [flags]`.
pub fn run(argv: &[String]) -> Result<(), DoctorError> {
    let parsed = args::parse(argv, FLAGS).map_err(DoctorError::Args)?;
    if parsed.switch("help") {
        print!("{USAGE}");
        return Ok(());
    }
    let mut cfg = Config::from_env(|k| std::env::var(k).ok());
    if let Some(v) = parsed.value("state-root") {
        cfg.state_root = PathBuf::from(v);
    }
    let opt = |n: &str| parsed.value(n).map(PathBuf::from);
    cfg.firecracker = opt("firecracker").or(cfg.firecracker);
    cfg.kernel = opt("kernel").or(cfg.kernel);
    cfg.jailer = opt("jailer").unwrap_or(cfg.jailer);
    cfg.unjailed = parsed.switch("unjailed");
    cfg.rootfs = opt("rootfs").or(cfg.rootfs);
    cfg.kvm_dev = opt("kvm-dev").unwrap_or(cfg.kvm_dev);
    cfg.uffd_dev = opt("uffd-dev").unwrap_or(cfg.uffd_dev);
    cfg.proc_root = opt("proc").unwrap_or(cfg.proc_root);
    cfg.cgroup_root = opt("cgroup-root").unwrap_or(cfg.cgroup_root);
    cfg.nft = opt("nft").unwrap_or(cfg.nft);
    cfg.min_free_gib = parsed
        .number("min-free-gib", MIN_FREE_GIB_DEFAULT, 0, 1 << 30)
        .map_err(DoctorError::Args)?;

    let checks = run_checks(&cfg);
    let text = if parsed.switch("json") {
        render_json(&checks)
    } else {
        render_table(&checks)
    };
    io::stdout()
        .write_all(text.as_bytes())
        .map_err(DoctorError::Output)?;
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if failed > 0 {
        return Err(DoctorError::Failed { failed });
    }
    Ok(())
}

/// Runs every check, in the order of the table.
pub fn run_checks(cfg: &Config) -> Vec<Check> {
    vec![
        check_privileges(),
        check_kvm(&cfg.kvm_dev),
        check_userfaultfd(cfg),
        check_firecracker(cfg.firecracker.as_deref()),
        check_jailer(cfg),
        check_static_firecracker(cfg.firecracker.as_deref()),
        check_kernel(cfg),
        check_rootfs(cfg),
        check_forwarding(&cfg.proc_root),
        check_nft(&cfg.nft),
        check_cgroups(&cfg.cgroup_root),
        check_disk(&cfg.state_root, cfg.min_free_gib),
        check_reflink(&cfg.state_root),
    ]
}

fn check_privileges() -> Check {
    const NAME: &str = "root";
    if sys::is_root() {
        Check::ok(NAME, "running as root")
    } else {
        Check::warn(
            NAME,
            "not root: device and network checks may fail for this user only",
            "run `sudo wrenn doctor`; wrenn-agent runs as root",
        )
    }
}

fn check_kvm(dev: &Path) -> Check {
    const NAME: &str = "kvm";
    let fix_open = format!(
        "load KVM (`modprobe kvm_intel` or `modprobe kvm_amd`), enable virtualization in \
         the firmware (or nested virtualization on a cloud VM), and make sure {} exists and \
         is readable and writable by root",
        dev.display()
    );
    let kvm = match OpenOptions::new().read(true).write(true).open(dev) {
        Ok(f) => f,
        Err(e) => return Check::fail(NAME, format!("open {}: {e}", dev.display()), fix_open),
    };
    match sys::kvm_api_version(kvm.as_fd()) {
        Ok(sys::KVM_API_VERSION) => {}
        Ok(v) => {
            return Check::fail(
                NAME,
                format!("KVM API version {v}, expected {}", sys::KVM_API_VERSION),
                "use a kernel with a standard KVM",
            )
        }
        Err(e) => {
            return Check::fail(
                NAME,
                format!("{} is not KVM: KVM_GET_API_VERSION: {e}", dev.display()),
                fix_open,
            )
        }
    }
    match sys::kvm_create_vm(kvm.as_fd()) {
        Ok(_vm) => Check::ok(
            NAME,
            format!("{} opens; KVM_CREATE_VM works", dev.display()),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("KVM_CREATE_VM: {e}"),
            "KVM is present but cannot create a VM: check `dmesg` for KVM errors, free \
             memory, and that no other hypervisor holds the virtualization extensions",
        ),
    }
}

fn check_userfaultfd(cfg: &Config) -> Check {
    const NAME: &str = "userfaultfd";
    let sysctl_path = cfg.proc_root.join("sys/vm/unprivileged_userfaultfd");
    let sysctl = fs::read_to_string(&sysctl_path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cfg.uffd_dev)
        .and_then(|d| sys::uffd_from_device(d.as_fd()))
        .and_then(|u| sys::uffd_api(u.as_fd()));
    let dev_err = match device {
        Ok(_) => {
            return Check::ok(
                NAME,
                format!(
                    "{} works (vm.unprivileged_userfaultfd={sysctl})",
                    cfg.uffd_dev.display()
                ),
            )
        }
        Err(e) => format!("{}: {e}", cfg.uffd_dev.display()),
    };
    if !cfg.uffd_syscall {
        return Check::fail(
            NAME,
            format!("{dev_err}; system call not tried"),
            uffd_fix(),
        );
    }
    match sys::uffd_from_syscall().and_then(|u| sys::uffd_api(u.as_fd())) {
        Ok(_) if sys::is_root() || sysctl == "1" => Check::ok(
            NAME,
            format!("system call works (device: {dev_err}; vm.unprivileged_userfaultfd={sysctl})"),
        ),
        Ok(_) => Check::warn(
            NAME,
            format!("system call works for this user; vm.unprivileged_userfaultfd={sysctl}"),
            "Firecracker runs as root under wrenn-agent, so this is enough; for unprivileged \
             use set `sysctl -w vm.unprivileged_userfaultfd=1`",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{dev_err}; userfaultfd(2): {e} (vm.unprivileged_userfaultfd={sysctl})"),
            uffd_fix(),
        ),
    }
}

fn uffd_fix() -> String {
    "use a kernel with CONFIG_USERFAULTFD=y (Linux 6.1+ also offers /dev/userfaultfd); as \
     non-root, `sysctl -w vm.unprivileged_userfaultfd=1` or grant access to /dev/userfaultfd"
        .to_owned()
}

/// Firecracker as the agent would find it.
pub fn resolve_firecracker(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let default = PathBuf::from(DEFAULT_FIRECRACKER);
    if default.exists() {
        return default;
    }
    find_on_path("firecracker").unwrap_or(default)
}

/// `name` on `$PATH`, if an executable file of that name is there.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn check_firecracker(explicit: Option<&Path>) -> Check {
    const NAME: &str = "firecracker";
    let path = resolve_firecracker(explicit);
    let fix = format!(
        "install Firecracker's release binary (github.com/firecracker-microvm/firecracker/\
         releases) as {DEFAULT_FIRECRACKER}, or set WRENN_FIRECRACKER to its path"
    );
    if !is_executable(&path) {
        return Check::fail(
            NAME,
            format!("{}: not an executable file", path.display()),
            fix,
        );
    }
    match version_of(&path, &["--version"]) {
        Ok(out) => match out
            .lines()
            .find(|l| l.starts_with("Firecracker v"))
            .map(str::to_owned)
        {
            Some(line) => Check::ok(NAME, format!("{}: {line}", path.display())),
            None => Check::fail(
                NAME,
                format!(
                    "{} --version printed no Firecracker version: {:?}",
                    path.display(),
                    out.lines().next().unwrap_or("")
                ),
                fix,
            ),
        },
        Err(e) => Check::fail(NAME, format!("{} --version: {e}", path.display()), fix),
    }
}

/// The version word of a `--version` line (`Firecracker v1.10.1` -> `1.10.1`), from the
/// first line starting with `name v`.
fn version_word(out: &str, name: &str) -> Option<String> {
    let prefix = format!("{name} v");
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_owned)
}

/// The jailer: present, and of Firecracker's release (the two are built together; a jailer of
/// another release may pass flags Firecracker does not know). `--unjailed` fails.
fn check_jailer(cfg: &Config) -> Check {
    const NAME: &str = "jailer";
    let fix = format!(
        "install the `jailer` binary of the same Firecracker release as {DEFAULT_JAILER} (or \
         set WRENN_JAILER / --jailer), and run wrenn-agent without --unjailed"
    );
    if cfg.unjailed {
        return Check::fail(
            NAME,
            "wrenn-agent runs --unjailed: every Firecracker and wrenn-uffd runs as root, and a \
             guest that escapes into its VMM is root on this host (not for production)",
            fix,
        );
    }
    let path = &cfg.jailer;
    if !is_executable(path) {
        return Check::fail(
            NAME,
            format!("{}: not an executable file", path.display()),
            fix,
        );
    }
    let jailer = match version_of(path, &["--version"]) {
        Ok(out) => match version_word(&out, "Jailer") {
            Some(v) => v,
            None => {
                return Check::fail(
                    NAME,
                    format!("{} --version printed no Jailer version", path.display()),
                    fix,
                )
            }
        },
        Err(e) => return Check::fail(NAME, format!("{} --version: {e}", path.display()), fix),
    };
    let fc_path = resolve_firecracker(cfg.firecracker.as_deref());
    let fc = version_of(&fc_path, &["--version"])
        .ok()
        .and_then(|out| version_word(&out, "Firecracker"));
    match fc {
        Some(v) if v == jailer => Check::ok(NAME, format!("{}: v{jailer}", path.display())),
        Some(v) => Check::fail(
            NAME,
            format!(
                "{} is v{jailer} but {} is v{v}",
                path.display(),
                fc_path.display()
            ),
            fix,
        ),
        None => Check::fail(
            NAME,
            format!(
                "{}: v{jailer}, but Firecracker's version is unknown (see the firecracker row)",
                path.display()
            ),
            fix,
        ),
    }
}

/// Firecracker is a static binary: the jailer execs it inside a chroot that holds no shared
/// libraries.
fn check_static_firecracker(explicit: Option<&Path>) -> Check {
    const NAME: &str = "static firecracker";
    let path = resolve_firecracker(explicit);
    let fix = "use Firecracker's release binary (static, musl), or build it static \
               (RUSTFLAGS=\"-C target-feature=+crt-static\"; docs/operations.md, \"Production \
               hosts\")"
        .to_owned();
    let mut head = Vec::new();
    let read =
        File::open(&path).and_then(|f| f.take(ELF_HEAD_LEN_MAX as u64).read_to_end(&mut head));
    if let Err(e) = read {
        return Check::fail(NAME, format!("read {}: {e}", path.display()), fix);
    }
    match elf_is_static(&head) {
        Ok(true) => Check::ok(NAME, format!("{}: no program interpreter", path.display())),
        Ok(false) => Check::fail(
            NAME,
            format!(
                "{} is dynamically linked: the jailer cannot run it in a chroot",
                path.display()
            ),
            fix,
        ),
        Err(why) => Check::fail(NAME, format!("{}: {why}", path.display()), fix),
    }
}

/// Whether the 64-bit little-endian ELF file starting with `head` is static: it has no
/// `PT_INTERP` program header (a static-pie binary has none either). Every offset is
/// checked against `head`: bytes that are no such ELF file give an error, never a panic.
pub fn elf_is_static(head: &[u8]) -> Result<bool, &'static str> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| -> Option<u16> {
        Some(u16::from_le_bytes(
            head.get(o..o.checked_add(2)?)?.try_into().ok()?,
        ))
    };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            head.get(o..o.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            head.get(o..o.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    if head.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file");
    }
    // EI_CLASS 2 = 64-bit, EI_DATA 1 = little-endian.
    if head.get(4..6) != Some([2u8, 1].as_slice()) {
        return Err("not a 64-bit little-endian ELF file");
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err("truncated ELF header");
    };
    if phentsize < 4 {
        return Err("bad program header size");
    }
    let phoff = usize::try_from(phoff).map_err(|_| "program headers out of reach")?;
    for i in 0..usize::from(phnum) {
        let at = usize::from(phentsize)
            .checked_mul(i)
            .and_then(|o| o.checked_add(phoff))
            .ok_or("program headers out of reach")?;
        match u32_at(at) {
            Some(PT_INTERP) => return Ok(false),
            Some(_) => {}
            None => return Err("program headers out of reach"),
        }
    }
    Ok(true)
}

/// Runs `program args` and returns its standard output; fails on a non-zero exit or after
/// [`VERSION_TIMEOUT`].
fn version_of(program: &Path, args: &[&str]) -> io::Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + VERSION_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(io::ErrorKind::TimedOut, "did not exit"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        stdout.take(VERSION_OUTPUT_MAX).read_to_string(&mut out)?;
    }
    if !status.success() {
        return Err(io::Error::other(format!("exited with {status}")));
    }
    Ok(out)
}

/// The newest `vmlinux-*` (not its `.config`) in `<state-root>/kernels`.
pub fn newest_kernel(state_root: &Path) -> Option<PathBuf> {
    let dir = state_root.join("kernels");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("vmlinux-") || name.ends_with(".config") || name.contains(".tmp") {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let t = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, entry.path()));
        }
    }
    best.map(|(_, p)| p)
}

/// The base template's rootfs under `state_root`.
pub fn minimal_rootfs(state_root: &Path) -> PathBuf {
    state_root
        .join("templates")
        .join(MINIMAL_TEMPLATE)
        .join("rootfs.ext4")
}

fn read_at(path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    File::open(path)?.read_exact_at(buf, offset)
}

fn check_kernel(cfg: &Config) -> Check {
    const NAME: &str = "kernel";
    let fix = format!(
        "build one with `wrenn image kernel --state-root {}` (or set WRENN_KERNEL)",
        cfg.state_root.display()
    );
    let Some(path) = cfg
        .kernel
        .clone()
        .or_else(|| newest_kernel(&cfg.state_root))
    else {
        return Check::fail(
            NAME,
            format!(
                "no vmlinux-* in {}",
                cfg.state_root.join("kernels").display()
            ),
            fix,
        );
    };
    let mut magic = [0u8; 4];
    match read_at(&path, 0, &mut magic) {
        Ok(()) if magic == *b"\x7fELF" => Check::ok(NAME, path.display().to_string()),
        Ok(()) => Check::fail(
            NAME,
            format!("{}: not an uncompressed ELF vmlinux", path.display()),
            fix,
        ),
        Err(e) => Check::fail(NAME, format!("{}: {e}", path.display()), fix),
    }
}

fn check_rootfs(cfg: &Config) -> Check {
    const NAME: &str = "rootfs";
    let path = cfg
        .rootfs
        .clone()
        .unwrap_or_else(|| minimal_rootfs(&cfg.state_root));
    let fix = format!(
        "build it with `wrenn image rootfs --envd PATH --state-root {}` (or set WRENN_ROOTFS)",
        cfg.state_root.display()
    );
    // The ext2/3/4 superblock starts at byte 1024; its magic 0xEF53 is at offset 56.
    let mut magic = [0u8; 2];
    match read_at(&path, 1024 + 56, &mut magic) {
        Ok(()) if u16::from_le_bytes(magic) == 0xEF53 => {
            Check::ok(NAME, path.display().to_string())
        }
        Ok(()) => Check::fail(NAME, format!("{}: not an ext4 image", path.display()), fix),
        Err(e) => Check::fail(NAME, format!("{}: {e}", path.display()), fix),
    }
}

fn check_forwarding(proc_root: &Path) -> Check {
    const NAME: &str = "ip forwarding";
    let path = proc_root.join("sys/net/ipv4/ip_forward");
    let fix = "`sysctl -w net.ipv4.ip_forward=1` and keep it in /etc/sysctl.d/ (sandbox egress \
               is routed and NATed through the host)";
    match fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => Check::ok(NAME, "net.ipv4.ip_forward=1"),
        Ok(v) => Check::fail(NAME, format!("net.ipv4.ip_forward={}", v.trim()), fix),
        Err(e) => Check::fail(NAME, format!("{}: {e}", path.display()), fix),
    }
}

fn check_nft(nft: &Path) -> Check {
    const NAME: &str = "nft";
    let fix = "install nftables (`apt-get install nftables`): sandbox NAT and egress rules are \
               nft rulesets";
    let program = if nft.components().count() == 1 {
        match find_on_path(&nft.to_string_lossy()) {
            Some(p) => p,
            None => return Check::fail(NAME, format!("{} not on PATH", nft.display()), fix),
        }
    } else {
        nft.to_path_buf()
    };
    match version_of(&program, &["--version"]) {
        Ok(out) => Check::ok(
            NAME,
            format!(
                "{}: {}",
                program.display(),
                out.lines().next().unwrap_or("").trim()
            ),
        ),
        Err(e) => Check::fail(NAME, format!("{} --version: {e}", program.display()), fix),
    }
}

fn check_cgroups(root: &Path) -> Check {
    const NAME: &str = "cgroups";
    let fix = "mount cgroup v2 with the cpu and memory controllers enabled (systemd does by \
               default), or cgroup v1 `cpu` and `memory` hierarchies under /sys/fs/cgroup";
    if let Ok(list) = fs::read_to_string(root.join("cgroup.controllers")) {
        let have: Vec<&str> = list.split_whitespace().collect();
        let missing: Vec<&str> = ["cpu", "memory"]
            .into_iter()
            .filter(|c| !have.contains(c))
            .collect();
        return if missing.is_empty() {
            Check::ok(NAME, format!("v2 at {} ({})", root.display(), list.trim()))
        } else {
            Check::fail(
                NAME,
                format!("v2 at {} lacks {}", root.display(), missing.join(", ")),
                fix,
            )
        };
    }
    let v1 = |name: &str| -> Option<PathBuf> {
        // `cpu` is often a link to `cpu,cpuacct`; the hierarchy is usable when its root
        // has a tasks file.
        [
            name.to_owned(),
            format!("{name},cpuacct"),
            format!("cpuacct,{name}"),
        ]
        .into_iter()
        .map(|d| root.join(d))
        .find(|d| d.join("tasks").is_file())
    };
    match (v1("cpu"), v1("memory")) {
        (Some(c), Some(m)) => Check::ok(
            NAME,
            format!("v1 cpu={} memory={}", c.display(), m.display()),
        ),
        (c, m) => {
            let mut missing = Vec::new();
            if c.is_none() {
                missing.push("cpu");
            }
            if m.is_none() {
                missing.push("memory");
            }
            Check::fail(
                NAME,
                format!(
                    "no cgroup v2 at {} and no v1 {} hierarchy",
                    root.display(),
                    missing.join(", ")
                ),
                fix,
            )
        }
    }
}

/// `path` or its nearest existing ancestor (the state root may not exist yet).
fn existing_ancestor(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

fn check_disk(state_root: &Path, min_free_gib: u64) -> Check {
    const NAME: &str = "disk";
    let Some(at) = existing_ancestor(state_root) else {
        return Check::fail(
            NAME,
            format!("{}: no existing ancestor", state_root.display()),
            "use an absolute --state-root",
        );
    };
    match sys::fs_space(at) {
        Ok((total, avail)) => {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let detail = format!(
                "{}: {:.1} GiB free of {:.1} GiB",
                at.display(),
                gib(avail),
                gib(total)
            );
            if avail >= min_free_gib.saturating_mul(1 << 30) {
                Check::ok(NAME, detail)
            } else {
                Check::fail(
                    NAME,
                    format!("{detail}, below {min_free_gib} GiB"),
                    "free space on the state root's file system or move the state root \
                     (--state-root) to a larger one",
                )
            }
        }
        Err(e) => Check::fail(
            NAME,
            format!("statvfs {}: {e}", at.display()),
            "make the state root readable",
        ),
    }
}

fn check_reflink(state_root: &Path) -> Check {
    const NAME: &str = "reflink";
    let Some(dir) = existing_ancestor(state_root) else {
        return Check::fail(
            NAME,
            format!("{}: no existing ancestor", state_root.display()),
            "use an absolute --state-root",
        );
    };
    match try_reflink(dir) {
        Ok(()) => Check::ok(NAME, format!("{}: FICLONE works", dir.display())),
        Err(ReflinkError::Unsupported(e)) => Check::warn(
            NAME,
            format!(
                "{}: FICLONE unsupported ({e}); disk copies fall back to sparse copies",
                dir.display()
            ),
            "put the state root on XFS (mkfs.xfs -m reflink=1) or btrfs for instant, \
             space-sharing sandbox disks",
        ),
        Err(ReflinkError::Io(action, e)) => Check::fail(
            NAME,
            format!("{}: {action}: {e}", dir.display()),
            "make the state root a writable directory (wrenn-agent writes sandbox disks there)",
        ),
    }
}

enum ReflinkError {
    Unsupported(io::Error),
    Io(&'static str, io::Error),
}

/// Clones one temporary file into another in `dir`; both are removed.
fn try_reflink(dir: &Path) -> Result<(), ReflinkError> {
    let stem = format!(".wrenn-doctor-{}", std::process::id());
    let src_path = dir.join(format!("{stem}.src"));
    let dst_path = dir.join(format!("{stem}.dst"));
    let result = (|| {
        let mut src = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&src_path)
            .map_err(|e| ReflinkError::Io("create a temporary file", e))?;
        src.write_all(&[0x5a; 4096])
            .and_then(|()| src.sync_all())
            .map_err(|e| ReflinkError::Io("write a temporary file", e))?;
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&dst_path)
            .map_err(|e| ReflinkError::Io("create a temporary file", e))?;
        sys::ficlone(dst.as_fd(), src.as_fd()).map_err(|e| match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => {
                ReflinkError::Unsupported(e)
            }
            _ => ReflinkError::Io("FICLONE", e),
        })
    })();
    let _ = fs::remove_file(&src_path);
    let _ = fs::remove_file(&dst_path);
    result
}

/// The report as a table, then the fixes.
pub fn render_table(checks: &[Check]) -> String {
    let name_w = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!("{:<name_w$}  {:<6}  DETAIL\n", "CHECK", "STATUS");
    for c in checks {
        out.push_str(&format!(
            "{:<name_w$}  {:<6}  {}\n",
            c.name,
            c.status.name(),
            c.detail
        ));
    }
    let todo: Vec<&Check> = checks.iter().filter(|c| c.status != Status::Ok).collect();
    if !todo.is_empty() {
        out.push_str("\nto fix:\n");
        for c in todo {
            out.push_str(&format!("  {} ({}): {}\n", c.name, c.status.name(), c.fix));
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    out.push_str(&if failed == 0 {
        "\nthis host can run wrenn sandboxes\n".to_owned()
    } else {
        format!("\n{failed} check(s) failed\n")
    });
    out
}

/// The report as a JSON array of `{check, status, detail, fix}`.
pub fn render_json(checks: &[Check]) -> String {
    let mut out = String::from("[");
    for (i, c) in checks.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "\n  {{\"check\": {}, \"status\": {}, \"detail\": {}, \"fix\": {}}}",
            json_str(c.name),
            json_str(match c.status {
                Status::Ok => "ok",
                Status::Warn => "warn",
                Status::Fail => "fail",
            }),
            json_str(&c.detail),
            json_str(&c.fix)
        ));
    }
    out.push_str("\n]\n");
    out
}

/// A JSON string literal (RFC 8259 escaping).
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("wrenn-doctor-unit-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn json_escapes_controls_and_quotes() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    #[test]
    fn kernel_pick_ignores_configs_and_takes_the_newest() {
        let d = tmp("kernels");
        fs::create_dir_all(d.join("kernels")).unwrap();
        assert_eq!(newest_kernel(&d), None);
        fs::write(d.join("kernels/vmlinux-6.1-a"), b"\x7fELF").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        fs::write(d.join("kernels/vmlinux-6.1-b"), b"\x7fELF").unwrap();
        fs::write(d.join("kernels/vmlinux-6.1-b.config"), b"x").unwrap();
        assert_eq!(newest_kernel(&d), Some(d.join("kernels/vmlinux-6.1-b")));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn cgroup_v2_and_v1_layouts() {
        let d = tmp("cg");
        assert_eq!(check_cgroups(&d).status, Status::Fail);
        fs::create_dir_all(d.join("cpu,cpuacct")).unwrap();
        fs::write(d.join("cpu,cpuacct/tasks"), "").unwrap();
        assert_eq!(check_cgroups(&d).status, Status::Fail);
        fs::create_dir_all(d.join("memory")).unwrap();
        fs::write(d.join("memory/tasks"), "").unwrap();
        assert_eq!(check_cgroups(&d).status, Status::Ok);
        fs::write(d.join("cgroup.controllers"), "cpuset io pids\n").unwrap();
        let c = check_cgroups(&d);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("cpu, memory"), "{}", c.detail);
        fs::write(d.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        assert_eq!(check_cgroups(&d).status, Status::Ok);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rootfs_magic_is_checked() {
        let d = tmp("rootfs");
        let p = d.join("rootfs.ext4");
        let mut img = vec![0u8; 2048];
        fs::write(&p, &img).unwrap();
        let mut cfg = Config::from_env(|_| None);
        cfg.rootfs = Some(p.clone());
        assert_eq!(check_rootfs(&cfg).status, Status::Fail);
        img[1080] = 0x53;
        img[1081] = 0xEF;
        fs::write(&p, &img).unwrap();
        assert_eq!(check_rootfs(&cfg).status, Status::Ok);
        fs::remove_dir_all(&d).unwrap();
    }

    /// A minimal ELF64 head: the file header and `types` as program headers (56 bytes each).
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    #[test]
    fn static_is_no_program_interpreter() {
        // PT_LOAD, PT_DYNAMIC (a static-pie has one), PT_GNU_STACK: static.
        assert_eq!(elf_is_static(&elf(&[1, 2, 0x6474_e551])), Ok(true));
        // PT_PHDR, PT_INTERP: dynamic.
        assert_eq!(elf_is_static(&elf(&[6, 3, 1])), Ok(false));
        assert!(elf_is_static(b"#!/bin/sh\n").is_err());
        assert!(elf_is_static(b"").is_err());
        // Every truncation of a valid head is an error or an answer, never a panic; cut
        // inside the program headers it cannot be called static.
        let full = elf(&[1, 3]);
        for n in 0..full.len() {
            assert_ne!(elf_is_static(&full[..n]), Ok(true), "cut at {n}");
        }
        // Offsets and counts that point anywhere.
        let mut wild = elf(&[1]);
        wild[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(elf_is_static(&wild).is_err());
        let mut wild = elf(&[1]);
        wild[0x38..0x3a].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(elf_is_static(&wild).is_err());
        // This test's own binary (std links dynamically unless built crt-static).
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let dynamic = !cfg!(target_feature = "crt-static");
        assert_eq!(
            elf_is_static(&me[..me.len().min(ELF_HEAD_LEN_MAX)]),
            Ok(!dynamic)
        );
    }

    #[test]
    fn version_words() {
        assert_eq!(
            version_word("Firecracker v1.17.0-dev\n\nexiting", "Firecracker").as_deref(),
            Some("1.17.0-dev")
        );
        assert_eq!(
            version_word("Jailer v1.10.1\n", "Jailer").as_deref(),
            Some("1.10.1")
        );
        assert_eq!(version_word("jailer 1.0", "Jailer"), None);
    }

    #[test]
    fn every_failure_has_a_fix() {
        let mut cfg = Config::from_env(|_| None);
        cfg.kvm_dev = "/nonexistent/kvm".into();
        cfg.uffd_dev = "/nonexistent/uffd".into();
        cfg.uffd_syscall = false;
        cfg.proc_root = "/nonexistent".into();
        cfg.cgroup_root = "/nonexistent".into();
        cfg.nft = "/nonexistent/nft".into();
        cfg.firecracker = Some("/nonexistent/fc".into());
        cfg.jailer = "/nonexistent/jailer".into();
        cfg.state_root = "/nonexistent/state".into();
        cfg.min_free_gib = u64::MAX >> 31;
        for c in run_checks(&cfg) {
            if c.status != Status::Ok {
                assert!(!c.fix.is_empty(), "{} has no fix", c.name);
            }
        }
    }
}
