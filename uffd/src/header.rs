//! The snapshot header: which layer file holds each 4 KiB block of guest memory.
//!
//! The byte format is specified in `uffd/HEADER.md`. A header is a chain of generations
//! flattened into one sorted list of extents that covers the memory exactly once; each extent
//! names the layer (by build id) and the offset in that layer's data file where its bytes
//! start, or the nil build id for zeros. [`Header::parse`] accepts only well-formed headers;
//! [`Header::merge`] lays a new generation over its parent; [`squash`] copies a chain into one
//! layer.

use std::fmt;

use crate::limits::{
    BLOCK_SIZE, EXTENT_COUNT_MAX, HEADER_SIZE_MAX, LAYER_COUNT_MAX, MEMORY_SIZE_MAX,
};

/// First bytes of every header file.
pub const MAGIC: [u8; 8] = *b"WRNSNAPH";
/// The format version `serialize` writes (compact extents, offsets implicit).
pub const VERSION: u32 = 2;
/// The format version earlier releases wrote; still read (snapshots on hosts outlive an
/// upgrade), never written.
pub const VERSION_1: u32 = 1;
/// Bytes before the layer table (both versions).
pub const HEADER_FIXED_SIZE: usize = 72;
/// Bytes per layer record (both versions).
pub const LAYER_RECORD_SIZE: usize = 24;
/// Bytes per extent record in version 2: length, layer ref, storage offset (u32 each).
pub const EXTENT_RECORD_SIZE: usize = 12;
/// Bytes per extent record in version 1: offset, length, build id, storage offset.
pub const EXTENT_RECORD_SIZE_V1: usize = 40;
const CRC_SIZE: usize = 4;

/// A layer's identity: 16 bytes (a UUID, chosen by whoever builds the generation). The nil id
/// (all zeros) marks zero extents and never names a layer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BuildId(pub [u8; 16]);

impl BuildId {
    /// The nil id: zeros.
    pub const NIL: BuildId = BuildId([0; 16]);

    /// Whether this is the nil id.
    pub fn is_nil(&self) -> bool {
        *self == BuildId::NIL
    }

    /// Parses the hyphenated form (`8-4-4-4-12` hex digits, either case).
    pub fn parse(s: &str) -> Option<BuildId> {
        let b = s.as_bytes();
        if b.len() != 36 {
            return None;
        }
        let mut out = [0u8; 16];
        let mut nibbles = 0usize;
        for (i, &c) in b.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return None;
                }
                continue;
            }
            let v = (c as char).to_digit(16)? as u8;
            out[nibbles / 2] |= if nibbles % 2 == 0 { v << 4 } else { v };
            nibbles += 1;
        }
        Some(BuildId(out))
    }

    /// Name of this layer's data file inside the layer directory: `<build id>.layer`.
    pub fn layer_file_name(&self) -> String {
        format!("{self}.layer")
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One layer the header references: its id and the size of its data file's used part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    pub build_id: BuildId,
    pub size: u64,
}

/// `length` bytes of memory at `offset`, stored at `storage_offset` in layer `build_id`
/// (nil: zeros, and `storage_offset` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub build_id: BuildId,
    pub storage_offset: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// Whether the extent reads as zeros.
    pub fn is_zero(&self) -> bool {
        self.build_id.is_nil()
    }
}

/// A parsed, valid header. Construct it with [`Header::parse`], [`Header::from_base`],
/// [`Header::merge`] or [`squash`]; the fields are public for reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub memory_size: u64,
    pub generation: u64,
    pub build_id: BuildId,
    pub base_build_id: BuildId,
    /// Sorted by build id, unique, none nil.
    pub layers: Vec<Layer>,
    /// Sorted, contiguous from 0 to `memory_size`.
    pub extents: Vec<Extent>,
}

/// Why a header was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    TooShort {
        len: usize,
    },
    TooLong {
        len: usize,
    },
    BadMagic,
    BadVersion {
        version: u32,
    },
    BadBlockSize {
        block_size: u32,
    },
    BadCrc {
        stored: u32,
        computed: u32,
    },
    BadMemorySize {
        memory_size: u64,
    },
    NilBuildId,
    TooManyLayers {
        count: u32,
    },
    TooManyExtents {
        count: u32,
    },
    LengthMismatch {
        expected: u64,
        actual: usize,
    },
    LayerNil {
        index: usize,
    },
    LayersUnsorted {
        index: usize,
    },
    LayerUnaligned {
        index: usize,
    },
    /// The layer is larger than the memory (a layer holds each page at most once).
    LayerTooLarge {
        index: usize,
    },
    ExtentEmpty {
        index: usize,
    },
    ExtentUnaligned {
        index: usize,
    },
    /// The extent does not start where the previous one ended (gap, overlap or unsorted).
    ExtentNotContiguous {
        index: usize,
        expected: u64,
        offset: u64,
    },
    ExtentOverflow {
        index: usize,
    },
    ExtentPastMemory {
        index: usize,
    },
    ZeroExtentWithStorage {
        index: usize,
    },
    UnknownLayer {
        index: usize,
    },
    StorageOutsideLayer {
        index: usize,
    },
    NotCovering {
        covered: u64,
    },
    /// The extent continues the previous one (same layer, contiguous storage, or both zeros):
    /// a canonical version-2 header merges them.
    ExtentNotMerged {
        index: usize,
    },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ParseError::*;
        match self {
            TooShort { len } => write!(f, "header too short ({len} bytes)"),
            TooLong { len } => write!(f, "header too long ({len} bytes)"),
            BadMagic => write!(f, "bad header magic"),
            BadVersion { version } => write!(f, "unsupported header version {version}"),
            BadBlockSize { block_size } => write!(f, "unsupported block size {block_size}"),
            BadCrc { stored, computed } => {
                write!(
                    f,
                    "header crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
            BadMemorySize { memory_size } => write!(f, "invalid memory size {memory_size}"),
            NilBuildId => write!(f, "header build id is nil"),
            TooManyLayers { count } => write!(f, "too many layers ({count})"),
            TooManyExtents { count } => write!(f, "too many extents ({count})"),
            LengthMismatch { expected, actual } => {
                write!(
                    f,
                    "header length {actual} does not match its counts ({expected})"
                )
            }
            LayerNil { index } => write!(f, "layer {index} has the nil build id"),
            LayersUnsorted { index } => write!(f, "layer {index} is out of order or repeated"),
            LayerUnaligned { index } => write!(f, "layer {index} size is not block-aligned"),
            LayerTooLarge { index } => write!(f, "layer {index} is larger than the memory"),
            ExtentEmpty { index } => write!(f, "extent {index} is empty"),
            ExtentUnaligned { index } => write!(f, "extent {index} is not block-aligned"),
            ExtentNotContiguous {
                index,
                expected,
                offset,
            } => write!(
                f,
                "extent {index} starts at {offset}, expected {expected} (gap, overlap or unsorted)"
            ),
            ExtentOverflow { index } => write!(f, "extent {index} length overflows"),
            ExtentPastMemory { index } => write!(f, "extent {index} ends past the memory size"),
            ZeroExtentWithStorage { index } => {
                write!(f, "zero extent {index} has a storage offset")
            }
            UnknownLayer { index } => write!(f, "extent {index} names a layer not in the table"),
            StorageOutsideLayer { index } => {
                write!(f, "extent {index} storage lies outside its layer")
            }
            NotCovering { covered } => write!(f, "extents cover only {covered} bytes of memory"),
            ExtentNotMerged { index } => {
                write!(f, "extent {index} continues the previous one (not merged)")
            }
        }
    }
}

