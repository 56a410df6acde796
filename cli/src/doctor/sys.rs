//! The few system calls `wrenn doctor` and `wrenn up`/`down` make, each a small safe
//! function over `BorrowedFd`/`OwnedFd`. Every ioctl number is a `const` checked against its
//! `_IOC` encoding at compile time.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` of asm-generic/ioctl.h (x86_64, aarch64).
const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}

/// `_IO(KVMIO, 0x00)`.
pub const KVM_GET_API_VERSION: u32 = ioc(IOC_NONE, 0xAE, 0x00, 0);
/// `_IO(KVMIO, 0x01)`.
pub const KVM_CREATE_VM: u32 = ioc(IOC_NONE, 0xAE, 0x01, 0);
/// `_IO(UFFDIO, 0x00)` on /dev/userfaultfd (Linux 6.1+).
pub const USERFAULTFD_IOC_NEW: u32 = ioc(IOC_NONE, 0xAA, 0x00, 0);
/// `_IOWR(UFFDIO, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0xAA,
    0x3F,
    std::mem::size_of::<UffdioApi>() as u32,
);
/// `_IOW(0x94, 9, int)` of linux/fs.h.
pub const FICLONE: u32 = ioc(IOC_WRITE, 0x94, 9, std::mem::size_of::<i32>() as u32);

const _: () = assert!(KVM_GET_API_VERSION == 0xAE00);
const _: () = assert!(KVM_CREATE_VM == 0xAE01);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xAA00);
const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(FICLONE == 0x4004_9409);

/// The API version every KVM since Linux 2.6.22 reports.
pub const KVM_API_VERSION: i32 = 12;
/// `UFFD_API` of linux/userfaultfd.h.
const UFFD_API: u64 = 0xAA;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `KVM_GET_API_VERSION` on an open /dev/kvm.
pub fn kvm_api_version(kvm: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: KVM_GET_API_VERSION takes no argument and touches no memory of ours.
    let ret = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    cvt(ret)
}

/// `KVM_CREATE_VM` (machine type 0): a VM file descriptor, closed when dropped.
pub fn kvm_create_vm(kvm: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: KVM_CREATE_VM takes the machine type by value and touches no memory of ours.
    let ret = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    let fd = cvt(ret)?;
    // SAFETY: on success the ioctl returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A userfaultfd from the /dev/userfaultfd device (`USERFAULTFD_IOC_NEW`).
pub fn uffd_from_device(dev: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and touches no memory of ours.
    let ret = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    let fd = cvt(ret)?;
    // SAFETY: on success the ioctl returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A userfaultfd from the `userfaultfd(2)` system call.
pub fn uffd_from_syscall() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd takes its flags by value and touches no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: on success the call returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API` handshake: the features the kernel offers.
pub fn uffd_api(uffd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut api = UffdioApi {
        api: UFFD_API,
        ..UffdioApi::default()
    };
    // SAFETY: `api` is a live, writable struct uffdio_api of the size the ioctl number encodes.
    let ret = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            UFFDIO_API as _,
            &mut api as *mut UffdioApi,
        )
    };
    cvt(ret)?;
    Ok(api.features)
}

/// `FICLONE`: makes `dst` share `src`'s extents (reflink).
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor by value and touches no memory of ours.
    let ret = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    cvt(ret).map(|_| ())
}

/// Bytes (total, available to unprivileged users) of the file system holding `path`.
pub fn fs_space(path: &Path) -> io::Result<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain old data; all zeros is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a live, writable statvfs.
    let ret = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    cvt(ret)?;
    let frsize = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

/// Sends `signal` to `pid`; `Ok(false)` when no such process exists.
pub fn kill(pid: i32, signal: libc::c_int) -> io::Result<bool> {
    if pid <= 0 {
        // 0 and negative pids address process groups: never what a pid file means.
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill takes plain integers and touches no memory.
    let ret = unsafe { libc::kill(pid, signal) };
    if ret == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Detaches the mount at `path` (`umount2(MNT_DETACH)`).
pub fn umount_detach(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated path; umount2 touches no other memory.
    let ret = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    cvt(ret).map(|_| ())
}

/// Takes an exclusive `flock` on `file` without waiting; `Ok(false)` when another process
/// holds it. The lock goes with the descriptor.
pub fn try_lock_exclusive(file: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: flock takes a descriptor and flags by value and touches no memory.
    let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `cmd`'s child the leader of a new session, so it outlives the terminal of the
/// `wrenn up` that started it.
pub fn detach(cmd: &mut Command) {
    fn new_session() -> io::Result<()> {
        // SAFETY: setsid takes no argument, touches no memory and is async-signal-safe.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    // SAFETY: the hook runs between fork and exec and only calls setsid, which allocates
    // nothing and takes no lock.
    unsafe {
        cmd.pre_exec(new_session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn ioctls_fail_on_a_plain_file() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(kvm_api_version(f.as_fd()).is_err());
        assert!(kvm_create_vm(f.as_fd()).is_err());
        assert!(uffd_from_device(f.as_fd()).is_err());
    }

    #[test]
    fn space_of_root_and_missing_path() {
        let (total, avail) = fs_space(Path::new("/")).unwrap();
        assert!(total > 0 && avail <= total);
        assert!(fs_space(Path::new("/does/not/exist")).is_err());
    }

    #[test]
    fn flock_is_exclusive_between_descriptions() {
        let p = std::env::temp_dir().join(format!("wrenn-flock-{}", std::process::id()));
        let a = std::fs::File::create(&p).unwrap();
        let b = std::fs::File::open(&p).unwrap();
        assert!(try_lock_exclusive(a.as_fd()).unwrap());
        assert!(!try_lock_exclusive(b.as_fd()).unwrap());
        drop(a);
        assert!(try_lock_exclusive(b.as_fd()).unwrap());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn kill_refuses_groups_and_reports_missing() {
        assert!(kill(0, 0).is_err());
        assert!(kill(-1, 0).is_err());
        assert!(kill(std::process::id() as i32, 0).unwrap());
    }
}
