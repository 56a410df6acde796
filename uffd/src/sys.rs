//! The system interface of this crate: userfaultfd ioctls and structs, SCM_RIGHTS, SO_PEERCRED,
//! pidfd, SEEK_DATA/SEEK_HOLE, anonymous mappings. One small safe function per call; every
//! ioctl number is a `const` checked at compile time against its `_IOC` encoding and every
//! `repr(C)` struct has a size assertion. Nothing outside this module uses `unsafe`.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

// ---- _IOC encoding (asm-generic/ioctl.h, as used on x86_64 and aarch64) ----

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u64 {
    assert!(size < (1 << IOC_SIZEBITS));
    ((dir << IOC_DIRSHIFT)
        | (ty << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)) as u64
}

// ---- userfaultfd (linux/userfaultfd.h) ----

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}
const _: () = assert!(size_of::<UffdioApi>() == 24);

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}
const _: () = assert!(size_of::<UffdioRange>() == 16);

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}
const _: () = assert!(size_of::<UffdioRegister>() == 32);

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}
const _: () = assert!(size_of::<UffdioCopy>() == 40);

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}
const _: () = assert!(size_of::<UffdioZeropage>() == 32);

/// `struct uffd_msg`: an 8-byte head and a 24-byte union. For `UFFD_EVENT_PAGEFAULT`,
/// `arg = [flags, address, ptid]`; for `UFFD_EVENT_REMOVE`, `arg = [start, end, reserved]`.
/// (The kernel's struct is `__packed`, but every field is naturally aligned, so the layout is
/// the same.)
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}
const _: () = assert!(size_of::<UffdMsg>() == 32);

pub const UFFDIO_API: u64 = 0xc018_aa3f;
const _: () =
    assert!(UFFDIO_API == ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>()));
pub const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const _: () = assert!(
    UFFDIO_REGISTER
        == ioc(
            IOC_READ | IOC_WRITE,
            UFFDIO,
            0x00,
            size_of::<UffdioRegister>()
        )
);
pub const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
const _: () = assert!(UFFDIO_UNREGISTER == ioc(IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>()));
pub const UFFDIO_WAKE: u64 = 0x8010_aa02;
const _: () = assert!(UFFDIO_WAKE == ioc(IOC_READ, UFFDIO, 0x02, size_of::<UffdioRange>()));
pub const UFFDIO_COPY: u64 = 0xc028_aa03;
const _: () =
    assert!(UFFDIO_COPY == ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, size_of::<UffdioCopy>()));
