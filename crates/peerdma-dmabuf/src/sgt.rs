//! DMA-only scatter tables and the helper that builds them from a list of physical ranges of
//! a PCI BAR (`dma_buf_phys_vec_to_sgt` / `dma_buf_free_sgt`, drivers/dma-buf/dma-buf-mapping.c).
//!
//! The p2pdma map type of (provider, importer) picks the path:
//!
//! | map type | what the importer is given |
//! |---|---|
//! | `bus_addr` | PCI bus addresses (`paddr + bus_offset`); nothing is mapped |
//! | `thru_host_bridge`, IOVA allocated | one contiguous IOVA range, every physical range linked at its own offset, synced once |
//! | `thru_host_bridge`, no IOVA | one `map_phys(DMA_ATTR_MMIO)` per range (dma-direct, or iommu-dma when the IOVA allocation failed) |
//! | anything else | `EINVAL` |
//!
//! Tables carry DMA addresses only (there is no CPU list: `orig_nents` is 0), cut into entries
//! of at most [`MAX_SG_ENT_SZ`] bytes so every boundary stays page aligned. Every failure
//! unwinds exactly what was done before it — see docs/divergences.md for where this differs
//! from the kernel.

use peerdma_dma::iova_api::IovaState;
use peerdma_dma::{Direction, DmaSystem, attrs};
use peerdma_p2pdma::{Device, MapType, P2pDma, Provider};
use peerdma_pci::sync::Arc;
use peerdma_pci::{Bdf, DmaAddr, Errno, PhysAddr};

use crate::buf::Attachment;
use crate::resv::ResvGuard;

/// Largest entry: the page-aligned `u32` maximum (`ALIGN_DOWN(UINT_MAX, PAGE_SIZE)`).
pub const MAX_SG_ENT_SZ: u64 = (u32::MAX as u64) & !0xfff;

/// One physical range of the exported memory (`struct phys_vec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysVec {
    /// CPU physical address of the first byte.
    pub paddr: PhysAddr,
    /// Length in bytes.
    pub len: u64,
}

/// One DMA entry of a table (`sg_dma_address`, `sg_dma_len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgDma {
    /// Address the importing device uses.
    pub addr: DmaAddr,
    /// Length in bytes.
    pub len: u32,
}

/// How a table's addresses were obtained (and so how to undo them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SgKind {
    /// Built by an exporter itself; nothing to undo here.
    Exporter,
    /// PCI bus addresses; nothing mapped.
    BusAddr,
    /// One IOVA range.
    Iova,
    /// One DMA mapping per physical range.
    PerRange,
}

#[derive(Debug)]
enum Backing {
    Exporter,
    Bus,
    Iova {
        dev: Bdf,
        state: IovaState,
        mapped: u64,
    },
    PerRange {
        dev: Bdf,
        maps: Vec<(DmaAddr, u64)>,
    },
}

/// A DMA-only scatter table (`struct sg_table` with `orig_nents == 0`).
///
/// A table made by [`phys_vec_to_sgt`] holds DMA mappings; give it back to [`free_sgt`]
/// (dropping it leaks them, which DMA debug reports).
#[derive(Debug)]
#[must_use = "a mapped table must be given back to free_sgt"]
pub struct SgTable {
    entries: Vec<SgDma>,
    size: u64,
    backing: Backing,
}

impl SgTable {
    /// A table an exporter filled itself. Entries longer than `u32::MAX` are refused.
    pub fn from_ranges(ranges: &[(DmaAddr, u64)]) -> Result<SgTable, Errno> {
        let mut entries = Vec::new();
        let mut size = 0u64;
        for &(a, l) in ranges {
            let l32 = u32::try_from(l).map_err(|_| Errno::EINVAL)?;
            size = size.checked_add(l).ok_or(Errno::EINVAL)?;
            entries.push(SgDma { addr: a, len: l32 });
        }
        Ok(SgTable {
            entries,
            size,
            backing: Backing::Exporter,
        })
    }

