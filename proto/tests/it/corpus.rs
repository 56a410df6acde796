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

#[test]
fn http_request_corpus() {
    replay("http_request", proto::http::fuzz_request);
}

#[test]
fn http_response_corpus() {
    replay("http_response", proto::http::fuzz_response);
}

/// xorshift64*: a small seeded generator (the seed is printed on failure).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Seeded mutations of well-formed messages through both HTTP fuzz entry points (a short
/// stand-in for `cargo fuzz`, which is not part of `cargo test`).
#[test]
fn http_codec_survives_mutations() {
    let seeds: [&[u8]; 6] = [
        b"POST /v1/sandboxes/x/exec?x=%41 HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"a\": [1,2]}GET / HTTP/1.1\r\n\r\n",
        b"PUT /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nT: v\r\n\r\nNEXT",
        b"GET /health HTTP/1.0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 400 \r\nContent-Length: 24\r\n\r\n{\"fault_message\":\"bad\"}",
        b"HTTP/1.0 200 OK\r\n\r\nrest of the connection",
    ];
    for seed in 1..=20_000u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut data = seeds[rng.below(seeds.len())].to_vec();
        for _ in 0..1 + rng.below(8) {
            if data.is_empty() {
                break;
            }
            let i = rng.below(data.len());
            match rng.below(4) {
                0 => data[i] = rng.next() as u8,
                1 => {
                    data.remove(i);
                }
                2 => {
                    let alphabet = b"\r\n-:;=%0123456789abcdefT ";
                    data.insert(i, alphabet[rng.below(alphabet.len())]);
                }
                _ => data.truncate(i),
            }
        }
        let r = std::panic::catch_unwind(|| {
            proto::http::fuzz_request(&data);
            proto::http::fuzz_response(&data);
        });
        assert!(
            r.is_ok(),
            "http codec panicked: seed {seed}, input {:?}",
            String::from_utf8_lossy(&data)
        );
    }
}

#[test]
fn recipe_corpus() {
    replay("recipe", proto::recipe::fuzz_parse);
}
