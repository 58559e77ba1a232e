//! The streaming DMA API on the emulated fabric: each rule of the rulebook's §2.2–2.6, with
//! bytes checked where a device really DMAs.

#![allow(clippy::many_single_char_names)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use peerdma_dma::iommu::{Attach, prot};
use peerdma_dma::mapping::{DebugIssue, dma_bit_mask, dma_info_to_prot};
use peerdma_dma::{Direction, DmaConfig, DmaSystem, MapError, Swiotlb, attrs};
use peerdma_pci::{AsErrno, Bdf, DmaAddr, Errno, PhysAddr, examples, file};

fn system(iommu: bool) -> (DmaSystem, Bdf, Bdf) {
    let f = Arc::new(file::load_str(examples::GPU_NIC_SWITCH, "box").unwrap());
    let (nic, gpu) = (f.lookup("nic0").unwrap(), f.lookup("gpu0").unwrap());
    let s = DmaSystem::new(f, iommu);
    s.set_swiotlb_pool(PhysAddr(0x7000_0000), 4 << 20);
    (s, nic, gpu)
}

const HIGH: u64 = 0x2_0000_0000; // RAM above 4 GiB

#[test]
fn prot_table() {
    use Direction::*;
    assert_eq!(
        dma_info_to_prot(Bidirectional, true, 0),
        prot::CACHE | prot::READ | prot::WRITE
    );
    assert_eq!(dma_info_to_prot(ToDevice, false, 0), prot::READ);
    assert_eq!(
        dma_info_to_prot(FromDevice, true, attrs::PRIVILEGED),
        prot::CACHE | prot::PRIV | prot::WRITE
    );
    assert_eq!(
        dma_info_to_prot(Bidirectional, true, attrs::MMIO),
        prot::MMIO | prot::READ | prot::WRITE
    );
    assert_eq!(dma_info_to_prot(None, true, 0), 0);
    assert_eq!(dma_bit_mask(64), u64::MAX);
    assert_eq!(dma_bit_mask(32), 0xffff_ffff);
}