    /// The DMA entries (`for_each_sgtable_dma_sg`).
    pub fn entries(&self) -> &[SgDma] {
        &self.entries
    }
    /// `nents`: DMA entries.
    pub fn nents(&self) -> usize {
        self.entries.len()
    }
    /// `orig_nents`: CPU entries — always 0 for tables built here.
    pub fn orig_nents(&self) -> usize {
        match self.backing {
            Backing::Exporter => self.entries.len(),
            _ => 0,
        }
    }
    /// Bytes described.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// How the addresses were obtained.
    pub fn kind(&self) -> SgKind {
        match self.backing {
            Backing::Exporter => SgKind::Exporter,
            Backing::Bus => SgKind::BusAddr,
            Backing::Iova { .. } => SgKind::Iova,
            Backing::PerRange { .. } => SgKind::PerRange,
        }
    }
    /// The DMA address of byte `off` of the buffer (walking the entries), if inside it.
    pub fn dma_addr_of(&self, off: u64) -> Option<DmaAddr> {
        let mut at = 0u64;
        for e in &self.entries {
            let l = u64::from(e.len);
            if off < at + l {
                return Some(DmaAddr(e.addr.get() + (off - at)));
            }
            at += l;
        }
        None
    }
}

/// What [`phys_vec_to_sgt`] needs of the machine: the DMA layer and the P2PDMA subsystem.
#[derive(Debug, Clone)]
pub struct DmaEnv {
    /// DMA mapping.
    pub dma: Arc<DmaSystem>,
    /// P2PDMA (for the map type).
    pub p2p: Arc<P2pDma>,
}

/// A step of [`phys_vec_to_sgt`] that can fail (for fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Allocating the table wrapper.
    AllocWrapper,
    /// Allocating the IOVA state.
    AllocState,
    /// `dma_iova_try_alloc` (failure means the per-range fallback, not an error).
    IovaAlloc,
    /// Allocating the entries.
    AllocTable,
    /// `dma_iova_link` of range *i*.
    Link(usize),
    /// `dma_iova_sync`.
    Sync,
    /// `dma_map_phys` of range *i*.
    MapPhys(usize),
}

/// A fault-injection plan: fail the failable steps with the given numbers (counting from 0).
#[derive(Debug, Clone, Default)]
pub struct Inject {
    fail: Vec<usize>,
    count: usize,
    hits: Vec<Step>,
}

impl Inject {
    /// Never fail.
    pub fn none() -> Inject {
        Inject::default()
    }
    /// Fail step number `n`.
    pub fn at(n: usize) -> Inject {
        Inject::at_all(&[n])
    }
    /// Fail every step whose number is in `ns`.
    pub fn at_all(ns: &[usize]) -> Inject {
        Inject {
            fail: ns.to_vec(),
            ..Inject::default()
        }
    }
    /// Failable steps passed so far.
    pub fn steps(&self) -> usize {
        self.count
    }
    /// The last step that was failed, if the plan fired.
    pub fn fired(&self) -> Option<Step> {
        self.hits.last().copied()
    }
    /// Every step that was failed.
    pub fn hits(&self) -> &[Step] {
        &self.hits
    }
    #[inline]
    fn fail(&mut self, s: Step) -> bool {
        let n = self.count;
        self.count += 1;
        if !self.fail.is_empty() && self.fail.contains(&n) {
            self.hits.push(s);
            true
        } else {
            false
        }
    }
}

#[inline]
fn push_chunks(v: &mut Vec<SgDma>, mut addr: u64, mut len: u64) {
    while len > 0 {
        let l = len.min(MAX_SG_ENT_SZ);
        // `l` ≤ MAX_SG_ENT_SZ < 2^32.
        #[allow(clippy::cast_possible_truncation)]
        v.push(SgDma {
            addr: DmaAddr(addr),
            len: l as u32,
        });
        addr = addr.wrapping_add(l);
        len -= l;
    }
}

fn chunks(len: u64) -> u64 {
    len.div_ceil(MAX_SG_ENT_SZ)
}

