//! Fuzz target: see `rules::fuzz_logic::decide` for the input format and the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rules::fuzz_logic::decide(data));
