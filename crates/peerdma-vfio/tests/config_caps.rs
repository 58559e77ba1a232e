//! The capability rules of vfio-pci's config space (drivers/vfio/pci/vfio_pci_config.c,
//! `vfio_cap_init`, `vfio_ecap_init`, `vfio_config_do_rw`'s choice of handler) on functions
//! built to hold every case: capabilities vfio hides, vendor-specific ones written raw, MSI
//! with per-vector masking, extended capabilities with permission tables and without, and
//! SR-IOV PFs and VFs. Each test reads and writes through the device fd, as a user does, and
//! checks the hardware's registers beside what the user sees.

use peerdma_pci::{Bdf, Fabric, examples};
use peerdma_uapi::backend::ScenarioBackend;
use peerdma_uapi::{DevHandle, OpenPath, UapiBackend};
use peerdma_vfio::emulated::{Emulated, Machine};
use peerdma_vfio::pci::KernelConfig;

/// An endpoint whose captured chain is: Slot ID at 0x40 (hidden) → vendor-specific at 0x48
/// (8 bytes) → MSI at 0x50 (32-bit, per-vector masking: 20 bytes) → Enhanced Allocation at
/// 0x64 (hidden) → PCIe v2 at 0x70; extended: PASID at 0x100 (hidden, first: a placeholder)
/// → AER at 0x110 → DPC at 0x140 (hidden) → vendor-specific at 0x150 (0x10 bytes). Every
/// byte past the header is writable in the hardware, so what the user's write did shows.
const CAPS: &str = r#"
[platform]
cpu = { vendor = "intel", family = 6 }
ram = [ { cpu = 0x0, size = "1G" } ]

[[host_bridge]]
name = "hb0"
mmio = [ { cpu = 0xc000_0000, bus = 0xc000_0000, size = "512M" } ]

[[device]]
bdf = "0000:00:01.0"
kind = "root_port"
parent = "hb0"

[[device]]
bdf = "0000:01:00.0"
kind = "endpoint"
parent = "0000:00:01.0"
name = "dev"
config = [
  [0x000, "86800010 00001000 00000002 00000000"],
  [0x034, "40"],
  [0x040, "04480000 00000000 09500800 11223344 05640001 00000000 00000000 00000000 00000000 14700000 00000000 00000000 10000200 00800010"],
  [0x100, "1b000111 00000000 00000000 00000000 01000214"],
  [0x140, "1d000115 00000000 00000000 00000000 0b000100 00000001 aabbccdd 00000000"],
]
wmask = [ [0x040, "ff*192"], [0x100, "ff*3840"] ]
bars = [ { index = 0, size = "1M" } ]
"#;

fn machine(text: &str) -> Machine {
    let no_pm = KernelConfig {
        pm: false,
        thp: false,
    };
    peerdma_vfio::testbed::machine_from(text, no_pm).unwrap()
}

fn open(be: &mut Emulated<'_>, role: &str) -> (DevHandle, Bdf) {
    let bdf = be.role(role).unwrap();
    (be.open_device(bdf, OpenPath::CdevIommufd).unwrap(), bdf)
}

fn rd(be: &mut Emulated<'_>, d: DevHandle, at: u64, n: usize) -> u32 {
    let mut b = [0u8; 4];
    be.config_read(d, at, &mut b[..n]).unwrap();
    u32::from_le_bytes(b)
}

fn wr(be: &mut Emulated<'_>, d: DevHandle, at: u64, n: usize, v: u32) {
    be.config_write(d, at, &v.to_le_bytes()[..n]).unwrap();
}

fn hw(f: &Fabric, bdf: Bdf, at: u16, n: usize) -> u32 {
    f.config_read(bdf, at, n).unwrap()
}

#[test]
fn hidden_capabilities_are_unlinked_from_the_users_chain_and_their_bytes_are_raw() {
    let m = machine(CAPS);
    let mut be = m.process();
    let (d, bdf) = open(&mut be, "dev");
    let f = m.fabric();
    // The capability pointer skips the hidden Slot ID; MSI's next skips EA.
    assert_eq!(rd(&mut be, d, 0x34, 1), 0x48);
    assert_eq!(
        hw(f, bdf, 0x34, 1),
        0x40,
        "the hardware keeps its own chain"
    );
    assert_eq!(
        rd(&mut be, d, 0x48, 2),
        0x5009,
        "vendor-specific: ID and next"
    );
    assert_eq!(rd(&mut be, d, 0x51, 1), 0x70, "MSI's next pointer skips EA");
    assert_eq!(rd(&mut be, d, 0x50, 4), 0x0100_7005);
    // A hidden capability's bytes belong to no capability: raw both ways.
    wr(&mut be, d, 0x42, 2, 0xbeef);
    assert_eq!(hw(f, bdf, 0x42, 2), 0xbeef);
    assert_eq!(rd(&mut be, d, 0x40, 4), 0xbeef_4804);
    // Extended: the hidden first one is a placeholder holding only its next pointer; AER's
    // next skips the hidden DPC.
    assert_eq!(rd(&mut be, d, 0x100, 4), 0x1100_0000);
    assert_eq!(rd(&mut be, d, 0x102, 2), 0x1100);
    assert_eq!(hw(f, bdf, 0x100, 4), 0x1101_001b);
    assert_eq!(rd(&mut be, d, 0x110, 4) >> 20, 0x150);
    assert_eq!(rd(&mut be, d, 0x150, 4), 0x0001_000b);
}

