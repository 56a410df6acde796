#![no_main]

// A response as any wrenn HTTP client reads it: the shared codec's head parser and bounded
// body reader (Firecracker's API, MMDS, `wrenn up`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proto::http::fuzz_response(data);
});
