//! Replays the committed fuzz corpus (`fuzz/corpus/uffd_*`) through the fuzz target bodies, and
//! checks the handshake parser against serde_json as an oracle.

use std::path::PathBuf;

fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display())) {
        let p = e.unwrap().path();
        let b = std::fs::read(&p).unwrap();
        out.push((p, b));
    }
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

#[test]
fn header_corpus() {
    let mut accepted = [0usize; 3];
    for (p, b) in corpus("uffd_header") {
        eprintln!("{}", p.display());
        uffd::header::fuzz_parse(&b);
        if uffd::header::Header::parse(&b).is_ok() {
            accepted[usize::from(b[8]).min(2)] += 1;
        }
    }
    assert!(accepted[1] > 0, "the corpus holds valid version-1 headers");
    assert!(accepted[2] > 0, "the corpus holds valid version-2 headers");
}

fn corpus_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus/uffd_header")
        .join(name)
}

/// The version-1 seeds were written by the release before version 2 existed: they are the
/// files such a host still holds. They still parse, to the same header they always meant.
#[test]
fn header_v1_files_still_parse() {
    use uffd::header::{BuildId, Extent, Header, Layer};
    let b = std::fs::read(corpus_file("valid-one-layer")).unwrap();
    assert_eq!(u32::from_le_bytes([b[8], b[9], b[10], b[11]]), 1);
    let one = BuildId([1; 16]);
    let e = |offset, length, build_id, storage_offset| Extent {
        offset,
        length,
        build_id,
        storage_offset,
    };
    let want = Header {
        memory_size: 32768,
        generation: 1,
        build_id: one,
        base_build_id: one,
        layers: vec![Layer {
            build_id: one,
            size: 12288,
        }],
        extents: vec![
            e(0, 8192, one, 0),
            e(8192, 8192, BuildId::NIL, 0),
            e(16384, 4096, one, 8192),
            e(20480, 12288, BuildId::NIL, 0),
        ],
    };
    assert_eq!(Header::parse(&b), Ok(want.clone()));
    // Rewritten in version 2 (what the next pause writes), it means the same.
    let v2 = want.serialize();
    assert_eq!(u32::from_le_bytes([v2[8], v2[9], v2[10], v2[11]]), 2);
    assert_eq!(v2.len(), 72 + 24 + 12 * 4 + 4);
    assert_eq!(Header::parse(&v2), Ok(want));
}

/// Version-2 seeds, derived from the version-1 valid seeds: each valid one rewritten, then
/// malformed copies of `valid-one-layer-v2` (extent records `[blocks, layer ref, storage
/// block]` at 96 + 12·i, its one layer's size at 88), each with the error it must give.
fn header_v2_seeds() -> Vec<(&'static str, Vec<u8>, Option<uffd::header::ParseError>)> {
    use uffd::header::{Header, ParseError::*};
    let upgrade = |name: &str| {
        let v1 = std::fs::read(corpus_file(name)).unwrap();
        Header::parse(&v1).unwrap().serialize()
    };
    let fix_crc = |mut b: Vec<u8>| {
        let n = b.len() - 4;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        b
    };
    let one = upgrade("valid-one-layer");
    let set = |at: usize, v: u32| {
        let mut b = one.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        fix_crc(b)
    };
    let rec = |i: usize, field: usize| 96 + 12 * i + 4 * field;
    // Extent 0 (2 blocks of the layer from block 0) split into two halves that continue each
    // other.
    let mut unmerged = one[..96].to_vec();
    unmerged[68..72].copy_from_slice(&5u32.to_le_bytes());
    for v in [1u32, 1, 0, 1, 1, 1] {
        unmerged.extend_from_slice(&v.to_le_bytes());
    }
    unmerged.extend_from_slice(&one[108..]);
    let mut short = one[..one.len() - 16].to_vec();
    short.extend_from_slice(&[0; 4]);
    let mut bad_crc = one.clone();
    bad_crc[100] ^= 1;
    let crc_error = BadCrc {
        stored: u32::from_le_bytes([one[144], one[145], one[146], one[147]]),
        computed: crc32fast::hash(&bad_crc[..144]),
    };
    vec![
        ("valid-one-layer-v2", one.clone(), None),
        ("valid-all-zero-v2", upgrade("valid-all-zero"), None),
        ("valid-two-layers-v2", upgrade("valid-two-layers"), None),
        (
            "empty-extent-v2",
            set(rec(0, 0), 0),
            Some(ExtentEmpty { index: 0 }),
        ),
        (
            "past-memory-v2",
            set(rec(3, 0), u32::MAX),
            Some(ExtentPastMemory { index: 3 }),
        ),
        (
            "not-covering-v2",
            set(rec(3, 0), 2),
            Some(NotCovering { covered: 28672 }),
        ),
        (
            "unknown-layer-v2",
            set(rec(0, 1), 2),
            Some(UnknownLayer { index: 0 }),
        ),
        (
            "zero-with-storage-v2",
            set(rec(1, 2), 1),
            Some(ZeroExtentWithStorage { index: 1 }),
        ),
        (
            "storage-outside-v2",
            set(rec(2, 2), 3),
            Some(StorageOutsideLayer { index: 2 }),
        ),
        (
            "layer-too-large-v2",
            set(88, 36864),
            Some(LayerTooLarge { index: 0 }),
        ),
        (
            "unmerged-v2",
            fix_crc(unmerged),
            Some(ExtentNotMerged { index: 1 }),
        ),
        (
            "length-mismatch-v2",
            fix_crc(short),
            Some(LengthMismatch {
                expected: 148,
                actual: 136,
            }),
        ),
        ("bad-version-v3", set(8, 3), Some(BadVersion { version: 3 })),
        ("bad-crc-v2", bad_crc, Some(crc_error)),
    ]
}

