//! The working-set file: the order in which a restored guest first touched its pages, recorded
//! once per template and replayed (prefetched) on every restore. Format in `HEADER.md`.

use std::fmt;

use crate::header::BuildId;
use crate::limits::{BLOCK_SIZE, MEMORY_SIZE_MAX, WORKING_SET_COUNT_MAX};

pub const MAGIC: [u8; 8] = *b"WRNWSET\0";
pub const VERSION: u32 = 1;
const FIXED_SIZE: usize = 48;
const CRC_SIZE: usize = 4;

/// A recorded working set: memory offsets (block-aligned, unique) in first-touch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// Memory size of the snapshot it was recorded on.
    pub memory_size: u64,
    /// Build id of the header it was recorded on.
    pub build_id: BuildId,
    /// Page offsets in the order they were first touched.
    pub pages: Vec<u64>,
}

/// Why a working-set file was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    TooShort,
    BadMagic,
    BadVersion { version: u32 },
    BadBlockSize { block_size: u32 },
    BadCrc,
    BadMemorySize,
    TooMany { count: u64 },
    LengthMismatch,
    BadPage { index: usize },
    Repeated { index: usize },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::TooShort => write!(f, "working set too short"),
            ParseError::BadMagic => write!(f, "bad working-set magic"),
            ParseError::BadVersion { version } => {
                write!(f, "unsupported working-set version {version}")
            }
            ParseError::BadBlockSize { block_size } => {
                write!(f, "unsupported block size {block_size}")
            }
            ParseError::BadCrc => write!(f, "working-set crc mismatch"),
            ParseError::BadMemorySize => write!(f, "invalid memory size"),
            ParseError::TooMany { count } => write!(f, "too many working-set entries ({count})"),
            ParseError::LengthMismatch => write!(f, "working-set length does not match its count"),
            ParseError::BadPage { index } => {
                write!(f, "entry {index} is unaligned or past the memory")
            }
            ParseError::Repeated { index } => write!(f, "entry {index} repeats a page"),
        }
    }
}

impl std::error::Error for ParseError {}

impl WorkingSet {
    /// Parses and validates a working-set file.
    pub fn parse(b: &[u8]) -> Result<WorkingSet, ParseError> {
        if b.len() < FIXED_SIZE + CRC_SIZE {
            return Err(ParseError::TooShort);
        }
        if b[0..8] != MAGIC {
            return Err(ParseError::BadMagic);
        }
        let (body, crc) = b.split_at(b.len() - CRC_SIZE);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(ParseError::BadCrc);
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(ParseError::BadVersion { version });
        }
        let block_size = u32_at(12);
        if u64::from(block_size) != BLOCK_SIZE {
            return Err(ParseError::BadBlockSize { block_size });
        }
        let memory_size = u64_at(16);
        if memory_size == 0 || memory_size % BLOCK_SIZE != 0 || memory_size > MEMORY_SIZE_MAX {
            return Err(ParseError::BadMemorySize);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[24..40]);
        let count = u64_at(40);
        if count > WORKING_SET_COUNT_MAX || count > memory_size / BLOCK_SIZE {
            return Err(ParseError::TooMany { count });
        }
        if (FIXED_SIZE + CRC_SIZE) as u64 + count * 8 != b.len() as u64 {
            return Err(ParseError::LengthMismatch);
        }
        let mut pages = Vec::with_capacity(count as usize);
        for index in 0..count as usize {
            let p = u64_at(FIXED_SIZE + index * 8);
            if p % BLOCK_SIZE != 0 || p >= memory_size {
                return Err(ParseError::BadPage { index });
            }
            pages.push(p);
        }
        let mut sorted: Vec<(u64, usize)> = pages.iter().copied().zip(0..).collect();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(ParseError::Repeated {
                    index: w[0].1.max(w[1].1),
                });
            }
        }
        Ok(WorkingSet {
            memory_size,
            build_id: BuildId(id),
            pages,
        })
    }

    /// The file's bytes.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_SIZE + self.pages.len() * 8 + CRC_SIZE);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b.extend_from_slice(&self.memory_size.to_le_bytes());
        b.extend_from_slice(&self.build_id.0);
        b.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.pages {
            b.extend_from_slice(&p.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// The pages as runs of contiguous pages, in first-touch order: `(offset, length)`.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &p in &self.pages {
            match out.last_mut() {
                Some((start, len)) if *start + *len == p => *len += BLOCK_SIZE,
                _ => out.push((p, BLOCK_SIZE)),
            }
        }
        out
    }
}

