//! The emulated harness machine (examples/qemu-q35.toml) against the guest it stands for:
//! every endpoint's config space, as the emulated fabric shows it after boot, equals the
//! bytes the guest's sysfs gave in the capture (tests/fixtures/qemu-guest), byte for byte —
//! IDs, class, capability chain, BARs as the firmware programmed them, COMMAND.

use std::path::{Path, PathBuf};

use peerdma_pci::{Bdf, DeviceKind};

fn top() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The captured `config` file of `bdf`, wherever sysfs put its directory.
fn captured(bdf: Bdf) -> Option<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qemu-guest/sys/devices");
    let name = bdf.to_string();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() && !e.file_type().ok()?.is_symlink() {
                if p.file_name().is_some_and(|n| n == name.as_str()) {
                    return std::fs::read(p.join("config")).ok();
                }
                stack.push(p);
            }
        }
    }
    None
}

#[test]
fn every_endpoint_shows_the_captured_config_bytes() {
    let fabric = peerdma_pci::file::load_path(&top().join("examples/qemu-q35.toml")).unwrap();
    let mut checked = 0;
    for f in fabric
        .functions()
        .filter(|f| f.kind() == DeviceKind::Endpoint)
    {
        let bdf = f.bdf();
        let want = captured(bdf).unwrap_or_else(|| panic!("{bdf}: not in the capture"));
        let mut diffs = Vec::new();
        for (off, &b) in want.iter().enumerate() {
            let got = fabric.config_read(bdf, off as u16, 1).unwrap() as u8;
            if got != b {
                diffs.push(format!("{off:#05x}: {got:02x}, captured {b:02x}"));
            }
        }
        assert!(diffs.is_empty(), "{bdf}: {}", diffs.join("; "));
        checked += 1;
    }
    assert_eq!(checked, 4, "provider, initiator, pm_provider, sibling");
}

#[test]
fn a_changed_byte_is_caught() {
    // The check above can fail: the same fabric with one captured byte changed differs.
    let text = std::fs::read_to_string(top().join("examples/qemu-q35.toml")).unwrap();
    let bent = text.replacen(
        "[0x060, \"01000300 08000000",
        "[0x060, \"01000300 00000000",
        1,
    );
    assert_ne!(text, bent);
    let fabric = peerdma_pci::file::load_str(&bent, "bent.toml").unwrap();
    let nvme: Bdf = "0000:05:00.0".parse().unwrap();
    let want = captured(nvme).unwrap();
    let got = fabric.config_read(nvme, 0x64, 1).unwrap() as u8;
    assert_ne!(got, want[0x64], "PMCSR's No_Soft_Reset byte");
}
