//! `wrenn image`: builds what a Firecracker guest boots, into the agent's state root
//! (layout in `agent/src/statedir.rs`).
//!
//! - `wrenn image kernel`: an uncompressed `vmlinux` from Debian's `linux-source-<version>`
//!   with the project's own config (`image/kernel/base.config` + `required.fragment`, checked
//!   after `olddefconfig`), installed as `<state-root>/kernels/vmlinux-<release>`.
//! - `wrenn image rootfs`: an ext4 image from a cached debootstrap tree with envd as
//!   `/sbin/init`, published as `<state-root>/templates/<uuid>/rootfs.ext4`.
//!
//! This module shells out to the build tools (apt-get, tar, patch, make, debootstrap,
//! mkfs.ext4); it is host tooling run by an operator as root, never part of a request path.
//! Architecture invariant: a published image or kernel file is never written in place; a new
//! file is built under a temporary name and renamed over (or linked, when it must not exist).

#![forbid(unsafe_code)]

pub mod apt;
pub mod args;
pub mod command;
pub mod kconfig;
pub mod kernel;
pub mod limits;
pub mod rootfs;
pub mod sha256;

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

/// Default state root (the agent's default, `agent/src/statedir.rs`).
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/wrenn";

pub const USAGE: &str = "\
usage: wrenn image kernel [--state-root DIR] [--patches DIR] [--version 6.1] [--jobs N]
                          [--nice N] [--keep-build]
       wrenn image rootfs --envd PATH [--state-root DIR] [--size-mib 5120]
                          [--template-id UUID] [--out PATH] [--force] [--suite bookworm]
                          [--mirror URL] [--hostname NAME] [--nameserver IP]...

