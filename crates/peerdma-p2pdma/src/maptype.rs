//! `enum pci_p2pdma_map_type`: how a peer-to-peer transfer must be mapped.

use std::fmt;

/// The kernel's map types, with the kernel's numeric values (they are what the per-provider
/// cache stores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum MapType {
    /// Not computed yet (a cache miss; never the answer of a lookup).
    Unknown = 0,
    /// The memory is not P2PDMA memory.
    None = 1,
    /// The path crosses a host bridge that does not forward peer-to-peer: mapping must fail.
    NotSupported = 2,
    /// Switch-local: program the device with the PCI bus address (`paddr + bus_offset`); no
    /// IOMMU translation.
    BusAddr = 3,
    /// Through an allowed host bridge: use the normal DMA mapping (dma-direct or IOMMU).
    ThruHostBridge = 4,
}

impl MapType {
    /// From the numeric value (`None` for values the kernel does not define).
    pub fn from_u8(v: u8) -> Option<MapType> {
        Some(match v {
            0 => MapType::Unknown,
            1 => MapType::None,
            2 => MapType::NotSupported,
            3 => MapType::BusAddr,
            4 => MapType::ThruHostBridge,
            _ => return None,
        })
    }

    /// `bus_addr`, `thru_host_bridge`, `not_supported`, `none`, `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            MapType::Unknown => "unknown",
            MapType::None => "none",
            MapType::NotSupported => "not_supported",
            MapType::BusAddr => "bus_addr",
            MapType::ThruHostBridge => "thru_host_bridge",
        }
    }

    /// The kernel's name (`PCI_P2PDMA_MAP_BUS_ADDR`).
    pub fn kernel_name(self) -> &'static str {
        match self {
            MapType::Unknown => "PCI_P2PDMA_MAP_UNKNOWN",
            MapType::None => "PCI_P2PDMA_MAP_NONE",
            MapType::NotSupported => "PCI_P2PDMA_MAP_NOT_SUPPORTED",
            MapType::BusAddr => "PCI_P2PDMA_MAP_BUS_ADDR",
            MapType::ThruHostBridge => "PCI_P2PDMA_MAP_THRU_HOST_BRIDGE",
        }
    }
}

impl fmt::Display for MapType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_the_kernels() {
        assert_eq!(MapType::Unknown as u8, 0);
        assert_eq!(MapType::None as u8, 1);
        assert_eq!(MapType::NotSupported as u8, 2);
        assert_eq!(MapType::BusAddr as u8, 3);
        assert_eq!(MapType::ThruHostBridge as u8, 4);
        for v in 0..5 {
            assert_eq!(MapType::from_u8(v).unwrap() as u8, v);
        }
        assert_eq!(MapType::from_u8(5), None);
    }
}
