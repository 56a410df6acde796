//! The jail checks of the end-to-end suite (run by `e2e.rs` when `WRENN_JAILER` is set): what
//! a running sandbox's processes look like from the host, what another sandbox's uid can open,
//! and that a destroy leaves nothing behind.
//!
//! `WRENN_E2E_SECCOMP=1` says the Firecracker under test was built with seccomp filters (a
//! glibc build with `deploy/seccomp/`'s policy, or a release binary): every thread's
//! `Seccomp:` must be 2. Unset, that one check prints a visible skip: a glibc build without a
//! policy installs an allow-all filter, mode 2 as well, so the mode alone cannot tell.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use proto::id::Uuid;
use vmm_glue::jail::{JailCgroups, JailLimits};

/// What the suite's jail is.
pub struct Jail {
    pub root: PathBuf,
    pub firecracker: PathBuf,
    pub uid_base: u32,
    pub uid_count: u32,
    pub uffd_uid: u32,
}

pub fn sandbox_dir(root: &Path, n: u128) -> PathBuf {
    root.join("sandboxes")
        .join(Uuid::from_u128(n).hyphenated().to_string())
}

/// `Key:` of `/proc/<pid>/status` (empty when the process is gone).
pub fn status_field(pid: u32, key: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// `key=value` of a sandbox's record.
fn record_value(root: &Path, n: u128, key: &str) -> Option<String> {
    let text = fs::read_to_string(sandbox_dir(root, n).join("sandbox.conf")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
}

impl Jail {
    fn exec_name(&self) -> String {
        self.firecracker
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    /// The chroot of sandbox `n` (`<chroot base>/<exec name>/<id>/root`).
    pub fn chroot(&self, n: u128) -> PathBuf {
        self.root
            .join("jail")
            .join(self.exec_name())
            .join(Uuid::from_u128(n).hyphenated().to_string())
            .join("root")
    }

    /// The jail uid recorded for sandbox `n` (running: it must have one).
    pub fn uid_of(&self, n: u128) -> u32 {
        let u: u32 = record_value(&self.root, n, "jail_uid")
            .unwrap_or_else(|| panic!("sandbox {n} has no jail_uid in its record"))
            .parse()
            .unwrap();
        assert!(
            u >= self.uid_base && u - self.uid_base < self.uid_count,
            "sandbox {n}: jail uid {u} outside the range"
        );
        u
    }

    /// The host pid of sandbox `n`'s Firecracker, from the jailer's pid file.
    pub fn firecracker_pid(&self, n: u128) -> u32 {
        let f = self.chroot(n).join(format!("{}.pid", self.exec_name()));
        fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .trim()
            .parse()
            .unwrap()
    }

    /// A running sandbox's Firecracker: its uid and gid, its root, its cgroup limits, its
    /// seccomp mode, its PID namespace.
    pub fn check_running(&self, n: u128, vcpus: u32, memory_mib: u32) {
        let uid = self.uid_of(n);
        let pid = self.firecracker_pid(n);
        let ids = |key: &str| -> Vec<u32> {
            status_field(pid, key)
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        assert_eq!(ids("Uid:"), vec![uid; 4], "sandbox {n}: Uid");
        assert_eq!(ids("Gid:"), vec![uid; 4], "sandbox {n}: Gid");
        assert_eq!(status_field(pid, "Groups:"), "", "sandbox {n}: groups");
        assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
        // By inode: after the jailer's pivot_root in its own mount namespace the link reads `/`.
        let root = self.chroot(n);
        assert!(
            vmm_glue::process::root_is(pid, &root),
            "sandbox {n}: /proc/{pid}/root is not {}",
            root.display()
        );
        let nspid = status_field(pid, "NSpid:");
        assert!(
            nspid.ends_with(" 1") || nspid.ends_with("\t1"),
            "NSpid: {nspid}"
        );
        self.check_cgroup(n, pid, vcpus, memory_mib);
        // Every thread (vmm, api, vcpu) in filter mode. A build without a policy installs an
        // allow-all filter, also mode 2: only the build says whether the filter restricts.
        let modes: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|t| {
                let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
                let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let mode = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Seccomp:"))
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                format!("{}={mode}", comm.trim())
            })
            .collect();
        if std::env::var("WRENN_E2E_SECCOMP").as_deref() == Ok("1") {
            assert!(
                modes.iter().all(|m| m.ends_with("=2")),
                "sandbox {n}: seccomp modes per thread {modes:?}, WRENN_E2E_SECCOMP=1 wants 2"
            );
            println!("sandbox {n}: Seccomp: 2 on every thread {modes:?}");
        } else {
            println!(
                "skipped: seccomp check of sandbox {n} (per thread {modes:?}): \
                 WRENN_E2E_SECCOMP=1 not set, so this Firecracker is taken for a build without \
                 filters (a glibc build without deploy/seccomp's policy installs an allow-all \
                 filter)"
            );
        }
        println!(
            "sandbox {n}: firecracker pid {pid} uid {uid} in {}",
            root.display()
        );
    }

    /// The limits in the cgroup the jailer put sandbox `n`'s Firecracker in.
    fn check_cgroup(&self, n: u128, pid: u32, vcpus: u32, memory_mib: u32) {
        let Ok(cg) = JailCgroups::detect() else {
            println!("skipped: no usable cgroups on this host: limits of sandbox {n} unchecked");
            return;
        };
        let limits = JailLimits::for_vm(vcpus, u64::from(memory_mib) << 20, 0);
        let own = format!("/wrenn/{}", Uuid::from_u128(n).hyphenated());
        let procfile = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        // `N:controllers:/path` (v1) or `0::/path` (v2).
        let path_of = |controller: &str| -> String {
            procfile
                .lines()
                .find_map(|l| {
                    let mut it = l.splitn(3, ':');
                    let (_, ctl, path) = (it.next()?, it.next()?, it.next()?);
                    let hit = if controller.is_empty() {
                        ctl.is_empty()
                    } else {
                        ctl.split(',').any(|c| c == controller)
                    };
                    hit.then(|| path.to_owned())
                })
                .unwrap_or_else(|| panic!("{controller:?} not in /proc/{pid}/cgroup: {procfile}"))
        };
        let read = |dir: &Path, path: &str, file: &str| -> String {
            let p = dir.join(path.trim_start_matches('/')).join(file);
            fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .trim()
                .to_owned()
        };
        let quota = u64::from(vcpus) * 100_000;
        match cg {
            JailCgroups::V1 { cpu, memory, pids } => {
                let (c, m) = (path_of("cpu"), path_of("memory"));
                assert!(
                    c.ends_with(&own) && m.ends_with(&own),
                    "{c} {m}: not its own cgroup"
                );
                assert_eq!(read(&cpu, &c, "cpu.cfs_quota_us"), quota.to_string());
                assert_eq!(read(&cpu, &c, "cpu.cfs_period_us"), "100000");
                assert_eq!(
                    read(&memory, &m, "memory.limit_in_bytes"),
                    limits.memory_max_bytes.to_string()
                );
                if let Some(pids) = pids {
                    let p = path_of("pids");
                    assert_eq!(read(&pids, &p, "pids.max"), limits.pids_max.to_string());
                }
            }
            JailCgroups::V2 { root } => {
                let p = path_of("");
                assert!(p.ends_with(&own), "{p}: not its own cgroup");
                assert_eq!(read(&root, &p, "cpu.max"), format!("{quota} 100000"));
                assert_eq!(
                    read(&root, &p, "memory.max"),
                    limits.memory_max_bytes.to_string()
                );
                assert_eq!(read(&root, &p, "pids.max"), limits.pids_max.to_string());
            }
        }
        println!("sandbox {n}: cgroup limits set ({own})");
    }

    /// The page server of a restored sandbox `n` ran unprivileged: alive, its uid and
    /// capabilities; gone (it exits once every page is resident), the stats file it wrote
    /// after dropping root is its uid's.
    pub fn check_page_server(&self, n: u128) {
        let pid: Option<u32> =
            record_value(&self.root, n, "page_server.pid").and_then(|p| p.parse().ok());
        let alive = pid.filter(|p| {
            fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("wrenn-uffd"))
        });
        if let Some(p) = alive {
            let uid = status_field(p, "Uid:");
            assert!(
                uid.split_whitespace()
                    .all(|u| u == self.uffd_uid.to_string()),
                "wrenn-uffd of sandbox {n}: Uid: {uid}"
            );
            assert_eq!(status_field(p, "CapEff:"), "0000000000000000");
            assert_eq!(status_field(p, "NoNewPrivs:"), "1");
            println!(
                "sandbox {n}: wrenn-uffd pid {p} runs as uid {}",
                self.uffd_uid
            );
            return;
        }
        let stats = sandbox_dir(&self.root, n).join("uffd-out/uffd.stats");
        let m = fs::metadata(&stats).unwrap_or_else(|e| {
            panic!(
                "sandbox {n}: no running wrenn-uffd and no {}: {e}",
                stats.display()
            )
        });
        assert_eq!(
            m.uid(),
            self.uffd_uid,
            "{} written by uid {}",
            stats.display(),
            m.uid()
        );
        println!(
            "sandbox {n}: wrenn-uffd already exited; its stats file is uid {}'s",
            self.uffd_uid
        );
    }

    /// A process with sandbox `a`'s uid and gid, outside any chroot, cannot open sandbox `b`'s
    /// disk or snapshot files, a template's files for writing, or the agent's state files;
    /// and `a`'s chroot holds only `a`'s files.
    pub fn check_cross_access(&self, a: u128, b: u128, template: u128) {
        let uid = self.uid_of(a);
        let b_uid = self.uid_of(b);
        assert_ne!(uid, b_uid, "two running sandboxes share a uid");
        // The probe itself works: a file that uid may read is read.
        let control = std::env::temp_dir().join(format!("wrenn-e2e-probe-{}", std::process::id()));
        fs::write(&control, b"x").unwrap();
        std::os::unix::fs::chown(&control, Some(uid), Some(uid)).unwrap();
        fs::set_permissions(&control, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            opens_as(uid, &control, false),
            "the probe cannot even open its own file"
        );
        fs::remove_file(&control).unwrap();

        let b_dir = sandbox_dir(&self.root, b);
        let mut read_denied: Vec<PathBuf> = vec![
            b_dir.join("rootfs.ext4"),
            self.chroot(b)
                .join(vmm_glue::process::STABLE_DISK_PATH.trim_start_matches('/')),
            b_dir.join("sandbox.conf"),
            sandbox_dir(&self.root, a).join("sandbox.conf"),
            self.root.join("agent/identity.conf"),
        ];
        read_denied.extend(files_in(&b_dir.join("snapshot")));
        read_denied.extend(files_in(&self.chroot(b).join("restore")));
        let tdir = self
            .root
            .join("templates")
            .join(Uuid::from_u128(template).hyphenated().to_string());
        let mut write_denied = vec![tdir.join("rootfs.ext4"), tdir.join("template.conf")];
        write_denied.extend(files_in(&tdir.join("snapshot")));
        // A template's memory is another team's data: not readable either.
        read_denied.extend(files_in(&tdir.join("snapshot")));
        write_denied.extend(read_denied.iter().cloned());
        let mut checked = 0;
        for p in &read_denied {
            if p.exists() {
                assert!(
                    !opens_as(uid, p, false),
                    "uid {uid} can read {}",
                    p.display()
                );
                checked += 1;
            }
        }
        for p in &write_denied {
            if p.exists() {
                assert!(
                    !opens_as(uid, p, true),
                    "uid {uid} can write {}",
                    p.display()
                );
                checked += 1;
            }
        }
        // The files themselves, not only the directories above them: none is writable by
        // anyone but its owner, and none of another sandbox or of the agent is `a`'s.
        for p in write_denied.iter().filter(|p| p.exists()) {
            let m = fs::metadata(p).unwrap();
            assert_eq!(m.mode() & 0o022, 0, "{} is writable by others", p.display());
            assert_ne!(m.uid(), uid, "{} belongs to sandbox {a}", p.display());
        }
        assert!(checked >= 10, "only {checked} files probed");
        println!("uid {uid} (sandbox {a}) opened none of {checked} files of sandbox {b}, template and agent");
        self.check_chroot_holds_only_own(a, uid, b, b_uid);
    }

    /// Everything in `a`'s chroot is `a`'s (its uid) or shared and read-only (root's, not
    /// writable by others); no inode of it is one of sandbox `b`'s files.
    fn check_chroot_holds_only_own(&self, a: u128, uid: u32, b: u128, b_uid: u32) {
        let mut b_inodes = HashSet::new();
        for p in walk(&sandbox_dir(&self.root, b))
            .into_iter()
            .chain(walk(&self.chroot(b)))
        {
            // Shared files (the kernel: root's, readable by all, writable by none) are in
            // every chroot by design.
            if let Ok(m) = fs::symlink_metadata(&p) {
                let shared = m.uid() == 0 && m.mode() & 0o022 == 0 && m.mode() & 0o004 != 0;
                if m.is_file() && !shared {
                    b_inodes.insert((m.dev(), m.ino()));
                }
            }
        }
        let chroot = self.chroot(a);
        let mut n = 0;
        for p in walk(&chroot) {
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            assert!(!ft.is_symlink(), "{}: a symlink in the chroot", p.display());
            assert_ne!(m.uid(), b_uid, "{}: another sandbox's uid", p.display());
            assert!(
                !b_inodes.contains(&(m.dev(), m.ino())),
                "{}: another sandbox's file",
                p.display()
            );
            let shared_ro = m.uid() == 0 && m.mode() & 0o022 == 0;
            assert!(
                m.uid() == uid || shared_ro,
                "{}: uid {} mode {:o}",
                p.display(),
                m.uid(),
                m.mode()
            );
            n += 1;
        }
        println!("chroot of sandbox {a}: {n} entries, all its own or shared read-only");
    }

    /// After every sandbox is destroyed: no chroot, no cgroup directory of the jail, no
    /// process with a jail uid (Firecracker's or wrenn-uffd's), no mount under the state root.
    pub fn check_nothing_left(&self) {
        let chroots = self.root.join("jail").join(self.exec_name());
        let left: Vec<_> = fs::read_dir(&chroots)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "chroots left in {}: {left:?}",
            chroots.display()
        );
        if let Ok(cg) = JailCgroups::detect() {
            let roots = match cg {
                JailCgroups::V1 { cpu, memory, pids } => {
                    let mut v = vec![cpu, memory];
                    v.extend(pids);
                    v
                }
                JailCgroups::V2 { root } => vec![root],
            };
            for r in roots {
                let parent = r.join("wrenn");
                let ours: Vec<_> = fs::read_dir(&parent)
                    .map(|rd| {
                        rd.flatten()
                            .filter(|e| e.path().is_dir())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| n.starts_with("00000000-") || n.starts_with("ws-"))
                            .collect()
                    })
                    .unwrap_or_default();
                assert!(
                    ours.is_empty(),
                    "cgroups left in {}: {ours:?}",
                    parent.display()
                );
            }
        }
        // The in-process agents of this test started page servers as children of this
        // process; killed by a later agent, they stay zombies (uid still jailed) until their
        // parent reaps them. A dead agent's children are reaped by init; reap ours the same.
        loop {
            let mut status = 0;
            // SAFETY: waitpid with WNOHANG writes the exit status into our local int; no
            // child left or none exited yet ends the loop.
            if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
                break;
            }
        }
        for ent in fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let uid: Option<u32> = status_field(pid, "Uid:")
                .split_whitespace()
                .nth(1)
                .and_then(|u| u.parse().ok());
            let Some(uid) = uid else { continue };
            let jailed = (uid >= self.uid_base && uid - self.uid_base < self.uid_count)
                || uid == self.uffd_uid;
            if !jailed {
                continue;
            }
            // A process the killed agent binary was reaping may still be on its way out
            // (reparented to init, not yet reaped): gone or a zombie within a bound is dead.
            let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let state = status_field(pid, "State:");
                if state.is_empty() || state.trim_start().starts_with('Z') {
                    break;
                }
                assert!(
                    std::time::Instant::now() < end,
                    "process {pid} still runs as jail uid {uid} ({})",
                    state.trim()
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let needle = self.root.to_string_lossy().into_owned();
        assert!(!mounts.contains(&needle), "mounts left under {needle}");
        println!("after destroy: no chroot, cgroup, jailed process or mount left");
    }
}

