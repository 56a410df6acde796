//! Per-sandbox root disks: a reflink clone (FICLONE) of the template image where the
//! filesystem shares extents (XFS, btrfs), else a sparse copy that copies only the template's
//! data ranges (SEEK_DATA/SEEK_HOLE + copy_file_range), so holes stay holes.
//!
//! The template is opened read-only and never written. The new disk is created exclusively
//! (an existing file is an error, never overwritten) and removed again if the copy fails.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::limits::COPY_CHUNK_LEN;
use crate::sys;

/// How a disk was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneMethod {
    /// Extents shared with the template (copy-on-write); instant and free of space.
    Reflink,
    /// Data ranges copied, holes kept.
    SparseCopy,
}

/// A disk that could not be made.
#[derive(Debug)]
pub enum DiskError {
    OpenTemplate {
        path: PathBuf,
        source: io::Error,
    },
    /// The template is not a regular file.
    NotAFile {
        path: PathBuf,
    },
    Create {
        path: PathBuf,
        source: io::Error,
    },
    Copy {
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::OpenTemplate { path, .. } => {
                write!(f, "open template image {}", path.display())
            }
            DiskError::NotAFile { path } => {
                write!(f, "template image {} is not a regular file", path.display())
            }
            DiskError::Create { path, .. } => write!(f, "create disk {}", path.display()),
            DiskError::Copy { path, .. } => write!(f, "copy template into {}", path.display()),
        }
    }
}

impl std::error::Error for DiskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DiskError::OpenTemplate { source, .. }
            | DiskError::Create { source, .. }
            | DiskError::Copy { source, .. } => Some(source),
            DiskError::NotAFile { .. } => None,
        }
    }
}

/// Errors of FICLONE that mean "this filesystem or pair of files cannot share extents"
/// rather than a failure worth reporting.
fn reflink_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

/// Makes `dest` (which must not exist) a copy of `template`, by reflink if possible.
pub fn clone_disk(template: &Path, dest: &Path) -> Result<CloneMethod, DiskError> {
    let src = File::open(template).map_err(|source| DiskError::OpenTemplate {
        path: template.to_owned(),
        source,
    })?;
    let meta = src.metadata().map_err(|source| DiskError::OpenTemplate {
        path: template.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(DiskError::NotAFile {
            path: template.to_owned(),
        });
    }
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|source| DiskError::Create {
            path: dest.to_owned(),
            source,
        })?;
    let result = match sys::ficlone(dst.as_fd(), src.as_fd()) {
        Ok(()) => Ok(CloneMethod::Reflink),
        Err(e) if reflink_unsupported(&e) => {
            sparse_copy(&src, &dst, meta.len()).map(|()| CloneMethod::SparseCopy)
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(m) => Ok(m),
        Err(source) => {
            drop(dst);
            // Best effort: the half-made disk is ours; failing to remove it is not worse
            // than the error we already report.
            let _ = std::fs::remove_file(dest);
            Err(DiskError::Copy {
                path: dest.to_owned(),
                source,
            })
        }
    }
}

/// Copies the data ranges of `src` into `dst`, which becomes `len` bytes long.
fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    dst.set_len(len)?;
    let mut off = 0u64;
    while off < len {
        let Some(data) = sys::seek_data(src.as_fd(), off)? else {
            break;
        };
        if data >= len {
            break;
        }
        let hole = sys::seek_hole(src.as_fd(), data)?.min(len);
        copy_range(src, dst, data, hole)?;
        off = hole;
    }
    Ok(())
}

/// Copies `[start, end)` at the same offsets, with copy_file_range where the kernel can and
/// read/write where it cannot (across filesystem types).
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut pos = start;
    while pos < end {
        let want = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(COPY_CHUNK_LEN);
        match sys::copy_file_range(src.as_fd(), pos, dst.as_fd(), pos, want) {
            Ok(0) => {
                // The template shrank under us: what is left reads as zeros in `dst`.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "template shorter than its size",
                ));
            }
            Ok(n) => pos += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                ) =>
            {
                return copy_range_rw(src, dst, pos, end);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_range_rw(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = start;
    while pos < end {
        let want = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = src.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "template shorter than its size",
            ));
        }
        dst.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-glue-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_existing_dest_and_directories() {
        let d = tmp("refuse");
        let t = d.join("t");
        std::fs::write(&t, b"abc").unwrap();
        let out = d.join("o");
        std::fs::write(&out, b"keep").unwrap();
        assert!(matches!(
            clone_disk(&t, &out),
            Err(DiskError::Create { .. })
        ));
        assert_eq!(std::fs::read(&out).unwrap(), b"keep");
        assert!(matches!(
            clone_disk(&d, &d.join("o2")),
            Err(DiskError::NotAFile { .. })
        ));
        assert!(matches!(
            clone_disk(&d.join("absent"), &d.join("o3")),
            Err(DiskError::OpenTemplate { .. })
        ));
        assert!(!d.join("o3").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn empty_template() {
        let d = tmp("empty");
        let t = d.join("t");
        std::fs::write(&t, b"").unwrap();
        clone_disk(&t, &d.join("o")).unwrap();
        assert_eq!(std::fs::metadata(d.join("o")).unwrap().len(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
