#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proto::recipe::fuzz_parse(data);
});