/// The committed version-2 seeds are what `header_v2_seeds` makes, and each gives the result
/// its name says.
#[test]
fn header_v2_seeds_are_current_and_mean_what_they_say() {
    for (name, bytes, want) in header_v2_seeds() {
        let got = uffd::header::Header::parse(&bytes);
        match &want {
            None => assert!(got.is_ok(), "{name}: {got:?}"),
            Some(e) => assert_eq!(got.as_ref().err(), Some(e), "{name}"),
        }
        let committed = std::fs::read(corpus_file(name)).unwrap_or_default();
        assert!(
            committed == bytes,
            "fuzz/corpus/uffd_header/{name} is missing or stale; rewrite the seeds with \
             `cargo test -p uffd --test it -- --ignored write_header_v2_seeds`"
        );
    }
}

/// Writes the version-2 seeds into the corpus. Run by hand only (it changes the repository).
#[test]
#[ignore = "writes fuzz/corpus/uffd_header; run by hand after changing the seeds"]
fn write_header_v2_seeds() {
    for (name, bytes, _) in header_v2_seeds() {
        std::fs::write(corpus_file(name), bytes).unwrap();
    }
}

/// What serde_json makes of a handshake: the regions if the JSON has exactly our shape.
fn oracle(b: &[u8]) -> Option<Vec<uffd::handshake::Region>> {
    let v: serde_json::Value = serde_json::from_slice(b).ok()?;
    let mut out = Vec::new();
    for o in v.as_array()? {
        let o = o.as_object()?;
        let get = |k: &str| o.get(k).and_then(|v| v.as_u64());
        let page_size = match (get("page_size"), get("page_size_kib")) {
            (Some(a), Some(b)) if a != b => return None,
            (Some(a), _) | (None, Some(a)) => a,
            _ => return None,
        };
        out.push(uffd::handshake::Region {
            base_host_virt_addr: get("base_host_virt_addr")?,
            size: get("size")?,
            offset: get("offset")?,
            page_size,
        });
    }
    Some(out)
}

#[test]
fn handshake_corpus_and_oracle() {
    let mut accepted = 0;
    for (p, b) in corpus("uffd_handshake") {
        uffd::handshake::fuzz_parse(&b);
        if let Ok(ours) = uffd::handshake::parse_regions(&b) {
            accepted += 1;
            assert_eq!(
                oracle(&b),
                Some(ours),
                "{}: serde_json disagrees",
                p.display()
            );
        }
    }
    assert!(accepted > 0);
}

#[test]
fn working_set_corpus() {
    use uffd::working_set::{ParseError, WorkingSet};
    let mut valid = 0;
    for (p, b) in corpus("uffd_working_set") {
        uffd::working_set::fuzz_parse(&b);
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let r = WorkingSet::parse(&b);
        // The seeds' names say what they hold (fuzzing may add others: only parse them).
        let expected = match name.as_str() {
            "repeated" => Some(Err(ParseError::Repeated { index: 2 })),
            "unaligned" => Some(Err(ParseError::BadPage { index: 0 })),
            "past-memory" => Some(Err(ParseError::BadPage { index: 0 })),
            "bad-crc" => Some(Err(ParseError::BadCrc)),
            "bad-version" => Some(Err(ParseError::BadVersion { version: 2 })),
            "count-mismatch" => Some(Err(ParseError::LengthMismatch)),
            "too-many" => Some(Err(ParseError::TooMany { count: 3 })),
            "zero-memory" => Some(Err(ParseError::BadMemorySize)),
            _ => None,
        };
        if let Some(e) = expected {
            assert_eq!(r.as_ref().map(|_| ()).map_err(Clone::clone), e, "{name}");
        }
        if name == "valid-runs" {
            let ws = r.unwrap();
            assert_eq!(ws.pages, vec![8192, 12288, 0, 4096, 65536]);
            assert_eq!(ws.runs(), vec![(8192, 8192), (0, 8192), (65536, 4096)]);
            valid += 1;
        } else if name == "valid-empty" {
            assert!(r.unwrap().pages.is_empty());
            valid += 1;
        }
    }
    assert_eq!(valid, 2, "both valid seeds are in the corpus");
}
