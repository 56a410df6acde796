//! Directory watches on inotify, optionally recursive (new subdirectories are followed as
//! they appear).

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fs::{as_user, Error, ErrorKind};
use crate::limits::{WATCH_DIRS_MAX, WATCH_EVENTS_MAX};
use crate::passwd::User;

/// Kind of change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Create,
    Write,
    CloseWrite,
    Remove,
    RenameFrom,
    RenameTo,
    Chmod,
    /// Events were lost; the path is the watched root.
    Overflow,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub path: PathBuf,
    pub is_dir: bool,
    pub cookie: u32,
}

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW;

/// Size of `struct inotify_event` without its name.
const EVENT_HEADER_LEN: usize = 16;
const _: () = assert!(std::mem::size_of::<libc::inotify_event>() == EVENT_HEADER_LEN);

/// One record from the inotify fd, before its path is resolved.
#[derive(Debug, PartialEq, Eq)]
pub struct RawEvent<'a> {
    pub wd: i32,
    pub mask: u32,
    pub cookie: u32,
    pub name: &'a [u8],
}

/// Splits a buffer read from an inotify fd into records. Truncated trailing bytes are
/// ignored (the kernel never returns partial records). Public for the fuzz target.
pub fn parse_events(buf: &[u8]) -> Vec<RawEvent<'_>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while buf.len() - at >= EVENT_HEADER_LEN {
        let word = |i: usize| {
            let b = &buf[at + i * 4..at + i * 4 + 4];
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
        };
        let (wd, mask, cookie, len) = (word(0) as i32, word(1), word(2), word(3) as usize);
        let end = match (at + EVENT_HEADER_LEN).checked_add(len) {
            Some(e) if e <= buf.len() => e,
            _ => break,
        };
        let raw_name = &buf[at + EVENT_HEADER_LEN..end];
        // The name is NUL-padded.
        let name_len = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        out.push(RawEvent {
            wd,
            mask,
            cookie,
            name: &raw_name[..name_len],
        });
        at = end;
    }
    out
}

/// A directory being watched.
pub struct Watch {
    fd: OwnedFd,
    user: User,
    root: PathBuf,
    recursive: bool,
    dirs: HashMap<i32, PathBuf>,
    buf: Vec<u8>,
}

impl Watch {
    /// Starts watching `root` (a directory) as `user`; with `recursive`, every directory
    /// below it too. Changes after this returns are reported.
    pub fn new(user: &User, root: &Path, recursive: bool) -> Result<Watch, Error> {
        // SAFETY: inotify_init1 takes flags and returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(Error::from_io(
                "inotify_init1",
                root,
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut w = Watch {
            fd,
            user: user.clone(),
            root: root.to_path_buf(),
            recursive,
            dirs: HashMap::new(),
            buf: vec![0u8; 64 * 1024],
        };
        let md = as_user(user, || {
            std::fs::metadata(root).map_err(|e| Error::from_io("watch", root, e))
        })?;
        if !md.is_dir() {
            return Err(Error::new(
                ErrorKind::NotADirectory,
                format!("watch {}: not a directory", root.display()),
            ));
        }
        w.add_tree(root.to_path_buf(), true)?;
        Ok(w)
    }

    /// Number of directories watched.
    pub fn dirs(&self) -> usize {
        self.dirs.len()
    }

