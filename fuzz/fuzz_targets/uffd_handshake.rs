#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    uffd::handshake::fuzz_parse(data);
});
