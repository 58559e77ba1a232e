//! A small platform for the rule tests, with knobs.

#![allow(dead_code)]

use std::sync::Arc;

use peerdma_pci::{Bdf, Fabric, file};

/// hb0 (root function 00.0 = `ROOT_IDS`):
///   00:01.0 root port → 01:00.0 switch up → 02:00.0 down → 03:00.0 "a" (+ 03:00.1 "a1",
///                                                        VFs 03:00.2 "av0", 03:00.3)
///                                        → 02:01.0 down → 04:00.0 "b"
///   00:02.0 root port → 05:00.0 "c"
///   00:04.0 "rc1", 00:05.0 "rc2" (RCiEPs)
/// No ACS bits are on at first; every port and endpoint has an ACS capability.
pub const BASE: &str = r#"
[platform]
cpu = { vendor = "intel", family = 6 }
ram = [ { cpu = 0, size = "1G" } ]

[[host_bridge]]
name = "hb0"
mmio = [ { cpu = 0x8000_0000, bus = 0x8000_0000, size = "1G" },
         { cpu = 0x40_0000_0000, bus = 0x40_0000_0000, size = "64G" } ]

[[device]]
bdf = "0000:00:00.0"
kind = "host_bridge_function"
parent = "hb0"
vendor = 0x8086
device = ROOT_DEVICE

[[device]]
bdf = "0000:00:01.0"
kind = "root_port"
parent = "hb0"
acs = []

[[device]]
bdf = "0000:00:02.0"
kind = "root_port"
parent = "hb0"
acs = []

[[device]]
bdf = "0000:00:04.0"
kind = "rciep"
parent = "hb0"
name = "rc1"
bars = [ { index = 0, size = "64K" } ]

[[device]]
bdf = "0000:00:05.0"
kind = "rciep"
parent = "hb0"
name = "rc2"
bars = [ { index = 0, size = "64K" } ]

[[device]]
bdf = "0000:01:00.0"
kind = "switch_upstream"
parent = "0000:00:01.0"
acs = []

[[device]]
bdf = "0000:02:00.0"
kind = "switch_downstream"
parent = "0000:01:00.0"
acs = []

[[device]]
bdf = "0000:02:01.0"
kind = "switch_downstream"
parent = "0000:01:00.0"
acs = []

[[device]]
bdf = "0000:03:00.0"
kind = "endpoint"
parent = "0000:02:00.0"
name = "a"
acs = []
bars = [ { index = 0, size = "1M" }, { index = 2, size = "1G", type = "mem64", prefetch = true }, { index = 4, size = 64, type = "io" } ]
sriov = { vfs = 2, offset = 2, stride = 1, bars = [ { index = 0, size = "64K", type = "mem64", prefetch = true } ] }

[[device]]
bdf = "0000:03:00.1"
kind = "endpoint"
parent = "0000:02:00.0"
name = "a1"
acs = []
bars = [ { index = 0, size = "1M" } ]

[[device]]
bdf = "0000:03:00.2"
kind = "vf"
parent = "a"
name = "av0"

[[device]]
bdf = "0000:04:00.0"
kind = "endpoint"
parent = "0000:02:01.0"
name = "b"
acs = []
bars = [ { index = 0, size = "1M" }, { index = 2, size = "1G", type = "mem64", prefetch = true } ]

[[device]]
bdf = "0000:05:00.0"
kind = "endpoint"
parent = "0000:00:02.0"
name = "c"
acs = []
bars = [ { index = 0, size = "1M" }, { index = 2, size = "1G", type = "mem64", prefetch = true } ]
"#;

/// The base platform with the root function's device ID, and optional text replacements.
pub fn platform(root_device: u16, edits: &[(&str, &str)]) -> Arc<Fabric> {
    let mut t = BASE.replace("ROOT_DEVICE", &format!("{root_device:#06x}"));
    for (a, b) in edits {
        assert!(t.contains(a), "base lacks {a:?}");
        t = t.replacen(a, b, 1);
    }
    Arc::new(file::load_str(&t, "base.toml").unwrap_or_else(|e| panic!("{e}")))
}

/// Skylake-E root function (allowlisted, any bridge).
pub const SKYLAKE: u16 = 0x2020;
/// Xeon E5 root function (allowlisted, same host bridge only).
pub const XEON_E5: u16 = 0x3c00;
/// A root function on no list.
pub const UNKNOWN: u16 = 0x1234;

/// Looks up by name.
pub fn d(f: &Fabric, name: &str) -> Bdf {
    f.lookup(name).unwrap()
}

/// Parses an address.
pub fn b(s: &str) -> Bdf {
    s.parse().unwrap()
}
