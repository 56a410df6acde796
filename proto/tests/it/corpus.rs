//! Replays the committed fuzz corpus through the fuzz entry points, so every input that
//! once found a bug keeps being checked by `cargo test`.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    let Ok(entries) = std::fs::read_dir(&dir) else {
        panic!("corpus directory {} is missing", dir.display());
    };
    for e in entries {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        f(&data);
        n += 1;
    }
    assert!(n > 0, "corpus {target} is empty");
    n
}

#[test]
fn frame_corpus() {
    replay("frame_decode", proto::frame::fuzz_decode);
}

#[test]
fn hello_corpus() {
    replay("hello", proto::rpc::fuzz_hello);
}

#[test]
fn wire_id_corpus() {
    replay("wire_id", proto::id::fuzz_parse);
}
