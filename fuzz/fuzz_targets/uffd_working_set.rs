#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    uffd::working_set::fuzz_parse(data);
});
