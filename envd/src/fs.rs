//! File operations on behalf of a user.
//!
//! Permission model: every operation that resolves a path (open, create, mkdir, rename,
//! unlink, stat, readdir) runs with the thread's filesystem identity switched to the user's
//! — `setfsuid`/`setfsgid` and the supplementary groups, set per thread through the raw
//! system calls (glibc's `setgroups` wrapper would change every thread of envd). The kernel
//! then makes every decision itself: there is no access check of ours that could disagree
//! with it, and a file created this way is owned by the user. Switching the fsuid away from
//! 0 also drops CAP_DAC_OVERRIDE/CAP_CHOWN/CAP_FOWNER from the thread's effective set, so a
//! root envd acting for `nobody` gets exactly `nobody`'s rights. Reading and writing an
//! already-open fd needs no identity.
//!
//! Paths arrive as bytes: they must be absolute and free of NUL; non-UTF-8 bytes are fine
//! (Linux paths are bytes); callers that must put a name into a protobuf `string` use
//! [`name_to_utf8`], which rejects non-UTF-8 names with a clear error.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::limits::{LIST_DEPTH_MAX, LIST_ENTRIES_MAX, PATH_LEN_MAX, TEMP_NAME_ATTEMPTS};
use crate::passwd::User;

/// What went wrong, as the API reports it (each kind maps to one status code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    InvalidArgument,
    DirectoryNotEmpty,
    NoSpace,
    TooMany,
    Other,
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    /// The failed action and its path, e.g. `open /etc/shadow`.
    pub context: String,
    pub source: Option<io::Error>,
}

impl Error {
    pub fn new(kind: ErrorKind, context: String) -> Error {
        Error {
            kind,
            context,
            source: None,
        }
    }

    pub fn from_io(action: &str, path: &Path, source: io::Error) -> Error {
        Error::io(action, path, source)
    }

    fn io(action: &str, path: &Path, source: io::Error) -> Error {
        let kind = match source.raw_os_error() {
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                ErrorKind::PermissionDenied
            }
            Some(libc::EEXIST) => ErrorKind::AlreadyExists,
            Some(libc::ENOTDIR) => ErrorKind::NotADirectory,
            Some(libc::EISDIR) => ErrorKind::IsADirectory,
            Some(libc::EINVAL)
            | Some(libc::ENAMETOOLONG)
            | Some(libc::ELOOP)
            | Some(libc::EXDEV) => ErrorKind::InvalidArgument,
            Some(libc::ENOTEMPTY) => ErrorKind::DirectoryNotEmpty,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            _ => ErrorKind::Other,
        };
        Error {
            kind,
            context: format!("{action} {}", path.display()),
            source: Some(source),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}: {s}", self.context),
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Checks a path from a client: absolute, no NUL, at most PATH_MAX bytes. Non-UTF-8 bytes
/// are allowed.
pub fn check_path(bytes: &[u8]) -> Result<PathBuf, Error> {
    let shown = String::from_utf8_lossy(bytes);
    if bytes.is_empty() {
        return Err(Error::new(ErrorKind::InvalidArgument, "empty path".into()));
    }
    if bytes.contains(&0) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("path {shown:?} contains a NUL byte"),
        ));
    }
    if bytes[0] != b'/' {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("path {shown:?} is not absolute"),
        ));
    }
    if bytes.len() > PATH_LEN_MAX {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("path longer than {PATH_LEN_MAX} bytes"),
        ));
    }
    Ok(PathBuf::from(OsString::from_vec(bytes.to_vec())))
}

/// A path as UTF-8, for messages whose fields are protobuf strings.
pub fn name_to_utf8(p: &Path) -> Result<String, Error> {
    p.to_str().map(str::to_string).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "path {:?} is not valid UTF-8 and cannot be sent in a string field",
                p.to_string_lossy()
            ),
        )
    })
}

/// Runs `f` with the calling thread's filesystem identity switched to `user`, restoring
/// envd's afterwards (also when `f` panics).
pub fn as_user<T>(user: &User, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    let _guard = Identity::switch(user)?;
    f()
}

struct Identity {
    saved_groups: Option<Vec<libc::gid_t>>,
    saved_fsuid: libc::uid_t,
    saved_fsgid: libc::gid_t,
    switched: bool,
}

fn raw_setfsuid(uid: libc::uid_t) -> libc::uid_t {
    // SAFETY: setfsuid takes an integer and returns the previous fsuid; it cannot fail in
    // a way that touches memory. Raw syscall: affects only this thread.
    unsafe { libc::syscall(libc::SYS_setfsuid, uid) as libc::uid_t }
}

