//! Firecracker's UFFD handshake.
//!
//! After `snapshot/load` with the Uffd backend, Firecracker connects to the handler's Unix
//! socket and sends one message: the userfaultfd as SCM_RIGHTS and a JSON array of its guest
//! memory regions, `[{"base_host_virt_addr":N,"size":N,"offset":N,"page_size":N,
//! "page_size_kib":N}, ...]` (both page-size keys hold bytes; either is accepted; `offset` is the
//! region's position in the memory file, i.e. in the header's address space). The JSON is read
//! by a strict parser for exactly this shape: an array of objects whose values are non-negative
//! integers; unknown keys with scalar values are skipped, duplicates are rejected.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::limits::{
    BLOCK_SIZE, HANDSHAKE_FD_MAX, HANDSHAKE_SIZE_MAX, HANDSHAKE_TIMEOUT_MS, REGION_COUNT_MAX,
};
use crate::sys;

/// One guest memory region as Firecracker describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Start of the region in Firecracker's address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Position of the region in the memory file (the header's offsets).
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
}

impl Region {
    /// One past the region's last host address.
    pub fn host_end(&self) -> u64 {
        self.base_host_virt_addr + self.size
    }
}

/// Why the handshake failed.
#[derive(Debug)]
pub enum Error {
    /// The JSON is malformed at byte `at`.
    Json {
        at: usize,
        what: &'static str,
    },
    /// The JSON ended before the array closed.
    Incomplete,
    TooLarge,
    TooManyRegions,
    MissingKey {
        region: usize,
        key: &'static str,
    },
    DuplicateKey {
        region: usize,
    },
    PageSizeMismatch {
        region: usize,
    },
    UnsupportedPageSize {
        region: usize,
        page_size: u64,
    },
    EmptyRegion {
        region: usize,
    },
    Unaligned {
        region: usize,
    },
    Overflow {
        region: usize,
    },
    /// The region reaches past the snapshot's memory.
    PastMemory {
        region: usize,
        memory_size: u64,
    },
    /// Two regions overlap in the memory file or in the host address space.
    Overlap {
        region: usize,
    },
    NoRegions,
    /// The peer is not the Firecracker process we serve.
    WrongPeer {
        expected: i32,
        actual: i32,
    },
    NoFd,
    TooManyFds {
        count: usize,
    },
    Closed,
    Timeout,
    Io {
        action: &'static str,
        source: std::io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Error::*;
        match self {
            Json { at, what } => write!(f, "malformed handshake json at byte {at}: {what}"),
            Incomplete => write!(f, "handshake json ended early"),
            TooLarge => write!(f, "handshake message exceeds {HANDSHAKE_SIZE_MAX} bytes"),
            TooManyRegions => write!(f, "handshake has more than {REGION_COUNT_MAX} regions"),
            MissingKey { region, key } => write!(f, "region {region} lacks {key}"),
            DuplicateKey { region } => write!(f, "region {region} repeats a key"),
            PageSizeMismatch { region } => {
                write!(f, "region {region} page_size and page_size_kib disagree")
            }
            UnsupportedPageSize { region, page_size } => {
                write!(
                    f,
                    "region {region} page size {page_size} is not supported (4096 only)"
                )
            }
            EmptyRegion { region } => write!(f, "region {region} is empty"),
            Unaligned { region } => write!(f, "region {region} is not page-aligned"),
            Overflow { region } => write!(f, "region {region} overflows"),
            PastMemory {
                region,
                memory_size,
            } => {
                write!(
                    f,
                    "region {region} reaches past the snapshot memory ({memory_size} bytes)"
                )
            }
            Overlap { region } => write!(f, "region {region} overlaps another"),
            NoRegions => write!(f, "handshake has no regions"),
            WrongPeer { expected, actual } => {
                write!(
                    f,
                    "handshake peer is pid {actual}, expected firecracker pid {expected}"
                )
            }
            NoFd => write!(f, "handshake carried no userfaultfd"),
            TooManyFds { count } => write!(f, "handshake carried {count} fds, expected one"),
            Closed => write!(f, "peer closed the connection before the handshake"),
            Timeout => write!(f, "no handshake within {HANDSHAKE_TIMEOUT_MS} ms"),
            Io { action, .. } => write!(f, "cannot {action}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

struct Parser<'a> {
    b: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.at < self.b.len() && matches!(self.b[self.at], b' ' | b'\t' | b'\n' | b'\r') {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Result<u8, Error> {
        self.ws();
        self.b.get(self.at).copied().ok_or(Error::Incomplete)
    }

    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), Error> {
        if self.peek()? != c {
            return Err(Error::Json { at: self.at, what });
        }
        self.at += 1;
        Ok(())
    }

    /// A key: a plain string without escapes (Firecracker's keys are ASCII identifiers).
    fn key(&mut self) -> Result<&[u8], Error> {
        self.expect(b'"', "expected a key")?;
        let start = self.at;
        loop {
            let c = *self.b.get(self.at).ok_or(Error::Incomplete)?;
            match c {
                b'"' => break,
                b'\\' => {
                    return Err(Error::Json {
                        at: self.at,
                        what: "escape in key",
                    })
                }
                0..=0x1f => {
                    return Err(Error::Json {
                        at: self.at,
                        what: "control character in key",
                    })
                }
                _ => self.at += 1,
            }
        }
        let key = &self.b[start..self.at];
        self.at += 1;
        Ok(key)
    }

    /// A non-negative integer without sign, fraction, exponent or leading zeros.
    fn number(&mut self) -> Result<u64, Error> {
        self.ws();
        let start = self.at;
        let mut v: u64 = 0;
        while let Some(&c) = self.b.get(self.at) {
            if !c.is_ascii_digit() {
                break;
            }
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(c - b'0')))
                .ok_or(Error::Json {
                    at: self.at,
                    what: "number too large",
                })?;
            self.at += 1;
        }
        if self.at == start {
            return Err(match self.b.get(self.at) {
                None => Error::Incomplete,
                Some(_) => Error::Json {
                    at: self.at,
                    what: "expected a non-negative integer",
                },
            });
        }
        if self.b[start] == b'0' && self.at - start > 1 {
            return Err(Error::Json {
                at: start,
                what: "leading zero",
            });
        }
        match self.b.get(self.at) {
            None => Err(Error::Incomplete),
            Some(b'.' | b'e' | b'E') => Err(Error::Json {
                at: self.at,
                what: "expected an integer",
            }),
            Some(_) => Ok(v),
        }
    }

    /// Skips a scalar value of an unknown key: a number, string, true, false or null.
    fn skip_scalar(&mut self) -> Result<(), Error> {
        match self.peek()? {
            b'"' => {
                self.at += 1;
                loop {
                    let c = *self.b.get(self.at).ok_or(Error::Incomplete)?;
                    self.at += 1;
                    match c {
                        b'"' => return Ok(()),
                        b'\\' => {
                            self.b.get(self.at).ok_or(Error::Incomplete)?;
                            self.at += 1;
                        }
                        0..=0x1f => {
                            return Err(Error::Json {
                                at: self.at - 1,
                                what: "control character in string",
                            })
                        }
                        _ => {}
                    }
                }
            }
            b't' | b'f' | b'n' => {
                for word in [&b"true"[..], b"false", b"null"] {
                    let end = self.at + word.len();
                    if self.b.len() >= end && &self.b[self.at..end] == word {
                        self.at = end;
                        return Ok(());
                    }
                    if self.b.len() < end && word.starts_with(&self.b[self.at..]) {
                        return Err(Error::Incomplete);
                    }
                }
                Err(Error::Json {
                    at: self.at,
                    what: "unknown literal",
                })
            }
            b'-' | b'0'..=b'9' => {
                // Any JSON number on an unknown key: sign, digits, fraction, exponent.
                let start = self.at;
                if self.b[self.at] == b'-' {
                    self.at += 1;
                }
                if !self
                    .b
                    .get(self.at)
                    .ok_or(Error::Incomplete)?
                    .is_ascii_digit()
                {
                    return Err(Error::Json {
                        at: self.at,
                        what: "expected a digit",
                    });
                }
                while let Some(&c) = self.b.get(self.at) {
                    if !(c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-')) {
                        break;
                    }
                    self.at += 1;
                }
                if self.at == self.b.len() {
                    return Err(Error::Incomplete);
                }
                debug_assert!(self.at > start);
                Ok(())
            }
            _ => Err(Error::Json {
                at: self.at,
                what: "unsupported value (only scalars)",
            }),
        }
    }

    fn region(&mut self, index: usize) -> Result<Region, Error> {
        self.expect(b'{', "expected an object")?;
        let mut vals: [Option<u64>; 5] = [None; 5];
        const KEYS: [&str; 5] = [
            "base_host_virt_addr",
            "size",
            "offset",
            "page_size",
            "page_size_kib",
        ];
        if self.peek()? == b'}' {
            self.at += 1;
        } else {
            loop {
                let key = self.key()?;
                let slot = KEYS.iter().position(|k| k.as_bytes() == key);
                self.expect(b':', "expected ':'")?;
                match slot {
                    Some(i) => {
                        if vals[i].is_some() {
                            return Err(Error::DuplicateKey { region: index });
                        }
                        vals[i] = Some(self.number()?);
                    }
                    None => self.skip_scalar()?,
                }
                match self.peek()? {
                    b',' => self.at += 1,
                    b'}' => {
                        self.at += 1;
                        break;
                    }
                    _ => {
                        return Err(Error::Json {
                            at: self.at,
                            what: "expected ',' or '}'",
                        })
                    }
                }
            }
        }
        let get = |i: usize| {
            vals[i].ok_or(Error::MissingKey {
                region: index,
                key: KEYS[i],
            })
        };
        let page_size = match (vals[3], vals[4]) {
            (Some(a), Some(b)) if a != b => return Err(Error::PageSizeMismatch { region: index }),
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(Error::MissingKey {
                    region: index,
                    key: "page_size",
                })
            }
        };
        Ok(Region {
            base_host_virt_addr: get(0)?,
            size: get(1)?,
            offset: get(2)?,
            page_size,
        })
    }
}

