//! Persistent tap devices for Firecracker.
//!
//! Tap devices cannot be made through rtnetlink (the kernel refuses `kind "tun"` there), so
//! this opens `/dev/net/tun`, names a device with TUNSETIFF and keeps it with TUNSETPERSIST.
//! The device is created in the network namespace of the calling thread. Firecracker later
//! attaches to it by name with its own TUNSETIFF; only the multi-queue flag must match, and
//! neither side sets it.

use std::fs::OpenOptions;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::netlink::check_ifname;
use super::Error;

const IOC_WRITE: u32 = 1;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;

/// The kernel's `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// `_IOW('T', 202, int)`: attach to (or create) the named device.
const TUNSETIFF: u32 = ioc(IOC_WRITE, b'T', 202, size_of::<libc::c_int>());
/// `_IOW('T', 203, int)`: keep the device after the descriptor closes.
const TUNSETPERSIST: u32 = ioc(IOC_WRITE, b'T', 203, size_of::<libc::c_int>());
const _: () = assert!(TUNSETIFF == 0x4004_54ca);
const _: () = assert!(TUNSETPERSIST == 0x4004_54cb);

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// `struct ifreq` with the `ifr_flags` member of its union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}
const _: () = assert!(size_of::<IfReqFlags>() == 40);

/// One TUNSET* ioctl whose argument is a pointer to `req`.
fn ioctl_ifreq(fd: BorrowedFd<'_>, req: &mut IfReqFlags) -> io::Result<()> {
    // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is one and outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, req as *mut IfReqFlags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_persist(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST as _, libc::c_ulong::from(on)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a persistent tap device `name` in the calling thread's network namespace, with
/// the flags Firecracker uses (no packet info, virtio-net header).
pub fn create_persistent(name: &str) -> Result<(), Error> {
    let tap_err = |source| Error::Tap {
        name: name.to_owned(),
        source,
    };
    check_ifname(name)
        .map_err(|e| tap_err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(tap_err)?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    // check_ifname bounds the name to 15 bytes, leaving the NUL.
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    ioctl_ifreq(file.as_fd(), &mut req).map_err(tap_err)?;
    ioctl_persist(file.as_fd(), true).map_err(tap_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        // Also asserted at compile time; here for the record in test output.
        assert_eq!(TUNSETIFF, 0x400454ca);
        assert_eq!(TUNSETPERSIST, 0x400454cb);
    }

    #[test]
    fn bad_name_is_an_error() {
        assert!(create_persistent("name-longer-than-15").is_err());
    }
}