#[test]
fn no_mask_no_mapping_and_errors_are_enomem() {
    let (s, nic, _) = system(false);
    s.configure(
        nic,
        DmaConfig {
            mask: None,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let e = s
        .map_phys(nic, PhysAddr(0x1000), 4096, Direction::ToDevice, 0)
        .unwrap_err();
    assert_eq!(e, MapError::NoDmaMask);
    assert_eq!(e.errno(), Errno::ENOMEM);
    assert_eq!(
        s.dma_mask(nic),
        dma_bit_mask(32),
        "dma_get_mask falls back to 32 bits"
    );
    let other: Bdf = "0000:02:00.0".parse().unwrap();
    assert_eq!(
        s.map_phys(other, PhysAddr(0), 1, Direction::ToDevice, 0),
        Err(MapError::UnknownDevice(other))
    );
}

#[test]
fn direct_ram_gets_the_range_offset_and_mmio_does_not() {
    let (s, nic, gpu) = system(false);
    s.configure(
        nic,
        DmaConfig {
            range_offset: 0x1_0000_0000,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let a = s
        .map_phys(nic, PhysAddr(0x1000), 4096, Direction::ToDevice, 0)
        .unwrap();
    assert_eq!(a, DmaAddr(0x1_0000_1000));
    let bar = s.fabric().bar(gpu, 0).unwrap().cpu.unwrap();
    let m = s
        .map_resource(nic, bar, 4096, Direction::Bidirectional, 0)
        .unwrap();
    assert_eq!(m.get(), bar.get(), "MMIO is returned untranslated");
    s.unmap_phys(nic, a, 4096, Direction::ToDevice, 0);
    s.unmap_resource(nic, m, 4096, Direction::Bidirectional, 0);
    assert!(s.debug_report().is_empty());
}

#[test]
fn direct_unreachable_ram_bounces_with_real_copies_both_ways() {
    let (s, nic, _) = system(false);
    s.configure(
        nic,
        DmaConfig {
            mask: Some(dma_bit_mask(32)),
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let f = s.fabric().clone();
    // To the device: the bytes are in the bounce slot when the device reads.
    f.ram_poke(PhysAddr(HIGH), b"to the device").unwrap();
    let a = s
        .map_phys(nic, PhysAddr(HIGH), 13, Direction::ToDevice, 0)
        .unwrap();
    assert!(
        a.get() >= 0x7000_0000 && a.get() < 0x7040_0000,
        "bounced below 4 GiB: {a:?}"
    );
    let mut got = [0u8; 13];
    f.dma_read(nic, a, &mut got).unwrap();
    assert_eq!(&got, b"to the device");
    s.unmap_phys(nic, a, 13, Direction::ToDevice, 0);
    // From the device: the bytes reach the original buffer at unmap.
    let b = s
        .map_phys(nic, PhysAddr(HIGH + 0x1000), 9, Direction::FromDevice, 0)
        .unwrap();
    f.dma_write(nic, b, b"from dev!").unwrap();
    let mut orig = [0u8; 9];
    f.ram_peek(PhysAddr(HIGH + 0x1000), &mut orig).unwrap();
    assert_ne!(&orig, b"from dev!", "not before the unmap (or a sync)");
    s.unmap_phys(nic, b, 9, Direction::FromDevice, 0);
    f.ram_peek(PhysAddr(HIGH + 0x1000), &mut orig).unwrap();
    assert_eq!(&orig, b"from dev!");
    assert_eq!(s.swiotlb_used_slots(), 0);
    assert!(s.counters.bounced_bytes.load(Ordering::Relaxed) >= 13 + 9);
}

#[test]
fn direct_without_swiotlb_refuses_what_the_device_cannot_reach() {
    let (s, nic, _) = system(false);
    s.configure(
        nic,
        DmaConfig {
            mask: Some(dma_bit_mask(32)),
            swiotlb: Swiotlb::Off,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let e = s
        .map_phys(nic, PhysAddr(HIGH), 4096, Direction::ToDevice, 0)
        .unwrap_err();
    assert_eq!(
        e,
        MapError::Overflow {
            addr: HIGH,
            size: 4096,
            mask: 0xffff_ffff,
            limit: 0
        }
    );
    // The bus limit counts too.
    s.configure(
        nic,
        DmaConfig {
            bus_dma_limit: 0xfff,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    assert!(
        s.map_phys(nic, PhysAddr(0x1000), 1, Direction::ToDevice, 0)
            .is_err()
    );
}

#[test]
fn mmio_never_bounces() {
    let (s, nic, gpu) = system(false);
    let bar = s.fabric().bar(gpu, 2).unwrap().cpu.unwrap();
    // Not addressable: an error, not a bounce.
    s.configure(
        nic,
        DmaConfig {
            mask: Some(dma_bit_mask(32)),
            ..DmaConfig::default()
        },
    )
    .unwrap();
    assert!(matches!(
        s.map_resource(nic, bar, 4096, Direction::Bidirectional, 0),
        Err(MapError::Overflow { .. })
    ));
    // Forced swiotlb: RAM bounces, MMIO fails.
    s.configure(
        nic,
        DmaConfig {
            swiotlb: Swiotlb::Forced,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let r = s
        .map_phys(nic, PhysAddr(0x1000), 64, Direction::ToDevice, 0)
        .unwrap();
    assert!(r.get() >= 0x7000_0000, "forced bounce");
    assert_eq!(
        s.map_resource(nic, bar, 4096, Direction::Bidirectional, 0),
        Err(MapError::MmioNeedsBounce)
    );
    s.unmap_phys(nic, r, 64, Direction::ToDevice, 0);
    assert_eq!(s.swiotlb_used_slots(), 0);
}

#[test]
fn non_coherent_devices_get_cache_maintenance_unless_skipped_or_mmio() {
    let (s, nic, gpu) = system(false);
    s.configure(
        nic,
        DmaConfig {
            coherent: false,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let c = &s.counters;
    let a = s
        .map_phys(nic, PhysAddr(0x1000), 64, Direction::Bidirectional, 0)
        .unwrap();
    assert_eq!(c.sync_for_device.load(Ordering::Relaxed), 1);
    s.unmap_phys(nic, a, 64, Direction::Bidirectional, 0);
    assert_eq!(c.sync_for_cpu.load(Ordering::Relaxed), 1);
    let b = s
        .map_phys(
            nic,
            PhysAddr(0x1000),
            64,
            Direction::Bidirectional,
            attrs::SKIP_CPU_SYNC,
        )
        .unwrap();
    s.unmap_phys(nic, b, 64, Direction::Bidirectional, attrs::SKIP_CPU_SYNC);
    let bar = s.fabric().bar(gpu, 0).unwrap().cpu.unwrap();
    let m = s
        .map_resource(nic, bar, 64, Direction::Bidirectional, 0)
        .unwrap();
    s.unmap_resource(nic, m, 64, Direction::Bidirectional, 0);
    assert_eq!(
        (
            c.sync_for_device.load(Ordering::Relaxed),
            c.sync_for_cpu.load(Ordering::Relaxed)
        ),
        (1, 1)
    );
    s.sync_single_for_device(nic, DmaAddr(0x1000), 64, Direction::ToDevice);
    s.sync_single_for_cpu(nic, DmaAddr(0x1000), 64, Direction::FromDevice);
    assert_eq!(
        (
            c.sync_for_device.load(Ordering::Relaxed),
            c.sync_for_cpu.load(Ordering::Relaxed)
        ),
        (2, 2)
    );
}

#[test]
fn iommu_mapping_lands_then_faults_after_unmap() {
    let (s, nic, _) = system(true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let f = s.fabric().clone();
    let a = s
        .map_phys(
            nic,
            PhysAddr(HIGH + 0x234),
            100,
            Direction::Bidirectional,
            0,
        )
        .unwrap();
    assert_eq!(
        a.get() & 0xfff,
        0x234,
        "the offset inside the granule is kept"
    );
    assert!(a.get() < 1 << 32, "PCI devices get 32-bit IOVAs first");
    f.dma_write(nic, a, b"through the iommu").unwrap();
    let mut got = [0u8; 17];
    f.ram_peek(PhysAddr(HIGH + 0x234), &mut got).unwrap();
    assert_eq!(&got, b"through the iommu");
    s.unmap_phys(nic, a, 100, Direction::Bidirectional, 0);
    let e = f.dma_write(nic, a, b"x").unwrap_err();
    assert!(
        matches!(e.reason, peerdma_pci::FaultReason::Translation(_)),
        "{e}"
    );
    assert!(!s.iommu().unwrap().faults().is_empty());
}

#[test]
fn iommu_protection_follows_the_direction() {
    let (s, nic, _) = system(true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let a = s
        .map_phys(nic, PhysAddr(HIGH), 4096, Direction::ToDevice, 0)
        .unwrap();
    let f = s.fabric();
    let mut b = [0u8; 4];
    f.dma_read(nic, a, &mut b).unwrap();
    assert!(
        f.dma_write(nic, a, b"no").is_err(),
        "a TO_DEVICE mapping is read-only for the device"
    );
    let d = s.domain_of(nic).unwrap();
    assert_eq!(
        s.iommu().unwrap().lookup(d, a.get()).unwrap().1.prot,
        prot::CACHE | prot::READ
    );
    s.unmap_phys(nic, a, 4096, Direction::ToDevice, 0);
}

#[test]
fn iommu_map_resource_maps_mmio_and_reaches_the_peer_bar() {
    let (s, nic, gpu) = system(true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let bar = s.fabric().bar(gpu, 2).unwrap().cpu.unwrap();
    let a = s
        .map_resource(nic, bar, 1 << 20, Direction::Bidirectional, 0)
        .unwrap();
    let d = s.domain_of(nic).unwrap();
    assert_ne!(
        s.iommu().unwrap().lookup(d, a.get()).unwrap().1.prot & prot::MMIO,
        0
    );
    let t = s.fabric().dma_write(nic, a, b"p2p via iova").unwrap();
    assert!(t.via_root_complex());
    let mut got = [0u8; 12];
    s.fabric().bar_peek(gpu, 2, 0, &mut got).unwrap();
    assert_eq!(&got, b"p2p via iova");
    s.unmap_resource(nic, a, 1 << 20, Direction::Bidirectional, 0);
}

#[test]
fn the_32_bit_first_rule_gives_up_once_and_for_all() {
    let (s, nic, gpu) = system(true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    // 8 GiB cannot fit below 4 GiB: the first try fails, the device goes 64-bit for good.
    let bar = s.fabric().bar(gpu, 2).unwrap().cpu.unwrap();
    let big = s
        .map_resource(nic, bar, 8 << 30, Direction::Bidirectional, 0)
        .unwrap();
    assert!(big.get() >= 1 << 32);
    assert_eq!(
        s.notices(),
        vec![format!("{nic}: Using 48-bit DMA addresses")],
        "bits of the limit after the aperture cap"
    );
    let small = s
        .map_phys(nic, PhysAddr(0x1000), 4096, Direction::ToDevice, 0)
        .unwrap();
    assert!(
        small.get() >= 1 << 32,
        "no more 32-bit tries after the first failure"
    );
    s.unmap_resource(nic, big, 8 << 30, Direction::Bidirectional, 0);
    s.unmap_phys(nic, small, 4096, Direction::ToDevice, 0);
}

#[test]
fn untrusted_unaligned_buffers_bounce_under_the_iommu_and_mmio_cannot() {
    let (s, nic, gpu) = system(true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            untrusted: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    s.fabric()
        .ram_poke(PhysAddr(HIGH + 8), b"secret-neighbour")
        .unwrap();
    let a = s
        .map_phys(nic, PhysAddr(HIGH + 0x100), 16, Direction::ToDevice, 0)
        .unwrap();
    assert_eq!(s.swiotlb_used_slots(), 1, "bounced");
    let mut around = [0u8; 16];
    // The device sees the bounce slot, not the neighbouring bytes of the original page.
    s.fabric()
        .dma_read(nic, DmaAddr(a.get() & !0xfff | 8), &mut around)
        .unwrap();
    assert_ne!(&around, b"secret-neighbour");
    s.unmap_phys(nic, a, 16, Direction::ToDevice, 0);
    assert_eq!(s.swiotlb_used_slots(), 0);
    let bar = s.fabric().bar(gpu, 0).unwrap().cpu.unwrap();
    assert_eq!(
        s.map_resource(nic, PhysAddr(bar.get() + 4), 16, Direction::ToDevice, 0),
        Err(MapError::MmioNeedsBounce)
    );
    // Aligned buffers are not bounced.
    let b = s
        .map_phys(nic, PhysAddr(HIGH), 4096, Direction::ToDevice, 0)
        .unwrap();
    assert_eq!(s.swiotlb_used_slots(), 0);
    s.unmap_phys(nic, b, 4096, Direction::ToDevice, 0);
}

#[test]
fn identity_devices_under_an_iommu_use_dma_direct() {
    let (s, nic, _) = system(true);
    s.configure(nic, DmaConfig::default()).unwrap();
    assert!(!s.uses_iommu(nic));
    assert_eq!(s.iommu().unwrap().attachment(nic), Attach::Identity);
    let a = s
        .map_phys(nic, PhysAddr(0x5000), 8, Direction::FromDevice, 0)
        .unwrap();
    assert_eq!(a.get(), 0x5000);
    s.fabric().dma_write(nic, a, b"identity").unwrap();
    s.unmap_phys(nic, a, 8, Direction::FromDevice, 0);
}

#[test]
fn dma_debug_names_leaks_double_unmaps_and_mismatches() {
    let (s, nic, _) = system(true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let a = s
        .map_phys(nic, PhysAddr(0x1000), 4096, Direction::ToDevice, 0)
        .unwrap();
    let leak = s
        .map_phys(nic, PhysAddr(0x9000), 4096, Direction::ToDevice, 0)
        .unwrap();
    s.unmap_phys(nic, a, 4096, Direction::ToDevice, 0);
    s.unmap_phys(nic, a, 4096, Direction::ToDevice, 0);
    let c = s
        .map_phys(nic, PhysAddr(0x3000), 4096, Direction::FromDevice, 0)
        .unwrap();
    s.unmap_phys(nic, c, 2048, Direction::ToDevice, 0);
    let report = s.debug_report();
    assert_eq!(report.len(), 4, "{report:#?}");
    assert!(
        matches!(&report[0], DebugIssue::NotMapped { previously: Some(p), .. } if p.file().contains("tests/mapping.rs"))
    );
    assert!(matches!(
        &report[1],
        DebugIssue::WrongSize { size: 2048, .. }
    ));
    assert!(matches!(
        &report[2],
        DebugIssue::WrongDirection {
            dir: Direction::ToDevice,
            ..
        }
    ));
    match &report[3] {
        DebugIssue::Leak(e) => {
            assert_eq!(e.addr, leak.get());
            assert!(e.at.file().contains("tests/mapping.rs"), "made at {}", e.at);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.debug_outstanding(nic), 1);
}

#[test]
fn dma_debug_off_records_nothing_but_mappings_still_work() {
    let (s, nic, _) = system(true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    s.set_debug(false);
    let a = s
        .map_phys(nic, PhysAddr(0x1000), 4096, Direction::ToDevice, 0)
        .unwrap();
    s.fabric().dma_read(nic, a, &mut [0u8; 16]).unwrap();
    assert_eq!(s.debug_outstanding(nic), 0);
    s.unmap_phys(nic, a, 4096, Direction::ToDevice, 0);
    s.unmap_phys(nic, a, 4096, Direction::ToDevice, 0);
    assert!(s.debug_report().is_empty());
    // The unmap itself happened.
    assert!(s.fabric().dma_read(nic, a, &mut [0u8; 16]).is_err());
}

#[test]
fn page_wrappers_map_page_plus_offset_and_refuse_mmio() {
    let (s, nic, gpu) = system(true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let a = s
        .map_page(nic, PhysAddr(HIGH), 0x10, 64, Direction::FromDevice, 0)
        .unwrap();
    assert_eq!(a.get() & 0xfff, 0x10);
    s.fabric().dma_write(nic, a, b"page").unwrap();
    let mut got = [0u8; 4];
    s.fabric()
        .ram_peek(PhysAddr(HIGH + 0x10), &mut got)
        .unwrap();
    assert_eq!(&got, b"page");
    s.unmap_page(nic, a, 64, Direction::FromDevice, 0);
    let bar = s.fabric().bar(gpu, 0).unwrap().cpu.unwrap();
    assert_eq!(
        s.map_page(nic, bar, 0, 64, Direction::ToDevice, attrs::MMIO),
        Err(MapError::BadSize)
    );
    assert_eq!(
        s.map_page(nic, PhysAddr(HIGH + 8), 0, 64, Direction::ToDevice, 0),
        Err(MapError::BadSize)
    );
    assert!(s.debug_report().is_empty());
}