fn raw_setfsgid(gid: libc::gid_t) -> libc::gid_t {
    // SAFETY: as raw_setfsuid.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid) as libc::gid_t }
}

fn raw_setgroups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe `groups`. The raw syscall changes only the
    // calling thread's credentials (glibc's wrapper would broadcast to all threads).
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn getgroups() -> io::Result<Vec<libc::gid_t>> {
    let mut v = vec![0 as libc::gid_t; 512];
    // SAFETY: the pointer and length describe `v`.
    let n = unsafe { libc::getgroups(v.len() as libc::c_int, v.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    v.truncate(n as usize);
    Ok(v)
}

impl Identity {
    fn switch(user: &User) -> Result<Identity, Error> {
        let denied = |m: String| Err(Error::new(ErrorKind::PermissionDenied, m));
        // -1 is not a valid id: the call only reports the current value.
        let fsuid = raw_setfsuid(u32::MAX);
        let fsgid = raw_setfsgid(u32::MAX);
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            if user.uid != euid {
                return denied(format!(
                    "envd runs as uid {euid}, not root: cannot act as user {:?}",
                    user.name
                ));
            }
            return Ok(Identity {
                saved_groups: None,
                saved_fsuid: fsuid,
                saved_fsgid: fsgid,
                switched: false,
            });
        }
        let saved_groups = getgroups().map_err(|e| Error::io("getgroups", Path::new(""), e))?;
        raw_setgroups(&user.groups).map_err(|e| Error::io("setgroups", Path::new(""), e))?;
        let mut id = Identity {
            saved_groups: Some(saved_groups),
            saved_fsuid: fsuid,
            saved_fsgid: fsgid,
            switched: true,
        };
        raw_setfsgid(user.gid);
        raw_setfsuid(user.uid);
        if raw_setfsuid(u32::MAX) != user.uid || raw_setfsgid(u32::MAX) != user.gid {
            id.restore();
            id.switched = false;
            return denied(format!("cannot switch to user {:?}", user.name));
        }
        Ok(id)
    }

    fn restore(&mut self) {
        raw_setfsuid(self.saved_fsuid);
        raw_setfsgid(self.saved_fsgid);
        if let Some(g) = &self.saved_groups {
            // Restoring groups we held a moment ago can only fail if envd lost CAP_SETGID,
            // which nothing in envd drops.
            if let Err(e) = raw_setgroups(g) {
                log::error!("restore supplementary groups failed error={e}");
            }
        }
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        if self.switched {
            self.restore();
        }
    }
}

/// Kind of a directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

/// What stat and list report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub file_type: FileType,
    pub size: u64,
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    pub symlink_target: Option<PathBuf>,
    /// Listing only: this directory's entries could not be read (they are missing).
    pub error: Option<String>,
}

fn entry(path: &Path, md: &std::fs::Metadata) -> Entry {
    let ft = md.file_type();
    let file_type = if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_dir() {
        FileType::Dir
    } else if ft.is_file() {
        FileType::File
    } else {
        FileType::Other
    };
    Entry {
        path: path.to_path_buf(),
        file_type,
        size: md.len(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
        symlink_target: if ft.is_symlink() {
            std::fs::read_link(path).ok()
        } else {
            None
        },
        error: None,
    }
}

/// Stat; with `follow`, a final symlink is followed (stat), else described (lstat).
pub fn stat(user: &User, path: &Path, follow: bool) -> Result<Entry, Error> {
    as_user(user, || {
        let md = if follow {
            std::fs::metadata(path)
        } else {
            std::fs::symlink_metadata(path)
        }
        .map_err(|e| Error::io("stat", path, e))?;
        Ok(entry(path, &md))
    })
}

/// Lists a directory down to `depth` levels (1 = its entries), sorted by path; symlinks are
/// not followed. At most [`LIST_ENTRIES_MAX`] entries.
pub fn list(user: &User, path: &Path, depth: u32) -> Result<Vec<Entry>, Error> {
    if depth == 0 || depth > LIST_DEPTH_MAX {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("depth must be 1..={LIST_DEPTH_MAX}"),
        ));
    }
    as_user(user, || {
        let md = std::fs::metadata(path).map_err(|e| Error::io("list", path, e))?;
        if !md.is_dir() {
            return Err(Error::new(
                ErrorKind::NotADirectory,
                format!("list {}: not a directory", path.display()),
            ));
        }
        let mut out = Vec::new();
        let rd = std::fs::read_dir(path).map_err(|e| Error::io("list", path, e))?;
        walk(path, rd, depth, &mut out)?;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    })
}