#[test]
fn writes_follow_each_capabilitys_handler() {
    let m = machine(CAPS);
    let mut be = m.process();
    let (d, bdf) = open(&mut be, "dev");
    let f = m.fabric();
    // Vendor-specific: raw, header included; the user still reads the header from the copy.
    wr(&mut be, d, 0x4c, 4, 0x5566_7788);
    assert_eq!(hw(f, bdf, 0x4c, 4), 0x5566_7788);
    assert_eq!(rd(&mut be, d, 0x4c, 4), 0x5566_7788);
    wr(&mut be, d, 0x49, 1, 0x60);
    assert_eq!(hw(f, bdf, 0x49, 1), 0x60, "written raw");
    assert_eq!(rd(&mut be, d, 0x49, 1), 0x50, "read back from the copy");
    // MSI, 32-bit with masking: address and data virtual, mask and pending to the hardware.
    wr(&mut be, d, 0x54, 4, 0xfee0_1000);
    assert_eq!(rd(&mut be, d, 0x54, 4), 0xfee0_1000);
    assert_eq!(hw(f, bdf, 0x54, 4), 0, "the address is virtual");
    wr(&mut be, d, 0x58, 2, 0x4321);
    assert_eq!(rd(&mut be, d, 0x58, 2), 0x4321);
    assert_eq!(hw(f, bdf, 0x58, 2), 0);
    wr(&mut be, d, 0x5c, 4, 0x1);
    assert_eq!(hw(f, bdf, 0x5c, 4), 1, "the mask bits reach the hardware");
    // Flags: Enable cleared and the queue size cut to 0 in the copy and the hardware.
    wr(&mut be, d, 0x52, 1, 0x71);
    assert_eq!(rd(&mut be, d, 0x52, 2), 0x0100);
    assert_eq!(hw(f, bdf, 0x52, 2), 0x0100);
    // The upper flags byte has no writable bit.
    wr(&mut be, d, 0x53, 1, 0xff);
    assert_eq!(hw(f, bdf, 0x53, 1), 0x01);
    // A chunk ending just before the flags passes the kernel's test too: the flags are
    // written to the hardware again from the copy.
    f.config_write(bdf, 0x52, 1, 0x01).unwrap();
    wr(&mut be, d, 0x51, 1, 0x00);
    assert_eq!(
        hw(f, bdf, 0x52, 1),
        0x00,
        "the fixup rewrote the hardware flags"
    );
    assert_eq!(
        rd(&mut be, d, 0x51, 1),
        0x70,
        "the next pointer is not writable"
    );
    // AER: only the error bits of the mask registers are writable.
    wr(&mut be, d, 0x118, 4, 0xffff_ffff);
    assert_eq!(hw(f, bdf, 0x118, 4), 0x03ff_f031);
    wr(&mut be, d, 0x110, 4, 0);
    assert_eq!(
        hw(f, bdf, 0x110, 4),
        0x1402_0001,
        "the header is not writable"
    );
    // A capability with no handler of its own (the PCIe one's link control) drops writes.
    let before = hw(f, bdf, 0x80, 4);
    wr(&mut be, d, 0x80, 4, 0xffff_ffff);
    assert_eq!(hw(f, bdf, 0x80, 4), before);
}

#[test]
fn a_4_byte_access_where_two_owners_meet_is_cut_at_the_boundary() {
    // edu's MSI ends at 0x4e: a 4-byte write at 0x4c is 2 bytes of virtual MSI data and 2
    // raw bytes, which QEMU keeps.
    let m = machine(examples::QEMU_Q35);
    let mut be = m.process();
    let (d, bdf) = open(&mut be, "initiator");
    wr(&mut be, d, 0x4c, 4, 0xaabb_ccdd);
    assert_eq!(rd(&mut be, d, 0x4c, 4), 0xaabb_ccdd);
    assert_eq!(m.fabric().config_read(bdf, 0x4c, 4).unwrap(), 0xaabb_0000);
}

