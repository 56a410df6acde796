//! Firecracker under Firecracker's own jailer (its `docs/jailer.md` and
//! `docs/prod-host-setup.md`): an unprivileged uid and gid per running sandbox, a chroot, a new
//! PID namespace, the slot's network namespace, cgroup limits and resource limits.
//!
//! - [`JailSpec::args`] builds the jailer's command line;
//! - [`prepare_chroot`] fills `<chroot base>/<exec file name>/<id>/root` with what one VM needs
//!   and nothing else, before the jailer runs: shared files (kernel) linked in root-owned and
//!   read-only, private copies (VM state, a File-backend memory file) owned by the jailed uid
//!   and read-only, the sandbox's own disk hard-linked and chowned to the jailed uid, and
//!   writable directories (where a pause writes its files) owned by the jailed uid;
//! - [`crate::process::VmProcess::spawn_jailed`] runs the jailer, finds the jailed
//!   Firecracker's host pid in the jailer's pid file and holds it by pidfd;
//! - [`remove_chroot`] removes the chroot (the kill does it with the cgroup directories).
//!
//! Paths inside the chroot are the ones VM state files already record: the root disk at
//! [`crate::process::STABLE_DISK_PATH`] as before, so a snapshot taken by an unjailed
//! Firecracker restores jailed and the other way round. Everything else Firecracker is told
//! (kernel, sockets, snapshot files) is given per call, so it may live anywhere in the chroot.
//!
//! Everything under the chroot is under the jailed uid's control once Firecracker runs: the
//! agent reads what it wrote only with [`open_beneath`] (no symlink, no `..`), and changes
//! ownership there only with `lchown`.

use std::ffi::{CString, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::cgroup::CgroupMode;
use crate::limits::{
    CGROUP_CPU_PERIOD_US, JAIL_NO_FILE, JAIL_PIDS_BASE, JAIL_PIDS_PER_VCPU,
    VMM_MEMORY_OVERHEAD_BYTES,
};
use crate::sys;

/// Paths as a jailed Firecracker sees them.
pub const JAIL_API_SOCKET: &str = "/run/api.sock";
pub const JAIL_VSOCK_SOCKET: &str = "/run/vsock.sock";
pub const JAIL_UFFD_SOCKET: &str = "/run/uffd.sock";
pub const JAIL_KERNEL: &str = "/kernel/vmlinux";
/// Directory owned by the jailed uid where a pause writes its memory and VM state files.
pub const JAIL_SNAPSHOT_DIR: &str = "/snapshot";
/// The VM state loaded by a restore (a private copy).
pub const JAIL_VMSTATE: &str = "/restore/vmstate";
/// The memory file of a File-backend restore (a private copy).
pub const JAIL_MEMORY: &str = "/restore/memory";
/// The jailer writes the jailed process's host pid to `<chroot>/<exec file name>` + this.
pub const PID_FILE_SUFFIX: &str = ".pid";

/// How the host's cgroups are laid out, for the jailer's `--cgroup-version` and the
/// directories it creates (removed after the VM is gone: the jailer leaves them behind).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JailCgroups {
    /// The unified hierarchy.
    V2 { root: PathBuf },
    /// v1 hierarchies: `pids` where it is mounted (no pid limit otherwise).
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        pids: Option<PathBuf>,
    },
}

impl JailCgroups {
    /// From the agent's cgroup detection plus, on v1, the `pids` hierarchy of `mountinfo`.
    pub fn from_mode(mode: &CgroupMode, mountinfo: &str) -> JailCgroups {
        match mode {
            CgroupMode::V2 { root } => JailCgroups::V2 { root: root.clone() },
            CgroupMode::V1 { memory, cpu } => JailCgroups::V1 {
                cpu: cpu.clone(),
                memory: memory.clone(),
                pids: crate::cgroup::v1_mount_from(mountinfo, "pids"),
            },
        }
    }

    /// This host's.
    pub fn detect() -> Result<JailCgroups, crate::cgroup::CgroupError> {
        let mode = crate::cgroup::detect()?;
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Ok(JailCgroups::from_mode(&mode, &info))
    }

    fn version(&self) -> &'static str {
        match self {
            JailCgroups::V2 { .. } => "2",
            JailCgroups::V1 { .. } => "1",
        }
    }
}

