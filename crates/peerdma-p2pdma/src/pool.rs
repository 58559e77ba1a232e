//! The struct-page P2P memory pool (`pci_p2pdma_add_resource`, `pci_alloc_p2pmem`,
//! `pci_free_p2pmem`, `pci_p2pmem_virt_to_bus`, `pci_p2pmem_alloc_sgl`).
//!
//! A device's driver adds ranges of a memory BAR; other drivers allocate page-granular pieces
//! (first fit) and program devices with their bus addresses. The pool records each page
//! range's bus address, as the kernel's pool does (its "phys" is the bus address); the
//! "virtual" address of an allocation here is its CPU physical address.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use peerdma_pci::memory::PAGE_SIZE;
use peerdma_pci::sync;
use peerdma_pci::{Bdf, BusAddr, PhysAddr};

use crate::provider::{Binding, P2pDma, P2pError};

/// A piece of P2P memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P2pMem {
    /// Its CPU physical address (what the kernel's pool calls the virtual address).
    pub cpu: PhysAddr,
    /// Its PCI bus address.
    pub bus: BusAddr,
    /// Bytes asked for.
    pub len: u64,
}

/// One entry of a P2P scatterlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgEntry {
    /// The memory.
    pub mem: P2pMem,
}

#[derive(Debug)]
struct Chunk {
    cpu: u64,
    bus: u64,
    pages: u64,
    /// Free extents: first page → page count.
    free: BTreeMap<u64, u64>,
}

/// The pool of one device.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    chunks: Vec<Chunk>,
}

impl Pool {
    fn add(&mut self, cpu: u64, bus: u64, size: u64) {
        let pages = size / PAGE_SIZE;
        let mut free = BTreeMap::new();
        if pages > 0 {
            free.insert(0, pages);
        }
        self.chunks.push(Chunk {
            cpu,
            bus,
            pages,
            free,
        });
    }

    fn alloc(&mut self, size: u64) -> Option<(u64, u64)> {
        let want = size.div_ceil(PAGE_SIZE).max(1);
        for c in &mut self.chunks {
            let hit = c
                .free
                .iter()
                .find(|&(_, &n)| n >= want)
                .map(|(&s, &n)| (s, n));
            if let Some((start, n)) = hit {
                c.free.remove(&start);
                if n > want {
                    c.free.insert(start + want, n - want);
                }
                return Some((c.cpu + start * PAGE_SIZE, c.bus + start * PAGE_SIZE));
            }
        }
        None
    }

    fn free(&mut self, cpu: u64, size: u64) -> bool {
        let n = size.div_ceil(PAGE_SIZE).max(1);
        for c in &mut self.chunks {
            let Some(off) = cpu.checked_sub(c.cpu) else {
                continue;
            };
            let first = off / PAGE_SIZE;
            if off % PAGE_SIZE != 0 || first + n > c.pages {
                continue;
            }
            if c.free
                .range(..first + n)
                .next_back()
                .is_some_and(|(&s, &len)| s + len > first)
            {
                return false; // (part of it) already free
            }
            let mut start = first;
            let mut len = n;
            if let Some((&s, &l)) = c.free.range(..first).next_back() {
                if s + l == first {
                    c.free.remove(&s);
                    start = s;
                    len += l;
                }
            }
            if let Some(&l) = c.free.get(&(first + n)) {
                c.free.remove(&(first + n));
                len += l;
            }
            c.free.insert(start, len);
            return true;
        }
        false
    }

    fn bus_of(&self, cpu: u64) -> Option<u64> {
        self.chunks.iter().find_map(|c| {
            let off = cpu.checked_sub(c.cpu)?;
            (off < c.pages * PAGE_SIZE).then(|| c.bus + off)
        })
    }

    /// Bytes in the pool and bytes free.
    fn sizes(&self) -> (u64, u64) {
        let total = self.chunks.iter().map(|c| c.pages).sum::<u64>() * PAGE_SIZE;
        let free = self
            .chunks
            .iter()
            .flat_map(|c| c.free.values())
            .sum::<u64>()
            * PAGE_SIZE;
        (total, free)
    }
}

impl Binding {
    /// `pci_p2pdma_add_resource(pdev, bar, size, offset)`: adds `[offset, offset + size)` of a
    /// memory BAR to the device's pool (`size` 0 = the rest of the BAR). `EINVAL` for a
    /// non-memory BAR, `offset` at or past the BAR's end, or a range past it. Initialises
    /// P2PDMA if needed.
    pub fn add_resource(&self, bar: u8, size: u64, offset: u64) -> Result<(), P2pError> {
        let bdf = self.bdf();
        let bad = |why: &str| P2pError::BadResource {
            bdf,
            bar,
            why: why.to_string(),
        };
        let fabric = self.p2pdma().fabric();
        let state = fabric
            .bar(bdf, bar)
            .ok()
            .filter(|b| b.bar.kind.is_mem())
            .ok_or_else(|| bad("not a memory BAR"))?;
        let len = state.bar.size;
        if offset >= len {
            return Err(bad("offset is at or past the end of the BAR"));
        }
        let size = if size == 0 { len - offset } else { size };
        if size.checked_add(offset).is_none_or(|end| end > len) {
            return Err(bad("the range runs past the end of the BAR"));
        }
        self.init()?;
        let dev = self
            .p2pdma()
            .state(bdf)
            .ok_or(P2pError::NotInitialised(bdf))?;
        let cpu = state.cpu.map_or(state.bus.get(), PhysAddr::get) + offset;
        let bus = state.bus.get() + offset;
        sync::lock(&dev.pool)
            .get_or_insert_with(Pool::default)
            .add(cpu, bus, size);
        self.p2pdma().info(
            bdf.to_string(),
            format!(
                "added peer-to-peer DMA memory {:#x}-{:#x}",
                cpu,
                cpu + size - 1
            ),
        );
        Ok(())
    }
}

