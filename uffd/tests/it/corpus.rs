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
    let mut accepted = 0;
    for (p, b) in corpus("uffd_header") {
        eprintln!("{}", p.display());
        uffd::header::fuzz_parse(&b);
        accepted += usize::from(uffd::header::Header::parse(&b).is_ok());
    }
    assert!(accepted > 0, "the corpus holds valid headers too");
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
