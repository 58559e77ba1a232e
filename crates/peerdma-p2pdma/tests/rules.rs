//! The rulebook's decision table for `calc_map_type_and_dist`, its worked distances, and the
//! kernel's messages, one test per row.

mod common;

use common::{SKYLAKE, UNKNOWN, XEON_E5, b, d, platform};
use peerdma_p2pdma::{MapType, P2pDma};
use peerdma_pci::regs::{ACS_CR, ACS_EC, ACS_RR, ACS_SV, ACS_UF};

fn calc(p2p: &P2pDma, provider: &str, client: &str) -> (MapType, u32) {
    let f = p2p.fabric();
    p2p.calc_map_type_and_dist(d(f, provider), d(f, client), false)
}

#[test]
fn same_function_is_distance_0_bus_addr() {
    let p2p = P2pDma::new(platform(UNKNOWN, &[]));
    assert_eq!(calc(&p2p, "a", "a"), (MapType::BusAddr, 0));
}

#[test]
fn functions_under_one_bridge_are_distance_2() {
    let p2p = P2pDma::new(platform(UNKNOWN, &[]));
    assert_eq!(calc(&p2p, "a", "a1"), (MapType::BusAddr, 2));
    // A VF stands for its PF when walking up: a VF and its PF, two VFs, a VF and a sibling.
    assert_eq!(calc(&p2p, "a", "av0"), (MapType::BusAddr, 2));
    assert_eq!(
        p2p.calc_map_type_and_dist(d(p2p.fabric(), "av0"), b("0000:03:00.3"), false),
        (MapType::BusAddr, 2)
    );
    assert_eq!(calc(&p2p, "a1", "av0"), (MapType::BusAddr, 2));
}

#[test]
fn endpoints_under_one_switch_are_distance_4() {
    let p2p = P2pDma::new(platform(UNKNOWN, &[]));
    assert_eq!(calc(&p2p, "a", "b"), (MapType::BusAddr, 4));
    assert_eq!(calc(&p2p, "b", "av0"), (MapType::BusAddr, 4));
}

#[test]
fn bus_addr_skips_the_host_bridge_check_entirely() {
    // An unknown root complex and a non-AMD CPU do not matter for a switch-local path.
    let p2p = P2pDma::new(platform(
        UNKNOWN,
        &[("vendor = \"intel\"", "vendor = \"arm\"")],
    ));
    assert_eq!(calc(&p2p, "a", "b"), (MapType::BusAddr, 4));
    assert!(p2p.messages().is_empty());
}

#[test]
fn no_common_ancestor_distance_is_the_sum_of_chain_lengths() {
    let p2p = P2pDma::new(platform(SKYLAKE, &[]));
    // a: [a, 02:00.0, 01:00.0, 00:01.0] (4); c: [c, 00:02.0] (2).
    assert_eq!(calc(&p2p, "a", "c"), (MapType::ThruHostBridge, 6));
    // Two RCiEPs: 1 + 1.
    assert_eq!(calc(&p2p, "rc1", "rc2"), (MapType::ThruHostBridge, 2));
    // Endpoints on two root ports: 2 + 2.
    let p2p = P2pDma::new(platform(SKYLAKE, &[]));
    assert_eq!(calc(&p2p, "c", "rc1"), (MapType::ThruHostBridge, 3));
}

#[test]
fn no_common_ancestor_on_an_unknown_host_bridge_is_not_supported() {
    let p2p = P2pDma::new(platform(UNKNOWN, &[]));
    assert_eq!(calc(&p2p, "a", "c"), (MapType::NotSupported, 6));
}

#[test]
fn no_common_ancestor_ignores_client_acs_and_prints_no_acs_message() {
    let p2p = P2pDma::new(platform(SKYLAKE, &[]));
    let f = p2p.fabric();
    f.set_acs_ctrl(d(f, "c"), ACS_RR).unwrap();
    f.set_acs_ctrl(b("0000:00:01.0"), ACS_RR).unwrap();
    let (t, dist) = p2p.calc_map_type_and_dist(d(f, "a"), d(f, "c"), true);
    assert_eq!((t, dist), (MapType::ThruHostBridge, 6));
    assert!(p2p.messages().is_empty(), "{:?}", p2p.messages());
}

#[test]
fn acs_redirect_on_the_path_goes_through_an_allowlisted_host_bridge() {
    let p2p = P2pDma::new(platform(SKYLAKE, &[]));
    let f = p2p.fabric();
    f.set_acs_ctrl(b("0000:02:01.0"), ACS_SV | ACS_RR | ACS_CR | ACS_UF)
        .unwrap();
    assert_eq!(calc(&p2p, "a", "b"), (MapType::ThruHostBridge, 4));
}

