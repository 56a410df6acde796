//! The agent's few system calls: process identity and signals through pidfds, file-system
//! capacity, random bytes. Everything else goes through `vmm-glue` or the standard library.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use crate::statedir::ProcRef;

/// The recorded reference of a process we just started.
pub fn proc_ref(pid: i32) -> Option<ProcRef> {
    proto::process::start_ticks(pid)
        .ok()
        .map(|start_ticks| ProcRef { pid, start_ticks })
}

/// A pidfd for the process `p` names, if it still runs and is the same process (its
/// start time matches). Holding the pidfd makes later signals race-free: the pid cannot be
/// reused while we hold it.
pub fn open(p: ProcRef) -> Option<OwnedFd> {
    proto::process::open_if_same(p.pid, p.start_ticks)
}

/// Whether the recorded process still runs (a zombie counts as gone once reaped by
/// its parent; an unreaped zombie child of ours is reaped by [`kill_and_reap`]).
pub fn alive(p: ProcRef) -> bool {
    match open(p) {
        Some(_) => !is_zombie(p.pid),
        None => false,
    }
}

fn is_zombie(pid: i32) -> bool {
    proto::process::state(pid) == Some('Z')
}

/// Sends `signal` to the recorded process if it is still that process. Returns whether a
/// signal was delivered.
pub fn signal(p: ProcRef, signal: i32) -> bool {
    let Some(fd) = open(p) else {
        return false;
    };
    proto::process::pidfd_send_signal(fd.as_fd(), signal).is_ok()
}

/// SIGKILLs the recorded process and waits (up to `timeout`) until it is gone; reaps it if
/// it is our child. Returns true once it is gone.
pub fn kill_and_reap(p: ProcRef, timeout: std::time::Duration) -> bool {
    signal(p, libc::SIGKILL);
    let end = std::time::Instant::now() + timeout;
    loop {
        reap(p.pid);
        if !alive(p) {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Reaps `pid` if it is our exited child (no-op otherwise).
pub fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG writes the exit status into our local int; a pid that
    // is not our child yields -1/ECHILD, which is ignored.
    let _ = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// Total and available bytes of the file system holding `path`.
pub fn fs_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer for the call.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let bs = st.f_frsize;
    Ok((st.f_blocks * bs, st.f_bavail * bs))
}

/// `fdatasync`s every file at once, one thread each. Concurrent syncs on one file system
/// share its journal commits, so a pause's layer, header and VM state cost about one sync,
/// not three. Returns the first error; every file is synced (or tried) either way.
pub fn sync_data_all(files: &[File]) -> io::Result<()> {
    let Some((first, rest)) = files.split_first() else {
        return Ok(());
    };
    std::thread::scope(|s| {
        let others: Vec<_> = rest
            .iter()
            .map(|f| s.spawn(move || f.sync_data()))
            .collect();
        let mut r = first.sync_data();
        for h in others {
            let one = h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("sync thread panicked")));
            if r.is_ok() {
                r = one;
            }
        }
        r
    })
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    proto::sha256::constant_time_eq(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn own_process_is_alive_and_a_changed_start_time_is_not() {
        let me = proc_ref(std::process::id() as i32).unwrap();
        assert!(alive(me));
        assert!(!alive(ProcRef {
            start_ticks: me.start_ticks + 1,
            ..me
        }));
        assert!(!alive(ProcRef {
            pid: i32::MAX,
            start_ticks: 0
        }));
    }

    #[test]
    fn kill_and_reap_a_child() {
        // Reaped by kill_and_reap (waitpid), not by Child::wait.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let p = proc_ref(child.id() as i32).unwrap();
        assert!(alive(p));
        assert!(kill_and_reap(p, std::time::Duration::from_secs(5)));
        assert!(!alive(p));
        assert!(
            !signal(p, libc::SIGKILL),
            "no second signal to a gone process"
        );
    }

    #[test]
    fn sync_data_all_syncs_every_file_and_reports_errors() {
        let dir = std::env::temp_dir().join(format!("wrenn-agent-sync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files: Vec<File> = (0..3)
            .map(|i| {
                let p = dir.join(format!("f{i}"));
                std::fs::write(&p, vec![i as u8; 4096]).unwrap();
                File::options().read(true).write(true).open(p).unwrap()
            })
            .collect();
        sync_data_all(&files).unwrap();
        sync_data_all(&[]).unwrap();
        // fdatasync on a pipe is EINVAL: the error comes back, whatever its position.
        let (r, _w) = pipe_files();
        let mixed = vec![files[0].try_clone().unwrap(), r];
        assert_eq!(
            sync_data_all(&mixed).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn pipe_files() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into the array it is given.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: the descriptor is new and owned by nothing else.
        let r = unsafe { File::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let w = unsafe { File::from_raw_fd(fds[1]) };
        (r, w)
    }

    #[test]
    fn compare_and_space() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        let (total, avail) = fs_space(Path::new("/")).unwrap();
        assert!(total >= avail && total > 0);
    }
}
