//! Small safe wrappers of the system calls vmm-glue needs outside `net/`: one function per
//! call, taking `BorrowedFd`s, returning `io::Result`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_WRITE: u32 = 1;

/// The kernel's `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    assert!(size < (1 << IOC_SIZEBITS));
    (dir << IOC_DIRSHIFT)
        | (ty << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// `struct open_how` of linux/openat2.h (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const _: () = assert!(std::mem::size_of::<OpenHow>() == 24);

/// Opens `rel` under the directory `dir` for reading with `openat2`, refusing any symlink or
/// magic link on the way and any path that leaves `dir` (`RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`): how the agent, as root, reads what a jailed
/// Firecracker wrote inside its chroot, where every name is under the jailed uid's control.
pub fn open_beneath(dir: BorrowedFd<'_>, rel: &std::ffi::CStr) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `rel` is a NUL-terminated string and `how` a fully initialized open_how that
    // both outlive the call; the size passed is that of the struct.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            rel.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `FICLONE = _IOW(0x94, 9, int)` (linux/fs.h): share all of a file's extents with another.
pub const FICLONE: u32 = ioc(IOC_WRITE, 0x94, 9, std::mem::size_of::<libc::c_int>());
const _: () = assert!(FICLONE == 0x4004_9409);

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Makes `dst` share every extent of `src` (same filesystem, reflink support needed).
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both descriptors are
    // open for the duration of the call and nothing is read from or written to our memory.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    cvt(rc).map(drop)
}

/// `lseek(fd, off, SEEK_DATA)`: the next data at or after `off`, or `None` past the last data.
pub fn seek_data(fd: BorrowedFd<'_>, off: u64) -> io::Result<Option<u64>> {
    let off = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, libc::SEEK_DATA) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// `lseek(fd, off, SEEK_HOLE)`: the next hole at or after `off` (end of file counts as one).
pub fn seek_hole(fd: BorrowedFd<'_>, off: u64) -> io::Result<u64> {
    let off = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, libc::SEEK_HOLE) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// `copy_file_range` between explicit offsets; returns bytes copied (0 at source EOF).
pub fn copy_file_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: usize,
) -> io::Result<usize> {
    let mut so =
        i64::try_from(src_off).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let mut d =
        i64::try_from(dst_off).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: the offset pointers point to live locals; descriptors are open; the kernel copies
    // between files without touching our memory otherwise.
    let r =
        unsafe { libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut d, len, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// `pidfd_open` for the `u32` pids of `std::process::Child` (see [`proto::process`]).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    proto::process::pidfd_open(pid)
}

pub use proto::process::pidfd_send_signal;

/// Waits up to `timeout` for `fd` to become readable (a pidfd does when its process exits).
pub fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `pfd` is a valid pollfd array of length 1 for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(rc > 0);
    }
}

/// How a child ended, from `waitid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// Reaps the child behind `pidfd` (`waitid(P_PIDFD, WEXITED)`); `block` false adds WNOHANG
/// and returns `None` while it runs. ECHILD if it is not our child.
pub fn waitid_pidfd(pidfd: BorrowedFd<'_>, block: bool) -> io::Result<Option<Exit>> {
    const P_PIDFD: libc::idtype_t = 3;
    // SAFETY: siginfo_t is plain data; zeroed is a valid initial value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: `info` is a valid out-parameter; the pidfd is open.
        let rc =
            unsafe { libc::waitid(P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, flags) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break;
    }
    // SAFETY: waitid filled `info` (or left si_pid zero under WNOHANG with nothing to reap).
    let pid = unsafe { info.si_pid() };
    if pid == 0 {
        return Ok(None);
    }
    // SAFETY: as above, `info` describes an exited child.
    let status = unsafe { info.si_status() };
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        Exit::Code(status)
    } else {
        Exit::Signal(status)
    }))
}

// The functions below run in a forked child before exec (Command::pre_exec): they make one
// system call each, allocate nothing and take no locks.

/// `setsid()`: a new session, so the child outlives its parent's session and process group.
pub fn setsid() -> io::Result<()> {
    // SAFETY: plain syscall without arguments.
    let rc = unsafe { libc::setsid() };
    cvt(rc).map(drop)
}

/// One `write` of all of `bytes` (cgroup files take a pid in one write).
pub fn write_once(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `bytes` is valid for reads of its length; the descriptor is open.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// `setns(fd, CLONE_NEWNET)`.
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on an open namespace descriptor.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    cvt(rc).map(drop)
}

/// `unshare(CLONE_NEWNS)`, then makes every mount a slave: mounts made here stay here, and
/// unmounts on the host (a deleted network namespace's file) still reach this namespace.
pub fn unshare_mount_ns() -> io::Result<()> {
    // SAFETY: plain syscall with a flag argument.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    // SAFETY: all pointers are valid C strings or null, as mount(2) allows for a propagation
    // change.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        )
    };
    cvt(rc).map(drop)
}

/// Mounts a tmpfs at `target` with mount data `data`.
pub fn mount_tmpfs(target: &std::ffi::CStr, data: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    cvt(rc).map(drop)
}

/// Creates an empty file (a bind-mount target) and closes it.
pub fn create_empty_file(path: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: `path` is a valid C string; the returned descriptor is closed right below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    cvt(fd)?;
    // SAFETY: `fd` was just opened and is owned here.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Bind-mounts `src` onto `target`.
pub fn bind_mount(src: &std::ffi::CStr, target: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: valid C strings; fstype and data may be null for MS_BIND.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    cvt(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn ficlone_encoding() {
        assert_eq!(FICLONE, 0x4004_9409);
        // FICLONERANGE = _IOW(0x94, 13, struct file_clone_range) with a 32-byte struct.
        assert_eq!(ioc(IOC_WRITE, 0x94, 13, 32), 0x4020_940d);
    }

    #[test]
    fn ficlone_on_pipe_fails_cleanly() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(ficlone(f.as_fd(), f.as_fd()).is_err());
    }

    #[test]
    #[allow(clippy::zombie_processes)] // reaped through the pidfd below
    fn pidfd_of_child() {
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        assert!(!poll_readable(fd.as_fd(), Duration::ZERO).unwrap());
        assert_eq!(waitid_pidfd(fd.as_fd(), false).unwrap(), None);
        pidfd_send_signal(fd.as_fd(), libc::SIGKILL).unwrap();
        assert!(poll_readable(fd.as_fd(), Duration::from_secs(5)).unwrap());
        assert_eq!(
            waitid_pidfd(fd.as_fd(), true).unwrap(),
            Some(Exit::Signal(libc::SIGKILL))
        );
        assert!(pidfd_open(u32::MAX).is_err());
    }
}