/// Limits of one jailed Firecracker, all derived from the VM's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JailLimits {
    pub vcpus: u32,
    /// Guest memory plus [`VMM_MEMORY_OVERHEAD_BYTES`].
    pub memory_max_bytes: u64,
    pub pids_max: u32,
    /// `RLIMIT_NOFILE`.
    pub no_file: u64,
    /// `RLIMIT_FSIZE`: at least the larger of guest memory (a pause writes a memory file of
    /// that size) and the disk, or a pause or a guest write dies with SIGXFSZ.
    pub fsize_bytes: u64,
}

impl JailLimits {
    pub fn for_vm(vcpus: u32, memory_bytes: u64, disk_bytes: u64) -> JailLimits {
        let vcpus = vcpus.max(1);
        JailLimits {
            vcpus,
            memory_max_bytes: memory_bytes.saturating_add(VMM_MEMORY_OVERHEAD_BYTES),
            pids_max: JAIL_PIDS_BASE + JAIL_PIDS_PER_VCPU * vcpus,
            no_file: JAIL_NO_FILE,
            fsize_bytes: memory_bytes.max(disk_bytes),
        }
    }

    /// `--cgroup` values for this cgroup version (controller files of `docs/jailer.md`).
    fn cgroup_files(&self, cg: &JailCgroups) -> Vec<String> {
        let quota = u64::from(self.vcpus) * CGROUP_CPU_PERIOD_US;
        match cg {
            JailCgroups::V2 { .. } => vec![
                format!("cpu.max={quota} {CGROUP_CPU_PERIOD_US}"),
                format!("memory.max={}", self.memory_max_bytes),
                format!("pids.max={}", self.pids_max),
            ],
            JailCgroups::V1 { pids, .. } => {
                let mut v = vec![
                    format!("cpu.cfs_period_us={CGROUP_CPU_PERIOD_US}"),
                    format!("cpu.cfs_quota_us={quota}"),
                    format!("memory.limit_in_bytes={}", self.memory_max_bytes),
                ];
                if pids.is_some() {
                    v.push(format!("pids.max={}", self.pids_max));
                }
                v
            }
        }
    }
}

/// How to start one Firecracker under the jailer.
#[derive(Clone, Debug)]
pub struct JailSpec {
    pub jailer: PathBuf,
    /// The static `firecracker` binary (the jailer copies it into the chroot).
    pub firecracker: PathBuf,
    /// `--id` (1–64 of `[A-Za-z0-9-]`): the sandbox id.
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    /// On the same filesystem as the sandbox directories, so disks hard-link in.
    pub chroot_base: PathBuf,
    /// Named network namespace (`/run/netns/NAME`).
    pub netns: Option<String>,
    /// `None`: no cgroup (a host without usable cgroups).
    pub cgroups: Option<JailCgroups>,
    /// `--parent-cgroup`.
    pub cgroup_parent: String,
    pub limits: JailLimits,
    /// Firecracker's own arguments after `--` (besides `--api-sock`, which is always
    /// [`JAIL_API_SOCKET`]).
    pub firecracker_args: Vec<String>,
}

#[derive(Debug)]
pub enum JailError {
    InvalidConfig(String),
    Prepare { path: PathBuf, source: io::Error },
    Remove { path: PathBuf, source: io::Error },
}

impl fmt::Display for JailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JailError::InvalidConfig(s) => write!(f, "invalid jail config: {s}"),
            JailError::Prepare { path, .. } => {
                write!(f, "prepare {} in the chroot", path.display())
            }
            JailError::Remove { path, .. } => write!(f, "remove chroot {}", path.display()),
        }
    }
}

impl std::error::Error for JailError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            JailError::Prepare { source, .. } | JailError::Remove { source, .. } => Some(source),
            JailError::InvalidConfig(_) => None,
        }
    }
}

/// The jailer's `<exec_file_name>`: the binary's file name.
pub fn exec_file_name(firecracker: &Path) -> Result<String, JailError> {
    firecracker
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            JailError::InvalidConfig(format!("firecracker path {}", firecracker.display()))
        })
}