#[test]
fn an_sriov_pfs_extended_capabilities_drop_writes_and_a_vf_shows_the_pci_cores_ids() {
    let m = machine(peerdma_pci::examples::SRIOV_NIC);
    let mut be = m.process();
    let (pf, pf_bdf) = open(&mut be, "nic-pf0");
    let fab = m.fabric();
    let s = fab.function(pf_bdf).unwrap().caps().sriov.unwrap();
    let ctrl = hw(fab, pf_bdf, s + 8, 2);
    assert_ne!(ctrl & 1, 0, "VF Enable is set");
    wr(&mut be, pf, u64::from(s) + 8, 2, 0);
    assert_eq!(
        hw(fab, pf_bdf, s + 8, 2),
        ctrl,
        "the write never reached SR-IOV Control"
    );
    let vf = be.role("vf0").unwrap();
    assert!(fab.function(vf).is_ok(), "the VFs are still there");
    // A VF's vendor and device ID read as ones; vfio shows the PCI core's, pin 0 and
    // Memory Space set.
    let (v, vf) = open(&mut be, "vf0");
    assert_eq!(hw(fab, vf, 0, 4), 0xffff_ffff);
    assert_eq!(rd(&mut be, v, 0, 4), 0x1889_8086);
    assert_eq!(rd(&mut be, v, 0x3d, 1), 0);
    assert_ne!(rd(&mut be, v, 4, 2) & 2, 0, "Memory Space reads set");
    assert_eq!(
        hw(fab, vf, 4, 2) & 2,
        0,
        "a VF has no memory enable of its own"
    );
    // ACS Control of a VF with ACS: no write handler.
    let (v1, vf1) = open(&mut be, "vf1");
    let acs = fab.function(vf1).unwrap().caps().acs.unwrap();
    let before = hw(fab, vf1, acs + 6, 2);
    wr(&mut be, v1, u64::from(acs) + 6, 2, 0);
    assert_eq!(hw(fab, vf1, acs + 6, 2), before);
}

#[test]
fn max_read_request_size_reaches_the_hardware_at_least_the_payload_size() {
    // `vfio_exp_config_write`: DevCtl's MRRS is virtual, and a change of it is programmed
    // into the device as `pcie_set_readrq(max(size, MPS))`; MPS itself stays virtual.
    let m = machine(CAPS);
    let mut be = m.process();
    let (d, bdf) = open(&mut be, "dev");
    let f = m.fabric();
    let devctl: u16 = 0x78;
    let field = |v: u32| (v >> 12) & 7;
    wr(&mut be, d, devctl.into(), 2, 5 << 12);
    assert_eq!(field(rd(&mut be, d, devctl.into(), 2)), 5);
    assert_eq!(
        field(hw(f, bdf, devctl, 2)),
        5,
        "4096 bytes reach the device"
    );
    // A payload size of 512 in the device is the floor: 128 becomes 512.
    f.config_write(bdf, devctl, 2, (5 << 12) | (2 << 5))
        .unwrap();
    wr(&mut be, d, devctl.into(), 2, 0);
    assert_eq!(
        field(rd(&mut be, d, devctl.into(), 2)),
        0,
        "the user reads what it wrote"
    );
    assert_eq!(field(hw(f, bdf, devctl, 2)), 2);
    assert_eq!((hw(f, bdf, devctl, 2) >> 5) & 7, 2, "MPS untouched");
    // The user's MPS does not reach the device, and an unchanged MRRS writes nothing.
    f.config_write(bdf, devctl, 2, 3 << 12).unwrap();
    wr(&mut be, d, devctl.into(), 2, 1 << 5);
    assert_eq!(
        field(hw(f, bdf, devctl, 2)),
        3,
        "MRRS unchanged: not written"
    );
    assert_eq!((hw(f, bdf, devctl, 2) >> 5) & 7, 0);
    // The reserved encodings (8192 and 16384 bytes) leave the device as it was.
    wr(&mut be, d, devctl.into(), 2, 7 << 12);
    assert_eq!(field(rd(&mut be, d, devctl.into(), 2)), 7);
    assert_eq!(field(hw(f, bdf, devctl, 2)), 3);
    // A one-byte write of DevCtl's high byte changes MRRS too.
    wr(&mut be, d, u64::from(devctl) + 1, 1, 0x10);
    assert_eq!(field(hw(f, bdf, devctl, 2)), 1);
}

#[test]
fn a_pf_with_sriov_enabled_stays_in_d0_whatever_pmcsr_is_written() {
    // `vfio_pci_set_power_state`: a PF whose VFs vfio-pci enabled (`sriov_active`) refuses
    // every state above D0 with EBUSY, which the PMCSR write handler ignores: the write
    // succeeds and the function stays in D0. (The model's VFs have no PM capability.)
    let m = machine(peerdma_pci::examples::SRIOV_NIC);
    let mut be = m.process();
    let (pf, pf_bdf) = open(&mut be, "nic-pf0");
    let fab = m.fabric();
    let pm = fab.function(pf_bdf).unwrap().caps().pm.unwrap();
    for state in [3u32, 2, 1] {
        wr(&mut be, pf, u64::from(pm) + 4, 2, state);
        assert_eq!(
            fab.power_state(pf_bdf).unwrap(),
            peerdma_pci::PowerState::D0,
            "D{state} refused"
        );
        assert_eq!(rd(&mut be, pf, u64::from(pm) + 4, 2) & 3, 0);
    }
}
