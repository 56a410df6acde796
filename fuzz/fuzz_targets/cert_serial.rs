#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tls::peer::fuzz_cert_serial(data);
});
