#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ctl::http::proxy_head::fuzz_heads(data);
});