fn walk(dir: &Path, rd: std::fs::ReadDir, depth: u32, out: &mut Vec<Entry>) -> Result<(), Error> {
    for de in rd {
        let de = de.map_err(|e| Error::io("list", dir, e))?;
        let p = de.path();
        let md = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(_) => continue, // vanished meanwhile
        };
        if out.len() >= LIST_ENTRIES_MAX {
            return Err(Error::new(
                ErrorKind::TooMany,
                format!(
                    "list {}: more than {LIST_ENTRIES_MAX} entries",
                    dir.display()
                ),
            ));
        }
        let is_dir = md.is_dir();
        out.push(entry(&p, &md));
        if is_dir && depth > 1 {
            match std::fs::read_dir(&p) {
                Ok(sub) => walk(&p, sub, depth - 1, out)?,
                // Listed, but its contents are reported missing (the listing goes on).
                Err(e) => {
                    if let Some(last) = out.iter_mut().rev().find(|x| x.path == p) {
                        last.error = Some(Error::io("list", &p, e).to_string());
                    }
                }
            }
        }
    }
    Ok(())
}

/// `mkdir -p` with `mode` for created directories. Returns false if it already existed.
pub fn mkdir_all(user: &User, path: &Path, mode: u32) -> Result<bool, Error> {
    as_user(user, || {
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.is_dir() => return Ok(false),
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("mkdir {}: exists and is not a directory", path.display()),
                ))
            }
            Err(_) => {}
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode & 0o7777)
            .create(path)
            .map_err(|e| Error::io("mkdir", path, e))?;
        Ok(true)
    })
}

/// Renames `from` to `to`. With `overwrite`, an existing `to` (a file, or an empty
/// directory) is replaced as rename(2) does; without it, an existing `to` is AlreadyExists
/// (renameat2 RENAME_NOREPLACE, so there is no check-then-rename race). Across filesystems
/// (EXDEV, e.g. from the guest's tmpfs /tmp to its disk) a regular file is copied into
/// place atomically and the source removed; a directory is InvalidArgument (envd does not
/// copy trees).
pub fn rename(user: &User, from: &Path, to: &Path, overwrite: bool) -> Result<(), Error> {
    let what = format!("move {} to", from.display());
    let r = as_user(user, || {
        if overwrite {
            std::fs::rename(from, to).map_err(|e| Error::io(&what, to, e))
        } else {
            rename_noreplace(from, to).map_err(|e| Error::io(&what, to, e))
        }
    });
    match r {
        Err(e) if e.source.as_ref().and_then(|s| s.raw_os_error()) == Some(libc::EXDEV) => {
            move_file_across(user, from, to, overwrite)
        }
        other => other,
    }
}

/// The EXDEV fallback of [`rename`] for a regular file: copy, then remove the source.
fn move_file_across(user: &User, from: &Path, to: &Path, overwrite: bool) -> Result<(), Error> {
    let md = stat(user, from, false)?;
    if md.file_type != FileType::File {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "move {} to {}: only files move across filesystems",
                from.display(),
                to.display()
            ),
        ));
    }
    let mut reader = open_read(user, from, 0, None)?;
    let opts = WriteOptions {
        mode: Some(md.mode),
        exclusive: !overwrite,
        ..Default::default()
    };
    let mut w = AtomicWriter::create(user, to, opts)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read_chunk(&mut buf)?;
        if n == 0 {
            break;
        }
        w.write(&buf[..n])?;
    }
    w.commit()?;
    as_user(user, || {
        std::fs::remove_file(from).map_err(|e| Error::io("remove", from, e))
    })
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call; AT_FDCWD directory fds.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes a file, symlink or (empty, or with `recursive` any) directory.
pub fn remove(user: &User, path: &Path, recursive: bool) -> Result<(), Error> {
    if path == Path::new("/") {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "remove /: refused".into(),
        ));
    }
    as_user(user, || {
        let md = std::fs::symlink_metadata(path).map_err(|e| Error::io("remove", path, e))?;
        let r = if md.is_dir() {
            if recursive {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_dir(path)
            }
        } else {
            std::fs::remove_file(path)
        };
        r.map_err(|e| Error::io("remove", path, e))
    })
}

/// An open file being read in a range.
pub struct Reader {
    file: File,
    remaining: u64,
}