/// `<chroot base>/<exec file name>/<id>`: everything the jailer makes for one VM.
pub fn instance_dir(
    chroot_base: &Path,
    firecracker: &Path,
    id: &str,
) -> Result<PathBuf, JailError> {
    Ok(chroot_base.join(exec_file_name(firecracker)?).join(id))
}

/// `<instance dir>/root`: what the jailed Firecracker sees as `/`.
pub fn chroot_dir(chroot_base: &Path, firecracker: &Path, id: &str) -> Result<PathBuf, JailError> {
    Ok(instance_dir(chroot_base, firecracker, id)?.join("root"))
}

/// The host path of `inside` (an absolute path as the jailed Firecracker sees it).
pub fn host_path(chroot: &Path, inside: &Path) -> PathBuf {
    chroot.join(inside.strip_prefix("/").unwrap_or(inside))
}

impl JailSpec {
    pub fn instance_dir(&self) -> Result<PathBuf, JailError> {
        instance_dir(&self.chroot_base, &self.firecracker, &self.id)
    }

    pub fn chroot_dir(&self) -> Result<PathBuf, JailError> {
        chroot_dir(&self.chroot_base, &self.firecracker, &self.id)
    }

    /// The cgroup directories the jailer creates (`<controller root>/<parent>/<id>`).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let sub = |root: &Path| root.join(&self.cgroup_parent).join(&self.id);
        match &self.cgroups {
            None => Vec::new(),
            Some(JailCgroups::V2 { root }) => vec![sub(root)],
            Some(JailCgroups::V1 { cpu, memory, pids }) => {
                let mut dirs: Vec<PathBuf> = Vec::new();
                for r in [Some(cpu), Some(memory), pids.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    let d = sub(r);
                    if !dirs.contains(&d) {
                        dirs.push(d);
                    }
                }
                dirs
            }
        }
    }

    fn check(&self) -> Result<(), JailError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !id_ok {
            return Err(JailError::InvalidConfig(format!("id {:?}", self.id)));
        }
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::InvalidConfig("uid and gid must not be 0".into()));
        }
        let parent_ok = !self.cgroup_parent.is_empty()
            && Path::new(&self.cgroup_parent)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !parent_ok {
            return Err(JailError::InvalidConfig(format!(
                "cgroup parent {:?}",
                self.cgroup_parent
            )));
        }
        if !self.chroot_base.is_absolute() {
            return Err(JailError::InvalidConfig(format!(
                "chroot base {} is not absolute",
                self.chroot_base.display()
            )));
        }
        exec_file_name(&self.firecracker).map(drop)
    }

    /// The jailer's arguments (without the program). Never `--daemonize`: it would send the
    /// serial console and Firecracker's own messages to /dev/null; the spawner makes the
    /// jailer a session leader itself and keeps stdout and stderr on `firecracker.log`.
    /// Never `--no-seccomp` either: Firecracker's built-in filters stay on.
    pub fn args(&self) -> Result<Vec<OsString>, JailError> {
        self.check()?;
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            a.push(k.into());
            a.push(v);
        };
        push("--id", self.id.clone().into());
        push("--exec-file", self.firecracker.clone().into());
        push("--uid", self.uid.to_string().into());
        push("--gid", self.gid.to_string().into());
        push("--chroot-base-dir", self.chroot_base.clone().into());
        if let Some(ns) = &self.netns {
            if ns.is_empty() || ns.contains('/') {
                return Err(JailError::InvalidConfig(format!("netns {ns:?}")));
            }
            push("--netns", format!("/run/netns/{ns}").into());
        }
        if let Some(cg) = &self.cgroups {
            push("--cgroup-version", cg.version().into());
            push("--parent-cgroup", self.cgroup_parent.clone().into());
            for f in self.limits.cgroup_files(cg) {
                push("--cgroup", f.into());
            }
        }
        push(
            "--resource-limit",
            format!("no-file={}", self.limits.no_file).into(),
        );
        push(
            "--resource-limit",
            format!("fsize={}", self.limits.fsize_bytes).into(),
        );
        a.push("--new-pid-ns".into());
        a.push("--".into());
        a.push("--api-sock".into());
        a.push(JAIL_API_SOCKET.into());
        a.extend(self.firecracker_args.iter().map(OsString::from));
        Ok(a)
    }
}

