//! Per-sandbox cgroups: cgroup v2 where it is mounted with the `memory` and `cpu` controllers
//! available, else the v1 `memory` and `cpu` hierarchies (hybrid hosts, as these machines).
//!
//! A sandbox's cgroup is `<hierarchy root>/<parent>/<name>`. Processes join it by writing to
//! its `cgroup.procs` (the spawner opens those files before fork and the child writes `0`,
//! meaning itself, so Firecracker is charged from its first allocation).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which cgroup layout a host has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupMode {
    /// Unified hierarchy at this mount point, with memory and cpu available.
    V2 { root: PathBuf },
    /// Legacy hierarchies of the memory and cpu controllers.
    V1 { memory: PathBuf, cpu: PathBuf },
}

/// Resource limits of one sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory limit for Firecracker (guest memory plus its own overhead).
    pub memory_max_bytes: Option<u64>,
    /// CPU bandwidth in thousandths of a CPU (1000 = one full CPU).
    pub cpu_millis: Option<u32>,
}

use crate::limits::CGROUP_CPU_PERIOD_US as CPU_PERIOD_US;

#[derive(Debug)]
pub enum CgroupError {
    /// Neither a usable v2 nor v1 memory+cpu hierarchy.
    NoHierarchy,
    ReadMountinfo(io::Error),
    /// A name that is not one path component of `[A-Za-z0-9_.-]`.
    InvalidName(String),
    Create {
        path: PathBuf,
        source: io::Error,
    },
    Write {
        path: PathBuf,
        source: io::Error,
    },
    Remove {
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for CgroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupError::NoHierarchy => write!(
                f,
                "no cgroup v2 with memory and cpu controllers and no v1 memory and cpu hierarchies"
            ),
            CgroupError::ReadMountinfo(_) => write!(f, "read /proc/self/mountinfo"),
            CgroupError::InvalidName(n) => write!(f, "invalid cgroup name {n:?}"),
            CgroupError::Create { path, .. } => write!(f, "create cgroup {}", path.display()),
            CgroupError::Write { path, .. } => write!(f, "write {}", path.display()),
            CgroupError::Remove { path, .. } => write!(f, "remove cgroup {}", path.display()),
        }
    }
}

impl std::error::Error for CgroupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CgroupError::ReadMountinfo(e)
            | CgroupError::Create { source: e, .. }
            | CgroupError::Write { source: e, .. }
            | CgroupError::Remove { source: e, .. } => Some(e),
            _ => None,
        }
    }
}

/// Undoes the octal escapes (`\040` for space) of a mountinfo path.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Picks the layout from the text of /proc/self/mountinfo; `controllers` reads a v2
/// mount's `cgroup.controllers`.
/// The mount point of the v1 hierarchy that has `controller` (e.g. `pids`), from
/// /proc/self/mountinfo text.
pub fn v1_mount_from(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mnt = pre.split(' ').nth(4)?;
        let mut post = post.split(' ');
        let fstype = post.next()?;
        let _source = post.next();
        let opts = post.next().unwrap_or("");
        (fstype == "cgroup" && opts.split(',').any(|x| x == controller))
            .then(|| PathBuf::from(unescape(mnt)))
    })
}

pub fn detect_from(
    mountinfo: &str,
    controllers: impl Fn(&Path) -> Option<String>,
) -> Option<CgroupMode> {
    let mut v2 = None;
    let (mut memory, mut cpu) = (None, None);
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mnt) = pre.split(' ').nth(4) else {
            continue;
        };
        let mut post = post.split(' ');
        let fstype = post.next().unwrap_or("");
        let _source = post.next();
        let opts = post.next().unwrap_or("");
        let mnt = PathBuf::from(unescape(mnt));
        match fstype {
            "cgroup2" if v2.is_none() => {
                let c = controllers(&mnt).unwrap_or_default();
                let has = |name: &str| c.split_ascii_whitespace().any(|x| x == name);
                if has("memory") && has("cpu") {
                    v2 = Some(mnt);
                }
            }
            "cgroup" => {
                let has = |name: &str| opts.split(',').any(|x| x == name);
                if has("memory") && memory.is_none() {
                    memory = Some(mnt.clone());
                }
                if has("cpu") && cpu.is_none() {
                    cpu = Some(mnt);
                }
            }
            _ => {}
        }
    }
    if let Some(root) = v2 {
        return Some(CgroupMode::V2 { root });
    }
    match (memory, cpu) {
        (Some(memory), Some(cpu)) => Some(CgroupMode::V1 { memory, cpu }),
        _ => None,
    }
}

/// The layout of this host.
pub fn detect() -> Result<CgroupMode, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::ReadMountinfo)?;
    detect_from(&info, |p| {
        fs::read_to_string(p.join("cgroup.controllers")).ok()
    })
    .ok_or(CgroupError::NoHierarchy)
}

