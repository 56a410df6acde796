//! The unprivileged uids (and equal gids) jailed Firecrackers run as: one per running
//! sandbox from a configured range (`--uid-base`, `--uid-count`).
//!
//! A uid is taken with the sandbox's network slot (when its Firecracker is about to start)
//! and given back with it (stop, pause, destroy, a failed start), so a paused sandbox holds
//! none and a resume takes one again. It is recorded in the sandbox's record (`jail_uid`);
//! a restarted agent marks the uids of the sandboxes it keeps running before it takes any
//! new one, so a live uid never goes to a second sandbox. As a second guard, a uid that any
//! process on the host still runs as (a Firecracker the agent lost track of) is skipped.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;

use proto::id::Uuid;

/// A configured range of uids: `base .. base + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    pub base: u32,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UidError {
    /// Empty, starting at a system uid (< 1000), or past the largest usable uid.
    BadRange(UidRange),
    /// Every uid of the range is held by a sandbox or used by a process.
    Exhausted { count: u32 },
}

impl fmt::Display for UidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UidError::BadRange(r) => write!(
                f,
                "uid range {}+{} must be non-empty, start at 1000 or above and end below 4294967294",
                r.base, r.count
            ),
            UidError::Exhausted { count } => write!(f, "all {count} jail uids are in use"),
        }
    }
}

impl std::error::Error for UidError {}

/// Below this are system accounts.
const UID_MIN: u32 = 1000;
/// `(uid_t)-1` means "unchanged" to chown and `(uid_t)-2` is the overflow uid.
const UID_END_MAX: u64 = u32::MAX as u64 - 1;

/// Which uids of the range are held, and by which sandbox.
#[derive(Debug)]
pub struct UidPool {
    range: UidRange,
    held: BTreeMap<u32, Uuid>,
    /// Where the next search starts: just-released uids are taken last, so a process that
    /// outlived its sandbox by a moment never meets its uid on a new sandbox.
    next: u32,
}

impl UidPool {
    pub fn new(range: UidRange) -> Result<UidPool, UidError> {
        let end = u64::from(range.base) + u64::from(range.count);
        if range.count == 0 || range.base < UID_MIN || end > UID_END_MAX {
            return Err(UidError::BadRange(range));
        }
        Ok(UidPool {
            range,
            held: BTreeMap::new(),
            next: range.base,
        })
    }

    pub fn range(&self) -> UidRange {
        self.range
    }

    fn contains(&self, uid: u32) -> bool {
        uid >= self.range.base
            && u64::from(uid) < u64::from(self.range.base) + u64::from(self.range.count)
    }

    /// Takes a free uid for `owner`, skipping those `in_use` says a process runs as.
    pub fn allocate(&mut self, owner: Uuid, in_use: impl Fn(u32) -> bool) -> Result<u32, UidError> {
        for i in 0..self.range.count {
            let off = (self.next - self.range.base + i) % self.range.count;
            let uid = self.range.base + off;
            if self.held.contains_key(&uid) || in_use(uid) {
                continue;
            }
            self.held.insert(uid, owner);
            self.next = self.range.base + (off + 1) % self.range.count;
            return Ok(uid);
        }
        Err(UidError::Exhausted {
            count: self.range.count,
        })
    }

    /// Marks `uid` held by `owner` (a sandbox kept running across an agent restart). False if
    /// it is outside the range or another sandbox holds it (the record is wrong).
    pub fn mark_used(&mut self, uid: u32, owner: Uuid) -> bool {
        if !self.contains(uid) {
            return false;
        }
        match self.held.get(&uid) {
            Some(o) => *o == owner,
            None => {
                self.held.insert(uid, owner);
                true
            }
        }
    }

    /// Gives `uid` back if `owner` holds it.
    pub fn release(&mut self, uid: u32, owner: Uuid) {
        if self.held.get(&uid) == Some(&owner) {
            self.held.remove(&uid);
        }
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// True if some process on the host runs with `uid` as any of its uids (`/proc/*/status`).
pub fn uid_has_process(uid: u32) -> bool {
    let Ok(rd) = fs::read_dir("/proc") else {
        return false;
    };
    let want = uid.to_string();
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .any(|e| {
            fs::read_to_string(e.path().join("status")).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .is_some_and(|v| v.split_whitespace().any(|u| u == want))
            })
        })
}

/// Longest jailer pid file read (a decimal pid and a newline).
const PID_FILE_LEN_MAX: u64 = 32;

