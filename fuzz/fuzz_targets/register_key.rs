#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ctl::pki::fuzz_register_key(data);
});