#[test]
fn acs_redirect_on_an_unknown_host_bridge_is_not_supported_with_the_kernels_messages() {
    let p2p = P2pDma::new(platform(UNKNOWN, &[]));
    let f = p2p.fabric();
    f.set_acs_ctrl(b("0000:02:00.0"), ACS_RR).unwrap();
    f.set_acs_ctrl(b("0000:02:01.0"), ACS_EC).unwrap();
    let (t, dist) = p2p.calc_map_type_and_dist(d(f, "a"), d(f, "b"), true);
    assert_eq!((t, dist), (MapType::NotSupported, 4));
    let lines: Vec<String> = p2p.messages().iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        vec![
            "pci 0000:04:00.0: ACS redirect is set between the client and provider (0000:03:00.0)",
            "pci 0000:04:00.0: to disable ACS redirect for this path, add the kernel parameter: pci=disable_acs_redir=0000:02:00.0;0000:02:01.0",
            "pci 0000:00:00.0: Host bridge not in P2PDMA whitelist: 8086:1234",
            "pci 0000:04:00.0: cannot be used for peer-to-peer DMA as the client and provider (0000:03:00.0) do not share an upstream bridge or whitelisted host bridge",
        ]
    );
}

#[test]
fn acs_is_tested_on_every_node_including_endpoints_and_the_common_ancestor() {
    for (node, pair) in [
        ("a", ("a", "a")),             // the function itself: same function → host bridge
        ("a", ("a", "b")),             // the provider endpoint
        ("b", ("a", "b")),             // the client endpoint
        ("0000:01:00.0", ("a", "b")),  // the common ancestor (switch upstream port)
        ("0000:02:00.0", ("a", "a1")), // common ancestor of two functions
    ] {
        for bit in [ACS_RR, ACS_CR, ACS_EC] {
            let p2p = P2pDma::new(platform(SKYLAKE, &[]));
            let f = p2p.fabric();
            let n = f.lookup(node).unwrap();
            f.set_acs_ctrl(n, bit).unwrap();
            let (t, _) = calc(&p2p, pair.0, pair.1);
            assert_eq!(
                t,
                MapType::ThruHostBridge,
                "{bit:#x} at {node} for {pair:?}"
            );
        }
    }
    // SV, UF, TB, DT do not redirect.
    let p2p = P2pDma::new(platform(SKYLAKE, &[]));
    let f = p2p.fabric();
    f.set_acs_ctrl(b("0000:02:00.0"), ACS_SV | ACS_UF | 0x02 | 0x40)
        .unwrap();
    assert_eq!(calc(&p2p, "a", "b").0, MapType::BusAddr);
    // ACS above the common ancestor is not on the path.
    f.set_acs_ctrl(b("0000:00:01.0"), ACS_RR).unwrap();
    assert_eq!(calc(&p2p, "a", "b").0, MapType::BusAddr);
}

#[test]
fn amd_zen_forwards_and_older_amd_does_not() {
    let zen = P2pDma::new(platform(
        UNKNOWN,
        &[(
            "vendor = \"intel\", family = 6",
            "vendor = \"amd\", family = 0x17",
        )],
    ));
    assert_eq!(calc(&zen, "a", "c"), (MapType::ThruHostBridge, 6));
    let old = P2pDma::new(platform(
        UNKNOWN,
        &[(
            "vendor = \"intel\", family = 6",
            "vendor = \"amd\", family = 0x16",
        )],
    ));
    assert_eq!(calc(&old, "a", "c"), (MapType::NotSupported, 6));
    // The CPU rule is x86-only in Linux: an Arm CPU with family 0x17 gets nothing from it.
    let arm = P2pDma::new(platform(
        UNKNOWN,
        &[(
            "vendor = \"intel\", family = 6",
            "vendor = \"arm\", family = 0x17",
        )],
    ));
    assert_eq!(calc(&arm, "a", "c").0, MapType::NotSupported);
}

#[test]
fn same_host_bridge_entries_pass_only_within_their_bridge() {
    let p2p = P2pDma::new(platform(XEON_E5, &[]));
    assert_eq!(calc(&p2p, "a", "c").0, MapType::ThruHostBridge);
}

const SECOND_HB: &str = r#"
[[host_bridge]]
name = "hb1"
domain = 1
mmio = [ { cpu = 0x1_0000_0000_0000, bus = 0xc000_0000, size = "256M" } ]

[[device]]
bdf = "0001:00:00.0"
kind = "host_bridge_function"
parent = "hb1"
vendor = HB1_VENDOR
device = HB1_DEVICE

[[device]]
bdf = "0001:00:01.0"
kind = "root_port"
parent = "hb1"

[[device]]
bdf = "0001:01:00.0"
kind = "endpoint"
parent = "0001:00:01.0"
name = "far"
bars = [ { index = 0, size = "1M" } ]
"#;

fn two_bridges(root0: u16, hb1: (u16, u16)) -> P2pDma {
    let extra = SECOND_HB
        .replace("HB1_VENDOR", &format!("{:#06x}", hb1.0))
        .replace("HB1_DEVICE", &format!("{:#06x}", hb1.1));
    let base = common::BASE.replace("ROOT_DEVICE", &format!("{root0:#06x}"));
    let f = peerdma_pci::file::load_str(&format!("{base}{extra}"), "two.toml").unwrap();
    std::sync::Arc::try_unwrap(P2pDma::new(std::sync::Arc::new(f))).unwrap()
}