pub const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const _: () = assert!(
    UFFDIO_ZEROPAGE
        == ioc(
            IOC_READ | IOC_WRITE,
            UFFDIO,
            0x04,
            size_of::<UffdioZeropage>()
        )
);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: u64 = 0xaa00;
const _: () = assert!(USERFAULTFD_IOC_NEW == ioc(IOC_NONE, UFFDIO, 0x00, 0));

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Creates a userfaultfd (non-blocking, close-on-exec) for this process's memory, as
/// Firecracker does: the `userfaultfd(2)` syscall, else `/dev/userfaultfd`.
pub fn userfaultfd_new() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the syscall takes one integer argument and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if ret >= 0 {
        // SAFETY: the syscall returned a new fd that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) });
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd or -1.
    let fd = cvt(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) })?;
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API`: negotiates the API with the requested features; returns the supported ioctls.
pub fn uffdio_api(uffd: BorrowedFd<'_>, features: u64) -> io::Result<UffdioApi> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `api` is a valid, writable uffdio_api for the duration of the call.
    cvt(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut api) })?;
    Ok(api)
}

/// `UFFDIO_REGISTER` of `[start, start+len)` with `mode`; returns the ioctls allowed on it.
pub fn uffdio_register(uffd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<u64> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: `reg` is a valid, writable uffdio_register; the kernel checks the range.
    cvt(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) })?;
    Ok(reg.ioctls)
}

/// `UFFDIO_UNREGISTER` of `[start, start+len)`: later faults there are the kernel's own.
pub fn uffdio_unregister(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let range = UffdioRange { start, len };
    // SAFETY: `range` is a valid uffdio_range that the kernel only reads.
    cvt(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER as _, &range) })?;
    Ok(())
}

/// `UFFDIO_WAKE` of `[start, start+len)`.
pub fn uffdio_wake(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let range = UffdioRange { start, len };
    // SAFETY: `range` is a valid uffdio_range that the kernel only reads.
    cvt(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE as _, &range) })?;
    Ok(())
}

/// Outcome of a failed `UFFDIO_COPY`/`UFFDIO_ZEROPAGE`: bytes installed before it stopped (a
/// multiple of the page size) and the error that stopped it.
#[derive(Debug)]
pub struct FillError {
    pub done: u64,
    pub error: io::Error,
}

/// `UFFDIO_COPY` of `src` to the address `dst` in the userfaultfd's address space.
///
/// Safe because the kernel only installs pages that are missing: it never overwrites memory
/// that anyone could have observed, and it validates `dst` against the registered ranges.
pub fn uffdio_copy(uffd: BorrowedFd<'_>, dst: u64, src: &[u8], mode: u64) -> Result<(), FillError> {
    let mut copy = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode,
        copy: 0,
    };
    // SAFETY: `copy` is a valid, writable uffdio_copy; `src` is readable for `len` bytes for the
    // duration of the call (the kernel reads it with copy_from_user, which checks it anyway).
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
    if ret == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    Err(FillError {
        done: copy.copy.max(0) as u64,
        error,
    })
}

/// `UFFDIO_ZEROPAGE` of `[dst, dst+len)`: maps the shared zero page, allocating nothing.
pub fn uffdio_zeropage(
    uffd: BorrowedFd<'_>,
    dst: u64,
    len: u64,
    mode: u64,
) -> Result<(), FillError> {
    let mut zp = UffdioZeropage {
        range: UffdioRange { start: dst, len },
        mode,
        zeropage: 0,
    };
    // SAFETY: `zp` is a valid, writable uffdio_zeropage for the duration of the call.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut zp) };
    if ret == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    Err(FillError {
        done: zp.zeropage.max(0) as u64,
        error,
    })
}

/// Reads as many `uffd_msg`s as are pending (up to `buf.len()`) from a non-blocking
/// userfaultfd. Returns 0 when none is pending.
pub fn read_uffd_msgs(uffd: BorrowedFd<'_>, buf: &mut [UffdMsg]) -> io::Result<usize> {
    let bytes = std::mem::size_of_val(buf);
    // SAFETY: `buf` is writable for `bytes` bytes and UffdMsg is plain old data.
    let ret = unsafe { libc::read(uffd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(0),
            _ => Err(e),
        };
    }
    let n = ret as usize;
    if n % size_of::<UffdMsg>() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "partial uffd_msg",
        ));
    }
    Ok(n / size_of::<UffdMsg>())
}

/// Sets `O_NONBLOCK` on an fd.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: F_SETFL takes an int argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

// ---- Unix sockets: SCM_RIGHTS and SO_PEERCRED ----

/// What one `recvmsg` returned: bytes read, the fds that came with them, and whether the
/// control data was truncated (more fds than room).
#[derive(Debug)]
pub struct Received {
    pub bytes: usize,
    pub fds: Vec<OwnedFd>,
    pub truncated: bool,
}

/// Control buffer for up to `HANDSHAKE_FD_MAX` fds, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);
const _: () = assert!(
    size_of::<CmsgBuf>() >= 16 + 4 * crate::limits::HANDSHAKE_FD_MAX,
    "room for the cmsghdr and the fds"
);

/// `recvmsg` on a stream socket, taking any fds passed with SCM_RIGHTS (close-on-exec).
/// Non-blocking sockets return `WouldBlock` as an error.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((4 * crate::limits::HANDSHAKE_FD_MAX) as u32) } as usize;
    assert!(space <= cmsg.0.len());
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at a valid iovec and control buffer that outlive the call.
    let ret = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR reads only msg_control/msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points inside the control buffer (CMSG_* walk it).
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN is a pure computation.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let n = (hdr.cmsg_len as usize).saturating_sub(head) / size_of::<RawFd>();
            for i in 0..n {
                // SAFETY: `c` is a valid SCM_RIGHTS cmsg inside the control buffer.
                let data = unsafe { libc::CMSG_DATA(c) } as *const RawFd;
                // SAFETY: the data holds `n` fds, so `i < n` stays inside it.
                let p = unsafe { data.add(i) };
                // SAFETY: `p` is in bounds; read_unaligned because CMSG_DATA only guarantees
                // cmsghdr alignment.
                let fd = unsafe { std::ptr::read_unaligned(p) };
                if fd >= 0 {
                    // SAFETY: the kernel installed this fd for us; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        // SAFETY: `msg` and `c` are valid as above.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok(Received {
        bytes: ret as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// `sendmsg` of `data` with `fds` attached (SCM_RIGHTS), as Firecracker sends its handshake.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    assert!(fds.len() <= crate::limits::HANDSHAKE_FD_MAX);
    let mut cmsg = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = (fds.len() * size_of::<RawFd>()) as u32;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as _;
        // SAFETY: msg_control points at a buffer of msg_controllen bytes.
        let c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        assert!(!c.is_null());
        // SAFETY: `c` points at the start of the control buffer, large enough for the header.
        let hdr = unsafe { &mut *c };
        hdr.cmsg_level = libc::SOL_SOCKET;
        hdr.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: CMSG_LEN is a pure computation.
        hdr.cmsg_len = unsafe { libc::CMSG_LEN(payload) } as _;
        for (i, fd) in fds.iter().enumerate() {
            // SAFETY: `c` is the cmsg header written above, inside the control buffer.
            let data = unsafe { libc::CMSG_DATA(c) } as *mut RawFd;
            // SAFETY: the data area has room for `fds.len()` fds (CMSG_SPACE above).
            let p = unsafe { data.add(i) };
            // SAFETY: `p` is in bounds and writable; unaligned for the same reason as above.
            unsafe { std::ptr::write_unaligned(p, fd.as_raw_fd()) };
        }
    }
    // SAFETY: msg points at valid buffers that outlive the call.
    let ret = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as usize)
}

/// The pid of the process at the other end of a Unix socket (SO_PEERCRED).
pub fn peer_pid(sock: BorrowedFd<'_>) -> io::Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is writable for `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred.pid)
}

