//! Replays the committed fuzz corpus (`fuzz/corpus/{api_response,vsock_reply,dns_message}`)
//! through the fuzz target bodies, so every input the fuzzer kept runs under `cargo test` too.

use std::path::PathBuf;

fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display())) {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        out.push((p, data));
    }
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

#[test]
fn api_response_corpus() {
    for (p, data) in corpus("api_response") {
        println!("{}", p.display());
        vmm_glue::api::fuzz_response(&data);
    }
}

#[test]
fn vsock_reply_corpus() {
    for (p, data) in corpus("vsock_reply") {
        println!("{}", p.display());
        vmm_glue::vsock::fuzz_reply(&data);
    }
}

#[test]
fn dns_message_corpus() {
    for (p, data) in corpus("dns_message") {
        println!("{}", p.display());
        vmm_glue::net::dns::fuzz_dns_message(&data);
    }
}
