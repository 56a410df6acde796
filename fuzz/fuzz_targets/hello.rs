#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proto::rpc::fuzz_hello(data);
});