// ---- pidfd ----

pub use proto::process::{pidfd_open, pidfd_send_signal};

// ---- signals (used by main.rs) ----

/// Blocks `signals` in the calling thread (call before spawning threads) and returns a
/// non-blocking signalfd that reads them.
pub fn signalfd(signals: &[i32]) -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain old data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: `set` is a valid sigset_t; an invalid signal number returns -1 (checked).
        cvt(unsafe { libc::sigaddset(&mut set, s) })?;
    }
    // SAFETY: `set` is valid; the old mask is not wanted.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    // SAFETY: `set` is valid; -1 asks for a new fd.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Drains a readable fd (a signalfd, eventfd or pipe) so that edge-triggered polling re-arms.
pub fn drain(fd: BorrowedFd<'_>) {
    // Never block here: the fd may have been created blocking (a pipe or socket pair).
    if set_nonblocking(fd).is_err() {
        return;
    }
    let mut buf = [0u8; 256];
    loop {
        // SAFETY: `buf` is writable for its length.
        let ret = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if ret <= 0 {
            return;
        }
    }
}

// ---- files ----

/// `lseek(SEEK_DATA)`: the first data byte at or after `offset`, or `None` past the last data.
pub fn seek_data(fd: BorrowedFd<'_>, offset: u64) -> io::Result<Option<u64>> {
    seek(fd, offset, libc::SEEK_DATA)
}

/// `lseek(SEEK_HOLE)`: the first hole at or after `offset` (end of file counts as a hole).
pub fn seek_hole(fd: BorrowedFd<'_>, offset: u64) -> io::Result<Option<u64>> {
    seek(fd, offset, libc::SEEK_HOLE)
}

fn seek(fd: BorrowedFd<'_>, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek takes plain integers.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(ret as u64))
}

// ---- anonymous memory (the Firecracker-like harness, tests and benches) ----

/// An anonymous private mapping owned by this value (unmapped on drop). Guest memory in tests:
/// it is only ever accessed through raw pointers and the kernel, never through references.
#[derive(Debug)]
pub struct AnonMapping {
    addr: usize,
    len: usize,
}

