//! Named network namespaces, compatible with `ip netns`.
//!
//! A named namespace is a bind mount of a namespace file onto `/run/netns/NAME`; the mount
//! keeps the namespace alive with no process in it. We do what `ip netns add` does: make
//! `/run/netns` a shared mount (so that a later unmount also reaches copies of the mount in
//! other mount namespaces, such as the private one each Firecracker runs in, instead of
//! leaving the namespace pinned there), create an empty file, and bind-mount the namespace
//! of a thread that called `unshare(CLONE_NEWNET)` onto it. Only that helper thread changes
//! namespace; the rest of the process stays where it was.
//!
//! Code runs inside a namespace on a dedicated thread that called `setns` ([`run_in`]):
//! sockets it opens (netlink, TCP) and processes it spawns belong to that namespace and keep
//! it after the thread is gone.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::limits::NETNS_NAME_LEN_MAX;
use super::Error;

/// Where `ip netns` keeps its names.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// `statfs` magic of nsfs, the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Serializes creation and deletion in this process: making `/run/netns` shared is a
/// check-then-mount sequence that two threads must not interleave.
static LOCK: Mutex<()> = Mutex::new(());

fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= NETNS_NAME_LEN_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidNetnsName(name.to_owned()))
    }
}

/// The file that names `name`.
pub fn path(name: &str) -> Result<PathBuf, Error> {
    check_name(name)?;
    Ok(Path::new(NETNS_RUN_DIR).join(name))
}

fn cstr(p: &Path) -> CString {
    // Paths we build come from checked names and constants: no interior NUL.
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn netns_err(action: &'static str, name: &str) -> impl FnOnce(io::Error) -> Error {
    let name = name.to_owned();
    move |source| Error::Netns {
        action,
        name,
        source,
    }
}

/// True if `p` is a mounted namespace file (not a leftover empty file).
fn is_nsfs(p: &Path) -> bool {
    let c = cstr(p);
    // SAFETY: statfs is plain data; all zeros is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-parameter for the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == NSFS_MAGIC
}

fn mount(src: &Path, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let (s, t) = (cstr(src), cstr(target));
    let none = c"none";
    // SAFETY: all pointers are valid C strings that outlive the call; data is null.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            none.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes /run/netns a shared mount, bind-mounting it onto itself first if it is not a
/// mount point yet (the same dance as iproute2).
fn make_run_dir_shared() -> io::Result<()> {
    let dir = Path::new(NETNS_RUN_DIR);
    fs::create_dir_all(dir)?;
    match mount(Path::new("none"), dir, libc::MS_SHARED | libc::MS_REC) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // not a mount point
        Err(e) => return Err(e),
    }
    mount(dir, dir, libc::MS_BIND | libc::MS_REC)?;
    mount(Path::new("none"), dir, libc::MS_SHARED | libc::MS_REC)
}

/// True if the namespace `name` exists (its file is a mounted namespace).
pub fn exists(name: &str) -> Result<bool, Error> {
    Ok(is_nsfs(&path(name)?))
}

/// Creates the named namespace; returns false if it already existed (idempotent).
/// An unmounted leftover file from a crash is replaced.
pub fn create(name: &str) -> Result<bool, Error> {
    let p = path(name)?;
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    make_run_dir_shared().map_err(netns_err("prepare /run/netns for", name))?;
    if is_nsfs(&p) {
        return Ok(false);
    }
    match fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(netns_err("remove stale file of", name)(e)),
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&p)
        .map_err(netns_err("create file for", name))?;

    let bound = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<()> {
            // SAFETY: plain syscall; it changes only this helper thread's namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // thread-self, not self: /proc/self names the main thread's namespace.
            mount(Path::new("/proc/thread-self/ns/net"), &p, libc::MS_BIND)
        })
        .join()
    });
    let result = match bound {
        Ok(r) => r.map_err(netns_err("create", name)),
        Err(_) => Err(Error::ThreadPanicked),
    };
    if result.is_err() {
        let _ = fs::remove_file(&p);
    }
    result.map(|()| true)
}

/// Deletes the named namespace: unmounts and removes its file. The namespace itself goes
/// away once no process or socket uses it. Returns false if there was nothing to delete.
pub fn delete(name: &str) -> Result<bool, Error> {
    let p = path(name)?;
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = cstr(&p);
    // SAFETY: `c` is a valid C string that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    let mounted = rc == 0;
    if !mounted {
        let e = io::Error::last_os_error();
        // EINVAL: a leftover file that is not a mount point; ENOENT: nothing there.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(netns_err("unmount", name)(e));
        }
    }
    match fs::remove_file(&p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(mounted),
        Err(e) => Err(netns_err("remove file of", name)(e)),
    }
}

/// Names under /run/netns (any owner), sorted.
pub fn list() -> Result<Vec<String>, Error> {
    let rd = match fs::read_dir(NETNS_RUN_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(netns_err("list", NETNS_RUN_DIR)(e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(netns_err("list", NETNS_RUN_DIR))?;
        if let Some(n) = entry.file_name().to_str() {
            out.push(n.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Opens the namespace file, for `setns` or IFLA_NET_NS_FD.
pub fn open(name: &str) -> Result<OwnedFd, Error> {
    let p = path(name)?;
    if !is_nsfs(&p) {
        return Err(netns_err("open", name)(io::Error::from_raw_os_error(
            libc::ENOENT,
        )));
    }
    let f = File::open(&p).map_err(netns_err("open", name))?;
    Ok(f.into())
}

/// Moves the calling thread into the network namespace `ns`.
fn enter(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `ns` is a valid open descriptor for the duration of the call.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `f` on a new thread that has entered the namespace `name`, and returns its result.
/// Sockets `f` opens stay in that namespace; processes it spawns start there.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    let fd = open(name)?;
    let joined = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<T> {
            enter(fd.as_fd())?;
            Ok(f())
        })
        .join()
    });
    match joined {
        Ok(r) => r.map_err(netns_err("enter", name)),
        Err(_) => Err(Error::ThreadPanicked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("wrenn-12").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("..").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        assert_eq!(path("wrenn-1").unwrap(), Path::new("/run/netns/wrenn-1"));
    }

    #[test]
    fn absent_namespace_is_an_error_not_a_panic() {
        assert!(!exists("wrenn-never-created-xyz").unwrap());
        assert!(matches!(
            open("wrenn-never-created-xyz"),
            Err(Error::Netns { .. })
        ));
        assert!(run_in("wrenn-never-created-xyz", || ()).is_err());
    }
}
