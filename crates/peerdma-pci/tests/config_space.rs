//! Config space as software sees it: BAR sizing, capability chains, read-only bits, and
//! what writes do (FLR, power states, secondary bus reset, SR-IOV).

mod common;

use std::sync::{Arc, Mutex};

use common::{dev, example, example_edited};
use peerdma_pci::fabric::{FabricEvent, FabricObserver};
use peerdma_pci::route::FaultReason;
use peerdma_pci::{AsErrno, Bdf, DmaAddr, Errno, PciError, PowerState, ResetCause, regs};

fn b(s: &str) -> Bdf {
    s.parse().unwrap()
}

#[test]
fn bar_sizing_reads_back_the_size_mask() {
    let f = example("gpu-nic-switch.toml");
    let gpu = dev(&f, "gpu0");
    // BAR0: 16 MiB, 32-bit, non-prefetchable.
    let saved = f.config_read(gpu, 0x10, 4).unwrap();
    f.config_write(gpu, 0x10, 4, 0xffff_ffff).unwrap();
    let mask = f.config_read(gpu, 0x10, 4).unwrap();
    assert_eq!(mask, 0xff00_0000);
    assert_eq!(!(mask & !0xf) + 1, 16 << 20);
    f.config_write(gpu, 0x10, 4, saved).unwrap();
    assert_eq!(f.config_read(gpu, 0x10, 4).unwrap(), saved);
    // BAR2: 64 GiB, 64-bit prefetchable — two registers.
    let (lo, hi) = (
        f.config_read(gpu, 0x18, 4).unwrap(),
        f.config_read(gpu, 0x1c, 4).unwrap(),
    );
    assert_eq!(lo & 0xf, 0xc, "type bits: 64-bit, prefetchable");
    f.config_write(gpu, 0x18, 4, 0xffff_ffff).unwrap();
    f.config_write(gpu, 0x1c, 4, 0xffff_ffff).unwrap();
    let m = (u64::from(f.config_read(gpu, 0x1c, 4).unwrap()) << 32)
        | u64::from(f.config_read(gpu, 0x18, 4).unwrap());
    assert_eq!(!(m & !0xf) + 1, 64 << 30);
    f.config_write(gpu, 0x18, 4, lo).unwrap();
    f.config_write(gpu, 0x1c, 4, hi).unwrap();
    // An unimplemented BAR (BAR1) stays zero.
    f.config_write(gpu, 0x14, 4, 0xffff_ffff).unwrap();
    assert_eq!(f.config_read(gpu, 0x14, 4).unwrap(), 0);
}

#[test]
fn io_bar_sizing() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/gpu-nic-switch.toml"
    ))
    .unwrap();
    let text = text.replace(
        "bars = [ { index = 0, size = \"32M\", type = \"mem64\", prefetch = true } ]",
        "bars = [ { index = 0, size = \"32M\", type = \"mem64\", prefetch = true }, { index = 4, size = 256, type = \"io\" } ]",
    );
    let f = peerdma_pci::file::load_str(&text, "io.toml").unwrap();
    let nic = dev(&f, "nic0");
    let io = f.bar(nic, 4).unwrap();
    assert!(io.bus.get() >= 0x1000 && io.bus.get() < 0x10000);
    assert_eq!(f.config_read(nic, 0x20, 4).unwrap() & 0x3, 0x1);
    f.config_write(nic, 0x20, 4, 0xffff_ffff).unwrap();
    assert_eq!(f.config_read(nic, 0x20, 4).unwrap(), 0xffff_ff01);
    assert_ne!(f.command(nic).unwrap() & regs::COMMAND_IO, 0);
    // The bridges above got an I/O window covering it.
    let w = f.bridge_windows(b("0000:02:01.0")).unwrap().unwrap();
    assert!(w.io.unwrap().contains(io.bus.get()));
}

/// Walks the standard capability list by config reads, as a driver would.
fn walk_caps(f: &peerdma_pci::Fabric, d: Bdf) -> Vec<u8> {
    let mut ids = Vec::new();
    assert_ne!(
        f.config_read(d, regs::STATUS, 2).unwrap() as u16 & regs::STATUS_CAP_LIST,
        0
    );
    let mut pos = f.config_read(d, regs::CAPABILITY_LIST, 1).unwrap() as u16;
    while pos != 0 {
        ids.push(f.config_read(d, pos, 1).unwrap() as u8);
        pos = f.config_read(d, pos + 1, 1).unwrap() as u16;
    }
    ids
}