#[test]
fn two_host_bridges_both_must_be_allowlisted_without_the_same_bridge_flag() {
    assert_eq!(
        calc(&two_bridges(SKYLAKE, (0x8086, SKYLAKE)), "a", "far"),
        (MapType::ThruHostBridge, 6)
    );
    assert_eq!(
        calc(&two_bridges(XEON_E5, (0x8086, XEON_E5)), "a", "far").0,
        MapType::NotSupported
    );
    assert_eq!(
        calc(&two_bridges(SKYLAKE, (0x8086, UNKNOWN)), "a", "far").0,
        MapType::NotSupported
    );
    assert_eq!(
        calc(&two_bridges(UNKNOWN, (0x8086, SKYLAKE)), "a", "far").0,
        MapType::NotSupported
    );
    // Google's entry matches every device ID.
    assert_eq!(
        calc(&two_bridges(SKYLAKE, (0x1ae0, 0xbeef)), "a", "far").0,
        MapType::ThruHostBridge
    );
}

#[test]
fn cross_bridge_allowlist_warnings_follow_the_kernels_short_circuit() {
    let p2p = two_bridges(UNKNOWN, (0x8086, UNKNOWN));
    let f = p2p.fabric();
    p2p.calc_map_type_and_dist(d(f, "a"), d(f, "far"), true);
    let lines: Vec<String> = p2p.messages().iter().map(ToString::to_string).collect();
    // The first bridge fails, so the second is not looked at (and not warned about).
    assert_eq!(
        lines[0],
        "pci 0000:00:00.0: Host bridge not in P2PDMA whitelist: 8086:1234"
    );
    assert_eq!(lines.len(), 2);
    assert!(lines[1].contains("do not share an upstream bridge or whitelisted host bridge"));
}

#[test]
fn the_root_bus_function_is_00_0_or_a_root_port() {
    // Without a 00.0 function the first root-bus device is the root port 00:01.0: its IDs
    // are looked up.
    let without_00 = |rp_device: &str| {
        platform(
            SKYLAKE,
            &[
                (
                    "[[device]]\nbdf = \"0000:00:00.0\"\nkind = \"host_bridge_function\"\nparent = \"hb0\"\nvendor = 0x8086\ndevice = 0x2020\n",
                    "",
                ),
                (
                    "bdf = \"0000:00:01.0\"\nkind = \"root_port\"\nparent = \"hb0\"\n",
                    &format!(
                        "bdf = \"0000:00:01.0\"\nkind = \"root_port\"\nparent = \"hb0\"\nvendor = 0x8086\ndevice = {rp_device}\n"
                    ),
                ),
            ],
        )
    };
    let f = without_00("0x2031");
    assert_eq!(f.root_bus_function(0), Some(b("0000:00:01.0")));
    assert_eq!(calc(&P2pDma::new(f), "a", "c").0, MapType::ThruHostBridge);
    let f = without_00("0x5678");
    assert_eq!(calc(&P2pDma::new(f), "a", "c").0, MapType::NotSupported);
    // Move both root ports past the RCiEPs and drop 00.0: the first root-bus device is the
    // RCiEP at 00:04.0, which is neither devfn 00.0 nor a root port, so no root function is
    // looked at and crossing the root complex is not supported.
    let text = common::BASE
        .replace("ROOT_DEVICE", "0x2020")
        .replace(
            "bdf = \"0000:00:00.0\"\nkind = \"host_bridge_function\"",
            "bdf = \"0000:00:06.0\"\nkind = \"rciep\"",
        )
        .replace(
            "bdf = \"0000:00:01.0\"\nkind = \"root_port\"",
            "bdf = \"0000:00:07.0\"\nkind = \"root_port\"",
        )
        .replace(
            "bdf = \"0000:00:02.0\"\nkind = \"root_port\"",
            "bdf = \"0000:00:08.0\"\nkind = \"root_port\"",
        )
        .replace("parent = \"0000:00:01.0\"", "parent = \"0000:00:07.0\"")
        .replace("parent = \"0000:00:02.0\"", "parent = \"0000:00:08.0\"");
    let f = std::sync::Arc::new(peerdma_pci::file::load_str(&text, "t").unwrap());
    assert_eq!(f.root_bus_function(0), None);
    assert_eq!(calc(&P2pDma::new(f), "a", "c").0, MapType::NotSupported);
}

#[test]
fn a_function_with_its_own_acs_redirect_is_sent_through_the_host_bridge_even_to_itself() {
    let p2p = P2pDma::new(platform(UNKNOWN, &[]));
    let f = p2p.fabric();
    f.set_acs_ctrl(d(f, "a"), ACS_RR).unwrap();
    assert_eq!(calc(&p2p, "a", "a"), (MapType::NotSupported, 0));
}
