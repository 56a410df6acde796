#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proto::id::fuzz_parse(data);
});