impl AnonMapping {
    /// Maps `len` bytes read-write (or inaccessible with `PROT_NONE`, to reserve a gap).
    pub fn new(len: usize, accessible: bool) -> io::Result<AnonMapping> {
        let prot = if accessible {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_NONE
        };
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice aliases nothing.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AnonMapping {
            addr: p as usize,
            len,
        })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mmap rejects zero lengths).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Replaces `[offset, offset+len)` with a fresh read-write anonymous mapping (MAP_FIXED
    /// inside this reservation), so that one reservation can hold two regions and a gap.
    pub fn make_accessible(&self, offset: usize, len: usize) -> io::Result<()> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED;
        // SAFETY: the range lies inside this mapping, which this value owns exclusively.
        let p = unsafe { libc::mmap((self.addr + offset) as *mut _, len, prot, flags, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)` of a range: anonymous pages read back as zeros afterwards (or
    /// fault again if the range is registered with a userfaultfd).
    pub fn dontneed(&self, offset: usize, len: usize) -> io::Result<()> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: the range lies inside this mapping; its contents are only accessed via raw
        // pointers, so discarding them invalidates no reference.
        cvt(unsafe { libc::madvise((self.addr + offset) as *mut _, len, libc::MADV_DONTNEED) })?;
        Ok(())
    }

    /// Reads one byte (volatile, so the access really faults).
    pub fn read_u8(&self, offset: usize) -> u8 {
        assert!(offset < self.len);
        // SAFETY: in bounds of a readable mapping owned by self; volatile raw read.
        unsafe { std::ptr::read_volatile((self.addr + offset) as *const u8) }
    }

    /// Copies `out.len()` bytes starting at `offset` (faulting them in as needed).
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset
            .checked_add(out.len())
            .is_some_and(|end| end <= self.len));
        // SAFETY: in bounds of a readable mapping owned by self; `out` does not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.addr + offset) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }

    /// Writes bytes at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|end| end <= self.len));
        // SAFETY: in bounds of a writable mapping owned by self; `data` does not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.addr + offset) as *mut u8,
                data.len(),
            )
        };
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `new` and is unmapped exactly once.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

// ---- files written after dropping privileges ----

/// Creates (or truncates) `name` in the directory `dir` for writing, mode 0600, never
/// following a symlink at `name`.
pub fn openat_create(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and outlives the call; the mode is passed as the
    // variadic third argument open(2) expects with O_CREAT.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o600 as libc::c_uint,
        )
    })?;
    // SAFETY: openat returned a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `renameat(dir, from, dir, to)`.
pub fn renameat(dir: BorrowedFd<'_>, from: &std::ffi::CStr, to: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and outlive the call.
    cvt(unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) })
        .map(drop)
}

// ---- dropping privileges (privileges.rs) ----

/// `prctl(PR_CAPBSET_DROP, cap)`: removes `cap` from the bounding set (needs CAP_SETPCAP).
pub fn capbset_drop(cap: u32) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) }).map(drop)
}

/// `setgroups(0, NULL)`: no supplementary groups.
pub fn setgroups_none() -> io::Result<()> {
    // SAFETY: a zero-length list; the null pointer is never read.
    cvt(unsafe { libc::setgroups(0, std::ptr::null()) }).map(drop)
}

/// `setresgid(gid, gid, gid)` (glibc applies it to every thread).
pub fn setresgid(gid: u32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::setresgid(gid, gid, gid) }).map(drop)
}

/// `setresuid(uid, uid, uid)`: from root to a non-zero uid, the kernel also clears the
/// permitted, effective and ambient capability sets.
pub fn setresuid(uid: u32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::setresuid(uid, uid, uid) }).map(drop)
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`: no exec can grant privileges again.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn peer_pid_of_socketpair_is_self() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(peer_pid(a.as_fd()).unwrap(), std::process::id() as i32);
    }

    #[test]
    fn fds_pass_through_scm_rights() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let g = std::fs::File::open("/dev/null").unwrap();
        send_with_fds(a.as_fd(), b"hi", &[f.as_fd(), g.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let r = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(r.bytes, 2);
        assert_eq!(r.fds.len(), 2);
        assert!(!r.truncated);
        send_with_fds(a.as_fd(), b"x", &[]).unwrap();
        let r = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((r.bytes, r.fds.len()), (1, 0));
    }

    #[test]
    fn seek_data_finds_extents() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = std::env::temp_dir().join(format!("uffd-sys-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&dir)
            .unwrap();
        std::fs::remove_file(&dir).unwrap();
        f.set_len(1 << 20).unwrap();
        f.seek(SeekFrom::Start(256 << 10)).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        let d = seek_data(f.as_fd(), 0).unwrap().unwrap();
        assert!(d <= 256 << 10);
        let h = seek_hole(f.as_fd(), d).unwrap().unwrap();
        assert!(h >= (256 << 10) + 4096);
        assert_eq!(seek_data(f.as_fd(), 1 << 20).unwrap(), None);
    }

    #[test]
    fn anon_mapping_dontneed_zeroes() {
        let m = AnonMapping::new(8192, true).unwrap();
        m.write(100, &[7, 8, 9]);
        assert_eq!(m.read_u8(101), 8);
        m.dontneed(0, 4096).unwrap();
        assert_eq!(m.read_u8(101), 0);
    }
}
