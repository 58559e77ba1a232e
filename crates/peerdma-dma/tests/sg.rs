//! Scatter-gather over RAM and P2P pool memory, and the IOTLB's staleness seen from a device.

#![allow(clippy::many_single_char_names)]

use std::sync::Arc;

use peerdma_dma::iommu::prot;
use peerdma_dma::sg::{Memory, SgEntry};
use peerdma_dma::{Direction, DmaConfig, DmaSystem};
use peerdma_p2pdma::P2pDma;
use peerdma_pci::{DmaAddr, Errno, PhysAddr, examples, file, regs};

#[test]
fn bus_address_segments_skip_the_iommu_and_host_bridge_ones_do_not() {
    let f = Arc::new(file::load_str(examples::GPU_NIC_SWITCH, "box").unwrap());
    let (nic, gpu) = (f.lookup("nic0").unwrap(), f.lookup("gpu0").unwrap());
    let s = DmaSystem::new(f.clone(), true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let p2p = P2pDma::new(f.clone());
    let b = p2p.bind(gpu).unwrap();
    b.add_resource(2, 1 << 20, 0).unwrap();
    let prov = b.provider(2).unwrap().unwrap();
    let mem = p2p.alloc_p2pmem(gpu, 8192).unwrap();
    let mut sgl = vec![
        SgEntry::new(Memory::Ram, PhysAddr(0x2_0000_0000), 4096),
        SgEntry::new(Memory::P2p(prov.clone()), mem.cpu, 8192),
    ];
    assert_eq!(
        s.map_sg(&p2p, nic, &mut sgl, Direction::Bidirectional, 0),
        Ok(2)
    );
    assert!(!sgl[0].bus_address);
    assert!(sgl[1].bus_address);
    assert_eq!(
        sgl[1].dma_address.get(),
        mem.bus.get(),
        "paddr + bus_offset"
    );
    let d = s.domain_of(nic).unwrap();
    assert_eq!(
        s.iommu().unwrap().entries(d),
        1,
        "only the RAM segment went through the IOMMU"
    );
    // The device reaches both: RAM by IOVA, the GPU's memory by bus address through the switch.
    f.dma_write(nic, sgl[0].dma_address, b"ram").unwrap();
    let t = f.dma_write(nic, sgl[1].dma_address, b"p2p").unwrap();
    assert!(!t.via_root_complex());
    s.unmap_sg(nic, &mut sgl, Direction::Bidirectional, 0);
    assert!(!sgl[1].bus_address);
    assert_eq!(s.iommu().unwrap().entries(d), 0);
    assert!(s.debug_report().is_empty(), "{:?}", s.debug_report());

    // With ACS redirect on the NIC's port the P2P segment goes through the host bridge: it is
    // mapped (MMIO) like any other.
    f.set_acs_ctrl("0000:02:01.0".parse().unwrap(), regs::ACS_RR)
        .unwrap();
    let p2p2 = P2pDma::new(f.clone());
    let b2 = p2p2.bind(gpu).unwrap();
    b2.add_resource(2, 1 << 20, 0).unwrap();
    let prov2 = b2.provider(2).unwrap().unwrap();
    let mem2 = p2p2.alloc_p2pmem(gpu, 4096).unwrap();
    let mut sgl = vec![SgEntry::new(Memory::P2p(prov2), mem2.cpu, 4096)];
    s.map_sg(&p2p2, nic, &mut sgl, Direction::Bidirectional, 0)
        .unwrap();
    assert!(!sgl[0].bus_address);
    assert_ne!(
        s.iommu()
            .unwrap()
            .lookup(d, sgl[0].dma_address.get())
            .unwrap()
            .1
            .prot
            & prot::MMIO,
        0
    );
    f.dma_write(nic, sgl[0].dma_address, b"via hb").unwrap();
    s.unmap_sg(nic, &mut sgl, Direction::Bidirectional, 0);
    drop((b, b2));
}

#[test]
fn a_not_supported_segment_fails_the_whole_list_and_undoes_the_rest() {
    let f = Arc::new(file::load_str(examples::ARM_OFFSET, "arm").unwrap());
    let (acc, nvme) = (f.lookup("acc0").unwrap(), f.lookup("nvme0").unwrap());
    let s = DmaSystem::new(f.clone(), true);
    s.configure(
        nvme,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let p2p = P2pDma::new(f.clone());
    let b = p2p.bind(acc).unwrap();
    b.add_resource(2, 1 << 20, 0).unwrap();
    let prov = b.provider(2).unwrap().unwrap();
    let mem = p2p.alloc_p2pmem(acc, 4096).unwrap();
    let mut sgl = vec![
        SgEntry::new(Memory::Ram, PhysAddr(0x9000_0000), 4096),
        SgEntry::new(Memory::P2p(prov), mem.cpu, 4096),
    ];
    assert_eq!(
        s.map_sg(&p2p, nvme, &mut sgl, Direction::ToDevice, 0),
        Err(Errno::EREMOTEIO)
    );
    assert_eq!(
        s.iommu().unwrap().entries(s.domain_of(nvme).unwrap()),
        0,
        "the RAM segment was unmapped again"
    );
    assert!(s.debug_report().is_empty(), "{:?}", s.debug_report());
}

#[test]
fn without_an_iotlb_sync_a_device_still_reaches_an_unmapped_page() {
    let f = Arc::new(file::load_str(examples::GPU_NIC_SWITCH, "box").unwrap());
    let nic = f.lookup("nic0").unwrap();
    let s = DmaSystem::new(f.clone(), true);
    s.configure(
        nic,
        DmaConfig {
            iommu: true,
            ..DmaConfig::default()
        },
    )
    .unwrap();
    let m = s.iommu().unwrap();
    let d = s.domain_of(nic).unwrap();
    m.map(
        d,
        0x10_0000,
        0x2_0000_0000,
        0x1000,
        prot::READ | prot::WRITE,
    )
    .unwrap();
    f.dma_write(nic, DmaAddr(0x10_0000), b"cached").unwrap(); // fills the IOTLB
    m.unmap(d, 0x10_0000, 0x1000);
    f.dma_write(nic, DmaAddr(0x10_0008), b"stale").unwrap();
    let mut got = [0u8; 5];
    f.ram_peek(PhysAddr(0x2_0000_0008), &mut got).unwrap();
    assert_eq!(&got, b"stale", "the stale IOTLB entry still translated");
    m.sync_range(d, 0x10_0000, 0x1000);
    assert!(f.dma_write(nic, DmaAddr(0x10_0000), b"x").is_err());
}