kernel: builds <state-root>/kernels/vmlinux-<release> from Debian's linux-source-<version>
        (installed with apt-get if missing); --patches applies DIR/*.patch (patch -p1, in name
        order) first. The result is cached on source version + config + patches.
rootfs: builds <state-root>/templates/<uuid>/rootfs.ext4 (default uuid: all zeros, the minimal
        template) from a cached debootstrap tree, with --envd installed as /sbin/init. An
        existing image is replaced (atomically) only with --force.
";

/// Everything `wrenn image` can fail with.
#[derive(Debug)]
pub enum ImageError {
    Usage(String),
    Args(args::ArgError),
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    Spawn {
        program: String,
        source: io::Error,
    },
    Command {
        command: String,
        status: ExitStatus,
        output_tail: String,
    },
    Config {
        path: PathBuf,
        source: kconfig::ParseError,
    },
    MissingOptions {
        config: PathBuf,
        problems: Vec<kconfig::Problem>,
    },
    NoMirror {
        suite: String,
    },
    Exists {
        path: PathBuf,
    },
    Locked {
        path: PathBuf,
        owner: String,
    },
    BadInput {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    TooSmall {
        size_mib: u64,
        need_mib: u64,
    },
    Unexpected {
        what: &'static str,
        detail: String,
    },
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Usage(m) => write!(f, "{m}"),
            ImageError::Args(_) => write!(f, "bad arguments"),
            ImageError::Io { action, path, .. } => write!(f, "{action} {}", path.display()),
            ImageError::Spawn { program, .. } => write!(f, "start {program}"),
            ImageError::Command {
                command,
                status,
                output_tail,
            } => {
                write!(f, "{command} failed ({status})")?;
                if !output_tail.is_empty() {
                    write!(f, "; last output:\n{output_tail}")?;
                }
                Ok(())
            }
            ImageError::Config { path, .. } => write!(f, "parse kernel config {}", path.display()),
            ImageError::MissingOptions { config, problems } => {
                write!(
                    f,
                    "{} required kernel option(s) do not hold after olddefconfig in {}:",
                    problems.len(),
                    config.display()
                )?;
                for p in problems {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
            ImageError::NoMirror { suite } => write!(
                f,
                "find an apt mirror for {suite} in /etc/apt/sources.list*; pass --mirror URL"
            ),
            ImageError::Exists { path } => write!(
                f,
                "refuse to replace {} (published images are never modified; pass --force to \
                 publish a new one in its place)",
                path.display()
            ),
            ImageError::Locked { path, owner } => write!(
                f,
                "another wrenn image build holds {} ({owner})",
                path.display()
            ),
            ImageError::BadInput { what, path, reason } => {
                write!(f, "bad {what} {}: {reason}", path.display())
            }
            ImageError::TooSmall { size_mib, need_mib } => write!(
                f,
                "image size {size_mib} MiB is too small for the tree (need at least {need_mib} MiB)"
            ),
            ImageError::Unexpected { what, detail } => write!(f, "unexpected {what}: {detail}"),
        }
    }
}

impl std::error::Error for ImageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ImageError::Args(e) => Some(e),
            ImageError::Io { source, .. } | ImageError::Spawn { source, .. } => Some(source),
            ImageError::Config { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl std::error::Error for kconfig::ParseError {}

impl From<args::ArgError> for ImageError {
    fn from(e: args::ArgError) -> Self {
        ImageError::Args(e)
    }
}

/// Helper: an `Io` error naming the action and path.
pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io {
        action,
        path,
        source,
    }
}

/// Entry point of `wrenn image <kernel|rootfs> [flags]`; `args` are the words after `image`.
pub fn run(args: &[String]) -> Result<(), ImageError> {
    match args.first().map(String::as_str) {
        Some("kernel") => {
            let opts = kernel::KernelOptions::from_args(&args[1..])?;
            let path = kernel::build(&opts)?;
            println!("{}", path.display());
            Ok(())
        }
        Some("rootfs") => {
            let opts = rootfs::RootfsOptions::from_args(&args[1..])?;
            let path = rootfs::build(&opts)?;
            println!("{}", path.display());
            Ok(())
        }
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(ImageError::Usage(format!(
            "unknown image command {other:?}\n{USAGE}"
        ))),
        None => Err(ImageError::Usage(USAGE.to_string())),
    }
}

/// An exclusive lock on one cache directory, held by this process: a file created with
/// `O_EXCL` holding our pid. A lock left by a dead process (its pid has no `/proc` entry) is
/// taken over. (`File::lock` would be neater but is newer than the workspace's rust-version.)
pub struct Lock {
    path: PathBuf,
}

impl Lock {
    pub fn acquire(path: &Path) -> Result<Lock, ImageError> {
        for _ in 0..2 {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id()).map_err(io_err("write lock", path))?;
                    return Ok(Lock {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let owner = fs::read_to_string(path).unwrap_or_default();
                    let pid = owner.trim();
                    let alive = !pid.is_empty()
                        && pid.bytes().all(|b| b.is_ascii_digit())
                        && Path::new("/proc").join(pid).exists();
                    if alive {
                        return Err(ImageError::Locked {
                            path: path.to_path_buf(),
                            owner: format!("pid {pid}"),
                        });
                    }
                    log::warn!("taking over stale lock path={} pid={pid}", path.display());
                    match fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("remove stale lock", path)(e)),
                    }
                }
                Err(e) => return Err(io_err("create lock", path)(e)),
            }
        }
        Err(ImageError::Locked {
            path: path.to_path_buf(),
            owner: "a process that keeps re-taking it".to_string(),
        })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            log::warn!("remove lock path={} error={e}", self.path.display());
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// that a reader sees either the old file or the whole new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = temp_sibling(path);
    let res = (|| {
        let mut f = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        sync_parent(path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// `dir/.name.tmp-<pid>` next to `path`.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// fsync the directory holding `path`, so a rename into it survives a crash.
pub(crate) fn sync_parent(path: &Path) -> Result<(), ImageError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let f = fs::File::open(dir).map_err(io_err("open directory", dir))?;
    f.sync_all().map_err(io_err("sync directory", dir))
}

/// Creates `dir` and its parents.
pub(crate) fn create_dir(dir: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))
}

/// `1m02s`-style duration for progress and reports.
pub fn fmt_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}.{:01}s", s, d.subsec_millis() / 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wrenn-image-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn dispatch_rejects_unknown_and_missing_commands() {
        assert!(matches!(run(&[]), Err(ImageError::Usage(_))));
        let e = run(&["bogus".to_string()]).unwrap_err();
        assert!(e.to_string().starts_with("unknown image command \"bogus\""));
        let e = run(&["kernel".to_string(), "--nope".to_string()]).unwrap_err();
        assert!(matches!(e, ImageError::Args(args::ArgError::Unknown(_))));
    }

    #[test]
    fn lock_is_exclusive_and_stale_locks_are_taken_over() {
        let d = scratch("lock");
        let p = d.join(".lock");
        let l = Lock::acquire(&p).unwrap();
        assert!(matches!(Lock::acquire(&p), Err(ImageError::Locked { .. })));
        drop(l);
        assert!(!p.exists());
        // A pid that cannot exist (above pid_max's hard limit of 2^22).
        fs::write(&p, "99999999\n").unwrap();
        let l = Lock::acquire(&p).unwrap();
        assert_eq!(
            fs::read_to_string(&p).unwrap().trim(),
            std::process::id().to_string()
        );
        drop(l);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn write_atomic_replaces_whole_files() {
        let d = scratch("atomic");
        let p = d.join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1, "no temp file left");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_millis(2500)), "2.5s");
        assert_eq!(fmt_duration(Duration::from_secs(62)), "1m02s");
        assert_eq!(fmt_duration(Duration::from_secs(754)), "12m34s");
    }
}