/// Pids named by the jailer's pid files in this agent's chroots
/// (`<chroot_base>/<exec>/<id>/root/<exec>.pid`) whose process runs with a uid of `range` (any
/// of its uids) and is not in `known`: jailed Firecrackers no record holds (a crash between
/// their start and the record naming them; their command line names no sandbox directory).
/// Processes of the range that no chroot of this agent names belong to another agent
/// sharing the range and are left alone (the pool skips their uids).
pub fn strays_in_chroots(
    chroot_base: &std::path::Path,
    range: UidRange,
    known: &[i32],
) -> Vec<i32> {
    use std::io::Read;
    let in_range =
        |u: u64| u >= u64::from(range.base) && u < u64::from(range.base) + u64::from(range.count);
    let dirs = |d: &std::path::Path| -> Vec<std::path::PathBuf> {
        fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for exec in dirs(chroot_base) {
        for instance in dirs(&exec) {
            let root = instance.join("root");
            let Ok(rd) = fs::read_dir(&root) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name();
                let is_pid_file = name.to_str().is_some_and(|n| n.ends_with(".pid"))
                    && e.file_type().is_ok_and(|t| t.is_file());
                if !is_pid_file {
                    continue;
                }
                let mut text = String::new();
                let read = fs::File::open(e.path())
                    .and_then(|f| f.take(PID_FILE_LEN_MAX).read_to_string(&mut text));
                let Some(pid) = read.ok().and_then(|_| text.trim().parse::<i32>().ok()) else {
                    continue;
                };
                if pid <= 1 || known.contains(&pid) || out.contains(&pid) {
                    continue;
                }
                let jailed = fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))
                        .is_some_and(|v| {
                            v.split_whitespace()
                                .any(|u| u.parse::<u64>().is_ok_and(in_range))
                        })
                });
                if jailed {
                    out.push(pid);
                }
            }
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn strays_are_named_by_a_pid_file_in_our_chroots() {
        use std::os::unix::fs::MetadataExt;
        let me = fs::metadata("/proc/self").unwrap().uid();
        let mine = std::process::id() as i32;
        let base = std::env::temp_dir().join(format!("wrenn-agent-strays-{mine}"));
        let _ = fs::remove_dir_all(&base);
        let root = base.join("firecracker/sb-1/root");
        fs::create_dir_all(&root).unwrap();
        let range = UidRange { base: me, count: 1 };
        // No pid file: a process of the range that no chroot of ours names is left alone.
        assert!(strays_in_chroots(&base, range, &[]).is_empty());
        fs::write(root.join("firecracker.pid"), format!("{mine}\n")).unwrap();
        assert_eq!(strays_in_chroots(&base, range, &[]), vec![mine]);
        assert!(strays_in_chroots(&base, range, &[mine]).is_empty(), "known");
        let other = UidRange {
            base: me.wrapping_add(1).max(1000),
            count: 1,
        };
        if other.base != me {
            assert!(
                strays_in_chroots(&base, other, &[]).is_empty(),
                "uid not in range"
            );
        }
        fs::write(root.join("firecracker.pid"), "not a pid").unwrap();
        assert!(strays_in_chroots(&base, range, &[]).is_empty());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn no_reuse_while_held_and_release_by_owner_only() {
        let mut p = UidPool::new(UidRange {
            base: 900_000,
            count: 3,
        })
        .unwrap();
        let a = p.allocate(id(1), |_| false).unwrap();
        let b = p.allocate(id(2), |_| false).unwrap();
        let c = p.allocate(id(3), |_| false).unwrap();
        assert_eq!((a, b, c), (900_000, 900_001, 900_002));
        assert_eq!(
            p.allocate(id(4), |_| false),
            Err(UidError::Exhausted { count: 3 })
        );
        // Another sandbox cannot release a uid it does not hold.
        p.release(b, id(9));
        assert!(p.allocate(id(4), |_| false).is_err());
        p.release(b, id(2));
        assert_eq!(p.allocate(id(4), |_| false), Ok(b));
        assert_eq!(p.held(), 3);
    }

    #[test]
    fn released_uids_come_last_and_busy_uids_are_skipped() {
        let mut p = UidPool::new(UidRange {
            base: 5000,
            count: 4,
        })
        .unwrap();
        let a = p.allocate(id(1), |_| false).unwrap();
        p.release(a, id(1));
        // The next search starts after `a`.
        assert_eq!(p.allocate(id(2), |_| false), Ok(5001));
        // 5002 has a process running as it (a leftover): skipped.
        assert_eq!(p.allocate(id(3), |u| u == 5002), Ok(5003));
        assert_eq!(p.allocate(id(4), |u| u == 5002), Ok(5000));
    }

    #[test]
    fn a_restarted_agent_marks_live_uids_first() {
        let range = UidRange {
            base: 900_000,
            count: 8,
        };
        let mut before = UidPool::new(range).unwrap();
        let live = before.allocate(id(1), |_| false).unwrap();
        // After a restart: the records' uids are marked before any allocation.
        let mut after = UidPool::new(range).unwrap();
        assert!(after.mark_used(live, id(1)));
        assert!(after.mark_used(live, id(1)), "idempotent for its owner");
        assert!(
            !after.mark_used(live, id(2)),
            "a second sandbox with the same uid"
        );
        assert!(!after.mark_used(899_999, id(3)), "outside the range");
        for n in 2..9 {
            assert_ne!(after.allocate(id(n), |_| false).unwrap(), live);
        }
    }

    #[test]
    fn bad_ranges() {
        for r in [(900_000, 0), (0, 10), (999, 1), (u32::MAX - 5, 10)] {
            assert!(UidPool::new(UidRange {
                base: r.0,
                count: r.1
            })
            .is_err());
        }
    }

    #[test]
    fn our_own_uid_has_a_process() {
        let me = fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|v| v.split_whitespace().next().unwrap().parse::<u32>().unwrap())
            })
            .unwrap();
        assert!(uid_has_process(me));
        assert!(!uid_has_process(4_000_000_000));
    }
}
