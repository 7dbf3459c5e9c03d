//! Fuzz target: the downstream HTTP/1 fast path's head parser against hyper's HTTP/1 server,
//! `tidegate::serve::h1::fuzz::differential` (the properties are listed there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tidegate::serve::h1::fuzz::differential(data);
});
