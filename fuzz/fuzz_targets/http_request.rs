#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ctl::http::request::fuzz_request(data);
});