fn check_name(n: &str) -> Result<(), CgroupError> {
    let ok = !n.is_empty()
        && n.len() <= 128
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(n.to_owned()))
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// One sandbox's cgroup (one directory in v2, one per hierarchy in v1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates (or reuses) `<parent>/<name>` and applies `limits`.
    pub fn create(
        mode: &CgroupMode,
        parent: &str,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Cgroup, CgroupError> {
        check_name(parent)?;
        check_name(name)?;
        match mode {
            CgroupMode::V2 { root } => {
                // Controllers must be enabled in every ancestor's subtree_control.
                write_file(&root.join("cgroup.subtree_control"), "+memory +cpu")?;
                let p = root.join(parent);
                mkdir(&p)?;
                write_file(&p.join("cgroup.subtree_control"), "+memory +cpu")?;
                let dir = p.join(name);
                mkdir(&dir)?;
                let cg = Cgroup { dirs: vec![dir] };
                if let Some(m) = limits.memory_max_bytes {
                    write_file(&cg.dirs[0].join("memory.max"), &m.to_string())?;
                    write_file(&cg.dirs[0].join("memory.swap.max"), "0").or_else(ignore_absent)?;
                }
                if let Some(c) = limits.cpu_millis {
                    let quota = u64::from(c) * CPU_PERIOD_US / 1000;
                    write_file(
                        &cg.dirs[0].join("cpu.max"),
                        &format!("{quota} {CPU_PERIOD_US}"),
                    )?;
                }
                Ok(cg)
            }
            CgroupMode::V1 { memory, cpu } => {
                let mut dirs = Vec::with_capacity(2);
                for root in [memory, cpu] {
                    let p = root.join(parent);
                    mkdir(&p)?;
                    let dir = p.join(name);
                    mkdir(&dir)?;
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
                let mem_dir = memory.join(parent).join(name);
                let cpu_dir = cpu.join(parent).join(name);
                if let Some(m) = limits.memory_max_bytes {
                    write_file(&mem_dir.join("memory.limit_in_bytes"), &m.to_string())?;
                }
                if let Some(c) = limits.cpu_millis {
                    let quota = u64::from(c) * CPU_PERIOD_US / 1000;
                    write_file(
                        &cpu_dir.join("cpu.cfs_period_us"),
                        &CPU_PERIOD_US.to_string(),
                    )?;
                    write_file(&cpu_dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                Ok(Cgroup { dirs })
            }
        }
    }

    /// A cgroup from directories recorded earlier (re-adoption).
    pub fn from_dirs(dirs: Vec<PathBuf>) -> Cgroup {
        Cgroup { dirs }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Opens every `cgroup.procs` for writing (a process joins by writing its pid, or `0`).
    pub fn open_procs(&self) -> Result<Vec<File>, CgroupError> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|source| CgroupError::Write { path: p, source })
            })
            .collect()
    }

    /// Moves `pid` into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write_file(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Processes in the cgroup (union over hierarchies).
    pub fn pids(&self) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for d in &self.dirs {
            if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Removes the directories; waits up to `timeout` for exiting tasks to leave.
    /// Already-removed directories are fine.
    pub fn remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        for d in &self.dirs {
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(source) => {
                        return Err(CgroupError::Remove {
                            path: d.clone(),
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

fn ignore_absent(e: CgroupError) -> Result<(), CgroupError> {
    match &e {
        CgroupError::Write { source, .. } if source.kind() == io::ErrorKind::NotFound => Ok(()),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
27 25 0:25 / /sys/fs/cgroup/cpuacct rw,relatime shared:11 - cgroup cgroup rw,cpuacct
29 25 0:27 / /sys/fs/cgroup/memory rw,relatime shared:13 - cgroup cgroup rw,memory
35 25 0:33 / /sys/fs/cgroup/unified rw,relatime shared:19 - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_controller_mounts() {
        let pids = format!(
            "{HYBRID}36 25 0:34 / /sys/fs/cgroup/pids rw,relatime shared:20 - cgroup cgroup rw,pids\n"
        );
        assert_eq!(
            v1_mount_from(&pids, "pids"),
            Some(PathBuf::from("/sys/fs/cgroup/pids"))
        );
        assert_eq!(v1_mount_from(HYBRID, "pids"), None);
        // "cpuacct" is not "cpu".
        assert_eq!(
            v1_mount_from(HYBRID, "cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu"))
        );
    }

    #[test]
    fn hybrid_without_v2_controllers_is_v1() {
        let m = detect_from(HYBRID, |_| Some(String::new())).unwrap();
        assert_eq!(
            m,
            CgroupMode::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu".into()
            }
        );
    }

    #[test]
    fn v2_with_controllers_wins() {
        let m = detect_from(HYBRID, |_| Some("cpuset cpu io memory pids\n".into())).unwrap();
        assert_eq!(
            m,
            CgroupMode::V2 {
                root: "/sys/fs/cgroup/unified".into()
            }
        );
    }

    #[test]
    fn comounted_cpu_cpuacct() {
        let info = "\
26 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
29 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        match detect_from(info, |_| None).unwrap() {
            CgroupMode::V1 { cpu, .. } => assert_eq!(cpu, Path::new("/sys/fs/cgroup/cpu,cpuacct")),
            m => panic!("{m:?}"),
        }
        assert_eq!(detect_from("garbage\n", |_| None), None);
        assert_eq!(detect_from("", |_| None), None);
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\04"), r"/a\04");
    }

    #[test]
    fn names() {
        assert!(check_name("sb-1.x_y").is_ok());
        for n in ["", ".", "..", "a/b", "a b"] {
            assert!(check_name(n).is_err(), "{n:?}");
        }
    }
}