/// How a file is put into a chroot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Shared between sandboxes (a kernel): hard-linked when the file is root-owned, readable
    /// by all and writable by no one else; otherwise (or across filesystems) copied as root,
    /// mode 0444. Never writable by any jailed uid.
    Shared,
    /// A copy for this VM only (VM state, a materialized memory file), owned by the jailed uid,
    /// mode 0400. The original is never reachable from the chroot.
    Private,
    /// The sandbox's own file that Firecracker writes (its root disk): hard-linked, the inode
    /// chowned to the jailed uid, mode 0600. [`release_owned`] gives it back to root when the
    /// VM stops. Must be on the chroot's filesystem.
    Owned,
    /// An empty directory owned by the jailed uid, mode 0700 (where a pause writes).
    WritableDir,
}

/// One entry of a chroot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChrootEntry {
    /// Absolute path as the jailed Firecracker sees it.
    pub inside: PathBuf,
    /// The host file (unused for [`Access::WritableDir`]).
    pub host: PathBuf,
    pub access: Access,
}

impl ChrootEntry {
    pub fn new(inside: &str, host: impl Into<PathBuf>, access: Access) -> ChrootEntry {
        ChrootEntry {
            inside: inside.into(),
            host: host.into(),
            access,
        }
    }
}

fn prep(path: &Path) -> impl FnOnce(io::Error) -> JailError + '_ {
    move |source| JailError::Prepare {
        path: path.to_owned(),
        source,
    }
}

/// Removes an instance directory (`<base>/<exec>/<id>`) and all in it; missing is fine.
/// `remove_dir_all` never follows symlinks, so nothing the jailed uid planted leads outside.
pub fn remove_chroot(instance: &Path) -> Result<(), JailError> {
    match fs::remove_dir_all(instance) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(JailError::Remove {
            path: instance.to_owned(),
            source,
        }),
    }
}

/// True if `m` may be hard-linked into a chroot as a shared file.
fn linkable_shared(m: &fs::Metadata) -> bool {
    m.is_file() && m.uid() == 0 && m.mode() & 0o022 == 0 && m.mode() & 0o004 != 0
}

fn copy_file(src: &Path, dst: &Path) -> Result<(), JailError> {
    crate::disk::clone_disk(src, dst)
        .map(drop)
        .map_err(|e| JailError::Prepare {
            path: dst.to_owned(),
            source: io::Error::other(e.to_string()),
        })
}

/// Builds `chroot` (an instance's `root`) from scratch: whatever an earlier run left in its
/// instance directory goes first (a crashed agent may have left a chroot the old uid still
/// owns). Parent directories are root-owned, mode 0755; the jailer then makes `/`, `/dev`
/// and `/run` its uid's (mode 0700) and the device nodes.
pub fn prepare_chroot(
    chroot: &Path,
    entries: &[ChrootEntry],
    uid: u32,
    gid: u32,
) -> Result<(), JailError> {
    if let Some(instance) = chroot.parent() {
        remove_chroot(instance)?;
    }
    fs::create_dir_all(chroot).map_err(prep(chroot))?;
    for e in entries {
        let rel_ok = e.inside.is_absolute()
            && e.inside
                .components()
                .skip(1)
                .all(|c| matches!(c, Component::Normal(_)))
            && e.inside.components().count() > 1;
        if !rel_ok {
            return Err(JailError::InvalidConfig(format!(
                "chroot path {}",
                e.inside.display()
            )));
        }
        let dst = host_path(chroot, &e.inside);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(prep(parent))?;
        }
        match e.access {
            Access::WritableDir => {
                fs::create_dir(&dst).map_err(prep(&dst))?;
                std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).map_err(prep(&dst))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o700)).map_err(prep(&dst))?;
            }
            Access::Shared => {
                let m = fs::metadata(&e.host).map_err(prep(&e.host))?;
                let linked = linkable_shared(&m) && fs::hard_link(&e.host, &dst).is_ok();
                if !linked {
                    // The copy belongs to its creator: the agent, root.
                    copy_file(&e.host, &dst)?;
                    fs::set_permissions(&dst, fs::Permissions::from_mode(0o444))
                        .map_err(prep(&dst))?;
                }
            }
            Access::Private => {
                copy_file(&e.host, &dst)?;
                std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).map_err(prep(&dst))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o400)).map_err(prep(&dst))?;
            }
            Access::Owned => {
                fs::hard_link(&e.host, &dst).map_err(prep(&dst))?;
                std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).map_err(prep(&dst))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o600)).map_err(prep(&dst))?;
            }
        }
    }
    Ok(())
}

