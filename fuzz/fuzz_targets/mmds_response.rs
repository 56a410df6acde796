#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    envd::mmds::fuzz_response(data);
});
