#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tls::fuzz_first_bytes(data);
});
