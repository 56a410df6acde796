//! PID 1 duties: mounts, hostname, loopback, signals, shutdown.
//!
//! Reaping is the [`crate::reaper`]'s job (signalfd on SIGCHLD), so that orphans and the
//! processes of the process table share one `waitpid` caller.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use log::{info, warn};

/// One mount envd performs as PID 1.
#[derive(Clone, Copy, Debug)]
pub struct Mount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: libc::c_ulong,
    pub data: &'static str,
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// The mounts, parents before children.
pub const MOUNTS: [Mount; 8] = [
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "mode=0620,ptmxmode=0666,gid=5",
    },
    Mount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=0755",
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: "",
    },
];

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Mounts one filesystem at `root`+target, creating the directory. Already mounted (EBUSY)
/// counts as done.
pub fn mount(m: &Mount, root: &Path) -> io::Result<()> {
    let target = root.join(m.target.trim_start_matches('/'));
    let _ = std::fs::create_dir_all(&target);
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (src, tgt, fst, data) = (
        c(m.source.as_bytes())?,
        c(target.as_os_str().as_bytes())?,
        c(m.fstype.as_bytes())?,
        c(m.data.as_bytes())?,
    );
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fst.as_ptr(),
            m.flags,
            data.as_ptr().cast(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Mounts everything in [`MOUNTS`]; failures are logged, not fatal (a guest image may
/// already provide some, and envd can serve without e.g. cgroup2).
pub fn mount_all() {
    for m in &MOUNTS {
        match mount(m, Path::new("/")) {
            Ok(()) => info!("mounted target={} fstype={}", m.target, m.fstype),
            Err(e) => warn!(
                "mount failed target={} fstype={} error={e}",
                m.target, m.fstype
            ),
        }
    }
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`.
    let r = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Brings `lo` up (no one else does in a guest whose PID 1 is envd).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket for the interface ioctls.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFFLAGS reads and writes the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the flags arm of the union was just filled by SIOCGIFFLAGS.
    unsafe {
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Signals envd handles through a signalfd: SIGCHLD (reaper), SIGTERM/SIGINT (shutdown;
/// SIGINT is what the kernel sends PID 1 for ctrl-alt-del once CAD is disabled).
pub const HANDLED_SIGNALS: [libc::c_int; 3] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT];

fn sigset(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid.
    unsafe {
        libc::sigemptyset(&mut set);
    }
    for &s in sigs {
        // SAFETY: `set` is valid and initialized.
        unsafe {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks [`HANDLED_SIGNALS`] in the calling thread. Call first thing in `main`, before any
/// thread exists, so every thread inherits the mask and the signalfds see every signal.
/// Children get an empty mask back (`spawn`, in the child before exec).
pub fn block_signals() -> io::Result<()> {
    let set = sigset(&HANDLED_SIGNALS);
    // SAFETY: `set` is valid; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// A blocking signalfd for SIGTERM and SIGINT (shutdown requests).
pub fn shutdown_signal_fd() -> io::Result<OwnedFd> {
    let set = sigset(&[libc::SIGTERM, libc::SIGINT]);
    // SAFETY: `set` is valid; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocks until SIGTERM or SIGINT arrives on `fd`; returns the signal number.
pub fn wait_shutdown_signal(fd: &OwnedFd) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: reading one signalfd_siginfo into `info`.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            )
        };
        if n == std::mem::size_of::<libc::signalfd_siginfo>() as isize {
            return Ok(info.ssi_signo);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Makes ctrl-alt-del send SIGINT to PID 1 instead of rebooting at once.
pub fn disable_ctrl_alt_del() -> io::Result<()> {
    // SAFETY: reboot with the CAD_OFF command changes a kernel flag only.
    let r = unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// PID 1's last act: terminate every process (SIGTERM, a grace period, SIGKILL), sync,
/// power off. Never returns.
pub fn power_off(grace: std::time::Duration) -> ! {
    info!("shutting down: terminating all processes");
    // SAFETY: kill(-1) signals every process except PID 1 itself.
    unsafe {
        libc::kill(-1, libc::SIGTERM);
    }
    std::thread::sleep(grace);
    // SAFETY: as above.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
    }
    // SAFETY: sync has no arguments.
    unsafe {
        libc::sync();
    }
    // SAFETY: powers the VM off; only fails without CAP_SYS_BOOT.
    unsafe {
        libc::reboot(libc::RB_POWER_OFF);
    }
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_is_ordered_and_absolute() {
        for (i, m) in MOUNTS.iter().enumerate() {
            assert!(m.target.starts_with('/'));
            // A parent comes before its children.
            for later in &MOUNTS[i + 1..] {
                assert!(!m.target.starts_with(later.target) || m.target == later.target);
            }
        }
        assert!(MOUNTS.iter().any(|m| m.fstype == "cgroup2"));
    }

    #[test]
    fn mounts_a_tmpfs_under_a_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::testing::skip("mounting needs root");
            return;
        }
        let root = std::env::temp_dir().join(format!("envd-init-{}", std::process::id()));
        let tmp = MOUNTS.iter().find(|m| m.target == "/tmp").unwrap();
        mount(tmp, &root).unwrap();
        let target = root.join("tmp");
        let c = CString::new(target.as_os_str().as_bytes()).unwrap();
        // SAFETY: statfs is plain data.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and statfs buffer.
        assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
        assert_eq!(st.f_type, libc::TMPFS_MAGIC);
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }, 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn hostname_reads() {
        assert!(!hostname().is_empty());
        assert!(!is_pid1());
    }
}
