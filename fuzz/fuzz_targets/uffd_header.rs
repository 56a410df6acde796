#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    uffd::header::fuzz_parse(data);
});
