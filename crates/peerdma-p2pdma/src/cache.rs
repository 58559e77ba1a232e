//! The per-provider map-type cache (the kernel's `map_types` xarray).
//!
//! Keyed by `map_types_idx(client) = domain << 16 | bus << 8 | devfn`, written on every
//! computation of a map type for that client, **never invalidated** while the provider lives:
//! an ACS or topology change after the first lookup is not seen (the kernel behaves so).
//!
//! A four-level radix tree of 256-way nodes (domain high byte, domain low byte, bus, devfn)
//! whose interior slots are `OnceLock`s: a lookup is three acquire loads and one relaxed byte
//! load, with no lock — as cheap as the RCU-protected xarray load it models.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use peerdma_pci::Bdf;

use crate::maptype::MapType;

/// The cache key of a client (`map_types_idx`).
pub fn map_types_idx(client: Bdf) -> u32 {
    (u32::from(client.domain()) << 16) | u32::from(client.requester_id())
}

struct Node<T> {
    slots: Box<[OnceLock<Box<T>>; 256]>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            slots: Box::new(std::array::from_fn(|_| OnceLock::new())),
        }
    }
}

impl<T: Default> Node<T> {
    fn get(&self, i: u32) -> Option<&T> {
        self.slots[(i & 0xff) as usize].get().map(|b| &**b)
    }
    fn get_or_make(&self, i: u32) -> &T {
        self.slots[(i & 0xff) as usize].get_or_init(Box::default)
    }
}

struct Leaf {
    types: [AtomicU8; 256],
}

impl Default for Leaf {
    fn default() -> Self {
        Leaf {
            types: std::array::from_fn(|_| AtomicU8::new(MapType::Unknown as u8)),
        }
    }
}

/// Map types of clients, per provider device.
#[derive(Default)]
pub struct MapTypeCache {
    root: Node<Node<Node<Leaf>>>,
}

impl std::fmt::Debug for MapTypeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapTypeCache")
    }
}

impl MapTypeCache {
    /// An empty cache.
    pub fn new() -> MapTypeCache {
        MapTypeCache::default()
    }

    /// The cached type for a key, or `Unknown`.
    pub fn load(&self, idx: u32) -> MapType {
        self.root
            .get(idx >> 24)
            .and_then(|n| n.get(idx >> 16))
            .and_then(|n| n.get(idx >> 8))
            .map_or(MapType::Unknown, |leaf| {
                MapType::from_u8(leaf.types[(idx & 0xff) as usize].load(Ordering::Relaxed))
                    .unwrap_or(MapType::Unknown)
            })
    }

    /// Stores a type for a key (overwriting).
    pub fn store(&self, idx: u32, t: MapType) {
        let leaf = self
            .root
            .get_or_make(idx >> 24)
            .get_or_make(idx >> 16)
            .get_or_make(idx >> 8);
        leaf.types[(idx & 0xff) as usize].store(t as u8, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_domain_bus_devfn() {
        let b: Bdf = "1234:56:07.1".parse().unwrap();
        assert_eq!(map_types_idx(b), 0x1234_5639);
    }

    #[test]
    fn store_and_load() {
        let c = MapTypeCache::new();
        assert_eq!(c.load(0x0000_0300), MapType::Unknown);
        c.store(0x0000_0300, MapType::BusAddr);
        c.store(0xffff_ffff, MapType::NotSupported);
        assert_eq!(c.load(0x0000_0300), MapType::BusAddr);
        assert_eq!(c.load(0x0000_0301), MapType::Unknown);
        assert_eq!(c.load(0xffff_ffff), MapType::NotSupported);
        c.store(0x0000_0300, MapType::ThruHostBridge);
        assert_eq!(c.load(0x0000_0300), MapType::ThruHostBridge);
    }

    #[test]
    fn concurrent_stores_land() {
        let c = std::sync::Arc::new(MapTypeCache::new());
        let hs: Vec<_> = (0..4u32)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..2000u32 {
                        c.store((i * 4 + t) << 4, MapType::BusAddr);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        for i in 0..8000u32 {
            assert_eq!(c.load(i << 4), MapType::BusAddr);
        }
    }
}
