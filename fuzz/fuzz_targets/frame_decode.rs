#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proto::frame::fuzz_decode(data);
});
