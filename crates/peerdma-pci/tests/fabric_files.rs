//! Fabric files: the shipped examples parse and build, and every validation error names the
//! file, the line and the key, and says what is wrong.

mod common;

use peerdma_pci::{DeviceKind, P2pForwarding, file, regs};

#[test]
fn every_example_parses_and_builds() {
    for (name, text) in peerdma_pci::examples::ALL {
        let f = file::load_str(text, name).unwrap_or_else(|e| panic!("{e}"));
        assert!(f.functions().count() >= 4, "{name}");
        // Every BAR of every function lies inside a host bridge window.
        for func in f.functions() {
            for bar in f.bar_states(func.bdf()).unwrap() {
                if bar.bar.kind.is_mem() {
                    assert!(
                        bar.cpu.is_some(),
                        "{name}: {} BAR{} outside the windows",
                        func.bdf(),
                        bar.bar.index
                    );
                }
            }
        }
        // And the on-disk copy is the same text.
        let disk = std::fs::read_to_string(format!(
            "{}/../../examples/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert_eq!(disk, text);
    }
}

#[test]
fn examples_have_the_promised_shape() {
    let f = common::example("gpu-nic-switch.toml");
    assert_eq!(
        f.host_bridges()[0].p2p(),
        P2pForwarding::Any,
        "8086:2020 is on the allowlist"
    );
    assert!(!f.host_bridges()[0].p2p_explicit());
    let f = common::example("arm-offset.toml");
    let w = f.host_bridges()[0].mmio()[0];
    assert_ne!(w.offset(), 0);
    assert_eq!(f.host_bridges()[0].p2p(), P2pForwarding::None);
    let f = common::example("two-host-bridges.toml");
    assert_eq!(f.host_bridges().len(), 2);
    assert!(
        f.host_bridges()
            .iter()
            .all(|h| h.p2p() == P2pForwarding::Any),
        "AMD family 0x19"
    );
    let f = common::example("two-root-ports-acs.toml");
    let ports: Vec<_> = f
        .functions()
        .filter(|x| x.kind() == DeviceKind::SwitchDownstream)
        .collect();
    assert!(
        ports
            .iter()
            .all(|p| f.acs_ctrl(p.bdf()).unwrap().unwrap() & regs::ACS_RR != 0)
    );
    let f = common::example("sriov-nic.toml");
    let pf0 = f.lookup("nic-pf0").unwrap();
    assert_eq!(f.virtfns(pf0).unwrap().len(), 4);
    assert_eq!(f.lookup("vf1").unwrap().to_string(), "0000:01:02.1");
    let f = common::example("gpu-server.toml");
    assert_eq!(f.root_bus_function(0).unwrap().to_string(), "0000:00:00.0");
}

const BASE: &str = r#"[platform]
cpu = { vendor = "intel", family = 6 }
ram = [ { cpu = 0, size = "1G" } ]

[[host_bridge]]
name = "hb0"
mmio = [ { cpu = 0x8000_0000, bus = 0x8000_0000, size = "1G" },
         { cpu = 0x40_0000_0000, bus = 0x40_0000_0000, size = "64G" } ]

[[device]]
bdf = "0000:00:01.0"
kind = "root_port"
parent = "hb0"
"#;

/// The line of the last occurrence of `needle` (errors point at the entry that breaks a rule,
/// which the tests append last).
fn line_of(text: &str, needle: &str) -> usize {
    let pos = text
        .rfind(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the text"));
    text[..pos].matches('\n').count() + 1
}

/// Loads `extra` appended to BASE and checks the error: its key, the line of `at`, and a part
/// of the message.
fn refused(extra: &str, key: &str, at: &str, says: &str) {
    let text = format!("{BASE}{extra}");
    let Err(e) = file::load_str(&text, "t.toml") else {
        panic!("accepted:\n{extra}")
    };
    assert_eq!(e.file.as_deref(), Some("t.toml"));
    assert_eq!(e.key, key, "{e}");
    assert_eq!(e.line, Some(line_of(&text, at)), "{e}");
    assert!(e.message.contains(says), "{e}\n(wanted {says:?})");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("t.toml:{}: {key}: ", line_of(&text, at))),
        "{shown}"
    );
}

fn refused_text(text: &str, key: &str, at: &str, says: &str) {
    let Err(e) = file::load_str(text, "t.toml") else {
        panic!("accepted:\n{text}")
    };
    assert_eq!(e.key, key, "{e}");
    assert_eq!(e.line, Some(line_of(text, at)), "{e}");
    assert!(e.message.contains(says), "{e}\n(wanted {says:?})");
}

const EP: &str = r#"
[[device]]
bdf = "0000:01:00.0"
kind = "endpoint"
parent = "0000:00:01.0"
"#;

#[test]
fn base_is_valid() {
    file::load_str(BASE, "t.toml").unwrap();
    file::load_str(&format!("{BASE}{EP}"), "t.toml").unwrap();
}

#[test]
fn toml_syntax_error_has_a_line() {
    let text = format!("{BASE}\n[[device]]\nbdf = \"0000:01:00.0\nkind = 1\n");
    let e = file::load_str(&text, "t.toml").unwrap_err();
    assert!(e.line.is_some(), "{e}");
    assert!(e.to_string().starts_with("t.toml:"), "{e}");
}

#[test]
fn unknown_keys_are_refused() {
    refused(
        &format!("{EP}colour = \"red\"\n"),
        "device[1].colour",
        "colour",
        "unknown field `colour`",
    );
    refused_text(
        &BASE.replace("name = \"hb0\"", "name = \"hb0\"\nmmoi = []"),
        "host_bridge[0].mmoi",
        "mmoi",
        "unknown field",
    );
}

#[test]
fn bad_values() {
    refused(
        &EP.replace("0000:01:00.0", "0000:01:20.0"),
        "device[1].bdf",
        "0000:01:20.0",
        "not a PCI address",
    );
    refused(
        &EP.replace("endpoint", "gpu"),
        "device[1].kind",
        "\"gpu\"",
        "unknown kind \"gpu\"",
    );
    refused(
        &format!("{EP}acs = [\"RR\", \"XX\"]\n"),
        "device[1].acs",
        "acs =",
        "unknown ACS bit \"XX\"",
    );
    refused(
        &format!("{EP}bars = [ {{ index = 0, size = \"12Q\" }} ]\n"),
        "device[1].bars[0].size",
        "bars =",
        "is not a size",
    );
    refused(
        &format!("{EP}bars = [ {{ index = 0, size = -4096 }} ]\n"),
        "device[1].bars[0].size",
        "bars =",
        "cannot be negative",
    );
    refused(
        &format!("{EP}bars = [ {{ index = 0, size = 4096, type = \"mem16\" }} ]\n"),
        "device[1].bars[0].type",
        "bars =",
        "unknown BAR type",
    );
    refused_text(
        &BASE.replace("\"intel\"", "\"via\""),
        "platform.cpu.vendor",
        "vendor",
        "unknown CPU vendor",
    );
    refused_text(
        &BASE.replace("name = \"hb0\"", "name = \"hb0\"\np2p = \"sometimes\""),
        "host_bridge[0].p2p",
        "p2p",
        "p2p is true, false",
    );
}

#[test]
fn parents() {
    refused(
        &EP.replace("parent = \"0000:00:01.0\"", "parent = \"0000:00:09.0\""),
        "device[1].parent",
        "0000:00:09.0",
        "unknown parent \"0000:00:09.0\"",
    );
    refused(
        &EP.replace("parent = \"0000:00:01.0\"", "parent = \"hb0\""),
        "device[1].parent",
        "parent = \"hb0\"",
        "use kind = \"rciep\"",
    );
    let two = format!(
        "{EP}\n[[device]]\nbdf = \"0000:02:00.0\"\nkind = \"endpoint\"\nparent = \"0000:01:00.0\"\n"
    );
    refused(
        &two,
        "device[2].parent",
        "parent = \"0000:01:00.0\"",
        "must sit below a root_port, switch_downstream or pci_bridge",
    );
    refused(
        "\n[[device]]\nbdf = \"0000:00:02.0\"\nkind = \"root_port\"\nparent = \"0000:00:01.0\"\n",
        "device[1].parent",
        "parent = \"0000:00:01.0\"",
        "its parent must be a host bridge",
    );
    refused(
        "\n[[device]]\nbdf = \"0000:01:00.0\"\nkind = \"switch_downstream\"\nparent = \"0000:00:01.0\"\n",
        "device[1].parent",
        "parent = \"0000:00:01.0\"",
        "must sit below a switch_upstream",
    );
    let looped = "\n[[device]]\nbdf = \"0000:05:00.0\"\nkind = \"pci_bridge\"\nparent = \"0000:06:00.0\"\n\n[[device]]\nbdf = \"0000:06:00.0\"\nkind = \"pci_bridge\"\nparent = \"0000:05:00.0\"\n";
    refused(
        looped,
        "device[1].parent",
        "parent = \"0000:06:00.0\"",
        "loop",
    );
}

#[test]
fn duplicates() {
    refused(
        &format!("{EP}{EP}"),
        "device[2].bdf",
        "bdf = \"0000:01:00.0\"",
        "already device[1]",
    );
    let named = format!(
        "{EP}name = \"x\"\n\n[[device]]\nbdf = \"0000:00:02.0\"\nkind = \"rciep\"\nparent = \"hb0\"\nname = \"x\"\n"
    );
    refused(
        &named,
        "device[2].name",
        "name = \"x\"",
        "already device[1]",
    );
    let text = format!("{BASE}\n[[host_bridge]]\nname = \"hb0\"\nbus = 1\n");
    refused_text(
        &text,
        "host_bridge[1].name",
        "name = \"hb0\"\nbus = 1",
        "used twice",
    );
    let text = format!("{BASE}\n[[host_bridge]]\nname = \"hb1\"\n");
    refused_text(&text, "host_bridge[1].bus", "[[host_bridge]]", "bus clash");
}

#[test]
fn bus_clashes() {
    let sw = r#"
[[device]]
bdf = "0000:01:00.0"
kind = "switch_upstream"
parent = "0000:00:01.0"

[[device]]
bdf = "0000:02:00.0"
kind = "switch_downstream"
parent = "0000:01:00.0"

[[device]]
bdf = "0000:03:01.0"
kind = "switch_downstream"
parent = "0000:01:00.0"
"#;
    refused(sw, "device[3].bdf", "bdf = \"0000:03:01.0\"", "bus clash");
    refused(
        &EP.replace("0000:01:00.0", "0000:00:05.0"),
        "device[1].bdf",
        "bdf = \"0000:00:05.0\"",
        "not higher",
    );
    refused(
        "\n[[device]]\nbdf = \"0000:07:00.0\"\nkind = \"rciep\"\nparent = \"hb0\"\n",
        "device[1].bdf",
        "bdf = \"0000:07:00.0\"",
        "is not on hb0's root bus",
    );
    // A device on bus 02 while the root port's range is 01-03 (its switch reaches bus 03).
    let nested = r#"
[[device]]
bdf = "0000:01:00.0"
kind = "switch_upstream"
parent = "0000:00:01.0"

[[device]]
bdf = "0000:03:00.0"
kind = "switch_downstream"
parent = "0000:01:00.0"

[[device]]
bdf = "0000:00:02.0"
kind = "root_port"
parent = "hb0"

[[device]]
bdf = "0000:02:00.0"
kind = "endpoint"
parent = "0000:00:02.0"
"#;
    refused(
        nested,
        "device[4].bdf",
        "bdf = \"0000:02:00.0\"",
        "lies in 0000:00:01.0's bus range 01-03",
    );
    refused(
        &EP.replace("0000:01:00.0", "0000:01:03.0"),
        "device[1].bdf",
        "bdf = \"0000:01:03.0\"",
        "only device 00",
    );
    let f1 = "\n[[device]]\nbdf = \"0000:00:07.1\"\nkind = \"rciep\"\nparent = \"hb0\"\n";
    refused(
        f1,
        "device[1].bdf",
        "bdf = \"0000:00:07.1\"",
        "has no function 0",
    );
    let dom =
        "\n[[device]]\nbdf = \"0001:01:00.0\"\nkind = \"endpoint\"\nparent = \"0000:00:01.0\"\n";
    refused(
        dom,
        "device[1].bdf",
        "bdf = \"0001:01:00.0\"",
        "domain 0001",
    );
}

#[test]
fn bars() {
    let bar = |b: &str| format!("{EP}bars = [ {b} ]\n");
    refused(
        &bar("{ index = 0, size = \"3M\" }"),
        "device[1].bars[0].size",
        "bars =",
        "is not a power of two",
    );
    refused(
        &bar("{ index = 6, size = 4096 }"),
        "device[1].bars[0].index",
        "bars =",
        "out of range",
    );
    refused(
        &bar("{ index = 5, size = 4096, type = \"mem64\" }"),
        "device[1].bars[0].index",
        "bars =",
        "needs register 6",
    );
    refused(
        &bar("{ index = 0, size = 4096, type = \"mem64\" }, { index = 1, size = 4096 }"),
        "device[1].bars[1].index",
        "bars =",
        "already used by bars[0]",
    );
    refused(
        &bar("{ index = 0, size = 512, type = \"io\" }"),
        "device[1].bars[0].size",
        "bars =",
        "4 to 256 bytes",
    );
    refused(
        &bar("{ index = 0, size = 64, type = \"io\", prefetch = true }"),
        "device[1].bars[0].prefetch",
        "bars =",
        "cannot be prefetchable",
    );
    refused(
        &bar("{ index = 0, size = \"4G\" }"),
        "device[1].bars[0].size",
        "bars =",
        "16 bytes to 2 GiB",
    );
    refused(
        &bar("{ index = 0, size = 8 }"),
        "device[1].bars[0].size",
        "bars =",
        "16 bytes",
    );
    refused(
        &bar("{ index = 0, size = \"1M\", addr = 0x8008_0000 }"),
        "device[1].bars[0].addr",
        "bars =",
        "not aligned",
    );
    refused(
        &bar("{ index = 0, size = \"1M\", addr = 0x1000_0000 }"),
        "device[1].bars",
        "bars =",
        "outside host bridge hb0's windows",
    );
    refused(
        &bar(
            "{ index = 0, size = \"1M\", addr = 0x8010_0000 }, { index = 1, size = \"1M\", addr = 0x8010_0000 }",
        ),
        "device[1].bars",
        "bars =",
        "overlaps a fixed BAR",
    );
    refused(
        &bar("{ index = 0, size = \"2G\" }"),
        "device[1].bars",
        "bars =",
        "BAR outside the host bridge windows",
    );
    refused(
        &bar("{ index = 0, size = \"128G\", type = \"mem64\", prefetch = true }"),
        "device[1].bars",
        "bars =",
        "no room",
    );
    let bridge_bar = "\n[[device]]\nbdf = \"0000:01:00.0\"\nkind = \"pci_bridge\"\nparent = \"0000:00:01.0\"\nbars = [ { index = 2, size = 4096 } ]\n";
    refused(
        bridge_bar,
        "device[1].bars[0].index",
        "bars =",
        "only BAR0 and BAR1",
    );
}

#[test]
fn fixed_addresses_that_break_windows() {
    // Two root ports whose fixed BARs interleave: their windows would overlap.
    let text = r#"
[[device]]
bdf = "0000:01:00.0"
kind = "endpoint"
parent = "0000:00:01.0"
bars = [ { index = 0, size = "1M", addr = 0x8000_0000 }, { index = 1, size = "1M", addr = 0x8040_0000 } ]

[[device]]
bdf = "0000:00:02.0"
kind = "root_port"
parent = "hb0"

[[device]]
bdf = "0000:02:00.0"
kind = "endpoint"
parent = "0000:00:02.0"
bars = [ { index = 0, size = "1M", addr = 0x8020_0000 } ]
"#;
    refused(
        text,
        "device[2].bdf",
        "bdf = \"0000:00:02.0\"",
        "address clash",
    );
    // A non-prefetchable 64-bit BAR fixed above 4 GiB cannot sit behind a bridge.
    let high = format!(
        "{EP}bars = [ {{ index = 0, size = \"1M\", type = \"mem64\", addr = 0x40_0000_0000 }} ]\n"
    );
    refused(
        &high,
        "device[0].bdf",
        "bdf = \"0000:00:01.0\"",
        "above 4 GiB",
    );
    // Without a window below 4 GiB, a 32-bit BAR has nowhere to go.
    let text = BASE.replace(
        "mmio = [ { cpu = 0x8000_0000, bus = 0x8000_0000, size = \"1G\" },\n         ",
        "mmio = [ ",
    );
    let text = format!("{text}{EP}bars = [ {{ index = 0, size = 4096 }} ]\n");
    refused_text(
        &text,
        "device[1].bars",
        "bars =",
        "needs a memory window below 4 GiB",
    );
}

#[test]
fn sriov_and_vfs() {
    let pf = format!(
        "{EP}name = \"pf\"\nsriov = {{ vfs = 2, bars = [ {{ index = 0, size = \"64K\", type = \"mem64\", prefetch = true }} ] }}\n"
    );
    file::load_str(&format!("{BASE}{pf}"), "t.toml").unwrap();
    let vf = |bdf: &str, parent: &str| {
        format!(
            "{pf}\n[[device]]\nbdf = \"{bdf}\"\nkind = \"vf\"\nparent = \"{parent}\"\nname = \"v\"\n"
        )
    };
    file::load_str(&format!("{BASE}{}", vf("0000:01:00.2", "pf")), "t.toml").unwrap();
    refused(
        &vf("0000:01:00.5", "pf"),
        "device[2].bdf",
        "bdf = \"0000:01:00.5\"",
        "VF without PF: 0000:01:00.5 is not one of 0000:01:00.0's VFs (0000:01:00.1 to 0000:01:00.2)",
    );
    refused(
        &vf("0000:01:00.1", "0000:00:01.0"),
        "device[2].parent",
        "parent = \"0000:00:01.0\"\nname",
        "VF without PF",
    );
    refused(
        &vf("0000:01:00.1", "nobody"),
        "device[2].parent",
        "parent = \"nobody\"",
        "VF without PF",
    );
    let vf_bars = format!(
        "{}bars = [ {{ index = 0, size = 4096 }} ]\n",
        vf("0000:01:00.1", "pf")
    );
    refused(
        &vf_bars,
        "device[2]",
        "[[device]]",
        "sets only name and acs",
    );
    let off_bus = format!("{EP}sriov = {{ vfs = 8, offset = 250, bars = [] }}\n");
    refused(&off_bus, "device[1].sriov", "sriov =", "off the PF's bus");
    let clash = format!(
        "{EP}sriov = {{ vfs = 2, bars = [] }}\n\n[[device]]\nbdf = \"0000:01:00.2\"\nkind = \"endpoint\"\nparent = \"0000:00:01.0\"\n"
    );
    refused(&clash, "device[1].sriov", "sriov =", "already a function");
    let io = format!(
        "{EP}sriov = {{ vfs = 2, bars = [ {{ index = 0, size = 64, type = \"io\" }} ] }}\n"
    );
    refused(
        &io,
        "device[1].sriov.bars[0].type",
        "sriov =",
        "must be memory BARs",
    );
    let zero = format!("{EP}sriov = {{ vfs = 0, bars = [] }}\n");
    refused(&zero, "device[1].sriov.vfs", "sriov =", "at least one VF");
    let on_port = "\n[[device]]\nbdf = \"0000:01:00.0\"\nkind = \"pci_bridge\"\nparent = \"0000:00:01.0\"\nsriov = { vfs = 1, bars = [] }\n";
    refused(
        on_port,
        "device[1].sriov",
        "sriov =",
        "only endpoints and RCiEPs",
    );
}

#[test]
fn platform_and_host_bridges() {
    let t = BASE.replace(
        "ram = [ { cpu = 0, size = \"1G\" } ]",
        "ram = [ { cpu = 0, size = \"1G\" }, { cpu = 0x2000_0000, size = \"1G\" } ]",
    );
    refused_text(
        &t,
        "platform.ram[1]",
        "{ cpu = 0x2000_0000",
        "overlaps platform.ram[0]",
    );
    let t = BASE.replace(
        "ram = [ { cpu = 0, size = \"1G\" } ]",
        "ram = [ { cpu = 0, size = 0 } ]",
    );
    refused_text(&t, "platform.ram[0].size", "ram =", "size 0");
    let t = BASE.replace(
        "size = \"64G\" } ]",
        "size = \"64G\" }, { cpu = 0x9000_0000, bus = 0x1_0000_0000, size = \"1M\" } ]",
    );
    refused_text(
        &t,
        "host_bridge[0].mmio[2]",
        "cpu = 0x9000_0000",
        "overlaps host_bridge[0].mmio[0]",
    );
    let t = BASE.replace(
        "size = \"64G\" } ]",
        "size = \"64G\" }, { cpu = 0x1_0000_0000, bus = 0x8010_0000, size = \"1M\" } ]",
    );
    refused_text(
        &t,
        "host_bridge[0].mmio[2].bus",
        "cpu = 0x1_0000_0000",
        "overlaps another window",
    );
    let t = BASE.replace(
        "size = \"64G\" } ]",
        "size = \"64G\" }, { cpu = 0x1_0000_0000, bus = 0, size = 0 } ]",
    );
    refused_text(
        &t,
        "host_bridge[0].mmio[2].size",
        "cpu = 0x1_0000_0000",
        "size 0",
    );
    let t = BASE.replace(
        "size = \"64G\" } ]",
        "size = \"64G\" }, { cpu = \"0xffff_ffff_ffff_f000\", bus = 0, size = \"1M\" } ]",
    );
    refused_text(
        &t,
        "host_bridge[0].mmio[2].cpu",
        "0xffff_ffff_ffff_f000",
        "past 2^64",
    );
    // A window may cover RAM (the PCI hole): accepted.
    let t = BASE.replace(
        "ram = [ { cpu = 0, size = \"1G\" } ]",
        "ram = [ { cpu = 0, size = \"16G\" } ]",
    );
    file::load_str(&t, "t.toml").unwrap();
}

#[test]
fn errors_from_disk_name_the_path() {
    let dir = std::env::temp_dir().join(format!("peerdma-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bad.toml");
    std::fs::write(
        &p,
        format!("{BASE}{EP}bars = [ {{ index = 0, size = 3 }} ]\n"),
    )
    .unwrap();
    let e = file::load_path(&p).unwrap_err();
    assert_eq!(e.file.as_deref(), Some(p.display().to_string().as_str()));
    assert!(
        e.to_string()
            .contains("bad.toml:19: device[1].bars[0].size"),
        "{e}"
    );
    let e = file::load_path(&dir.join("missing.toml")).unwrap_err();
    assert!(e.message.contains("cannot read"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn measured_write_masks_need_captured_bytes_and_well_formed_hex() {
    refused(
        &format!("{EP}wmask = [[0x40, \"ff\"]]\n"),
        "device[1].wmask",
        "wmask",
        "needs `config`",
    );
    let cfg = "config = [[0x000, \"86800010 00000000 00000002\"]]\n";
    for bad in ["\"fz\"", "\"ff*x\"", "\"ffff*2\"", "\"ff*5000\""] {
        refused(
            &format!("{EP}{cfg}wmask = [[0x40, {bad}]]\n"),
            "device[1].wmask[0]",
            "wmask",
            "pairs of hex digits",
        );
    }
    refused(
        &format!("{EP}{cfg}wmask = [[0xf00, \"ff*512\"]]\n"),
        "device[1].wmask[0]",
        "wmask",
        "run past",
    );
    // The masks decide what a write changes; bytes they do not cover keep the builder's.
    let text = format!("{BASE}{EP}{cfg}wmask = [[0x40, \"ff*4 00\"], [0x0d, \"00\"]]\n");
    let f = file::load_str(&text, "t.toml").unwrap();
    let bdf = "0000:01:00.0".parse().unwrap();
    f.config_write(bdf, 0x40, 4, 0x1234_5678).unwrap();
    f.config_write(bdf, 0x44, 1, 0xff).unwrap();
    f.config_write(bdf, 0x0d, 1, 0xff).unwrap();
    f.config_write(bdf, 0x0c, 1, 0x10).unwrap();
    assert_eq!(f.config_read(bdf, 0x40, 4).unwrap(), 0x1234_5678);
    assert_eq!(f.config_read(bdf, 0x44, 1).unwrap(), 0);
    assert_eq!(
        f.config_read(bdf, 0x0d, 1).unwrap(),
        0,
        "latency timer made read-only"
    );
    assert_eq!(
        f.config_read(bdf, 0x0c, 1).unwrap(),
        0x10,
        "cache line size still writable"
    );
}