/// Whether a process running as `uid`:`uid` (no supplementary groups) opens `path` (for
/// appending when `write`, which never truncates).
fn opens_as(uid: u32, path: &Path, write: bool) -> bool {
    let script = if write {
        "exec 3>>\"$1\""
    } else {
        "exec 3<\"$1\""
    };
    Command::new("/bin/sh")
        .args(["-c", script, "sh"])
        .arg(path)
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

/// Every path under `dir` (not following symlinks), without `dir` itself.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Copies a template made by an unjailed Firecracker (`WRENN_E2E_PREJAIL_TEMPLATE`, a
/// template directory of an earlier agent) into `root`'s templates as template `id`.
pub fn import_template(from: &Path, root: &Path, id: u128) {
    let to = root
        .join("templates")
        .join(Uuid::from_u128(id).hyphenated().to_string());
    let _ = fs::remove_dir_all(&to);
    fs::create_dir_all(to.join("snapshot")).unwrap();
    for p in files_in(&from.join("snapshot")) {
        fs::copy(&p, to.join("snapshot").join(p.file_name().unwrap())).unwrap();
    }
    vmm_glue::disk::clone_disk(&from.join("rootfs.ext4"), &to.join("rootfs.ext4")).unwrap();
    let conf = fs::read_to_string(from.join("template.conf")).unwrap();
    let conf: String = conf
        .lines()
        .map(|l| {
            if l.starts_with("id=") {
                format!("id={}\n", Uuid::from_u128(id).hyphenated())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(to.join("template.conf"), conf).unwrap();
}
