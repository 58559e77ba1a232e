//! The IOVA-based DMA API, one test per rule of the rulebook's §2.7.

use std::sync::Arc;

use peerdma_dma::iova_api::{DMA_IOVA_USE_SWIOTLB, IovaState};
use peerdma_dma::mapping::DebugIssue;
use peerdma_dma::{Direction, DmaConfig, DmaSystem, attrs};
use peerdma_pci::{Bdf, DmaAddr, Errno, PhysAddr, examples, file};

fn system(cfg: DmaConfig) -> (DmaSystem, Bdf, Bdf) {
    let f = Arc::new(file::load_str(examples::GPU_NIC_SWITCH, "box").unwrap());
    let (nic, gpu) = (f.lookup("nic0").unwrap(), f.lookup("gpu0").unwrap());
    let s = DmaSystem::new(f, true);
    s.set_swiotlb_pool(PhysAddr(0x7000_0000), 4 << 20);
    s.configure(nic, cfg).unwrap();
    (s, nic, gpu)
}

fn iommu() -> DmaConfig {
    DmaConfig {
        iommu: true,
        ..DmaConfig::default()
    }
}

#[test]
fn try_alloc_is_false_exactly_when_the_rulebook_says() {
    let (s, nic, _) = system(DmaConfig::default());
    let mut st = IovaState::default();
    assert!(
        !s.iova_try_alloc(nic, &mut st, 0, 4096),
        "not using iommu-dma"
    );
    assert!(!st.use_iova());
    let (s, nic, _) = system(iommu());
    assert!(!s.iova_try_alloc(nic, &mut st, 0, 0), "size 0");
    assert!(
        !s.iova_try_alloc(nic, &mut st, 0, DMA_IOVA_USE_SWIOTLB | 4096),
        "size with bit 63"
    );
    let (s, nic, _) = system(DmaConfig {
        iommu: true,
        bus_dma_limit: 0x3fff,
        ..DmaConfig::default()
    });
    assert!(
        !s.iova_try_alloc(nic, &mut st, 0, 1 << 20),
        "no IOVA space below the limit"
    );
    let (s, nic, _) = system(iommu());
    assert!(s.iova_try_alloc(nic, &mut st, 0x1234, 0x3000));
    assert_eq!(
        st.addr & 0xfff,
        0x234,
        "phys only supplies the offset inside the granule"
    );
    assert_eq!(st.size(), 0x3000);
    assert!(st.use_iova());
}

#[test]
fn links_at_their_own_offsets_make_one_contiguous_region() {
    let (s, nic, _) = system(iommu());
    let f = s.fabric().clone();
    let mut st = IovaState::default();
    assert!(s.iova_try_alloc(nic, &mut st, 0, 0x3000));
    let (a, b) = (0x2_0000_0000u64, 0x3_0000_5000u64);
    s.iova_link(nic, &mut st, a, 0, 0x2000, Direction::Bidirectional, 0)
        .unwrap();
    s.iova_link(nic, &mut st, b, 0x2000, 0x1000, Direction::Bidirectional, 0)
        .unwrap();
    s.iova_sync(nic, &st, 0, 0x3000).unwrap();
    let data: Vec<u8> = (0..0x3000u32).map(|i| (i % 253) as u8).collect();
    f.dma_write(nic, DmaAddr(st.addr), &data).unwrap();
    let mut first = vec![0u8; 0x2000];
    let mut second = vec![0u8; 0x1000];
    f.ram_peek(PhysAddr(a), &mut first).unwrap();
    f.ram_peek(PhysAddr(b), &mut second).unwrap();
    assert_eq!(first, data[..0x2000]);
    assert_eq!(second, data[0x2000..]);
    let addr = st.addr;
    s.iova_destroy(nic, &mut st, 0x3000, Direction::Bidirectional, 0);
    assert!(!st.use_iova());
    assert!(
        f.dma_write(nic, DmaAddr(addr), b"x").is_err(),
        "destroyed: the device faults"
    );
}