/// Gives a file a jailed Firecracker owned (a disk linked with [`Access::Owned`]) back to
/// root, mode 0600, once its Firecracker is gone: the uid is reused by the next sandbox. Takes
/// the agent's own path of the file (never the chroot's). Missing is fine.
pub fn release_owned(host: &Path) -> Result<(), JailError> {
    match std::os::unix::fs::lchown(host, Some(0), Some(0)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(JailError::Prepare {
                path: host.to_owned(),
                source,
            })
        }
    }
    fs::set_permissions(host, fs::Permissions::from_mode(0o600)).map_err(prep(host))
}

/// Opens a regular file a jailed Firecracker wrote, `inside` its chroot, for reading: no
/// symlink on the way and nothing outside the chroot, whatever the jailed uid did to the
/// names (see [`sys::open_beneath`]).
pub fn open_beneath(chroot: &Path, inside: &Path) -> Result<File, JailError> {
    let dir = File::open(chroot).map_err(prep(chroot))?;
    let rel = inside.strip_prefix("/").unwrap_or(inside);
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| JailError::InvalidConfig(format!("path {}", inside.display())))?;
    let fd = sys::open_beneath(dir.as_fd(), &c).map_err(prep(inside))?;
    let f = File::from(fd);
    let m = f.metadata().map_err(prep(inside))?;
    if !m.is_file() {
        return Err(JailError::Prepare {
            path: inside.to_owned(),
            source: io::Error::other("not a regular file"),
        });
    }
    Ok(f)
}

