//! Helpers shared by the integration tests.

#![allow(dead_code)]

use peerdma_pci::{Bdf, Fabric, examples, file};

/// Builds one of the shipped example fabrics.
pub fn example(name: &str) -> Fabric {
    let (_, text) = examples::ALL
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no example {name}"));
    file::load_str(text, name).unwrap_or_else(|e| panic!("{e}"))
}

/// Builds an example after a textual edit (a test-local variant of a shipped fabric).
pub fn example_edited(name: &str, from: &str, to: &str) -> Fabric {
    let (_, text) = examples::ALL.iter().find(|(n, _)| *n == name).unwrap();
    assert!(text.contains(from), "{name} does not contain {from:?}");
    file::load_str(&text.replacen(from, to, 1), name).unwrap_or_else(|e| panic!("{e}"))
}

/// Looks a function up by name or address.
pub fn dev(f: &Fabric, name: &str) -> Bdf {
    f.lookup(name).unwrap_or_else(|e| panic!("{e}"))
}

/// A recognisable byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