impl Reader {
    /// Fills `buf` with the next bytes of the range; 0 = done.
    pub fn read_chunk(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let want = (buf.len() as u64).min(self.remaining) as usize;
        if want == 0 {
            return Ok(0);
        }
        loop {
            match self.file.read(&mut buf[..want]) {
                Ok(n) => {
                    self.remaining -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", Path::new(""), e)),
            }
        }
    }

    /// Bytes the range still holds (at most; the file may be shorter).
    pub fn remaining(&self) -> u64 {
        self.remaining
    }
}

/// Opens `path` for reading from `offset`, at most `length` bytes (None = to the end).
pub fn open_read(
    user: &User,
    path: &Path,
    offset: u64,
    length: Option<u64>,
) -> Result<Reader, Error> {
    let mut file = as_user(user, || {
        File::open(path).map_err(|e| Error::io("open", path, e))
    })?;
    let md = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    if md.is_dir() {
        return Err(Error::new(
            ErrorKind::IsADirectory,
            format!("read {}: is a directory", path.display()),
        ));
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io("seek", path, e))?;
    Ok(Reader {
        file,
        remaining: length.unwrap_or(u64::MAX),
    })
}

/// Options of an atomic write.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOptions {
    /// Permission bits of the new file; None = those of the file it replaces, else 0644.
    pub mode: Option<u32>,
    /// Owner to set (needs the privilege to chown, judged by the kernel as the user).
    pub owner: Option<(u32, u32)>,
    /// Create missing parent directories.
    pub make_parents: bool,
    /// Fail with AlreadyExists when the target exists.
    pub exclusive: bool,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A write in progress: data goes to a temporary file in the target's directory; `commit`
/// fsyncs it and renames it over the target, so readers see the old or the new file,
/// never a mix. Dropped without commit, the temporary file is removed.
pub struct AtomicWriter {
    user: User,
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    mode: u32,
    owner: Option<(u32, u32)>,
    exclusive: bool,
    written: u64,
}

impl AtomicWriter {
    pub fn create(user: &User, target: &Path, opts: WriteOptions) -> Result<AtomicWriter, Error> {
        let (dir, name) = match (target.parent(), target.file_name()) {
            (Some(d), Some(n)) => (d.to_path_buf(), n.to_os_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("write {}: not a file path", target.display()),
                ))
            }
        };
        as_user(user, || {
            if opts.exclusive && std::fs::symlink_metadata(target).is_ok() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("write {}: exists", target.display()),
                ));
            }
            let existing_mode = match std::fs::metadata(target) {
                Ok(md) if md.is_dir() => {
                    return Err(Error::new(
                        ErrorKind::IsADirectory,
                        format!("write {}: is a directory", target.display()),
                    ))
                }
                Ok(md) => Some(md.mode() & 0o7777),
                Err(_) => None,
            };
            if opts.make_parents {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&dir)
                    .map_err(|e| Error::io("mkdir", &dir, e))?;
            }
            let mode = opts
                .mode
                .map(|m| m & 0o7777)
                .or(existing_mode)
                .unwrap_or(0o644);
            for _ in 0..TEMP_NAME_ATTEMPTS {
                let mut tname = OsString::from(".");
                tname.push(&name);
                tname.push(format!(
                    ".wrenn-tmp-{}-{}",
                    std::process::id(),
                    TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
                ));
                let temp = dir.join(&tname);
                // Readable too, so `stored_crc32` can read back what was written.
                match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&temp)
                {
                    Ok(file) => {
                        return Ok(AtomicWriter {
                            user: user.clone(),
                            target: target.to_path_buf(),
                            temp,
                            file: Some(file),
                            mode,
                            owner: opts.owner,
                            exclusive: opts.exclusive,
                            written: 0,
                        })
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(Error::io("create a temporary file in", &dir, e)),
                }
            }
            Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("no free temporary name in {}", dir.display()),
            ))
        })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Other, "write after commit".into()))?;
        file.write_all(data)
            .map_err(|e| Error::io("write", &self.temp, e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// The CRC-32 of the bytes stored in the temporary file, read back through the open
    /// file in `buf`-sized chunks: the checksum of what the kernel holds, not of what was
    /// handed to `write`, so a copy that went wrong on the way into the page cache shows.
    pub fn stored_crc32(&self, buf: &mut [u8]) -> Result<u32, Error> {
        use std::os::unix::fs::FileExt;
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Other, "read back after commit".into()))?;
        let mut crc = crc32fast::Hasher::new();
        let mut at = 0u64;
        while at < self.written {
            let want = (buf.len() as u64).min(self.written - at) as usize;
            let n = match file.read_at(&mut buf[..want], at) {
                Ok(0) => {
                    return Err(Error::new(
                        ErrorKind::Other,
                        format!(
                            "read back {}: {at} of {} bytes",
                            self.temp.display(),
                            self.written
                        ),
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("read back", &self.temp, e)),
            };
            crc.update(&buf[..n]);
            at += n as u64;
        }
        Ok(crc.finalize())
    }

    /// The temporary file's path (tests look for leftovers by it).
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Makes the data durable and visible at the target path.
    pub fn commit(mut self) -> Result<u64, Error> {
        let file = self
            .file
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Other, "commit twice".into()))?;
        let (temp, target, mode, owner, exclusive) = (
            self.temp.clone(),
            self.target.clone(),
            self.mode,
            self.owner,
            self.exclusive,
        );
        let r = as_user(&self.user, || {
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io("chmod", &temp, e))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                    .map_err(|e| Error::io("chown", &temp, e))?;
                // chown clears setuid/setgid bits: set the mode again.
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| Error::io("chmod", &temp, e))?;
            }
            file.sync_all().map_err(|e| Error::io("fsync", &temp, e))?;
            if exclusive {
                rename_noreplace(&temp, &target)
            } else {
                std::fs::rename(&temp, &target)
            }
            .map_err(|e| Error::io("rename over", &target, e))?;
            // Make the rename durable; a directory the user cannot open for reading is
            // still renamed, just without this fsync.
            if let Some(dir) = target.parent() {
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        });
        if r.is_err() {
            let _ = as_user(&self.user, || {
                let _ = std::fs::remove_file(&self.temp);
                Ok(())
            });
        }
        // The temp name is gone either way; Drop must not remove a file of that name.
        self.temp = PathBuf::new();
        r.map(|()| self.written)
    }
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if self.file.is_some() && !self.temp.as_os_str().is_empty() {
            let user = self.user.clone();
            let temp = std::mem::take(&mut self.temp);
            let _ = as_user(&user, || {
                let _ = std::fs::remove_file(&temp);
                Ok(())
            });
        }
    }
}

