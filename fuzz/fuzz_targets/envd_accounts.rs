#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    envd::passwd::fuzz_accounts(data);
});
