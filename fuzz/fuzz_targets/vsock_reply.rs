#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm_glue::vsock::fuzz_reply(data);
});