/// `dma_buf_phys_vec_to_sgt(attach, provider, phys_vec, nr_ranges, size, dir)`.
///
/// Bad input — no provider, no ranges, an empty or wrapping range, lengths that do not add up
/// to `size`, more entries than a `u32` counts — is `EINVAL` before anything is done; an
/// importer the provider cannot reach (`not_supported`) is `EINVAL`; allocation and mapping
/// failures are `ENOMEM` (or the IOMMU's errno for a link), with everything undone.
pub fn phys_vec_to_sgt(
    env: &DmaEnv,
    a: &Attachment,
    provider: Option<&Provider>,
    ranges: &[PhysVec],
    size: u64,
    dir: Direction,
    g: &ResvGuard<'_>,
) -> Result<SgTable, Errno> {
    phys_vec_to_sgt_inject(env, a, provider, ranges, size, dir, g, &mut Inject::none())
}

/// [`phys_vec_to_sgt`] with a fault-injection plan.
#[allow(clippy::too_many_arguments)]
pub fn phys_vec_to_sgt_inject(
    env: &DmaEnv,
    a: &Attachment,
    provider: Option<&Provider>,
    ranges: &[PhysVec],
    size: u64,
    dir: Direction,
    g: &ResvGuard<'_>,
    inj: &mut Inject,
) -> Result<SgTable, Errno> {
    a.check_locked(g)?;
    let Some(provider) = provider else {
        tracing::warn!(target: "peerdma::dmabuf", "phys_vec_to_sgt without a provider");
        return Err(Errno::EINVAL);
    };
    let mut total = 0u64;
    let mut range_chunks = 0u64;
    for r in ranges {
        if r.len == 0 || r.paddr.get().checked_add(r.len - 1).is_none() {
            return Err(Errno::EINVAL);
        }
        total = total.checked_add(r.len).ok_or(Errno::EINVAL)?;
        range_chunks += if r.len <= MAX_SG_ENT_SZ {
            1
        } else {
            chunks(r.len)
        };
    }
    if ranges.is_empty() || total != size {
        return Err(Errno::EINVAL);
    }
    if inj.fail(Step::AllocWrapper) {
        return Err(Errno::ENOMEM);
    }
    let dev = a.dev;
    let mut state = match env.p2p.map_type(provider, &Device::Pci(dev)) {
        MapType::BusAddr => None,
        MapType::ThruHostBridge => {
            if inj.fail(Step::AllocState) {
                return Err(Errno::ENOMEM);
            }
            let mut s = IovaState::default();
            if !inj.fail(Step::IovaAlloc) {
                env.dma.iova_try_alloc(dev, &mut s, 0, size);
            }
            Some(s)
        }
        _ => return Err(Errno::EINVAL),
    };
    let use_iova = state.is_some_and(|s| s.use_iova());
    let nents = if use_iova { chunks(size) } else { range_chunks };
    let mut entries = Vec::new();
    // More entries than a u32 counts is EINVAL (nents overflows to 0 in the kernel).
    let reserved = match u32::try_from(nents) {
        Err(_) => Err(Errno::EINVAL),
        Ok(_) if inj.fail(Step::AllocTable) => Err(Errno::ENOMEM),
        Ok(n) => entries
            .try_reserve_exact(n as usize)
            .map_err(|_| Errno::ENOMEM),
    };
    if let Err(e) = reserved {
        if let Some(s) = state.as_mut() {
            env.dma.iova_free(dev, s);
        }
        return Err(e);
    }

    let backing = match state {
        None => {
            let off = provider.bus_offset();
            if range_chunks == ranges.len() as u64 {
                // One entry per range: a straight copy the compiler can vectorise.
                #[allow(clippy::cast_possible_truncation)]
                entries.extend(ranges.iter().map(|r| SgDma {
                    addr: DmaAddr(r.paddr.get().wrapping_add(off)),
                    len: r.len as u32,
                }));
            } else {
                for r in ranges {
                    push_chunks(&mut entries, r.paddr.get().wrapping_add(off), r.len);
                }
            }
            Backing::Bus
        }
        Some(mut s) if use_iova => {
            let mut mapped = 0u64;
            let mut res = Ok(());
            for (i, r) in ranges.iter().enumerate() {
                res = if inj.fail(Step::Link(i)) {
                    Err(Errno::ENOMEM)
                } else {
                    env.dma
                        .iova_link(dev, &mut s, r.paddr.get(), mapped, r.len, dir, attrs::MMIO)
                };
                if res.is_err() {
                    break;
                }
                mapped += r.len;
            }
            if res.is_ok() {
                res = if inj.fail(Step::Sync) {
                    Err(Errno::ENOMEM)
                } else {
                    env.dma.iova_sync(dev, &s, 0, mapped)
                };
            }
            if let Err(e) = res {
                env.dma.iova_destroy(dev, &mut s, mapped, dir, attrs::MMIO);
                return Err(e);
            }
            push_chunks(&mut entries, s.addr, mapped);
            Backing::Iova {
                dev,
                state: s,
                mapped,
            }
        }
        Some(_) => {
            let mut maps = Vec::new();
            if maps.try_reserve_exact(ranges.len()).is_err() {
                return Err(Errno::ENOMEM);
            }
            for (i, r) in ranges.iter().enumerate() {
                let m = if inj.fail(Step::MapPhys(i)) {
                    Err(Errno::ENOMEM)
                } else {
                    env.dma
                        .map_phys(dev, r.paddr, r.len, dir, attrs::MMIO)
                        .map_err(|_| Errno::ENOMEM)
                };
                match m {
                    Ok(addr) => {
                        maps.push((addr, r.len));
                        push_chunks(&mut entries, addr.get(), r.len);
                    }
                    Err(e) => {
                        for &(addr, len) in &maps {
                            env.dma.unmap_phys(dev, addr, len, dir, attrs::MMIO);
                        }
                        return Err(e);
                    }
                }
            }
            Backing::PerRange { dev, maps }
        }
    };
    debug_assert_eq!(entries.len() as u64, nents);
    Ok(SgTable {
        entries,
        size,
        backing,
    })
}

