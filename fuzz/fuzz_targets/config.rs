//! Fuzz target: see `rules::fuzz_logic::config` for the input format and the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rules::fuzz_logic::config(data));