/// Makes a socket the agent created inside a chroot connectable by the jailed uid (connect
/// needs write permission on the socket), without following a symlink.
pub fn give_socket(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(prep(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cgroups: Option<JailCgroups>) -> JailSpec {
        JailSpec {
            jailer: "/usr/local/bin/jailer".into(),
            firecracker: "/usr/local/bin/firecracker".into(),
            id: "0b6c2a52-3f5e-4f3a-9a51-000000000001".into(),
            uid: 900_001,
            gid: 900_001,
            chroot_base: "/var/lib/wrenn/jail".into(),
            netns: Some("wrenn-3".into()),
            cgroups,
            cgroup_parent: "wrenn".into(),
            limits: JailLimits::for_vm(2, 256 << 20, 1 << 30),
            firecracker_args: vec!["--level".into(), "Info".into()],
        }
    }

    fn joined(a: &[OsString]) -> String {
        a.iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_cgroup_v1() {
        let s = spec(Some(JailCgroups::V1 {
            cpu: "/sys/fs/cgroup/cpu".into(),
            memory: "/sys/fs/cgroup/memory".into(),
            pids: Some("/sys/fs/cgroup/pids".into()),
        }));
        let mem = (256u64 << 20) + VMM_MEMORY_OVERHEAD_BYTES;
        assert_eq!(
            joined(&s.args().unwrap()),
            format!(
                "--id 0b6c2a52-3f5e-4f3a-9a51-000000000001 --exec-file /usr/local/bin/firecracker \
                 --uid 900001 --gid 900001 --chroot-base-dir /var/lib/wrenn/jail \
                 --netns /run/netns/wrenn-3 --cgroup-version 1 --parent-cgroup wrenn \
                 --cgroup cpu.cfs_period_us=100000 --cgroup cpu.cfs_quota_us=200000 \
                 --cgroup memory.limit_in_bytes={mem} --cgroup pids.max={} \
                 --resource-limit no-file={JAIL_NO_FILE} --resource-limit fsize={} \
                 --new-pid-ns -- --api-sock /run/api.sock --level Info",
                JAIL_PIDS_BASE + 2 * JAIL_PIDS_PER_VCPU,
                1u64 << 30,
            )
        );
        let id = "0b6c2a52-3f5e-4f3a-9a51-000000000001";
        assert_eq!(
            s.cgroup_dirs(),
            vec![
                PathBuf::from(format!("/sys/fs/cgroup/cpu/wrenn/{id}")),
                PathBuf::from(format!("/sys/fs/cgroup/memory/wrenn/{id}")),
                PathBuf::from(format!("/sys/fs/cgroup/pids/wrenn/{id}")),
            ]
        );
        assert_eq!(
            s.chroot_dir().unwrap(),
            PathBuf::from(format!("/var/lib/wrenn/jail/firecracker/{id}/root"))
        );
        // Without a pids hierarchy there is no pid limit (the jailer would fail on it).
        let no_pids = spec(Some(JailCgroups::V1 {
            cpu: "/c".into(),
            memory: "/m".into(),
            pids: None,
        }));
        assert!(!joined(&no_pids.args().unwrap()).contains("pids.max"));
        assert_eq!(no_pids.cgroup_dirs().len(), 2);
    }

    #[test]
    fn command_line_cgroup_v2() {
        let s = spec(Some(JailCgroups::V2 {
            root: "/sys/fs/cgroup".into(),
        }));
        let a = s.args().unwrap();
        let text = joined(&a);
        assert!(
            text.contains("--cgroup-version 2 --parent-cgroup wrenn"),
            "{text}"
        );
        // cpu.max is one argument with a space in it.
        assert!(a.contains(&OsString::from("cpu.max=200000 100000")));
        assert!(text.contains(&format!(
            "--cgroup memory.max={}",
            (256u64 << 20) + VMM_MEMORY_OVERHEAD_BYTES
        )));
        assert!(text.contains("--cgroup pids.max="));
        assert!(!text.contains("--daemonize") && !text.contains("--no-seccomp"));
        assert_eq!(s.cgroup_dirs().len(), 1);
        // fsize covers the larger of memory and disk: here memory.
        let big_mem = JailLimits::for_vm(1, 4 << 30, 1 << 30);
        assert_eq!(big_mem.fsize_bytes, 4 << 30);
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec(None);
        s.uid = 0;
        assert!(s.args().is_err());
        let mut s = spec(None);
        s.id = "a/b".into();
        assert!(s.args().is_err());
        let mut s = spec(None);
        s.cgroup_parent = "../x".into();
        assert!(s.args().is_err());
        let mut s = spec(None);
        s.netns = Some("../../etc".into());
        assert!(s.args().is_err());
        let s = spec(None);
        assert!(!joined(&s.args().unwrap()).contains("--cgroup"));
    }

    fn me() -> (u32, u32) {
        let m = fs::metadata("/proc/self").unwrap();
        (m.uid(), m.gid())
    }

    #[test]
    fn chroot_layout_per_lifecycle_step() {
        let base = std::env::temp_dir().join(format!("vmm-glue-jail-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let sb = base.join("sandbox");
        fs::create_dir_all(sb.join("snapshot")).unwrap();
        let kernel = base.join("vmlinux");
        fs::write(&kernel, b"kernel").unwrap();
        fs::set_permissions(&kernel, fs::Permissions::from_mode(0o644)).unwrap();
        let disk = sb.join("rootfs.ext4");
        fs::write(&disk, b"disk").unwrap();
        let vmstate = sb.join("snapshot/vmstate");
        fs::write(&vmstate, b"state").unwrap();
        fs::set_permissions(&vmstate, fs::Permissions::from_mode(0o600)).unwrap();
        let chroot = chroot_dir(&base.join("jail"), Path::new("/x/firecracker"), "sb-1").unwrap();
        // As root the jailed uid is a real one; otherwise only our own uid can be given away.
        let (uid, gid) = if me().0 == 0 {
            (900_123, 900_123)
        } else {
            me()
        };

        let cold = [
            ChrootEntry::new(JAIL_KERNEL, &kernel, Access::Shared),
            ChrootEntry::new(crate::process::STABLE_DISK_PATH, &disk, Access::Owned),
            ChrootEntry::new(JAIL_SNAPSHOT_DIR, "", Access::WritableDir),
        ];
        prepare_chroot(&chroot, &cold, uid, gid).unwrap();
        let k = fs::metadata(host_path(&chroot, Path::new(JAIL_KERNEL))).unwrap();
        if me().0 == 0 {
            // Root-owned, 0644: linked, the same inode, still root's and read-only to others.
            assert_eq!(k.ino(), fs::metadata(&kernel).unwrap().ino());
            assert_eq!(k.uid(), 0);
        }
        assert_eq!(k.mode() & 0o022, 0, "shared file writable by others");
        let d = fs::metadata(host_path(
            &chroot,
            Path::new(crate::process::STABLE_DISK_PATH),
        ))
        .unwrap();
        assert_eq!(
            d.ino(),
            fs::metadata(&disk).unwrap().ino(),
            "disk is hard-linked"
        );
        assert_eq!((d.uid(), d.gid(), d.mode() & 0o777), (uid, gid, 0o600));
        let s = fs::metadata(host_path(&chroot, Path::new(JAIL_SNAPSHOT_DIR))).unwrap();
        assert!(s.is_dir());
        assert_eq!((s.uid(), s.mode() & 0o777), (uid, 0o700));
        // Nothing else is in the chroot: the three entries and their parents.
        let mut names: Vec<_> = fs::read_dir(&chroot)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["kernel", "run", "snapshot"]);

        // Restore from a template or from the sandbox's own chain: the VM state is a private
        // copy (the chain's file is root's, 0600, and stays so), the disk linked as before.
        let restore = [
            ChrootEntry::new(JAIL_KERNEL, &kernel, Access::Shared),
            ChrootEntry::new(crate::process::STABLE_DISK_PATH, &disk, Access::Owned),
            ChrootEntry::new(JAIL_VMSTATE, &vmstate, Access::Private),
            ChrootEntry::new(JAIL_SNAPSHOT_DIR, "", Access::WritableDir),
        ];
        // A leftover of the earlier run (a file the old uid planted) is gone after prepare.
        fs::write(chroot.join("planted"), b"x").unwrap();
        prepare_chroot(&chroot, &restore, uid, gid).unwrap();
        assert!(!chroot.join("planted").exists());
        let v = fs::metadata(host_path(&chroot, Path::new(JAIL_VMSTATE))).unwrap();
        assert_ne!(v.ino(), fs::metadata(&vmstate).unwrap().ino(), "a copy");
        assert_eq!((v.uid(), v.mode() & 0o777), (uid, 0o400));
        assert_eq!(fs::metadata(&vmstate).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            fs::read(host_path(&chroot, Path::new(JAIL_VMSTATE))).unwrap(),
            b"state"
        );

        // What Firecracker wrote is read without following a symlink it planted.
        let snap = host_path(&chroot, Path::new(JAIL_SNAPSHOT_DIR));
        fs::write(snap.join("vmstate.new"), b"new").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", snap.join("memory.snap")).unwrap();
        let f = open_beneath(&chroot, Path::new("/snapshot/vmstate.new")).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 3);
        assert!(open_beneath(&chroot, Path::new("/snapshot/memory.snap")).is_err());
        assert!(open_beneath(&chroot, Path::new("/../sandbox/rootfs.ext4")).is_err());
        fs::remove_file(snap.join("memory.snap")).unwrap();
        std::os::unix::fs::symlink("/etc", chroot.join("etc")).unwrap();
        assert!(open_beneath(&chroot, Path::new("/etc/passwd")).is_err());

        // Cleanup: the disk goes back to root, the chroot goes, the sandbox's files stay.
        release_owned(&disk).unwrap();
        let d = fs::metadata(&disk).unwrap();
        if me().0 == 0 {
            assert_eq!((d.uid(), d.gid()), (0, 0));
        }
        assert_eq!(d.mode() & 0o777, 0o600);
        remove_chroot(chroot.parent().unwrap()).unwrap();
        assert!(!chroot.parent().unwrap().exists());
        assert_eq!(fs::read(&disk).unwrap(), b"disk");
        assert_eq!(fs::read(&kernel).unwrap(), b"kernel");
        remove_chroot(chroot.parent().unwrap()).unwrap();
        assert!(prepare_chroot(
            &chroot,
            &[ChrootEntry::new("/../x", &disk, Access::Owned)],
            uid,
            gid
        )
        .is_err());
        fs::remove_dir_all(&base).unwrap();
    }
}