fn walk_ext(f: &peerdma_pci::Fabric, d: Bdf) -> Vec<u16> {
    let mut ids = Vec::new();
    let mut pos = 0x100u16;
    loop {
        let h = f.config_read(d, pos, 4).unwrap();
        if h == 0 {
            break;
        }
        ids.push((h & 0xffff) as u16);
        pos = ((h >> 20) & 0xffc) as u16;
        if pos == 0 {
            break;
        }
    }
    ids
}

#[test]
fn capability_chains_are_walkable() {
    let f = example("gpu-server.toml");
    assert_eq!(
        walk_caps(&f, dev(&f, "gpu0")),
        vec![regs::CAP_ID_PM, regs::CAP_ID_EXP]
    );
    assert_eq!(
        walk_caps(&f, dev(&f, "acc0")),
        vec![regs::CAP_ID_PM, regs::CAP_ID_EXP, regs::CAP_ID_AF]
    );
    assert_eq!(walk_ext(&f, b("0000:02:00.0")), vec![regs::EXT_CAP_ID_ACS]);
    assert_eq!(walk_ext(&f, dev(&f, "nic0")), vec![regs::EXT_CAP_ID_SRIOV]);
    assert_eq!(walk_ext(&f, dev(&f, "gpu0")), Vec::<u16>::new());
    // PCIe port types.
    let port_type = |d: Bdf| {
        let e = f.function(d).unwrap().caps().exp.unwrap();
        ((f.config_read(d, e + regs::EXP_FLAGS, 2).unwrap() >> 4) & 0xf) as u8
    };
    assert_eq!(port_type(b("0000:00:01.0")), regs::EXP_TYPE_ROOT_PORT);
    assert_eq!(port_type(b("0000:01:00.0")), regs::EXP_TYPE_UPSTREAM);
    assert_eq!(port_type(b("0000:02:00.0")), regs::EXP_TYPE_DOWNSTREAM);
    assert_eq!(port_type(dev(&f, "gpu0")), regs::EXP_TYPE_ENDPOINT);
    // Header types: bridges type 1, endpoints type 0, a VF reads vendor 0xffff.
    assert_eq!(
        f.config_read(b("0000:02:00.0"), regs::HEADER_TYPE, 1)
            .unwrap(),
        1
    );
    assert_eq!(
        f.config_read(dev(&f, "gpu0"), regs::HEADER_TYPE, 1)
            .unwrap(),
        0
    );
    assert_eq!(f.config_read(b("0000:04:00.1"), 0, 4).unwrap(), 0xffff_ffff);
    // ACS control as the file set it.
    assert_eq!(
        f.acs_ctrl(b("0000:00:01.0")).unwrap(),
        Some(regs::ACS_SV | regs::ACS_RR | regs::ACS_CR | regs::ACS_UF)
    );
    assert_eq!(f.acs_ctrl(dev(&f, "gpu0")).unwrap(), None);
}

#[test]
fn read_only_bits_stay() {
    let f = example("gpu-nic-switch.toml");
    let gpu = dev(&f, "gpu0");
    f.config_write(gpu, regs::VENDOR_ID, 4, 0x1234_5678)
        .unwrap();
    assert_eq!(f.config_read(gpu, regs::VENDOR_ID, 4).unwrap(), 0x2330_10de);
    f.config_write(gpu, regs::HEADER_TYPE, 1, 0x81).unwrap();
    assert_eq!(f.config_read(gpu, regs::HEADER_TYPE, 1).unwrap(), 0);
    f.config_write(gpu, regs::COMMAND, 2, 0xffff).unwrap();
    assert_eq!(f.command(gpu).unwrap(), 0x0547);
    let e = f.function(gpu).unwrap().caps().exp.unwrap();
    let devcap = f.config_read(gpu, e + regs::EXP_DEVCAP, 4).unwrap();
    f.config_write(gpu, e + regs::EXP_DEVCAP, 4, 0).unwrap();
    assert_eq!(f.config_read(gpu, e + regs::EXP_DEVCAP, 4).unwrap(), devcap);
    // ACS capability bits are read-only, control bits writable.
    let port = b("0000:02:00.0");
    let acs = f.function(port).unwrap().caps().acs.unwrap();
    let cap = f.config_read(port, acs + regs::ACS_CAP, 2).unwrap();
    f.config_write(port, acs + regs::ACS_CAP, 2, 0).unwrap();
    assert_eq!(f.config_read(port, acs + regs::ACS_CAP, 2).unwrap(), cap);
    f.config_write(port, acs + regs::ACS_CTRL, 2, 0xffff)
        .unwrap();
    assert_eq!(f.acs_ctrl(port).unwrap(), Some(regs::ACS_ALL));
}