/// Parses the handshake JSON (syntax only; see [`validate`]). `Err(Incomplete)` means the bytes
/// are a valid prefix and more may follow.
pub fn parse_regions(b: &[u8]) -> Result<Vec<Region>, Error> {
    if b.len() > HANDSHAKE_SIZE_MAX {
        return Err(Error::TooLarge);
    }
    let mut p = Parser { b, at: 0 };
    p.expect(b'[', "expected '['")?;
    let mut regions = Vec::new();
    if p.peek()? == b']' {
        p.at += 1;
    } else {
        loop {
            if regions.len() == REGION_COUNT_MAX {
                return Err(Error::TooManyRegions);
            }
            regions.push(p.region(regions.len())?);
            match p.peek()? {
                b',' => p.at += 1,
                b']' => {
                    p.at += 1;
                    break;
                }
                _ => {
                    return Err(Error::Json {
                        at: p.at,
                        what: "expected ',' or ']'",
                    })
                }
            }
        }
    }
    p.ws();
    if p.at != b.len() {
        return Err(Error::Json {
            at: p.at,
            what: "trailing bytes",
        });
    }
    Ok(regions)
}

/// Writes regions in Firecracker's JSON shape (the harness and tests use it).
pub fn to_json(regions: &[Region]) -> String {
    let mut s = String::from("[");
    for (i, r) in regions.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            "{{\"base_host_virt_addr\":{},\"size\":{},\"offset\":{},\"page_size\":{},\"page_size_kib\":{}}}",
            r.base_host_virt_addr, r.size, r.offset, r.page_size, r.page_size
        ));
    }
    s.push(']');
    s
}