    fn add_tree(&mut self, dir: PathBuf, top: bool) -> Result<(), Error> {
        let user = self.user.clone();
        as_user(&user, || {
            let mut stack = vec![dir];
            let mut first = top;
            while let Some(d) = stack.pop() {
                match self.add_one(&d) {
                    Ok(()) => {}
                    Err(e) if first => return Err(e),
                    Err(_) => continue, // gone or unreadable: skip it
                }
                first = false;
                if !self.recursive {
                    continue;
                }
                if let Ok(rd) = std::fs::read_dir(&d) {
                    for de in rd.flatten() {
                        if de.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                            stack.push(de.path());
                        }
                    }
                }
            }
            Ok(())
        })
    }

    fn add_one(&mut self, dir: &Path) -> Result<(), Error> {
        if self.dirs.len() >= WATCH_DIRS_MAX {
            return Err(Error::new(
                ErrorKind::TooMany,
                format!("watch: more than {WATCH_DIRS_MAX} directories"),
            ));
        }
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| Error::new(ErrorKind::InvalidArgument, "NUL in path".into()))?;
        // SAFETY: a valid NUL-terminated path and our inotify fd.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(Error::from_io("watch", dir, io::Error::last_os_error()));
        }
        self.dirs.insert(wd, dir.to_path_buf());
        Ok(())
    }

    /// Waits up to `wait` for events and returns them (empty on timeout), oldest first.
    pub fn read(&mut self, wait: Duration) -> Result<Vec<Event>, Error> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, wait.as_millis().min(60_000) as i32) };
        if r <= 0 {
            return Ok(Vec::new());
        }
        let mut events = Vec::new();
        loop {
            // SAFETY: reading into our buffer of the given length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                )
            };
            if n <= 0 {
                break;
            }
            let buf = std::mem::take(&mut self.buf);
            let mut new_dirs = Vec::new();
            for raw in parse_events(&buf[..n as usize]) {
                self.translate(&raw, &mut events, &mut new_dirs);
            }
            self.buf = buf;
            for d in new_dirs {
                if self.add_tree(d, false).is_err() {
                    events.push(self.overflow());
                }
            }
            if events.len() >= WATCH_EVENTS_MAX {
                break;
            }
        }
        Ok(events)
    }

    fn overflow(&self) -> Event {
        Event {
            kind: EventKind::Overflow,
            path: self.root.clone(),
            is_dir: true,
            cookie: 0,
        }
    }

    fn translate(&mut self, raw: &RawEvent<'_>, out: &mut Vec<Event>, new_dirs: &mut Vec<PathBuf>) {
        if raw.mask & libc::IN_Q_OVERFLOW != 0 {
            out.push(self.overflow());
            return;
        }
        if raw.mask & libc::IN_IGNORED != 0 {
            self.dirs.remove(&raw.wd);
            return;
        }
        let Some(dir) = self.dirs.get(&raw.wd) else {
            return;
        };
        let path = if raw.name.is_empty() {
            dir.clone()
        } else {
            dir.join(std::ffi::OsStr::from_bytes(raw.name))
        };
        let is_dir = raw.mask & libc::IN_ISDIR != 0;
        let kind = if raw.mask & libc::IN_CREATE != 0 {
            EventKind::Create
        } else if raw.mask & libc::IN_MODIFY != 0 {
            EventKind::Write
        } else if raw.mask & libc::IN_CLOSE_WRITE != 0 {
            EventKind::CloseWrite
        } else if raw.mask & libc::IN_DELETE != 0 {
            EventKind::Remove
        } else if raw.mask & libc::IN_DELETE_SELF != 0 {
            // Subdirectories' own removal is already reported by their parent.
            if path != self.root {
                return;
            }
            EventKind::Remove
        } else if raw.mask & libc::IN_MOVED_FROM != 0 {
            EventKind::RenameFrom
        } else if raw.mask & libc::IN_MOVED_TO != 0 {
            EventKind::RenameTo
        } else if raw.mask & libc::IN_ATTRIB != 0 {
            EventKind::Chmod
        } else {
            return;
        };
        if self.recursive && is_dir && matches!(kind, EventKind::Create | EventKind::RenameTo) {
            new_dirs.push(path.clone());
        }
        if out.len() < WATCH_EVENTS_MAX {
            out.push(Event {
                kind,
                path,
                is_dir,
                cookie: raw.cookie,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passwd::Db;
    use std::time::Instant;

    fn me() -> User {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        Db::load(Path::new("/"))
            .unwrap()
            .user(&uid.to_string())
            .unwrap()
    }

    fn collect_until(w: &mut Watch, pred: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let mut all = Vec::new();
        let start = Instant::now();
        while !pred(&all) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "events so far: {all:?}"
            );
            all.extend(w.read(Duration::from_millis(100)).unwrap());
        }
        all
    }

    fn has(evs: &[Event], kind: EventKind, p: &Path) -> bool {
        evs.iter().any(|e| e.kind == kind && e.path == p)
    }

    #[test]
    fn parser_handles_records_and_garbage() {
        let mut buf = Vec::new();
        for (wd, name) in [(1i32, &b"abc"[..]), (2, b"")] {
            buf.extend_from_slice(&wd.to_ne_bytes());
            buf.extend_from_slice(&libc::IN_CREATE.to_ne_bytes());
            buf.extend_from_slice(&7u32.to_ne_bytes());
            let padded = if name.is_empty() { 0 } else { 16 };
            buf.extend_from_slice(&(padded as u32).to_ne_bytes());
            let mut n = name.to_vec();
            n.resize(padded, 0);
            buf.extend_from_slice(&n);
        }
        let evs = parse_events(&buf);
        assert_eq!(evs.len(), 2);
        assert_eq!((evs[0].wd, evs[0].name, evs[0].cookie), (1, &b"abc"[..], 7));
        assert_eq!(evs[1].name, b"");
        // A length pointing past the end, and short buffers, stop parsing without panics.
        let mut bad = buf[..16].to_vec();
        bad[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_events(&bad).is_empty());
        for n in 0..buf.len() {
            let _ = parse_events(&buf[..n]);
        }
    }

    #[test]
    fn reports_changes_recursively() {
        let d = std::env::temp_dir().join(format!("envd-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("old")).unwrap();
        let mut w = Watch::new(&me(), &d, true).unwrap();
        assert_eq!(w.dirs(), 2);
        std::fs::write(d.join("f"), b"x").unwrap();
        std::fs::write(d.join("old/g"), b"y").unwrap();
        std::fs::create_dir(d.join("new")).unwrap();
        let evs = collect_until(&mut w, |e| has(e, EventKind::Create, &d.join("new")));
        assert!(has(&evs, EventKind::Create, &d.join("f")));
        assert!(has(&evs, EventKind::CloseWrite, &d.join("f")));
        assert!(has(&evs, EventKind::Create, &d.join("old/g")));
        // The new directory is followed.
        std::fs::write(d.join("new/h"), b"z").unwrap();
        collect_until(&mut w, |e| has(e, EventKind::CloseWrite, &d.join("new/h")));
        std::fs::rename(d.join("f"), d.join("f2")).unwrap();
        std::fs::remove_file(d.join("f2")).unwrap();
        let evs = collect_until(&mut w, |e| has(e, EventKind::Remove, &d.join("f2")));
        let from = evs
            .iter()
            .find(|e| e.kind == EventKind::RenameFrom)
            .unwrap();
        let to = evs.iter().find(|e| e.kind == EventKind::RenameTo).unwrap();
        assert!(from.cookie != 0 && from.cookie == to.cookie);
        std::fs::remove_dir_all(&d).unwrap();
        collect_until(&mut w, |e| has(e, EventKind::Remove, &d));
    }

    #[test]
    fn errors() {
        let u = me();
        assert_eq!(
            Watch::new(&u, Path::new("/no/such/dir"), false)
                .err()
                .unwrap()
                .kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            Watch::new(&u, Path::new("/etc/passwd"), false)
                .err()
                .unwrap()
                .kind,
            ErrorKind::NotADirectory
        );
    }
}