#[test]
fn status_error_bits_are_write_one_to_clear() {
    let f = example("gpu-nic-switch.toml");
    let gpu = dev(&f, "gpu0");
    // Clearing with ones on bits that are already zero leaves the capability bit alone.
    f.config_write(gpu, regs::STATUS, 2, 0xffff).unwrap();
    assert_eq!(
        f.config_read(gpu, regs::STATUS, 2).unwrap() as u16,
        regs::STATUS_CAP_LIST
    );
}

#[test]
fn bad_config_accesses_are_refused_with_einval_or_enodev() {
    let f = example("gpu-nic-switch.toml");
    let gpu = dev(&f, "gpu0");
    for (off, size) in [(0x11u16, 4usize), (0x10, 3), (0xffe, 4), (0x1000, 1)] {
        let e = f.config_read(gpu, off, size).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL, "{off:#x}/{size}");
        assert!(f.config_write(gpu, off, size, 0).is_err());
    }
    let e = f.config_read(b("0000:09:00.0"), 0, 4).unwrap_err();
    assert_eq!(e, PciError::NoDevice(b("0000:09:00.0")));
    assert_eq!(e.errno(), Errno::ENODEV);
}

#[derive(Default)]
struct Recorder(Mutex<Vec<FabricEvent>>);

impl FabricObserver for Recorder {
    fn event(&self, e: &FabricEvent) {
        self.0.lock().unwrap().push(e.clone());
    }
}

#[test]
fn flr_clears_command_and_bars_and_reset_function_restores_them() {
    let f = example("gpu-nic-switch.toml");
    let rec = Arc::new(Recorder::default());
    f.subscribe(rec.clone());
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let bar0 = f.bar(gpu, 0).unwrap().bus;
    f.dma_write(nic, DmaAddr(bar0.get()), b"keep").unwrap();
    let e = f.function(gpu).unwrap().caps().exp.unwrap();
    let devctl = f.config_read(gpu, e + regs::EXP_DEVCTL, 2).unwrap();
    f.config_write(
        gpu,
        e + regs::EXP_DEVCTL,
        2,
        devctl | u32::from(regs::EXP_DEVCTL_BCR_FLR),
    )
    .unwrap();
    assert_eq!(f.command(gpu).unwrap(), 0);
    assert_eq!(f.config_read(gpu, 0x10, 4).unwrap(), 0, "BAR address gone");
    assert_eq!(
        f.config_read(gpu, e + regs::EXP_DEVCTL, 2).unwrap() & 0x8000,
        0,
        "FLR bit reads 0"
    );
    assert!(rec.0.lock().unwrap().contains(&FabricEvent::Reset {
        bdf: gpu,
        cause: ResetCause::Flr
    }));
    let err = f.dma_write(nic, DmaAddr(bar0.get()), b"x").unwrap_err();
    assert!(matches!(err.reason, FaultReason::UnsupportedRequest { .. }));
    // The kernel's way: save, FLR, restore.
    let before = f.save_config(dev(&f, "nic0")).unwrap();
    f.config_write(
        gpu,
        regs::COMMAND,
        2,
        u32::from(regs::COMMAND_MEMORY | regs::COMMAND_MASTER),
    )
    .unwrap();
    f.config_write(gpu, 0x10, 4, bar0.get() as u32).unwrap();
    assert!(f.reset_function(gpu).unwrap());
    assert_eq!(f.bar(gpu, 0).unwrap().bus, bar0);
    assert_ne!(f.command(gpu).unwrap() & regs::COMMAND_MEMORY, 0);
    let mut back = [0u8; 4];
    f.dma_read(nic, DmaAddr(bar0.get()), &mut back).unwrap();
    assert_eq!(&back, b"keep", "device memory survives the reset");
    assert_eq!(f.save_config(nic).unwrap(), before);
}

#[test]
fn no_flr_capability_means_no_reset() {
    let f = example_edited(
        "gpu-nic-switch.toml",
        "name = \"gpu0\"",
        "name = \"gpu0\"\nflr = false",
    );
    let gpu = dev(&f, "gpu0");
    let e = f.function(gpu).unwrap().caps().exp.unwrap();
    f.config_write(gpu, e + regs::EXP_DEVCTL, 2, 0x8000)
        .unwrap();
    assert_ne!(f.command(gpu).unwrap(), 0);
    assert!(!f.reset_function(gpu).unwrap());
}