/// Checks the regions against the snapshot: 4 KiB pages, aligned, non-empty, inside the
/// memory, and disjoint both in the memory file and in the host address space.
pub fn validate(regions: &[Region], memory_size: u64) -> Result<(), Error> {
    if regions.is_empty() {
        return Err(Error::NoRegions);
    }
    for (region, r) in regions.iter().enumerate() {
        if r.page_size != BLOCK_SIZE {
            return Err(Error::UnsupportedPageSize {
                region,
                page_size: r.page_size,
            });
        }
        if r.size == 0 {
            return Err(Error::EmptyRegion { region });
        }
        if r.base_host_virt_addr % BLOCK_SIZE != 0
            || r.size % BLOCK_SIZE != 0
            || r.offset % BLOCK_SIZE != 0
        {
            return Err(Error::Unaligned { region });
        }
        let file_end = r
            .offset
            .checked_add(r.size)
            .ok_or(Error::Overflow { region })?;
        r.base_host_virt_addr
            .checked_add(r.size)
            .ok_or(Error::Overflow { region })?;
        if file_end > memory_size {
            return Err(Error::PastMemory {
                region,
                memory_size,
            });
        }
    }
    let mut by_file: Vec<&Region> = regions.iter().collect();
    by_file.sort_by_key(|r| r.offset);
    let mut by_host: Vec<&Region> = regions.iter().collect();
    by_host.sort_by_key(|r| r.base_host_virt_addr);
    for w in by_file.windows(2) {
        if w[0].offset + w[0].size > w[1].offset {
            let region = regions.iter().position(|r| r == w[1]).unwrap_or(0);
            return Err(Error::Overlap { region });
        }
    }
    for w in by_host.windows(2) {
        if w[0].host_end() > w[1].base_host_virt_addr {
            let region = regions.iter().position(|r| r == w[1]).unwrap_or(0);
            return Err(Error::Overlap { region });
        }
    }
    Ok(())
}

