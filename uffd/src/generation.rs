//! Building a new generation from a Firecracker snapshot memory file.
//!
//! A `Diff` snapshot is a sparse file of the guest's full size whose data extents are the
//! pages dirtied since the last snapshot (found with SEEK_DATA/SEEK_HOLE); a `Full` snapshot
//! describes every page (its holes, if any, are zeros). Each page of a data extent is checked:
//! an all-zero page becomes an explicit zero extent — it must never fall back to its parent's
//! content — and only non-zero pages are appended to the new layer's data file.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use crate::header::{Diff, DiffExtent, DiffKind};
use crate::limits::{BLOCK_SIZE, SCAN_CHUNK};
use crate::sys;

/// Which kind of snapshot wrote the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Holes are zeros: every page is described.
    Full,
    /// Holes are pages unchanged since the parent generation.
    Diff,
}

/// Counts from one build.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// Pages found in data extents of the memory file.
    pub pages_scanned: u64,
    /// Non-zero pages written to the layer.
    pub pages_written: u64,
    /// Dirty pages that were all zeros (explicit zero extents).
    pub zero_pages: u64,
    /// Data extents found with SEEK_DATA/SEEK_HOLE.
    pub data_extents: u64,
}

/// Why a build failed.
#[derive(Debug)]
pub enum Error {
    Stat { source: std::io::Error },
    SizeMismatch { file_size: u64, memory_size: u64 },
    Seek { source: std::io::Error },
    Read { offset: u64, source: std::io::Error },
    Write { source: std::io::Error },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Stat { .. } => write!(f, "cannot stat the memory file"),
            Error::SizeMismatch {
                file_size,
                memory_size,
            } => write!(
                f,
                "memory file is {file_size} bytes, expected the guest memory size {memory_size}"
            ),
            Error::Seek { .. } => write!(f, "cannot find data extents (SEEK_DATA/SEEK_HOLE)"),
            Error::Read { offset, .. } => write!(f, "cannot read the memory file at {offset}"),
            Error::Write { .. } => write!(f, "cannot write the layer file"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Stat { source } | Error::Seek { source } | Error::Write { source } => {
                Some(source)
            }
            Error::Read { source, .. } => Some(source),
            Error::SizeMismatch { .. } => None,
        }
    }
}

/// Scans `mem` (a snapshot memory file of exactly `memory_size` bytes), appends the non-zero
/// dirty pages to `layer` (starting at storage offset 0) and returns the diff to merge, whose
/// `layer_size` is the number of bytes written.
pub fn build(
    mem: &File,
    memory_size: u64,
    kind: SnapshotKind,
    layer: &mut dyn Write,
) -> Result<(Diff, BuildStats), Error> {
    let file_size = mem
        .metadata()
        .map_err(|source| Error::Stat { source })?
        .len();
    if file_size != memory_size || memory_size % BLOCK_SIZE != 0 {
        return Err(Error::SizeMismatch {
            file_size,
            memory_size,
        });
    }
    let mut b = Builder {
        diff: Diff::default(),
        stats: BuildStats::default(),
    };
    let mut buf = vec![0u8; SCAN_CHUNK];
    let mut pos = 0u64;
    while pos < memory_size {
        let Some(data) =
            sys::seek_data(mem.as_fd(), pos).map_err(|source| Error::Seek { source })?
        else {
            break;
        };
        // Extents are reported at file-system block granularity; widen to whole pages.
        let start = data / BLOCK_SIZE * BLOCK_SIZE;
        let hole = sys::seek_hole(mem.as_fd(), data)
            .map_err(|source| Error::Seek { source })?
            .unwrap_or(memory_size)
            .min(memory_size);
        let end = hole.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        if start >= memory_size || end <= start {
            break;
        }
        if kind == SnapshotKind::Full && start > pos {
            b.push(pos, start - pos, None);
        }
        b.stats.data_extents += 1;
        b.scan(mem, start.max(pos), end.min(memory_size), &mut buf, layer)?;
        pos = end.max(pos);
    }
    if kind == SnapshotKind::Full && pos < memory_size {
        b.push(pos, memory_size - pos, None);
    }
    layer.flush().map_err(|source| Error::Write { source })?;
    Ok((b.diff, b.stats))
}

struct Builder {
    diff: Diff,
    stats: BuildStats,
}