impl std::error::Error for ParseError {}

/// Why a merge failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeError {
    /// The diff is not sorted, aligned, non-empty per extent and inside the memory.
    BadDiff { index: usize },
    /// A data extent lies outside the new layer's size.
    StorageOutsideLayer { index: usize },
    /// The new build id is nil or already used in the chain.
    BadBuildId,
    /// The result would exceed the header limits.
    TooLarge,
    /// The memory size is zero, unaligned or over the limit.
    BadMemorySize,
    /// The new layer's size is not block-aligned or exceeds the memory size.
    BadLayerSize,
}

impl fmt::Display for MergeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MergeError::BadDiff { index } => write!(f, "diff extent {index} is invalid"),
            MergeError::StorageOutsideLayer { index } => {
                write!(f, "diff extent {index} lies outside the new layer")
            }
            MergeError::BadBuildId => write!(f, "new build id is nil or already in the chain"),
            MergeError::TooLarge => write!(f, "merged header exceeds the extent or layer limit"),
            MergeError::BadMemorySize => write!(f, "invalid memory size"),
            MergeError::BadLayerSize => write!(f, "new layer size is unaligned or too large"),
        }
    }
}

impl std::error::Error for MergeError {}

/// What a generation wrote to one range of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffKind {
    /// All zeros (no bytes in the layer file).
    Zero,
    /// Bytes at this offset of the new layer's data file.
    Data { storage_offset: u64 },
}

/// One range of memory a generation wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub length: u64,
    pub kind: DiffKind,
}

/// A new generation: the ranges it wrote (sorted, non-overlapping, block-aligned) and the size
/// of its layer data file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub extents: Vec<DiffExtent>,
    pub layer_size: u64,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn id_at(b: &[u8], at: usize) -> BuildId {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    BuildId(a)
}