/// The result of a successful handshake.
#[derive(Debug)]
pub struct Handshake {
    pub uffd: OwnedFd,
    pub regions: Vec<Region>,
}

/// Checks that the connected peer is the expected Firecracker process (SO_PEERCRED).
pub fn check_peer(stream: &UnixStream, expected: i32) -> Result<(), Error> {
    let actual = sys::peer_pid(stream.as_fd()).map_err(|source| Error::Io {
        action: "read SO_PEERCRED",
        source,
    })?;
    if actual != expected {
        return Err(Error::WrongPeer { expected, actual });
    }
    Ok(())
}

/// Receives the handshake on a connected stream (blocking, bounded by `timeout`): collects
/// bytes until the JSON array is complete, takes exactly one fd, validates the regions.
pub fn receive(
    stream: &UnixStream,
    memory_size: u64,
    timeout: Duration,
) -> Result<Handshake, Error> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; HANDSHAKE_SIZE_MAX];
    let mut len = 0usize;
    let mut fds: Vec<OwnedFd> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|source| Error::Io {
                action: "set the handshake timeout",
                source,
            })?;
        if len == buf.len() {
            return Err(Error::TooLarge);
        }
        let r = match sys::recv_with_fds(stream.as_fd(), &mut buf[len..]) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Timeout)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(Error::Io {
                    action: "receive the handshake",
                    source,
                })
            }
        };
        fds.extend(r.fds);
        if r.truncated || fds.len() > 1 {
            return Err(Error::TooManyFds {
                count: fds.len().max(HANDSHAKE_FD_MAX + 1),
            });
        }
        if r.bytes == 0 {
            return Err(if len == 0 {
                Error::Closed
            } else {
                Error::Incomplete
            });
        }
        len += r.bytes;
        match parse_regions(&buf[..len]) {
            Err(Error::Incomplete) => continue,
            Err(e) => return Err(e),
            Ok(regions) => {
                validate(&regions, memory_size)?;
                let uffd = fds.pop().ok_or(Error::NoFd)?;
                return Ok(Handshake { uffd, regions });
            }
        }
    }
}

