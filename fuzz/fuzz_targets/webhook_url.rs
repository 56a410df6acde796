#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ctl::webhook::target::fuzz_parse_url(data);
});