#[test]
fn advanced_features_flr() {
    let f = example("gpu-server.toml");
    let acc = dev(&f, "acc0");
    assert!(f.function(acc).unwrap().has_af_flr());
    let af = f.function(acc).unwrap().caps().af.unwrap();
    assert_eq!(
        f.config_read(acc, af + regs::AF_CAP, 1).unwrap() as u8,
        regs::AF_CAP_TP | regs::AF_CAP_FLR
    );
    f.config_write(acc, af + regs::AF_CTRL, 1, regs::AF_CTRL_FLR.into())
        .unwrap();
    assert_eq!(f.command(acc).unwrap(), 0);
}

#[test]
fn power_states_gate_and_d3hot_to_d0_may_reset() {
    let f = example("gpu-nic-switch.toml");
    let rec = Arc::new(Recorder::default());
    f.subscribe(rec.clone());
    let gpu = dev(&f, "gpu0");
    let pm = f.function(gpu).unwrap().caps().pm.unwrap();
    // D1 is not supported: the write leaves the state alone.
    f.config_write(gpu, pm + regs::PM_CTRL, 2, 1).unwrap();
    assert_eq!(f.power_state(gpu).unwrap(), PowerState::D0);
    f.set_power_state(gpu, PowerState::D3Hot).unwrap();
    f.set_power_state(gpu, PowerState::D0).unwrap();
    let ev = rec.0.lock().unwrap().clone();
    assert!(ev.contains(&FabricEvent::PowerState {
        bdf: gpu,
        from: PowerState::D0,
        to: PowerState::D3Hot
    }));
    assert!(ev.contains(&FabricEvent::PowerState {
        bdf: gpu,
        from: PowerState::D3Hot,
        to: PowerState::D0
    }));
    // No_Soft_Reset set (the default): state kept.
    assert_ne!(f.command(gpu).unwrap(), 0);

    let g = example_edited(
        "gpu-nic-switch.toml",
        "name = \"gpu0\"",
        "name = \"gpu0\"\nno_soft_reset = false",
    );
    let gpu = dev(&g, "gpu0");
    g.set_power_state(gpu, PowerState::D3Hot).unwrap();
    g.set_power_state(gpu, PowerState::D0).unwrap();
    assert_eq!(
        g.command(gpu).unwrap(),
        0,
        "D3hot→D0 without No_Soft_Reset resets the function"
    );
}

#[test]
fn secondary_bus_reset_resets_everything_below() {
    let f = example("gpu-nic-switch.toml");
    let rec = Arc::new(Recorder::default());
    f.subscribe(rec.clone());
    let (gpu, nic) = (dev(&f, "gpu0"), dev(&f, "nic0"));
    let usp = b("0000:01:00.0");
    let bctl = f.config_read(usp, regs::BRIDGE_CONTROL, 2).unwrap();
    f.config_write(
        usp,
        regs::BRIDGE_CONTROL,
        2,
        bctl | u32::from(regs::BRIDGE_CTL_BUS_RESET),
    )
    .unwrap();
    f.config_write(usp, regs::BRIDGE_CONTROL, 2, bctl).unwrap();
    assert_eq!(f.command(gpu).unwrap(), 0);
    assert_eq!(f.command(nic).unwrap(), 0);
    assert_eq!(f.command(b("0000:02:00.0")).unwrap(), 0);
    assert_ne!(f.command(usp).unwrap(), 0, "the bridge itself is not reset");
    let ev = rec.0.lock().unwrap().clone();
    assert!(ev.contains(&FabricEvent::Reset {
        bdf: gpu,
        cause: ResetCause::SecondaryBus { bridge: usp }
    }));
}