/// A write in place (not atomic): where and how to open.
#[derive(Clone, Copy, Debug, Default)]
pub struct InPlace {
    pub offset: u64,
    /// Truncate the file to `offset` first.
    pub truncate: bool,
    /// Mode of a new file (default 0644), also applied to an existing one when set.
    pub mode: Option<u32>,
    pub owner: Option<(u32, u32)>,
    pub make_parents: bool,
    /// Fail with AlreadyExists when the file exists.
    pub exclusive: bool,
}

/// Opens (creating if needed) a file for writing in place at `opts.offset`.
pub fn open_write(user: &User, path: &Path, opts: InPlace) -> Result<File, Error> {
    let mut f = as_user(user, || {
        if opts.make_parents {
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(dir)
                    .map_err(|e| Error::io("mkdir", dir, e))?;
            }
        }
        let mut oo = OpenOptions::new();
        oo.write(true)
            .mode(opts.mode.unwrap_or(0o644) & 0o7777)
            .custom_flags(libc::O_CLOEXEC);
        if opts.exclusive {
            oo.create_new(true);
        } else {
            oo.create(true);
        }
        let f = oo.open(path).map_err(|e| Error::io("open", path, e))?;
        if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(Error::new(
                ErrorKind::IsADirectory,
                format!("write {}: is a directory", path.display()),
            ));
        }
        if let Some(m) = opts.mode {
            f.set_permissions(std::fs::Permissions::from_mode(m & 0o7777))
                .map_err(|e| Error::io("chmod", path, e))?;
        }
        if let Some((uid, gid)) = opts.owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                .map_err(|e| Error::io("chown", path, e))?;
        }
        Ok(f)
    })?;
    if opts.truncate {
        f.set_len(opts.offset)
            .map_err(|e| Error::io("truncate", path, e))?;
    }
    f.seek(SeekFrom::Start(opts.offset))
        .map_err(|e| Error::io("seek", path, e))?;
    Ok(f)
}

/// Opens an existing file for writing in place at `offset` (ranged writes are not atomic).
pub fn open_write_at(user: &User, path: &Path, offset: u64) -> Result<File, Error> {
    let mut f = as_user(user, || {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io("open", path, e))
    })?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io("seek", path, e))?;
    Ok(f)
}

/// How [`kernel_copy`] moves the bytes: both stay inside the kernel (no user-space buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelCopy {
    /// copy_file_range(2).
    CopyFileRange,
    /// sendfile(2) with a regular file as the destination.
    Sendfile,
}