impl P2pDma {
    /// `pci_alloc_p2pmem(pdev, size)`: page-granular, first fit; `None` when the device has no
    /// P2PDMA state or pool, or no room.
    pub fn alloc_p2pmem(&self, bdf: Bdf, size: u64) -> Option<P2pMem> {
        let dev = self.state(bdf)?;
        if !dev.live.load(Ordering::Acquire) {
            return None;
        }
        let (cpu, bus) = sync::lock(&dev.pool).as_mut()?.alloc(size)?;
        Some(P2pMem {
            cpu: PhysAddr(cpu),
            bus: BusAddr(bus),
            len: size,
        })
    }

    /// `pci_free_p2pmem`: gives an allocation back. Returns false if it was not allocated
    /// from this device's pool (or was already freed).
    pub fn free_p2pmem(&self, bdf: Bdf, mem: &P2pMem) -> bool {
        self.state(bdf).is_some_and(|d| {
            sync::lock(&d.pool)
                .as_mut()
                .is_some_and(|p| p.free(mem.cpu.get(), mem.len))
        })
    }

    /// `pci_p2pmem_virt_to_bus`: the bus address of pool memory; 0 for no address or a device
    /// without P2PDMA state.
    pub fn p2pmem_virt_to_bus(&self, bdf: Bdf, addr: Option<PhysAddr>) -> BusAddr {
        let (Some(addr), Some(dev)) = (addr, self.state(bdf)) else {
            return BusAddr(0);
        };
        BusAddr(
            sync::lock(&dev.pool)
                .as_ref()
                .and_then(|p| p.bus_of(addr.get()))
                .unwrap_or(0),
        )
    }

    /// `pci_p2pmem_alloc_sgl`: a one-entry list over a fresh allocation of `len` bytes.
    pub fn p2pmem_alloc_sgl(&self, bdf: Bdf, len: u32) -> Option<Vec<SgEntry>> {
        self.alloc_p2pmem(bdf, u64::from(len))
            .map(|mem| vec![SgEntry { mem }])
    }

    /// `pci_p2pmem_free_sgl`: frees every entry.
    pub fn p2pmem_free_sgl(&self, bdf: Bdf, sgl: Vec<SgEntry>) {
        for e in sgl {
            self.free_p2pmem(bdf, &e.mem);
        }
    }

    /// `pci_has_p2pmem` (Linux 7.2): P2PDMA state with a pool, published.
    pub fn has_p2pmem(&self, bdf: Bdf) -> bool {
        self.state(bdf)
            .is_some_and(|d| d.published.load(Ordering::Acquire) && sync::lock(&d.pool).is_some())
    }

    /// Bytes in the device's pool and bytes free (the sysfs `p2pmem/size` and `available`).
    pub fn p2pmem_sizes(&self, bdf: Bdf) -> Option<(u64, u64)> {
        let d = self.state(bdf)?;
        sync::lock(&d.pool).as_ref().map(Pool::sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_and_coalescing() {
        let mut p = Pool::default();
        p.add(0x1000_0000, 0x8000_0000, 16 * PAGE_SIZE);
        let a = p.alloc(1).unwrap();
        let b = p.alloc(3 * PAGE_SIZE).unwrap();
        let c = p.alloc(PAGE_SIZE + 1).unwrap();
        assert_eq!(a, (0x1000_0000, 0x8000_0000));
        assert_eq!(b.0, 0x1000_0000 + PAGE_SIZE);
        assert_eq!(c.0, 0x1000_0000 + 4 * PAGE_SIZE);
        assert_eq!(p.sizes(), (16 * PAGE_SIZE, 10 * PAGE_SIZE));
        assert!(p.free(b.0, 3 * PAGE_SIZE));
        assert!(!p.free(b.0, 3 * PAGE_SIZE), "double free refused");
        // A 3-page hole is reused first.
        assert_eq!(p.alloc(2 * PAGE_SIZE).unwrap().0, b.0);
        assert!(p.alloc(11 * PAGE_SIZE).is_none());
        assert!(p.free(a.0, 1));
        assert!(p.free(b.0, 2 * PAGE_SIZE));
        assert!(p.free(c.0, PAGE_SIZE + 1));
        assert_eq!(p.sizes().1, 16 * PAGE_SIZE);
        assert_eq!(
            p.alloc(16 * PAGE_SIZE).unwrap().0,
            0x1000_0000,
            "all coalesced back"
        );
        assert_eq!(p.bus_of(0x1000_0000 + 5), Some(0x8000_0005));
        assert_eq!(p.bus_of(0x2000_0000), None);
    }
}
