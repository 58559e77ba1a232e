//! `dma_map_sg` / `dma_unmap_sg` over memory that may be P2P pool memory (struct-page P2P
//! memory from a provider's `pci_p2pdma_add_resource` pool).
//!
//! For each segment: ordinary RAM is mapped as `map_phys` maps it; a P2P page asks
//! `pci_p2pdma_map_type(provider, dev)` (remembering the last provider, as
//! `pci_p2pdma_state` does):
//! - `BusAddr`: `dma_address = paddr + bus_offset`, the segment is marked
//!   `SG_DMA_BUS_ADDRESS`, and the IOMMU never sees it (nor does unmap);
//! - `ThruHostBridge`: mapped normally (`map_phys` with `DMA_ATTR_MMIO`, since the memory is
//!   a BAR);
//! - anything else: the whole list fails with −EREMOTEIO, and what was mapped is undone.

use peerdma_p2pdma::{Device, MapType, P2pDma, Provider};
use peerdma_pci::{Bdf, DmaAddr, Errno, PhysAddr};

use crate::mapping::{Direction, DmaSystem, attrs};

/// The memory behind a segment.
#[derive(Debug, Clone)]
pub enum Memory {
    /// System RAM.
    Ram,
    /// P2P memory of this provider (a BAR).
    P2p(Provider),
}

/// One scatterlist entry.
#[derive(Debug, Clone)]
pub struct SgEntry {
    /// What the CPU side points at.
    pub memory: Memory,
    /// CPU physical address.
    pub phys: PhysAddr,
    /// Bytes.
    pub length: u64,
    /// DMA address after mapping.
    pub dma_address: DmaAddr,
    /// DMA length after mapping.
    pub dma_length: u64,
    /// `SG_DMA_BUS_ADDRESS`: a P2P bus address the IOMMU must not unmap.
    pub bus_address: bool,
}

impl SgEntry {
    /// An unmapped entry.
    pub fn new(memory: Memory, phys: PhysAddr, length: u64) -> SgEntry {
        SgEntry {
            memory,
            phys,
            length,
            dma_address: DmaAddr(0),
            dma_length: 0,
            bus_address: false,
        }
    }
}

impl DmaSystem {
    /// `dma_map_sg`: maps every entry; returns the number of DMA entries (here one per entry).
    pub fn map_sg(
        &self,
        p2p: &P2pDma,
        bdf: Bdf,
        sgl: &mut [SgEntry],
        dir: Direction,
        a: u32,
    ) -> Result<usize, Errno> {
        let mut last: Option<(Provider, MapType)> = None;
        for i in 0..sgl.len() {
            let e = &sgl[i];
            let r = match &e.memory {
                Memory::Ram => self
                    .map_phys(bdf, e.phys, e.length, dir, a)
                    .map(|d| (d, false))
                    .map_err(|_| Errno::ENOMEM),
                Memory::P2p(prov) => {
                    let t = match &last {
                        Some((p, t)) if p.same_as(prov) => *t,
                        _ => {
                            let t = p2p.map_type(prov, &Device::Pci(bdf));
                            last = Some((prov.clone(), t));
                            t
                        }
                    };
                    match t {
                        MapType::BusAddr => Ok((DmaAddr(prov.bus_addr_map(e.phys).get()), true)),
                        MapType::ThruHostBridge => self
                            .map_phys(bdf, e.phys, e.length, dir, a | attrs::MMIO)
                            .map(|d| (d, false))
                            .map_err(|_| Errno::ENOMEM),
                        _ => Err(Errno::EREMOTEIO),
                    }
                }
            };
            match r {
                Ok((d, bus)) => {
                    let e = &mut sgl[i];
                    e.dma_address = d;
                    e.dma_length = e.length;
                    e.bus_address = bus;
                }
                Err(errno) => {
                    self.unmap_sg(bdf, &mut sgl[..i], dir, a);
                    return Err(errno);
                }
            }
        }
        Ok(sgl.len())
    }

    /// `dma_unmap_sg`: undoes every mapped entry; bus-address entries are only unmarked.
    pub fn unmap_sg(&self, bdf: Bdf, sgl: &mut [SgEntry], dir: Direction, a: u32) {
        for e in sgl {
            if e.dma_length == 0 {
                continue;
            }
            if e.bus_address {
                e.bus_address = false;
            } else {
                let mmio = if matches!(e.memory, Memory::P2p(_)) {
                    attrs::MMIO
                } else {
                    0
                };
                self.unmap_phys(bdf, e.dma_address, e.length, dir, a | mmio);
            }
            e.dma_length = 0;
        }
    }
}