/// Copies `len` bytes from the start of `from` to the start of `to` without passing them
/// through user space (the copy self-test's kernel-only path). Returns the bytes copied,
/// fewer only when `from` is shorter.
pub fn kernel_copy(from: &File, to: &File, len: u64, how: KernelCopy) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let (src, dst) = (from.as_raw_fd(), to.as_raw_fd());
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(1 << 30) as usize;
        let mut off_in = done as libc::loff_t;
        let mut off_out = done as libc::loff_t;
        let r = match how {
            // SAFETY: two open fds borrowed for the call; the offsets are valid locals the
            // kernel updates.
            KernelCopy::CopyFileRange => unsafe {
                libc::copy_file_range(src, &mut off_in, dst, &mut off_out, want, 0)
            },
            KernelCopy::Sendfile => {
                // sendfile writes at the destination's file position.
                let mut t = to;
                t.seek(SeekFrom::Start(done))?;
                let mut off = done as libc::off_t;
                // SAFETY: two open fds borrowed for the call; `off` is a valid local.
                unsafe { libc::sendfile(dst, src, &mut off, want) }
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        done += r as u64;
    }
    Ok(done)
}

/// The final component of a path as bytes (for listings).
pub fn file_name_bytes(p: &Path) -> &[u8] {
    p.file_name().unwrap_or(OsStr::new("")).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passwd::Db;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("envd-fs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn me() -> User {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        Db::load(Path::new("/"))
            .unwrap()
            .user(&uid.to_string())
            .unwrap()
    }

    fn nobody() -> Option<User> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::testing::skip("not root, cannot act as nobody");
            return None;
        }
        Some(Db::load(Path::new("/")).unwrap().user("nobody").unwrap())
    }

    #[test]
    fn path_checks() {
        assert_eq!(
            check_path(b"").unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            check_path(b"rel/x").unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            check_path(b"/a\0b").unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            check_path(&vec![b'/'; PATH_LEN_MAX + 1]).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        let p = check_path(b"/tmp/\xff\xfe").unwrap();
        assert_eq!(p.as_os_str().as_bytes(), b"/tmp/\xff\xfe");
        let e = name_to_utf8(&p).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("not valid UTF-8"));
    }

    #[test]
    fn mkdir_list_stat_move_remove() {
        let u = me();
        let d = tmpdir("ops");
        assert!(mkdir_all(&u, &d.join("a/b/c"), 0o755).unwrap());
        assert!(!mkdir_all(&u, &d.join("a/b/c"), 0o755).unwrap());
        std::fs::write(d.join("a/f"), b"12345").unwrap();
        std::os::unix::fs::symlink("f", d.join("a/link")).unwrap();
        assert_eq!(
            mkdir_all(&u, &d.join("a/f"), 0o755).unwrap_err().kind,
            ErrorKind::AlreadyExists
        );
        let one = list(&u, &d.join("a"), 1).unwrap();
        let names: Vec<_> = one
            .iter()
            .map(|e| e.path.strip_prefix(&d).unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            vec![PathBuf::from("a/b"), "a/f".into(), "a/link".into()]
        );
        assert_eq!(one[1].size, 5);
        assert_eq!(one[2].file_type, FileType::Symlink);
        assert_eq!(one[2].symlink_target, Some(PathBuf::from("f")));
        assert_eq!(list(&u, &d.join("a"), 3).unwrap().len(), 4);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // An unreadable subdirectory is listed with an error; the listing goes on.
            if let Some(nb) = nobody() {
                let mode = |p: &Path, m| {
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
                };
                mode(&d.join("a/b"), 0o700);
                mode(&d, 0o755);
                mode(&d.join("a"), 0o755);
                let l = list(&nb, &d.join("a"), 3).unwrap();
                assert_eq!(l.len(), 3);
                assert!(l[0].error.as_deref().unwrap().contains("denied"), "{l:?}");
                mode(&d.join("a/b"), 0o755);
            }
        }
        assert_eq!(
            list(&u, &d.join("a/f"), 1).unwrap_err().kind,
            ErrorKind::NotADirectory
        );
        assert_eq!(
            list(&u, &d.join("nope"), 1).unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            list(&u, &d, 0).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        let st = stat(&u, &d.join("a/f"), false).unwrap();
        assert_eq!(
            stat(&u, &d.join("a/link"), true).unwrap().file_type,
            FileType::File
        );
        assert_eq!((st.file_type, st.size), (FileType::File, 5));
        std::fs::write(d.join("g"), b"old").unwrap();
        assert_eq!(
            rename(&u, &d.join("a/f"), &d.join("g"), false)
                .unwrap_err()
                .kind,
            ErrorKind::AlreadyExists
        );
        rename(&u, &d.join("a/f"), &d.join("g"), true).unwrap();
        assert_eq!(std::fs::read(d.join("g")).unwrap(), b"12345");
        assert_eq!(
            stat(&u, &d.join("a/f"), false).unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            remove(&u, &d.join("a"), false).unwrap_err().kind,
            ErrorKind::DirectoryNotEmpty
        );
        remove(&u, &d.join("a"), true).unwrap();
        remove(&u, &d.join("g"), false).unwrap();
        assert_eq!(
            remove(&u, &d.join("g"), false).unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            remove(&u, Path::new("/"), true).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn moves_files_across_filesystems() {
        let u = me();
        let d = tmpdir("xdev");
        let shm = Path::new("/dev/shm");
        let (Ok(a), Ok(b)) = (std::fs::metadata(&d), std::fs::metadata(shm)) else {
            return crate::testing::skip("no /dev/shm");
        };
        if a.dev() == b.dev() {
            // Not an end-to-end part: this host simply has no second filesystem here.
            proto::skip::note("envd fs", "/dev/shm and the temp dir share a filesystem");
            return;
        }
        let src = shm.join(format!("envd-xdev-{}", std::process::id()));
        std::fs::write(&src, b"across").unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::write(d.join("taken"), b"x").unwrap();
        assert_eq!(
            rename(&u, &src, &d.join("taken"), false).unwrap_err().kind,
            ErrorKind::AlreadyExists
        );
        rename(&u, &src, &d.join("moved"), false).unwrap();
        assert!(!src.exists());
        assert_eq!(std::fs::read(d.join("moved")).unwrap(), b"across");
        assert_eq!(
            std::fs::metadata(d.join("moved")).unwrap().mode() & 0o777,
            0o640
        );
        let sdir = shm.join(format!("envd-xdev-dir-{}", std::process::id()));
        std::fs::create_dir(&sdir).unwrap();
        assert_eq!(
            rename(&u, &sdir, &d.join("dir"), false).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        std::fs::remove_dir(&sdir).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn ranged_reads() {
        let u = me();
        let d = tmpdir("read");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(d.join("f"), &data).unwrap();
        let read_all = |off, len| {
            let mut r = open_read(&u, &d.join("f"), off, len).unwrap();
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let n = r.read_chunk(&mut buf).unwrap();
                if n == 0 {
                    return out;
                }
                out.extend_from_slice(&buf[..n]);
            }
        };
        assert_eq!(read_all(0, None), data);
        assert_eq!(read_all(1000, Some(70_000)), data[1000..71_000]);
        assert_eq!(read_all(199_990, Some(100)), data[199_990..]);
        assert!(read_all(300_000, None).is_empty());
        assert_eq!(
            open_read(&u, &d, 0, None).err().unwrap().kind,
            ErrorKind::IsADirectory
        );
        assert_eq!(
            open_read(&u, &d.join("f/x"), 0, None).err().unwrap().kind,
            ErrorKind::NotADirectory
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn atomic_writes() {
        let u = me();
        let d = tmpdir("write");
        let target = d.join("sub/out");
        assert_eq!(
            AtomicWriter::create(&u, &target, WriteOptions::default())
                .err()
                .unwrap()
                .kind,
            ErrorKind::NotFound
        );
        let opts = WriteOptions {
            mode: Some(0o640),
            make_parents: true,
            ..Default::default()
        };
        let mut w = AtomicWriter::create(&u, &target, opts).unwrap();
        w.write(b"hello ").unwrap();
        w.write(b"world").unwrap();
        assert!(!target.exists());
        assert_eq!(w.commit().unwrap(), 11);
        assert_eq!(std::fs::read(&target).unwrap(), b"hello world");
        let md = std::fs::metadata(&target).unwrap();
        assert_eq!(md.mode() & 0o777, 0o640);
        // Replacing keeps the old mode when none is given; an abandoned write leaves no trace.
        let mut w = AtomicWriter::create(&u, &target, WriteOptions::default()).unwrap();
        w.write(b"x").unwrap();
        w.commit().unwrap();
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o640);
        let mut w = AtomicWriter::create(&u, &target, WriteOptions::default()).unwrap();
        w.write(b"partial").unwrap();
        drop(w);
        assert_eq!(std::fs::read(&target).unwrap(), b"x");
        assert_eq!(std::fs::read_dir(d.join("sub")).unwrap().count(), 1);
        assert_eq!(
            AtomicWriter::create(&u, &d, WriteOptions::default())
                .err()
                .unwrap()
                .kind,
            ErrorKind::IsADirectory
        );
        let mut f = open_write_at(&u, &target, 1).unwrap();
        f.write_all(b"yz").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"xyz");
        let ex = WriteOptions {
            exclusive: true,
            ..Default::default()
        };
        assert_eq!(
            AtomicWriter::create(&u, &target, ex).err().unwrap().kind,
            ErrorKind::AlreadyExists
        );
        let ip = InPlace {
            offset: 2,
            truncate: true,
            ..Default::default()
        };
        let mut f = open_write(&u, &target, ip).unwrap();
        f.write_all(b"Q").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"xyQ");
        let ip = InPlace {
            exclusive: true,
            ..Default::default()
        };
        assert_eq!(
            open_write(&u, &target, ip).err().unwrap().kind,
            ErrorKind::AlreadyExists
        );
        let ip = InPlace {
            mode: Some(0o600),
            make_parents: true,
            ..Default::default()
        };
        open_write(&u, &d.join("p/q/new"), ip)
            .unwrap()
            .write_all(b"n")
            .unwrap();
        assert_eq!(
            std::fs::metadata(d.join("p/q/new")).unwrap().mode() & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn stored_checksum_reads_back_what_the_file_holds() {
        let u = me();
        let d = tmpdir("readback");
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 253) as u8).collect();
        let mut w = AtomicWriter::create(&u, &d.join("f"), WriteOptions::default()).unwrap();
        w.write(&data[..70_000]).unwrap();
        w.write(&data[70_000..]).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        assert_eq!(w.stored_crc32(&mut buf).unwrap(), crc32fast::hash(&data));
        // A change to the stored bytes (what a faulty copy into the page cache would leave)
        // shows in the read-back checksum, though the bytes handed over were right.
        let other = OpenOptions::new().write(true).open(w.temp_path()).unwrap();
        std::os::unix::fs::FileExt::write_at(&other, &[0u8; 16], 100_000).unwrap();
        assert_ne!(w.stored_crc32(&mut buf).unwrap(), crc32fast::hash(&data));
        // A file shorter than what was written is an error, not a wrong checksum.
        other.set_len(10).unwrap();
        assert_eq!(w.stored_crc32(&mut buf).unwrap_err().kind, ErrorKind::Other);
        drop(w);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn acts_with_the_users_rights() {
        let Some(nobody) = nobody() else { return };
        let root = me();
        let d = tmpdir("perm");
        std::fs::write(d.join("secret"), b"s").unwrap();
        std::fs::set_permissions(d.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            open_read(&nobody, &d.join("secret"), 0, None)
                .err()
                .unwrap()
                .kind,
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            AtomicWriter::create(&nobody, &d.join("new"), WriteOptions::default())
                .err()
                .unwrap()
                .kind,
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            mkdir_all(&nobody, &d.join("x"), 0o755).unwrap_err().kind,
            ErrorKind::PermissionDenied
        );
        // In a directory nobody may write to, files get nobody's ownership.
        std::fs::create_dir(d.join("open")).unwrap();
        std::fs::set_permissions(d.join("open"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut w =
            AtomicWriter::create(&nobody, &d.join("open/f"), WriteOptions::default()).unwrap();
        w.write(b"n").unwrap();
        w.commit().unwrap();
        let md = std::fs::metadata(d.join("open/f")).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534));
        let mut w = AtomicWriter::create(
            &nobody,
            &d.join("open/g"),
            WriteOptions {
                owner: Some((0, 0)),
                ..Default::default()
            },
        )
        .unwrap();
        w.write(b"n").unwrap();
        assert_eq!(w.commit().unwrap_err().kind, ErrorKind::PermissionDenied);
        assert!(!d.join("open/g").exists());
        // The thread is root again afterwards.
        assert_eq!(
            open_read(&root, &d.join("secret"), 0, None)
                .unwrap()
                .remaining(),
            u64::MAX
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_writers_never_mix() {
        let u = me();
        let d = tmpdir("conc");
        let target = d.join("f");
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let (u, target) = (u.clone(), target.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let mut w =
                            AtomicWriter::create(&u, &target, WriteOptions::default()).unwrap();
                        for _ in 0..16 {
                            w.write(&[b'a' + i; 4096]).unwrap();
                        }
                        w.commit().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let data = std::fs::read(&target).unwrap();
        assert_eq!(data.len(), 16 * 4096);
        assert!(data.iter().all(|&b| b == data[0]));
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