#[test]
fn sriov_numvfs_and_pf_reset() {
    let f = example("sriov-nic.toml");
    let (pf0, vf0) = (dev(&f, "nic-pf0"), dev(&f, "vf0"));
    let s = f.function(pf0).unwrap().caps().sriov.unwrap();
    assert_eq!(f.config_read(pf0, s + regs::SRIOV_TOTAL_VF, 2).unwrap(), 4);
    assert_eq!(
        f.config_read(pf0, s + regs::SRIOV_VF_OFFSET, 2).unwrap(),
        16
    );
    // NumVFs cannot change while VFs are enabled.
    f.config_write(pf0, s + regs::SRIOV_NUM_VF, 2, 2).unwrap();
    assert_eq!(f.config_read(pf0, s + regs::SRIOV_NUM_VF, 2).unwrap(), 4);
    f.config_write(pf0, s + regs::SRIOV_CTRL, 2, 0).unwrap();
    f.config_write(pf0, s + regs::SRIOV_NUM_VF, 2, 9).unwrap();
    assert_eq!(
        f.config_read(pf0, s + regs::SRIOV_NUM_VF, 2).unwrap(),
        4,
        "never above TotalVFs"
    );
    f.config_write(pf0, s + regs::SRIOV_NUM_VF, 2, 1).unwrap();
    f.config_write(
        pf0,
        s + regs::SRIOV_CTRL,
        2,
        (regs::SRIOV_CTRL_VFE | regs::SRIOV_CTRL_MSE).into(),
    )
    .unwrap();
    assert!(f.is_present(vf0).unwrap());
    assert!(
        !f.is_present(f.virtfns(pf0).unwrap()[1]).unwrap(),
        "only VF 0 with NumVFs = 1"
    );
    // A PF reset disables its VFs.
    assert!(f.reset_function(pf0).unwrap());
    assert!(
        f.is_present(vf0).unwrap(),
        "reset_function restores VF Enable"
    );
    let e = f.function(pf0).unwrap().caps().exp.unwrap();
    f.config_write(pf0, e + regs::EXP_DEVCTL, 2, 0x8000)
        .unwrap();
    assert!(!f.is_present(vf0).unwrap());
    let err = f.dma_write(vf0, DmaAddr(0x1000), b"x").unwrap_err();
    assert_eq!(err.reason, FaultReason::RequesterNotPresent);
}

#[test]
fn vf_memory_enable_belongs_to_the_pf() {
    let f = example("sriov-nic.toml");
    let vf0 = dev(&f, "vf0");
    // A VF's own COMMAND.MEM is hardwired to zero; Bus Master is its own.
    f.config_write(vf0, regs::COMMAND, 2, 0xffff).unwrap();
    assert_eq!(f.command(vf0).unwrap(), regs::COMMAND_MASTER);
    let pf1 = dev(&f, "nic-pf1");
    let bar = f.bar(vf0, 3).unwrap();
    f.dma_write(pf1, DmaAddr(bar.bus.get()), b"ok").unwrap();
}

#[test]
fn a_bulk_config_read_gives_what_byte_reads_give() {
    let f = example("gpu-nic-switch.toml");
    let gpu = dev(&f, "gpu0");
    let mut all = vec![0u8; regs::CFG_SIZE];
    f.config_read_into(gpu, 0, &mut all).unwrap();
    for (i, b) in all.iter().enumerate() {
        assert_eq!(
            u32::from(*b),
            f.config_read(gpu, i as u16, 1).unwrap(),
            "byte {i:#x}"
        );
    }
    let mut tail = [0u8; 3];
    f.config_read_into(gpu, 0x3d, &mut tail).unwrap();
    assert_eq!(tail, all[0x3d..0x40]);
    let mut past = [0u8; 2];
    assert!(
        f.config_read_into(gpu, 0xfff, &mut past).is_err(),
        "runs past 4 KiB"
    );
    assert!(f.config_read_into(gpu, 0xfff, &mut past[..1]).is_ok());
}