/// Fuzz target body: parsing arbitrary bytes never panics; accepted input re-serializes to
/// JSON that parses to the same regions; validation never panics either.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(regions) = parse_regions(data) {
        let again = parse_regions(to_json(&regions).as_bytes()).expect("own json parses");
        assert_eq!(again, regions);
        let _ = validate(&regions, 1 << 30);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(base: u64, size: u64, offset: u64) -> Region {
        Region {
            base_host_virt_addr: base,
            size,
            offset,
            page_size: 4096,
        }
    }

    #[test]
    fn parses_firecracker_shape() {
        let j = br#"[{"base_host_virt_addr":140000000000000,"size":2097152,"offset":0,"page_size":4096,"page_size_kib":4096},
                     { "base_host_virt_addr" : 140000004194304 , "size":1048576,"offset":2097152,"page_size_kib":4096 }]"#;
        let v = parse_regions(j).unwrap();
        assert_eq!(
            v,
            vec![
                r(140000000000000, 2097152, 0),
                r(140000004194304, 1048576, 2097152)
            ]
        );
        validate(&v, 3 << 20).unwrap();
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b"{}"[..],
            b"[{\"size\":-1}]",
            b"[{\"size\":1.5}]",
            b"[{\"size\":01}]",
            b"[1]",
            b"[{\"size\":1,}]",
            b"[]x",
            b"[{\"a\":[1]}]",
            b"[{\"size\":99999999999999999999}]",
            b"[{\"s\\\"ize\":1}]",
        ] {
            let e = parse_regions(bad).unwrap_err();
            assert!(
                matches!(e, Error::Json { .. }),
                "{:?}: {e}",
                std::str::from_utf8(bad)
            );
        }
        assert!(matches!(
            parse_regions(b"[{\"size\":1"),
            Err(Error::Incomplete)
        ));
        assert!(matches!(
            parse_regions(b"[{\"size\":1,\"size\":2}]"),
            Err(Error::DuplicateKey { .. })
        ));
        assert!(matches!(
            parse_regions(b"[{\"size\":1}]"),
            Err(Error::MissingKey { .. })
        ));
        let mismatch = br#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#;
        assert!(matches!(
            parse_regions(mismatch),
            Err(Error::PageSizeMismatch { .. })
        ));
    }

    #[test]
    fn skips_unknown_scalars() {
        let j = br#"[{"x":"a\"b","base_host_virt_addr":4096,"y":true,"size":4096,"z":-1.5e3,"offset":0,"page_size":4096,"n":null}]"#;
        assert_eq!(parse_regions(j).unwrap(), vec![r(4096, 4096, 0)]);
    }

    #[test]
    fn validation_rejects_bad_regions() {
        assert!(matches!(validate(&[], 1 << 20), Err(Error::NoRegions)));
        assert!(matches!(
            validate(&[r(0, 8192, 0), r(8192, 4096, 4096)], 1 << 20),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            validate(&[r(0, 4096, 0), r(0, 4096, 4096)], 1 << 20),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            validate(&[r(0, 8192, 1 << 20)], 1 << 20),
            Err(Error::PastMemory { .. })
        ));
        assert!(matches!(
            validate(&[r(1, 4096, 0)], 1 << 20),
            Err(Error::Unaligned { .. })
        ));
        assert!(matches!(
            validate(&[r(0, 0, 0)], 1 << 20),
            Err(Error::EmptyRegion { .. })
        ));
        assert!(matches!(
            validate(&[r(u64::MAX - 4095, 8192, 0)], 1 << 20),
            Err(Error::Overflow { .. })
        ));
        let huge = Region {
            page_size: 2 << 20,
            ..r(0, 2 << 20, 0)
        };
        assert!(matches!(
            validate(&[huge], 4 << 20),
            Err(Error::UnsupportedPageSize { .. })
        ));
    }

    #[test]
    fn every_prefix_is_incomplete_or_error_never_panic() {
        let j = to_json(&[r(4096, 8192, 0), r(1 << 30, 4096, 8192)]);
        for n in 0..j.len() {
            assert!(parse_regions(&j.as_bytes()[..n]).is_err());
        }
        assert_eq!(parse_regions(j.as_bytes()).unwrap().len(), 2);
    }
}
