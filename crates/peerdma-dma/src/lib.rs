//! # peerdma-dma — DMA mapping on physical addresses
//!
//! | module | kernel | what |
//! |---|---|---|
//! | [`iommu`] | drivers/iommu (hardware) | domains, page tables, IOTLB, faults; the fabric's translator |
//! | [`iova`] | drivers/iommu/iova.c | the IOVA allocator: top-down, size-aligned, range caches |

pub mod iommu;
pub mod iova;