#[test]
fn a_reset_puts_back_header_and_capabilities_keeps_device_storage_and_resets_the_nvme_controller() {
    // QEMU's NVMe: MSI-X 0x40..0x4c, PM 0x60..0x68, PCIe 0x80..0xbc; the bytes between and
    // after them are the device's own storage, which QEMU's reset leaves alone.
    let f = example("qemu-q35.toml");
    let n = dev(&f, "pm_provider");
    let storage = [0x4c, 0x5c, 0x68, 0x7c, 0xbc, 0xfc, 0x104, 0xffc];
    for (i, &at) in storage.iter().enumerate() {
        f.config_write(n, at, 4, 0x1234_5600 + i as u32).unwrap();
    }
    f.config_write(n, regs::CACHE_LINE_SIZE, 1, 0x10).unwrap();
    f.config_write(n, 0x88, 2, 0x000f).unwrap();
    let regs_at = |at: u64, data: &[u8]| {
        f.cpu_write(peerdma_pci::PhysAddr(0xfdf0_0000 + at), data)
            .unwrap();
    };
    regs_at(0x24, &0x001f_001f_u32.to_le_bytes());
    regs_at(0x28, &0x10000_u64.to_le_bytes());
    regs_at(0x14, &0x0046_0001_u32.to_le_bytes());
    let reg = |at: u64| {
        let mut b = [0u8; 4];
        f.bar_peek(n, 0, at, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    assert_eq!(reg(0x1c), 1, "the controller is ready");
    assert!(f.flr(n).unwrap());
    for (i, &at) in storage.iter().enumerate() {
        assert_eq!(
            f.config_read(n, at, 4).unwrap(),
            0x1234_5600 + i as u32,
            "storage at {at:#x} kept"
        );
    }
    assert_eq!(f.config_read(n, regs::CACHE_LINE_SIZE, 1).unwrap(), 0);
    assert_eq!(f.config_read(n, 0x88, 2).unwrap(), 0, "DevCtl reset");
    assert_eq!(
        (reg(0x1c), reg(0x14), reg(0x24), reg(0x28)),
        (0, 0, 0x001f_001f, 0x10000),
        "CSTS and CC reset, the admin queue registers kept"
    );
    // A bus reset does the same to the controller.
    f.config_write(n, regs::COMMAND, 2, u32::from(regs::COMMAND_MEMORY))
        .unwrap();
    f.config_write(n, 0x10, 4, 0xfdf0_0000).unwrap();
    regs_at(0x14, &0x0046_0001_u32.to_le_bytes());
    assert_eq!(reg(0x1c), 1);
    let port = f.upstream_bridge(n).unwrap().unwrap();
    let bctl = f.config_read(port, regs::BRIDGE_CONTROL, 2).unwrap();
    let sbr = u32::from(regs::BRIDGE_CTL_BUS_RESET);
    f.config_write(port, regs::BRIDGE_CONTROL, 2, bctl | sbr)
        .unwrap();
    f.config_write(port, regs::BRIDGE_CONTROL, 2, bctl).unwrap();
    assert_eq!((reg(0x1c), reg(0x14), reg(0x28)), (0, 0, 0x10000));
    assert_eq!(f.config_read(n, 0x104, 4).unwrap(), 0x1234_5606);
}

/// Every interrupt event the fabric reports.
#[derive(Default)]
struct Irqs(Mutex<Vec<FabricEvent>>);

impl FabricObserver for Irqs {
    fn event(&self, e: &FabricEvent) {
        if matches!(e, FabricEvent::Intx { .. } | FabricEvent::Msi { .. }) {
            self.0.lock().unwrap().push(e.clone());
        }
    }
}

#[test]
fn edus_dma_engine_moves_bytes_as_its_own_dma_and_raises_its_interrupt() {
    // QEMU's edu: RAM → its buffer (device address 0x40000), then the buffer → RAM again,
    // each a DMA of the edu's routed through the fabric. A command with bit 2 raises
    // interrupt 0x100: without MSI the INTx line (Status' Interrupt bit); with MSI enabled an
    // MSI, sent only while bus mastering is on.
    let f = example("qemu-q35.toml");
    let edu = dev(&f, "initiator");
    let irqs = Arc::new(Irqs::default());
    f.subscribe(irqs.clone());
    let reg = |at: u64, v: u64| {
        f.cpu_write(peerdma_pci::PhysAddr(0xfe00_0000 + at), &v.to_le_bytes())
            .unwrap();
    };
    let reg32 = |at: u64, v: u32| {
        f.cpu_write(peerdma_pci::PhysAddr(0xfe00_0000 + at), &v.to_le_bytes())
            .unwrap();
    };
    let read = |at: u64| {
        let mut b = [0u8; 8];
        f.cpu_read(peerdma_pci::PhysAddr(0xfe00_0000 + at), &mut b)
            .unwrap();
        u64::from_le_bytes(b)
    };
    let pattern = *b"edu moved these!";
    f.ram_poke(peerdma_pci::PhysAddr(0x10_0000), &pattern)
        .unwrap();
    // edu's 28-bit DMA mask keeps its addresses below 0x10000000 (`edu_clamp_addr`):
    // without an IOMMU it reaches RAM only, and an address above the mask wraps.
    let out = 0x20_0000u64;
    let peek = |at: u64| {
        let mut b = [0u8; 16];
        f.ram_peek(peerdma_pci::PhysAddr(at), &mut b).unwrap();
        b
    };
    let run = |src: u64, dst: u64, len: u64, cmd: u64| {
        reg(0x80, src);
        reg(0x88, dst);
        reg(0x90, len);
        reg(0x98, cmd);
    };
    // Bus mastering off: the read from RAM faults, the buffer stays empty.
    f.config_write(edu, regs::COMMAND, 2, u32::from(regs::COMMAND_MEMORY))
        .unwrap();
    run(0x10_0000, 0x4_0000, 16, 1);
    f.config_write(
        edu,
        regs::COMMAND,
        2,
        u32::from(regs::COMMAND_MEMORY | regs::COMMAND_MASTER),
    )
    .unwrap();
    run(0x4_0000, out, 16, 3);
    assert_eq!(
        peek(out),
        [0; 16],
        "nothing was read while mastering was off"
    );
    run(0x10_0000, 0x4_0000, 16, 1);
    let mut probe = [0u8; 16];
    f.dma_read(edu, DmaAddr(0x10_0000), &mut probe).unwrap();
    assert_eq!(probe, pattern, "RAM as edu reads it");
    f.bar_peek(edu, 0, 0x4_0000, &mut probe).unwrap();
    assert_eq!(probe, pattern, "edu's buffer");
    run(0x4_0000, 0x1000_0000 | out, 16, 3 | 4);
    assert_eq!(
        peek(out),
        pattern,
        "landed, at the address clamped to 28 bits"
    );
    assert_eq!(read(0x98), 6, "done: run bit clear, the rest kept");
    let mut st = [0u8; 4];
    f.cpu_read(peerdma_pci::PhysAddr(0xfe00_0024), &mut st)
        .unwrap();
    assert_eq!(u32::from_le_bytes(st), 0x100, "the DMA interrupt");
    assert_ne!(f.config_read(edu, regs::STATUS, 2).unwrap() & 0x8, 0);
    assert_eq!(
        std::mem::take(&mut *irqs.0.lock().unwrap()),
        [FabricEvent::Intx {
            bdf: edu,
            asserted: true
        }]
    );
    // A buffer range outside the 4 KiB buffer moves nothing, and still completes.
    run(0x4_0f00, out + 0x1000, 0x200, 3);
    assert_eq!(peek(out + 0x1000), [0; 16]);
    assert_eq!(read(0x98), 2);
    // INTx-disable masks the line without changing Status; lowering clears both.
    f.config_write(
        edu,
        regs::COMMAND,
        2,
        u32::from(regs::COMMAND_MEMORY | regs::COMMAND_MASTER | regs::COMMAND_INTX_DISABLE),
    )
    .unwrap();
    reg32(0x64, 0x100);
    assert_eq!(f.config_read(edu, regs::STATUS, 2).unwrap() & 0x8, 0);
    assert_eq!(
        std::mem::take(&mut *irqs.0.lock().unwrap()),
        [FabricEvent::Intx {
            bdf: edu,
            asserted: false
        }],
        "the line went down with INTx-disable"
    );
    // MSI enabled (edu's capability at 0x40): every raise sends one, with mastering on.
    f.config_write(edu, 0x42, 2, 1).unwrap();
    reg32(0x60, 1);
    reg32(0x60, 1);
    f.config_write(edu, regs::COMMAND, 2, u32::from(regs::COMMAND_MEMORY))
        .unwrap();
    reg32(0x60, 1);
    assert_eq!(
        std::mem::take(&mut *irqs.0.lock().unwrap()),
        [
            FabricEvent::Msi {
                bdf: edu,
                vector: 0
            },
            FabricEvent::Msi {
                bdf: edu,
                vector: 0
            }
        ]
    );
    assert_eq!(
        f.config_read(edu, regs::STATUS, 2).unwrap() & 0x8,
        0,
        "no INTx"
    );
}

/// Every DMA that landed, as (requester, address, length, write).
#[derive(Default)]
struct Dmas(Mutex<Vec<(Bdf, u64, u64, bool)>>);

impl FabricObserver for Dmas {
    fn event(&self, e: &FabricEvent) {
        if let FabricEvent::DmaLanded {
            requester,
            addr,
            len,
            write,
            ..
        } = e
        {
            self.0
                .lock()
                .unwrap()
                .push((*requester, *addr, *len, *write));
        }
    }
}

#[test]
fn nvmes_admin_doorbell_fetches_each_command_by_its_own_dma_and_a_failed_fetch_is_fatal() {
    // QEMU's NVMe (`nvme_process_db`, `nvme_process_sq`): a tail written to 0x1000 makes the
    // controller read each 64-byte entry from the head to the new tail, from RAM by its own
    // DMA (this machine has no IOMMU), or from its memory buffer (BAR 2) when the entry lies
    // in the mapped buffer. The first fetch that fails sets CSTS to CFS alone.
    let f = example("qemu-q35.toml");
    let n = dev(&f, "pm_provider");
    let dmas = Arc::new(Dmas::default());
    f.subscribe(dmas.clone());
    let bar0 = 0xfdf0_0000u64;
    let put = |at: u64, data: &[u8]| {
        f.cpu_write(peerdma_pci::PhysAddr(bar0 + at), data).unwrap();
    };
    let reg = |at: u64| {
        let mut b = [0u8; 4];
        f.cpu_read(peerdma_pci::PhysAddr(bar0 + at), &mut b)
            .unwrap();
        u32::from_le_bytes(b)
    };
    let command = |v: u16| f.config_write(n, regs::COMMAND, 2, u32::from(v)).unwrap();
    let start = |asq: u64, entries: u32| {
        put(0x14, &0u32.to_le_bytes());
        put(0x24, &(0x001f_0000 | (entries - 1)).to_le_bytes());
        put(0x28, &asq.to_le_bytes());
        put(0x30, &0x20_0000u64.to_le_bytes());
        put(0x14, &0x0046_0001_u32.to_le_bytes());
        assert_eq!(reg(0x1c), 1, "ready");
    };
    let fetched = || -> Vec<(u64, u64)> {
        std::mem::take(&mut *dmas.0.lock().unwrap())
            .into_iter()
            .filter(|d| d.0 == n)
            .map(|d| {
                assert!(!d.3, "a fetch is a read");
                (d.1, d.2)
            })
            .collect()
    };

    // Before the controller is ready there is no queue: nothing is fetched.
    command(regs::COMMAND_MEMORY | regs::COMMAND_MASTER);
    put(0x1000, &1u32.to_le_bytes());
    assert_eq!((reg(0x1c), fetched()), (0, vec![]));

    // Bus mastering on: three entries fetched from RAM, in order; the controller stays ready.
    start(0x10_0000, 32);
    put(0x1000, &3u32.to_le_bytes());
    assert_eq!(
        fetched(),
        [(0x10_0000, 64), (0x10_0040, 64), (0x10_0080, 64)]
    );
    assert_eq!(reg(0x1c), 1);
    // Ignored: the same tail (nothing between head and tail), a tail past the 32 entries,
    // a misaligned write, the completion doorbell, queue 1's doorbells.
    put(0x1000, &3u32.to_le_bytes());
    put(0x1000, &32u32.to_le_bytes());
    put(0x1002, &5u16.to_le_bytes());
    put(0x1004, &5u32.to_le_bytes());
    put(0x1008, &5u32.to_le_bytes());
    put(0x100c, &5u32.to_le_bytes());
    assert_eq!((fetched(), reg(0x1c)), (vec![], 1));
    // A 1-byte write is widened to 2 bytes: a tail of 1 wraps the queue round from entry 3.
    put(0x1000, &[1]);
    let got = fetched();
    assert_eq!(got.len(), 30, "entries 3..=31 and 0");
    assert_eq!(got[0], (0x10_00c0, 64));
    assert_eq!(got[29], (0x10_0000, 64));

    // Bus mastering off: the fetch fails, CFS alone; another ring leaves it so; clearing EN
    // resets the controller and its queue.
    command(regs::COMMAND_MEMORY);
    put(0x1000, &2u32.to_le_bytes());
    assert_eq!((reg(0x1c), reg(0x14)), (2, 0x0046_0001), "fatal, CC kept");
    put(0x1000, &3u32.to_le_bytes());
    assert_eq!((reg(0x1c), fetched()), (2, vec![]));
    put(0x14, &0u32.to_le_bytes());
    assert_eq!(reg(0x1c), 0);
    put(0x1000, &1u32.to_le_bytes());
    assert_eq!(reg(0x1c), 0, "no queue after the reset");

    // A queue in the mapped memory buffer is fetched from BAR 2 without a DMA, even with
    // bus mastering off; the entry that runs past the buffer's 1 MiB is a DMA, and fails.
    let cmb = 0x4000_0000u64;
    put(0x50, &(cmb | 3).to_le_bytes());
    start(cmb + 0x10_0000 - 0x1000, 128);
    put(0x1000, &64u32.to_le_bytes());
    assert_eq!((reg(0x1c), fetched()), (1, vec![]), "from the buffer");
    put(0x1000, &65u32.to_le_bytes());
    assert_eq!(reg(0x1c), 2, "past the buffer: a DMA, refused");
    // An FLR frees the queue and keeps the buffer's controls.
    assert!(f.flr(n).unwrap());
    command(regs::COMMAND_MEMORY);
    f.config_write(n, 0x10, 4, bar0 as u32).unwrap();
    let mut msc = [0u8; 8];
    f.bar_peek(n, 0, 0x50, &mut msc).unwrap();
    assert_eq!(u64::from_le_bytes(msc), cmb | 3);
    assert_eq!(reg(0x1c), 0);
}
