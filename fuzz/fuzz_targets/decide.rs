//! Fuzz target: the gateway's own decision, `tidegate::pipeline::fuzz::decide` (the input
//! format is `rules::fuzz_logic::DecideInput`; the properties are listed there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rules::fuzz_logic::decide(data);
    tidegate::pipeline::fuzz::decide(data);
});
