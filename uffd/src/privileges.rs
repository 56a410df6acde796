//! Dropping root before serving (the jail, ARCHITECTURE.md's threat model): `wrenn-uffd` is
//! started by the root agent, opens everything it needs (header, layers, working set, its
//! socket, the directories of its output files), then [`drop_to`] a configured unprivileged
//! uid and gid with no capabilities and `PR_SET_NO_NEW_PRIVS`, before it accepts Firecracker
//! and serves a single fault. A page server subverted through what a guest controls (its
//! memory layout, fault addresses) is then an ordinary user that owns nothing.

use std::fmt;
use std::io;

use crate::sys;

/// Highest capability number we drop from the bounding set when the kernel does not say
/// (`/proc/sys/kernel/cap_last_cap`); dropping an unknown number fails with EINVAL and ends
/// the loop.
const CAP_LAST_CAP_FALLBACK: u32 = 63;

#[derive(Debug)]
pub enum DropError {
    /// uid or gid 0 asked for.
    Root,
    Step {
        step: &'static str,
        source: io::Error,
    },
    /// After the drop, /proc/self/status still shows privileges.
    Check(String),
}

impl fmt::Display for DropError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropError::Root => write!(f, "refusing to drop privileges to uid or gid 0"),
            DropError::Step { step, .. } => write!(f, "drop privileges: {step}"),
            DropError::Check(s) => write!(f, "privileges still held after the drop: {s}"),
        }
    }
}

impl std::error::Error for DropError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DropError::Step { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> DropError {
    move |source| DropError::Step { step, source }
}

/// Becomes `uid`/`gid` for good: empty bounding set, no supplementary groups, real, effective
/// and saved ids all set (so no way back), no capabilities, no new privileges; then checks
/// `/proc/self/status`. Call before any thread is spawned.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), DropError> {
    if uid == 0 || gid == 0 {
        return Err(DropError::Root);
    }
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(CAP_LAST_CAP_FALLBACK);
    for cap in 0..=last {
        match sys::capbset_drop(cap) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(step("empty the capability bounding set")(e)),
        }
    }
    sys::setgroups_none().map_err(step("setgroups"))?;
    sys::setresgid(gid).map_err(step("setresgid"))?;
    sys::setresuid(uid).map_err(step("setresuid"))?;
    sys::set_no_new_privs().map_err(step("PR_SET_NO_NEW_PRIVS"))?;
    let status = std::fs::read_to_string("/proc/self/status").map_err(step("read status"))?;
    check_status(&status, uid, gid).map_err(DropError::Check)
}

/// The checks [`drop_to`] makes on `/proc/self/status` text.
pub fn check_status(status: &str, uid: u32, gid: u32) -> Result<(), String> {
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or("")
            .to_owned()
    };
    let all_are = |v: &str, want: u32| {
        let mut n = 0;
        v.split_whitespace().all(|x| {
            n += 1;
            x == want.to_string()
        }) && n == 4
    };
    let zero = |v: &str| !v.is_empty() && v.bytes().all(|b| b == b'0');
    let (u, g) = (field("Uid:"), field("Gid:"));
    let checks = [
        (all_are(&u, uid), format!("Uid: {u}")),
        (all_are(&g, gid), format!("Gid: {g}")),
        (
            field("Groups:").is_empty(),
            format!("Groups: {}", field("Groups:")),
        ),
        (
            zero(&field("CapEff:")),
            format!("CapEff: {}", field("CapEff:")),
        ),
        (
            zero(&field("CapPrm:")),
            format!("CapPrm: {}", field("CapPrm:")),
        ),
        (
            zero(&field("CapAmb:")),
            format!("CapAmb: {}", field("CapAmb:")),
        ),
        (
            field("NoNewPrivs:") == "1",
            format!("NoNewPrivs: {}", field("NoNewPrivs:")),
        ),
    ];
    match checks.iter().find(|(ok, _)| !ok) {
        None => Ok(()),
        Some((_, what)) => Err(what.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_checks() {
        let good = "Uid:\t5000\t5000\t5000\t5000\nGid:\t5001\t5001\t5001\t5001\nGroups:\t\n\
                    CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
                    CapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        assert_eq!(check_status(good, 5000, 5001), Ok(()));
        assert!(check_status(good, 5000, 5000)
            .unwrap_err()
            .starts_with("Gid"));
        let saved_root = good.replace("5000\t5000\t5000\t5000", "5000\t5000\t0\t5000");
        assert!(check_status(&saved_root, 5000, 5001)
            .unwrap_err()
            .starts_with("Uid"));
        let caps = good.replace("CapEff:\t0000000000000000", "CapEff:\t0000000000000400");
        assert!(check_status(&caps, 5000, 5001)
            .unwrap_err()
            .starts_with("CapEff"));
        let nnp = good.replace("NoNewPrivs:\t1", "NoNewPrivs:\t0");
        assert!(check_status(&nnp, 5000, 5001)
            .unwrap_err()
            .starts_with("NoNewPrivs"));
        let groups = good.replace("Groups:\t", "Groups:\t0");
        assert!(check_status(&groups, 5000, 5001)
            .unwrap_err()
            .starts_with("Groups"));
    }

    #[test]
    fn never_to_root() {
        assert!(matches!(drop_to(0, 5), Err(DropError::Root)));
        assert!(matches!(drop_to(5, 0), Err(DropError::Root)));
    }
}
