#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ctl::http::json::fuzz_json(data);
});
