//! Any bytes as a fabric file: a fabric or a located error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: peerdma_fuzz::cmp_trace::on(), |data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = peerdma_pci::file::load_str(text, "fuzz.toml") {
            assert_eq!(e.file.as_deref(), Some("fuzz.toml"));
        }
    }
});