impl Header {
    /// Parses and validates a header file's bytes, version 2 or version 1 (written by earlier
    /// releases; its extents are coalesced on the way in, so the result is the same canonical
    /// `Header` a version-2 file of it would give). Never panics and never allocates more
    /// than the input's own size justifies (counts are checked against the length first).
    pub fn parse(b: &[u8]) -> Result<Header, ParseError> {
        if b.len() < HEADER_FIXED_SIZE + CRC_SIZE {
            return Err(ParseError::TooShort { len: b.len() });
        }
        if b.len() as u64 > HEADER_SIZE_MAX {
            return Err(ParseError::TooLong { len: b.len() });
        }
        if b[0..8] != MAGIC {
            return Err(ParseError::BadMagic);
        }
        let body = &b[..b.len() - CRC_SIZE];
        let stored = le_u32(b, b.len() - CRC_SIZE);
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(ParseError::BadCrc { stored, computed });
        }
        let version = le_u32(b, 8);
        let extent_record_size = match version {
            VERSION => EXTENT_RECORD_SIZE,
            VERSION_1 => EXTENT_RECORD_SIZE_V1,
            _ => return Err(ParseError::BadVersion { version }),
        };
        let block_size = le_u32(b, 12);
        if u64::from(block_size) != BLOCK_SIZE {
            return Err(ParseError::BadBlockSize { block_size });
        }
        let memory_size = le_u64(b, 16);
        if memory_size == 0 || memory_size % BLOCK_SIZE != 0 || memory_size > MEMORY_SIZE_MAX {
            return Err(ParseError::BadMemorySize { memory_size });
        }
        let generation = le_u64(b, 24);
        let build_id = id_at(b, 32);
        let base_build_id = id_at(b, 48);
        if build_id.is_nil() || base_build_id.is_nil() {
            return Err(ParseError::NilBuildId);
        }
        let layer_count = le_u32(b, 64);
        let extent_count = le_u32(b, 68);
        if layer_count > LAYER_COUNT_MAX {
            return Err(ParseError::TooManyLayers { count: layer_count });
        }
        if extent_count > EXTENT_COUNT_MAX {
            return Err(ParseError::TooManyExtents {
                count: extent_count,
            });
        }
        // Cannot overflow: both counts are bounded above (u64 arithmetic on small values).
        let expected = (HEADER_FIXED_SIZE + CRC_SIZE) as u64
            + u64::from(layer_count) * LAYER_RECORD_SIZE as u64
            + u64::from(extent_count) * extent_record_size as u64;
        if expected != b.len() as u64 {
            return Err(ParseError::LengthMismatch {
                expected,
                actual: b.len(),
            });
        }
        // From here every record read is inside `b`: the length matches the counts.
        let layers = parse_layers(b, layer_count as usize, memory_size)?;
        let records = &b[HEADER_FIXED_SIZE + layers.len() * LAYER_RECORD_SIZE..body.len()];
        let extents = if version == VERSION {
            parse_extents(records, &layers, memory_size)?
        } else {
            parse_extents_v1(records, &layers, memory_size)?
        };
        Ok(Header {
            memory_size,
            generation,
            build_id,
            base_build_id,
            layers,
            extents,
        })
    }

    /// The header's bytes in the current version (2). Canonical: `parse(serialize(h)) == h`
    /// for every valid `h` (as made by `parse`, `from_base`, `merge` or `squash`), and
    /// `serialize(parse(b)) == b` for every accepted version-2 `b`. A header whose public
    /// fields were edited into an invalid state may serialize to bytes that are rejected or
    /// that parse to a different header (version 2 does not store the offsets).
    pub fn serialize(&self) -> Vec<u8> {
        let len = HEADER_FIXED_SIZE
            + self.layers.len() * LAYER_RECORD_SIZE
            + self.extents.len() * EXTENT_RECORD_SIZE
            + CRC_SIZE;
        let mut b = Vec::with_capacity(len);
        self.serialize_prefix(&mut b, VERSION);
        let mut offset = 0u64;
        for e in &self.extents {
            debug_assert_eq!(e.offset, offset, "extents of a valid header are contiguous");
            offset = e.end();
            let layer_ref = if e.is_zero() {
                0
            } else {
                // An id missing from the table gets the first index past it, which `parse`
                // rejects (`UnknownLayer`) instead of mapping it to some other layer.
                self.layers
                    .binary_search_by(|l| l.build_id.cmp(&e.build_id))
                    .unwrap_or(self.layers.len())
                    + 1
            };
            b.extend_from_slice(&pages_u32(e.length).to_le_bytes());
            b.extend_from_slice(&u32::try_from(layer_ref).unwrap_or(u32::MAX).to_le_bytes());
            b.extend_from_slice(&pages_u32(e.storage_offset).to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(b.len(), len);
        b
    }

    /// Magic through the layer table: identical in both versions.
    fn serialize_prefix(&self, b: &mut Vec<u8>, version: u32) {
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b.extend_from_slice(&self.memory_size.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.build_id.0);
        b.extend_from_slice(&self.base_build_id.0);
        b.extend_from_slice(&(self.layers.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for l in &self.layers {
            b.extend_from_slice(&l.build_id.0);
            b.extend_from_slice(&l.size.to_le_bytes());
        }
    }

    /// The header's bytes in version 1 (what earlier releases wrote), to test that such files
    /// are still read. Writes the fields as they are, valid or not.
    #[cfg(test)]
    pub(crate) fn serialize_v1(&self) -> Vec<u8> {
        let mut b = Vec::new();
        self.serialize_prefix(&mut b, VERSION_1);
        for e in &self.extents {
            b.extend_from_slice(&e.offset.to_le_bytes());
            b.extend_from_slice(&e.length.to_le_bytes());
            b.extend_from_slice(&e.build_id.0);
            b.extend_from_slice(&e.storage_offset.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Index of the extent that holds memory offset `offset` (O(log n)), or `None` past the end.
    pub fn find(&self, offset: u64) -> Option<usize> {
        if offset >= self.memory_size {
            return None;
        }
        // Extents are contiguous from 0, so the one holding `offset` is the last that starts at
        // or before it.
        let i = self.extents.partition_point(|e| e.offset <= offset);
        debug_assert!(i > 0);
        Some(i - 1)
    }

    /// The size recorded for layer `id`, if the header references it.
    pub fn layer(&self, id: &BuildId) -> Option<&Layer> {
        self.layers
            .binary_search_by(|l| l.build_id.cmp(id))
            .ok()
            .map(|i| &self.layers[i])
    }

    /// The first generation of a chain: `diff` over all-zero memory (ranges the diff leaves out
    /// read as zeros). `generation` is 1 and the base build id is `build_id`.
    pub fn from_base(
        memory_size: u64,
        build_id: BuildId,
        diff: &Diff,
    ) -> Result<Header, MergeError> {
        if memory_size == 0 || memory_size % BLOCK_SIZE != 0 || memory_size > MEMORY_SIZE_MAX {
            return Err(MergeError::BadMemorySize);
        }
        let zero = Header {
            memory_size,
            generation: 0,
            build_id,
            base_build_id: build_id,
            layers: Vec::new(),
            extents: vec![Extent {
                offset: 0,
                length: memory_size,
                build_id: BuildId::NIL,
                storage_offset: 0,
            }],
        };
        let mut h = zero.merge_inner(diff, build_id)?;
        h.base_build_id = build_id;
        Ok(h)
    }

    /// Lays a new generation over this one: the diff's ranges (data and zeros) win; every other
    /// block keeps this header's mapping. The result has `generation + 1`, the new build id, the
    /// same base build id, and only the layers still referenced.
    pub fn merge(&self, diff: &Diff, build_id: BuildId) -> Result<Header, MergeError> {
        if self.layer(&build_id).is_some() || build_id == self.build_id {
            return Err(MergeError::BadBuildId);
        }
        self.merge_inner(diff, build_id)
    }

    fn merge_inner(&self, diff: &Diff, build_id: BuildId) -> Result<Header, MergeError> {
        if build_id.is_nil() {
            return Err(MergeError::BadBuildId);
        }
        // A layer holds at most one copy of each page, and the header format relies on it.
        if diff.layer_size % BLOCK_SIZE != 0 || diff.layer_size > self.memory_size {
            return Err(MergeError::BadLayerSize);
        }
        let mut out: Vec<Extent> =
            Vec::with_capacity(self.extents.len() + 2 * diff.extents.len() + 1);
        let mut pos = 0u64;
        for (index, d) in diff.extents.iter().enumerate() {
            let end = d
                .offset
                .checked_add(d.length)
                .ok_or(MergeError::BadDiff { index })?;
            if d.length == 0
                || d.offset % BLOCK_SIZE != 0
                || d.length % BLOCK_SIZE != 0
                || d.offset < pos
                || end > self.memory_size
            {
                return Err(MergeError::BadDiff { index });
            }
            self.push_parent_range(&mut out, pos, d.offset);
            let e = match d.kind {
                DiffKind::Zero => Extent {
                    offset: d.offset,
                    length: d.length,
                    build_id: BuildId::NIL,
                    storage_offset: 0,
                },
                DiffKind::Data { storage_offset } => {
                    let ok = storage_offset % BLOCK_SIZE == 0
                        && storage_offset
                            .checked_add(d.length)
                            .is_some_and(|e| e <= diff.layer_size);
                    if !ok {
                        return Err(MergeError::StorageOutsideLayer { index });
                    }
                    Extent {
                        offset: d.offset,
                        length: d.length,
                        build_id,
                        storage_offset,
                    }
                }
            };
            push_coalesced(&mut out, e);
            pos = end;
        }
        self.push_parent_range(&mut out, pos, self.memory_size);
        if out.len() > EXTENT_COUNT_MAX as usize {
            return Err(MergeError::TooLarge);
        }
        let mut layers: Vec<Layer> = Vec::new();
        let mut ids: Vec<BuildId> = out
            .iter()
            .filter(|e| !e.is_zero())
            .map(|e| e.build_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let size = if id == build_id {
                diff.layer_size
            } else {
                // Every non-nil id in `out` other than the new one came from this header's
                // extents, whose ids are all in its layer table (a parse/merge invariant).
                self.layer(&id)
                    .map(|l| l.size)
                    .ok_or(MergeError::BadBuildId)?
            };
            layers.push(Layer { build_id: id, size });
        }
        if layers.len() > LAYER_COUNT_MAX as usize {
            return Err(MergeError::TooLarge);
        }
        Ok(Header {
            memory_size: self.memory_size,
            generation: self.generation + 1,
            build_id,
            base_build_id: self.base_build_id,
            layers,
            extents: out,
        })
    }

    /// Appends this header's mapping of `[from, to)` to `out`.
    fn push_parent_range(&self, out: &mut Vec<Extent>, from: u64, to: u64) {
        if from >= to {
            return;
        }
        let Some(mut i) = self.find(from) else { return };
        let mut cur = from;
        while cur < to && i < self.extents.len() {
            let p = &self.extents[i];
            let end = p.end().min(to);
            let skip = cur - p.offset;
            let storage_offset = if p.is_zero() {
                0
            } else {
                p.storage_offset + skip
            };
            push_coalesced(
                out,
                Extent {
                    offset: cur,
                    length: end - cur,
                    build_id: p.build_id,
                    storage_offset,
                },
            );
            cur = end;
            i += 1;
        }
    }

    /// Whether the chain references enough layers to be squashed.
    pub fn needs_squash(&self) -> bool {
        self.layers.len() > crate::limits::SQUASH_LAYER_COUNT
    }
}

/// `bytes` as a count of blocks. Exact for the lengths and storage offsets of a valid header
/// (block-aligned, at most `MEMORY_SIZE_MAX`); anything else saturates to a value `parse`
/// rejects.
fn pages_u32(bytes: u64) -> u32 {
    debug_assert_eq!(bytes % BLOCK_SIZE, 0, "valid headers are block-aligned");
    u32::try_from(bytes / BLOCK_SIZE).unwrap_or(u32::MAX)
}

/// The layer table (same in both versions). `b` holds at least `count` records after the
/// fixed part (the caller checked the length).
fn parse_layers(b: &[u8], count: usize, memory_size: u64) -> Result<Vec<Layer>, ParseError> {
    let mut layers: Vec<Layer> = Vec::with_capacity(count);
    for index in 0..count {
        let at = HEADER_FIXED_SIZE + index * LAYER_RECORD_SIZE;
        let l = Layer {
            build_id: id_at(b, at),
            size: le_u64(b, at + 16),
        };
        if l.build_id.is_nil() {
            return Err(ParseError::LayerNil { index });
        }
        if layers.last().is_some_and(|p| p.build_id >= l.build_id) {
            return Err(ParseError::LayersUnsorted { index });
        }
        if l.size % BLOCK_SIZE != 0 {
            return Err(ParseError::LayerUnaligned { index });
        }
        // A layer holds at most one copy of each page of memory; version 2 also relies on it
        // (storage offsets are u32 block counts).
        if l.size > memory_size {
            return Err(ParseError::LayerTooLarge { index });
        }
        layers.push(l);
    }
    Ok(layers)
}

/// Version-2 extent records: `{length in blocks: u32, layer ref: u32, storage offset in
/// blocks: u32}`, offsets implicit (each extent starts where the previous one ended).
fn parse_extents(
    records: &[u8],
    layers: &[Layer],
    memory_size: u64,
) -> Result<Vec<Extent>, ParseError> {
    let mut extents: Vec<Extent> = Vec::with_capacity(records.len() / EXTENT_RECORD_SIZE);
    let mut offset = 0u64;
    for (index, r) in records.chunks_exact(EXTENT_RECORD_SIZE).enumerate() {
        let pages = le_u32(r, 0);
        let layer_ref = le_u32(r, 4);
        let storage_pages = le_u32(r, 8);
        if pages == 0 {
            return Err(ParseError::ExtentEmpty { index });
        }
        // No overflow below: u32 block counts are below 2^44 bytes, and `offset` stays at or
        // below the memory size (≤ 2^40).
        let length = u64::from(pages) * BLOCK_SIZE;
        let storage_offset = u64::from(storage_pages) * BLOCK_SIZE;
        if length > memory_size - offset {
            return Err(ParseError::ExtentPastMemory { index });
        }
        let build_id = if layer_ref == 0 {
            if storage_pages != 0 {
                return Err(ParseError::ZeroExtentWithStorage { index });
            }
            BuildId::NIL
        } else {
            let layer = layers
                .get(layer_ref as usize - 1)
                .ok_or(ParseError::UnknownLayer { index })?;
            if storage_offset + length > layer.size {
                return Err(ParseError::StorageOutsideLayer { index });
            }
            layer.build_id
        };
        let e = Extent {
            offset,
            length,
            build_id,
            storage_offset,
        };
        if extents.last().is_some_and(|p| continues(p, &e)) {
            return Err(ParseError::ExtentNotMerged { index });
        }
        offset += length;
        extents.push(e);
    }
    if offset != memory_size {
        return Err(ParseError::NotCovering { covered: offset });
    }
    Ok(extents)
}

/// Version-1 extent records: `{offset: u64, length: u64, build id: 16, storage offset: u64}`.
/// Adjacent extents that continue each other were never written by any release but were
/// accepted; they are coalesced here so that the result is canonical.
fn parse_extents_v1(
    records: &[u8],
    layers: &[Layer],
    memory_size: u64,
) -> Result<Vec<Extent>, ParseError> {
    let mut extents = Vec::with_capacity(records.len() / EXTENT_RECORD_SIZE_V1);
    let mut expected_offset = 0u64;
    for (index, r) in records.chunks_exact(EXTENT_RECORD_SIZE_V1).enumerate() {
        let e = Extent {
            offset: le_u64(r, 0),
            length: le_u64(r, 8),
            build_id: id_at(r, 16),
            storage_offset: le_u64(r, 32),
        };
        check_extent(layers, memory_size, expected_offset, index, &e)?;
        expected_offset = e.end();
        push_coalesced(&mut extents, e);
    }
    if expected_offset != memory_size {
        return Err(ParseError::NotCovering {
            covered: expected_offset,
        });
    }
    Ok(extents)
}

/// One version-1 extent, checked against the layer table and where the previous one ended.
fn check_extent(
    layers: &[Layer],
    memory_size: u64,
    expected: u64,
    index: usize,
    e: &Extent,
) -> Result<(), ParseError> {
    if e.length == 0 {
        return Err(ParseError::ExtentEmpty { index });
    }
    if e.offset % BLOCK_SIZE != 0
        || e.length % BLOCK_SIZE != 0
        || e.storage_offset % BLOCK_SIZE != 0
    {
        return Err(ParseError::ExtentUnaligned { index });
    }
    if e.offset != expected {
        return Err(ParseError::ExtentNotContiguous {
            index,
            expected,
            offset: e.offset,
        });
    }
    let end = e
        .offset
        .checked_add(e.length)
        .ok_or(ParseError::ExtentOverflow { index })?;
    if end > memory_size {
        return Err(ParseError::ExtentPastMemory { index });
    }
    if e.build_id.is_nil() {
        if e.storage_offset != 0 {
            return Err(ParseError::ZeroExtentWithStorage { index });
        }
        return Ok(());
    }
    let layer = layers
        .binary_search_by(|l| l.build_id.cmp(&e.build_id))
        .map(|i| &layers[i])
        .map_err(|_| ParseError::UnknownLayer { index })?;
    let storage_end = e
        .storage_offset
        .checked_add(e.length)
        .ok_or(ParseError::StorageOutsideLayer { index })?;
    if storage_end > layer.size {
        return Err(ParseError::StorageOutsideLayer { index });
    }
    Ok(())
}

/// Appends `e`, extending the last extent instead when `e` continues it (same layer,
/// contiguous in memory and in storage).
fn push_coalesced(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if continues(last, &e) {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}

/// Whether `e` continues `last`: same layer (or both zeros), contiguous in memory and, for
/// data, in storage. A canonical header never holds two such neighbours.
fn continues(last: &Extent, e: &Extent) -> bool {
    last.build_id == e.build_id
        && last.end() == e.offset
        && (e.is_zero() || last.storage_offset + last.length == e.storage_offset)
}

/// Read access to layer data files by build id (the page server's mapped files, or anything
/// else in tests and tools).
pub trait Layers {
    /// The whole data file of layer `id`, if present.
    fn layer(&self, id: &BuildId) -> Option<&[u8]>;
}

impl Layers for std::collections::HashMap<BuildId, Vec<u8>> {
    fn layer(&self, id: &BuildId) -> Option<&[u8]> {
        self.get(id).map(|v| v.as_slice())
    }
}

/// Why a squash failed.
#[derive(Debug)]
pub enum SquashError {
    MissingLayer { build_id: BuildId },
    ShortLayer { build_id: BuildId },
    Write { source: std::io::Error },
    BadBuildId,
}

impl fmt::Display for SquashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SquashError::MissingLayer { build_id } => write!(f, "layer {build_id} is missing"),
            SquashError::ShortLayer { build_id } => {
                write!(f, "layer {build_id} is shorter than the header says")
            }
            SquashError::Write { .. } => write!(f, "cannot write the squashed layer"),
            SquashError::BadBuildId => write!(f, "squash build id is nil"),
        }
    }
}

impl std::error::Error for SquashError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SquashError::Write { source } => Some(source),
            _ => None,
        }
    }
}

/// Copies every data extent of `header` into one new layer written to `out`, in memory order,
/// and returns the header of that single layer: same memory and generation, build id and base
/// build id `build_id`, zero extents kept as zeros. Every byte reads the same as before.
pub fn squash(
    header: &Header,
    layers: &dyn Layers,
    out: &mut dyn std::io::Write,
    build_id: BuildId,
) -> Result<Header, SquashError> {
    if build_id.is_nil() {
        return Err(SquashError::BadBuildId);
    }
    let mut extents = Vec::with_capacity(header.extents.len());
    let mut cursor = 0u64;
    for e in &header.extents {
        if e.is_zero() {
            push_coalesced(&mut extents, *e);
            continue;
        }
        let data = layers.layer(&e.build_id).ok_or(SquashError::MissingLayer {
            build_id: e.build_id,
        })?;
        let start = usize::try_from(e.storage_offset).map_err(|_| SquashError::ShortLayer {
            build_id: e.build_id,
        })?;
        let bytes = start
            .checked_add(e.length as usize)
            .and_then(|end| data.get(start..end))
            .ok_or(SquashError::ShortLayer {
                build_id: e.build_id,
            })?;
        // In pieces: a mapped layer's pages are read in as each piece is written.
        for piece in bytes.chunks(crate::limits::SQUASH_CHUNK) {
            out.write_all(piece)
                .map_err(|source| SquashError::Write { source })?;
        }
        push_coalesced(
            &mut extents,
            Extent {
                offset: e.offset,
                length: e.length,
                build_id,
                storage_offset: cursor,
            },
        );
        cursor += e.length;
    }
    out.flush()
        .map_err(|source| SquashError::Write { source })?;
    let layers = if cursor > 0 {
        vec![Layer {
            build_id,
            size: cursor,
        }]
    } else {
        Vec::new()
    };
    Ok(Header {
        memory_size: header.memory_size,
        generation: header.generation,
        build_id,
        base_build_id: build_id,
        layers,
        extents,
    })
}

/// Fuzz target body: parsing arbitrary bytes never panics; an accepted header is canonical
/// (no two neighbouring extents continue each other) and serializes to bytes that parse back
/// equal; for version 2 those bytes are exactly the input (`serialize(parse(b)) == b`), for
/// version 1 (rewritten as version 2) `parse(serialize(parse(b))) == parse(b)`.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(h) = Header::parse(data) {
        let bytes = h.serialize();
        if data.get(8..12) == Some(&VERSION.to_le_bytes()[..]) {
            assert_eq!(bytes.as_slice(), data, "accepted header is not canonical");
        } else {
            assert_eq!(data.get(8..12), Some(&VERSION_1.to_le_bytes()[..]));
        }
        assert_eq!(Header::parse(&bytes).as_ref(), Ok(&h));
        for w in h.extents.windows(2) {
            assert!(!continues(&w[0], &w[1]), "unmerged extents {w:?}");
        }
        for probe in [0, h.memory_size / 2, h.memory_size - 1] {
            let i = h.find(probe).expect("offset inside memory");
            let e = &h.extents[i];
            assert!(e.offset <= probe && probe < e.end());
        }
        assert!(h.find(h.memory_size).is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// splitmix64: a small seeded generator; failing tests print their seed.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Pages a generation wrote: page -> Some(generation) for data, None for zeros.
    type Writes = Vec<(u64, Option<u64>)>;

    fn seeds() -> Vec<u64> {
        match std::env::var("UFFD_PROPTEST_SEED") {
            Ok(s) => vec![s.parse().expect("UFFD_PROPTEST_SEED is a number")],
            Err(_) => (1..=300).collect(),
        }
    }

    fn id(n: u64) -> BuildId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(n + 1).to_le_bytes());
        b[8] = 0xA5;
        BuildId(b)
    }

    /// Content of page `page` as written by generation `gen`: every byte says who wrote it.
    fn page_bytes(gen: u64, page: u64) -> Vec<u8> {
        let mut v = vec![0u8; BLOCK_SIZE as usize];
        for (i, b) in v.iter_mut().enumerate() {
            *b = (gen as u8).wrapping_mul(31) ^ (page as u8).wrapping_mul(7) ^ (i as u8) | 1;
        }
        v
    }

    /// A random diff over `pages` pages; returns it, the layer bytes, and the model update
    /// (page -> Some(gen) for data, None for zero).
    fn random_diff(rng: &mut Rng, pages: u64, gen: u64) -> (Diff, Vec<u8>, Writes) {
        let mut diff = Diff::default();
        let mut layer = Vec::new();
        let mut writes = Vec::new();
        let mut p = rng.below(4);
        while p < pages {
            let len = 1 + rng.below(6).min(pages - p - 1);
            let zero = rng.below(3) == 0;
            let kind = if zero {
                DiffKind::Zero
            } else {
                let storage_offset = layer.len() as u64;
                for q in p..p + len {
                    layer.extend_from_slice(&page_bytes(gen, q));
                }
                DiffKind::Data { storage_offset }
            };
            diff.extents.push(DiffExtent {
                offset: p * BLOCK_SIZE,
                length: len * BLOCK_SIZE,
                kind,
            });
            for q in p..p + len {
                writes.push((q, if zero { None } else { Some(gen) }));
            }
            p += len + rng.below(8);
        }
        diff.layer_size = layer.len() as u64;
        (diff, layer, writes)
    }

    fn read_page(h: &Header, layers: &dyn Layers, page: u64) -> Vec<u8> {
        let off = page * BLOCK_SIZE;
        let e = &h.extents[h.find(off).expect("inside memory")];
        if e.is_zero() {
            return vec![0u8; BLOCK_SIZE as usize];
        }
        let data = layers.layer(&e.build_id).expect("layer present");
        let s = (e.storage_offset + off - e.offset) as usize;
        data[s..s + BLOCK_SIZE as usize].to_vec()
    }

    #[test]
    fn chains_resolve_to_newest_writer_and_squash_preserves_bytes() {
        for seed in seeds() {
            eprintln!("seed {seed} (rerun with UFFD_PROPTEST_SEED={seed})");
            let mut rng = Rng(seed);
            let pages = 1 + rng.below(200);
            let memory_size = pages * BLOCK_SIZE;
            let mut model: Vec<Option<u64>> = vec![None; pages as usize];
            let mut layers: HashMap<BuildId, Vec<u8>> = HashMap::new();
            let (d0, l0, w0) = random_diff(&mut rng, pages, 0);
            let mut h = Header::from_base(memory_size, id(0), &d0).unwrap();
            layers.insert(id(0), l0);
            for (p, v) in w0 {
                model[p as usize] = v;
            }
            let gens = 1 + rng.below(12);
            for g in 1..=gens {
                let (d, l, w) = random_diff(&mut rng, pages, g);
                h = h.merge(&d, id(g)).unwrap();
                layers.insert(id(g), l);
                for (p, v) in w {
                    model[p as usize] = v;
                }
                assert_eq!(h.generation, g + 1);
                assert_eq!(h.base_build_id, id(0));
                let bytes = h.serialize();
                assert_eq!(Header::parse(&bytes).unwrap(), h);
                assert_eq!(Header::parse(&h.serialize_v1()).unwrap(), h, "version 1");
                fuzz_parse(&bytes);
                for p in 0..pages {
                    let want = model[p as usize]
                        .map(|g| page_bytes(g, p))
                        .unwrap_or(vec![0; BLOCK_SIZE as usize]);
                    assert_eq!(
                        read_page(&h, &layers, p),
                        want,
                        "page {p} after generation {g}"
                    );
                }
                // Adjacent extents never continue each other (merge coalesces).
                for w in h.extents.windows(2) {
                    let cont = w[0].build_id == w[1].build_id
                        && (w[0].is_zero()
                            || w[0].storage_offset + w[0].length == w[1].storage_offset);
                    assert!(!cont, "uncoalesced extents {w:?}");
                }
            }
            let mut out = Vec::new();
            let sq = squash(&h, &layers, &mut out, id(1000)).unwrap();
            assert!(sq.layers.len() <= 1);
            assert_eq!(Header::parse(&sq.serialize()).unwrap(), sq);
            let mut sl = HashMap::new();
            sl.insert(id(1000), out);
            for p in 0..pages {
                assert_eq!(
                    read_page(&sq, &sl, p),
                    read_page(&h, &layers, p),
                    "squashed page {p}"
                );
            }
        }
    }

    fn sample() -> Header {
        let d = Diff {
            extents: vec![
                DiffExtent {
                    offset: 0,
                    length: 8192,
                    kind: DiffKind::Data { storage_offset: 0 },
                },
                DiffExtent {
                    offset: 16384,
                    length: 4096,
                    kind: DiffKind::Zero,
                },
                DiffExtent {
                    offset: 20480,
                    length: 4096,
                    kind: DiffKind::Data {
                        storage_offset: 8192,
                    },
                },
            ],
            layer_size: 12288,
        };
        Header::from_base(32768, id(1), &d).unwrap()
    }

    /// Serializes `h` as version 1 without checking it (to build invalid files with a valid
    /// CRC; version 1 stores every field, so each one can be broken on its own).
    fn raw(h: &Header) -> Vec<u8> {
        h.serialize_v1()
    }

    fn reparse_with(h: &Header, f: impl FnOnce(&mut Header)) -> Result<Header, ParseError> {
        let mut h = h.clone();
        f(&mut h);
        Header::parse(&raw(&h))
    }

    #[test]
    fn v1_parser_rejects_each_malformation() {
        let h = sample();
        assert_eq!(Header::parse(&h.serialize_v1()).unwrap(), h);
        use ParseError::*;
        let e = |r: Result<Header, ParseError>| r.unwrap_err();
        assert!(matches!(
            e(reparse_with(&h, |h| h.memory_size = 0)),
            BadMemorySize { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.memory_size = 1000)),
            BadMemorySize { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.memory_size = 65536)),
            NotCovering { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.memory_size = 16384)),
            ExtentPastMemory { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.build_id = BuildId::NIL)),
            NilBuildId
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.extents.swap(0, 1))),
            ExtentNotContiguous { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.extents[1].offset -= 4096)),
            ExtentNotContiguous { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.extents[1].offset += 4096)),
            ExtentNotContiguous { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.extents[0].length = 0)),
            ExtentEmpty { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.extents[0].length = 100)),
            ExtentUnaligned { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.extents[0].storage_offset = 1)),
            ExtentUnaligned { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.extents[1].length = u64::MAX - 4095)),
            ExtentOverflow { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.extents[0].storage_offset = 8192)),
            StorageOutsideLayer { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.extents[0].build_id = id(9))),
            UnknownLayer { .. }
        ));
        let zi = h.extents.iter().position(|e| e.is_zero()).unwrap();
        assert!(matches!(
            e(reparse_with(&h, |h| h.extents[zi].storage_offset = 4096)),
            ZeroExtentWithStorage { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.layers[0].size = 100)),
            LayerUnaligned { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.layers[0].build_id = BuildId::NIL)),
            LayerNil { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.layers.push(h.layers[0]))),
            LayersUnsorted { .. }
        ));
        assert!(matches!(
            e(reparse_with(&h, |h| h.layers[0].size = 65536)),
            LayerTooLarge { .. }
        ));
        let mut b = h.serialize_v1();
        b[0] = b'X';
        assert_eq!(Header::parse(&b), Err(BadMagic));
        let mut b = h.serialize_v1();
        b[40] ^= 1;
        assert!(matches!(Header::parse(&b), Err(BadCrc { .. })));
        assert!(matches!(Header::parse(&b[..20]), Err(TooShort { .. })));
        // Version / block size / counts with a fixed-up CRC.
        let fix = |mut b: Vec<u8>| {
            let n = b.len() - 4;
            let crc = crc32fast::hash(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut b = h.serialize_v1();
        b[8] = 3;
        assert_eq!(Header::parse(&fix(b)), Err(BadVersion { version: 3 }));
        let mut b = h.serialize_v1();
        b[8] = 0;
        assert_eq!(Header::parse(&fix(b)), Err(BadVersion { version: 0 }));
        // A version-1 body labelled version 2 has the wrong length for its counts.
        let mut b = h.serialize_v1();
        b[8] = 2;
        assert!(matches!(Header::parse(&fix(b)), Err(LengthMismatch { .. })));
        let mut b = h.serialize_v1();
        b[12..16].copy_from_slice(&8192u32.to_le_bytes());
        assert_eq!(
            Header::parse(&fix(b)),
            Err(BadBlockSize { block_size: 8192 })
        );
        let mut b = h.serialize_v1();
        b[68..72].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Header::parse(&fix(b)), Err(TooManyExtents { .. })));
        let mut b = h.serialize_v1();
        b[64..68].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Header::parse(&fix(b)), Err(TooManyLayers { .. })));
        let mut b = h.serialize_v1();
        b[68..72].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(Header::parse(&fix(b)), Err(LengthMismatch { .. })));
        // Every error has a message.
        assert!(!ParseError::NotCovering { covered: 3 }
            .to_string()
            .is_empty());
    }

    #[test]
    fn random_mutations_never_panic_and_accepted_input_round_trips() {
        let bases = [sample().serialize(), sample().serialize_v1()];
        for seed in seeds() {
            let mut rng = Rng(seed ^ 0xdead_beef);
            let mut b = bases[(seed % 2) as usize].clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.next() as u8;
            }
            if rng.below(2) == 0 {
                // Fix the CRC so the structural checks run.
                let n = b.len() - 4;
                let crc = crc32fast::hash(&b[..n]);
                b[n..].copy_from_slice(&crc.to_le_bytes());
            }
            let cut = rng.below(b.len() as u64 + 1) as usize;
            fuzz_parse(&b);
            fuzz_parse(&b[..cut]);
        }
    }

    #[test]
    fn merge_rejects_bad_diffs() {
        let h = sample();
        let d = |extents: Vec<DiffExtent>, layer_size| Diff {
            extents,
            layer_size,
        };
        let z = |offset, length| DiffExtent {
            offset,
            length,
            kind: DiffKind::Zero,
        };
        assert_eq!(
            h.merge(&d(vec![z(4096, 4096), z(0, 4096)], 0), id(2)),
            Err(MergeError::BadDiff { index: 1 })
        );
        assert_eq!(
            h.merge(&d(vec![z(0, 8192), z(4096, 4096)], 0), id(2)),
            Err(MergeError::BadDiff { index: 1 })
        );
        assert_eq!(
            h.merge(&d(vec![z(100, 4096)], 0), id(2)),
            Err(MergeError::BadDiff { index: 0 })
        );
        assert_eq!(
            h.merge(&d(vec![z(0, 0)], 0), id(2)),
            Err(MergeError::BadDiff { index: 0 })
        );
        assert_eq!(
            h.merge(&d(vec![z(28672, 8192)], 0), id(2)),
            Err(MergeError::BadDiff { index: 0 })
        );
        let data = DiffExtent {
            offset: 0,
            length: 8192,
            kind: DiffKind::Data { storage_offset: 0 },
        };
        assert_eq!(
            h.merge(&d(vec![data], 4096), id(2)),
            Err(MergeError::StorageOutsideLayer { index: 0 })
        );
        assert_eq!(
            h.merge(&d(vec![], 100), id(2)),
            Err(MergeError::BadLayerSize)
        );
        assert_eq!(
            h.merge(&d(vec![], h.memory_size + 4096), id(2)),
            Err(MergeError::BadLayerSize)
        );
        assert_eq!(
            Header::from_base(8192, id(2), &d(vec![], 12288)),
            Err(MergeError::BadLayerSize)
        );
        assert_eq!(h.merge(&d(vec![], 0), id(1)), Err(MergeError::BadBuildId));
        assert_eq!(
            h.merge(&d(vec![], 0), BuildId::NIL),
            Err(MergeError::BadBuildId)
        );
        // An empty diff keeps every mapping; unreferenced layers drop out of the table.
        let m = h.merge(&d(vec![], 0), id(2)).unwrap();
        assert_eq!(m.extents, h.extents);
        let all_zero = h.merge(&d(vec![z(0, 32768)], 0), id(3)).unwrap();
        assert!(all_zero.layers.is_empty());
        assert_eq!(all_zero.extents.len(), 1);
    }

    #[test]
    fn find_is_exact_at_boundaries() {
        let h = sample();
        for e in &h.extents {
            assert_eq!(h.extents[h.find(e.offset).unwrap()], *e);
            assert_eq!(h.extents[h.find(e.end() - 1).unwrap()], *e);
        }
        assert_eq!(h.find(h.memory_size), None);
    }

    /// A version-2 file built from its parts by hand, following `uffd/HEADER.md` (not through
    /// `serialize`), CRC included: generation 1, build id and base build id `id(1)`; each
    /// extent is `[length in blocks, layer ref, storage offset in blocks]`.
    fn v2_bytes(memory_size: u64, layers: &[Layer], records: &[[u32; 3]]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"WRNSNAPH");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&4096u32.to_le_bytes());
        b.extend_from_slice(&memory_size.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&id(1).0);
        b.extend_from_slice(&id(1).0);
        b.extend_from_slice(&(layers.len() as u32).to_le_bytes());
        b.extend_from_slice(&(records.len() as u32).to_le_bytes());
        for l in layers {
            b.extend_from_slice(&l.build_id.0);
            b.extend_from_slice(&l.size.to_le_bytes());
        }
        for r in records {
            for v in r {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// `sample()`'s layer table and extent records in version 2.
    fn sample_v2() -> (Vec<Layer>, [[u32; 3]; 4]) {
        let layers = vec![Layer {
            build_id: id(1),
            size: 12288,
        }];
        (layers, [[2, 1, 0], [3, 0, 0], [1, 1, 2], [2, 0, 0]])
    }

    /// Replaces the CRC of `b` with the right one.
    fn fix_crc(mut b: Vec<u8>) -> Vec<u8> {
        let n = b.len() - 4;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn v2_layout_is_the_documented_one_and_round_trips() {
        let h = sample();
        let (layers, records) = sample_v2();
        let b = h.serialize();
        assert_eq!(b, v2_bytes(32768, &layers, &records));
        assert_eq!(b.len(), 72 + 24 + 12 * 4 + 4);
        assert_eq!(Header::parse(&b).unwrap(), h);
        assert_eq!(Header::parse(&b).unwrap().serialize(), b);
        fuzz_parse(&b);
        // All zeros, no layers: one record.
        let z = Header::from_base(1 << 30, id(1), &Diff::default()).unwrap();
        let b = z.serialize();
        assert_eq!(b, v2_bytes(1 << 30, &[], &[[1 << 18, 0, 0]]));
        assert_eq!(Header::parse(&b).unwrap(), z);
        // The largest memory fits (block counts are u32).
        let big = v2_bytes(
            MEMORY_SIZE_MAX,
            &[],
            &[[(MEMORY_SIZE_MAX / 4096) as u32, 0, 0]],
        );
        assert_eq!(Header::parse(&big).unwrap().memory_size, MEMORY_SIZE_MAX);
        fuzz_parse(&big);
    }

    #[test]
    fn v2_parser_rejects_each_malformation() {
        use ParseError::*;
        let (l, good) = sample_v2();
        let p = |mem: u64, layers: &[Layer], recs: &[[u32; 3]]| {
            Header::parse(&v2_bytes(mem, layers, recs))
        };
        assert_eq!(p(32768, &l, &good), Ok(sample()));
        let with = |i: usize, field: usize, v: u32| {
            let mut r = good;
            r[i][field] = v;
            p(32768, &l, &r)
        };
        // Lengths.
        assert_eq!(with(0, 0, 0), Err(ExtentEmpty { index: 0 }));
        assert_eq!(with(3, 0, 3), Err(ExtentPastMemory { index: 3 }));
        assert_eq!(with(0, 0, u32::MAX), Err(ExtentPastMemory { index: 0 }));
        assert_eq!(with(3, 0, 1), Err(NotCovering { covered: 28672 }));
        assert_eq!(p(32768, &l, &[]), Err(NotCovering { covered: 0 }));
        let mut extra = good.to_vec();
        extra.push([1, 0, 0]);
        assert_eq!(p(32768, &l, &extra), Err(ExtentPastMemory { index: 4 }));
        // Layer references and storage.
        assert_eq!(with(0, 1, 2), Err(UnknownLayer { index: 0 }));
        assert_eq!(with(0, 1, u32::MAX), Err(UnknownLayer { index: 0 }));
        assert_eq!(with(1, 2, 1), Err(ZeroExtentWithStorage { index: 1 }));
        assert_eq!(with(2, 2, 3), Err(StorageOutsideLayer { index: 2 }));
        assert_eq!(with(2, 2, u32::MAX), Err(StorageOutsideLayer { index: 2 }));
        assert_eq!(with(0, 2, 2), Err(StorageOutsideLayer { index: 0 }));
        // Neighbours that continue each other must be merged: zeros after zeros, and a data
        // run split in two. The same layer with a jump in storage is another, valid header.
        let zz = [[2, 1, 0], [1, 0, 0], [2, 0, 0], [1, 1, 2], [2, 0, 0]];
        assert_eq!(p(32768, &l, &zz), Err(ExtentNotMerged { index: 2 }));
        let dd = [[1, 1, 0], [1, 1, 1], [3, 0, 0], [1, 1, 2], [2, 0, 0]];
        assert_eq!(p(32768, &l, &dd), Err(ExtentNotMerged { index: 1 }));
        let jump = [[1, 1, 1], [1, 1, 0], [3, 0, 0], [1, 1, 2], [2, 0, 0]];
        let h = p(32768, &l, &jump).unwrap();
        assert_eq!(h.extents[0].storage_offset, 4096);
        assert_eq!(h.extents[1].offset, 4096);
        // The layer table.
        let layer = |n: u64, size: u64| Layer {
            build_id: id(n),
            size,
        };
        assert_eq!(
            p(32768, &[layer(1, 36864)], &good),
            Err(LayerTooLarge { index: 0 })
        );
        assert_eq!(
            p(32768, &[layer(1, 100)], &good),
            Err(LayerUnaligned { index: 0 })
        );
        let nil = Layer {
            build_id: BuildId::NIL,
            size: 12288,
        };
        assert_eq!(p(32768, &[nil], &good), Err(LayerNil { index: 0 }));
        assert_eq!(
            p(32768, &[layer(1, 12288), layer(1, 12288)], &good),
            Err(LayersUnsorted { index: 1 })
        );
        assert_eq!(
            p(32768, &[layer(2, 12288), layer(1, 12288)], &good),
            Err(LayersUnsorted { index: 1 })
        );
        // The memory size.
        for mem in [0, 1000, MEMORY_SIZE_MAX + 4096] {
            assert!(matches!(p(mem, &l, &good), Err(BadMemorySize { .. })));
        }
        // The fixed part, with the CRC fixed up so the check behind it runs.
        let b = v2_bytes(32768, &l, &good);
        let patched = |at: usize, v: u32| {
            let mut b = b.clone();
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            Header::parse(&fix_crc(b))
        };
        assert_eq!(patched(8, 3), Err(BadVersion { version: 3 }));
        // A version-2 body labelled version 1 has the wrong length for its counts.
        assert!(matches!(patched(8, 1), Err(LengthMismatch { .. })));
        assert!(matches!(patched(12, 8192), Err(BadBlockSize { .. })));
        assert!(matches!(patched(64, u32::MAX), Err(TooManyLayers { .. })));
        assert!(matches!(patched(68, u32::MAX), Err(TooManyExtents { .. })));
        assert!(matches!(patched(68, 1000), Err(LengthMismatch { .. })));
        assert!(matches!(patched(68, 3), Err(LengthMismatch { .. })));
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(Header::parse(&bad), Err(BadMagic));
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert!(matches!(Header::parse(&bad), Err(BadCrc { .. })));
        assert!(matches!(Header::parse(&b[..75]), Err(TooShort { .. })));
        assert!(matches!(
            Header::parse(&fix_crc(b[..b.len() - 12].to_vec())),
            Err(LengthMismatch { .. })
        ));
        // Every new error has a message.
        assert!(!ExtentNotMerged { index: 1 }.to_string().is_empty());
        assert!(!LayerTooLarge { index: 1 }.to_string().is_empty());
    }

    #[test]
    fn v1_unmerged_neighbours_are_merged_on_read() {
        let h = sample();
        let data = |offset, storage_offset| Extent {
            offset,
            length: 4096,
            build_id: id(1),
            storage_offset,
        };
        let zero = |offset, length| Extent {
            offset,
            length,
            build_id: BuildId::NIL,
            storage_offset: 0,
        };
        let mut split = h.clone();
        split.extents = vec![
            data(0, 0),
            data(4096, 4096),
            zero(8192, 4096),
            zero(12288, 8192),
            h.extents[2],
            h.extents[3],
        ];
        let b = split.serialize_v1();
        assert_eq!(Header::parse(&b).unwrap(), h);
        fuzz_parse(&b);
    }

    /// The header a pause writes after a restore from a template: the new generation's dirty
    /// runs alternate with the template's layer, 550 extents over 2 layers. Version 2 costs
    /// 12 bytes an extent instead of 40. Run with `--nocapture` to see both sizes.
    #[test]
    fn v2_header_of_550_extents_is_small() {
        let memory_size = 512u64 << 20;
        let all = Diff {
            extents: vec![DiffExtent {
                offset: 0,
                length: memory_size,
                kind: DiffKind::Data { storage_offset: 0 },
            }],
            layer_size: memory_size,
        };
        let template = Header::from_base(memory_size, id(0), &all).unwrap();
        let dirty = Diff {
            extents: (0..275u64)
                .map(|k| DiffExtent {
                    offset: k * 400 * BLOCK_SIZE,
                    length: BLOCK_SIZE,
                    kind: DiffKind::Data {
                        storage_offset: k * BLOCK_SIZE,
                    },
                })
                .collect(),
            layer_size: 275 * BLOCK_SIZE,
        };
        let h = template.merge(&dirty, id(1)).unwrap();
        let (l, e) = (h.layers.len(), h.extents.len());
        assert_eq!((l, e), (2, 550));
        let v2 = h.serialize();
        let v1 = h.serialize_v1();
        eprintln!(
            "header with {l} layers and {e} extents: version 1 {} bytes, version 2 {} bytes",
            v1.len(),
            v2.len()
        );
        assert!(v2.len() <= 72 + 24 * l + 12 * 550 + 4);
        assert_eq!(v2.len(), 72 + 24 * l + 12 * e + 4);
        assert_eq!(v1.len(), 72 + 24 * l + 40 * e + 4);
        assert_eq!(Header::parse(&v2).unwrap(), h);
        assert_eq!(Header::parse(&v1).unwrap(), h);
    }

    #[test]
    fn build_id_text_round_trips() {
        let b = id(0x1234_5678_9abc);
        let s = b.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(BuildId::parse(&s), Some(b));
        assert_eq!(BuildId::parse(&s.to_uppercase()), Some(b));
        assert_eq!(BuildId::parse("nope"), None);
        assert!(b.layer_file_name().ends_with(".layer"));
    }
}
