//! Process identity, the one copy every wrenn binary uses: pidfds (race-free signals, exit
//! readiness) and a process's start time (which tells a live process from a recycled pid).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `pidfd_open(pid, 0)`: a descriptor that refers to this process (never to a later one
/// that reuses its pid) and becomes readable when it exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the syscall takes a pid and flags and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`: signals the process the pidfd refers to.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor borrowed for the call; a null siginfo and flags
    // 0 are what the kernel documents for a plain kill.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Start time of `pid` (field 22 of /proc/<pid>/stat, clock ticks since boot).
pub fn start_ticks(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_ticks(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no start time in stat"))
}

/// Field 22 of a /proc/<pid>/stat line. The command (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so the fields are counted after the last `)`.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 (state) is the first; field 22 is the 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// State letter of `pid` (field 3 of /proc/<pid>/stat: `R`, `S`, `Z`, ...).
pub fn state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..]
        .split_ascii_whitespace()
        .next()?
        .chars()
        .next()
}

/// A pidfd for `pid` only if it is still the process that started at `start_ticks`.
/// Checked after opening: if the pid was reused before pidfd_open, the start time differs;
/// if after, the pidfd still refers to the process we checked.
pub fn open_if_same(pid: i32, start_ticks: u64) -> Option<OwnedFd> {
    let fd = pidfd_open(pid).ok()?;
    (self::start_ticks(pid).ok() == Some(start_ticks)).then_some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn start_ticks_parse() {
        let line = "42 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 123456 99";
        assert_eq!(parse_start_ticks(line), Some(123456));
        assert_eq!(parse_start_ticks("garbage"), None);
        assert_eq!(parse_start_ticks("1 (x) S 1 2"), None);
        let me = std::process::id() as i32;
        assert!(start_ticks(me).unwrap() > 0);
        assert!(matches!(state(me), Some('R' | 'S')));
    }

    #[test]
    fn pidfd_signals_its_process_and_refuses_bad_pids() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let t = start_ticks(pid).unwrap();
        assert!(open_if_same(pid, t + 1).is_none());
        let fd = open_if_same(pid, t).unwrap();
        pidfd_send_signal(fd.as_fd(), libc::SIGKILL).unwrap();
        assert!(!child.wait().unwrap().success());
        assert!(pidfd_open(0).is_err());
        assert!(pidfd_open(-1).is_err());
        assert!(pidfd_open(i32::MAX).is_err());
    }
}
