#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ctl::http::port_route::fuzz_route(data);
});
