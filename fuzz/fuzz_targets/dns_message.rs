#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm_glue::net::dns::fuzz_dns_message(data);
});