/// `dma_buf_free_sgt(attach, sgt, dir)`: undoes the mappings of a table made by
/// [`phys_vec_to_sgt`] (the IOVA range is unlinked and freed; per-range mappings are unmapped
/// one per range, with the size they were mapped with).
pub fn free_sgt(
    env: &DmaEnv,
    a: &Attachment,
    sgt: SgTable,
    dir: Direction,
    g: &ResvGuard<'_>,
) -> Result<(), Errno> {
    if let Err(e) = a.check_locked(g) {
        // Keep the mappings rather than tear them down without the lock; DMA debug will show
        // them as leaked.
        std::mem::forget(sgt);
        return Err(e);
    }
    match sgt.backing {
        Backing::Exporter | Backing::Bus => {}
        Backing::Iova {
            dev,
            mut state,
            mapped,
        } => env
            .dma
            .iova_destroy(dev, &mut state, mapped, dir, attrs::MMIO),
        Backing::PerRange { dev, maps } => {
            for (addr, len) in maps {
                env.dma.unmap_phys(dev, addr, len, dir, attrs::MMIO);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_is_the_page_aligned_u32_maximum() {
        assert_eq!(MAX_SG_ENT_SZ, 0xffff_f000);
        let mut v = Vec::new();
        push_chunks(&mut v, 0x1000, 5 << 30);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].len, 0xffff_f000);
        assert_eq!(v[1].addr.get(), 0x1000 + 0xffff_f000);
        assert_eq!(u64::from(v[0].len) + u64::from(v[1].len), 5 << 30);
    }

    #[test]
    fn exporter_tables_refuse_entries_a_u32_cannot_hold() {
        assert_eq!(
            SgTable::from_ranges(&[(DmaAddr(0), 1 << 32)]).unwrap_err(),
            Errno::EINVAL
        );
        let t =
            SgTable::from_ranges(&[(DmaAddr(0x1000), 0x2000), (DmaAddr(0x9000), 0x1000)]).unwrap();
        assert_eq!(
            (t.nents(), t.size(), t.kind()),
            (2, 0x3000, SgKind::Exporter)
        );
        assert_eq!(t.dma_addr_of(0x2800), Some(DmaAddr(0x9800)));
        assert_eq!(t.dma_addr_of(0x3000), None);
    }
}