#[test]
fn link_rules_and_errnos() {
    let (s, nic, gpu) = system(iommu());
    let mut st = IovaState::default();
    assert!(s.iova_try_alloc(nic, &mut st, 0, 0x4000));
    assert_eq!(
        s.iova_link(
            nic,
            &mut st,
            0x1_0000_0010,
            0x1000,
            0x100,
            Direction::ToDevice,
            0
        ),
        Err(Errno::EIO),
        "unaligned only at offset 0"
    );
    s.iova_link(
        nic,
        &mut st,
        0x1_0000_0000,
        0,
        0x1000,
        Direction::ToDevice,
        0,
    )
    .unwrap();
    assert_eq!(
        s.iova_link(
            nic,
            &mut st,
            0x1_0000_8000,
            0,
            0x1000,
            Direction::ToDevice,
            0
        ),
        Err(Errno::EEXIST),
        "linking over an existing link"
    );
    assert_eq!(
        s.iova_link(
            nic,
            &mut st,
            0x1_0000_8000,
            0x1800,
            0x1000,
            Direction::ToDevice,
            0
        ),
        Err(Errno::EINVAL),
        "a later link must start on a granule"
    );
    let bar = s.fabric().bar(gpu, 2).unwrap().cpu.unwrap().get();
    s.iova_link(
        nic,
        &mut st,
        bar,
        0x1000,
        0x1000,
        Direction::Bidirectional,
        attrs::MMIO,
    )
    .unwrap();
    s.iova_destroy(nic, &mut st, 0x2000, Direction::Bidirectional, 0);
    // MMIO that would need bouncing: EPERM.
    let (s, nic, gpu) = system(DmaConfig {
        iommu: true,
        untrusted: true,
        ..DmaConfig::default()
    });
    let bar = s.fabric().bar(gpu, 2).unwrap().cpu.unwrap().get();
    let mut st = IovaState::default();
    assert!(s.iova_try_alloc(nic, &mut st, 0, 0x2000));
    assert_eq!(
        s.iova_link(
            nic,
            &mut st,
            bar + 8,
            0,
            0x100,
            Direction::ToDevice,
            attrs::MMIO
        ),
        Err(Errno::EPERM)
    );
    // RAM instead is bounced, and the state says so.
    s.iova_link(
        nic,
        &mut st,
        0x1_0000_0008,
        0,
        0x100,
        Direction::ToDevice,
        0,
    )
    .unwrap();
    assert!(st.uses_swiotlb());
    assert_eq!(st.size(), 0x2000);
    s.iova_unlink(nic, &st, 0, 0x100, Direction::ToDevice, 0);
    assert_eq!(s.swiotlb_used_slots(), 0);
    s.iova_free(nic, &mut st);
}

#[test]
fn unlink_keeps_the_iova_and_destroy_frees_it() {
    let (s, nic, _) = system(iommu());
    let f = s.fabric().clone();
    let mut st = IovaState::default();
    assert!(s.iova_try_alloc(nic, &mut st, 0, 0x1000));
    let held = s.iova_allocated_pages(nic);
    s.iova_link(
        nic,
        &mut st,
        0x2_0000_0000,
        0,
        0x1000,
        Direction::FromDevice,
        0,
    )
    .unwrap();
    s.iova_sync(nic, &st, 0, 0x1000).unwrap();
    f.dma_write(nic, DmaAddr(st.addr), b"linked").unwrap();
    s.iova_unlink(nic, &st, 0, 0x1000, Direction::FromDevice, 0);
    assert!(
        f.dma_write(nic, DmaAddr(st.addr), b"gone").is_err(),
        "unlinked and synced: faults"
    );
    assert_eq!(s.iova_allocated_pages(nic), held, "the IOVA range is kept");
    s.iova_link(
        nic,
        &mut st,
        0x2_0000_1000,
        0,
        0x1000,
        Direction::FromDevice,
        0,
    )
    .unwrap();
    f.dma_write(nic, DmaAddr(st.addr), b"again").unwrap();
    s.iova_destroy(nic, &mut st, 0x1000, Direction::FromDevice, 0);
    assert!(!st.use_iova());
    assert!(s.debug_report().is_empty(), "{:?}", s.debug_report());
}

#[test]
fn an_iova_range_never_freed_is_a_leak() {
    let (s, nic, _) = system(iommu());
    let mut st = IovaState::default();
    assert!(s.iova_try_alloc(nic, &mut st, 0, 0x1000));
    let r = s.debug_report();
    assert!(
        matches!(&r[..], [DebugIssue::Leak(e)] if e.addr == st.addr && e.at.file().contains("tests/iova_api.rs")),
        "{r:?}"
    );
    s.iova_free(nic, &mut st);
    assert!(s.debug_report().is_empty());
}
