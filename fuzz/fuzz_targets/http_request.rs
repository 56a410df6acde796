#![no_main]

// A request as any wrenn HTTP server sees it: the shared codec (head, framing, body
// decoding), then the gateway's own form parsers (query, percent-decoding, multipart).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proto::http::fuzz_request(data);
    ctl::http::request::fuzz_request(data);
});
