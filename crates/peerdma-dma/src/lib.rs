//! # peerdma-dma — DMA mapping on physical addresses
//!
//! | module | kernel | what |
//! |---|---|---|
//! | [`iommu`] | drivers/iommu (hardware) | domains, page tables, IOTLB, faults; the fabric's translator |
//! | [`iova`] | drivers/iommu/iova.c | the IOVA allocator: top-down, size-aligned, range caches |
//! | [`iova_api`] | `dma_iova_*` in dma-iommu.c | one IOVA range, linked range by range, synced once |
//! | [`sg`] | `dma_map_sg` with P2P pages | bus-address segments skip the IOMMU; not-supported ones fail the list |
//! | [`mapping`] | kernel/dma/mapping.c, direct.h, swiotlb.c, drivers/iommu/dma-iommu.c | `map_phys`/`unmap_phys`, dma-direct, swiotlb, iommu-dma, syncs, DMA debug |

pub mod iommu;
pub mod iova;
pub mod iova_api;
pub mod mapping;
pub mod sg;

pub use mapping::{Direction, DmaConfig, DmaSystem, MapError, Swiotlb, attrs};