/// Fuzz entry point (`fuzz/fuzz_targets/uffd_working_set.rs`, and the corpus replay in the
/// tests): never panics on any input; an accepted file is canonical and its runs cover
/// exactly its pages.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(ws) = WorkingSet::parse(data) {
        assert_eq!(
            ws.serialize(),
            data,
            "accepted working set is not canonical"
        );
        let runs = ws.runs();
        let covered: u64 = runs.iter().map(|r| r.1 / BLOCK_SIZE).sum();
        assert_eq!(covered, ws.pages.len() as u64);
        assert!(runs.iter().all(|r| r.0 + r.1 <= ws.memory_size));
    }
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, then rename).
/// A file replaced atomically in a directory opened up front: written to `<name>.tmp` and
/// renamed over `<name>` relative to the directory's descriptor, so it keeps working after
/// `wrenn-uffd` dropped the privileges that reached the directory by path (it needs write
/// permission on the directory itself only).
#[derive(Debug)]
pub struct OutputFile {
    dir: std::os::fd::OwnedFd,
    name: std::ffi::CString,
    tmp: std::ffi::CString,
    path: std::path::PathBuf,
}

impl OutputFile {
    /// Opens `path`'s directory now.
    pub fn open(path: &std::path::Path) -> std::io::Result<OutputFile> {
        use std::os::unix::ffi::OsStrExt;
        let bad = || std::io::Error::from_raw_os_error(libc::EINVAL);
        let name = path.file_name().ok_or_else(bad)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        let dir = std::fs::File::open(parent)?;
        let mut tmp = name.as_bytes().to_vec();
        tmp.extend_from_slice(b".tmp");
        Ok(OutputFile {
            dir: dir.into(),
            name: std::ffi::CString::new(name.as_bytes()).map_err(|_| bad())?,
            tmp: std::ffi::CString::new(tmp).map_err(|_| bad())?,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Writes `bytes` to the temporary name, syncs, renames over the final name.
    pub fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::fd::AsFd;
        let fd = crate::sys::openat_create(self.dir.as_fd(), &self.tmp)?;
        let mut f = std::fs::File::from(fd);
        f.write_all(bytes)?;
        f.sync_all()?;
        crate::sys::renameat(self.dir.as_fd(), &self.tmp, &self.name)
    }
}

pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_runs() {
        let ws = WorkingSet {
            memory_size: 1 << 20,
            build_id: BuildId([3; 16]),
            pages: vec![8192, 12288, 0, 4096, 65536],
        };
        let b = ws.serialize();
        assert_eq!(WorkingSet::parse(&b).unwrap(), ws);
        assert_eq!(ws.runs(), vec![(8192, 8192), (0, 8192), (65536, 4096)]);
    }

    #[test]
    fn rejects_bad_files() {
        let ws = WorkingSet {
            memory_size: 1 << 20,
            build_id: BuildId([3; 16]),
            pages: vec![4096, 4096],
        };
        assert_eq!(
            WorkingSet::parse(&ws.serialize()),
            Err(ParseError::Repeated { index: 1 })
        );
        let ws = WorkingSet {
            memory_size: 1 << 20,
            build_id: BuildId([3; 16]),
            pages: vec![1 << 20],
        };
        assert_eq!(
            WorkingSet::parse(&ws.serialize()),
            Err(ParseError::BadPage { index: 0 })
        );
        let mut b = WorkingSet {
            memory_size: 1 << 20,
            build_id: BuildId([3; 16]),
            pages: vec![0],
        }
        .serialize();
        b[50] ^= 1;
        assert_eq!(WorkingSet::parse(&b), Err(ParseError::BadCrc));
        assert_eq!(WorkingSet::parse(&b[..10]), Err(ParseError::TooShort));
    }
}