impl Builder {
    fn scan(
        &mut self,
        mem: &File,
        from: u64,
        to: u64,
        buf: &mut [u8],
        layer: &mut dyn Write,
    ) -> Result<(), Error> {
        let mut off = from;
        while off < to {
            let n = (to - off).min(buf.len() as u64) as usize;
            mem.read_exact_at(&mut buf[..n], off)
                .map_err(|source| Error::Read {
                    offset: off,
                    source,
                })?;
            // Write runs of non-zero pages with one call each.
            let mut run_start: Option<usize> = None;
            for (i, page) in buf[..n].chunks_exact(BLOCK_SIZE as usize).enumerate() {
                let at = i * BLOCK_SIZE as usize;
                self.stats.pages_scanned += 1;
                if is_zero(page) {
                    if let Some(s) = run_start.take() {
                        self.write(off + s as u64, &buf[s..at], layer)?;
                    }
                    self.stats.zero_pages += 1;
                    self.push(off + at as u64, BLOCK_SIZE, None);
                } else if run_start.is_none() {
                    run_start = Some(at);
                }
            }
            if let Some(s) = run_start {
                self.write(off + s as u64, &buf[s..n], layer)?;
            }
            off += n as u64;
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, bytes: &[u8], layer: &mut dyn Write) -> Result<(), Error> {
        layer
            .write_all(bytes)
            .map_err(|source| Error::Write { source })?;
        let storage = self.diff.layer_size;
        self.diff.layer_size += bytes.len() as u64;
        self.stats.pages_written += bytes.len() as u64 / BLOCK_SIZE;
        self.push(offset, bytes.len() as u64, Some(storage));
        Ok(())
    }

    /// Appends a diff extent, coalescing with the previous one when it continues it.
    fn push(&mut self, offset: u64, length: u64, storage: Option<u64>) {
        let kind = match storage {
            None => DiffKind::Zero,
            Some(storage_offset) => DiffKind::Data { storage_offset },
        };
        if let Some(last) = self.diff.extents.last_mut() {
            if last.offset + last.length == offset {
                match (&last.kind, &kind) {
                    (DiffKind::Zero, DiffKind::Zero) => {
                        last.length += length;
                        return;
                    }
                    (
                        DiffKind::Data { storage_offset: a },
                        DiffKind::Data { storage_offset: b },
                    ) if a + last.length == *b => {
                        last.length += length;
                        return;
                    }
                    _ => {}
                }
            }
        }
        self.diff.extents.push(DiffExtent {
            offset,
            length,
            kind,
        });
    }
}

/// Whether a page is all zeros (word-wise; the compiler vectorizes it).
pub fn is_zero(page: &[u8]) -> bool {
    let words = page.chunks_exact(8);
    let tail = words.remainder();
    let or = words.fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    });
    or == 0 && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{BuildId, Header};
    use std::collections::HashMap;

    fn tmpfile(name: &str) -> File {
        let p = std::env::temp_dir().join(format!("uffd-gen-{name}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    #[test]
    fn diff_snapshot_zero_pages_become_explicit_zero_extents() {
        let page = BLOCK_SIZE as usize;
        let mem = tmpfile("mem");
        mem.set_len(64 * BLOCK_SIZE).unwrap();
        // Dirty pages 3 (data), 4 (zeros, written explicitly), 5 (data), 40 (zeros).
        mem.write_all_at(&vec![3u8; page], 3 * BLOCK_SIZE).unwrap();
        mem.write_all_at(&vec![0u8; page], 4 * BLOCK_SIZE).unwrap();
        mem.write_all_at(&vec![5u8; page], 5 * BLOCK_SIZE).unwrap();
        mem.write_all_at(&vec![0u8; page], 40 * BLOCK_SIZE).unwrap();
        let mut layer = Vec::new();
        let (diff, stats) = build(&mem, 64 * BLOCK_SIZE, SnapshotKind::Diff, &mut layer).unwrap();
        assert_eq!(stats.pages_written, 2);
        assert_eq!(stats.zero_pages, 2);
        assert_eq!(layer.len(), 2 * page);
        assert_eq!(diff.layer_size, 2 * BLOCK_SIZE);
        // Parent: every page 0xEE.
        let parent_id = BuildId([1; 16]);
        let base = Diff {
            extents: vec![DiffExtent {
                offset: 0,
                length: 64 * BLOCK_SIZE,
                kind: DiffKind::Data { storage_offset: 0 },
            }],
            layer_size: 64 * BLOCK_SIZE,
        };
        let parent = Header::from_base(64 * BLOCK_SIZE, parent_id, &base).unwrap();
        let child_id = BuildId([2; 16]);
        let child = parent.merge(&diff, child_id).unwrap();
        let mut layers = HashMap::new();
        layers.insert(parent_id, vec![0xEEu8; 64 * page]);
        layers.insert(child_id, layer);
        let read = |off: u64| -> u8 {
            let e = &child.extents[child.find(off).unwrap()];
            if e.is_zero() {
                0
            } else {
                layers[&e.build_id][(e.storage_offset + off - e.offset) as usize]
            }
        };
        assert_eq!(read(0), 0xEE);
        assert_eq!(read(3 * BLOCK_SIZE + 7), 3);
        assert_eq!(
            read(4 * BLOCK_SIZE + 7),
            0,
            "dirty zero page must not fall back to the parent"
        );
        assert_eq!(read(5 * BLOCK_SIZE), 5);
        assert_eq!(read(40 * BLOCK_SIZE), 0);
        assert_eq!(read(41 * BLOCK_SIZE), 0xEE);
    }

    #[test]
    fn full_snapshot_holes_are_zeros() {
        let mem = tmpfile("full");
        mem.set_len(16 * BLOCK_SIZE).unwrap();
        mem.write_all_at(&[9u8; 10], 8 * BLOCK_SIZE).unwrap();
        let mut layer = Vec::new();
        let (diff, _) = build(&mem, 16 * BLOCK_SIZE, SnapshotKind::Full, &mut layer).unwrap();
        let covered: u64 = diff.extents.iter().map(|e| e.length).sum();
        assert_eq!(covered, 16 * BLOCK_SIZE);
        assert_eq!(diff.layer_size, BLOCK_SIZE);
        let h = Header::from_base(16 * BLOCK_SIZE, BuildId([7; 16]), &diff).unwrap();
        assert_eq!(Header::parse(&h.serialize()).unwrap(), h);
    }

    #[test]
    fn wrong_size_is_an_error() {
        let mem = tmpfile("size");
        mem.set_len(3 * BLOCK_SIZE).unwrap();
        let err = build(&mem, 4 * BLOCK_SIZE, SnapshotKind::Diff, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, Error::SizeMismatch { .. }));
    }

    #[test]
    fn is_zero_detects_any_byte() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        for i in [0, 7, 8, 4095] {
            p[i] = 1;
            assert!(!is_zero(&p));
            p[i] = 0;
        }
    }
}
