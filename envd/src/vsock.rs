//! AF_VSOCK sockets through libc: the API listener (port 49983) and the readiness
//! connection to the host (CID 2, port 49984).

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The API port envd listens on.
pub const API_PORT: u32 = 49983;
/// The agent's readiness listener (Firecracker maps it to `<uds_path>_49984` on the host).
pub const READY_PORT: u32 = 49984;
/// The host's context id.
pub const CID_HOST: u32 = 2;
/// Any local context id (for bind).
pub const CID_ANY: u32 = u32::MAX;

/// `struct sockaddr_vm` from linux/vm_sockets.h.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SockaddrVm {
    svm_family: libc::sa_family_t,
    svm_reserved1: u16,
    svm_port: u32,
    svm_cid: u32,
    svm_flags: u8,
    svm_zero: [u8; 3],
}

const _: () = assert!(std::mem::size_of::<SockaddrVm>() == 16);
const _: () = assert!(std::mem::size_of::<SockaddrVm>() == std::mem::size_of::<libc::sockaddr>());

fn addr(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_port: port,
        svm_cid: cid,
        ..Default::default()
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening vsock socket on `port` (any CID).
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    let fd = socket()?;
    let a = addr(CID_ANY, port);
    // SAFETY: `a` is a valid sockaddr_vm of the given length.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&a as *const SockaddrVm).cast(),
            std::mem::size_of::<SockaddrVm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on our bound socket.
    let r = unsafe { libc::listen(fd.as_raw_fd(), 128) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Connects to `cid:port`, giving up after `timeout`. Returns a blocking stream socket.
pub fn connect(cid: u32, port: u32, timeout: Duration) -> io::Result<OwnedFd> {
    let fd = socket()?;
    // The kernel's own connect timeout for vsock (default 2 s) is SO_VM_SOCKETS_CONNECT_TIMEOUT
    // in AF_VSOCK's option level; set it to ours.
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads a timeval of the given size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD,
            (&tv as *const libc::timeval).cast::<c_void>(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let a = addr(cid, port);
    // SAFETY: `a` is a valid sockaddr_vm of the given length.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&a as *const SockaddrVm).cast(),
            std::mem::size_of::<SockaddrVm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// linux/vm_sockets.h: SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD (a struct timeval on 64-bit).
const SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD: libc::c_int = 6;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_layout() {
        let a = addr(CID_HOST, READY_PORT);
        // SAFETY: SockaddrVm is plain data of 16 bytes; viewing it as bytes is sound.
        let bytes: [u8; 16] = unsafe { std::mem::transmute(a) };
        assert_eq!(
            u16::from_ne_bytes([bytes[0], bytes[1]]),
            libc::AF_VSOCK as u16
        );
        assert_eq!(
            u32::from_ne_bytes(bytes[4..8].try_into().unwrap()),
            READY_PORT
        );
        assert_eq!(
            u32::from_ne_bytes(bytes[8..12].try_into().unwrap()),
            CID_HOST
        );
    }

    #[test]
    fn listen_or_report_absence() {
        match listen(0) {
            Ok(fd) => assert!(fd.as_raw_fd() >= 0),
            // Hosts without the vsock transport modules: EAFNOSUPPORT/ENODEV.
            Err(e) => crate::testing::skip(&format!("no AF_VSOCK here: {e}")),
        }
        // Nothing listens on the host's readiness port in a test; connecting fails cleanly.
        let r = connect(CID_HOST, READY_PORT, Duration::from_millis(200));
        assert!(r.is_err());
    }
}
